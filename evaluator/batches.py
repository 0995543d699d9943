"""Inference over the val subset in batches that halve on CUDA out of memory, for both adapters.

The loop is the same for mmdet 2.x and 3.x; only how one batch runs differs. It imports nothing of either
stack (the adapter passes its batches and its out-of-memory error in), so it loads in both venvs.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

from evaluator.errors import JobError, LeaseLost

log = logging.getLogger("mmdet_wandb.evaluator")


def infer_halving(
    total: int,
    batch_size: int,
    batches_from: Callable[[int, int], Iterable[list[Any]]],
    out_of_memory: type[BaseException],
    release_memory: Callable[[], None],
    lease_lost: threading.Event | None,
) -> list[Any]:
    """All ``total`` results, in order: ``batches_from(start, size)`` yields result lists from item ``start`` on.

    Out of memory keeps what is done, halves the batch and goes on from there; at batch size 1 it is a
    retryable job error. The lease is checked before each batch, so a lost lease stops within one batch.
    """
    results: list[Any] = []
    while len(results) < total:
        try:
            _check_lease(lease_lost)
            for batch in batches_from(len(results), batch_size):
                results.extend(batch)
                _check_lease(lease_lost)
        except out_of_memory as exc:
            release_memory()
            if batch_size == 1:
                raise JobError("CUDA out of memory at batch size 1", retryable=True) from exc
            batch_size = max(1, batch_size // 2)
            log.warning("CUDA out of memory: batch size %d from now on", batch_size)
        except (JobError, LeaseLost):
            raise
        except Exception as exc:
            raise JobError(f"the model raised during inference: {type(exc).__name__}: {exc}", retryable=True) from exc
    return results


def _check_lease(lease_lost: threading.Event | None) -> None:
    if lease_lost is not None and lease_lost.is_set():
        raise LeaseLost()

"""evaluator.batches: the out-of-memory halving both adapters run their inference through.

A model that runs out of memory above a batch size stands in for the GPU (torch's OutOfMemoryError cannot be
raised on a CPU machine without faking it anyway); the loop under test is the real one.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from evaluator.batches import infer_halving
from evaluator.errors import JobError, LeaseLost
from evaluator.metrics import plain_metrics


class OutOfMemory(RuntimeError):
    pass


class Model:
    """Doubles each item; runs out of memory on a batch larger than ``fits`` after ``warm`` good batches."""

    def __init__(self, items: list[int], fits: int, warm: int = 0) -> None:
        self.items, self.fits, self.warm = items, fits, warm
        self.sizes: list[int] = []
        self.released = 0

    def batches_from(self, start: int, size: int) -> Iterator[list[Any]]:
        for i in range(start, len(self.items), size):
            batch = self.items[i : i + size]
            if len(batch) > self.fits and self.warm == 0:
                raise OutOfMemory("CUDA out of memory")
            self.warm = max(0, self.warm - 1)
            self.sizes.append(len(batch))
            yield [2 * x for x in batch]

    def release(self) -> None:
        self.released += 1


def run(model: Model, batch_size: int, lease_lost: threading.Event | None = None) -> list[Any]:
    return infer_halving(len(model.items), batch_size, model.batches_from, OutOfMemory, model.release, lease_lost)


def test_out_of_memory_halves_the_batch_and_keeps_what_is_done() -> None:
    model = Model(list(range(21)), fits=3, warm=2)
    assert run(model, 8) == [2 * x for x in range(21)]
    assert model.sizes == [8, 8, 2, 2, 1]  # two batches of 8 kept, then 8 → 4 → 2 fit for the last 5
    assert model.released == 2


def test_out_of_memory_at_batch_size_one_is_a_retryable_error() -> None:
    model = Model(list(range(5)), fits=0)
    with pytest.raises(JobError, match="CUDA out of memory at batch size 1") as caught:
        run(model, 4)
    assert caught.value.retryable and model.released == 3 and model.sizes == []


def test_other_model_errors_are_job_errors_and_a_lost_lease_stops() -> None:
    def broken(start: int, size: int) -> Iterator[list[Any]]:
        raise ValueError("bad input shape")
        yield []

    with pytest.raises(JobError, match="the model raised during inference: ValueError: bad input shape"):
        infer_halving(3, 2, broken, OutOfMemory, lambda: None, None)
    lost = threading.Event()
    lost.set()
    model = Model(list(range(5)), fits=5)
    with pytest.raises(LeaseLost):
        run(model, 2, lost)
    assert model.sizes == []


def test_plain_metrics() -> None:
    np = pytest.importorskip("numpy")
    got = plain_metrics(lambda: {"bbox_mAP": np.float64(0.25), "n": np.int64(3), "x": 1, "copypaste": "0.25 0.5"})
    assert got == {"bbox_mAP": 0.25, "n": 3.0, "x": 1.0, "copypaste": "0.25 0.5"}
    assert all(type(v) in (float, str) for v in got.values())
    assert plain_metrics(lambda: {"a": 1 / 0}) == {"error": "ZeroDivisionError: division by zero"}

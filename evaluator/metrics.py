"""The subset's metrics as the records store them, for both adapters: numbers as floats, anything else as text.

A failed evaluation is reported in place of the metrics, never raised: the predictions are still worth showing.
"""
from __future__ import annotations

import contextlib
import io
import logging
import numbers
from collections.abc import Callable, Mapping
from typing import Any

log = logging.getLogger("mmdet_wandb.evaluator")


def plain_metrics(evaluate: Callable[[], Mapping[str, Any]]) -> dict[str, Any]:
    """``evaluate()``'s metrics as floats (numpy scalars included) or strings, or ``{"error": ...}``."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            metrics = evaluate()
    except Exception as exc:
        log.warning("subset evaluation failed: %s: %s", type(exc).__name__, exc)
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {k: float(v) if isinstance(v, numbers.Real) else str(v) for k, v in metrics.items()}

"""Checkpoints are loaded by torch's weights-only unpickler, on purpose: a checkpoint is a pickle, and a
pickle from a work_dir could run anything. What it may hold beyond tensors and builtin containers is an
explicit allowlist of the globals real mmdet 2.x and MMEngine (3.x) checkpoints carry (found on the
checkpoints the tests train); a checkpoint that needs another global is refused, naming it."""
from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

_UNSUPPORTED = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def _allowlist() -> list[Any]:
    """Imported here, not at module level: each stack has only its own packages."""
    import collections

    import numpy as np

    allowed: list[Any] = [
        collections.Counter, np.dtype, np.ndarray, np.core.multiarray._reconstruct, np.core.multiarray.scalar,
        *{type(np.dtype(name)) for name in ("float64", "float32", "float16", "int64", "int32", "int16", "int8", "uint8", "bool")},
    ]
    try:
        from mmengine.logging.history_buffer import HistoryBuffer
    except ImportError:
        return allowed
    return [*allowed, HistoryBuffer, (_statistics_method, "builtins.getattr")]


def _statistics_method(owner: Any, name: str) -> Any:
    """`getattr` as an MMEngine checkpoint uses it (its message hub pickles `HistoryBuffer.statistics_methods`
    as getattr(HistoryBuffer, 'min'), ...): those and nothing else."""
    from mmengine.logging.history_buffer import HistoryBuffer

    if owner is HistoryBuffer and name in {"min", "max", "mean", "current"}:
        return getattr(owner, name)
    raise ValueError(f"getattr({getattr(owner, '__name__', type(owner).__name__)}, {name!r}) is not allowed in a checkpoint")


@contextlib.contextmanager
def allowed() -> Iterator[None]:
    """torch.load calls inside see the allowlist (torch's default is already weights_only=True; this only adds
    the globals, and `load` callers never pass weights_only=False)."""
    import torch

    with torch.serialization.safe_globals(_allowlist()):
        yield


def explain(exc: BaseException) -> str:
    """A refused global, named; anything else as it is."""
    found = _UNSUPPORTED.search(str(exc))
    if found:
        return (f"it needs {found.group(1)}, which is not on the allowlist of what a checkpoint may hold "
                "(loading it would run code from the work_dir)")
    return f"{type(exc).__name__}: {exc}"

"""Checkpoints are loaded by torch's weights-only unpickler, on purpose: a checkpoint is a pickle, and a
pickle from a work_dir could run anything. What it may hold beyond tensors and builtin containers is an
explicit allowlist of the globals real mmdet 2.x and MMEngine (3.x) checkpoints carry (found on the
checkpoints the tests train: mmdet 2.x ones need none, MMEngine's the ones below); a checkpoint that needs
another global is refused, naming it. `--trust-checkpoints` (common/trust.py) loads with the full unpickler."""
from __future__ import annotations

import contextlib
import logging
import re
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

from evaluator.errors import JobError

log = logging.getLogger("mmdet_wandb.evaluator")

_UNSUPPORTED = re.compile(r"[Uu]nsupported (?:global: )?GLOBAL ([\w.]+)")  # not allowed, or in a module torch blocks (os, ...)


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
    """torch.load calls inside see the allowlist (it applies to weights_only=True loads only)."""
    import torch

    with torch.serialization.safe_globals(_allowlist()):
        yield


def load(path: str, *, trust: bool) -> dict:
    """The checkpoint on the CPU, with weights_only stated rather than left to torch's default: the weights-only
    unpickler and the allowlist, or with `trust` the full unpickler."""
    import torch

    with allowed():
        checkpoint = torch.load(path, map_location="cpu", weights_only=not trust)
    if not isinstance(checkpoint, dict):
        raise ValueError(f"it holds a {type(checkpoint).__name__}, not a dict with a state_dict")
    return checkpoint


def load_weights(model: Any, path: str, *, trust: bool, load_state_dict: Callable[..., Any]) -> dict:
    """`load` the checkpoint and put its weights into `model` as the stacks' `load_checkpoint` do (its
    `state_dict`, a `module.` prefix stripped) through the stack's own `load_state_dict`; returns the checkpoint.
    Any failure parks the job (JobError), naming a refused global."""
    try:
        checkpoint = load(path, trust=trust)
        weights = checkpoint.get("state_dict", checkpoint)
        state_dict = OrderedDict((re.sub(r"^module\.", "", key), value) for key, value in weights.items())
        state_dict._metadata = getattr(weights, "_metadata", OrderedDict())  # type: ignore[attr-defined]
        load_state_dict(model, state_dict, strict=False, logger=log)
    except Exception as exc:
        raise JobError(f"the checkpoint cannot be loaded: {explain(exc)}", retryable=False) from exc
    return checkpoint


def explain(exc: BaseException) -> str:
    """A refused global, named; anything else as it is."""
    found = _UNSUPPORTED.search(str(exc))
    if found:
        return (f"it needs {found.group(1)}, which is not on the allowlist of what a checkpoint may hold "
                "(loading it would run code from the work_dir; --trust-checkpoints loads it with the full unpickler)")
    return f"{type(exc).__name__}: {exc}"

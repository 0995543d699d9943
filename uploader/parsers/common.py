"""Mapping rules shared by the mmdet 2.x and mmengine parsers."""
from __future__ import annotations

from typing import Any

from common.numbers import is_number
from common.records import ParseState
from uploader.parsers import config_settings

# Timing and memory keys: logged under the row's mode prefix (beyond what MMDetWandbHook sends).
TIMING_KEYS = ("time", "data_time", "memory")


def learning_rates(lr: Any) -> dict[str, Any]:
    """`lr` as the hook names it: `learning_rate`, or `learning_rate/<group>` for dict optimizers."""
    if is_number(lr):
        return {"learning_rate": lr}
    if isinstance(lr, dict):
        return {f"learning_rate/{name}": v for name, v in lr.items() if is_number(v)}
    if isinstance(lr, list) and lr and is_number(lr[0]):
        return {"learning_rate": lr[0]}
    return {}


def optimizer_values(state: ParseState, obj: dict[str, Any]) -> dict[str, Any]:
    """`learning_rate` and `momentum` as the hook logs them; momentum from the config when not logged."""
    values = learning_rates(obj.get("lr"))
    momentum = obj.get("momentum", state.momentum)
    if is_number(momentum):
        values["momentum"] = momentum
    return values


def iter_seconds(obj: dict[str, Any]) -> float | None:
    """A train line's `time`: seconds per iteration over its logging interval (a NaN or negative one is none)."""
    seconds = obj.get("time")
    return float(seconds) if is_number(seconds) and seconds >= 0 else None


def prefixed_numbers(obj: dict[str, Any], prefix: str, skip: frozenset[str]) -> dict[str, Any]:
    """Every numeric value of a line under `<prefix>/<key>`; strings (e.g. bbox_mAP_copypaste) are dropped."""
    return {f"{prefix}/{k}": v for k, v in obj.items() if is_number(v) and k not in skip}


def apply_config_text(state: ParseState, text: str | None, filename: str) -> None:
    """Learn the runner type and momentum from a dumped config, unless the work_dir already told us."""
    config = config_settings.load_text(text, filename) if text else None
    if config is None:
        return
    if state.by_epoch is None:
        state.by_epoch = config.by_epoch
    if state.momentum is None:
        state.momentum = config.momentum
    if state.log_interval is None:
        state.log_interval = config.log_interval


def note_iters_per_epoch(state: ParseState, value: int | None, origin: str) -> None:
    """Keep the best-founded iterations-per-epoch: a measured value beats an estimate."""
    if not value or value <= 0:
        return
    if state.iters_per_epoch is None or state.iters_per_epoch_from == "estimate":
        if origin == "estimate" and state.iters_per_epoch is not None and state.iters_per_epoch >= value:
            return
        state.iters_per_epoch = value
        state.iters_per_epoch_from = origin

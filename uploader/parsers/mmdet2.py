"""mmdet 2.x `<ts>.log.json` (mmcv TextLoggerHook) → records.

Line 1 is runner.meta (or, on resume, the checkpoint's meta, which carries `epoch`/`iter` too); data lines
carry `mode`. Train `iter` is the iteration inside the epoch for epoch-based runners and the global one for
IterBasedRunner; a val line's `iter` is the val loader length and is not an axis at all.
"""
from __future__ import annotations

from typing import Any

from common.numbers import as_int
from common.records import Header, MetricRow, ParseState, Record, RowKind
from uploader.parsers.common import (
    apply_config_text,
    iter_seconds,
    note_iters_per_epoch,
    optimizer_values,
    prefixed_numbers,
)

NOT_METRICS = frozenset({"mode", "epoch", "iter", "lr", "momentum"})


def parse(state: ParseState, obj: dict[str, Any]) -> list[Record]:
    mode = obj.get("mode")
    if mode is None:
        return [_header(state, obj)]
    epoch = as_int(obj.get("epoch"))
    if mode == "train":
        return [_train(state, obj, epoch, as_int(obj.get("iter")))]
    return [_val(state, obj, epoch)]


def _header(state: ParseState, obj: dict[str, Any]) -> Header:
    first = not state.header_seen and state.data_rows == 0
    exp_name = obj.get("exp_name") if isinstance(obj.get("exp_name"), str) else None
    config_text = obj.get("config") if isinstance(obj.get("config"), str) else None
    apply_config_text(state, config_text, exp_name or "log header")
    resumed = "epoch" in obj and "iter" in obj
    if resumed and state.by_epoch is not False:
        epoch, done = as_int(obj.get("epoch")), as_int(obj.get("iter"))
        if epoch and done and done % epoch == 0:
            note_iters_per_epoch(state, done // epoch, "header")
    if first:
        state.header_seen = True
        state.resumed = resumed
        state.exp_name = exp_name
    return Header(resumed=resumed, exp_name=exp_name, config_text=config_text)


def _train(state: ParseState, obj: dict[str, Any], epoch: int | None, inner: int | None) -> MetricRow:
    _observe_epoch(state, epoch, inner)
    global_iter = _global_iter(state, epoch, inner)
    values = optimizer_values(state, obj)
    values.update(prefixed_numbers(obj, "train", NOT_METRICS))
    state.last_epoch, state.last_inner_iter = epoch, inner
    if inner is not None:
        state.max_inner_iter = max(state.max_inner_iter, inner)
    if global_iter is not None:
        state.last_train_iter = global_iter
    state.data_rows += 1
    # mmcv's text log: "Epoch [e][i/N]" (epoch-based: i within the epoch), "Iter [i/N]" (iter-based: i global)
    keys = (("train", epoch, inner), ("train", None, inner))
    return MetricRow(RowKind.TRAIN, _epoch_axis(state, epoch), global_iter, values, keys, iter_seconds(obj))


def _val(state: ParseState, obj: dict[str, Any], epoch: int | None) -> MetricRow:
    if state.by_epoch is not False and epoch is not None and state.iters_per_epoch:
        global_iter: int | None = epoch * state.iters_per_epoch
    else:
        global_iter = state.last_train_iter
    values = optimizer_values(state, obj)
    values.update(prefixed_numbers(obj, "val", NOT_METRICS))
    state.data_rows += 1
    # "Epoch(val) [e][n]", or "Iter(val) [n]" after the train line of the iteration it evaluated
    keys = (("val", epoch, None), ("val", None, state.last_train_iter))
    return MetricRow(RowKind.VAL, _epoch_axis(state, epoch), global_iter, values, keys)


def _observe_epoch(state: ParseState, epoch: int | None, inner: int | None) -> None:
    """At an epoch change, tell the runner type apart and estimate iterations per epoch if nothing better."""
    if epoch is None or inner is None or state.last_epoch is None or state.last_inner_iter is None:
        return
    if epoch <= state.last_epoch:
        return
    if state.by_epoch is None:
        state.by_epoch = inner <= state.last_inner_iter
    if state.by_epoch and epoch == state.last_epoch + 1:
        note_iters_per_epoch(state, state.max_inner_iter, "estimate")
    state.max_inner_iter = 0


def _global_iter(state: ParseState, epoch: int | None, inner: int | None) -> int | None:
    if inner is None:
        return None
    if state.by_epoch is False or epoch is None or epoch <= 1:
        return inner
    if state.iters_per_epoch is None:
        return None
    return (epoch - 1) * state.iters_per_epoch + inner


def _epoch_axis(state: ParseState, epoch: int | None) -> int | None:
    """IterBasedRunner logs the dataloader's epoch, which is no training axis."""
    return None if state.by_epoch is False else epoch

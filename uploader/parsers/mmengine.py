"""mmengine (mmdet 3.x, mmseg 1.x) `vis_data/scalars.json` and test-only `<ts>.json` → records.

Train lines carry `lr` and `step` (= global iteration); val lines carry metrics and a `step` that is the epoch
for epoch-based loops and the iteration (or 0, in mmdet 3.x iter-based configs) otherwise. Two runs appended
to one scalars.json show up as the step going back.
"""
from __future__ import annotations

from typing import Any

from common.numbers import as_int
from common.records import LineageBreak, MetricRow, ParseState, Record, RowKind
from uploader.parsers.common import iter_seconds, optimizer_values, prefixed_numbers

NOT_METRICS = frozenset({"step", "epoch", "iter", "lr", "momentum"})


def is_train_line(obj: dict[str, Any]) -> bool:
    return any(k == "lr" or k.endswith(".lr") or k.startswith("loss") for k in obj)


def parse_scalars(state: ParseState, obj: dict[str, Any]) -> list[Record]:
    if is_train_line(obj):
        return _train(state, obj)
    return [_val(state, obj)]


def parse_test(state: ParseState, obj: dict[str, Any]) -> list[Record]:
    state.data_rows += 1
    return [MetricRow(RowKind.TEST, None, None, prefixed_numbers(obj, "test", NOT_METRICS))]


def _train(state: ParseState, obj: dict[str, Any]) -> list[Record]:
    global_iter = as_int(obj.get("iter")) or as_int(obj.get("step"))
    epoch = as_int(obj.get("epoch"))
    records: list[Record] = []
    if global_iter is not None and state.last_train_iter is not None and global_iter < state.last_train_iter:
        state.lineage_in_file += 1
        records.append(LineageBreak(f"step went back from {state.last_train_iter} to {global_iter}", state.lineage_in_file))
        state.last_train_iter = None
        state.last_epoch = None
        state.data_rows = 0
    if state.by_epoch is None:
        state.by_epoch = epoch is not None
    values = optimizer_values(state, obj)
    values.update(prefixed_numbers(obj, "train", NOT_METRICS))
    state.last_epoch = epoch
    if global_iter is not None:
        state.last_train_iter = global_iter
    state.data_rows += 1
    # the text log: "Epoch(train) [e][i/N]" (the text side makes it global) or "Iter(train) [i/N]"
    keys = (("train", None, global_iter),)
    records.append(MetricRow(RowKind.TRAIN, epoch if state.by_epoch else None, global_iter, values, keys, iter_seconds(obj)))
    return records


def _val(state: ParseState, obj: dict[str, Any]) -> MetricRow:
    step = as_int(obj.get("step"))
    iter_based = state.by_epoch is False or (state.by_epoch is None and step == 0)
    if iter_based:
        epoch = None
        global_iter = step if step else state.last_train_iter
    else:
        epoch = step
        exact = state.iters_per_epoch and state.iters_per_epoch_from != "estimate"
        global_iter = epoch * state.iters_per_epoch if exact and epoch is not None else state.last_train_iter
    state.data_rows += 1
    keys = (("val", None, global_iter),) if iter_based else (("val", epoch, None),)  # "Iter(val) [..]" / "Epoch(val) [e][..]"
    return MetricRow(RowKind.VAL, epoch, global_iter, prefixed_numbers(obj, "val", NOT_METRICS), keys)

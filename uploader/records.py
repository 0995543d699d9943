"""Typed records that flow from parsed log lines into the outbox.

A parser turns one decoded JSON line into zero or more of these; nothing here touches files, the DB or W&B.
"""
from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, fields
from typing import Any


class LogFormat(str, enum.Enum):
    """What kind of JSON-lines log a source file is; decided by discovery from its path."""

    MMDET2_LOGJSON = "mmdet2_logjson"  # <ts>.log.json (mmcv 1.x TextLoggerHook)
    MMENGINE_SCALARS = "mmengine_scalars"  # <ts>/vis_data/scalars.json or <ts>/vis_data/<ts>.json
    MMENGINE_TEST = "mmengine_test"  # <ts>/<ts>.json written by a test-only run


class RowKind(str, enum.Enum):
    TRAIN = "train"
    VAL = "val"
    TEST = "test"


@dataclass(frozen=True)
class Header:
    """The meta line of a mmdet 2.x log (runner.meta, or the checkpoint's meta when resumed)."""

    resumed: bool
    exp_name: str | None
    config_text: str | None


@dataclass(frozen=True)
class MetricRow:
    """One data line, already mapped to W&B keys; `iter` is the global iteration (None when unknowable)."""

    kind: RowKind
    epoch: int | None
    iter: int | None
    values: dict[str, Any]

    def wandb_payload(self) -> dict[str, Any]:
        """The dict given to `run.log`: metric values plus the `iter`/`epoch` axes."""
        payload = dict(self.values)
        if self.iter is not None:
            payload["iter"] = self.iter
        if self.epoch is not None:
            payload["epoch"] = self.epoch
        return payload


@dataclass(frozen=True)
class LineageBreak:
    """A new training run starts at this line of the same file (mmengine concatenated runs)."""

    reason: str
    lineage: int  # index of the run that starts here among the runs of this file (0 is the first)


Record = Header | MetricRow | LineageBreak


@dataclass
class ParseState:
    """Everything a parser must remember between lines of one source; persisted with the source's offset.

    Filled partly from the work_dir (text-log denominator, config) before the first line, and updated as
    lines are parsed. Plain JSON types only.
    """

    by_epoch: bool | None = None
    iters_per_epoch: int | None = None
    iters_per_epoch_from: str | None = None  # "text_log" | "header" | "checkpoint" | "estimate"
    momentum: float | None = None
    log_interval: int | None = None
    header_seen: bool = False
    resumed: bool = False
    exp_name: str | None = None
    last_epoch: int | None = None
    last_inner_iter: int | None = None
    max_inner_iter: int = 0
    last_train_iter: int | None = None
    data_rows: int = 0
    lineage_in_file: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> ParseState:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (data or {}).items() if k in known})

"""Typed records shared by the uploader, the evaluator and the DB layer.

Parsed log lines (a parser turns one decoded JSON line into zero or more `Record`s) and what the evaluator
stores and the uploader reads back: the val subset (manifest) and the predictions. Plain dataclasses with a
JSON form; no files, DB, W&B, torch or mmdet here. Boxes are `[x1, y1, x2, y2]` in original image pixels,
labels are 0-based class indices (the tables shift them to the hook's 1-based ids), masks are COCO RLE dicts
with `counts` as text.
"""
from __future__ import annotations

import enum
import hashlib
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import orjson


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


TimeKey = tuple[str, "int | None", "int | None"]  # (kind, epoch, iteration) as the text log names a line


@dataclass(frozen=True)
class MetricRow:
    """One data line, already mapped to W&B keys; `iter` is the global iteration (None when unknowable).

    `time_keys`: how the text log of the same launch names this line (uploader/row_times.py matches them);
    `iter_seconds`: the line's own `time` (seconds per iteration), for when there is no text log;
    `timestamp`: when the line was written (epoch seconds), once known."""

    kind: RowKind
    epoch: int | None
    iter: int | None
    values: dict[str, Any]
    time_keys: tuple[TimeKey, ...] = ()
    iter_seconds: float | None = None
    timestamp: float | None = None

    def wandb_payload(self) -> dict[str, Any]:
        """The dict given to `run.log`: metric values plus the `iter`/`epoch` axes and the line's time."""
        payload = dict(self.values)
        if self.iter is not None:
            payload["iter"] = self.iter
        if self.epoch is not None:
            payload["epoch"] = self.epoch
        if self.timestamp is not None:
            payload["_timestamp"] = self.timestamp
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
    text_offset: int = 0  # how far the text log of the launch has been matched against rows (row_times)
    text_last_iter: int | None = None  # the text log's last train iteration before text_offset
    clock: float | None = None  # the time given to the last row (epoch seconds): times never go back
    clock_iter: int | None = None  # that row's global iteration

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> ParseState:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (data or {}).items() if k in known})


#: The hook's subset: the first N of a seed-42 shuffle of the val indices (mmdet-wandb-hook.md §1.10).
SUBSET_SEED = 42


def subset_indices(dataset_size: int, num_eval_images: int) -> list[int]:
    """Same legacy MT19937 stream as `np.random.seed(42); np.random.shuffle(idx)` in the hook (numpy imported
    here: the CLI's read-only commands import this module and need no numpy)."""
    import numpy as np

    order = np.arange(dataset_size)
    np.random.RandomState(SUBSET_SEED).shuffle(order)
    return [int(i) for i in order[:num_eval_images]]


@dataclass(frozen=True)
class Instances:
    """Detected or annotated objects of one image."""

    boxes: list[list[float]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    scores: list[float] | None = None  # None for ground truth
    masks: list[dict[str, Any]] | None = None  # RLE per instance; None when the model/dataset has none

    def to_json(self) -> str:
        return orjson.dumps(asdict(self)).decode()

    @classmethod
    def from_json(cls, text: str) -> Instances:
        return cls(**orjson.loads(text))

    def above(self, threshold: float) -> Instances:
        """The hook's filter: with a threshold > 0, keep only scores strictly above it (boxes and masks)."""
        if threshold <= 0 or self.scores is None:
            return self
        keep = [i for i, s in enumerate(self.scores) if s > threshold]
        return Instances(
            boxes=[self.boxes[i] for i in keep],
            labels=[self.labels[i] for i in keep],
            scores=[self.scores[i] for i in keep],
            masks=[self.masks[i] for i in keep] if self.masks is not None else None,
        )


@dataclass(frozen=True)
class ValImageRecord:
    position: int  # row of the val table
    dataset_index: int
    image_name: str
    file_ext: str  # the image file's own format (jpg, png) when the browser shows it as the model saw it
    width: int
    height: int
    image_bytes: bytes
    ground_truth: Instances


@dataclass(frozen=True)
class Manifest:
    classes: list[str]
    images: list[ValImageRecord]
    source: dict[str, Any]  # ann_file, img_prefix, val set size: where the subset came from

    @property
    def digest(self) -> str:
        """Content identity: same classes, image bytes and ground truth → same digest → stored once."""
        h = hashlib.sha256(orjson.dumps(self.classes))
        for image in self.images:
            h.update(orjson.dumps([image.position, image.image_name, image.file_ext]))
            h.update(hashlib.sha256(image.image_bytes).digest())
            h.update(image.ground_truth.to_json().encode())
        return h.hexdigest()


@dataclass(frozen=True)
class EvalOutcome:
    """A finished evaluation: what a worker hands to `queue.complete`."""

    manifest: Manifest
    predictions: list[Instances]  # one per manifest image, same order
    metrics: dict[str, Any]  # the dataset's own evaluate() on the subset
    device: str
    seconds: float  # model inference wall time
    note: str | None = None
    insight: dict[str, Any] = field(default_factory=dict)  # per-class metrics, confusion matrix, per-image errors

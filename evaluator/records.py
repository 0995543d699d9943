"""What the evaluator stores and the uploader reads back: the val subset (manifest) and the predictions.

Plain dataclasses with a JSON form; no torch or mmdet here, so the uploader can import them. Boxes are
`[x1, y1, x2, y2]` in original image pixels, labels are 0-based class indices (the tables shift them to the
hook's 1-based ids), masks are COCO RLE dicts with `counts` as text.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import orjson

#: The hook's subset: the first N of a seed-42 shuffle of the val indices (mmdet-wandb-hook.md §1.10).
SUBSET_SEED = 42


def subset_indices(dataset_size: int, num_eval_images: int) -> list[int]:
    """Same legacy MT19937 stream as `np.random.seed(42); np.random.shuffle(idx)` in the hook."""
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

"""What a checkpoint's evaluation tells beyond the dataset's own metrics, for both adapters the same way: per-class
COCO metrics and PR curves (evaluator/classwise.py), the tool's confusion matrix (evaluator/confusion.py) and each
subset image's errors. Computed from the raw detections (before the table's `bbox_score_thr`) of the images the job
evaluated — the subset, or the whole val set with `eval_full_val` (the per-image errors stay the subset's: they are
columns of its table) — and stored as one JSON document with the job; the uploader turns it into tables and summary
values.

A failure here is reported in place (`{"error": ...}`), never raised: the predictions are still worth showing.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from common.records import Instances
from db.jobs import ClaimedJob
from evaluator import classwise, confusion
from evaluator.encoding import rle_text

log = logging.getLogger("mmdet_wandb.evaluator")

BACKGROUND = "background"


@dataclass(frozen=True)
class InsightOptions:
    classwise: bool = True
    score_thr: float = confusion.SCORE_THR  # of the confusion matrix and the per-image errors
    tp_iou_thr: float = confusion.TP_IOU_THR


def options_of(job: ClaimedJob) -> InsightOptions:
    return InsightOptions(job.eval_classwise, job.confusion_score_thr, job.confusion_iou_thr)


@dataclass(frozen=True)
class Detections:
    """One image's raw detections, as the model gave them (float32 boxes `[x1, y1, x2, y2]`, 0-based labels)."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    masks: list[dict[str, Any]] | None = None  # COCO RLE per detection

    def instances(self) -> Instances:
        """What the prediction table stores (rounded as the hook rounds)."""
        return Instances(
            boxes=self.boxes.astype(float).round(2).tolist(), labels=[int(x) for x in self.labels],
            scores=self.scores.astype(float).round(4).tolist(),
            masks=[rle_text(m) for m in self.masks] if self.masks is not None else None,
        )


@dataclass(frozen=True)
class GroundTruth:
    """The subset's ground truth: a COCO object COCOeval reads, and the boxes the confusion matrix matches."""

    coco: Any
    cat_ids: list[int]
    img_ids: list[int]  # one per subset image, in subset order
    boxes: list[np.ndarray]  # per subset image, as `get_ann_info` gives them (no crowd, no ignored)
    labels: list[np.ndarray]
    has_masks: bool


def ground_truth_of(instances: list[Instances], sizes: list[tuple[int, int]], num_classes: int) -> GroundTruth:
    """A COCO ground truth built from the images' stored instances and (height, width), image ids 0, 1, …: for
    datasets without a COCO api of their own."""
    from pycocotools import mask as mask_util
    from pycocotools.coco import COCO

    annotations = []
    for image_id, gt in enumerate(instances):
        for index, (box, label) in enumerate(zip(gt.boxes, gt.labels)):
            x1, y1, x2, y2 = box
            ann = {"id": len(annotations) + 1, "image_id": image_id, "category_id": label + 1, "iscrowd": 0,
                   "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1)}
            if gt.masks is not None:
                rle = {"size": gt.masks[index]["size"], "counts": gt.masks[index]["counts"].encode()}
                ann["segmentation"], ann["area"] = gt.masks[index], float(mask_util.area(rle))
            annotations.append(ann)
    coco = COCO()
    coco.dataset = {
        "images": [{"id": image_id, "width": width, "height": height} for image_id, (height, width) in enumerate(sizes)],
        "categories": [{"id": k + 1, "name": str(k)} for k in range(num_classes)],
        "annotations": annotations,
    }
    coco.createIndex()
    return GroundTruth(coco, list(range(1, num_classes + 1)), list(range(len(instances))),
                       [np.asarray(gt.boxes, dtype=np.float32).reshape(-1, 4) for gt in instances],
                       [np.asarray(gt.labels, dtype=np.int64) for gt in instances],
                       any(gt.masks is not None for gt in instances))


def coco_results(gt: GroundTruth, detections: list[Detections], iou_type: str) -> list[dict[str, Any]]:
    """COCO results format, as mmdet's `_det2json`/`_segm2json` write it (same order: image, then detection)."""
    results = []
    for img_id, det in zip(gt.img_ids, detections):
        for index, (box, score, label) in enumerate(zip(det.boxes, det.scores, det.labels)):
            x1, y1, x2, y2 = box.tolist()
            entry = {"image_id": img_id, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score),
                     "category_id": gt.cat_ids[int(label)]}
            if iou_type == "segm":
                entry["segmentation"] = rle_text(det.masks[index])  # type: ignore[index]
            results.append(entry)
    return results


def compute(gt: GroundTruth, detections: list[Detections], classes: list[str], options: InsightOptions,
            rows: list[int] | None = None) -> dict[str, Any]:
    """The stored document: `classwise` (per IoU type) and `confusion` over every evaluated image, `images` (errors)
    of the table's rows only: `rows` are their positions among the evaluated images (default: all of them)."""
    try:
        return _compute(gt, detections, classes, options, list(range(len(detections))) if rows is None else rows)
    except Exception as exc:
        log.warning("evaluation insight failed: %s: %s", type(exc).__name__, exc)
        return {"error": f"{type(exc).__name__}: {exc}"}


def _compute(gt: GroundTruth, detections: list[Detections], classes: list[str], options: InsightOptions,
             rows: list[int]) -> dict[str, Any]:
    document: dict[str, Any] = {}
    if options.classwise:
        iou_types = ["bbox"] + (["segm"] if gt.has_masks and all(d.masks is not None for d in detections) else [])
        document["classwise"] = {
            iou_type: classwise.evaluate(gt.coco, coco_results(gt, detections, iou_type), iou_type, gt.cat_ids, gt.img_ids,
                                         classes).to_json()
            for iou_type in iou_types
        }
    matrices = [
        confusion.image_matrix(len(classes), boxes, labels, det.boxes, det.scores, det.labels, options.score_thr, options.tp_iou_thr)
        for boxes, labels, det in zip(gt.boxes, gt.labels, detections)
    ]
    total = sum(matrices, np.zeros((len(classes) + 1, len(classes) + 1), dtype=np.int64))
    document["confusion"] = {"classes": [*classes, BACKGROUND], "matrix": total.tolist(), "score_thr": options.score_thr,
                             "tp_iou_thr": options.tp_iou_thr}
    document["images"] = [asdict(confusion.errors(matrices[row])) for row in rows]
    return document

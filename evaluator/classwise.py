"""Per-class COCO metrics and precision-recall curves of one evaluated checkpoint, read off pycocotools' own
COCOeval arrays exactly as mmdet's `classwise=True` reads them (2.x `CocoDataset.evaluate`, 3.x `CocoMetric`):
`precision[T, R, K, A, M]` at area range "all" and the last `maxDets` (mmdet evaluates with 100, 300, 1000).

COCO writes -1 where a class has no ground truth in the evaluated images; that is NaN here (`None` in JSON).
No detections at all (pycocotools' `loadRes` fails on an empty list) is an empty result set: AP 0 where there is
ground truth. No torch or mmdet here: the adapters hand in a COCO ground truth and COCO-format detections.
"""
from __future__ import annotations

import contextlib
import io
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

#: mmdet's `proposal_nums`, given to COCOeval as maxDets; the per-class numbers use the last one, as mmdet does.
MAX_DETS = [100, 300, 1000]
IOU_50, IOU_75 = 0, 5  # rows of COCOeval's iouThrs (0.5:0.05:0.95)


@dataclass(frozen=True)
class ClassMetrics:
    name: str
    gt_count: int  # ground-truth instances COCOeval counts (crowd ones excluded)
    ap: float  # mean precision over IoU 0.5:0.95 and 101 recall points; NaN without ground truth
    ap50: float
    ap75: float
    recall: float  # mean recall over IoU 0.5:0.95


@dataclass(frozen=True)
class PRCurve:
    """Precision at COCO's 101 recall points (0, 0.01, … 1) of one class: at IoU 0.5, and averaged over 0.5:0.95."""

    name: str
    precision50: list[float]
    precision: list[float]


@dataclass(frozen=True)
class Classwise:
    iou_type: str  # "bbox" or "segm"
    classes: list[ClassMetrics]
    curves: list[PRCurve]
    recall_points: list[float]

    def to_json(self) -> dict[str, Any]:
        return _nan_to_none(asdict(self))


def evaluate(coco_gt: Any, detections: list[dict[str, Any]], iou_type: str, cat_ids: list[int], img_ids: list[int],
             names: list[str]) -> Classwise:
    """COCOeval of `detections` (COCO results format) against `coco_gt` on `img_ids`, one row per `cat_ids` entry."""
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco_eval = COCOeval(coco_gt, _results(coco_gt, detections, iou_type), iou_type)
        coco_eval.params.catIds = list(cat_ids)
        coco_eval.params.imgIds = list(img_ids)
        coco_eval.params.maxDets = list(MAX_DETS)
        coco_eval.evaluate()
        coco_eval.accumulate()
    precision = coco_eval.eval["precision"][:, :, :, 0, -1]  # [T, R, K]
    recall = coco_eval.eval["recall"][:, :, 0, -1]  # [T, K]
    counts = _gt_counts(coco_gt, img_ids)
    classes, curves = [], []
    for k, (cat_id, name) in enumerate(zip(cat_ids, names)):
        per_class = precision[:, :, k]
        classes.append(ClassMetrics(
            name=name, gt_count=counts.get(cat_id, 0), ap=_mean(per_class), ap50=_mean(per_class[IOU_50]),
            ap75=_mean(per_class[IOU_75]), recall=_mean(recall[:, k]),
        ))
        curves.append(PRCurve(name, _curve(per_class[IOU_50]), _curve(per_class.mean(axis=0), missing=per_class.min(axis=0))))
    return Classwise(iou_type, classes, curves, [round(float(r), 2) for r in coco_eval.params.recThrs])


def _results(coco_gt: Any, detections: list[dict[str, Any]], iou_type: str) -> Any:
    """`loadRes`, or an empty result set (loadRes cannot take one). Masks are evaluated without their box, as mmdet
    does (else COCO takes the box area for the mask's area range)."""
    from pycocotools.coco import COCO

    if detections:
        if iou_type == "segm":
            detections = [{k: v for k, v in d.items() if k != "bbox"} for d in detections]
        return coco_gt.loadRes(detections)
    empty = COCO()
    empty.dataset = {"images": list(coco_gt.dataset["images"]), "categories": list(coco_gt.dataset.get("categories", [])),
                     "annotations": []}
    empty.createIndex()
    return empty


def _gt_counts(coco_gt: Any, img_ids: list[int]) -> dict[int, int]:
    counts: dict[int, int] = {}
    for ann in coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=list(img_ids))):
        if not ann.get("iscrowd", 0):
            counts[ann["category_id"]] = counts.get(ann["category_id"], 0) + 1
    return counts


def _mean(values: np.ndarray) -> float:
    """mmdet's reading: the mean of the entries COCO filled (> -1), NaN when there are none."""
    kept = values[values > -1]
    return float(np.mean(kept)) if kept.size else math.nan


def _curve(values: np.ndarray, missing: np.ndarray | None = None) -> list[float]:
    """Rounded to 4 places: a chart needs no more, and the curves are most of the stored document."""
    missing = values if missing is None else missing
    return [round(float(v), 4) if m > -1 else math.nan for v, m in zip(values, missing)]


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return value

"""The confusion matrix of one checkpoint, matched as mmdet's `tools/analysis_tools/confusion_matrix.py` matches
(`analyze_per_img_dets`, no extra NMS): a detection scoring at least `score_thr` counts once for every ground-truth
box it overlaps with IoU >= `tp_iou_thr` (row = true class, column = predicted class), and in the background row
when it overlaps none; a ground-truth box that no detection of its class matched counts in the background column.

Kept per image too: the image's missed ground truth, false positives and wrong classes are what sorts the
prediction table by failure. The IoU is mmdet's `bbox_overlaps` (float32, no +1), vectorised.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SCORE_THR = 0.3  # the tool's defaults
TP_IOU_THR = 0.5


@dataclass(frozen=True)
class ImageErrors:
    missed: int  # ground-truth boxes no detection of their class matched
    false_positives: int  # detections that overlap no ground truth
    wrong_class: int  # (ground truth, detection) pairs that overlap with different classes


def bbox_overlaps(boxes1: np.ndarray, boxes2: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """mmdet's `bbox_overlaps(mode="iou")`: the same float32 operations, on the whole matrix at once."""
    a = np.asarray(boxes1, dtype=np.float32).reshape(-1, 4)
    b = np.asarray(boxes2, dtype=np.float32).reshape(-1, 4)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    width = np.maximum(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0)
    height = np.maximum(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0)
    overlap = width * height
    union = np.maximum(area_a[:, None] + area_b[None, :] - overlap, np.float32(eps))
    return (overlap / union).astype(np.float32)


def image_matrix(num_classes: int, gt_boxes: np.ndarray, gt_labels: np.ndarray, det_boxes: np.ndarray,
                 det_scores: np.ndarray, det_labels: np.ndarray, score_thr: float = SCORE_THR,
                 tp_iou_thr: float = TP_IOU_THR) -> np.ndarray:
    """One image's (num_classes + 1)² counts; the last row and column are the background."""
    matrix = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)
    gt_labels = np.asarray(gt_labels, dtype=np.int64).reshape(-1)
    det_labels = np.asarray(det_labels, dtype=np.int64).reshape(-1)
    kept = np.asarray(det_scores, dtype=np.float32).reshape(-1) >= np.float32(score_thr)  # the tool's float32 scores
    matches = bbox_overlaps(det_boxes, gt_boxes)[kept] >= tp_iou_thr  # [kept detections, ground truth]
    for label, row in zip(det_labels[kept], matches):
        if not row.any():
            matrix[-1, label] += 1
        np.add.at(matrix, (gt_labels[row], label), 1)
    found = (matches & (det_labels[kept][:, None] == gt_labels[None, :])).any(axis=0)
    np.add.at(matrix, (gt_labels[~found], -1), 1)
    return matrix


def errors(matrix: np.ndarray) -> ImageErrors:
    inner = matrix[:-1, :-1]
    return ImageErrors(missed=int(matrix[:-1, -1].sum()), false_positives=int(matrix[-1, :-1].sum()),
                       wrong_class=int(inner.sum() - np.trace(inner)))

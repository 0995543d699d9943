"""The evaluation insight of one checkpoint (the evaluator's stored document, evaluator/insight.py) as W&B tables
of its evaluation artifact and as charts: per-class metrics, PR curves, the confusion matrix, per-image errors.

Every checkpoint's tables have the same columns, with `checkpoint`, `epoch` and `iter` (one of the two empty), so
that W&B compares them across versions. NaN stands where COCO has no value (a class without ground truth). The
charts are wandb's own specs (`wandb.plot.line`, the confusion-matrix view); they read the run's summary table of
their key, which is where the writer puts them (private_api.log_chart): no history step is spent on them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import wandb

CLASSWISE_TABLE = "classwise"
PR_TABLE = "pr_curves"
CONFUSION_TABLE = "confusion_matrix"
ERROR_COLUMNS = ["missed", "false_positives", "wrong_class", "errors"]
IOU_CURVES = (("precision50", "0.5"), ("precision", "0.5:0.95"))


@dataclass(frozen=True)
class Checkpoint:
    """Which checkpoint the rows are of: its file name and its epoch or iteration."""

    name: str
    epoch: int | None
    iter: int | None

    @property
    def cells(self) -> list[Any]:
        return [self.name, self.epoch, self.iter]


def _number(value: Any) -> float:
    return math.nan if value is None else float(value)


def classwise_table(document: dict[str, Any], checkpoint: Checkpoint) -> wandb.Table:
    table = wandb.Table(columns=["checkpoint", "epoch", "iter", "iou_type", "class", "gt_count", "AP", "AP50", "AP75", "recall"])
    for iou_type, result in sorted(document.get("classwise", {}).items()):
        for c in result["classes"]:
            table.add_data(*checkpoint.cells, iou_type, c["name"], c["gt_count"], _number(c["ap"]), _number(c["ap50"]),
                           _number(c["ap75"]), _number(c["recall"]))
    return table


def pr_rows(document: dict[str, Any], iou_type: str, field: str) -> list[tuple[str, float, float]]:
    """(class, recall, precision) of one IoU type's curves; the points of a class without ground truth left out."""
    result = document.get("classwise", {}).get(iou_type)
    if result is None:
        return []
    return [(curve["name"], float(r), float(p)) for curve in result["curves"]
            for r, p in zip(result["recall_points"], curve[field]) if p is not None]


def pr_table(document: dict[str, Any], checkpoint: Checkpoint) -> wandb.Table:
    table = wandb.Table(columns=["checkpoint", "epoch", "iter", "iou_type", "iou", "class", "recall", "precision"])
    for iou_type in sorted(document.get("classwise", {})):
        for field, iou in IOU_CURVES:
            for name, recall, precision in pr_rows(document, iou_type, field):
                table.add_data(*checkpoint.cells, iou_type, iou, name, recall, precision)
    return table


def confusion_rows(document: dict[str, Any]) -> list[tuple[str, str, int]]:
    """(actual, predicted, count) for every cell, background row and column included (the view's layout)."""
    found = document.get("confusion")
    if found is None:
        return []
    names = found["classes"]
    return [(names[i], names[j], int(count)) for i, row in enumerate(found["matrix"]) for j, count in enumerate(row)]


def confusion_table(document: dict[str, Any], checkpoint: Checkpoint) -> wandb.Table:
    table = wandb.Table(columns=["checkpoint", "epoch", "iter", "Actual", "Predicted", "nPredictions"])
    for actual, predicted, count in confusion_rows(document):
        table.add_data(*checkpoint.cells, actual, predicted, count)
    return table


def image_errors(document: dict[str, Any], count: int) -> list[list[int | None]]:
    """`ERROR_COLUMNS` of each subset image (empty cells when the insight is missing)."""
    images = document.get("images") or []
    if len(images) != count:
        return [[None] * len(ERROR_COLUMNS) for _ in range(count)]
    return [[i["missed"], i["false_positives"], i["wrong_class"], i["missed"] + i["false_positives"] + i["wrong_class"]]
            for i in images]


def tables(document: dict[str, Any], checkpoint: Checkpoint) -> dict[str, wandb.Table]:
    """The artifact's tables by name (none when the evaluator could not compute the insight)."""
    if not document or "error" in document:
        return {}
    found = {CONFUSION_TABLE: confusion_table(document, checkpoint)}
    if document.get("classwise"):
        found[CLASSWISE_TABLE] = classwise_table(document, checkpoint)
        found[PR_TABLE] = pr_table(document, checkpoint)
    return found


def charts(document: dict[str, Any], checkpoint: Checkpoint) -> dict[str, Any]:
    """Chart key → wandb custom chart: a PR line plot per IoU type and IoU, the confusion matrix view."""
    if not document or "error" in document:
        return {}
    found: dict[str, Any] = {}
    for iou_type in sorted(document.get("classwise", {})):
        for field, iou in IOU_CURVES:
            table = wandb.Table(columns=["class", "recall", "precision"], data=[list(r) for r in pr_rows(document, iou_type, field)])
            found[f"eval/pr_curve/{iou_type}@{iou}"] = wandb.plot.line(
                table, "recall", "precision", stroke="class", title=f"PR {iou_type} IoU {iou} ({checkpoint.name})")
    if document.get("confusion"):
        found["eval/confusion_matrix"] = wandb.plot_table(
            "wandb/confusion_matrix/v1",
            wandb.Table(columns=["Actual", "Predicted", "nPredictions"], data=[list(r) for r in confusion_rows(document)]),
            {"Actual": "Actual", "Predicted": "Predicted", "nPredictions": "nPredictions"},
            {"title": f"Confusion matrix ({checkpoint.name}, score >= {document['confusion']['score_thr']}, "
                      f"IoU >= {document['confusion']['tp_iou_thr']})"},
        )
    return found

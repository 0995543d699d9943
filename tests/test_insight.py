"""Evaluation insight on REAL tiny MMDetection 2.x checkpoints: per-class AP equals mmdet's own
`dataset.evaluate(..., classwise=True)` on the same subset and predictions, the confusion matrix equals the analysis
tool's `calculate_confusion_matrix`, and the edge cases (a class without ground truth, no detections, one class)
give clear values."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from db.jobs import ClaimedJob
from evaluator import classwise, confusion, insight, mmdet2
from tests.conftest import cli, offline_run, status
from tests.test_evaluator import table_of

NUM = 6


def job_of(work_dir: Path) -> ClaimedJob:
    """A job for the training's last epoch checkpoint."""
    last = max(work_dir.glob("epoch_*.pth"), key=lambda p: int(p.stem.split("_")[1]))
    return ClaimedJob(1, 1, "mmdet2", str(last), str(work_dir), None, None, NUM, 0.3)


def evaluated(work_dir: Path):  # type: ignore[no-untyped-def]
    """What the 2.x adapter sees: the subset, mmdet's raw results on it, the manifest and the insight document."""
    job = job_of(work_dir)
    outcome = mmdet2.evaluate(job, "cpu", 2)
    cfg = mmdet2.load_config(job)
    dataset = mmdet2.build_val_dataset(cfg, work_dir, batched=True)
    indices, _ = mmdet2.job_inputs.subset(job, len(dataset))
    subset = mmdet2.take_subset(dataset, indices)
    model = mmdet2.build_model(cfg, job.checkpoint_path, "cpu", dataset)
    results = mmdet2.run_inference(model, subset, cfg, 2, None)
    return subset, results, outcome


def printed_classwise(subset, results, metric: str) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """The per-class AP table mmdet prints with classwise=True (`| name | 0.123 |` pairs)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        subset.evaluate(results, metric=metric, classwise=True)
    table = out.getvalue().rsplit("| category", 1)[1]
    return dict(re.findall(r"\|\s*(\S+)\s*\|\s*(nan|\d\.\d{3})\s*(?=\|)", table))


def tool_confusion(subset, results, score_thr: float = 0.3, tp_iou_thr: float = 0.5) -> np.ndarray:  # type: ignore[no-untyped-def]
    """`calculate_confusion_matrix` of mmdet's own tools/analysis_tools/confusion_matrix.py (installed with mmdet)."""
    import mmdet

    path = Path(mmdet.__file__).parent / ".mim" / "tools" / "analysis_tools" / "confusion_matrix.py"
    spec = importlib.util.spec_from_file_location("mmdet_confusion_matrix", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return module.calculate_confusion_matrix(subset, results, score_thr=score_thr, tp_iou_thr=tp_iou_thr)


@pytest.mark.parametrize("kind", ["retinanet_epoch", "maskrcnn_epoch"])
def test_per_class_ap_and_confusion_equal_mmdets_own(trained_work_dir, kind):
    work_dir = trained_work_dir(kind)
    subset, results, outcome = evaluated(work_dir)
    found = outcome.insight
    assert "error" not in found, found
    metrics = ["bbox", "segm"] if kind == "maskrcnn_epoch" else ["bbox"]
    assert sorted(found["classwise"]) == sorted(metrics)
    for metric in metrics:
        printed = printed_classwise(subset, results, metric)
        ours = {c["name"]: c for c in found["classwise"][metric]["classes"]}
        assert set(printed) == set(ours) == set(subset.CLASSES)
        for name, text in printed.items():
            ap = ours[name]["ap"]
            assert text == ("nan" if ap is None else f"{ap:0.3f}"), (metric, name)
        counts = {c["name"]: c["gt_count"] for c in found["classwise"][metric]["classes"]}
        gt = [subset.get_ann_info(i)["labels"] for i in range(len(subset))]
        assert counts == {n: int(sum((g == k).sum() for g in gt)) for k, n in enumerate(subset.CLASSES)}
        curves = found["classwise"][metric]["curves"]
        assert len(found["classwise"][metric]["recall_points"]) == 101 and all(len(c["precision50"]) == 101 for c in curves)
    assert np.array_equal(np.array(found["confusion"]["matrix"]), tool_confusion(subset, results))
    assert found["confusion"]["classes"] == [*subset.CLASSES, "background"]
    matrix = np.array(found["confusion"]["matrix"])
    assert sum(i["missed"] for i in found["images"]) == matrix[:-1, -1].sum()
    assert sum(i["false_positives"] for i in found["images"]) == matrix[-1, :-1].sum()
    assert len(found["images"]) == NUM


def test_the_confusion_matrix_equals_the_tools_at_other_thresholds(trained_work_dir):
    subset, results, outcome = evaluated(trained_work_dir("retinanet_epoch"))
    gt = mmdet2.ground_truth(subset, outcome.manifest)
    dets = [mmdet2.to_detections(r, len(subset.CLASSES)) for r in results]
    for score_thr, iou_thr in [(0.05, 0.3), (0.5, 0.7)]:
        found = insight.compute(gt, dets, list(subset.CLASSES), insight.InsightOptions(False, score_thr, iou_thr))
        assert "classwise" not in found
        assert np.array_equal(np.array(found["confusion"]["matrix"]), tool_confusion(subset, results, score_thr, iou_thr))


def _coco(images: int, anns: list[tuple[int, int, list[float]]], num_classes: int):  # type: ignore[no-untyped-def]
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = {
        "images": [{"id": i, "width": 100, "height": 100} for i in range(images)],
        "categories": [{"id": k + 1, "name": f"c{k}"} for k in range(num_classes)],
        "annotations": [{"id": n + 1, "image_id": i, "category_id": c + 1, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
                        for n, (i, c, b) in enumerate(anns)],
    }
    coco.createIndex()
    return coco


def test_a_class_without_ground_truth_is_nan_and_no_detections_are_zero():
    coco = _coco(2, [(0, 0, [10, 10, 20, 20]), (1, 0, [50, 50, 30, 30])], num_classes=2)
    none = classwise.evaluate(coco, [], "bbox", [1, 2], [0, 1], ["c0", "c1"])
    c0, c1 = none.classes
    assert (c0.gt_count, c0.ap, c0.ap50, c0.recall) == (2, 0.0, 0.0, 0.0)
    assert c1.gt_count == 0 and all(math.isnan(v) for v in (c1.ap, c1.ap50, c1.ap75, c1.recall))
    assert all(math.isnan(p) for p in none.curves[1].precision)
    assert none.to_json()["classes"][1]["ap"] is None, "NaN is null in the stored JSON"

    perfect = [{"image_id": 0, "category_id": 1, "bbox": [10, 10, 20, 20], "score": 0.9},
               {"image_id": 1, "category_id": 1, "bbox": [50, 50, 30, 30], "score": 0.8}]
    one = classwise.evaluate(coco, perfect, "bbox", [1, 2], [0, 1], ["c0", "c1"])
    assert (one.classes[0].ap, one.classes[0].recall) == (1.0, 1.0) and math.isnan(one.classes[1].ap)


def test_one_class_and_empty_images_give_clear_values():
    coco = _coco(2, [(0, 0, [10, 10, 20, 20])], num_classes=1)
    gt = insight.GroundTruth(coco, [1], [0, 1], [np.array([[10, 10, 30, 30]], np.float32), np.zeros((0, 4), np.float32)],
                             [np.array([0]), np.zeros(0, np.int64)], has_masks=False)
    empty = insight.Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))
    stray = insight.Detections(np.array([[60, 60, 90, 90]], np.float32), np.array([0.9], np.float32), np.array([0]))
    found = insight.compute(gt, [empty, stray], ["only"], insight.InsightOptions())
    assert found["classwise"]["bbox"]["classes"] == [
        {"name": "only", "gt_count": 1, "ap": 0.0, "ap50": 0.0, "ap75": 0.0, "recall": 0.0}]
    assert found["confusion"]["matrix"] == [[0, 1], [1, 0]]
    assert found["images"] == [{"missed": 1, "false_positives": 0, "wrong_class": 0},
                               {"missed": 0, "false_positives": 1, "wrong_class": 0}]


def test_a_detection_overlapping_another_class_is_a_wrong_class_not_a_miss_of_its_own():
    matrix = confusion.image_matrix(2, np.array([[0, 0, 10, 10]]), np.array([0]), np.array([[0, 0, 10, 9]]),
                                    np.array([0.9]), np.array([1]))
    assert matrix.tolist() == [[0, 1, 1], [0, 0, 0], [0, 0, 0]]
    assert confusion.errors(matrix) == confusion.ImageErrors(missed=1, false_positives=0, wrong_class=1)


def test_backfill_logs_the_insight_tables_charts_and_summary(trained_work_dir, tmp_path):
    work_dir = trained_work_dir("retinanet_epoch")
    home = tmp_path / "home"
    cli(home, "backfill", str(work_dir.parent), "--no-progress", "--evaluate", "--num-eval-images", str(NUM))
    (run,) = [r for w in status(home)["work_dirs"] for r in w["runs"]]
    segments = offline_run(home, run["wandb_id"]).segments
    preds = [a for s in segments for a in s.artifacts if a.type == "evaluation"]
    epochs = sorted(p.metadata["epoch"] for p in preds)
    assert len(preds) == len(list(work_dir.glob("epoch_*.pth"))) > 1
    classes = json.loads(Path(next(work_dir.glob("*.py")).read_text().split("val.json")[0].rsplit("'", 1)[1] + "val.json")
                         .read_text())["categories"]
    names = sorted(c["name"] for c in classes)
    for pred in preds:
        classwise_rows = table_of(pred, "classwise")
        assert classwise_rows["columns"] == ["checkpoint", "epoch", "iter", "iou_type", "class", "gt_count", "AP", "AP50", "AP75", "recall"]
        assert sorted(r[4] for r in classwise_rows["data"]) == names
        assert {(r[0], r[1]) for r in classwise_rows["data"]} == {(pred.metadata["checkpoint"], pred.metadata["epoch"])}
        pr = table_of(pred, "pr_curves")
        assert pr["columns"][-3:] == ["class", "recall", "precision"] and {r[4] for r in pr["data"]} == {"0.5", "0.5:0.95"}
        matrix = table_of(pred, "confusion_matrix")
        assert len(matrix["data"]) == (len(names) + 1) ** 2 and "background" in {r[3] for r in matrix["data"]}
        eval_data = table_of(pred, "eval_data")
        assert eval_data["columns"] == ["image_name", "ground_truth", "prediction", "missed", "false_positives", "wrong_class", "errors"]
        assert all(row[6] == row[3] + row[4] + row[5] for row in eval_data["data"])
    summary = segments[-1].summary
    for name in names:
        assert summary[f"best_epoch/eval/{name}/bbox_AP"] in epochs
        assert f"eval/{name}/bbox_AP" in summary
    assert summary["eval/epoch"] == max(epochs)
    visualize = segments[-1].wandb_internal_config["visualize"]
    assert set(visualize) == {"eval/pr_curve/bbox@0.5", "eval/pr_curve/bbox@0.5:0.95", "eval/confusion_matrix"}
    for key, chart in visualize.items():
        assert chart["panel_config"]["panelDefId"] in ("wandb/line/v0", "wandb/confusion_matrix/v1")
        assert summary[f"{key}_table"]["_type"] == "table-file", "the chart's table is a summary value"


def test_the_options_reach_the_job_no_classwise_and_other_confusion_thresholds(trained_work_dir, tmp_path):
    work_dir = trained_work_dir("retinanet_epoch")
    home = tmp_path / "home"
    cli(home, "backfill", str(work_dir.parent), "--no-progress", "--evaluate", "--num-eval-images", str(NUM),
        "--no-eval-classwise", "--confusion-score-thr", "0.05", "--confusion-iou-thr", "0.3")
    (run,) = [r for w in status(home)["work_dirs"] for r in w["runs"]]
    segments = offline_run(home, run["wandb_id"]).segments
    preds = [a for s in segments for a in s.artifacts if a.type == "evaluation"]
    assert preds
    for pred in preds:
        paths = {e["path"] for e in pred.entries}
        assert "classwise.table.json" not in paths and "pr_curves.table.json" not in paths
        assert "confusion_matrix.table.json" in paths
    assert not any(k.startswith("eval/") and k.endswith("_AP") for k in segments[-1].summary)
    assert set(segments[-1].wandb_internal_config["visualize"]) == {"eval/confusion_matrix"}
    title = segments[-1].wandb_internal_config["visualize"]["eval/confusion_matrix"]["panel_config"]["stringSettings"]["title"]
    assert "score >= 0.05" in title and "IoU >= 0.3" in title

"""Evaluation insight on REAL tiny MMDetection 2.x checkpoints: per-class AP equals mmdet's own
`dataset.evaluate(..., classwise=True)` on the same subset and predictions (on the whole val set with
`--eval-full-val`, the table staying on the subset), the confusion matrix equals the analysis tool's
`calculate_confusion_matrix`, and the edge cases (a class without ground truth, no detections, one class, an insight
that cannot be computed) give clear values, in real jobs too."""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import json
import math
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from common.records import subset_indices
from db.jobs import ClaimedJob
from db.models import JobState
from evaluator import classwise, confusion, insight, mmdet2
from evaluator.metrics import plain_metrics
from tests.conftest import cli, offline_run, status
from tests.test_evaluator import jobs, rewrite_checkpoint, table_of, val_annotation_path

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
    gt = mmdet2.ground_truth(subset)
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
    assert {p.metadata["metrics_on"] for p in preds} == {"subset"}, "the subset, by default"
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


def test_the_options_reach_the_job_no_classwise_other_confusion_thresholds_and_full_val(trained_work_dir, tmp_path):
    work_dir = trained_work_dir("retinanet_epoch")
    home = tmp_path / "home"
    cli(home, "backfill", str(work_dir.parent), "--no-progress", "--evaluate", "--num-eval-images", str(NUM),
        "--no-eval-classwise", "--confusion-score-thr", "0.05", "--confusion-iou-thr", "0.3", "--eval-full-val")
    assert {(j.eval_full_val, j.state) for j in jobs(home)} == {(True, JobState.DONE)}
    (run,) = [r for w in status(home)["work_dirs"] for r in w["runs"]]
    segments = offline_run(home, run["wandb_id"]).segments
    preds = [a for s in segments for a in s.artifacts if a.type == "evaluation"]
    assert preds
    for pred in preds:
        assert pred.metadata["metrics_on"] == "val" and len(table_of(pred, "eval_data")["data"]) == NUM
        paths = {e["path"] for e in pred.entries}
        assert "classwise.table.json" not in paths and "pr_curves.table.json" not in paths
        assert "confusion_matrix.table.json" in paths
    assert not any(k.startswith("eval/") and k.endswith("_AP") for k in segments[-1].summary)
    assert set(segments[-1].wandb_internal_config["visualize"]) == {"eval/confusion_matrix"}
    title = segments[-1].wandb_internal_config["visualize"]["eval/confusion_matrix"]["panel_config"]["stringSettings"]["title"]
    assert "score >= 0.05" in title and "IoU >= 0.3" in title


# --- --eval-full-val: the metrics over the whole val set, the tables on the subset ---------------------------------


def mmdets_own_test(job: ClaimedJob) -> tuple[Any, list[Any]]:
    """The whole val set and mmdet's own `single_gpu_test` over it, as tools/test.py runs it (2 images a batch)."""
    from mmdet.apis import single_gpu_test
    from mmdet.datasets import build_dataloader

    cfg = mmdet2.load_config(job)
    dataset = mmdet2.build_val_dataset(cfg, Path(job.work_dir), batched=True)
    model = mmdet2.build_model(cfg, job.checkpoint_path, "cpu", dataset)
    loader = build_dataloader(dataset, samples_per_gpu=2, workers_per_gpu=0, dist=False, shuffle=False)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return dataset, single_gpu_test(model, loader)


def test_eval_full_val_gives_mmdets_own_metrics_of_the_whole_val_set_and_keeps_the_table_on_the_subset(trained_work_dir):
    work_dir = trained_work_dir("retinanet_epoch")
    job = dataclasses.replace(job_of(work_dir), eval_full_val=True)
    outcome = mmdet2.evaluate(job, "cpu", 2)
    dataset, results = mmdets_own_test(job)
    assert len(dataset) > NUM, "the val set is more than the subset"
    found = outcome.insight
    assert "error" not in found, found

    ours = {c["name"]: c for c in found["classwise"]["bbox"]["classes"]}
    assert printed_classwise(dataset, results, "bbox") == {n: "nan" if c["ap"] is None else f"{c['ap']:0.3f}" for n, c in ours.items()}
    labels = [dataset.get_ann_info(i)["labels"] for i in range(len(dataset))]
    assert {n: c["gt_count"] for n, c in ours.items()} == {n: int(sum((g == k).sum() for g in labels)) for k, n in enumerate(dataset.CLASSES)}
    assert outcome.metrics == plain_metrics(lambda: dataset.evaluate(results, metric="bbox")), "the config's evaluation: bbox"
    assert np.array_equal(np.array(found["confusion"]["matrix"]), tool_confusion(dataset, results))

    indices = subset_indices(len(dataset), NUM)
    assert [im.dataset_index for im in outcome.manifest.images] == indices, "the table's rows: the subset, in its order"
    assert outcome.predictions == [mmdet2.to_detections(results[i], len(dataset.CLASSES)).instances().above(job.bbox_score_thr)
                                   for i in indices], "taken from the one run over the val set"
    for errors, index in zip(found["images"], indices, strict=True):
        one = tool_confusion(mmdet2.take_subset(dataset, [index]), [results[index]])
        assert errors == {"missed": one[:-1, -1].sum(), "false_positives": one[-1, :-1].sum(),
                          "wrong_class": one[:-1, :-1].sum() - np.trace(one[:-1, :-1])}, index


def test_eval_full_val_is_checked_by_the_same_validators(tmp_path):
    work_dirs = tmp_path / "work_dirs"
    work_dirs.mkdir()
    proc = cli(tmp_path / "home", "backfill", str(work_dirs), "--no-progress", check=False, MMDET_WANDB_EVAL_FULL_VAL="maybe")
    assert proc.returncode == 2 and "MMDET_WANDB_EVAL_FULL_VAL = 'maybe': true or false is expected" in proc.stderr, proc.stderr
    config = tmp_path / "options.toml"
    config.write_text("eval_full_val = 'sometimes'\n")
    proc = cli(tmp_path / "home", "config", "show", str(work_dirs), "--config", str(config), check=False)
    assert proc.returncode == 2, proc.stderr
    assert f"config file {config}: eval_full_val = 'sometimes': true or false is expected" in proc.stderr, proc.stderr


# --- edge cases as real jobs -----------------------------------------------------------------------------------------


def with_edited_val(work_dir: Path, tmp_path: Path, edit: Callable[[dict], dict]) -> list[str]:
    """Every checkpoint of the (writable) work_dir pointed at a copy of its dataset whose val annotations `edit`
    changed; returns the val images' file names, in the dataset's order."""
    ann = Path(val_annotation_path(next(work_dir.glob("*.py"))))
    root, data = ann.parents[1], tmp_path / "data"
    shutil.copytree(root, data)
    val = data / ann.relative_to(root)
    annotations = edit(json.loads(val.read_text()))
    val.write_text(json.dumps(annotations))
    for path in work_dir.glob("*.pth"):
        if not path.is_symlink():
            rewrite_checkpoint(path, path, lambda meta: {**meta, "config": meta["config"].replace(str(root), str(data))})
    return [image["file_name"] for image in annotations["images"]]


def backfilled(home: Path, work_dir: Path, *args: str) -> tuple[list[Any], dict[str, Any]]:
    """`backfill --evaluate` of the work_dir: its prediction artifacts and the run's last summary."""
    cli(home, "backfill", str(work_dir.parent), "--no-progress", "--evaluate", "--num-eval-images", str(NUM), *args)
    (run,) = [r for w in status(home)["work_dirs"] for r in w["runs"]]
    segments = offline_run(home, run["wandb_id"]).segments
    return [a for s in segments for a in s.artifacts if a.type == "evaluation"], segments[-1].summary


def test_a_job_whose_insight_cannot_be_computed_is_done_and_the_rest_is_logged(trained_work_dir, tmp_path):
    """The val annotations name the training's last class otherwise (a renamed category): `CocoDataset` finds no
    category id for it, so mmdet's own `evaluate` and the insight both fail on that class's detections. The job is
    still done, with its predictions; the error is kept in place of the insight, and the uploader logs the prediction
    table (error columns empty) without the insight's tables, charts and summary values."""
    work_dir = trained_work_dir("retinanet_epoch", writable=True)

    def rename_last_class(annotations: dict) -> dict:
        annotations["categories"][-1]["name"] = "renamed"
        return annotations

    with_edited_val(work_dir, tmp_path, rename_last_class)
    home = tmp_path / "home"
    preds, summary = backfilled(home, work_dir)
    done = jobs(home)
    assert done and {j.state for j in done} == {JobState.DONE}
    for job in done:
        assert json.loads(job.insight_json)["error"].startswith("IndexError"), job.insight_json
        assert "error" in json.loads(job.metrics_json), "mmdet's own evaluate fails the same way"
    assert len(preds) == len(done)
    for pred in preds:
        assert {e["path"] for e in pred.entries} & {"classwise.table.json", "pr_curves.table.json", "confusion_matrix.table.json"} == set()
        table = table_of(pred, "eval_data")
        assert len(table["data"]) == NUM and all(row[3:] == [None] * 4 for row in table["data"]), "error columns empty"
    assert any(row[2]["boxes"]["predictions"] for pred in preds for row in table_of(pred, "eval_data")["data"]), "predictions logged"
    assert not [k for k in summary if k.startswith(("eval/", "best/eval/"))]


def mmdet2_classes(work_dir: Path) -> list[str]:
    """The training's classes, as the val annotations name them."""
    ann = Path(val_annotation_path(next(work_dir.glob("*.py"))))
    return [c["name"] for c in json.loads(ann.read_text())["categories"]]


def test_a_class_without_ground_truth_in_the_subset_and_a_checkpoint_without_detections_give_clear_values(trained_work_dir, tmp_path):
    """Real jobs: the last class has no ground truth in the subset's images (its AP is NaN, it has no PR points and no
    summary value), and one checkpoint's model detects nothing (AP 0 where there is ground truth, every box missed)."""
    work_dir = trained_work_dir("retinanet_epoch", writable=True)
    names = list(mmdet2_classes(work_dir))
    last = len(names)  # category id of the last class

    def no_last_class_in_the_subset(annotations: dict) -> dict:
        subset = {annotations["images"][i]["id"] for i in subset_indices(len(annotations["images"]), NUM)}
        annotations["annotations"] = [a for a in annotations["annotations"] if not (a["image_id"] in subset and a["category_id"] == last)]
        return annotations

    with_edited_val(work_dir, tmp_path, no_last_class_in_the_subset)
    blind = max(work_dir.glob("epoch_*.pth"), key=lambda p: int(p.stem.split("_")[1]))

    def detect_nothing(meta: dict) -> dict:
        assert "score_thr=0.05" in meta["config"]
        return {**meta, "config": meta["config"].replace("score_thr=0.05", "score_thr=1.01")}

    rewrite_checkpoint(blind, blind, detect_nothing)
    home = tmp_path / "home"
    preds, summary = backfilled(home, work_dir)
    assert {j.state for j in jobs(home)} == {JobState.DONE}
    assert len(preds) == len(list(work_dir.glob("epoch_*.pth"))) > 1
    for pred in preds:
        rows = {r[4]: r for r in table_of(pred, "classwise")["data"]}
        assert rows[names[-1]][5] == 0 and rows[names[-1]][6:] == [None] * 4, "NaN, which the table file writes as null"
        assert names[-1] not in {r[5] for r in table_of(pred, "pr_curves")["data"]}, "no PR points without ground truth"
        eval_data = table_of(pred, "eval_data")["data"]
        if pred.metadata["checkpoint"] == blind.name:
            assert all(rows[n][6:] == [0.0] * 4 for n in names[:-1] if rows[n][5]), rows
            assert all(not row[2]["boxes"]["predictions"] and row[4] == row[5] == 0 for row in eval_data)
            matrix = table_of(pred, "confusion_matrix")["data"]
            assert {(r[3], r[4]) for r in matrix if r[5]} <= {(n, "background") for n in names}, "every box missed"
            assert sum(row[3] for row in eval_data) == sum(rows[n][5] for n in names)
        else:
            assert all(rows[n][6] is not None for n in names[:-1] if rows[n][5])
    assert f"eval/{names[-1]}/bbox_AP" not in summary and f"best/eval/{names[-1]}/bbox_AP" not in summary
    assert all(f"best/eval/{n}/bbox_AP" in summary for n in names[:-1])

"""MMDetection 3.x parity, on REAL tiny MMEngine trainings (tools/train.py of mmdet 3.3, in the mmdet 3.x
environment): checkpoint versions, one `val` table per run and a prediction table per checkpoint, as for 2.x;
predictions equal to mmdet 3.x's own `inference_detector`; 2.x and 3.x workers sharing one queue; bad 3.x
checkpoints parked with a clear error."""
from __future__ import annotations

import base64
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from common.records import subset_indices
from db.models import JobState
from tests.conftest import REPO, cli, service_env, status
from tests.mmdet3_run.fixtures import mmdet3_python
from tests.test_evaluator import NUM, THR, artifacts_of, jobs, stored_predictions, table_of

CLASSES = ("square", "disk", "triangle")
STACK_ENV = {"MMDET_WANDB_MMDET3_PYTHON": mmdet3_python()}


def backfill(home: Path, root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return cli(home, "backfill", str(root), "--no-progress", "--num-eval-images", str(NUM), *args, timeout=900, **STACK_ENV)


def in_mmdet3(script: str, *args: str) -> str:
    """Run a script in the mmdet 3.x environment; its stdout."""
    proc = subprocess.run([mmdet3_python(), "-c", script, *args], capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**service_env(Path("/nonexistent")), "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def val_names(work_dir: Path) -> list[str]:
    config = next(work_dir.glob("*.py")).read_text()
    root = re.search(r"data_root = '([^']+)'", config).group(1)  # type: ignore[union-attr]
    return [image["file_name"] for image in json.loads(Path(root, "annotations", "val.json").read_text())["images"]]


def b64_md5(path: Path) -> str:
    return base64.b64encode(hashlib.md5(path.read_bytes()).digest()).decode()


@pytest.mark.parametrize("kind", ["retinanet3_epoch", "retinanet3_iter", "maskrcnn3_epoch"])
def test_backfill_of_an_mmengine_work_dir_gives_checkpoints_val_and_prediction_tables(trained_work_dir3, tmp_path, kind):
    work_dir = trained_work_dir3(kind)
    home = tmp_path / "home"
    backfill(home, work_dir.parent, "--log-checkpoint", "--evaluate")

    unit = "iter" if "iter" in kind else "epoch"
    regular = sorted((p for p in work_dir.glob(f"{unit}_*.pth")), key=lambda p: int(p.stem.split("_")[1]))
    best = sorted(work_dir.glob("best_*.pth"))
    assert regular and (best or unit == "iter")
    arts = [a for _, a in artifacts_of(home)]
    models = [a for a in arts if a.type == "model"]
    assert len(models) == len(regular) + len(best)
    for model in models:
        [entry] = [e for e in model.entries if e["path"].endswith(".pth")]
        assert entry["digest"] == b64_md5(work_dir / entry["path"]), "the logged version is the bytes on disk"
    assert {a for m in models for a in m.aliases} >= {"latest", *(["best"] if best else [])}

    (val,) = [a for a in arts if a.type == "dataset"]
    preds = [a for a in arts if a.type == "evaluation"]
    assert sorted(a.metadata["checkpoint"] for a in preds) == sorted(p.name for p in regular), "one version per checkpoint"
    names = val_names(work_dir)
    expected = [names[i] for i in subset_indices(len(names), NUM)]
    val_table = table_of(val, "val_data")
    assert val_table["columns"] == ["image_name", "image"], "the 2.x schema"
    assert [row[0] for row in val_table["data"]] == expected, "the hook's seed-42 subset, in its order"
    val_files = {e["path"]: e for e in val.entries if not e["path"].endswith(".table.json")}
    for pred in preds:
        table = table_of(pred, "eval_data")
        assert table["columns"] == ["image_name", "ground_truth", "prediction", "missed", "false_positives", "wrong_class", "errors"]
        assert [row[0] for row in table["data"]] == expected
        refs = {e["path"]: e for e in pred.entries if e["ref"]}
        assert set(refs) == set(val_files), "the images are references into val"
        for _, gt, predicted, *_errors in table["data"]:
            boxes = predicted["boxes"]["predictions"]
            assert all(b["scores"]["score"] > THR and b["class_id"] >= 1 for b in boxes), "class ids from 1"
            for b in gt["boxes"]["ground_truth"]:
                assert b["box_caption"] == CLASSES[b["class_id"] - 1], "class ids from 1, names from the dataset"
        if kind.startswith("maskrcnn"):
            assert all(row[1]["masks"] for row in table["data"]), "ground-truth masks drawn"
        metrics = pred.metadata["subset_metrics"]
        for iou_type in ("bbox", "segm") if kind.startswith("maskrcnn") else ("bbox",):
            per_class = [row for row in table_of(pred, "classwise")["data"] if row[3] == iou_type]
            assert sorted(row[4] for row in per_class) == sorted(CLASSES)
            aps = [row[6] for row in per_class]
            if all(row[5] for row in per_class):  # every class has ground truth: COCO's mAP is their mean
                assert round(sum(aps) / len(aps), 3) == metrics[f"coco/{iou_type}_mAP"], "CocoMetric's own mAP"
        assert len(table_of(pred, "confusion_matrix")["data"]) == (len(CLASSES) + 1) ** 2
    done = jobs(home)
    assert {(j.stack, j.state) for j in done} == {("mmdet3", JobState.DONE)} and len(done) == len(regular)
    assert not list((home / "store" / "eval").iterdir()), "the jobs' checkpoint links are gone"


def test_predictions_equal_mmdet3_inference_detector(trained_work_dir3, tmp_path):
    work_dir = trained_work_dir3("maskrcnn3_epoch")
    home = tmp_path / "home"
    backfill(home, work_dir.parent, "--evaluate")
    (job,) = [j for j in jobs(home) if j.number == 3]
    images, stored = stored_predictions(home, job)
    config = next(work_dir.glob("*.py"))
    root = re.search(r"data_root = '([^']+)'", config.read_text()).group(1)  # type: ignore[union-attr]
    out = in_mmdet3(INFER, str(config), str(work_dir / "epoch_3.pth"), *[str(Path(root, "val", n)) for n in images])
    theirs = json.loads(out.strip().splitlines()[-1])
    from pycocotools import mask as mask_util

    assert any(ours.boxes for ours in stored), "something was detected"
    for name, ours, their in zip(images, stored, theirs):
        keep = np.array(their["scores"]) > THR
        assert len(ours.boxes) == int(keep.sum()), f"{name}: same detections above the threshold"
        np.testing.assert_allclose(np.array(ours.boxes).reshape(-1, 4), np.array(their["boxes"]).reshape(-1, 4)[keep], atol=0.01)
        np.testing.assert_allclose(ours.scores, np.array(their["scores"])[keep], atol=1e-4)
        assert ours.labels == np.array(their["labels"])[keep].tolist()
        kept_masks = [m for m, k in zip(their["masks"], keep) if k]
        assert len(ours.masks) == len(kept_masks)
        for rle, other in zip(ours.masks, kept_masks):
            mine = mask_util.decode({"size": rle["size"], "counts": rle["counts"].encode()})
            assert (mine == mask_util.decode({"size": other["size"], "counts": other["counts"].encode()})).all()


INFER = r"""
import json, sys
from mmdet.apis import inference_detector, init_detector
from mmdet.structures.mask import encode_mask_results
from evaluator import checkpoint_globals

config, checkpoint, *images = sys.argv[1:]
with checkpoint_globals.allowed():
    model = init_detector(config, checkpoint, device="cpu")
out = []
for path in images:
    pred = inference_detector(model, path).pred_instances
    item = {"boxes": pred.bboxes.tolist(), "scores": pred.scores.tolist(), "labels": pred.labels.tolist()}
    if "masks" in pred:
        item["masks"] = [{"size": [int(s) for s in r["size"]], "counts": r["counts"].decode()}
                         for r in encode_mask_results(pred.masks.numpy())]
    out.append(item)
print(json.dumps(out))
"""


def test_a_2x_and_a_3x_worker_share_one_queue_each_job_done_once_by_its_stack(trained_work_dir, trained_work_dir3, tmp_path):
    root = tmp_path / "root"
    v2 = trained_work_dir("retinanet_epoch", dest=root)
    v3 = trained_work_dir3("retinanet3_epoch", dest=root)
    home = tmp_path / "home"
    cli(home, "backfill", str(root), "--no-progress", "--num-eval-images", str(NUM), timeout=600)
    queued = {j.id: j.stack for j in jobs(home)}
    assert set(queued.values()) == {"mmdet2", "mmdet3"}

    def worker(python: str, out: Path) -> subprocess.Popen[bytes]:
        return subprocess.Popen([python, "-m", "mmdet_wandb.cli", "evaluate", "--exit-when-idle", "--device", "cpu", "--poll", "0.2",
                                 "--log-level", "INFO"], env=service_env(home), cwd=REPO, stdout=out.open("wb"), stderr=subprocess.STDOUT)

    workers = {"mmdet2": worker(sys.executable, tmp_path / "w2.out"), "mmdet3": worker(mmdet3_python(), tmp_path / "w3.out")}
    for proc in workers.values():
        assert proc.wait(timeout=600) == 0
    done_by = {}
    for stack in workers:
        text = (tmp_path / f"w{stack[-1]}.out").read_text()
        assert f"({stack}) on cpu" in text
        for job_id in re.findall(r"job (\d+) done", text):
            assert int(job_id) not in done_by, f"job {job_id} done twice"
            done_by[int(job_id)] = stack
    assert done_by == queued, "every job done by a worker of its stack"
    assert all(j.state is JobState.DONE and j.attempts == 1 for j in jobs(home))
    by_dir = {w["path"]: w for w in status(home)["work_dirs"]}
    assert {j["stack"] for j in by_dir[str(v2)]["eval_jobs"]} == {"mmdet2"}
    assert {j["stack"] for j in by_dir[str(v3)]["eval_jobs"]} == {"mmdet3"}


REWRITE = r"""
import sys, torch
from evaluator import checkpoint_globals

path, old, new = sys.argv[1:4]
with checkpoint_globals.allowed():
    checkpoint = torch.load(path, map_location="cpu")
meta = checkpoint["meta"]
if old == "--no-config":
    del meta["cfg"]
else:
    assert old in meta["cfg"], old
    meta["cfg"] = meta["cfg"].replace(old, new)
torch.save(checkpoint, path)
"""


def test_bad_3x_checkpoints_are_parked_with_a_clear_error_and_the_others_go_on(trained_work_dir3, tmp_path):
    work_dir = trained_work_dir3("retinanet3_epoch", writable=True)
    epochs = sorted(work_dir.glob("epoch_*.pth"), key=lambda p: int(p.stem.split("_")[1]))
    assert len(epochs) == 3
    for path in (*work_dir.glob("best_*.pth"), *work_dir.glob("*/vis_data/config.py"), next(work_dir.glob("*.py"))):
        path.unlink()  # no config anywhere but in the checkpoints
    in_mmdet3(REWRITE, str(epochs[0]), "--no-config", "")
    in_mmdet3(REWRITE, str(epochs[1]), "type='CocoDataset'", "type='NoSuchDataset'")
    in_mmdet3(REWRITE, str(epochs[2]), "default_scope = 'mmdet'", "custom_imports = dict(imports=['no_such_module'])\ndefault_scope = 'mmdet'")
    home = tmp_path / "home"
    backfill(home, work_dir.parent, "--evaluate")
    after = {Path(j.checkpoint_path).name.split("-", 1)[1]: j for j in jobs(home)}
    no_config, no_dataset, no_module = (after[p.name] for p in epochs)
    assert no_config.state is JobState.DEAD and "no config" in no_config.last_error
    assert no_dataset.state is JobState.DEAD and "val dataset cannot be built" in no_dataset.last_error
    assert "NoSuchDataset" in no_dataset.last_error
    assert no_module.state is JobState.DEAD and "no_such_module" in no_module.last_error
    table = cli(home, "status").stdout
    assert "dead" in table


def test_an_mmengine_checkpoint_needing_a_global_off_the_allowlist_is_refused_by_name(trained_work_dir3, tmp_path):
    """The weights-only unpickler with our allowlist: what an MMEngine checkpoint holds loads; anything else is
    refused before it runs, and the job says which global it wanted."""
    work_dir = trained_work_dir3("retinanet3_epoch", writable=True)
    [first, *rest] = sorted(work_dir.glob("epoch_*.pth"), key=lambda p: int(p.stem.split("_")[1]))
    marker = tmp_path / "pwned"
    in_mmdet3(POISON, str(first), str(marker))
    home = tmp_path / "home"
    backfill(home, work_dir.parent, "--evaluate")
    after = {Path(j.checkpoint_path).name.split("-", 1)[1]: j for j in jobs(home)}
    poisoned = after[first.name]
    assert poisoned.state is JobState.DEAD and poisoned.stack == "mmdet3"
    assert "posix.system" in poisoned.last_error or "os.system" in poisoned.last_error, poisoned.last_error
    assert not marker.exists(), "nothing in the checkpoint ran"
    assert all(after[p.name].state is JobState.DONE for p in rest), "the other checkpoints are evaluated"


POISON = r"""
import os, sys, torch
from evaluator import checkpoint_globals

path, marker = sys.argv[1:3]


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {marker}",))


with checkpoint_globals.allowed():
    checkpoint = torch.load(path, map_location="cpu")
checkpoint["meta"]["payload"] = Payload()
torch.save(checkpoint, path)
"""


LOAD_ALL = r"""
import sys
from evaluator import checkpoint_globals

for path in sys.argv[1:]:
    assert checkpoint_globals.load(path, trust=False)["state_dict"], path
print(len(sys.argv) - 1)
"""


def test_every_checkpoint_of_the_3x_trainings_loads_with_the_allowlist(trained_work_dir3):
    checkpoints = [str(p) for kind in ("retinanet3_epoch", "retinanet3_iter", "maskrcnn3_epoch") for p in sorted(trained_work_dir3(kind).glob("*.pth"))]
    assert in_mmdet3(LOAD_ALL, *checkpoints).strip() == str(len(checkpoints))


TOOL_3X = r"""
import contextlib, importlib.util, io
import mmdet
from pathlib import Path


def tool_confusion(dataset, indices, samples, score_thr=0.3, tp_iou_thr=0.5):
    '''`calculate_confusion_matrix` of mmdet 3.x's own tools/analysis_tools/confusion_matrix.py (installed with
    mmdet) over the `indices` images, with the samples as its results pickle holds them.'''
    path = Path(mmdet.__file__).parent / ".mim" / "tools" / "analysis_tools" / "confusion_matrix.py"
    spec = importlib.util.spec_from_file_location("mmdet_confusion_matrix", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    class Images:
        metainfo = dataset.metainfo
        def __len__(self):
            return len(indices)
        def get_data_info(self, i):
            return dataset.get_data_info(indices[i])

    results = [{"pred_instances": {k: getattr(s.pred_instances, k).cpu() for k in ("bboxes", "scores", "labels")}} for s in samples]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return module.calculate_confusion_matrix(Images(), results, score_thr=score_thr, tp_iou_thr=tp_iou_thr).astype(int).tolist()
"""

CLASSWISE_3X = TOOL_3X + r"""
import json, sys
from pathlib import Path
from db.jobs import ClaimedJob
from evaluator import insight, mmdet3

work_dir, checkpoint = Path(sys.argv[1]), sys.argv[2]
job = ClaimedJob(1, 1, "mmdet3", checkpoint, str(work_dir), None, None, int(sys.argv[3]), 0.3)
cfg = mmdet3.load_config(job)
dataset, base = mmdet3.build_val_dataset(cfg, work_dir)
indices, _ = mmdet3.job_inputs.subset(job, len(dataset))
manifest = mmdet3.build_manifest(dataset, indices, cfg)
samples = mmdet3.run_inference(mmdet3.build_model(cfg, checkpoint, "cpu"), dataset, indices, cfg, 2, None)
found = insight.compute(mmdet3.ground_truth(dataset, indices), [mmdet3.to_detections(s) for s in samples],
                        manifest.classes, insight.InsightOptions())
for metric in cfg.val_evaluator if isinstance(cfg.val_evaluator, list) else [cfg.val_evaluator]:
    metric["classwise"] = True
print("RESULT", json.dumps({"insight": found, "metrics": mmdet3.subset_metrics(cfg, dataset, indices, samples, base),
                            "tool_confusion": tool_confusion(dataset, indices, samples)}))
"""


@pytest.mark.parametrize("kind", ["retinanet3_epoch", "maskrcnn3_epoch"])
def test_per_class_ap_equals_coco_metric_classwise(trained_work_dir3, kind):
    work_dir = trained_work_dir3(kind)
    last = max(work_dir.glob("epoch_*.pth"), key=lambda p: int(p.stem.split("_")[1]))
    out = in_mmdet3(CLASSWISE_3X, str(work_dir), str(last), str(NUM))
    result = json.loads(out.split("RESULT ", 1)[1])
    found, metrics = result["insight"], result["metrics"]
    assert "error" not in found and "error" not in metrics, (found, metrics)
    iou_types = ("bbox", "segm") if kind.startswith("maskrcnn") else ("bbox",)
    for c in found["classwise"][iou_types[-1]]["classes"]:  # CocoMetric's key is per class: the last metric's
        assert round(c["ap"], 3) == metrics[f"coco/{c['name']}_precision"], (iou_types[-1], c)
    for iou_type in iou_types:
        assert round(sum(c["ap"] for c in found["classwise"][iou_type]["classes"]) / len(CLASSES), 3) == \
            metrics[f"coco/{iou_type}_mAP"]
    assert found["confusion"]["matrix"] == result["tool_confusion"], "the 3.x analysis tool's matrix of the same predictions"


FULL_VAL_3X = TOOL_3X + r"""
import dataclasses, json, sys
from mmengine.evaluator import Evaluator
from common.records import subset_indices
from db.jobs import ClaimedJob
from evaluator import mmdet3

work_dir, checkpoint, num = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
job = ClaimedJob(1, 1, "mmdet3", checkpoint, str(work_dir), None, None, num, 0.3, eval_full_val=True)
outcome = mmdet3.evaluate(job, "cpu", 2)
cfg = mmdet3.load_config(job)
dataset, _ = mmdet3.build_val_dataset(cfg, work_dir)
everything = list(range(len(dataset)))
samples = mmdet3.run_inference(mmdet3.build_model(cfg, checkpoint, "cpu"), dataset, everything, cfg, 2, None)
own = Evaluator(dict(cfg.val_evaluator, classwise=True))  # CocoMetric as the val loop runs it: every image of ann_file
own.dataset_meta = dataset.metainfo
own.process(data_samples=samples, data_batch=None)
with contextlib.redirect_stdout(io.StringIO()):
    metrics = own.evaluate(len(samples))
indices = subset_indices(len(dataset), num)
print("RESULT", json.dumps({
    "val_size": len(dataset), "metrics": outcome.metrics, "insight": outcome.insight, "own": metrics,
    "tool_confusion": tool_confusion(dataset, everything, samples),
    "tool_images": [tool_confusion(dataset, [i], [samples[i]]) for i in indices],
    "table": [im.dataset_index for im in outcome.manifest.images], "subset": indices,
    "predictions": [dataclasses.asdict(p) for p in outcome.predictions],
    "expected": [dataclasses.asdict(mmdet3.to_detections(samples[i]).instances().above(0.3)) for i in indices],
    "gt": sum(1 for i in everything for g in dataset.get_data_info(i)["instances"] if not g.get("ignore_flag", 0)),
}))
"""


def test_eval_full_val_gives_coco_metrics_own_numbers_of_the_whole_val_set_and_keeps_the_table_on_the_subset(trained_work_dir3):
    work_dir = trained_work_dir3("retinanet3_epoch")
    last = max(work_dir.glob("epoch_*.pth"), key=lambda p: int(p.stem.split("_")[1]))
    result = json.loads(in_mmdet3(FULL_VAL_3X, str(work_dir), str(last), str(NUM)).split("RESULT ", 1)[1])
    found, own = result["insight"], result["own"]
    assert result["val_size"] > NUM and "error" not in found, found
    classes = found["classwise"]["bbox"]["classes"]
    for c in classes:
        assert round(c["ap"], 3) == own[f"coco/{c['name']}_precision"], c
    assert sum(c["gt_count"] for c in classes) == result["gt"], "the whole val set's ground truth"
    shared = set(result["metrics"]) & set(own)
    assert "coco/bbox_mAP" in shared and {k: result["metrics"][k] for k in shared} == {k: own[k] for k in shared}, "CocoMetric's own"
    assert found["confusion"]["matrix"] == result["tool_confusion"]
    assert result["table"] == result["subset"] and result["predictions"] == result["expected"], "the table: the subset's rows"
    assert [[i["missed"], i["false_positives"], i["wrong_class"]] for i in found["images"]] == [
        [sum(row[-1] for row in m[:-1]), sum(m[-1][:-1]), sum(sum(row[:-1]) for row in m[:-1]) - sum(m[k][k] for k in range(len(m) - 1))]
        for m in result["tool_images"]]

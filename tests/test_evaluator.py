"""The evaluator on REAL tiny MMDetection checkpoints: val table once, a prediction table per checkpoint whose
images are references into `val`, boxes equal to mmdet's own `inference_detector`, workers sharing one DB."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select, update

from common.records import Instances, subset_indices
from db import jobs as queue
from db.models import EvalJob, JobState, Prediction, ValImage
from db.session import Database, sqlite_url
from evaluator.worker import Worker, WorkerOptions
from tests.conftest import REPO, cli, offline_run, service_env, status, table_column, wait_until

NUM = 6  # of the 8 val images: a real subset
THR = 0.3


def db_of(home: Path) -> Database:
    return Database(sqlite_url(home / "state.db"))


def jobs(home: Path) -> list[EvalJob]:
    with db_of(home).transaction() as session:
        return list(session.scalars(select(EvalJob).order_by(EvalJob.id)))


def artifacts_of(home: Path) -> list[tuple[int, object]]:
    """(segment number, artifact) for every artifact of every run, in the order written."""
    found = []
    for work_dir in status(home)["work_dirs"]:
        for run in work_dir["runs"]:
            for seq, segment in enumerate(offline_run(home, run["wandb_id"]).segments, 1):
                found.extend((seq, art) for art in segment.artifacts)
    return found


def val_annotation_names(work_dir: Path) -> list[str]:
    config = next(work_dir.glob("*.py")).read_text()
    ann_file = next(line.split("'")[1] for line in config.splitlines() if "val.json" in line)
    return [image["file_name"] for image in json.loads(Path(ann_file).read_text())["images"]]


def table_of(artifact, name: str) -> dict:
    (entry,) = [e for e in artifact.entries if e["path"] == f"{name}.table.json"]
    return json.loads(Path(entry["local_path"]).read_text())


@pytest.mark.parametrize("kind", ["retinanet_epoch", "maskrcnn_epoch"])
def test_backfill_evaluate_logs_val_once_and_predictions_per_checkpoint(trained_work_dir, tmp_path, kind):
    work_dir = trained_work_dir(kind)
    home = tmp_path / "home"
    cli(home, "backfill", str(work_dir.parent), "--no-progress", "--evaluate", "--num-eval-images", str(NUM))

    regular = sorted(p.name for p in work_dir.glob("epoch_*.pth"))
    arts = [a for _, a in artifacts_of(home)]
    (val,) = [a for a in arts if a.type == "dataset"]
    preds = [a for a in arts if a.type == "evaluation"]
    assert val.name == "val"
    assert sorted(a.metadata["checkpoint"] for a in preds) == regular, "one prediction version per checkpoint"
    for pred in preds:
        assert pred.aliases == {"latest", f"epoch_{pred.metadata['epoch']}"}

    names = val_annotation_names(work_dir)
    expected_rows = [names[i] for i in subset_indices(len(names), NUM)]
    val_table = table_of(val, "val_data")
    assert val_table["columns"] == ["image_name", "image"]
    assert [row[0] for row in val_table["data"]] == expected_rows, "the hook's seed-42 subset, in its order"
    val_files = {e["path"]: e for e in val.entries if not e["path"].endswith(".table.json")}
    assert sum(1 for p in val_files if p.startswith("media/images/") and "/mask/" not in p) == NUM
    assert all(e["ref"] is None and e["size"] > 0 for e in val_files.values()), "the val artifact holds the bytes"

    for pred in preds:
        table = table_of(pred, "eval_data")
        assert table["columns"] == ["image_name", "ground_truth", "prediction", "missed", "false_positives", "wrong_class", "errors"]
        assert [row[0] for row in table["data"]] == expected_rows
        refs = {e["path"]: e for e in pred.entries if e["ref"]}
        assert set(refs) == set(val_files), "every val file is referenced"
        for path, entry in refs.items():
            assert entry["ref"] == f"wandb-client-artifact://{val.client_id}/{path}"
            assert entry["digest"] == val_files[path]["digest"] and entry["size"] == 0
        local = [e["path"] for e in pred.entries if not e["ref"]]
        assert all(p.endswith(".table.json") or "/mask/" in p for p in local), f"no image bytes copied: {local}"
        for _, gt, predicted, *_errors in table["data"]:
            assert gt["path"] in refs and predicted["path"] == gt["path"], "both cells show the val image"
            assert all(m["path"] in refs for m in gt.get("masks", {}).values()), "ground-truth masks referenced"
            scores = [b["scores"]["score"] for b in predicted["boxes"]["predictions"]]
            assert all(s > THR for s in scores)
        if kind == "maskrcnn_epoch":
            assert any("masks" in row[2] for row in table["data"]), "predicted masks drawn"
            assert all(row[1]["masks"] for row in table["data"]), "ground-truth masks drawn"
        assert pred.metadata["subset_metrics"]["bbox_mAP"] >= 0

    assert {j.state for j in jobs(home)} == {JobState.DONE} and not any(j.pinned for j in jobs(home))
    assert all(j["table_uploaded"] for j in status(home)["work_dirs"][0]["eval_jobs"])
    assert not list((home / "store" / "eval").iterdir()), "the jobs' checkpoint links are gone"
    cli(home, "backfill", str(work_dir.parent), "--no-progress", "--evaluate", "--num-eval-images", str(NUM))
    assert len(artifacts_of(home)) == len(arts), "a second backfill logs nothing"


def test_predictions_equal_mmdet_inference_detector(trained_work_dir, tmp_path):
    from mmdet.apis import inference_detector, init_detector

    work_dir = trained_work_dir("maskrcnn_epoch")
    home = tmp_path / "home"
    cli(home, "backfill", str(work_dir.parent), "--no-progress", "--evaluate", "--num-eval-images", str(NUM))
    (job,) = [j for j in jobs(home) if j.number == 6]
    images, stored = stored_predictions(home, job)

    config = next(work_dir.glob("*.py"))
    model = init_detector(str(config), str(work_dir / "epoch_6.pth"), device="cpu")
    img_prefix = Path(val_annotation_path(config)).parent.parent / "val"
    for name, ours in zip(images, stored):
        bbox_result, segm_result = inference_detector(model, str(img_prefix / name))
        boxes = np.concatenate(bbox_result)
        labels = np.concatenate([np.full(len(b), i) for i, b in enumerate(bbox_result)])
        keep = boxes[:, 4] > THR
        assert len(ours.boxes) == int(keep.sum()), f"{name}: same detections above the threshold"
        np.testing.assert_allclose(np.array(ours.boxes).reshape(-1, 4), boxes[keep, :4], atol=0.01)
        np.testing.assert_allclose(ours.scores, boxes[keep, 4], atol=1e-4)
        assert ours.labels == labels[keep].tolist()
        assert len(ours.masks) == len(ours.boxes)
        masks = [m for per_class in segm_result for m in per_class]
        from pycocotools import mask as mask_util

        for rle, theirs in zip(ours.masks, [m for m, k in zip(masks, keep) if k]):
            ours_bitmap = mask_util.decode({"size": rle["size"], "counts": rle["counts"].encode()})
            assert (ours_bitmap.astype(bool) == theirs).all()


def stored_predictions(home: Path, job: EvalJob) -> tuple[list[str], list[Instances]]:
    """The job's subset (image names, in subset order) and the predictions stored for it, as the DB holds them."""
    with db_of(home).transaction() as session:
        stored = [Instances.from_json(t) for t in session.scalars(
            select(Prediction.result_json).where(Prediction.job_id == job.id).order_by(Prediction.position))]
        images = session.execute(select(ValImage.image_name).where(ValImage.manifest_id == job.manifest_id)
                                 .order_by(ValImage.position)).scalars().all()
    return list(images), stored


def val_annotation_path(config: Path) -> str:
    return next(line.split("'")[1] for line in config.read_text().splitlines() if "val.json" in line)


def test_a_later_checkpoint_references_the_val_artifact_of_an_earlier_process(trained_work_dir, tmp_path):
    work_dir = trained_work_dir("retinanet_epoch", writable=True)
    home, aside = tmp_path / "home", tmp_path / "aside"
    aside.mkdir()
    shutil.move(work_dir / "epoch_8.pth", aside / "epoch_8.pth")
    args = ("backfill", str(work_dir.parent), "--no-progress", "--evaluate", "--num-eval-images", str(NUM))
    cli(home, *args)
    shutil.move(aside / "epoch_8.pth", work_dir / "epoch_8.pth")
    cli(home, *args)

    arts = artifacts_of(home)
    (val_seq, val), = [(s, a) for s, a in arts if a.type == "dataset"]
    later = [(s, a) for s, a in arts if a.type == "evaluation" and a.metadata["epoch"] == 8]
    assert len(later) == 1 and later[0][0] > val_seq, "logged by the second process, in a later segment"
    refs = [e["ref"] for e in later[0][1].entries if e["ref"]]
    assert refs and all(r.startswith(f"wandb-client-artifact://{val.client_id}/") for r in refs)


def start_worker(home: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "mmdet_wandb.cli", "evaluate", "--device", "cpu", "--poll", "0.2", "--log-level", "INFO", *args],
        env=service_env(home), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )


def test_two_workers_never_run_the_same_job(trained_work_dir, tmp_path):
    for kind in ("retinanet_epoch", "retinanet_iter", "maskrcnn_epoch"):
        trained_work_dir(kind)
    root, home = tmp_path / "work_dirs", tmp_path / "home"
    cli(home, "backfill", str(root), "--no-progress", "--num-eval-images", str(NUM))
    queued = jobs(home)
    assert len(queued) >= 7 and {j.state for j in queued} == {JobState.QUEUED}

    workers = [start_worker(home, "--exit-when-idle") for _ in range(2)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), outputs
    claims = [line for out in outputs for line in out.splitlines() if "(attempt " in line]
    claimed = sorted(int(line.split("job ")[1].split(" ")[0]) for line in claims)
    assert claimed == sorted(j.id for j in queued), "every job claimed exactly once"
    assert all(("job" in out and "done" in out) for out in outputs), "both workers did work"
    done = jobs(home)
    assert {j.state for j in done} == {JobState.DONE} and {j.attempts for j in done} == {1}

    cli(home, "backfill", str(root), "--no-progress", "--num-eval-images", str(NUM))
    preds = [a for _, a in artifacts_of(home) if a.type == "evaluation"]
    assert len(preds) == len(queued), "the uploader turned every stored result into a table"


def test_a_worker_killed_mid_job_has_its_job_reclaimed_after_the_lease(trained_work_dir, tmp_path):
    work_dir = trained_work_dir("maskrcnn_epoch")
    home = tmp_path / "home"
    cli(home, "backfill", str(work_dir.parent), "--no-progress", "--num-eval-images", str(NUM))
    lease = 4.0
    first = start_worker(home, "--lease", str(lease))
    wait_until(lambda: any(j.state is JobState.RUNNING for j in jobs(home)), 120, "a job to be claimed", first)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=30)
    (victim,) = [j for j in jobs(home) if j.state is JobState.RUNNING]
    killed_at = time.time()

    second = start_worker(home, "--lease", str(lease), "--exit-when-idle")
    output = second.communicate(timeout=600)[0]
    assert second.returncode == 0, output
    after = {j.id: j for j in jobs(home)}
    assert after[victim.id].state is JobState.DONE and after[victim.id].attempts == 2, "reclaimed and finished"
    assert {j.state for j in after.values()} == {JobState.DONE}
    reclaim = next(line for line in output.splitlines() if f"job {victim.id} (attempt 2)" in line)
    assert reclaim, output
    assert victim.lease_expires_at is not None and victim.lease_expires_at <= killed_at + lease + 1


# --- bad input: the job fails with a clear error, the others go on ------------------------------------


def rewrite_checkpoint(src: Path, dst: Path, edit) -> None:  # type: ignore[no-untyped-def]
    """A real checkpoint whose meta config was edited (what another training config would have saved)."""
    import torch

    checkpoint = torch.load(src, map_location="cpu", weights_only=False)
    checkpoint["meta"] = edit(dict(checkpoint["meta"]))
    torch.save(checkpoint, dst)


def run_queued(home: Path) -> dict[str, EvalJob]:
    """One attempt at every queued job, in this process, with the real worker; checkpoint name → job after."""
    db = db_of(home)
    worker = Worker(db, WorkerOptions(device="cpu", batch_size=2))
    while (job := queue.claim(db, worker.options.worker_id, 60, stack="mmdet2")) is not None:
        worker.run_one(job)
    with db.transaction() as session:
        rows = session.scalars(select(EvalJob)).all()
        return {Path(j.checkpoint_path).name.split("-", 1)[1]: j for j in rows}


def test_bad_jobs_fail_with_a_clear_error_and_the_others_go_on(trained_work_dir, tmp_path):
    work_dir = trained_work_dir("retinanet_iter", writable=True)
    home = tmp_path / "home"
    iters = sorted(work_dir.glob("iter_*.pth"), key=lambda p: int(p.stem.split("_")[1]))
    assert len(iters) >= 4
    data = tmp_path / "data"
    ann = val_annotation_path(next(work_dir.glob("*.py")))
    dataset_root = Path(ann).parents[1]
    shutil.copytree(dataset_root, data)
    names = val_annotation_names(work_dir)
    missing_image = names[subset_indices(len(names), NUM)[0]]
    (data / "val" / missing_image).unlink()

    def moved_dataset(meta):  # type: ignore[no-untyped-def]
        return {**meta, "config": meta["config"].replace(str(dataset_root), str(data))}

    def missing_annotations(meta):  # type: ignore[no-untyped-def]
        return {**meta, "config": meta["config"].replace("annotations/val.json", "annotations/nope.json")}

    def no_such_nms(meta):  # type: ignore[no-untyped-def]
        return {**meta, "config": meta["config"].replace("type='nms'", "type='no_such_nms'")}

    def no_config(meta):  # type: ignore[no-untyped-def]
        return {k: v for k, v in meta.items() if k != "config"}

    for path, edit in zip(iters, (moved_dataset, missing_annotations, no_such_nms)):
        rewrite_checkpoint(path, path, edit)
    rewrite_checkpoint(iters[3], iters[3], no_config)

    cli(home, "backfill", str(work_dir.parent), "--no-progress", "--num-eval-images", str(NUM))
    with db_of(home).transaction() as session:  # as if the work_dir's logs carried no config either
        session.execute(update(EvalJob).where(EvalJob.checkpoint_path.endswith(iters[3].name)).values(config_text=None))
    after = run_queued(home)
    image_job, ann_job, nms_job, config_job = (after[p.name] for p in iters[:4])
    assert image_job.state is JobState.QUEUED and image_job.run_after > time.time(), "a missing image may come back"
    assert f"{missing_image} cannot be read" in image_job.last_error
    assert ann_job.state is JobState.DEAD and "annotations/nope.json" in ann_job.last_error
    assert nms_job.state is JobState.QUEUED and "raised during inference" in nms_job.last_error
    assert config_job.state is JobState.DEAD and "no config" in config_job.last_error


def test_a_val_set_smaller_than_num_eval_images_is_clamped_like_the_hook(trained_work_dir, tmp_path):
    work_dir = trained_work_dir("retinanet_epoch")
    home = tmp_path / "home"
    cli(home, "backfill", str(work_dir.parent), "--no-progress", "--num-eval-images", "100", "--bbox-score-thr", "0.99")
    after = run_queued(home)
    assert {j.state for j in after.values()} == {JobState.DONE}
    for job in after.values():
        assert "greater than the val set (8): using 8" in job.note
    cli(home, "backfill", str(work_dir.parent), "--no-progress", "--num-eval-images", "100", "--bbox-score-thr", "0.99")
    preds = [a for _, a in artifacts_of(home) if a.type == "evaluation"]
    assert len(preds) == len(after)
    for pred in preds:
        rows = table_of(pred, "eval_data")["data"]
        assert len(rows) == 8
        assert all(not row[2]["boxes"]["predictions"] for row in rows), "an empty prediction is a row too"


def test_mmcv_scatter_gets_the_torch_device_it_needs():
    """mmcv 1.7 hands torch 2.x's `_get_stream` an int GPU id (seen failing every batch on an H200); the shim
    converts it. On CPU, id -1 exercises the same conversion."""
    from mmcv.parallel import _functions

    from evaluator import mmdet2

    original = _functions._get_stream
    try:
        if not getattr(original, "takes_gpu_ids", False):
            with pytest.raises(AttributeError, match="'int' object has no attribute 'type'"):
                original(-1)
        mmdet2.pass_gpu_ids_as_torch_devices()
        assert _functions._get_stream(-1) is None
        mmdet2.pass_gpu_ids_as_torch_devices()  # idempotent
        assert _functions._get_stream.takes_gpu_ids
    finally:
        _functions._get_stream = original


def test_the_whole_path_on_postgresql(trained_work_dir, tmp_path, postgres_url):
    """Several nodes share one PostgreSQL: the uploader, a separate worker and the tables, against a real server."""
    work_dir = trained_work_dir("maskrcnn_epoch")
    home = tmp_path / "home"
    args = ("backfill", str(work_dir.parent), "--no-progress", "--num-eval-images", str(NUM))
    cli(home, *args, MMDET_WANDB_DB_URL=postgres_url)
    worker = subprocess.run(
        [sys.executable, "-m", "mmdet_wandb.cli", "evaluate", "--device", "cpu", "--exit-when-idle", "--poll", "0.2"],
        env=service_env(home, MMDET_WANDB_DB_URL=postgres_url), cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert worker.returncode == 0, worker.stderr
    cli(home, *args, MMDET_WANDB_DB_URL=postgres_url)
    state = json.loads(cli(home, "status", "--json", MMDET_WANDB_DB_URL=postgres_url).stdout)
    (entry,) = state["work_dirs"]
    assert {j["state"] for j in entry["eval_jobs"]} == {"done"} and all(j["table_uploaded"] for j in entry["eval_jobs"])
    assert not (home / "state.db").exists(), "no SQLite file beside PostgreSQL"
    (run,) = entry["runs"]
    arts = [a for seg in offline_run(home, run["wandb_id"]).segments for a in seg.artifacts]
    assert [a.type for a in arts].count("dataset") == 1
    assert sorted(a.metadata["checkpoint"] for a in arts if a.type == "evaluation") == sorted(
        p.name for p in work_dir.glob("epoch_*.pth"))


def test_a_dead_job_keeps_its_pin_and_requeue_evaluates_it_once_the_dataset_is_back(trained_work_dir, tmp_path):
    """A job parked because its dataset was not reachable is evaluated after `requeue`, from the pin it kept;
    `requeue --drop` releases the pin of a job nobody will retry."""
    work_dir = trained_work_dir("retinanet_epoch", writable=True)
    home, data = tmp_path / "home", tmp_path / "data"
    dataset_root = Path(val_annotation_path(next(work_dir.glob("*.py")))).parents[1]
    shutil.copytree(dataset_root, data)
    retried, dropped = work_dir / "epoch_8.pth", work_dir / "epoch_7.pth"
    for path in (retried, dropped):
        rewrite_checkpoint(path, path, lambda meta: {**meta, "config": meta["config"].replace(str(dataset_root), str(data))})
    (data / "annotations").rename(data / "annotations.unmounted")
    args = ("backfill", str(work_dir.parent), "--no-progress", "--evaluate", "--num-eval-images", str(NUM))
    cli(home, *args)

    def job_of(path: Path) -> dict:
        (entry,) = status(home)["work_dirs"]
        return next(j for j in entry["eval_jobs"] if j["checkpoint"] == path.name)

    for path in (retried, dropped):
        job = job_of(path)
        assert job["state"] == "dead" and "val.json" in job["last_error"], job
        assert job["pin"] and Path(job["pin"]).exists(), "a dead job keeps its checkpoint pin"
    assert not [a for _, a in artifacts_of(home) if a.type == "evaluation"], "max_keep_ckpts=2: both jobs are dead"
    assert "hold their checkpoint pin" in table_column(cli(home, "status").stdout, -1)

    dropped_pin = job_of(dropped)["pin"]
    assert "released the checkpoint pins of 1 dead job(s)" in cli(home, "requeue", "--drop", str(job_of(dropped)["id"])).stderr
    assert not Path(dropped_pin).exists() and job_of(dropped)["pin"] is None and job_of(dropped)["state"] == "dead"

    (data / "annotations.unmounted").rename(data / "annotations")
    out = cli(home, "requeue").stderr
    assert "requeued 1 job(s)" in out and f"not requeued (their checkpoint pin was dropped): {job_of(dropped)['id']}" in out
    cli(home, *args)
    assert job_of(retried)["state"] == "done" and job_of(retried)["table_uploaded"] and job_of(retried)["pin"] is None
    assert job_of(dropped)["state"] == "dead"
    epochs = sorted(a.metadata["epoch"] for _, a in artifacts_of(home) if a.type == "evaluation")
    assert epochs == [8], "the requeued job's table is uploaded, once"
    assert not list((home / "store" / "eval").iterdir()), "no pin is left behind"


def test_a_work_dir_outside_the_training_folder_is_evaluated_with_dataset_root(trained_work_dir, tmp_path):
    """`tools/train.py cfg --work-dir /scratch/exp1` with relative dataset paths: neither the worker's cwd nor a
    folder above the work_dir holds `data/`; `--dataset-root` names where it is."""
    work_dir = trained_work_dir("retinanet_epoch", dest=tmp_path / "scratch", writable=True)
    home, checkout = tmp_path / "home", tmp_path / "checkout"
    dataset_root = Path(val_annotation_path(next(work_dir.glob("*.py")))).parents[1]
    shutil.copytree(dataset_root, checkout / "data" / "coco")
    checkpoint = work_dir / "epoch_8.pth"
    rewrite_checkpoint(checkpoint, checkpoint, lambda meta: {**meta, "config": meta["config"].replace(str(dataset_root), "data/coco")})
    (work_dir / "epoch_7.pth").unlink()
    args = ("backfill", str(work_dir.parent), "--no-progress", "--num-eval-images", str(NUM))
    cli(home, *args)  # queues the job
    doctor = cli(home, "doctor", check=False)
    assert doctor.returncode == 1 and f"val data ({work_dir.name})" in doctor.stdout
    assert "data/coco/annotations/val.json not found" in table_column(doctor.stdout, -1)
    doctor = cli(home, "doctor", "--dataset-root", str(checkout), check=False)
    assert str(checkout / "data/coco/annotations/val.json") in table_column(doctor.stdout, -1).replace(" ", "")

    args = (*args, "--evaluate")
    cli(home, *args)
    (job,) = status(home)["work_dirs"][0]["eval_jobs"]
    assert job["state"] == "dead" and "data/coco/annotations/val.json not found" in job["last_error"], job

    cli(home, "requeue")
    cli(home, *args, "--dataset-root", str(checkout))
    (job,) = status(home)["work_dirs"][0]["eval_jobs"]
    assert job["state"] == "done" and job["table_uploaded"], job
    assert [a.metadata["epoch"] for _, a in artifacts_of(home) if a.type == "evaluation"] == [8]


# --- least privilege: nothing from a work_dir runs unless the operator says so -----------------------------


class RunsCode:
    """What a hostile work_dir could put into a checkpoint: unpickling it runs a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def evaluated_epochs(home: Path) -> list[int]:
    return sorted(a.metadata["epoch"] for _, a in artifacts_of(home) if a.type == "evaluation")


def test_a_checkpoint_that_would_run_code_is_parked_naming_the_global_and_loads_only_when_trusted(trained_work_dir, tmp_path):
    work_dir = trained_work_dir("retinanet_epoch", writable=True)
    poisoned, marker = work_dir / "epoch_7.pth", tmp_path / "ran"
    rewrite_checkpoint(poisoned, poisoned, lambda meta: {**meta, "payload": RunsCode(marker)})
    home = tmp_path / "home"
    args = ("backfill", str(work_dir.parent), "--no-progress", "--num-eval-images", str(NUM), "--evaluate")
    cli(home, *args)
    by_name = {Path(j.checkpoint_path).name.split("-", 1)[1]: j for j in jobs(home)}
    assert by_name["epoch_7.pth"].state is JobState.DEAD and "posix.system" in by_name["epoch_7.pth"].last_error
    assert "--trust-checkpoints" in by_name["epoch_7.pth"].last_error
    assert not marker.exists(), "nothing in the checkpoint ran"
    assert by_name["epoch_8.pth"].state is JobState.DONE and evaluated_epochs(home) == [8], "the other checkpoint is evaluated"
    assert "posix.system" in table_column(cli(home, "status").stdout, -1).replace(" ", "")

    cli(home, "requeue")
    trusted = cli(home, *args, "--trust-checkpoints")
    assert "--trust-checkpoints: checkpoints are loaded with the full unpickler" in trusted.stderr
    assert marker.exists(), "the full unpickler ran the payload: the test above was live"
    assert {j.state for j in jobs(home)} == {JobState.DONE} and evaluated_epochs(home) == [7, 8]


@pytest.mark.parametrize("kind", ["retinanet_epoch", "retinanet_iter", "maskrcnn_epoch", "retinanet_resume"])
def test_every_checkpoint_of_the_2x_trainings_loads_with_the_allowlist(trained_work_dir, kind):
    from evaluator import checkpoint_globals

    checkpoints = sorted(trained_work_dir(kind).glob("*.pth"))
    assert checkpoints
    for path in checkpoints:
        assert checkpoint_globals.load(str(path), trust=False)["state_dict"], path


def test_custom_imports_are_parked_unless_the_module_is_allowed(trained_work_dir, tmp_path):
    work_dir = trained_work_dir("retinanet_epoch", writable=True)
    (work_dir / "epoch_7.pth").unlink()
    checkpoint, plugins, marker = work_dir / "epoch_8.pth", tmp_path / "plugins", tmp_path / "imported"
    plugins.mkdir()
    (plugins / "team_plugin.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    custom = "\ncustom_imports = dict(imports=['team_plugin'], allow_failed_imports=False)\n"
    rewrite_checkpoint(checkpoint, checkpoint, lambda meta: {**meta, "config": meta["config"] + custom})
    home = tmp_path / "home"
    args = ("backfill", str(work_dir.parent), "--no-progress", "--num-eval-images", str(NUM), "--evaluate")
    cli(home, *args, PYTHONPATH=str(plugins))
    (job,) = jobs(home)
    assert job.state is JobState.DEAD and "custom_imports name team_plugin" in job.last_error, job.last_error
    assert "--allow-import team_plugin" in job.last_error and not marker.exists()

    cli(home, "requeue")
    (home / "config.toml").write_text('allow_import = ["team_plugin"]\n')  # the config file's layer; the flag is the same list
    cli(home, *args, PYTHONPATH=str(plugins))
    (job,) = jobs(home)
    assert job.state is JobState.DONE and marker.exists() and evaluated_epochs(home) == [8]


def test_evaluate_refuses_to_start_holding_a_wandb_key(tmp_path):
    home, key = tmp_path / "home", "k" * 40
    refused = cli(home, "evaluate", "--exit-when-idle", "--device", "cpu", check=False, WANDB_API_KEY=key)
    assert refused.returncode == 2, refused.stderr
    (line,) = refused.stderr.strip().splitlines()
    assert "WANDB_API_KEY is set" in line and "--allow-secrets" in line and key not in line
    assert not home.exists(), "refused before touching the state"
    allowed = cli(home, "evaluate", "--exit-when-idle", "--device", "cpu", "--allow-secrets", WANDB_API_KEY=key)
    assert "0 job(s) done" in allowed.stderr


def test_a_cuda_evaluator_without_a_gpu_fails_in_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the missing-GPU refusal needs a machine without one")
    home = tmp_path / "home"
    refused = cli(home, "evaluate", "--device", "cuda:0", check=False, timeout=120)  # no --exit-when-idle: it would poll
    assert refused.returncode == 2, refused.stderr
    (line,) = refused.stderr.strip().splitlines()
    assert "--device cuda:0" in line and "no CUDA device" in line and "--device cpu" in line, line
    assert not home.exists(), "refused before touching the state"

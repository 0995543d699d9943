"""Checkpoints of REAL tiny MMDetection trainings as versions of `run_<id>_model`, backfilled and live."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import cli, offline_run, status, stop, wait_until
from tests.mmdet_run.fixtures import KINDS, cached_dataset, start_training

CKPT_FLAGS = ("--log-checkpoint", "--log-checkpoint-metadata")


def md5_b64(path: Path) -> str:
    return base64.b64encode(hashlib.md5(path.read_bytes()).digest()).decode()


def val_lines(work_dir: Path) -> dict[int, dict]:
    """epoch → the val line of that epoch, from the real log.json files."""
    lines = {}
    for log in sorted(work_dir.glob("*.log.json")):
        for raw in log.read_text().splitlines():
            line = json.loads(raw)
            if line.get("mode") == "val":
                lines[line["epoch"]] = line
    return lines


def model_artifacts(home: Path) -> dict[str, dict]:
    """File name → {aliases, metadata, digest, run name} for every model artifact version written."""
    (work_dir,) = status(home)["work_dirs"]
    found = {}
    for run in work_dir["runs"]:
        for segment in offline_run(home, run["wandb_id"]).segments:
            for art in segment.artifacts:
                assert art.name == f"run_{run['wandb_id']}_model" and art.type == "model"
                (entry,) = art.entries
                assert entry["path"] not in found, f"{entry['path']} uploaded twice"
                found[entry["path"]] = {"aliases": art.aliases, "metadata": art.metadata, "digest": entry["digest"]}
    return found


def checkpoint_states(home: Path) -> dict[str, list[tuple[str, str | None]]]:
    """Checkpoint name → [(state, reason)] for each content seen, oldest first; {} before the DB exists."""
    states: dict[str, list[tuple[str, str | None]]] = {}
    proc = cli(home, "status", "--json", check=False)
    if proc.returncode != 0:
        return states
    for work_dir in json.loads(proc.stdout)["work_dirs"]:
        for ckpt in work_dir["checkpoints"]:
            states.setdefault(ckpt["name"], []).append((ckpt["state"], ckpt["reason"]))
    return states


def assert_metadata_is_its_own_epoch(metadata: dict, epoch: int, vals: dict[int, dict], path: Path) -> None:
    assert metadata["epoch"] == epoch
    expected = {k: v for k, v in vals[epoch].items() if k not in {"mode", "epoch", "iter", "lr"} and not isinstance(v, str)}
    assert {k: metadata.get(k) for k in expected} == expected, "metrics of the checkpoint's own epoch"
    assert metadata["checkpoint"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    if not path.name.startswith("best_"):  # mmcv saves the best one without checkpoint_config.meta
        assert metadata["checkpoint"]["mmdet_version"].startswith("2.28.2")
        assert metadata["checkpoint"]["CLASSES"]


def test_backfill_of_a_finished_run(trained_work_dir, tmp_path):
    work_dir = trained_work_dir("retinanet_epoch")
    home = tmp_path / "home"
    cli(home, "backfill", str(work_dir.parent), "--no-progress", *CKPT_FLAGS)

    files = {p.name: p for p in work_dir.glob("*.pth") if not p.is_symlink()}
    assert len([n for n in files if n.startswith("epoch_")]) == 2, "max_keep_ckpts=2 left two regular ones"
    artifacts = model_artifacts(home)
    assert set(artifacts) == set(files), "one version per checkpoint on disk"
    vals = val_lines(work_dir)
    for name, art in artifacts.items():
        assert art["digest"] == md5_b64(files[name])
        epoch = int(name.rsplit("_", 1)[1][: -len(".pth")])
        assert art["aliases"] >= ({"best"} if name.startswith("best_") else {f"epoch_{epoch}", "latest"})
        assert_metadata_is_its_own_epoch(art["metadata"], epoch, vals, files[name])
    assert any(art["metadata"].get("bbox_mAP", 0) > 0 for art in artifacts.values()), "a real evaluation"
    assert {s for states in checkpoint_states(home).values() for s, _ in states} == {"uploaded"}


def test_live_training_uploads_every_checkpoint_once(tmp_path, watcher):
    kind = KINDS["retinanet_epoch"]
    root, home = tmp_path / "work_dirs", tmp_path / "home"
    work_dir = root / kind.config_stem
    work_dir.mkdir(parents=True)
    watch = watcher(home, root, *CKPT_FLAGS, "--checkpoint-settle", "1", "--segment-idle", "2", "--finish-after", "5")
    training = start_training(kind.config(cached_dataset()), work_dir)
    assert training.wait(timeout=900) == 0, Path(training.output_path).read_text()[-3000:]
    epochs = kind.launches[0].schedule.max_epochs

    def all_uploaded() -> bool:
        states = checkpoint_states(home)
        regular = [n for n in states if n.startswith("epoch_")]
        return len(regular) == epochs and all(s in {"uploaded", "missed"} for v in states.values() for s, _ in v)

    wait_until(all_uploaded, 180, "every checkpoint to be uploaded", watch)
    stop(watch)

    artifacts = model_artifacts(home)
    regular = sorted(n for n in artifacts if n.startswith("epoch_"))
    assert regular == sorted(f"epoch_{n}.pth" for n in range(1, epochs + 1)), "pins kept what max_keep_ckpts deleted"
    states = checkpoint_states(home)
    assert all(len(v) == 1 for v in states.values()), "each checkpoint seen and uploaded once"
    vals = val_lines(work_dir)
    store = home / "store"
    for name in regular:
        epoch = int(name[len("epoch_") : -len(".pth")])
        (pinned,) = [p for p in store.rglob(f"*-{name}") if p.parent.name != "eval"]  # not the eval job's link
        assert artifacts[name]["digest"] == md5_b64(pinned)
        assert artifacts[name]["aliases"] >= {f"epoch_{epoch}", "latest"}
        assert_metadata_is_its_own_epoch(artifacts[name]["metadata"], epoch, vals, pinned)
    for name in (n for n in artifacts if n.startswith("best_")):
        assert "best" in artifacts[name]["aliases"]


@pytest.fixture
def live_work_dir(trained_work_dir, tmp_path, watcher):
    """A finished real work_dir (logs and checkpoints) being watched, ready for a new checkpoint to appear."""
    work_dir = trained_work_dir("retinanet_epoch", writable=True)
    home = tmp_path / "home"
    watch = watcher(home, work_dir.parent, "--log-checkpoint", "--checkpoint-settle", "1",
                    "--checkpoint-incomplete-after", "15", "--segment-idle", "1", "--finish-after", "1")
    wait_until(lambda: any(s == "uploaded" for v in checkpoint_states(home).values() for s, _ in v),
               120, "the existing checkpoints to be uploaded", watch)
    yield work_dir, home, watch
    if watch.poll() is None:
        stop(watch)


def real_checkpoint(work_dir: Path) -> bytes:
    return next(p for p in sorted(work_dir.glob("epoch_*.pth"))).read_bytes()


def test_a_half_written_checkpoint_waits_until_whole(live_work_dir):
    work_dir, home, watch = live_work_dir
    data = real_checkpoint(work_dir)
    target = work_dir / "epoch_20.pth"
    with open(target, "wb") as handle:
        handle.write(data[: len(data) // 2])
        handle.flush()
        wait_until(lambda: "epoch_20.pth" in checkpoint_states(home), 30, "the half checkpoint to be seen", watch)
        wait_until(lambda: "end-of-central-directory" in (checkpoint_states(home)["epoch_20.pth"][0][1] or ""),
                   30, "the half checkpoint to be looked at and refused", watch)
        (state,) = checkpoint_states(home)["epoch_20.pth"]
        assert state[0] == "seen" and "end-of-central-directory" in (state[1] or "")
        assert "epoch_20.pth" not in model_artifacts(home)
        handle.write(data[len(data) // 2 :])
    wait_until(lambda: checkpoint_states(home)["epoch_20.pth"][0][0] == "uploaded", 60, "the whole checkpoint", watch)
    assert model_artifacts_after_stop(home, watch)["epoch_20.pth"]["digest"] == md5_b64(target)


def model_artifacts_after_stop(home: Path, watch) -> dict[str, dict]:
    stop(watch)
    return model_artifacts(home)


def test_a_checkpoint_deleted_right_after_it_appears(live_work_dir):
    work_dir, home, watch = live_work_dir
    data = real_checkpoint(work_dir)
    kept = work_dir / "epoch_21.pth"
    kept.write_bytes(data)
    wait_until(lambda: "epoch_21.pth" in checkpoint_states(home), 30, "the checkpoint to be pinned", watch)
    kept.unlink()
    vanishing = work_dir / "epoch_22.pth"
    vanishing.write_bytes(data)
    vanishing.unlink()  # most likely gone before the first look
    wait_until(lambda: checkpoint_states(home)["epoch_21.pth"][0][0] == "uploaded", 60, "the pinned copy", watch)
    # Never seen (gone before the first look), seen but gone before it could be pinned (missed), or pinned
    # just before it went and then uploaded from the pin: either way it ends there, never half-way.
    wait_until(lambda: checkpoint_states(home).get("epoch_22.pth", [("unseen", None)])[0][0] in {"unseen", "missed", "uploaded"},
               60, "the vanished checkpoint to be decided", watch)
    vanished = checkpoint_states(home).get("epoch_22.pth", [("unseen", None)])[0][0]
    artifacts = model_artifacts_after_stop(home, watch)
    digest = base64.b64encode(hashlib.md5(data).digest()).decode()
    assert artifacts["epoch_21.pth"]["digest"] == digest
    if vanished == "uploaded":
        assert artifacts["epoch_22.pth"]["digest"] == digest
    else:
        assert "epoch_22.pth" not in artifacts, f"{vanished}, yet uploaded"
        assert not list((home / "store").rglob("*-epoch_22.pth")), f"{vanished}, yet a pin is left in the store"


def test_a_broken_checkpoint_that_never_completes_is_incomplete(live_work_dir):
    work_dir, home, watch = live_work_dir
    (work_dir / "epoch_23.pth").write_bytes(real_checkpoint(work_dir)[:-100])
    (work_dir / "epoch_24.pth").write_bytes(b"")
    (work_dir / "epoch_25.pth").write_text("https://pan.example/placeholder instead of the checkpoint\n")
    wait_until(lambda: all(checkpoint_states(home).get(f"epoch_{n}.pth", [("", "")])[0][0] == "incomplete"
                           for n in (23, 24, 25)), 60, "the broken checkpoints to be marked incomplete", watch)
    reasons = {n: checkpoint_states(home)[f"epoch_{n}.pth"][0][1] for n in (23, 24, 25)}
    assert "end-of-central-directory" in reasons[23] and "empty" in reasons[24] and "not a zip" in reasons[25]
    artifacts = model_artifacts_after_stop(home, watch)
    assert not {"epoch_23.pth", "epoch_24.pth", "epoch_25.pth"} & set(artifacts)


def test_a_checkpoint_replaced_after_upload_is_a_new_version(live_work_dir):
    work_dir, home, watch = live_work_dir
    target = next(p for p in sorted(work_dir.glob("epoch_*.pth")))
    wait_until(lambda: checkpoint_states(home)[target.name][0][0] == "uploaded", 60, "the first upload", watch)
    replacement = target.with_suffix(".new")
    shutil.copyfile(next(p for p in sorted(work_dir.glob("best_*.pth"))), replacement)
    os.replace(replacement, target)
    wait_until(lambda: [s for s, _ in checkpoint_states(home)[target.name]] == ["uploaded", "uploaded"], 60,
               "the new content to be uploaded", watch)
    (_, (_, reason)) = checkpoint_states(home)[target.name]
    assert reason is None or "rewritten" in reason


def test_bad_checkpoint_files_in_a_backfill(trained_work_dir, tmp_path):
    work_dir = trained_work_dir("retinanet_epoch", writable=True)
    (work_dir / "epoch_30.pth").write_bytes(b"")
    (work_dir / "epoch_31.pth").write_text("placeholder\n")
    (work_dir / "epoch_32.pth").write_bytes(real_checkpoint(work_dir)[:1000])
    outside = tmp_path / "outside.pth"
    outside.write_bytes(real_checkpoint(work_dir))
    os.symlink(outside, work_dir / "latest_outside.pth")
    home = tmp_path / "home"
    cli(home, "backfill", str(work_dir.parent), "--no-progress", "--log-checkpoint", "--checkpoint-incomplete-after", "0")
    states = checkpoint_states(home)
    for name in ("epoch_30.pth", "epoch_31.pth", "epoch_32.pth"):
        assert states[name][0][0] == "incomplete" and states[name][0][1]
    assert "latest_outside.pth" not in states
    problems = status(home)["problems"]
    assert any(p["kind"] == "symlink_outside_root" and p["path"].endswith("latest_outside.pth") for p in problems)
    assert "outside.pth" not in model_artifacts(home)


def test_backfill_of_an_iter_based_run(trained_work_dir, tmp_path):
    work_dir = trained_work_dir("retinanet_iter")
    home = tmp_path / "home"
    cli(home, "backfill", str(work_dir.parent), "--no-progress", *CKPT_FLAGS)
    vals = {}  # training iteration → the val line written right after that train line
    last_train_iter = None
    for raw in next(work_dir.glob("*.log.json")).read_text().splitlines():
        line = json.loads(raw)
        if line.get("mode") == "train":
            last_train_iter = line["iter"]
        elif line.get("mode") == "val":
            vals[last_train_iter] = line
    files = {p.name: p for p in work_dir.glob("iter_*.pth")}
    artifacts = model_artifacts(home)
    assert set(files) <= set(artifacts) and files
    for name, path in files.items():
        number = int(name[len("iter_") : -len(".pth")])
        art = artifacts[name]
        assert art["digest"] == md5_b64(path) and art["aliases"] >= {f"iter_{number}", "latest"}
        assert art["metadata"]["iter"] == number
        expected = {k: v for k, v in vals[number].items() if k not in {"mode", "epoch", "iter", "lr"} and not isinstance(v, str)}
        assert {k: art["metadata"].get(k) for k in expected} == expected
    assert any(art["metadata"].get("bbox_mAP", 0) > 0 for art in artifacts.values())


def test_a_store_on_another_filesystem_gets_copies_once_complete(trained_work_dir, tmp_path):
    """Docker mounts work_dirs read-only, or on another filesystem than the data volume: no hard link is
    possible, so each complete checkpoint is copied into the store instead of being missed."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs a second filesystem (/dev/shm)")
    work_dir = trained_work_dir("retinanet_epoch")
    home = Path(tempfile.mkdtemp(dir=shm))
    try:
        cli(home, "backfill", str(work_dir.parent), "--no-progress", "--num-eval-images", "0", *CKPT_FLAGS)
        files = {p.name: p for p in work_dir.glob("*.pth") if not p.is_symlink()}
        artifacts = model_artifacts(home)
        assert set(artifacts) == set(files)
        for name, art in artifacts.items():
            (copy,) = (home / "store").rglob(f"*-{name}")
            assert copy.stat().st_nlink == 1 and copy.stat().st_dev != files[name].stat().st_dev, "a copy, not a link"
            assert art["digest"] == md5_b64(files[name]) == md5_b64(copy)
        assert {s for states in checkpoint_states(home).values() for s, _ in states} == {"uploaded"}
    finally:
        shutil.rmtree(home, ignore_errors=True)

"""Smoke tests of tests/mmdet_run: real tiny MMDetection 2.28.2 trainings (CPU) leave the work_dirs the sidecar reads.

Skipped (with the import error as the reason) when `import mmdet` fails, i.e. without the `eval` extra.
The first run trains every kind once into the cache (`.cache/mmdet_runs/`); later runs only copy.
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from tests.mmdet_run import configs
from tests.mmdet_run.fixtures import KINDS, Schedule, require_mmdet, start_training

TS = re.compile(r"^\d{8}_\d{6}$")


def _log_jsons(work_dir: Path) -> list[Path]:
    return sorted(p for p in work_dir.glob("*.log.json") if TS.match(p.name.removesuffix(".log.json")))


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _regular_ckpts(work_dir: Path, by_epoch: bool) -> list[int]:
    pattern = re.compile(r"^epoch_(\d+)\.pth$" if by_epoch else r"^iter_(\d+)\.pth$")
    return sorted(int(m.group(1)) for p in work_dir.iterdir() if (m := pattern.match(p.name)))


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_work_dir_is_what_tools_train_leaves(trained_work_dir, kind: str) -> None:
    spec = KINDS[kind]
    expect = spec.expect
    work_dir = trained_work_dir(kind)
    assert work_dir.name == spec.config_stem

    # the dumped config, named after the config file
    dumped = work_dir / f"{spec.config_stem}.py"
    assert dumped.is_file()
    text = dumped.read_text(encoding="utf-8")
    runner_type = "EpochBasedRunner" if expect["by_epoch"] else "IterBasedRunner"
    assert f"type='{runner_type}'" in text

    # one <ts>.log and <ts>.log.json per launch
    logs = _log_jsons(work_dir)
    assert len(logs) == expect.get("launches", 1), [p.name for p in work_dir.iterdir()]
    for log_json in logs:
        text_log = log_json.with_name(log_json.name.removesuffix(".json"))
        assert text_log.is_file()
        body = text_log.read_text(encoding="utf-8")
        assert "Environment info:" in body and "Config:" in body
        assert ("Epoch [" if expect["by_epoch"] else "Iter [") in body

    all_train, all_val, val_after = [], [], []
    for n, log_json in enumerate(logs):
        rows = _rows(log_json)
        # the training iteration an evaluation belongs to is that of the train line just before it
        val_after += [rows[i - 1]["iter"] for i, r in enumerate(rows) if r.get("mode") == "val"]
        header = rows[0]
        assert {"env_info", "config", "seed", "exp_name"} <= set(header), header.keys()
        assert header["exp_name"] == f"{spec.config_stem}.py"
        assert header["seed"] == 0
        assert "mode" not in header
        train = [r for r in rows[1:] if r.get("mode") == "train"]
        val = [r for r in rows[1:] if r.get("mode") == "val"]
        assert train and val
        assert len(train) + len(val) == len(rows) - 1
        for r in train:
            assert {"epoch", "iter", "lr", "loss", "time", "data_time"} <= set(r), r
            assert r["loss"] > 0
        if expect.get("launches", 1) == 2 and n == 1:
            assert train[0]["epoch"] == 5  # resumed from epoch_4.pth
            # mmcv's runner.resume replaces runner.meta by the checkpoint's meta: the resumed log's header is
            # that meta (epoch/iter of the checkpoint, hook_msgs, mmcv_version, time, CLASSES, ...), and its
            # `config` is the config of the launch that wrote the checkpoint, not the dumped (new) one
            assert header["epoch"] == 4 and header["iter"] == 4 * 24
            assert {"hook_msgs", "mmcv_version", "time", "CLASSES", "mmdet_version"} <= set(header)
            assert "max_epochs=4" in header["config"]
            assert "max_epochs=8" in dumped.read_text(encoding="utf-8")
        all_train += train
        all_val += val

    # val lines with real, non-zero mAP
    for r in all_val:
        if set(r) <= {"mode", "epoch", "iter", "lr"}:
            continue  # an evaluation without a single detection: mmdet logs a val line with no metric
        assert "bbox_mAP" in r and "bbox_mAP_50" in r and "bbox_mAP_copypaste" in r
        if expect["segm"]:
            assert "segm_mAP" in r
    assert all_val[-1]["bbox_mAP"] > 0, all_val
    assert max(r.get("bbox_mAP", 0) for r in all_val) > 0.05
    if expect["segm"]:
        assert all_val[-1]["segm_mAP"] > 0, all_val

    # the schedule: epochs / iterations and evaluation points
    if expect["by_epoch"]:
        assert max(r["epoch"] for r in all_train) == expect["length"]
        assert [r["epoch"] for r in all_val] == list(range(1, expect["length"] + 1, expect["eval_interval"]))
    else:
        assert max(r["iter"] for r in all_train) == expect["length"]
        step = expect["eval_interval"]
        assert val_after == list(range(step, expect["length"] + 1, step))
        # mmcv's TextLoggerHook writes `eval_iter_num` (batches in the val loader) as a val line's "iter",
        # not the training iteration, even when by_epoch=False
        assert {r["iter"] for r in all_val} == {8}

    # checkpoints: regular ones (at most max_keep_ckpts), latest.pth -> the last, best_* with save_best
    regular = _regular_ckpts(work_dir, expect["by_epoch"])
    assert regular and regular[-1] == expect["length"]
    if expect["max_keep_ckpts"]:
        assert len(regular) == expect["max_keep_ckpts"]
    latest = work_dir / "latest.pth"
    assert latest.is_symlink()
    target = os.readlink(latest)
    assert Path(target).name == f"{'epoch' if expect['by_epoch'] else 'iter'}_{expect['length']}.pth"
    assert latest.resolve().is_file()
    best = sorted(work_dir.glob("best_*.pth"))
    if expect["save_best"]:
        # a resumed run may leave a second best_*.pth: the checkpoint it resumes from was saved before that
        # epoch's evaluation, so its hook_msgs name the best before, and the newer best file is never removed
        assert len(best) == 1 or (expect.get("launches", 1) > 1 and len(best) == 2), best
        epochs = []
        for path in best:
            m = re.fullmatch(r"best_bbox_mAP_epoch_(\d+)\.pth", path.name)
            assert m, path.name
            epochs.append(int(m.group(1)))
        best_epoch = max(epochs)
        best_score = max(r.get("bbox_mAP", -1) for r in all_val)
        assert [r["bbox_mAP"] for r in all_val if r["epoch"] == best_epoch][0] == best_score
    else:
        assert not best


def test_copies_are_read_only_and_keep_links(trained_work_dir, tmp_path: Path) -> None:
    work_dir = trained_work_dir("retinanet_epoch", dest=tmp_path / "root")
    assert work_dir.parent == tmp_path / "root"
    log_json = _log_jsons(work_dir)[0]
    assert not os.access(log_json, os.W_OK) or os.geteuid() == 0
    assert not (log_json.stat().st_mode & 0o222)
    assert (work_dir / "latest.pth").is_symlink()
    writable = trained_work_dir("retinanet_epoch", dest=tmp_path / "rw", writable=True)
    assert _log_jsons(writable)[0].stat().st_mode & 0o200


def test_live_training_grows_the_log_while_it_runs(synthetic_coco, tmp_path: Path) -> None:
    """start_training: the <ts>.log.json exists and grows before the process ends, as a live sidecar sees it."""
    require_mmdet()
    cfg = configs.retinanet_config(synthetic_coco, Schedule(max_epochs=2, lr=0.01, log_interval=2))
    config_file = configs.write_config(cfg, tmp_path / "configs" / "live_retinanet.py")
    work_dir = tmp_path / "work_dirs" / "live_retinanet"
    proc = start_training(config_file, work_dir)
    seen_while_running: list[int] = []
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            logs = _log_jsons(work_dir) if work_dir.is_dir() else []
            if logs:
                seen_while_running.append(len(_rows(logs[0])) if logs[0].stat().st_size else 0)
            time.sleep(0.2)
        assert proc.wait(timeout=max(1, deadline - time.monotonic())) == 0, proc.output_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    final_rows = _rows(_log_jsons(work_dir)[0])
    assert len(set(seen_while_running)) >= 2, seen_while_running  # it grew while we watched
    assert max(seen_while_running) <= len(final_rows)
    assert [r["epoch"] for r in final_rows if r.get("mode") == "val"] == [1, 2]
    assert (work_dir / "live_retinanet.py").is_file()
    assert (work_dir / "epoch_2.pth").is_file() and (work_dir / "latest.pth").is_symlink()

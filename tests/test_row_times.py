"""Backfilled runs that read as if logged live: every row's `_timestamp` is the time its line was written (from
the text log of the launch, else the launch time plus the logged per-iteration time), the summary keeps the
best and the last value of every val metric, and the config holds the training's own environment. On the real
logs, read back from the `.wandb` files the real wandb client wrote."""
from __future__ import annotations

import datetime as dt
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from common.records import MetricRow, RowKind
from tests.conftest import REAL_LOGS, REPO, cli, offline_run, service_env, status, wait_until
from tests.oracle import expected_rows, expected_times
from uploader.ingest import update_best

UTC = ZoneInfo("UTC")


def paired_logs() -> list[tuple[Path, Path]]:
    """(log, text log of the same launch) for every real log that has one."""
    pairs = []
    for log in sorted(REAL_LOGS.rglob("*.log.json")):
        text = log.with_name(log.name[: -len(".json")])
        if text.is_file():
            pairs.append((log, text))
    for log in sorted(REAL_LOGS.rglob("vis_data/scalars.json")):
        launch = log.parent.parent
        text = launch / f"{launch.name}.log"
        if text.is_file():
            pairs.append((log, text))
    return pairs


def copy_launch(log: Path, text: Path, dest: Path) -> Path:
    """The launch's files in a work_dir of their own under `dest` (its log, text log and config)."""
    if log.parent.name == "vis_data":
        work_dir = dest / f"{log.parents[2].name}-{log.parents[1].name}"
        shutil.copytree(log.parents[1], work_dir / log.parents[1].name)
    else:
        work_dir = dest / f"{log.parent.name}-{log.name[:15]}"
        work_dir.mkdir(parents=True)
        for path in (log, text, *log.parent.glob("*.py")):
            shutil.copy(path, work_dir / path.name)
    return work_dir


def runs(home: Path) -> dict[str, dict]:
    return {Path(w["path"]).name: r for w in status(home)["work_dirs"] for r in w["runs"]}


def history(home: Path, run: dict) -> list[dict]:
    return offline_run(home, run["wandb_id"]).history


def test_every_row_has_the_time_of_its_text_log_line(real_logs, tmp_path):
    pairs = paired_logs()
    assert len(pairs) >= 6, "the real logs with a text log of the same launch"
    root, home = tmp_path / "root", tmp_path / "home"
    dirs = {copy_launch(log, text, root).name: (log, text) for log, text in pairs}
    cli(home, "backfill", str(root), "--no-progress", "--log-timezone", "UTC", timeout=600)
    by_dir = runs(home)
    assert set(by_dir) == set(dirs)
    for name, (log, text) in dirs.items():
        rows = history(home, by_dir[name])
        expected = expected_times(log, text, UTC)
        assert len(rows) == len(expected), name
        matched = [(row["_timestamp"], want) for row, want in zip(rows, expected) if want is not None]
        assert len(matched) >= 0.9 * len(rows), f"{name}: the text log names (almost) every row"
        for got, want in matched:
            assert abs(got - want) < 1, f"{name}: {dt.datetime.fromtimestamp(got, UTC)} != {dt.datetime.fromtimestamp(want, UTC)}"
        stamps = [row["_timestamp"] for row in rows]
        assert stamps == sorted(stamps), f"{name}: times never go back along _step"


def launch_of(log: Path, zone: ZoneInfo) -> float:
    return dt.datetime.strptime(log.name[:15], "%Y%m%d_%H%M%S").replace(tzinfo=zone).timestamp()


def test_without_a_text_log_times_follow_the_launch_and_the_logged_iteration_time(real_logs, tmp_path):
    logs = [REAL_LOGS / "masati91__ELTD/work_dirs/eltd_r101_fpn_1x_coco/20210427_101754.log.json",
            REAL_LOGS / "masati91__ELTD/work_dirs/yolov3_d53_320_273e_coco/20210422_141751.log.json"]
    root, home = tmp_path / "root", tmp_path / "home"
    for log in logs:
        (root / log.parent.name).mkdir(parents=True)
        shutil.copy(log, root / log.parent.name / log.name)
    cli(home, "backfill", str(root), "--no-progress", "--log-timezone", "Europe/Berlin", timeout=600)
    zone = ZoneInfo("Europe/Berlin")
    by_dir = runs(home)
    for log in logs:
        rows = history(home, by_dir[log.parent.name])
        lines = [line for line, _ in expected_rows(log)]
        train = [line for line in lines if line["mode"] == "train"]
        interval = train[0]["iter"]
        start = launch_of(log, zone)
        first = rows[0]["_timestamp"]
        assert start <= first <= start + train[0]["time"] * interval + 1, "within one logging interval of the launch"
        accumulated, previous = 0.0, (1, 0)
        per_epoch = max(line["iter"] for line in train)
        for line in train:
            position = (line["epoch"] - 1) * per_epoch + line["iter"]
            accumulated += line["time"] * (position - ((previous[0] - 1) * per_epoch + previous[1]))
            previous = (line["epoch"], line["iter"])
        last = rows[-1]["_timestamp"]
        assert abs(last - (start + accumulated)) <= 0.1 * accumulated, "the launch plus the accumulated time, within 10 %"
        stamps = [row["_timestamp"] for row in rows]
        assert stamps == sorted(stamps)
        for row, line in zip(rows, lines):
            if line["mode"] == "val":
                assert row["_timestamp"] == rows[rows.index(row) - 1]["_timestamp"], "a val row takes its train row's time"


def test_log_timezone_shifts_every_row_by_its_offset(real_logs, tmp_path):
    log = REAL_LOGS / "lyc686__OpenMMlab_AI_2023.2/code/Task_02/balloon/log/20230208_162410.log.json"
    stamps = {}
    for zone in ("UTC", "Asia/Tokyo"):
        root, home = tmp_path / zone / "root", tmp_path / zone / "home"
        copy_launch(log, log.with_name(log.name[:-5]), root)
        cli(home, "backfill", str(root), "--no-progress", timeout=600, MMDET_WANDB_LOG_TIMEZONE=zone)
        [run] = runs(home).values()
        stamps[zone] = [row["_timestamp"] for row in history(home, run)]
    assert len(stamps["UTC"]) == 40
    assert all(math.isclose(utc - tokyo, 9 * 3600) for utc, tokyo in zip(stamps["UTC"], stamps["Asia/Tokyo"]))
    bad = cli(tmp_path / "bad", "backfill", str(tmp_path / "UTC" / "root"), "--no-progress", "--log-timezone", "Mars/Olympus",
              check=False)
    assert bad.returncode != 0 and "not an IANA time zone" in bad.stderr


def test_a_resumed_lineage_never_goes_back_in_time(real_logs, tmp_path):
    source = REAL_LOGS / "ISCLab-Bistu__DGFormer/detection/work_dirs/retinanet_dgformer_dga_effn_fpn_1x_coco"
    root, home = tmp_path / "root", tmp_path / "home"
    shutil.copytree(source, root / source.name)
    cli(home, "backfill", str(root), "--no-progress", "--log-timezone", "UTC", timeout=600)
    [run] = runs(home).values()
    rows = history(home, run)
    assert len(rows) == 587 + 1176, "both launches in one run"
    stamps = [row["_timestamp"] for row in rows]
    assert stamps == sorted(stamps), "times never go back along _step"
    second = launch_of(source / "20210721_082820.log.json", UTC)
    assert stamps[587] >= second, "the resumed launch starts at its own launch time"


def test_live_watch_restarted_mid_log_keeps_the_times_of_the_log(real_logs, tmp_path):
    """A training written line by line (log.json and its text log), the service restarted halfway: the rows
    read after the restart carry the times of their text-log lines, not the moment they were read."""
    log = REAL_LOGS / "lyc686__OpenMMlab_AI_2023.2/code/Task_02/balloon/log/20230208_162410.log.json"
    text = log.with_name(log.name[:-5])
    work_dir = tmp_path / "root" / "balloon"
    work_dir.mkdir(parents=True)
    json_lines = log.read_bytes().splitlines(keepends=True)
    text_lines = text.read_bytes().splitlines(keepends=True)
    home = tmp_path / "home"

    def write_until(n_json: int) -> None:
        """Both files up to the n-th log.json line, the text log first (as mmcv's logger writes it)."""
        cut = len(text_lines) if n_json >= len(json_lines) else _text_cut(text_lines, json_lines[n_json - 1])
        (work_dir / text.name).write_bytes(b"".join(text_lines[:cut]))
        (work_dir / log.name).write_bytes(b"".join(json_lines[:n_json]))

    def start() -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "mmdet_wandb.cli", "watch", str(work_dir.parent), "--poll-interval", "0.2", "--scan-interval", "1",
             "--segment-idle", "1", "--finish-after", "2", "--log-timezone", "UTC"],
            env=service_env(home), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def uploaded() -> int:
        return sum(r["rows_uploaded"] for r in runs(home).values()) if (home / "state.db").exists() else 0

    write_until(20)
    watch = start()
    try:
        wait_until(lambda: uploaded() == 19, 60, "the first 19 rows")
        watch.send_signal(signal.SIGTERM)
        assert watch.wait(timeout=120) == 0
        time.sleep(2)  # the rows after the restart are read well after their lines were written
        write_until(len(json_lines))
        watch = start()
        wait_until(lambda: uploaded() == 40, 60, "every row")
        watch.send_signal(signal.SIGTERM)
        assert watch.wait(timeout=120) == 0
    finally:
        if watch.poll() is None:
            os.killpg(watch.pid, signal.SIGKILL)
            watch.wait()
    [run] = runs(home).values()
    rows = history(home, run)
    expected = expected_times(log, text, UTC)
    assert len(rows) == len(expected) == 40
    for row, want in zip(rows, expected):
        assert want is not None and abs(row["_timestamp"] - want) < 1


def _text_cut(text_lines: list[bytes], json_line: bytes) -> int:
    """The number of text-log lines written when `json_line` was: up to its own text line."""
    import json

    last = json.loads(json_line)
    marker = (f"Epoch [{last['epoch']}][{last['iter']}/" if last["mode"] == "train" else f"Epoch(val) [{last['epoch']}]").encode()
    for index, line in enumerate(text_lines):
        if marker in line:
            return index + 1
    raise AssertionError(f"no text line for {last}")


def test_summary_keeps_the_best_and_the_last_value_of_each_val_metric(real_logs, tmp_path):
    source = REAL_LOGS / "masati91__ELTD/work_dirs/cornernet_hourglass104_mstest_10x5_210e_coco"
    root, home = tmp_path / "root", tmp_path / "home"
    shutil.copytree(source, root / source.name)
    cli(home, "backfill", str(root), "--no-progress", timeout=600)
    [run] = runs(home).values()
    [segment] = offline_run(home, run["wandb_id"]).segments
    summary = segment.summary
    vals = [line for line, _ in expected_rows(next(source.glob("*.log.json"))) if line["mode"] == "val"]
    best = max(vals, key=lambda line: line["bbox_mAP"])
    assert best is not vals[-1] and best["bbox_mAP"] > vals[-1]["bbox_mAP"], "a log whose best epoch is not the last"
    assert summary["val/bbox_mAP"] == vals[-1]["bbox_mAP"], "the last value"
    assert summary["best/val/bbox_mAP"] == best["bbox_mAP"]
    assert summary["best_epoch/val/bbox_mAP"] == vals.index(best) + 1 == best["epoch"]
    assert summary["best/val/bbox_mAP_50"] == max(line["bbox_mAP_50"] for line in vals)
    assert "best/val/time" not in summary, "no best for what is neither a score nor a loss"


def test_nan_never_becomes_best_and_losses_keep_their_minimum():
    summary: dict = {}
    for epoch, (mAP, loss) in enumerate([(0.2, 1.0), (float("nan"), float("nan")), (0.1, 0.5), (float("inf"), 0.7)], 1):
        update_best(summary, MetricRow(RowKind.VAL, epoch, None, {"val/bbox_mAP": mAP, "val/loss": loss}))
    assert summary == {"best/val/bbox_mAP": 0.2, "best_epoch/val/bbox_mAP": 1, "best/val/loss": 0.5, "best_epoch/val/loss": 3}


@pytest.mark.parametrize("log, expected", [
    ("masati91__ELTD/work_dirs/eltd_r101_fpn_1x_coco/20210427_101754.log.json",
     {"GPU 0,1": "Quadro RTX 6000", "PyTorch": "1.6.0", "MMCV": "1.2.7", "MMDetection": "2.10.0+58bf7da", "CUDA available": "True"}),
    ("superegg-M__OpenMMLabCamp/task1_MMPose/mmdetection/work_dirs/rtmdet_tiny_ear/20230605_131231/vis_data/scalars.json",
     {"GPU 0": "NVIDIA GeForce RTX 3090", "PyTorch": "2.0.1+cu117", "MMEngine": "0.7.3", "CUDA available": "True"}),
])
def test_the_config_holds_the_environment_of_the_training(real_logs, tmp_path, log, expected):
    path = REAL_LOGS / log
    root, home = tmp_path / "root", tmp_path / "home"
    if path.parent.name == "vis_data":
        shutil.copytree(path.parents[1], root / "rtmdet" / path.parents[1].name)
    else:
        (root / "eltd").mkdir(parents=True)
        shutil.copy(path, root / "eltd" / path.name)
    cli(home, "backfill", str(root), "--no-progress", timeout=600)
    [run] = runs(home).values()
    [segment, *_] = offline_run(home, run["wandb_id"]).segments
    env = segment.config["env_info"]
    assert {k: env.get(k) for k in expected} == expected
    assert "PyTorch compiling details" not in env or env["PyTorch compiling details"] == "PyTorch built with:"
    assert segment.notes and str(root) in segment.notes, "the notes name the source work_dir"

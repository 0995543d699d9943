"""Backfill reads the logs in a forked child process beside its uploading (uploader/backfill_reader.py): real backfills
of copies of the real logs, the child and the parent SIGKILLed and SIGTERMed for real, and what W&B got read back
from the `.wandb` files the real client wrote."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

from tests.conftest import cli, wait_until
from tests.test_failures import CORNERNET, ELTD, YOLO, start_backfill
from tests.test_shares import alive, every_line_once


def big_copies(real_logs: Path, root: Path, times: int = 3) -> dict[str, Path]:
    """Work_dirs enough for the reading to take seconds: copies of the three largest real mmdet 2.x logs."""
    logs = {}
    for index in range(times):
        for name, rel in (("yolo", YOLO), ("eltd", ELTD), ("cornernet", CORNERNET)):
            (root / f"{name}{index}").mkdir(parents=True)
            logs[f"{name}{index}"] = Path(shutil.copy(real_logs / rel, root / f"{name}{index}"))
    return logs


def reader(pid: int) -> int | None:
    """The backfill's forked reading process: a child running the same command (wandb-core is the other child)."""
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    for child in kids:
        try:
            if b"mmdet_wandb.cli" in Path(f"/proc/{child}/cmdline").read_bytes() and alive(int(child)):
                return int(child)
        except OSError:
            continue
    return None


def backfill_reading(real_logs: Path, tmp_path: Path) -> tuple[Path, Path, dict[str, Path], subprocess.Popen[str], int]:
    """A backfill (one share: the parent uploads) started, and its reading process found."""
    root, home = tmp_path / "work_dirs", tmp_path / "home"
    logs = big_copies(real_logs, root)
    proc = start_backfill(home, root, "--jobs", "1")
    found: list[int | None] = [None]

    def reading() -> bool:
        found[0] = reader(proc.pid)
        return found[0] is not None

    wait_until(reading, 60, "the reading process", proc)
    return root, home, logs, proc, found[0]  # type: ignore[return-value]


def test_a_backfill_reads_in_a_child_process_that_a_sigkill_of_the_backfill_takes_with_it(real_logs, tmp_path):
    root, home, logs, proc, child = backfill_reading(real_logs, tmp_path)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    wait_until(lambda: not alive(child), 10, "the reading process to die with the backfill")

    again = cli(home, "backfill", str(root), "--no-progress", "--jobs", "1", "--log-level", "INFO")
    assert "reading 9 logs in process" in again.stderr, "the logs the killed backfill had not finished: read again in a child"
    every_line_once(home, logs)


def test_a_reading_process_that_dies_leaves_the_rest_to_the_backfill(real_logs, tmp_path):
    root, home, logs, proc, child = backfill_reading(real_logs, tmp_path)
    os.kill(child, signal.SIGKILL)  # as an OOM killer would
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output
    assert "the reading process ended with exit code -9; this process reads the rest" in output
    every_line_once(home, logs)


def test_sigterm_stops_the_reading_process_too_and_the_next_backfill_ends_exactly_once(real_logs, tmp_path):
    root, home, logs, proc, child = backfill_reading(real_logs, tmp_path)
    os.kill(proc.pid, signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode == 143
    assert not alive(child)

    cli(home, "backfill", str(root), "--no-progress", "--jobs", "1")
    every_line_once(home, logs)


def test_a_small_backfill_reads_in_a_thread(real_logs, tmp_path):
    """One chunk or less to read: no process is forked for it."""
    root, home = tmp_path / "work_dirs", tmp_path / "home"
    (root / "small").mkdir(parents=True)
    small = "winycg__detection/work_dirs/faster_rcnn_r50_fpn_1x_coco/20210812_190636.log.json"
    logs = {"small": Path(shutil.copy(real_logs / small, root / "small"))}
    assert logs["small"].stat().st_size < 64 << 10
    proc = cli(home, "backfill", str(root), "--no-progress", "--log-level", "INFO")
    assert "reading 1 logs in process" not in proc.stderr
    every_line_once(home, logs)


def test_with_progress_bars_the_reading_process_is_forked_too_and_the_bars_add_up(real_logs, tmp_path):
    """The bars refresh on updates (a refresh thread would keep the reader in a thread): the rows bar ends at the
    rows uploaded, not at uploaded plus the ones still in an open segment."""
    root, home = tmp_path / "work_dirs", tmp_path / "home"
    logs = big_copies(real_logs, root, times=1)
    proc = cli(home, "backfill", str(root), "--jobs", "1", "--log-level", "INFO")
    assert "reading 3 logs in process" in proc.stderr
    runs = every_line_once(home, logs)
    rows = sum(run["rows_uploaded"] for run in runs.values())
    assert "uploading rows" in proc.stderr and f"{rows}/{rows}" in proc.stderr, proc.stderr[-2000:]
    assert "3/3" in proc.stderr, "every log read"

"""`backfill --jobs N`, `watch` catching up a backlog in share processes, and the state kept per uploaded row.

Real processes on copies of the real logs: the shares are real spawned processes with their own wandb-core, the
parent is SIGKILLed for real, and what W&B got is read back from the `.wandb` files the real client wrote.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
from pathlib import Path

from tests.conftest import cli, offline_run, status, stop, wait_until
from tests.oracle import assert_history_matches, expected_rows
from tests.test_failures import CORNERNET, ELTD, YOLO, all_steps_once, runs_by_work_dir, start_backfill

SMALL = "winycg__detection/work_dirs/faster_rcnn_r50_fpn_1x_coco/20210812_190636.log.json"


def copies(real_logs: Path, root: Path) -> dict[str, Path]:
    logs = {}
    for name, rel in (("yolo", YOLO), ("eltd", ELTD), ("cornernet", CORNERNET), ("small", SMALL)):
        (root / name).mkdir(parents=True)
        logs[name] = Path(shutil.copy(real_logs / rel, root / name))
    return logs


def every_line_once(home: Path, logs: dict[str, Path]) -> dict[str, dict]:
    runs = runs_by_work_dir(home)
    for name, log in logs.items():
        assert runs[name]["rows_pending"] == 0 and not runs[name]["last_error"], runs[name]
        assert_history_matches(offline_run(home, runs[name]["wandb_id"]).history, expected_rows(log))
    all_steps_once(home)
    return runs


def state_rows(home: Path) -> dict[str, int]:
    with sqlite3.connect(home / "state.db") as db:
        return {
            "unfolded": db.execute("SELECT count(*) FROM outbox_rows WHERE kind != 'val' OR NOT uploaded").fetchone()[0],
            "val": db.execute("SELECT count(*) FROM outbox_rows WHERE kind = 'val'").fetchone()[0],
            "folded": db.execute("SELECT coalesce(sum(rows), 0) FROM uploaded_spans").fetchone()[0],
        }


def test_shares_upload_every_line_once_each_run_from_one_process_and_fold_what_is_uploaded(real_logs, tmp_path):
    root, home = tmp_path / "work_dirs", tmp_path / "home"
    logs = copies(real_logs, root)
    proc = cli(home, "backfill", str(root), "--no-progress", "--jobs", "2", "--log-level", "INFO", "--log-format", "json")
    entries = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    parent = entries[0]["pid"]
    writers: dict[str, set[int]] = {}
    for entry in entries:
        if "opened segment" in entry["msg"]:
            writers.setdefault(entry["msg"].split()[1].rstrip(":"), set()).add(entry["pid"])
    assert len(writers) == 4 and all(len(pids) == 1 for pids in writers.values()), writers
    assert len(set().union(*writers.values()) - {parent}) == 2, "two share processes wrote the runs, the parent none"

    runs = every_line_once(home, logs)
    uploaded = sum(run["rows_uploaded"] for run in runs.values())
    rows = state_rows(home)
    assert rows["unfolded"] == 0 and rows["folded"] + rows["val"] == uploaded, rows
    assert rows["val"] > 0, "val rows stay whole: a checkpoint found later takes its metadata from them"

    cli(home, "backfill", str(root), "--no-progress", "--jobs", "2")
    assert every_line_once(home, logs) == runs
    assert state_rows(home) == rows


def test_a_log_replaced_by_a_copy_after_its_rows_were_folded_uploads_only_its_new_lines(real_logs, tmp_path):
    """The copy has a new inode: it is read again from the start, and the folded spans still know every line."""
    root, home = tmp_path / "work_dirs", tmp_path / "home"
    (root / "eltd").mkdir(parents=True)
    original = (real_logs / ELTD).read_bytes()
    lines = original.splitlines(keepends=True)
    log = root / "eltd" / Path(ELTD).name
    log.write_bytes(b"".join(lines[: len(lines) // 2]))
    cli(home, "backfill", str(root), "--no-progress")
    assert state_rows(home)["folded"] > 0

    replacement = log.with_suffix(".new")
    replacement.write_bytes(original)
    os.replace(replacement, log)
    cli(home, "backfill", str(root), "--no-progress")
    with sqlite3.connect(home / "state.db") as db:
        assert db.execute("SELECT kind FROM problems WHERE path = ?", (str(log),)).fetchall() == []  # a replace is information
    every_line_once(home, {"eltd": log})


def test_a_sigkilled_backfill_takes_its_share_processes_with_it_and_the_next_one_ends_exactly_once(real_logs, tmp_path):
    root, home = tmp_path / "work_dirs", tmp_path / "home"
    logs = copies(real_logs, root)
    proc = start_backfill(home, root, "--jobs", "2")
    shares: list[int] = []

    def shares_uploading() -> bool:
        shares[:] = children(proc.pid)
        return len(shares) >= 2 and (home / "wandb").is_dir() and any((home / "wandb").iterdir())

    wait_until(shares_uploading, 120, "two share processes uploading", proc)
    os.kill(proc.pid, signal.SIGKILL)  # the parent alone, as an OOM killer would
    proc.wait(30)
    wait_until(lambda: not any(alive(pid) for pid in shares), 10, "the share processes to die with their parent")

    again = cli(home, "backfill", str(root), "--no-progress", "--jobs", "2")
    assert again.returncode == 0
    every_line_once(home, logs)


def test_watch_catches_up_a_backlog_in_share_processes_then_tails_the_live_log_itself(real_logs, tmp_path, watcher):
    """17 work_dirs behind at start: two share processes read and upload them (and take the burst's memory with
    them when they exit); then watch's own loop tails the live one, and every line is there once."""
    root, home = tmp_path / "work_dirs", tmp_path / "home"
    for index in range(16):
        (root / f"small{index:02d}").mkdir(parents=True)
        shutil.copy(real_logs / SMALL, root / f"small{index:02d}")
    (root / "live").mkdir()
    lines = (real_logs / ELTD).read_bytes().splitlines(keepends=True)
    log = root / "live" / Path(ELTD).name
    log.write_bytes(b"".join(lines[: len(lines) // 2]))
    proc = watcher(home, root, "--jobs", "2", "--log-format", "json", "--finish-after", "3600", "--segment-idle", "1")

    def uploaded() -> int:
        if not (home / "state.db").exists():
            return -1
        runs = [r for w in status(home)["work_dirs"] for r in w["runs"]]
        return sum(r["rows_uploaded"] for r in runs) if len(runs) == 17 and not any(r["rows_pending"] for r in runs) else -1

    caught_up = len(expected_rows(log)) + 16
    wait_until(lambda: uploaded() == caught_up, 180, "the backlog uploaded", proc)
    with log.open("ab") as handle:  # the log's last line ends with a newline, as a line of a live log does once written
        handle.write(b"".join(lines[len(lines) // 2:]).rstrip(b"\n") + b"\n")
    log_now = Path(shutil.copy(log, tmp_path / "whole.log.json"))
    wait_until(lambda: uploaded() == len(expected_rows(log_now)) + 16, 120, "the live lines uploaded", proc)
    output = stop(proc)

    entries = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert any(e["msg"] == "reading and uploading 17 work_dirs in 2 processes" for e in entries)
    opened = [(e["msg"].split()[1].rstrip(":"), e["pid"]) for e in entries if "opened segment" in e["msg"]]
    shares = {pid for _, pid in opened} - {proc.pid}
    assert len(shares) == 2 and len({run for run, pid in opened if pid in shares}) == 17, opened
    live = runs_by_work_dir(home)["live"]["wandb_id"]
    assert (live, proc.pid) in opened, "the live lines: watch's own writer, once the shares had ended"
    assert_history_matches(offline_run(home, live).history, expected_rows(log_now))
    all_steps_once(home)


def children(pid: int) -> list[int]:
    """The share processes of a backfill (its spawned children)."""
    found = []
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        try:
            if "spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes().decode(errors="replace"):
                found.append(int(child))
        except OSError:
            continue
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


"""What a user meets around the core (issue 27, defects 4–8): every problem in `status` until its cause is gone,
log lines that outside names cannot forge, one clear line per error, and output that fits pipes and terminals."""
from __future__ import annotations

import json
import logging
import os
import sqlite3
from pathlib import Path

from common.display_names import display_name
from mmdet_wandb import logs
from tests.conftest import REAL_LOGS, cli, status
from tests.test_failures import YOLO

FORGED = "2026-12-04 00:00:00,000 CRITICAL mmdet_wandb: FORGED LINE"


def small_log(work_dir: Path, lines: int = 40, extra: bytes = b"") -> Path:
    """The first lines of a real 2.x log, in a work_dir of its own."""
    work_dir.mkdir(parents=True, exist_ok=True)
    log = work_dir / Path(YOLO).name
    log.write_bytes(b"".join((REAL_LOGS / YOLO).read_bytes().splitlines(keepends=True)[:lines]) + extra)
    return log


def test_a_newline_in_a_folder_name_is_escaped_in_the_log_and_the_run_name(tmp_path):
    root, home = tmp_path / "work_dirs", tmp_path / "home"
    small_log(root / f"wd\n{FORGED}", extra=b"{not json\n")  # a bad line: its warning names the path
    proc = cli(home, "backfill", str(root), "--no-progress")
    assert f"wd\\n{FORGED}" in proc.stderr, proc.stderr
    assert not any(line.startswith(FORGED) for line in proc.stderr.splitlines()), proc.stderr
    runs = [r for w in status(home)["work_dirs"] for r in w["runs"]]
    assert len(runs) == 1 and "\n" not in runs[0]["name"] and runs[0]["name"].startswith("wd\\n2026")


def test_display_names_are_one_readable_line_and_the_text_log_escapes_every_message(capsys):
    long = "/data/" + "x" * 270 + "/launch_20210422_141751"
    assert len(display_name(long)) <= 96 and display_name(long).endswith("launch_20210422_141751")
    assert display_name("a\tb\x1b[31m") == "a\\tb\\x1b[31m"
    logs.setup("INFO", "text", "test")
    logging.getLogger("mmdet_wandb.t").warning("%s: bad", "wd\nfake line\r")
    assert capsys.readouterr().err.count("\n") == 1


def test_a_folder_whose_name_is_not_utf8_and_a_symlink_out_of_the_root_are_rows_of_status_until_fixed(tmp_path):
    root, home, outside = tmp_path / "work_dirs", tmp_path / "home", tmp_path / "outside"
    small_log(root / "good")
    bad = Path(os.fsdecode(bytes(root) + b"/bad\xff"))
    small_log(bad)
    outside.mkdir()
    (root / "link").symlink_to(outside)
    cli(home, "backfill", str(root), "--no-progress")
    table = cli(home, "status").stdout
    assert "undecodable_name" in table and "bad\\xff" in table and "read or uploaded until it is renamed" in table, table
    assert "symlink_outside_root" in table and str(root / "link") in table, table

    (root / "link").unlink()
    bad.rename(root / "renamed")
    cli(home, "backfill", str(root), "--no-progress")
    table = cli(home, "status").stdout
    assert "undecodable_name" not in table and "symlink_outside_root" not in table, table
    assert "renamed" in table
    resolved = {p["kind"]: p["resolved_at"] for p in status(home)["problems"]}
    assert resolved["undecodable_name"] and resolved["symlink_outside_root"]


def test_a_truncated_log_names_the_byte_it_had_read_to_and_a_replaced_one_is_no_problem(tmp_path):
    root, home = tmp_path / "work_dirs", tmp_path / "home"
    log = small_log(root / "wd")
    size = log.stat().st_size
    cli(home, "backfill", str(root), "--no-progress")
    log.write_bytes(b"")
    small_log(root / "wd", lines=10)
    cli(home, "backfill", str(root), "--no-progress")
    with sqlite3.connect(home / "state.db") as db:
        (kind, offset, message), = db.execute("SELECT kind, byte_offset, message FROM problems WHERE resolved_at IS NULL")
    assert kind == "reset" and offset == -1 and f"had read up to byte {size}" in message, message

    replacement = log.with_suffix(".new")
    small_log(root / "wd", lines=40)
    os.replace(log, replacement)
    os.replace(replacement, log)  # a new inode under the old name
    log.with_name("copy").write_bytes(log.read_bytes())
    os.replace(log.with_name("copy"), log)
    proc = cli(home, "backfill", str(root), "--no-progress", "--log-level", "INFO")
    assert "replaced: inode changed" in proc.stderr
    with sqlite3.connect(home / "state.db") as db:
        assert db.execute("SELECT kind FROM problems WHERE resolved_at IS NULL").fetchall() == []


def test_a_data_dir_that_is_a_file_or_cannot_be_written_is_one_clear_line(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    for args in (("status",), ("backfill", str(tmp_path))):
        proc = cli(tmp_path, *args, "--data-dir", str(afile), check=False)
        assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
            f"error: data directory {afile} is a file, not a directory: give --data-dir (or MMDET_WANDB_HOME) a directory"
        ], proc.stderr
    proc = cli(tmp_path, "backfill", str(tmp_path), "--data-dir", "/proc/mmdet-wandb", check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "cannot be written" in lines[0] and "Errno" not in lines[0], proc.stderr


def test_help_and_status_fit_pipes_and_columns_and_json_logs_keep_stderr_json(tmp_path):
    root, home = tmp_path / "work_dirs", tmp_path / "home"
    help_text = cli(home, "backfill", "--help").stdout
    assert "…" not in help_text and "--checkpoint-incomplete-after" in help_text and "MMDET_WANDB_BBOX_SCORE_THR" in help_text
    small_log(root / ("w" * 150))
    proc = cli(home, "backfill", str(root), "--log-format", "json")
    lines = [json.loads(line) for line in proc.stderr.splitlines()]  # stderr is JSON only: no table, bar or plain line
    assert any(line["msg"].startswith("offline runs are in ") for line in lines), proc.stderr
    bad = cli(home, "backfill", str(root), "--log-format", "json", "--bbox-score-thr", "7", check=False)
    assert bad.returncode == 2 and json.loads(bad.stderr)["msg"].startswith("error: --bbox-score-thr = 7.0"), bad.stderr
    assert "w" * 150 in cli(home, "status").stdout  # a pipe gets whole rows
    narrow = cli(home, "status", COLUMNS="60").stdout
    assert max(len(line) for line in narrow.splitlines()) <= 60

"""`mmdet-wandb watch` as a real long-running process: live tailing, graceful stop, and a SIGKILL crash."""
from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import time
from pathlib import Path

from tests.conftest import cli, offline_run, status, stop, wait_until
from tests.oracle import assert_history_matches, expected_rows
from uploader.wandb import reader as wandb_reader

ELTD = "masati91__ELTD/work_dirs/eltd_r101_fpn_1x_coco/20210427_101754.log.json"
YOLO = "masati91__ELTD/work_dirs/yolov3_d53_320_273e_coco/20210422_141751.log.json"
CORNERNET = "masati91__ELTD/work_dirs/cornernet_hourglass104_mstest_10x5_210e_coco/20210427_235944.log.json"


def live_rows(home: Path) -> list[dict]:
    """History rows already flushed into any .wandb file (open segments included), by step."""
    rows = []
    runs_dir = home / "wandb"
    if not runs_dir.is_dir():
        return rows
    for path in wandb_reader.find_run_files(runs_dir):
        for record in wandb_reader.iter_records(path):
            if record.WhichOneof("record_type") == "history":
                rows.append({item.nested_key[0] if item.nested_key else item.key: item.value_json for item in record.history.item})
    return rows


def test_lines_appended_while_watching_arrive(real_logs, tmp_path, watcher):
    source = real_logs / ELTD
    lines = source.read_bytes().splitlines(keepends=True)
    root, home = tmp_path / "work_dirs", tmp_path / "home"
    log = root / "eltd" / source.name
    log.parent.mkdir(parents=True)
    log.write_bytes(b"".join(lines[:11]))  # header + 10 data lines
    proc = watcher(home, root, "--segment-idle", "3", "--finish-after", "3")

    wait_until(lambda: len(live_rows(home)) == 10, 60, "the first 10 rows", proc)
    written = 11
    for batch in (1, 5, 50, 200):
        with open(log, "ab") as handle:
            handle.writelines(lines[written : written + batch])
        written += batch
        wait_until(lambda: len(live_rows(home)) == written - 1, 30, f"{written - 1} rows", proc)

    second = root / "eltd_copy" / source.name  # a new work_dir appears while watching
    second.parent.mkdir()
    shutil.copyfile(source, second)
    with open(log, "ab") as handle:
        handle.writelines(lines[written:])
    total = 2 * (len(lines) - 1)
    wait_until(lambda: len(live_rows(home)) == total, 60, "the new work_dir and the rest of the log", proc)
    stop(proc)

    state = status(home)
    for work_dir in state["work_dirs"]:
        (run,) = work_dir["runs"]
        assert run["rows_pending"] == 0 and run["rows_uploaded"] == len(lines) - 1
        assert_history_matches(offline_run(home, run["wandb_id"]).history, expected_rows(source))


def test_a_fragment_waits_for_its_newline(real_logs, tmp_path, watcher):
    lines = (real_logs / ELTD).read_bytes().splitlines(keepends=True)
    root, home = tmp_path / "work_dirs", tmp_path / "home"
    log = root / "eltd" / "20210427_101754.log.json"
    log.parent.mkdir(parents=True)
    log.write_bytes(b"".join(lines[:3]) + lines[3][:40])  # the 3rd data line is half written
    proc = watcher(home, root)
    wait_until(lambda: len(live_rows(home)) == 2, 60, "the 2 whole rows", proc)
    time.sleep(2)
    assert len(live_rows(home)) == 2, "a line without its newline is not read"
    with open(log, "ab") as handle:
        handle.write(lines[3][40:])
    wait_until(lambda: len(live_rows(home)) == 3, 30, "the completed row", proc)
    stop(proc)
    (work_dir,) = status(home)["work_dirs"]
    assert work_dir["problems"] == 0


def test_sigkill_mid_backfill_then_restart_uploads_every_row_once(real_logs, tmp_path, watcher):
    root, home = tmp_path / "work_dirs", tmp_path / "home"
    sources = [real_logs / YOLO, real_logs / CORNERNET]
    for source in sources:
        (root / source.parent.name).mkdir(parents=True)
        shutil.copyfile(source, root / source.parent.name / source.name)
    expected_total = sum(len(expected_rows(s)) for s in sources)

    proc = watcher(home, root)
    wait_until(lambda: len(live_rows(home)) >= 1500, 120, "the upload to be under way", proc)
    os.killpg(proc.pid, signal.SIGKILL)  # the service and its wandb-core die without a chance to flush
    proc.wait(timeout=30)
    assert len(live_rows(home)) < expected_total, "killed mid-way"

    proc = watcher(home, root, "--segment-idle", "1")
    wait_until(
        lambda: sum(r["rows_uploaded"] for w in status(home)["work_dirs"] for r in w["runs"]) == expected_total,
        240, "every row to be uploaded after the restart", proc,
    )
    stop(proc)

    state = status(home)
    for source in sources:
        entry = next(w for w in state["work_dirs"] if w["path"] == str(root / source.parent.name))
        (run,) = entry["runs"]
        files = offline_run(home, run["wandb_id"])
        assert_history_matches(files.history, expected_rows(source))
        steps = [row["_step"] for row in files.history]
        assert steps == list(range(1, len(steps) + 1)), "every step exactly once, in order, across segments"
        assert all(seg.has_exit for seg in files.segments), "the killed segment was dropped, not kept half-written"


def _uploaded(home: Path) -> dict[str, list[tuple[str, int]]]:
    """work_dir path → its runs as (W&B id, rows uploaded), from `status`."""
    if not (home / "state.db").exists():
        return {}
    return {w["path"]: [(r["wandb_id"], r["rows_uploaded"]) for r in w["runs"]] for w in status(home)["work_dirs"]}


def _rows(home: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(home / "state.db") as db:
        return db.execute(sql).fetchall()


def test_watch_forgets_the_work_dirs_that_were_deleted(real_logs, tmp_path, watcher, wandb_standin):
    """A deleted work_dir is a tombstone for `--forget-after` (one that comes back is not uploaded twice), then
    forgotten once its offline segments are synced: rows and memory both (one that comes back after that is
    new); a restart keeps the clock."""
    source = real_logs / ELTD
    root, home = tmp_path / "work_dirs", tmp_path / "home"
    for name in ("a", "b", "c"):
        (root / name).mkdir(parents=True)
        shutil.copyfile(source, root / name / source.name)
    proc = watcher(home, root, "--segment-idle", "1", "--finish-after", "1", "--forget-after", "3600")
    rows = len(expected_rows(source))
    wait_until(lambda: sum(n for runs in _uploaded(home).values() for _, n in runs) == 3 * rows, 120, "every row uploaded", proc)
    first = _uploaded(home)

    def states(name: str) -> set[str]:
        return {state for (state,) in _rows(home, f"SELECT state FROM sources WHERE path LIKE '%/{name}/%'")}

    (tmp_path / "away").mkdir()
    (root / "b").rename(tmp_path / "away" / "b")  # moved away and back before --forget-after: the same log
    wait_until(lambda: states("b") == {"gone"}, 60, "b seen gone", proc)
    (tmp_path / "away" / "b").rename(root / "b")
    wait_until(lambda: states("b") == {"finished"}, 60, "b read again", proc)
    shutil.rmtree(root / "a")
    shutil.rmtree(root / "b")
    wait_until(lambda: states("a") == states("b") == {"gone"}, 60, "the two deleted logs seen gone", proc)
    output = stop(proc)
    assert "logs gone; following 1 logs in 1 work_dirs (1 read as finished," in output, output  # one scan or two saw them go
    assert _uploaded(home) == first, "b came back and went again: nothing of it uploaded twice, every tombstone kept"
    synced = cli(home, "sync", "--no-progress", **wandb_standin.env(home / "wandb-dirs"))  # unsynced ones are never forgotten
    assert synced.stderr.count(" row(s) sent") == 3, synced.stderr

    proc = watcher(home, root, "--segment-idle", "1", "--finish-after", "1", "--forget-after", "1")
    wait_until(lambda: _rows(home, "SELECT path FROM work_dirs") == [(str(root / "c"),)], 60, "a and b forgotten", proc)
    assert _rows(home, "SELECT count(*) FROM sources") == _rows(home, "SELECT count(*) FROM runs") == [(1,)]
    assert _rows(home, "SELECT count(*) FROM problems WHERE kind = 'gone'") == [(0,)]
    assert _uploaded(home) == {str(root / "c"): first[str(root / "c")]}, "the work_dir still on disk is untouched"
    (root / "a").mkdir()
    shutil.copyfile(source, root / "a" / source.name)  # back after --forget-after: a new work_dir, a new run
    wait_until(lambda: [n for _, n in _uploaded(home).get(str(root / "a"), [])] == [rows], 120, "a uploaded as new", proc)
    output = stop(proc)
    assert "forgot 2 work_dirs deleted from disk" in output, output
    ((new_id, _),) = _uploaded(home)[str(root / "a")]
    assert new_id != first[str(root / "a")][0][0]
    assert_history_matches(offline_run(home, new_id).history, expected_rows(source))

"""The state a running `watch` keeps (DESIGN 13): uploaded rows folded as `backfill` folds them, and a WAL that
is checkpointed back to nothing after the uploads settle, while the service still runs."""
from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

from db.session import WAL_CHECKPOINT_BYTES, WAL_LIMIT_BYTES
from tests.conftest import cli, status, stop, wait_until
from tests.test_watch import CORNERNET, ELTD, YOLO


def _work_dirs(real_logs: Path, root: Path) -> int:
    """Three work_dirs of real logs; returns how many rows they hold."""
    rows = 0
    for name, log in (("eltd", ELTD), ("yolo", YOLO), ("cornernet", CORNERNET)):
        (root / name).mkdir(parents=True)
        shutil.copyfile(real_logs / log, root / name / Path(log).name)
        rows += len((real_logs / log).read_bytes().splitlines()) - 1
    return rows


def _counts(home: Path) -> dict[str, int]:
    """Read-only, through a connection closed at once (it must not hold the service's WAL)."""
    db = sqlite3.connect(f"file:{home / 'state.db'}?mode=ro", uri=True)
    try:
        return {
            "outbox_rows": db.execute("SELECT count(*) FROM outbox_rows").fetchone()[0],
            "folded": db.execute("SELECT coalesce(sum(rows), 0) FROM uploaded_spans").fetchone()[0],
            "size_limit": db.execute("PRAGMA journal_size_limit").fetchone()[0],
        }
    finally:
        db.close()


def _wal_bytes(home: Path) -> int:
    wal = home / "state.db-wal"
    return wal.stat().st_size if wal.exists() else 0


def test_a_running_watch_folds_what_it_uploaded_as_backfill_does_and_truncates_its_wal(real_logs, tmp_path, watcher):
    root = tmp_path / "work_dirs"
    rows = _work_dirs(real_logs, root)
    backfilled = tmp_path / "home-backfill"
    cli(backfilled, "backfill", str(root), "--no-progress")
    left = _counts(backfilled)
    assert left["outbox_rows"] < rows // 10, left  # val rows only: everything else folded

    home = tmp_path / "home-watch"
    proc = watcher(home, root, "--segment-idle", "2", "--finish-after", "3")

    def uploaded() -> bool:
        if not (home / "state.db").exists():
            return False
        runs = [r for w in status(home)["work_dirs"] for r in w["runs"]]
        return len(runs) == 3 and all(r["rows_pending"] == 0 and r["segments_closed"] >= 1 for r in runs)

    wait_until(uploaded, 180, "every row uploaded", proc)
    wait_until(lambda: _counts(home)["outbox_rows"] == left["outbox_rows"], 60, "the uploaded rows folded", proc)
    wait_until(lambda: _wal_bytes(home) <= WAL_CHECKPOINT_BYTES, 60, "the WAL checkpointed after the uploads", proc)
    running = _counts(home)
    assert running["folded"] == left["folded"] and running["folded"] + running["outbox_rows"] >= rows, (running, left)
    assert proc.poll() is None, "watch still runs"
    stop(proc)
    assert _wal_bytes(home) == 0


def test_every_connection_bounds_the_wal(tmp_path):
    """journal_size_limit is per connection: the service's, as `Database` opens them."""
    from db.session import Database, sqlite_url

    db = Database(sqlite_url(tmp_path / "state.db"))
    try:
        db.upgrade()
        with db.engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA journal_size_limit").scalar() == WAL_LIMIT_BYTES
            assert connection.exec_driver_sql("PRAGMA auto_vacuum").scalar() == 2  # incremental
    finally:
        db.dispose()

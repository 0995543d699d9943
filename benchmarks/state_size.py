"""Benchmark: the state's size on disk per uploaded row, in the three shapes a node sees (DESIGN 13).

`--work-dirs` N work_dirs (default 300), each a copy of one of the real `.log.json` logs (taken in turn), are
uploaded (offline W&B, SQLite, a fresh data dir each) by
1. `watch` while it runs: every row uploaded, then `--idle-s` seconds idle (default 60);
2. the same `watch` after it stopped (SIGTERM);
3. `backfill` (the baseline: the shape `benchmarks.scale` reports).
Reported: the bytes of every state file (state.db, -wal, -shm) per uploaded row, each against the target
(<= 64 B/row) and the backfill's figure.

    .venv/bin/python -m benchmarks.state_size                 # 300 work_dirs, 60 s idle
    .venv/bin/python -m benchmarks.state_size --quick         # 6 work_dirs, 5 s idle (CI: that it runs)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.idle import uploaded_watch
from benchmarks.report import exit_cleanly_on_sigterm, row_counts
from benchmarks.scale import TARGET_BYTES_PER_ROW, cli, db_bytes, make_work_dirs


def files(home: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(home.glob("state.db*"))}


def rows_uploaded(home: Path) -> int:
    """Counted through a connection closed before the files are measured: an open one would keep the stopped
    service's close from checkpointing the WAL away."""
    from db.session import Database, sqlite_url

    db = Database(sqlite_url(home / "state.db"))
    try:
        with db.read() as session:
            return row_counts(session)[1]
    finally:
        db.dispose()


def shape(name: str, home: Path) -> dict:
    rows = rows_uploaded(home)
    return {"shape": name, "rows": rows, "files": files(home), "bytes": db_bytes(home), "bytes_per_row": db_bytes(home) / max(rows, 1)}


def bench_watch(root: Path, home: Path, idle_s: float, timeout_s: float) -> list[dict]:
    home.mkdir(parents=True)
    with uploaded_watch(root, home.parent / "watch.log", home, timeout_s):
        time.sleep(idle_s)
        running = shape("watch, running", home)
    return [running, shape("watch, stopped", home)]


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dirs", type=int, default=300)
    p.add_argument("--idle-s", type=float, default=60.0)
    p.add_argument("--timeout-s", type=float, default=1800.0, help="how long watch may take to upload everything")
    p.add_argument("--quick", action="store_true", help="6 work_dirs, 5 s idle (that it runs, not the figure at scale)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    if args.quick:
        args.work_dirs, args.idle_s, args.timeout_s = 6, 5.0, 300.0
    exit_cleanly_on_sigterm()
    tmp = Path(tempfile.mkdtemp(prefix="mmdw-state-size-"))
    try:
        root = tmp / "root"
        make_work_dirs(root, args.work_dirs)
        results = bench_watch(root, tmp / "home-watch", args.idle_s, args.timeout_s)
        cli(tmp / "home-backfill", "backfill", str(root), "--no-progress")
        results.append(shape("backfill", tmp / "home-backfill"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    baseline = results[-1]["bytes_per_row"]
    print(f"state on disk per uploaded row, {args.work_dirs} work_dirs of real logs, {args.idle_s:.0f} s idle before "
          f"the running figure; load {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print(f"{'shape':<16} {'rows':>9} {'bytes':>11} {'B/row':>7} {'vs backfill':>12}  files")
    for r in results:
        detail = ", ".join(f"{name} {size / 1e6:.2f} MB" for name, size in r["files"].items())
        print(f"{r['shape']:<16} {r['rows']:>9,} {r['bytes']:>11,} {r['bytes_per_row']:>7.1f} "
              f"{r['bytes_per_row'] / baseline:>11.2f}x  {detail}")
    passed = all(r["bytes_per_row"] <= TARGET_BYTES_PER_ROW for r in results)
    print(f"target: <= {TARGET_BYTES_PER_ROW} B/row of all state files in every shape; baseline: backfill, "
          f"{baseline:.1f} B/row -> {'PASS' if passed else 'FAIL'}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0 if passed or args.quick else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

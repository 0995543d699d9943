"""Benchmark: the service at scale — backfilling many work_dirs, the state it keeps per row, and `status`.

1. Backfill: `--work-dirs` N work_dirs (default 200), each a copy of one of the real `.log.json` logs (taken in
   turn), backfilled by `mmdet-wandb backfill ROOT --no-progress` (offline W&B, SQLite) in a fresh data dir,
   for each `--jobs` value given (the writer processes; `backfill --jobs` where the CLI has it). Reported: wall
   time, rows/s, and the speed-up against the first value (target: N=2 against N=1 >= 1.6x).
2. State per row: the state DB's size (with its WAL) after the backfill, per uploaded row (target <= 64 bytes).
3. `status` at scale: `--status-work-dirs` work_dirs (default 1,000) and `--status-rows` uploaded rows (default
   10 million) written straight into a state DB by the ORM's bulk insert, with their payloads (the state before
   spans), then folded by the service's own `db.spans.fold_uploaded` (one span a run), the size reported
   before and after; then `mmdet-wandb status --json` timed, median of 3 (target < 1 s), read-only.

    .venv/bin/python -m benchmarks.scale                     # 200 work_dirs, --jobs 1 2; status at 1,000 / 10 M
    .venv/bin/python -m benchmarks.scale --jobs 1 2 4 --work-dirs 500
    .venv/bin/python -m benchmarks.scale --quick             # 10 work_dirs, 20 k rows (CI: that it runs)
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.report import isolated_env, row_counts

REPO = Path(__file__).resolve().parents[1]
REAL_LOGS = Path(os.environ.get("MMDET_WANDB_REAL_LOGS", REPO.parent / "shared" / "real_logs"))
TARGET_SPEEDUP_2 = 1.6
TARGET_BYTES_PER_ROW = 64
TARGET_STATUS_S = 1.0


def cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "mmdet_wandb.cli", *args], env=isolated_env(home), cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"mmdet-wandb {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def has_jobs_option() -> bool:
    return "--jobs" in subprocess.run([sys.executable, "-m", "mmdet_wandb.cli", "backfill", "--help"], cwd=REPO,
                                      capture_output=True, text=True).stdout


def make_work_dirs(root: Path, count: int) -> None:
    logs = sorted(REAL_LOGS.rglob("*.log.json"))
    for index, log in zip(range(count), itertools.cycle(logs)):
        work_dir = root / f"wd{index:05d}"
        work_dir.mkdir(parents=True)
        shutil.copy(log, work_dir / log.name)


def db_bytes(home: Path) -> int:
    return sum(p.stat().st_size for p in home.glob("state.db*"))


def uploaded_rows(home: Path) -> int:
    from db.session import Database, sqlite_url

    with Database(sqlite_url(home / "state.db")).read() as session:
        return row_counts(session)[1]


def bench_backfill(tmp: Path, count: int, jobs: list[int]) -> list[dict]:
    root = tmp / "root"
    make_work_dirs(root, count)
    supported = has_jobs_option()
    results = []
    for n in jobs:
        if n != 1 and not supported:
            results.append({"jobs": n, "skipped": "backfill has no --jobs yet"})
            continue
        home = tmp / f"home-{n}"
        started = time.monotonic()
        cli(home, "backfill", str(root), "--no-progress", *(["--jobs", str(n)] if supported else []))
        seconds = time.monotonic() - started
        rows = uploaded_rows(home)
        results.append({"jobs": n, "seconds": seconds, "rows": rows, "rows_per_s": rows / seconds,
                        "state_bytes": db_bytes(home), "bytes_per_row": db_bytes(home) / max(rows, 1)})
        shutil.rmtree(home / "wandb", ignore_errors=True)
    return results


def synthetic_state(home: Path, work_dirs: int, rows: int) -> tuple[int, int]:
    """A migrated state DB holding `work_dirs` work_dirs, one run and one source each, and `rows` uploaded rows;
    returns its size with every payload, and after the rows are folded as the writer folds them."""
    from sqlalchemy import insert

    from db import spans
    from db.models import OutboxRow, Run, Source, WorkDir
    from db.session import Database, sqlite_url

    home.mkdir(parents=True)
    db = Database(sqlite_url(home / "state.db"), node="bench")
    db.upgrade()
    per_run = max(1, rows // work_dirs)
    with db.transaction() as session:
        for i in range(work_dirs):
            work_dir = WorkDir(node="bench", path=f"/data/wd{i:05d}", root="/data", name=f"wd{i:05d}")
            run = Run(node="bench", work_dir=work_dir, wandb_id=f"r{i:07d}", name=f"wd{i:05d}", group="g", launch="20240101_000000",
                      next_step=per_run + 1, summary_json="{}", hook_options_json="{}")
            session.add_all([work_dir, run])
            session.flush()
            session.add(Source(node="bench", work_dir=work_dir, run_id=run.id, path=f"/data/wd{i:05d}/x.log.json",
                               format="mmdet2-logjson", launch="20240101_000000", parse_state_json="{}"))
    with db.transaction() as session:
        pairs = session.execute(select_runs()).all()
    batch = []
    for run_id, source_id in pairs:
        for step in range(1, per_run + 1):
            batch.append(dict(run_id=run_id, step=step, source_id=source_id, generation=0, byte_offset=step * 300,
                              line_hash=hashlib.blake2b(b"%d" % step, digest_size=16).hexdigest(), kind="train", epoch=1, iter=step,
                              payload_json='{"train/loss": 0.5, "learning_rate": 0.01, "iter": %d}' % step, uploaded=True))
            if len(batch) >= 50_000:
                with db.transaction() as session:
                    session.execute(insert(OutboxRow), batch)
                batch = []
    if batch:
        with db.transaction() as session:
            session.execute(insert(OutboxRow), batch)
    db.dispose()
    before = db_bytes(home)
    for run_id, _ in pairs:
        with db.transaction() as session:
            spans.fold_uploaded(session, run_id)
        db.reclaim_space()
    db.dispose()
    return before, db_bytes(home)


def select_runs():  # type: ignore[no-untyped-def]
    from sqlalchemy import select

    from db.models import Run, Source

    return select(Run.id, Source.id).join(Source, Source.run_id == Run.id)


def bench_status(tmp: Path, work_dirs: int, rows: int) -> dict:
    home = tmp / "status-home"
    started = time.monotonic()
    unfolded, folded = synthetic_state(home, work_dirs, rows)
    built = time.monotonic() - started
    times = []
    for _ in range(3):
        started = time.monotonic()
        cli(home, "status", "--json")
        times.append(time.monotonic() - started)
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", "import mmdet_wandb.cli"], cwd=REPO, check=True)
    startup = time.monotonic() - started
    return {"work_dirs": work_dirs, "rows": rows, "build_s": built, "status_s": statistics.median(times),
            "process_start_s": startup, "unfolded_bytes": unfolded, "state_bytes": folded}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dirs", type=int, default=200)
    p.add_argument("--jobs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--status-work-dirs", type=int, default=1000)
    p.add_argument("--status-rows", type=int, default=10_000_000)
    p.add_argument("--quick", action="store_true", help="10 work_dirs, status over 100 work_dirs and 20 k rows (that it runs)")
    args = p.parse_args(argv)
    if args.quick:
        args.work_dirs, args.status_work_dirs, args.status_rows = 10, 100, 20_000
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        backfills = bench_backfill(Path(tmp), args.work_dirs, args.jobs)
        status_result = bench_status(Path(tmp), args.status_work_dirs, args.status_rows)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"backfill of {args.work_dirs} work_dirs (copies of the real logs), offline, SQLite; load {load}; {os.cpu_count()} CPUs")
    print(f"{'--jobs':>6} {'seconds':>9} {'rows':>9} {'rows/s':>9} {'speed-up':>9} {'state B/row':>12}")
    base = next((r for r in backfills if "seconds" in r), None)
    passed = True
    for r in backfills:
        if "skipped" in r:
            print(f"{r['jobs']:>6}   skipped: {r['skipped']}")
            passed = False
            continue
        speedup = r["rows_per_s"] / base["rows_per_s"] if base else float("nan")
        print(f"{r['jobs']:>6} {r['seconds']:>9.1f} {r['rows']:>9} {r['rows_per_s']:>9.0f} {speedup:>8.2f}x {r['bytes_per_row']:>12.0f}")
        if r["jobs"] == 2:
            passed &= speedup >= TARGET_SPEEDUP_2
        passed &= r["bytes_per_row"] <= TARGET_BYTES_PER_ROW
    print(f"targets: --jobs 2 >= {TARGET_SPEEDUP_2}x of --jobs 1; <= {TARGET_BYTES_PER_ROW} bytes of state per uploaded row")
    s = status_result
    print(f"state of {s['work_dirs']} work_dirs and {s['rows']:,} uploaded rows: {s['unfolded_bytes'] / 1e6:.0f} MB with payloads "
          f"({s['unfolded_bytes'] / s['rows']:.0f} B/row), {s['state_bytes'] / 1e6:.1f} MB folded into spans "
          f"({s['state_bytes'] / s['rows']:.1f} B/row; built in {s['build_s']:.0f} s)")
    print(f"status --json over it: {s['status_s']:.2f} s (median of 3; a bare `import mmdet_wandb.cli` takes "
          f"{s['process_start_s']:.2f} s); target < {TARGET_STATUS_S} s")
    passed &= s["status_s"] < TARGET_STATUS_S and s["state_bytes"] / s["rows"] <= TARGET_BYTES_PER_ROW
    return 0 if args.quick or passed else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Benchmark: the service at scale — backfilling many work_dirs, the state it keeps per row, and `status`.

1. Backfill: `--work-dirs` N work_dirs (default 200), each a copy of one of the real `.log.json` logs (taken in
   turn), backfilled by `mmdet-wandb backfill ROOT --no-progress` (offline W&B, SQLite) in a fresh data dir,
   for each `--jobs` value given (the writer processes; `backfill --jobs` where the CLI has it). Reported: wall
   time, rows/s, the CPU seconds of every process it ran (its cores busy: CPU / wall), and the speed-up against
   the first value (target: N=2 against N=1 >= 1.6x). With `--cores-per-job K`, each `--jobs N` runs on N x K
   CPUs of its own (the affinity of the command, which its share processes, reading processes and wandb-cores
   inherit): how the shares scale with the cores they are given, free of what the machine has beside them.
   The baseline, side by side: the W&B client alone (benchmarks.backfill's ceiling, a plain `run.log` loop with
   the writer's settings) over the rows the first backfill wrote (read back from its `.wandb` files), in N
   processes at once, on the same CPUs: how far the client itself scales on this machine, and ours against it.
2. State per row: the state DB's size (with its WAL) after the backfill, per uploaded row (target <= 64 bytes).
3. `status` at scale: `--status-work-dirs` work_dirs (default 1,000) and `--status-rows` uploaded rows (default
   10 million) written straight into a state DB by the ORM's bulk insert, with their payloads (the state before
   spans), then folded by the service's own `db.spans.fold_uploaded` (one span a run), the size reported
   before and after; then `mmdet-wandb status --json` timed, median of 3 (target < 1 s), read-only.

    .venv/bin/python -m benchmarks.scale                     # 200 work_dirs, --jobs 1 2; status at 1,000 / 10 M
    .venv/bin/python -m benchmarks.scale --jobs 1 2 4 --work-dirs 500
    .venv/bin/python -m benchmarks.scale --jobs 1 2 --cores-per-job 1   # N shares on N cores
    .venv/bin/python -m benchmarks.scale --quick             # 10 work_dirs, 20 k rows (CI: that it runs)
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from benchmarks.report import children_cpu_seconds, isolated_env, row_counts

REPO = Path(__file__).resolve().parents[1]
REAL_LOGS = Path(os.environ.get("MMDET_WANDB_REAL_LOGS", REPO.parent / "shared" / "real_logs"))
TARGET_SPEEDUP_2 = 1.6
TARGET_BYTES_PER_ROW = 64
TARGET_STATUS_S = 1.0


def cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`mmdet-wandb ARGS` with `home` as its data dir."""
    proc = subprocess.run([sys.executable, "-m", "mmdet_wandb.cli", *args], env=isolated_env(home), cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"mmdet-wandb {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


@contextlib.contextmanager
def pinned_to(cpus: list[int] | None) -> Iterator[None]:
    """The processes started within run on `cpus` only (they inherit this process's affinity), all CPUs when None."""
    everything = os.sched_getaffinity(0)
    if cpus:
        os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, everything)


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


def bench_backfill(tmp: Path, count: int, jobs: list[int], cores_per_job: int | None) -> list[dict]:
    """Each `--jobs` value: the backfill's wall time, CPU and state, then the W&B client alone over the rows it
    wrote (the first backfill's), split the same way."""
    root = tmp / "root"
    make_work_dirs(root, count)
    supported = has_jobs_option()
    cpus = sorted(os.sched_getaffinity(0))
    results: list[dict] = []
    runs: dict[Path, dict] = {}
    for n in jobs:
        if n != 1 and not supported:
            results.append({"jobs": n, "skipped": "backfill has no --jobs yet"})
            continue
        pinned = cpus[:n * cores_per_job] if cores_per_job else None
        if pinned is not None and len(pinned) < n * cores_per_job:
            results.append({"jobs": n, "skipped": f"{n * cores_per_job} CPUs asked, {len(cpus)} here"})
            continue
        home = tmp / f"home-{n}"
        with pinned_to(pinned):  # the backfill and its baseline on the same CPUs
            cpu_before, started = children_cpu_seconds(), time.monotonic()
            cli(home, "backfill", str(root), "--no-progress", *(["--jobs", str(n)] if supported else []))
            seconds, cpu = time.monotonic() - started, children_cpu_seconds() - cpu_before
            runs = runs or written_runs(home / "wandb")
            ceiling = bench_ceiling(tmp / f"ceiling-{n}", runs, n)
        rows = uploaded_rows(home)
        results.append({"jobs": n, "cpus": len(pinned or cpus), "seconds": seconds, "cpu_s": cpu, "rows": rows,
                        "rows_per_s": rows / seconds, "state_bytes": db_bytes(home), "bytes_per_row": db_bytes(home) / max(rows, 1),
                        "ceiling": ceiling})
        shutil.rmtree(home / "wandb", ignore_errors=True)
    return results


def written_runs(wandb_dir: Path) -> dict[Path, dict]:
    """Each `.wandb` file a backfill wrote → its run as benchmarks.backfill's ceiling logs it (name, group, job
    type, and its rows: step and payload, without the keys W&B adds)."""
    from uploader.wandb.reader import find_run_files, read_run

    runs = {}
    for path in find_run_files(wandb_dir):
        run = read_run(path)
        rows = [[row["_step"], json.dumps({k: v for k, v in row.items() if not k.startswith("_")})] for row in run.history]
        runs[path] = {"name": run.display_name, "group": run.group, "job_type": run.job_type, "rows": rows}
    return runs


def bench_ceiling(tmp: Path, runs: dict[Path, dict], n: int) -> dict:
    """The baseline of `--jobs N`: the same runs and rows in N shares (by `uploader.shards.split`, of rows here, of
    unread bytes in the backfill), logged by N processes at once, each the plain `run.log` loop of
    benchmarks.backfill (its ceiling: the W&B client alone, with the writer's settings, read back after). Timed
    from the start of the first process to the end of the last, interpreter start and imports included (as the
    backfill's)."""
    from benchmarks.backfill import run_child
    from uploader.shards import split

    specs = []
    for index, share in enumerate(split({path: len(run["rows"]) for path, run in runs.items()}, n)):
        work = tmp / f"share-{index}"
        work.mkdir(parents=True)
        rows_in = work / "rows.json"
        rows_in.write_text(json.dumps([runs[path] for path in sorted(share)]), encoding="utf-8")
        specs.append((work, {"home": str(work / "home"), "rows_in": str(rows_in), "exit_timeout_s": 120}))
    failures: list[Exception] = []

    def log_share(work: Path, spec: dict) -> None:
        try:
            run_child("ceiling", spec, work, timeout=3600)
        except Exception as exc:  # noqa: BLE001 - reported by the caller, once every process has ended
            failures.append(exc)

    threads = [threading.Thread(target=log_share, args=spec) for spec in specs]
    cpu_before, started = children_cpu_seconds(), time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds, cpu = time.monotonic() - started, children_cpu_seconds() - cpu_before
    shutil.rmtree(tmp, ignore_errors=True)
    if failures:
        raise RuntimeError(f"ceiling with {n} processes failed: {failures[0]}") from failures[0]
    rows = sum(len(run["rows"]) for run in runs.values())
    return {"seconds": seconds, "cpu_s": cpu, "rows": rows, "rows_per_s": rows / seconds}


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
    p.add_argument("--cores-per-job", type=int, metavar="K", help="run each --jobs N on N x K CPUs of its own (default: all CPUs)")
    p.add_argument("--status-work-dirs", type=int, default=1000)
    p.add_argument("--status-rows", type=int, default=10_000_000)
    p.add_argument("--quick", action="store_true", help="10 work_dirs, status over 100 work_dirs and 20 k rows (that it runs)")
    args = p.parse_args(argv)
    if args.quick:
        args.work_dirs, args.status_work_dirs, args.status_rows = 10, 100, 20_000
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        backfills = bench_backfill(Path(tmp), args.work_dirs, args.jobs, args.cores_per_job)
        status_result = bench_status(Path(tmp), args.status_work_dirs, args.status_rows)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"backfill of {args.work_dirs} work_dirs (copies of the real logs), offline, SQLite; load {load}; {os.cpu_count()} CPUs")
    print(f"{'--jobs':>6} {'CPUs':>5} {'seconds':>9} {'CPU s':>7} {'busy':>5} {'rows':>9} {'rows/s':>9} {'speed-up':>9} {'state B/row':>12}")
    measured = [r for r in backfills if "seconds" in r]
    base = measured[0] if measured else None
    passed = True
    for r in backfills:
        if "skipped" in r:
            print(f"{r['jobs']:>6}   skipped: {r['skipped']}")
            passed = False
            continue
        speedup = r["rows_per_s"] / base["rows_per_s"] if base else float("nan")
        print(f"{r['jobs']:>6} {r['cpus']:>5} {r['seconds']:>9.1f} {r['cpu_s']:>7.1f} {r['cpu_s'] / r['seconds']:>5.2f} {r['rows']:>9} "
              f"{r['rows_per_s']:>9.0f} {speedup:>8.2f}x {r['bytes_per_row']:>12.0f}")
        if r["jobs"] == 2:
            passed &= speedup >= TARGET_SPEEDUP_2
        passed &= r["bytes_per_row"] <= TARGET_BYTES_PER_ROW
    print("baseline: the W&B client alone over the same rows (benchmarks.backfill's ceiling, a plain run.log loop), in as many "
          "processes, on the same CPUs")
    print(f"{'procs':>6} {'CPUs':>5} {'seconds':>9} {'CPU s':>7} {'busy':>5} {'rows':>9} {'rows/s':>9} {'speed-up':>9} {'ours/alone':>12}")
    for r in measured:
        c = r["ceiling"]
        speedup = c["rows_per_s"] / base["ceiling"]["rows_per_s"]
        print(f"{r['jobs']:>6} {r['cpus']:>5} {c['seconds']:>9.1f} {c['cpu_s']:>7.1f} {c['cpu_s'] / c['seconds']:>5.2f} {c['rows']:>9} "
              f"{c['rows_per_s']:>9.0f} {speedup:>8.2f}x {c['seconds'] / r['seconds']:>11.2f}x")
    given = f" ({args.cores_per_job} CPU(s) per share)" if args.cores_per_job else ""
    print(f"targets: --jobs 2 >= {TARGET_SPEEDUP_2}x of --jobs 1{given}; <= {TARGET_BYTES_PER_ROW} bytes of state per uploaded row")
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

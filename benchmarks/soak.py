"""Benchmark: months of churn in minutes — whether `watch` keeps its memory and its state flat (DESIGN 13).

A real `mmdet-wandb watch --poll` (online, to the loopback stand-in of W&B's API in tests/; SQLite) follows one
root while `--waves` waves of `--work-dirs`
work_dirs each are created, trained into (the first lines of a real 2.x `.log.json` from ../shared/real_logs,
then the rest appended a moment later), uploaded, and deleted. The watch runs with `--forget-after` (1 s here;
`--forget-after 0` leaves the option out, and the service's default of 7 days keeps every tombstone through the
soak). After each wave is deleted and forgotten (without the option: seen gone), the watch process's RSS (VmRSS
of the process itself: what the loop remembers; wandb-core comes and goes) and the state on disk (state.db, -wal,
-shm) are sampled, with the rows the state DB still holds of logs that no longer exist. Reported as flatness
against the named baseline, the figures after the first wave: RSS at the end / RSS after wave 1 (target <= 1.25),
and state bytes at the end / after wave 1 (target <= 1.25: the rows of deleted work_dirs must not pile up).
Online, because a work_dir is forgotten only once W&B has all of it: an air-gapped node keeps the tombstones of
its offline runs until `mmdet-wandb sync` has confirmed them (docs/failure-modes.md).

    .venv/bin/python -m benchmarks.soak                  # 20 waves of 100 work_dirs (2,000 created and deleted)
    .venv/bin/python -m benchmarks.soak --quick          # 4 waves of 8 (CI: that it runs, ~1-2 min)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.idle import REAL_LOGS, rss_mb, terminate
from benchmarks.report import exit_cleanly_on_sigterm, isolated_env
from benchmarks.scale import db_bytes
from tests.wandb_standin import WandbStandin
from uploader.loop import SCAN_MAX_INTERVAL_S

REPO = Path(__file__).resolve().parents[1]
LOG = "JJho1314__my_mmdet/work_dirs/fcos_center_r50_caffe_fpn_gn-head_1x_coco/20230302_173201.log.json"
LINES = 60  # a header and train/val lines: a short training, so that a wave is uploaded in seconds
TARGET_RATIO = 1.25


def real_lines() -> list[bytes]:
    with (REAL_LOGS / LOG).open("rb") as f:
        return [line for _, line in zip(range(LINES), f)]


def state(home: Path) -> dict[str, int]:
    """What the state DB holds, read through a connection closed at once (an open reader keeps the WAL)."""
    db = sqlite3.connect(f"file:{home / 'state.db'}?mode=ro", uri=True, timeout=30)
    try:
        one = lambda sql: db.execute(sql).fetchone()[0]  # noqa: E731
        return {
            "pending": one("select count(*) from outbox_rows where uploaded = 0"),
            "open_segments": one("select count(*) from segments where state = 'open'"),
            "sources": one("select count(*) from sources"),
            "gone": one("select count(*) from sources where state = 'gone'"),
            "runs": one("select count(*) from runs"),
            "work_dirs": one("select count(*) from work_dirs"),
            "problems": one("select count(*) from problems"),
        }
    finally:
        db.close()


def wait_for(what: str, check, timeout_s: float) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"soak: {what} not within {timeout_s:.0f} s")
        time.sleep(0.5)


def wave(root: Path, home: Path, index: int, count: int, lines: list[bytes], timeout_s: float) -> None:
    """Create `count` work_dirs, train into them in two bursts, wait until all is uploaded, then delete them."""
    dirs = [root / f"w{index:04d}-{i:04d}" for i in range(count)]
    half = len(lines) // 2
    for d in dirs:
        d.mkdir(parents=True)
        (d / Path(LOG).name).write_bytes(b"".join(lines[:half]))
    time.sleep(1.0)
    for d in dirs:
        with (d / Path(LOG).name).open("ab") as f:
            f.write(b"".join(lines[half:]))

    def uploaded() -> bool:
        s = state(home) if (home / "state.db").exists() else None
        return s is not None and s["sources"] - s["gone"] >= count and s["pending"] == 0 and s["open_segments"] == 0

    wait_for(f"wave {index + 1} uploaded", uploaded, timeout_s)
    for d in dirs:
        shutil.rmtree(d)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--waves", type=int, default=20)
    p.add_argument("--work-dirs", type=int, default=100, help="work_dirs per wave")
    p.add_argument("--quick", action="store_true", help="4 waves of 8 work_dirs (that it runs, not months)")
    p.add_argument("--forget-after", type=float, default=1.0, help="the watch's --forget-after; 0: the default (7 days)")
    p.add_argument("--json", type=Path, help="also write the samples here")
    args = p.parse_args(argv)
    if args.quick:
        args.waves, args.work_dirs = 4, 8
    exit_cleanly_on_sigterm()
    lines = real_lines()
    tmp = Path(tempfile.mkdtemp(prefix="mmdw-soak-"))
    root, home = tmp / "root", tmp / "home"
    root.mkdir()
    command = [sys.executable, "-m", "mmdet_wandb.cli", "watch", str(root), "--poll", "--scan-interval", "1",
               "--poll-interval", "0.2", "--segment-idle", "1", "--finish-after", "2", "--log-level", "WARNING"]
    if args.forget_after > 0:
        command += ["--forget-after", str(args.forget_after)]
    samples: list[dict] = []
    with (tmp / "watch.log").open("wb") as log, WandbStandin() as standin:
        env = {**isolated_env(home), **standin.env(home)}
        watch = subprocess.Popen(command, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            started = time.monotonic()
            for index in range(args.waves):
                created = index * args.work_dirs
                wave(root, home, index, args.work_dirs, lines, timeout_s=120 + 2.0 * args.work_dirs)
                total = created + args.work_dirs
                if args.forget_after > 0:
                    wait_for(f"wave {index + 1} forgotten", lambda: watch.poll() is None and state(home)["work_dirs"] == 0,
                             60 + args.forget_after + 2 * SCAN_MAX_INTERVAL_S)  # a scan sees them go, a later one forgets
                else:
                    wait_for(f"wave {index + 1} seen gone", lambda total=total: watch.poll() is None and state(home)["gone"] >= total, 60)
                s = state(home)
                samples.append({"wave": index + 1, "created": created + args.work_dirs, "elapsed_s": time.monotonic() - started,
                                "rss_mb": rss_mb([watch.pid]), "state_bytes": db_bytes(home), **s})
        finally:
            terminate(watch)
            shutil.rmtree(tmp, ignore_errors=True)
    first, last = samples[0], samples[-1]
    rss_ratio, state_ratio = last["rss_mb"] / first["rss_mb"], last["state_bytes"] / first["state_bytes"]
    print(f"soak: {args.waves} waves of {args.work_dirs} work_dirs ({LINES} real log lines each) created, uploaded, "
          f"deleted under one `watch --poll --forget-after {args.forget_after or 'never'}`; load {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print(f"{'wave':>5} {'created':>8} {'s':>6} {'RSS MB':>7} {'state KB':>9} {'sources':>8} {'runs':>6} {'work_dirs':>9} {'problems':>8}")
    for s in samples:
        print(f"{s['wave']:>5} {s['created']:>8} {s['elapsed_s']:>6.0f} {s['rss_mb']:>7.1f} {s['state_bytes'] / 1024:>9.0f} "
              f"{s['sources']:>8} {s['runs']:>6} {s['work_dirs']:>9} {s['problems']:>8}")
    rss_ok, state_ok = rss_ratio <= TARGET_RATIO, state_ratio <= TARGET_RATIO
    print(f"baseline: after wave 1. RSS end/baseline {rss_ratio:.2f} ({'PASS' if rss_ok else 'FAIL'}), state bytes "
          f"end/baseline {state_ratio:.2f} ({'PASS' if state_ok else 'FAIL'}); targets <= {TARGET_RATIO}; rows of deleted "
          f"logs still held: {last['sources']} sources, {last['runs']} runs (0 live work_dirs)")
    if args.json:
        args.json.write_text(json.dumps(samples, indent=2))
    return 0 if args.quick or (rss_ok and state_ok) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

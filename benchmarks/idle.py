"""Benchmark: what `watch` costs while nothing happens — CPU % of one core and RSS over N idle work_dirs.

Set-up: N work_dirs, each holding a copy of one small real log (`winycg__detection/.../20210812_190636.log.json`,
a header and one train line), followed by a real `mmdet-wandb watch` (offline W&B, SQLite) until every row is
uploaded and every segment closed, and `--settle-s` seconds more (idle: no work_dir active any more, wandb-core let
go). Then nothing changes, and the CPU time (user + system, from /proc, of the
watch process and its children: wandb-core included) and the RSS (summed over the same processes) are measured
over `--windows` windows of `--window-s` seconds. Side by side: the same work_dirs followed with filesystem
events (the default) and with `--poll` (NFS/FUSE: no events). Targets, with events, for 1,000 work_dirs:
< 0.5 % of one core and < 150 MB RSS.

    .venv/bin/python -m benchmarks.idle                      # 100 and 1,000 work_dirs, two 60 s windows
    .venv/bin/python -m benchmarks.idle --work-dirs 1000 --windows 1
    .venv/bin/python -m benchmarks.idle --logs real --work-dirs 300 --modes events   # uploaded real logs (target < 0.5 %)
    .venv/bin/python -m benchmarks.idle --quick              # 20 work_dirs, one 5 s window (CI: that it runs)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from benchmarks.report import isolated_env
from benchmarks.scale import make_work_dirs

REPO = Path(__file__).resolve().parents[1]
REAL_LOGS = Path(os.environ.get("MMDET_WANDB_REAL_LOGS", REPO.parent / "shared" / "real_logs"))
SMALL_LOG = "winycg__detection/work_dirs/faster_rcnn_r50_fpn_1x_coco/20210812_190636.log.json"
TARGET_CPU_PERCENT = 0.5
TARGET_RSS_MB = 150
TICKS = os.sysconf("SC_CLK_TCK")


def tree(pid: int) -> list[int]:
    """The process and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        current = stack.pop()
        found.append(current)
        stack.extend(children.get(current, []))
    return found


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICKS


def rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def settled(home: Path) -> bool:
    proc = subprocess.run([sys.executable, "-m", "mmdet_wandb.cli", "status", "--json"], env=isolated_env(home), cwd=REPO,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return False
    runs = [r for w in json.loads(proc.stdout)["work_dirs"] for r in w["runs"]]
    return bool(runs) and all(r["rows_pending"] == 0 and r["segments_closed"] >= 1 for r in runs)


@contextlib.contextmanager
def uploaded_watch(root: Path, log_path: Path, home: Path, timeout_s: float, extra: tuple[str, ...] = ()) -> Iterator[tuple[subprocess.Popen, float]]:
    """A real `watch` of `root`, once it uploaded everything (the process, the seconds that took); SIGTERM at the end
    (SIGKILL after 120 s)."""
    command = [sys.executable, "-m", "mmdet_wandb.cli", "watch", str(root), "--segment-idle", "2", "--finish-after", "5",
               "--log-level", "WARNING", *extra]
    with log_path.open("wb") as log:
        watch = subprocess.Popen(command, env=isolated_env(home), cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            started = time.monotonic()
            while not settled(home):
                if watch.poll() is not None or time.monotonic() - started > timeout_s:
                    raise RuntimeError(f"watch did not upload everything within {timeout_s:.0f} s (exit {watch.poll()})")
                time.sleep(2)
            yield watch, time.monotonic() - started
        finally:
            terminate(watch)


def terminate(watch: subprocess.Popen) -> None:
    """SIGTERM to the service's process group (it closes its segments), SIGKILL after 120 s."""
    os.killpg(watch.pid, signal.SIGTERM)
    try:
        watch.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(watch.pid, signal.SIGKILL)
        watch.wait()


def measure(root: Path, home: Path, poll: bool, windows: int, window_s: float, setup_timeout: float, settle_s: float) -> dict:
    log_path = home.parent / f"watch-{'poll' if poll else 'events'}.log"
    with uploaded_watch(root, log_path, home, setup_timeout, ("--poll",) if poll else ()) as (watch, setup_s):
        time.sleep(settle_s)  # idle: no work_dir active any more, wandb-core let go (uploader/loop.py, writer.py)
        results = []
        for _ in range(windows):
            pids = tree(watch.pid)
            before, t0 = cpu_seconds(pids), time.monotonic()
            time.sleep(window_s)
            pids = tree(watch.pid)
            used, elapsed = cpu_seconds(pids) - before, time.monotonic() - t0
            results.append({"cpu_percent": 100 * used / elapsed, "rss_mb": rss_mb(pids), "processes": len(pids)})
        return {"mode": "poll" if poll else "events", "setup_s": setup_s, "windows": results}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dirs", type=int, nargs="+", default=[100, 1000])
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--window-s", type=float, default=60.0)
    p.add_argument("--modes", default="events,poll", help="comma list of: events, poll")
    p.add_argument("--settle-s", type=float, default=75.0,
                   help="seconds after everything is uploaded before measuring (the loop's ACTIVE_S and the writer's CLIENT_IDLE_S are 60)")
    p.add_argument("--logs", choices=("small", "real"), default="small",
                   help="small: one small log in every work_dir; real: the real logs taken in turn (the uploaded deployment "
                        "shape: 300 of them hold about 120,000 rows)")
    p.add_argument("--quick", action="store_true", help="20 work_dirs, one 5 s window per mode (that it runs, not how fast)")
    args = p.parse_args(argv)
    if args.quick:
        args.work_dirs, args.windows, args.window_s, args.settle_s = [20], 1, 5.0, 3.0
    source = REAL_LOGS / SMALL_LOG
    logs = SMALL_LOG if args.logs == "small" else "the real logs in turn"
    print(f"watch over idle work_dirs (one log each: {logs}); CPU of watch + its children; load "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'work_dirs':>9} {'mode':>7} {'set-up s':>9} {'CPU % of a core':>16} {'RSS MB':>8}   targets (events, 1,000): "
          f"< {TARGET_CPU_PERCENT} %, < {TARGET_RSS_MB} MB")
    passed = True
    for count in args.work_dirs:
        for mode in args.modes.split(","):
            with tempfile.TemporaryDirectory(prefix="bench-idle-") as tmp:
                root, home = Path(tmp) / "root", Path(tmp) / "home"
                if args.logs == "real":
                    make_work_dirs(root, count)
                for i in range(count if args.logs == "small" else 0):
                    (root / f"wd{i:05d}").mkdir(parents=True)
                    shutil.copy(source, root / f"wd{i:05d}" / source.name)
                result = measure(root, home, mode == "poll", args.windows, args.window_s,
                                 setup_timeout=60 + count * (2.0 if args.logs == "small" else 6.0),
                                 settle_s=args.settle_s)
            cpu = max(w["cpu_percent"] for w in result["windows"])
            rss = max(w["rss_mb"] for w in result["windows"])
            print(f"{count:>9} {mode:>7} {result['setup_s']:>9.0f} {cpu:>16.2f} {rss:>8.0f}   "
                  + " ".join(f"[{w['cpu_percent']:.2f} %, {w['rss_mb']:.0f} MB]" for w in result["windows"]))
            if mode == "events" and count >= (1000 if args.logs == "small" else 300):
                passed &= cpu < TARGET_CPU_PERCENT and rss < TARGET_RSS_MB
    return 0 if args.quick or passed else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

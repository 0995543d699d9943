"""Benchmark: what the metrics endpoint adds to an idle `watch` — CPU % of one core while Prometheus scrapes it.

Set-up as benchmarks/idle.py (N idle work_dirs, each a copy of one small real log, a real `watch --metrics-port`
until everything is uploaded, `--settle-s` more). Then one window of `--window-s` seconds with no scrape and one
with a scrape every `--scrape-interval-s` seconds (Prometheus' usual 15 s); the endpoint's cost is the difference of
the two windows' CPU (watch and its children), noisy on a loaded machine; then `--burst` scrapes back to back give
the CPU of one scrape, and what it costs at one scrape per `--scrape-interval-s` (the figure the exit status
judges). Target for 1,000 work_dirs: < 0.1 % of one core; the wall time of a scrape is shown beside it.

    .venv/bin/python -m benchmarks.metrics                   # 1,000 work_dirs, two 120 s windows
    .venv/bin/python -m benchmarks.metrics --work-dirs 100 --window-s 60
    .venv/bin/python -m benchmarks.metrics --quick           # 20 work_dirs, 10 s windows, 1 s scrapes (that it runs)
    .venv/bin/python -m benchmarks.metrics --work-dir-labels 100   # with rows per work_dir for 100 of them
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from benchmarks.idle import REAL_LOGS, SMALL_LOG, cpu_seconds, tree, uploaded_watch

TARGET_CPU_PERCENT = 0.1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def window(pid: int, seconds: float, scrape_every_s: float | None, port: int) -> tuple[float, list[float]]:
    """CPU % of a core over the window, and the wall seconds of each scrape in it."""
    pids = tree(pid)
    before, start = cpu_seconds(pids), time.monotonic()
    scrapes: list[float] = []
    while (left := start + seconds - time.monotonic()) > 0:
        if scrape_every_s is None:
            time.sleep(left)
            break
        t0 = time.monotonic()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
            response.read()
        scrapes.append(time.monotonic() - t0)
        time.sleep(max(0.0, min(scrape_every_s - scrapes[-1], start + seconds - time.monotonic())))
    used = cpu_seconds(tree(pid)) - before
    return 100 * used / (time.monotonic() - start), scrapes


def burst(pid: int, count: int, port: int) -> float:
    """CPU seconds of the watch (and its children) per scrape, over `count` scrapes back to back: the cost of one
    scrape apart from the idle loop's noise, which the windows' difference carries on a loaded machine."""
    pids = tree(pid)
    before = cpu_seconds(pids)
    for _ in range(count):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
            response.read()
    return (cpu_seconds(tree(pid)) - before) / count


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dirs", type=int, default=1000)
    p.add_argument("--window-s", type=float, default=120.0)
    p.add_argument("--scrape-interval-s", type=float, default=15.0)
    p.add_argument("--settle-s", type=float, default=75.0, help="as benchmarks/idle.py: idle after everything is uploaded")
    p.add_argument("--work-dir-labels", type=int, default=0, help="watch --metrics-work-dir-labels (default 0: totals only)")
    p.add_argument("--burst", type=int, default=200, help="scrapes back to back after the windows, for the CPU of one")
    p.add_argument("--quick", action="store_true", help="20 work_dirs, 10 s windows, a scrape a second (that it runs, not how fast)")
    args = p.parse_args(argv)
    if args.quick:
        args.work_dirs, args.window_s, args.scrape_interval_s, args.settle_s, args.burst = 20, 10.0, 1.0, 3.0, 20
    source = REAL_LOGS / SMALL_LOG
    print(f"watch --metrics-port --metrics-work-dir-labels {args.work_dir_labels} over {args.work_dirs} idle work_dirs; "
          f"load {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory(prefix="bench-metrics-") as tmp:
        root, home, port = Path(tmp) / "root", Path(tmp) / "home", free_port()
        for i in range(args.work_dirs):
            (root / f"wd{i:05d}").mkdir(parents=True)
            shutil.copy(source, root / f"wd{i:05d}" / source.name)
        extra = ("--metrics-port", str(port), "--metrics-work-dir-labels", str(args.work_dir_labels))
        with uploaded_watch(root, Path(tmp) / "watch.log", home, 60 + args.work_dirs * 2.0, extra) as (watch, _):
            time.sleep(args.settle_s)
            quiet, _ = window(watch.pid, args.window_s, None, port)
            scraped, scrapes = window(watch.pid, args.window_s, args.scrape_interval_s, port)
            per_scrape = burst(watch.pid, args.burst, port)
    added = scraped - quiet
    print(f"CPU % of a core: {quiet:.3f} unscraped, {scraped:.3f} scraped every {args.scrape_interval_s:g} s: "
          f"the endpoint adds {added:.3f} (target < {TARGET_CPU_PERCENT}); {len(scrapes)} scrapes, "
          f"median {1000 * statistics.median(scrapes):.1f} ms, max {1000 * max(scrapes):.1f} ms")
    implied = 100 * per_scrape / args.scrape_interval_s
    print(f"one scrape ({args.burst} back to back): {1000 * per_scrape:.2f} ms of CPU, {implied:.4f} % of a core at one scrape "
          f"per {args.scrape_interval_s:g} s; load {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0 if args.quick or implied < TARGET_CPU_PERCENT else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""`backfill --jobs N` (and `watch` catching up a backlog): the work_dirs are split into N shares, each read and
uploaded by a writer process of its own (one wandb-core each: the W&B client is what bounds a backfill, at about
one core per process). For `watch` this also keeps the burst out of the long-lived process: the memory that
reading and uploading a thousand runs leaves behind goes back to the system with the share processes.

A run belongs to one work_dir, so disjoint shares of work_dirs mean disjoint runs: every W&B run still has one
writer (DESIGN 1). The processes share the state DB (SQLite queues their write transactions). They read logs and
upload rows only; the parent recovers what an earlier process left before they start, and after they end runs
its ordinary pass (backfill's, or watch's loop), which settles checkpoints and artifacts and uploads whatever a
share left.

A share process dies with its parent (Linux: PR_SET_PDEATHSIG), so that a SIGKILLed backfill leaves no writer
behind for the next one to race with; SIGTERM/SIGINT stop it cleanly, as they stop the parent.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from common.parent import die_with_parent
from db.offsets import backlog
from db.session import Database

if TYPE_CHECKING:
    from uploader.loop import Loop, LoopOptions
    from uploader.wandb.writer import WriterOptions

log = logging.getLogger("mmdet_wandb.service")

MAX_DEFAULT_JOBS = 8  # past this, the state DB's single writer lock (SQLite) gains little
WATCH_CATCH_UP_MIN = 16  # work_dirs with unread lines at start before `watch` catches up in share processes


CORES_PER_JOB = 2  # a share keeps ~1.5 cores busy (its uploads, its wandb-core, its reader); training jobs want the rest


def default_jobs() -> int:
    """Half the cores (at most 8): a share per core measured 0.90–1.18× a share per two cores (README, issue 14's
    figures), and the node's training jobs want cores too."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores // CORES_PER_JOB, MAX_DEFAULT_JOBS))


def split(behind: dict[Path, int], jobs: int) -> list[frozenset[Path]]:
    """The work_dirs (→ their unread bytes) in at most `jobs` shares of about equal bytes (the largest work_dir
    first, onto the lightest share)."""
    shares: list[tuple[int, list[Path]]] = [(0, []) for _ in range(min(jobs, len(behind)))]
    for work_dir, size in sorted(behind.items(), key=lambda item: (-item[1], str(item[0]))):
        lightest = min(range(len(shares)), key=lambda i: shares[i][0])
        total, members = shares[lightest]
        shares[lightest] = (total + size, [*members, work_dir])
    return [frozenset(members) for _, members in shares]


@dataclass(frozen=True)
class ShareTask:
    """Everything a share process needs, resolved by the parent (options, layers, zone): it parses no flags."""

    db_url: str
    node: str
    writer: WriterOptions  # with `share` set
    loop: LoopOptions  # with `share` set and no checkpoints
    setup_logging: Callable[[], None]  # the service's own (a module-level function or a partial of one: pickled)


def read_and_upload_in_shares(
    loop: Loop, jobs: int, stop: threading.Event, setup_logging: Callable[[], None], *, min_work_dirs: int = 2,
    on_tick: Callable[[], None] | None = None,
) -> int:
    """Read and upload the loop's work_dirs that have unread bytes in `jobs` processes, when there are at least
    `min_work_dirs` of them; returns how many processes ran (0: none, the loop's own pass does it all).
    `on_tick` is called while they run (the service's heartbeat)."""
    if jobs < 2:
        return 0
    behind = backlog(loop.db, loop.scan())
    shares = split(behind, jobs) if len(behind) >= min_work_dirs else []
    if len(shares) < 2:
        return 0
    loop.writer.recover()  # what an earlier process left, before any share writes
    tasks = [
        ShareTask(loop.db.url, loop.db.node, replace(loop.writer.options, share=share),
                  replace(loop.options, share=share, checkpoints=None), setup_logging)
        for share in shares
    ]
    log.info("reading and uploading %d work_dirs in %d processes", sum(map(len, shares)), len(tasks))
    codes = run_shares(tasks, stop, on_tick)
    failed = [code for code in codes if code not in (0, 143)]
    if failed:
        log.warning("%d of %d share processes failed (exit codes %s); this process uploads what they left",
                    len(failed), len(codes), failed)
    return len(tasks)


def run_shares(tasks: list[ShareTask], stop: threading.Event, on_tick: Callable[[], None] | None = None) -> list[int | None]:
    """Start one process per share and wait for all of them; `stop` is passed on as SIGTERM. Returns their
    exit codes."""
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_run_share, args=(task, os.getpid()), name=f"backfill-share-{i}") for i, task in enumerate(tasks)]
    for process in processes:
        process.start()
    stopping = False
    while alive := [p for p in processes if p.is_alive()]:
        if stop.is_set() and not stopping:
            stopping = True
            for process in alive:
                process.terminate()  # SIGTERM: the share closes its segments and exits
        if on_tick is not None:
            on_tick()
        alive[0].join(0.2)
    return [p.exitcode for p in processes]


def _run_share(task: ShareTask, parent_pid: int) -> None:
    die_with_parent(parent_pid)
    from common import crash_points
    from uploader.loop import Loop
    from uploader.wandb.writer import WandbWriter

    task.setup_logging()
    crash_points.kill_with(parent_pid)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    db = Database(task.db_url, node=task.node)
    Loop(db, WandbWriter(db, task.writer), task.loop).backfill(stop=stop)
    sys.exit(143 if stop.is_set() else 0)

"""Backfill's reading of the logs, beside its uploading: in a forked child process where that is safe, else in a
thread.

Why a process: the W&B client's `run.log` is a thread round trip per row (its asyncio thread sends the record).
A reading thread in the uploading process holds the GIL against both threads, so that each round trip can wait a
switch interval, and its parsing takes CPU from the one core that the uploading process can use. A forked child
reads on another core, and it starts at once (a spawned one would import everything again first).

A fork is safe here because it happens before this process has any other thread (wandb-core is started after
it): the child holds a copy of memory and nothing else. It drops the copied DB connections without closing them
(`engine.dispose(close=False)`, SQLAlchemy's rule for a fork) and opens its own; it never touches W&B.

Failure paths. The child commits each chunk together with its offset, as ingest always does, so a child that
dies (killed, out of memory) loses nothing: the parent reads what is left itself, in a thread. The child dies
with its parent (PR_SET_PDEATHSIG), so a SIGKILLed backfill leaves no reader behind to race the next one; a
SIGTERM to the parent is passed on, and the child stops after the log it is reading. A second instance is kept
out by the data dir's uploader lock, which the child holds too (inherited). Reading stays on this node's rows.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Callable

from common.parent import die_with_parent
from db.session import Database
from uploader.discovery import FoundLog
from uploader.ingest import FIRST_CHUNK_BYTES

log = logging.getLogger("mmdet_wandb.service")

READER_NICENESS = 10  # the reader takes what the uploading process and wandb-core leave of the cores
MIN_FORK_BYTES = FIRST_CHUNK_BYTES  # no more than one chunk to read: a thread has it read before a writer needs the core


class Reading:
    """Reads `logs` one after the other with `read_one` (ingest), in a forked child or in a thread; `done()`
    counts the logs read so far, for progress."""

    def __init__(self, db: Database, logs: list[FoundLog], read_one: Callable[[FoundLog], object],
                 stop: threading.Event, unread_bytes: int) -> None:
        self._db, self._logs, self._read_one, self._stop = db, logs, read_one, stop
        self._thread: threading.Thread | None = None
        self._child: multiprocessing.process.BaseProcess | None = None
        if unread_bytes >= MIN_FORK_BYTES and _fork_is_safe():
            context = multiprocessing.get_context("fork")
            self._count = context.Value("i", 0, lock=False)
            self._child = context.Process(target=self._read_in_child, args=(os.getpid(),), name="backfill-read")
            for stream in (sys.stdout, sys.stderr):  # or the child writes what this process had buffered again
                stream.flush()
            self._child.start()
            log.info("reading %d logs in process %d", len(logs), self._child.pid)
        else:
            self._count = _Count()
            self._thread = threading.Thread(target=self._read_all, name="backfill-read")
            self._thread.start()

    def alive(self) -> bool:
        return (self._child or self._thread).is_alive()  # type: ignore[union-attr]

    def wait(self, timeout: float) -> None:
        (self._child or self._thread).join(timeout)  # type: ignore[union-attr]

    def done(self) -> int:
        return self._count.value

    def finish(self) -> None:
        """Wait for the reading to end (passing SIGTERM on when stopping). A child that failed leaves the logs it
        did not finish to this process, so that nothing is lost."""
        if self._child is None:
            self._thread.join()  # type: ignore[union-attr]
            return
        if self._stop.is_set() and self._child.is_alive():
            self._child.terminate()
        self._child.join()
        if self._child.exitcode != 0 and not self._stop.is_set():
            log.warning("the reading process ended with exit code %s; this process reads the rest", self._child.exitcode)
            self._read_all()

    def abandon(self) -> None:
        """The uploading failed: the child stops after the log it is reading (what it committed stays)."""
        if self._child is not None and self._child.is_alive():
            self._child.terminate()
            self._child.join()

    def _read_all(self) -> None:
        for found in self._logs[self._count.value:]:
            if self._stop.is_set():
                return
            self._read_one(found)
            self._count.value += 1

    def _read_in_child(self, parent_pid: int) -> None:
        die_with_parent(parent_pid)
        os.nice(READER_NICENESS)
        signal.signal(signal.SIGTERM, lambda *_: self._stop.set())
        signal.signal(signal.SIGINT, lambda *_: self._stop.set())
        self._db.engine.dispose(close=False)  # the parent's connections stay the parent's
        self._read_all()


class _Count:
    value = 0


def _fork_is_safe() -> bool:
    return sys.platform.startswith("linux") and threading.active_count() == 1

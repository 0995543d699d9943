"""The loop that ties the uploader together: scan → ingest → checkpoints and eval jobs → drain → close segments.

One process serves every work_dir under its roots. The periodic scan is the truth; watchdog events and a
cheap stat poll of known logs only make it react sooner. A failure in one work_dir is recorded and the loop
goes on with the others. Uploading runs in a thread of its own: a W&B call that waits (online: up to the
writer's timeout) never stops the logs from being read into the outbox.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from db import outbox
from db.problems import record_problem
from db.session import Database
from uploader import checkpoints, discovery, eval_jobs
from uploader.background import Background
from uploader.checkpoints import CheckpointOptions
from uploader.discovery import FoundLog
from uploader.ingest import IngestOptions, ingest, mark_gone, refresh_failing_configs
from uploader.wandb.writer import WandbWriter, retry_now

log = logging.getLogger("mmdet_wandb.service")


@dataclass(frozen=True)
class LoopOptions:
    roots: tuple[Path, ...]
    ingest: IngestOptions = field(default_factory=IngestOptions)
    checkpoints: CheckpointOptions | None = None  # None: checkpoints are not followed at all
    scan_interval_s: float = 10.0
    poll_interval_s: float = 0.5
    use_events: bool = True


class Loop:
    """The uploader process: follows the roots, feeds the outbox and lets the writer drain it."""

    def __init__(self, db: Database, writer: WandbWriter, options: LoopOptions) -> None:
        self.db = db
        self.writer = writer
        self.options = options
        self._logs: dict[Path, FoundLog] = {}
        self._newer: dict[Path, bool] = {}
        self._seen_stat: dict[Path, tuple[int, int, int]] = {}
        self._finished: dict[Path, tuple[int, int, int]] = {}  # stat of a log when it was read as finished
        self.background = Background()  # checkpoint copies and hashes, off the loop's thread

    def scan(self) -> list[FoundLog]:
        """Discover every log under the roots, record what is wrong, and tombstone logs that disappeared."""
        results = [discovery.scan(root) for root in self.options.roots]  # the walk holds no DB lock
        found = [log for result in results for log in result.logs]
        with self.db.transaction() as session:
            for problem in (p for result in results for p in result.problems):
                record_problem(session, str(problem.path), problem.kind, problem.message)
        current = {f.path: f for f in found}
        for path in set(self._logs) - set(current):
            mark_gone(self.db, str(path))
            self._seen_stat.pop(path, None)
        self._logs = current
        self._newer = _newer_launch_flags(found)
        if refresh_failing_configs(self.db, found):
            log.info("the training config of a failing run changed; trying it again")
        return found

    def ingest_changed(self) -> int:
        """Ingest each log whose size, mtime or inode moved since we last read it (or that just went idle)."""
        added = 0
        for path, found in self._logs.items():
            stat = _stat(path)
            if stat is None:
                continue
            idle = time.time() - stat[2] / 1e9 >= self.options.ingest.finish_idle_s
            finishing = (self._newer.get(path, False) or idle) and self._finished.get(path) != stat
            if self._seen_stat.get(path) == stat and not finishing:
                continue
            added += self._ingest_one(found)
            self._seen_stat[path] = stat
            if finishing:
                self._finished[path] = stat
        return added

    def _ingest_one(self, found: FoundLog) -> int:
        root = next((r for r in self.options.roots if found.path.is_relative_to(r)), found.work_dir)
        try:
            return ingest(self.db, found, root, newer_launch=self._newer.get(found.path, False), options=self.options.ingest)
        except Exception as exc:  # a bug or bad input in one work_dir must not stop the others
            log.exception("%s: ingest failed", found.path)
            with self.db.transaction() as session:
                record_problem(session, str(found.path), "ingest_error", f"{type(exc).__name__}: {exc}")
            return 0

    def step(self) -> None:
        """Everything after a scan: read what changed, look at checkpoints, upload what is due, close idle segments."""
        self.read_step()
        self.upload_step()

    def read_step(self) -> None:
        self.ingest_changed()
        self.look_at_checkpoints()

    def upload_step(self) -> None:
        self.writer.drain()
        self.writer.close_idle()

    def look_at_checkpoints(self) -> None:
        """Pin and settle checkpoints, then queue what is due: eval jobs, model artifacts and tables."""
        if self.options.checkpoints is not None:
            work_dirs = {f.work_dir for f in self._logs.values()}
            checkpoints.advance(self.db, checkpoints.find(work_dirs), self.options.checkpoints, self.background)
            self.queue_artifacts()

    def queue_artifacts(self) -> None:
        """The producers of the artifact outbox, and the follow-up of what the writer settled."""
        if self.options.checkpoints is not None:
            checkpoints.follow_up(self.db)
            eval_jobs.enqueue(self.db, self.options.checkpoints)
            checkpoints.queue_uploads(self.db, self.options.checkpoints, self.background)
            eval_jobs.release_pins(self.db)
            eval_jobs.queue_tables(self.db)

    def backfill(
        self, on_progress: Callable[[str, int, int], None] | None = None, evaluate: Callable[[], None] | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        """One pass over everything: read every log to its end while uploading what is read, then settle the
        checkpoints, upload the rest and close every segment. `evaluate` (run the eval jobs until none is left)
        runs between settling the checkpoints and the last uploads, so that the tables go out in the same pass.

        Reading runs in a thread of its own (files and DB only); every W&B call stays in this thread. Rows
        reach the outbox in step order per run, so uploading them as they come keeps steps increasing.
        `stop` (SIGTERM) ends it early but cleanly: the file being read is finished, open segments are closed,
        and what is left stays in the outbox and the offsets for the next run.
        """
        stop = stop or threading.Event()
        self.writer.warm_up()
        self.writer.recover()
        retry_now(self.db)  # a new command tries every run once; the backoff protects the loop within it
        logs = self.scan()
        reading = threading.Thread(target=self._read_all, args=(logs, on_progress, stop), name="backfill-read")
        reading.start()
        uploaded = 0
        while reading.is_alive() and not stop.is_set():
            logged = self.writer.drain()
            uploaded += logged
            if logged and on_progress:
                on_progress("upload", uploaded, uploaded + _pending_rows(self.db))
            if not logged:
                reading.join(0.05)
        reading.join()
        if stop.is_set():
            self.background.shutdown()
            self.writer.close_all()
            return
        self._settle_checkpoints()
        if evaluate is not None:
            evaluate()
        self.queue_artifacts()
        self.background.wait()  # the hashes of the checkpoints just queued
        while True:  # online, a prediction table goes once W&B has committed its val table: a round more
            self.queue_artifacts()
            logged_this_round = 0
            while not stop.is_set() and (logged := self.writer.drain()):
                logged_this_round += logged
                uploaded += logged
                if on_progress:
                    on_progress("upload", uploaded, uploaded + _pending_rows(self.db))
            self.writer.close_all()
            self.writer.confirm_sent()  # online: what W&B kept, learnt before the command ends
            if not logged_this_round or stop.is_set():
                break
        self.background.shutdown()
        self.queue_artifacts()  # follow-up of what the last segments settled

    def _read_all(self, logs: list[FoundLog], on_progress: Callable[[str, int, int], None] | None, stop: threading.Event) -> None:
        for index, found in enumerate(logs, 1):
            if stop.is_set():
                return
            self._ingest_one(found)
            if on_progress:
                on_progress("read", index, len(logs))

    def _settle_checkpoints(self) -> None:
        """Backfill: look again until every checkpoint is decided (ready, incomplete or missed)."""
        options = self.options.checkpoints
        if options is None:
            return
        deadline = time.monotonic() + options.incomplete_after_s + options.settle_s
        while True:
            self.look_at_checkpoints()
            if not checkpoints.undecided(self.db) or time.monotonic() > deadline:
                return
            time.sleep(min(options.settle_s, 1.0))

    def watch(self, stop: threading.Event, on_tick: Callable[[], None] | None = None) -> None:
        """Follow the roots until `stop` is set; then close every open segment. `on_tick` after each pass."""
        self.writer.warm_up()
        self.writer.recover()
        wake, read = threading.Event(), threading.Event()
        touched: set[Path] = set()
        observer = self._start_observer(wake, touched) if self.options.use_events else None
        uploading = threading.Thread(target=self._upload_until, args=(stop, read), name="upload")
        uploading.start()
        last_scan = 0.0
        failures = _RepeatedFailure("watch loop iteration")
        try:
            while not stop.is_set():
                hinted = set(touched)
                touched.clear()
                try:
                    if time.monotonic() - last_scan >= self.options.scan_interval_s or (hinted - set(self._logs)):
                        self.scan()
                        last_scan = time.monotonic()
                    self.read_step()
                    read.set()
                    if on_tick is not None:
                        on_tick()
                except Exception as exc:  # e.g. the DB unavailable or its disk full: log, wait, try again; never exit
                    failures.report(exc)
                    stop.wait(self.options.scan_interval_s)
                else:
                    failures.clear()
                wake.wait(self.options.poll_interval_s)
                wake.clear()
        finally:
            if observer is not None:
                observer.stop()
            read.set()
            uploading.join()
            self.background.shutdown()
            self.writer.close_all()

    def _upload_until(self, stop: threading.Event, read: threading.Event) -> None:
        """The writer's thread in `watch`: upload whenever the loop has read something (or every poll interval)."""
        failures = _RepeatedFailure("upload pass")
        while not stop.is_set():
            read.wait(self.options.poll_interval_s)
            read.clear()
            try:
                self.upload_step()
            except Exception as exc:  # the writer contains failures per run; this is the DB itself failing
                failures.report(exc)
                stop.wait(self.options.scan_interval_s)
            else:
                failures.clear()

    def _start_observer(self, wake: threading.Event, touched: set[Path]):  # type: ignore[no-untyped-def]
        """watchdog as a wake-up call only; without inotify (limits, NFS) the poll and the scan still work."""
        from watchdog.events import FileSystemEvent, FileSystemEventHandler
        from watchdog.observers import Observer

        class _Wake(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                if event.event_type in {"opened", "closed_no_write"}:
                    return
                if event.event_type in {"created", "moved", "deleted"}:  # may be a new log: scan again
                    touched.add(Path(os.fsdecode(event.src_path)))
                wake.set()  # a write to a known log: the stat poll finds it right away

        observer = Observer()
        try:
            for root in self.options.roots:
                observer.schedule(_Wake(), str(root), recursive=True)
            observer.start()
        except OSError as exc:
            log.warning("filesystem events unavailable (%s); relying on polling", exc)
            return None
        return observer


class _RepeatedFailure:
    """The same failure again is one line, not another traceback."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.last: str | None = None

    def report(self, exc: Exception) -> None:
        if repr(exc) != self.last:
            log.exception("%s failed; retrying", self.what)
        else:
            log.warning("%s failed again: %s", self.what, exc)
        self.last = repr(exc)

    def clear(self) -> None:
        self.last = None


def _newer_launch_flags(found: list[FoundLog]) -> dict[Path, bool]:
    """A log with a later launch in the same work_dir is finished: its training process moved on."""
    latest: dict[Path, str] = {}
    for f in found:
        if f.launch > latest.get(f.work_dir, ""):
            latest[f.work_dir] = f.launch
    return {f.path: f.launch < latest[f.work_dir] for f in found}


def _stat(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat(follow_symlinks=False)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _pending_rows(db: Database) -> int:
    with db.transaction() as session:
        return outbox.pending_row_count(session)


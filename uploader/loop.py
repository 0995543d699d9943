"""The loop that ties the uploader together: scan → ingest → checkpoints and eval jobs → drain → close segments.

One process serves every work_dir under its roots. The periodic scan is the truth; watchdog events and a
cheap stat poll of known logs only make it react sooner. A failure in one work_dir is recorded and the loop
goes on with the others. Uploading runs in a thread of its own: a W&B call that waits (online: up to the
writer's timeout) never stops the logs from being read into the outbox.

Idle costs next to nothing: a log is stat-polled every `poll_interval_s` while it changes and less and less
often while it stays still (up to `IDLE_POLL_MAX_S`; an event naming it makes it due at once); checkpoints are
looked at in the work_dirs that are active (a log or an event there lately, or a checkpoint not settled yet)
and in all of them at each full scan; full scans are paced so that they take a small share of the time.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path

from common import timings
from common.memory import return_free_memory
from db import forget, outbox
from db.offsets import backlog
from db.problems import record_problem, record_scan
from db.segments import retry_now
from db.session import Database
from uploader import checkpoints, discovery, eval_queue
from uploader.background import Background
from uploader.checkpoints import CheckpointOptions
from uploader.discovery import FoundLog
from uploader.ingest import HeldRun, IngestOptions, ingest, mark_gone, refresh_failing_configs
from uploader.backfill_reader import Reading
from uploader.wandb.writer import WandbWriter

log = logging.getLogger("mmdet_wandb.service")

IDLE_POLL_MAX_S = 30.0  # the longest a still log goes without a stat (with events: a write to it wakes us anyway)
ACTIVE_S = 60.0  # a work_dir stays active this long after its last change: its checkpoints are looked at every pass
SCAN_SHARE = 0.001  # the walk of a full scan takes at most this share of the time (the look at every work_dir after
SCAN_MAX_INTERVAL_S = 120.0  # it costs about as much again); a new log is found within this, however slow the walk
FORGET_EVERY_S = 600.0  # deleted work_dirs are looked for this often (or every --forget-after, when shorter)
QUEUE_EVERY_S = 5.0  # the artifact producers run at least this often (the writer and workers settle things too)
HEARTBEAT_MAX_S = 30.0  # the loop passes at least this often, however quiet (health checks allow 120 s)
BACKLOG_EVERY_S = 60.0  # online, offline segments not synced yet are tried again this often (each run's backoff holds)


@dataclass(frozen=True)
class LoopOptions:
    roots: tuple[Path, ...]
    ingest: IngestOptions = field(default_factory=IngestOptions)
    checkpoints: CheckpointOptions | None = None  # None: checkpoints are not followed at all
    scan_interval_s: float = 10.0
    poll_interval_s: float = 0.5
    use_events: bool = True
    share: frozenset[Path] | None = None  # backfill --jobs: the work_dirs this process reads (uploader/shards.py)
    forget_after_s: float | None = None  # watch: forget work_dirs deleted this long ago (db/forget.py); None: never
    sync_backlog: Callable[[threading.Event], None] | None = None  # watch online: `sync` of the node's offline segments


class Loop:
    """The uploader process: follows the roots, feeds the outbox and lets the writer drain it."""

    def __init__(self, db: Database, writer: WandbWriter, options: LoopOptions) -> None:
        self.db = db
        self.writer = writer
        self.options = options
        self._logs: dict[Path, FoundLog] = {}
        self._work_dirs: set[Path] = set()  # of the logs found by the last scan
        self._walk_cpu_s = 0.0  # what the last scan's walk of the roots cost
        self._newer: dict[Path, bool] = {}
        self._seen_stat: dict[Path, tuple[int, int, int]] = {}
        self._finished: dict[Path, tuple[int, int, int]] = {}  # stat of a log when it was read as finished
        self._hook_held: set[Path] = set()  # logs whose run a bad hook value holds: read again after each scan
        self._polls = _PollSchedule(options.poll_interval_s, max(IDLE_POLL_MAX_S, options.poll_interval_s))
        self._active: dict[Path, float] = {}  # work_dir → when it last changed (monotonic)
        self._unsettled: set[Path] = set()  # work_dirs with a checkpoint not settled yet
        self._queued_at = 0.0
        self._forgot_at = self._looked_at_all = float("-inf")  # monotonic: the last forget, the last look at every checkpoint
        self.background = Background()  # checkpoint copies and hashes, off the loop's thread

    def scan(self) -> list[FoundLog]:
        """Discover every log under the roots, record what is wrong, and tombstone logs that disappeared."""
        cpu = time.thread_time()
        results = [discovery.scan(root) for root in self.options.roots]  # the walk holds no DB lock
        self._walk_cpu_s = time.thread_time() - cpu  # paces the scans: the walk's own CPU, not a wait for the GIL
        # or the DB (another thread's recover or imports at start must not push the next scan minutes away)
        found = [log for result in results for log in result.logs if self.options.share is None or log.work_dir in self.options.share]
        if self.options.share is None:  # a share's parent records them
            with self.db.transaction() as session:
                record_scan(session, [str(r.resolve()) for r in self.options.roots],
                            [(str(p.path), p.kind, p.message) for result in results for p in result.problems])
        current = {f.path: f for f in found}
        gone = set(self._logs) - set(current)
        for path in gone:
            mark_gone(self.db, str(path))
        self._logs = current
        self._work_dirs = {f.work_dir for f in found}
        self._forget_what_is_gone()
        for path in self._hook_held:  # its training config may have been fixed: nothing tells but a new read
            self._seen_stat.pop(path, None)
            self._polls.changed(path, time.monotonic())
        if gone:
            log.info("%d logs gone; %s", len(gone), self.held())
        self._newer = _newer_launch_flags(found)
        if refresh_failing_configs(self.db, found):
            log.info("the training config of a failing run changed; trying it again")
        return found

    def forget_deleted(self) -> None:
        """The state of work_dirs deleted `forget_after_s` ago with nothing pending goes too (db/forget.py); looked
        for every `FORGET_EVERY_S` at most (each look queries every work_dir: at idle it was a third of a pass)."""
        after = self.options.forget_after_s
        if after is None or time.monotonic() - self._forgot_at < min(after, FORGET_EVERY_S):
            return
        self._forgot_at = time.monotonic()
        if forgotten := forget.forget_deleted(self.db, after):
            self.db.reclaim_space()
            log.info("forgot %d work_dirs deleted from disk over %.0f s ago", len(forgotten), after)

    def _forget_what_is_gone(self) -> None:
        """Memory holds only the logs and work_dirs the last scan found (DESIGN 13): months of work_dirs
        created and deleted leave nothing behind here; an active mark that ran out is dropped too."""
        now = time.monotonic()
        for path in set(self._seen_stat) - set(self._logs):
            del self._seen_stat[path]
        for path in set(self._finished) - set(self._logs):
            del self._finished[path]
        self._hook_held &= set(self._logs)
        self._polls.keep(self._logs.keys())
        self._active = {w: at for w, at in self._active.items() if w in self._work_dirs and now - at < ACTIVE_S}

    def held(self) -> str:
        """What the loop remembers, in one line (logged when logs go, so that a long run shows it stays small)."""
        return (f"following {len(self._logs)} logs in {len(self._work_dirs)} work_dirs "
                f"({len(self._finished)} read as finished, {len(self._active)} active)")

    def ingest_changed(self, touched: AbstractSet[Path] = frozenset()) -> int:
        """Ingest each log whose size, mtime or inode moved since we last read it (or that just went idle),
        looking at the logs that are due (or that an event named); returns the rows added."""
        added = 0
        now = time.monotonic()
        for path, found in self._logs.items():
            if path not in touched and not self._polls.due(path, now):
                continue
            stat = _stat(path)
            if stat is None:
                continue
            idle = time.time() - stat[2] / 1e9 >= self.options.ingest.finish_idle_s
            finishing = (self._newer.get(path, False) or idle) and self._finished.get(path) != stat
            if self._seen_stat.get(path) == stat and not finishing:
                self._polls.still(path, now)
                continue
            added += self._ingest_one(found)
            self._seen_stat[path] = stat
            self._polls.changed(path, now)
            self._active[found.work_dir] = now
            if finishing:
                self._finished[path] = stat
        return added

    def _ingest_one(self, found: FoundLog) -> int:
        root = next((r for r in self.options.roots if found.path.is_relative_to(r)), found.work_dir)
        self._hook_held.discard(found.path)
        try:
            return ingest(self.db, found, root, newer_launch=self._newer.get(found.path, False), options=self.options.ingest)
        except HeldRun:
            self._hook_held.add(found.path)
            return 0
        except Exception as exc:  # a bug or bad input in one work_dir must not stop the others
            log.exception("%s: ingest failed", found.path)
            with self.db.transaction() as session:
                record_problem(session, str(found.path), "ingest_error", f"{type(exc).__name__}: {exc}")
            return 0

    def step(self) -> None:
        """Everything after a scan: read what changed, look at checkpoints, upload what is due, close idle segments."""
        self.read_step(everything=True)
        self.upload_step()

    def read_step(self, touched: AbstractSet[Path] = frozenset(), everything: bool = False) -> bool:
        """Read the logs that are due, look at the checkpoints of active work_dirs (all of them with
        `everything`); True when something may be there to upload."""
        now = time.monotonic()
        for path in touched:  # an event in a work_dir (a checkpoint being written, say) makes it active
            for work_dir in (path.parent, path.parent.parent):
                if work_dir in self._work_dirs:
                    self._active[work_dir] = now
        added = self.ingest_changed(touched)
        active = {w for w, at in self._active.items() if now - at < ACTIVE_S} | self._unsettled
        looked = self.look_at_checkpoints(None if everything else active)
        if added or looked or now - self._queued_at >= QUEUE_EVERY_S:
            self.queue_artifacts()
            self._queued_at = now
            return True
        return False

    def upload_step(self) -> None:
        self.writer.drain()
        self.writer.close_idle()

    def look_at_checkpoints(self, work_dirs: set[Path] | None = None) -> bool:
        """Pin and settle the checkpoints of `work_dirs` (default: every one); True when it looked at any."""
        if self.options.checkpoints is None:
            return False
        looked = self._work_dirs if work_dirs is None else work_dirs & self._work_dirs
        if not looked:
            return False
        checkpoints.advance(self.db, checkpoints.find(looked), self.options.checkpoints, self.background, looked=looked)
        self._unsettled = checkpoints.unsettled_work_dirs(self.db)
        return True

    def queue_artifacts(self) -> None:
        """The producers of the artifact outbox, and the follow-up of what the writer settled."""
        if self.options.checkpoints is not None:
            checkpoints.follow_up(self.db)
            eval_queue.enqueue(self.db, self.options.checkpoints)
            checkpoints.queue_uploads(self.db, self.options.checkpoints, self.background)
            eval_queue.release_pins(self.db)
            eval_queue.queue_tables(self.db)

    def backfill(
        self, on_progress: Callable[[str, int, int], None] | None = None, evaluate: Callable[[], None] | None = None,
        stop: threading.Event | None = None, warm_up: bool = True,
    ) -> None:
        """One pass over everything: read every log to its end while uploading what is read, then settle the
        checkpoints, upload the rest and close every segment. `evaluate` (run the eval jobs until none is left)
        runs between settling the checkpoints and the last uploads, so that the tables go out in the same pass.

        Reading runs beside the uploading, in a forked process or a thread (uploader/backfill_reader.py: files and DB
        only); every W&B call stays in this thread. Rows reach the outbox in step order per run, so uploading
        them as they come keeps steps increasing.
        `stop` (SIGTERM) ends it early but cleanly: the file being read is finished, open segments are closed,
        and what is left stays in the outbox and the offsets for the next run. `warm_up` False: wandb-core is
        started by the first upload, if any (after share processes uploaded the rows there is often none).
        """
        stop = stop or threading.Event()
        self.writer.recover()
        retry_now(self.db)  # a new command tries every run once; the backoff protects the loop within it
        logs = self.scan()
        reading = Reading(self.db, logs, self._ingest_one, stop, sum(backlog(self.db, logs).values()))
        if warm_up:  # after the reader's fork: wandb-core's threads are this process's alone
            self.writer.warm_up()
        uploaded, read = 0, 0
        try:
            while reading.alive() and not stop.is_set():
                logged = self.writer.drain()
                uploaded += logged
                if on_progress and reading.done() != read:
                    read = reading.done()
                    on_progress("read", read, len(logs))
                if logged and on_progress:
                    on_progress("upload", uploaded, uploaded + _pending_rows(self.db))
                if not logged:
                    reading.wait(0.02)
        except BaseException:
            reading.abandon()
            raise
        reading.finish()
        if on_progress:
            on_progress("read", reading.done(), len(logs))
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

    def _settle_checkpoints(self) -> None:
        """Backfill: look again until every checkpoint is decided (ready, incomplete or missed)."""
        options = self.options.checkpoints
        if options is None:
            return
        deadline = time.monotonic() + options.incomplete_after_s + options.settle_s
        while True:
            self.look_at_checkpoints()
            self.queue_artifacts()
            if not checkpoints.undecided(self.db) or time.monotonic() > deadline:
                return
            time.sleep(min(options.settle_s, 1.0))

    def watch(self, stop: threading.Event, on_tick: Callable[[], None] | None = None) -> None:
        """Follow the roots until `stop` is set; then close every open segment. `on_tick` after each pass."""
        self.writer.warm_up()
        wake, read = threading.Event(), threading.Event()
        touched: set[Path] = set()
        observer = self._start_observer(wake, touched) if self.options.use_events else None
        uploading = threading.Thread(target=self._upload_until, args=(stop, read), name="upload")
        uploading.start()
        next_scan = 0.0
        failures = _RepeatedFailure("watch loop iteration")
        try:
            while not stop.is_set():
                hinted = set(touched)
                touched.clear()
                pass_started = time.monotonic()
                try:
                    full = time.monotonic() >= next_scan or bool(hinted - set(self._logs))
                    if full:  # paced by what the walk cost (not by the reading it finds): 1,000 idle work_dirs about once a minute
                        started = time.monotonic()
                        self.scan()
                        timings.SCAN.observe(time.monotonic() - started)
                        next_scan = time.monotonic() + min(SCAN_MAX_INTERVAL_S, max(self.options.scan_interval_s,
                                                                                    self._walk_cpu_s / SCAN_SHARE))
                        self.forget_deleted()  # after the walk's timing: it paces the scans
                        self.db.reclaim_left_over()
                    # every checkpoint is looked at on a scan; with events, a new one wakes its work_dir, so then only
                    # every SCAN_MAX_INTERVAL_S (in case an event was lost)
                    everything = full and (observer is None or time.monotonic() - self._looked_at_all >= SCAN_MAX_INTERVAL_S)
                    if everything:
                        self._looked_at_all = time.monotonic()
                    if self.read_step(hinted, everything=everything):
                        read.set()
                    timings.LOOP_PASS.observe(time.monotonic() - pass_started)
                    if on_tick is not None:
                        on_tick()
                except Exception as exc:  # e.g. the DB unavailable or its disk full: log, wait, try again; never exit
                    failures.report(exc)
                    stop.wait(self.options.scan_interval_s)
                else:
                    failures.clear()
                wake.wait(self._quiet_for(next_scan))
                wake.clear()
        finally:
            if observer is not None:
                observer.stop()
            read.set()
            uploading.join()
            self.background.shutdown()
            self.writer.close_all()

    def _quiet_for(self, next_scan: float) -> float:
        """How long the loop may sleep: until the next log is due, an active work_dir's next look, or the scan."""
        now = time.monotonic()
        if any(now - at < ACTIVE_S for at in self._active.values()) or self._unsettled:
            return self.options.poll_interval_s
        return max(self.options.poll_interval_s, min(self._polls.next_due() - now, next_scan - now, HEARTBEAT_MAX_S))

    def _upload_until(self, stop: threading.Event, read: threading.Event) -> None:
        """The writer's thread in `watch`: first what a previous process left (`recover`: here, so that the loop's
        first scan and read go on meanwhile, and a restart's next row is not held up by it); then upload whenever
        the loop has read something, otherwise look now and then (open segments close when idle; a run backing
        off is due again), and let wandb-core go while nothing is open. After `stop`, one last pass."""
        failures = _RepeatedFailure("upload pass")
        recovered = False
        backlog_due = 0.0  # the first pass syncs the backlog
        while True:
            try:
                if not recovered:
                    self.writer.recover(lazily=not self.writer.online)
                    recovered = True
                if self.options.sync_backlog is not None and time.monotonic() >= backlog_due:
                    backlog_due = time.monotonic() + BACKLOG_EVERY_S
                    self.options.sync_backlog(stop)  # a run's offline segments before its live rows (held meanwhile), in
                    # this thread: the loop's passes and heartbeat go on through a long backlog
                self.upload_step()
                if self.writer.release_client_when_idle():
                    return_free_memory()  # what the finished run objects used
            except Exception as exc:  # the writer contains failures per run; this is the DB itself failing
                failures.report(exc)
                stop.wait(self.options.scan_interval_s)
            else:
                failures.clear()
            if stop.is_set():
                return
            read.wait(self.options.poll_interval_s if self.writer.busy() else QUEUE_EVERY_S)
            read.clear()

    def _start_observer(self, wake: threading.Event, touched: set[Path]):  # type: ignore[no-untyped-def]
        """watchdog as a wake-up call only; without inotify (limits, NFS) the poll and the scan still work. Only
        changes are asked of the kernel: our own reads (a scan opens every folder, a poll opens logs) would
        otherwise come back as open/close events, each handled in Python."""
        from watchdog import events
        from watchdog.observers import Observer

        class _Wake(events.FileSystemEventHandler):
            def on_any_event(self, event: events.FileSystemEvent) -> None:
                touched.add(Path(os.fsdecode(event.src_path)))  # a new log (scan again), or a known one (stat it now)
                if getattr(event, "dest_path", None):
                    touched.add(Path(os.fsdecode(event.dest_path)))
                wake.set()

        waking = [events.FileCreatedEvent, events.DirCreatedEvent, events.FileModifiedEvent, events.FileClosedEvent,
                  events.FileMovedEvent, events.DirMovedEvent, events.FileDeletedEvent, events.DirDeletedEvent]
        observer = Observer()
        try:
            for root in self.options.roots:
                observer.schedule(_Wake(), str(root), recursive=True, event_filter=waking)
            observer.start()
        except OSError as exc:
            log.warning("filesystem events unavailable (%s); relying on polling", exc)
            return None
        return observer


class _PollSchedule:
    """When to stat each known log again: a poll interval after it changed, then twice as long after each
    look that found it still, up to a cap. A still log's next look falls on a multiple of its interval, so that
    the still logs are looked at together (one wake-up a cap for a thousand idle logs, not one each)."""

    def __init__(self, base_s: float, cap_s: float) -> None:
        self.base_s, self.cap_s = base_s, cap_s
        self._next: dict[Path, float] = {}
        self._interval: dict[Path, float] = {}

    def due(self, path: Path, now: float) -> bool:
        return self._next.get(path, 0.0) <= now

    def changed(self, path: Path, now: float) -> None:
        self._interval[path] = self.base_s
        self._next[path] = now + self.base_s

    def still(self, path: Path, now: float) -> None:
        interval = min(self.cap_s, self._interval.get(path, self.base_s) * 2)
        self._interval[path] = interval
        self._next[path] = (now // interval + 1) * interval

    def keep(self, paths: AbstractSet[Path]) -> None:
        """Forget every log not in `paths`."""
        for path in set(self._next) - paths:
            del self._next[path]
        for path in set(self._interval) - paths:
            del self._interval[path]

    def next_due(self) -> float:
        return min(self._next.values(), default=time.monotonic() + self.cap_s)


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
    with db.read() as session:
        return outbox.pending_row_count(session)


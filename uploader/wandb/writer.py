"""W&B writer: drains the outbox (rows and artifacts) into W&B runs, one segment at a time (DESIGN 4–6).

The service is the only writer of each run it owns. `_step` is the per-run counter handed out at ingest,
so a segment only ever holds steps above every earlier one. An entry counts as uploaded only once W&B has
it: offline, when its segment is finished, read back from the `.wandb` file and found to hold exactly what
was logged; online, a row once the run's next start reports a starting step past it, an artifact once
`Artifact.wait()` read its commit back from W&B. Online, every W&B call is bounded (`wandb_timeout_s`), and a
failed one is followed by a probe: W&B that does not answer opens the circuit, and every upload waits.
The writer knows W&B: producers decide what is due, `artifacts` builds it, and every change of segment and run
state is a statement of db/segments.py (as db/outbox.py has the outbox's).
"""
from __future__ import annotations

import contextlib
import importlib
import json
import logging
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import wandb
from sqlalchemy import select
from sqlalchemy.orm import Session

from common import crash_points, events, json_values
from common.backoff import BACKOFF_BASE_S
from db import outbox, segments
from db.models import ArtifactKind, Run
from db.outbox import PendingArtifact
from db.session import Database
from uploader import hook_options
from uploader.wandb import history_batch, private_api, reader, verify
from uploader.wandb.artifacts import ArtifactBuilder, NotBuildable
from uploader.wandb.circuit import Circuit

log = logging.getLogger("mmdet_wandb.writer")

DEFAULT_PROJECT = "mmdet-wandb"
CLIENT_IDLE_S = 60.0  # wandb-core is let go after this long with no run open (it costs memory and wake-ups)


@dataclass(frozen=True)
class WriterOptions:
    runs_dir: Path  # segment directories: <runs_dir>/<wandb id>/<seq>/wandb/...
    mode: str = "offline"
    layers: hook_options.Layers = hook_options.Layers()  # init_kwargs (project, entity, tags, ...), resolved per run
    flush_interval_s: float = 0.1  # how long a logged row may sit in wandb-core before reaching the file
    segment_idle_s: float = 30.0  # an idle segment is closed so that its rows count as uploaded
    segment_max_rows: int = 200_000
    batch_rows: int = 5_000  # rows per run per drain call, so that one big backfill does not starve live runs
    exit_timeout_s: float = 120.0
    wandb_timeout_s: float = 60.0  # online: the most one init(), finish() or the artifact waits of a segment may take
    media_dir: Path | None = None  # where val images and masks are written for the tables (default: next to runs_dir)
    share: frozenset[Path] | None = None  # backfill --jobs: only the runs of these work_dirs are this writer's


@dataclass
class _OpenSegment:
    segment_id: int
    run_id: int
    handle: Any  # wandb.Run
    sync_file: Path | None
    ids: dict[str, Any]  # the ids of its events: run_id (W&B's), work_dir, segment (seq), mode
    steps: list[int] = field(default_factory=list)
    artifacts: dict[int, Any] = field(default_factory=dict)  # outbox id → the wandb.Artifact logged (online: waited for)
    last_activity: float = field(default_factory=time.monotonic)
    uploaded_up_to: int | None = None  # the highest step W&B has (closed segments, or the server online)
    by_epoch: bool | None = None  # what its val curves' x-axis was defined by (`_define_metrics`)


class WandbWriter:
    def __init__(self, db: Database, options: WriterOptions) -> None:
        self.db = db
        self.options = options
        self._open: dict[int, _OpenSegment] = {}
        self._closing: dict[int, Future[None]] = {}  # run → its finished segment being read back (off the loop)
        self._undiscarded: set[int] = set()  # segments whose discard could not be recorded (disk full): retried
        self._not_before: dict[int, float] = {}  # monotonic: backoff of runs whose failure could not be recorded
        self._verifier = ThreadPoolExecutor(1, thread_name_prefix="verify")
        self._artifacts = ArtifactBuilder(db, options.media_dir or options.runs_dir.parent / "media")
        self.circuit = Circuit(db) if options.mode == "online" else None
        self._client_live = False  # wandb-core is running for this process
        _lighter_start()  # before any `wandb.init` of this process
        self._leftovers: dict[int, list[segments.LeftOpen]] = {}  # run → open segments a previous process left
        self._dirs_checked = True  # no segment directory is left to look at (`recover`)
        self._last_open = time.monotonic()  # when a run of ours was last open

    @property
    def online(self) -> bool:
        return self.options.mode == "online"

    def unreachable(self) -> bool:
        """Online: W&B did not answer the last probe (every upload waits)."""
        return self.circuit is not None and self.circuit.is_open

    def warm_up(self) -> None:
        """Start wandb-core (`start_client`; in `watch` the CLI started it before the loop was built, and this
        second start returns at once)."""
        self._client_live = True
        start_client()

    def busy(self) -> bool:
        """A segment is open or being read back, or one a previous process left is not settled yet."""
        for run_id in list(self._closing):
            self._still_closing(run_id)
        return bool(self._open or self._closing or self._leftovers)

    def release_client_when_idle(self) -> bool:
        """With no run open for CLIENT_IDLE_S, stop wandb-core; the next start starts it again (~0.5 s).
        True when it was stopped now."""
        if self.busy():
            self._last_open = time.monotonic()
        elif self._client_live and time.monotonic() - self._last_open >= CLIENT_IDLE_S:
            wandb.teardown()
            self._client_live = False
            log.info("no run open for %.0f s: wandb-core stopped until the next upload", CLIENT_IDLE_S)
            return True
        return False

    def recover(self, *, lazily: bool = False) -> None:
        """Settle what a previous process left, reading each file once and waiting for nothing: an open segment
        whose file is complete and holds what was logged is closed; any other (incomplete, truncated,
        unreadable, missing) is rebuilt from the DB. Then every segment directory that no open, sent or closed
        segment owns (a crash between `wandb.init` and recording the segment, or between discarding one and
        deleting it) is deleted, so that `wandb sync` of the whole folder never uploads a step twice.
        Online, W&B is probed once: when it does not answer, no run is started until it does.
        `lazily` (`watch` offline): only find them here; `drain` settles a run's right before its first upload
        and the rest at the end of that pass, so that a restart's next row waits for its own run's leftovers
        only, not for reading back every open segment of the node."""
        if self.circuit is not None:
            self.circuit.check()
        with self.db.read() as session:
            ours = self._ours(session)
            self._leftovers = {}
            for stale in segments.left_open(session):
                if stale.run_id not in self._open and ours(stale.run_id):
                    self._leftovers.setdefault(stale.run_id, []).append(stale)
        self._dirs_checked = False
        if not lazily:
            self._settle_leftovers()

    def _settle_leftovers(self, run_id: int | None = None) -> None:
        """Settle the leftovers of `run_id` (None: of every run); once none is left, delete the segment
        directories no segment owns."""
        for rid in [run_id] if run_id is not None else sorted(self._leftovers):
            left = self._leftovers.get(rid, [])
            while left:
                self._settle(left[0])
                left.pop(0)  # only once its DB change committed: a failing DB leaves it for the next pass
            self._leftovers.pop(rid, None)
        if not self._leftovers and not self._dirs_checked:
            self._delete_unowned_segment_dirs()
            self._dirs_checked = True

    def _settle(self, stale: segments.LeftOpen) -> None:
        """Close the segment when its file is complete and holds what was logged, else discard it."""
        try:
            if stale.mode == "offline":
                self._verify_and_close(stale.id, self._sync_file_in(stale.directory), wait=False)
                log.info("segment %s of run %s was complete; kept", stale.id, stale.run_id)
                return
        except (verify.SegmentVerificationError, OSError, reader.WandbFileError) as exc:
            log.info("segment %s of run %s not complete (%s); rebuilding it from the DB", stale.id, stale.run_id, exc)
        self._discard(stale.id)

    def _delete_unowned_segment_dirs(self) -> None:
        with self.db.read() as session:
            owned = segments.owned_dirs(session)
            ours = self._ours(session)
            runs = {wandb_id for run_id, wandb_id in segments.node_runs(session).items() if ours(run_id)}
        root = self.options.runs_dir
        for run_dir in sorted(root.iterdir()) if root.is_dir() else []:
            if run_dir.name not in runs or not run_dir.is_dir():
                continue
            for directory in sorted(run_dir.iterdir()):
                if directory.is_dir() and directory not in owned:
                    log.info("deleting %s: no segment of the state DB owns it", directory)
                    shutil.rmtree(directory, ignore_errors=True)

    def _ours(self, session: Session) -> Callable[[int], bool]:
        """Whether a run of this node is this writer's: all of them, or those of its share's work_dirs."""
        if self.options.share is None:
            return lambda _run_id: True
        return segments.runs_of(session, self.options.share).__contains__

    def drain(self) -> int:
        """Log one batch of pending rows, then the pending artifacts, of every run that has some and is not
        backing off after a failure; returns how many entries were logged."""
        for segment_id in sorted(self._undiscarded):
            self._discard_or_remember(segment_id)
        if self.circuit is not None and self.circuit.is_open and not (self.circuit.due() and self.circuit.check()):
            return 0
        with self.db.read() as session:
            ours = self._ours(session)
            runs = sorted(r for r in set(outbox.pending_runs(session)) | segments.awaiting_confirmation(session) | self._leftovers.keys()
                          if ours(r))
            waiting = segments.backing_off(session, runs)
            if self.online:
                waiting |= segments.unsynced_runs(session, runs)
        waiting |= {run_id for run_id, until in self._not_before.items() if until > time.monotonic()}
        logged = 0
        for run_id in runs:
            self._settle_leftovers(run_id)  # outside the run's try: the DB failing fails the pass, as in recover
            if run_id in waiting or self._still_closing(run_id):
                continue
            try:
                logged += self._drain_run(run_id)
            except Exception as exc:  # one broken run must not stop the others
                log.debug("run %s: upload failed", run_id, exc_info=True)  # the one line is _record_failure's
                self._fail_run(run_id, exc)
                if self._lost_wandb():
                    break
        self._settle_leftovers()
        return logged

    def close_idle(self) -> None:
        now = time.monotonic()
        for run_id, seg in list(self._open.items()):
            if now - seg.last_activity >= self.options.segment_idle_s or len(seg.steps) >= self.options.segment_max_rows:
                self.close(run_id)

    def close_all(self) -> None:
        """Close every open segment and wait until each is read back (shutdown, end of a backfill)."""
        for run_id in list(self._open):
            if run_id in self._open:  # a close that found W&B gone abandons the other open segments
                self.close(run_id)
        wait(self._closing.values())
        self._closing.clear()

    def close(self, run_id: int) -> None:
        """Finish the run's segment; reading it back happens off the loop's thread (wandb-core may take a
        while to write the end of a big segment), and the run takes no new segment until that is settled."""
        seg = self._open.pop(run_id)
        try:
            with self.db.read() as session:
                summary = json.loads(session.get_one(Run, run_id).summary_json)
            seg.handle.summary.update(summary)
            crash_points.reached("segment-closing")
            committed, failed = self._wait_for_artifacts(seg) if self.online else ({}, {})
            seg.handle.finish()
        except Exception as exc:
            log.exception("run %s: closing segment %s failed; it will be rebuilt", run_id, seg.segment_id)
            self._discard_or_remember(seg.segment_id)
            self._fail_run(run_id, exc)
            self._lost_wandb()
            return
        events.emit(log, events.RUN_CLOSED, "run %s: finished segment %s", seg.ids["run_id"], seg.ids["segment"], **seg.ids)
        if self.online:
            self._sent(seg, committed, failed)
            return
        self._closing[run_id] = self._verifier.submit(self._settle_finished, seg)

    def _wait_for_artifacts(self, seg: _OpenSegment) -> tuple[dict[int, dict[str, Any]], dict[int, str]]:
        """Online: wait (all of them within `wandb_timeout_s`) until W&B has committed each artifact logged into
        the segment; wandb-core only logs a failed upload, so this is what tells. Returns (outbox id → the
        version W&B holds, outbox id → why it holds none)."""
        deadline = time.monotonic() + self.options.wandb_timeout_s
        committed: dict[int, dict[str, Any]] = {}
        failed: dict[int, str] = {}
        for entry_id, artifact in seg.artifacts.items():
            try:
                artifact.wait(timeout=max(1.0, deadline - time.monotonic()))
                if artifact.state != "COMMITTED":
                    raise RuntimeError(f"W&B holds it as {artifact.state}")
                committed[entry_id] = {"server_id": artifact.id, "version": artifact.version}
            except Exception as exc:
                failed[entry_id] = f"{artifact.name} not committed by W&B: {type(exc).__name__}: {exc}"
        return committed, failed

    def _sent(self, seg: _OpenSegment, committed: dict[int, dict[str, Any]], failed: dict[int, str]) -> None:
        """Online, `finish()` returning says nothing of what W&B kept (it returns normally after W&B refused
        the rows): the rows wait, in a sent segment, for the run's next start, whose starting step is what W&B
        has. Artifacts are settled now, by what `Artifact.wait()` read back: committed ones are uploaded (their
        pins can go), the others are pending again."""
        with self.db.transaction() as session:
            finished = segments.sent(session, seg.segment_id, committed, list(failed))
        if not finished.holds_rows:  # nothing to confirm: wandb-core's local files can go
            shutil.rmtree(finished.directory, ignore_errors=True)
        if failed:
            self._record_failure(seg.run_id, RuntimeError("; ".join(failed.values())))
            self._lost_wandb()

    def _settle_finished(self, seg: _OpenSegment) -> None:
        """In the verifier thread: files and the DB only."""
        try:
            self._verify_and_close(seg.segment_id, seg.sync_file)
        except Exception as exc:
            log.exception("run %s: segment %s did not verify; it will be rebuilt", seg.run_id, seg.segment_id)
            self._discard_or_remember(seg.segment_id)
            self._record_failure(seg.run_id, exc)

    def _still_closing(self, run_id: int) -> bool:
        future = self._closing.get(run_id)
        if future is not None and future.done():
            del self._closing[run_id]
            return False
        return future is not None

    def _drain_run(self, run_id: int) -> int:
        """Log the run's pending rows, then its pending artifacts, into its open segment (opened first if need
        be: online, that start also settles the run's sent segments by what W&B has). `drain` calls it for
        runs with something pending or sent only."""
        seg = self._open.get(run_id) or self._open_segment(run_id)
        with self.db.read() as session:
            by_epoch = session.scalar(select(Run.by_epoch).where(Run.id == run_id))  # not the whole row: its config text
            rows = outbox.pending_rows(session, run_id, self.options.batch_rows)
            entries = outbox.pending_artifacts(session, run_id)
            val_records = {
                entry.id: outbox.logged_val(session, run_id, entry.manifest_id, uploaded_only=self.online)  # type: ignore[arg-type]
                for entry in entries if entry.kind is ArtifactKind.PREDICTIONS
            }
        if by_epoch != seg.by_epoch:  # learnt from a line read after the segment opened (an iter-based run's
            _define_metrics(seg.handle, by_epoch)  # first val line): the val curves' x-axis again, before its rows
            seg.by_epoch = by_epoch
        if rows:
            floor = seg.steps[-1] if seg.steps else seg.uploaded_up_to
            if floor is not None and rows[0].step <= floor:
                raise RuntimeError(f"run {run_id}: step {rows[0].step} is not above {floor}, which W&B has or this segment holds")
            with history_batch.batched(seg.handle):
                for row in rows:
                    seg.handle.log(json_values.loads(row.payload_json), step=row.step, commit=True)
            seg.steps.extend(row.step for row in rows)
            with self.db.transaction() as session:
                outbox.assign_rows(session, run_id, rows[0].step, rows[-1].step, seg.segment_id)
            crash_points.reached("rows-logged")
        # A prediction table references its val table: online, only once W&B has committed it (a later segment)
        due = [e for e in entries if e.kind is not ArtifactKind.PREDICTIONS or val_records[e.id] is not None]
        logged = len(rows) + sum(self._log_artifact(seg, entry, val_records.get(entry.id)) for entry in due)
        seg.last_activity = time.monotonic()
        return logged

    def _init(self, kwargs: dict[str, Any]) -> Any:
        """`wandb.init`; a start that failed half-way (e.g. the disk full while wandb-core set the run up), or a
        finish that timed out online, leaves the run id "in use" in wandb-core for good, so wandb-core is
        restarted (the other runs' open segments are rebuilt from the DB) and the start tried once more."""
        self._client_live = True
        try:
            return wandb.init(**kwargs)
        except Exception as exc:
            if "is in use" not in str(exc):
                raise
            self._restart_wandb_core(f"wandb-core still holds run {kwargs['id']} from a failed start or finish")
        return wandb.init(**kwargs)

    def _restart_wandb_core(self, why: str) -> None:
        """Drop every run object of this process at once (teardown first: the finish of each then fails at once
        instead of waiting for W&B); their open segments are rebuilt from the DB."""
        log.warning("%s: restarting wandb-core; the open segments of %d run(s) are rebuilt from the DB", why, len(self._open))
        abandoned = [self._open.pop(run_id) for run_id in list(self._open)]
        wandb.teardown()
        for seg in abandoned:
            _abandon(seg.handle, None)
            self._discard_or_remember(seg.segment_id)

    def _lost_wandb(self) -> bool:
        """Online, after a failed W&B call: probe W&B. When it does not answer, the circuit opens and wandb-core,
        which would retry every run's uploads for days, is restarted. True when W&B is unreachable."""
        if self.circuit is None or self.circuit.check():
            return False
        self._restart_wandb_core("W&B is unreachable")
        return True

    def _log_artifact(self, seg: _OpenSegment, entry: PendingArtifact, val_record: dict[str, Any] | None) -> int:
        with self.db.read() as session:
            wandb_id = session.get_one(Run, entry.run_id).wandb_id
        try:
            built = self._artifacts.build(entry, wandb_id, val_record)
        except NotBuildable as exc:
            log.warning("run %s: %s %s not logged: %s", wandb_id, entry.kind.value, entry.file_name or entry.id, exc)
            with self.db.transaction() as session:
                outbox.reject(session, entry.id, str(exc))
            return 0
        seg.handle.log_artifact(built.artifact, aliases=entry.aliases or None)
        for key, chart in built.charts.items():
            private_api.log_chart(seg.handle, key, chart)
        seg.artifacts[entry.id] = built.artifact
        with self.db.transaction() as session:
            outbox.logged(session, entry.id, seg.segment_id, {**built.record, "digest": built.artifact.digest})
        crash_points.reached("artifact-logged")
        if entry.kind is ArtifactKind.MODEL:
            events.emit(log, events.CHECKPOINT_LOGGED, "run %s: logged %s %s", wandb_id, built.artifact.name, ", ".join(entry.aliases),
                        run_id=wandb_id, work_dir=seg.ids["work_dir"], segment=seg.ids["segment"], checkpoint=entry.file_name,
                        aliases=entry.aliases)
        else:
            log.info("run %s: logged %s %s", wandb_id, built.artifact.name, ", ".join(entry.aliases))
        return 1

    def _open_segment(self, run_id: int) -> _OpenSegment:
        """Start a new segment of the run. Its row is recorded only once `wandb.init` succeeded (DESIGN 10): a
        run that W&B refuses leaves nothing behind, and a crash in between leaves a directory that no segment
        owns, which `recover` deletes."""
        with self.db.read() as session:
            run = session.get_one(Run, run_id)
            nxt = segments.next_of(session, run_id)
            seq, done = nxt.seq, nxt.uploaded_up_to
            directory = self.options.runs_dir / run.wandb_id / f"{seq:04d}"
            init = self._init_kwargs(run, directory)
            config = json.loads(run.config_json) if run.config_json else {}
            config_file = (run.config_name, run.config_text) if done is None and run.config_text else None
            by_epoch = run.by_epoch
            ids = {"run_id": run.wandb_id, "work_dir": run.work_dir.path, "segment": seq, "mode": self.options.mode}
        shutil.rmtree(directory, ignore_errors=True)  # a leftover that no segment owns
        directory.mkdir(parents=True)
        try:
            handle = self._init(init)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        try:
            with self.db.transaction() as session:
                segment_id = segments.opened(session, run_id, seq, directory, self.options.mode)
        except BaseException:
            _abandon(handle, directory)
            raise
        crash_points.reached("segment-recorded")
        seg = _OpenSegment(segment_id=segment_id, run_id=run_id, handle=handle, sync_file=None, ids=ids, uploaded_up_to=done)
        self._open[run_id] = seg
        _define_metrics(handle, by_epoch)
        seg.by_epoch = by_epoch
        if config:
            handle.config.update(config, allow_val_change=True)
        if config_file is not None:
            _save_config_file(handle, *config_file)
        if self.online:
            self._settle_sent(seg, handle.starting_step)
            seg.uploaded_up_to = max(done or 0, handle.starting_step - 1)
        seg.sync_file = None if self.online else Path(handle.settings.sync_file)
        events.emit(log, events.RUN_OPENED, "run %s: opened segment %s in %s", init["id"], seq, directory, **ids)
        return seg

    def _init_kwargs(self, run: Run, directory: Path) -> dict[str, Any]:
        """init_kwargs merged key by key: CLI > environment (WANDB_PROJECT, ...) > config file > the hook's > ours."""
        merged = hook_options.for_run(self.options.layers, run.hook_options_json).init_kwargs
        kwargs: dict[str, Any] = {
            "name": run.name, "group": run.group, "job_type": run.job_type, "project": DEFAULT_PROJECT,
            "notes": f"Read by mmdet-wandb from {run.work_dir.path} on node {run.node or '(unnamed)'}",
        }
        kwargs.update(merged)  # without the keys the service owns (hook_options.RESERVED_INIT_KWARGS)
        kwargs.update(
            id=run.wandb_id,
            resume="allow",
            dir=str(directory),
            settings=private_api.settings(
                mode=self.options.mode,
                console="off",
                silent=True,
                reinit="create_new",
                x_disable_stats=True,
                x_disable_meta=True,  # the host, Python and GPUs W&B would record are the uploader's: config.env_info has the training's
                x_save_requirements=False,
                disable_git=True,
                disable_code=True,
                x_transaction_log_flush_interval=self.options.flush_interval_s,
                **({"init_timeout": self.options.wandb_timeout_s, "finish_timeout": self.options.wandb_timeout_s,
                    "finish_timeout_raises": True} if self.online else {}),
            ),
        )
        return kwargs

    def confirm_sent(self) -> None:
        """Online, at the end of a backfill: start each run with sent segments once more, only to learn what W&B
        has (its starting step), so that rows W&B did not keep are pending, with the error, when the command ends.
        Nothing is tried while W&B is unreachable."""
        with self.db.read() as session:
            ours = self._ours(session)
            runs = sorted(r for r in segments.awaiting_confirmation(session) if ours(r))
        for run_id in runs:
            if self.unreachable():
                return
            if run_id in self._open:
                continue
            try:
                seg = self._open_segment(run_id)
            except Exception as exc:
                log.exception("run %s: could not start it to confirm what W&B has", run_id)
                self._fail_run(run_id, exc)
                self._lost_wandb()
                continue
            self._open.pop(run_id)
            _abandon(seg.handle, None, exit_code=0)
            self._sent(seg, {}, {})  # it logged nothing: closed at once

    def _settle_sent(self, seg: _OpenSegment, server_next_step: int) -> None:
        """Online: the run just started again and W&B says it holds every step below `server_next_step`. Rows
        below it are uploaded (sent before, or before a crash; never sent again); the rest of each sent segment
        goes back to the outbox, and sent segments are settled and their local files removed."""
        run_id = seg.run_id
        with self.db.transaction() as session:
            confirmed = segments.settle_sent(session, run_id, server_next_step)
        for seq, rows in confirmed.kept.items():
            events.emit(log, events.SEGMENT_CONFIRMED, "run %s: W&B has all %d rows of segment %s", seg.ids["run_id"], rows, seq,
                        **{**seg.ids, "segment": seq}, rows=rows)
        for seq, returned in confirmed.returned.items():
            log.warning("run %s: W&B has the steps below %d only; %d rows of segment %s go again",
                        run_id, server_next_step, returned, seq)
        self.db.reclaim_space()
        for directory in confirmed.directories:
            shutil.rmtree(directory, ignore_errors=True)
        if confirmed.returned:
            self._record_failure(run_id, RuntimeError(f"W&B kept the steps below {server_next_step} only: the rest is sent again"))

    def _verify_and_close(self, segment_id: int, sync_file: Path | None, *, wait: bool = True) -> None:
        """`wait`: the segment was just finished by this process, and wandb-core may still be writing its end."""
        with self.db.read() as session:
            content = outbox.content(session, segment_id)
        if sync_file is not None:
            if wait:
                reader.wait_for_exit(sync_file, self.options.exit_timeout_s)
            verify.check_segment(sync_file, content)
        with self.db.transaction() as session:
            closed = segments.verified(session, segment_id, content)
        events.emit(log, events.SEGMENT_VERIFIED, "run %s: segment %s read back, its %d rows uploaded", closed.wandb_id, closed.seq,
                    closed.rows, run_id=closed.wandb_id, work_dir=closed.work_dir, segment=closed.seq, mode=closed.mode, rows=closed.rows)
        crash_points.reached("segment-closed")
        self.db.reclaim_space()

    def _discard(self, segment_id: int) -> None:
        """An unverified segment is never synced: delete its files and give what it held back to the outbox."""
        with self.db.transaction() as session:
            directory = segments.discarded(session, segment_id)
        crash_points.reached("segment-discarded")
        shutil.rmtree(directory, ignore_errors=True)  # offline: never synced; online: wandb-core's local files

    def _fail_run(self, run_id: int, exc: BaseException) -> None:
        """Contain a failure to its run: its open segment is discarded (rebuilt later from the DB), and the run
        waits before its next try, twice as long after each failure in a row (capped), with the error shown in
        `status`; every other run goes on."""
        seg = self._open.pop(run_id, None)
        if seg is not None:
            _abandon(seg.handle, None)
            self._discard_or_remember(seg.segment_id)
        self._record_failure(run_id, exc)

    def _record_failure(self, run_id: int, exc: BaseException) -> None:
        """The run's backoff and error, in the DB (`status`); in memory only when the DB cannot be written."""
        try:
            with self.db.transaction() as session:
                backoff = segments.failed(session, run_id, f"{type(exc).__name__}: {exc}")
        except Exception:  # e.g. the disk is full
            log.exception("run %s: upload failed (%s: %s) and the failure could not be recorded; backing off in memory",
                          run_id, type(exc).__name__, exc)
            self._not_before[run_id] = time.monotonic() + BACKOFF_BASE_S
        else:
            log.warning("run %s: upload failed (%s); failure %d in a row; next try in %.0f s",
                        backoff.wandb_id, backoff.error, backoff.failures, backoff.wait_s)
            self._not_before.pop(run_id, None)

    def _discard_or_remember(self, segment_id: int) -> None:
        """Discard a segment; when even that cannot be recorded (the disk full), try again on the next pass.
        Meanwhile its rows stay with it, counted as not uploaded."""
        try:
            self._discard(segment_id)
        except Exception as exc:
            if segment_id in self._undiscarded:
                log.debug("segment %s still cannot be discarded: %s", segment_id, exc)
            else:
                log.exception("segment %s could not be discarded yet; trying again on every pass", segment_id)
            self._undiscarded.add(segment_id)
        else:
            self._undiscarded.discard(segment_id)

    @staticmethod
    def _sync_file_in(directory: Path) -> Path:
        files = reader.find_run_files(directory)
        if len(files) != 1:
            raise FileNotFoundError(f"{directory}: expected one .wandb file, found {len(files)}")
        return files[0]


def start_client() -> None:
    """Start wandb-core in the background, and import what the first `wandb.init` of a process imports (each
    ~0.2-0.3 s), so that they overlap with the service's own start and reading instead of delaying its first
    row. Calling it again is harmless (`wandb.setup` returns the running client)."""
    threading.Thread(target=_start_client, args=(not _lighter_start(),), name="wandb-setup", daemon=True).start()


def _lighter_start() -> bool:
    """What a start of wandb-core and a first `wandb.init` of this process may leave out
    (`private_api.quick_service_poll`, `skip_launch_inputs`); True when they do."""
    private_api.quick_service_poll()
    return private_api.skip_launch_inputs()


def _start_client(import_launch: bool) -> None:
    wandb.setup()
    if import_launch:  # the first `wandb.init` imports it, unless `private_api.skip_launch_inputs` applies
        with contextlib.suppress(ImportError):
            importlib.import_module("wandb.sdk.launch.inputs.internal")


def _abandon(handle: Any, directory: Path | None, exit_code: int = 1) -> None:
    """End a run object that will not be verified, and delete what it wrote when no segment owns it."""
    try:
        handle.finish(exit_code=exit_code)
    except Exception:  # the run object is already broken
        log.debug("finish of an abandoned run object raised", exc_info=True)
    if directory is not None:
        shutil.rmtree(directory, ignore_errors=True)


def _define_metrics(handle: Any, by_epoch: bool | None) -> None:
    """x-axes: train curves over the global iteration, val curves over the epoch (or iteration, iter-based)."""
    handle.define_metric("iter")
    handle.define_metric("epoch")
    handle.define_metric("train/*", step_metric="iter")
    handle.define_metric("learning_rate*", step_metric="iter")
    handle.define_metric("momentum", step_metric="iter")
    handle.define_metric("val/*", step_metric="iter" if by_epoch is False else "epoch")


def _save_config_file(handle: Any, name: str | None, text: str) -> None:
    """Upload the training config as a run file, from our own copy (nothing is written in the work_dir)."""
    run_files = Path(handle.dir)  # a file already in the run's folder is uploaded as it is (no symlink, no warning)
    copy = run_files / (name or "config.py")
    copy.write_text(text, encoding="utf-8")
    handle.save(str(copy), base_path=str(run_files), policy="now")

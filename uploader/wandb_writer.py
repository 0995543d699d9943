"""W&B writer: drains the outbox into W&B runs, one segment at a time (DESIGN 5–6).

The service is the only writer of each run it owns. `_step` is the per-run counter handed out at ingest,
so a segment only ever holds steps above every earlier one. A row counts as uploaded only once W&B has it:
offline, when its segment is finished, read back from the `.wandb` file and found complete; online, once
`finish()` returned, or when a resumed run reports a starting step past it.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import wandb
from wandb.sdk.lib.paths import LogicalPath
from sqlalchemy import delete, func, select, update

from db.models import Checkpoint, EvalJob, OutboxRow, Run, RunValArtifact, Segment, SegmentState, utcnow
from db.session import Database
from uploader import checkpoints, ckpt_file, evaluations, settings, tables, wandb_reader
from uploader.checkpoints import CheckpointOptions

log = logging.getLogger("mmdet_wandb.writer")

DEFAULT_PROJECT = "mmdet-wandb"
# init_kwargs keys the service must own: one run id per lineage, our own segment directories and settings.
RESERVED_INIT_KWARGS = frozenset({"id", "resume", "dir", "reinit", "settings", "mode", "config", "resume_from", "fork_from"})


def resolve_mode() -> str:
    """Offline is the embedded default; an API key (or WANDB_MODE) turns on online uploads unchanged."""
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if mode in {"online", "offline", "disabled"}:
        return mode
    if mode == "dryrun":
        return "offline"
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


@dataclass(frozen=True)
class WriterOptions:
    runs_dir: Path  # segment directories: <runs_dir>/<wandb id>/<seq>/wandb/...
    mode: str = "offline"
    layers: settings.Layers = settings.Layers()  # init_kwargs (project, entity, tags, ...), resolved per run
    flush_interval_s: float = 0.5  # how long a logged row may sit in wandb-core before reaching the file
    segment_idle_s: float = 30.0  # an idle segment is closed so that its rows count as uploaded
    segment_max_rows: int = 200_000
    batch_rows: int = 5_000  # rows per run per drain call, so that one big backfill does not starve live runs
    exit_timeout_s: float = 120.0
    media_dir: Path | None = None  # where val images and masks are written for the tables; None: no tables


@dataclass
class _OpenSegment:
    segment_id: int
    run_id: int
    handle: Any  # wandb.Run
    sync_file: Path | None
    steps: list[int] = field(default_factory=list)
    last_activity: float = field(default_factory=time.monotonic)


class SegmentVerificationError(RuntimeError):
    """The `.wandb` file read back does not hold exactly the rows that were logged into it."""


class WandbWriter:
    def __init__(self, db: Database, options: WriterOptions, checkpoint_options: CheckpointOptions | None = None) -> None:
        self.db = db
        self.options = options
        self.checkpoint_options = checkpoint_options
        self._open: dict[int, _OpenSegment] = {}
        self._media: dict[int, tables.ValMedia] = {}

    def warm_up(self) -> None:
        """Start wandb-core in the background (the first wandb.init of a process pays ~0.5 s for it),
        so that it overlaps with reading the logs instead of delaying the first row."""
        threading.Thread(target=wandb.setup, name="wandb-setup", daemon=True).start()

    def recover(self) -> None:
        """Settle segments a previous process left open: keep one that is complete, else rebuild it from the DB."""
        with self.db.transaction() as session:
            stale = session.scalars(select(Segment).where(Segment.state == SegmentState.OPEN)).all()
            leftovers = [(s.id, s.run_id, Path(s.dir), s.mode) for s in stale]
        for segment_id, run_id, directory, mode in leftovers:
            if run_id in self._open:
                continue
            try:
                if mode == "offline":
                    self._verify_and_close(segment_id, self._sync_file_in(directory))
                    log.info("segment %s of run %s was complete; kept", segment_id, run_id)
                    continue
            except (SegmentVerificationError, FileNotFoundError, TimeoutError, wandb_reader.WandbFileError) as exc:
                log.info("segment %s of run %s not complete (%s); rebuilding it from the DB", segment_id, run_id, exc)
            self._discard(segment_id, directory)

    def pending_runs(self) -> list[int]:
        with self.db.transaction() as session:
            return list(
                session.scalars(
                    select(OutboxRow.run_id).where(OutboxRow.uploaded.is_(False), OutboxRow.segment_id.is_(None)).distinct()
                )
            )

    def drain(self) -> int:
        """Log one batch of pending rows of every run that has some, then every checkpoint and prediction
        table that is due; returns how many rows, checkpoints and tables were logged."""
        logged = 0
        for run_id in self.pending_runs():
            try:
                logged += self._drain_run(run_id)
            except Exception as exc:  # one broken run must not stop the others
                log.exception("run %s: upload failed", run_id)
                self._fail_run(run_id, exc)
        if self.checkpoint_options is not None:
            for upload in checkpoints.due_uploads(self.db, self.checkpoint_options):
                try:
                    logged += self._log_checkpoint(upload)
                except Exception as exc:
                    log.exception("checkpoint %s: upload failed", upload.path)
                    self._fail_run(upload.run_id, exc)
        if self.options.media_dir is not None:
            for prediction in evaluations.due_predictions(self.db):
                try:
                    logged += self._log_predictions(prediction)
                except Exception as exc:
                    log.exception("eval job %s: prediction table failed", prediction.job_id)
                    self._fail_run(prediction.run_id, exc)
        return logged

    def close_idle(self) -> None:
        now = time.monotonic()
        for run_id, seg in list(self._open.items()):
            if now - seg.last_activity >= self.options.segment_idle_s or len(seg.steps) >= self.options.segment_max_rows:
                self.close(run_id)

    def close_all(self) -> None:
        for run_id in list(self._open):
            self.close(run_id)

    def close(self, run_id: int) -> None:
        seg = self._open.pop(run_id)
        try:
            with self.db.transaction() as session:
                summary = json.loads(session.get_one(Run, run_id).summary_json)
            seg.handle.summary.update(summary)
            seg.handle.finish()
            self._verify_and_close(seg.segment_id, seg.sync_file)
        except Exception as exc:
            log.exception("run %s: closing segment %s failed; it will be rebuilt", run_id, seg.segment_id)
            self._discard(seg.segment_id, None)
            self._fail_run(run_id, exc)

    def _drain_run(self, run_id: int) -> int:
        with self.db.transaction() as session:
            rows = session.execute(
                select(OutboxRow.id, OutboxRow.step, OutboxRow.payload_json)
                .where(OutboxRow.run_id == run_id, OutboxRow.uploaded.is_(False), OutboxRow.segment_id.is_(None))
                .order_by(OutboxRow.step)
                .limit(self.options.batch_rows)
            ).all()
        if not rows:
            return 0
        seg = self._open.get(run_id) or self._open_segment(run_id, rows[0].step)
        if seg.steps and rows[0].step <= seg.steps[-1]:
            raise RuntimeError(f"run {run_id}: step {rows[0].step} is not above {seg.steps[-1]}")
        for row in rows:
            seg.handle.log(json.loads(row.payload_json), step=row.step, commit=True)
            seg.steps.append(row.step)
        with self.db.transaction() as session:
            session.execute(
                update(OutboxRow).where(OutboxRow.id.in_([r.id for r in rows])).values(segment_id=seg.segment_id)
            )
        seg.last_activity = time.monotonic()
        return len(rows)

    def _open_segment(self, run_id: int, first_step: int | None) -> _OpenSegment:
        with self.db.transaction() as session:
            run = session.get_one(Run, run_id)
            done = session.scalar(
                select(func.max(Segment.last_step)).where(Segment.run_id == run_id, Segment.state == SegmentState.CLOSED)
            )
            if done is not None and first_step is not None and first_step <= done:
                raise RuntimeError(f"run {run.wandb_id}: pending step {first_step} is not above uploaded step {done}")
            seq = (session.scalar(select(func.max(Segment.seq)).where(Segment.run_id == run_id)) or 0) + 1
            directory = self.options.runs_dir / run.wandb_id / f"{seq:04d}"
            segment = Segment(run_id=run_id, seq=seq, dir=str(directory), mode=self.options.mode)
            session.add(segment)
            session.flush()
            segment_id = segment.id
            init = self._init_kwargs(run, directory)
            config = json.loads(run.config_json) if run.config_json else {}
            config_file = (run.config_name, run.config_text) if seq == 1 and run.config_text else None
            by_epoch = run.by_epoch
        directory.mkdir(parents=True, exist_ok=True)
        handle = wandb.init(**init)
        _define_metrics(handle, by_epoch)
        if config:
            handle.config.update(config, allow_val_change=True)
        if config_file is not None:
            _save_config_file(handle, directory, *config_file)
        if self.options.mode == "online":
            self._mark_already_on_server(run_id, handle.step)
        sync_file = Path(handle.settings.sync_file) if self.options.mode == "offline" else None
        seg = _OpenSegment(segment_id=segment_id, run_id=run_id, handle=handle, sync_file=sync_file)
        self._open[run_id] = seg
        log.info("run %s: opened segment %s in %s", init["id"], seq, directory)
        return seg

    def _log_checkpoint(self, upload: checkpoints.Upload) -> int:
        """Hash the pinned file once and log it as a version of `run_<id>_model` in the run's open segment."""
        try:
            with open(upload.path, "rb") as handle:
                digests = ckpt_file.hash_file(handle)
        except (OSError, ckpt_file.ChangedWhileReading) as exc:
            checkpoints.recheck(self.db, upload.checkpoint_id, f"cannot hash: {exc}")
            return 0
        seg = self._open.get(upload.run_id) or self._open_segment(upload.run_id, None)
        with self.db.transaction() as session:
            wandb_id = session.get_one(Run, upload.run_id).wandb_id
        metadata = dict(upload.metadata)
        metadata["checkpoint"] = {**metadata.get("checkpoint", {}), "size": digests.size, "sha256": digests.sha256_hex}
        artifact = wandb.Artifact(f"run_{wandb_id}_model", type="model", metadata=metadata)
        add_hashed_file(artifact, upload.path, upload.name, digests)
        seg.handle.log_artifact(artifact, aliases=upload.aliases)
        seg.last_activity = time.monotonic()
        with self.db.transaction() as session:
            row = session.get_one(Checkpoint, upload.checkpoint_id)
            row.segment_id = seg.segment_id
            row.md5_b64, row.sha256, row.size = digests.md5_b64, digests.sha256_hex, digests.size
            row.metadata_json = json.dumps(metadata, default=str)
            row.aliases_json = json.dumps(upload.aliases)
        log.info("run %s: logged %s as %s", wandb_id, upload.name, ", ".join(upload.aliases))
        return 1

    def _log_predictions(self, upload: evaluations.PredictionUpload) -> int:
        """A version of `run_<id>_pred` whose images are references into the run's `val` artifact."""
        seg = self._open.get(upload.run_id) or self._open_segment(upload.run_id, None)
        media = self._media_of(upload.manifest_id)
        client_id, val = self._val_artifact(seg, media)
        with self.db.transaction() as session:
            wandb_id = session.get_one(Run, upload.run_id).wandb_id
        artifact = tables.prediction_artifact(
            f"run_{wandb_id}_pred", media, tables.predictions_of(self.db, upload.job_id), client_id, val, upload.metadata
        )
        seg.handle.log_artifact(artifact, aliases=upload.aliases)
        seg.last_activity = time.monotonic()
        with self.db.transaction() as session:
            session.get_one(EvalJob, upload.job_id).segment_id = seg.segment_id
        log.info("run %s: logged predictions as %s", wandb_id, ", ".join(upload.aliases))
        return 1

    def _media_of(self, manifest_id: int) -> tables.ValMedia:
        if manifest_id not in self._media:
            assert self.options.media_dir is not None
            self._media[manifest_id] = tables.materialize(self.db, manifest_id, self.options.media_dir)
        return self._media[manifest_id]

    def _val_artifact(self, seg: _OpenSegment, media: tables.ValMedia) -> tuple[str, dict[str, Any]]:
        """The run's `val` artifact for this manifest: logged once (in this segment, if not yet)."""
        with self.db.transaction() as session:
            known = session.scalar(
                select(RunValArtifact).where(RunValArtifact.run_id == seg.run_id, RunValArtifact.manifest_id == media.manifest_id)
            )
            if known is not None:
                return known.client_id, json.loads(known.entries_json)
        artifact = tables.val_artifact(media)
        seg.handle.log_artifact(artifact)
        val = tables.val_entries(artifact, media)
        with self.db.transaction() as session:
            session.add(
                RunValArtifact(
                    run_id=seg.run_id, manifest_id=media.manifest_id, segment_id=seg.segment_id,
                    client_id=artifact._client_id, artifact_digest=artifact.digest, entries_json=json.dumps(val),
                )
            )
        return artifact._client_id, val

    def _init_kwargs(self, run: Run, directory: Path) -> dict[str, Any]:
        """init_kwargs merged key by key: CLI > environment (WANDB_PROJECT, ...) > config file > the hook's > ours."""
        merged = settings.for_run(self.options.layers, run.hook_options_json).init_kwargs
        kwargs: dict[str, Any] = {"name": run.name, "group": run.group, "job_type": run.job_type, "project": DEFAULT_PROJECT}
        kwargs.update({k: v for k, v in merged.items() if k not in RESERVED_INIT_KWARGS})
        kwargs.update(
            id=run.wandb_id,
            resume="allow",
            dir=str(directory),
            settings=wandb.Settings(
                mode=self.options.mode,
                console="off",
                silent=True,
                reinit="create_new",
                x_disable_stats=True,
                x_save_requirements=False,
                disable_git=True,
                disable_code=True,
                x_transaction_log_flush_interval=self.options.flush_interval_s,
            ),
        )
        return kwargs

    def _mark_already_on_server(self, run_id: int, server_step: int) -> None:
        """Online resume: rows below the server's next step reached W&B before a crash."""
        with self.db.transaction() as session:
            session.execute(
                update(OutboxRow)
                .where(OutboxRow.run_id == run_id, OutboxRow.step < server_step, OutboxRow.uploaded.is_(False))
                .values(uploaded=True)
            )

    def _verify_and_close(self, segment_id: int, sync_file: Path | None) -> None:
        with self.db.transaction() as session:
            expected = list(
                session.scalars(select(OutboxRow.step).where(OutboxRow.segment_id == segment_id).order_by(OutboxRow.step))
            )
            logged_files = {
                (row.name, row.md5_b64)
                for row in session.scalars(select(Checkpoint).where(Checkpoint.segment_id == segment_id))
            }
            logged_vals = set(session.scalars(select(RunValArtifact.artifact_digest).where(RunValArtifact.segment_id == segment_id)))
            logged_preds = len(session.scalars(select(EvalJob.id).where(EvalJob.segment_id == segment_id)).all())
        if sync_file is not None:
            wandb_reader.wait_for_exit(sync_file, self.options.exit_timeout_s)
            scan = wandb_reader.scan_segment(sync_file)
            if scan.steps != expected:
                raise SegmentVerificationError(
                    f"{sync_file}: {len(scan.steps)} rows read back, {len(expected)} logged"
                    + (f"; first difference at row {_first_difference(scan.steps, expected)}" if scan.steps else "")
                )
            written_files = {(e["path"], e["digest"]) for a in scan.artifacts if a.type == "model" for e in a.entries}
            if not logged_files <= written_files:
                raise SegmentVerificationError(f"{sync_file}: checkpoints missing: {sorted(logged_files - written_files)}")
            written_vals = {a.digest for a in scan.artifacts if a.type == "dataset" and a.name == tables.VAL_ARTIFACT}
            written_preds = sum(1 for a in scan.artifacts if a.type == "evaluation")
            if not logged_vals <= written_vals or written_preds != logged_preds:
                raise SegmentVerificationError(
                    f"{sync_file}: {len(written_vals)}/{len(logged_vals)} val and {written_preds}/{logged_preds} prediction artifacts read back"
                )
        with self.db.transaction() as session:
            segment = session.get_one(Segment, segment_id)
            segment.state = SegmentState.CLOSED
            segment.closed_at = utcnow()
            segment.rows = len(expected)
            segment.first_step = expected[0] if expected else None
            segment.last_step = expected[-1] if expected else None
            session.execute(update(OutboxRow).where(OutboxRow.segment_id == segment_id).values(uploaded=True))
            checkpoints.mark_uploaded(session, segment_id, unpin=segment.mode == "online")
            session.execute(update(EvalJob).where(EvalJob.segment_id == segment_id).values(uploaded=True))
            session.get_one(Run, segment.run_id).last_error = None

    def _discard(self, segment_id: int, directory: Path | None) -> None:
        """An unverified segment is never synced: delete its files and give its rows back to the outbox."""
        with self.db.transaction() as session:
            segment = session.get_one(Segment, segment_id)
            segment.state = SegmentState.DISCARDED
            segment.closed_at = utcnow()
            directory = directory or Path(segment.dir)
            session.execute(
                update(OutboxRow)
                .where(OutboxRow.segment_id == segment_id, OutboxRow.uploaded.is_(False))
                .values(segment_id=None)
            )
            session.execute(update(Checkpoint).where(Checkpoint.segment_id == segment_id).values(segment_id=None))
            session.execute(update(EvalJob).where(EvalJob.segment_id == segment_id).values(segment_id=None))
            session.execute(delete(RunValArtifact).where(RunValArtifact.segment_id == segment_id))
        if segment.mode == "offline":
            shutil.rmtree(directory, ignore_errors=True)

    def _fail_run(self, run_id: int, exc: BaseException) -> None:
        seg = self._open.pop(run_id, None)
        if seg is not None:
            try:
                seg.handle.finish(exit_code=1)
            except Exception:  # the run object is already broken; its segment is discarded below
                log.debug("finish after failure raised", exc_info=True)
            self._discard(seg.segment_id, None)
        with self.db.transaction() as session:
            session.get_one(Run, run_id).last_error = f"{type(exc).__name__}: {exc}"

    @staticmethod
    def _sync_file_in(directory: Path) -> Path:
        files = wandb_reader.find_run_files(directory)
        if len(files) != 1:
            raise FileNotFoundError(f"{directory}: expected one .wandb file, found {len(files)}")
        return files[0]


def _define_metrics(handle: Any, by_epoch: bool | None) -> None:
    """x-axes: train curves over the global iteration, val curves over the epoch (or iteration, iter-based)."""
    handle.define_metric("iter")
    handle.define_metric("epoch")
    handle.define_metric("train/*", step_metric="iter")
    handle.define_metric("learning_rate*", step_metric="iter")
    handle.define_metric("momentum", step_metric="iter")
    handle.define_metric("val/*", step_metric="iter" if by_epoch is False else "epoch")


def _save_config_file(handle: Any, directory: Path, name: str | None, text: str) -> None:
    """Upload the training config as a run file, from our own copy (nothing is written in the work_dir)."""
    copy = directory / "config" / (name or "config.py")
    copy.parent.mkdir(parents=True, exist_ok=True)
    copy.write_text(text, encoding="utf-8")
    handle.save(str(copy), base_path=str(copy.parent), policy="now")


def add_hashed_file(artifact: wandb.Artifact, path: Path, name: str, digests: ckpt_file.Digests) -> None:
    """What `add_file(path, name, policy="immutable")` does, minus its second read of a multi-GB file:
    the md5 we already computed is the entry's digest. (`add_file` is exactly LogicalPath + md5 +
    `_add_local_file`; tests/test_wandb_writer.py checks the entries stay identical on wandb upgrades.)"""
    artifact._add_local_file(LogicalPath(name), str(path), digest=digests.md5_b64, policy="immutable")


def _first_difference(written: list[Any], expected: list[int]) -> int:
    for index, (a, b) in enumerate(zip(written, expected)):
        if a != b:
            return index
    return min(len(written), len(expected))

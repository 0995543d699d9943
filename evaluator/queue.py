"""The eval job queue in the state DB (DESIGN 8): leased, not locked.

- claim: one UPDATE … WHERE id = (oldest claimable) RETURNING. SQLite serialises it with BEGIN IMMEDIATE
  (db/session.py); PostgreSQL skips rows another worker holds (FOR UPDATE SKIP LOCKED, dropped on SQLite).
  Claimable = queued and due, or running with an expired lease (its worker died). Attempts count at claim
  time, so a worker that dies still uses one up.
- renew / complete / fail are fenced on (id, owner, running): a worker that lost its lease learns it and
  drops its result instead of overwriting another worker's.
- failures: retryable ones go back to the queue after a capped exponential backoff with jitter; permanent
  ones, and jobs out of attempts, are parked as `dead` with their error (never deleted; `requeue` revives).

The only module with dialect-specific SQL (the insert-or-ignore of a manifest).
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass

import orjson

from sqlalchemy import and_, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from db.models import EvalJob, JobState, Prediction, ValImage, ValManifest, utcnow
from db.session import Database
from evaluator.records import EvalOutcome, Manifest

log = logging.getLogger("mmdet_wandb.queue")

BACKOFF_BASE_S = 10.0
BACKOFF_CAP_S = 600.0


@dataclass(frozen=True)
class ClaimedJob:
    id: int
    attempts: int
    checkpoint_path: str
    work_dir: str
    config_name: str | None
    config_text: str | None
    num_eval_images: int
    bbox_score_thr: float


def claim(db: Database, worker_id: str, lease_s: float, now: float | None = None) -> ClaimedJob | None:
    now = time.time() if now is None else now
    claimable = or_(
        and_(EvalJob.state == JobState.QUEUED, EvalJob.run_after <= now),
        and_(EvalJob.state == JobState.RUNNING, EvalJob.lease_expires_at < now),
    )
    candidate = (
        select(EvalJob.id)
        .where(claimable, EvalJob.attempts < EvalJob.max_attempts)
        .order_by(EvalJob.run_after, EvalJob.id)
        .limit(1)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    with db.transaction() as session:
        _park_exhausted(session, now)
        row = session.execute(
            update(EvalJob)
            .where(EvalJob.id == candidate)
            .values(
                state=JobState.RUNNING,
                lease_owner=worker_id,
                lease_expires_at=now + lease_s,
                attempts=EvalJob.attempts + 1,
            )
            .returning(
                EvalJob.id, EvalJob.attempts, EvalJob.checkpoint_path, EvalJob.work_dir, EvalJob.config_name,
                EvalJob.config_text, EvalJob.num_eval_images, EvalJob.bbox_score_thr,
            )
        ).first()
    return ClaimedJob(*row) if row is not None else None


def _park_exhausted(session: Session, now: float) -> None:
    """A job whose worker died on its last attempt is claimable no more: park it with the reason."""
    session.execute(
        update(EvalJob)
        .where(EvalJob.state == JobState.RUNNING, EvalJob.lease_expires_at < now, EvalJob.attempts >= EvalJob.max_attempts)
        .values(state=JobState.DEAD, lease_owner=None, finished_at=utcnow(),
                last_error="its worker stopped renewing the lease on every attempt")
    )


def _fenced(job_id: int, worker_id: str):  # type: ignore[no-untyped-def]
    return and_(EvalJob.id == job_id, EvalJob.lease_owner == worker_id, EvalJob.state == JobState.RUNNING)


def renew(db: Database, job_id: int, worker_id: str, lease_s: float) -> bool:
    """Extend the lease; False means another worker took the job over (ours expired)."""
    with db.transaction() as session:
        result = session.execute(
            update(EvalJob).where(_fenced(job_id, worker_id)).values(lease_expires_at=time.time() + lease_s)
        )
    return result.rowcount == 1


def complete(db: Database, job_id: int, worker_id: str, outcome: EvalOutcome) -> bool:
    """Store the manifest (once per digest), the predictions and the subset metrics; fenced."""
    with db.transaction() as session:
        job = session.scalar(select(EvalJob).where(_fenced(job_id, worker_id)))
        if job is None:
            return False
        job.manifest_id = store_manifest(session, outcome.manifest)
        session.execute(Prediction.__table__.delete().where(Prediction.job_id == job_id))
        if outcome.predictions:  # an empty executemany would become INSERT … DEFAULT VALUES
            session.execute(
                Prediction.__table__.insert(),
                [{"job_id": job_id, "position": i, "result_json": p.to_json()} for i, p in enumerate(outcome.predictions)],
            )
        job.metrics_json = orjson.dumps(outcome.metrics).decode()
        job.device, job.seconds, job.note = outcome.device, outcome.seconds, outcome.note
        job.state, job.lease_owner, job.lease_expires_at = JobState.DONE, None, None
        job.last_error = None
        job.finished_at = utcnow()
    return True


def fail(db: Database, job_id: int, worker_id: str, error: str, *, retryable: bool) -> bool:
    """Back to the queue after a backoff (retryable, attempts left), else parked as dead; fenced."""
    with db.transaction() as session:
        job = session.scalar(select(EvalJob).where(_fenced(job_id, worker_id)))
        if job is None:
            return False
        job.last_error = error
        job.lease_owner, job.lease_expires_at = None, None
        if retryable and job.attempts < job.max_attempts:
            job.state = JobState.QUEUED
            job.run_after = time.time() + backoff_s(job.attempts)
        else:
            job.state = JobState.DEAD
            job.finished_at = utcnow()
    return True


def backoff_s(attempts: int) -> float:
    """min(cap, base·2^(attempts-1)) ± 10 %."""
    return min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** max(0, attempts - 1)) * random.uniform(0.9, 1.1)


def requeue(db: Database, job_ids: list[int] | None = None) -> int:
    """Operator command: give dead jobs (all, or the ones named) a fresh set of attempts."""
    with db.transaction() as session:
        stmt = update(EvalJob).where(EvalJob.state == JobState.DEAD)
        if job_ids:
            stmt = stmt.where(EvalJob.id.in_(job_ids))
        result = session.execute(stmt.values(state=JobState.QUEUED, attempts=0, run_after=0.0, finished_at=None))
    return result.rowcount


def has_manifest(db: Database, digest: str) -> bool:
    with db.transaction() as session:
        return session.scalar(select(ValManifest.id).where(ValManifest.digest == digest)) is not None


def store_manifest(session: Session, manifest: Manifest) -> int:
    """Insert-or-ignore by digest: two workers finishing on the same subset store it once."""
    digest = manifest.digest
    values = {
        "digest": digest,
        "classes_json": orjson.dumps(manifest.classes).decode(),
        "num_images": len(manifest.images),
        "source_json": orjson.dumps(manifest.source).decode(),
        "created_at": utcnow(),
    }
    dialect = session.get_bind().dialect.name
    insert = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(ValManifest)
    inserted = session.execute(
        insert.values(**values).on_conflict_do_nothing(index_elements=["digest"]).returning(ValManifest.id)
    ).scalar()
    if inserted is None:
        return session.scalar(select(ValManifest.id).where(ValManifest.digest == digest))  # type: ignore[return-value]
    if not manifest.images:
        return inserted
    session.execute(
        ValImage.__table__.insert(),
        [
            {
                "manifest_id": inserted, "position": im.position, "dataset_index": im.dataset_index,
                "image_name": im.image_name, "file_ext": im.file_ext, "width": im.width, "height": im.height,
                "image_bytes": im.image_bytes, "ground_truth_json": im.ground_truth.to_json(),
            }
            for im in manifest.images
        ],
    )
    return inserted

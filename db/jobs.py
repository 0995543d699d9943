"""Every statement about eval jobs (DESIGN 8: leased, not locked): the uploader adds them and releases their
pins, workers claim, renew, complete and fail them, the operator requeues or drops them.

- claim: one UPDATE … WHERE id = (oldest claimable) RETURNING. SQLite serialises it with BEGIN IMMEDIATE
  (db/session.py); PostgreSQL skips rows another worker holds (FOR UPDATE SKIP LOCKED, dropped on SQLite).
  Claimable = queued and due, or running with an expired lease (its worker died). Attempts count at claim
  time, so a worker that dies still uses one up.
- renew / complete / fail are fenced on (id, owner, running): a worker that lost its lease learns it and
  drops its result instead of overwriting another worker's.
- failures: retryable ones go back to the queue after a capped exponential backoff with jitter; permanent
  ones, and jobs out of attempts, are parked as `dead` with their error (never deleted; `requeue` revives).
- pins: a job holds its own hard link of the checkpoint until it is done; a dead job keeps it, so that
  `requeue` can run it again, until the operator drops it (`requeue --drop`).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import orjson
from sqlalchemy import and_, case, func, or_, select, update
from sqlalchemy.orm import Session

from common import events
from common.backoff import backoff_s
from common.records import EvalOutcome
from db import eval_results
from db.models import EvalJob, JobState, Run, utcnow
from db.session import Database, node_of

log = logging.getLogger("mmdet_wandb.jobs")


@dataclass(frozen=True)
class ClaimedJob:
    id: int
    attempts: int
    stack: str
    checkpoint_path: str
    work_dir: str
    config_name: str | None
    config_text: str | None
    num_eval_images: int
    bbox_score_thr: float
    eval_classwise: bool = True
    confusion_score_thr: float = 0.3
    confusion_iou_thr: float = 0.5
    eval_full_val: bool = False  # the metrics over the whole val set; the tables stay on the subset


def claim(db: Database, worker_id: str, lease_s: float, now: float | None = None, *, stack: str) -> ClaimedJob | None:
    """The oldest claimable job of `stack` (the worker's installed one); `now`: the database's clock unless given (tests)."""
    with db.transaction() as session:
        now = db_clock(session) if now is None else now
        parked = _park_exhausted(session, now)
    for job_id, work_dir, checkpoint, attempts, error in parked:
        events.emit(log, events.EVAL_JOB_PARKED, "job %s parked: %s", job_id, error, level=logging.WARNING,
                    job_id=job_id, work_dir=work_dir, checkpoint=checkpoint, attempt=attempts, error=error)
    with db.transaction() as session:
        claimable = or_(
            and_(EvalJob.state == JobState.QUEUED, EvalJob.run_after <= now),
            and_(EvalJob.state == JobState.RUNNING, EvalJob.lease_expires_at < now),
        )
        candidate = (
            select(EvalJob.id)
            .where(claimable, EvalJob.attempts < EvalJob.max_attempts, EvalJob.stack == stack)
            .order_by(EvalJob.run_after, EvalJob.id)
            .limit(1)
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
        row = session.execute(
            update(EvalJob)
            .where(EvalJob.id == candidate)
            .values(
                state=JobState.RUNNING,
                lease_owner=worker_id,
                lease_expires_at=now + lease_s,
                attempts=EvalJob.attempts + 1,
                leases_lost=EvalJob.leases_lost + case((EvalJob.state == JobState.RUNNING, 1), else_=0),  # taken over
            )
            .returning(
                EvalJob.id, EvalJob.attempts, EvalJob.stack, EvalJob.checkpoint_path, EvalJob.work_dir, EvalJob.config_name,
                EvalJob.config_text, EvalJob.num_eval_images, EvalJob.bbox_score_thr, EvalJob.eval_classwise,
                EvalJob.confusion_score_thr, EvalJob.confusion_iou_thr, EvalJob.eval_full_val,
            )
        ).first()
    return ClaimedJob(*row) if row is not None else None


def db_clock(session: Session) -> float:
    """Epoch seconds by the database's clock (DESIGN 11): leases and backoff mean the same on every node,
    whatever the skew between their clocks. SQLite lives on one machine: its clock is this one."""
    if session.get_bind().dialect.name == "postgresql":
        return float(session.scalar(select(func.extract("epoch", func.clock_timestamp()))))  # type: ignore[arg-type]
    return time.time()


def _park_exhausted(session: Session, now: float) -> list[tuple[int, str, str, int, str]]:
    """A job whose worker died on its last attempt is claimable no more (the claim skips it): park it with the
    reason. Its own transaction, and rows another worker holds are skipped, not waited for: the next claim parks
    them, and the claim itself stays one statement (DESIGN 8). Returns what it parked (id, work_dir, checkpoint,
    attempts, error), for their events."""
    exhausted = (
        select(EvalJob.id)
        .where(EvalJob.state == JobState.RUNNING, EvalJob.lease_expires_at < now, EvalJob.attempts >= EvalJob.max_attempts)
        .with_for_update(skip_locked=True)
    )
    parked = session.execute(
        update(EvalJob)
        .where(EvalJob.id.in_(exhausted))
        .values(state=JobState.DEAD, lease_owner=None, finished_at=utcnow(), leases_lost=EvalJob.leases_lost + 1,
                last_error="its worker stopped renewing the lease on every attempt")
        .returning(EvalJob.id, EvalJob.work_dir, EvalJob.checkpoint_path, EvalJob.attempts, EvalJob.last_error)
    )
    return [tuple(row) for row in parked]  # type: ignore[misc]


def _fenced(job_id: int, worker_id: str):  # type: ignore[no-untyped-def]
    return and_(EvalJob.id == job_id, EvalJob.lease_owner == worker_id, EvalJob.state == JobState.RUNNING)


def renew(db: Database, job_id: int, worker_id: str, lease_s: float) -> bool:
    """Extend the lease; False means another worker took the job over (ours expired)."""
    with db.transaction() as session:
        result = session.execute(
            update(EvalJob).where(_fenced(job_id, worker_id)).values(lease_expires_at=db_clock(session) + lease_s)
        )
    return result.rowcount == 1


def complete(db: Database, job_id: int, worker_id: str, outcome: EvalOutcome) -> bool:
    """Store the manifest (once per digest), the predictions and the subset metrics; fenced."""
    with db.transaction() as session:
        job = session.scalar(select(EvalJob).where(_fenced(job_id, worker_id)))
        if job is None:
            return False
        job.manifest_id = eval_results.store_manifest(session, outcome.manifest)
        eval_results.store_predictions(session, job_id, outcome.predictions)
        job.metrics_json = orjson.dumps(outcome.metrics).decode()
        job.insight_json = orjson.dumps(outcome.insight).decode()
        job.device, job.seconds, job.note = outcome.device, outcome.seconds, outcome.note
        job.state, job.lease_owner, job.lease_expires_at = JobState.DONE, None, None
        job.last_error = None
        job.finished_at = utcnow()
    return True


def fail(db: Database, job_id: int, worker_id: str, error: str, *, retryable: bool) -> JobState | None:
    """Back to the queue after a backoff (retryable, attempts left), else parked as dead; fenced. Returns the job's
    new state (None: the lease was lost)."""
    with db.transaction() as session:
        job = session.scalar(select(EvalJob).where(_fenced(job_id, worker_id)))
        if job is None:
            return None
        job.last_error = error
        job.lease_owner, job.lease_expires_at = None, None
        if retryable and job.attempts < job.max_attempts:
            job.state = JobState.QUEUED
            job.run_after = db_clock(session) + backoff_s(job.attempts)
        else:
            job.state = JobState.DEAD
            job.finished_at = utcnow()
        return job.state


def requeue(db: Database, job_ids: list[int] | None = None) -> tuple[int, list[int]]:
    """Operator command: give dead jobs (all, or the ones named) a fresh set of attempts. Returns how many
    were requeued and the ids of dead jobs that cannot be, because their pin was dropped."""
    with db.transaction() as session:
        dead = select(EvalJob.id).where(EvalJob.state == JobState.DEAD)
        if job_ids:
            dead = dead.where(EvalJob.id.in_(job_ids))
        unpinned = list(session.scalars(dead.where(EvalJob.pinned.is_(False)).order_by(EvalJob.id)))
        result = session.execute(
            update(EvalJob)
            .where(EvalJob.id.in_(dead.where(EvalJob.pinned.is_(True))))
            .values(state=JobState.QUEUED, attempts=0, run_after=0.0, finished_at=None)
        )
    return result.rowcount, unpinned


def drop(db: Database, job_ids: list[int] | None = None) -> list[str]:
    """Operator command: release the pins of this node's dead jobs (all, or the ones named); they stay dead, for
    the record. Returns the pinned files (in this node's store), which the caller deletes once this is committed."""
    with db.transaction() as session:
        dead = [EvalJob.state == JobState.DEAD, _of_this_node(session)] + ([EvalJob.id.in_(job_ids)] if job_ids else [])
        return _release(session, *dead)


def release_done_pins(db: Database) -> list[str]:
    """The pins of this node's done jobs: no worker reads their checkpoint again. The caller deletes the files."""
    with db.transaction() as session:
        return _release(session, EvalJob.state == JobState.DONE, _of_this_node(session))


def _of_this_node(session: Session):  # type: ignore[no-untyped-def]
    """Jobs of runs that this session's uploader owns (their pins are in its store, their tables its to log)."""
    return EvalJob.run_id.in_(select(Run.id).where(Run.node == node_of(session)))


def _release(session: Session, *where: object) -> list[str]:
    released = session.execute(
        update(EvalJob).where(EvalJob.pinned.is_(True), *where).values(pinned=False).returning(EvalJob.checkpoint_path)
    ).scalars()
    return list(released)


def add(session: Session, **values: object) -> None:
    """A new job for one checkpoint (the uploader decides which checkpoints get one)."""
    session.add(EvalJob(**values))


def checkpoints_with_jobs():  # type: ignore[no-untyped-def]
    """The checkpoint ids that have a job, as a subquery for the uploader's look at ready checkpoints."""
    return select(EvalJob.checkpoint_id)


@dataclass(frozen=True)
class FinishedJob:
    """A done job, as the uploader turns it into a prediction table."""

    id: int
    run_id: int
    checkpoint_id: int
    manifest_id: int
    unit: str
    number: int
    num_eval_images: int
    bbox_score_thr: float
    metrics: dict[str, object]
    device: str | None
    seconds: float | None
    note: str | None
    insight: dict[str, object]
    eval_full_val: bool


def done(session: Session, excluding: object) -> list[FinishedJob]:
    """This node's done jobs whose id is not in `excluding` (a subquery of the jobs the caller already handled)."""
    jobs = session.scalars(
        select(EvalJob)
        .where(EvalJob.state == JobState.DONE, _of_this_node(session), EvalJob.id.not_in(excluding))
        .order_by(EvalJob.run_id, EvalJob.number, EvalJob.id)
    )
    return [
        FinishedJob(
            job.id, job.run_id, job.checkpoint_id, job.manifest_id, job.unit, job.number,  # type: ignore[arg-type]
            job.num_eval_images, job.bbox_score_thr, orjson.loads(job.metrics_json or "{}"), job.device, job.seconds, job.note,
            orjson.loads(job.insight_json or "{}"), job.eval_full_val,
        )
        for job in jobs
    ]


def unfinished(db: Database, stack: str | None = None) -> int:
    """Jobs queued or running (of one stack): a worker started with exit_when_idle stops at 0."""
    query = select(func.count()).where(EvalJob.state.in_((JobState.QUEUED, JobState.RUNNING)))
    with db.transaction() as session:
        return session.scalar(query if stack is None else query.where(EvalJob.stack == stack)) or 0


@dataclass(frozen=True)
class WaitingJob:
    run_id: int
    work_dir: str
    checkpoint_path: str
    config_name: str | None
    config_text: str | None


def waiting_per_run(db: Database) -> list[WaitingJob]:
    """One queued or running job per run (the oldest): what `doctor` checks the datasets of."""
    with db.read() as session:
        rows = session.execute(
            select(EvalJob.run_id, EvalJob.work_dir, EvalJob.checkpoint_path, EvalJob.config_name, EvalJob.config_text)
            .where(EvalJob.state.in_((JobState.QUEUED, JobState.RUNNING)))
            .order_by(EvalJob.run_id, EvalJob.id)
        ).all()
    firsts: dict[int, WaitingJob] = {}
    for row in rows:
        firsts.setdefault(row.run_id, WaitingJob(*row))
    return list(firsts.values())

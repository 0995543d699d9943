"""One node's totals (or every node's) for the metrics endpoint: a few aggregate queries, no row per work_dir.

The same figures `mmdet_wandb.status.collect` gives per work_dir, summed (tests/test_metrics.py compares them
against `status --json`); a scrape every few seconds must not read the per-work_dir table.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from sqlalchemy import Float, Select, bindparam, case, func, not_, or_, select
from sqlalchemy.orm import Session

from db.models import Checkpoint, EvalJob, JobState, OutboxRow, Problem, Run, Segment, SegmentState, WandbReachability, WorkDir

#: Upper bounds (seconds) of the eval job duration buckets.
JOB_SECONDS_BUCKETS = (1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


@dataclass(frozen=True)
class Totals:
    work_dirs: int
    rows_read: int  # every row given a step: uploaded + pending
    rows_pending: int
    oldest_pending_appended_at: float | None  # epoch s: the append of the oldest row not uploaded (None: none)
    runs_backing_off: int
    segments_open: int
    wandb_unreachable: bool  # some node in scope has its circuit open
    problems: dict[str, int]  # open ones, by kind
    checkpoints: dict[str, int]  # by state
    pinned_bytes: int  # of the checkpoint files in the store: each one's size once, however many links it has there
    eval_jobs: dict[str, int]  # by state
    job_seconds: JobSeconds  # of the done jobs
    leases_expired: int  # running jobs whose lease ran out (their worker stopped renewing it), not reclaimed yet
    leases_lost: int  # leases that ran out in all (the job taken over or parked), of the jobs in the DB
    changes_at: float  # when the figures of `now` change with no write (a backoff or a lease runs out); inf: never

    @property
    def rows_uploaded(self) -> int:
        return self.rows_read - self.rows_pending


@dataclass(frozen=True)
class JobSeconds:
    """The inference seconds of done jobs (each job's `seconds`, of its last attempt), as histogram buckets."""

    count: int
    total: float
    at_most: tuple[int, ...]  # done jobs of at most JOB_SECONDS_BUCKETS[i] seconds (cumulative)


@dataclass(frozen=True)
class _Statements:
    rows_read: Select  # type: ignore[type-arg]
    pending: Select  # type: ignore[type-arg]
    oldest: Select  # type: ignore[type-arg]
    backing_off: Select  # type: ignore[type-arg]
    segments: Select  # type: ignore[type-arg]
    reachability: Select  # type: ignore[type-arg]
    problems: Select  # type: ignore[type-arg]
    checkpoints: Select  # type: ignore[type-arg]
    pinned_bytes: Select  # type: ignore[type-arg]
    jobs: Select  # type: ignore[type-arg]
    work_dirs: Select  # type: ignore[type-arg]


@functools.lru_cache(maxsize=8)
def _statements(node: str | None) -> _Statements:
    """The scrape's statements for one scope, built once (`now` is a parameter): building them is most of what a
    scrape costs in Python."""
    now = bindparam("now", type_=Float)
    work_dirs = select(WorkDir.id) if node is None else select(WorkDir.id).where(WorkDir.node == node)
    runs = select(Run.id).where(Run.work_dir_id.in_(work_dirs))
    not_uploaded = (OutboxRow.run_id.in_(runs), not_(OutboxRow.uploaded))
    reachability = select(func.count()).select_from(WandbReachability).where(WandbReachability.error.is_not(None))
    problems = select(Problem.kind, func.count()).where(Problem.resolved_at.is_(None)).group_by(Problem.kind)
    if node is not None:
        reachability = reachability.where(WandbReachability.node == node)
        problems = problems.where(Problem.node == node)
    timed = EvalJob.seconds.is_not(None)
    return _Statements(
        # A run's rows have the steps 1 … next_step - 1: read is their sum; pending counts only the rows not uploaded.
        rows_read=select(func.coalesce(func.sum(Run.next_step - 1), 0)).where(Run.work_dir_id.in_(work_dirs)),
        pending=select(func.count()).select_from(OutboxRow).where(*not_uploaded),
        oldest=select(func.min(OutboxRow.appended_at)).where(*not_uploaded),
        backing_off=select(func.count(), func.min(Run.retry_at)).where(Run.work_dir_id.in_(work_dirs), Run.failures > 0, Run.retry_at > now),
        segments=select(func.count()).select_from(Segment).where(Segment.state == SegmentState.OPEN, Segment.run_id.in_(runs)),
        reachability=reachability,
        problems=problems,
        checkpoints=select(Checkpoint.state, func.count()).where(Checkpoint.work_dir_id.in_(work_dirs)).group_by(Checkpoint.state),
        # A checkpoint's own pin and its eval job's link are one file (hard links, or the job's link to the copy):
        # its size counts once while either is in the store.
        pinned_bytes=select(func.coalesce(func.sum(Checkpoint.size), 0)).where(
            Checkpoint.work_dir_id.in_(work_dirs),
            or_(Checkpoint.pin_path.is_not(None), Checkpoint.id.in_(select(EvalJob.checkpoint_id).where(EvalJob.pinned.is_(True))))),
        # One query for the jobs: their count by state, and, summed within each state, what durations and leases need.
        jobs=select(EvalJob.state, func.count(), func.sum(case((timed, 1), else_=0)), func.coalesce(func.sum(EvalJob.seconds), 0.0),
                    func.sum(case((EvalJob.lease_expires_at < now, 1), else_=0)),
                    func.min(case((EvalJob.lease_expires_at >= now, EvalJob.lease_expires_at))), func.sum(EvalJob.leases_lost),
                    *(func.sum(case((EvalJob.seconds <= bound, 1), else_=0)) for bound in JOB_SECONDS_BUCKETS))
        .join(Checkpoint, Checkpoint.id == EvalJob.checkpoint_id).where(Checkpoint.work_dir_id.in_(work_dirs)).group_by(EvalJob.state),
        work_dirs=select(func.count()).select_from(work_dirs.subquery()),
    )


def totals(session: Session, node: str | None, now: float) -> Totals:
    """`node` None: every node's, as `status` without `--node`; `now`: epoch seconds, for backoff and leases."""
    st, at = _statements(node), {"now": now}
    by_state = {getattr(state, "value", state): row for state, *row in session.execute(st.jobs, at).all()}
    done = by_state.get(JobState.DONE.value) or [0, 0, 0.0, 0, None, 0, *([0] * len(JOB_SECONDS_BUCKETS))]
    running = by_state.get(JobState.RUNNING.value) or [0, 0, 0.0, 0, None, 0]
    backing_off, next_retry = session.execute(st.backing_off, at).one()
    return Totals(
        work_dirs=session.scalar(st.work_dirs) or 0,
        rows_read=int(session.scalar(st.rows_read) or 0), rows_pending=session.scalar(st.pending) or 0,
        oldest_pending_appended_at=session.scalar(st.oldest), runs_backing_off=backing_off or 0,
        segments_open=session.scalar(st.segments) or 0, wandb_unreachable=bool(session.scalar(st.reachability)),
        problems=_counts(session, st.problems), checkpoints=_counts(session, st.checkpoints),
        pinned_bytes=int(session.scalar(st.pinned_bytes) or 0),
        eval_jobs={state: row[0] for state, row in by_state.items()},
        job_seconds=JobSeconds(int(done[1] or 0), float(done[2] or 0.0), tuple(int(n or 0) for n in done[6:])),
        leases_expired=int(running[3] or 0), leases_lost=sum(int(row[5] or 0) for row in by_state.values()),
        changes_at=min(next_retry or math.inf, running[4] or math.inf),
    )


@dataclass(frozen=True)
class WorkDirRows:
    path: str
    rows_read: int
    rows_pending: int

    @property
    def rows_uploaded(self) -> int:
        return self.rows_read - self.rows_pending


def newest_work_dirs(session: Session, node: str | None, limit: int) -> list[WorkDirRows]:
    """The rows of the `limit` work_dirs discovered last (highest id) that are still on disk: a bounded set of
    labels that follows the trainings that started last. Three queries over those work_dirs only."""
    chosen = select(WorkDir.id, WorkDir.path).where(not_(WorkDir.gone)).order_by(WorkDir.id.desc()).limit(limit)
    if node is not None:
        chosen = chosen.where(WorkDir.node == node)
    paths = dict(session.execute(chosen).all())
    read = dict(session.execute(
        select(Run.work_dir_id, func.sum(Run.next_step - 1)).where(Run.work_dir_id.in_(paths)).group_by(Run.work_dir_id)
    ).all())
    pending = dict(session.execute(
        select(Run.work_dir_id, func.count()).select_from(OutboxRow).join(Run, Run.id == OutboxRow.run_id)
        .where(Run.work_dir_id.in_(paths), not_(OutboxRow.uploaded)).group_by(Run.work_dir_id)
    ).all())
    return [WorkDirRows(path, int(read.get(i) or 0), int(pending.get(i) or 0)) for i, path in sorted(paths.items())]


def _counts(session: Session, query: Select) -> dict[str, int]:  # type: ignore[type-arg]
    return {getattr(key, "value", key): n for key, n in session.execute(query).all()}

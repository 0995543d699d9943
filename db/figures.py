"""One node's totals (or every node's) for the metrics endpoint: a few aggregate queries, no row per work_dir.

The same figures `mmdet_wandb.status.collect` gives per work_dir, summed (tests/test_metrics.py compares them
against `status --json`); a scrape every few seconds must not read the per-work_dir table.
"""
from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Select, func, not_, select
from sqlalchemy.orm import Session

from db.models import Checkpoint, EvalJob, OutboxRow, Problem, Run, Segment, SegmentState, WandbReachability, WorkDir


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
    eval_jobs: dict[str, int]  # by state

    @property
    def rows_uploaded(self) -> int:
        return self.rows_read - self.rows_pending


def totals(session: Session, node: str | None, now: float) -> Totals:
    """`node` None: every node's, as `status` without `--node`; `now`: epoch seconds, for backoff."""
    work_dirs = select(WorkDir.id) if node is None else select(WorkDir.id).where(WorkDir.node == node)
    runs = select(Run.id).where(Run.work_dir_id.in_(work_dirs))
    # A run's rows have the steps 1 … next_step - 1: read is their sum; pending counts only the rows not uploaded.
    rows_read = session.scalar(select(func.coalesce(func.sum(Run.next_step - 1), 0)).where(Run.work_dir_id.in_(work_dirs)))
    not_uploaded = (OutboxRow.run_id.in_(runs), not_(OutboxRow.uploaded))
    pending = session.scalar(select(func.count()).select_from(OutboxRow).where(*not_uploaded))
    oldest = session.scalar(select(func.min(OutboxRow.appended_at)).where(*not_uploaded))
    backing_off = session.scalar(
        select(func.count()).select_from(Run).where(Run.work_dir_id.in_(work_dirs), Run.failures > 0, Run.retry_at > now)
    )
    segments = session.scalar(
        select(func.count()).select_from(Segment).where(Segment.state == SegmentState.OPEN, Segment.run_id.in_(runs))
    )
    reachability = select(func.count()).select_from(WandbReachability).where(WandbReachability.error.is_not(None))
    problems = select(Problem.kind, func.count()).where(Problem.resolved_at.is_(None)).group_by(Problem.kind)
    if node is not None:
        reachability = reachability.where(WandbReachability.node == node)
        problems = problems.where(Problem.node == node)
    checkpoints = (select(Checkpoint.state, func.count()).where(Checkpoint.work_dir_id.in_(work_dirs))
                   .group_by(Checkpoint.state))
    jobs = (select(EvalJob.state, func.count()).join(Checkpoint, Checkpoint.id == EvalJob.checkpoint_id)
            .where(Checkpoint.work_dir_id.in_(work_dirs)).group_by(EvalJob.state))
    return Totals(
        work_dirs=session.scalar(select(func.count()).select_from(work_dirs.subquery())) or 0,
        rows_read=int(rows_read or 0), rows_pending=pending or 0, oldest_pending_appended_at=oldest, runs_backing_off=backing_off or 0,
        segments_open=segments or 0, wandb_unreachable=bool(session.scalar(reachability)),
        problems=_counts(session, problems), checkpoints=_counts(session, checkpoints), eval_jobs=_counts(session, jobs),
    )


def _counts(session: Session, query: Select) -> dict[str, int]:  # type: ignore[type-arg]
    return {getattr(key, "value", key): n for key, n in session.execute(query).tuples()}

"""Forgetting work_dirs deleted from disk (DESIGN 13): every statement that removes their state.

A log deleted while watched stays as a tombstone (its source in state `gone`, its runs, rows folded into spans),
so that the same log coming back (moved away and back, restored from a backup) is recognised and nothing of it
is uploaded twice. Kept forever, tombstones grow with every work_dir a node ever saw. So, as Filebeat's
`clean_removed`/`clean_inactive`, a work_dir whose every log has been gone for `after_s` is forgotten: once
nothing of it is pending (no row or artifact to upload, no segment open or waiting for W&B to confirm it, no
checkpoint being settled or still pinned in the store, no offline segment `mmdet-wandb sync` has not confirmed,
no eval job queued, running or holding a pin), all its rows go, in one transaction per work_dir. A work_dir that
comes back after that is new: new rows, a new W&B run.

Only this node's rows are looked at and removed (DESIGN 11); the offline `.wandb` files of its runs (all synced
by then) stay where they are, and no segment of the DB owns them any more.
"""
from __future__ import annotations

import datetime as dt

from sqlalchemy import delete, exists, func, or_, select
from sqlalchemy.orm import Session

from db.models import (
    Checkpoint,
    CheckpointState,
    EvalJob,
    JobState,
    OutboxArtifact,
    OutboxRow,
    Prediction,
    Problem,
    Run,
    Segment,
    SegmentState,
    SyncState,
    Source,
    SourceState,
    UploadedSpan,
    WorkDir,
    utcnow,
)
from db.session import Database, node_of

BATCH = 200  # work_dirs forgotten per call at most: a pass of the loop stays short after a mass deletion (the rest
# go at the next scans)


class _Changed(Exception):
    """Something of the work_dir became pending while it was being forgotten (a second writer): keep it all."""


def forget_deleted(db: Database, after_s: float, now: dt.datetime | None = None) -> list[str]:
    """Forget this node's work_dirs whose logs have all been gone for `after_s` and that have nothing pending;
    returns their paths. Each work_dir is one transaction: a crash leaves it whole or gone, never half."""
    cutoff = (now or utcnow()) - dt.timedelta(seconds=after_s)
    with db.read() as session:
        candidates = _candidates(session, cutoff)
    forgotten = []
    for work_dir_id, path in candidates:
        if len(forgotten) >= BATCH:
            break
        try:
            with db.transaction() as session:
                if _settled(session, work_dir_id, cutoff):
                    _remove(session, work_dir_id, path)
                    forgotten.append(path)
        except _Changed:
            continue
    return forgotten


def _candidates(session: Session, cutoff: dt.datetime) -> list[tuple[int, str]]:
    """This node's work_dirs with logs, every one of them gone since before `cutoff`."""
    alive = select(Source.id).where(Source.work_dir_id == WorkDir.id,
                                    or_(Source.state != SourceState.GONE, Source.updated_at >= cutoff))
    has_logs = select(Source.id).where(Source.work_dir_id == WorkDir.id)
    rows = session.execute(
        select(WorkDir.id, WorkDir.path)
        .where(WorkDir.node == node_of(session), exists(has_logs), ~exists(alive))
        .order_by(WorkDir.id)
    )
    return [(work_dir_id, path) for work_dir_id, path in rows]


def _settled(session: Session, work_dir_id: int, cutoff: dt.datetime) -> bool:
    """Checked again inside the transaction that removes it: still all gone, and nothing pending."""
    runs = select(Run.id).where(Run.work_dir_id == work_dir_id)
    pending = (
        select(Source.id).where(Source.work_dir_id == work_dir_id, or_(Source.state != SourceState.GONE, Source.updated_at >= cutoff)),
        select(OutboxRow.id).where(OutboxRow.run_id.in_(runs), OutboxRow.uploaded.is_(False)),
        select(OutboxArtifact.id).where(OutboxArtifact.run_id.in_(runs), OutboxArtifact.uploaded.is_(False), OutboxArtifact.error.is_(None)),
        select(Segment.id).where(Segment.run_id.in_(runs), Segment.state.in_((SegmentState.OPEN, SegmentState.SENT))),
        select(Segment.id).where(Segment.run_id.in_(runs), Segment.mode == "offline", Segment.state == SegmentState.CLOSED,
                                 Segment.sync_state.is_distinct_from(SyncState.SYNCED)),  # `mmdet-wandb sync` still needs them
        select(Checkpoint.id).where(
            Checkpoint.work_dir_id == work_dir_id,
            or_(Checkpoint.pin_path.is_not(None), Checkpoint.state.in_((CheckpointState.SEEN, CheckpointState.READY))),
        ),
        select(EvalJob.id).where(
            or_(EvalJob.run_id.in_(runs), EvalJob.checkpoint_id.in_(select(Checkpoint.id).where(Checkpoint.work_dir_id == work_dir_id))),
            or_(EvalJob.pinned.is_(True), EvalJob.state.in_((JobState.QUEUED, JobState.RUNNING))),
        ),
    )
    return not any(session.scalar(select(exists(query))) for query in pending)


def _remove(session: Session, work_dir_id: int, path: str) -> None:
    """Every row of the work_dir, those that reference others first (the foreign keys hold at each statement)."""
    runs = [r for (r,) in session.execute(select(Run.id).where(Run.work_dir_id == work_dir_id))]
    sources = [s for (s,) in session.execute(select(Source.id).where(Source.work_dir_id == work_dir_id))]
    checkpoints = [c for (c,) in session.execute(select(Checkpoint.id).where(Checkpoint.work_dir_id == work_dir_id))]
    jobs = [j for (j,) in session.execute(select(EvalJob.id).where(or_(EvalJob.run_id.in_(runs), EvalJob.checkpoint_id.in_(checkpoints))))]
    session.execute(delete(OutboxArtifact).where(or_(
        OutboxArtifact.run_id.in_(runs), OutboxArtifact.checkpoint_id.in_(checkpoints), OutboxArtifact.eval_job_id.in_(jobs))))
    session.execute(delete(Prediction).where(Prediction.job_id.in_(jobs)))
    finished = session.execute(delete(EvalJob).where(
        EvalJob.id.in_(jobs), EvalJob.pinned.is_(False), EvalJob.state.in_((JobState.DONE, JobState.DEAD))))
    if finished.rowcount != len(jobs):  # requeued by an operator meanwhile (PostgreSQL: another session)
        raise _Changed
    session.execute(delete(Checkpoint).where(Checkpoint.id.in_(checkpoints)))
    of_work_dir = or_(OutboxRow.run_id.in_(runs), OutboxRow.source_id.in_(sources))
    session.execute(delete(OutboxRow).where(of_work_dir, OutboxRow.uploaded.is_(True)))
    if session.scalar(select(func.count()).select_from(OutboxRow).where(of_work_dir)):
        raise _Changed  # a row that is not uploaded is never dropped
    session.execute(delete(UploadedSpan).where(or_(UploadedSpan.run_id.in_(runs), UploadedSpan.source_id.in_(sources))))
    session.execute(delete(Segment).where(Segment.run_id.in_(runs)))
    session.execute(delete(Problem).where(or_(
        Problem.work_dir_id == work_dir_id,
        (Problem.node == node_of(session)) & Problem.path.startswith(path.rstrip("/") + "/", autoescape=True))))
    session.execute(delete(Source).where(Source.id.in_(sources)))
    session.execute(delete(Run).where(Run.id.in_(runs)))
    session.execute(delete(WorkDir).where(WorkDir.id == work_dir_id))

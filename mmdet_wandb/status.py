"""A read-only report of the state DB: per work_dir, its W&B runs, rows pending/uploaded and problems."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import orjson
from sqlalchemy import func, not_, select

from db import outbox, reachability
from db.models import (
    ArtifactKind,
    Checkpoint,
    EvalJob,
    OutboxArtifact,
    JobState,
    OutboxRow,
    Problem,
    Run,
    Segment,
    SegmentState,
    SyncState,
    Source,
    WorkDir,
)
from db.session import Database


@dataclass
class RunStatus:
    wandb_id: str
    name: str
    job_type: str
    rows_uploaded: int
    rows_pending: int
    segments_closed: int
    last_error: str | None
    closed_segment_dirs: list[str] = field(default_factory=list)  # what `wandb sync` may upload
    failures: int = 0  # upload failures in a row
    retry_at: float | None = None  # epoch seconds of the next try after a failure
    artifacts_pending: int = 0  # checkpoint versions and tables not uploaded yet (not counting ones that cannot be built)
    segments_synced: int = 0  # offline segments a W&B server confirmed (`mmdet-wandb sync`)
    segments_to_sync: int = 0  # offline closed segments not confirmed yet
    sync_error: str | None = None  # the last refusal of `mmdet-wandb sync`


@dataclass
class WorkDirStatus:
    node: str  # the uploader that owns it
    path: str
    logs: int
    runs: list[RunStatus] = field(default_factory=list)
    problems: int = 0
    last_problem: str | None = None
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    eval_jobs: list[dict[str, Any]] = field(default_factory=list)

    def checkpoint_counts(self) -> dict[str, int]:
        return _count_states(self.checkpoints)

    def eval_job_counts(self) -> dict[str, int]:
        return _count_states(self.eval_jobs)


def _count_states(items: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in items:
        counts[item["state"]] = counts.get(item["state"], 0) + 1
    return counts


def collect(db: Database, node: str | None = None) -> list[WorkDirStatus]:
    """Every node's work_dirs, or one node's."""
    with db.read() as session:
        query = select(WorkDir).order_by(WorkDir.node, WorkDir.path)
        if node is not None:
            query = query.where(WorkDir.node == node)
        work_dirs = {w.id: WorkDirStatus(node=w.node, path=w.path, logs=0) for w in session.scalars(query)}
        ours = list(work_dirs)
        for work_dir_id, count in session.execute(
            select(Source.work_dir_id, func.count()).where(Source.work_dir_id.in_(ours)).group_by(Source.work_dir_id)
        ):
            work_dirs[work_dir_id].logs = count
        # Every row of a run has its own step, 1 … next_step - 1: only the rows not uploaded are counted, one
        # index search per run, so status does not read millions of uploaded rows.
        not_uploaded = select(func.count()).where(OutboxRow.run_id == Run.id, not_(OutboxRow.uploaded)).scalar_subquery()
        pending = dict(session.execute(select(Run.id, not_uploaded).where(Run.work_dir_id.in_(ours))).tuples().all())
        artifacts_pending = dict(session.execute(
            select(OutboxArtifact.run_id, func.count())
            .where(OutboxArtifact.uploaded.is_(False), OutboxArtifact.error.is_(None))
            .group_by(OutboxArtifact.run_id)
        ).tuples().all())
        closed: dict[int, list[str]] = {}
        sync: dict[int, list[int | str | None]] = {}  # run → [synced, to sync, last error]
        for run_id, directory, mode, sync_state, sync_error in session.execute(
            select(Segment.run_id, Segment.dir, Segment.mode, Segment.sync_state, Segment.sync_error)
            .where(Segment.state == SegmentState.CLOSED).order_by(Segment.seq)
        ):
            closed.setdefault(run_id, []).append(directory)
            if mode == "offline":
                counts = sync.setdefault(run_id, [0, 0, None])
                counts[0 if sync_state is SyncState.SYNCED else 1] += 1  # type: ignore[operator]
                counts[2] = sync_error if sync_state is not SyncState.SYNCED and sync_error else counts[2]
        for run in session.scalars(select(Run).where(Run.work_dir_id.in_(ours)).order_by(Run.launch)):
            waiting = pending.get(run.id, 0)
            work_dirs[run.work_dir_id].runs.append(
                RunStatus(
                    run.wandb_id, run.name, run.job_type, run.next_step - 1 - waiting, waiting, len(closed.get(run.id, [])), run.last_error,
                    closed.get(run.id, []), run.failures, run.retry_at, artifacts_pending.get(run.id, 0),
                    *sync.get(run.id, [0, 0, None]),  # type: ignore[arg-type]
                )
            )
        models = outbox.outcomes(session, ArtifactKind.MODEL)
        for ckpt in session.scalars(select(Checkpoint).where(Checkpoint.work_dir_id.in_(ours)).order_by(Checkpoint.id)):
            logged = models[ckpt.id].logged if ckpt.id in models else None
            work_dirs[ckpt.work_dir_id].checkpoints.append(
                {
                    "name": ckpt.name, "state": ckpt.state.value, "reason": ckpt.reason, "size": ckpt.size,
                    "sha256": ckpt.sha256,
                    "aliases": models[ckpt.id].aliases if ckpt.id in models else None,
                    "metadata": logged.get("metadata") if logged else None,
                }
            )
        tables = outbox.outcomes(session, ArtifactKind.PREDICTIONS)
        for job, ckpt in session.execute(
            select(EvalJob, Checkpoint)
            .join(Checkpoint, Checkpoint.id == EvalJob.checkpoint_id)
            .where(Checkpoint.work_dir_id.in_(ours))
            .order_by(EvalJob.id)
        ):
            work_dirs[ckpt.work_dir_id].eval_jobs.append(
                {
                    "id": job.id, "checkpoint": ckpt.name, "stack": job.stack, "state": job.state.value, "attempts": job.attempts,
                    "last_error": job.last_error, "note": job.note, "device": job.device, "seconds": job.seconds,
                    "table_uploaded": job.id in tables and tables[job.id].uploaded,
                    "pin": job.checkpoint_path if job.pinned and job.state is JobState.DEAD else None,
                    "metrics": json.loads(job.metrics_json) if job.metrics_json else None,
                }
            )
        for problem in session.scalars(_problems_of(node).where(Problem.resolved_at.is_(None)).order_by(Problem.last_seen)):
            target = work_dirs.get(problem.work_dir_id) if problem.work_dir_id is not None else None
            target = target or _by_path(work_dirs.values(), problem.path)
            if target is not None:
                target.problems += 1
                target.last_problem = f"{problem.kind}: {_where(problem)}: {problem.message}"
        return list(work_dirs.values())


@dataclass
class LooseProblem:
    """An open problem of no known work_dir (an unreadable folder, a name that is not UTF-8, a symlink out of
    the root): nothing below it is uploaded, so the table shows it on a row of its own."""

    node: str
    path: str
    kind: str
    message: str
    count: int


def loose_problems(db: Database, statuses: list[WorkDirStatus], node: str | None = None) -> list[LooseProblem]:
    with db.read() as session:
        return [
            LooseProblem(p.node, _where(p), p.kind, p.message, p.count)
            for p in session.scalars(_problems_of(node).where(Problem.resolved_at.is_(None), Problem.work_dir_id.is_(None))
                                     .order_by(Problem.node, Problem.path))
            if _by_path(statuses, p.path) is None
        ]


def _where(problem: Problem) -> str:
    return problem.path if problem.byte_offset < 0 else f"{problem.path}@{problem.byte_offset}"


def problems(db: Database, node: str | None = None) -> list[dict[str, Any]]:
    with db.read() as session:
        return [
            {"node": p.node, "path": p.path, "offset": p.byte_offset, "kind": p.kind, "message": p.message, "count": p.count,
             "resolved_at": p.resolved_at.isoformat() if p.resolved_at else None}
            for p in session.scalars(_problems_of(node).order_by(Problem.node, Problem.path, Problem.byte_offset))
        ]


def _problems_of(node: str | None):  # type: ignore[no-untyped-def]
    query = select(Problem)
    return query if node is None else query.where(Problem.node == node)


def unreachable(db: Database, node: str | None = None) -> list[dict[str, Any]]:
    """Online: the nodes whose uploader does not reach W&B now (every upload of theirs waits)."""
    with db.read() as session:
        return reachability.unreachable(session, node)


def as_json(statuses: list[WorkDirStatus], problem_list: list[dict[str, Any]], unreachable_list: list[dict[str, Any]]) -> str:
    """orjson writes the dataclasses as they are (`asdict` and json's indenting encoder took a third of `status
    --json` over 1,000 work_dirs); a NaN metric of an eval job becomes null, which JSON can hold."""
    document = {"work_dirs": statuses, "problems": problem_list, "wandb_unreachable": unreachable_list}
    return orjson.dumps(document, option=orjson.OPT_INDENT_2).decode()


def _by_path(statuses: Any, path: str) -> WorkDirStatus | None:
    best = None
    for status in statuses:
        if path.startswith(status.path.rstrip("/") + "/") and (best is None or len(status.path) > len(best.path)):
            best = status
    return best

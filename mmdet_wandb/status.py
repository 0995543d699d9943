"""A read-only report of the state DB: per work_dir, its W&B runs, rows pending/uploaded and problems."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import case, func, select

from db.models import Checkpoint, EvalJob, OutboxRow, Problem, Run, Segment, SegmentState, Source, WorkDir
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


@dataclass
class WorkDirStatus:
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


def collect(db: Database) -> list[WorkDirStatus]:
    with db.transaction() as session:
        work_dirs = {
            w.id: WorkDirStatus(path=w.path, logs=0) for w in session.scalars(select(WorkDir).order_by(WorkDir.path))
        }
        for work_dir_id, count in session.execute(select(Source.work_dir_id, func.count()).group_by(Source.work_dir_id)):
            work_dirs[work_dir_id].logs = count
        counts = {
            run_id: (up or 0, pending or 0)
            for run_id, up, pending in session.execute(
                select(
                    OutboxRow.run_id,
                    func.sum(case((OutboxRow.uploaded.is_(True), 1), else_=0)),
                    func.sum(case((OutboxRow.uploaded.is_(False), 1), else_=0)),
                ).group_by(OutboxRow.run_id)
            )
        }
        closed: dict[int, list[str]] = {}
        for run_id, directory in session.execute(
            select(Segment.run_id, Segment.dir).where(Segment.state == SegmentState.CLOSED).order_by(Segment.seq)
        ):
            closed.setdefault(run_id, []).append(directory)
        for run in session.scalars(select(Run).order_by(Run.launch)):
            up, pending = counts.get(run.id, (0, 0))
            work_dirs[run.work_dir_id].runs.append(
                RunStatus(
                    run.wandb_id, run.name, run.job_type, up, pending, len(closed.get(run.id, [])), run.last_error,
                    closed.get(run.id, []),
                )
            )
        for ckpt in session.scalars(select(Checkpoint).order_by(Checkpoint.id)):
            work_dirs[ckpt.work_dir_id].checkpoints.append(
                {
                    "name": ckpt.name, "state": ckpt.state.value, "reason": ckpt.reason, "size": ckpt.size,
                    "sha256": ckpt.sha256, "aliases": json.loads(ckpt.aliases_json) if ckpt.aliases_json else None,
                    "metadata": json.loads(ckpt.metadata_json) if ckpt.metadata_json else None,
                }
            )
        for job, ckpt in session.execute(
            select(EvalJob, Checkpoint).join(Checkpoint, Checkpoint.id == EvalJob.checkpoint_id).order_by(EvalJob.id)
        ).tuples():
            work_dirs[ckpt.work_dir_id].eval_jobs.append(
                {
                    "id": job.id, "checkpoint": ckpt.name, "state": job.state.value, "attempts": job.attempts,
                    "last_error": job.last_error, "note": job.note, "device": job.device, "seconds": job.seconds,
                    "table_uploaded": job.uploaded,
                    "metrics": json.loads(job.metrics_json) if job.metrics_json else None,
                }
            )
        for problem in session.scalars(select(Problem).order_by(Problem.last_seen)):
            target = work_dirs.get(problem.work_dir_id) if problem.work_dir_id is not None else None
            target = target or _by_path(work_dirs.values(), problem.path)
            if target is not None:
                target.problems += 1
                where = problem.path if problem.byte_offset < 0 else f"{problem.path}@{problem.byte_offset}"
                target.last_problem = f"{problem.kind}: {where}: {problem.message}"
        return list(work_dirs.values())


def problems(db: Database) -> list[dict[str, Any]]:
    with db.transaction() as session:
        return [
            {"path": p.path, "offset": p.byte_offset, "kind": p.kind, "message": p.message, "count": p.count}
            for p in session.scalars(select(Problem).order_by(Problem.path, Problem.byte_offset))
        ]


def as_json(statuses: list[WorkDirStatus], problem_list: list[dict[str, Any]]) -> dict[str, Any]:
    return {"work_dirs": [asdict(s) for s in statuses], "problems": problem_list}


def _by_path(statuses: Any, path: str) -> WorkDirStatus | None:
    best = None
    for status in statuses:
        if path.startswith(status.path.rstrip("/") + "/") and (best is None or len(status.path) > len(best.path)):
            best = status
    return best

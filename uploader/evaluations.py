"""The uploader's side of evaluation: one eval job per finished checkpoint, and what is due as tables.

A job gets its own hard link of the checkpoint in the store, so its life does not depend on the model
artifact's pin (which goes once W&B has the file, or right away when checkpoints are not logged); the link is
removed once the job is finished or parked.
"""
from __future__ import annotations

import errno
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select

from db.models import Checkpoint, CheckpointState, EvalJob, JobState
from db.session import Database
from uploader import checkpoints, settings

log = logging.getLogger("mmdet_wandb.evaluations")


@dataclass(frozen=True)
class PredictionUpload:
    """What the writer logs for one finished job: a version of `run_<id>_pred`."""

    job_id: int
    run_id: int
    manifest_id: int
    aliases: list[str]
    metadata: dict[str, Any]


def enqueue(db: Database, ckpt: checkpoints.CheckpointOptions) -> int:
    """Give every finished epoch/iter checkpoint of a run with num_eval_images > 0 its eval job; returns how
    many were queued. Without log_checkpoint a checkpoint is then done: its own pin goes (the job holds one).
    """
    queued = 0
    with db.transaction() as session:
        rows = session.scalars(  # decided while ready: the loop looks at checkpoints before it uploads them
            select(Checkpoint).where(
                Checkpoint.state == CheckpointState.READY,
                Checkpoint.pin_path.is_not(None),
                Checkpoint.id.not_in(select(EvalJob.checkpoint_id)),
            )
        ).all()
        for row in rows:
            run = checkpoints.run_of(session, row)
            if run is None:
                continue
            row.run_id = run.id
            run_settings = settings.for_run(ckpt.layers, run.hook_options_json)
            if checkpoints.evaluated(row, run_settings):
                link = _link(Path(row.pin_path), ckpt.store_dir / "eval" / f"{row.id}-{row.name}")  # type: ignore[arg-type]
                if link is None:
                    continue
                session.add(
                    EvalJob(
                        checkpoint_id=row.id, run_id=run.id, checkpoint_path=str(link), work_dir=str(Path(row.path).parent),
                        unit=checkpoints.unit(row), number=row.number, config_name=run.config_name, config_text=run.config_text,
                        num_eval_images=run_settings.num_eval_images, bbox_score_thr=run_settings.bbox_score_thr,
                    )
                )
                queued += 1
            if not run_settings.log_checkpoint:
                checkpoints.finish_without_upload(row)
    if queued:
        log.info("queued %d eval job(s)", queued)
    return queued


def _link(pin: Path, link: Path) -> Path | None:
    link.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(pin, link)
    except FileExistsError:
        pass
    except OSError as exc:
        log.warning("%s: cannot link for its eval job: %s", pin, os.strerror(exc.errno or errno.EIO))
        return None
    return link


def release_pins(db: Database) -> int:
    """Remove the job's checkpoint link once no worker will read it again (done or parked)."""
    with db.transaction() as session:
        jobs = session.scalars(
            select(EvalJob).where(EvalJob.pinned.is_(True), EvalJob.state.in_((JobState.DONE, JobState.DEAD)))
        ).all()
        for job in jobs:
            Path(job.checkpoint_path).unlink(missing_ok=True)
            job.pinned = False
        return len(jobs)


def due_predictions(db: Database) -> list[PredictionUpload]:
    with db.transaction() as session:
        jobs = session.scalars(
            select(EvalJob)
            .where(EvalJob.state == JobState.DONE, EvalJob.segment_id.is_(None), EvalJob.uploaded.is_(False))
            .order_by(EvalJob.run_id, EvalJob.number, EvalJob.id)
        ).all()
        uploads = []
        for job in jobs:
            checkpoint = session.get_one(Checkpoint, job.checkpoint_id)
            metadata: dict[str, Any] = {
                job.unit: job.number,
                "checkpoint": checkpoint.name,
                "num_eval_images": job.num_eval_images,
                "bbox_score_thr": job.bbox_score_thr,
                "subset_metrics": json.loads(job.metrics_json or "{}"),
                "device": job.device,
                "inference_seconds": job.seconds,
            }
            if job.note:
                metadata["note"] = job.note
            uploads.append(
                PredictionUpload(job.id, job.run_id, job.manifest_id, ["latest", f"{job.unit}_{job.number}"], metadata)  # type: ignore[arg-type]
            )
    return uploads

"""The uploader's side of evaluation: one eval job per finished checkpoint, and the tables of done jobs.

A job gets its own hard link of the checkpoint in the store, so its life does not depend on the model
artifact's pin (which goes once W&B has the file, or right away when checkpoints are not logged). The link is
released once the job is done; a dead job keeps it until it is requeued and done, or dropped by the operator.
A done job's predictions become a `run_<id>_pred` entry of the artifact outbox, after the run's `val` entry
for the same subset (queued once per run and subset), which the prediction table references.
"""
from __future__ import annotations

import errno
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from sqlalchemy import select

from common import stacks
from db import jobs, outbox
from db.models import ArtifactKind, Checkpoint, CheckpointState, Run
from db.session import Database, node_of
from uploader import checkpoints, hook_options

log = logging.getLogger("mmdet_wandb.eval_queue")


def enqueue(db: Database, ckpt: checkpoints.CheckpointOptions) -> int:
    """Give every finished epoch/iter checkpoint of a run with num_eval_images > 0 its eval job; returns how
    many were queued. Without log_checkpoint a checkpoint is then done: its own pin goes (the job holds one).
    """
    queued = 0
    with db.transaction() as session:
        rows = session.scalars(  # decided while ready: the loop looks at checkpoints before it uploads them
            select(Checkpoint).where(
                Checkpoint.node == node_of(session),
                Checkpoint.state == CheckpointState.READY,
                Checkpoint.pin_path.is_not(None),
                Checkpoint.id.not_in(jobs.checkpoints_with_jobs()),
            )
        ).all()
        for row in rows:
            run = checkpoints.run_of(session, row)
            if run is None:
                continue
            row.run_id = run.id
            run_options = hook_options.for_run(ckpt.layers, run.hook_options_json)
            if checkpoints.evaluated(row, run_options):
                link = _link(Path(row.pin_path), ckpt.store_dir / "eval" / f"{row.id}-{row.name}")  # type: ignore[arg-type]
                if link is None:
                    continue
                jobs.add(
                    session, checkpoint_id=row.id, run_id=run.id, checkpoint_path=str(link), work_dir=str(Path(row.path).parent),
                    stack=stacks.of_checkpoint(json.loads(row.meta_json or "{}")),
                    unit=checkpoints.unit(row), number=row.number, config_name=run.config_name, config_text=run.config_text,
                    num_eval_images=run_options.num_eval_images, bbox_score_thr=run_options.bbox_score_thr,
                    eval_classwise=run_options.eval_classwise, confusion_score_thr=run_options.confusion_score_thr,
                    confusion_iou_thr=run_options.confusion_iou_thr, eval_full_val=run_options.eval_full_val,
                )
                queued += 1
            if not run_options.log_checkpoint:
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
    """Remove the checkpoint links of done jobs: no worker reads them again."""
    return unlink(jobs.release_done_pins(db))


def unlink(paths: list[str]) -> int:
    for path in paths:
        Path(path).unlink(missing_ok=True)
    return len(paths)


def queue_tables(db: Database) -> int:
    """Queue the prediction table of every done job (after its run's `val` table, once per subset); returns
    how many were queued."""
    queued = 0
    with db.transaction() as session:
        for job in jobs.done(session, excluding=outbox.queued(ArtifactKind.PREDICTIONS)):
            outbox.add_artifact(session, job.run_id, ArtifactKind.VAL, f"val:{job.manifest_id}", manifest_id=job.manifest_id)
            metadata = {
                job.unit: job.number,
                "checkpoint": session.get_one(Checkpoint, job.checkpoint_id).name,
                "num_eval_images": job.num_eval_images,
                "bbox_score_thr": job.bbox_score_thr,
                "subset_metrics": job.metrics,
                "metrics_on": "val" if job.eval_full_val else "subset",  # --eval-full-val: the metrics are the whole val set's
                "device": job.device,
                "inference_seconds": job.seconds,
            }
            if job.note:
                metadata["note"] = job.note
            run = session.get_one(Run, job.run_id)
            run.summary_json = json.dumps(classwise_summary(json.loads(run.summary_json), job.unit, job.number, job.insight))
            queued += outbox.add_artifact(
                session, job.run_id, ArtifactKind.PREDICTIONS, f"pred:{job.id}", eval_job_id=job.id, manifest_id=job.manifest_id,
                aliases=["latest", f"{job.unit}_{job.number}"], metadata=metadata,
            )
    return queued


#: The per-class numbers that become summary values: `eval/<class>/<iou type>_<name>`.
SUMMARY_METRICS = {"ap": "AP", "ap50": "AP50"}


def classwise_summary(summary: dict[str, Any], unit: str, number: int, document: dict[str, Any]) -> dict[str, Any]:
    """The run summary with a checkpoint's per-class metrics: `eval/<class>/bbox_AP` (and AP50, segm_…) of the
    latest evaluated checkpoint (`eval/<unit>` says which), `best/eval/…` and `best_<unit>/eval/…` over all of them
    (as `best/val/…` for the val lines). NaN (a class without ground truth) is left out; a checkpoint without values
    (no per-class metrics, or an insight that failed) leaves the summary as it is, else `eval/<unit>` would name it
    beside another checkpoint's values."""
    values = {
        f"eval/{c['name']}/{iou_type}_{label}": c[field]
        for iou_type, result in (document.get("classwise") or {}).items() for c in result["classes"]
        for field, label in SUMMARY_METRICS.items() if c[field] is not None and math.isfinite(c[field])
    }
    if not values:
        return summary
    summary = dict(summary)
    if number >= summary.get(f"eval/{unit}", -1):
        summary.update(values)
        summary[f"eval/{unit}"] = number
    for key, value in values.items():
        if value > summary.get(f"best/{key}", -math.inf):
            summary[f"best/{key}"] = value
            summary[f"best_{unit}/{key}"] = number
    return summary

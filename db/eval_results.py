"""What the evaluator stored for the uploader: val manifests (one per distinct subset content) and the
predictions of each job, with the statements that write and read them.

The only module with dialect-specific SQL (the insert-or-ignore of a manifest).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

import orjson
from sqlalchemy import select
from sqlalchemy.orm import Session

from common.records import Instances, Manifest
from db.models import EvalJob, Prediction, ValImage, ValManifest, utcnow
from db.session import Database


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
    # the engine's own dialect module (loaded by it already): importing both at start cost an uploader ~35 ms
    dialect = importlib.import_module(f"sqlalchemy.dialects.{session.get_bind().dialect.name}")
    insert = dialect.insert(ValManifest)
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


def store_predictions(session: Session, job_id: int, predictions: list[Instances]) -> None:
    """One row per manifest image, in its order; a job evaluated again replaces its rows."""
    session.execute(Prediction.__table__.delete().where(Prediction.job_id == job_id))
    if predictions:  # an empty executemany would become INSERT … DEFAULT VALUES
        session.execute(
            Prediction.__table__.insert(),
            [{"job_id": job_id, "position": i, "result_json": p.to_json()} for i, p in enumerate(predictions)],
        )


def predictions_of(db: Database, job_id: int) -> list[Instances]:
    with db.transaction() as session:
        texts = session.scalars(select(Prediction.result_json).where(Prediction.job_id == job_id).order_by(Prediction.position)).all()
    return [Instances.from_json(t) for t in texts]


def insight_of(db: Database, job_id: int) -> dict:
    """The job's evaluation insight (evaluator/insight.py's document; empty for a job done before it existed)."""
    with db.transaction() as session:
        text = session.scalar(select(EvalJob.insight_json).where(EvalJob.id == job_id))
    return orjson.loads(text) if text else {}


@dataclass(frozen=True)
class StoredImage:
    position: int
    image_name: str
    file_ext: str
    width: int
    height: int
    image_bytes: bytes
    ground_truth: Instances


@dataclass(frozen=True)
class StoredManifest:
    id: int
    digest: str
    classes: list[str]
    images: list[StoredImage]


def load_manifest(db: Database, manifest_id: int) -> StoredManifest:
    with db.transaction() as session:
        manifest = session.get_one(ValManifest, manifest_id)
        images = session.execute(
            select(ValImage.position, ValImage.image_name, ValImage.file_ext, ValImage.width, ValImage.height,
                   ValImage.image_bytes, ValImage.ground_truth_json)
            .where(ValImage.manifest_id == manifest_id)
            .order_by(ValImage.position)
        ).all()
        digest, classes = manifest.digest, orjson.loads(manifest.classes_json)
    return StoredManifest(
        manifest_id, digest, classes,
        [StoredImage(pos, name, ext, w, h, data, Instances.from_json(gt)) for pos, name, ext, w, h, data, gt in images],
    )

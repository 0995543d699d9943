"""W&B artifacts built from stored data: checkpoint versions, the val table and the prediction tables, as the
hook builds them (mmdet-wandb-hook.md §1.10–§1.12). The writer hands each outbox entry to `ArtifactBuilder`
and logs what comes back; nothing here decides when an artifact is due.

Images and ground-truth masks are written once per manifest into the data dir, under stable names, so that
any uploader process builds byte-identical media: a prediction artifact then lists the val artifact's files
as client-id references (wandb-offline.md §4.6, recipe C) instead of copying them, also in offline mode and
also after a restart. Only the table JSON and the predicted masks are new bytes per checkpoint.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import wandb
from PIL import Image as PILImage

from common.records import Instances
from db import eval_results
from db.models import ArtifactKind
from db.outbox import PendingArtifact
from db.session import Database
from uploader.wandb import insight, private_api

VAL_ARTIFACT = "val"
VAL_TABLE = "val_data"
EVAL_TABLE = "eval_data"


@dataclass(frozen=True)
class ValRow:
    position: int
    image_name: str
    image_path: Path
    width: int
    height: int
    ground_truth: Instances
    gt_masks: dict[str, Path]  # class name → mask file (class id on its pixels, 0 elsewhere)


@dataclass(frozen=True)
class ValMedia:
    """A manifest's files on local disk."""

    manifest_id: int
    digest: str
    directory: Path
    classes: list[str]
    rows: list[ValRow]


def materialize(db: Database, manifest_id: int, media_root: Path) -> ValMedia:
    """Write the manifest's images and ground-truth masks under `<media_root>/<digest>/` (kept; idempotent)."""
    manifest = eval_results.load_manifest(db, manifest_id)
    directory = media_root / manifest.digest[:32]
    rows = []
    for image in manifest.images:
        folder = directory / f"{image.position:05d}"
        stem = Path(image.image_name).stem or f"img_{image.position}"
        image_path = folder / f"{stem}.{image.file_ext}"
        _write_once(image_path, image.image_bytes)
        gt_masks = {}
        for name, mask in merged_masks(image.ground_truth, image.height, image.width, manifest.classes).items():
            mask_path = folder / f"gt-{manifest.classes.index(name) + 1}.mask.png"
            if not mask_path.exists():
                _write_once(mask_path, _png_bytes(mask))
            gt_masks[name] = mask_path
        rows.append(ValRow(image.position, image.image_name, image_path, image.width, image.height, image.ground_truth, gt_masks))
    return ValMedia(manifest_id, manifest.digest, directory, manifest.classes, rows)


def _write_once(path: Path, data: bytes) -> None:
    if path.exists() and path.stat().st_size == len(data):
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _png_bytes(mask: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    PILImage.fromarray(mask.astype(np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def id_to_label(classes: list[str]) -> dict[int, str]:
    """The hook's class ids start at 1 (0 is the mask background)."""
    return {i + 1: name for i, name in enumerate(classes)}


def box_data(instances: Instances, classes: list[str]) -> list[dict[str, Any]]:
    """One W&B box per instance, as the hook draws them (positions truncated to int, `<class> <score>`)."""
    boxes = []
    for index, (box, label) in enumerate(zip(instances.boxes, instances.labels)):
        entry: dict[str, Any] = {
            "position": {"minX": int(box[0]), "minY": int(box[1]), "maxX": int(box[2]), "maxY": int(box[3])},
            "class_id": label + 1,
            "box_caption": classes[label],
            "domain": "pixel",
        }
        if instances.scores is not None:
            score = instances.scores[index]
            entry["box_caption"] = f"{classes[label]} {score:.2f}"
            entry["scores"] = {"score": score}  # beyond the hook: a score slider in the UI
        boxes.append(entry)
    return boxes


def merged_masks(instances: Instances, height: int, width: int, classes: list[str]) -> dict[str, np.ndarray]:
    """One layer per class: the union of its instances, the class id on mask pixels (the hook's `_get_wandb_masks`)."""
    if not instances.masks:
        return {}
    from pycocotools import mask as mask_util

    layers: dict[str, np.ndarray] = {}
    for rle, label in zip(instances.masks, instances.labels):
        bitmap = mask_util.decode({"size": rle["size"], "counts": rle["counts"].encode()})
        if bitmap.shape != (height, width):
            continue
        name = classes[label]
        layer = layers.setdefault(name, np.zeros((height, width), dtype=np.uint8))
        layer[bitmap > 0] = label + 1
    return layers


def _gt_image(row: ValRow, classes: list[str], class_set: wandb.Classes) -> wandb.Image:
    labels = id_to_label(classes)
    return wandb.Image(
        str(row.image_path),
        boxes={"ground_truth": {"box_data": box_data(row.ground_truth, classes), "class_labels": labels}},
        masks={name: {"path": str(path), "class_labels": labels} for name, path in row.gt_masks.items()} or None,
        classes=class_set,
    )


def val_artifact(media: ValMedia) -> wandb.Artifact:
    """Artifact `val` (type dataset) with table `val_data`: image_name, image with ground-truth boxes and masks."""
    class_set = wandb.Classes([{"id": i, "name": n} for i, n in id_to_label(media.classes).items()])
    table = wandb.Table(columns=["image_name", "image"])
    for row in media.rows:
        table.add_data(row.image_name, _gt_image(row, media.classes, class_set))
    artifact = wandb.Artifact(VAL_ARTIFACT, type="dataset", metadata={"num_images": len(media.rows), "digest": media.digest})
    artifact.add(table, VAL_TABLE)
    return artifact


def val_entries(artifact: wandb.Artifact, media: ValMedia) -> dict[str, Any]:
    """What a later process needs to reference the val artifact's files: every entry's digest, and which
    of our local files each media entry came from."""
    entries = {path: entry.digest for path, entry in artifact.manifest.entries.items() if not path.endswith(".table.json")}
    return {"entries": entries, "local": private_api.local_media(artifact, media.directory)}


def prediction_artifact(
    name: str, media: ValMedia, predictions: list[Instances], val_client_id: str | None, val: dict[str, Any],
    aliases_metadata: dict[str, Any], document: dict[str, Any] | None = None,
) -> wandb.Artifact:
    """`run_<id>_pred` (type evaluation) with table `eval_data`: image_name, ground_truth, prediction, and each
    image's errors (`insight.ERROR_COLUMNS`: sorting by them puts the failures first); beside it the tables of the
    evaluation insight `document` (uploader/wandb/insight.py).

    The val files are added first as references to the val artifact; Media.to_json then finds each local
    image and mask already added (by its local path) and writes its reference name into the table. Off
    wandb's private path (`private_api.reference_media`) the table holds its own copy of each image instead.
    """
    artifact = wandb.Artifact(name, type="evaluation", metadata=aliases_metadata)
    private_api.reference_media(artifact, val_client_id, val["entries"], {path: media.directory / relative for relative, path in val["local"].items()})
    labels = id_to_label(media.classes)
    class_set = wandb.Classes([{"id": i, "name": n} for i, n in labels.items()])
    table = wandb.Table(columns=["image_name", "ground_truth", "prediction", *insight.ERROR_COLUMNS])
    errors = insight.image_errors(document or {}, len(media.rows))
    for row, predicted, image_errors in zip(media.rows, predictions, errors):
        masks = merged_masks(predicted, row.height, row.width, media.classes)
        prediction = wandb.Image(
            str(row.image_path),
            boxes={"predictions": {"box_data": box_data(predicted, media.classes), "class_labels": labels}},
            masks={n: {"mask_data": m, "class_labels": labels} for n, m in masks.items()} or None,
            classes=class_set,
        )
        table.add_data(row.image_name, _gt_image(row, media.classes, class_set), prediction, *image_errors)
    artifact.add(table, EVAL_TABLE)
    for table_name, extra in insight.tables(document or {}, checkpoint_of(aliases_metadata)).items():
        artifact.add(extra, table_name)
    return artifact


def checkpoint_of(metadata: dict[str, Any]) -> insight.Checkpoint:
    return insight.Checkpoint(str(metadata.get("checkpoint", "")), metadata.get("epoch"), metadata.get("iter"))


def add_hashed_file(artifact: wandb.Artifact, path: Path, name: str, md5_b64: str) -> None:
    """What `add_file(path, name, policy="immutable", skip_cache=True)` does, minus its second read of a
    multi-GB file: the md5 the checkpoint follower computed is the entry's digest. (`add_file` is exactly
    LogicalPath + md5 + `_add_local_file`; tests/test_wandb_writer.py checks the entries stay identical on wandb
    upgrades.) `skip_cache`: wandb-core would otherwise copy every uploaded checkpoint into its artifact cache.
    Outside `private_api.enabled()` it is `add_file` itself: the same entry, one more read of the file."""
    private_api.add_local_file(artifact, path, name, md5_b64)


class NotBuildable(RuntimeError):
    """The entry cannot become an artifact now (its pinned file is gone)."""


@dataclass(frozen=True)
class Built:
    artifact: wandb.Artifact
    record: dict[str, Any]  # what the outbox keeps once it is logged: type and digest, and what others need
    charts: dict[str, Any] = field(default_factory=dict)  # summary chart key → wandb custom chart


class ArtifactBuilder:
    """Turns outbox entries into artifacts, from the pinned files and the stored val data and predictions."""

    def __init__(self, db: Database, media_dir: Path) -> None:
        self.db = db
        self.media_dir = media_dir
        self._media: dict[int, ValMedia] = {}

    def build(self, entry: PendingArtifact, wandb_id: str, val_record: dict[str, Any] | None) -> Built:
        """`val_record`: for a prediction table, the record of the run's `val` artifact it references."""
        if entry.kind is ArtifactKind.MODEL:
            return self._model(entry, wandb_id)
        media = self._media_of(entry.manifest_id)  # type: ignore[arg-type]
        if entry.kind is ArtifactKind.VAL:
            artifact = val_artifact(media)
            return Built(artifact, {"type": artifact.type, "client_id": private_api.client_id(artifact), **val_entries(artifact, media)})
        if val_record is None:
            raise RuntimeError(f"prediction table {entry.id}: the run's val table is not logged")
        predictions = eval_results.predictions_of(self.db, entry.eval_job_id)  # type: ignore[arg-type]
        document = eval_results.insight_of(self.db, entry.eval_job_id)  # type: ignore[arg-type]
        artifact = prediction_artifact(f"run_{wandb_id}_pred", media, predictions, val_record["client_id"], val_record, entry.metadata,
                                       document)
        charts = insight.charts(document, checkpoint_of(entry.metadata))
        return Built(artifact, {"type": artifact.type, "chart_tables": len(charts)}, charts)

    def _model(self, entry: PendingArtifact, wandb_id: str) -> Built:
        """The pinned file, with the md5 its producer computed (no second read of a multi-GB file here)."""
        path = Path(entry.file_path)  # type: ignore[arg-type]
        artifact = wandb.Artifact(f"run_{wandb_id}_model", type="model", metadata=entry.metadata)
        try:
            now = path.stat()
            if entry.file_stat is not None and (now.st_size, now.st_mtime_ns) != entry.file_stat:
                # MMEngine saves the last checkpoint again when a later evaluation improves the best
                raise NotBuildable(f"the pinned file {path} was written again after it was hashed")
            add_hashed_file(artifact, path, entry.file_name or path.name, entry.file_md5)  # type: ignore[arg-type]
        except OSError as exc:
            raise NotBuildable(f"the pinned file {path}: {exc.strerror or exc}") from exc
        return Built(artifact, {"type": artifact.type, "md5": entry.file_md5, "metadata": entry.metadata})

    def _media_of(self, manifest_id: int) -> ValMedia:
        if manifest_id not in self._media:
            self._media[manifest_id] = materialize(self.db, manifest_id, self.media_dir)
        return self._media[manifest_id]

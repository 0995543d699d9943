"""The val table and the prediction tables, as the hook builds them (mmdet-wandb-hook.md §1.10–§1.12).

Images and ground-truth masks are written once per manifest into the data dir, under stable names, so that
any uploader process builds byte-identical media: a prediction artifact then lists the val artifact's files
as client-id references (wandb-offline.md §4.6, recipe C) instead of copying them, also in offline mode and
also after a restart. Only the table JSON and the predicted masks are new bytes per checkpoint.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import wandb
from PIL import Image as PILImage
from sqlalchemy import select
from wandb.sdk.artifacts.artifact_manifest_entry import ArtifactManifestEntry

from db.models import Prediction, ValImage, ValManifest
from db.session import Database
from evaluator.records import Instances

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
    with db.transaction() as session:
        manifest = session.get_one(ValManifest, manifest_id)
        images = session.execute(
            select(ValImage.position, ValImage.image_name, ValImage.file_ext, ValImage.width, ValImage.height,
                   ValImage.image_bytes, ValImage.ground_truth_json)
            .where(ValImage.manifest_id == manifest_id)
            .order_by(ValImage.position)
        ).all()
        digest, classes = manifest.digest, orjson.loads(manifest.classes_json)
    directory = media_root / digest[:32]
    rows = []
    for position, image_name, file_ext, width, height, image_bytes, gt_json in images:
        folder = directory / f"{position:05d}"
        stem = Path(image_name).stem or f"img_{position}"
        image_path = folder / f"{stem}.{file_ext}"
        _write_once(image_path, image_bytes)
        ground_truth = Instances.from_json(gt_json)
        gt_masks = {}
        for name, mask in merged_masks(ground_truth, height, width, classes).items():
            mask_path = folder / f"gt-{classes.index(name) + 1}.mask.png"
            if not mask_path.exists():
                _write_once(mask_path, _png_bytes(mask))
            gt_masks[name] = mask_path
        rows.append(ValRow(position, image_name, image_path, width, height, ground_truth, gt_masks))
    return ValMedia(manifest_id, digest, directory, classes, rows)


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
    local = {}
    for local_path, entry in artifact._added_local_paths.items():
        path = Path(local_path)
        if path.is_relative_to(media.directory):
            local[str(path.relative_to(media.directory))] = entry.path
    entries = {path: entry.digest for path, entry in artifact.manifest.entries.items() if not path.endswith(".table.json")}
    return {"entries": entries, "local": local}


def prediction_artifact(
    name: str, media: ValMedia, predictions: list[Instances], val_client_id: str, val: dict[str, Any],
    aliases_metadata: dict[str, Any],
) -> wandb.Artifact:
    """`run_<id>_pred` (type evaluation) with table `eval_data`: image_name, ground_truth, prediction.

    The val files are added first as references to the val artifact; Media.to_json then finds each local
    image and mask already added (by its local path) and writes its reference name into the table.
    """
    artifact = wandb.Artifact(name, type="evaluation", metadata=aliases_metadata)
    refs = {}
    for path, digest in val["entries"].items():
        entry = ArtifactManifestEntry(path=path, ref=f"wandb-client-artifact://{val_client_id}/{path}", size=0, digest=digest)
        artifact.manifest.add_entry(entry)
        refs[path] = entry
    for relative, path in val["local"].items():
        artifact._added_local_paths[str(media.directory / relative)] = refs[path]
    labels = id_to_label(media.classes)
    class_set = wandb.Classes([{"id": i, "name": n} for i, n in labels.items()])
    table = wandb.Table(columns=["image_name", "ground_truth", "prediction"])
    for row, predicted in zip(media.rows, predictions):
        masks = merged_masks(predicted, row.height, row.width, media.classes)
        prediction = wandb.Image(
            str(row.image_path),
            boxes={"predictions": {"box_data": box_data(predicted, media.classes), "class_labels": labels}},
            masks={n: {"mask_data": m, "class_labels": labels} for n, m in masks.items()} or None,
            classes=class_set,
        )
        table.add_data(row.image_name, _gt_image(row, media.classes, class_set), prediction)
    artifact.add(table, EVAL_TABLE)
    return artifact


def predictions_of(db: Database, job_id: int) -> list[Instances]:
    with db.transaction() as session:
        texts = session.scalars(select(Prediction.result_json).where(Prediction.job_id == job_id).order_by(Prediction.position)).all()
    return [Instances.from_json(t) for t in texts]

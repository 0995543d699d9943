"""The mmdet 3.x (MMEngine) adapter: one checkpoint → predictions and metrics on the fixed val subset (the metrics
on the whole val set with `eval_full_val`, evaluator/job_inputs.py `scope`), stored as
the same records as the 2.x adapter's (evaluator/mmdet2.py), so that both give tables of one schema.

Set up as mmdet 3.3's `init_detector`/`tools/test.py` do: the config inside the checkpoint (`meta['cfg']`,
exactly what trained it; fallbacks: the launch's `vis_data/config.py` or the work_dir's dump), the registry
scope (`init_default_scope`), the backbone's `init_cfg` off, the weights loaded by torch's weights-only
unpickler with an explicit allowlist of what an MMEngine checkpoint holds (evaluator/checkpoint_globals.py),
`val_dataloader.dataset` built by the DATASETS registry with relative paths resolved as for 2.x. The hook's subset (first N of a seed-42
permutation) goes batched through the model's `test_step` (data preprocessor included); the subset's metrics
come from the config's own `val_evaluator`, restricted to the subset's images. Imports torch/mmengine/mmdet
lazily, like the 2.x adapter.
"""
from __future__ import annotations

import copy
import logging
import os
import threading
import time
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import numpy as np

from common import dataset_paths
from common.records import EvalOutcome, Instances, Manifest, ValImageRecord
from db.jobs import ClaimedJob
from evaluator import checkpoint_globals, insight, job_inputs
from evaluator.encoding import segmentation_rle, stored_image
from evaluator.batches import infer_halving
from evaluator.errors import JobError
from evaluator.metrics import plain_metrics
from common.trust import Trust

log = logging.getLogger("mmdet_wandb.evaluator")


def evaluate(
    job: ClaimedJob, device: str, batch_size: int, lease_lost: threading.Event | None = None,
    dataset_roots: tuple[Path, ...] = (), trust: Trust = Trust(),
) -> EvalOutcome:
    """`dataset_roots`: where relative dataset paths are looked for first (`--dataset-root`); `trust`: what code
    from the work_dir may run (by default none)."""
    cfg = load_config(job, trust)
    dataset, base = build_val_dataset(cfg, Path(job.work_dir), dataset_roots)
    indices, note = job_inputs.subset(job, len(dataset))
    manifest = build_manifest(dataset, indices, cfg)
    model = build_model(cfg, job.checkpoint_path, device, trust)
    scope = job_inputs.scope(job, indices, len(dataset))
    started = time.perf_counter()
    samples = run_inference(model, dataset, scope.indices, cfg, batch_size, lease_lost)
    seconds = time.perf_counter() - started
    detections = [to_detections(s) for s in samples]
    predictions = [detections[row].instances().above(job.bbox_score_thr) for row in scope.rows]
    metrics = subset_metrics(cfg, dataset, scope.indices, samples, base)
    found = insight.compute(ground_truth(dataset, scope.indices), detections, manifest.classes, insight.options_of(job), scope.rows)
    return EvalOutcome(manifest=manifest, predictions=predictions, metrics=metrics, device=device, seconds=seconds, note=note,
                       insight=found)


def load_config(job: ClaimedJob, trust: Trust = Trust()) -> Any:
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmengine.utils import import_modules_from_strings

    cfg = job_inputs.load_config(job, "cfg", Config, import_modules_from_strings, trust)
    init_default_scope(cfg.get("default_scope", "mmdet"))
    return cfg


def build_val_dataset(cfg: Any, work_dir: Path, dataset_roots: tuple[Path, ...] = ()) -> tuple[Any, Path | None]:
    """The val dataset (test mode) and the base its relative paths were resolved against."""
    from mmdet.registry import DATASETS

    loader = cfg.get("val_dataloader") or {}
    dataset_cfg = loader.get("dataset") if isinstance(loader, dict) else None
    if not isinstance(dataset_cfg, dict) or "type" not in dataset_cfg:
        raise JobError("the config has no val_dataloader.dataset", retryable=False)
    dataset_cfg = copy.deepcopy(dict(dataset_cfg))
    dataset_cfg["test_mode"] = True
    try:
        dataset_cfg, base = dataset_paths.resolve_mmengine(dataset_cfg, dataset_paths.candidates(dataset_roots, work_dir))
    except dataset_paths.AnnotationsNotFound as exc:
        raise JobError(str(exc), retryable=False) from exc
    try:
        dataset = DATASETS.build(dataset_cfg)
    except Exception as exc:
        raise JobError(f"the val dataset cannot be built: {type(exc).__name__}: {exc}", retryable=False) from exc
    if not hasattr(dataset, "get_data_info") or "classes" not in getattr(dataset, "metainfo", {}):
        raise JobError(f"val dataset {type(dataset).__name__} has no get_data_info or classes (wrapped datasets are not supported)", retryable=False)
    if len(dataset) == 0:
        raise JobError("the val dataset is empty", retryable=False)
    return dataset, base


def _color_type(cfg: Any) -> str:
    """The hook's loader: the last LoadImageFromFile of the val pipeline (its color type)."""
    pipeline = cfg.val_dataloader.dataset.get("pipeline") or []
    loaders = [t for t in pipeline if isinstance(t, dict) and str(t.get("type", "")).split(".")[-1] == "LoadImageFromFile"]
    if not loaders:
        raise JobError("the val pipeline has no LoadImageFromFile (the hook needs one too)", retryable=False)
    return loaders[-1].get("color_type", "color")


def build_manifest(dataset: Any, indices: list[int], cfg: Any) -> Manifest:
    import mmcv

    color_type = _color_type(cfg)
    prefix = (getattr(dataset, "data_prefix", None) or {}).get("img") or ""
    images = []
    for position, index in enumerate(indices):
        info = dataset.get_data_info(index)
        path = info.get("img_path") or ""
        name = os.path.relpath(path, prefix) if prefix and path.startswith(prefix) else os.path.basename(path)
        try:
            raw = Path(path).read_bytes()
        except OSError as exc:
            raise JobError(f"val image {path} cannot be read: {exc.strerror}", retryable=True) from exc
        try:
            img = mmcv.imfrombytes(raw, flag=color_type, channel_order="rgb")
        except Exception as exc:
            img = None
            log.debug("decode failed", exc_info=exc)
        if img is None:
            raise JobError(f"val image {path} cannot be decoded", retryable=False)
        height, width = img.shape[:2]
        file_ext, data = stored_image(name, raw, img)
        images.append(
            ValImageRecord(
                position=position, dataset_index=index, image_name=name or f"img_{index}", file_ext=file_ext,
                width=int(width), height=int(height), image_bytes=data,
                ground_truth=_ground_truth(info.get("instances") or [], height, width),
            )
        )
    source = {"ann_file": str(getattr(dataset, "ann_file", "")), "img_prefix": str(prefix), "val_set_size": len(dataset)}
    return Manifest(classes=[str(c) for c in dataset.metainfo["classes"]], images=images, source=source)


def _ground_truth(instances: list[dict], height: int, width: int) -> Instances:
    """The instances a 2.x `get_ann_info` gives too: crowd and ignored ones (ignore_flag) left out."""
    kept = [i for i in instances if not i.get("ignore_flag", 0)]
    boxes = np.asarray([i["bbox"] for i in kept], dtype=float).reshape(-1, 4)
    labels = [int(i["bbox_label"]) for i in kept]
    masks = None
    if any("mask" in i for i in kept):
        masks = [segmentation_rle(i.get("mask", []), height, width) for i in kept]
    return Instances(boxes=boxes.round(2).tolist(), labels=labels, masks=masks)


def build_model(cfg: Any, checkpoint_path: str, device: str, trust: Trust = Trust()) -> Any:
    from mmdet.registry import MODELS
    from mmengine.model.utils import revert_sync_batchnorm
    from mmengine.runner.checkpoint import load_state_dict

    cfg = copy.deepcopy(cfg)
    if "init_cfg" in cfg.model.get("backbone", {}):
        cfg.model.backbone.init_cfg = None
    try:
        model = revert_sync_batchnorm(MODELS.build(cfg.model))
    except Exception as exc:
        raise JobError(f"the model cannot be built from the config: {type(exc).__name__}: {exc}", retryable=False) from exc
    checkpoint = checkpoint_globals.load_weights(model, checkpoint_path, trust=trust.checkpoints, load_state_dict=load_state_dict)
    dataset_meta = (checkpoint.get("meta") or {}).get("dataset_meta")
    if isinstance(dataset_meta, dict):
        model.dataset_meta = {k.lower(): v for k, v in dataset_meta.items()}
    model.cfg = cfg
    model.to(device)
    model.eval()
    return model


def run_inference(model: Any, dataset: Any, indices: list[int], cfg: Any, batch_size: int, lease_lost: threading.Event | None) -> list[Any]:
    """The val loop's steps over the subset, batched: pipeline, `pseudo_collate`, `model.test_step` (its data
    preprocessor pads and normalises the batch). CUDA out of memory halves the batch and goes on (evaluator/batches.py)."""
    import torch
    from mmengine.dataset import pseudo_collate
    from torch.utils.data import DataLoader, Subset

    workers = int((cfg.get("val_dataloader") or {}).get("num_workers", 0))

    def batches_from(start: int, size: int) -> Iterator[list[Any]]:
        rest = Subset(dataset, indices[start:])
        for data in DataLoader(rest, batch_size=size, num_workers=workers, shuffle=False, collate_fn=pseudo_collate):
            with torch.no_grad():
                yield model.test_step(data)

    return infer_halving(len(indices), batch_size, batches_from, torch.cuda.OutOfMemoryError, torch.cuda.empty_cache,
                         lease_lost)


def to_detections(sample: Any) -> insight.Detections:
    """A `DetDataSample`'s `pred_instances` (boxes in the original image, as `test_step` rescales them)."""
    from mmdet.structures.mask import encode_mask_results

    pred = sample.pred_instances
    boxes = pred.bboxes.detach().cpu().numpy().astype(np.float32).reshape(-1, 4)
    scores = pred.scores.detach().cpu().numpy().astype(np.float32)
    labels = pred.labels.detach().cpu().numpy().astype(np.int64)
    masks = None
    if "masks" in pred:
        masks = encode_mask_results(pred.masks.detach().cpu().numpy())
        if len(masks) != len(labels):
            raise JobError(f"{len(masks)} masks for {len(labels)} boxes", retryable=False)
    return insight.Detections(boxes=boxes, scores=scores, labels=labels, masks=masks)


def ground_truth(dataset: Any, indices: list[int]) -> insight.GroundTruth:
    """The COCO annotations `CocoMetric` reads (the dataset's `ann_file`, its `cat_ids`) when the dataset has them,
    else one built from the data infos (their instances, crowd and ignored ones left out, and sizes); the confusion
    matrix matches every instance of the data info, as the 3.x analysis tool does (ignored ones included)."""
    infos = [dataset.get_data_info(i) for i in indices]
    ann_file = str(getattr(dataset, "ann_file", "") or "")
    if not hasattr(dataset, "cat_ids") or not os.path.isfile(ann_file):
        sizes = [(info["height"], info["width"]) for info in infos]
        return insight.ground_truth_of([_ground_truth(info.get("instances") or [], *size) for info, size in zip(infos, sizes)], sizes,
                                       len(dataset.metainfo["classes"]))
    import contextlib
    import io

    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(ann_file)
    return insight.GroundTruth(
        coco, list(dataset.cat_ids), [info["img_id"] for info in infos],
        [np.asarray([g["bbox"] for g in info.get("instances") or []], dtype=np.float32).reshape(-1, 4) for info in infos],
        [np.asarray([g["bbox_label"] for g in info.get("instances") or []], dtype=np.int64) for info in infos],
        any("mask" in g for info in infos for g in info.get("instances") or []),
    )


def subset_metrics(cfg: Any, dataset: Any, indices: list[int], samples: list[Any], base: Path | None) -> dict[str, Any]:
    """The config's own `val_evaluator` on the evaluated images (the subset, or all of val): COCO-style metrics
    evaluate those images only."""
    from mmengine.evaluator import Evaluator

    evaluator_cfg = cfg.get("val_evaluator")
    if not evaluator_cfg:
        return {}
    evaluator_cfg = copy.deepcopy(evaluator_cfg)
    for metric_cfg in evaluator_cfg if isinstance(evaluator_cfg, list) else [evaluator_cfg]:
        ann_file = metric_cfg.get("ann_file")
        if base is not None and isinstance(ann_file, str) and ann_file and not os.path.isabs(ann_file):
            metric_cfg["ann_file"] = str(base / ann_file)

    def evaluate() -> dict[str, Any]:
        evaluator = Evaluator(evaluator_cfg)
        evaluator.dataset_meta = dataset.metainfo
        image_ids = [dataset.get_data_info(i)["img_id"] for i in indices]
        for metric in evaluator.metrics:
            if hasattr(metric, "img_ids") and getattr(metric, "_coco_api", None) is not None:
                metric.img_ids = image_ids
        evaluator.process(data_samples=samples, data_batch=None)
        return evaluator.evaluate(len(samples))

    return plain_metrics(evaluate)

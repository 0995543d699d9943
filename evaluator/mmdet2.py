"""The mmdet 2.x adapter: one checkpoint → predictions and metrics on the fixed val subset (the metrics on the whole
val set with `eval_full_val`, evaluator/job_inputs.py `scope`).

Set up as mmdet 2.28's `tools/test.py` does (pretrained weights off, `compat_cfg`, `replace_ImageToTensor` for
batches, `build_dp`, CLASSES from the checkpoint), then `single_gpu_test`'s loop over a dataloader of the
subset with `samples_per_gpu = batch_size`. The weights are loaded as for 3.x, by torch's weights-only unpickler
(evaluator/checkpoint_globals.py), not by mmcv's `load_checkpoint`, which leaves weights_only to torch's default. The config is the one inside the checkpoint (exactly what
trained it); the work_dir's dump is the fallback. Imports torch/mmcv/mmdet lazily: `import evaluator` stays
cheap for the uploader.
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
from common.records import (
    EvalOutcome,
    Instances,
    Manifest,
    ValImageRecord,
)
from db.jobs import ClaimedJob
from evaluator import checkpoint_globals, insight, job_inputs
from evaluator.encoding import segmentation_rle, stored_image
from evaluator.batches import infer_halving
from evaluator.errors import JobError
from evaluator.metrics import plain_metrics
from common.trust import Trust

log = logging.getLogger("mmdet_wandb.evaluator")

#: Keys of `evaluation=dict(...)` that steer the EvalHook, not `dataset.evaluate` (as tools/test.py drops them).
HOOK_ONLY_EVAL_KEYS = ("interval", "tmpdir", "start", "gpu_collect", "save_best", "rule", "dynamic_intervals", "by_epoch")


def evaluate(
    job: ClaimedJob, device: str, batch_size: int, lease_lost: threading.Event | None = None,
    dataset_roots: tuple[Path, ...] = (), trust: Trust = Trust(),
) -> EvalOutcome:
    """`dataset_roots`: where relative dataset paths are looked for first (`--dataset-root`); `trust`: what code
    from the work_dir may run (by default none)."""
    cfg = load_config(job, trust)
    dataset = build_val_dataset(cfg, Path(job.work_dir), batched=batch_size > 1, dataset_roots=dataset_roots)
    indices, note = job_inputs.subset(job, len(dataset))
    manifest = build_manifest(dataset, indices, cfg)
    model = build_model(cfg, job.checkpoint_path, device, dataset, trust)
    scope = job_inputs.scope(job, indices, len(dataset))
    evaluated = take_subset(dataset, scope.indices)
    started = time.perf_counter()
    results = run_inference(model, evaluated, cfg, batch_size, lease_lost)
    seconds = time.perf_counter() - started
    detections = [to_detections(r, len(manifest.classes)) for r in results]
    predictions = [detections[row].instances().above(job.bbox_score_thr) for row in scope.rows]
    metrics = subset_metrics(evaluated, results, cfg)
    found = insight.compute(ground_truth(evaluated), detections, manifest.classes, insight.options_of(job), scope.rows)
    return EvalOutcome(manifest=manifest, predictions=predictions, metrics=metrics, device=device, seconds=seconds, note=note,
                       insight=found)


def load_config(job: ClaimedJob, trust: Trust = Trust()) -> Any:
    from mmcv import Config
    from mmcv.utils import import_modules_from_strings

    return job_inputs.load_config(job, "config", Config, import_modules_from_strings, trust)


def build_val_dataset(cfg: Any, work_dir: Path, *, batched: bool, dataset_roots: tuple[Path, ...] = ()) -> Any:
    from mmdet.datasets import build_dataset, replace_ImageToTensor
    from mmdet.utils import compat_cfg

    cfg = compat_cfg(cfg)
    val_cfg = cfg.get("data", {}).get("val")
    if not isinstance(val_cfg, dict) or "type" not in val_cfg:
        raise JobError("the config has no single data.val dataset", retryable=False)
    val_cfg = copy.deepcopy(val_cfg)
    val_cfg["test_mode"] = True
    if batched:
        val_cfg["pipeline"] = replace_ImageToTensor(val_cfg["pipeline"])
    try:
        val_cfg = dataset_paths.resolve(val_cfg, dataset_paths.candidates(dataset_roots, work_dir))
    except dataset_paths.AnnotationsNotFound as exc:
        raise JobError(str(exc), retryable=False) from exc
    for key in ("ann_file", "img_prefix"):
        value = val_cfg.get(key)
        if isinstance(value, str) and value and not os.path.exists(value):
            raise JobError(f"data.val.{key} {value} does not exist", retryable=False)
    try:
        dataset = build_dataset(val_cfg)
    except Exception as exc:
        raise JobError(f"the val dataset cannot be built: {type(exc).__name__}: {exc}", retryable=False) from exc
    for needed in ("data_infos", "get_ann_info", "CLASSES"):
        if not hasattr(dataset, needed):
            raise JobError(f"val dataset {type(dataset).__name__} has no {needed} (wrapped datasets are not supported)", retryable=False)
    if len(dataset) == 0:
        raise JobError("the val dataset is empty", retryable=False)
    return dataset


def _loader_image(dataset: Any) -> Any:
    """The hook's loader: the last LoadImageFromFile of the val pipeline (its file client and color type)."""
    from mmdet.datasets.pipelines import LoadImageFromFile

    loaders = [t for t in dataset.pipeline.transforms if isinstance(t, LoadImageFromFile)]
    if not loaders:
        raise JobError("the val pipeline has no LoadImageFromFile (the hook needs one too)", retryable=False)
    return loaders[-1]


def build_manifest(dataset: Any, indices: list[int], cfg: Any) -> Manifest:
    import mmcv

    loader = _loader_image(dataset)
    images = []
    for position, index in enumerate(indices):
        info = dataset.data_infos[index]
        filename = info.get("filename") or f"img_{index}"
        path = os.path.join(dataset.img_prefix, filename) if dataset.img_prefix else filename
        try:
            raw = Path(path).read_bytes()
        except OSError as exc:
            raise JobError(f"val image {path} cannot be read: {exc.strerror}", retryable=True) from exc
        try:
            img = mmcv.imfrombytes(raw, flag=loader.color_type, channel_order="rgb")
        except Exception as exc:
            img = None
            log.debug("decode failed", exc_info=exc)
        if img is None:
            raise JobError(f"val image {path} cannot be decoded", retryable=False)
        height, width = img.shape[:2]
        file_ext, data = stored_image(filename, raw, img)
        ann = dataset.get_ann_info(index)
        images.append(
            ValImageRecord(
                position=position, dataset_index=index, image_name=filename, file_ext=file_ext,
                width=int(width), height=int(height), image_bytes=data,
                ground_truth=_ground_truth(ann, height, width),
            )
        )
    source = {
        "ann_file": str(getattr(dataset, "ann_file", "")),
        "img_prefix": str(dataset.img_prefix or ""),
        "val_set_size": len(dataset),
    }
    return Manifest(classes=[str(c) for c in dataset.CLASSES], images=images, source=source)


def _ground_truth(ann: dict, height: int, width: int) -> Instances:
    boxes = np.asarray(ann.get("bboxes", np.zeros((0, 4))), dtype=float).reshape(-1, 4)
    labels = [int(x) for x in np.asarray(ann.get("labels", []))]
    masks = None
    if "masks" in ann:
        masks = [segmentation_rle(segm, height, width) for segm in ann["masks"]]
    return Instances(boxes=boxes.round(2).tolist(), labels=labels, masks=masks)


def build_model(cfg: Any, checkpoint_path: str, device: str, dataset: Any, trust: Trust = Trust()) -> Any:
    import torch
    from mmcv.runner import load_state_dict, wrap_fp16_model
    from mmdet.models import build_detector
    from mmdet.utils import build_dp

    cfg = copy.deepcopy(cfg)
    model_cfg = cfg.model
    if "pretrained" in model_cfg:
        model_cfg.pretrained = None
    elif "init_cfg" in model_cfg.get("backbone", {}):
        model_cfg.backbone.init_cfg = None
    model_cfg.train_cfg = None
    try:
        model = build_detector(model_cfg, test_cfg=cfg.get("test_cfg"))
    except Exception as exc:
        raise JobError(f"the model cannot be built from the config: {type(exc).__name__}: {exc}", retryable=False) from exc
    if cfg.get("fp16") is not None:
        wrap_fp16_model(model)
    checkpoint = checkpoint_globals.load_weights(model, checkpoint_path, trust=trust.checkpoints, load_state_dict=load_state_dict)
    model.CLASSES = checkpoint.get("meta", {}).get("CLASSES") or dataset.CLASSES
    if device.startswith("cuda"):
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        torch.cuda.set_device(index)
        pass_gpu_ids_as_torch_devices()
        return build_dp(model, "cuda", device_ids=[index])
    return build_dp(model, "cpu")


def pass_gpu_ids_as_torch_devices() -> None:
    """mmcv 1.7's Scatter hands GPU ids (ints) to torch's `_get_stream`, which takes a torch.device in torch 2.x:
    every GPU batch would fail with "'int' object has no attribute 'type'". Give it the device it expects."""
    import torch
    from mmcv.parallel import _functions

    original = _functions._get_stream
    if getattr(original, "takes_gpu_ids", False):
        return

    def get_stream(device: Any) -> Any:
        if isinstance(device, int):
            device = torch.device("cuda", device) if device >= 0 else torch.device("cpu")
        return original(device)

    get_stream.takes_gpu_ids = True  # type: ignore[attr-defined]
    _functions._get_stream = get_stream


def take_subset(dataset: Any, indices: list[int]) -> Any:
    """The same dataset restricted to the subset, in subset order (COCO evaluation follows img_ids)."""
    subset = copy.copy(dataset)
    subset.data_infos = [dataset.data_infos[i] for i in indices]
    if hasattr(dataset, "img_ids"):
        subset.img_ids = [dataset.img_ids[i] for i in indices]
    if getattr(dataset, "proposals", None) is not None:
        subset.proposals = [dataset.proposals[i] for i in indices]
    if hasattr(dataset, "flag"):
        subset.flag = dataset.flag[indices]
    return subset


def run_inference(model: Any, subset: Any, cfg: Any, batch_size: int, lease_lost: threading.Event | None) -> list[Any]:
    """`single_gpu_test`'s loop, batched; CUDA out of memory halves the batch and goes on (evaluator/batches.py)."""
    import torch
    from mmdet.core import encode_mask_results
    from mmdet.datasets import build_dataloader

    workers = int(cfg.get("data", {}).get("workers_per_gpu", 2))
    model.eval()

    def batches_from(start: int, size: int) -> Iterator[list[Any]]:
        rest = take_subset(subset, list(range(start, len(subset))))
        for data in build_dataloader(rest, samples_per_gpu=size, workers_per_gpu=workers, dist=False, shuffle=False,
                                     persistent_workers=False):
            with torch.no_grad():
                batch = model(return_loss=False, rescale=True, **data)
            if batch and isinstance(batch[0], tuple):
                batch = [(bbox, encode_mask_results(segm)) for bbox, segm in batch]
            yield batch

    return infer_halving(len(subset), batch_size, batches_from, torch.cuda.OutOfMemoryError, torch.cuda.empty_cache,
                         lease_lost)


def to_detections(result: Any, num_classes: int) -> insight.Detections:
    """An mmdet 2.x result (per-class (n, 5) arrays, with per-class mask RLEs) → one image's detections, in
    class order as `_det2json` walks them (§1.11 of the hook)."""
    segm = None
    if isinstance(result, tuple):
        bbox_result, segm = result
        if isinstance(segm, tuple):  # MS R-CNN: (masks, mask scores)
            segm = segm[0]
    else:
        bbox_result = result
    if not isinstance(bbox_result, list) or len(bbox_result) != num_classes:
        raise JobError(f"unsupported result ({type(result).__name__}): expected one box array per class", retryable=False)
    arrays = [np.asarray(per_class, dtype=np.float32).reshape(-1, 5) for per_class in bbox_result]
    stacked = np.concatenate(arrays) if arrays else np.zeros((0, 5), dtype=np.float32)
    labels = np.concatenate([np.full(len(a), label, dtype=np.int64) for label, a in enumerate(arrays)] or [np.zeros(0, np.int64)])
    masks = None
    if segm is not None:
        masks = [rle for per_class in segm for rle in per_class]
        if len(masks) != len(stacked):
            raise JobError(f"{len(masks)} masks for {len(stacked)} boxes", retryable=False)
    return insight.Detections(boxes=stacked[:, :4], scores=stacked[:, 4], labels=labels, masks=masks)


def ground_truth(evaluated: Any) -> insight.GroundTruth:
    """The dataset's own COCO api when it has one (what its `evaluate` reads: crowd regions included), else one
    built from `get_ann_info` and the data infos' sizes (mmdet 2's middle format has them); the confusion matrix
    matches `get_ann_info`'s boxes, as the analysis tool does."""
    if not all(hasattr(evaluated, name) for name in ("coco", "cat_ids", "img_ids")):
        sizes = [(info["height"], info["width"]) for info in evaluated.data_infos]
        return insight.ground_truth_of([_ground_truth(evaluated.get_ann_info(i), *size) for i, size in enumerate(sizes)], sizes,
                                       len(evaluated.CLASSES))
    anns = [evaluated.get_ann_info(i) for i in range(len(evaluated))]
    return insight.GroundTruth(
        evaluated.coco, list(evaluated.cat_ids), list(evaluated.img_ids),
        [np.asarray(a["bboxes"], dtype=np.float32).reshape(-1, 4) for a in anns],
        [np.asarray(a["labels"], dtype=np.int64) for a in anns],
        any("masks" in a for a in anns),
    )


def subset_metrics(evaluated: Any, results: list[Any], cfg: Any) -> dict[str, Any]:
    """The dataset's own evaluate() on the evaluated images (the subset, or all of val), with the config's
    evaluation options."""
    kwargs = dict(cfg.get("evaluation", {}))
    for key in HOOK_ONLY_EVAL_KEYS:
        kwargs.pop(key, None)
    return plain_metrics(lambda: evaluated.evaluate(results, logger="silent", **kwargs))

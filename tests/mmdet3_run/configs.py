"""Tiny MMDetection 3.x (MMEngine) configs for CPU training on the synthetic COCO data of tests/mmdet_run.

The models are the 2.x ones of tests/mmdet_run/configs.py (same backbone, necks and heads: the model dicts did
not change between 2.x and 3.x) with a `data_preprocessor`; the rest is laid out as mmdet 3.3's
`configs/_base_/` files are after merging: dataloaders with `data_root` + relative `ann_file`/`data_prefix`,
`val_evaluator`, `train_cfg` loops, `param_scheduler`, `optim_wrapper`, `default_hooks`. Nothing here imports
mmdet: the configs are built and hashed in the test process, trained in the mmdet 3.x environment.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Any

from tests.mmdet_run import configs as v2
from tests.mmdet_run.dataset import CocoPaths


@dataclass(frozen=True)
class Schedule3:
    by_epoch: bool = True
    max_epochs: int = 4
    max_iters: int = 96
    val_interval: int = 1  # epochs, or iterations when iter-based
    ckpt_interval: int = 1
    max_keep_ckpts: int | None = None
    save_best: str | None = None  # 'coco/bbox_mAP', 'auto', ...
    lr: float = 0.001
    batch_size: int = 2
    img_scale: int = 128
    log_interval: int = 2

    def but(self, **changes: Any) -> "Schedule3":
        return replace(self, **changes)


DATA_PREPROCESSOR = dict(type="DetDataPreprocessor", mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375],
                         bgr_to_rgb=True, pad_size_divisor=32)


def model(kind: str, num_classes: int) -> dict:
    base = {"retinanet": v2.retinanet_model, "mask_rcnn": v2.mask_rcnn_model}[kind](num_classes)
    built = copy.deepcopy(base)
    built["data_preprocessor"] = dict(DATA_PREPROCESSOR, pad_mask=kind == "mask_rcnn")
    return built


def detector_config(kind: str, data: CocoPaths, s: Schedule3) -> dict:
    with_mask = kind == "mask_rcnn"
    classes = tuple(data.classes)
    scale = (s.img_scale, s.img_scale)
    train_pipeline = [
        dict(type="LoadImageFromFile"),
        dict(type="LoadAnnotations", with_bbox=True, with_mask=with_mask),
        dict(type="Resize", scale=scale, keep_ratio=True),
        dict(type="RandomFlip", prob=0.5),
        dict(type="PackDetInputs"),
    ]
    test_pipeline = [
        dict(type="LoadImageFromFile"),
        dict(type="Resize", scale=scale, keep_ratio=True),
        dict(type="LoadAnnotations", with_bbox=True, with_mask=with_mask),
        dict(type="PackDetInputs", meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor")),
    ]
    root = str(data.root) + "/"

    def dataset(split: str, pipeline: list, test_mode: bool) -> dict:
        return dict(type="CocoDataset", data_root=root, ann_file=f"annotations/{split}.json", data_prefix=dict(img=f"{split}/"),
                    metainfo=dict(classes=classes), filter_cfg=dict(filter_empty_gt=not test_mode, min_size=0),
                    pipeline=pipeline, test_mode=test_mode)

    val_dataloader = dict(batch_size=1, num_workers=0, persistent_workers=False, drop_last=False,
                          sampler=dict(type="DefaultSampler", shuffle=False), dataset=dataset("val", test_pipeline, True))
    metric: Any = ["bbox", "segm"] if with_mask else "bbox"
    val_evaluator = dict(type="CocoMetric", ann_file=root + "annotations/val.json", metric=metric, format_only=False)
    checkpoint: dict[str, Any] = dict(type="CheckpointHook", interval=s.ckpt_interval, by_epoch=s.by_epoch)
    if s.max_keep_ckpts is not None:
        checkpoint["max_keep_ckpts"] = s.max_keep_ckpts
    if s.save_best:
        checkpoint["save_best"] = s.save_best
    length = s.max_epochs if s.by_epoch else s.max_iters
    train_cfg = (dict(type="EpochBasedTrainLoop", max_epochs=s.max_epochs, val_interval=s.val_interval) if s.by_epoch
                 else dict(type="IterBasedTrainLoop", max_iters=s.max_iters, val_interval=s.val_interval))
    return dict(
        default_scope="mmdet",
        model=model(kind, len(classes)),
        dataset_type="CocoDataset",
        data_root=root,
        train_pipeline=train_pipeline,
        test_pipeline=test_pipeline,
        train_dataloader=dict(batch_size=s.batch_size, num_workers=0, persistent_workers=False,
                              sampler=dict(type="DefaultSampler", shuffle=True), batch_sampler=dict(type="AspectRatioBatchSampler"),
                              dataset=dataset("train", train_pipeline, False)),
        val_dataloader=val_dataloader,
        test_dataloader=val_dataloader,
        val_evaluator=val_evaluator,
        test_evaluator=val_evaluator,
        train_cfg=train_cfg,
        val_cfg=dict(type="ValLoop"),
        test_cfg=dict(type="TestLoop"),
        param_scheduler=[
            dict(type="LinearLR", start_factor=0.1, by_epoch=False, begin=0, end=10),
            dict(type="MultiStepLR", begin=0, end=length, by_epoch=s.by_epoch, milestones=[max(1, int(length * 0.8))], gamma=0.1),
        ],
        optim_wrapper=dict(type="OptimWrapper", optimizer=dict(type="AdamW", lr=s.lr, betas=(0.9, 0.999), weight_decay=0.05),
                           clip_grad=dict(max_norm=35, norm_type=2)),
        auto_scale_lr=dict(enable=False, base_batch_size=16),
        default_hooks=dict(timer=dict(type="IterTimerHook"), logger=dict(type="LoggerHook", interval=s.log_interval),
                           param_scheduler=dict(type="ParamSchedulerHook"), checkpoint=checkpoint,
                           sampler_seed=dict(type="DistSamplerSeedHook"), visualization=dict(type="DetVisualizationHook")),
        env_cfg=dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0), dist_cfg=dict(backend="gloo")),
        vis_backends=[dict(type="LocalVisBackend")],
        visualizer=dict(type="DetLocalVisualizer", vis_backends=[dict(type="LocalVisBackend")], name="visualizer"),
        log_processor=dict(type="LogProcessor", window_size=50, by_epoch=s.by_epoch),
        log_level="INFO",
        load_from=None,
        resume=False,
        randomness=dict(seed=0),
    )

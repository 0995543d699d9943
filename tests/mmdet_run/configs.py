"""Tiny MMDetection 2.x configs (RetinaNet, Faster R-CNN, Mask R-CNN) for CPU training on `dataset.make_coco`.

Every config is a plain dict shaped like a mmdet 2.x config file after `_base_` merging (model, data,
evaluation, optimizer, lr_config, runner, checkpoint_config, log_config, ... the keys of
`configs/_base_/default_runtime.py`); `config_source` renders it as the Python source of a config file,
`write_config` writes that file. Nothing here imports mmdet: the configs can be built (and hashed) without it.

No pretrained weights anywhere (`init_cfg=None`, `load_from=None`): nothing is downloaded.
"""
from __future__ import annotations

import pprint
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .dataset import CocoPaths

IMG_NORM_CFG = dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True)


@dataclass(frozen=True)
class Schedule:
    """The training knobs a test may want to vary. Intervals count epochs (epoch-based) or iterations."""

    by_epoch: bool = True
    max_epochs: int = 10
    max_iters: int = 80
    # AdamW: a randomly initialised detector learns the shapes within ~150 iterations (SGD needs far more)
    optimizer: str = "AdamW"  # or "SGD" (momentum 0.9)
    lr: float = 0.001
    weight_decay: float | None = None  # default: 0.05 (AdamW), 0.0001 (SGD)
    grad_clip: float | None = 35  # optimizer_config.grad_clip.max_norm (None: no clipping, no `grad_norm` logged)
    warmup_iters: int = 10
    lr_steps: tuple[int, ...] | None = None  # default: 80% of the run
    log_interval: int = 2
    eval_interval: int = 1
    ckpt_interval: int = 1
    max_keep_ckpts: int | None = None
    save_best: str | None = None  # 'bbox_mAP', 'auto', ... (None: no best checkpoint)
    samples_per_gpu: int = 2
    workers_per_gpu: int = 0
    img_scale: int = 128
    classes: tuple[str, ...] | None = None  # default: the dataset's classes
    extra: dict[str, Any] = field(default_factory=dict)  # top-level keys merged last (e.g. custom log hooks)

    def but(self, **changes: Any) -> "Schedule":
        return replace(self, **changes)


# --------------------------------------------------------------------------------------------- models


#: Channels of the ResNet-18 stem and first stage (torchvision's ResNet-18 has 64): narrow, so that a training
#: is fast on CPU and a checkpoint (weights + SGD momentum) is ~4 MB instead of ~90 MB.
WIDTH = 16
NECK_CHANNELS = 64


def _backbone(width: int) -> dict:
    return dict(
        type="ResNet",
        depth=18,
        stem_channels=width,
        base_channels=width,
        num_stages=4,
        out_indices=(0, 1, 2, 3),
        frozen_stages=-1,
        # batch of 2, random init: BN must keep learning its statistics (norm_eval=False)
        norm_cfg=dict(type="BN", requires_grad=True),
        norm_eval=False,
        style="pytorch",
        init_cfg=None,
    )


def _stage_channels(width: int) -> list[int]:
    return [width, width * 2, width * 4, width * 8]


def retinanet_model(num_classes: int, width: int = WIDTH) -> dict:
    c = NECK_CHANNELS
    return dict(
        type="RetinaNet",
        backbone=_backbone(width),
        neck=dict(type="FPN", in_channels=_stage_channels(width), out_channels=c, start_level=1,
                  add_extra_convs="on_input", num_outs=3),
        bbox_head=dict(
            type="RetinaHead",
            num_classes=num_classes,
            in_channels=c,
            stacked_convs=2,
            feat_channels=c,
            anchor_generator=dict(type="AnchorGenerator", octave_base_scale=3, scales_per_octave=3,
                                  ratios=[0.5, 1.0, 2.0], strides=[8, 16, 32]),
            bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0, 0.0, 0.0, 0.0],
                            target_stds=[1.0, 1.0, 1.0, 1.0]),
            loss_cls=dict(type="FocalLoss", use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0),
            loss_bbox=dict(type="L1Loss", loss_weight=1.0),
        ),
        train_cfg=dict(
            assigner=dict(type="MaxIoUAssigner", pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0,
                          ignore_iof_thr=-1),
            allowed_border=-1,
            pos_weight=-1,
            debug=False,
        ),
        test_cfg=dict(nms_pre=1000, min_bbox_size=0, score_thr=0.05, nms=dict(type="nms", iou_threshold=0.5),
                      max_per_img=100),
    )


def _two_stage(kind: str, num_classes: int, with_mask: bool, width: int) -> dict:
    c = NECK_CHANNELS
    roi_head: dict[str, Any] = dict(
        type="StandardRoIHead",
        bbox_roi_extractor=dict(type="SingleRoIExtractor",
                                roi_layer=dict(type="RoIAlign", output_size=7, sampling_ratio=0),
                                out_channels=c, featmap_strides=[4, 8, 16, 32]),
        bbox_head=dict(
            type="Shared2FCBBoxHead",
            in_channels=c,
            fc_out_channels=128,
            roi_feat_size=7,
            num_classes=num_classes,
            bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0, 0.0, 0.0, 0.0],
                            target_stds=[0.1, 0.1, 0.2, 0.2]),
            reg_class_agnostic=False,
            loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
            loss_bbox=dict(type="L1Loss", loss_weight=1.0),
        ),
    )
    rcnn_train: dict[str, Any] = dict(
        assigner=dict(type="MaxIoUAssigner", pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0.5,
                      match_low_quality=True, ignore_iof_thr=-1),
        sampler=dict(type="RandomSampler", num=64, pos_fraction=0.25, neg_pos_ub=-1, add_gt_as_proposals=True),
        pos_weight=-1,
        debug=False,
    )
    rcnn_test: dict[str, Any] = dict(score_thr=0.05, nms=dict(type="nms", iou_threshold=0.5), max_per_img=100)
    if with_mask:
        roi_head["mask_roi_extractor"] = dict(type="SingleRoIExtractor",
                                              roi_layer=dict(type="RoIAlign", output_size=14, sampling_ratio=0),
                                              out_channels=c, featmap_strides=[4, 8, 16, 32])
        roi_head["mask_head"] = dict(type="FCNMaskHead", num_convs=2, in_channels=c, conv_out_channels=c,
                                     num_classes=num_classes,
                                     loss_mask=dict(type="CrossEntropyLoss", use_mask=True, loss_weight=1.0))
        rcnn_train["mask_size"] = 28
        rcnn_test["mask_thr_binary"] = 0.5
    return dict(
        type=kind,
        backbone=_backbone(width),
        neck=dict(type="FPN", in_channels=_stage_channels(width), out_channels=c, num_outs=5),
        rpn_head=dict(
            type="RPNHead",
            in_channels=c,
            feat_channels=c,
            anchor_generator=dict(type="AnchorGenerator", scales=[8], ratios=[0.5, 1.0, 2.0],
                                  strides=[4, 8, 16, 32, 64]),
            bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0, 0.0, 0.0, 0.0],
                            target_stds=[1.0, 1.0, 1.0, 1.0]),
            loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=1.0),
            loss_bbox=dict(type="L1Loss", loss_weight=1.0),
        ),
        roi_head=roi_head,
        train_cfg=dict(
            rpn=dict(
                assigner=dict(type="MaxIoUAssigner", pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3,
                              match_low_quality=True, ignore_iof_thr=-1),
                sampler=dict(type="RandomSampler", num=128, pos_fraction=0.5, neg_pos_ub=-1,
                             add_gt_as_proposals=False),
                allowed_border=-1,
                pos_weight=-1,
                debug=False,
            ),
            rpn_proposal=dict(nms_pre=500, max_per_img=150, nms=dict(type="nms", iou_threshold=0.7), min_bbox_size=0),
            rcnn=rcnn_train,
        ),
        test_cfg=dict(
            rpn=dict(nms_pre=300, max_per_img=100, nms=dict(type="nms", iou_threshold=0.7), min_bbox_size=0),
            rcnn=rcnn_test,
        ),
    )


def faster_rcnn_model(num_classes: int, width: int = WIDTH) -> dict:
    return _two_stage("FasterRCNN", num_classes, with_mask=False, width=width)


def mask_rcnn_model(num_classes: int, width: int = WIDTH) -> dict:
    return _two_stage("MaskRCNN", num_classes, with_mask=True, width=width)


# ----------------------------------------------------------------------------------------- the config


def detector_config(model: dict, data: CocoPaths, schedule: Schedule, *, with_mask: bool = False) -> dict:
    """A complete mmdet 2.x config around `model` (its `num_classes` must match the classes)."""
    s = schedule
    classes = tuple(s.classes or data.classes)
    scale = (s.img_scale, s.img_scale)
    train_pipeline = [
        dict(type="LoadImageFromFile"),
        dict(type="LoadAnnotations", with_bbox=True, with_mask=with_mask),
        dict(type="Resize", img_scale=scale, keep_ratio=True),
        dict(type="RandomFlip", flip_ratio=0.5),
        dict(type="Normalize", **IMG_NORM_CFG),
        dict(type="Pad", size_divisor=32),
        dict(type="DefaultFormatBundle"),
        dict(type="Collect", keys=["img", "gt_bboxes", "gt_labels"] + (["gt_masks"] if with_mask else [])),
    ]
    test_pipeline = [
        dict(type="LoadImageFromFile"),
        dict(
            type="MultiScaleFlipAug",
            img_scale=scale,
            flip=False,
            transforms=[
                dict(type="Resize", keep_ratio=True),
                dict(type="RandomFlip"),
                dict(type="Normalize", **IMG_NORM_CFG),
                dict(type="Pad", size_divisor=32),
                dict(type="ImageToTensor", keys=["img"]),
                dict(type="Collect", keys=["img"]),
            ],
        ),
    ]

    def split(ann: Path, img_dir: Path, pipeline: list) -> dict:
        return dict(type="CocoDataset", ann_file=str(ann), img_prefix=str(img_dir) + "/", classes=classes,
                    pipeline=pipeline)

    metric: str | list[str] = ["bbox", "segm"] if with_mask else "bbox"
    evaluation: dict[str, Any] = dict(interval=s.eval_interval, metric=metric)
    if s.save_best:
        evaluation["save_best"] = s.save_best
    checkpoint_config: dict[str, Any] = dict(interval=s.ckpt_interval)
    if not s.by_epoch:
        checkpoint_config["by_epoch"] = False
    if s.max_keep_ckpts is not None:
        checkpoint_config["max_keep_ckpts"] = s.max_keep_ckpts

    length = s.max_epochs if s.by_epoch else s.max_iters
    steps = list(s.lr_steps) if s.lr_steps is not None else [max(1, int(length * 0.8))]
    lr_config: dict[str, Any] = dict(policy="step", warmup="linear", warmup_iters=s.warmup_iters,
                                     warmup_ratio=0.1, step=steps)
    if not s.by_epoch:
        lr_config["by_epoch"] = False

    if s.optimizer == "SGD":
        optimizer = dict(type="SGD", lr=s.lr, momentum=0.9,
                         weight_decay=0.0001 if s.weight_decay is None else s.weight_decay)
    elif s.optimizer == "AdamW":
        optimizer = dict(type="AdamW", lr=s.lr, betas=(0.9, 0.999),
                         weight_decay=0.05 if s.weight_decay is None else s.weight_decay)
    else:
        raise ValueError(f"optimizer {s.optimizer!r}: 'AdamW' or 'SGD'")

    text_logger: dict[str, Any] = dict(type="TextLoggerHook")
    if not s.by_epoch:
        text_logger["by_epoch"] = False

    cfg: dict[str, Any] = dict(
        model=model,
        dataset_type="CocoDataset",
        data_root=str(data.root) + "/",
        img_norm_cfg=dict(IMG_NORM_CFG),
        train_pipeline=train_pipeline,
        test_pipeline=test_pipeline,
        data=dict(
            samples_per_gpu=s.samples_per_gpu,
            workers_per_gpu=s.workers_per_gpu,
            train=split(data.train_ann, data.train_img_dir, train_pipeline),
            val=split(data.val_ann, data.val_img_dir, test_pipeline),
            test=split(data.val_ann, data.val_img_dir, test_pipeline),
        ),
        evaluation=evaluation,
        optimizer=optimizer,
        optimizer_config=dict(grad_clip=None if s.grad_clip is None else dict(max_norm=s.grad_clip, norm_type=2)),
        lr_config=lr_config,
        runner=(dict(type="EpochBasedRunner", max_epochs=s.max_epochs) if s.by_epoch
                else dict(type="IterBasedRunner", max_iters=s.max_iters)),
        checkpoint_config=checkpoint_config,
        log_config=dict(interval=s.log_interval, hooks=[text_logger]),
        custom_hooks=[dict(type="NumClassCheckHook")],
        dist_params=dict(backend="gloo"),
        log_level="INFO",
        load_from=None,
        resume_from=None,
        workflow=[("train", 1)],
        opencv_num_threads=0,
        mp_start_method="fork",
        auto_scale_lr=dict(enable=False, base_batch_size=16),
    )
    cfg.update(s.extra)
    return cfg


def retinanet_config(data: CocoPaths, schedule: Schedule = Schedule()) -> dict:
    classes = schedule.classes or data.classes
    return detector_config(retinanet_model(len(classes)), data, schedule)


def faster_rcnn_config(data: CocoPaths, schedule: Schedule = Schedule()) -> dict:
    classes = schedule.classes or data.classes
    return detector_config(faster_rcnn_model(len(classes)), data, schedule)


def mask_rcnn_config(data: CocoPaths, schedule: Schedule = Schedule()) -> dict:
    classes = schedule.classes or data.classes
    return detector_config(mask_rcnn_model(len(classes)), data, schedule, with_mask=True)


def config_source(cfg: dict) -> str:
    """The config as the Python source of a mmdet 2.x config file (one assignment per top-level key)."""
    lines = ["# Generated by tests/mmdet_run/configs.py: a tiny detector on a synthetic COCO dataset (CPU).", ""]
    for key, value in cfg.items():
        lines.append(f"{key} = {pprint.pformat(value, width=110, sort_dicts=False)}")
    return "\n".join(lines) + "\n"


def write_config(cfg: dict | str, path: Path) -> Path:
    """Write a config (dict or source text) to `path` (its basename is what train.py dumps into the work_dir)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(cfg if isinstance(cfg, str) else config_source(cfg), encoding="utf-8")
    return path

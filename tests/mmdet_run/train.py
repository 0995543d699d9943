"""`tools/train.py` of MMDetection 2.28.2, for CPU: `python -m tests.mmdet_run.train CONFIG.py WORK_DIR [...]`.

Step for step what mmdet 2.28.2's `tools/train.py` does (non-distributed): read the config, set the work_dir,
dump the config as `WORK_DIR/<basename of CONFIG>`, open `WORK_DIR/<timestamp>.log` with `get_root_logger`,
log the environment and the config, put `env_info`, `config` (`cfg.pretty_text`), `seed` and `exp_name`
into the meta dict, build the detector and the datasets, store mmdet version and CLASSES in the checkpoint
meta, and call `mmdet.apis.train_detector(..., distributed=False, validate=True, timestamp=..., meta=...)`,
whose `TextLoggerHook` writes `WORK_DIR/<timestamp>.log.json` (meta as its header line).

Differences, all outside what ends up in the work_dir:
- the work_dir is positional, the seed defaults to 0 (not random), and `--device cpu` (the default) hides
  every GPU (`CUDA_VISIBLE_DEVICES=`) before torch is imported, so `get_device()` answers 'cpu' and
  `build_dp` gives an `MMDataParallel` without device ids, as CPU training in 2.28 does;
- if `<timestamp>.log` already exists in the work_dir (two launches within one second), it waits for the
  next second instead of appending to the other launch's log.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train a detector (mmdet 2.28.2 tools/train.py, on CPU)")
    parser.add_argument("config", help="train config file path")
    parser.add_argument("work_dir", help="the dir to save logs and models")
    parser.add_argument("--resume-from", help="the checkpoint file to resume from")
    parser.add_argument("--auto-resume", action="store_true",
                        help="resume from the latest checkpoint automatically")
    parser.add_argument("--no-validate", action="store_true",
                        help="whether not to evaluate the checkpoint during training")
    parser.add_argument("--gpu-id", type=int, default=0, help="cfg.gpu_ids = [gpu_id] (as tools/train.py)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--deterministic", action="store_true",
                        help="whether to set deterministic options for CUDNN backend.")
    parser.add_argument("--cfg-options", nargs="+", default=None, metavar="KEY=VALUE",
                        help="override settings of the config (mmcv DictAction syntax)")
    parser.add_argument("--device", choices=["cpu", "auto"], default="cpu",
                        help="cpu (default): hide all GPUs; auto: what get_device() finds")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ.setdefault("LOCAL_RANK", "0")

    import os.path as osp

    import mmcv
    import torch
    from mmcv import Config, DictAction
    from mmcv.utils import get_git_hash
    from mmdet import __version__
    from mmdet.apis import init_random_seed, set_random_seed, train_detector
    from mmdet.datasets import build_dataset
    from mmdet.models import build_detector
    from mmdet.utils import (
        collect_env,
        get_device,
        get_root_logger,
        replace_cfg_vals,
        rfnext_init_model,
        setup_multi_processes,
        update_data_root,
    )

    cfg = Config.fromfile(args.config)
    # replace the ${key} with the value of cfg.key
    cfg = replace_cfg_vals(cfg)
    # update data root according to MMDET_DATASETS
    update_data_root(cfg)
    if args.cfg_options:
        options = argparse.Namespace()
        DictAction(option_strings=["--cfg-options"], dest="cfg_options")(None, options, args.cfg_options)
        cfg.merge_from_dict(options.cfg_options)

    # set multi-process settings
    setup_multi_processes(cfg)
    if cfg.get("cudnn_benchmark", False):
        torch.backends.cudnn.benchmark = True

    cfg.work_dir = args.work_dir
    if args.resume_from is not None:
        cfg.resume_from = args.resume_from
    cfg.auto_resume = args.auto_resume
    cfg.gpu_ids = [args.gpu_id]
    distributed = False

    # create work_dir
    mmcv.mkdir_or_exist(osp.abspath(cfg.work_dir))
    # dump config
    cfg.dump(osp.join(cfg.work_dir, osp.basename(args.config)))
    # init the logger before other steps
    timestamp = time.strftime("%Y%m%d_%H%M%S", time.localtime())
    while osp.exists(osp.join(cfg.work_dir, f"{timestamp}.log")):
        time.sleep(0.1)
        timestamp = time.strftime("%Y%m%d_%H%M%S", time.localtime())
    log_file = osp.join(cfg.work_dir, f"{timestamp}.log")
    logger = get_root_logger(log_file=log_file, log_level=cfg.log_level)

    # init the meta dict to record some important information such as
    # environment info and seed, which will be logged
    meta = dict()
    env_info_dict = collect_env()
    env_info = "\n".join([f"{k}: {v}" for k, v in env_info_dict.items()])
    dash_line = "-" * 60 + "\n"
    logger.info("Environment info:\n" + dash_line + env_info + "\n" + dash_line)
    meta["env_info"] = env_info
    meta["config"] = cfg.pretty_text
    logger.info(f"Distributed training: {distributed}")
    logger.info(f"Config:\n{cfg.pretty_text}")

    cfg.device = get_device()
    # set random seeds
    seed = init_random_seed(args.seed, device=cfg.device)
    logger.info(f"Set random seed to {seed}, deterministic: {args.deterministic}")
    set_random_seed(seed, deterministic=args.deterministic)
    cfg.seed = seed
    meta["seed"] = seed
    meta["exp_name"] = osp.basename(args.config)

    model = build_detector(cfg.model, train_cfg=cfg.get("train_cfg"), test_cfg=cfg.get("test_cfg"))
    model.init_weights()
    # init rfnext if 'RFSearchHook' is defined in cfg
    rfnext_init_model(model, cfg=cfg)

    datasets = [build_dataset(cfg.data.train)]
    if len(cfg.workflow) == 2:
        import copy

        assert "val" in [mode for (mode, _) in cfg.workflow]
        val_dataset = copy.deepcopy(cfg.data.val)
        val_dataset.pipeline = cfg.data.train.get("pipeline", cfg.data.train.dataset.get("pipeline"))
        datasets.append(build_dataset(val_dataset))
    if cfg.checkpoint_config is not None:
        # save mmdet version, config file content and class names in checkpoints as meta data
        cfg.checkpoint_config.meta = dict(mmdet_version=__version__ + get_git_hash()[:7],
                                          CLASSES=datasets[0].CLASSES)
    # add an attribute for visualization convenience
    model.CLASSES = datasets[0].CLASSES
    train_detector(model, datasets, cfg, distributed=distributed, validate=not args.no_validate,
                   timestamp=timestamp, meta=meta)


if __name__ == "__main__":
    main(sys.argv[1:])

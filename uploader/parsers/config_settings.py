"""What the sidecar takes from a run's evaluated config (`RunConfig`): runner type, momentum, intervals and the
W&B hook's options, as mmcv/mmengine would have read them off the same dict."""
from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from common.numbers import as_int, is_number
from uploader.parsers.config_eval import ConfigParseError, evaluate_config

# What torch puts into param_groups when a config leaves momentum/betas out; the hook logged these values.
TORCH_DEFAULT_MOMENTUM = {"SGD": 0.0, "Adam": 0.9, "AdamW": 0.9, "Adamax": 0.9, "NAdam": 0.9, "RAdam": 0.9}

# Registry names (without a scope prefix such as `mmdet.`) of the mmcv 1.x logger hooks that talk to W&B.
WANDB_HOOK_TYPES = frozenset({"MMDetWandbHook", "MMSegWandbHook", "WandbLoggerHook"})


def _get(cfg: Any, *path: str) -> Any:
    """Follow dict keys; None where a level is missing or is not a dict."""
    for key in path:
        if not isinstance(cfg, Mapping):
            return None
        cfg = cfg.get(key)
    return cfg


def _type_name(entry: Any) -> str:
    """A registry type without its scope prefix (`mmdet.MMDetWandbHook` -> `MMDetWandbHook`)."""
    kind = _get(entry, "type")
    return kind.rsplit(".", 1)[-1] if isinstance(kind, str) else ""


def _entries(value: Any) -> list[Any]:
    """Hook/backend lists, tolerating a single dict where a list is expected."""
    if isinstance(value, Mapping):
        return [value]
    return list(value) if isinstance(value, (list, tuple)) else []


def _loop_by_epoch(entry: Any) -> bool | None:
    """Epoch- or iteration-based from a runner (mmcv) or train loop (mmengine) entry."""
    if not isinstance(entry, Mapping):
        return None
    name = _type_name(entry)
    if "EpochBased" in name:
        return True
    if "IterBased" in name:
        return False
    if "max_epochs" in entry or "max_iters" in entry:  # custom runner/loop types
        return "max_epochs" in entry
    by_epoch = entry.get("by_epoch")  # mmengine builds a loop from by_epoch when no type is given
    return by_epoch if isinstance(by_epoch, bool) else None


def runner_by_epoch(cfg: Mapping[str, Any]) -> bool | None:
    """Whether training counts epochs; it decides how log lines map to W&B steps."""
    for entry in (cfg.get("runner"), cfg.get("train_cfg")):
        by_epoch = _loop_by_epoch(entry)
        if by_epoch is not None:
            return by_epoch
    return True if is_number(cfg.get("total_epochs")) else None  # mmdet 2.x before `runner` existed


def _optimizer(cfg: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """`optim_wrapper.optimizer` (mmengine) or `optimizer` (mmcv)."""
    optimizer = _get(cfg, "optim_wrapper", "optimizer")
    if not isinstance(optimizer, Mapping):
        optimizer = cfg.get("optimizer")
    return optimizer if isinstance(optimizer, Mapping) else None


def optimizer_momentum(cfg: Mapping[str, Any]) -> float | None:
    """The `momentum` (or first of `betas`) the config sets; None where it leaves it to torch."""
    optimizer = _optimizer(cfg)
    if optimizer is None:
        return None
    momentum = optimizer.get("momentum")
    if is_number(momentum):
        return float(momentum)
    betas = optimizer.get("betas")
    if isinstance(betas, (list, tuple)) and betas and is_number(betas[0]):
        return float(betas[0])
    return None


def wandb_hook_options(cfg: Mapping[str, Any]) -> dict[str, Any] | None:
    """The W&B hook entry (mmcv) or WandbVisBackend entry (mmengine), `type` included, as its options.

    For a `log_config.hooks` entry without `interval`, the interval is `log_config.interval`, because
    mmcv's `register_logger_hooks` passes it as the default.
    """
    log_config = cfg.get("log_config")
    for entry in _entries(_get(log_config, "hooks")):
        if isinstance(entry, Mapping) and _type_name(entry) in WANDB_HOOK_TYPES:
            options = dict(copy.deepcopy(entry))
            default_interval = _get(log_config, "interval")
            if "interval" not in options and default_interval is not None:
                options["interval"] = default_interval
            return options
    for entry in _entries(_get(cfg, "visualizer", "vis_backends")):
        if isinstance(entry, Mapping) and _type_name(entry) == "WandbVisBackend":
            return dict(copy.deepcopy(entry))
    return None


def checkpoint_interval(cfg: Mapping[str, Any]) -> int | None:
    """CheckpointHook interval: which checkpoints exist and when the hook uploaded them."""
    interval = as_int(_get(cfg, "checkpoint_config", "interval"))
    return interval if interval is not None else as_int(_get(cfg, "default_hooks", "checkpoint", "interval"))


def evaluation_interval(cfg: Mapping[str, Any]) -> int | None:
    """Validation interval: when val rows and prediction tables are expected."""
    interval = as_int(_get(cfg, "evaluation", "interval"))
    return interval if interval is not None else as_int(_get(cfg, "train_cfg", "val_interval"))


def log_interval(cfg: Mapping[str, Any]) -> int | None:
    """Logger interval: how many iterations one train row stands for."""
    interval = as_int(_get(cfg, "log_config", "interval"))
    return interval if interval is not None else as_int(_get(cfg, "default_hooks", "logger", "interval"))


@dataclass(frozen=True)
class RunConfig:
    """A run's evaluated config and the settings the sidecar needs to replay MMDetWandbHook."""

    name: str  # the file name the config is uploaded as
    text: str
    values: dict[str, Any]
    by_epoch: bool | None
    momentum: float | None  # what the hook logged with every row (no log file carries it)
    log_interval: int | None
    eval_interval: int | None  # validation every N epochs (or iterations); None: no validation configured
    hook_options: dict[str, Any]


def parse_text(text: str, name: str) -> RunConfig:
    """The config in `text`; raises ConfigParseError (file name, line, message) when it is not valid Python."""
    values = evaluate_config(text, name).values
    return RunConfig(
        name=name, text=text, values=values, by_epoch=runner_by_epoch(values),
        momentum=_momentum(values), log_interval=log_interval(values),
        eval_interval=_eval_interval(values), hook_options=wandb_hook_options(values) or {},
    )


def load_text(text: str, name: str) -> RunConfig | None:
    """The config in `text`; None when it is not valid Python (`parse_text` says why)."""
    try:
        return parse_text(text, name)
    except ConfigParseError:
        return None


def _eval_interval(values: dict[str, Any]) -> int | None:
    """mmdet 2.x validates every epoch when `evaluation` gives no interval; mmengine when a val loop exists."""
    interval = evaluation_interval(values)
    if interval is not None:
        return interval
    return 1 if isinstance(values.get("evaluation"), dict) or isinstance(values.get("val_cfg"), dict) else None


def _momentum(values: dict[str, Any]) -> float | None:
    """The config's momentum, else torch's default for the optimizer type."""
    found = optimizer_momentum(values)
    if found is not None:
        return found
    kind = _get(_optimizer(values), "type")
    return TORCH_DEFAULT_MOMENTUM.get(kind) if isinstance(kind, str) else None

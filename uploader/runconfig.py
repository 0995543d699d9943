"""The training config of a run: found in the work_dir (or the log header), evaluated without executing it.

The hook uploaded `work_dir/<exp_name>` and put its variables into `wandb.config`; we do the same from the
dump, falling back to the `config` string of the log header, and read the hook's own options from it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uploader.discovery import FoundLog
from uploader.mmcv_config import (
    ConfigParseError,
    evaluate_config,
    evaluation_interval,
    log_interval,
    optimizer_momentum,
    runner_by_epoch,
    wandb_hook_options,
)
from uploader.records import LogFormat
from uploader.tail import read_head

MAX_CONFIG_BYTES = 16 << 20
# What torch puts into param_groups when a config leaves momentum/betas out; the hook logged these values.
TORCH_DEFAULT_MOMENTUM = {"SGD": 0.0, "Adam": 0.9, "AdamW": 0.9, "Adamax": 0.9, "NAdam": 0.9, "RAdam": 0.9}


@dataclass(frozen=True)
class RunConfig:
    name: str  # the file name the config is uploaded as
    text: str
    values: dict[str, Any]
    by_epoch: bool | None
    momentum: float | None
    log_interval: int | None
    eval_interval: int | None  # validation every N epochs (or iterations); None: no validation configured
    hook_options: dict[str, Any]


def load_text(text: str, name: str) -> RunConfig | None:
    try:
        values = evaluate_config(text, name).values
    except ConfigParseError:
        return None
    return RunConfig(
        name=name, text=text, values=values, by_epoch=runner_by_epoch(values),
        momentum=_momentum(values), log_interval=log_interval(values),
        eval_interval=_eval_interval(values), hook_options=wandb_hook_options(values) or {},
    )


def _eval_interval(values: dict[str, Any]) -> int | None:
    """mmdet 2.x validates every epoch when `evaluation` gives no interval; mmengine when a val loop exists."""
    interval = evaluation_interval(values)
    if interval is not None:
        return interval
    return 1 if isinstance(values.get("evaluation"), dict) or isinstance(values.get("val_cfg"), dict) else None


def _momentum(values: dict[str, Any]) -> float | None:
    found = optimizer_momentum(values)
    if found is not None:
        return found
    optimizer = values.get("optimizer")
    wrapper = values.get("optim_wrapper")
    if isinstance(wrapper, dict) and isinstance(wrapper.get("optimizer"), dict):
        optimizer = wrapper["optimizer"]
    kind = optimizer.get("type") if isinstance(optimizer, dict) else None
    return TORCH_DEFAULT_MOMENTUM.get(kind) if isinstance(kind, str) else None


def load_file(path: Path) -> RunConfig | None:
    try:
        text = read_head(path, MAX_CONFIG_BYTES).decode("utf-8", errors="replace")
    except OSError:
        return None
    return load_text(text, path.name)


def for_log(found: FoundLog) -> RunConfig | None:
    """mmdet 2.x: `work_dir/<exp_name>` or the header's config; mmengine: `vis_data/config.py`."""
    if found.format is LogFormat.MMENGINE_SCALARS and found.config is not None:
        return load_file(found.config)
    if found.format is not LogFormat.MMDET2_LOGJSON:
        return None
    header = _first_line(found.path)
    exp_name = header.get("exp_name")
    if isinstance(exp_name, str) and exp_name and "/" not in exp_name:
        config = load_file(found.work_dir / exp_name)
        if config is not None:
            return config
    text = header.get("config")
    if isinstance(text, str):
        return load_text(text, exp_name if isinstance(exp_name, str) and exp_name else "config.py")
    return None


def _first_line(path: Path) -> dict[str, Any]:
    try:
        line = read_head(path, MAX_CONFIG_BYTES).split(b"\n", 1)[0]
        header = json.loads(line)
    except (OSError, ValueError):
        return {}
    return header if isinstance(header, dict) else {}

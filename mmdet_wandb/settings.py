"""Every setting of a command, from one precedence — CLI > environment > config file > default — into one frozen
object that the commands hand on. Each value goes through its option's one validator whatever level it came from,
and an error names the level as the user wrote it (`--interval`, `MMDET_WANDB_INTERVAL`, `config file X: interval`).

The hook's options take one more level below the file, each run's `MMDetWandbHook` entry: they stay layers here
(`hook_options.Layers`) and are resolved per run (uploader/hook_options.py).
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from common.trust import Trust
from uploader import hook_options

MAX_WORK_DIR_LABELS = 1000  # `metrics_work_dir_labels` at most: 3 series a work_dir, a few thousand a node


class SettingsError(ValueError):
    """A value that no level may have; the message names where it came from."""


@dataclass(frozen=True)
class HookFlags:
    """The hook's options as the CLI gave them (None: not given)."""

    config: Path | None = None
    project: str | None = None
    entity: str | None = None
    init_kwargs: str | None = None
    interval: int | None = None
    log_checkpoint: bool | None = None
    log_checkpoint_metadata: bool | None = None
    num_eval_images: int | None = None
    bbox_score_thr: float | None = None
    eval_classwise: bool | None = None
    confusion_score_thr: float | None = None
    confusion_iou_thr: float | None = None
    eval_full_val: bool | None = None


@dataclass(frozen=True)
class ServiceFlags:
    """The service's own settings as the CLI gave them (None: not given)."""

    log_timezone: str | None = None
    trust_checkpoints: bool | None = None
    trust_configs: bool | None = None
    allow_import: tuple[str, ...] | None = None
    dataset_roots: tuple[Path, ...] | None = None
    wandb_timeout: float | None = None
    metrics_port: int | None = None
    metrics_addr: str | None = None
    metrics_work_dir_labels: int | None = None
    forget_after: float | None = None


@dataclass(frozen=True)
class Settings:
    config_file: Path | None
    layers: hook_options.Layers  # the hook's options, resolved per run with its hook entry
    log_timezone: ZoneInfo | None  # the training hosts' zone; None: this machine's
    trust: Trust
    dataset_roots: tuple[Path, ...]
    wandb_timeout_s: float
    metrics_port: int | None  # None: no metrics endpoint
    metrics_addr: str
    metrics_work_dir_labels: int  # per-work_dir rows for at most this many work_dirs (0: totals only)
    forget_after_s: float  # a work_dir deleted from disk this long, with nothing pending, is forgotten (db/forget.py)


def _zone(value: Any) -> ZoneInfo:
    try:
        return ZoneInfo(str(value))
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError("not an IANA time zone (e.g. Europe/Berlin, UTC)") from None


def _flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in hook_options.TRUE | hook_options.FALSE:
        return value.strip().lower() in hook_options.TRUE
    raise ValueError("true or false is expected")


def _modules(value: Any) -> tuple[str, ...]:
    """A list of module names, or one comma-separated string of them."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(m, str) for m in items):
        raise ValueError("a list of module names is expected")
    names = tuple(m.strip() for m in items if m.strip())
    bad = [m for m in names if not all(part.isidentifier() for part in m.split("."))]
    if bad:
        raise ValueError(f"not a module name: {bad[0]!r}")
    return names


def _paths(value: Any) -> tuple[Path, ...]:
    items = value.split(os.pathsep) if isinstance(value, str) else value
    return tuple(Path(p).expanduser().absolute() for p in items if str(p))


def _seconds(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("a number of seconds is expected")
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ValueError("a number of seconds is expected") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError("it must be a finite number above 0")
    return seconds


def _port(value: Any) -> int:
    if isinstance(value, bool) or not str(value).strip().isdigit() or not 1 <= int(value) <= 65535:
        raise ValueError("a TCP port from 1 to 65535 is expected")
    return int(value)


def _labels(value: Any) -> int:
    """The cap on per-work_dir label sets: each is a series Prometheus keeps, so it has a ceiling of its own."""
    if isinstance(value, bool) or not str(value).strip().isdigit() or int(value) > MAX_WORK_DIR_LABELS:
        raise ValueError(f"a whole number from 0 to {MAX_WORK_DIR_LABELS} is expected")
    return int(value)


def _address(value: Any) -> str:
    if not isinstance(value, str) or not value.strip() or any(c.isspace() for c in value.strip()):
        raise ValueError("a host name or IP address is expected")
    return value.strip()


@dataclass(frozen=True)
class Setting:
    """One service setting: its variable, its config file key (None: not in the file), its validator, its default."""

    env: str
    file_key: str | None
    parse: Callable[[Any], Any]
    default: Any


SERVICE: dict[str, Setting] = {
    "log_timezone": Setting("MMDET_WANDB_LOG_TIMEZONE", "log_timezone", _zone, None),
    "trust_checkpoints": Setting("MMDET_WANDB_TRUST_CHECKPOINTS", "trust_checkpoints", _flag, False),
    "trust_configs": Setting("MMDET_WANDB_TRUST_CONFIGS", "trust_configs", _flag, False),
    "allow_import": Setting("MMDET_WANDB_ALLOW_IMPORT", "allow_import", _modules, ()),
    "dataset_roots": Setting("MMDET_WANDB_DATASET_ROOTS", None, _paths, ()),
    "wandb_timeout": Setting("MMDET_WANDB_TIMEOUT", None, _seconds, 60.0),
    "metrics_port": Setting("MMDET_WANDB_METRICS_PORT", "metrics_port", _port, None),
    "metrics_addr": Setting("MMDET_WANDB_METRICS_ADDR", "metrics_addr", _address, "127.0.0.1"),
    "metrics_work_dir_labels": Setting("MMDET_WANDB_METRICS_WORK_DIR_LABELS", "metrics_work_dir_labels", _labels, 0),
    "forget_after": Setting("MMDET_WANDB_FORGET_AFTER", "forget_after", _seconds, 7 * 24 * 3600.0),
}


def service_value(name: str, given: Any, environ: Mapping[str, str], file: Mapping[str, Any], file_path: Path | None) -> Any:
    """CLI > environment > config file > default, through the setting's one validator."""
    setting = SERVICE[name]
    for where, value in (
        (hook_options.cli_flag(name), given),
        (setting.env, environ.get(setting.env) or None),
        (f"config file {file_path}: {setting.file_key}", file.get(setting.file_key) if setting.file_key else None),
    ):
        if value is None or value == ():
            continue
        try:
            return setting.parse(value)
        except ValueError as exc:
            raise SettingsError(f"{where} = {value!r}: {exc}") from None
    return setting.default


def _timezone(given: str | None, environ: Mapping[str, str], file: Mapping[str, Any], file_path: Path | None) -> ZoneInfo | None:
    """As `service_value`, then `TZ` when it names an IANA zone (compose passes it); None: this machine's zone."""
    zone = service_value("log_timezone", given, environ, file, file_path)
    if zone is None and environ.get("TZ"):
        try:
            return ZoneInfo(environ["TZ"].lstrip(":"))
        except (ZoneInfoNotFoundError, ValueError):
            return None  # a POSIX TZ string: the C library's local time reads it
    return zone


def hook_layers(flags: HookFlags, config_file: Path | None, environ: Mapping[str, str]) -> hook_options.Layers:
    """The service's layers of the hook's options; `--project`/`--entity` are keys of the CLI's init_kwargs."""
    try:
        init = hook_options.convert("init_kwargs", flags.init_kwargs, "--init-kwargs") if flags.init_kwargs else {}
        init.update({k: v for k, v in (("project", flags.project), ("entity", flags.entity)) if v})
        cli = {name: getattr(flags, name) for name in hook_options.OPTIONS if name != "init_kwargs"} | {"init_kwargs": init or None}
        return hook_options.layers(cli, config_file, environ)
    except hook_options.HookOptionsError as exc:
        raise SettingsError(str(exc)) from None


def load(data_dir: Path, hook: HookFlags = HookFlags(), service: ServiceFlags = ServiceFlags(),
         environ: Mapping[str, str] = os.environ) -> Settings:
    """Every setting of a command, checked; SettingsError names the first bad one."""
    try:
        config_file = hook_options.find_file(hook.config, data_dir, environ)
        layers = hook_layers(hook, config_file, environ)
    except hook_options.HookOptionsError as exc:
        raise SettingsError(str(exc)) from None
    file = layers.file

    def value(name: str) -> Any:
        return service_value(name, getattr(service, name), environ, file, config_file)

    return Settings(
        config_file=config_file,
        layers=layers,
        log_timezone=_timezone(service.log_timezone, environ, file, config_file),
        trust=Trust(checkpoints=value("trust_checkpoints"), configs=value("trust_configs"), imports=value("allow_import")),
        dataset_roots=value("dataset_roots"),
        wandb_timeout_s=value("wandb_timeout"),
        metrics_port=value("metrics_port"),
        metrics_addr=value("metrics_addr"),
        metrics_work_dir_labels=value("metrics_work_dir_labels"),
        forget_after_s=value("forget_after"),
    )

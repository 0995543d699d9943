"""The hook's options, resolved per work_dir: CLI > environment > config file > the training config's
`MMDetWandbHook` entry > the hook's defaults.

A user who configured `MMDetWandbHook` gets its behaviour without running it; the service's own layers
override it (and each other) option by option. `init_kwargs` merges key by key across the layers, with
`WANDB_PROJECT`/`WANDB_ENTITY` as the environment's `project`/`entity`. Pure functions: the CLI reads the
layers once, the uploader resolves them for each run from the hook entry stored with the run.
"""
from __future__ import annotations

import json
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

@dataclass(frozen=True)
class Option:
    """One of the hook's options: its type, the hook's default, and the range every level is checked against."""

    kind: type
    default: Any
    low: float | None = None  # the smallest value allowed (numbers)
    high: float | None = None  # the largest value allowed (numbers)

    def check(self, value: Any) -> str | None:
        """Why `value` (already of `kind`) is out of range; None when it is fine."""
        if self.kind is float and not math.isfinite(value):
            return "a finite number is expected"
        if self.low is not None and self.high is not None and not self.low <= value <= self.high:
            return f"it must be between {self.low:g} and {self.high:g}"
        if self.low is not None and value < self.low:
            return f"it must be {self.low:g} or more"
        return None


#: The hook's options. `interval` None: every train row the text log has (the hook's default is
#: log_config.interval, the text log's own interval).
OPTIONS: dict[str, Option] = {
    "init_kwargs": Option(dict, {}),
    "interval": Option(int, None, low=1),
    "log_checkpoint": Option(bool, False),
    "log_checkpoint_metadata": Option(bool, False),
    "num_eval_images": Option(int, 100, low=0),
    "bbox_score_thr": Option(float, 0.3, low=0.0, high=1.0),
    # Beyond the hook: the evaluation insight of each checkpoint (evaluator/insight.py); the thresholds are
    # tools/analysis_tools/confusion_matrix.py's --score-thr and --tp-iou-thr, with its defaults.
    "eval_classwise": Option(bool, True),
    "confusion_score_thr": Option(float, 0.3, low=0.0, high=1.0),
    "confusion_iou_thr": Option(float, 0.5, low=0.0, high=1.0),
    # The metrics (the dataset's own, per-class, PR curves, confusion matrix) over the whole val set; the tables stay
    # on the subset. Off by default: the model then runs on every val image of every checkpoint.
    "eval_full_val": Option(bool, False),
}
#: wandb.init arguments the service sets itself (one run id per launch, its own folder and mode): a layer's value
#: for one of them is dropped, and `config show` says so.
RESERVED_INIT_KWARGS = frozenset({"id", "resume", "dir", "reinit", "settings", "mode", "config", "resume_from", "fork_from"})
#: Options of the service itself that the config file may set too (the CLI flag and its variable come first);
#: kept as the file has them, for the command that reads them to check.
SERVICE_OPTIONS = ("log_timezone", "trust_checkpoints", "trust_configs", "allow_import", "forget_after", "metrics_port", "metrics_addr",
                   "metrics_work_dir_labels")
ENV_PREFIX = "MMDET_WANDB_"
CONFIG_ENV = "MMDET_WANDB_CONFIG"
TRUE, FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}


class HookOptionsError(ValueError):
    pass


@dataclass(frozen=True)
class Layers:
    """The service-wide layers, highest first; each maps option → value (only what it sets)."""

    cli: dict[str, Any] = field(default_factory=dict)
    env: dict[str, Any] = field(default_factory=dict)
    file: dict[str, Any] = field(default_factory=dict)
    file_path: str | None = None


@dataclass(frozen=True)
class HookOptions:
    """Effective options of one work_dir, each with where it came from; `errors`: values of the hook entry that no
    higher level overrides and that are not valid (the run is held until they are fixed); `dropped`: init_kwargs
    keys the service sets itself, with the level that tried."""

    values: dict[str, Any]
    sources: dict[str, str]
    errors: tuple[str, ...] = ()
    dropped: dict[str, str] = field(default_factory=dict)
    hook_source: str = "hook"  # where `errors` were found

    @property
    def init_kwargs(self) -> dict[str, Any]:
        return self.values["init_kwargs"]

    @property
    def interval(self) -> int | None:
        return self.values["interval"]

    @property
    def log_checkpoint(self) -> bool:
        return self.values["log_checkpoint"]

    @property
    def log_checkpoint_metadata(self) -> bool:
        """As in the hook: metadata only comes with the checkpoints themselves."""
        return self.values["log_checkpoint"] and self.values["log_checkpoint_metadata"]

    @property
    def num_eval_images(self) -> int:
        return self.values["num_eval_images"]

    @property
    def bbox_score_thr(self) -> float:
        return self.values["bbox_score_thr"]

    @property
    def eval_classwise(self) -> bool:
        return self.values["eval_classwise"]

    @property
    def confusion_score_thr(self) -> float:
        return self.values["confusion_score_thr"]

    @property
    def confusion_iou_thr(self) -> float:
        return self.values["confusion_iou_thr"]

    @property
    def eval_full_val(self) -> bool:
        return self.values["eval_full_val"]


def resolve(layers: Layers, hook: Mapping[str, Any] | None, hook_source: str = "hook") -> HookOptions:
    """One precedence for every option: CLI > environment > config file > hook entry > the hook's default. A bad
    value in the hook entry is an error unless a higher level sets that option (the hook itself would refuse to
    start): the service never guesses what the user meant."""
    hook_values, hook_errors = _hook_layer(hook or {})
    named = [("cli", layers.cli), ("env", layers.env), (f"file {layers.file_path}", layers.file), (hook_source, hook_values)]
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    errors = [message for name, message in hook_errors.items() if not any(name in layer for _, layer in named[:3])]
    for name, option in OPTIONS.items():
        if name == "init_kwargs":
            merged: dict[str, Any] = {}
            origin: dict[str, str] = {}
            for label, layer in reversed(named):
                for key, value in (layer.get("init_kwargs") or {}).items():
                    merged[key] = value
                    origin[key] = label
            dropped = {key: origin[key] for key in sorted(merged) if key in RESERVED_INIT_KWARGS}
            values[name] = {key: value for key, value in merged.items() if key not in dropped}
            sources[name] = ", ".join(f"{k}: {v}" for k, v in sorted(origin.items()) if k not in dropped) or "default"
            continue
        values[name], sources[name] = option.default, "default"
        for label, layer in named:
            if name in layer:
                values[name], sources[name] = layer[name], label
                break
    return HookOptions(values, sources, tuple(errors), dropped, hook_source)


def _hook_layer(hook: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The hook entry's options we know, converted, and the message for each one that is not valid."""
    layer, errors = {}, {}
    for name in OPTIONS:
        if name in hook:
            try:
                layer[name] = convert(name, hook[name])
            except HookOptionsError as exc:
                errors[name] = str(exc)
    return layer, errors


def convert(name: str, value: Any, where: str | None = None) -> Any:
    """A value from any level → the option's type, checked against its range; strings (environment) are parsed.
    `where` names the value as its level does (`--interval`, `MMDET_WANDB_INTERVAL`, `config file X: interval`)."""
    option = OPTIONS[name]
    try:
        converted = _typed(option.kind, value)
        reason = option.check(converted) if converted is not None else None
    except (TypeError, ValueError) as exc:
        reason = str(exc)
    if reason is not None:
        raise HookOptionsError(f"{where or name} = {value!r}: {reason}")
    return converted


def _typed(kind: type, value: Any) -> Any:
    if kind is dict:
        try:
            parsed = json.loads(value) if isinstance(value, str) else value
        except json.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, dict):
            raise ValueError("a mapping is expected (a dict; as text, a JSON object)")
        return dict(parsed)
    if kind is bool:
        if isinstance(value, str) and value.strip().lower() in TRUE | FALSE:
            return value.strip().lower() in TRUE
        if isinstance(value, bool):
            return value
        raise ValueError("true or false is expected")
    if isinstance(value, bool) or value is None or (isinstance(value, float) and kind is int):
        raise ValueError("an integer is expected" if kind is int else "a number is expected")
    if kind is int:
        try:
            return int(value)
        except ValueError:
            raise ValueError("an integer is expected") from None
    try:
        return float(value)
    except ValueError:
        raise ValueError("a number is expected") from None


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """`MMDET_WANDB_<OPTION>` for each option, and WANDB_PROJECT/WANDB_ENTITY as init_kwargs; an error names the
    variable."""
    layer: dict[str, Any] = {}
    for name in OPTIONS:
        raw = environ.get(env_name(name))
        if raw is not None and raw != "":
            layer[name] = convert(name, raw, env_name(name))
    wandb_keys = {key: environ[env] for key, env in (("project", "WANDB_PROJECT"), ("entity", "WANDB_ENTITY")) if environ.get(env)}
    if wandb_keys:
        layer["init_kwargs"] = {**layer.get("init_kwargs", {}), **wandb_keys}
    return layer


def load_file(path: Path) -> dict[str, Any]:
    """A TOML or YAML file of options (the hook's names; `init_kwargs` a table/mapping); an error names the file
    and the key."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise HookOptionsError(f"config file {path}: {exc.strerror}") from None
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise HookOptionsError(f"config file {path}: {' '.join(str(exc).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise HookOptionsError(f"config file {path}: a table of options is expected")
    unknown = sorted(set(data) - set(OPTIONS) - set(SERVICE_OPTIONS))
    if unknown:
        raise HookOptionsError(f"config file {path}: unknown option(s) {', '.join(unknown)}; known: {', '.join([*OPTIONS, *SERVICE_OPTIONS])}")
    return {name: convert(name, value, f"config file {path}: {name}") if name in OPTIONS else value for name, value in data.items()}


def find_file(given: Path | None, data_dir: Path, environ: Mapping[str, str]) -> Path | None:
    """--config, else MMDET_WANDB_CONFIG, else `<data dir>/config.toml|yaml|yml` when it exists."""
    if given is not None:
        return given
    if environ.get(CONFIG_ENV):
        return Path(environ[CONFIG_ENV])
    for name in ("config.toml", "config.yaml", "config.yml"):
        if (data_dir / name).is_file():
            return data_dir / name
    return None


def for_run(layers: Layers, hook_options_json: str | None, config_name: str | None = None) -> HookOptions:
    """The hook options of one run, its hook entry as stored at ingest."""
    return resolve(layers, json.loads(hook_options_json or "{}"), f"MMDetWandbHook in {config_name or 'the training config'}")


def held_message(options: HookOptions) -> str:
    """What a held run's problem says: where, the bad values, and the two ways to release it."""
    return (f"{options.hook_source}: {'; '.join(options.errors)}: nothing of this run is uploaded until it is fixed in the "
            "training config, or the option is set by the service (its flag, MMDET_WANDB_<OPTION> or the config file)")


def cli_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def layers(cli: dict[str, Any], file: Path | None, environ: Mapping[str, str] = os.environ) -> Layers:
    return Layers(
        cli={k: convert(k, v, cli_flag(k)) for k, v in cli.items() if v is not None},
        env=from_env(environ),
        file=load_file(file) if file is not None else {},
        file_path=str(file) if file is not None else None,
    )

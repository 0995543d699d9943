"""The hook's options, resolved per work_dir: CLI > environment > config file > the training config's
`MMDetWandbHook` entry > the hook's defaults.

A user who configured `MMDetWandbHook` gets its behaviour without running it; the service's own layers
override it (and each other) option by option. `init_kwargs` merges key by key across the layers, with
`WANDB_PROJECT`/`WANDB_ENTITY` as the environment's `project`/`entity`. Pure functions: the CLI reads the
layers once, the uploader resolves them for each run from the hook entry stored with the run.
"""
from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

#: name → (type, the hook's default). `interval` None: every train row the text log has (the hook's
#: default is log_config.interval, the text log's own interval).
OPTIONS: dict[str, tuple[type, Any]] = {
    "init_kwargs": (dict, {}),
    "interval": (int, None),
    "log_checkpoint": (bool, False),
    "log_checkpoint_metadata": (bool, False),
    "num_eval_images": (int, 100),
    "bbox_score_thr": (float, 0.3),
}
#: Options of the service itself that the config file may set too (the CLI flag and its variable come first);
#: kept as the file has them, for the command that reads them to check.
SERVICE_OPTIONS = ("log_timezone", "trust_checkpoints", "trust_configs", "allow_import")
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
    """Effective options of one work_dir, each with where it came from."""

    values: dict[str, Any]
    sources: dict[str, str]

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


def resolve(layers: Layers, hook: Mapping[str, Any] | None, hook_source: str = "hook") -> HookOptions:
    named = [("cli", layers.cli), ("env", layers.env), (f"file {layers.file_path}", layers.file),
             (hook_source, _hook_layer(hook or {}))]
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name, (_, default) in OPTIONS.items():
        if name == "init_kwargs":
            merged: dict[str, Any] = {}
            origin: dict[str, str] = {}
            for label, layer in reversed(named):
                for key, value in (layer.get("init_kwargs") or {}).items():
                    merged[key] = value
                    origin[key] = label
            values[name] = merged
            sources[name] = ", ".join(f"{k}: {v}" for k, v in sorted(origin.items())) or "default"
            continue
        values[name], sources[name] = default, "default"
        for label, layer in named:
            if name in layer:
                values[name], sources[name] = layer[name], label
                break
    return HookOptions(values, sources)


def _hook_layer(hook: Mapping[str, Any]) -> dict[str, Any]:
    """The hook entry's options we know, converted; anything malformed is ignored (the default applies)."""
    layer = {}
    for name in OPTIONS:
        if name in hook:
            try:
                layer[name] = convert(name, hook[name])
            except HookOptionsError:
                continue
    return layer


def convert(name: str, value: Any) -> Any:
    """A value from any layer → the option's type; strings (environment) are parsed."""
    kind = OPTIONS[name][0]
    try:
        if kind is dict:
            parsed = json.loads(value) if isinstance(value, str) else value
            if not isinstance(parsed, dict):
                raise ValueError("a mapping is expected")
            return dict(parsed)
        if kind is bool:
            if isinstance(value, str) and value.strip().lower() in TRUE | FALSE:
                return value.strip().lower() in TRUE
            if isinstance(value, bool):
                return value
            raise ValueError("true or false is expected")
        if kind is int:
            if value is None or isinstance(value, bool):
                raise ValueError("an integer is expected")
            number = int(value)
            if number < 0:
                raise ValueError("it must be 0 or more")
            return number
        return float(value)
    except (TypeError, ValueError) as exc:
        raise HookOptionsError(f"{name}: {value!r}: {exc}") from None


def from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """`MMDET_WANDB_<OPTION>` for each option, and WANDB_PROJECT/WANDB_ENTITY as init_kwargs."""
    layer: dict[str, Any] = {}
    for name in OPTIONS:
        raw = environ.get(ENV_PREFIX + name.upper())
        if raw is not None and raw != "":
            layer[name] = convert(name, raw)
    wandb_keys = {key: environ[env] for key, env in (("project", "WANDB_PROJECT"), ("entity", "WANDB_ENTITY")) if environ.get(env)}
    if wandb_keys:
        layer["init_kwargs"] = {**layer.get("init_kwargs", {}), **wandb_keys}
    return layer


def load_file(path: Path) -> dict[str, Any]:
    """A TOML or YAML file of options (the hook's names; `init_kwargs` a table/mapping)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise HookOptionsError(f"config file {path}: {exc.strerror}") from None
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise HookOptionsError(f"config file {path}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise HookOptionsError(f"config file {path}: a table of options is expected")
    unknown = sorted(set(data) - set(OPTIONS) - set(SERVICE_OPTIONS))
    if unknown:
        raise HookOptionsError(f"config file {path}: unknown option(s) {', '.join(unknown)}; known: {', '.join([*OPTIONS, *SERVICE_OPTIONS])}")
    return {name: convert(name, value) if name in OPTIONS else value for name, value in data.items()}


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


def for_run(layers: Layers, hook_options_json: str | None) -> HookOptions:
    """The hook options of one run, its hook entry as stored at ingest."""
    return resolve(layers, json.loads(hook_options_json or "{}"), "hook in the training config")


def layers(cli: dict[str, Any], file: Path | None, environ: Mapping[str, str] = os.environ) -> Layers:
    return Layers(
        cli={k: convert(k, v) for k, v in cli.items() if v is not None},
        env=from_env(environ),
        file=load_file(file) if file is not None else {},
        file_path=str(file) if file is not None else None,
    )

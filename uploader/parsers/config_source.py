"""Where a launch's training config is found: mmdet 2.x dumps it to `work_dir/<exp_name>` and into the `config`
of the log.json header; mmengine to `<ts>/vis_data/config.py`. Every file through the one safe open."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.records import LogFormat
from uploader.discovery import FoundLog
from uploader.parsers import log_header
from uploader.parsers.config_eval import ConfigParseError
from uploader.parsers.config_settings import RunConfig, parse_text
from uploader.parsers.log_header import LogHeader
from uploader.tail import read_head

MAX_CONFIG_BYTES = 16 << 20


@dataclass(frozen=True)
class ConfigLookup:
    """The config of a launch (None: none found) and the first config found that is not valid Python."""

    config: RunConfig | None
    error: ConfigParseError | None = None  # its filename, lineno and message
    error_in: Path | None = None  # the dump, or the log.json whose header carries the config


def find(found: FoundLog, header: LogHeader) -> ConfigLookup:
    """mmdet 2.x: `work_dir/<exp_name>`, else the header's config; mmengine: `vis_data/config.py`."""
    if found.format is LogFormat.MMENGINE_SCALARS and found.config is not None:
        return _read_file(found.config)
    if found.format is not LogFormat.MMDET2_LOGJSON:
        return ConfigLookup(None)
    dumped = ConfigLookup(None)
    if header.exp_name and "/" not in header.exp_name:
        dumped = _read_file(found.work_dir / header.exp_name)
        if dumped.config is not None:
            return dumped
    if header.config is None:
        return dumped
    logged = _parse(header.config, header.exp_name or "config.py", found.path)
    return logged if dumped.error is None else ConfigLookup(logged.config, dumped.error, dumped.error_in)


def for_log(found: FoundLog) -> RunConfig | None:
    """The config of a launch, its header read here."""
    return find(found, log_header.read(found)).config


def load_file(path: Path) -> RunConfig | None:
    return _read_file(path).config


def _read_file(path: Path) -> ConfigLookup:
    try:
        text = read_head(path, MAX_CONFIG_BYTES).decode("utf-8", errors="replace")
    except OSError:
        return ConfigLookup(None)
    return _parse(text, path.name, path)


def _parse(text: str, name: str, path: Path) -> ConfigLookup:
    try:
        return ConfigLookup(parse_text(text, name))
    except ConfigParseError as exc:
        return ConfigLookup(None, exc, path)

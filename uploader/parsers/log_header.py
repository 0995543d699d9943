"""The first line of a mmdet 2.x `<ts>.log.json`: runner.meta, whose `exp_name`, `config` (the merged config as
text) and `env_info` name the launch's config and environment. Read once per launch and handed to both."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

from common.records import LogFormat
from uploader.discovery import FoundLog
from uploader.tail import open_regular

MAX_HEADER_BYTES = 16 << 20  # the header carries the whole merged config
_FIRST_READ = 64 << 10


@dataclass(frozen=True)
class LogHeader:
    exp_name: str | None = None  # the config's file name in the work_dir (tools/train.py dumps it there)
    config: str | None = None
    env_info: str | None = None  # `key: value` lines


def read(found: FoundLog) -> LogHeader:
    """The header of a mmdet 2.x launch; empty for other formats and for a log that has none or cannot be read."""
    if found.format is not LogFormat.MMDET2_LOGJSON:
        return LogHeader()
    try:
        obj = json.loads(_first_line(found.path))
    except (OSError, ValueError):
        return LogHeader()
    if not isinstance(obj, dict):
        return LogHeader()
    exp_name, config, env_info = (obj.get(k) for k in ("exp_name", "config", "env_info"))
    return LogHeader(
        exp_name=exp_name if isinstance(exp_name, str) else None,
        config=config if isinstance(config, str) else None,
        env_info=env_info if isinstance(env_info, str) else None,
    )


def _first_line(path: os.PathLike[str]) -> bytes:
    """Up to the first newline (at most MAX_HEADER_BYTES): a small read for a small header, however big the log."""
    fd, _ = open_regular(path)
    try:
        data = os.pread(fd, _FIRST_READ, 0)
        while b"\n" not in data and len(data) < MAX_HEADER_BYTES:  # doubling: few reads for a long header
            more = os.pread(fd, min(len(data), MAX_HEADER_BYTES - len(data)), len(data))
            if not more:
                break
            data += more
        return data.split(b"\n", 1)[0]
    finally:
        os.close(fd)

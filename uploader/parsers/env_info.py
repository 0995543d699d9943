"""The training's own environment, as its logs name it: mmdet 2.x writes `env_info` (one `key: value` per
line) into the header of every `.log.json`; mmengine writes a "System environment:" block near the top of the
text log of the launch. Parsed into `config.env_info` of the run, keys as the log names them (`GPU 0,1`,
`CUDA available`, `PyTorch`, `MMCV`, `MMDetection`, ...); the multi-line `PyTorch compiling details` keeps its
first line only."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from common.records import LogFormat
from uploader.tail import read_head

HEAD_BYTES = 1 << 20
BLOCK_STARTS = ("System environment:", "Environment info:")
BLOCK_ENDS = ("Runtime environment:",)


def parse_block(text: str) -> dict[str, str]:
    """`key: value` lines; indented `- ...` continuation lines and anything without `: ` are skipped."""
    env: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("-") or ": " not in line:
            continue
        key, value = line.split(": ", 1)
        if key and key not in env:
            env[key] = value.strip()
    return env


def from_text_log(text: str) -> dict[str, str]:
    """The environment block of a text log (mmengine's "System environment:", mmcv's "Environment info:")."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.rstrip().endswith(BLOCK_STARTS)), None)
    if start is None:
        return {}
    block = []
    for line in lines[start + 1:]:
        stripped = line.strip()
        if stripped.startswith(BLOCK_ENDS) or (block and stripped.startswith("-" * 20)) or _timestamped(stripped):
            break
        if not stripped.startswith("-" * 20):
            block.append(line)
    return parse_block("\n".join(block))


def _timestamped(line: str) -> bool:
    """The next log record (`2023-02-08 16:24:10,617 - ...` or `2023/06/05 13:12:32 - ...`): the block is over."""
    return len(line) > 19 and line[:4].isdigit() and line[4] in "-/" and line[10] == " " and " - " in line[:40]


def for_log(path: Path, fmt: LogFormat, text_log: Path | None) -> dict[str, str]:
    """The environment of one launch: the header's `env_info` (mmdet 2.x), else the text log's block."""
    if fmt is LogFormat.MMDET2_LOGJSON:
        header = _header(path)
        if isinstance(header.get("env_info"), str):
            return parse_block(header["env_info"])
    if text_log is None:
        return {}
    try:
        return from_text_log(read_head(text_log, HEAD_BYTES).decode("utf-8", "replace"))
    except OSError:
        return {}


def _header(path: Path) -> dict[str, Any]:
    try:
        header = json.loads(read_head(path, HEAD_BYTES).split(b"\n", 1)[0])
    except (OSError, ValueError):
        return {}
    return header if isinstance(header, dict) else {}

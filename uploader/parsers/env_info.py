"""The training's own environment, as its logs name it: mmdet 2.x writes `env_info` (one `key: value` per
line) into the header of every `.log.json`; mmengine writes a "System environment:" block near the top of the
text log of the launch. Parsed into `config.env_info` of the run, keys as the log names them (`GPU 0,1`,
`CUDA available`, `PyTorch`, `MMCV`, `MMDetection`, ...); the multi-line `PyTorch compiling details` keeps its
first line only."""
from __future__ import annotations

from pathlib import Path

from uploader import text_log
from uploader.parsers.log_header import LogHeader


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


def for_log(header: LogHeader, text_path: Path | None) -> dict[str, str]:
    """The environment of one launch: the header's `env_info` (mmdet 2.x), else the text log's block."""
    if header.env_info is not None:
        return parse_block(header.env_info)
    if text_path is None:
        return {}
    head = text_log.read(text_path)
    return {} if head is None else parse_block(text_log.environment(head))

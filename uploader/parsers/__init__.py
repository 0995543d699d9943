"""Parsers: one decoded JSON line + the source's ParseState → records.

`decode_line` is shared by every format; `parse_line` dispatches on the source's LogFormat. Parsers update the
ParseState they are given (the caller persists it with the offset) and never touch files, the DB or W&B.
"""
from __future__ import annotations

from typing import Any

from common import json_values
from common.records import LogFormat, ParseState, Record
from uploader.parsers import mmdet2, mmengine


class LineError(ValueError):
    """A line that cannot be a log record; reported with its file and offset and skipped."""


def decode_line(data: bytes) -> dict[str, Any]:
    """Decode one log line; bare NaN/Infinity (written by mmcv for diverged losses) are kept as floats."""
    try:
        obj = json_values.loads(data)
    except UnicodeDecodeError as exc:
        raise LineError(f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except ValueError as exc:
        raise LineError(f"not JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise LineError(f"a JSON {type(obj).__name__}, not an object")
    return obj


def parse_line(fmt: LogFormat, state: ParseState, obj: dict[str, Any]) -> list[Record]:
    if fmt is LogFormat.MMDET2_LOGJSON:
        return mmdet2.parse(state, obj)
    if fmt is LogFormat.MMENGINE_SCALARS:
        return mmengine.parse_scalars(state, obj)
    return mmengine.parse_test(state, obj)


__all__ = ["LineError", "LogFormat", "ParseState", "decode_line", "parse_line"]

"""JSON as mmcv's logs and `json.dumps` write it: bare NaN and Infinity are values (a diverged loss), which orjson
refuses. orjson reads everything else, several times faster than json."""
from __future__ import annotations

import json
from typing import Any

import orjson


def loads(data: bytes | str) -> Any:
    """orjson first; json for what it refuses (bytes as UTF-8). An integer beyond 64 bits comes back from orjson
    as a float: no value of a training log is that large."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data.decode("utf-8") if isinstance(data, bytes) else data)


def dumps(value: Any) -> str:
    """Text that `loads` reads back as `value`: orjson's, unless it holds a `null` (orjson writes NaN and infinity
    as null; a None or a key's own text may be one too) or orjson refuses the value (an integer beyond 64 bits);
    then json's, which writes NaN and Infinity as mmcv's logs do."""
    try:
        text = orjson.dumps(value)
    except orjson.JSONEncodeError:
        return json.dumps(value)
    return json.dumps(value) if b"null" in text else text.decode()

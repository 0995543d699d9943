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

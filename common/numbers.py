"""Tiny number checks shared by the log parsers and the config reader (values decoded from JSON or a config)."""
from __future__ import annotations

import math
from typing import Any


def is_number(value: Any) -> bool:
    """An int or float by exact type: not a bool (an int subclass), nor any other subclass."""
    return type(value) in (int, float)


def as_int(value: Any) -> int | None:
    """An int, or a float with an integral value (logs sometimes carry 12.0); None for anything else."""
    if is_number(value) and math.isfinite(value) and float(value).is_integer():
        return int(value)
    return None

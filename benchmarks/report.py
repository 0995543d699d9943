"""What the benchmark scripts share: JSON-safe reports and a SIGTERM that still cleans up."""
from __future__ import annotations

import math
import signal
from typing import Any


def finite(value: Any) -> Any:
    """JSON has no Infinity/NaN: they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


def _on_sigterm(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)  # run the finally blocks: kill children, remove the temp dir


def exit_cleanly_on_sigterm() -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)

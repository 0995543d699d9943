"""Liveness for container healthchecks: each loop pass of a service touches a file in the data dir."""
from __future__ import annotations

import time
from pathlib import Path

MAX_AGE_S = 120.0  # a service is healthy when its last loop pass is younger (`health --max-age`, /healthz)


class Heartbeat:
    def __init__(self, path: Path, every_s: float = 5.0) -> None:
        self.path = path
        self.every_s = every_s
        self._last = 0.0

    def beat(self) -> None:
        now = time.monotonic()
        if now - self._last < self.every_s:
            return
        self._last = now
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.touch()


def age(path: Path) -> float | None:
    """Seconds since the last beat, or None when the service never beat."""
    try:
        return max(0.0, time.time() - path.stat().st_mtime)
    except FileNotFoundError:
        return None

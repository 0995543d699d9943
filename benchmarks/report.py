"""What the benchmark scripts share: an isolated service environment, JSON-safe reports and a SIGTERM that
still cleans up."""
from __future__ import annotations

import math
import os
import signal
from pathlib import Path
from typing import Any


def isolated_env(home: Path) -> dict[str, str]:
    """A service/child environment with everything under `home`: offline, no credentials, no WANDB_DIR."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MMDET_WANDB_"))}
    env.update(
        MMDET_WANDB_HOME=str(home),
        WANDB_DATA_DIR=str(home / "wandb-data"),
        WANDB_CACHE_DIR=str(home / "wandb-cache"),
        WANDB_CONFIG_DIR=str(home / "wandb-config"),
        WANDB_MODE="offline",
        PYTHONUNBUFFERED="1",
    )
    return env


def children_cpu_seconds() -> float:
    """CPU seconds of this process's children: those it has reaped (the backfill's reading process) and those
    still running (wandb-core lives until this process exits), read from /proc; on a 2-core machine the sum of
    every process's CPU, not the measuring process's alone, tells how close a run is to saturating it."""
    import resource

    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = reaped.ru_utime + reaped.ru_stime
    tick = os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        if int(fields[1]) == os.getpid():  # utime, stime, and those of its own reaped children
            total += sum(int(f) for f in fields[11:15]) / tick
    return total


def row_counts(session: Any) -> tuple[int, int]:
    """(rows the outbox ever took, rows uploaded) of a state DB: uploaded rows are folded into spans, but val
    rows, which stay whole."""
    from sqlalchemy import func, select

    from db.models import OutboxRow, UploadedSpan

    folded = session.scalar(select(func.coalesce(func.sum(UploadedSpan.rows), 0))) or 0
    total = session.scalar(select(func.count()).select_from(OutboxRow)) or 0
    uploaded = session.scalar(select(func.count()).select_from(OutboxRow).where(OutboxRow.uploaded.is_(True))) or 0
    return folded + total, folded + uploaded


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

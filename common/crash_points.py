"""Named crash points: fault injection for the tests and `benchmarks/faults.py`.

Each point sits on a boundary between a DB commit and the filesystem or W&B step that follows it, where a
SIGKILL at a random moment almost never lands. With `MMDET_WANDB_CRASH_AT=<point>` (or `<point>:<n>`, the
n-th time it is reached) the process SIGKILLs itself there, so that recovery is tested at exactly that
instant. Unset (always, outside tests) it costs one dict lookup.
"""
from __future__ import annotations

import os
import signal

POINTS = frozenset({
    "segment-recorded",  # wandb.init succeeded and the segment row is committed; nothing logged yet
    "rows-logged",  # rows logged into the open segment and assigned to it in the DB
    "artifact-logged",  # an artifact logged into the open segment and recorded in the outbox
    "segment-closing",  # about to finish a segment: its file has no exit record yet
    "segment-closed",  # the segment verified and marked closed; its files are kept
    "segment-discarded",  # the segment marked discarded; its directory not deleted yet
    "checkpoint-pinned",  # a checkpoint's pin recorded in the DB
    "job-completed",  # an eval job's results committed; the worker has not released anything yet
})
_hits: dict[str, int] = {}
_with: list[int] = []  # processes that die at the crash point too: a backfill share's parent (the command as a whole)


def kill_with(pid: int) -> None:
    _with.append(pid)


def reached(point: str) -> None:
    wanted = os.environ.get("MMDET_WANDB_CRASH_AT")
    if not wanted:
        return
    name, _, nth = wanted.partition(":")
    if name not in POINTS:  # a misspelt point would never be reached: a test would pass without its crash
        raise ValueError(f"MMDET_WANDB_CRASH_AT={wanted}: no such crash point; known: {', '.join(sorted(POINTS))}")
    if name != point:
        return
    _hits[point] = _hits.get(point, 0) + 1
    if _hits[point] == int(nth or 1):
        for pid in _with:
            os.kill(pid, signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)

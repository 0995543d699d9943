"""Structured events: the log lines a log pipeline may alert on, each with a stable `event` name and its ids.

With `--log-format json` an event's line carries `"event": <name>` and every id of that event as a JSON field
beside `msg` (an id not known at the call is null); a text line shows the message alone. The names and their ids
are `EVENTS` below, documented as a table in docs/observability.md (tests/test_metrics.py checks that the table
and `EVENTS` are the same, and finds each event with its ids in the log of real processes).
"""
from __future__ import annotations

import logging
from typing import Any

RUN_OPENED = "run_opened"
RUN_CLOSED = "run_closed"
SEGMENT_VERIFIED = "segment_verified"
SEGMENT_CONFIRMED = "segment_confirmed"
CHECKPOINT_LOGGED = "checkpoint_logged"
EVAL_JOB_CLAIMED = "eval_job_claimed"
EVAL_JOB_DONE = "eval_job_done"
EVAL_JOB_PARKED = "eval_job_parked"
PROBLEM_RECORDED = "problem_recorded"
PROBLEM_RESOLVED = "problem_resolved"
CIRCUIT_OPEN = "circuit_open"
CIRCUIT_CLOSED = "circuit_closed"

_SEGMENT = ("run_id", "work_dir", "segment", "mode")
_JOB = ("job_id", "work_dir", "checkpoint", "attempt")
_PROBLEM = ("path", "offset", "kind")

#: Every event → the ids its line carries.
EVENTS: dict[str, tuple[str, ...]] = {
    RUN_OPENED: _SEGMENT,
    RUN_CLOSED: _SEGMENT,
    SEGMENT_VERIFIED: (*_SEGMENT, "rows"),
    SEGMENT_CONFIRMED: (*_SEGMENT, "rows"),
    CHECKPOINT_LOGGED: ("run_id", "work_dir", "segment", "checkpoint", "aliases"),
    EVAL_JOB_CLAIMED: _JOB,
    EVAL_JOB_DONE: (*_JOB, "seconds"),
    EVAL_JOB_PARKED: (*_JOB, "error"),
    PROBLEM_RECORDED: _PROBLEM,
    PROBLEM_RESOLVED: _PROBLEM,
    CIRCUIT_OPEN: ("url", "error"),
    CIRCUIT_CLOSED: ("url", "seconds"),
}


def emit(logger: logging.Logger, event: str, message: str, *args: Any, level: int = logging.INFO, **ids: Any) -> None:
    """Log `message % args` as the event; `ids` must be ids of that event (a wrong name fails in the tests' runs)."""
    names = EVENTS[event]
    unknown = set(ids) - set(names)
    if unknown:
        raise TypeError(f"event {event} has no id {', '.join(sorted(unknown))}")
    if logger.isEnabledFor(level):
        logger.log(level, message, *args, stacklevel=2,
                   extra={"event": event, "event_ids": {name: ids.get(name) for name in names}})

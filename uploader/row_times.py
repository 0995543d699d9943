"""When each row's line was written: the `_timestamp` of its W&B row, so that a backfilled run (or a live one
after a restart of the service) reads in W&B as if it had been logged live.

From the progress lines of the text log of the same launch where it exists (`uploader/text_log.py`), matched
to rows by the (kind, epoch, iteration) the parsers name in `MetricRow.time_keys`, never by position. Otherwise from the launch time in the log's name plus the accumulated per-iteration `time` of the
train rows; a val row takes the time of the train row before it. Log times are naive local times of the
training host: read in the zone given (`--log-timezone`), else the service's own. Within a log, times never go
back (`ParseState.clock`); the caller keeps them increasing across the launches of a run.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import replace
from pathlib import Path
from zoneinfo import ZoneInfo

from common.records import MetricRow, ParseState, RowKind, TimeKey
from uploader import text_log

MAX_TEXT_BYTES = 64 << 20  # of the text log read in one go (the rest is read by the next batch)


def local_time(text: str, fmt: str, zone: ZoneInfo | None) -> float:
    """A naive local time of the training host → epoch seconds (zone None: the service's own zone)."""
    return _epoch_seconds(dt.datetime.strptime(text, fmt), zone)


def _epoch_seconds(naive: dt.datetime, zone: ZoneInfo | None) -> float:
    return (naive.replace(tzinfo=zone) if zone is not None else naive).timestamp()


def launch_time(launch: str, zone: ZoneInfo | None) -> float | None:
    """The `YYYYmmdd_HHMMSS` a log is named after (None for a renamed launch folder)."""
    try:
        return local_time(launch[:15], "%Y%m%d_%H%M%S", zone)
    except ValueError:
        return None


def read_text(path: Path, offset: int, state: ParseState) -> dict[TimeKey, text_log.Progress]:
    """Text-log lines from `offset` on, by key: a train line's first occurrence, a val line's last (mmengine logs
    val progress lines before the one with the metrics)."""
    data = text_log.read(path, offset, MAX_TEXT_BYTES)
    if data is None:
        return {}
    by_key: dict[TimeKey, text_log.Progress] = {}
    for line in text_log.progress(data, offset, state.text_last_iter):
        if line.key[0] == "val" or line.key not in by_key:
            by_key[line.key] = line
    return by_key


def stamp(rows: list[MetricRow], state: ParseState, text_path: Path | None, launch: str, zone: ZoneInfo | None) -> list[MetricRow]:
    """The rows (in file order) with their `timestamp`; moves `state`'s text offset and clock."""
    if not rows:
        return rows
    lines = read_text(text_path, state.text_offset, state) if text_path is not None else {}
    furthest: text_log.Progress | None = None
    stamped = []
    for row in rows:
        hit = next((lines[key] for key in row.time_keys if key in lines), None)
        if hit is not None:
            time: float | None = _epoch_seconds(hit.written, zone)
            if furthest is None or hit.end > furthest.end:
                furthest = hit
        else:
            time = _estimate(row, state, launch, zone)
        if time is not None and state.clock is not None:
            time = max(time, state.clock)
        if time is not None:
            state.clock = time
            if row.iter is not None and row.kind is RowKind.TRAIN:
                state.clock_iter = row.iter
        stamped.append(replace(row, timestamp=None if time is None else round(time, 3)))
    if furthest is not None:
        state.text_offset, state.text_last_iter = furthest.end, furthest.last_iter
    return stamped


def _estimate(row: MetricRow, state: ParseState, launch: str, zone: ZoneInfo | None) -> float | None:
    """No text line for the row: the previous row's time plus `time` × the iterations since it (the launch
    time plus one logging interval for the first row); a val row takes the previous row's time."""
    seconds = row.iter_seconds if row.kind is RowKind.TRAIN else None
    if state.clock is None:
        start = launch_time(launch, zone)
        if start is None:
            return None
        return start + (seconds or 0.0) * (state.log_interval or 0)
    if seconds is None:
        return state.clock
    if row.iter is not None and state.clock_iter is not None and row.iter > state.clock_iter:
        return state.clock + seconds * (row.iter - state.clock_iter)
    return state.clock + seconds * (state.log_interval or 1)

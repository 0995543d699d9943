"""When each row's line was written: the `_timestamp` of its W&B row, so that a backfilled run (or a live one
after a restart of the service) reads in W&B as if it had been logged live.

From the text log of the same launch where it exists: mmcv's `YYYY-MM-DD HH:MM:SS,mmm - mmdet - INFO - Epoch
[e][i/N]` and mmengine's `YYYY/MM/DD HH:MM:SS - mmengine - INFO - Epoch(train) [e][i/N]` / `Iter(train) [i/N]`
lines, matched to rows by the (kind, epoch, iteration) the parsers name in `MetricRow.time_keys`, never by
position. Otherwise from the launch time in the log's name plus the accumulated per-iteration `time` of the
train rows; a val row takes the time of the train row before it. Log times are naive local times of the
training host: read in the zone given (`--log-timezone`), else the service's own. Within a log, times never go
back (`ParseState.clock`); the caller keeps them increasing across the launches of a run.
"""
from __future__ import annotations

import datetime as dt
import logging
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from zoneinfo import ZoneInfo

from common.records import MetricRow, ParseState, RowKind, TimeKey
from uploader.tail import open_regular

log = logging.getLogger("mmdet_wandb.row_times")

# the date and time fields (year to second) come first, then mmcv's milliseconds, then the message
MMCV_LINE = re.compile(rb"(\d{4})-(\d{2})-(\d{2}) (\d{2}):(\d{2}):(\d{2}),(\d{3}) - \S+ - [A-Z]+ - (.*)")
MMENGINE_LINE = re.compile(rb"(\d{4})/(\d{2})/(\d{2}) (\d{2}):(\d{2}):(\d{2}) - \S+ - [A-Z]+ - (.*)")
VAL_EPOCH = re.compile(rb"Epoch\(val\)\s*\[(\d+)\]")
VAL_ITER = re.compile(rb"Iter\(val\)\s*\[")
TRAIN_EPOCH = re.compile(rb"Epoch(?:\(train\))?\s*\[(\d+)\]\[\s*(\d+)/(\d+)\]")
TRAIN_ITER = re.compile(rb"Iter(?:\(train\))?\s*\[\s*(\d+)/(\d+)\]")
MAX_TEXT_BYTES = 64 << 20  # of the text log read in one go (the rest is read by the next batch)


@dataclass(frozen=True)
class TextLine:
    key: TimeKey
    time: float  # epoch seconds
    end: int  # offset just past the line in the text log
    last_iter: int | None  # the text log's last train iteration, this line included


def local_time(text: str, fmt: str, zone: ZoneInfo | None) -> float:
    """A naive local time of the training host → epoch seconds (zone None: the service's own zone)."""
    return _epoch_seconds(dt.datetime.strptime(text, fmt), zone)


def _epoch_seconds(naive: dt.datetime, zone: ZoneInfo | None) -> float:
    return (naive.replace(tzinfo=zone) if zone is not None else naive).timestamp()


def _line_time(match: re.Match[bytes], zone: ZoneInfo | None) -> float:
    """The time a text-log line starts with, from the line pattern's six date and time fields: what strptime
    would make of them, without its cost (a text log has a line per iteration logged, and more)."""
    return _epoch_seconds(dt.datetime(*map(int, match.group(1, 2, 3, 4, 5, 6))), zone)


def launch_time(launch: str, zone: ZoneInfo | None) -> float | None:
    """The `YYYYmmdd_HHMMSS` a log is named after (None for a renamed launch folder)."""
    try:
        return local_time(launch[:15], "%Y%m%d_%H%M%S", zone)
    except ValueError:
        return None


def text_lines(data: bytes, base: int, last_iter: int | None, zone: ZoneInfo | None) -> list[TextLine]:
    """The timed progress lines of a chunk of a text log that starts at offset `base` (complete lines only)."""
    found = []
    position = base
    for raw in data.splitlines(keepends=True):
        position += len(raw)
        if not raw.endswith(b"\n"):
            break  # still being written
        if (mmcv := MMCV_LINE.match(raw)) is not None:
            stamp = _line_time(mmcv, zone) + int(mmcv[7]) / 1000
            message, mmengine = mmcv[8], False
        elif (engine := MMENGINE_LINE.match(raw)) is not None:
            stamp = _line_time(engine, zone)
            message, mmengine = engine[7], True
        else:
            continue
        key: TimeKey | None = None
        if (val := VAL_EPOCH.match(message)) is not None:
            key = ("val", int(val[1]), None)
        elif VAL_ITER.match(message):
            key = ("val", None, last_iter)
        elif (train := TRAIN_EPOCH.match(message)) is not None:
            epoch, inner, length = int(train[1]), int(train[2]), int(train[3])
            last_iter = (epoch - 1) * length + inner if mmengine else inner
            key = ("train", None, last_iter) if mmengine else ("train", epoch, inner)
        elif (train := TRAIN_ITER.match(message)) is not None:
            last_iter = int(train[1])
            key = ("train", None, last_iter)
        if key is not None:
            found.append(TextLine(key, stamp, position, last_iter))
    return found


def read_text(path: Path, offset: int, state: ParseState, zone: ZoneInfo | None) -> dict[TimeKey, TextLine]:
    """Text-log lines from `offset` on, by key: a train line's first occurrence, a val line's last (mmengine logs
    val progress lines before the one with the metrics)."""
    data = _read_from(path, offset)
    if data is None:
        return {}
    by_key: dict[TimeKey, TextLine] = {}
    for line in text_lines(data, offset, state.text_last_iter, zone):
        if line.key[0] == "val" or line.key not in by_key:
            by_key[line.key] = line
    return by_key


def _read_from(path: Path, offset: int) -> bytes | None:
    """Up to MAX_TEXT_BYTES of the text log from `offset`, through the one safe open (DESIGN 12): a symlink is
    not followed and a FIFO does not block the loop. None, with a log line that says why, when it cannot be read."""
    try:
        fd, _ = open_regular(path)
        try:
            return os.pread(fd, MAX_TEXT_BYTES, offset)
        finally:
            os.close(fd)
    except OSError as exc:
        log.warning("%s: text log not read (%s); its rows take times estimated from the log", path, exc.strerror)
        return None


def stamp(rows: list[MetricRow], state: ParseState, text_log: Path | None, launch: str, zone: ZoneInfo | None) -> list[MetricRow]:
    """The rows (in file order) with their `timestamp`; moves `state`'s text offset and clock."""
    if not rows:
        return rows
    lines = read_text(text_log, state.text_offset, state, zone) if text_log is not None else {}
    furthest: TextLine | None = None
    stamped = []
    for row in rows:
        hit = next((lines[key] for key in row.time_keys if key in lines), None)
        if hit is not None:
            time: float | None = hit.time
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

"""MMDetection's text log of a launch (`<ts>.log` beside `<ts>.log.json`; mmengine's `<ts>/<ts>.log`): the one
reader of it. What only it says comes out of its bytes through small pure functions, each for one caller: the
iterations per epoch (`uploader/ingest.py`), the environment block (`uploader/parsers/env_info.py`) and the
time of every progress line (`uploader/row_times.py`).

A record starts with mmcv's `YYYY-MM-DD HH:MM:SS,mmm - mmdet - INFO - <message>` or mmengine's
`YYYY/MM/DD HH:MM:SS - mmengine - INFO - <message>`; progress messages are `Epoch [e][i/L]` (mmcv),
`Epoch(train) [e][i/L]` / `Iter(train) [i/N]` and `Epoch(val) [e]...` / `Iter(val) [...` (mmengine). Every
read goes through the one safe open (DESIGN 12): a symlink is not followed, a FIFO does not block.
"""
from __future__ import annotations

import datetime as dt
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from common.records import TimeKey
from uploader.tail import open_regular

log = logging.getLogger("mmdet_wandb.text_log")

HEAD_BYTES = 1 << 20  # the iterations per epoch and the environment are near the top
# the date and time fields (year to second) come first, then mmcv's milliseconds, then the message
MMCV_RECORD = re.compile(rb"(\d{4})-(\d{2})-(\d{2}) (\d{2}):(\d{2}):(\d{2}),(\d{3}) - \S+ - [A-Z]+ - (.*)")
MMENGINE_RECORD = re.compile(rb"(\d{4})/(\d{2})/(\d{2}) (\d{2}):(\d{2}):(\d{2}) - \S+ - [A-Z]+ - (.*)")
VAL_EPOCH = re.compile(rb"Epoch\(val\)\s*\[(\d+)\]")
VAL_ITER = re.compile(rb"Iter\(val\)\s*\[")
TRAIN_EPOCH = re.compile(rb"Epoch(?:\(train\))?\s*\[(\d+)\]\[\s*(\d+)/(\d+)\]")
TRAIN_ITER = re.compile(rb"Iter(?:\(train\))?\s*\[\s*(\d+)/(\d+)\]")
ENV_STARTS = (b"System environment:", b"Environment info:")
ENV_ENDS = (b"Runtime environment:",)
RULE = b"-" * 20  # the dashed lines around the environment block


@dataclass(frozen=True)
class Progress:
    """A train or val progress line: which rows it times, and when it was written."""

    key: TimeKey  # (kind, epoch, iteration), as the parsers name rows in `MetricRow.time_keys`
    written: dt.datetime  # naive: the local time of the training host
    end: int  # offset just past the line in the text log
    last_iter: int | None  # the text log's last train iteration, this line included


def read(path: Path, offset: int = 0, size: int = HEAD_BYTES) -> bytes | None:
    """Up to `size` bytes of the text log from `offset`. None, with a log line that says why, when it cannot be
    read (a symlink, a FIFO, gone): what only the text log says then comes from the log alone."""
    try:
        fd, _ = open_regular(path)
        try:
            return os.pread(fd, size, offset)
        finally:
            os.close(fd)
    except OSError as exc:
        log.warning("%s: text log not read (%s); its launch is read from the log alone", path, exc.strerror or exc)
        return None


def _records(data: bytes, base: int) -> Iterator[tuple[int, re.Match[bytes], bool]]:
    """(offset past the line, its match, mmengine?) of every complete first line of a record in a chunk that
    starts at offset `base`; other lines (continuations of a record, a line still being written) are skipped."""
    position = base
    for raw in data.splitlines(keepends=True):
        position += len(raw)
        if not raw.endswith(b"\n"):
            return  # still being written
        if (mmcv := MMCV_RECORD.match(raw)) is not None:
            yield position, mmcv, False
        elif (engine := MMENGINE_RECORD.match(raw)) is not None:
            yield position, engine, True


def _message(match: re.Match[bytes], mmengine: bool) -> bytes:
    return match[7] if mmengine else match[8]


def _written(match: re.Match[bytes], mmengine: bool) -> dt.datetime:
    """The time a record starts with, from its date and time fields: what strptime would make of them, without
    its cost (a text log has a line per iteration logged, and more)."""
    written = dt.datetime(*map(int, match.group(1, 2, 3, 4, 5, 6)))
    return written if mmengine else written.replace(microsecond=int(match[7]) * 1000)


def iters_per_epoch(path: Path) -> int | None:
    """The iterations per epoch a text log names near its top; None if it names none or cannot be read."""
    head = read(path)
    return None if head is None else epoch_length(head)


def epoch_length(data: bytes) -> int | None:
    """The `L` of the first train line `Epoch [e][i/L]`; None before there is one (or for an iter-based run)."""
    for _, match, mmengine in _records(data, 0):
        if (train := TRAIN_EPOCH.match(_message(match, mmengine))) is not None:
            return int(train[3])
    return None


def environment(data: bytes) -> str:
    """The environment block near the top (mmengine's "System environment:", mmcv's "Environment info:"): its
    lines up to the closing dashes, the next section or the next record; "" when there is none."""
    lines = data.splitlines()
    start = next((i for i, line in enumerate(lines) if line.rstrip().endswith(ENV_STARTS)), None)
    if start is None:
        return ""
    block = []
    for line in lines[start + 1:]:
        stripped = line.strip()
        if stripped.startswith(ENV_ENDS) or MMCV_RECORD.match(line) or MMENGINE_RECORD.match(line):
            break
        if stripped.startswith(RULE):
            if block:
                break
            continue
        block.append(line)
    return b"\n".join(block).decode("utf-8", "replace")


def progress(data: bytes, base: int, last_iter: int | None) -> list[Progress]:
    """The progress lines of a chunk that starts at offset `base` (complete lines only); `last_iter` is the last
    train iteration of the lines before the chunk (an mmengine val line belongs to it)."""
    found = []
    for end, match, mmengine in _records(data, base):
        message = _message(match, mmengine)
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
            found.append(Progress(key, _written(match, mmengine), end, last_iter))
    return found

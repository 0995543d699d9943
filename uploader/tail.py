"""Read whole lines from a log file that another process is writing.

The file is known by identity, not by name (DESIGN invariant 3): a stored
``TailPosition`` is only resumed when the live file has the same (device,
inode), the same first bytes, and the same bytes just before the stored offset.
Anything else (truncation, replacement, rewrite in place) starts a new
generation from offset 0; the caller absorbs the duplicates this may cause.

Only whole lines advance the offset, so a position committed together with the
parsed rows always points at a line boundary and a torn write is never parsed
before it is complete. The module is pure file reading: no DB, no global state,
and the file is never written.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from dataclasses import dataclass

HEAD_MAX = 4096
"""How many leading bytes identify a file (reference §7 rule 1)."""

_TAIL_LEN = 64  # bytes before the offset that must still match (rule 2)
_CHUNK_MAX = 1 << 20
_CHUNK_MIN = 1 << 12


@dataclass(frozen=True)
class TailPosition:
    """Where to resume, plus what the file looked like there; commit it with the rows."""

    dev: int
    ino: int
    generation: int
    head_len: int  # min(size, HEAD_MAX) as last seen; grows with the file
    head_hash: str  # sha256 hex of the first head_len bytes
    offset: int  # end of the last whole line consumed
    tail_hash: str  # sha256 hex of the (up to) 64 bytes ending at offset


@dataclass(frozen=True)
class Line:
    """One line, as bytes: decoding is the parser's job."""

    offset: int  # byte offset of the line's first byte
    data: bytes  # without the trailing b"\n" and a trailing b"\r"
    terminated: bool  # False only for a final fragment accepted because finished=True


@dataclass(frozen=True)
class OversizedLine:
    """A line longer than max_line, skipped so that one bad line cannot exhaust memory."""

    offset: int
    length: int  # the line's bytes without its b"\n"


@dataclass(frozen=True)
class TailRead:
    """The outcome of one read_lines call."""

    position: TailPosition  # what to commit with the rows
    lines: list[Line]
    oversized: list[OversizedLine]
    reset_reason: str | None  # why a new generation started; None when continuing
    size: int  # file size seen by fstat of the open fd
    at_eof: bool  # nothing whole is left to read; False: call again (that call may find only a fragment)
    reset_from: int = -1  # with a reset: the byte the previous generation had been read up to
    mtime: float = 0.0  # epoch seconds, by the same fstat: when its lines were appended, at the latest

    @property
    def replaced(self) -> bool:
        """A new file under the name (an atomic `mv` over the log): ordinary, read from its start, not a problem."""
        return self.reset_reason is not None and self.reset_reason.startswith("replaced")

    def reset_message(self) -> str:
        """One line for a reset, naming the byte the old generation was read up to."""
        return f"{self.reset_reason}; had read up to byte {self.reset_from}, reading again from the start"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _mismatch(position: TailPosition, st: os.stat_result, head: bytes, tail: bytes) -> str | None:
    """Why the live file is not the one `position` was taken from, or None if it is."""
    if (st.st_dev, st.st_ino) != (position.dev, position.ino):
        return "replaced: inode changed"
    if st.st_size < position.offset:
        return f"truncated: size {st.st_size} < offset {position.offset}"
    if len(head) < position.head_len:
        return f"truncated: size {len(head)} < head length {position.head_len}"
    if _sha256(head[: position.head_len]) != position.head_hash:
        return "rewritten: head hash differs"
    if _sha256(tail) != position.tail_hash:
        return "rewritten: bytes before offset differ"
    return None


def _window(before: bytes, chunk: bytes, end: int) -> bytes:
    """The (up to) 64 bytes ending at chunk[end], where `before` ends where chunk starts."""
    if end >= _TAIL_LEN:
        return chunk[end - _TAIL_LEN : end]
    return (before + chunk[:end])[-_TAIL_LEN:]


def _line(offset: int, raw: bytes, terminated: bool) -> Line | None:
    """A Line for `raw` (no b"\\n"), or None for a blank line, which is consumed silently."""
    data = raw[:-1] if raw.endswith(b"\r") else raw
    if not data or data.isspace():
        return None
    return Line(offset, data, terminated)


def read_lines(
    path: str | os.PathLike[str],
    position: TailPosition | None,
    *,
    finished: bool = False,
    max_bytes: int = 8 << 20,
    max_line: int = 4 << 20,
) -> TailRead:
    """Read the whole lines after `position` (None: a new file) from `path`.

    Reads only up to the size fstat reports, so that size, offsets and at_eof
    describe one snapshot. At most about `max_bytes` are consumed per call (at
    least one line when a whole line exists). A trailing fragment without
    b"\\n" is left for later unless `finished` (the writer is done for good).
    The file is opened once, without following symlinks; OSError propagates.
    """
    if max_bytes < 1 or max_line < 0:
        raise ValueError("max_bytes must be >= 1 and max_line >= 0")
    fd, st = open_regular(path)
    try:
        return _read(fd, st, position, finished, max_bytes, max_line)
    finally:
        os.close(fd)


def open_regular(path: str | os.PathLike[str]) -> tuple[int, os.stat_result]:
    """Open a file of a watched tree read-only: never through a symlink, never hanging on a FIFO."""
    # O_NONBLOCK: opening a FIFO must not hang the tailer; regular files ignore it.
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", os.fspath(path))
    return fd, st


def read_head(path: str | os.PathLike[str], max_bytes: int) -> bytes:
    """The first `max_bytes` of a side file (text log, config) with the same care as a tailed log."""
    fd, _ = open_regular(path)
    try:
        return os.pread(fd, max_bytes, 0)
    finally:
        os.close(fd)


def _read(
    fd: int,
    st: os.stat_result,
    position: TailPosition | None,
    finished: bool,
    max_bytes: int,
    max_line: int,
) -> TailRead:
    size = st.st_size
    head = os.pread(fd, min(size, HEAD_MAX), 0)

    reason: str | None = None
    if position is None:
        generation, start, before = 0, 0, b""
    else:
        tail_start = max(0, position.offset - _TAIL_LEN)
        tail = os.pread(fd, position.offset - tail_start, tail_start) if size >= position.offset else b""
        reason = _mismatch(position, st, head, tail)
        if reason is None:
            generation, start, before = position.generation, position.offset, tail
        else:
            generation, start, before = position.generation + 1, 0, b""

    lines: list[Line] = []
    oversized: list[OversizedLine] = []
    chunk_size = max(_CHUNK_MIN, min(max_bytes, _CHUNK_MAX))
    pos = start  # first unconsumed byte; always a line boundary unless a fragment was finished
    tail_bytes = before  # the (up to) 64 bytes ending at pos
    carry = bytearray()  # bytes of the current line read so far (empty while skipping)
    skipping = False  # the current line is already longer than max_line
    read_to = start
    shrunk = False  # the file got shorter than fstat said while we read it
    more = False  # the budget stopped us while something consumable may remain

    while read_to < size and not more:
        chunk = os.pread(fd, min(chunk_size, size - read_to), read_to)
        if not chunk:
            shrunk = True
            break
        chunk_off = read_to
        read_to += len(chunk)
        k = 0
        while True:
            nl = chunk.find(b"\n", k)
            if nl < 0:
                if not skipping:
                    carry += chunk[k:]
                    if len(carry) > max_line:
                        skipping = True
                        carry.clear()
                break
            end = chunk_off + nl  # absolute offset of the b"\n"
            if skipping or len(carry) + nl - k > max_line:
                oversized.append(OversizedLine(pos, end - pos))
                skipping = False
            else:
                raw = bytes(carry) + chunk[k:nl] if carry else chunk[k:nl]
                line = _line(pos, raw, True)
                if line is not None:
                    lines.append(line)
            carry.clear()
            pos, k = end + 1, nl + 1
            tail_bytes = _window(before, chunk, k)
            if pos - start >= max_bytes:
                more = read_to < size or chunk.find(b"\n", k) >= 0 or (finished and pos < size)
                break
        before = (before + chunk[-_TAIL_LEN:])[-_TAIL_LEN:]

    if finished and not more and not shrunk and pos < read_to:
        if skipping:
            oversized.append(OversizedLine(pos, read_to - pos))
        else:
            line = _line(pos, bytes(carry), False)
            if line is not None:
                lines.append(line)
        pos, tail_bytes = read_to, before

    new_position = TailPosition(
        dev=st.st_dev,
        ino=st.st_ino,
        generation=generation,
        head_len=len(head),
        head_hash=_sha256(head),
        offset=pos,
        tail_hash=_sha256(tail_bytes),
    )
    reset_from = position.offset if reason is not None and position is not None else -1
    return TailRead(new_position, lines, oversized, reason, size, not (more or shrunk), reset_from, st.st_mtime)

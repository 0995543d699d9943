"""Tests for uploader.tail: identity, whole lines, budgets, oversized lines, and a writer/reader model."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import tempfile
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from uploader import tail
from uploader.tail import (
    HEAD_MAX,
    Line,
    OversizedLine,
    TailPosition,
    TailRead,
    read_lines,
)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def drain(path: Path, position: TailPosition | None, **kwargs: object) -> tuple[list[TailRead], TailPosition]:
    """Call read_lines until at_eof, passing the persisted position each time."""
    reads = []
    for _ in range(10_000):
        r = read_lines(path, position, **kwargs)  # type: ignore[arg-type]
        reads.append(r)
        position = r.position
        if r.at_eof:
            return reads, position
    raise AssertionError("read_lines never reached at_eof")


def data_of(r: TailRead) -> list[bytes]:
    return [line.data for line in r.lines]


# --- new files, whole lines, fragments ---------------------------------------------------------


def test_new_file_reads_whole_lines_from_zero(tmp_path: Path) -> None:
    p = tmp_path / "log.json"
    write(p, b'{"a": 1}\n{"b": 2}\n')
    r = read_lines(p, None)
    st_ = os.stat(p)
    assert r.lines == [Line(0, b'{"a": 1}', True), Line(9, b'{"b": 2}', True)]
    assert r.oversized == [] and r.reset_reason is None and r.at_eof and r.size == 18
    assert r.position == TailPosition(
        dev=st_.st_dev,
        ino=st_.st_ino,
        generation=0,
        head_len=18,
        head_hash=sha(p.read_bytes()),
        offset=18,
        tail_hash=sha(p.read_bytes()),
    )


def test_empty_file(tmp_path: Path) -> None:
    p = tmp_path / "log.json"
    write(p, b"")
    for finished in (False, True):
        r = read_lines(p, None, finished=finished)
        assert r.lines == [] and r.oversized == [] and r.at_eof and r.size == 0
        assert (r.position.offset, r.position.head_len, r.position.head_hash) == (0, 0, sha(b""))
        assert r.position.tail_hash == sha(b"")
        assert read_lines(p, r.position).reset_reason is None


def test_fragment_only_is_not_consumed_until_finished(tmp_path: Path) -> None:
    p = tmp_path / "log.json"
    write(p, b'{"a": 1')
    r = read_lines(p, None)
    assert r.lines == [] and r.position.offset == 0 and r.at_eof and r.size == 7
    assert r.position.head_len == 7  # the head covers the fragment; append-only keeps it stable
    done = read_lines(p, r.position, finished=True)
    assert done.lines == [Line(0, b'{"a": 1', False)]
    assert done.position.offset == 7 and done.at_eof and done.reset_reason is None


def test_fragment_is_delivered_once_when_completed(tmp_path: Path) -> None:
    p = tmp_path / "log.json"
    write(p, b'{"a": 1}\n{"b"')
    r1 = read_lines(p, None)
    assert data_of(r1) == [b'{"a": 1}'] and r1.position.offset == 9 and r1.at_eof
    assert read_lines(p, r1.position).lines == []  # still torn: nothing, same offset
    append(p, b': 2}\n{"c"')
    r2 = read_lines(p, r1.position)
    assert r2.lines == [Line(9, b'{"b": 2}', True)] and r2.position.offset == 18
    assert r2.reset_reason is None and r2.position.generation == 0


def test_finished_fragment_strips_cr_and_drops_blank(tmp_path: Path) -> None:
    p = tmp_path / "log.json"
    write(p, b"a\nxyz\r")
    assert read_lines(p, None, finished=True).lines == [Line(0, b"a", True), Line(2, b"xyz", False)]
    write(p, b"a\n  \t")
    r = read_lines(p, None, finished=True)
    assert data_of(r) == [b"a"] and r.position.offset == 5 and r.at_eof


def test_crlf_line_endings(tmp_path: Path) -> None:
    p = tmp_path / "log.json"
    write(p, b'{"a": 1}\r\n{"b": 2}\r\n{"c"\r')
    r = read_lines(p, None)
    assert r.lines == [Line(0, b'{"a": 1}', True), Line(10, b'{"b": 2}', True)]
    assert r.position.offset == 20  # the lone b"\r" may still be followed by b"\n"
    append(p, b"\n")
    assert read_lines(p, r.position).lines == [Line(20, b'{"c"', True)]


def test_only_one_trailing_cr_is_stripped(tmp_path: Path) -> None:
    p = tmp_path / "log.json"
    write(p, b"a\r\r\nb\rc\n")
    assert data_of(read_lines(p, None)) == [b"a\r", b"b\rc"]


def test_blank_lines_are_consumed_not_returned(tmp_path: Path) -> None:
    p = tmp_path / "log.json"
    write(p, b"\n  \n\t\r\n\x0b\x0c\nx\n \n")
    r = read_lines(p, None)
    assert r.lines == [Line(10, b"x", True)]
    assert r.position.offset == 14 and r.at_eof


def test_binary_garbage_is_returned_as_bytes(tmp_path: Path) -> None:
    p = tmp_path / "log.json"
    garbage = bytes(range(256)).replace(b"\n", b"")
    write(p, garbage + b"\n\x00\xff\xfe\n")
    assert data_of(read_lines(p, None)) == [garbage, b"\x00\xff\xfe"]


# --- identity and generations --------------------------------------------------------------


def test_resume_continues_and_head_grows_to_head_max(tmp_path: Path) -> None:
    p = tmp_path / "log.json"
    write(p, b"first\n")
    r = read_lines(p, None)
    assert r.position.head_len == 6
    line = b"x" * 99 + b"\n"
    for i in range(60):
        append(p, line)
        nxt = read_lines(p, r.position)
        assert nxt.reset_reason is None and nxt.position.generation == 0
        assert nxt.lines == [Line(6 + 100 * i, b"x" * 99, True)]
        size = 6 + 100 * (i + 1)
        assert nxt.position.head_len == min(size, HEAD_MAX)
        assert nxt.position.head_hash == sha(p.read_bytes()[:HEAD_MAX])
        assert nxt.position.tail_hash == sha(p.read_bytes()[size - 64 : size])
        r = nxt


def test_position_survives_a_rename(tmp_path: Path) -> None:
    p = tmp_path / "log.json"
    write(p, b"a\n")
    r = read_lines(p, None)
    moved = tmp_path / "moved.json"
    os.rename(p, moved)
    append(moved, b"b\n")
    r2 = read_lines(moved, r.position)
    assert r2.reset_reason is None and data_of(r2) == [b"b"]


def test_truncation_starts_a_new_generation(tmp_path: Path) -> None:
    p = tmp_path / "log.json"
    write(p, b"one\ntwo\nthree\n")
    r = read_lines(p, None)
    write(p, b"x\n")  # same inode, truncated and rewritten
    r2 = read_lines(p, r.position)
    assert r2.reset_reason == "truncated: size 2 < offset 14"
    assert r2.position.generation == 1 and r2.lines == [Line(0, b"x", True)]
    assert r2.position.ino == r.position.ino
    append(p, b"y\n")
    r3 = read_lines(p, r2.position)
    assert r3.reset_reason is None and r3.position.generation == 1 and data_of(r3) == [b"y"]


def test_truncation_below_an_unconsumed_head(tmp_path: Path) -> None:
    p = tmp_path / "log.json"
    write(p, b"fragment")
    r = read_lines(p, None)
    assert r.position.offset == 0
    write(p, b"")
    r2 = read_lines(p, r.position)
    assert r2.reset_reason == "truncated: size 0 < head length 8"
    assert r2.position.generation == 1 and r2.position.head_len == 0


def test_replacement_with_a_new_inode(tmp_path: Path) -> None:
    p = tmp_path / "log.json"
    write(p, b"a\nb\n")
    r = read_lines(p, None)
    new = tmp_path / "new.json"
    write(new, b"a\nb\nc\n")  # same prefix, different inode
    os.replace(new, p)
    r2 = read_lines(p, r.position)
    assert r2.reset_reason == "replaced: inode changed"
    assert r2.position.generation == 1 and r2.position.ino == os.stat(p).st_ino
    assert data_of(r2) == [b"a", b"b", b"c"]


def test_rewrite_in_place_same_length_different_head(tmp_path: Path) -> None:
    p = tmp_path / "log.json"
    write(p, b"aaa\nbbb\n")
    r = read_lines(p, None)
    with open(p, "r+b") as f:
        f.write(b"ccc\nddd\n")
    r2 = read_lines(p, r.position)
    assert r2.reset_reason == "rewritten: head hash differs"
    assert r2.position.generation == 1 and data_of(r2) == [b"ccc", b"ddd"]


def test_rewrite_before_offset_beyond_the_head(tmp_path: Path) -> None:
    p = tmp_path / "log.json"
    body = b"h" * (HEAD_MAX + 10) + b"\n" + b"old line\n"
    write(p, body)
    r = read_lines(p, None, max_line=1 << 20)
    with open(p, "r+b") as f:
        f.seek(len(body) - 9)
        f.write(b"new line\n")
    r2 = read_lines(p, r.position, max_line=1 << 20)
    assert r2.reset_reason == "rewritten: bytes before offset differ"
    assert r2.position.generation == 1 and data_of(r2)[-1] == b"new line"


def test_generation_keeps_counting(tmp_path: Path) -> None:
    p = tmp_path / "log.json"
    write(p, b"a\n")
    pos = read_lines(p, None).position
    for gen in (1, 2, 3):
        write(p, b"b\n" if gen % 2 else b"a\n")
        r = read_lines(p, pos)
        assert r.reset_reason is not None and r.position.generation == gen
        pos = r.position


def test_stored_position_is_checked_not_trusted(tmp_path: Path) -> None:
    p = tmp_path / "log.json"
    write(p, b"a\nb\n")
    pos = read_lines(p, None).position
    forged = dataclasses.replace(pos, offset=2, tail_hash=sha(b"zz"))
    r = read_lines(p, forged)
    assert r.reset_reason == "rewritten: bytes before offset differ" and data_of(r) == [b"a", b"b"]


# --- budgets and oversized lines -----------------------------------------------------------


def test_max_bytes_splits_reads_at_line_boundaries(tmp_path: Path) -> None:
    p = tmp_path / "log.json"
    lines = [b"line %03d" % i for i in range(100)]
    write(p, b"\n".join(lines) + b"\n")
    reads, pos = drain(p, None, max_bytes=50)
    assert len(reads) > 10
    assert [d for r in reads for d in data_of(r)] == lines
    for r in reads[:-1]:
        assert not r.at_eof and 1 <= len(r.lines) <= 6  # stops just after passing 50 bytes
    assert pos.offset == p.stat().st_size


def test_max_bytes_smaller_than_a_line_still_makes_progress(tmp_path: Path) -> None:
    p = tmp_path / "log.json"
    write(p, b"a long line\nanother long line\n")
    r = read_lines(p, None, max_bytes=1)
    assert data_of(r) == [b"a long line"] and not r.at_eof
    r2 = read_lines(p, r.position, max_bytes=1)
    assert data_of(r2) == [b"another long line"] and r2.at_eof


def test_at_eof_false_when_a_finished_fragment_remains(tmp_path: Path) -> None:
    p = tmp_path / "log.json"
    write(p, b"a\ntail")
    r = read_lines(p, None, finished=True, max_bytes=1)
    assert data_of(r) == [b"a"] and not r.at_eof
    r2 = read_lines(p, r.position, finished=True, max_bytes=1)
    assert r2.lines == [Line(2, b"tail", False)] and r2.at_eof
    unfinished = read_lines(p, None, max_bytes=1)
    assert data_of(unfinished) == [b"a"] and unfinished.at_eof


def test_oversized_line_is_reported_and_skipped(tmp_path: Path) -> None:
    p = tmp_path / "log.json"
    write(p, b"ok\n" + b"x" * 11 + b"\nok2\n")
    r = read_lines(p, None, max_line=10)
    assert data_of(r) == [b"ok", b"ok2"]
    assert r.oversized == [OversizedLine(3, 11)] and r.position.offset == 19


def test_max_line_boundary_counts_raw_bytes(tmp_path: Path) -> None:
    p = tmp_path / "log.json"
    write(p, b"x" * 10 + b"\n" + b"y" * 9 + b"\r\n" + b"z" * 10 + b"\r\n")
    r = read_lines(p, None, max_line=10)
    assert data_of(r) == [b"x" * 10, b"y" * 9]
    assert r.oversized == [OversizedLine(22, 11)]


def test_incomplete_oversized_line_waits_then_is_reported(tmp_path: Path) -> None:
    p = tmp_path / "log.json"
    write(p, b"ok\n" + b"x" * 50)
    r = read_lines(p, None, max_line=10)
    assert data_of(r) == [b"ok"] and r.oversized == [] and r.position.offset == 3 and r.at_eof
    append(p, b"x" * 50)
    r2 = read_lines(p, r.position, max_line=10)
    assert r2.oversized == [] and r2.lines == [] and r2.position.offset == 3 and r2.at_eof
    append(p, b"\nnext\n")
    r3 = read_lines(p, r2.position, max_line=10)
    assert r3.oversized == [OversizedLine(3, 100)] and data_of(r3) == [b"next"]


def test_oversized_fragment_when_finished(tmp_path: Path) -> None:
    p = tmp_path / "log.json"
    write(p, b"ok\n" + b"x" * 50)
    r = read_lines(p, None, finished=True, max_line=10)
    assert data_of(r) == [b"ok"] and r.oversized == [OversizedLine(3, 50)]
    assert r.position.offset == 53 and r.at_eof
    assert r.position.tail_hash == sha(p.read_bytes()[-64:])


def test_oversized_line_is_never_held_whole(tmp_path: Path) -> None:
    p = tmp_path / "log.json"
    big = 48 << 20
    with open(p, "wb") as f:
        f.write(b"a\n")
        f.write(b"x" * big)
        f.write(b"\nb\n")
    tracemalloc.start()
    try:
        r = read_lines(p, None, max_line=1 << 20, max_bytes=1 << 30)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert data_of(r) == [b"a", b"b"] and r.oversized == [OversizedLine(2, big)]
    assert peak < 8 << 20


# --- the file itself -----------------------------------------------------------------------


def test_opens_read_only_without_following_symlinks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "log.json"
    write(p, b"a\n")
    before = os.stat(p)
    flags_seen: list[int] = []
    real_open = os.open

    def spy(path: object, flags: int, *args: object) -> int:
        flags_seen.append(flags)
        return real_open(path, flags, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(tail.os, "open", spy)
    read_lines(p, None, finished=True)
    assert len(flags_seen) == 1
    assert flags_seen[0] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND) == 0
    assert flags_seen[0] & os.O_NOFOLLOW
    after = os.stat(p)
    assert p.read_bytes() == b"a\n" and after.st_mtime_ns == before.st_mtime_ns


def test_symlink_is_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "log.json"
    write(target, b"a\n")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    with pytest.raises(OSError):
        read_lines(link, None)


def test_missing_file_raises(tmp_path: Path) -> None:
    p = tmp_path / "log.json"
    write(p, b"a\n")
    pos = read_lines(p, None).position
    p.unlink()
    with pytest.raises(FileNotFoundError):
        read_lines(p, pos)


def test_fifo_and_directory_are_rejected_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(OSError):
        read_lines(fifo, None)
    with pytest.raises(OSError):
        read_lines(tmp_path, None)


def test_file_shrinking_during_read_asks_for_another_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "log.json"
    write(p, b"a\nb\nc\n")
    real_pread = os.pread

    def shrunk_to_4(fd: int, n: int, offset: int) -> bytes:
        return real_pread(fd, max(0, min(n, 4 - offset)), offset)

    monkeypatch.setattr(tail.os, "pread", shrunk_to_4)
    r = read_lines(p, None, finished=True)
    assert data_of(r) == [b"a", b"b"] and r.position.offset == 4 and not r.at_eof
    monkeypatch.setattr(tail.os, "pread", real_pread)
    r2 = read_lines(p, r.position)
    assert r2.reset_reason is None and data_of(r2) == [b"c"] and r2.at_eof


def test_invalid_limits(tmp_path: Path) -> None:
    p = tmp_path / "log.json"
    write(p, b"a\n")
    with pytest.raises(ValueError):
        read_lines(p, None, max_bytes=0)
    with pytest.raises(ValueError):
        read_lines(p, None, max_line=-1)


def test_results_are_frozen(tmp_path: Path) -> None:
    p = tmp_path / "log.json"
    write(p, b"a\n")
    r = read_lines(p, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.position.offset = 0  # type: ignore[misc]
    assert TailPosition(**dataclasses.asdict(r.position)) == r.position


# --- model-based: a writer doing random things, a reader restarted from its position ------

MAX_LINE = 24
line_body = st.binary(max_size=MAX_LINE).map(lambda b: b.replace(b"\n", b"."))
line_end = st.sampled_from([b"\n", b"\r\n"])
whole_lines = st.lists(st.tuples(line_body, line_end).map(b"".join), max_size=5).map(b"".join)
fragment = st.binary(min_size=1, max_size=10).map(lambda b: b.replace(b"\n", b"."))
budget = st.one_of(st.integers(1, 256), st.just(8 << 20))


def model_events(content: bytes, start: int, finished: bool) -> tuple[list[tuple], int]:
    """The spec, written the simple way: what reading content[start:] must yield, and the new offset."""
    events: list[tuple] = []
    pos = start
    while (nl := content.find(b"\n", pos)) >= 0:
        raw = content[pos:nl]
        if len(raw) > MAX_LINE:
            events.append(("over", pos, len(raw)))
        elif raw.removesuffix(b"\r").strip():
            events.append(("line", pos, raw.removesuffix(b"\r"), True))
        pos = nl + 1
    if finished and pos < len(content):
        raw = content[pos:]
        if len(raw) > MAX_LINE:
            events.append(("over", pos, len(raw)))
        elif raw.removesuffix(b"\r").strip():
            events.append(("line", pos, raw.removesuffix(b"\r"), False))
        pos = len(content)
    return events, pos


class TailMachine(RuleBasedStateMachine):
    """The writer mutates a real file; after each op a reader drains it from the persisted position."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="tail-model-")
        self.path = Path(self.dir) / "log.json"
        self.content = b""
        write(self.path, b"")
        self.replaced = False
        # What the reader persisted (None: never read) and what the model expects of it.
        self.position: TailPosition | None = None
        self.m_gen = -1
        self.m_offset = 0
        self.m_head = b""
        self.m_tail = b""
        self.finished_at: int | None = None  # offset accepted past a fragment by finished=True

    def teardown(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    # writer operations

    @rule(data=whole_lines, max_bytes=budget)
    def append_lines(self, data: bytes, max_bytes: int) -> None:
        self._append(data)
        self._read(max_bytes, finished=False)

    @rule(data=fragment, max_bytes=budget)
    def append_fragment(self, data: bytes, max_bytes: int) -> None:
        self._append(data)
        self._read(max_bytes, finished=False)

    @precondition(lambda self: self.content and not self.content.endswith(b"\n"))
    @rule(rest=line_body, end=line_end, max_bytes=budget)
    def complete_fragment(self, rest: bytes, end: bytes, max_bytes: int) -> None:
        self._append(rest + end)
        self._read(max_bytes, finished=False)

    @rule(size=st.integers(MAX_LINE + 1, 80), end=line_end, max_bytes=budget)
    def append_oversized(self, size: int, end: bytes, max_bytes: int) -> None:
        self._append(b"{" + b"o" * (size - 1) + end)
        self._read(max_bytes, finished=False)

    @rule(data=whole_lines, max_bytes=budget)
    def truncate_and_rewrite(self, data: bytes, max_bytes: int) -> None:
        with open(self.path, "r+b") as f:
            f.truncate(0)
            f.write(data)
        self.content = data
        self._read(max_bytes, finished=False)

    @rule(data=whole_lines, max_bytes=budget)
    def replace(self, data: bytes, max_bytes: int) -> None:
        new = self.path.with_suffix(".new")
        write(new, data)
        os.replace(new, self.path)
        self.content = data
        self.replaced = True
        self._read(max_bytes, finished=False)

    @precondition(lambda self: self.content)
    @rule(data=st.data(), max_bytes=budget)
    def rewrite_in_place(self, data: st.DataObject, max_bytes: int) -> None:
        pattern = bytes(data.draw(st.lists(st.sampled_from(b"ab \r\n{"), min_size=1, max_size=64)))
        new = (pattern * (len(self.content) // len(pattern) + 1))[: len(self.content)]
        with open(self.path, "r+b") as f:
            f.write(new)
        self.content = new
        self._read(max_bytes, finished=False)

    @precondition(lambda self: len(self.content) <= HEAD_MAX)
    @rule(max_bytes=budget)
    def append_past_head(self, max_bytes: int) -> None:
        """Grow the file beyond HEAD_MAX so that only the offset checks can see later rewrites."""
        self._append(b"".join(b"pad %015d\n" % i for i in range(HEAD_MAX // 20 + 1)))
        self._read(max_bytes, finished=False)

    @precondition(lambda self: self.content)
    @rule(data=st.data(), max_bytes=budget)
    def rewrite_end_in_place(self, data: st.DataObject, max_bytes: int) -> None:
        n = data.draw(st.integers(1, min(100, len(self.content))))
        new = bytes(data.draw(st.lists(st.sampled_from(b"ab \r\n{"), min_size=n, max_size=n)))
        with open(self.path, "r+b") as f:
            f.seek(len(self.content) - n)
            f.write(new)
        self.content = self.content[:-n] + new
        self._read(max_bytes, finished=False)

    @precondition(lambda self: self.content)
    @rule(data=st.data(), max_bytes=budget)
    def truncate_shorter(self, data: st.DataObject, max_bytes: int) -> None:
        size = data.draw(st.integers(0, len(self.content) - 1))
        os.truncate(self.path, size)
        self.content = self.content[:size]
        self._read(max_bytes, finished=False)

    @rule(max_bytes=budget)
    def finish(self, max_bytes: int) -> None:
        self._read(max_bytes, finished=True)

    # reader and model

    def _append(self, data: bytes) -> None:
        append(self.path, data)
        self.content += data

    def _model_reset(self) -> bool:
        """The identity rules, applied to the model's own record of the bytes the reader last saw."""
        c = self.content
        return (
            self.replaced
            or len(c) < self.m_offset
            or c[: len(self.m_head)] != self.m_head
            or c[max(0, self.m_offset - 64) : self.m_offset] != self.m_tail
        )

    def _read(self, max_bytes: int, finished: bool) -> None:
        if self.position is None or self._model_reset():
            self.m_gen += 1
            self.m_offset = 0
            self.finished_at = None
        events, self.m_offset = model_events(self.content, self.m_offset, finished)
        expected = [(self.m_gen, *e) for e in events]
        if finished and self.content and not self.content.endswith(b"\n"):
            self.finished_at = self.m_offset
        self.m_head = self.content[:HEAD_MAX]
        self.m_tail = self.content[max(0, self.m_offset - 64) : self.m_offset]
        self.replaced = False

        delivered: list[tuple] = []
        reads, self.position = drain(
            self.path, self.position, finished=finished, max_bytes=max_bytes, max_line=MAX_LINE
        )
        for r in reads:
            assert r.size == len(self.content)
            gen = r.position.generation
            got = [("line", ln.offset, ln.data, ln.terminated) for ln in r.lines]
            got += [("over", o.offset, o.length) for o in r.oversized]
            delivered += [(gen, *e) for e in sorted(got, key=lambda e: e[1])]
            if not finished:
                assert all(ln.terminated for ln in r.lines)
        assert delivered == expected  # exactly once per generation, in order, nothing torn

    @invariant()
    def position_matches_model(self) -> None:
        if self.position is None:
            return
        p = self.position
        assert (p.generation, p.offset) == (self.m_gen, self.m_offset)
        assert p.head_len == len(self.m_head) and p.head_hash == sha(self.m_head)
        assert p.tail_hash == sha(self.m_tail)
        at_boundary = p.offset == 0 or self.content[p.offset - 1 : p.offset] == b"\n"
        assert at_boundary or p.offset == self.finished_at


TailMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_tail_model = TailMachine.TestCase

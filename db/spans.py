"""Uploaded rows folded into spans (DESIGN 4): once a segment is verified, its rows' payloads are in W&B and
nothing reads them again, so they are dropped; one `UploadedSpan` per (run, log, generation) keeps what is still
read — which lines of the log are in (dedup when a replaced file is read again), the step range, the axes
(which checkpoint belongs to the run) and the count (`status`). Val rows stay whole: a checkpoint found later
takes its metadata from them.

`lines` packs each line as a varint offset delta and the first 8 bytes of the line's hash: about 10 bytes a row.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import groupby
from typing import NamedTuple

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from db.models import OutboxRow, UploadedSpan

HASH_BYTES = 8


def line_key(offset: int, line_hash: str) -> tuple[int, str]:
    """What dedup compares: the line's offset and the part of its hash a span keeps."""
    return offset, line_hash[: 2 * HASH_BYTES]


def pack(lines: Iterable[tuple[int, str]]) -> bytes:
    """(offset, hex hash) pairs in offset order → the packed form."""
    out = bytearray()
    previous = 0
    for offset, line_hash in lines:
        delta = offset - previous
        if delta < 0:
            raise ValueError("lines must come in offset order")
        while delta >= 0x80:
            out.append(delta & 0x7F | 0x80)
            delta >>= 7
        out.append(delta)
        out += bytes.fromhex(line_hash[: 2 * HASH_BYTES])
        previous = offset
    return bytes(out)


def unpack(data: bytes) -> Iterator[tuple[int, str]]:
    """The packed form → (offset, short hex hash) pairs, as `line_key` gives them."""
    position, offset = 0, 0
    while position < len(data):
        delta, shift = 0, 0
        while True:
            byte = data[position]
            position += 1
            delta |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                break
        offset += delta
        yield offset, data[position:position + HASH_BYTES].hex()
        position += HASH_BYTES


class _Uploaded(NamedTuple):
    source_id: int
    generation: int
    byte_offset: int
    line_hash: str
    step: int
    epoch: int | None
    iter: int | None


_FOLDABLE = (OutboxRow.uploaded.is_(True), OutboxRow.kind != "val")


def fold_uploaded(session: Session, run_id: int) -> int:
    """Fold the run's uploaded rows (but val rows) into spans, in the transaction that marked them uploaded
    (then `Database.reclaim_space`); returns how many rows were folded."""
    rows = [_Uploaded(*r) for r in session.execute(
        select(OutboxRow.source_id, OutboxRow.generation, OutboxRow.byte_offset, OutboxRow.line_hash, OutboxRow.step,
               OutboxRow.epoch, OutboxRow.iter)
        .where(OutboxRow.run_id == run_id, *_FOLDABLE)
        .order_by(OutboxRow.source_id, OutboxRow.generation, OutboxRow.byte_offset, OutboxRow.step)
    )]
    if not rows:
        return 0
    for (source_id, generation), group in groupby(rows, key=lambda r: (r.source_id, r.generation)):
        session.add(_span(run_id, source_id, generation, list(group)))
    session.execute(delete(OutboxRow).where(OutboxRow.run_id == run_id, *_FOLDABLE))
    return len(rows)


def _span(run_id: int, source_id: int, generation: int, rows: list[_Uploaded]) -> UploadedSpan:
    lines = dict.fromkeys((r.byte_offset, r.line_hash) for r in rows)  # a line that gave several rows, once
    steps = [r.step for r in rows]
    epochs = [r.epoch for r in rows if r.epoch is not None]
    iters = [r.iter for r in rows if r.iter is not None]
    return UploadedSpan(
        run_id=run_id, source_id=source_id, generation=generation,
        first_offset=rows[0].byte_offset, last_offset=rows[-1].byte_offset,
        first_step=min(steps), last_step=max(steps), rows=len(rows),
        min_epoch=min(epochs, default=None), max_epoch=max(epochs, default=None),
        min_iter=min(iters, default=None), max_iter=max(iters, default=None),
        lines=pack(lines),
    )


def stored_lines(session: Session, source_id: int, first_offset: int, last_offset: int) -> set[tuple[int, str]]:
    """`line_key`s of the folded lines of this source between two offsets."""
    found: set[tuple[int, str]] = set()
    for data in session.scalars(select(UploadedSpan.lines).where(
        UploadedSpan.source_id == source_id, UploadedSpan.first_offset <= last_offset, UploadedSpan.last_offset >= first_offset,
    )):
        found.update(key for key in unpack(data) if first_offset <= key[0] <= last_offset)
    return found


def reached(session: Session, run_id: int, unit: str, number: int) -> bool:
    """Whether a folded span of the run covers this epoch (or global iteration)."""
    low, high = (UploadedSpan.min_epoch, UploadedSpan.max_epoch) if unit == "epoch" else (UploadedSpan.min_iter, UploadedSpan.max_iter)
    query = select(UploadedSpan.id).where(UploadedSpan.run_id == run_id, low <= number, high >= number).limit(1)
    return session.scalar(query) is not None


def rows_of_source(session: Session, source_id: int) -> int:
    return session.scalar(select(func.coalesce(func.sum(UploadedSpan.rows), 0)).where(UploadedSpan.source_id == source_id)) or 0

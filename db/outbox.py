"""The outbox (DESIGN 4): metric rows and artifacts waiting for W&B, and every statement about them.

Producers put entries in (ingest: rows with the file offset in one transaction; the checkpoint and eval-job
followers: artifacts). The writer takes a run's pending entries, logs them into the run's open segment
(`assign`/`logged`), and settles the whole segment at once: `settle_uploaded` when it was verified,
`release` when it was not (everything in it is pending again, to be logged into a new segment).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, event, func, select, union, update
from sqlalchemy.orm import Session

from common import timings
from db import spans
from db.models import ArtifactKind, OutboxArtifact, OutboxRow, Run, Segment
from db.session import node_of

_PENDING_ROW = (OutboxRow.uploaded.is_(False), OutboxRow.segment_id.is_(None))
_PENDING_ARTIFACT = (OutboxArtifact.uploaded.is_(False), OutboxArtifact.segment_id.is_(None), OutboxArtifact.error.is_(None))


@dataclass(frozen=True)
class PendingRow:
    id: int
    step: int
    payload_json: str


@dataclass(frozen=True)
class PendingArtifact:
    """What the writer needs to build and log one artifact; `logged` is filled in once it is logged."""

    id: int
    run_id: int
    kind: ArtifactKind
    checkpoint_id: int | None
    eval_job_id: int | None
    manifest_id: int | None
    file_path: str | None
    file_name: str | None
    file_md5: str | None
    file_stat: tuple[int, int] | None  # model: (size, mtime_ns) of the file when it was hashed
    aliases: list[str]
    metadata: dict[str, Any]


def add_rows(session: Session, rows: list[dict[str, Any]]) -> None:
    """Insert parsed rows (Core executemany: no ORM object per row)."""
    if rows:
        session.connection().execute(OutboxRow.__table__.insert(), rows)


def stored_lines(session: Session, source_id: int, first_offset: int, last_offset: int) -> set[tuple[int, str]]:
    """`spans.line_key`s of the lines already stored from this source between two offsets, folded or not."""
    rows = session.execute(
        select(OutboxRow.byte_offset, OutboxRow.line_hash).where(
            OutboxRow.source_id == source_id,
            OutboxRow.byte_offset >= first_offset,
            OutboxRow.byte_offset <= last_offset,
        )
    )
    return {spans.line_key(offset, line_hash) for offset, line_hash in rows} | spans.stored_lines(session, source_id, first_offset, last_offset)


def add_artifact(session: Session, run_id: int, kind: ArtifactKind, key: str, **values: Any) -> bool:
    """Queue one artifact of a run, once per key; False when it is already queued."""
    exists = session.scalar(select(OutboxArtifact.id).where(OutboxArtifact.run_id == run_id, OutboxArtifact.key == key))
    if exists is not None:
        return False
    for name in ("aliases", "metadata"):
        if name in values:
            values[f"{name}_json"] = json.dumps(values.pop(name), default=str)
    session.add(OutboxArtifact(run_id=run_id, kind=kind, key=key, **values))
    return True


def pending_runs(session: Session) -> list[int]:
    """This node's runs with something to upload."""
    rows = select(OutboxRow.run_id).where(*_PENDING_ROW)
    artifacts = select(OutboxArtifact.run_id).where(*_PENDING_ARTIFACT)
    ours = select(Run.id).where(Run.node == node_of(session))
    return sorted(session.scalars(select(Run.id).where(Run.id.in_(ours), Run.id.in_(union(rows, artifacts)))))


def pending_rows(session: Session, run_id: int, limit: int) -> list[PendingRow]:
    rows = session.execute(
        select(OutboxRow.id, OutboxRow.step, OutboxRow.payload_json)
        .where(OutboxRow.run_id == run_id, *_PENDING_ROW)
        .order_by(OutboxRow.step)
        .limit(limit)
    ).all()
    return [PendingRow(*row) for row in rows]


def pending_artifacts(session: Session, run_id: int) -> list[PendingArtifact]:
    """In the order they were queued: a `val` table goes before the prediction tables that reference it."""
    entries = session.scalars(
        select(OutboxArtifact).where(OutboxArtifact.run_id == run_id, *_PENDING_ARTIFACT).order_by(OutboxArtifact.id)
    )
    return [
        PendingArtifact(
            e.id, e.run_id, e.kind, e.checkpoint_id, e.eval_job_id, e.manifest_id, e.file_path, e.file_name, e.file_md5,
            (e.file_size, e.file_mtime_ns) if e.file_size is not None and e.file_mtime_ns is not None else None,
            json.loads(e.aliases_json), json.loads(e.metadata_json),
        )
        for e in entries
    ]


def assign_rows(session: Session, run_id: int, first_step: int, last_step: int, segment_id: int) -> None:
    """The run's pending rows from `first_step` to `last_step` are in the segment: the rows `pending_rows` gave,
    as a range (no row can enter it meanwhile: a new row gets a step above every row of its run)."""
    session.execute(
        update(OutboxRow)
        .where(OutboxRow.run_id == run_id, *_PENDING_ROW, OutboxRow.step >= first_step, OutboxRow.step <= last_step)
        .values(segment_id=segment_id)
    )


def logged(session: Session, artifact_id: int, segment_id: int, record: dict[str, Any]) -> None:
    """The artifact is in the segment; `record` holds its type and digest (what verification looks for) and
    whatever later artifacts need from it (the val table's client id and entries)."""
    session.execute(
        update(OutboxArtifact).where(OutboxArtifact.id == artifact_id).values(segment_id=segment_id, logged_json=json.dumps(record))
    )


def reject(session: Session, artifact_id: int, error: str) -> None:
    """The artifact cannot be built now (e.g. its file changed while being hashed); its producer decides."""
    session.execute(update(OutboxArtifact).where(OutboxArtifact.id == artifact_id).values(error=error))


def logged_val(session: Session, run_id: int, manifest_id: int, *, uploaded_only: bool = False) -> dict[str, Any] | None:
    """The record of the run's `val` artifact for a manifest, once logged (in this segment or an earlier one);
    `uploaded_only`: once W&B has committed it."""
    query = select(OutboxArtifact.logged_json).where(
        OutboxArtifact.run_id == run_id, OutboxArtifact.kind == ArtifactKind.VAL,
        OutboxArtifact.manifest_id == manifest_id, OutboxArtifact.logged_json.is_not(None),
    )
    found = session.scalar(query.where(OutboxArtifact.uploaded.is_(True)) if uploaded_only else query)
    return json.loads(found) if found is not None else None


def artifacts_committed(session: Session, committed: dict[int, dict[str, Any]]) -> None:
    """Online: W&B has committed these artifacts (outbox id → the version it holds, kept in the record)."""
    for entry in session.scalars(select(OutboxArtifact).where(OutboxArtifact.id.in_(list(committed)))):
        entry.uploaded = True
        entry.logged_json = json.dumps({**json.loads(entry.logged_json or "{}"), **committed[entry.id]})


def release_artifacts(session: Session, ids: list[int]) -> None:
    """Online: these artifacts were logged but W&B did not commit them: pending again."""
    if ids:
        session.execute(update(OutboxArtifact).where(OutboxArtifact.id.in_(ids), OutboxArtifact.uploaded.is_(False))
                        .values(segment_id=None, logged_json=None))


@dataclass(frozen=True)
class SegmentContent:
    steps: list[int]
    artifacts: list[tuple[str, str | None]]  # (type, digest) of every artifact logged into it
    chart_tables: int = 0  # the `run_table` artifacts wandb makes of the charts' summary tables


def content(session: Session, segment_id: int) -> SegmentContent:
    steps = list(session.scalars(select(OutboxRow.step).where(OutboxRow.segment_id == segment_id).order_by(OutboxRow.step)))
    records = [json.loads(r) for r in session.scalars(select(OutboxArtifact.logged_json).where(OutboxArtifact.segment_id == segment_id))]
    return SegmentContent(steps, sorted((r["type"], r.get("digest")) for r in records), sum(r.get("chart_tables", 0) for r in records))


def settle_uploaded(session: Session, segment_id: int) -> None:
    """The segment is verified: everything in it is uploaded, and its rows are folded."""
    _confirming(session, OutboxRow.segment_id == segment_id)
    for table in (OutboxRow, OutboxArtifact):
        session.execute(update(table).where(table.segment_id == segment_id).values(uploaded=True))
    spans.fold_uploaded(session, session.get_one(Segment, segment_id).run_id)


def release(session: Session, segment_id: int) -> int:
    """What the segment holds and is not uploaded is pending again (a segment never synced gives everything
    back). Returns how many rows."""
    session.execute(
        update(OutboxArtifact)
        .where(OutboxArtifact.segment_id == segment_id, OutboxArtifact.uploaded.is_(False))
        .values(segment_id=None, logged_json=None)
    )
    return session.execute(
        update(OutboxRow).where(OutboxRow.segment_id == segment_id, OutboxRow.uploaded.is_(False)).values(segment_id=None)
    ).rowcount


def confirm_sent(session: Session, segment_id: int, server_next_step: int) -> int:
    """Online: W&B has every step below `server_next_step`. The segment's rows below it are uploaded; the others
    go back to the outbox, and so does any artifact that was not confirmed committed when the segment was sent.
    Returns how many rows go again."""
    _confirming(session, OutboxRow.segment_id == segment_id, OutboxRow.step < server_next_step)
    session.execute(
        update(OutboxRow).where(OutboxRow.segment_id == segment_id, OutboxRow.step < server_next_step).values(uploaded=True)
    )
    spans.fold_uploaded(session, session.get_one(Segment, segment_id).run_id)
    return release(session, segment_id)


def mark_below_step(session: Session, run_id: int, step: int) -> None:
    """Online resume: rows below the server's next step reached W&B (before a crash, or in a sent segment)."""
    _confirming(session, OutboxRow.run_id == run_id, OutboxRow.step < step)
    session.execute(
        update(OutboxRow).where(OutboxRow.run_id == run_id, OutboxRow.step < step, OutboxRow.uploaded.is_(False)).values(uploaded=True)
    )
    spans.fold_uploaded(session, run_id)


def _confirming(session: Session, *where: Any) -> None:
    """The rows `where` are being marked uploaded: once the transaction commits, each one's lag (now less its
    line's append) goes into this process's histogram (common/timings.py)."""
    appended = session.scalars(
        select(OutboxRow.appended_at).where(*where, OutboxRow.uploaded.is_(False), OutboxRow.appended_at.is_not(None))
    ).all()
    if appended:
        confirmed_at = time.time()
        event.listen(session, "after_commit", lambda _session: _observe_lag(confirmed_at, appended), once=True)


def _observe_lag(confirmed_at: float, appended: list[float]) -> None:
    for appended_at in appended:
        timings.LAG.observe(max(0.0, confirmed_at - appended_at))


def pending_row_count(session: Session) -> int:
    """This node's rows not logged yet (a row logged into an open segment is counted by the writer, not here);
    on a shared PostgreSQL other nodes' rows are theirs to count (DESIGN 11)."""
    ours = select(Run.id).where(Run.node == node_of(session))
    return session.scalar(
        select(func.count()).select_from(OutboxRow).where(*_PENDING_ROW, OutboxRow.run_id.in_(ours))
    ) or 0


def queued(kind: ArtifactKind):  # type: ignore[no-untyped-def]
    """The checkpoint (model) or eval job (pred) ids that have an entry, as a subquery for producers."""
    column = OutboxArtifact.checkpoint_id if kind is ArtifactKind.MODEL else OutboxArtifact.eval_job_id
    return select(column).where(OutboxArtifact.kind == kind)


def withdraw(session: Session, run_id: int, key: str) -> None:
    """A producer takes back an entry that is not logged yet (its checkpoint changed before the upload)."""
    session.execute(
        delete(OutboxArtifact).where(
            OutboxArtifact.run_id == run_id, OutboxArtifact.key == key, OutboxArtifact.segment_id.is_(None),
            OutboxArtifact.uploaded.is_(False),
        )
    )


@dataclass(frozen=True)
class ArtifactOutcome:
    """Where one artifact entry stands, for its producer's follow-up and for `status`."""

    entry_id: int
    run_id: int
    key: str
    uploaded: bool
    error: str | None
    segment_dir: str | None
    segment_mode: str | None
    aliases: list[str]
    logged: dict[str, Any] | None


def outcomes(session: Session, kind: ArtifactKind, ids: list[int] | None = None) -> dict[int, ArtifactOutcome]:
    """By checkpoint id (model) or eval job id (pred); `ids` None: all of them."""
    column = OutboxArtifact.checkpoint_id if kind is ArtifactKind.MODEL else OutboxArtifact.eval_job_id
    query = (
        select(OutboxArtifact, Segment.dir, Segment.mode)
        .outerjoin(Segment, Segment.id == OutboxArtifact.segment_id)
        .where(OutboxArtifact.kind == kind)
    )
    if ids is not None:
        query = query.where(column.in_(ids))
    found = {}
    for entry, directory, mode in session.execute(query):
        found[getattr(entry, column.key)] = ArtifactOutcome(
            entry.id, entry.run_id, entry.key, entry.uploaded, entry.error, directory, mode,
            json.loads(entry.aliases_json), json.loads(entry.logged_json) if entry.logged_json else None,
        )
    return found


def reached(session: Session, run_id: int, unit: str, number: int) -> bool:
    """Whether the run logged any row at this epoch (or global iteration)."""
    axis = OutboxRow.epoch if unit == "epoch" else OutboxRow.iter
    found = session.scalar(select(OutboxRow.id).where(OutboxRow.run_id == run_id, axis == number).limit(1)) is not None
    return found or spans.reached(session, run_id, unit, number)


def val_values_at(session: Session, run_id: int, unit: str, number: int) -> dict[str, Any] | None:
    """The payload of the run's (last) val row at this epoch or iteration."""
    axis = OutboxRow.epoch if unit == "epoch" else OutboxRow.iter
    found = session.scalar(
        select(OutboxRow.payload_json)
        .where(OutboxRow.run_id == run_id, OutboxRow.kind == "val", axis == number)
        .order_by(OutboxRow.step.desc())
        .limit(1)
    )
    return json.loads(found) if found is not None else None


def rows_of_source(session: Session, source_id: int) -> int:
    unfolded = session.scalar(select(func.count()).select_from(OutboxRow).where(OutboxRow.source_id == source_id)) or 0
    return unfolded + spans.rows_of_source(session, source_id)

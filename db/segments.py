"""Segments and the upload state of runs (DESIGN 4–6, 10, 11): every statement that changes them.

A segment is one `.wandb` file (offline) or one session (online) of a run. Its row is added only once
`wandb.init` succeeded (`opened`), and it leaves the open state one way of three: `verified` (read back and
found to hold what was logged: everything in it is uploaded), `sent` (online: finished; its rows wait for the
run's next start to say what W&B has, `settle_sent`), or `discarded` (never verified: what it held is pending
again). Beside it, each run's failures in a row and its backoff: `failed` counts one and sets the next try by
the database's clock, a segment that reaches W&B whole resets them (`succeeded`), `retry_now` is the
operator's reset. The writer only talks to W&B and calls these.

An offline closed segment then goes to a W&B server with `mmdet-wandb sync` (DESIGN 14): `sync_sending` when its
replay begins, `synced` only once the server's starting step is past its last step (`confirmed`), with attempts,
the last error and a backoff of its own (`sync_failed`). wandb's `.synced` marker files are never read.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from common.backoff import backoff_s
from db import outbox
from db.jobs import db_clock
from db.models import OutboxRow, Run, Segment, SegmentState, SyncState, WorkDir, utcnow
from db.outbox import SegmentContent
from db.session import Database, node_of

_OWNING = (SegmentState.OPEN, SegmentState.SENT, SegmentState.CLOSED)  # states whose directory is still in use


@dataclass(frozen=True)
class LeftOpen:
    """A segment still open in the DB with no run object writing into it (a previous process's)."""

    id: int
    run_id: int
    directory: Path
    mode: str


@dataclass(frozen=True)
class NextSegment:
    seq: int
    uploaded_up_to: int | None  # the last step of the run's closed segments (None: none closed with rows yet)


@dataclass(frozen=True)
class Finished:
    """Online, a segment just finished: its directory, and whether it holds rows that wait for confirmation."""

    directory: Path
    holds_rows: bool


@dataclass(frozen=True)
class Confirmed:
    """Online, a run's sent segments settled by what W&B has."""

    directories: list[Path]  # their local files can go
    returned: dict[int, int]  # seq → rows of that segment W&B does not have, pending again
    kept: dict[int, int]  # seq → rows of a segment W&B has whole (closed)


@dataclass(frozen=True)
class Closed:
    """A segment just closed, named for its event (common/events.py)."""

    wandb_id: str
    work_dir: str
    seq: int
    mode: str
    rows: int


@dataclass(frozen=True)
class Backoff:
    wandb_id: str
    error: str
    failures: int  # in a row
    wait_s: float  # until the next try


def left_open(session: Session) -> list[LeftOpen]:
    """This node's open segments, oldest first."""
    rows = session.execute(
        select(Segment.id, Segment.run_id, Segment.dir, Segment.mode)
        .where(Segment.node == node_of(session), Segment.state == SegmentState.OPEN)
        .order_by(Segment.id)
    )
    return [LeftOpen(segment_id, run_id, Path(directory), mode) for segment_id, run_id, directory, mode in rows]


def owned_dirs(session: Session) -> set[Path]:
    """The directories of this node's open, sent and closed segments; no other segment directory is in use."""
    return {Path(d) for d in session.scalars(select(Segment.dir).where(Segment.node == node_of(session), Segment.state.in_(_OWNING)))}


def awaiting_confirmation(session: Session) -> set[int]:
    """This node's runs whose online segments wait for W&B to confirm them."""
    return set(session.scalars(select(Segment.run_id).where(Segment.node == node_of(session), Segment.state == SegmentState.SENT)))


def node_runs(session: Session) -> dict[int, str]:
    """This node's runs: id → W&B id (the name of each run's folder of segment directories)."""
    return {run_id: wandb_id for run_id, wandb_id in session.execute(select(Run.id, Run.wandb_id).where(Run.node == node_of(session)))}


def runs_of(session: Session, work_dirs: frozenset[Path]) -> set[int]:
    """This node's runs of these work_dirs (`backfill --jobs`: a writer's share)."""
    paths = {str(path) for path in work_dirs}
    rows = session.execute(
        select(Run.id, WorkDir.path).join(WorkDir, WorkDir.id == Run.work_dir_id).where(Run.node == node_of(session))
    )
    return {run_id for run_id, path in rows if path in paths}


def next_of(session: Session, run_id: int) -> NextSegment:
    closed = select(func.max(Segment.last_step)).where(Segment.run_id == run_id, Segment.state == SegmentState.CLOSED)
    seq = session.scalar(select(func.max(Segment.seq)).where(Segment.run_id == run_id)) or 0
    return NextSegment(seq + 1, session.scalar(closed))


def opened(session: Session, run_id: int, seq: int, directory: Path, mode: str) -> int:
    """`wandb.init` of the segment succeeded (DESIGN 10): its row, open. Returns its id."""
    segment = Segment(node=node_of(session), run_id=run_id, seq=seq, dir=str(directory), mode=mode)
    session.add(segment)
    session.flush()
    return segment.id


def verified(session: Session, segment_id: int, content: SegmentContent) -> Closed:
    """The segment was read back and holds `content`: closed, everything in it uploaded, its run's backoff reset."""
    segment = session.get_one(Segment, segment_id)
    segment.state = SegmentState.CLOSED
    segment.closed_at = utcnow()
    segment.rows = len(content.steps)
    segment.first_step = content.steps[0] if content.steps else None
    segment.last_step = content.steps[-1] if content.steps else None
    outbox.settle_uploaded(session, segment_id)
    succeeded(session, segment.run_id)
    run = session.get_one(Run, segment.run_id)
    return Closed(run.wandb_id, run.work_dir.path, segment.seq, segment.mode, segment.rows)


def sent(session: Session, segment_id: int, committed: dict[int, dict[str, object]], failed: list[int]) -> Finished:
    """Online, the segment is finished: W&B committed the `committed` artifacts (outbox id → the version it
    holds), not the `failed` ones (pending again). Its rows wait, sent, for the run's next start; a segment
    with none is closed, and one of committed artifacts only resets its run's backoff."""
    outbox.artifacts_committed(session, committed)
    outbox.release_artifacts(session, failed)
    segment = session.get_one(Segment, segment_id)
    content = outbox.content(session, segment_id)
    segment.state = SegmentState.SENT if content.steps else SegmentState.CLOSED
    segment.closed_at = utcnow()
    if content.artifacts and not (content.steps or failed):
        succeeded(session, segment.run_id)
    return Finished(Path(segment.dir), bool(content.steps))


def settle_sent(session: Session, run_id: int, server_next_step: int) -> Confirmed:
    """Online: the run started again and W&B holds every step below `server_next_step`. Rows below it are
    uploaded; each sent segment is closed when W&B has all of it, else discarded with the rest pending again.
    The run's backoff is reset when W&B had every sent row."""
    sent_segments = session.scalars(select(Segment).where(Segment.run_id == run_id, Segment.state == SegmentState.SENT)).all()
    returned, kept = {}, {}
    for segment in sent_segments:
        rows = session.scalar(select(func.count()).select_from(OutboxRow).where(OutboxRow.segment_id == segment.id)) or 0
        count = outbox.confirm_sent(session, segment.id, server_next_step)
        segment.state = SegmentState.DISCARDED if count else SegmentState.CLOSED
        if count:
            returned[segment.seq] = count
        else:
            kept[segment.seq] = rows
    outbox.mark_below_step(session, run_id, server_next_step)
    if sent_segments and not returned:
        succeeded(session, run_id)
    return Confirmed([Path(segment.dir) for segment in sent_segments], returned, kept)


def discarded(session: Session, segment_id: int) -> Path:
    """The segment will never be verified: discarded, what it held pending again. Returns its directory."""
    segment = session.get_one(Segment, segment_id)
    segment.state = SegmentState.DISCARDED
    segment.closed_at = utcnow()
    outbox.release(session, segment_id)
    return Path(segment.dir)


def succeeded(session: Session, run_id: int) -> None:
    """What the run sent reached W&B: no error, no failures in a row, no backoff."""
    session.execute(update(Run).where(Run.id == run_id).values(last_error=None, failures=0, retry_at=None))


def failed(session: Session, run_id: int, error: str) -> Backoff:
    """One more failure in a row: the run waits twice as long as after the one before (capped), by the database's
    clock (DESIGN 11), with the error shown in `status`."""
    run = session.get_one(Run, run_id)
    run.failures += 1
    wait_s = backoff_s(run.failures)
    run.retry_at = db_clock(session) + wait_s
    run.last_error = error
    return Backoff(run.wandb_id, error, run.failures, wait_s)


def backing_off(session: Session, run_ids: list[int]) -> set[int]:
    """Those of the runs whose next try is not due yet."""
    return set(session.scalars(select(Run.id).where(Run.id.in_(run_ids), Run.retry_at > db_clock(session))))


def retry_now(db: Database, wandb_ids: list[str] | None = None) -> int:
    """Operator command: runs backing off after a failure (all, or the ones named) are tried on the next pass, and
    their offline segments on the next `mmdet-wandb sync`."""
    with db.transaction() as session:
        runs = select(Run.id).where(Run.wandb_id.in_(wandb_ids)) if wandb_ids else select(Run.id)
        waiting = set(session.scalars(select(Run.id).where(Run.id.in_(runs), Run.retry_at.is_not(None))))
        waiting |= set(session.scalars(select(Segment.run_id).where(Segment.run_id.in_(runs), Segment.sync_retry_at.is_not(None))))
        session.execute(update(Run).where(Run.id.in_(waiting)).values(retry_at=None))
        session.execute(update(Segment).where(Segment.run_id.in_(waiting)).values(sync_retry_at=None))
        return len(waiting)


@dataclass(frozen=True)
class ToSync:
    """An offline closed segment not yet confirmed by a W&B server."""

    id: int
    seq: int
    sync_file_dir: Path
    last_step: int | None
    rows: int
    sending: bool  # a replay of it began (maybe cut off): the server may hold a prefix
    retry_at: float | None


def to_sync(session: Session, wandb_ids: list[str] | None = None) -> dict[str, list[ToSync]]:
    """This node's runs with offline closed segments not yet synced: W&B id → those segments in seq order."""
    stmt = (
        select(Run.wandb_id, Segment)
        .join(Run, Run.id == Segment.run_id)
        .where(Segment.node == node_of(session), Segment.mode == "offline", Segment.state == SegmentState.CLOSED,
               Segment.sync_state.is_distinct_from(SyncState.SYNCED))
        .order_by(Run.wandb_id, Segment.seq)
    )
    if wandb_ids:
        stmt = stmt.where(Run.wandb_id.in_(wandb_ids))
    runs: dict[str, list[ToSync]] = {}
    for wandb_id, seg in session.execute(stmt):
        runs.setdefault(wandb_id, []).append(ToSync(seg.id, seg.seq, Path(seg.dir), seg.last_step,
                                                    seg.rows, seg.sync_state is SyncState.SENDING, seg.sync_retry_at))
    return runs


def unknown_runs(session: Session, wandb_ids: list[str]) -> list[str]:
    """Those of the W&B ids that are no run of this node (a typo on `sync`'s command line)."""
    known = set(session.scalars(select(Run.wandb_id).where(Run.node == node_of(session), Run.wandb_id.in_(wandb_ids))))
    return [wandb_id for wandb_id in wandb_ids if wandb_id not in known]


def sync_sending(session: Session, segment_id: int) -> None:
    """A replay of the segment begins: from now on the server may hold any prefix of it."""
    segment = session.get_one(Segment, segment_id)
    segment.sync_state = SyncState.SENDING
    segment.sync_attempts += 1


def confirmed(session: Session, segment_id: int, server_step: int) -> None:
    """The server holds every step up to `server_step`, past the segment's last: synced."""
    session.execute(update(Segment).where(Segment.id == segment_id).values(
        sync_state=SyncState.SYNCED, synced_step=server_step, sync_error=None, sync_retry_at=None))


def sync_failed(session: Session, segment_id: int, error: str) -> float:
    """The server refused or lost the segment: its error, and its next try after a backoff that doubles with each
    attempt (by the database's clock). Returns the wait in seconds."""
    segment = session.get_one(Segment, segment_id)
    wait_s = backoff_s(max(1, segment.sync_attempts))
    segment.sync_error = error
    segment.sync_retry_at = db_clock(session) + wait_s
    return wait_s


def synced_dirs(session: Session) -> set[str]:
    """The directories of this node's offline segments a W&B server confirmed (`mmdet-wandb sync`)."""
    return set(session.scalars(select(Segment.dir).where(Segment.node == node_of(session), Segment.sync_state == SyncState.SYNCED)))


def unsynced_runs(session: Session, run_ids: list[int]) -> set[int]:
    """Those of the runs with an offline segment no server confirmed yet: online, they wait for `sync` (a live
    segment first would move the server's starting step past it, and it would never be sent)."""
    return set(session.scalars(select(Segment.run_id).where(
        Segment.run_id.in_(run_ids), Segment.mode == "offline", Segment.state == SegmentState.CLOSED,
        Segment.sync_state.is_distinct_from(SyncState.SYNCED))))

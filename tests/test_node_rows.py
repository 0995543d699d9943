"""Every uploader counts only its own rows (DESIGN 11), on SQLite and on a real shared PostgreSQL."""
from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from sqlalchemy import func, select

from db import forget, outbox
from db.models import OutboxRow, Problem, Run, Segment, SegmentState, Source, SourceState, SyncState, WorkDir, utcnow
from db.session import Database, sqlite_url


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated, empty state DB per test, on each backend."""
    url = sqlite_url(tmp_path / "state.db") if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    database = Database(url)
    database.upgrade()
    database.dispose()
    yield url


def add_pending_rows(db: Database, node: str, rows: int) -> None:
    """One run of `node` with `rows` rows not logged yet."""
    key = uuid.uuid4().hex
    with db.transaction() as session:
        work_dir = WorkDir(node=node, path=f"/work_dirs/{key}", root="/work_dirs", name=key)
        run = Run(node=node, work_dir=work_dir, wandb_id=key[:16], name=key, group="g", launch="20240101_000000")
        source = Source(node=node, work_dir=work_dir, path=f"/work_dirs/{key}/a.log.json", format="mmdet2", launch="a")
        session.add_all([run, source])
        session.flush()
        session.add_all(
            OutboxRow(run_id=run.id, step=step, source_id=source.id, generation=0, byte_offset=step * 100,
                      line_hash=f"{step:032x}", kind="train", payload_json="{}")
            for step in range(1, rows + 1)
        )


def test_the_pending_row_count_is_of_this_node_only(url: str) -> None:
    a, b = Database(url, node="a"), Database(url, node="b")
    try:
        add_pending_rows(a, "a", 3)
        add_pending_rows(b, "b", 5)
        add_pending_rows(b, "b", 7)
        with a.read() as session:
            assert outbox.pending_row_count(session) == 3
        with b.read() as session:
            assert outbox.pending_row_count(session) == 12
    finally:
        a.dispose()
        b.dispose()


def add_gone_work_dir(db: Database, node: str, path: str, *, pending: bool, synced: bool = True) -> None:
    """A work_dir of `node` whose one log is gone: its rows uploaded, or one still pending; its offline segment
    confirmed by `mmdet-wandb sync`, or not yet."""
    with db.transaction() as session:
        work_dir = WorkDir(node=node, path=path, root="/work_dirs", name=path.rsplit("/", 1)[-1])
        run = Run(node=node, work_dir=work_dir, wandb_id=uuid.uuid4().hex[:16], name="r", group="g", launch="20240101_000000")
        source = Source(node=node, work_dir=work_dir, path=f"{path}/a.log.json", format="mmdet2", launch="a", state=SourceState.GONE)
        session.add_all([run, source])
        session.flush()
        source.run_id = run.id
        session.add(Segment(node=node, run_id=run.id, seq=1, dir=f"/home/wandb/{run.wandb_id}/1", mode="offline", state=SegmentState.CLOSED,
                            sync_state=SyncState.SYNCED if synced else None))
        session.add(OutboxRow(run_id=run.id, step=1, source_id=source.id, generation=0, byte_offset=0, line_hash="0" * 32,
                              kind="train", payload_json="{}", uploaded=not pending))
        session.add(Problem(node=node, work_dir_id=work_dir.id, path=source.path, kind="gone", message="file deleted"))


def work_dirs_of(db: Database) -> list[tuple[str, str]]:
    with db.read() as session:
        return sorted((node, path) for node, path in session.execute(select(WorkDir.node, WorkDir.path)))


def test_forgetting_deleted_work_dirs_touches_this_node_only_and_nothing_pending(url: str) -> None:
    a, b = Database(url, node="a"), Database(url, node="b")
    try:
        add_gone_work_dir(a, "a", "/work_dirs/done", pending=False)
        add_gone_work_dir(a, "a", "/work_dirs/pending", pending=True)
        add_gone_work_dir(a, "a", "/work_dirs/unsynced", pending=False, synced=False)  # `sync` still replays it
        add_gone_work_dir(b, "b", "/work_dirs/done", pending=False)  # the same path on another node
        assert forget.forget_deleted(a, 3600) == [], "gone for less than `after_s`: kept (it may come back)"
        later = utcnow() + dt.timedelta(hours=2)
        assert forget.forget_deleted(a, 3600, now=later) == ["/work_dirs/done"]
        assert work_dirs_of(a) == [("a", "/work_dirs/pending"), ("a", "/work_dirs/unsynced"), ("b", "/work_dirs/done")]
        with a.read() as session:
            assert session.scalar(select(func.count()).select_from(Source).where(Source.node == "a")) == 2
            assert session.scalar(select(func.count()).select_from(Problem).where(Problem.node == "a")) == 2
            assert session.scalar(select(func.count()).select_from(OutboxRow).where(OutboxRow.uploaded.is_(False))) == 1
        assert forget.forget_deleted(b, 3600, now=later) == ["/work_dirs/done"]
        assert work_dirs_of(a) == [("a", "/work_dirs/pending"), ("a", "/work_dirs/unsynced")]
    finally:
        a.dispose()
        b.dispose()

"""Every uploader counts only its own rows (DESIGN 11), on SQLite and on a real shared PostgreSQL."""
from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from db import outbox
from db.models import OutboxRow, Run, Source, WorkDir
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

"""How far each log has been read: the committed offsets of this node's sources (ingest moves them, with the
rows they cover, in one transaction; this module only asks)."""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from sqlalchemy import select

from db.models import Source
from db.session import Database, node_of


class Log(Protocol):
    """A log found under a root (uploader.discovery.FoundLog has these)."""

    @property
    def path(self) -> Path: ...

    @property
    def work_dir(self) -> Path: ...


def backlog(db: Database, logs: Iterable[Log]) -> dict[Path, int]:
    """The work_dirs whose logs have bytes past their committed offset (all of a log never read) → how many."""
    with db.read() as session:
        offsets = dict(session.execute(select(Source.path, Source.offset).where(Source.node == node_of(session))).tuples().all())
    behind: dict[Path, int] = {}
    for found in logs:
        try:
            unread = found.path.stat().st_size - offsets.get(str(found.path), 0)
        except OSError:
            continue
        if unread > 0:
            behind[found.work_dir] = behind.get(found.work_dir, 0) + unread
    return behind

"""Bad input, recorded where and why (file + byte offset), counted instead of duplicated."""
from __future__ import annotations

import logging
import os

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import Problem, utcnow
from db.session import node_of

log = logging.getLogger("mmdet_wandb.problems")


def record_problem(
    session: Session, path: str, kind: str, message: str, *, offset: int = -1, work_dir_id: int | None = None
) -> None:
    """Store (or count again) one problem and log it once, when it is new."""
    path = os.fsencode(path).decode("utf-8", "backslashreplace")  # names that are not UTF-8 stay readable
    existing = session.scalar(
        select(Problem).where(Problem.node == node_of(session), Problem.path == path, Problem.byte_offset == offset, Problem.kind == kind)
    )
    if existing is not None:
        existing.count += 1
        existing.last_seen = utcnow()
        existing.message = message
        return
    where = f"{path}" if offset < 0 else f"{path} at byte {offset}"
    log.warning("%s: %s (%s)", where, message, kind)
    session.add(Problem(node=node_of(session), path=path, byte_offset=offset, kind=kind, message=message, work_dir_id=work_dir_id))

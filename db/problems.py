"""Bad input, recorded where and why (file + byte offset), counted instead of duplicated, and resolved once the
next scan or read of its source no longer finds the cause (a folder made readable again)."""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.orm import Session

from common import events
from db.models import Problem, utcnow
from db.session import node_of

log = logging.getLogger("mmdet_wandb.problems")

SCAN_KINDS = ("unreadable", "undecodable_name", "broken_symlink", "symlink_outside_root")
"""What a scan of a root finds (work_dir_id None): the next scan that does not find one resolves it."""
READ_KINDS = ("unreadable", "reset", "ingest_error", "hook_options")
"""About a log as a whole: the next read of it that goes through resolves them (`hook_options`: a bad value in the
hook entry held the log's run)."""


def readable_path(path: str) -> str:
    """Names that are not UTF-8 stay readable (and storable) as backslash escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def record_problem(
    session: Session, path: str, kind: str, message: str, *, offset: int = -1, work_dir_id: int | None = None
) -> None:
    """Store (or count again) one problem and log it once, when it is new or back after it was resolved."""
    path = readable_path(path)
    existing = session.scalar(
        select(Problem).where(Problem.node == node_of(session), Problem.path == path, Problem.byte_offset == offset, Problem.kind == kind)
    )
    where = f"{path}" if offset < 0 else f"{path} at byte {offset}"
    if existing is not None:
        if existing.resolved_at is not None:
            events.emit(log, events.PROBLEM_RECORDED, "%s: %s (%s, again)", where, message, kind, level=logging.WARNING,
                        path=path, offset=offset, kind=kind)
            existing.resolved_at = None
        existing.count += 1
        existing.last_seen = utcnow()
        existing.message = message
        return
    events.emit(log, events.PROBLEM_RECORDED, "%s: %s (%s)", where, message, kind, level=logging.WARNING,
                path=path, offset=offset, kind=kind)
    session.add(Problem(node=node_of(session), path=path, byte_offset=offset, kind=kind, message=message, work_dir_id=work_dir_id))


def record_scan(session: Session, roots: Iterable[str], found: Iterable[tuple[str, str, str]]) -> None:
    """What one scan of `roots` found, as (path, kind, message); the scan problems under them it no longer finds
    are resolved."""
    still = set()
    for path, kind, message in found:
        record_problem(session, path, kind, message)
        still.add((readable_path(path), kind))
    prefixes = [readable_path(root).rstrip("/") for root in roots]
    open_ones = session.scalars(select(Problem).where(
        Problem.node == node_of(session), Problem.work_dir_id.is_(None), Problem.kind.in_(SCAN_KINDS), Problem.resolved_at.is_(None)
    ))
    for problem in open_ones:
        under = any(problem.path == p or problem.path.startswith(p + "/") for p in prefixes)
        if under and (problem.path, problem.kind) not in still:
            _resolve(problem)


def record_read(
    session: Session, path: str, reset_message: str | None, *, replaced: bool, work_dir_id: int | None
) -> None:
    """One read of a log went through: a reset is a problem unless the file was replaced (an atomic `mv` over
    the log is ordinary: logged as information); the whole-file problems it no longer has are resolved."""
    if reset_message is not None and not replaced:
        record_problem(session, path, "reset", reset_message, work_dir_id=work_dir_id)
    elif reset_message is not None:
        log.info("%s: %s", readable_path(path), reset_message)
    for problem in session.scalars(select(Problem).where(
        Problem.node == node_of(session), Problem.path == readable_path(path), Problem.byte_offset == -1,
        Problem.kind.in_(READ_KINDS), Problem.resolved_at.is_(None),
    )):
        if not (problem.kind == "reset" and reset_message is not None and not replaced):
            _resolve(problem)


def _resolve(problem: Problem) -> None:
    problem.resolved_at = utcnow()
    where = problem.path if problem.byte_offset < 0 else f"{problem.path} at byte {problem.byte_offset}"
    events.emit(log, events.PROBLEM_RESOLVED, "%s: resolved: %s (%s)", where, problem.message, problem.kind,
                path=problem.path, offset=problem.byte_offset, kind=problem.kind)

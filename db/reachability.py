"""Online: whether each node's uploader reaches W&B, as its circuit last found (DESIGN 7: contained failures)."""
from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import WandbReachability
from db.session import node_of


def record(session: Session, base_url: str, error: str | None, since: float | None, failures: int, retry_at: float | None) -> None:
    """This node's circuit: `error` None when W&B answers."""
    row = session.get(WandbReachability, node_of(session))
    if row is None:
        row = WandbReachability(node=node_of(session))
        session.add(row)
    row.base_url, row.error, row.since, row.failures, row.retry_at = base_url, error, since, failures, retry_at


def unreachable(session: Session, node: str | None = None) -> list[dict[str, Any]]:
    """The nodes (all, or one) whose uploader does not reach W&B now."""
    query = select(WandbReachability).where(WandbReachability.error.is_not(None)).order_by(WandbReachability.node)
    if node is not None:
        query = query.where(WandbReachability.node == node)
    return [
        {"node": r.node, "base_url": r.base_url, "error": r.error, "since": r.since, "failures": r.failures, "retry_at": r.retry_at}
        for r in session.scalars(query)
    ]

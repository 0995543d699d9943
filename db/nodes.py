"""Which uploader owns a row (DESIGN 11): every uploader-owned row carries the node it belongs to, and an
uploader reads and changes only its own node's rows, so that many uploaders can share one PostgreSQL."""
from __future__ import annotations

import logging
import socket

from sqlalchemy import update

from db.models import Checkpoint, Problem, Run, Segment, Source, WorkDir
from db.session import Database

log = logging.getLogger("mmdet_wandb.nodes")
OWNED = (WorkDir, Source, Run, Segment, Checkpoint, Problem)


def default_node() -> str:
    """The host name: give containers a stable one (`--node`, MMDET_WANDB_NODE; compose sets it)."""
    return socket.gethostname()


def adopt_rows_without_node(db: Database) -> int:
    """Rows written before nodes existed (node '') become this uploader's: the first one started after the
    upgrade. Returns how many rows were adopted."""
    adopted = 0
    with db.transaction() as session:
        for table in OWNED:
            adopted += session.execute(update(table).where(table.node == "").values(node=db.node)).rowcount
    if adopted:
        log.info("node %s adopted %d rows written before nodes existed", db.node, adopted)
    return adopted

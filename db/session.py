"""Connections, transactions and migrations for the state DB (SQLite by default, PostgreSQL for many nodes).

SQLite specifics live here and only here: WAL, a busy timeout, and BEGIN IMMEDIATE for every write
transaction so that two writers queue up instead of failing at commit; reads (`read()`) begin deferred, so a
reader never waits for, or holds up, a writer.
"""
from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from sqlalchemy import Column, Connection, Engine, MetaData, PrimaryKeyConstraint, String, Table, create_engine, event, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS = Path(__file__).with_name("migrations")
SCHEMA_HEAD = "0015"  # the newest migration (a test keeps it equal to alembic's head): read-only commands import no alembic
MIGRATION_LOCK = 0x6D6D6477  # PostgreSQL advisory lock key held while migrating ("mmdw")
RECLAIM_SHARE = 0.25  # SQLite: the file is shrunk once this much of it is free pages ...
RECLAIM_MIN_PAGES = 64  # ... and at least this many (256 KiB at 4 KiB pages)
WAL_LIMIT_BYTES = 4 << 20  # SQLite: the WAL is cut to this at each reset (journal_size_limit) ...
WAL_CHECKPOINT_BYTES = 256 << 10  # ... and checkpointed and cut to nothing after a burst that left more than this
BUSY_TIMEOUT_MS = 30000  # a writer waits this long for another
CHECKPOINT_WAIT_MS = 200  # how long a checkpoint waits for readers: it is tried again after the next burst
# PostgreSQL: libpq's connection parameters, so that a server whose network vanished (a pod stopped, a node
# cut off) fails a call in seconds instead of the kernel's ~2 min to connect and ~15 min to give up on unanswered
# data; the loop then logs it and tries again, and SIGTERM is not held up. A URL that sets one keeps its value.
PG_CONNECT_ARGS = {
    "connect_timeout": 10,  # seconds
    "tcp_user_timeout": 20000,  # ms data may stay unacknowledged
    "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3,  # an idle connection
}


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


class Database:
    """The state DB as one process sees it. `node`: the uploader this process is (DESIGN 11); every session
    carries it (`node_of`), so that uploader-owned rows are created and looked up for this node only."""

    def __init__(self, url: str, node: str = "") -> None:
        self.url = url
        self.node = node
        self.engine = _make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False, info={"node": node})
        self._reads = sessionmaker(self.engine.execution_options(read_only=True), expire_on_commit=False, info={"node": node})
        self._wal_left = False  # a reader kept `reclaim_space` from cutting the WAL: tried again at a later pass

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    def upgrade(self) -> bool:
        """Bring the schema to the newest migration; safe to call on every start of a service. On SQLite the
        foreign keys are off meanwhile: batch migrations rebuild tables that other rows reference. Alembic is
        imported only when there is a migration to run (its import costs more than the rest of a start).
        Returns whether the DB was created (it holds no row yet)."""
        from db.models import Base

        created = False
        with self.engine.connect() as connection:
            driver = connection.connection.driver_connection if self.is_sqlite else None
            if driver is not None:
                driver.execute("PRAGMA foreign_keys=OFF")  # outside any transaction, or it has no effect
                driver.execute("PRAGMA auto_vacuum=INCREMENTAL")  # takes effect on a new file only (see below)
            try:
                with connection.begin():
                    if not self.is_sqlite:  # services starting together on one PostgreSQL migrate one after the other
                        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
                    if not inspect(connection).get_table_names():  # a new DB: the schema at once, as the migrations
                        Base.metadata.create_all(connection)  # build it (a test holds them equal), at the head
                        _VERSION_TABLE.create(connection)
                        connection.execute(_VERSION_TABLE.insert().values(version_num=SCHEMA_HEAD))
                        created = True
                    elif _revision(connection) != SCHEMA_HEAD:
                        from alembic import command

                        cfg = _alembic_config()
                        cfg.attributes["connection"] = connection
                        command.upgrade(cfg, "head")
                if driver is not None and driver.execute("PRAGMA auto_vacuum").fetchone()[0] == 0:
                    driver.execute("VACUUM")  # a file from before spans: once, so that it can shrink from now on
            finally:
                if driver is not None:
                    driver.execute("PRAGMA foreign_keys=ON")
        return created

    def revisions(self) -> tuple[str | None, str]:
        """(the schema's revision, the newest one this code knows): read-only commands check, never migrate."""
        with self.engine.connect() as connection:
            return _revision(connection), SCHEMA_HEAD

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Session]:
        """One short write transaction: commits on success, rolls back on any exception."""
        with self._sessions.begin() as session:
            yield session

    @contextlib.contextmanager
    def read(self) -> Iterator[Session]:
        """A read-only transaction (deferred on SQLite: no write lock); rolled back at the end."""
        with self._reads() as session:
            yield session
            session.rollback()

    def reclaim_space(self) -> None:
        """SQLite, after a burst of writes (a segment settled): once a good part of the file is free pages (rows
        folded into spans), give them back to the filesystem, keeping a few for the next rows to reuse, in a
        transaction of its own, stepped to the end (`executescript`: the pragma frees one page per step); and a
        WAL the burst left is checkpointed and truncated, so that what the file gave back leaves the disk at once
        and a reader that kept the auto-checkpoints from resetting the WAL does not let it grow (DESIGN 13).
        PostgreSQL's autovacuum does this by itself."""
        if not self.is_sqlite:
            return
        raw = self.engine.raw_connection()  # no BEGIN of ours: the script runs in a transaction of its own
        try:
            driver = raw.driver_connection
            free = driver.execute("PRAGMA freelist_count").fetchone()[0]
            if free > max(RECLAIM_MIN_PAGES, RECLAIM_SHARE * driver.execute("PRAGMA page_count").fetchone()[0]):
                driver.executescript(f"PRAGMA incremental_vacuum({free - RECLAIM_MIN_PAGES // 4})")
            self._wal_left = _wal_bytes(driver) > WAL_CHECKPOINT_BYTES and not _truncate_wal(driver)
        finally:
            raw.close()

    def reclaim_left_over(self) -> None:
        """`reclaim_space` again where a reader made its checkpoint partial: the last burst before a quiet spell
        (a forgotten wave of work_dirs) must not leave its WAL on disk until the next burst."""
        if self._wal_left:
            self.reclaim_space()

    def change_probe(self) -> Callable[[], int] | None:
        """SQLite: a function whose value changes once any other connection committed (`PRAGMA data_version` on a
        connection of its own that never writes), so that a reader may keep what it read until then: a pragma,
        not the queries. None on PostgreSQL, where other nodes write and no such figure is cheap."""
        if not self.is_sqlite:
            return None
        connection = sqlite3.connect(self.engine.url.database or "", check_same_thread=False, isolation_level=None)
        lock = threading.Lock()

        def version() -> int:
            with lock:
                return connection.execute("PRAGMA data_version").fetchone()[0]

        return version

    def dispose(self) -> None:
        self.engine.dispose()


def node_of(session: Session) -> str:
    return session.info["node"]


def _make_engine(url: str) -> Engine:
    if not url.startswith("sqlite"):
        query = make_url(url).query
        return create_engine(url, pool_pre_ping=True, connect_args={k: v for k, v in PG_CONNECT_ARGS.items() if k not in query})
    engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves (below)
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        cursor.execute(f"PRAGMA journal_size_limit={WAL_LIMIT_BYTES}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection) -> None:  # type: ignore[no-untyped-def]
        connection.exec_driver_sql("BEGIN" if connection.get_execution_options().get("read_only") else "BEGIN IMMEDIATE")

    return engine


_VERSION_TABLE = Table(  # alembic's own (alembic.runtime.migration), for stamping a new DB without alembic
    "alembic_version", MetaData(), Column("version_num", String(32), nullable=False),
    PrimaryKeyConstraint("version_num", name="alembic_version_pkc"),
)


def _wal_bytes(driver) -> int:  # type: ignore[no-untyped-def]
    path = next((row[2] for row in driver.execute("PRAGMA database_list") if row[1] == "main"), "")
    try:
        return os.stat(f"{path}-wal").st_size if path else 0
    except FileNotFoundError:
        return 0


def _truncate_wal(driver) -> bool:  # type: ignore[no-untyped-def]
    """Copy the WAL into the DB and cut it to nothing; a reader still on it makes this a partial checkpoint
    (no error, False) after a short wait, not the writer's usual 30 s."""
    driver.execute(f"PRAGMA busy_timeout={CHECKPOINT_WAIT_MS}")
    try:
        busy, _, _ = driver.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        return busy == 0
    finally:
        driver.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")


def _revision(connection: Connection) -> str | None:
    if not connection.dialect.has_table(connection, "alembic_version"):
        return None
    return connection.execute(text("SELECT version_num FROM alembic_version")).scalar()


def _alembic_config():  # type: ignore[no-untyped-def]
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg

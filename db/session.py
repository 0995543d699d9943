"""Connections, transactions and migrations for the state DB (SQLite by default, PostgreSQL for many nodes).

SQLite specifics live here and only here: WAL, a busy timeout, and BEGIN IMMEDIATE for every write
transaction so that two writers queue up instead of failing at commit; reads (`read()`) begin deferred, so a
reader never waits for, or holds up, a writer.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS = Path(__file__).with_name("migrations")
MIGRATION_LOCK = 0x6D6D6477  # PostgreSQL advisory lock key held while migrating ("mmdw")


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

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    def upgrade(self) -> None:
        """Bring the schema to the newest migration; safe to call on every start of a service. On SQLite the
        foreign keys are off meanwhile: batch migrations rebuild tables that other rows reference."""
        cfg = _alembic_config()
        with self.engine.connect() as connection:
            driver = connection.connection.driver_connection if self.is_sqlite else None
            if driver is not None:
                driver.execute("PRAGMA foreign_keys=OFF")  # outside any transaction, or it has no effect
            try:
                with connection.begin():
                    if not self.is_sqlite:  # services starting together on one PostgreSQL migrate one after the other
                        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
                    cfg.attributes["connection"] = connection
                    command.upgrade(cfg, "head")
            finally:
                if driver is not None:
                    driver.execute("PRAGMA foreign_keys=ON")

    def revisions(self) -> tuple[str | None, str]:
        """(the schema's revision, the newest one this code knows): read-only commands check, never migrate."""
        head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
        with self.engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision(), head  # type: ignore[return-value]

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

    def dispose(self) -> None:
        self.engine.dispose()


def node_of(session: Session) -> str:
    return session.info["node"]


def _make_engine(url: str) -> Engine:
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True)
    engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves (below)
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection) -> None:  # type: ignore[no-untyped-def]
        connection.exec_driver_sql("BEGIN" if connection.get_execution_options().get("read_only") else "BEGIN IMMEDIATE")

    return engine


def _alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg

"""A throwaway PostgreSQL server for tests that must also pass on the multi-node backend.

- the session fixture `postgres_server`: initdb's a cluster in a temp dir and starts it listening on a unix
  socket in that dir only (no TCP port, so parallel sessions cannot collide), fsync off; stops and deletes
  it at the end. The binaries are looked up on PATH, then in Debian's /usr/lib/postgresql/<major>/bin (the
  `postgresql` package does not put them on PATH). Missing binaries skip the test with the reason. As root
  (initdb refuses root) the server runs as the `postgres` user, which the package creates.
- the fixture `postgres_url`: a fresh, empty database per test (dropped afterwards), as a SQLAlchemy URL.
"""
from __future__ import annotations

import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

SUPERUSER = "postgres"
PORT = 5432  # only names the socket file in our private socket dir


def _bin_dir() -> Path | None:
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).resolve().parent
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    return debian[-1].parent if debian else None


class PostgresServer:
    def __init__(self, socket_dir: Path) -> None:
        self.socket_dir = socket_dir
        self._names = itertools.count()

    def _admin(self):  # type: ignore[no-untyped-def]
        import psycopg

        return psycopg.connect(host=str(self.socket_dir), port=PORT, user=SUPERUSER, dbname="postgres", autocommit=True)

    def create_database(self) -> str:
        name = f"test_{next(self._names)}"
        with self._admin() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        with self._admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def url(self, name: str) -> str:
        return f"postgresql+psycopg://{SUPERUSER}@/{name}?host={self.socket_dir}&port={PORT}"


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    pytest.importorskip("psycopg", reason="psycopg is not installed (the `postgres` extra)")
    bin_dir = _bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries not found (initdb on PATH or /usr/lib/postgresql/*/bin): "
                    "install the `postgresql` package to run the PostgreSQL variants")
    as_user: list[str] = []
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam(SUPERUSER)
        except KeyError:
            pytest.skip(f"running as root and there is no `{SUPERUSER}` user to run the PostgreSQL server as")
        as_user = ["runuser", "-u", SUPERUSER, "--"]
    base = Path(tempfile.mkdtemp(prefix="pg-"))  # short: a socket path must stay under ~100 bytes
    if as_user:
        os.chown(base, owner.pw_uid, owner.pw_gid)
    data, log = base / "data", base / "server.log"

    def pg(tool: str, *args: str) -> None:
        proc = subprocess.run([*as_user, str(bin_dir / tool), *args], cwd=base, capture_output=True, text=True)
        if proc.returncode != 0:
            server_log = log.read_text() if log.exists() else ""
            raise RuntimeError(f"{tool} {' '.join(args)} exited {proc.returncode}\n{proc.stdout}{proc.stderr}{server_log}")

    pg("initdb", "-D", str(data), "-U", SUPERUSER, "-A", "trust", "-E", "UTF8", "--no-locale", "--no-sync")
    with open(data / "postgresql.conf", "a") as conf:
        conf.write(f"listen_addresses = ''\nunix_socket_directories = '{base}'\nport = {PORT}\n"
                   "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n")
    pg("pg_ctl", "-D", str(data), "-l", str(log), "-w", "start")
    try:
        yield PostgresServer(base)
    finally:
        pg("pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    name = postgres_server.create_database()
    yield postgres_server.url(name)
    postgres_server.drop_database(name)

"""The state DB's network vanishing under a running `watch` (a PostgreSQL pod stopped, a node cut off): packets
are dropped, not refused, so without libpq's timeouts (db/session.py PG_CONNECT_ARGS) a call waits for the
kernel's ~15 min. Real processes in a network namespace of their own: a TCP relay to the test's PostgreSQL
(its Unix socket reaches across namespaces), `watch` connecting through it, and an iptables rule of that
namespace alone that drops the relay's packets."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import REPO, cli, service_env, wait_until
from tests.postgres import PORT, SUPERUSER

LOG = "masati91__ELTD/work_dirs/eltd_r101_fpn_1x_coco/20210427_101754.log.json"
RELAY_PORT = 15432
RELAY = textwrap.dedent("""
    import asyncio, sys
    async def pipe(reader, writer):
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()
    async def serve(client_reader, client_writer):
        server_reader, server_writer = await asyncio.open_unix_connection(sys.argv[2])
        await asyncio.gather(pipe(client_reader, server_writer), pipe(server_reader, client_writer), return_exceptions=True)
    async def main():
        server = await asyncio.start_server(serve, "127.0.0.1", int(sys.argv[1]))
        print("listening", flush=True)
        await server.serve_forever()
    asyncio.run(main())
""")


@pytest.fixture
def netns() -> str:
    if os.geteuid() != 0 or not (shutil.which("ip") and shutil.which("iptables")):
        pytest.skip("needs root, `ip` and `iptables` (a network namespace whose packets are dropped)")
    name = f"mmdw-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def uploaded(home: Path, db_url: str) -> int:
    state = cli(home, "status", "--json", check=False, MMDET_WANDB_DB_URL=db_url)
    if state.returncode != 0:
        return -1
    return sum(r["rows_uploaded"] for w in json.loads(state.stdout)["work_dirs"] for r in w["runs"])


def test_sigterm_and_restart_when_the_db_network_vanishes(tmp_path, netns, postgres_server, real_logs):
    name = postgres_server.create_database()
    socket = postgres_server.socket_dir / f".s.PGSQL.{PORT}"
    tcp_url = f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{RELAY_PORT}/{name}"
    local_url = postgres_server.url(name)
    source = (real_logs / LOG).read_bytes().splitlines(keepends=True)
    root, home = tmp_path / "work_dirs", tmp_path / "home"
    (root / "run").mkdir(parents=True)
    log = root / "run" / Path(LOG).name
    log.write_bytes(b"".join(source[:-2]))
    in_ns = ["ip", "netns", "exec", netns]
    relay = subprocess.Popen([*in_ns, sys.executable, "-c", RELAY, str(RELAY_PORT), str(socket)], stdout=subprocess.PIPE, text=True)
    procs = [relay]

    def watch() -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [*in_ns, sys.executable, "-m", "mmdet_wandb.cli", "watch", str(root), "--poll-interval", "0.2",
             "--scan-interval", "1", "--segment-idle", "1"],
            env=service_env(home, MMDET_WANDB_DB_URL=tcp_url), cwd=REPO, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True)
        procs.append(proc)
        return proc


    def iptables(action: str) -> None:  # both directions of the relay's connections
        for port in ("--dport", "--sport"):
            subprocess.run([*in_ns, "iptables", action, "INPUT", "-p", "tcp", port, str(RELAY_PORT), "-j", "DROP"], check=True)

    try:
        assert relay.stdout.readline().strip() == "listening"
        first = watch()
        wait_until(lambda: uploaded(home, local_url) == len(source) - 3, 120, "the log's rows uploaded", first)  # no header row
        iptables("-A")
        with open(log, "ab") as out:  # work for the loop, whose DB calls now go unanswered
            out.write(source[-2])
        started = time.monotonic()
        first.send_signal(signal.SIGTERM)
        try:
            output, _ = first.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail("watch did not end within 90 s of SIGTERM with its DB's packets dropped")
        assert time.monotonic() - started < 90
        iptables("-D")
        second = watch()
        wait_until(lambda: uploaded(home, local_url) == len(source) - 2, 120, "the appended row uploaded", second)
        second.send_signal(signal.SIGTERM)
        second.communicate(timeout=120)
        assert second.returncode == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
        postgres_server.drop_database(name)

"""A loopback stand-in of W&B's API, for the tests only.

This is NOT W&B. It is a small HTTP server on 127.0.0.1 that answers the requests the real wandb 0.31
client (the wandb-core service it spawns) makes in online mode, closely enough for that client to init,
resume, log history, set config and summary, upload run files, log artifacts and finish. The tests verify
the product's online mode against this stand-in, not against W&B itself: what W&B's real servers do beyond
what is modelled here (quotas, eventual consistency, the real history store, ...) is not tested.

What it serves (the GraphQL documents are the ones embedded in the wandb-core 0.31 binary):

- `POST /graphql`: Viewer, ServerFeaturesQuery, OrgFeatureFlags, FetchOrgEntityFromEntity,
  XXHashDigestsEnabled, FetchArtifactDigestAlgorithm, UpsertBucket, RunResumeStatus, RunState, StopRun,
  QueryRunInfo, CreateRunFiles, MarkRunFilesUploaded, CreateArtifact, CreateArtifactManifest,
  UpdateArtifactManifest, CreateArtifactFiles, CompleteMultipartUploadArtifact, CommitArtifact,
  UseArtifact, UpdateArtifact, LinkArtifact, ClientIDMapping, ArtifactManifest, ArtifactType (asked by the
  Python side, through wandb-core, before it logs an artifact) and ArtifactByID (`Artifact.wait()` once the
  artifact is saved). Any other operation is
  answered with a GraphQL error and listed in `unknown_operations`.
- `POST /files/<entity>/<project>/<run>/file_stream`: history, events, summary and console lines with
  their offsets, `uploaded`, `complete`/`exitcode` (gzip bodies accepted).
- `PUT /storage/...`: the upload URLs handed out above (run files, artifact files, artifact manifests);
  `GET` of the same URLs returns the bytes.
- Anything sent to it as an HTTP proxy (an absolute-URI request or `CONNECT`) is refused with 403 and
  recorded in `outbound`: `env()` points `HTTP(S)_PROXY` here (loopback stays direct through `NO_PROXY`),
  so a client that tries to reach the internet is caught instead of leaving the machine.

Recording: `runs` (`StandinRun`: config, summary, history rows by file_stream offset, files, ...),
`artifacts` (`StandinArtifact`: state, digest, aliases, manifest entries, uploaded files) and `requests`
(one `RequestRecord` per request), all behind one lock.

Fault injection (`fail`, `slow`, `drop`, `clear_faults`): a rule matches a GraphQL operation name
(`"UpsertBucket"`), a route (`"graphql"`, `"file_stream"`, `"upload"`, `"upload_run_file"`,
`"upload_artifact_file"`, `"upload_manifest"`, `"download"`) or `"*"`; it can delay the answer, answer an
HTTP status (400, 429 with Retry-After, 500, ...), answer a GraphQL error with status 200, or close the
connection without an answer; `apply=True` lets the request take effect first (the client never learns it
did: a retry then sends it again), and `times` limits how often it fires. `stop()` closes the port
(connection refused) and drops the connections in flight; `start()` opens the same port again, with the
recorded state kept.
"""
from __future__ import annotations

import base64
import gzip
import hashlib
import itertools
import json
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import pytest

API_KEY = "standin" + "0" * 33  # 40 characters, like a W&B API key
DEFAULT_ENTITY = "standin-entity"
DEFAULT_PROJECT = "uncategorized"
USERNAME = "standin-user"

HISTORY_FILE = "wandb-history.jsonl"
EVENTS_FILE = "wandb-events.jsonl"
SUMMARY_FILE = "wandb-summary.json"
OUTPUT_FILE = "output.log"

_OPERATION = re.compile(r"\b(query|mutation)\s+([A-Za-z_][A-Za-z0-9_]*)")


def _gid(kind: str, *parts: object) -> str:
    """A GraphQL ID the way W&B makes them: base64 of "<Type>:<key>" (wandb-core decodes some of them)."""
    return base64.b64encode(":".join([kind, *map(str, parts)]).encode()).decode()


def b64_md5(data: bytes) -> str:
    """The digest W&B keeps for a file of an artifact: base64 of its MD5."""
    return base64.b64encode(hashlib.md5(data).digest()).decode()


@dataclass
class HistoryWrite:
    offset: int
    line: str
    row: dict[str, Any]
    request: int  # index of the file_stream request in `requests`


@dataclass
class StandinRun:
    storage_id: str
    entity: str
    project: str
    name: str  # the run id of wandb.init(id=...)
    display_name: str | None = None
    group: str | None = None
    job_type: str | None = None
    tags: list[str] = field(default_factory=list)
    notes: str | None = None
    state: str = "running"
    config_raw: dict[str, Any] = field(default_factory=dict)  # {"key": {"value": ..., "desc": ...}, "_wandb": {...}}
    summary: dict[str, Any] = field(default_factory=dict)
    history_writes: list[HistoryWrite] = field(default_factory=list)  # every history line received, in arrival order
    history_by_offset: dict[int, HistoryWrite] = field(default_factory=dict)  # the file as W&B keeps it (a re-sent offset overwrites)
    events: dict[int, str] = field(default_factory=dict)
    console: dict[int, str] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)
    uploaded: list[str] = field(default_factory=list)  # names the client reported as uploaded (file_stream `uploaded`)
    used_artifacts: list[str] = field(default_factory=list)
    upserts: int = 0
    resume_queries: int = 0
    file_stream_requests: int = 0
    complete: bool = False
    exitcode: int | None = None
    stop_requested: bool = False

    @property
    def config(self) -> dict[str, Any]:
        """The run's config the way the W&B UI shows it: values only, without wandb's own `_wandb` key."""
        return {k: v.get("value") if isinstance(v, dict) else v for k, v in self.config_raw.items() if k != "_wandb"}

    @property
    def history(self) -> list[dict[str, Any]]:
        """The rows of wandb-history.jsonl, ordered by offset."""
        return [self.history_by_offset[o].row for o in sorted(self.history_by_offset)]

    @property
    def history_offsets(self) -> list[int]:
        return sorted(self.history_by_offset)

    @property
    def history_line_count(self) -> int:
        return max(self.history_by_offset, default=-1) + 1

    @property
    def resent_history(self) -> list[HistoryWrite]:
        """History lines that arrived for an offset that already had one (a retried file_stream request)."""
        seen: set[int] = set()
        again = []
        for write in self.history_writes:
            if write.offset in seen:
                again.append(write)
            seen.add(write.offset)
        return again

    @property
    def steps(self) -> list[int]:
        return [row.get("_step") for row in self.history]


@dataclass
class StandinArtifact:
    id: str
    entity: str
    project: str
    name: str  # the collection (sequence) name, e.g. "model-abc"
    type: str
    digest: str
    client_id: str
    sequence_client_id: str
    version_index: int
    run: str | None  # the run that logged it (its name)
    state: str = "PENDING"
    requested_aliases: list[str] = field(default_factory=list)
    aliases: list[str] = field(default_factory=list)
    description: str | None = None
    metadata: dict[str, Any] | None = None
    history_step: int | None = None
    manifest_id: str | None = None
    manifest: dict[str, Any] | None = None  # the uploaded wandb_manifest.json
    declared_files: dict[str, str] = field(default_factory=dict)  # name → md5 (base64) from CreateArtifactFiles
    files: dict[str, bytes] = field(default_factory=dict)  # name → uploaded bytes
    links: list[dict[str, Any]] = field(default_factory=list)

    @property
    def entries(self) -> dict[str, dict[str, Any]]:
        """The manifest entries (path → {digest, size, ref, ...}), once the manifest is uploaded."""
        return dict((self.manifest or {}).get("contents") or {})

    @property
    def qualified_name(self) -> str:
        return f"{self.name}:v{self.version_index}"


@dataclass
class RequestRecord:
    index: int
    at: float
    method: str
    path: str
    route: str
    operation: str | None  # GraphQL operation name
    status: int | None = None  # None: no answer (connection dropped)
    fault: str | None = None
    variables: dict[str, Any] | None = None  # GraphQL variables; for file_stream, `_file_stream_outline`


@dataclass
class Fault:
    target: str  # GraphQL operation name, route, or "*"
    status: int | None = None  # HTTP status to answer
    delay: float = 0.0  # seconds before answering (or failing)
    drop: bool = False  # close the connection without an answer
    graphql_error: str | None = None  # answer 200 with this GraphQL error
    retry_after: float | None = None  # Retry-After header of the answer
    apply: bool = False  # let the request take effect before failing it
    times: int | None = None  # how many more requests it hits; None: every one
    when: Callable[[RequestRecord], bool] | None = None  # an extra condition
    hits: int = 0

    def describe(self) -> str:
        what = "drop" if self.drop else "graphql-error" if self.graphql_error else str(self.status) if self.status else "ok"
        return f"{self.target}:{what}{f'+{self.delay}s' if self.delay else ''}{'(applied)' if self.apply else ''}"


def _file_stream_outline(body: bytes) -> dict[str, Any]:
    """What a file_stream request carried, for the request log and for `Fault.when`:
    {"files": {name: {"offset": N, "lines": n}}, "complete": ..., "exitcode": ..., "uploaded": [...]}."""
    try:
        request = json.loads(body or b"{}")
    except ValueError:
        return {"files": {}}
    return {
        "files": {name: {"offset": c.get("offset"), "lines": len(c.get("content") or [])}
                  for name, c in (request.get("files") or {}).items()},
        **{k: request[k] for k in ("complete", "exitcode", "uploaded", "preempting") if k in request},
    }


class _Refused(Exception):
    """An answer decided while handling (e.g. a 404)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], standin: WandbStandin) -> None:
        self.standin = standin
        self.stopping = threading.Event()
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.connections_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hangs up (or a connection `stop()` dropped) is not an error of the stand-in."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)

    def drop_connections(self) -> None:
        with self.connections_lock:
            conns = list(self.connections)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        pass

    def do_GET(self) -> None:
        self.server.standin._handle(self)

    def do_POST(self) -> None:
        self.server.standin._handle(self)

    def do_PUT(self) -> None:
        self.server.standin._handle(self)

    def do_CONNECT(self) -> None:
        self.server.standin._handle(self)

    def do_HEAD(self) -> None:
        self.server.standin._handle(self)


class WandbStandin:
    """The stand-in server plus its recorded state and fault controls (see the module docstring)."""

    def __init__(self, port: int = 0, *, api_key: str = API_KEY, entity: str = DEFAULT_ENTITY) -> None:
        self.api_key = api_key
        self.entity = entity
        self.port = port
        self.lock = threading.RLock()
        self.runs: dict[tuple[str, str, str], StandinRun] = {}
        self.artifacts: dict[str, StandinArtifact] = {}
        self.requests: list[RequestRecord] = []
        self.unknown_operations: list[str] = []
        self.outbound: list[str] = []  # proxy requests: attempts to reach something other than the stand-in
        self.unauthorized: list[str] = []
        self.faults: list[Fault] = []
        self._manifests: dict[str, str] = {}  # manifest id → artifact id
        self._ids = itertools.count(1)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle -------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> WandbStandin:
        """Listen (again) on 127.0.0.1; on the same port as before once one was picked."""
        if self._server is not None:
            return self
        deadline = time.monotonic() + 10
        while True:
            try:
                server = _Server(("127.0.0.1", self.port), self)
                break
            except OSError:
                if not self.port or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"wandb-standin-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Close the port (new connections are refused) and drop every connection in flight."""
        server, self._server = self._server, None
        if server is None:
            return
        server.stopping.set()
        server.shutdown()
        server.server_close()
        server.drop_connections()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def restart(self, down_for: float = 0.0) -> None:
        self.stop()
        if down_for:
            time.sleep(down_for)
        self.start()

    def __enter__(self) -> WandbStandin:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def env(self, home: Path | str | None = None, *, fast_retries: bool = False) -> dict[str, str]:
        """The environment of a process that must talk to the stand-in, and to nothing else.

        `home`: where wandb keeps its config, cache and data dirs (else they are left to the caller).
        `fast_retries`: wandb-core retries GraphQL, file_stream and uploads after 0.2-1 s instead of its
        default 2-60 s (for fault-injection tests; the number of retries is unchanged)."""
        env = {
            "WANDB_BASE_URL": self.url,
            "WANDB_API_KEY": self.api_key,
            "WANDB_MODE": "online",
            "WANDB_ERROR_REPORTING": "false",  # no Sentry
            "WANDB_DISABLE_GIT": "true",
            "WANDB_DISABLE_CODE": "true",
            "WANDB_SILENT": "true",
            "WANDB_CONSOLE": "off",
            "WANDB__DISABLE_STATS": "true",  # no system metrics
            "WANDB__DISABLE_META": "true",  # no system metadata
            "WANDB__DISABLE_MACHINE_INFO": "true",  # no cloud metadata endpoints
            "WANDB__SAVE_REQUIREMENTS": "false",
            # Whatever still tries to go out goes to the stand-in as a proxy request, refused and recorded.
            "HTTP_PROXY": self.url, "HTTPS_PROXY": self.url, "http_proxy": self.url, "https_proxy": self.url,
            "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
        }
        if fast_retries:
            for kind in ("GRAPHQL", "FILE_STREAM", "FILE_TRANSFER"):
                env[f"WANDB__{kind}_RETRY_WAIT_MIN_SECONDS"] = "0.2"
                env[f"WANDB__{kind}_RETRY_WAIT_MAX_SECONDS"] = "1"
        if home is not None:
            home = Path(home)
            env.update(WANDB_CONFIG_DIR=str(home / "wandb-config"), WANDB_CACHE_DIR=str(home / "wandb-cache"),
                       WANDB_DATA_DIR=str(home / "wandb-data"))
        return env

    # ---- fault injection -------------------------------------------------------------------------------

    def fail(self, target: str, status: int = 500, *, times: int | None = None, delay: float = 0.0,
             apply: bool = False, retry_after: float | None = None,
             when: Callable[[RequestRecord], bool] | None = None) -> Fault:
        """Answer `status` to requests of `target` (operation name, route or "*")."""
        return self._add(Fault(target, status=status, times=times, delay=delay, apply=apply,
                               retry_after=retry_after if retry_after is not None else (1.0 if status == 429 else None),
                               when=when))

    def graphql_error(self, target: str, message: str = "stand-in: injected error", *, times: int | None = None,
                      apply: bool = False, when: Callable[[RequestRecord], bool] | None = None) -> Fault:
        """Answer 200 with a GraphQL `errors` list (what W&B does for many refusals)."""
        return self._add(Fault(target, graphql_error=message, times=times, apply=apply, when=when))

    def slow(self, target: str, delay: float, *, times: int | None = None,
             when: Callable[[RequestRecord], bool] | None = None) -> Fault:
        """Answer normally, `delay` seconds late (the request takes effect after the delay; a `stop()`
        meanwhile drops it unanswered and without effect)."""
        return self._add(Fault(target, delay=delay, times=times, when=when))

    def drop(self, target: str, *, times: int | None = None, delay: float = 0.0, apply: bool = False,
             when: Callable[[RequestRecord], bool] | None = None) -> Fault:
        """Close the connection without an answer."""
        return self._add(Fault(target, drop=True, times=times, delay=delay, apply=apply, when=when))

    def clear_faults(self) -> None:
        with self.lock:
            self.faults.clear()

    def _add(self, fault: Fault) -> Fault:
        with self.lock:
            self.faults.append(fault)
        return fault

    def _fault_for(self, record: RequestRecord) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.target not in ("*", record.route, record.operation) and not (
                        fault.target == "upload" and record.route.startswith("upload_")):
                    continue
                if fault.times is not None and fault.times <= 0:
                    continue
                if fault.when is not None and not fault.when(record):
                    continue
                if fault.times is not None:
                    fault.times -= 1
                fault.hits += 1
                return fault
        return None

    # ---- queries for the tests -------------------------------------------------------------------------

    def run(self, name: str, project: str | None = None, entity: str | None = None) -> StandinRun:
        """The run with this id (the only one of that id unless project/entity narrow it down)."""
        with self.lock:
            found = [r for (e, p, n), r in self.runs.items()
                     if n == name and (project is None or p == project) and (entity is None or e == entity)]
        if len(found) != 1:
            raise KeyError(f"stand-in has {len(found)} runs named {name!r}: {sorted(self.runs)}")
        return found[0]

    def has_run(self, name: str) -> bool:
        with self.lock:
            return any(n == name for (_, _, n) in self.runs)

    def artifacts_named(self, name: str) -> list[StandinArtifact]:
        with self.lock:
            return sorted((a for a in self.artifacts.values() if a.name == name), key=lambda a: a.version_index)

    def operations(self) -> list[str]:
        """The GraphQL operations received, in order."""
        with self.lock:
            return [r.operation for r in self.requests if r.operation]

    def requests_to(self, target: str) -> list[RequestRecord]:
        with self.lock:
            return [r for r in self.requests if target in ("*", r.route, r.operation)]

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if predicate():
                    return
            time.sleep(0.05)
        raise AssertionError(f"stand-in: timed out after {timeout} s waiting for {what}")

    # ---- request handling ------------------------------------------------------------------------------

    def _handle(self, h: _Handler) -> None:
        server = h.server
        method, raw_path = h.command, h.path
        if method == "CONNECT" or raw_path.startswith(("http://", "https://")):
            target = raw_path if method != "CONNECT" else f"CONNECT {raw_path}"
            with self.lock:
                self.outbound.append(target)
                self._record(method, raw_path, "proxy", None, 403)
            h.close_connection = True
            self._answer(h, 403, {"error": "wandb stand-in: no traffic leaves 127.0.0.1"})
            return
        body = self._read_body(h)
        path = urlsplit(raw_path).path
        route, operation, payload = self._route(method, path, body)
        with self.lock:
            record = self._record(method, path, route, operation, None)
            if payload is not None and isinstance(payload.get("variables"), dict):
                record.variables = payload["variables"]
            elif route == "file_stream":
                record.variables = _file_stream_outline(body)
        # Upload URLs are presigned (W&B hands out signed bucket URLs): they carry no API key.
        if route not in ("health", "download") and not route.startswith("upload") and not self._authorized(h):
            with self.lock:
                self.unauthorized.append(path)
                record.status = 401
            self._answer(h, 401, {"error": "unauthorized"})
            return
        fault = self._fault_for(record)
        if fault is not None:
            record.fault = fault.describe()
            if fault.delay and server.stopping.wait(fault.delay):
                h.close_connection = True  # stopped while "slow": the client gets no answer
                return
            if fault.apply:
                try:
                    self._dispatch(route, operation, payload, path, body, record)
                except Exception:  # noqa: BLE001 - the fault's answer wins anyway
                    pass
            if fault.drop:
                h.close_connection = True
                try:
                    h.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                return
            if fault.graphql_error is not None:
                record.status = 200
                self._answer(h, 200, {"data": None, "errors": [{"message": fault.graphql_error, "path": [operation or route]}]})
                return
            if fault.status is not None and fault.status >= 300:
                record.status = fault.status
                headers = {"Retry-After": f"{fault.retry_after:g}"} if fault.retry_after is not None else {}
                self._answer(h, fault.status, {"errors": [{"message": f"stand-in: injected {fault.status}"}]}, headers)
                return
            if fault.apply:
                record.status = 200
                self._answer(h, 200, {})
                return
        if server.stopping.is_set():
            h.close_connection = True
            return
        try:
            status, answer, raw = self._dispatch(route, operation, payload, path, body, record)
        except _Refused as exc:
            status, answer, raw = exc.status, {"errors": [{"message": str(exc)}]}, None
        except Exception as exc:  # noqa: BLE001 - a bug of the stand-in shows up as a 500 the test can see
            status, answer, raw = 500, {"errors": [{"message": f"stand-in error: {type(exc).__name__}: {exc}"}]}, None
            with self.lock:
                self.unknown_operations.append(f"{operation or route}: {type(exc).__name__}: {exc}")
        record.status = status
        if raw is not None:
            self._answer_bytes(h, status, raw, "application/octet-stream")
        else:
            self._answer(h, status, answer)

    def _record(self, method: str, path: str, route: str, operation: str | None, status: int | None) -> RequestRecord:
        record = RequestRecord(len(self.requests), time.time(), method, path, route, operation, status)
        self.requests.append(record)
        return record

    @staticmethod
    def _read_body(h: _Handler) -> bytes:
        if h.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(h.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    h.rfile.readline()
                    break
                chunks.append(h.rfile.read(size))
                h.rfile.readline()
            body = b"".join(chunks)
        else:
            length = int(h.headers.get("Content-Length") or 0)
            body = h.rfile.read(length) if length else b""
        if h.headers.get("Content-Encoding", "").lower() == "gzip":
            body = gzip.decompress(body)
        return body

    def _authorized(self, h: _Handler) -> bool:
        auth = h.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            try:
                user, _, key = base64.b64decode(auth[6:]).decode().partition(":")
            except ValueError:
                return False
            return key == self.api_key
        if auth.startswith("Bearer "):
            return auth[7:] == self.api_key
        return h.headers.get("X-Wandb-Api-Key", h.headers.get("Api-Key")) == self.api_key

    @staticmethod
    def _route(method: str, path: str, body: bytes) -> tuple[str, str | None, dict[str, Any] | None]:
        if path.rstrip("/") == "/graphql" and method == "POST":
            payload = json.loads(body or b"{}")
            operation = payload.get("operationName")
            if not operation:
                match = _OPERATION.search(payload.get("query") or "")
                operation = match.group(2) if match else None
            return "graphql", operation, payload
        if path.startswith("/files/") and path.endswith("/file_stream"):
            return "file_stream", None, None
        if path.startswith("/storage/"):
            kind = path.split("/")[2]
            if method in ("GET", "HEAD"):
                return "download", None, None
            return {"run": "upload_run_file", "artifact": "upload_artifact_file", "manifest": "upload_manifest"}.get(kind, "upload"), None, None
        if path in ("/", "/healthz"):
            return "health", None, None
        return "other", None, None

    @staticmethod
    def _answer(h: _Handler, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        WandbStandin._answer_bytes(h, status, data, "application/json", headers)

    @staticmethod
    def _answer_bytes(h: _Handler, status: int, data: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        try:
            h.send_response(status)
            h.send_header("Content-Type", content_type)
            h.send_header("Content-Length", str(len(data)))
            if status in (200, 201) and h.command == "PUT":
                h.send_header("ETag", f'"{hashlib.md5(data).hexdigest()}"')
            for key, value in (headers or {}).items():
                h.send_header(key, value)
            h.end_headers()
            if h.command != "HEAD":
                h.wfile.write(data)
        except OSError:
            h.close_connection = True

    def _dispatch(self, route: str, operation: str | None, payload: dict[str, Any] | None, path: str, body: bytes,
                  record: RequestRecord) -> tuple[int, Any, bytes | None]:
        if route == "graphql":
            assert payload is not None
            handler = getattr(self, f"_gql_{operation}", None)
            if handler is None:
                with self.lock:
                    self.unknown_operations.append(operation or (payload.get("query") or "")[:80])
                return 200, {"data": None, "errors": [{"message": f"wandb stand-in: operation {operation!r} is not modelled"}]}, None
            with self.lock:
                data = handler(payload.get("variables") or {})
            return 200, {"data": data}, None
        if route == "file_stream":
            with self.lock:
                return 200, self._file_stream(path, json.loads(body or b"{}"), record), None
        if route.startswith("upload"):
            with self.lock:
                self._store_upload(path, body)
            return 200, {}, None
        if route == "download":
            with self.lock:
                return 200, None, self._download(path)
        if route == "health":
            return 200, {"standin": True}, None
        raise _Refused(404, f"wandb stand-in: no route for {path}")

    # ---- file_stream -----------------------------------------------------------------------------------

    def _file_stream(self, path: str, request: dict[str, Any], record: RequestRecord) -> dict[str, Any]:
        parts = [unquote(p) for p in path.strip("/").split("/")]  # files/<entity>/<project>/<run>/file_stream
        if len(parts) != 5:
            raise _Refused(404, f"bad file_stream path {path}")
        run = self.runs.get((parts[1], parts[2], parts[3]))
        if run is None:
            raise _Refused(404, f"wandb stand-in: no run {parts[1]}/{parts[2]}/{parts[3]}")
        run.file_stream_requests += 1
        for name, chunk in (request.get("files") or {}).items():
            offset = int(chunk.get("offset") or 0)
            lines = list(chunk.get("content") or [])
            if name == HISTORY_FILE:
                for i, line in enumerate(lines):
                    write = HistoryWrite(offset + i, line, json.loads(line), record.index)
                    run.history_writes.append(write)
                    run.history_by_offset[offset + i] = write
            elif name == EVENTS_FILE:
                for i, line in enumerate(lines):
                    run.events[offset + i] = line
            elif name == SUMMARY_FILE:
                if lines:
                    run.summary = json.loads(lines[-1])
            elif name == OUTPUT_FILE:
                for i, line in enumerate(lines):
                    run.console[offset + i] = line
            else:
                run.files[name] = "\n".join(lines).encode()
        run.uploaded.extend(request.get("uploaded") or [])
        if request.get("complete"):
            run.complete = True
            run.exitcode = request.get("exitcode")
            run.state = "finished" if not run.exitcode else "failed"
        return {"exitcode": None, "limits": {}}

    # ---- storage (upload URLs) -------------------------------------------------------------------------

    def _storage_url(self, *parts: str) -> str:
        return f"{self.url}/storage/" + "/".join(quote(p, safe="") for p in parts)

    def _store_upload(self, path: str, body: bytes) -> None:
        parts = [unquote(p) for p in path.split("/")[2:]]
        if parts[0] == "run":
            run = next((r for r in self.runs.values() if r.storage_id == parts[1]), None)
            if run is None:
                raise _Refused(404, f"no run {parts[1]}")
            run.files["/".join(parts[2:])] = body
        elif parts[0] == "artifact":
            artifact = self.artifacts.get(parts[1])
            if artifact is None:
                raise _Refused(404, f"no artifact {parts[1]}")
            name = "/".join(parts[2:])
            declared = artifact.declared_files.get(name)
            if declared is not None and declared != b64_md5(body):
                raise _Refused(400, f"md5 mismatch for {name}")  # what a bucket does with a bad Content-MD5
            artifact.files[name] = body
        elif parts[0] == "manifest":
            artifact = self.artifacts.get(self._manifests.get(parts[1], ""))
            if artifact is None:
                raise _Refused(404, f"no manifest {parts[1]}")
            artifact.manifest = json.loads(body)
        else:
            raise _Refused(404, f"no storage {path}")

    def _download(self, path: str) -> bytes:
        parts = [unquote(p) for p in path.split("/")[2:]]
        if parts[0] == "manifest":
            artifact = self.artifacts.get(self._manifests.get(parts[1], ""))
            if artifact is None or artifact.manifest is None:
                raise _Refused(404, "no such manifest")
            return json.dumps(artifact.manifest).encode()
        if parts[0] == "artifact" and parts[1] in self.artifacts and "/".join(parts[2:]) in self.artifacts[parts[1]].files:
            return self.artifacts[parts[1]].files["/".join(parts[2:])]
        if parts[0] == "run":
            for run in self.runs.values():
                if run.storage_id == parts[1] and "/".join(parts[2:]) in run.files:
                    return run.files["/".join(parts[2:])]
        raise _Refused(404, f"no file {path}")

    # ---- GraphQL: viewer, server, entities -------------------------------------------------------------

    def _gql_Viewer(self, v: dict[str, Any]) -> dict[str, Any]:
        return {"viewer": {"id": _gid("User", USERNAME), "entity": self.entity, "username": USERNAME,
                           "email": f"{USERNAME}@example.invalid", "flags": "{}", "admin": False,
                           "teams": {"edges": []}}}

    def _gql_ServerFeaturesQuery(self, v: dict[str, Any]) -> dict[str, Any]:
        return {"serverInfo": {"features": []}}

    def _gql_OrgFeatureFlags(self, v: dict[str, Any]) -> dict[str, Any]:
        return {"organization": None}

    def _gql_FetchOrgEntityFromEntity(self, v: dict[str, Any]) -> dict[str, Any]:
        return {"entity": {"organization": None}}

    def _gql_OrganizationCoreWeaveOrganizationID(self, v: dict[str, Any]) -> dict[str, Any]:
        return {"entity": {"organization": None}}

    def _gql_XXHashDigestsEnabled(self, v: dict[str, Any]) -> dict[str, Any]:
        return {"entity": {"xxhashDigestsEnabled": False}}

    def _gql_FetchArtifactDigestAlgorithm(self, v: dict[str, Any]) -> dict[str, Any]:
        return {"project": None}

    # ---- GraphQL: runs ---------------------------------------------------------------------------------

    def _run_json(self, run: StandinRun) -> dict[str, Any]:
        return {
            "id": run.storage_id, "name": run.name, "displayName": run.display_name, "description": run.notes,
            "config": json.dumps(run.config_raw), "sweepName": None, "historyLineCount": run.history_line_count,
            "project": {"id": _gid("Project", run.entity, run.project), "name": run.project,
                        "entity": {"id": _gid("Entity", run.entity), "name": run.entity}},
        }

    def _gql_UpsertBucket(self, v: dict[str, Any]) -> dict[str, Any]:
        run = None
        if v.get("id"):
            run = next((r for r in self.runs.values() if r.storage_id == v["id"]), None)
            if run is None:
                raise _Refused(404, f"no run with id {v['id']}")
        inserted = False
        if run is None:
            entity, project = v.get("entity") or self.entity, v.get("project") or DEFAULT_PROJECT
            name = v.get("name") or f"standin{next(self._ids)}"
            run = self.runs.get((entity, project, name))
            if run is None:
                run = StandinRun(_gid("Run", "v1", name, project, entity), entity, project, name)
                self.runs[(entity, project, name)] = run
                inserted = True
        run.upserts += 1
        if v.get("config") is not None:
            config = json.loads(v["config"]) if isinstance(v["config"], str) else v["config"]
            run.config_raw.update(config or {})
        if v.get("summaryMetrics") is not None:
            summary = json.loads(v["summaryMetrics"]) if isinstance(v["summaryMetrics"], str) else v["summaryMetrics"]
            run.summary.update(summary or {})
        for key, attr in (("displayName", "display_name"), ("groupName", "group"), ("jobType", "job_type"),
                          ("notes", "notes"), ("tags", "tags"), ("state", "state")):
            if v.get(key) is not None:
                setattr(run, attr, v[key])
        return {"upsertBucket": {"bucket": self._run_json(run), "inserted": inserted}}

    def _gql_RunResumeStatus(self, v: dict[str, Any]) -> dict[str, Any]:
        entity, project = v.get("entity") or self.entity, v.get("project") or DEFAULT_PROJECT
        run = self.runs.get((entity, project, v["name"]))
        if run is None:
            if not any(e == entity and p == project for (e, p, _) in self.runs):
                return {"model": None}
            bucket = None
        else:
            run.resume_queries += 1
            wandb_config = (run.config_raw.get("_wandb") or {}).get("value") or {}
            history = [run.history_by_offset[o].line for o in sorted(run.history_by_offset)[-10:]]
            bucket = {
                "id": run.storage_id, "name": run.name, "displayName": run.display_name,
                "summaryMetrics": json.dumps(run.summary),
                "logLineCount": max(run.console, default=-1) + 1,
                "historyLineCount": run.history_line_count,
                "eventsLineCount": max(run.events, default=-1) + 1,
                "historyTail": json.dumps(history),
                "eventsTail": json.dumps([run.events[o] for o in sorted(run.events)[-10:]]),
                "config": json.dumps(run.config_raw),
                "tags": run.tags, "notes": run.notes,
                "wandbConfig": json.dumps({"t": wandb_config["t"]} if "t" in wandb_config else {}),
            }
        return {"model": {"id": _gid("Project", entity, project), "name": project,
                          "entity": {"id": _gid("Entity", entity), "name": entity}, "bucket": bucket}}

    def _find_run(self, entity: str | None, project: str | None, name: str) -> StandinRun | None:
        return self.runs.get((entity or self.entity, project or DEFAULT_PROJECT, name))

    def _gql_RunState(self, v: dict[str, Any]) -> dict[str, Any]:
        run = self._find_run(v.get("entity"), v.get("project"), v["run"])
        return {"project": {"run": None if run is None else {"id": run.storage_id, "state": run.state}}}

    def _gql_QueryRunInfo(self, v: dict[str, Any]) -> dict[str, Any]:
        run = self._find_run(v.get("entity"), v.get("project"), v["run"])
        return {"project": {"run": None if run is None else {"id": run.storage_id, "name": run.name, "state": run.state}}}

    def _gql_StopRun(self, v: dict[str, Any]) -> dict[str, Any]:
        for run in self.runs.values():
            if run.storage_id == v.get("id"):
                run.stop_requested = True
        return {"stopRun": {"success": True}}

    def _gql_CreateRunFiles(self, v: dict[str, Any]) -> dict[str, Any]:
        run = self._find_run(v.get("entity"), v.get("project"), v["run"])
        if run is None:
            raise _Refused(404, f"no run {v.get('run')}")
        files = [{"name": name, "uploadUrl": self._storage_url("run", run.storage_id, *name.split("/"))}
                 for name in v.get("files") or []]
        return {"createRunFiles": {"runID": run.storage_id, "uploadHeaders": [], "files": files}}

    def _gql_MarkRunFilesUploaded(self, v: dict[str, Any]) -> dict[str, Any]:
        run = self._find_run(v.get("entity"), v.get("project"), v["run"])
        if run is not None:
            run.uploaded.extend(v.get("files") or [])
        return {"markRunFilesUploaded": {"success": run is not None}}

    # ---- GraphQL: artifacts ----------------------------------------------------------------------------

    def _artifact(self, artifact_id: str) -> StandinArtifact:
        artifact = self.artifacts.get(artifact_id)
        if artifact is None:
            raise _Refused(404, f"no artifact {artifact_id}")
        return artifact

    def _gql_CreateArtifact(self, v: dict[str, Any]) -> dict[str, Any]:
        i = v["input"]
        entity, project = i.get("entityName") or self.entity, i.get("projectName") or DEFAULT_PROJECT
        name = i["artifactCollectionName"]
        aliases = [a["alias"] for a in i.get("aliases") or []]
        siblings = [a for a in self.artifacts.values() if (a.entity, a.project, a.name) == (entity, project, name)]
        existing = next((a for a in siblings if a.client_id and a.client_id == i.get("clientID")), None)
        if existing is None and i.get("enableDigestDeduplication"):
            existing = next((a for a in siblings if a.state == "COMMITTED" and a.digest == i.get("digest")), None)
            if existing is not None:
                for alias in aliases:
                    self._move_alias(existing, alias)
        if existing is not None:
            artifact = existing
        else:
            artifact = StandinArtifact(
                id=_gid("Artifact", next(self._ids)), entity=entity, project=project, name=name,
                type=i.get("artifactTypeName") or "", digest=i.get("digest") or "", client_id=i.get("clientID") or "",
                sequence_client_id=i.get("sequenceClientID") or "", version_index=len(siblings), run=i.get("runName"),
                requested_aliases=aliases, description=i.get("description"),
                metadata=json.loads(i["metadata"]) if i.get("metadata") else None, history_step=i.get("historyStep"),
            )
            self.artifacts[artifact.id] = artifact
        committed = [a for a in siblings if a.state == "COMMITTED" and a is not artifact]
        latest = max(committed, key=lambda a: a.version_index, default=None)
        return {"createArtifact": {"artifact": {
            "id": artifact.id, "state": artifact.state, "digest": artifact.digest,
            "artifactSequence": {"id": _gid("ArtifactSequence", entity, project, name),
                                 "latestArtifact": None if latest is None else {"id": latest.id}},
        }}}

    def _manifest_json(self, artifact: StandinArtifact, include_upload: bool) -> dict[str, Any]:
        file: dict[str, Any] = {"id": _gid("File", "manifest", artifact.manifest_id)}
        if include_upload:
            file.update(uploadUrl=self._storage_url("manifest", artifact.manifest_id or ""), uploadHeaders=[])
        return {"artifactManifest": {"id": artifact.manifest_id, "file": file}}

    def _gql_CreateArtifactManifest(self, v: dict[str, Any]) -> dict[str, Any]:
        artifact = self._artifact(v["artifactID"])
        if artifact.manifest_id is None:
            artifact.manifest_id = _gid("ArtifactManifest", next(self._ids))
            self._manifests[artifact.manifest_id] = artifact.id
        return {"createArtifactManifest": self._manifest_json(artifact, bool(v.get("includeUpload")))}

    def _gql_UpdateArtifactManifest(self, v: dict[str, Any]) -> dict[str, Any]:
        artifact = self._artifact(self._manifests.get(v["artifactManifestID"], ""))
        return {"updateArtifactManifest": self._manifest_json(artifact, bool(v.get("includeUpload")))}

    def _gql_CreateArtifactFiles(self, v: dict[str, Any]) -> dict[str, Any]:
        specs = (v.get("input") or v).get("artifactFiles") or []
        edges = []
        for spec in specs:
            artifact = self._artifact(spec["artifactID"])
            if artifact.state == "COMMITTED":
                raise _Refused(400, f"artifact {artifact.id} is committed")
            artifact.declared_files[spec["name"]] = spec.get("md5") or ""
            edges.append({"node": {
                "id": _gid("File", artifact.id, spec["name"]),
                "name": spec["name"], "displayName": spec["name"],
                "storagePath": f"artifact/{artifact.id}/{spec['name']}",
                "uploadUrl": self._storage_url("artifact", artifact.id, *spec["name"].split("/")),
                "uploadHeaders": [], "uploadMultipartUrls": None,
                "artifact": {"id": artifact.id},
            }})
        return {"createArtifactFiles": {"files": {"edges": edges}}}

    def _gql_CompleteMultipartUploadArtifact(self, v: dict[str, Any]) -> dict[str, Any]:
        raise _Refused(400, "wandb stand-in: multipart uploads are not modelled (no upload URL asks for one)")

    def _move_alias(self, artifact: StandinArtifact, alias: str) -> None:
        for other in self.artifacts.values():
            if (other.entity, other.project, other.name) == (artifact.entity, artifact.project, artifact.name) and alias in other.aliases:
                other.aliases.remove(alias)
        if alias not in artifact.aliases:
            artifact.aliases.append(alias)

    def _gql_CommitArtifact(self, v: dict[str, Any]) -> dict[str, Any]:
        artifact = self._artifact(v["artifactID"])
        if artifact.manifest is None:
            raise _Refused(400, f"artifact {artifact.id} has no manifest")
        missing = [name for name in artifact.declared_files if name not in artifact.files]
        if missing:
            raise _Refused(400, f"artifact {artifact.id}: files never uploaded: {missing}")
        if artifact.state != "COMMITTED":
            artifact.state = "COMMITTED"
            for alias in ["latest", *artifact.requested_aliases]:
                self._move_alias(artifact, alias)
        return {"commitArtifact": {"artifact": {"id": artifact.id, "digest": artifact.digest}}}

    def _gql_UseArtifact(self, v: dict[str, Any]) -> dict[str, Any]:
        i = v["input"]
        artifact = self._artifact(i["artifactID"])
        run = self._find_run(i.get("entityName"), i.get("projectName"), i.get("runName") or "")
        if run is not None:
            run.used_artifacts.append(artifact.id)
        return {"useArtifact": {"artifact": {"id": artifact.id}}}

    def _gql_UpdateArtifact(self, v: dict[str, Any]) -> dict[str, Any]:
        artifact = self._artifact(v["artifactID"])
        if v.get("metadata"):
            artifact.metadata = json.loads(v["metadata"])
        return {"updateArtifact": {"artifact": {"id": artifact.id}}}

    def _gql_LinkArtifact(self, v: dict[str, Any]) -> dict[str, Any]:
        artifact = self.artifacts.get(v.get("artifactId") or "") or next(
            (a for a in self.artifacts.values() if a.client_id and a.client_id == v.get("clientId")), None)
        if artifact is None:
            raise _Refused(404, "no artifact to link")
        artifact.links.append({k: v.get(k) for k in ("artifactPortfolioName", "entityName", "projectName", "aliases")})
        return {"linkArtifact": {"versionIndex": artifact.version_index}}

    def _gql_ClientIDMapping(self, v: dict[str, Any]) -> dict[str, Any]:
        client_id = v.get("clientID")
        for artifact in self.artifacts.values():
            if artifact.client_id == client_id:
                return {"clientIDMapping": {"serverID": artifact.id}}
            if artifact.sequence_client_id == client_id:
                return {"clientIDMapping": {"serverID": _gid("ArtifactSequence", artifact.entity, artifact.project, artifact.name)}}
        return {"clientIDMapping": None}

    def _resolve_artifact(self, entity: str, project: str, name: str) -> StandinArtifact | None:
        """`name:alias` or `name:vN` of a committed artifact."""
        collection, _, tag = name.partition(":")
        for artifact in self.artifacts.values():
            if (artifact.entity, artifact.project, artifact.name) != (entity, project, collection) or artifact.state != "COMMITTED":
                continue
            if tag in artifact.aliases or tag == f"v{artifact.version_index}":
                return artifact
        return None

    def _gql_ArtifactType(self, v: dict[str, Any]) -> dict[str, Any]:
        """Asked by the Python side before logging an artifact: the type of the existing `name:latest`."""
        entity, project = v.get("entity") or self.entity, v.get("project") or DEFAULT_PROJECT
        if not any(e == entity and p == project for (e, p, _) in self.runs):
            return {"project": None}
        artifact = self._resolve_artifact(entity, project, v["name"])
        return {"project": {"artifact": None if artifact is None else {"artifactType": {"name": artifact.type}}}}

    def _gql_ArtifactByID(self, v: dict[str, Any]) -> dict[str, Any]:
        artifact = self.artifacts.get(v.get("id") or "")
        if artifact is None:
            return {"artifact": None}
        project = {"id": _gid("Project", artifact.entity, artifact.project), "internalId": _gid("Project", artifact.project),
                   "name": artifact.project, "entity": {"name": artifact.entity}}
        collection = {"__typename": "ArtifactSequence", "name": artifact.name, "project": project}
        return {"artifact": {
            "__typename": "Artifact", "id": artifact.id, "artifactSequence": collection,
            "versionIndex": artifact.version_index, "artifactType": {"name": artifact.type},
            "description": artifact.description, "metadata": json.dumps(artifact.metadata or {}),
            "ttlDurationSeconds": -1, "ttlIsInherited": True, "tags": [], "historyStep": artifact.history_step,
            "state": artifact.state, "size": sum(len(b) for b in artifact.files.values()), "digest": artifact.digest,
            "digestAlgorithm": "MANIFEST_MD5", "commitHash": None, "fileCount": len(artifact.entries),
            "createdAt": "2026-01-01T00:00:00", "updatedAt": None,
            "aliases": [{"__typename": "ArtifactAlias", "id": _gid("ArtifactAlias", artifact.id, alias), "alias": alias,
                         "artifactCollection": collection} for alias in artifact.aliases],
        }}

    def _gql_ArtifactManifest(self, v: dict[str, Any]) -> dict[str, Any]:
        artifact = self.artifacts.get(v.get("artifact_id") or "")
        if artifact is None or artifact.manifest_id is None:
            return {"artifact": None}
        return {"artifact": {"currentManifest": {"file": {"directUrl": self._storage_url("manifest", artifact.manifest_id)}}}}


@pytest.fixture
def wandb_standin() -> Iterator[WandbStandin]:
    """A started stand-in of W&B's API on 127.0.0.1 (see the module docstring); stopped after the test."""
    standin = WandbStandin().start()
    try:
        yield standin
    finally:
        standin.stop()

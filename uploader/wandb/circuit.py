"""Online: one circuit for every run of the process. W&B that does not answer is one failure, not one per run:
the first W&B call that fails is followed by a probe; when the probe fails too, every upload waits (the logs
are still read into the outbox) and the probe is tried again with the failure policy's backoff, until W&B
answers. `status` shows it, from the DB."""
from __future__ import annotations

import base64
import json
import logging
import os
import time
import urllib.error
import urllib.request

from common import events
from common.backoff import backoff_s
from db import reachability
from db.session import Database

log = logging.getLogger("mmdet_wandb.writer")

DEFAULT_BASE_URL = "https://api.wandb.ai"
PROBE_TIMEOUT_S = 10.0


def base_url() -> str:
    return (os.environ.get("WANDB_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")


def probe(url: str, api_key: str | None, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """One small GraphQL query (the viewer); None when W&B answers it, else why not. An answer that is not an
    error of the server (even 401: a wrong key is a problem of each run, not of the network) counts as reachable."""
    body = json.dumps({"query": "query Viewer { viewer { id } }", "operationName": "Viewer"}).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = "Basic " + base64.b64encode(f"api:{api_key}".encode()).decode()
    request = urllib.request.Request(f"{url}/graphql", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as answer:
            answer.read()
            return None
    except urllib.error.HTTPError as exc:
        return None if exc.code < 500 and exc.code != 429 else f"HTTP {exc.code} from {url}"
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return f"{type(reason).__name__}: {reason}"


class Circuit:
    """Closed: uploads go on. Open: W&B did not answer; every upload waits until `retry_at`, then one probe."""

    def __init__(self, db: Database, url: str | None = None, api_key: str | None = None) -> None:
        self.db = db
        self.url = url or base_url()
        self.api_key = api_key if api_key is not None else os.environ.get("WANDB_API_KEY")
        self.error: str | None = None
        self.since: float | None = None
        self.failures = 0
        self.retry_at = 0.0

    @property
    def is_open(self) -> bool:
        return self.error is not None

    def due(self) -> bool:
        return self.is_open and time.time() >= self.retry_at

    def check(self) -> bool:
        """Probe W&B now; opens or closes the circuit. True when W&B answers."""
        error = probe(self.url, self.api_key)
        if error is None:
            if self.is_open:
                down_s = time.time() - (self.since or time.time())
                events.emit(log, events.CIRCUIT_CLOSED, "W&B at %s answers again after %.0f s: uploads resume", self.url, down_s,
                            level=logging.WARNING, url=self.url, seconds=round(down_s, 3))
            self.error, self.since, self.failures, self.retry_at = None, None, 0, 0.0
        else:
            self.failures += 1
            self.retry_at = time.time() + backoff_s(self.failures)
            if not self.is_open:
                self.since = time.time()
                events.emit(log, events.CIRCUIT_OPEN, "W&B at %s is unreachable (%s): every upload waits, logs are still read; next try in %.0f s",
                            self.url, error, self.retry_at - time.time(), level=logging.WARNING, url=self.url, error=error)
            self.error = error
        self._record()
        return error is None

    def _record(self) -> None:
        try:
            with self.db.transaction() as session:
                reachability.record(session, self.url, self.error, self.since, self.failures, self.retry_at if self.is_open else None)
        except Exception:  # e.g. the disk is full: the circuit still works, status just does not show it
            log.exception("could not record whether W&B is reachable")

"""A Prometheus endpoint beside `watch` and `evaluate`, with `/healthz` and `/readyz` on the same port.

The figures are read from the state DB at scrape time by a few aggregate queries (db/figures.py: the totals of
what `status --json --node N` shows per work_dir, so a scrape is cheap at 1,000 work_dirs), and nothing is counted
twice across a restart: the process holds no counter of its own (a crash loses nothing; a second instance on the
same node reports the same rows).
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector
from common import inotify, timings
from db import figures
from db.session import Database
from mmdet_wandb import heartbeat

#: Every family this endpoint exposes besides the client library's process_* and python_* collectors; the alert
#: rules in monitoring/ may name only these (tests/test_metrics.py checks).
NAMES = (
    "mmdet_wandb_rows_read", "mmdet_wandb_rows_uploaded", "mmdet_wandb_rows_pending", "mmdet_wandb_work_dirs",
    "mmdet_wandb_segments_open", "mmdet_wandb_runs_backing_off", "mmdet_wandb_wandb_reachable",
    "mmdet_wandb_problems", "mmdet_wandb_checkpoints", "mmdet_wandb_store_pinned_bytes", "mmdet_wandb_eval_jobs",
    "mmdet_wandb_heartbeat_age_seconds", "mmdet_wandb_scrape_duration_seconds", "mmdet_wandb_loop_pass_seconds",
    "mmdet_wandb_scan_seconds", "mmdet_wandb_lag_seconds", "mmdet_wandb_oldest_pending_seconds", "mmdet_wandb_eval_job_seconds",
    "mmdet_wandb_eval_jobs_lease_expired", "mmdet_wandb_eval_job_leases_lost", "mmdet_wandb_inotify_watches",
    "mmdet_wandb_inotify_max_user_watches",
)
INOTIFY_EVERY_S = 60.0
#: The per-work_dir families, only with `--metrics-work-dir-labels N` (N > 0): label `work_dir`, at most N of them.
WORK_DIR_NAMES = ("mmdet_wandb_work_dir_rows_read", "mmdet_wandb_work_dir_rows_uploaded", "mmdet_wandb_work_dir_rows_pending")


class StateCollector(Collector):
    """One node's figures from the state DB (the evaluator's: every node's checkpoints and jobs); with
    `work_dir_labels` > 0, the rows of that many work_dirs too, each under its own label.

    On SQLite the figures are read again only when the DB changed (`Database.change_probe`) or a backoff or lease
    they count ran out: an idle node's scrape is a pragma, not the queries (most of what a scrape cost)."""

    def __init__(self, db: Database, node: str | None, beat: Path, work_dir_labels: int = 0) -> None:
        self.db, self.node, self.beat, self.work_dir_labels = db, node, beat, work_dir_labels
        self._probe = db.change_probe()
        self._lock = threading.Lock()
        self._read: tuple[int | None, figures.Totals, list[figures.WorkDirRows] | None] | None = None
        self._watches: tuple[float, int | None, int | None] = (0.0, None, None)  # (next count, in use, limit)

    def _figures(self) -> tuple[figures.Totals, list[figures.WorkDirRows] | None]:
        with self._lock:
            version = self._probe() if self._probe is not None else None
            now = time.time()
            if self._read is not None and version is not None and self._read[0] == version and now < self._read[1].changes_at:
                return self._read[1], self._read[2]
            with self.db.read() as session:
                found = figures.totals(session, self.node, now)
                newest = figures.newest_work_dirs(session, self.node, self.work_dir_labels) if self.work_dir_labels else None
            self._read = (version, found, newest)
            return found, newest

    def _inotify(self) -> tuple[int | None, int | None]:
        """Counted again at most every INOTIFY_EVERY_S: the kernel writes a line per watch (2 ms for 1,000), and
        watches change only as folders come and go."""
        with self._lock:
            if time.monotonic() >= self._watches[0]:
                self._watches = (time.monotonic() + INOTIFY_EVERY_S, inotify.watches_in_use(), inotify.max_user_watches())
            return self._watches[1], self._watches[2]

    def collect(self) -> Iterator[Metric]:
        started = time.perf_counter()
        found, newest = self._figures()
        yield CounterMetricFamily("mmdet_wandb_rows_read", "Log rows parsed into the state DB", value=found.rows_read)
        yield CounterMetricFamily("mmdet_wandb_rows_uploaded", "Rows W&B confirmed (or a closed offline segment holds)",
                                  value=found.rows_uploaded)
        yield GaugeMetricFamily("mmdet_wandb_rows_pending", "Rows read but not confirmed yet", value=found.rows_pending)
        oldest = found.oldest_pending_appended_at
        yield GaugeMetricFamily("mmdet_wandb_oldest_pending_seconds",
                                "Age of the oldest row not confirmed yet, from its line's append (0: none)",
                                value=0 if oldest is None else max(0.0, time.time() - oldest))
        yield GaugeMetricFamily("mmdet_wandb_work_dirs", "Work_dirs known", value=found.work_dirs)
        if newest is not None:
            yield from _per_work_dir(newest)
        yield GaugeMetricFamily("mmdet_wandb_runs_backing_off", "Runs waiting for a retry after an upload failure",
                                value=found.runs_backing_off)
        yield GaugeMetricFamily("mmdet_wandb_segments_open", "W&B segments being written", value=found.segments_open)
        yield GaugeMetricFamily("mmdet_wandb_wandb_reachable", "1 while this node's uploader reaches W&B (online), else 0",
                                value=0 if found.wandb_unreachable else 1)
        yield _by("mmdet_wandb_problems", "Open problems", "kind", found.problems)
        yield _by("mmdet_wandb_checkpoints", "Checkpoints", "state", found.checkpoints)
        yield GaugeMetricFamily("mmdet_wandb_store_pinned_bytes",
                                "Bytes of the checkpoint files pinned in the store (a file once, whatever links it has there)",
                                value=found.pinned_bytes)
        yield _by("mmdet_wandb_eval_jobs", "Eval jobs (dead: parked)", "state", found.eval_jobs)
        durations = found.job_seconds
        yield HistogramMetricFamily(
            "mmdet_wandb_eval_job_seconds", "Inference seconds of the done eval jobs in the state DB (each one's last attempt)",
            buckets=[*((repr(bound), n) for bound, n in zip(figures.JOB_SECONDS_BUCKETS, durations.at_most)), ("+Inf", durations.count)],
            sum_value=durations.total)
        yield GaugeMetricFamily("mmdet_wandb_eval_jobs_lease_expired",
                                "Running eval jobs whose lease ran out (their worker stopped renewing it), not taken over yet",
                                value=found.leases_expired)
        yield CounterMetricFamily("mmdet_wandb_eval_job_leases_lost",
                                  "Leases of eval jobs that ran out (the job taken over by another worker, or parked)",
                                  value=found.leases_lost)
        in_use, limit = self._inotify()
        yield GaugeMetricFamily("mmdet_wandb_inotify_watches", "inotify watches this process holds (watch: a folder each)",
                                value=-1 if in_use is None else in_use)
        yield GaugeMetricFamily("mmdet_wandb_inotify_max_user_watches", "The user's inotify watch limit (fs.inotify.max_user_watches)",
                                value=-1 if limit is None else limit)
        age = heartbeat.age(self.beat)
        yield GaugeMetricFamily("mmdet_wandb_heartbeat_age_seconds", "Seconds since the service's last loop pass (-1: none yet)",
                                value=-1 if age is None else age)
        yield GaugeMetricFamily("mmdet_wandb_scrape_duration_seconds", "Seconds this scrape spent on the state DB's figures (a change probe when nothing changed)",
                                value=time.perf_counter() - started)


def _per_work_dir(rows: list[figures.WorkDirRows]) -> Iterator[Metric]:
    read = CounterMetricFamily(WORK_DIR_NAMES[0], "Log rows of the work_dir parsed into the state DB", labels=["work_dir"])
    uploaded = CounterMetricFamily(WORK_DIR_NAMES[1], "Rows of the work_dir W&B confirmed", labels=["work_dir"])
    pending = GaugeMetricFamily(WORK_DIR_NAMES[2], "Rows of the work_dir not confirmed yet", labels=["work_dir"])
    for row in rows:
        read.add_metric([row.path], row.rows_read)
        uploaded.add_metric([row.path], row.rows_uploaded)
        pending.add_metric([row.path], row.rows_pending)
    yield from (read, uploaded, pending)


def _by(name: str, documentation: str, label: str, counts: dict[str, int]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=[label])
    for key in sorted(counts):
        family.add_metric([key], counts[key])
    return family


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # scrapes every few seconds must not fill the log
        pass


def _app(registry: CollectorRegistry, db: Database, beat: Path) -> Callable[..., Iterable[bytes]]:
    metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path not in ("/healthz", "/readyz"):
            return metrics(environ, start_response)
        age = heartbeat.age(beat)
        ok = age is not None and age <= heartbeat.MAX_AGE_S  # `mmdet-wandb health`'s test
        reason = "no heartbeat yet" if age is None else f"last loop pass {age:.1f} s ago"
        if ok and path == "/readyz":
            try:
                db.revisions()  # ready: the state DB answers too
            except Exception as exc:  # noqa: BLE001  (any DB failure means not ready)
                ok, reason = False, f"state DB: {type(exc).__name__}"
        start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
        return [f"{'ok' if ok else 'fail'}: {reason}\n".encode()]

    return app


def serve(addr: str, port: int, db: Database, node: str | None, beat: Path, work_dir_labels: int = 0) -> ThreadingWSGIServer:
    """Bind now (OSError names a port in use or an address that does not resolve) and serve on a daemon thread."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)  # the library's own process facts
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    registry.register(StateCollector(db, node, beat, work_dir_labels))
    registry.register(timings.REGISTRY)  # the loop's own durations (none in `evaluate`)
    server = make_server(addr, port, _app(registry, db, beat), ThreadingWSGIServer, handler_class=_Quiet)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server

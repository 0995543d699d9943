"""A Prometheus endpoint beside `watch` and `evaluate`, with `/healthz` and `/readyz` on the same port.

The figures are read from the state DB at scrape time with `status`'s own queries, so a scrape and
`status --json --node N` agree by construction and nothing is counted twice across a restart: the process
holds no counter of its own (a crash loses nothing; a second instance on the same node reports the same rows).
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from common import timings
from db.models import Problem, Run, Segment, SegmentState, WorkDir
from db.session import Database
from mmdet_wandb import heartbeat, status

#: Every family this endpoint exposes besides the client library's process_* and python_* collectors; the alert
#: rules in monitoring/ may name only these (tests/test_metrics.py checks).
NAMES = (
    "mmdet_wandb_rows_read", "mmdet_wandb_rows_uploaded", "mmdet_wandb_rows_pending", "mmdet_wandb_work_dirs",
    "mmdet_wandb_segments_open", "mmdet_wandb_runs_backing_off", "mmdet_wandb_wandb_reachable",
    "mmdet_wandb_problems", "mmdet_wandb_checkpoints", "mmdet_wandb_eval_jobs", "mmdet_wandb_heartbeat_age_seconds",
    "mmdet_wandb_scrape_duration_seconds", "mmdet_wandb_loop_pass_seconds", "mmdet_wandb_scan_seconds",
)


class StateCollector(Collector):
    """One node's figures from the state DB (the evaluator's: every node's checkpoints and jobs)."""

    def __init__(self, db: Database, node: str | None, beat: Path) -> None:
        self.db, self.node, self.beat = db, node, beat

    def collect(self) -> Iterator[Metric]:
        started = time.perf_counter()
        statuses = status.collect(self.db, self.node)
        runs = [run for w in statuses for run in w.runs]
        uploaded = sum(r.rows_uploaded for r in runs)
        pending = sum(r.rows_pending for r in runs)
        yield CounterMetricFamily("mmdet_wandb_rows_read", "Log rows parsed into the state DB", value=uploaded + pending)
        yield CounterMetricFamily("mmdet_wandb_rows_uploaded", "Rows W&B confirmed (or a closed offline segment holds)", value=uploaded)
        yield GaugeMetricFamily("mmdet_wandb_rows_pending", "Rows read but not confirmed yet", value=pending)
        yield GaugeMetricFamily("mmdet_wandb_work_dirs", "Work_dirs known", value=len(statuses))
        now = time.time()
        yield GaugeMetricFamily("mmdet_wandb_runs_backing_off", "Runs waiting for a retry after an upload failure",
                                value=sum(1 for r in runs if r.failures and r.retry_at and r.retry_at > now))
        with self.db.read() as session:
            open_segments = select(func.count()).select_from(Segment).where(Segment.state == SegmentState.OPEN)
            if self.node is not None:
                open_segments = open_segments.join(Run, Run.id == Segment.run_id).join(WorkDir, WorkDir.id == Run.work_dir_id).where(WorkDir.node == self.node)
            segments = session.scalar(open_segments) or 0
            kinds = select(Problem.kind, func.count()).where(Problem.resolved_at.is_(None)).group_by(Problem.kind)
            if self.node is not None:
                kinds = kinds.where(Problem.node == self.node)
            problems = dict(session.execute(kinds).tuples().all())
        yield GaugeMetricFamily("mmdet_wandb_segments_open", "W&B segments being written", value=segments)
        yield GaugeMetricFamily("mmdet_wandb_wandb_reachable", "1 while this node's uploader reaches W&B (online), else 0",
                                value=0 if status.unreachable(self.db, self.node) else 1)
        yield _by("mmdet_wandb_problems", "Open problems", "kind", problems)
        yield _by("mmdet_wandb_checkpoints", "Checkpoints", "state", _sum(w.checkpoint_counts() for w in statuses))
        yield _by("mmdet_wandb_eval_jobs", "Eval jobs (dead: parked)", "state", _sum(w.eval_job_counts() for w in statuses))
        age = heartbeat.age(self.beat)
        yield GaugeMetricFamily("mmdet_wandb_heartbeat_age_seconds", "Seconds since the service's last loop pass (-1: none yet)",
                                value=-1 if age is None else age)
        yield GaugeMetricFamily("mmdet_wandb_scrape_duration_seconds", "Seconds this scrape spent reading the state DB",
                                value=time.perf_counter() - started)


def _sum(counts: Iterable[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for one in counts:
        for key, n in one.items():
            total[key] = total.get(key, 0) + n
    return total


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


def serve(addr: str, port: int, db: Database, node: str | None, beat: Path) -> ThreadingWSGIServer:
    """Bind now (OSError names a port in use or an address that does not resolve) and serve on a daemon thread."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)  # the library's own process facts
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    registry.register(StateCollector(db, node, beat))
    registry.register(timings.REGISTRY)  # the loop's own durations (none in `evaluate`)
    server = make_server(addr, port, _app(registry, db, beat), ThreadingWSGIServer, handler_class=_Quiet)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server

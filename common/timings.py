"""Durations only the running process sees (a loop pass, a scan's walk, the lag of the rows it confirmed), as
Prometheus histograms.

They live in this process's memory: a crash or a restart starts them at zero (Prometheus reads that as a counter
reset), and `watch --jobs` share processes keep their own, unserved. Only the metrics endpoint reads them.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)
_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0)
LOOP_PASS = Histogram("mmdet_wandb_loop_pass_seconds", "Seconds one pass of the watch loop took (scan, reading, checkpoints)",
                      buckets=_BUCKETS, registry=REGISTRY)
SCAN = Histogram("mmdet_wandb_scan_seconds", "Seconds one full scan's walk of the roots took", buckets=_BUCKETS, registry=REGISTRY)
LAG = Histogram("mmdet_wandb_lag_seconds", "Seconds from a line's append (its log's mtime when read) to W&B confirming its row",
                buckets=(1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 21600.0, 86400.0), registry=REGISTRY)

"""Big file work off the loop's thread: copying a checkpoint into the store, hashing it, waiting for a finished
segment's exit record. The loop submits a task and moves on; the task records its own result in the DB, and a
later pass of the loop acts on it. A task is keyed by what it works on, so a pass never starts it twice.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

log = logging.getLogger("mmdet_wandb.background")


class Background:
    def __init__(self, workers: int = 2) -> None:
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="background")
        self._running: dict[str, Future[Any]] = {}
        self._lock = threading.Lock()

    def submit(self, key: str, task: Callable[..., Any], *args: Any) -> None:
        """Run `task(*args)` in the pool unless the task of this key is still running."""
        with self._lock:
            if key in self._running and not self._running[key].done():
                return
            self._running[key] = self._pool.submit(self._logged, key, task, *args)

    def wait(self, timeout: float | None = None) -> None:
        """Until every task submitted so far is done (backfill, shutdown)."""
        with self._lock:
            pending = list(self._running.values())
        wait(pending, timeout=timeout)
        with self._lock:
            self._running = {k: f for k, f in self._running.items() if not f.done()}

    def shutdown(self) -> None:
        self.wait()
        self._pool.shutdown()

    @staticmethod
    def _logged(key: str, task: Callable[..., Any], *args: Any) -> Any:
        try:
            return task(*args)
        except Exception:  # a task records what it can; an unexpected error must not vanish in the pool
            log.exception("background task %s failed", key)
            return None

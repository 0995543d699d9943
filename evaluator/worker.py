"""The eval worker: claim a job, keep its lease alive while the model runs, store the outcome (fenced).

Any number of workers may share one DB (one per GPU, on any node that sees the checkpoint paths); the
queue makes sure no two run the same job at once, and a worker that dies leaves a lease that expires.
The worker never talks to W&B (DESIGN 6): the uploader turns stored predictions into tables. It imports
`db` and `common` only, never the uploader.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from common import crash_points, events, stacks
from db import jobs
from db.jobs import ClaimedJob
from db.models import JobState
from db.session import Database
from evaluator.errors import JobError, LeaseLost
from common.trust import Trust

log = logging.getLogger("mmdet_wandb.evaluator")


def default_device() -> str:
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


def missing_device(device: str) -> str | None:
    """Why a CUDA device asked for is not here, checked at start: else every job would fail on it, be retried and
    parked while the worker keeps polling (a CUDA evaluator started on a node or container without a GPU)."""
    if not device.startswith("cuda"):
        return None
    import torch

    if not torch.cuda.is_available():
        return (f"--device {device}: torch sees no CUDA device here (no GPU, no driver, or a container started without one); "
                "give it a GPU, or run with --device cpu")
    index = device.partition(":")[2] or "0"
    if not index.isdigit() or int(index) >= torch.cuda.device_count():
        return f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible here (cuda:0..)"
    return None


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class WorkerOptions:
    stack: str = stacks.MMDET2  # the jobs it claims: the stack installed here (common/stacks.py)
    device: str = "cpu"
    batch_size: int = 4
    lease_s: float = 60.0  # renewed every lease_s / 3 while the job runs
    poll_s: float = 2.0
    exit_when_idle: bool = False
    dataset_roots: tuple[Path, ...] = ()  # tried first for relative dataset paths (--dataset-root)
    trust: Trust = Trust()  # what code from the work_dirs may run (default: none)
    worker_id: str = field(default_factory=default_worker_id)


class Worker:
    def __init__(self, db: Database, options: WorkerOptions) -> None:
        self.db = db
        self.options = options

    def run(self, stop: threading.Event, on_tick: Callable[[], None] | None = None) -> int:
        """Work until `stop` (or, with exit_when_idle, until no job is queued or running); returns jobs done.
        A job in hand is finished first. `on_tick` after each claim attempt and each job."""
        done = 0
        log.info("worker %s (%s) on %s", self.options.worker_id, self.options.stack, self.options.device)
        for line in self.options.trust.warnings():
            log.warning(line)
        while not stop.is_set():
            if on_tick is not None:
                on_tick()
            try:
                job = jobs.claim(self.db, self.options.worker_id, self.options.lease_s, stack=self.options.stack)
            except Exception:  # the DB briefly unavailable: wait and try again
                log.exception("claim failed; retrying")
                stop.wait(self.options.poll_s)
                continue
            if job is None:
                if self.options.exit_when_idle and not jobs.unfinished(self.db, self.options.stack):
                    break
                stop.wait(self.options.poll_s)
                continue
            done += self.run_one(job)
        return done

    def run_one(self, job: ClaimedJob) -> int:
        ids = {"job_id": job.id, "work_dir": job.work_dir, "checkpoint": job.checkpoint_path, "attempt": job.attempts}
        events.emit(log, events.EVAL_JOB_CLAIMED, "job %s (attempt %s): %s", job.id, job.attempts, job.checkpoint_path, **ids)
        lease_lost = threading.Event()
        finished = threading.Event()
        heartbeat = threading.Thread(target=self._renew, args=(job.id, lease_lost, finished), daemon=True,
                                     name=f"lease-{job.id}")
        heartbeat.start()
        try:
            outcome = _adapter(job.stack).evaluate(job, self.options.device, self.options.batch_size, lease_lost, self.options.dataset_roots,
                                                   self.options.trust)
        except LeaseLost:
            log.warning("job %s: lease lost to another worker; result dropped", job.id)
            return 0
        except JobError as exc:
            self._fail(job, str(exc), retryable=exc.retryable)
            return 0
        except Exception as exc:  # a bug or an unexpected library error: retried, then parked with it
            log.debug("job %s failed", job.id, exc_info=True)
            self._fail(job, f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=-3)}", retryable=True)
            return 0
        finally:
            finished.set()
            heartbeat.join()
        if lease_lost.is_set() or not jobs.complete(self.db, job.id, self.options.worker_id, outcome):
            log.warning("job %s: lease lost to another worker; result dropped", job.id)
            return 0
        crash_points.reached("job-completed")
        events.emit(log, events.EVAL_JOB_DONE, "job %s done: %d images in %.2f s on %s", job.id, len(outcome.predictions), outcome.seconds,
                    outcome.device, **ids, seconds=outcome.seconds)
        return 1

    def _renew(self, job_id: int, lease_lost: threading.Event, finished: threading.Event) -> None:
        while not finished.wait(self.options.lease_s / 3):
            try:
                if not jobs.renew(self.db, job_id, self.options.worker_id, self.options.lease_s):
                    lease_lost.set()
                    return
            except Exception:  # keep trying until the lease runs out; complete() is fenced anyway
                log.exception("job %s: lease renewal failed", job_id)

    def _fail(self, job: ClaimedJob, error: str, *, retryable: bool) -> None:
        log.warning("job %s failed (%s): %s", job.id, "will retry" if retryable else "permanent", error.splitlines()[0])
        state = jobs.fail(self.db, job.id, self.options.worker_id, error, retryable=retryable)
        if state is None:
            log.warning("job %s: lease lost to another worker before the failure was recorded", job.id)
        elif state is JobState.DEAD:
            events.emit(log, events.EVAL_JOB_PARKED, "job %s parked after %d attempt(s): %s", job.id, job.attempts, error.splitlines()[0],
                        level=logging.WARNING, job_id=job.id, work_dir=job.work_dir, checkpoint=job.checkpoint_path, attempt=job.attempts,
                        error=error.splitlines()[0])


def _adapter(stack: str):  # type: ignore[no-untyped-def]
    """The module that evaluates a job of `stack` (imported on first use: each needs its own environment)."""
    if stack == stacks.MMDET3:
        from evaluator import mmdet3

        return mmdet3
    from evaluator import mmdet2

    return mmdet2

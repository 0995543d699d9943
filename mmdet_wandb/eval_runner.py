"""`backfill --evaluate`: run every eval job of the pass, of both MMDetection stacks.

The jobs of the stack installed here run in this process; the jobs of the other stack run in a worker process
of the environment that has it (`MMDET_WANDB_MMDET3_PYTHON` / `MMDET_WANDB_MMDET2_PYTHON`: its python), which
gets no W&B variable (the evaluator never talks to W&B) and the same trust flags. Without that environment the jobs stay queued for a
worker of their stack, and the backfill says so.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from common import stacks
from common.trust import Trust
from db import jobs
from db.session import Database

log = logging.getLogger("mmdet_wandb.evaluator")

_STACK_PYTHON_ENV = {stacks.MMDET2: "MMDET_WANDB_MMDET2_PYTHON", stacks.MMDET3: "MMDET_WANDB_MMDET3_PYTHON"}
_STACK_NAME = {stacks.MMDET2: "mmdet 2.x", stacks.MMDET3: "mmdet 3.x"}


@dataclass(frozen=True)
class WorkerFlags:
    """What `backfill` hands its workers, here and in the other environment."""

    device: str | None
    batch_size: int
    dataset_roots: tuple[Path, ...]
    config: Path | None  # backfill's --config: the worker process resolves its options from the same file
    trust: Trust


def evaluate_all(db: Database, data_dir: Path, flags: WorkerFlags, stop: threading.Event) -> list[str]:
    """Run the queued jobs of each stack until none is left; returns a line for each stack nobody could run."""
    here = stacks.installed()
    waiting = []
    for stack in stacks.STACKS:
        queued = 0 if stop.is_set() else jobs.unfinished(db, stack)
        if not queued:
            continue
        if stack == here:
            _run_here(db, stack, flags, stop)
            continue
        python = os.environ.get(_STACK_PYTHON_ENV[stack])
        if not python:
            waiting.append(f"{queued} {_STACK_NAME[stack]} eval job(s) wait for a worker of that stack: "
                           f"set {_STACK_PYTHON_ENV[stack]} to the python of its environment, or run `mmdet-wandb evaluate` there")
            continue
        _run_in(python, stack, data_dir, flags, stop)
    return waiting


def _run_here(db: Database, stack: str, flags: WorkerFlags, stop: threading.Event) -> None:
    from evaluator.worker import Worker, WorkerOptions, default_device

    Worker(db, WorkerOptions(stack=stack, device=flags.device or default_device(), batch_size=flags.batch_size, exit_when_idle=True,
                             poll_s=0.5, dataset_roots=flags.dataset_roots, trust=flags.trust)).run(stop)


def _run_in(python: str, stack: str, data_dir: Path, flags: WorkerFlags, stop: threading.Event) -> None:
    command = [python, "-m", "mmdet_wandb.cli", "evaluate", "--exit-when-idle", "--data-dir", str(data_dir),
               "--batch-size", str(flags.batch_size), "--poll", "0.5", "--log-level", logging.getLevelName(log.getEffectiveLevel())]
    command += ["--device", flags.device] if flags.device else []
    command += ["--config", str(flags.config)] if flags.config else []
    for root in flags.dataset_roots:
        command += ["--dataset-root", str(root)]
    command += ["--trust-checkpoints"] * flags.trust.checkpoints + ["--trust-configs"] * flags.trust.configs
    for module in flags.trust.imports:
        command += ["--allow-import", module]
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    log.info("running the %s eval jobs with %s", _STACK_NAME[stack], python)
    worker = subprocess.Popen(command, env=env, stdout=sys.stderr, stderr=sys.stderr)
    while worker.poll() is None:
        if stop.wait(0.5):
            worker.terminate()  # it finishes the job in hand
    if worker.wait() != 0:
        log.warning("the %s worker exited %s", _STACK_NAME[stack], worker.returncode)

"""Shared fixtures: the real logs, an isolated environment for the CLI, and reading back offline runs."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from uploader.wandb import reader as wandb_reader

REPO = Path(__file__).resolve().parents[1]
REAL_LOGS = Path(os.environ.get("MMDET_WANDB_REAL_LOGS", REPO.parent / "shared" / "real_logs")).resolve()


def service_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment of a service process: offline W&B, everything under `home`, no credentials."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MMDET_WANDB_"))}
    env.update(MMDET_WANDB_HOME=str(home), PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def cli(home: Path, *args: str, check: bool = True, timeout: float = 600, **env: str) -> subprocess.CompletedProcess[str]:
    """Run `mmdet-wandb` as a real subprocess."""
    proc = subprocess.run(
        [sys.executable, "-m", "mmdet_wandb.cli", *args],
        env=service_env(home, **env), capture_output=True, text=True, timeout=timeout, cwd=REPO,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"mmdet-wandb {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def table_column(table: str, index: int) -> str:
    """The text of one column of a table the CLI printed (rich folds long cells over lines), lines joined."""
    cells = [line.split("│")[1:-1][index].strip() for line in table.splitlines() if line.count("│") >= 3]
    return " ".join(cell for cell in cells if cell)


def status(home: Path) -> dict:
    return json.loads(cli(home, "status", "--json").stdout)


@dataclass
class RunFiles:
    wandb_id: str
    name: str
    segments: list[wandb_reader.OfflineRun]

    @property
    def history(self) -> list[dict]:
        return [row for seg in self.segments for row in seg.history]


def offline_run(home: Path, wandb_id: str) -> RunFiles:
    """Every segment of one run, in segment order (the order `wandb sync` replays them)."""
    files = wandb_reader.find_run_files(home / "wandb" / wandb_id)
    segments = [wandb_reader.read_run(f) for f in files]
    name = segments[0].display_name if segments else ""
    return RunFiles(wandb_id, name or "", segments)


@pytest.fixture(scope="session")
def real_logs() -> Path:
    if not REAL_LOGS.is_dir():
        pytest.fail(f"the real logs are missing: {REAL_LOGS} (set MMDET_WANDB_REAL_LOGS)")
    return REAL_LOGS


def start_watch(home: Path, root: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "mmdet_wandb.cli", "watch", str(root), "--poll-interval", "0.2",
         "--scan-interval", "1", "--log-level", "INFO", *args],
        env=service_env(home), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen[str] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"watch exited ({proc.returncode}) while waiting for {what}:\n{proc.stdout.read()}")
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture
def watcher(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []

    def start(home: Path, root: Path, *args: str) -> subprocess.Popen[str]:
        proc = start_watch(home, root, *args)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    return output


from tests.mmdet_run.fixtures import synthetic_coco, trained_work_dir  # noqa: E402,F401  (pytest fixtures)
from tests.mmdet3_run.fixtures import trained_work_dir3  # noqa: E402,F401  (pytest fixture)
from tests.postgres import postgres_server, postgres_url  # noqa: E402,F401  (pytest fixtures)
from tests.wandb_standin import wandb_standin  # noqa: E402,F401  (pytest fixtures)

"""The text log of a launch has one reader (uploader/text_log.py), and it reads through the one safe open (DESIGN
1 and 12): a text log that is a symlink out of the root, or a FIFO, is neither followed nor waited on by anything
that reads it (the iterations per epoch, the environment, the row times), and the launch is then uploaded exactly
as if it had no text log. On copies of real work_dirs: through the real `backfill` command (the scan refuses the
planted file), and through the real ingest for the race where the text log becomes one after the scan.

Each case has its control: the same launch with its real text log reads differently, so an equality with the
launch without a text log shows that the planted one was not read. A FIFO opened for reading without O_NONBLOCK
blocks until a writer comes, so every read here is waited on with a deadline."""
from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

import pytest

from common.records import ParseState
from tests.conftest import REAL_LOGS, cli, offline_run, status, wait_until
from uploader import discovery, row_times, text_log
from uploader.discovery import FoundLog
from uploader.parsers import env_info
from uploader.parsers.log_header import LogHeader

T = TypeVar("T")
UTC = ZoneInfo("UTC")
# mmcv 2.x, 10 epochs of 31 iterations logged every 10: the denominator is in the text log only
BALLOON = "lyc686__OpenMMlab_AI_2023.2/code/Task_02/balloon/log/20230208_162410.log.json"
# mmengine: the environment is in the text log only
RTMDET = "superegg-M__OpenMMLabCamp/task1_MMPose/mmdetection/work_dirs/rtmdet_tiny_ear/20230605_131231"
STACKS = ("mmdet2", "mmdet3")
PLANTS = ("symlink_out_of_root", "fifo")
DEADLINE_S = 120  # far above what each read takes; a blocked read never ends


def launch_copy(stack: str, work_dir: Path) -> Path:
    """A real launch copied into `work_dir` (writable); the path of its text log there."""
    if stack == "mmdet2":
        log = REAL_LOGS / BALLOON
        work_dir.mkdir(parents=True)
        for path in (log, log.with_name(log.name.removesuffix(".json"))):
            shutil.copy(path, work_dir / path.name)
        text = work_dir / log.name.removesuffix(".json")
    else:
        launch = REAL_LOGS / RTMDET
        shutil.copytree(launch, work_dir / launch.name)
        text = work_dir / launch.name / f"{launch.name}.log"
    for folder in (work_dir, *(p for p in work_dir.rglob("*") if p.is_dir())):
        folder.chmod(0o755)
    return text


def plant(text: Path, how: str, outside: Path) -> None:
    """Put a FIFO, or a link to the same bytes outside the root, where the text log was."""
    outside.mkdir(parents=True, exist_ok=True)
    target = outside / f"{text.parent.name}-{text.name}"
    shutil.copy(text, target)
    text.unlink()
    if how == "fifo":
        os.mkfifo(text)
    else:
        text.symlink_to(target)


def promptly(work: Callable[[], T], what: str) -> T:
    """`work` in a daemon thread, waited on with a deadline: a read that blocks fails the test, never hangs it."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(work())
        except BaseException as exc:  # handed to the test below
            outcome.append(exc)

    thread = threading.Thread(target=run, name="text-log-read", daemon=True)
    thread.start()
    wait_until(lambda: not thread.is_alive(), DEADLINE_S, what)
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


def refusals(caplog: pytest.LogCaptureFixture, path: Path) -> list[str]:
    return [r.getMessage() for r in caplog.records if str(path) in r.getMessage() and "text log not read" in r.getMessage()]


# ------------------------------------------------------------------------------------------- each reader


READERS: dict[str, Callable[[Path], Any]] = {
    "iters_per_epoch": text_log.iters_per_epoch,
    "env_info": lambda text: env_info.for_log(LogHeader(), text),  # mmengine: no log.json header
    "row_times": lambda text: row_times.read_text(text, 0, ParseState()),
}


@pytest.mark.parametrize("how", PLANTS)
@pytest.mark.parametrize("reader", READERS)
def test_every_reader_refuses_a_linked_or_fifo_text_log_and_says_so(real_logs, tmp_path, caplog, reader, how):
    text = launch_copy("mmdet3", tmp_path / "root" / "work_dir")
    read = READERS[reader]
    assert promptly(lambda: read(text), f"{reader} of the real text log"), "the real text log gives something"
    plant(text, how, tmp_path / "outside")
    with caplog.at_level(logging.WARNING, logger="mmdet_wandb.text_log"):
        got = promptly(lambda: read(text), f"{reader} of a {how} text log")
    assert not got, f"{reader} read the {how}: {got!r}"
    assert len(refusals(caplog, text)) == 1, caplog.text


def test_the_pure_readings_of_a_real_text_log():
    """What each caller gets from the bytes of mmengine's text log (lines as they are, no file)."""
    data = (REAL_LOGS / RTMDET / "20230605_131231.log").read_bytes()
    assert text_log.epoch_length(data) == 21
    block = env_info.parse_block(text_log.environment(data))
    assert block["GPU 0"] == "NVIDIA GeForce RTX 3090" and block["MMEngine"] == "0.7.3"
    assert block["PyTorch compiling details"] == "PyTorch built with:"
    lines = text_log.progress(data, 0, None)
    first = lines[0]
    assert (first.key, str(first.written)) == (("train", None, 1), "2023-06-05 13:12:46")
    assert data[:first.end].endswith(b"loss_bbox: 0.4349\n")
    vals = [line for line in lines if line.key[0] == "val"]
    assert (vals[0].key, vals[0].last_iter) == (("val", 5, None), 5 * 21), "the first val, after epoch 5 of 21 iterations"
    assert text_log.progress(data[:first.end - 1], 0, None) == [], "a line still being written is not read"


# ------------------------------------------------------------------------------------ the real backfill


@dataclass(frozen=True)
class Uploaded:
    """What W&B got of one launch, as far as its text log decides it."""

    iters: list[Any]
    times: list[Any]
    env: dict[str, str] | None


def uploaded(home: Path, work_dir: dict) -> Uploaded:
    [run] = work_dir["runs"]
    files = offline_run(home, run["wandb_id"])
    rows = files.history
    return Uploaded([r.get("iter") for r in rows], [r.get("_timestamp") for r in rows], files.segments[0].config.get("env_info"))


def test_backfill_uploads_a_launch_whose_text_log_is_linked_out_or_a_fifo_as_one_without(real_logs, tmp_path):
    tmp_path = tmp_path.resolve()
    root, home, outside = tmp_path / "root", tmp_path / "home", tmp_path / "outside"
    links = []
    for stack in STACKS:
        for variant in ("with", "without", *PLANTS):
            text = launch_copy(stack, root / f"{stack}-{variant}")
            if variant == "without":
                text.unlink()
            elif variant != "with":
                plant(text, variant, outside)
                links += [text] if variant == "symlink_out_of_root" else []

    proc = cli(home, "backfill", str(root), "--no-progress", "--log-timezone", "UTC", timeout=DEADLINE_S * 3)
    state = status(home)

    got = {Path(w["path"]).name: uploaded(home, w) for w in state["work_dirs"]}
    assert sorted(got) == sorted(f"{s}-{v}" for s in STACKS for v in ("with", "without", *PLANTS)), proc.stderr
    for stack in STACKS:
        assert got[f"{stack}-with"].times != got[f"{stack}-without"].times, "control: the text log gives the times"
        for how in PLANTS:
            assert got[f"{stack}-{how}"] == got[f"{stack}-without"], f"{stack}: the {how} text log was read"
    assert got["mmdet2-with"].iters != got["mmdet2-without"].iters, "control: the text log gives the epoch length"
    assert got["mmdet3-with"].env != got["mmdet3-without"].env, "control: the text log gives mmengine's environment"
    for link in links:
        found = [p["kind"] for p in state["problems"] if p["path"] == str(link)]
        assert found == ["symlink_outside_root"], state["problems"]
        assert any(str(link) in line and "symlink_outside_root" in line for line in proc.stderr.splitlines()), proc.stderr


# ------------------------------------------------------------------- the race: after the scan, before the read


def ingested(home: Path, found: FoundLog) -> tuple[list[dict], dict | None]:
    """One log through the real ingest into a fresh state DB: the iter, epoch and time of every row it queued,
    and the environment in the run's config."""
    from sqlalchemy import select

    from db.models import OutboxRow, Run
    from db.session import Database, sqlite_url
    from uploader.ingest import IngestOptions, ingest

    home.mkdir(parents=True, exist_ok=True)
    db = Database(sqlite_url(home / "state.db"))
    db.upgrade()
    ingest(db, found, found.work_dir, newer_launch=True, options=IngestOptions(log_timezone=UTC))
    with db.transaction() as session:
        payloads = [json.loads(p) for p in session.scalars(select(OutboxRow.payload_json).order_by(OutboxRow.step))]
        [config] = session.scalars(select(Run.config_json)).all()
    rows = [{k: p.get(k) for k in ("iter", "epoch", "_timestamp")} for p in payloads]
    return rows, json.loads(config or "{}").get("env_info")


@pytest.mark.parametrize("how", PLANTS)
@pytest.mark.parametrize("stack", STACKS)
def test_a_text_log_that_becomes_a_link_or_fifo_after_the_scan_is_not_read(real_logs, tmp_path, caplog, stack, how):
    """The scan saw a regular text log; by the time ingest reads it, it is a link out of the root or a FIFO.
    Every reader refuses it with a log line, and every row is queued with what the log alone gives."""
    tmp_path = tmp_path.resolve()
    text = launch_copy(stack, tmp_path / "root" / "work_dir")
    [found] = discovery.scan(tmp_path / "root").logs
    assert found.text_log == text
    with_text = promptly(lambda: ingested(tmp_path / "home-with", found), "ingest with the text log")
    without = promptly(lambda: ingested(tmp_path / "home-without", replace(found, text_log=None)), "ingest without")
    assert with_text != without and without[0], "control: the text log changes what is queued"
    plant(text, how, tmp_path / "outside")
    with caplog.at_level(logging.WARNING, logger="mmdet_wandb.text_log"):
        got = promptly(lambda: ingested(tmp_path / "home", found), f"ingest with a {how} text log")
    assert got == without
    assert refusals(caplog, text), caplog.text

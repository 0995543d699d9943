"""`mmdet-wandb`: watch work_dirs live, backfill finished ones, and show what the service knows."""
from __future__ import annotations

import json
import os
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from db.session import Database
from mmdet_wandb import paths, status
from uploader import checkpoints
from uploader.checkpoints import CheckpointOptions
from uploader.evaluations import EvalOptions
from uploader.ingest import FreshLaunch, IngestOptions
from uploader.service import ServiceOptions, Uploader
from uploader.wandb_writer import WandbWriter, WriterOptions, resolve_mode

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, pretty_exceptions_enable=False)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)  # logs and pipes get whole rows

DataDirOpt = Annotated[
    Optional[Path],
    typer.Option("--data-dir", help="State DB and offline runs [env: MMDET_WANDB_HOME; default ~/.local/share/mmdet-wandb]"),
]
ProjectOpt = Annotated[Optional[str], typer.Option(help="W&B project (beats WANDB_PROJECT and the hook's init_kwargs)")]
EntityOpt = Annotated[Optional[str], typer.Option(help="W&B entity (beats WANDB_ENTITY and the hook's init_kwargs)")]
FreshOpt = Annotated[
    FreshLaunch,
    typer.Option(help="A fresh (not resumed) launch in a work_dir that already has a run: new-run or same-run"),
]
LogLevelOpt = Annotated[str, typer.Option(help="Log level: DEBUG, INFO, WARNING, ERROR")]
LogCheckpointOpt = Annotated[bool, typer.Option("--log-checkpoint", help="Log every finished checkpoint as a version of the artifact run_<id>_model (the hook's log_checkpoint)")]
LogCheckpointMetadataOpt = Annotated[bool, typer.Option("--log-checkpoint-metadata", help="Put the eval metrics of the checkpoint's own epoch/iter into its metadata (the hook's log_checkpoint_metadata)")]
IncompleteAfterOpt = Annotated[float, typer.Option(help="Seconds a checkpoint may stay still but broken before it is marked incomplete")]
NumEvalImagesOpt = Annotated[int, typer.Option(help="Val images in the tables (the hook's num_eval_images): each finished checkpoint gets an eval job; 0 turns tables off")]
BboxScoreThrOpt = Annotated[float, typer.Option(help="Keep predicted boxes and masks with a score above this (the hook's bbox_score_thr)")]
DeviceOpt = Annotated[Optional[str], typer.Option(help="cuda:N or cpu [default: cuda:0 when a GPU is visible, else cpu]")]
BatchSizeOpt = Annotated[int, typer.Option(help="Images per inference batch (halved on CUDA out of memory)")]


class _ServiceLogHandler(logging.StreamHandler):
    """Our stderr handler. A subclass, because mmcv's get_logger turns every plain root StreamHandler down to
    ERROR (to mute duplicate DDP logs) the first time mmdet logs, which would silence the evaluator's log."""


def _setup(data_dir: Path | None, roots: list[Path], level: str) -> tuple[paths.DataDir, Database]:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=[_ServiceLogHandler(sys.stderr)],
    )
    home = paths.resolve(data_dir)
    try:
        home.prepare(roots)
    except paths.DataDirError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    db = Database(home.db_url)
    db.upgrade()
    return home, db


def _roots(given: list[Path]) -> list[Path]:
    roots = []
    for root in given:
        if not root.is_dir():
            err.print(f"[red]error:[/red] {root} is not a directory")
            raise typer.Exit(2)
        roots.append(root.resolve())
    return roots


def _writer(
    db: Database, home: paths.DataDir, project: str | None, entity: str | None,
    checkpoints: CheckpointOptions | None, evaluation: EvalOptions | None, **extra: float,
) -> WandbWriter:
    options = WriterOptions(
        runs_dir=home.runs_dir, mode=resolve_mode(), project=project, entity=entity,
        media_dir=home.media_dir if evaluation is not None else None, **extra,
    )
    return WandbWriter(db, options, checkpoints)


def _checkpoint_options(
    home: paths.DataDir, log_checkpoint: bool, log_metadata: bool, incomplete_after: float,
    evaluation: EvalOptions | None, settle: float = 2.0,
) -> CheckpointOptions | None:
    """Checkpoints are followed when they are logged or evaluated; as in the hook, metadata is only logged
    with the checkpoints themselves."""
    if not log_checkpoint and evaluation is None:
        return None
    return CheckpointOptions(
        store_dir=home.store_dir, log_checkpoint=log_checkpoint, log_checkpoint_metadata=log_checkpoint and log_metadata,
        settle_s=settle, incomplete_after_s=incomplete_after,
    )


def _eval_options(num_eval_images: int, bbox_score_thr: float) -> EvalOptions | None:
    if num_eval_images < 0:
        err.print("[red]error:[/red] --num-eval-images must be 0 or more")
        raise typer.Exit(2)
    return EvalOptions(num_eval_images=num_eval_images, bbox_score_thr=bbox_score_thr) if num_eval_images else None


@app.command()
def watch(
    roots: Annotated[list[Path], typer.Argument(help="Work_dirs, or folders of work_dirs, to follow")],
    data_dir: DataDirOpt = None,
    project: ProjectOpt = None,
    entity: EntityOpt = None,
    fresh_launch: FreshOpt = FreshLaunch.NEW_RUN,
    poll: Annotated[bool, typer.Option("--poll", help="No filesystem events (NFS, FUSE): poll and scan only")] = False,
    scan_interval: Annotated[float, typer.Option(help="Seconds between full scans of the roots")] = 10.0,
    poll_interval: Annotated[float, typer.Option(help="Seconds between stat checks of known logs")] = 0.5,
    finish_after: Annotated[float, typer.Option(help="Seconds idle after which a log counts as finished")] = 600.0,
    segment_idle: Annotated[float, typer.Option(help="Seconds idle after which a W&B segment is closed")] = 30.0,
    log_checkpoint: LogCheckpointOpt = False,
    log_checkpoint_metadata: LogCheckpointMetadataOpt = False,
    checkpoint_settle: Annotated[float, typer.Option(help="Seconds a checkpoint must stay unchanged between two looks")] = 2.0,
    checkpoint_incomplete_after: IncompleteAfterOpt = 600.0,
    num_eval_images: NumEvalImagesOpt = 100,
    bbox_score_thr: BboxScoreThrOpt = 0.3,
    log_level: LogLevelOpt = "INFO",
) -> None:
    """Follow every work_dir under the roots, live, until SIGTERM or Ctrl-C."""
    root_paths = _roots(roots)
    evaluation = _eval_options(num_eval_images, bbox_score_thr)
    home, db = _setup(data_dir, root_paths, log_level)
    ckpt = _checkpoint_options(home, log_checkpoint, log_checkpoint_metadata, checkpoint_incomplete_after, evaluation, checkpoint_settle)
    writer = _writer(db, home, project, entity, ckpt, evaluation, segment_idle_s=segment_idle)
    options = ServiceOptions(
        roots=tuple(root_paths),
        ingest=IngestOptions(fresh_launch=fresh_launch, finish_idle_s=finish_after),
        checkpoints=ckpt,
        evaluation=evaluation,
        scan_interval_s=scan_interval,
        poll_interval_s=poll_interval,
        use_events=not poll,
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    logging.getLogger("mmdet_wandb").info("watching %s (W&B mode %s, data in %s)", ", ".join(map(str, root_paths)), writer.options.mode, home.path)
    Uploader(db, writer, options).watch(stop)


@app.command()
def backfill(
    roots: Annotated[list[Path], typer.Argument(help="Finished work_dirs, or folders of them")],
    data_dir: DataDirOpt = None,
    project: ProjectOpt = None,
    entity: EntityOpt = None,
    fresh_launch: FreshOpt = FreshLaunch.NEW_RUN,
    progress: Annotated[bool, typer.Option(help="Show progress bars")] = True,
    log_checkpoint: LogCheckpointOpt = False,
    log_checkpoint_metadata: LogCheckpointMetadataOpt = False,
    checkpoint_incomplete_after: IncompleteAfterOpt = 10.0,
    num_eval_images: NumEvalImagesOpt = 100,
    bbox_score_thr: BboxScoreThrOpt = 0.3,
    evaluate: Annotated[bool, typer.Option("--evaluate", help="Run the eval jobs in this process too (needs the eval extra), so the tables go out in this pass")] = False,
    device: DeviceOpt = None,
    batch_size: BatchSizeOpt = 4,
    log_level: LogLevelOpt = "WARNING",
) -> None:
    """Upload finished work_dirs once and exit (running it again uploads nothing twice)."""
    root_paths = _roots(roots)
    evaluation = _eval_options(num_eval_images, bbox_score_thr)
    home, db = _setup(data_dir, root_paths, log_level)
    ckpt = _checkpoint_options(home, log_checkpoint, log_checkpoint_metadata, checkpoint_incomplete_after, evaluation)
    writer = _writer(db, home, project, entity, ckpt, evaluation)
    options = ServiceOptions(
        roots=tuple(root_paths), ingest=IngestOptions(fresh_launch=fresh_launch, finish_idle_s=0.0), checkpoints=ckpt,
        evaluation=evaluation,
    )
    uploader = Uploader(db, writer, options)
    run_jobs = _in_process_worker(db, device, batch_size) if evaluate and evaluation is not None else None
    if not progress:
        uploader.backfill(evaluate=run_jobs)
    else:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err) as bar:
            tasks: dict[str, int] = {}

            def on_progress(stage: str, done: int, total: int) -> None:
                if stage not in tasks:
                    tasks[stage] = bar.add_task("reading logs" if stage == "read" else "uploading rows", total=total)
                bar.update(tasks[stage], completed=done, total=max(total, done))

            uploader.backfill(on_progress, evaluate=run_jobs)
    _print_status(db, as_json=False, console=err)
    runs_dir = home.runs_dir
    if writer.options.mode == "offline":
        err.print(f"offline runs are in {runs_dir}; upload them with: wandb sync {runs_dir}/*/*/wandb/offline-run-*")


def _in_process_worker(db: Database, device: str | None, batch_size: int):  # type: ignore[no-untyped-def]
    from evaluator.worker import Worker, WorkerOptions, default_device

    worker = Worker(db, WorkerOptions(device=device or default_device(), batch_size=batch_size, exit_when_idle=True, poll_s=0.5))
    return lambda: worker.run(threading.Event())


@app.command()
def evaluate(
    data_dir: DataDirOpt = None,
    device: DeviceOpt = None,
    batch_size: BatchSizeOpt = 4,
    exit_when_idle: Annotated[bool, typer.Option("--exit-when-idle", help="Stop once no job is queued or running (batch use)")] = False,
    lease: Annotated[float, typer.Option(help="Seconds a claimed job stays ours without renewal (renewed every third of it)")] = 60.0,
    poll: Annotated[float, typer.Option(help="Seconds between looks for a job when the queue is empty")] = 2.0,
    log_level: LogLevelOpt = "INFO",
) -> None:
    """A worker: claims eval jobs, runs each checkpoint on the val subset, stores predictions for the uploader."""
    from evaluator.worker import Worker, WorkerOptions, default_device

    home, db = _setup(data_dir, [], log_level)
    options = WorkerOptions(device=device or default_device(), batch_size=batch_size, lease_s=lease, poll_s=poll,
                            exit_when_idle=exit_when_idle)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    done = Worker(db, options).run(stop)
    err.print(f"worker {options.worker_id}: {done} job(s) done")


@app.command()
def requeue(
    job_ids: Annotated[Optional[list[int]], typer.Argument(help="Parked (dead) jobs to retry [default: all of them]")] = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Give parked eval jobs a fresh set of attempts (after fixing what made them fail)."""
    from evaluator import queue

    home = paths.resolve(data_dir)
    db = Database(home.db_url)
    db.upgrade()
    err.print(f"requeued {queue.requeue(db, job_ids or None)} job(s)")


@app.command("status")
def status_command(
    data_dir: DataDirOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
) -> None:
    """Work_dirs, their W&B runs, rows pending/uploaded, and problems found."""
    home = paths.resolve(data_dir)
    if not (home.path / "state.db").exists() and "MMDET_WANDB_DB_URL" not in os.environ:
        err.print(f"no state in {home.path} yet: run `mmdet-wandb watch` or `backfill` first")
        raise typer.Exit(1)
    db = Database(home.db_url)
    db.upgrade()
    _print_status(db, as_json=as_json, console=Console(width=None if sys.stdout.isatty() else 160))


@app.command("clean-store")
def clean_store_command(data_dir: DataDirOpt = None) -> None:
    """Delete pinned checkpoints that `wandb sync` has uploaded (offline mode keeps them until then)."""
    home = paths.resolve(data_dir)
    db = Database(home.db_url)
    db.upgrade()
    removed, kept = checkpoints.clean_store(db)
    err.print(f"removed {removed} pinned checkpoint(s); kept {kept} whose segment is not synced yet")


def _print_status(db: Database, *, as_json: bool, console: Console) -> None:
    statuses = status.collect(db)
    if as_json:
        print(json.dumps(status.as_json(statuses, status.problems(db)), indent=2))
        return
    table = Table(title="mmdet-wandb status")
    for column in ("work_dir", "logs", "W&B run", "uploaded", "pending", "checkpoints", "eval jobs", "problems / last error"):
        table.add_column(column, overflow="fold")
    for s in statuses:
        runs = s.runs or [None]
        for index, run in enumerate(runs):
            dead_job = next((j for j in reversed(s.eval_jobs) if j["state"] == "dead"), None)
            error = (
                (run.last_error if run and run.last_error else None)
                or (s.last_problem if index == 0 else None)
                or (f"eval job {dead_job['id']} ({dead_job['checkpoint']}): {dead_job['last_error']}" if index == 0 and dead_job else None)
            )
            table.add_row(
                s.path if index == 0 else "",
                str(s.logs) if index == 0 else "",
                f"{run.wandb_id} {run.name}" if run else "-",
                str(run.rows_uploaded) if run else "0",
                str(run.rows_pending) if run else "0",
                ", ".join(f"{n} {state}" for state, n in s.checkpoint_counts().items()) if index == 0 else "",
                ", ".join(f"{n} {state}" for state, n in s.eval_job_counts().items()) if index == 0 else "",
                (f"{s.problems} problem(s); " if index == 0 and s.problems else "") + (error or ""),
            )
    console.print(table)


def main() -> None:
    """Console entry point: an unexpected failure is one clear line (the traceback with --log-level DEBUG)."""
    try:
        app()
    except Exception as exc:  # typer.Exit and SystemExit pass through
        logging.getLogger("mmdet_wandb").debug("unhandled error", exc_info=True)
        err.print(f"[red]error:[/red] {type(exc).__name__}: {exc}")
        sys.exit(1)


if __name__ == "__main__":
    main()

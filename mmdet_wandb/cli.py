"""`mmdet-wandb`: watch work_dirs live, backfill finished ones, evaluate checkpoints, and show what the service knows."""
from __future__ import annotations

import gc

gc.disable()  # the start-up's imports: resumed by `_started`

import enum
import functools
import json
import logging
import math
import os
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from common import stacks
from db import nodes
from db.session import Database
from mmdet_wandb import heartbeat, logs, paths, settings, status, status_table
from uploader import discovery, hook_options
from uploader.ingest import FreshLaunch, IngestOptions
from uploader.parsers import config_source, log_header

if TYPE_CHECKING:
    from uploader.loop import Loop

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, pretty_exceptions_enable=False)
err = status_table.console(sys.stderr)  # a terminal at its width (or COLUMNS), pipes get whole rows

def _seconds(value: float) -> float:
    """The timing flags: a finite number of seconds above 0 (click's ranges let nan through)."""
    if not math.isfinite(value) or value <= 0:
        raise typer.BadParameter(f"{value!r}: a finite number of seconds above 0 is expected")
    return value


def _seconds_or_now(value: float) -> float:
    """`--checkpoint-incomplete-after`: 0 is meaningful (a broken, still checkpoint is incomplete at once)."""
    if not math.isfinite(value) or value < 0:
        raise typer.BadParameter(f"{value!r}: a finite number of seconds, 0 or more, is expected")
    return value


class LogFormat(str, enum.Enum):
    TEXT = "text"
    JSON = "json"


DataDirOpt = Annotated[
    Optional[Path],
    typer.Option("--data-dir", help="State DB and offline runs (env: MMDET_WANDB_HOME; default ~/.local/share/mmdet-wandb)"),
]
FreshOpt = Annotated[
    FreshLaunch,
    typer.Option(help="A fresh (not resumed) launch in a work_dir that already has a run: new-run or same-run"),
]
LogLevelOpt = Annotated[str, typer.Option(help="Log level: DEBUG, INFO, WARNING, ERROR")]
LogFormatOpt = Annotated[LogFormat, typer.Option(help="Log lines as text, or one JSON object per line")]
IncompleteAfterOpt = Annotated[float, typer.Option(callback=_seconds_or_now, help="Seconds a checkpoint may stay still but broken before it is marked incomplete (0: at once)")]
DeviceOpt = Annotated[Optional[str], typer.Option(help="cuda:N or cpu (default: cuda:0 when a GPU is visible, else cpu)")]
NodeOpt = Annotated[Optional[str], typer.Option("--node", envvar="MMDET_WANDB_NODE", show_envvar=False, help="This uploader's name in a shared state DB: it reads and changes only its own rows (env: MMDET_WANDB_NODE; default: the host name)")]
DatasetRootOpt = Annotated[Optional[list[Path]], typer.Option("--dataset-root", help="Where relative dataset paths of training configs are looked for first; repeatable (env: MMDET_WANDB_DATASET_ROOTS, separated by ':')")]
JobsOpt = Annotated[Optional[int], typer.Option("--jobs", "-j", min=1, help="Processes that read and upload disjoint work_dirs, each with its own W&B client (default: half the cores, at most 8)")]
LogTimezoneOpt = Annotated[Optional[str], typer.Option("--log-timezone", help="IANA zone of the training hosts, for the naive times in logs (env: MMDET_WANDB_LOG_TIMEZONE; config file: log_timezone; default: this machine's zone)")]
WandbTimeoutOpt = Annotated[Optional[float], typer.Option("--wandb-timeout", help="Online: seconds one W&B start, finish or the artifact commits of a segment may take before it counts as failed (env: MMDET_WANDB_TIMEOUT; default: 60)", show_default=False)]
ForgetAfterOpt = Annotated[Optional[float], typer.Option("--forget-after", help="Seconds after which the state of a work_dir deleted from disk, with nothing left to upload, is forgotten: if it comes back later it is new (env: MMDET_WANDB_FORGET_AFTER; default: 604800, 7 days)", show_default=False)]
MetricsPortOpt = Annotated[Optional[int], typer.Option("--metrics-port", help="Serve Prometheus metrics, /healthz and /readyz on this TCP port (env: MMDET_WANDB_METRICS_PORT; default: off)", show_default=False)]
MetricsAddrOpt = Annotated[Optional[str], typer.Option("--metrics-addr", help="The address the metrics port listens on (env: MMDET_WANDB_METRICS_ADDR; default: 127.0.0.1)", show_default=False)]
MetricsWorkDirLabelsOpt = Annotated[Optional[int], typer.Option("--metrics-work-dir-labels", help="Rows read, uploaded and pending per work_dir for the N work_dirs discovered last (env: MMDET_WANDB_METRICS_WORK_DIR_LABELS; default: 0, totals only)", show_default=False)]
BatchSizeOpt = Annotated[int, typer.Option(min=1, help="Images per inference batch (halved on CUDA out of memory)")]
# What code from the work_dirs the evaluator may run (CLI > env > config file > none; README "Security model")
TrustCheckpointsOpt = Annotated[Optional[bool], typer.Option("--trust-checkpoints", help="Load checkpoints with the full unpickler (weights_only=False), which runs any code a checkpoint holds (env: MMDET_WANDB_TRUST_CHECKPOINTS; config file: trust_checkpoints; default: the weights-only unpickler with an allowlist)", show_default=False)]
TrustConfigsOpt = Annotated[Optional[bool], typer.Option("--trust-configs", help="Import whatever modules a config's custom_imports name (env: MMDET_WANDB_TRUST_CONFIGS; config file: trust_configs; default: only --allow-import's)", show_default=False)]
AllowImportOpt = Annotated[Optional[list[str]], typer.Option("--allow-import", metavar="MODULE", help="A module (with its submodules) that a config's custom_imports may import; repeatable (env: MMDET_WANDB_ALLOW_IMPORT, comma-separated; config file: allow_import, a list)", show_default=False)]

# The hook's options (CLI > MMDET_WANDB_<OPTION> > config file > MMDetWandbHook entry > defaults; see `config show`)
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", help="TOML or YAML file of the hook's options (env: MMDET_WANDB_CONFIG; default: <data dir>/config.toml if present)")]
ProjectOpt = Annotated[Optional[str], typer.Option(help="W&B project (init_kwargs.project) (env: WANDB_PROJECT)")]
EntityOpt = Annotated[Optional[str], typer.Option(help="W&B entity (init_kwargs.entity) (env: WANDB_ENTITY)")]
InitKwargsOpt = Annotated[Optional[str], typer.Option(help="JSON object passed to wandb.init, as the hook's init_kwargs (env: MMDET_WANDB_INIT_KWARGS)")]
IntervalOpt = Annotated[Optional[int], typer.Option(help="A train row every k iterations, as the hook's interval (env: MMDET_WANDB_INTERVAL; default: every row of the log)")]
LogCheckpointOpt = Annotated[Optional[bool], typer.Option("--log-checkpoint/--no-log-checkpoint", help="Each finished checkpoint as a version of run_<id>_model (env: MMDET_WANDB_LOG_CHECKPOINT; default: off)", show_default=False)]
LogCheckpointMetadataOpt = Annotated[Optional[bool], typer.Option("--log-checkpoint-metadata/--no-log-checkpoint-metadata", help="The eval metrics of the checkpoint's own epoch/iter in its metadata (env: MMDET_WANDB_LOG_CHECKPOINT_METADATA; default: off)", show_default=False)]
NumEvalImagesOpt = Annotated[Optional[int], typer.Option(help="Val images in the tables; each finished checkpoint gets an eval job; 0 turns tables off (env: MMDET_WANDB_NUM_EVAL_IMAGES; default: 100)")]
BboxScoreThrOpt = Annotated[Optional[float], typer.Option(help="Predicted boxes and masks with a score above this (env: MMDET_WANDB_BBOX_SCORE_THR; default: 0.3)")]
EvalClasswiseOpt = Annotated[Optional[bool], typer.Option("--eval-classwise/--no-eval-classwise", help="Per-class AP, AP50, AP75, recall and PR curves of each evaluated checkpoint (env: MMDET_WANDB_EVAL_CLASSWISE; default: on)", show_default=False)]
ConfusionScoreThrOpt = Annotated[Optional[float], typer.Option(help="Detections scoring at least this count in the confusion matrix and the per-image errors, as the analysis tool's --score-thr (env: MMDET_WANDB_CONFUSION_SCORE_THR; default: 0.3)")]
ConfusionIouThrOpt = Annotated[Optional[float], typer.Option(help="IoU at which a detection matches a ground-truth box in the confusion matrix, as the analysis tool's --tp-iou-thr (env: MMDET_WANDB_CONFUSION_IOU_THR; default: 0.5)")]
EvalFullValOpt = Annotated[Optional[bool], typer.Option("--eval-full-val/--no-eval-full-val", help="The metrics, per-class AP, PR curves and confusion matrix over the whole val set (the model runs on every val image); the tables stay on the subset (env: MMDET_WANDB_EVAL_FULL_VAL; default: off, the subset)", show_default=False)]


def _fail(message: str) -> typer.Exit:
    if not logs.report(f"error: {message}", logging.ERROR):
        err.print(f"[red]error:[/red] {escape(message)}")
    return typer.Exit(2)


def _tell(message: str) -> None:
    """A command's own line on stderr: as text, or one JSON object with JSON logs."""
    if not logs.report(message):
        err.print(escape(message))


_held: list[object] = []  # the uploader lock, held until the process ends


def _started() -> None:
    """The end of a command's start-up: Python's cyclic garbage collector, paused since this module's first line,
    goes on. The start-up imports ~1 M objects that live as long as the process and makes next to no garbage:
    collecting during it cost ~10 % of the CPU of a restart (0.13-0.16 s, ~320 collections that freed ~1,000
    objects). They are frozen (`gc.freeze`), so that no later full collection of a months-long service walks
    them again. An uploader calls it once its loop is built, every other command when it opens the DB."""
    gc.freeze()
    gc.enable()


def _setup(
    data_dir: Path | None, roots: list[Path], level: str, log_format: LogFormat, service: str, node: str | None = None,
) -> tuple[paths.DataDir, Database]:
    """Logging, the data dir (locked for an uploader: `watch` or `backfill`), and the state DB, migrated; an
    uploader is the node `node` and adopts rows that predate nodes."""
    if service == "evaluator":
        _started()
    logs.setup(level, log_format.value, service)
    home = paths.resolve(data_dir)
    try:
        home.prepare(roots)
        if service != "evaluator":
            _held.append(home.lock_uploader("watch" if service == "uploader" else service))
    except paths.DataDirError as exc:
        raise _fail(str(exc)) from None
    db = Database(home.db_url, node=node or nodes.default_node())
    created = db.upgrade()
    if service != "evaluator" and not created:
        nodes.adopt_rows_without_node(db)
    return home, db


def _roots(given: list[Path]) -> list[Path]:
    roots = []
    for root in given:
        if not root.is_dir():
            raise _fail(f"{root} is not a directory")
        roots.append(root.resolve())
    return roots


def _settings(home: paths.DataDir, hook: settings.HookFlags = settings.HookFlags(),
              service: settings.ServiceFlags = settings.ServiceFlags()) -> settings.Settings:
    try:
        return settings.load(home.path, hook, service)
    except settings.SettingsError as exc:
        raise _fail(str(exc)) from None


def _sync_backlog(db: Database, home: paths.DataDir, config: settings.Settings, stop: threading.Event) -> None:
    """Online, a node's offline segments not yet synced (it ran offline before) go first, as `mmdet-wandb sync`
    sends them; a run whose backlog does not go through uploads nothing live until it does (tried again each
    `BACKLOG_EVERY_S`, its backoff respected, as a later `sync` would)."""
    from uploader.wandb.sync import SyncOptions, Syncer

    syncer = Syncer(db, SyncOptions(home.path / "sync", config.wandb_timeout_s))
    for wandb_id, todo in syncer.plan().items():
        if stop.is_set():
            return
        outcome = syncer.sync_run(wandb_id, todo)
        if outcome.backing_off:
            continue
        if outcome.error:
            logging.getLogger("mmdet_wandb").warning("run %s: offline backlog not synced (%s); its live upload waits", wandb_id, outcome.error)
        else:
            logging.getLogger("mmdet_wandb").info("run %s: offline backlog synced (%d segment(s), %d row(s))",
                                                  wandb_id, outcome.synced, outcome.rows_sent)


def _uploader(db: Database, home: paths.DataDir, roots: list[Path], config: settings.Settings, fresh_launch: FreshLaunch, *,
              finish_idle_s: float, writer: dict[str, float], checkpoints: dict[str, float], loop: dict[str, Any]) -> Loop:
    """The one way `watch` and `backfill` build their loop and its W&B writer (imported here: wandb is the CLI's
    heaviest import, and status, doctor, ... need none)."""
    from uploader.checkpoints import CheckpointOptions
    from uploader.loop import Loop, LoopOptions
    from uploader.wandb.mode import resolve_mode
    from uploader.wandb.writer import WandbWriter, WriterOptions

    mode = resolve_mode()
    if mode != "online":
        loop = {**loop, "sync_backlog": None}  # offline: nothing to sync to
    options = WriterOptions(runs_dir=home.runs_dir, mode=mode, layers=config.layers, media_dir=home.media_dir,
                            wandb_timeout_s=config.wandb_timeout_s, **writer)
    ckpt = CheckpointOptions(store_dir=home.store_dir, layers=config.layers, **checkpoints)
    ingest = IngestOptions(fresh_launch=fresh_launch, finish_idle_s=finish_idle_s, layers=config.layers, log_timezone=config.log_timezone)
    return Loop(db, WandbWriter(db, options), LoopOptions(roots=tuple(roots), ingest=ingest, checkpoints=ckpt, **loop))


def _metrics(config: settings.Settings, db: Database, node: str | None, beat: Path) -> None:
    """The metrics endpoint when a port is set; a port in use or an address that does not resolve stops the start."""
    if config.metrics_port is None:
        return
    from mmdet_wandb import metrics

    try:
        _held.append(metrics.serve(config.metrics_addr, config.metrics_port, db, node, beat, config.metrics_work_dir_labels))
    except OSError as exc:
        raise _fail(f"--metrics-addr {config.metrics_addr} --metrics-port {config.metrics_port}: cannot listen: "
                    f"{exc.strerror or exc}") from None
    _tell(f"metrics on http://{config.metrics_addr}:{config.metrics_port}/metrics")


def _stop_on_signals() -> threading.Event:
    """SIGTERM/SIGINT: finish the transaction in hand, close the open segments, exit."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


@app.command()
def watch(
    roots: Annotated[list[Path], typer.Argument(help="Work_dirs, or folders of work_dirs, to follow")],
    data_dir: DataDirOpt = None,
    config_file: ConfigOpt = None, project: ProjectOpt = None, entity: EntityOpt = None, init_kwargs: InitKwargsOpt = None,
    interval: IntervalOpt = None, log_checkpoint: LogCheckpointOpt = None, log_checkpoint_metadata: LogCheckpointMetadataOpt = None,
    num_eval_images: NumEvalImagesOpt = None, bbox_score_thr: BboxScoreThrOpt = None,
    eval_classwise: EvalClasswiseOpt = None, confusion_score_thr: ConfusionScoreThrOpt = None, confusion_iou_thr: ConfusionIouThrOpt = None,
    eval_full_val: EvalFullValOpt = None,
    fresh_launch: FreshOpt = FreshLaunch.NEW_RUN,
    poll: Annotated[bool, typer.Option("--poll", help="No filesystem events (NFS, FUSE): poll and scan only")] = False,
    scan_interval: Annotated[float, typer.Option(callback=_seconds, help="Seconds between full scans of the roots")] = 10.0,
    poll_interval: Annotated[float, typer.Option(callback=_seconds, help="Seconds between stat checks of known logs")] = 0.5,
    finish_after: Annotated[float, typer.Option(callback=_seconds, help="Seconds idle after which a log counts as finished")] = 600.0,
    segment_idle: Annotated[float, typer.Option(callback=_seconds, help="Seconds idle after which a W&B segment is closed")] = 30.0,
    checkpoint_settle: Annotated[float, typer.Option(callback=_seconds, help="Seconds a checkpoint must stay unchanged between two looks")] = 2.0,
    checkpoint_incomplete_after: IncompleteAfterOpt = 600.0,
    wandb_timeout: WandbTimeoutOpt = None,
    log_timezone: LogTimezoneOpt = None,
    jobs: JobsOpt = None,
    node: NodeOpt = None,
    metrics_port: MetricsPortOpt = None,
    metrics_addr: MetricsAddrOpt = None,
    metrics_work_dir_labels: MetricsWorkDirLabelsOpt = None,
    forget_after: ForgetAfterOpt = None,
    log_level: LogLevelOpt = "INFO",
    log_format: LogFormatOpt = LogFormat.TEXT,
) -> None:
    """Follow every work_dir under the roots, live, until SIGTERM or Ctrl-C. A backlog at start (16 work_dirs or
    more with unread lines) is caught up by `--jobs` processes first."""
    from uploader import shards

    hook = settings.HookFlags(config_file, project, entity, init_kwargs, interval, log_checkpoint, log_checkpoint_metadata,
                              num_eval_images, bbox_score_thr, eval_classwise, confusion_score_thr, confusion_iou_thr,
                              eval_full_val)
    root_paths = _roots(roots)
    home, db = _setup(data_dir, root_paths, log_level, log_format, "uploader", node)
    from uploader.wandb.writer import start_client

    start_client()  # now (wandb's folders are set in the environment): wandb-core starts while the loop is set up
    config = _settings(home, hook, settings.ServiceFlags(log_timezone=log_timezone, wandb_timeout=wandb_timeout,
                                                         metrics_port=metrics_port, metrics_addr=metrics_addr,
                                                         metrics_work_dir_labels=metrics_work_dir_labels, forget_after=forget_after))
    _metrics(config, db, db.node, home.heartbeat("uploader"))
    uploader = _uploader(db, home, root_paths, config, fresh_launch, finish_idle_s=finish_after,
                         writer={"segment_idle_s": segment_idle},
                         checkpoints={"settle_s": checkpoint_settle, "incomplete_after_s": checkpoint_incomplete_after},
                         loop={"scan_interval_s": scan_interval, "poll_interval_s": poll_interval, "use_events": not poll,
                               "forget_after_s": config.forget_after_s,
                               "sync_backlog": lambda stop: _sync_backlog(db, home, config, stop)})
    _started()
    stop = _stop_on_signals()
    logging.getLogger("mmdet_wandb").info("watching %s (W&B mode %s, data in %s)", ", ".join(map(str, root_paths)),
                                          uploader.writer.options.mode, home.path)
    beat = heartbeat.Heartbeat(home.heartbeat("uploader")).beat
    shards.read_and_upload_in_shares(uploader, jobs or shards.default_jobs(), stop,
                                     functools.partial(logs.setup, log_level, log_format.value, "uploader"),
                                     min_work_dirs=shards.WATCH_CATCH_UP_MIN, on_tick=beat)
    uploader.watch(stop, on_tick=beat)


@app.command()
def backfill(
    roots: Annotated[list[Path], typer.Argument(help="Finished work_dirs, or folders of them")],
    data_dir: DataDirOpt = None,
    config_file: ConfigOpt = None, project: ProjectOpt = None, entity: EntityOpt = None, init_kwargs: InitKwargsOpt = None,
    interval: IntervalOpt = None, log_checkpoint: LogCheckpointOpt = None, log_checkpoint_metadata: LogCheckpointMetadataOpt = None,
    num_eval_images: NumEvalImagesOpt = None, bbox_score_thr: BboxScoreThrOpt = None,
    eval_classwise: EvalClasswiseOpt = None, confusion_score_thr: ConfusionScoreThrOpt = None, confusion_iou_thr: ConfusionIouThrOpt = None,
    eval_full_val: EvalFullValOpt = None,
    evaluate: Annotated[bool, typer.Option("--evaluate", help="Run the eval jobs in this process too (needs the eval extra), so the tables go out in this pass")] = False,
    device: DeviceOpt = None,
    batch_size: BatchSizeOpt = 4,
    dataset_root: DatasetRootOpt = None,
    trust_checkpoints: TrustCheckpointsOpt = None,
    trust_configs: TrustConfigsOpt = None,
    allow_import: AllowImportOpt = None,
    fresh_launch: FreshOpt = FreshLaunch.NEW_RUN,
    jobs: JobsOpt = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars")] = True,
    checkpoint_incomplete_after: IncompleteAfterOpt = 10.0,
    wandb_timeout: WandbTimeoutOpt = None,
    log_timezone: LogTimezoneOpt = None,
    node: NodeOpt = None,
    log_level: LogLevelOpt = "WARNING",
    log_format: LogFormatOpt = LogFormat.TEXT,
) -> None:
    """Upload finished work_dirs once and exit (running it again uploads nothing twice; SIGTERM stops it
    cleanly with exit status 143, and running it again finishes the work)."""
    from mmdet_wandb import eval_runner
    from uploader import shards

    hook = settings.HookFlags(config_file, project, entity, init_kwargs, interval, log_checkpoint, log_checkpoint_metadata,
                              num_eval_images, bbox_score_thr, eval_classwise, confusion_score_thr, confusion_iou_thr,
                              eval_full_val)
    service = settings.ServiceFlags(log_timezone, trust_checkpoints, trust_configs, tuple(allow_import or ()) or None,
                                    tuple(dataset_root or ()) or None, wandb_timeout)
    root_paths = _roots(roots)
    home, db = _setup(data_dir, root_paths, log_level, log_format, "backfill", node)
    config = _settings(home, hook, service)
    uploader = _uploader(db, home, root_paths, config, fresh_launch, finish_idle_s=0.0, writer={},
                         checkpoints={"incomplete_after_s": checkpoint_incomplete_after}, loop={})
    _started()
    writer = uploader.writer
    stop = _stop_on_signals()
    if writer.options.mode == "online":
        _sync_backlog(db, home, config, stop)  # its runs' live rows wait for it
    waiting: list[str] = []
    workers = eval_runner.WorkerFlags(device, batch_size, config.dataset_roots, config.config_file, config.trust) if evaluate else None
    run_jobs = (lambda: waiting.extend(eval_runner.evaluate_all(db, home.path, workers, stop))) if workers else None
    started = shards.read_and_upload_in_shares(uploader, jobs or shards.default_jobs(), stop,
                                               functools.partial(logs.setup, log_level, log_format.value, "backfill"))
    progress = progress and log_format is LogFormat.TEXT  # with JSON logs, stderr holds JSON lines only
    if started and progress:
        err.print(f"read and uploaded in {started} processes; now checkpoints, artifacts and what is left")
    if not progress:
        uploader.backfill(evaluate=run_jobs, stop=stop, warm_up=not started)
    else:
        # refreshed by the updates, not by a thread of rich's: backfill forks its reader only while it has no thread
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err,
                      auto_refresh=False) as bar:
            tasks: dict[str, int] = {}

            def on_progress(stage: str, done: int, total: int) -> None:
                if stage not in tasks:
                    tasks[stage] = bar.add_task("reading logs" if stage == "read" else "uploading rows", total=total)
                bar.update(tasks[stage], completed=done, total=max(total, done), refresh=True)

            uploader.backfill(on_progress, evaluate=run_jobs, stop=stop, warm_up=not started)
    status_table.print_status(db, as_json=False, out=err if log_format is LogFormat.TEXT else status_table.console(sys.stdout), node=db.node)
    for line in waiting:
        _tell(line)
    if writer.options.mode == "offline":
        _tell(f"offline runs are in {home.runs_dir}; upload them with: mmdet-wandb sync")
    if stop.is_set():
        _tell("interrupted: what was read is stored and what was uploaded is closed; run backfill again to finish")
        raise typer.Exit(143)
    if writer.unreachable():
        pending = sum(r.rows_pending for w in status.collect(db, db.node) for r in w.runs)
        _tell(f"W&B is unreachable ({writer.circuit.error}): {pending} row(s) stay pending; run backfill again "  # type: ignore[union-attr]
                  "once it answers")
        raise typer.Exit(1)
    held = [p for p in status.problems(db, db.node) if p["kind"] == "hook_options" and p["resolved_at"] is None]
    if held:
        _tell(f"{len(held)} log(s) held by a bad value in their MMDetWandbHook entry (see above, or `config show`): "
                  "nothing of them is uploaded until it is fixed")
        raise typer.Exit(1)
    unsynced = [r for w in status.collect(db, db.node) for r in w.runs
                if writer.options.mode == "online" and r.segments_to_sync and (r.rows_pending or r.artifacts_pending)]
    if unsynced:
        _tell(f"{len(unsynced)} run(s) wait for their offline segments to sync first (see above): their new rows stay "
              "pending until `mmdet-wandb sync` confirms them")
        raise typer.Exit(1)
    failing = [r for w in status.collect(db, db.node) for r in w.runs if (r.rows_pending or r.artifacts_pending) and r.last_error]
    if failing:
        _tell(f"{len(failing)} run(s) could not be uploaded (see the last error above); their rows and artifacts stay "
                  "pending: run backfill again once the cause is fixed")
        raise typer.Exit(1)


def _refuse_secrets() -> None:
    """The evaluator runs code from the work_dirs and never talks to W&B: it must not hold the key."""
    if os.environ.get("WANDB_API_KEY"):
        raise _fail("WANDB_API_KEY is set: the evaluator runs code from work_dirs and never talks to W&B, so it holds no key "
                    "(unset it, or --allow-secrets)")


@app.command()
def evaluate(
    data_dir: DataDirOpt = None,
    device: DeviceOpt = None,
    batch_size: BatchSizeOpt = 4,
    exit_when_idle: Annotated[bool, typer.Option("--exit-when-idle", help="Stop once no job is queued or running (batch use)")] = False,
    lease: Annotated[float, typer.Option(callback=_seconds, help="Seconds a claimed job stays ours without renewal (renewed every third of it)")] = 60.0,
    poll: Annotated[float, typer.Option(callback=_seconds, help="Seconds between looks for a job when the queue is empty")] = 2.0,
    dataset_root: DatasetRootOpt = None,
    stack: Annotated[Optional[str], typer.Option("--stack", help="mmdet2 or mmdet3: the stack this environment must have (./dev.sh picks the environment by it; default: the one installed)")] = None,
    trust_checkpoints: TrustCheckpointsOpt = None,
    trust_configs: TrustConfigsOpt = None,
    allow_import: AllowImportOpt = None,
    allow_secrets: Annotated[bool, typer.Option("--allow-secrets", help="Start even with WANDB_API_KEY in the environment (refused by default: this worker runs code from work_dirs)")] = False,
    config_file: ConfigOpt = None,
    metrics_port: MetricsPortOpt = None,
    metrics_addr: MetricsAddrOpt = None,
    metrics_work_dir_labels: MetricsWorkDirLabelsOpt = None,
    log_level: LogLevelOpt = "INFO",
    log_format: LogFormatOpt = LogFormat.TEXT,
) -> None:
    """A worker: claims the eval jobs of the MMDetection stack installed here (mmdet 2.x or 3.x), runs each
    checkpoint on the val subset, stores predictions for the uploader."""
    from evaluator.worker import Worker, WorkerOptions, default_device, missing_device

    if not allow_secrets:
        _refuse_secrets()
    if device and (missing := missing_device(device)):
        raise _fail(missing)
    installed = stacks.installed()
    if installed is None or (stack is not None and stack != installed):
        raise _fail(f"this environment has {installed or 'no MMDetection stack'}{f', not {stack}' if stack else ''}: install one with "
                    "tools/install.sh VENV eval (mmdet 2.x) or tools/install.sh VENV mmdet3")
    home, db = _setup(data_dir, [], log_level, log_format, "evaluator")
    config = _settings(home, settings.HookFlags(config=config_file), settings.ServiceFlags(
        trust_checkpoints=trust_checkpoints, trust_configs=trust_configs, allow_import=tuple(allow_import or ()) or None,
        dataset_roots=tuple(dataset_root or ()) or None, metrics_port=metrics_port, metrics_addr=metrics_addr,
        metrics_work_dir_labels=metrics_work_dir_labels))
    _metrics(config, db, None, home.heartbeat("evaluator"))
    options = WorkerOptions(stack=installed, device=device or default_device(), batch_size=batch_size, lease_s=lease, poll_s=poll,
                            exit_when_idle=exit_when_idle, dataset_roots=config.dataset_roots, trust=config.trust)
    stop = _stop_on_signals()
    done = Worker(db, options).run(stop, on_tick=heartbeat.Heartbeat(home.heartbeat("evaluator")).beat)
    _tell(f"worker {options.worker_id}: {done} job(s) done")


@app.command()
def requeue(
    job_ids: Annotated[Optional[list[int]], typer.Argument(help="Parked (dead) jobs to retry (default: all of them)")] = None,
    drop: Annotated[bool, typer.Option("--drop", help="Instead of retrying them, release the checkpoint pins they hold (they stay dead)")] = False,
    data_dir: DataDirOpt = None,
    node: NodeOpt = None,
) -> None:
    """Give parked eval jobs a fresh set of attempts (after fixing what made them fail), or drop their pins."""
    from db import jobs
    from uploader import eval_queue

    db = _existing_db(data_dir, node)
    if drop:
        err.print(f"released the checkpoint pins of {eval_queue.unlink(jobs.drop(db, job_ids or None))} dead job(s)")
        return
    requeued, unpinned = jobs.requeue(db, job_ids or None)
    err.print(f"requeued {requeued} job(s)")
    if unpinned:
        err.print(f"not requeued (their checkpoint pin was dropped): {', '.join(map(str, unpinned))}")


@app.command()
def retry(
    runs: Annotated[Optional[list[str]], typer.Argument(help="W&B run ids to retry (default: every run backing off)")] = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Try runs that failed to upload again on the uploader's next pass, instead of after their backoff."""
    from db.segments import retry_now

    err.print(f"{retry_now(_existing_db(data_dir), runs or None)} run(s) will be tried on the next pass")


config_app = typer.Typer(no_args_is_help=True, help="The hook's options as the service resolves them")
app.add_typer(config_app, name="config")


@config_app.command("show")
def config_show(
    roots: Annotated[Optional[list[Path]], typer.Argument(help="Work_dirs (or folders of them) to show (default: every work_dir in the state DB)")] = None,
    data_dir: DataDirOpt = None,
    config_file: ConfigOpt = None, project: ProjectOpt = None, entity: EntityOpt = None, init_kwargs: InitKwargsOpt = None,
    interval: IntervalOpt = None, log_checkpoint: LogCheckpointOpt = None, log_checkpoint_metadata: LogCheckpointMetadataOpt = None,
    num_eval_images: NumEvalImagesOpt = None, bbox_score_thr: BboxScoreThrOpt = None,
    eval_classwise: EvalClasswiseOpt = None, confusion_score_thr: ConfusionScoreThrOpt = None, confusion_iou_thr: ConfusionIouThrOpt = None,
    eval_full_val: EvalFullValOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
) -> None:
    """The effective options of each work_dir and where each one comes from (given the same flags); what is not
    used is marked: init_kwargs keys the service sets itself, and bad values of the hook entry (the run is held
    until they are fixed). Exit 1 when a work_dir has a bad value."""
    flags = settings.HookFlags(config_file, project, entity, init_kwargs, interval, log_checkpoint, log_checkpoint_metadata,
                               num_eval_images, bbox_score_thr, eval_classwise, confusion_score_thr, confusion_iou_thr,
                               eval_full_val)
    home = paths.resolve(data_dir)
    layers = _settings(home, flags).layers
    hooks = _hook_entries(_roots(roots)) if roots else _hook_entries_in_db(home)
    resolved = {work_dir: hook_options.resolve(layers, hook, source) for work_dir, (hook, source, _) in hooks.items()}
    errors = {work_dir: [f"{s.hook_source}: {e}" for e in s.errors] + ([hooks[work_dir][2]] if hooks[work_dir][2] else [])
              for work_dir, s in resolved.items()}
    if as_json:
        print(json.dumps({w: {"values": s.values, "sources": s.sources, "errors": errors[w],
                              "dropped": {k: f"set by the service (from {v})" for k, v in s.dropped.items()}}
                          for w, s in resolved.items()}, indent=2, default=str))
    else:
        _print_options(resolved, errors)
    if any(errors.values()):
        raise typer.Exit(1)


def _print_options(resolved: dict[str, hook_options.HookOptions], errors: dict[str, list[str]]) -> None:
    console = status_table.console(sys.stdout)
    if not resolved:
        console.print("no work_dirs found")
    for work_dir, effective in resolved.items():
        table = Table(title=escape(work_dir), title_justify="left")
        for column in ("option", "value", "from"):
            table.add_column(column, overflow="fold")
        for name in hook_options.OPTIONS:
            table.add_row(name, escape(json.dumps(effective.values[name], default=str)), escape(effective.sources[name]))
        for key, origin in effective.dropped.items():
            table.add_row(f"init_kwargs.{key}", "[yellow]dropped[/]", escape(f"{origin}: the service sets {key} itself"))
        console.print(table)
        for message in errors[work_dir]:
            console.print(f"[red]not valid:[/] {escape(message)}; the run is held until it is fixed")


def _hook_entries(roots: list[Path]) -> dict[str, tuple[dict, str, str | None]]:
    """The MMDetWandbHook entry of each work_dir's newest training config, read from the files, and why the
    config cannot be read (a dump that is not valid Python holds the run)."""
    newest: dict[Path, discovery.FoundLog] = {}
    for root in roots:
        for found in discovery.scan(root).logs:
            if found.work_dir not in newest or found.launch > newest[found.work_dir].launch:
                newest[found.work_dir] = found
    entries = {}
    for work_dir, found in sorted(newest.items()):
        lookup = config_source.find(found, log_header.read(found))
        config = lookup.config
        hook = config.hook_options if config is not None else {}
        broken = f"{lookup.error_in}: {lookup.error}" if config is None and lookup.error is not None else None
        entries[str(work_dir)] = (hook, f"MMDetWandbHook in {config.name}" if config is not None and hook else "hook (none in the config)", broken)
    return entries


def _hook_entries_in_db(home: paths.DataDir) -> dict[str, tuple[dict, str, str | None]]:
    from sqlalchemy import select

    from db.models import Run, WorkDir

    db = _existing_db(home.path)
    entries = {}
    with db.read() as session:
        for path, hook_json, config_name in session.execute(
            select(WorkDir.path, Run.hook_options_json, Run.config_name).join(Run, Run.work_dir_id == WorkDir.id).order_by(WorkDir.path, Run.launch)
        ):
            hook = json.loads(hook_json or "{}")
            entries[path] = (hook, f"MMDetWandbHook in {config_name}" if hook else "hook (none in the config)", None)
    return entries


@app.command()
def doctor(
    roots: Annotated[Optional[list[Path]], typer.Argument(help="The roots the service watches")] = None,
    data_dir: DataDirOpt = None,
    dataset_root: DatasetRootOpt = None,
) -> None:
    """Check the set-up: state DB, W&B mode and credentials, inotify limits, each root's filesystem, and
    whether the val annotations of runs with eval jobs to run resolve here."""
    from mmdet_wandb import doctor as checks

    results = checks.run(paths.resolve(data_dir), [r.resolve() for r in roots or []], _doctor_roots(dataset_root))
    console = Console(width=None if sys.stdout.isatty() else 160)
    table = Table(title="mmdet-wandb doctor")
    for column in ("check", "result", "detail"):
        table.add_column(column, overflow="fold")
    style = {"ok": "green", "warn": "yellow", "fail": "red"}
    for check in results:
        table.add_row(check.name, f"[{style[check.level]}]{check.level}[/]", escape(check.detail))
    console.print(table)
    if any(c.level == "fail" for c in results):
        raise typer.Exit(1)


@app.command()
def health(
    service: Annotated[str, typer.Argument(help="uploader or evaluator")],
    data_dir: DataDirOpt = None,
    max_age: Annotated[float, typer.Option(help="Seconds since the service's last loop pass")] = heartbeat.MAX_AGE_S,
) -> None:
    """Exit 0 when the service's loop passed within --max-age seconds (a container healthcheck)."""
    age = heartbeat.age(paths.resolve(data_dir).heartbeat(service))
    if age is None or age > max_age:
        err.print(f"{service}: " + ("no heartbeat yet" if age is None else f"last loop pass {age:.0f} s ago"))
        raise typer.Exit(1)
    err.print(f"{service}: healthy (last loop pass {age:.1f} s ago)")


def _doctor_roots(given: list[Path] | None) -> tuple[Path, ...]:
    try:
        return settings.service_value("dataset_roots", tuple(given or ()) or None, os.environ, {}, None)
    except settings.SettingsError as exc:
        raise _fail(str(exc)) from None


def _existing_db(data_dir: Path | None, node: str | None = None) -> Database:
    """The state DB as it is (never migrated here); `node`: whose rows a command that changes some may touch."""
    _started()
    home = paths.resolve(data_dir)
    if not (home.path / "state.db").exists() and "MMDET_WANDB_DB_URL" not in os.environ:
        err.print(f"no state in {home.path} yet: run `mmdet-wandb watch` or `backfill` first")
        raise typer.Exit(1)
    db = Database(home.db_url, node=node or nodes.default_node())
    current, head = db.revisions()
    if current != head:  # only the services migrate: a command beside a running one must not change the schema
        err.print(f"the state DB has schema {current}, this mmdet-wandb needs {head}: start `watch` or `backfill` once to upgrade it")
        raise typer.Exit(1)
    return db


@app.command("status")
def status_command(
    data_dir: DataDirOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
    node: Annotated[Optional[str], typer.Option("--node", help="Only this uploader's work_dirs (default: every node's)")] = None,
) -> None:
    """Work_dirs, their W&B runs, rows pending/uploaded, and problems found."""
    db = _existing_db(data_dir)
    status_table.print_status(db, as_json=as_json, out=status_table.console(sys.stdout), node=node)


@app.command()
def sync(
    runs: Annotated[Optional[list[str]], typer.Argument(help="W&B run ids to sync (default: every run with offline segments to sync)")] = None,
    data_dir: DataDirOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would be sent, send nothing")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars")] = True,
) -> None:
    """Upload the closed offline segments to the W&B server of WANDB_BASE_URL/WANDB_API_KEY, each once, in order.
    Exits 0 only when the server confirmed every one."""
    from uploader.wandb.sync import SyncOptions, Syncer

    home = paths.resolve(data_dir)
    db = _existing_db(data_dir)
    config = _settings(home)
    syncer = Syncer(db, SyncOptions(home.path / "sync", config.wandb_timeout_s))
    if runs and (unknown := syncer.unknown(runs)):
        raise _fail(f"no run {', '.join(unknown)} of this node in the state DB of {home.path} (`mmdet-wandb status` lists them)")
    plan = syncer.plan(runs or None)
    if dry_run or not plan:
        for wandb_id, todo in plan.items():
            rows = sum(seg.rows for seg in todo)
            _tell(f"{wandb_id}: {len(todo)} segment(s), {rows} row(s) to sync" + (" (one was being sent)" if any(s.sending for s in todo) else ""))
        if not plan:
            _tell("nothing to sync: every offline segment is confirmed by the server")
        return
    if not os.environ.get("WANDB_API_KEY"):
        raise _fail("no WANDB_API_KEY: sync needs the W&B server's credentials (and WANDB_BASE_URL for a private server)")
    total = sum(seg.rows for todo in plan.values() for seg in todo)
    outcomes = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err,
                  disable=not progress) as bars:
        overall = bars.add_task("total", total=total)
        for wandb_id, todo in plan.items():
            task = bars.add_task(wandb_id, total=sum(seg.rows for seg in todo))

            def advance(_id: str, rows: int, task: Any = task) -> None:
                bars.advance(task, rows)
                bars.advance(overall, rows)

            syncer.progress = advance
            outcome = syncer.sync_run(wandb_id, todo)
            bars.update(task, completed=sum(seg.rows for seg in todo) if outcome.error is None else bars.tasks[task].completed)
            outcomes.append(outcome)
    for outcome in outcomes:
        if outcome.error:
            _tell(f"{outcome.wandb_id}: not synced ({outcome.left} segment(s) left, retried with backoff): {outcome.error}")
        else:
            hand = f", {outcome.hand_synced} already on the server" if outcome.hand_synced else ""
            _tell(f"{outcome.wandb_id}: synced {outcome.synced} segment(s), {outcome.rows_sent} row(s) sent{hand}")
    if any(outcome.error for outcome in outcomes):
        raise typer.Exit(1)


@app.command("clean-store")
def clean_store_command(data_dir: DataDirOpt = None, node: NodeOpt = None) -> None:
    """Delete pinned checkpoints whose offline segment `mmdet-wandb sync` has synced (offline mode keeps them until then)."""
    from uploader import checkpoints

    removed, kept = checkpoints.clean_store(_existing_db(data_dir, node))
    err.print(f"removed {removed} pinned checkpoint(s); kept {kept} whose segment is not synced yet")


def main() -> None:
    """Console entry point: an unexpected failure is one clear line (the traceback with --log-level DEBUG)."""
    app.rich_markup_mode = None  # click's plain help wraps option names instead of cutting them with "…"
    try:
        app()
    except paths.DataDirError as exc:
        if not logs.report(f"error: {exc}", logging.ERROR):
            err.print(f"[red]error:[/red] {escape(str(exc))}")
        sys.exit(2)
    except Exception as exc:  # typer.Exit and SystemExit pass through
        logging.getLogger("mmdet_wandb").debug("unhandled error", exc_info=True)
        if not logs.report(f"error: {type(exc).__name__}: {exc}", logging.ERROR):
            err.print(f"[red]error:[/red] {escape(f'{type(exc).__name__}: {exc}')}")
        sys.exit(1)


if __name__ == "__main__":
    main()

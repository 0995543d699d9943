"""Benchmark: backfill throughput against the W&B client's own ceiling, and live-tail latency.

What is measured (one run of this script prints both, side by side with their baseline and target):

1. Backfill throughput. Each log (default: the three largest real logs under ../shared/real_logs; choose
   others with ``--logs PATH...``) is copied into a temporary root (the read-only source is never written;
   a ``<YYYYmmdd_HHMMSS>`` launch folder is copied alone into a temporary work_dir, so it is one run).
   Two sides run alternately, ``--repeat`` times each, every measurement in a fresh Python process
   (this script re-run with a hidden ``--_child`` flag) with its environment isolated in a temp dir
   (MMDET_WANDB_HOME and WANDB_DATA_DIR/CACHE_DIR/CONFIG_DIR there, WANDB_DIR and credentials unset,
   WANDB_MODE=offline), so both pay the same interpreter, import and wandb-core start-up costs; imports
   happen before the clock starts on both sides.

   - "ours": the real backfill in-process: the command function of ``mmdet-wandb backfill ROOT
     --no-progress`` (mmdet_wandb/cli.py) called directly, so its set-up (data dir, Database +
     migrations, WandbWriter, Loop with finish_idle_s=0) is the CLI's own; timed from the call until
     ``Loop.backfill()`` returns, i.e. until every segment is finished, read back from its ``.wandb``
     file and verified (the status table the command prints afterwards is not timed; CPU seconds include
     it). A fresh data dir every repetition.
   - "ceiling" (the BASELINE): the W&B client alone over the SAME rows. The rows the backfill put in
     the outbox (``outbox_rows.payload_json`` ordered by step, per run, captured as the writer takes them:
     uploaded rows are folded afterwards), dumped by an untimed warm-up backfill and parsed before the clock starts, are logged with a plain loop: ``wandb.init`` (offline,
     the writer's own settings: console off, reinit create_new, x_disable_stats, its transaction-log
     flush interval, ...) + ``run.log(row, step=step, commit=True)`` per row + ``run.finish()`` + waiting
     for the exit record in the ``.wandb`` file (``uploader.wandb_reader.wait_for_exit``, as the writer
     does). One W&B run per run of the backfill, one after the other. The ``wandb.Settings`` object is
     built inside the clock, as the writer does (its first construction in a process costs pydantic
     set-up time); its arguments are captured from the writer's own ``_init_kwargs``.

   Reported: median seconds and rows/s of each side, and ratio = ceiling_time / ours_time (1.0 means the
   service costs nothing on top of wandb itself); also the median over repetitions of the ratio of the two runs
   of one repetition (they ran one after the other, so a slow spell of the machine moves both). Target: ratio >= 0.9 per log and in total (sum of the
   medians). Also printed: every repetition, the Python CPU seconds of the measuring process (less
   sensitive than wall time to other load on the machine), and a per-phase breakdown of both sides
   (ours: setup, ingest, segment open incl. wandb.init, log, finish, wait for the exit record, verify;
   timed by wrappers set around those functions in the measuring child only; "ingest" counts the reading done
   in that process, i.e. none when the backfill forked a reading process, uploader/backfill_reader.py, whose time is
   its own, beside the uploads). The CPU seconds are the measuring process's, not its reading child's. ``--profile auto``
   (default) profiles one extra "ours" run with cProfile for every log below the target and prints
   where the time goes (``--profile always|never``). ``--public-only`` adds a third side: ours with
   ``MMDET_WANDB_WANDB_PUBLIC_ONLY=1`` (uploader/wandb/private_api.py: wandb's public API only, as on a wandb
   version the fast paths were not verified on), reported beside ours as the fallback's cost.

2. Live tail latency. The real ``python -m mmdet_wandb.cli watch ROOT`` runs as a subprocess (default
   options unless ``--poll-interval`` is given) on an empty temp root. The benchmark creates a work_dir
   with ``<ts>.log.json`` whose first line is a real mmdet header (line 1 of the yolov3 log), waits
   2 s (in a real training the first train line comes much later than the header), then appends the
   first ``--live-lines`` real train lines of that log, one write each, at ``--live-rate`` lines/s,
   recording when each append returned. A thread polls the run's ``.wandb`` file(s) under
   ``<home>/wandb`` (``find_run_files`` + ``iter_records``) every 20 ms and records when each history row
   first appears, matched to its line by its ``train/*`` values. Latency = row visible in the .wandb
   file - append. Reported: p50 / p99 (linear interpolation) / max and the first row's latency
   (it includes opening the W&B run). Target: p99 <= 2 s; a row that never appears within
   ``--live-timeout`` s counts as a failure. At the end watch gets SIGTERM and must exit (SIGKILL after
   ``--stop-timeout`` s, which is reported as a failure).

3. Live tail latency while a checkpoint is pinned by copy: the same measurement, side by side with 2. as its
   baseline, with the work_dirs on another filesystem than the data dir (``/dev/shm``), ``--log-checkpoint``,
   and a ``--live-checkpoint-mb`` checkpoint ``snapshot.pth`` (default 1024; torch's zip format, written with zipfile)
   written into the work_dir once a quarter of the lines are in. The service must copy it into its store and
   hash it while the lines keep coming: the loop hands both to its background pool. Target: p99 <= 2 s.

How to run (from the repository root):

    .venv/bin/python -m benchmarks.backfill                  # table
    .venv/bin/python -m benchmarks.backfill --json           # machine-readable results on stdout
    .venv/bin/python -m benchmarks.backfill --repeat 5 --logs ../shared/real_logs/masati91__ELTD/work_dirs/yolov3_d53_320_273e_coco
    .venv/bin/python -m benchmarks.backfill --skip-live      # throughput only (or --skip-backfill)

Wall times are sensitive to other load on the machine (the two sides alternate, so load biases neither
on average, but it widens the spread): on a busy machine use ``--repeat 5`` or more, and read the CPU and
per-phase columns, which move much less. Progress goes to stderr. Exit status: 0 when every measured target passes, 1 when one fails, 2 on error.
Everything is written under one temp dir (``--keep`` keeps it for inspection), removed at the end.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import secrets
import shutil
import signal
import statistics
import string
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.checkpoint import write_checkpoint
from benchmarks.report import children_cpu_seconds, exit_cleanly_on_sigterm, finite, isolated_env, row_counts
from uploader.wandb.private_api import PUBLIC_ONLY_ENV

REPO = Path(__file__).resolve().parents[1]
REAL_LOGS = Path(os.environ.get("MMDET_WANDB_REAL_LOGS", REPO.parent / "shared" / "real_logs")).resolve()
DEFAULT_LOGS = (
    "masati91__ELTD/work_dirs/yolov3_d53_320_273e_coco",
    "superegg-M__OpenMMLabCamp/task1_MMPose/mmdetection/work_dirs/rtmdet_tiny_ear/20230605_131231",
    "masati91__ELTD/work_dirs/cornernet_hourglass104_mstest_10x5_210e_coco",
)
LIVE_SOURCE = "masati91__ELTD/work_dirs/yolov3_d53_320_273e_coco/20210422_141751.log.json"
TARGET_RATIO = 0.9
TARGET_P99_S = 2.0
HEADER_LEAD_S = 2.0
LIVE_POLL_S = 0.02
LAUNCH = re.compile(r"^\d{8}_\d{6}$")


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------------
# Child processes: one measurement each, in a fresh interpreter.
# --------------------------------------------------------------------------------------------------------


class _Phases:
    """Wall time per phase, from wrappers put around product and wandb functions in this child only."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds

    def wrap(self, owner: Any, name: str, phase: str) -> None:
        original = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.add(phase, time.perf_counter() - t)

        setattr(owner, name, timed)


def _child_ours(spec: dict[str, Any]) -> dict[str, Any]:
    import wandb  # imported before the clock, as on the ceiling side
    from sqlalchemy import func, select

    from db import outbox
    from db.models import Run, Segment, SegmentState
    from db.session import Database
    from mmdet_wandb import cli, paths
    from uploader.loop import Loop
    from uploader.wandb import reader as wandb_reader
    from uploader.wandb.writer import WandbWriter

    phases = _Phases()
    seen: dict[str, Any] = {}
    original_backfill = Loop.backfill

    def backfill(self: Any, *args: Any, **kwargs: Any) -> Any:
        """Marks when the CLI's set-up ends and when Loop.backfill() returns (the end of the clock)."""
        seen["entered"] = time.perf_counter()
        seen["uploader"] = self
        try:
            return original_backfill(self, *args, **kwargs)
        finally:
            seen["returned"] = time.perf_counter()

    Loop.backfill = backfill  # type: ignore[method-assign]
    taken: dict[int, list[list[Any]]] = {}
    if spec.get("rows_out"):
        original_pending_rows = outbox.pending_rows

        def pending_rows(session: Any, run_id: int, limit: int) -> Any:
            """The rows as the writer takes them from the outbox (once uploaded, they are folded: no payload)."""
            rows = original_pending_rows(session, run_id, limit)
            taken.setdefault(run_id, []).extend([row.step, row.payload_json] for row in rows)
            return rows

        outbox.pending_rows = pending_rows  # type: ignore[assignment]
    if not spec.get("profile_out"):  # nested phases are subtracted in the parent (see _phase_medians)
        phases.wrap(Loop, "_ingest_one", "ingest")
        phases.wrap(WandbWriter, "drain", "drain")
        phases.wrap(WandbWriter, "_open_segment", "init")
        phases.wrap(wandb, "init", "wandb.init")  # inside "init"; the rest of it: define_metric, config, save
        phases.wrap(WandbWriter, "close_all", "close")
        phases.wrap(wandb_reader, "wait_for_exit", "wait_exit")
        for name in ("history_steps", "scan_segment"):  # the writer's read-back check (renamed over time)
            if hasattr(wandb_reader, name):
                phases.wrap(wandb_reader, name, "verify")
    root = Path(spec["root"])
    profiler = None
    if spec.get("profile_out"):
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    t0, c0 = time.perf_counter(), time.process_time()
    # `mmdet-wandb backfill ROOT --no-progress`, through the CLI's own parser in this process: its set-up (data
    # dir, DB and migrations, writer, service options) is the command's own; the clock stops when
    # Loop.backfill() returns (the command then prints a status table, which is not timed).
    cli.app(["backfill", str(root), "--no-progress"], standalone_mode=False)
    c1, children_cpu = time.process_time(), children_cpu_seconds()
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(spec["profile_out"])
    if "returned" not in seen:
        raise RuntimeError("mmdet_wandb.cli.backfill did not call Loop.backfill")
    t1, t_setup, uploader = seen["returned"], seen["entered"], seen["uploader"]

    db = Database(paths.resolve(None).db_url)
    with db.transaction() as session:
        total, uploaded = row_counts(session)
        runs = session.scalars(select(Run).order_by(Run.id)).all()
        errors = [f"{r.wandb_id}: {r.last_error}" for r in runs if r.last_error]
        closed = session.scalar(
            select(func.count()).select_from(Segment).where(Segment.state == SegmentState.CLOSED)
        ) or 0
        dump = None
        if spec.get("rows_out"):
            dump = []
            for run in runs:
                rows = sorted({step: payload for step, payload in taken.get(run.id, [])}.items())
                dump.append({"wandb_id": run.wandb_id, "name": run.name, "group": run.group, "job_type": run.job_type,
                             "rows": [[step, payload] for step, payload in rows]})
    if dump is not None:
        Path(spec["rows_out"]).write_text(json.dumps(dump), encoding="utf-8")
    phases.add("setup", t_setup - t0)
    return {
        "seconds": t1 - t0, "cpu_seconds": c1 - c0, "children_cpu_seconds": children_cpu,
        "setup_seconds": t_setup - t0, "phases": phases.seconds,
        "rows": total, "uploaded": uploaded, "runs": len(runs), "segments_closed": closed, "errors": errors,
        "mode": uploader.writer.options.mode, "flush_interval_s": uploader.writer.options.flush_interval_s,
    }


def _writer_settings() -> dict[str, Any]:
    """The keyword arguments the writer gives wandb.Settings, captured without building a Settings object
    (its first construction costs pydantic set-up time, which the ceiling must pay inside its clock, as the
    writer does)."""
    from unittest import mock

    import wandb

    from db.models import Run
    from uploader.wandb.writer import WandbWriter, WriterOptions

    options = WriterOptions(runs_dir=Path(tempfile.gettempdir()), mode="offline")
    try:
        run = Run(wandb_id="x", name="x", group="x", job_type="train", init_kwargs_json="{}")
        with mock.patch.object(wandb, "Settings", lambda **kw: kw):
            settings = WandbWriter(None, options)._init_kwargs(run, options.runs_dir)["settings"]  # type: ignore[arg-type]
        if not isinstance(settings, dict):
            raise TypeError(f"settings is a {type(settings).__name__}")
        return settings
    except Exception as exc:  # the private helper changed: the same settings, spelled out
        log(f"ceiling: writer._init_kwargs unusable ({exc!r}); using a copy of its settings")
        return dict(
            mode="offline", console="off", silent=True, reinit="create_new", x_disable_stats=True,
            x_save_requirements=False, disable_git=True, disable_code=True,
            x_transaction_log_flush_interval=options.flush_interval_s,
        )


def _child_ceiling(spec: dict[str, Any]) -> dict[str, Any]:
    import wandb

    from uploader.wandb import reader as wandb_reader

    settings = _writer_settings()
    base = Path(spec["home"]) / "ceiling"
    runs = json.loads(Path(spec["rows_in"]).read_text(encoding="utf-8"))
    prepared = []
    for index, meta in enumerate(runs, 1):
        directory = base / f"{index:04d}"
        directory.mkdir(parents=True, exist_ok=True)
        rows = [(step, json.loads(payload)) for step, payload in meta["rows"]]
        run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
        kwargs = {"id": run_id, "name": meta["name"], "group": meta["group"], "job_type": meta["job_type"],
                  "project": "mmdet-wandb", "resume": "allow", "dir": str(directory)}
        prepared.append((kwargs, rows))
    phases = _Phases()
    sync_files = []
    t0, c0 = time.perf_counter(), time.process_time()
    for kwargs, rows in prepared:
        t = time.perf_counter()
        run = wandb.init(**kwargs, settings=wandb.Settings(**settings))
        phases.add("init", time.perf_counter() - t)
        t = time.perf_counter()
        for step, row in rows:
            run.log(row, step=step, commit=True)
        phases.add("log", time.perf_counter() - t)
        t = time.perf_counter()
        sync_file = Path(run.settings.sync_file)
        run.finish()
        phases.add("finish", time.perf_counter() - t)
        t = time.perf_counter()
        wandb_reader.wait_for_exit(sync_file, spec["exit_timeout_s"])
        phases.add("wait_exit", time.perf_counter() - t)
        sync_files.append(sync_file)
    t1, c1 = time.perf_counter(), time.process_time()
    children_cpu = children_cpu_seconds()
    errors = []
    for (_, rows), sync_file in zip(prepared, sync_files):
        written = [r.history.step.num for r in wandb_reader.iter_records(sync_file) if r.HasField("history")]
        if written != [step for step, _ in rows]:
            errors.append(f"{sync_file}: {len(written)} rows read back, {len(rows)} logged")
    return {
        "seconds": t1 - t0, "cpu_seconds": c1 - c0, "children_cpu_seconds": children_cpu, "phases": phases.seconds,
        "rows": sum(len(r) for _, r in prepared),
        "runs": len(prepared), "errors": errors, "flush_interval_s": settings.get("x_transaction_log_flush_interval"),
    }


def child_main(kind: str, spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    result = _child_ours(spec) if kind == "ours" else _child_ceiling(spec)
    Path(spec["result_out"]).write_text(json.dumps(result), encoding="utf-8")
    return 0


# --------------------------------------------------------------------------------------------------------
# Parent: preparation, orchestration, live test, report.
# --------------------------------------------------------------------------------------------------------


def _make_writable(path: Path) -> None:
    for directory, _dirs, files in os.walk(path):
        os.chmod(directory, 0o755)
        for name in files:
            os.chmod(os.path.join(directory, name), 0o644)


def copy_log(source: Path, dest_root: Path) -> tuple[str, Path]:
    """Copy one log (a work_dir, a launch folder or a file) into `dest_root`; returns (label, root)."""
    source = source.resolve()
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such log")
    if source.is_file():
        label = f"{source.parent.name}/{source.name}"
        target = dest_root / source.parent.name / source.name
        target.parent.mkdir(parents=True)
        shutil.copyfile(source, target)
    elif LAUNCH.match(source.name):  # one launch of a work_dir: alone in a work_dir of the same name
        label = f"{source.parent.name}/{source.name}"
        target = dest_root / source.parent.name / source.name
        target.parent.mkdir(parents=True)
        shutil.copytree(source, target, copy_function=shutil.copyfile)
    else:
        label = source.name
        target = dest_root / source.name
        shutil.copytree(source, target, copy_function=shutil.copyfile)
    _make_writable(dest_root)
    return label, dest_root


class ChildError(RuntimeError):
    pass


def run_child(kind: str, spec: dict[str, Any], work: Path, timeout: float) -> dict[str, Any]:
    """One measurement in a fresh interpreter; its environment isolated in spec['home']."""
    home = Path(spec["home"])
    home.mkdir(parents=True, exist_ok=True)
    spec = {**spec, "result_out": str(work / "result.json")}
    (work / "result.json").unlink(missing_ok=True)
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    cmd = [sys.executable, "-m", "benchmarks.backfill", "--_child", kind, "--_spec", str(spec_path)]
    try:  # subprocess.run kills the child on timeout or on any exception (Ctrl-C included)
        env = {**isolated_env(home), **({PUBLIC_ONLY_ENV: "1"} if spec.get("public_only") else {})}
        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise ChildError(f"{kind} child timed out after {timeout:.0f} s") from exc
    if proc.returncode != 0:
        raise ChildError(f"{kind} child exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    result = json.loads((work / "result.json").read_text(encoding="utf-8"))
    if result.get("errors"):
        raise ChildError(f"{kind} child reported errors: {result['errors'][:5]}")
    return result


def bench_backfill(args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    results = []
    for index, source in enumerate(args.logs):
        base = tmp / f"log{index}"
        label, root = copy_log(Path(source), base / "root")
        rows_file = base / "rows.json"
        log(f"{label}: warm-up backfill (dumps the outbox rows for the ceiling)")
        warm = run_child("ours", {"root": str(root), "home": str(base / "warmup"), "rows_out": str(rows_file)},
                         base, args.timeout)
        log(f"{label}: warm-up took {warm['seconds']:.3f} s in the clock ({warm['rows']} rows, {warm['runs']} run(s))")
        if warm["uploaded"] != warm["rows"] or warm["rows"] == 0:
            raise ChildError(f"{label}: warm-up uploaded {warm['uploaded']} of {warm['rows']} rows")
        ours: list[dict[str, Any]] = []
        ceiling: list[dict[str, Any]] = []
        public: list[dict[str, Any]] = []  # ours with the private fast paths off (--public-only)
        sides = ("ours", "ceiling", *(("public",) if args.public_only else ()))
        for rep in range(args.repeat):
            order = sides if rep % 2 == 0 else sides[::-1]
            for side in order:
                kind = "ours" if side == "public" else side
                home = base / f"{side}-{rep}"
                spec = {"root": str(root), "home": str(home), "rows_in": str(rows_file),
                        "exit_timeout_s": min(args.timeout, 300.0), "public_only": side == "public"}
                result = run_child(kind, spec, base, args.timeout)
                if result["rows"] != warm["rows"] or (kind == "ours" and result["uploaded"] != result["rows"]):
                    raise ChildError(f"{label}: {side} handled {result['rows']} rows, expected {warm['rows']}")
                {"ours": ours, "ceiling": ceiling, "public": public}[side].append(result)
                log(f"{label}: rep {rep + 1}/{args.repeat} {side:7s} {result['seconds']:.3f} s")
                shutil.rmtree(home, ignore_errors=True)
        ours_s = statistics.median(r["seconds"] for r in ours)
        ours_phases = _phase_medians(ours, ours_side=True)
        ceil_phases = _phase_medians(ceiling, ours_side=False)
        ceil_s = statistics.median(r["seconds"] for r in ceiling)
        entry = {
            "log": label, "source": str(Path(source).resolve()), "rows": warm["rows"], "runs": warm["runs"],
            "ours_seconds": ours_s, "ours_setup_seconds": statistics.median(r["setup_seconds"] for r in ours),
            "ours_rows_per_s": warm["rows"] / ours_s,
            "ceiling_seconds": ceil_s, "ceiling_rows_per_s": warm["rows"] / ceil_s,
            "ratio": ceil_s / ours_s, "pass": ceil_s / ours_s >= TARGET_RATIO,
            "pair_ratio": statistics.median(c["seconds"] / o["seconds"] for o, c in zip(ours, ceiling)),
            "ours_cpu_seconds": statistics.median(r["cpu_seconds"] for r in ours),
            "ceiling_cpu_seconds": statistics.median(r["cpu_seconds"] for r in ceiling),
            "ours_children_cpu_seconds": statistics.median(r["children_cpu_seconds"] for r in ours),
            "ceiling_children_cpu_seconds": statistics.median(r["children_cpu_seconds"] for r in ceiling),
            "ours_phases_s": ours_phases, "ceiling_phases_s": ceil_phases,
            "ours_all_seconds": [r["seconds"] for r in ours], "ceiling_all_seconds": [r["seconds"] for r in ceiling],
            "flush_interval_s": ceiling[0]["flush_interval_s"], "writer_flush_interval_s": ours[0]["flush_interval_s"],
            "root": str(root),
        }
        if public:
            entry["public_seconds"] = statistics.median(r["seconds"] for r in public)
            entry["public_phases_s"] = _phase_medians(public, ours_side=True)
        results.append(entry)
    return results


OURS_PHASES = ("setup", "ingest", "init", "wandb.init", "log", "finish", "wait_exit", "verify", "other")
CEILING_PHASES = ("init", "log", "finish", "wait_exit")


def _phase_medians(results: list[dict[str, Any]], *, ours_side: bool) -> dict[str, float]:
    """Median seconds per phase. Ours: drain = init + log, close = finish + wait_exit + verify; "init" is
    WandbWriter._open_segment, of which "wandb.init" is the wandb call (the rest: DB, define_metric, config)."""
    per_rep = []
    for r in results:
        p = dict(r["phases"])
        if ours_side:
            p["log"] = p.get("drain", 0.0) - p.get("init", 0.0)
            p["finish"] = p.get("close", 0.0) - p.get("wait_exit", 0.0) - p.get("verify", 0.0)
            p["other"] = r["seconds"] - sum(p.get(k, 0.0) for k in ("setup", "ingest", "drain", "close"))
        per_rep.append(p)
    names = OURS_PHASES if ours_side else CEILING_PHASES
    return {name: statistics.median(p.get(name, 0.0) for p in per_rep) for name in names}


def profile_ours(args: argparse.Namespace, tmp: Path, entry: dict[str, Any], top: int = 20) -> str:
    """One extra "ours" run under cProfile (main thread only; wandb-core is a separate Go process)."""
    import io
    import pstats

    work = tmp / f"profile-{abs(hash(entry['log']))}"
    work.mkdir()
    out = work / "ours.prof"
    result = run_child("ours", {"root": entry["root"], "home": str(work / "home"), "profile_out": str(out)},
                       work, args.timeout)
    buf = io.StringIO()
    buf.write(f"cProfile of ours on {entry['log']}: {result['seconds']:.3f} s under the profiler\n")
    stats = pstats.Stats(str(out), stream=buf)
    stats.strip_dirs().sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return buf.getvalue()


# ----- live tail latency ------------------------------------------------------------------------------------

_SKIP_TRAIN_KEYS = {"mode", "epoch", "iter", "lr"}


def _line_signature(line: dict[str, Any]) -> tuple:
    return tuple(sorted(
        (f"train/{k}", v) for k, v in line.items()
        if k not in _SKIP_TRAIN_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool)
    ))


class WandbPoller(threading.Thread):
    """Polls every .wandb file under `directory`; records when each history row is first seen."""

    def __init__(self, directory: Path, signatures: list[tuple], interval: float) -> None:
        super().__init__(daemon=True)
        self.directory = directory
        self.interval = interval
        self.pending: dict[tuple, list[int]] = {}
        for index, signature in enumerate(signatures):
            self.pending.setdefault(signature, []).append(index)
        self.seen: dict[int, float] = {}
        self.unmatched = 0
        self.read_errors = 0
        self._done: dict[Path, int] = {}  # history records already matched, per file
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.poll()
            self.stop.wait(self.interval)

    def poll(self) -> None:
        from uploader.wandb import reader as wandb_reader

        now = time.monotonic()
        try:
            files = wandb_reader.find_run_files(self.directory)
        except NotADirectoryError:
            return
        for path in files:
            count = 0
            skip = self._done.get(path, 0)
            try:
                for record in wandb_reader.iter_records(path):
                    if not record.HasField("history"):
                        continue
                    count += 1
                    if count <= skip:
                        continue
                    row: dict[str, Any] = {}
                    for item in record.history.item:
                        key = "/".join(item.nested_key) if item.nested_key else item.key
                        if key.startswith("train/"):
                            row[key] = json.loads(item.value_json)
                    indexes = self.pending.get(tuple(sorted(row.items())))
                    if indexes:
                        self.seen[indexes.pop(0)] = now
                    else:
                        self.unmatched += 1
                    self._done[path] = count
            except (wandb_reader.WandbFileError, OSError):  # caught mid-write; the next poll reads it again
                self.read_errors += 1


def _percentile(values: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * p
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def _stop(proc: subprocess.Popen, timeout: float) -> tuple[int | None, float, bool]:
    """SIGTERM, wait; SIGKILL if it does not exit. Returns (exit code, seconds to exit, killed)."""
    t0 = time.monotonic()
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
            return proc.returncode, time.monotonic() - t0, True
    return proc.returncode, time.monotonic() - t0, False


def bench_live(args: argparse.Namespace, tmp: Path, checkpoint_mb: int = 0) -> dict[str, Any]:
    """`checkpoint_mb` > 0: the work_dirs live on /dev/shm, so the checkpoint written meanwhile is copied."""
    source = Path(args.live_log).resolve()
    raw = source.read_bytes().splitlines()
    header = raw[0]
    train = [line for line in raw[1:] if line.strip() and json.loads(line).get("mode") == "train"][: args.live_lines]
    if len(train) < args.live_lines:
        raise ChildError(f"{source}: only {len(train)} train lines, {args.live_lines} asked")
    signatures = [_line_signature(json.loads(line)) for line in train]

    suffix = f"-copy{checkpoint_mb}" if checkpoint_mb else ""
    home = tmp / f"live-home{suffix}"
    root = Path(tempfile.mkdtemp(prefix="mmdet-wandb-bench-root-", dir="/dev/shm")) if checkpoint_mb else tmp / "live-root"
    home.mkdir()
    root.mkdir(exist_ok=True)
    service_log = tmp / f"live-watch{suffix}.log"
    cmd = [sys.executable, "-m", "mmdet_wandb.cli", "watch", str(root)]
    if checkpoint_mb:  # segments close soon, so that the checkpoint is seen uploaded before watch is stopped
        cmd += ["--log-checkpoint", "--segment-idle", "3"]
    if args.poll_interval is not None:
        cmd += ["--poll-interval", str(args.poll_interval)]
    poller = WandbPoller(home / "wandb", signatures, LIVE_POLL_S)
    appended: list[float] = []
    result: dict[str, Any] = {"lines": len(train), "rate_lines_per_s": args.live_rate, "command": " ".join(cmd[1:])}
    with open(service_log, "wb") as out:
        proc = subprocess.Popen(cmd, env=isolated_env(home), cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + 120
            while b"watching" not in service_log.read_bytes():
                if proc.poll() is not None:
                    raise ChildError(f"watch exited {proc.returncode} at start:\n{service_log.read_text()[-4000:]}")
                if time.monotonic() > deadline:
                    raise ChildError("watch did not start within 120 s")
                time.sleep(0.05)
            log(f"live: watch is up (pid {proc.pid}); appending {len(train)} lines at {args.live_rate}/s")
            poller.start()
            work_dir = root / "live_yolov3"
            work_dir.mkdir()
            fd = os.open(work_dir / f"{time.strftime('%Y%m%d_%H%M%S')}.log.json",
                         os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                os.write(fd, header + b"\n")
                start = time.monotonic() + HEADER_LEAD_S
                writer = None
                for index, line in enumerate(train):
                    if checkpoint_mb and index == len(train) // 4:  # written while the lines keep coming, as in training
                        writer = threading.Thread(target=write_checkpoint, args=(work_dir / "snapshot.pth", checkpoint_mb))
                        writer.start()
                    delay = start + index / args.live_rate - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    os.write(fd, line + b"\n")
                    appended.append(time.monotonic())
                    if proc.poll() is not None:
                        raise ChildError(f"watch died (exit {proc.returncode}):\n{service_log.read_text()[-4000:]}")
                if writer is not None:
                    writer.join()
            finally:
                os.close(fd)
            deadline = time.monotonic() + args.live_timeout
            while len(poller.seen) < len(train) and time.monotonic() < deadline:
                time.sleep(0.1)
            poller.stop.set()
            poller.join(10)
            deadline = time.monotonic() + args.live_timeout
            while checkpoint_mb and not _checkpoint_outcome(home).startswith("uploaded") and time.monotonic() < deadline:
                time.sleep(0.5)
        finally:
            poller.stop.set()
            code, stop_s, killed = _stop(proc, args.stop_timeout)
            if checkpoint_mb:
                result["checkpoint"] = _checkpoint_outcome(home)
                _remove(root)
    latencies = [poller.seen[i] - appended[i] for i in range(len(train)) if i in poller.seen]
    missing = len(train) - len(latencies)
    result.update(
        seen=len(latencies), missing=missing, unmatched_rows=poller.unmatched,
        p50_s=_percentile(latencies, 0.50) if latencies else None,
        p99_s=_percentile(latencies, 0.99) if latencies and not missing else math.inf,
        max_s=max(latencies) if latencies and not missing else math.inf,
        first_row_s=(poller.seen[0] - appended[0]) if 0 in poller.seen else None,
        p99_without_first_s=_percentile(latencies[1:], 0.99) if len(latencies) > 1 and not missing else None,
        latencies_s=[round(poller.seen[i] - appended[i], 4) if i in poller.seen else None for i in range(len(train))],
        poll_resolution_s=LIVE_POLL_S, watch_exit_code=code, watch_stop_seconds=stop_s, watch_killed=killed,
    )
    result["pass"] = bool(latencies) and not missing and result["p99_s"] <= TARGET_P99_S and not killed and code == 0
    if checkpoint_mb:
        result["checkpoint_mb"] = checkpoint_mb
        result["pass"] = result["pass"] and result["checkpoint"] == "uploaded (copied into the store)"
    if not result["pass"] or args.verbose:
        result["watch_log_tail"] = service_log.read_text(errors="replace")[-3000:]
    return result


def _checkpoint_outcome(home: Path) -> str:
    state = json.loads(subprocess.run(
        [sys.executable, "-m", "mmdet_wandb.cli", "status", "--json"], env=isolated_env(home), cwd=REPO,
        capture_output=True, text=True, check=True,
    ).stdout)
    found = [c for w in state["work_dirs"] for c in w["checkpoints"]]
    if len(found) != 1:
        return f"{len(found)} checkpoints"
    copied = bool(found[0]["reason"] is None and list((home / "store").rglob("*-snapshot.pth")))
    return f"{found[0]['state']}{' (copied into the store)' if copied else ''}"


# ----- report -------------------------------------------------------------------------------------------------


def render(report: dict[str, Any]) -> str:
    lines = []
    backfill = report.get("backfill")
    if backfill:
        lines.append(f"Backfill throughput: median of {report['repeat']} alternating runs, each in a fresh process")
        lines.append("baseline 'ceiling' = plain wandb offline init + run.log loop + finish + exit record, same rows")
        head = f"{'log':44s} {'rows':>6s} {'runs':>4s} {'ours s':>7s} {'(setup)':>7s} {'rows/s':>7s} " \
               f"{'ceil s':>7s} {'rows/s':>7s} {'ratio':>6s}  target>={TARGET_RATIO}"
        lines += [head, "-" * len(head)]
        for e in backfill["logs"]:
            lines.append(
                f"{e['log'][:44]:44s} {e['rows']:6d} {e['runs']:4d} {e['ours_seconds']:7.2f} "
                f"{e['ours_setup_seconds']:7.2f} {e['ours_rows_per_s']:7.0f} {e['ceiling_seconds']:7.2f} "
                f"{e['ceiling_rows_per_s']:7.0f} {e['ratio']:6.3f}  {'PASS' if e['pass'] else 'FAIL'}"
            )
        t = backfill["total"]
        lines.append("-" * len(head))
        lines.append(
            f"{'TOTAL':44s} {t['rows']:6d} {t['runs']:4d} {t['ours_seconds']:7.2f} {'':7s} "
            f"{t['ours_rows_per_s']:7.0f} {t['ceiling_seconds']:7.2f} {t['ceiling_rows_per_s']:7.0f} "
            f"{t['ratio']:6.3f}  {'PASS' if t['pass'] else 'FAIL'}"
        )
        lines.append(f"flush interval: writer {backfill['logs'][0]['writer_flush_interval_s']} s, "
                     f"ceiling {backfill['logs'][0]['flush_interval_s']} s")
        lines.append("each repetition (s); CPU seconds (median) of the measuring process + of its children (ours: the reading")
        lines.append("process and wandb-core; ceiling: wandb-core); the median of the ratios of each repetition's two runs,")
        lines.append("which ran one after the other (less moved by this machine's drift):")
        for e in backfill["logs"]:
            lines.append(f"  {e['log'][:44]:44s} ours {' '.join(f'{s:.2f}' for s in e['ours_all_seconds'])} "
                         f"cpu {e['ours_cpu_seconds']:.2f}+{e['ours_children_cpu_seconds']:.2f} | "
                         f"ceiling {' '.join(f'{s:.2f}' for s in e['ceiling_all_seconds'])} "
                         f"cpu {e['ceiling_cpu_seconds']:.2f}+{e['ceiling_children_cpu_seconds']:.2f} | pair ratio {e['pair_ratio']:.3f}")
        lines.append("where the time goes (median s per phase):")
        lines.append(f"  {'':44s} ours: " + " ".join(f"{n:>10s}" for n in OURS_PHASES)
                     + " | ceiling: " + " ".join(f"{n:>10s}" for n in CEILING_PHASES))
        for e in backfill["logs"]:
            lines.append(f"  {e['log'][:44]:44s}       " + " ".join(f"{e['ours_phases_s'][n]:10.2f}" for n in OURS_PHASES)
                         + " |          " + " ".join(f"{e['ceiling_phases_s'][n]:10.2f}" for n in CEILING_PHASES))
        if "public_seconds" in backfill["logs"][0]:
            lines.append(f"the private fast paths off ({PUBLIC_ONLY_ENV}=1: run.log per row): median s, "
                         "cost = public / ours; log phase ours -> public:")
            for e in backfill["logs"]:
                lines.append(f"  {e['log'][:44]:44s} ours {e['ours_seconds']:7.2f}  public {e['public_seconds']:7.2f}  "
                             f"cost {e['public_seconds'] / e['ours_seconds']:5.2f}x  log {e['ours_phases_s']['log']:.2f} -> "
                             f"{e['public_phases_s']['log']:.2f}")
        for text in backfill.get("profiles", {}).values():
            lines += ["", text.rstrip()]
    for key, title in (("live", "Live tail latency"), ("live_copy", "Live tail latency while a checkpoint is pinned by copy")):
        live = report.get(key)
        if not live:
            continue
        lines.append("")
        lines.append(f"{title}: `{live['command']}`, {live['lines']} lines at {live['rate_lines_per_s']}/s, "
                     f"append -> history row in the .wandb file (poll {live['poll_resolution_s'] * 1000:.0f} ms)")
        if key == "live_copy":
            lines.append(f"  a {live['checkpoint_mb']} MB snapshot.pth (no evaluation to wait for) written a quarter of the way in, on /dev/shm "
                         f"(another filesystem than the store): {live['checkpoint']}; baseline: the run above")

        def fmt(v: float | None) -> str:
            return "  n/a" if v is None else ("  inf" if math.isinf(v) else f"{v:5.2f}")

        lines.append(f"  rows seen {live['seen']}/{live['lines']}  p50 {fmt(live['p50_s'])} s  p99 {fmt(live['p99_s'])} s"
                     f"  max {fmt(live['max_s'])} s  first row {fmt(live['first_row_s'])} s  "
                     f"p99 w/o first {fmt(live['p99_without_first_s'])} s   target p99<={TARGET_P99_S} s  "
                     f"{'PASS' if live['pass'] else 'FAIL'}")
        lines.append(f"  watch stopped by SIGTERM in {live['watch_stop_seconds']:.2f} s, exit code "
                     f"{live['watch_exit_code']}{' (SIGKILLed)' if live['watch_killed'] else ''}"
                     f"{'; unmatched rows: ' + str(live['unmatched_rows']) if live['unmatched_rows'] else ''}")
        if live.get("watch_log_tail"):
            lines += ["  watch log tail:", *("    " + x for x in live["watch_log_tail"].splitlines()[-20:])]
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--logs", nargs="+", default=[str(REAL_LOGS / x) for x in DEFAULT_LOGS],
                   help="work_dirs, launch folders or log files to backfill (default: the three largest real logs)")
    p.add_argument("--repeat", type=int, default=3, help="repetitions of each side (default 3)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds allowed to one measurement process")
    p.add_argument("--profile", choices=("auto", "always", "never"), default="auto",
                   help="cProfile an extra 'ours' run: for logs below the target (auto), every log, or none")
    p.add_argument("--live-log", default=str(REAL_LOGS / LIVE_SOURCE), help="log.json whose header and train lines are replayed")
    p.add_argument("--live-lines", type=int, default=60, help="train lines appended in the live test (default 60)")
    p.add_argument("--live-rate", type=float, default=5.0, help="lines appended per second (default 5)")
    p.add_argument("--live-timeout", type=float, default=30.0, help="seconds after the last append to wait for rows")
    p.add_argument("--stop-timeout", type=float, default=120.0, help="seconds watch has to exit after SIGTERM")
    p.add_argument("--poll-interval", type=float, default=None, help="passed to watch (default: watch's own)")
    p.add_argument("--live-checkpoint-mb", type=int, default=1024, help="the checkpoint copied during the second live run; 0 skips that run")
    p.add_argument("--quick", action="store_true", help="CI: the smallest log once, 10 live lines, a 16 MiB checkpoint (that it runs, not how fast)")
    p.add_argument("--public-only", action="store_true",
                   help=f"also run ours with {PUBLIC_ONLY_ENV}=1 (wandb's public API only) and report its cost")
    p.add_argument("--skip-backfill", action="store_true")
    p.add_argument("--skip-live", action="store_true")
    p.add_argument("--json", action="store_true", help="print machine-readable results instead of the table")
    p.add_argument("--keep", action="store_true", help="keep the temp dir")
    p.add_argument("--verbose", action="store_true", help="include the watch log tail even on success")
    p.add_argument("--_child", choices=("ours", "ceiling"), help=argparse.SUPPRESS)
    p.add_argument("--_spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.logs, args.repeat, args.live_lines, args.live_checkpoint_mb = [args.logs[-1]], 1, 10, 16
        args.public_only = True  # that the fallback runs and uploads every row too
    if args.repeat < 1 or args.live_lines < 1 or args.live_rate <= 0:
        p.error("--repeat, --live-lines and --live-rate must be positive")
    return args


def _remove(path: Path) -> None:
    def retry(func: Any, failed: str, _exc: Any) -> None:
        try:
            os.chmod(os.path.dirname(failed), 0o755)
            func(failed)
        except OSError as exc:
            log(f"cannot remove {failed}: {exc}")

    shutil.rmtree(path, onerror=retry)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args._child:
        return child_main(args._child, args._spec)
    exit_cleanly_on_sigterm()
    tmp = Path(tempfile.mkdtemp(prefix="mmdet-wandb-bench-"))
    report: dict[str, Any] = {"repeat": args.repeat, "python": sys.version.split()[0]}
    try:
        import wandb

        report["wandb"] = wandb.__version__
        if not args.skip_backfill:
            logs = bench_backfill(args, tmp)
            rows = sum(e["rows"] for e in logs)
            ours_s = sum(e["ours_seconds"] for e in logs)
            ceil_s = sum(e["ceiling_seconds"] for e in logs)
            total = {"rows": rows, "runs": sum(e["runs"] for e in logs), "ours_seconds": ours_s,
                     "ceiling_seconds": ceil_s, "ours_rows_per_s": rows / ours_s, "ceiling_rows_per_s": rows / ceil_s,
                     "ratio": ceil_s / ours_s, "pass": ceil_s / ours_s >= TARGET_RATIO}
            report["backfill"] = {"target_ratio": TARGET_RATIO, "logs": logs, "total": total, "profiles": {}}
            for e in logs:
                if args.profile == "always" or (args.profile == "auto" and not e["pass"]):
                    log(f"{e['log']}: profiling ours")
                    report["backfill"]["profiles"][e["log"]] = profile_ours(args, tmp, e)
        if not args.skip_live:
            report["live"] = bench_live(args, tmp)
            if args.live_checkpoint_mb:
                report["live_copy"] = bench_live(args, tmp, args.live_checkpoint_mb)
    except (ChildError, FileNotFoundError) as exc:
        log(f"error: {exc}")
        report["error"] = str(exc)
        if args.json:
            print(json.dumps(finite(report), indent=2, default=str))
        return 2
    finally:
        if args.keep:
            log(f"kept {tmp}")
        else:
            _remove(tmp)
    if args.json:
        print(json.dumps(finite(report), indent=2, default=str))
    else:
        print(render(report))
    passed = [e["pass"] for e in report.get("backfill", {}).get("logs", [])]
    passed += [report["backfill"]["total"]["pass"]] if "backfill" in report else []
    passed += [report[key]["pass"] for key in ("live", "live_copy") if key in report]
    return 0 if args.quick or all(passed) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

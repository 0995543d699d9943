"""Fault injection: SIGKILL the uploader at seeded random moments and at every named crash point, restart it,
and check that every log line reached W&B exactly once (DESIGN 5, 10).

    .venv/bin/python -m benchmarks.faults [--trials 20] [--seed 1] [--quick] [--recovery-only]

Trials, each in a fresh data dir, on copies of real logs from ../shared/real_logs (MMDET_WANDB_REAL_LOGS):

- ``backfill``: `mmdet-wandb backfill` killed 1–3 times at random moments, then run to the end.
- ``watch``: a live `watch` while the logs are appended at 200–400 lines/s, killed 1–3 times at random
  moments and restarted; the second log is a resumed lineage (its header is a checkpoint's meta).
- ``sync``: the logs backfilled offline in three parts (three segments a run), then `mmdet-wandb sync` to the
  loopback stand-in of W&B's API (tests/wandb_standin.py, the real wandb client) killed 1–3 times at random
  moments while rows are on their way, then run to the end; checked on what the server holds: each line once,
  at its own step, in order (issue 25).
- ``point:<name>``: the process kills itself at a named crash point (common/crash_points.py), the boundary
  between a DB commit and the filesystem step that follows it, where random kills almost never land;
  `segment-discarded` is reached by a restart that finds the segment a first crash left open.

"Exactly once" is checked against the logs themselves, not the service's DB: for every log, the run's
history read back from the closed `.wandb` segments has one row per data line, in order, with the line's own
`iter`/`epoch`; and no step stands twice in all the `.wandb` files of a run, so `wandb sync` of the whole
runs folder uploads nothing twice. Prints `K/N exactly-once` per kind, and the seed of every failing trial.
Then one measurement, **recovery**: `watch` with 10 runs whose segments are open is SIGKILLed, one line is
appended to one log, and `watch` is started again; printed are the seconds from the restart until that line's
row is in a `.wandb` file and until it counts as uploaded (segment closed after 1 s idle and read back), and,
for where the time goes, until its first log line ("watching ...": Python, every import, the state DB), side
by side with the baseline: the same restart after a SIGTERM, which closed the segments (before this project
read leftovers once, each open segment cost 120 s); the median of 3 restarts each (start-up is CPU-bound
imports, and a shared machine's speed varies by a quarter from one second to the next). `--recovery-only`
runs that measurement alone. `--quick` (CI) runs two random trials per kind, each crash point once and the
recovery measurement once with 3 runs; it asserts that the suite runs and reports, never a figure.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.report import exit_cleanly_on_sigterm
from uploader.wandb import reader

REPO = Path(__file__).resolve().parents[1]

REAL_LOGS = Path(os.environ.get("MMDET_WANDB_REAL_LOGS", REPO.parent / "shared" / "real_logs")).resolve()
LOGS = {  # a fresh launch and a resumed lineage (part 2 continues part 1 from epoch 5) in two work_dirs
    "eltd": ["masati91__ELTD/work_dirs/eltd_r101_fpn_1x_coco/20210427_101754.log.json"],
    "retina": [
        "ISCLab-Bistu__DGFormer/detection/work_dirs/retinanet_dgformer_dga_effn_fpn_1x_coco/20230720_210124.log.json",
        "ISCLab-Bistu__DGFormer/detection/work_dirs/retinanet_dgformer_dga_effn_fpn_1x_coco/20230721_082820.log.json",
    ],
}
UPLOADER_POINTS = ("segment-recorded", "rows-logged", "segment-closing", "segment-closed", "segment-discarded")


def cli(home: Path, *args: str, crash_at: str | None = None, wait: bool = True,
        env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """`mmdet-wandb` offline in `home` (`env`: W&B settings over that, e.g. the stand-in's)."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("WANDB_")},
           "MMDET_WANDB_HOME": str(home), "WANDB_MODE": "offline", "WANDB_SILENT": "true", **(env or {})}
    env.pop("MMDET_WANDB_CRASH_AT", None)
    if crash_at:
        env["MMDET_WANDB_CRASH_AT"] = crash_at
    proc = subprocess.Popen(
        [sys.executable, "-m", "mmdet_wandb.cli", *args], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    if wait:
        proc.communicate(timeout=600)
    return proc


def kill(proc: subprocess.Popen[str]) -> str:
    """SIGKILL the process group; what the process wrote to stderr."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.communicate(timeout=60)[1]


def data_lines(log: Path) -> list[dict[str, Any]]:
    return [line for raw in log.read_bytes().splitlines() if raw.strip() and "mode" in (line := json.loads(raw))]


def check(home: Path, root: Path, server: Any = None) -> str | None:
    """None when every log line is in W&B exactly once; else what is wrong. W&B: the closed offline segments, or
    what `server` (the stand-in, after `sync`) holds, each row once at its own step."""
    state = json.loads(subprocess.run(
        [sys.executable, "-m", "mmdet_wandb.cli", "status", "--json"], cwd=REPO, capture_output=True, text=True,
        env={**os.environ, "MMDET_WANDB_HOME": str(home)}, check=True,
    ).stdout)
    for work_dir in state["work_dirs"]:
        name = Path(work_dir["path"]).name
        expected = [line for rel in LOGS[name] for line in data_lines(root / name / Path(rel).name)]
        if len(work_dir["runs"]) != 1:
            return f"{name}: {len(work_dir['runs'])} runs, one lineage expected"
        run = work_dir["runs"][0]
        if run["rows_pending"]:
            return f"{name}: {run['rows_pending']} rows pending"
        if server is not None:
            held = server.run(run["wandb_id"])
            if held.history_offsets != list(range(len(held.history))) or held.steps != list(range(1, len(held.history) + 1)):
                return f"{name}: the server's rows are not each once at their own step, in order"
            if any(write.row != held.history_by_offset[write.offset].row for write in held.resent_history):
                return f"{name}: a row was sent again with other values"
        history = held.history if server is not None else [
            row for d in run["closed_segment_dirs"] for f in reader.find_run_files(d) for row in reader.read_run(f).history]
        if len(history) != len(expected):
            return f"{name}: {len(history)} rows in W&B, {len(expected)} lines in the logs"
        for row, line in zip(history, expected):
            key = "loss" if line["mode"] == "train" else "bbox_mAP"
            if row.get("epoch") != line["epoch"] or row.get(f"{line['mode']}/{key}") != line.get(key):
                return f"{name}: row {row.get('_step')} is not the line {line}"
        steps = [
            record.history.step.num
            for f in reader.find_run_files(home / "wandb" / run["wandb_id"])
            for record in reader.iter_records(f)
            if record.WhichOneof("record_type") == "history"
        ]
        if len(steps) != len(set(steps)):
            return f"{name}: a step stands twice in the runs folder (wandb sync of the folder would upload it twice)"
    if len(state["work_dirs"]) != len(LOGS):
        return f"{len(state['work_dirs'])} work_dirs, {len(LOGS)} expected"
    return None


def lay_out(root: Path) -> None:
    for name, rels in LOGS.items():
        (root / name).mkdir(parents=True)
        for rel in rels:
            shutil.copy(REAL_LOGS / rel, root / name)


def trial_backfill(tmp: Path, rng: random.Random) -> str | None:
    root, home = tmp / "work_dirs", tmp / "home"
    lay_out(root)
    for _ in range(rng.randint(1, 3)):
        proc = cli(home, "backfill", str(root), "--no-progress", wait=False)
        time.sleep(rng.uniform(0.3, 6.0))
        kill(proc)
    proc = cli(home, "backfill", str(root), "--no-progress")
    return check(home, root) if proc.returncode == 0 else f"the last backfill exited {proc.returncode}: {proc.stderr[-500:]}"


def trial_watch(tmp: Path, rng: random.Random) -> str | None:
    """Lines appended at 200–400 lines/s while watch is killed and restarted 1–3 times."""
    root, home = tmp / "work_dirs", tmp / "home"
    sources = [(REAL_LOGS / rel, root / name / Path(rel).name) for name, rels in LOGS.items() for rel in rels]
    for _, target in sources:
        target.parent.mkdir(parents=True, exist_ok=True)
    args = ("watch", str(root), "--poll-interval", "0.2", "--scan-interval", "1", "--segment-idle", "2", "--finish-after", "3")
    watch = cli(home, *args, wait=False)
    kills = sorted(rng.uniform(0.5, 8.0) for _ in range(rng.randint(1, 3)))
    started = time.monotonic()
    for source, target in sources:  # the resumed launch is written after its first part, as in training
        lines = source.read_bytes().splitlines(keepends=True)
        rate = rng.uniform(200, 400)
        with open(target, "ab") as out:
            for i in range(0, len(lines), 20):
                out.write(b"".join(lines[i:i + 20]))
                out.flush()
                time.sleep(20 / rate)
                if kills and time.monotonic() - started >= kills[0]:
                    kills.pop(0)
                    kill(watch)
                    watch = cli(home, *args, wait=False)
        time.sleep(1.1)  # a later launch gets a later mtime and name order, as in training
    time.sleep(6)  # finish-after, segment-idle
    watch.send_signal(signal.SIGTERM)
    watch.communicate(timeout=120)
    return check(home, root) if watch.returncode == 0 else f"watch exited {watch.returncode}: {watch.stderr[-500:]}"


def trial_sync(tmp: Path, rng: random.Random) -> str | None:
    """Three offline segments a run, then `sync` SIGKILLed 1–3 times at random moments and run to the end."""
    from tests.wandb_standin import WandbStandin

    root, home = tmp / "work_dirs", tmp / "home"
    sources = [(REAL_LOGS / rel, root / name / Path(rel).name) for name, rels in LOGS.items() for rel in rels]
    for _, target in sources:
        target.parent.mkdir(parents=True, exist_ok=True)
    training = [(target, line) for source, target in sources for line in source.read_bytes().splitlines(keepends=True)]
    third = len(training) // 3  # in the order training writes them: a resumed launch after the one it resumes
    for part in range(3):
        for target, line in training[part * third:(part + 1) * third if part < 2 else len(training)]:
            with open(target, "ab") as out:
                out.write(line)
        if (proc := cli(home, "backfill", str(root), "--no-progress")).returncode != 0:
            return f"backfill exited {proc.returncode}: {proc.stderr[-500:]}"
    with WandbStandin() as standin:
        standin.slow("file_stream", 0.1)  # rows on their way for seconds: the kills land among them
        env = standin.env(home / "wandb-dirs")
        for _ in range(rng.randint(1, 3)):
            proc = cli(home, "sync", "--no-progress", wait=False, env=env)
            time.sleep(rng.uniform(0.5, 8.0))
            kill(proc)
        proc = cli(home, "sync", "--no-progress", env=env)
        if proc.returncode != 0:
            return f"the last sync exited {proc.returncode}: {proc.stderr[-500:]}"
        return check(home, root, server=standin)


def trial_point(tmp: Path, point: str) -> str | None:
    root, home = tmp / "work_dirs", tmp / "home"
    lay_out(root)
    backfill = ("backfill", str(root), "--no-progress")
    if point == "segment-discarded":  # a segment left open, then a restart that discards it, killed there
        crashes = [cli(home, *backfill, crash_at="segment-closing"), cli(home, *backfill, crash_at=point)]
    else:
        crashes = [cli(home, *backfill, crash_at=point)]
    if any(proc.returncode != -signal.SIGKILL for proc in crashes):
        return f"the crash point was not reached: {[p.returncode for p in crashes]}"
    proc = cli(home, *backfill)
    return check(home, root) if proc.returncode == 0 else f"the restart exited {proc.returncode}: {proc.stderr[-500:]}"


def open_segment_count(home: Path) -> int:
    import sqlite3

    if not (home / "state.db").exists():
        return 0
    with sqlite3.connect(home / "state.db") as db:
        try:
            return db.execute("SELECT count(*) FROM segments WHERE state = 'open'").fetchone()[0]
        except sqlite3.OperationalError:  # the schema is being created
            return 0


def wandb_id_of(home: Path, work_dir: Path) -> str:
    """The W&B id of the work_dir's run, from the state DB."""
    import sqlite3

    with sqlite3.connect(home / "state.db") as db:
        return db.execute("SELECT runs.wandb_id FROM runs JOIN work_dirs ON work_dirs.id = runs.work_dir_id WHERE work_dirs.path = ?",
                          (str(work_dir),)).fetchone()[0]


def rows_with(home: Path, values: dict[str, Any], seen: dict[Path, tuple[int, int, int]] | None = None, run: str = "") -> int:
    """History rows holding all of `values` in every .wandb file under the runs folder (`run`: of that W&B run
    only), closed or open. With `seen`, a file whose size and mtime are those of the last call is counted from
    it, not read again: polled while a restart is timed, reading every run's files each time took a core from
    the process under measure."""
    found = 0
    folder = home / "wandb" / run
    for path in reader.find_run_files(folder) if folder.is_dir() else []:
        try:
            stat = path.stat()
            if seen is not None and (cached := seen.get(path)) and cached[:2] == (stat.st_size, stat.st_mtime_ns):
                found += cached[2]
                continue
            count = 0
            for record in reader.iter_records(path):
                if record.WhichOneof("record_type") == "history":
                    row = {"/".join(i.nested_key) if i.nested_key else i.key: i.value_json for i in record.history.item}
                    count += all(k in row and json.loads(row[k]) == v for k, v in values.items())
        except (reader.WandbFileError, OSError):  # caught mid-write
            continue
        found += count
        if seen is not None:
            seen[path] = (stat.st_size, stat.st_mtime_ns, count)
    return found


def measure_recovery(tmp: Path, runs: int, *, killed: bool) -> dict[str, float | None]:
    """`watch` with `runs` runs whose segments are open is stopped (SIGKILL, or SIGTERM for the baseline, which
    closes them), a line is appended to one log, and `watch` starts again: seconds until the line's row is in a
    .wandb file, and until it counts as uploaded."""
    root, home = tmp / "work_dirs", tmp / "home"
    source = (REAL_LOGS / LOGS["eltd"][0]).read_bytes().splitlines(keepends=True)
    held_back = source[-2]  # a train line, appended after the stop (the last line, a val line, stays out)
    for n in range(runs):
        (root / f"run{n}").mkdir(parents=True)
        (root / f"run{n}" / Path(LOGS["eltd"][0]).name).write_bytes(b"".join(source[:-2]))
    watch = cli(home, "watch", str(root), "--poll-interval", "0.2", "--segment-idle", "600", "--finish-after", "600", wait=False)
    deadline = time.monotonic() + 300
    while open_segment_count(home) < runs:
        if time.monotonic() > deadline or watch.poll() is not None:
            kill(watch)
            raise RuntimeError("the segments did not open")
        time.sleep(0.2)
    if killed:
        kill(watch)
    else:
        watch.send_signal(signal.SIGTERM)
        watch.communicate(timeout=120)
    line = json.loads(held_back)
    marker = {f"train/{key}": line[key] for key in ("loss", "time", "data_time")}
    with open(root / "run0" / Path(LOGS["eltd"][0]).name, "ab") as log:
        log.write(held_back.rstrip(b"\n") + b"\n")
    run = wandb_id_of(home, root / "run0")
    seen: dict[Path, tuple[int, int, int]] = {}
    rows_with(home, marker, seen, run)  # the files already there are read before the clock starts
    started, started_at = time.monotonic(), time.time()
    watch = cli(home, "watch", str(root), "--poll-interval", "0.2", "--segment-idle", "1", "--finish-after", "600",
                "--log-format", "json", wait=False)
    logged = uploaded = None
    while time.monotonic() - started < 120 and uploaded is None:
        if logged is None and rows_with(home, marker, seen, run):
            logged = time.monotonic() - started
        if logged is not None:
            state = subprocess.run([sys.executable, "-m", "mmdet_wandb.cli", "status", "--json"], cwd=REPO, capture_output=True,
                                   text=True, env={**os.environ, "MMDET_WANDB_HOME": str(home)})
            if state.returncode == 0 and any(r["rows_uploaded"] == len(source) - 2 for w in json.loads(state.stdout)["work_dirs"]  # the header is no row
                                            if w["path"].endswith("run0") for r in w["runs"]):
                uploaded = time.monotonic() - started
        time.sleep(0.05)
    err = kill(watch)
    return {"watching_s": _first_line_after(err, "watching ", started_at), "row_logged_s": logged, "row_uploaded_s": uploaded}


def _first_line_after(json_log: str, prefix: str, since: float) -> float | None:
    """Seconds from `since` (time.time) to the first JSON log line whose message starts with `prefix`."""
    for line in json_log.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if str(entry.get("msg", "")).startswith(prefix):
            return dt.datetime.fromisoformat(entry["ts"]).timestamp() - since
    return None


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20, help="random trials per kind")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="CI: 2 random trials per kind, each crash point once")
    parser.add_argument("--recovery-only", action="store_true", help="only the recovery measurement")
    args = parser.parse_args(argv)
    if not REAL_LOGS.is_dir():
        parser.error(f"the real logs are missing: {REAL_LOGS} (set MMDET_WANDB_REAL_LOGS)")
    exit_cleanly_on_sigterm()
    trials = 2 if args.quick else args.trials
    results: dict[str, list[tuple[str, str | None]]] = {}
    tmp = Path(tempfile.mkdtemp(prefix="mmdet-wandb-faults-"))
    try:
        for kind, run in () if args.recovery_only else (("backfill", trial_backfill), ("watch", trial_watch), ("sync", trial_sync)):
            for n in range(trials):
                seed = args.seed * 1000 + n
                directory = tmp / f"{kind}-{seed}"
                outcome = run(directory, random.Random(seed))
                results.setdefault(kind, []).append((f"seed {seed}", outcome))
                shutil.rmtree(directory, ignore_errors=True)
        for point in () if args.recovery_only else UPLOADER_POINTS:
            directory = tmp / point
            results.setdefault("crash points", []).append((point, trial_point(directory, point)))
            shutil.rmtree(directory, ignore_errors=True)
        runs, repeat = (3, 1) if args.quick else (10, 3)
        trials: dict[str, list[dict[str, float | None]]] = {"SIGTERM": [], "SIGKILL": []}
        for n in range(repeat):  # interleaved, so that both see the machine alike
            for stop in trials:
                trials[stop].append(measure_recovery(tmp / f"recovery-{stop}-{n}", runs, killed=stop == "SIGKILL"))
        recovery = {stop: {key: _median([t[key] for t in ts]) for key in ts[0]} for stop, ts in trials.items()}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    failed = 0
    print(f"{'kind':<14} exactly-once")
    for kind, outcomes in results.items():
        good = sum(1 for _, outcome in outcomes if outcome is None)
        failed += len(outcomes) - good
        print(f"{kind:<14} {good}/{len(outcomes)}")
        for label, outcome in outcomes:
            if outcome is not None:
                print(f"  FAILED {kind} {label}: {outcome}")

    def seconds(value: float | None) -> str:
        return "never (120 s)" if value is None else f"{value:5.2f} s"

    print(f"\nrecovery: watch with {runs} runs whose segments are open is stopped, a line appended, watch restarted"
          f" (median of {repeat})")
    print(f"{'stopped by':<22} {'first log line':>22} {'row in a .wandb file':>22} {'row counted uploaded':>22}")
    for stop, label in (("SIGTERM", "SIGTERM (baseline)"), ("SIGKILL", "SIGKILL")):
        figures = recovery[stop]
        print(f"{label:<22} {seconds(figures['watching_s']):>22} {seconds(figures['row_logged_s']):>22} {seconds(figures['row_uploaded_s']):>22}")
    killed, clean = recovery["SIGKILL"]["row_logged_s"], recovery["SIGTERM"]["row_logged_s"]
    if killed is not None and clean is not None:
        print(f"what settling the {runs} open segments costs: {killed - clean:+.2f} s (target: restart -> row < 2 s)")
    return 1 if failed or killed is None else 0


def _median(values: list[float | None]) -> float | None:
    """None (never) counts as the longest."""
    ordered = sorted(values, key=lambda v: math.inf if v is None else v)
    return ordered[len(ordered) // 2]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

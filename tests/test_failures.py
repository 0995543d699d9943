"""Failures that stay contained (DESIGN 10–11), with real processes: a run W&B refuses, a second uploader on one
data dir, a restart after SIGKILL with segments left open or half-deleted."""
from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy

from tests.conftest import REPO, cli, offline_run, service_env, stop, table_column, wait_until
from tests.oracle import assert_history_matches, expected_rows
from uploader.wandb import reader as wandb_reader

BALLOON = "liweiwp__OpenMMLabCamp/mmdet/balloon"  # a config dump beside its log: where a hook entry would be
ELTD = "masati91__ELTD/work_dirs/eltd_r101_fpn_1x_coco/20210427_101754.log.json"
YOLO = "masati91__ELTD/work_dirs/yolov3_d53_320_273e_coco/20210422_141751.log.json"
CORNERNET = "masati91__ELTD/work_dirs/cornernet_hourglass104_mstest_10x5_210e_coco/20210427_235944.log.json"
HOOK_ENTRY = (
    "\nlog_config = dict(interval=50, hooks=[dict(type='TextLoggerHook'), "
    "dict(type='MMDetWandbHook', init_kwargs=dict(project={project!r}))])\n"
)


def runs_by_work_dir(home: Path) -> dict[str, dict]:
    """Work_dir name → its (first) run in `status --json`; {} before the service created its state."""
    proc = cli(home, "status", "--json", check=False)
    if proc.returncode != 0:
        return {}
    return {Path(w["path"]).name: w["runs"][0] for w in json.loads(proc.stdout)["work_dirs"] if w["runs"]}


def segment_rows(home: Path, wandb_id: str) -> list[tuple[int, str]]:
    with sqlite3.connect(home / "state.db") as db:
        return db.execute(
            "SELECT s.seq, s.state FROM segments s JOIN runs r ON r.id = s.run_id WHERE r.wandb_id = ? ORDER BY s.seq",
            (wandb_id,),
        ).fetchall()


def test_a_run_wandb_refuses_backs_off_alone_and_uploads_once_its_config_is_fixed(real_logs, tmp_path, watcher):
    root, home = tmp_path / "work_dirs", tmp_path / "home"
    shutil.copytree(real_logs / BALLOON, root / "balloon")
    (root / "eltd").mkdir(parents=True)
    shutil.copy(real_logs / ELTD, root / "eltd")
    config = next((root / "balloon").glob("*.py"))
    original = config.read_text()
    config.write_text(original + HOOK_ENTRY.format(project="team/det"))  # W&B refuses a project with a slash

    proc = watcher(home, root, "--segment-idle", "1")
    wait_until(lambda: runs_by_work_dir(home).get("balloon", {}).get("failures", 0) >= 1, 60, "the refused run to fail", proc)
    refused = runs_by_work_dir(home)["balloon"]
    first_wait, failures = refused["retry_at"] - time.time(), refused["failures"]
    assert first_wait <= 11 * 2 ** (failures - 1), (first_wait, failures)  # 10 s, doubled per failure, ±10 %
    assert "Invalid project name 'team/det'" in refused["last_error"]
    wait_until(lambda: runs_by_work_dir(home).get("eltd", {}).get("rows_pending") == 0
               and runs_by_work_dir(home)["eltd"]["rows_uploaded"] > 0, 120, "the other work_dir to upload", proc)
    refused = runs_by_work_dir(home)["balloon"]
    failures = refused["failures"]  # it may have been tried again meanwhile
    assert refused["rows_uploaded"] == 0 and refused["rows_pending"] > 0
    assert segment_rows(home, refused["wandb_id"]) == [], "no segment row for a run W&B did not open"
    assert not (home / "wandb" / refused["wandb_id"]).exists() or not any((home / "wandb" / refused["wandb_id"]).iterdir())
    assert "next try in" in table_column(cli(home, "status").stdout, -1)

    assert "1 run(s) will be tried on the next pass" in cli(home, "retry", refused["wandb_id"]).stderr
    wait_until(lambda: runs_by_work_dir(home)["balloon"]["failures"] > failures, 120, "the retried run to fail again", proc)
    again = runs_by_work_dir(home)["balloon"]
    # retry_at = failure time + backoff: a later failure, and a backoff at least 18 s instead of at most 11 s
    assert again["retry_at"] - refused["retry_at"] > 9 * 2 ** (again["failures"] - 1) - 11 * 2 ** (failures - 1), (refused, again)
    assert segment_rows(home, refused["wandb_id"]) == [], "a second pass adds no segment"

    config.write_text(original + HOOK_ENTRY.format(project="team-det"))
    wait_until(lambda: runs_by_work_dir(home)["balloon"]["rows_pending"] == 0
               and runs_by_work_dir(home)["balloon"]["rows_uploaded"] > 0, 60, "the fixed run to upload", proc)
    stop(proc)
    fixed = runs_by_work_dir(home)["balloon"]
    assert fixed["last_error"] is None and fixed["failures"] == 0 and fixed["retry_at"] is None
    run = offline_run(home, fixed["wandb_id"])
    assert run.segments[0].project == "team-det"
    assert_history_matches(run.history, expected_rows(next((root / "balloon").glob("*.log.json"))))


def test_a_second_uploader_on_one_data_dir_is_refused_while_status_works(real_logs, tmp_path, watcher):
    root, home = tmp_path / "work_dirs", tmp_path / "home"
    (root / "eltd").mkdir(parents=True)
    shutil.copy(real_logs / ELTD, root / "eltd")
    proc = watcher(home, root, "--segment-idle", "1")
    wait_until(lambda: runs_by_work_dir(home).get("eltd", {}).get("rows_uploaded", 0) > 0, 60, "the first upload", proc)
    for command in (("watch", str(root)), ("backfill", str(root), "--no-progress")):
        second = cli(home, *command, check=False, timeout=60)
        assert second.returncode == 2, second
        assert f"pid {proc.pid}" in second.stderr and "in use by a running uploader" in second.stderr
    assert cli(home, "status").returncode == 0
    assert cli(home, "config", "show").returncode == 0
    stop(proc)
    assert cli(home, "backfill", str(root), "--no-progress").returncode == 0, "free again once it stopped"


def start_backfill(home: Path, root: Path, *args: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "mmdet_wandb.cli", "backfill", str(root), "--no-progress", "--log-level", "INFO", *args],
        env=service_env(home, **env), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )


def open_segments(home: Path) -> list[tuple[str, str]]:
    if not (home / "state.db").exists():
        return []
    with sqlite3.connect(home / "state.db") as db:
        return db.execute("SELECT r.wandb_id, s.dir FROM segments s JOIN runs r ON r.id = s.run_id WHERE s.state = 'open'").fetchall()


def all_steps_once(home: Path) -> None:
    """No step appears twice across all the .wandb files of a run: `wandb sync` of the whole folder is safe."""
    for run_dir in (home / "wandb").iterdir():
        steps = [
            record.history.step.num
            for path in wandb_reader.find_run_files(run_dir)
            for record in wandb_reader.iter_records(path)
            if record.WhichOneof("record_type") == "history"
        ]
        assert len(steps) == len(set(steps)), f"{run_dir.name}: a step in two segment files"


def killed_with_three_open_segments(real_logs: Path, root: Path, home: Path) -> tuple[dict[str, Path], list[tuple[str, str]]]:
    """Three logs backfilled by one process killed while their three segments are open; then the first
    segment's directory deleted and the second's `.wandb` file cut short. Returns the logs and the segments."""
    logs = {}
    for name, rel in (("eltd", ELTD), ("yolo", YOLO), ("cornernet", CORNERNET)):
        (root / name).mkdir(parents=True)
        logs[name] = Path(shutil.copy(real_logs / rel, root / name))
    proc = start_backfill(home, root, "--jobs", "1", MMDET_WANDB_CRASH_AT="segment-closing")  # one process: all three open
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == -signal.SIGKILL, output
    left = open_segments(home)
    assert len(left) == 3, (left, output)
    shutil.rmtree(left[0][1])
    (sync,) = wandb_reader.find_run_files(left[1][1])
    with open(sync, "r+b") as handle:
        handle.truncate(os.path.getsize(sync) // 2)
    return logs, left


def test_restart_after_sigkill_settles_open_segments_at_once_and_ends_exactly_once(real_logs, tmp_path):
    """Three logs, killed while their segments are open; one segment directory deleted, one `.wandb` file cut
    short: the restart reads each once, waits for nothing, and every line ends up exactly once."""
    root, home = tmp_path / "work_dirs", tmp_path / "home"
    logs, _ = killed_with_three_open_segments(real_logs, root, home)

    started = time.monotonic()
    again = cli(home, "backfill", str(root), "--no-progress", "--log-level", "INFO")
    assert time.monotonic() - started < 60, "no wait for exit records a killed process never writes"
    assert "rebuilding it from the DB" in again.stderr
    assert not open_segments(home)
    for name, log in logs.items():
        run = runs_by_work_dir(home)[name]
        assert run["rows_pending"] == 0, run
        assert_history_matches(offline_run(home, run["wandb_id"]).history, expected_rows(log))
    all_steps_once(home)


def test_watch_restarted_after_sigkill_settles_each_run_before_its_upload_and_every_run_in_its_first_pass(real_logs, tmp_path, watcher):
    """`watch` settles what a killed process left run by run, each right before the run's first upload (a
    restart's next row waits for its own run only): the first run's new segment opens before the last run's
    leftover is read back, and by the end of that pass every leftover is settled, the directory no segment
    owns is deleted, and every line is in W&B exactly once."""
    root, home = tmp_path / "work_dirs", tmp_path / "home"
    logs, left = killed_with_three_open_segments(real_logs, root, home)
    unowned = home / "wandb" / left[2][0] / "0099"  # a kill between `wandb.init` and recording its segment
    unowned.mkdir()

    watch = watcher(home, root, "--segment-idle", "1", "--log-level", "INFO")
    wait_until(lambda: not open_segments(home) and all(r["rows_pending"] == 0 for r in runs_by_work_dir(home).values())
               and len(runs_by_work_dir(home)) == 3, 300, "every row uploaded and every segment closed", watch)
    output = stop(watch)
    lines = output.splitlines()
    settled = [i for i, line in enumerate(lines) if "rebuilding it from the DB" in line]
    opened = [i for i, line in enumerate(lines) if "opened segment" in line]
    assert len(settled) == 3 and opened, output
    assert opened[0] < settled[-1], f"every leftover was settled before the first upload:\n{output}"
    assert not unowned.exists()
    for name, log in logs.items():
        run = runs_by_work_dir(home)[name]
        assert_history_matches(offline_run(home, run["wandb_id"]).history, expected_rows(log))
    all_steps_once(home)


def test_two_uploaders_on_one_postgresql_own_their_rows_through_a_sigkill(real_logs, trained_work_dir, tmp_path, postgres_url):
    """Nodes a and b, each with its own roots and data dir, one PostgreSQL and one worker: a is killed with
    segments open; b restarts meanwhile and leaves a's segments and pins alone; a's restart recovers them; both
    end exactly once, checkpoints and tables included."""
    homes = {node: tmp_path / f"home-{node}" for node in "ab"}
    roots = {node: tmp_path / f"work_dirs-{node}" for node in "ab"}
    for node in "ab":
        trained_work_dir("retinanet_epoch", dest=roots[node])
        (roots[node] / "eltd").mkdir()
        shutil.copy(real_logs / ELTD, roots[node] / "eltd")
    db = {"MMDET_WANDB_DB_URL": postgres_url}

    def watch(node: str, segment_idle: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "mmdet_wandb.cli", "watch", str(roots[node]), "--node", node, "--poll-interval", "0.2",
             "--scan-interval", "1", "--segment-idle", segment_idle, "--finish-after", "2", "--checkpoint-settle", "0.5", "--log-checkpoint",
             "--num-eval-images", "6", "--log-level", "INFO"],
            env=service_env(homes[node], **db), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )

    def state(node: str | None = None) -> list[dict]:
        proc = cli(homes["b"], "status", "--json", *(("--node", node) if node else ()), check=False, **db)
        return json.loads(proc.stdout)["work_dirs"] if proc.returncode == 0 else []

    engine = sqlalchemy.create_engine(postgres_url)

    def segments_of(node: str) -> list[tuple[str, str, str]]:
        """(dir, state, run) of the node's segments; [] before the first uploader created the schema."""
        try:
            with engine.connect() as connection:
                return sorted(tuple(row) for row in connection.execute(sqlalchemy.text(
                    "SELECT s.dir, s.state, r.wandb_id FROM segments s JOIN runs r ON r.id = s.run_id WHERE s.node = :n"), {"n": node}))
        except sqlalchemy.exc.ProgrammingError:
            return []

    a, b = watch("a", "600"), watch("b", "1")  # a keeps its segments open until it is killed
    try:
        wait_until(lambda: len(segments_of("a")) >= 2 and all(s[1] == "open" for s in segments_of("a")), 120, "a's open segments", a)
        wait_until(lambda: any(s[1] == "closed" for s in segments_of("b")), 120, "b's closed segments", b)
        os.killpg(a.pid, signal.SIGKILL)
        a.wait(timeout=30)
        a_segments = segments_of("a")
        a_pins = sorted(p for p in (homes["a"] / "store").rglob("*.pth"))
        assert all(Path(d).is_dir() for d, _, _ in a_segments) and a_pins

        stop(b)  # b's restart recovers its own segments only
        b = watch("b", "1")
        worker = subprocess.Popen(
            [sys.executable, "-m", "mmdet_wandb.cli", "evaluate", "--device", "cpu", "--poll", "0.2", "--exit-when-idle"],
            env=service_env(tmp_path / "home-worker", **db), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, start_new_session=True,
        )
        wait_until(lambda: [w for w in state("b") if w["eval_jobs"]] and all(
            j["table_uploaded"] for w in state("b") for j in w["eval_jobs"]), 300, "b's tables", b)
        assert segments_of("a") == a_segments, "b touched none of a's segments"
        assert all(Path(d).is_dir() for d, _, _ in a_segments)
        assert sorted(p for p in (homes["a"] / "store").rglob("*.pth")) == a_pins, "b touched none of a's pins"
        assert {w["node"] for w in state()} == {"a", "b"} and {w["node"] for w in state("a")} == {"a"}

        a = watch("a", "1")
        worker.communicate(timeout=600)
        wait_until(lambda: all(j["table_uploaded"] for w in state("a") for j in w["eval_jobs"]) and all(
            r["rows_pending"] == 0 and r["rows_uploaded"] > 0 for w in state("a") for r in w["runs"]), 300, "a's uploads", a)
        stop(a)
        stop(b)
    finally:
        for proc in (a, b):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    for node in "ab":
        assert not [s for s in segments_of(node) if s[1] == "open"]
        for work_dir in state(node):
            (run,) = work_dir["runs"]
            history = offline_run(homes[node], run["wandb_id"]).history
            logs = sorted(Path(work_dir["path"]).glob("*.log.json"))
            assert_history_matches(history, [row for log in logs for row in expected_rows(log)])
            if work_dir["eval_jobs"]:
                assert {c["state"] for c in work_dir["checkpoints"]} <= {"uploaded"}
        all_steps_once(homes[node])


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A 12 MB tmpfs (mounting needs root: CI and the development machines run as root)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a size-limited tmpfs needs root")
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mount_point)], check=True)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def uploaded_per_closed_segments(home: Path, run: dict) -> int:
    return sum(len(wandb_reader.scan_segment(f).steps) for d in run["closed_segment_dirs"] for f in wandb_reader.find_run_files(d))


def test_a_full_disk_under_the_data_dir_loses_nothing_and_the_service_resumes_when_space_returns(real_logs, tmp_path, small_filesystem):
    root, home = tmp_path / "work_dirs", small_filesystem
    (root / "yolo").mkdir(parents=True)
    log = Path(shutil.copy(real_logs / YOLO, root / "yolo"))
    filler = home / "filler"
    filler.write_bytes(b"\0" * (9 << 20))  # about 3 MB left: the state DB fits, the run files do not
    with open(tmp_path / "watch.log", "w") as output:  # a full disk makes wandb log a lot: no pipe to fill up
        proc = subprocess.Popen(
            [sys.executable, "-m", "mmdet_wandb.cli", "watch", str(root), "--poll-interval", "0.2", "--scan-interval", "1",
             "--segment-idle", "2", "--finish-after", "2"],
            env=service_env(home), cwd=REPO, stdout=output, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )
    try:
        wait_until(lambda: (home / "wandb").is_dir() and runs_by_work_dir(home).get("yolo") is not None, 60, "the first writes", proc)
        # the disk fills up; the writer fails and tries again (the DB may be too full to record it: the log says it)
        wait_until(lambda: (tmp_path / "watch.log").read_text(errors="replace").count("No space left on device") >= 2,
                   120, "the writer to fail on the full disk and try again", proc)
        run = runs_by_work_dir(home)["yolo"]
        assert run["rows_pending"] > 0, run  # rows were read and wait for the space
        assert run["rows_uploaded"] < len(expected_rows(log)), "the disk was too full to upload everything"
        assert run["rows_uploaded"] == uploaded_per_closed_segments(home, run), "nothing counted as uploaded that is not"

        filler.unlink()
        wait_until(lambda: runs_by_work_dir(home)["yolo"]["rows_pending"] == 0
                   and runs_by_work_dir(home)["yolo"]["rows_uploaded"] == len(expected_rows(log)), 120, "the upload to resume", proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, (tmp_path / "watch.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    run = runs_by_work_dir(home)["yolo"]
    assert_history_matches(offline_run(home, run["wandb_id"]).history, expected_rows(log))
    all_steps_once(home)

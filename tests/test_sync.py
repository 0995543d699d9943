"""`mmdet-wandb sync`: offline segments to the W&B stand-in (tests/wandb_standin.py) with the real wandb client,
exactly once: every row once, at its own step, in order, after a SIGKILL, a refusal, or a hand-run `wandb sync`."""
from __future__ import annotations

import base64
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

from tests.conftest import REAL_LOGS, REPO, cli, service_env, status, table_column
from tests.oracle import assert_history_matches, expected_rows
from tests.wandb_standin import WandbStandin

YOLOV3_LOG = REAL_LOGS / "masati91__ELTD/work_dirs/yolov3_d53_320_273e_coco/20210422_141751.log.json"  # 4,368 rows


def three_segments(tmp_path: Path, parts: int = 3) -> tuple[Path, Path, str]:
    """(home, the full log, run id): the real yolov3 log growing in three parts, backfilled offline after each,
    so that its run has three closed segments (as a watch restarted twice during a live training leaves)."""
    work_dir = tmp_path / "root" / "yolov3_d53_320_273e_coco"
    work_dir.mkdir(parents=True)
    lines = YOLOV3_LOG.read_bytes().splitlines(keepends=True)
    log = work_dir / YOLOV3_LOG.name
    home = tmp_path / "home"
    third = len(lines) // 3
    for part in (lines[:third], lines[third:2 * third], lines[2 * third:])[:parts]:
        with log.open("ab") as f:
            f.write(b"".join(part))
        cli(home, "backfill", str(work_dir.parent), "--no-progress", timeout=300)
    [entry] = runs_of(home)
    assert len(list((home / "wandb" / entry["wandb_id"]).glob("*/wandb/offline-run-*/*.wandb"))) == parts
    return home, log, entry["wandb_id"]


def runs_of(home: Path) -> list[dict]:
    return [r for w in status(home)["work_dirs"] for r in w["runs"]]


def sync(standin: WandbStandin, home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return cli(home, "sync", "--no-progress", *args, check=check, timeout=300, **standin.env(home / "wandb-dirs"))


def assert_exactly_once(standin: WandbStandin, wandb_id: str, log: Path) -> None:
    run = standin.run(wandb_id)
    rows = expected_rows(log)
    assert run.history_offsets == list(range(len(rows))), "every line once, no gap"
    assert run.steps == list(range(1, len(rows) + 1)), "at their own steps, in order"
    assert not run.resent_history or all(w.row == run.history_by_offset[w.offset].row for w in run.resent_history)
    assert_history_matches(run.history, rows)


def test_three_segments_synced_once_then_a_second_sync_sends_nothing(wandb_standin: WandbStandin, tmp_path):
    home, log, wandb_id = three_segments(tmp_path)
    dry = sync(wandb_standin, home, "--dry-run")
    assert f"{wandb_id}: 3 segment(s), 4368 row(s) to sync" in dry.stderr
    assert not wandb_standin.has_run(wandb_id), "a dry run sends nothing"
    done = sync(wandb_standin, home)
    assert f"{wandb_id}: synced 3 segment(s), 4368 row(s) sent" in done.stderr, done.stderr
    assert_exactly_once(wandb_standin, wandb_id, log)
    writes = len(wandb_standin.run(wandb_id).history_writes)
    again = sync(wandb_standin, home)
    assert "nothing to sync" in again.stderr
    assert len(wandb_standin.run(wandb_id).history_writes) == writes


def test_a_wrong_key_or_an_unknown_run_is_one_line_and_sends_nothing(wandb_standin: WandbStandin, tmp_path):
    home, log, wandb_id = three_segments(tmp_path, parts=2)
    unknown = sync(wandb_standin, home, "nosuchrun", check=False)
    assert unknown.returncode == 2 and "no run nosuchrun of this node" in unknown.stderr, unknown.stderr
    env = {**wandb_standin.env(home / "wandb-dirs"), "WANDB_API_KEY": "wrong" + "0" * 35}
    wrong = cli(home, "sync", "--no-progress", check=False, timeout=300, **env)
    assert wrong.returncode == 1, wrong.stderr
    [line] = [line for line in wrong.stderr.splitlines() if line.startswith(wandb_id)]
    assert "not synced (2 segment(s) left, retried with backoff)" in line, wrong.stderr
    assert wandb_standin.unauthorized and not wandb_standin.has_run(wandb_id)
    backing_off = sync(wandb_standin, home, check=False)
    assert backing_off.returncode == 1 and "backing off after a failure" in backing_off.stderr, "the backoff holds"
    cli(home, "retry", wandb_id)
    sync(wandb_standin, home)
    assert_exactly_once(wandb_standin, wandb_id, log)


def test_connection_resets_and_server_errors_mid_sync_send_each_row_once(wandb_standin: WandbStandin, tmp_path):
    """The server resets connections and answers 500 while the rows go (wandb-core retries them): each row once."""
    home, log, wandb_id = three_segments(tmp_path)
    wandb_standin.drop("file_stream", times=3, apply=True)  # taken, but the client never hears it was
    wandb_standin.fail("file_stream", 500, times=3)
    done = cli(home, "sync", "--no-progress", timeout=300, **wandb_standin.env(home / "wandb-dirs", fast_retries=True))
    assert f"{wandb_id}: synced 3 segment(s), 4368 row(s) sent" in done.stderr, done.stderr
    assert_exactly_once(wandb_standin, wandb_id, log)


def test_the_server_refusing_the_second_segment_once(wandb_standin: WandbStandin, tmp_path):
    home, log, wandb_id = three_segments(tmp_path)
    def second_segment(record) -> bool:
        history = (record.variables or {}).get("files", {}).get("wandb-history.jsonl")
        return history is not None and history["lines"] > 0 and 1455 <= history["offset"] < 2911  # segment 2: steps 1456..2911

    refusal = wandb_standin.fail("file_stream", 400, when=second_segment)
    first = sync(wandb_standin, home, check=False)
    assert first.returncode == 1
    assert f"{wandb_id}: not synced (2 segment(s) left, retried with backoff): SyncRefused: segment 2" in first.stderr, first.stderr
    with wandb_standin.lock:
        wandb_standin.faults.remove(refusal)
    [entry] = runs_of(home)
    assert (entry["segments_synced"], entry["segments_to_sync"]) == (1, 2)
    table = cli(home, "status").stdout
    assert "1 / 2" in table_column(table, 5) and "sync: SyncRefused: segment 2" in table_column(table, -1)
    cli(home, "retry", wandb_id)
    done = sync(wandb_standin, home)
    assert "synced" in done.stderr
    assert_exactly_once(wandb_standin, wandb_id, log)


def test_sync_killed_at_random_points_then_rerun_sends_each_row_once(wandb_standin: WandbStandin, tmp_path):
    """SIGKILL of a real `sync` process group while rows are on their way, at random points (three kills, seeded),
    then a sync to the end: every row once, in order."""
    home, log, wandb_id = three_segments(tmp_path)
    rng = random.Random(25)
    throttle = wandb_standin.slow("file_stream", 0.3)  # so that the kill lands while rows are on their way
    env = service_env(home, **wandb_standin.env(home / "wandb-dirs"))
    for _ in range(3):
        writes = len(wandb_standin.run(wandb_id).history_writes) if wandb_standin.has_run(wandb_id) else 0
        target = writes + rng.randint(1, 1200)
        proc = subprocess.Popen([sys.executable, "-m", "mmdet_wandb.cli", "sync", "--no-progress"], env=env, cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            wandb_standin.wait_for(lambda: proc.poll() is not None or (wandb_standin.has_run(wandb_id) and len(
                wandb_standin.run(wandb_id).history_writes) >= target), 240, f"{target} history lines")
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    with wandb_standin.lock:
        wandb_standin.faults.remove(throttle)
    assert 0 < len(wandb_standin.run(wandb_id).history_writes), "the kills landed after rows reached the server"
    cli(home, "retry", wandb_id)
    done = sync(wandb_standin, home)
    assert "synced" in done.stderr, done.stderr
    assert_exactly_once(wandb_standin, wandb_id, log)
    [entry] = runs_of(home)
    assert (entry["segments_synced"], entry["segments_to_sync"]) == (3, 0)


def test_a_segment_synced_by_hand_with_wandb_sync_is_not_sent_again(wandb_standin: WandbStandin, tmp_path):
    home, log, wandb_id = three_segments(tmp_path)
    [first] = (home / "wandb" / wandb_id / "0001" / "wandb").glob("offline-run-*")
    wandb_cli = Path(sys.executable).with_name("wandb")
    subprocess.run([str(wandb_cli), "sync", str(first)], env=service_env(home, **wandb_standin.env(home / "wandb-dirs")),
                   check=True, capture_output=True, timeout=300, cwd=tmp_path)  # wandb sync writes ./wandb/ logs
    by_hand = len(wandb_standin.run(wandb_id).history_writes)
    assert by_hand == 1455
    done = sync(wandb_standin, home)
    assert f"{wandb_id}: synced 3 segment(s), {4368 - 1455} row(s) sent, 1 already on the server" in done.stderr, done.stderr
    assert_exactly_once(wandb_standin, wandb_id, log)


def test_watch_started_online_syncs_its_offline_backlog_first_then_goes_live(wandb_standin: WandbStandin, tmp_path):
    """Two thirds of the log backfilled offline (two segments), then the last third appended and `watch` started
    with credentials: the backlog goes first, then the live rows; every row once, in order."""
    home, log, wandb_id = three_segments(tmp_path, parts=2)
    lines = YOLOV3_LOG.read_bytes().splitlines(keepends=True)
    with log.open("ab") as f:
        f.write(b"".join(lines[2 * (len(lines) // 3):]))
    env = service_env(home, **wandb_standin.env(home / "wandb-dirs"))
    proc = subprocess.Popen([sys.executable, "-m", "mmdet_wandb.cli", "watch", str(log.parent.parent), "--poll-interval", "0.2",
                             "--scan-interval", "1", "--segment-idle", "1"], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wandb_standin.wait_for(lambda: wandb_standin.has_run(wandb_id) and wandb_standin.run(wandb_id).history_line_count == 4368,
                               240, "every row on the server")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=120)
    assert_exactly_once(wandb_standin, wandb_id, log)
    [entry] = runs_of(home)
    assert (entry["segments_synced"], entry["segments_to_sync"]) == (2, 0)


def test_checkpoints_val_and_prediction_tables_synced_once_with_resolved_references(wandb_standin: WandbStandin, tmp_path,
                                                                                    trained_work_dir):
    """A real tiny training backfilled offline with checkpoints and tables, then synced twice: model versions
    with their metadata and aliases, one `val`, prediction tables whose image references resolve into it."""
    work_dir = trained_work_dir("retinanet_epoch")
    checkpoint_names = sorted(p.name for p in work_dir.glob("*.pth") if not p.is_symlink())
    home = tmp_path / "home"
    cli(home, "backfill", str(work_dir.parent), "--no-progress", "--log-checkpoint", "--evaluate", "--num-eval-images", "6",
        timeout=600, **{k: v for k, v in wandb_standin.env(home / "wandb-dirs").items() if k.startswith("WANDB_") and "DIR" in k})
    removed = cli(home, "clean-store")
    assert "removed 0 pinned checkpoint(s)" in removed.stderr, "pins stay until synced"
    sync(wandb_standin, home)
    sync(wandb_standin, home)
    committed = [a for a in wandb_standin.artifacts.values() if a.state == "COMMITTED"]
    models = [a for a in committed if a.type == "model"]
    assert len(models) == len(checkpoint_names), "each checkpoint version once"
    assert all(a.metadata and "epoch" in a.metadata for a in models)
    assert any("best" in a.aliases for a in models)
    [val] = [a for a in committed if a.type == "dataset"]
    predictions = [a for a in committed if a.type == "evaluation"]
    assert len(predictions) == len(checkpoint_names) - 1
    val_hex = base64.b64decode(val.id).hex()
    for prediction in predictions:
        refs = {path: e["ref"] for path, e in prediction.entries.items() if e.get("ref")}
        assert refs, "the images are references into val"
        for path, ref in refs.items():
            assert ref.startswith("wandb-artifact://") and ref.split("/")[2] in (val.id, val_hex), ref
            assert prediction.entries[path]["digest"] == val.entries[path]["digest"]
    assert_charts_resolve(wandb_standin, committed)
    assert f"removed {len(checkpoint_names)} pinned checkpoint(s)" in cli(home, "clean-store").stderr, "synced: the pins can go"


def assert_charts_resolve(standin: WandbStandin, committed: list) -> None:
    """The evaluation charts arrived: each summary table references a committed `run_table` artifact by its client
    id, and each chart's spec is in the run's `_wandb.visualize` config, reading a summary table the run has."""
    [run] = standin.runs.values()
    tables = {k: v for k, v in run.summary.items() if isinstance(v, dict) and v.get("_type") == "table-file"}
    assert tables, "the PR curves' and confusion matrix's tables are in the summary"
    run_tables = {a.client_id: a for a in committed if a.type == "run_table"}
    for key, value in tables.items():
        client_id = value["artifact_path"].removeprefix("wandb-client-artifact://").split("/", 1)[0]
        assert f"{key}.table.json" in run_tables[client_id].entries, key
    visualize = run.config_raw["_wandb"]["value"]["visualize"]
    assert "eval/confusion_matrix" in visualize and any(k.startswith("eval/pr_curve/") for k in visualize)
    for key, spec in visualize.items():
        assert f"{key}_table" in tables, key


def test_a_sync_killed_after_the_rows_went_but_before_the_artifacts_logs_them_on_the_rerun(wandb_standin: WandbStandin,
                                                                                          tmp_path, trained_work_dir):
    """SIGKILL once W&B holds every row of the segment while its checkpoint files are still uploading: the rerun
    sends no row again, and every model version arrives once; the pins stay until then."""
    work_dir = trained_work_dir("retinanet_epoch")
    checkpoints = sorted(p.name for p in work_dir.glob("*.pth") if not p.is_symlink())
    home = tmp_path / "home"
    cli(home, "backfill", str(work_dir.parent), "--no-progress", "--log-checkpoint", timeout=600)
    [entry] = runs_of(home)
    rows = entry["rows_uploaded"]
    stall = wandb_standin.slow("upload_artifact_file", 120)
    proc = subprocess.Popen([sys.executable, "-m", "mmdet_wandb.cli", "sync", "--no-progress"], cwd=REPO,
                            env=service_env(home, **wandb_standin.env(home / "wandb-dirs")), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wandb_standin.wait_for(lambda: wandb_standin.has_run(entry["wandb_id"])
                               and len(wandb_standin.run(entry["wandb_id"]).history) == rows
                               and bool(wandb_standin.requests_to("upload_artifact_file")), 240, "rows held, a file uploading")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    with wandb_standin.lock:
        wandb_standin.faults.remove(stall)
    assert "removed 0 pinned checkpoint(s)" in cli(home, "clean-store").stderr, "not synced: the pins stay"
    sync(wandb_standin, home)
    run = wandb_standin.run(entry["wandb_id"])
    assert run.history_offsets == list(range(rows)) and not run.resent_history, "no row sent twice"
    models = [a for a in wandb_standin.artifacts.values() if a.state == "COMMITTED" and a.type == "model"]
    assert len(models) == len(checkpoints), "each checkpoint version once"
    assert f"removed {len(checkpoints)} pinned checkpoint(s)" in cli(home, "clean-store").stderr

"""Online mode, with the real wandb 0.31 client, against the W&B stand-in of tests/wandb_standin.py.

The stand-in is a loopback server written for these tests, not W&B: what is checked here is that the real
client (wandb-core) gets what it needs from it, and that the rows, config, summary and artifacts arrive
there exactly once and in order. Every process gets `WandbStandin.env()`, so nothing leaves 127.0.0.1
(the proxy variables point at the stand-in, which records and refuses any such attempt).
"""
from __future__ import annotations

import base64
import http.client
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REAL_LOGS, REPO, cli, service_env, status
from tests.oracle import assert_history_matches, expected_rows
from tests.wandb_standin import WandbStandin, b64_md5

CLIENT_TIMEOUT_S = 120
ELTD_LOG = REAL_LOGS / "masati91__ELTD/work_dirs/eltd_r101_fpn_1x_coco/20210427_101754.log.json"
YOLOV3_LOG = REAL_LOGS / "masati91__ELTD/work_dirs/yolov3_d53_320_273e_coco/20210422_141751.log.json"  # 4,368 rows


def yolov3_work_dir(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(root, log, home): the yolov3 log in a work_dir of its own under `root`, and an empty data dir."""
    work_dir = tmp_path / "root" / "yolov3_d53_320_273e_coco"
    work_dir.mkdir(parents=True)
    log = Path(shutil.copy(YOLOV3_LOG, work_dir))
    home = tmp_path / "home"
    home.mkdir()
    return work_dir.parent, log, home


def backfill_again_sends_nothing_twice(standin: WandbStandin, home: Path, root: Path, log: Path) -> None:
    """After an interrupted backfill: the next one sends each line once, with no "Tried to log to step"."""
    again = cli(home, "backfill", str(root), "--no-progress", "--log-level", "INFO", timeout=300, **standin.env())
    assert "Tried to log to step" not in again.stderr + again.stdout
    [entry] = [r for w in status(home)["work_dirs"] for r in w["runs"]]
    run = standin.run(entry["wandb_id"])
    assert run.history_offsets == list(range(4368)), "every line once, in order"
    assert len(run.history_writes) == len({w.offset for w in run.history_writes}) == 4368, "nothing sent twice"
    assert_history_matches(run.history, expected_rows(log))
    assert (entry["rows_uploaded"], entry["rows_pending"]) == (4368, 0)

# A process of its own per wandb session: wandb-core is started with the stand-in's environment, the
# test process's wandb singleton stays untouched, and a hang is bounded by the subprocess timeout.
CLIENT = r"""
import json, sys
import wandb

mode, run_id = sys.argv[1], sys.argv[2]
if mode == "log":
    run = wandb.init(project="standin-proj", id=run_id, config={"lr": 0.02, "arch": "r101"})
    for i in range(50):
        run.log({"loss": 1.0 / (i + 1), "acc": i / 50}, step=i)
    run.config.update({"epochs": 12})
    run.summary["best_acc"] = 0.98
    run.finish()
    print(json.dumps({"exit": 0}))
elif mode == "resume":
    run = wandb.init(project="standin-proj", id=run_id, resume="allow")
    out = {"starting_step": run.starting_step, "resumed": run.resumed, "step": run.step}
    run.log({"loss": 0.001}, step=run.starting_step)
    run.finish()
    print(json.dumps(out))
elif mode == "artifact":
    run = wandb.init(project="standin-proj", id=run_id)
    artifact = wandb.Artifact("standin-model", type="model")
    artifact.add_file(sys.argv[3], name="weights.bin")
    run.log_artifact(artifact, aliases=["best", "epoch_3"])
    artifact.wait(timeout=60)
    waited = {"version": artifact.version, "state": artifact.state}
    run.finish()
    print(json.dumps({"digest": artifact.digest, "name": artifact.name, **waited}))
"""


def start_client(standin: WandbStandin, tmp_path: Path, *args: str, fast_retries: bool = False) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MMDET_WANDB_"))}
    env.update(standin.env(tmp_path / "wandb-home", fast_retries=fast_retries), WANDB_DIR=str(tmp_path))
    return subprocess.Popen([sys.executable, "-c", CLIENT, *args], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def client_result(proc: subprocess.Popen[str]) -> dict[str, Any]:
    try:
        out, err = proc.communicate(timeout=CLIENT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"client did not finish within {CLIENT_TIMEOUT_S} s\n{out}\n{err}") from None
    assert proc.returncode == 0, f"client {proc.args[3:]} exited {proc.returncode}\n{out}\n{err}"
    return json.loads(out.strip().splitlines()[-1])


def run_client(standin: WandbStandin, tmp_path: Path, *args: str, fast_retries: bool = False) -> dict[str, Any]:
    return client_result(start_client(standin, tmp_path, *args, fast_retries=fast_retries))


def assert_nothing_unexpected(standin: WandbStandin) -> None:
    assert standin.unknown_operations == []
    assert standin.outbound == [], "the client tried to reach something other than the stand-in"
    assert standin.unauthorized == []


def test_client_logs_history_config_summary_then_resumes_from_the_server(wandb_standin: WandbStandin, tmp_path):
    run_client(wandb_standin, tmp_path, "log", "standinrun1")

    run = wandb_standin.run("standinrun1")
    assert (run.entity, run.project) == ("standin-entity", "standin-proj")
    assert run.history_offsets == list(range(50))
    assert len(run.history_writes) == 50, "each row was sent once"
    assert run.steps == list(range(50))
    for i, row in enumerate(run.history):
        assert math.isclose(row["loss"], 1.0 / (i + 1)) and math.isclose(row["acc"], i / 50)
    assert run.config == {"lr": 0.02, "arch": "r101", "epochs": 12}
    assert run.summary["best_acc"] == 0.98 and run.summary["_step"] == 49
    assert run.complete and run.exitcode == 0
    assert "config.yaml" in run.files and "wandb-summary.json" in run.files
    assert_nothing_unexpected(wandb_standin)

    resumed = run_client(wandb_standin, tmp_path, "resume", "standinrun1")
    assert resumed["resumed"] is True
    assert resumed["starting_step"] == 50, "wandb-core derives it from the stand-in's RunResumeStatus answer"
    assert run.resume_queries == 1
    assert run.history_offsets == list(range(51)), "the resumed run appends at the server's history line count"
    assert run.steps == list(range(51))
    assert run.config == {"lr": 0.02, "arch": "r101", "epochs": 12}, "config kept across the resume"
    assert_nothing_unexpected(wandb_standin)


def test_client_artifact_is_committed_with_its_digest_and_aliases(wandb_standin: WandbStandin, tmp_path):
    payload = os.urandom(4096)
    (tmp_path / "weights.bin").write_bytes(payload)
    logged = run_client(wandb_standin, tmp_path, "artifact", "standinrun2", str(tmp_path / "weights.bin"))

    [artifact] = wandb_standin.artifacts_named("standin-model")
    assert artifact.state == "COMMITTED"
    assert artifact.type == "model" and artifact.run == "standinrun2"
    assert artifact.digest == logged["digest"]
    assert set(artifact.entries) == {"weights.bin"}
    assert artifact.entries["weights.bin"]["digest"] == b64_md5(payload)
    assert artifact.entries["weights.bin"]["size"] == len(payload)
    assert artifact.files == {"weights.bin": payload}
    assert set(artifact.aliases) == {"latest", "best", "epoch_3"}
    assert (logged["version"], logged["state"]) == ("v0", "COMMITTED"), "Artifact.wait() read the commit back"
    assert_nothing_unexpected(wandb_standin)


def test_client_retries_refused_and_lost_file_stream_requests(wandb_standin: WandbStandin, tmp_path):
    """Fault injection with the real client: the file_stream request that carries the history is refused
    twice (500), then taken by the stand-in with its answer lost; wandb-core retries it, re-sending the same
    offsets, which overwrite rather than append."""
    def carries_history(record) -> bool:
        return "wandb-history.jsonl" in record.variables["files"]

    wandb_standin.fail("file_stream", 500, times=2, when=carries_history)
    wandb_standin.drop("file_stream", times=1, apply=True, when=carries_history)  # tried after the 500s are used up
    run_client(wandb_standin, tmp_path, "log", "standinrun3", fast_retries=True)

    run = wandb_standin.run("standinrun3")
    history_requests = [r for r in wandb_standin.requests_to("file_stream") if carries_history(r)]
    statuses = [r.status for r in history_requests]
    assert statuses[:3] == [500, 500, None] and set(statuses[3:]) == {200}
    resent = run.resent_history
    assert resent, "the request whose answer was lost was sent again"
    assert all(w.request == history_requests[3].index for w in resent)
    assert len(run.history_writes) == 50 + len(resent)
    first = {w.offset: w.line for w in reversed(run.history_writes)}  # the first line received at each offset
    assert all(first[w.offset] == w.line for w in resent), "the re-sent lines are the same lines"
    assert run.history_offsets == list(range(50)) and run.steps == list(range(50))
    assert run.complete and run.exitcode == 0
    assert_nothing_unexpected(wandb_standin)


def test_client_survives_the_server_going_away_mid_request(wandb_standin: WandbStandin, tmp_path):
    """The stand-in is stopped while the history request is in flight (it is answered slowly), so the
    client gets no answer and then connection refused; once it is back on the same port, the retry lands."""
    def carries_history(record) -> bool:
        return "wandb-history.jsonl" in record.variables["files"]

    wandb_standin.slow("file_stream", 30, times=1, when=carries_history)
    proc = start_client(wandb_standin, tmp_path, "log", "standinrun4", fast_retries=True)
    try:
        wandb_standin.wait_for(lambda: any(carries_history(r) for r in wandb_standin.requests_to("file_stream")),
                               60, "the history request")
        wandb_standin.stop()
        time.sleep(1.5)
        wandb_standin.start()
        client_result(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()

    run = wandb_standin.run("standinrun4")
    history_requests = [r for r in wandb_standin.requests_to("file_stream") if carries_history(r)]
    assert history_requests[0].status is None and history_requests[-1].status == 200
    assert len(run.history_writes) == 50, "the request cut off by the stop had no effect; its retry was taken once"
    assert run.history_offsets == list(range(50)) and run.steps == list(range(50))
    assert run.complete and run.exitcode == 0


def test_backfill_online_uploads_every_line_once_in_order(wandb_standin: WandbStandin, tmp_path, real_logs):
    root = tmp_path / "root" / "eltd_r101_fpn_1x_coco"
    root.mkdir(parents=True)
    shutil.copy(ELTD_LOG, root / ELTD_LOG.name)
    assert not (root / ELTD_LOG.name).read_bytes().endswith(b"\n"), "the last line has no newline"
    home = tmp_path / "home"
    home.mkdir()
    expected = expected_rows(ELTD_LOG)
    assert len(expected) == 384

    cli(home, "backfill", str(tmp_path / "root"), "--no-progress", timeout=300, **wandb_standin.env())

    [name] = [n for (_, _, n) in wandb_standin.runs]
    run = wandb_standin.run(name)
    assert run.project == "mmdet-wandb"
    assert run.history_offsets == list(range(384))
    assert len(run.history_writes) == 384, "no line was sent twice"
    assert_history_matches(run.history, expected)
    assert run.steps == sorted(set(run.steps))
    assert run.complete and run.exitcode == 0
    assert run.config, "the training config reached the run"
    assert_nothing_unexpected(wandb_standin)

    state = status(home)
    [entry] = [r for w in state["work_dirs"] for r in w["runs"]]
    assert entry["wandb_id"] == name
    assert (entry["rows_uploaded"], entry["rows_pending"], entry["last_error"]) == (384, 0, None)


def test_history_wandb_refuses_stays_pending_and_arrives_once_when_it_is_accepted(wandb_standin: WandbStandin, tmp_path, real_logs):
    """W&B answers 400 to every history upload: wandb-core gives up and `finish()` returns normally; nothing
    counts as uploaded (the run's next start says W&B has no step), backfill says so and exits 1. Once W&B
    accepts them, the next backfill sends every line, once."""
    root = tmp_path / "root" / "eltd_r101_fpn_1x_coco"
    root.mkdir(parents=True)
    shutil.copy(ELTD_LOG, root / ELTD_LOG.name)
    home = tmp_path / "home"
    home.mkdir()
    refusal = wandb_standin.fail("file_stream", 400, when=lambda record: "wandb-history.jsonl" in record.variables["files"])
    refused = cli(home, "backfill", str(tmp_path / "root"), "--no-progress", check=False, timeout=300, **wandb_standin.env())
    assert refused.returncode == 1, refused.stderr
    [name] = [n for (_, _, n) in wandb_standin.runs]
    assert wandb_standin.run(name).history == []
    [entry] = [r for w in status(home)["work_dirs"] for r in w["runs"]]
    assert (entry["rows_uploaded"], entry["rows_pending"]) == (0, 384)
    assert "W&B kept the steps below 0 only" in entry["last_error"]

    with wandb_standin.lock:
        wandb_standin.faults.remove(refusal)
    cli(home, "backfill", str(tmp_path / "root"), "--no-progress", timeout=300, **wandb_standin.env())
    run = wandb_standin.run(name)
    assert run.history_offsets == list(range(384)) and len(run.history_writes) == 384, "every line once"
    assert_history_matches(run.history, expected_rows(ELTD_LOG))
    [entry] = [r for w in status(home)["work_dirs"] for r in w["runs"]]
    assert (entry["rows_uploaded"], entry["rows_pending"], entry["last_error"]) == (384, 0, None)
    assert not list((home / "wandb").glob("*/*/wandb")), "online segment directories are removed once confirmed"
    assert_nothing_unexpected(wandb_standin)


def test_sigkill_mid_backfill_online_then_restart_sends_nothing_twice(wandb_standin: WandbStandin, tmp_path, real_logs):
    """Killed once W&B has rows that the service has not seen confirmed: the restart learns W&B's starting step
    when it starts the run again, counts what is below it as uploaded and never sends it again (no "Tried to
    log to step" warnings)."""
    root, log, home = yolov3_work_dir(tmp_path)
    env = {**service_env(home), **wandb_standin.env()}
    throttle = wandb_standin.slow("file_stream", 1.0)  # so that the kill lands while rows are on their way
    first = subprocess.Popen([sys.executable, "-m", "mmdet_wandb.cli", "backfill", str(root), "--no-progress"],
                             env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wandb_standin.wait_for(lambda: any(r.history for r in wandb_standin.runs.values()), 120, "part of the rows")
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    with wandb_standin.lock:
        wandb_standin.faults.remove(throttle)
    [name] = [n for (_, _, n) in wandb_standin.runs]
    assert wandb_standin.run(name).history, "W&B has rows that the service has not seen confirmed"
    [entry] = [r for w in status(home)["work_dirs"] for r in w["runs"]]
    assert entry["rows_uploaded"] < 4368
    backfill_again_sends_nothing_twice(wandb_standin, home, root, log)


# ---- the stand-in's own controls (no wandb client) -------------------------------------------------------

def _graphql(standin: WandbStandin, operation: str, timeout: float = 5) -> tuple[int, dict]:
    body = json.dumps({"query": f"query {operation} {{ viewer {{ id }} }}", "operationName": operation}).encode()
    request = urllib.request.Request(f"{standin.url}/graphql", data=body, method="POST", headers={
        "Authorization": "Basic " + base64.b64encode(f"api:{standin.api_key}".encode()).decode()})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=timeout) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def test_standin_fault_controls(wandb_standin: WandbStandin):
    assert _graphql(wandb_standin, "Viewer")[0] == 200

    wandb_standin.fail("Viewer", 400, times=1)
    wandb_standin.fail("*", 429, times=1)
    assert _graphql(wandb_standin, "Viewer")[0] == 400
    assert _graphql(wandb_standin, "ServerFeaturesQuery")[0] == 429
    assert _graphql(wandb_standin, "Viewer")[0] == 200, "both rules are used up"

    wandb_standin.graphql_error("Viewer", "nope", times=1)
    status_code, answer = _graphql(wandb_standin, "Viewer")
    assert status_code == 200 and answer["errors"][0]["message"] == "nope"

    wandb_standin.slow("Viewer", 0.5, times=1)
    started = time.monotonic()
    assert _graphql(wandb_standin, "Viewer")[0] == 200
    assert time.monotonic() - started >= 0.5

    wandb_standin.drop("Viewer", times=1)
    with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
        _graphql(wandb_standin, "Viewer")

    port = wandb_standin.port
    wandb_standin.stop()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    wandb_standin.start()
    assert wandb_standin.port == port
    assert _graphql(wandb_standin, "Viewer")[0] == 200
    assert wandb_standin.operations().count("Viewer") == 7



# ---- W&B failures, through the service ---------------------------------------------------------------------

TIMEOUT = "8"  # --wandb-timeout of the tests: the most one start, finish or artifact wait may take


def two_work_dirs(tmp_path: Path) -> Path:
    """Two work_dirs (two runs) holding the ELTD log (384 rows each)."""
    root = tmp_path / "root"
    for name in ("eltd_a", "eltd_b"):
        (root / name).mkdir(parents=True)
        shutil.copy(ELTD_LOG, root / name / ELTD_LOG.name)
    return root


def runs_of(home: Path) -> list[dict[str, Any]]:
    return [r for w in status(home)["work_dirs"] for r in w["runs"]]


def assert_every_line_once(standin: WandbStandin, home: Path, rows: int = 384, log: Path = ELTD_LOG) -> None:
    expected = expected_rows(log)
    for entry in runs_of(home):
        run = standin.run(entry["wandb_id"])
        assert run.history_offsets == list(range(rows)), "every line, in order"
        assert len(run.history_writes) == rows, "no line twice"
        assert_history_matches(run.history, expected)
        assert (entry["rows_uploaded"], entry["rows_pending"], entry["last_error"]) == (rows, 0, None)


def test_wandb_down_from_the_start_backfill_ends_at_once_and_uploads_once_back(wandb_standin: WandbStandin, tmp_path, real_logs):
    """No W&B at all: one probe says so, no run is started (no 90 s init timeout per run), the rows stay
    pending, status says W&B is unreachable, exit 1. Once W&B is back, every line arrives once."""
    root = two_work_dirs(tmp_path)
    home = tmp_path / "home"
    env = wandb_standin.env()
    wandb_standin.stop()
    started = time.monotonic()
    down = cli(home, "backfill", str(root), "--no-progress", "--wandb-timeout", TIMEOUT, check=False, timeout=300, **env)
    took = time.monotonic() - started
    assert down.returncode == 1, down.stderr
    assert "W&B is unreachable" in down.stderr and "768 row(s) stay pending" in down.stderr
    assert took < 60, f"backfill took {took:.0f} s with W&B down"
    state = status(home)
    [unreachable] = state["wandb_unreachable"]
    assert unreachable["base_url"] == wandb_standin.url and "Connection refused" in unreachable["error"]
    assert [(r["rows_uploaded"], r["rows_pending"]) for r in runs_of(home)] == [(0, 384), (0, 384)]
    table = cli(home, "status").stdout
    assert "W&B unreachable" in table and "uploads wait" in table

    wandb_standin.start()
    cli(home, "backfill", str(root), "--no-progress", "--wandb-timeout", TIMEOUT, timeout=300, **env)
    assert_every_line_once(wandb_standin, home)
    assert status(home)["wandb_unreachable"] == []
    assert_nothing_unexpected(wandb_standin)


@pytest.mark.parametrize("code", [500, 429])
def test_history_server_errors_leave_rows_pending_then_arrive_once(wandb_standin: WandbStandin, tmp_path, real_logs, code):
    """W&B answers every history upload with a server error: wandb-core retries until the finish times out;
    W&B still answers (the probe), so it is a failure of these runs (backoff, error in status), not of W&B."""
    root = two_work_dirs(tmp_path)
    home = tmp_path / "home"
    refusal = wandb_standin.fail("file_stream", code, when=lambda record: "wandb-history.jsonl" in record.variables["files"])
    started = time.monotonic()
    refused = cli(home, "backfill", str(root), "--no-progress", "--wandb-timeout", TIMEOUT, check=False, timeout=300, **wandb_standin.env())
    assert refused.returncode == 1, refused.stderr
    assert time.monotonic() - started < 120
    assert any(r.status == code for r in wandb_standin.requests_to("file_stream"))
    state = status(home)
    assert state["wandb_unreachable"] == []
    for entry in runs_of(home):
        assert (entry["rows_uploaded"], entry["rows_pending"]) == (0, 384)
        assert "Timed out finishing run" in entry["last_error"]

    with wandb_standin.lock:
        wandb_standin.faults.remove(refusal)
    cli(home, "backfill", str(root), "--no-progress", "--wandb-timeout", TIMEOUT, timeout=300, **wandb_standin.env())
    assert_every_line_once(wandb_standin, home)
    assert_nothing_unexpected(wandb_standin)


def test_server_killed_mid_backfill_ends_in_bounded_time_then_every_line_once(wandb_standin: WandbStandin, tmp_path, real_logs):
    root, log, home = yolov3_work_dir(tmp_path)
    env = {**service_env(home), **wandb_standin.env()}
    throttle = wandb_standin.slow("file_stream", 1.0)
    backfill = subprocess.Popen([sys.executable, "-m", "mmdet_wandb.cli", "backfill", str(root), "--no-progress",
                                 "--wandb-timeout", TIMEOUT], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wandb_standin.wait_for(lambda: any(r.history for r in wandb_standin.runs.values()), 120, "part of the rows")
        wandb_standin.stop()
        killed = time.monotonic()
        _, stderr = backfill.communicate(timeout=180)
    finally:
        if backfill.poll() is None:
            backfill.kill()
            backfill.communicate()
    assert time.monotonic() - killed < 2 * int(TIMEOUT) + 40, "a finish timeout, a probe and a wandb-core restart"
    assert backfill.returncode == 1 and "W&B is unreachable" in stderr, stderr
    [entry] = runs_of(home)
    assert entry["rows_pending"] > 0
    assert status(home)["wandb_unreachable"]

    with wandb_standin.lock:
        wandb_standin.faults.remove(throttle)
    wandb_standin.start()
    backfill_again_sends_nothing_twice(wandb_standin, home, root, log)


def test_checkpoints_and_tables_online_a_failed_upload_keeps_its_pin(wandb_standin: WandbStandin, tmp_path, trained_work_dir):
    """A real tiny mmdet training, backfilled with checkpoints and tables while W&B refuses every checkpoint
    file: nothing counts as uploaded that W&B did not commit, the pins stay; the next pass uploads them. The
    prediction tables go once W&B has committed `val`, and their references resolve to its entries."""
    work_dir = trained_work_dir("retinanet_epoch")
    checkpoint_names = sorted(p.name for p in work_dir.glob("*.pth") if not p.is_symlink())  # epochs 7, 8 and the best
    home = tmp_path / "home"
    args = ("backfill", str(work_dir.parent), "--no-progress", "--log-checkpoint", "--evaluate", "--num-eval-images", "6",
            "--wandb-timeout", TIMEOUT)
    refusal = wandb_standin.fail("upload_artifact_file", 400, when=lambda record: record.path.endswith(".pth"))
    env = wandb_standin.env(tmp_path / "wandb-dirs")  # wandb's cache and data dirs, looked at below
    refused = cli(home, *args, check=False, timeout=600, **env)
    assert refused.returncode == 1, refused.stderr
    [entry] = runs_of(home)
    assert "run_" in entry["last_error"] and "not committed by W&B" in entry["last_error"]
    assert entry["artifacts_pending"] == len(checkpoint_names)
    models = [a for a in wandb_standin.artifacts.values() if a.type == "model"]
    assert models and all(a.state != "COMMITTED" for a in models)
    [work] = status(home)["work_dirs"]
    assert {c["name"]: c["state"] for c in work["checkpoints"]} == dict.fromkeys(checkpoint_names, "ready"), "not uploaded"
    pins = sorted(p.name for p in (home / "store").rglob("*.pth"))
    assert len(pins) == len(checkpoint_names), "every checkpoint keeps its pinned copy"

    with wandb_standin.lock:
        wandb_standin.faults.remove(refusal)
    cli(home, *args, timeout=600, **env)
    [entry] = runs_of(home)
    assert (entry["artifacts_pending"], entry["last_error"]) == (0, None)
    committed = [a for a in wandb_standin.artifacts.values() if a.state == "COMMITTED"]
    models = {a.files[next(iter(a.files))]: a for a in committed if a.type == "model"}
    assert sorted(len(b) for b in models) == sorted((work_dir / n).stat().st_size for n in checkpoint_names)
    for name in checkpoint_names:
        [model] = [a for a in committed if a.type == "model" and name in a.entries]
        assert model.files[name] == (work_dir / name).read_bytes()
    [val] = [a for a in committed if a.type == "dataset"]
    predictions = [a for a in committed if a.type == "evaluation"]
    assert len(predictions) == len(checkpoint_names) - 1, "one prediction table per checkpoint (the best is epoch 8)"
    val_hex = base64.b64decode(val.id).hex()
    for prediction in predictions:
        refs = {path: e["ref"] for path, e in prediction.entries.items() if e.get("ref")}
        assert refs, "the images are references, not copies"
        for path, ref in refs.items():
            assert ref.startswith("wandb-artifact://"), ref
            assert ref.split("/")[2] in (val.id, val_hex), f"{ref} points into val ({val.id})"
            assert prediction.entries[path]["digest"] == val.entries[path]["digest"]
    assert not list((home / "store").rglob("*.pth")), "pins released once W&B committed each checkpoint"
    [work] = status(home)["work_dirs"]
    assert {c["name"]: c["state"] for c in work["checkpoints"]} == dict.fromkeys(checkpoint_names, "uploaded")
    sizes = {(work_dir / n).stat().st_size for n in checkpoint_names}
    cached = [p for p in (tmp_path / "wandb-dirs").rglob("*") if p.is_file() and p.stat().st_size in sizes]
    assert not cached, f"no second copy of a checkpoint in wandb's cache: {cached}"
    assert_nothing_unexpected(wandb_standin)


def test_live_watch_reads_on_while_wandb_is_down_and_uploads_every_line_once_when_back(wandb_standin: WandbStandin, tmp_path, real_logs):
    """A live training's log, followed by `watch`; W&B goes away mid-run. The loop keeps reading the log into
    the outbox (the W&B calls wait in the upload thread), status says W&B is unreachable, and once it is
    back every line arrives once, in order."""
    work_dir = tmp_path / "root" / "eltd_live"
    work_dir.mkdir(parents=True)
    lines = ELTD_LOG.read_bytes().splitlines(keepends=True)
    log = work_dir / ELTD_LOG.name
    log.write_bytes(b"".join(lines[:150]))
    home = tmp_path / "home"
    output = (tmp_path / "watch.out").open("w")
    watch = subprocess.Popen(
        [sys.executable, "-m", "mmdet_wandb.cli", "watch", str(work_dir.parent), "--poll-interval", "0.2", "--scan-interval", "1",
         "--segment-idle", "2", "--finish-after", "3", "--wandb-timeout", TIMEOUT, "--log-level", "INFO"],
        env={**service_env(home), **wandb_standin.env()}, cwd=REPO, stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        wandb_standin.wait_for(lambda: any(r.history for r in wandb_standin.runs.values()), 60, "the first rows")
        wandb_standin.stop()
        with log.open("ab") as handle:
            for line in lines[150:]:
                handle.write(line)
                handle.flush()
                time.sleep(0.005)

        def read_while_down() -> bool:
            state = status(home)
            return bool(state["wandb_unreachable"]) and sum(r["rows_uploaded"] + r["rows_pending"] for r in runs_of(home)) == 384

        wandb_standin.wait_for(read_while_down, 90, "every line read while W&B is down, and the circuit open")
        assert watch.poll() is None
        wandb_standin.start()
        wandb_standin.wait_for(lambda: status(home)["wandb_unreachable"] == [] and runs_of(home)[0]["rows_pending"] == 0,
                               120, "W&B back and every row confirmed")
        watch.send_signal(signal.SIGTERM)
        watch.wait(timeout=120)
    finally:
        if watch.poll() is None:
            os.killpg(watch.pid, signal.SIGKILL)
            watch.wait()
        output.close()
    text = (tmp_path / "watch.out").read_text()
    assert watch.returncode == 0, text
    assert "is unreachable" in text and "answers again" in text
    assert "Tried to log to step" not in text
    assert_every_line_once(wandb_standin, home)

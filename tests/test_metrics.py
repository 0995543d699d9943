"""The Prometheus endpoint of a real `watch` beside a real tiny training's work_dir, scraped on loopback."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from common import events
from db.session import Database
from mmdet_wandb import metrics
from tests.conftest import REPO, cli, service_env, status, stop, wait_until
from tests.wandb_standin import WandbStandin


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


@contextmanager
def served(db: Database, node: str | None, beat: Path, work_dir_labels: int = 0) -> Iterator[int]:
    """The endpoint in this process, over `db`, on a free loopback port (yielded) until the block ends."""
    port = free_port()
    server = metrics.serve("127.0.0.1", port, db, node, beat, work_dir_labels)
    try:
        yield port
    finally:
        server.shutdown()
        server.server_close()


def scrape(port: int) -> dict[str, dict[tuple, float]]:
    """sample name -> {sorted label items: value}, from the parser of the client library; families under "families"."""
    code, text = get(port, "/metrics")
    assert code == 200, text
    samples: dict[str, dict[tuple, float]] = {"families": {}}
    for family in text_string_to_metric_families(text):
        samples["families"][(family.name,)] = 1
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def figures(scraped: dict[str, dict[tuple, float]]) -> dict:
    one = lambda name: next(iter(scraped[name].values()))  # noqa: E731
    by = lambda name, label: {dict(k)[label]: v for k, v in scraped.get(name, {}).items()}  # noqa: E731  (no sample: none)
    return {"read": one("mmdet_wandb_rows_read_total"), "uploaded": one("mmdet_wandb_rows_uploaded_total"),
            "pending": one("mmdet_wandb_rows_pending"), "work_dirs": one("mmdet_wandb_work_dirs"),
            "checkpoints": by("mmdet_wandb_checkpoints", "state"), "eval_jobs": by("mmdet_wandb_eval_jobs", "state"),
            "problems": sum(scraped.get("mmdet_wandb_problems", {}).values())}


def status_figures(home: Path) -> dict:
    state = status(home)
    runs = [r for w in state["work_dirs"] for r in w["runs"]]

    def states(key: str) -> dict[str, float]:
        counts: dict[str, float] = {}
        for w in state["work_dirs"]:
            for item in w[key]:
                counts[item["state"]] = counts.get(item["state"], 0) + 1
        return counts

    uploaded, pending = sum(r["rows_uploaded"] for r in runs), sum(r["rows_pending"] for r in runs)
    return {"read": uploaded + pending, "uploaded": uploaded, "pending": pending, "work_dirs": len(state["work_dirs"]),
            "checkpoints": states("checkpoints"), "eval_jobs": states("eval_jobs"),
            "problems": sum(w["problems"] for w in state["work_dirs"])}


def agrees(port: int, home: Path) -> bool:
    """The endpoint's figures equal `status --json`'s at a settled moment: both scrapes around it alike."""
    before = figures(scrape(port))
    return before == status_figures(home) == figures(scrape(port))


def test_the_endpoint_moves_with_the_work_and_ends_equal_to_status(trained_work_dir, tmp_path, watcher):
    work_dir = trained_work_dir("retinanet_epoch", writable=True)
    log = next(work_dir.glob("*.log.json"))
    lines = log.read_bytes().splitlines(keepends=True)
    data_lines = len(lines) - 1  # the first line is the env header
    half = 1 + data_lines // 2
    log.write_bytes(b"".join(lines[:half]))
    home, port = tmp_path / "home", free_port()
    proc = watcher(home, work_dir.parent, "--metrics-port", str(port), "--segment-idle", "2", "--finish-after", "3")

    wait_until(lambda: get(port, "/healthz")[0] == 200, 60, "/healthz to answer 200", proc)
    assert get(port, "/readyz")[0] == 200
    wait_until(lambda: figures(scrape(port))["uploaded"] == half - 1, 60, "the first half uploaded", proc)

    with open(log, "ab") as handle:
        handle.writelines(lines[half:])
    wait_until(lambda: figures(scrape(port))["uploaded"] == data_lines, 60, "the appended lines uploaded", proc)

    wait_until(lambda: agrees(port, home), 60, "a scrape equal to status --json", proc)
    final = figures(scrape(port))
    assert final["read"] == final["uploaded"] == data_lines and final["pending"] == 0 and final["work_dirs"] == 1
    assert sum(final["checkpoints"].values()) >= 2  # epoch_7.pth, epoch_8.pth, best_*.pth
    scraped = scrape(port)
    families = {name for (name,) in scraped["families"]}
    assert set(metrics.NAMES) <= families, sorted(set(metrics.NAMES) - families)
    assert {"process_cpu_seconds", "python_info"} <= families  # the library's own collectors
    passes, scans = scraped["mmdet_wandb_loop_pass_seconds_count"][()], scraped["mmdet_wandb_scan_seconds_count"][()]
    assert passes >= 3 and scans >= 1 and scraped["mmdet_wandb_loop_pass_seconds_sum"][()] > 0
    assert next(iter(scraped["mmdet_wandb_wandb_reachable"].values())) == 1  # offline: nothing to reach
    # every row, the appended ones too, had its lag observed once, when its segment closed; none is pending
    assert scraped["mmdet_wandb_lag_seconds_count"][()] == data_lines and scraped["mmdet_wandb_lag_seconds_sum"][()] > 0
    assert scraped["mmdet_wandb_oldest_pending_seconds"][()] == 0
    # watchdog's observer holds a watch per folder under the root (the root and the work_dir at least)
    assert scraped["mmdet_wandb_inotify_watches"][()] >= 2
    assert scraped["mmdet_wandb_inotify_max_user_watches"][()] == int(Path("/proc/sys/fs/inotify/max_user_watches").read_text())
    stop(proc)
    assert get(port, "/healthz")[0] == 0  # the endpoint ends with the service


def test_rows_per_work_dir_for_the_newest_n_work_dirs_and_totals_always(tmp_path, watcher):
    """`metrics_work_dir_labels = 1` in the data dir's config file (with the port and the address: the endpoint is
    configured by the file alone): the per-work_dir families hold the work_dir discovered last only, and equal its
    `status --json` figures; the totals hold both."""
    from tests.test_online import ELTD_LOG

    root, home, port = tmp_path / "root", tmp_path / "home", free_port()
    first, second = root / "eltd_a", root / "eltd_b"
    first.mkdir(parents=True)
    shutil.copy(ELTD_LOG, first)
    home.mkdir()
    (home / "config.toml").write_text(f"metrics_work_dir_labels = 1\nmetrics_port = {port}\nmetrics_addr = '127.0.0.1'\n")
    proc = watcher(home, root, "--segment-idle", "1", "--finish-after", "2")

    def per_work_dir() -> dict[str, dict[str, float]]:
        scraped = scrape(port)
        return {name: {dict(k)["work_dir"]: v for k, v in scraped.get(name + suffix, {}).items()}
                for name, suffix in zip(metrics.WORK_DIR_NAMES, ("_total", "_total", ""))}

    wait_until(lambda: get(port, "/metrics")[0] == 200, 60, "the endpoint", proc)
    wait_until(lambda: per_work_dir()[metrics.WORK_DIR_NAMES[1]] == {str(first): 384}, 90, "the first work_dir uploaded", proc)
    second.mkdir()
    shutil.copy(ELTD_LOG, second)

    def settled() -> bool:
        shown = per_work_dir()
        state = {w["path"]: w["runs"] for w in status(home)["work_dirs"]}
        expected = {str(second): sum(r["rows_uploaded"] for r in state.get(str(second), []))}
        return shown[metrics.WORK_DIR_NAMES[1]] == expected == {str(second): 384} and shown[metrics.WORK_DIR_NAMES[0]] == expected
    wait_until(settled, 90, "the second work_dir, discovered last, alone under its label", proc)
    scraped = scrape(port)
    assert per_work_dir()[metrics.WORK_DIR_NAMES[2]] == {str(second): 0}
    assert scraped["mmdet_wandb_rows_uploaded_total"][()] == 768 and scraped["mmdet_wandb_work_dirs"][()] == 2
    stop(proc)


def test_health_over_http_fails_before_the_first_loop_pass(tmp_path):
    """/healthz and /readyz say what `mmdet-wandb health` says: no heartbeat yet is not healthy; so does the
    healthcheck of docker-compose.metrics.yml, run as compose runs it (its port published on loopback only, and a
    proxy of the environment not used)."""
    uploader = yaml.safe_load((REPO / "docker-compose.metrics.yml").read_text())["services"]["uploader"]
    assert uploader["ports"] and all(p.startswith("${METRICS_HOST_ADDR:-127.0.0.1}:") for p in uploader["ports"])
    kind, *healthcheck = uploader["healthcheck"]["test"]
    assert kind == "CMD" and healthcheck[0] == "python"

    def compose_healthcheck(port: int) -> int:
        """With a proxy in the environment that refuses every connection (.env may hold one for W&B): not used."""
        env = {**os.environ, "MMDET_WANDB_METRICS_PORT": str(port), "HTTP_PROXY": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"}
        return subprocess.run([sys.executable, *healthcheck[1:]], env=env, capture_output=True, timeout=60).returncode

    home = tmp_path / "home"
    home.mkdir()
    db = Database(f"sqlite:///{home / 'state.db'}", node="n")
    db.upgrade()
    beat = home / "heartbeat" / "uploader"
    with served(db, "n", beat) as port:
        assert get(port, "/healthz") == (503, "fail: no heartbeat yet\n")
        assert get(port, "/readyz")[0] == 503
        assert cli(home, "health", "uploader", check=False).returncode == 1
        assert compose_healthcheck(port) == 1
        beat.parent.mkdir()
        beat.touch()
        assert cli(home, "health", "uploader").returncode == 0
        assert get(port, "/healthz")[0] == 200 and get(port, "/readyz")[0] == 200
        assert compose_healthcheck(port) == 0


def test_a_port_in_use_or_an_address_that_does_not_resolve_is_one_clear_line(tmp_path):
    root = tmp_path / "work_dirs"
    root.mkdir()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = cli(tmp_path / "home", "watch", str(root), "--metrics-port", str(port), check=False, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert f"--metrics-port {port}" in line and "in use" in line, line

    proc = cli(tmp_path / "home", "watch", str(root), "--metrics-addr", "no-such-host.invalid", check=False, timeout=120,
               MMDET_WANDB_METRICS_PORT=str(free_port()))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "--metrics-addr no-such-host.invalid" in line and "cannot listen" in line, line

    proc = cli(tmp_path / "home", "watch", str(root), check=False, timeout=120, MMDET_WANDB_METRICS_PORT="70000")
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert "MMDET_WANDB_METRICS_PORT = '70000'" in line and "65535" in line, line

    proc = cli(tmp_path / "home", "watch", str(root), "--metrics-work-dir-labels", "-1", check=False, timeout=120)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert "--metrics-work-dir-labels = -1" in line and "from 0 to 1000" in line, line

    config = tmp_path / "config.toml"  # the config file's keys: the same validators, the file and key named
    for text, says in (("metrics_port = 0", "metrics_port = 0: a TCP port from 1 to 65535"),
                       ("metrics_port = true", "metrics_port = True: a TCP port from 1 to 65535"),
                       ("metrics_addr = 'two words'", "metrics_addr = 'two words': a host name or IP address")):
        config.write_text(text + "\n")
        proc = cli(tmp_path / "home", "watch", str(root), "--config", str(config), check=False, timeout=120)
        assert proc.returncode == 2
        (line,) = proc.stderr.strip().splitlines()
        assert f"config file {config}: {says}" in line, line


def series_names(port: int) -> set[str]:
    """The names of the series Prometheus stores from a scrape of the endpoint: a counter `c` is `c_total`, a
    histogram `h` is `h_bucket`, `h_sum` and `h_count` (families without a sample count too, from their TYPE)."""
    code, text = get(port, "/metrics")
    assert code == 200, text
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    return {family.name + suffix for family in text_string_to_metric_families(text) for suffix in suffixes.get(family.type, ("",))}


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_every_alert_rule_and_dashboard_panel_names_only_series_the_endpoint_exposes(tmp_path, request, backend):
    """promtool is not available here: the rules are parsed as YAML and each expr's metric names checked against
    the series of a real endpoint's scrape (of a state DB on either backend); the oldest pending row has its alert,
    lag and oldest pending their panels."""
    import re

    home = tmp_path / "home"
    home.mkdir()
    url = f"sqlite:///{home / 'state.db'}" if backend == "sqlite" else request.getfixturevalue("postgres_url")
    db = Database(url, node="n")
    db.upgrade()
    with served(db, "n", home / "heartbeat", work_dir_labels=1) as port:
        exposed = series_names(port)
    assert {"mmdet_wandb_rows_uploaded_total", "mmdet_wandb_lag_seconds_bucket", "mmdet_wandb_work_dir_rows_pending"} <= exposed
    rules = yaml.safe_load((REPO / "monitoring" / "alerts.yaml").read_text())
    named: dict[str, set[str]] = {}
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert rule["alert"] and rule["expr"] and rule["annotations"]["summary"], rule
            expr = re.sub(r'"[^"]*"|\{[^}]*\}', "", rule["expr"])  # label matchers and strings are not names
            names = named[rule["alert"]] = set(re.findall(r"\bmmdet_wandb_[a-z_]+\b", expr))
            assert names and names <= exposed, (rule["alert"], names - exposed)
    assert len(named) >= 5
    assert any("mmdet_wandb_oldest_pending_seconds" in names for names in named.values()), named
    dashboard = json.loads((REPO / "monitoring" / "grafana-dashboard.json").read_text())
    panels: dict[str, set[str]] = {}
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            names = set(re.findall(r"\bmmdet_wandb_[a-z_]+\b", target["expr"]))
            assert names and names <= exposed, (panel["title"], names - exposed)
            panels.setdefault(panel["title"], set()).update(names)
    shown = set().union(*panels.values())
    assert {"mmdet_wandb_lag_seconds_bucket", "mmdet_wandb_oldest_pending_seconds", "mmdet_wandb_eval_job_seconds_bucket",
            "mmdet_wandb_eval_job_leases_lost_total", "mmdet_wandb_inotify_watches", "mmdet_wandb_inotify_max_user_watches"} <= shown, panels
    alerted = set().union(*named.values())
    assert {"mmdet_wandb_inotify_watches", "mmdet_wandb_eval_job_leases_lost_total"} <= alerted, named


def test_eval_job_durations_and_expired_leases_from_the_state_db(trained_work_dir, tmp_path):
    """After a real `backfill --evaluate`, the endpoint's job durations equal `status --json`'s job seconds; a job
    claimed by a worker that then stops renewing its lease shows as expired until it is taken over."""
    from db import jobs as queue
    from tests.test_evaluator import NUM, rewrite_checkpoint, val_annotation_path

    work_dir = trained_work_dir("retinanet_epoch", dest=tmp_path / "scratch", writable=True)
    home = tmp_path / "home"
    dataset_root = Path(val_annotation_path(next(work_dir.glob("*.py")))).parents[1]
    parked = work_dir / "epoch_7.pth"  # its job is parked: a dataset that is not there
    rewrite_checkpoint(parked, parked, lambda meta: {**meta, "config": meta["config"].replace(str(dataset_root), "data/coco")})
    cli(home, "backfill", str(work_dir.parent), "--no-progress", "--evaluate", "--num-eval-images", str(NUM), check=False)
    jobs = [job for w in status(home)["work_dirs"] for job in w["eval_jobs"]]
    done = [job["seconds"] for job in jobs if job["state"] == "done"]
    assert done and all(seconds > 0 for seconds in done) and [j["state"] for j in jobs].count("dead") == 1, jobs
    db = Database(f"sqlite:///{home / 'state.db'}")
    with served(db, None, home / "heartbeat" / "evaluator") as port:
        scraped = scrape(port)
        assert scraped["mmdet_wandb_eval_job_seconds_count"][()] == len(done)
        assert abs(scraped["mmdet_wandb_eval_job_seconds_sum"][()] - sum(done)) < 1e-6
        buckets = {dict(k)["le"]: v for k, v in scraped["mmdet_wandb_eval_job_seconds_bucket"].items()}
        assert buckets["+Inf"] == len(done) and all(buckets[le] == sum(s <= float(le) for s in done) for le in buckets if le != "+Inf")
        assert scraped["mmdet_wandb_eval_jobs_lease_expired"][()] == 0

        cli(home, "requeue")  # the parked job is queued again
        claimed = queue.claim(db, "a-worker-that-dies", 0.2, stack="mmdet2")
        assert claimed is not None
        wait_until(lambda: scrape(port)["mmdet_wandb_eval_jobs_lease_expired"][()] == 1, 30, "the lease expired")
        assert scrape(port)["mmdet_wandb_eval_job_leases_lost_total"][()] == 0  # expired, not lost until taken over
        assert queue.claim(db, "another-worker", 60, stack="mmdet2").id == claimed.id  # taken over
        after = scrape(port)
        assert after["mmdet_wandb_eval_jobs_lease_expired"][()] == 0 and after["mmdet_wandb_eval_job_leases_lost_total"][()] == 1


def store_files(store: Path) -> tuple[int, int, int]:
    """(links, files, bytes) in a store as the disk has them: a file is an inode, its size counted once."""
    found = [path.stat() for path in store.rglob("*") if path.is_file()]
    sizes = {(st.st_dev, st.st_ino): st.st_size for st in found}
    return len(found), len(sizes), sum(sizes.values())


def test_bytes_pinned_in_the_store_are_the_sizes_of_its_files_each_once(trained_work_dir, tmp_path):
    """A real offline `backfill --log-checkpoint` of a real tiny training: its checkpoints stay pinned (offline
    until `clean-store` after `sync`) and each queued eval job holds a second link to its checkpoint's file; the
    gauge equals the sizes of the files in the store, read from the disk, each file once however many links."""
    from tests.test_evaluator import NUM

    work_dir = trained_work_dir("retinanet_epoch")
    home = tmp_path / "home"
    cli(home, "backfill", str(work_dir.parent), "--no-progress", "--log-checkpoint", "--num-eval-images", str(NUM))
    links, files, pinned = store_files(home / "store")
    (entry,) = status(home)["work_dirs"]
    assert files == len(entry["checkpoints"]) and links == files + len(entry["eval_jobs"]) > files and pinned > 0, entry
    with served(Database(f"sqlite:///{home / 'state.db'}"), None, home / "heartbeat") as port:
        assert scrape(port)["mmdet_wandb_store_pinned_bytes"][()] == pinned


def test_a_real_evaluate_worker_serves_the_figures_of_status_beside_a_backfill(trained_work_dir, tmp_path):
    """A real `evaluate --metrics-port` worker beside a real `backfill --evaluate --log-checkpoint` of a real tiny
    training, both claiming from the one queue (one job parked: its checkpoint's config names a dataset that is not
    there): the worker's endpoint shows jobs running while the backfill runs, and ends equal to `status --json`
    (jobs and checkpoints by state, the done jobs' seconds) and to the store on disk (bytes pinned)."""
    from tests.test_evaluator import NUM, rewrite_checkpoint, start_worker, val_annotation_path

    work_dir = trained_work_dir("retinanet_epoch", dest=tmp_path / "scratch", writable=True)
    dataset_root = Path(val_annotation_path(next(work_dir.glob("*.py")))).parents[1]
    parked = work_dir / "epoch_7.pth"
    rewrite_checkpoint(parked, parked, lambda meta: {**meta, "config": meta["config"].replace(str(dataset_root), "data/coco")})
    home, port = tmp_path / "home", free_port()
    worker = start_worker(home, "--metrics-port", str(port))
    backfill = None
    try:
        wait_until(lambda: get(port, "/healthz")[0] == 200, 120, "the worker's /healthz", worker)
        assert get(port, "/readyz")[0] == 200 and figures(scrape(port))["eval_jobs"] == {}
        backfill = subprocess.Popen(
            [sys.executable, "-m", "mmdet_wandb.cli", "backfill", str(work_dir.parent), "--no-progress", "--evaluate",
             "--num-eval-images", str(NUM), "--log-checkpoint"],
            env=service_env(home), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        seen: list[dict[str, float]] = []

        def backfill_ended() -> bool:
            seen.append(figures(scrape(port))["eval_jobs"])
            return backfill.poll() is not None

        wait_until(backfill_ended, 900, "the backfill", worker)
        assert any(jobs.get("running") for jobs in seen), seen
        wait_until(lambda: agrees(port, home), 60, "the worker's scrape equal to status --json", worker)
        scraped = scrape(port)
        jobs = [job for w in status(home)["work_dirs"] for job in w["eval_jobs"]]
        done = [job["seconds"] for job in jobs if job["state"] == "done"]
        assert figures(scraped)["eval_jobs"] == {"done": len(done), "dead": 1} and len(done) >= 1, jobs
        assert scraped["mmdet_wandb_eval_job_seconds_count"][()] == len(done)
        assert abs(scraped["mmdet_wandb_eval_job_seconds_sum"][()] - sum(done)) < 1e-6
        assert scraped["mmdet_wandb_store_pinned_bytes"][()] == store_files(home / "store")[2] > 0
        stop(worker)
    finally:
        for proc in (worker, backfill):
            if proc is not None:
                kill(proc)


# --- structured events (common/events.py) ------------------------------------------------------------------


def events_in(output: str) -> dict[str, list[dict]]:
    """event name → its JSON lines, in order. Lines that are no JSON object are not ours: torch's C++ side writes
    a warning of its own to stderr when the evaluator imports it (`W1205 ... No CUDA runtime is found`)."""
    found: dict[str, list[dict]] = {}
    for line in output.splitlines():
        if not line.startswith("{"):
            continue
        entry = json.loads(line)
        if "event" in entry:
            assert set(events.EVENTS[entry["event"]]) <= set(entry), entry  # every id of the event is a field
            found.setdefault(entry["event"], []).append(entry)
    return found


def test_the_events_that_matter_carry_their_name_and_ids_in_json_logs(trained_work_dir, tmp_path):
    """A real `backfill --evaluate --log-format json` over a real tiny training: one checkpoint's job parked (its
    config names a dataset that is not there), the other done, a broken symlink recorded, then resolved."""
    from tests.test_evaluator import NUM, rewrite_checkpoint, val_annotation_path

    work_dir = trained_work_dir("retinanet_epoch", dest=tmp_path / "scratch", writable=True)
    root, home = work_dir.parent, tmp_path / "home"
    dataset_root = Path(val_annotation_path(next(work_dir.glob("*.py")))).parents[1]
    parked = work_dir / "epoch_7.pth"
    rewrite_checkpoint(parked, parked, lambda meta: {**meta, "config": meta["config"].replace(str(dataset_root), "data/coco")})
    dangling = root / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    args = ("backfill", str(root), "--no-progress", "--evaluate", "--num-eval-images", str(NUM), "--log-checkpoint",
            "--log-format", "json", "--log-level", "INFO")
    found = events_in(cli(home, *args, check=False).stderr)
    state = status(home)
    (entry,) = state["work_dirs"]
    (run,) = entry["runs"]
    for name in (events.RUN_OPENED, events.RUN_CLOSED, events.SEGMENT_VERIFIED):
        assert found[name] and all((e["run_id"], e["work_dir"], e["mode"]) == (run["wandb_id"], str(work_dir), "offline")
                                   and isinstance(e["segment"], int) for e in found[name]), (name, found.get(name))
    assert sum(e["rows"] for e in found[events.SEGMENT_VERIFIED]) == run["rows_uploaded"] > 0
    logged = {e["checkpoint"]: e for e in found[events.CHECKPOINT_LOGGED]}
    assert "epoch_8.pth" in logged and "epoch_8" in logged["epoch_8.pth"]["aliases"], logged
    assert all(e["run_id"] == run["wandb_id"] and e["work_dir"] == str(work_dir) for e in logged.values())
    jobs = {job["id"]: job for job in entry["eval_jobs"]}
    for name in (events.EVAL_JOB_CLAIMED, events.EVAL_JOB_DONE, events.EVAL_JOB_PARKED):
        assert found[name] and all(e["job_id"] in jobs and e["work_dir"] == str(work_dir) and e["attempt"] >= 1  # its pin:
                                   and Path(e["checkpoint"]).name.split("-", 1)[1] == jobs[e["job_id"]]["checkpoint"]  # <id>-<name>
                                   for e in found[name]), (name, found.get(name))
    (dead,) = found[events.EVAL_JOB_PARKED]
    assert jobs[dead["job_id"]]["state"] == "dead" and jobs[dead["job_id"]]["checkpoint"] == parked.name
    assert "val.json" in dead["error"]
    assert {jobs[e["job_id"]]["state"] for e in found[events.EVAL_JOB_DONE]} == {"done"}
    assert all(e["seconds"] > 0 for e in found[events.EVAL_JOB_DONE])
    assert {(e["path"], e["offset"], e["kind"]) for e in found[events.PROBLEM_RECORDED]} == {(str(dangling), -1, "broken_symlink")}

    dangling.unlink()
    again = events_in(cli(home, *args, check=False).stderr)
    assert [(e["path"], e["kind"]) for e in again[events.PROBLEM_RESOLVED]] == [(str(dangling), "broken_symlink")]


def online_watch(home: Path, root: Path, standin: WandbStandin, output: Path, *args: str) -> subprocess.Popen[bytes]:
    """A real `watch --log-format json` online against the loopback stand-in, its log lines into `output` (a
    file, not a pipe: a pipe nobody reads while the test waits would stop the process once full)."""
    from tests.test_online import TIMEOUT

    with output.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "mmdet_wandb.cli", "watch", str(root), "--poll-interval", "0.2", "--scan-interval", "1",
             "--segment-idle", "2", "--finish-after", "3", "--wandb-timeout", TIMEOUT, "--log-format", "json", *args],
            env={**service_env(home), **standin.env()}, cwd=REPO, stdout=subprocess.DEVNULL, stderr=out, start_new_session=True,
        )


def kill(proc: subprocess.Popen[bytes]) -> None:
    """What a test that failed leaves running: its process group, at once."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_online_events_circuit_open_and_closed_and_segments_confirmed(wandb_standin, tmp_path):
    """A real `watch --log-format json` of a real log with the loopback stand-in of W&B down at start, then up."""
    from tests.test_online import ELTD_LOG

    work_dir = tmp_path / "root" / "eltd"
    work_dir.mkdir(parents=True)
    shutil.copy(ELTD_LOG, work_dir)
    home, output = tmp_path / "home", tmp_path / "watch.out"
    wandb_standin.stop()
    proc = online_watch(home, work_dir.parent, wandb_standin, output)

    def logged() -> dict[str, list[dict]]:
        text = output.read_text()
        return events_in(text[: text.rfind("\n") + 1])  # whole lines only: the process is writing

    try:
        wait_until(lambda: events.CIRCUIT_OPEN in logged(), 60, "the circuit open")
        wandb_standin.start()

        def confirmed() -> int:
            return sum(e["rows"] for e in logged().get(events.SEGMENT_CONFIRMED, []))

        wait_until(lambda: confirmed() == 384 or proc.poll() is not None, 120, "every row confirmed by W&B")
        stop(proc)
    finally:
        kill(proc)
    found = events_in(output.read_text())
    (run,) = [r for w in status(home)["work_dirs"] for r in w["runs"]]
    assert [e["url"] for e in found[events.CIRCUIT_OPEN]] == [wandb_standin.url] and found[events.CIRCUIT_OPEN][0]["error"]
    (closed,) = found[events.CIRCUIT_CLOSED]
    assert closed["url"] == wandb_standin.url and closed["seconds"] > 0
    for name in (events.RUN_OPENED, events.RUN_CLOSED, events.SEGMENT_CONFIRMED):
        assert found[name] and all((e["run_id"], e["work_dir"], e["mode"]) == (run["wandb_id"], str(work_dir), "online")
                                   for e in found[name]), (name, found.get(name))
    assert (run["rows_uploaded"], run["rows_pending"]) == (384, 0)


def test_the_circuit_gauge_flips_while_wandb_is_down_and_appended_rows_wait_then_show_their_lag(wandb_standin, tmp_path):
    """A real online `watch --metrics-port` of a real log with the loopback stand-in of W&B up, then down while
    lines are appended, then up again: `wandb_reachable` goes 1, 0, 1; while down the appended rows are pending
    and the oldest one's age is the time since their append; once W&B has them, each had its lag observed once,
    at least as long as it waited for W&B."""
    from tests.test_online import ELTD_LOG

    work_dir = tmp_path / "root" / "eltd"
    work_dir.mkdir(parents=True)
    log = work_dir / ELTD_LOG.name
    lines = ELTD_LOG.read_bytes().splitlines(keepends=True)
    first = len(lines) // 2  # the env header and rows; the rest is appended while W&B is down
    log.write_bytes(b"".join(lines[:first]))
    home, port, total = tmp_path / "home", free_port(), len(lines) - 1
    proc = online_watch(home, work_dir.parent, wandb_standin, tmp_path / "watch.out", "--metrics-port", str(port))

    def now() -> dict[str, float]:
        scraped = scrape(port)
        return {name.removeprefix("mmdet_wandb_"): scraped[name][()] for name in (
            "mmdet_wandb_wandb_reachable", "mmdet_wandb_rows_uploaded_total", "mmdet_wandb_rows_pending",
            "mmdet_wandb_oldest_pending_seconds", "mmdet_wandb_segments_open", "mmdet_wandb_lag_seconds_count",
            "mmdet_wandb_lag_seconds_sum")}

    def shows(**expected: float) -> bool:
        scraped = now()
        return all(scraped[name] == value for name, value in expected.items())

    try:
        wait_until(lambda: get(port, "/metrics")[0] == 200, 60, "the endpoint")
        wait_until(lambda: shows(wandb_reachable=1, rows_uploaded_total=first - 1, rows_pending=0, oldest_pending_seconds=0,
                                 segments_open=0, lag_seconds_count=first - 1), 120, "the first rows confirmed, the circuit closed")
        before = now()
        wandb_standin.stop()
        with open(log, "ab") as handle:
            handle.writelines(lines[first:])
        appended_at = log.stat().st_mtime
        appended = total - (first - 1)
        wait_until(lambda: shows(wandb_reachable=0), 120, "the circuit gauge at 0 while W&B is down")
        wait_until(lambda: shows(rows_pending=appended) and now()["oldest_pending_seconds"] >= 1, 60, "the appended rows pending a second")
        down = now()
        assert abs(down["oldest_pending_seconds"] - (time.time() - appended_at)) < 2, (down, appended_at)
        assert down["rows_uploaded_total"] == down["lag_seconds_count"] == first - 1  # nothing confirmed while down
        back_at = time.time()
        wandb_standin.start()
        wait_until(lambda: shows(wandb_reachable=1), 120, "the circuit gauge at 1 once W&B is back")
        wait_until(lambda: shows(rows_uploaded_total=total), 180, "the appended rows confirmed")
        after = now()
        assert after["rows_pending"] == after["oldest_pending_seconds"] == 0
        assert after["lag_seconds_count"] - before["lag_seconds_count"] == appended
        waited = after["lag_seconds_sum"] - before["lag_seconds_sum"]
        assert waited >= appended * (back_at - appended_at) > 0, (waited, appended, back_at - appended_at)
        stop(proc)
    finally:
        kill(proc)
    (run,) = [r for w in status(home)["work_dirs"] for r in w["runs"]]
    assert (run["rows_uploaded"], run["rows_pending"]) == (total, 0)


def test_the_docs_table_of_events_is_the_set_of_event_constants():
    """docs/observability.md's Events table: one row per event of common/events.py, with the same ids."""
    import re

    text = (REPO / "docs" / "observability.md").read_text()
    section = text.split("\n## Events\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([a-z_]+)` \| ([^|]*) \|", section, flags=re.M)
    documented = {name: tuple(re.findall(r"`([a-z_]+)`", ids)) for name, ids in rows}
    assert documented == events.EVENTS
    constants = {value for key, value in vars(events).items() if key.isupper() and isinstance(value, str)}
    assert constants == set(events.EVENTS)

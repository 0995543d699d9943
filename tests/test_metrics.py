"""The Prometheus endpoint of a real `watch` beside a real tiny training's work_dir, scraped on loopback."""
from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from mmdet_wandb import metrics
from tests.conftest import REPO, cli, status, stop, wait_until


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

    def agrees() -> bool:
        before = figures(scrape(port))
        expected = status_figures(home)
        return before == expected == figures(scrape(port))  # a settled moment: both scrapes alike

    wait_until(agrees, 60, "a scrape equal to status --json", proc)
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
    stop(proc)
    assert get(port, "/healthz")[0] == 0  # the endpoint ends with the service


def test_health_over_http_fails_before_the_first_loop_pass(tmp_path):
    """/healthz and /readyz say what `mmdet-wandb health` says: no heartbeat yet is not healthy."""
    from db.session import Database

    home = tmp_path / "home"
    home.mkdir()
    db = Database(f"sqlite:///{home / 'state.db'}", node="n")
    db.upgrade()
    port, beat = free_port(), home / "heartbeat" / "uploader"
    server = metrics.serve("127.0.0.1", port, db, "n", beat)
    try:
        assert get(port, "/healthz") == (503, "fail: no heartbeat yet\n")
        assert get(port, "/readyz")[0] == 503
        assert cli(home, "health", "uploader", check=False).returncode == 1
        beat.parent.mkdir()
        beat.touch()
        assert cli(home, "health", "uploader").returncode == 0
        assert get(port, "/healthz")[0] == 200 and get(port, "/readyz")[0] == 200
    finally:
        server.shutdown()
        server.server_close()


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


def test_every_alert_rule_and_dashboard_panel_names_only_metrics_the_endpoint_exposes():
    """promtool is not available here: the rules are parsed as YAML and each expr's metric names checked."""
    import re

    rules = yaml.safe_load((REPO / "monitoring" / "alerts.yaml").read_text())
    exposed = set(metrics.NAMES)
    checked = 0
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert rule["alert"] and rule["expr"] and rule["annotations"]["summary"], rule
            expr = re.sub(r'"[^"]*"|\{[^}]*\}', "", rule["expr"])  # label matchers and strings are not names
            names = set(re.findall(r"\bmmdet_wandb_[a-z_]+\b", expr))
            assert names and names <= exposed, (rule["alert"], names - exposed)
            checked += 1
    assert checked >= 4
    dashboard = json.loads((REPO / "monitoring" / "grafana-dashboard.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            names = set(re.findall(r"\bmmdet_wandb_[a-z_]+\b", target["expr"]))
            assert names and names <= exposed, (panel["title"], names - exposed)

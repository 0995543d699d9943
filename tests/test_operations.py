"""Running beside training jobs: hook-compatible configuration, SIGTERM, secrets, doctor, health, logs, and the
docker files. Every test drives the real CLI as a subprocess on real work_dirs."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import (
    REPO,
    cli,
    offline_run,
    service_env,
    start_watch,
    status,
    stop,
    wait_until,
)
from tests.oracle import assert_history_matches, expected_rows, logs_of

HOOK_ENTRY = (
    "dict(type='MMDetWandbHook', init_kwargs=dict(project='from-hook', tags=['hook']), interval=6, "
    "log_checkpoint=True, log_checkpoint_metadata=True, num_eval_images=3, bbox_score_thr=0.5)"
)


@pytest.fixture
def hooked_work_dir(trained_work_dir) -> Path:
    """A real trained work_dir whose dumped config names MMDetWandbHook, as a user of the hook would have it."""
    work_dir = trained_work_dir("retinanet_epoch", writable=True)
    (config,) = work_dir.glob("*.py")
    text = config.read_text()
    plain = "log_config = dict(interval=2, hooks=[dict(type='TextLoggerHook')])"
    assert plain in text
    config.write_text(text.replace(plain, f"log_config = dict(interval=2, hooks=[dict(type='TextLoggerHook'), {HOOK_ENTRY}])"))
    return work_dir


def show(home: Path, work_dir: Path, *args: str, **env: str) -> dict:
    proc = cli(home, "config", "show", str(work_dir.parent), "--json", *args, **env)
    return json.loads(proc.stdout)[str(work_dir)]


def test_the_hook_entry_is_read_from_a_real_mmdet_config(hooked_work_dir):
    from mmcv import Config

    (config,) = hooked_work_dir.glob("*.py")
    (hook,) = [h for h in Config.fromfile(str(config)).log_config.hooks if h.type == "MMDetWandbHook"]
    home = hooked_work_dir.parent.parent / "home"
    shown = show(home, hooked_work_dir)
    for name in ("interval", "log_checkpoint", "log_checkpoint_metadata", "num_eval_images", "bbox_score_thr"):
        assert shown["values"][name] == hook[name], name
        assert shown["sources"][name] == f"MMDetWandbHook in {config.name}"
    assert shown["values"]["init_kwargs"] == {"project": "from-hook", "tags": ["hook"]}


def test_each_level_of_precedence(hooked_work_dir, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    assert show(home, hooked_work_dir)["values"]["num_eval_images"] == 3  # the hook over the default

    (home / "config.toml").write_text('num_eval_images = 4\nbbox_score_thr = 0.25\n[init_kwargs]\nproject = "from-file"\n')
    shown = show(home, hooked_work_dir)
    assert (shown["values"]["num_eval_images"], shown["sources"]["num_eval_images"]) == (4, f"file {home / 'config.toml'}")
    assert shown["values"]["init_kwargs"] == {"project": "from-file", "tags": ["hook"]}, "merged key by key"
    assert shown["values"]["interval"] == 6 and shown["sources"]["interval"].startswith("MMDetWandbHook in")

    env = {"MMDET_WANDB_NUM_EVAL_IMAGES": "5", "WANDB_PROJECT": "from-env"}
    shown = show(home, hooked_work_dir, **env)
    assert (shown["values"]["num_eval_images"], shown["sources"]["num_eval_images"]) == (5, "env")
    assert shown["values"]["init_kwargs"]["project"] == "from-env"
    assert shown["values"]["bbox_score_thr"] == 0.25, "the file still beats the hook where env is silent"

    shown = show(home, hooked_work_dir, "--num-eval-images", "6", "--project", "from-cli", "--no-log-checkpoint", **env)
    assert (shown["values"]["num_eval_images"], shown["sources"]["num_eval_images"]) == (6, "cli")
    assert shown["values"]["init_kwargs"]["project"] == "from-cli"
    assert (shown["values"]["log_checkpoint"], shown["sources"]["log_checkpoint"]) == (False, "cli")

    yaml_file = tmp_path / "options.yaml"
    yaml_file.write_text(yaml.safe_dump({"log_checkpoint_metadata": False}))
    shown = show(home, hooked_work_dir, "--config", str(yaml_file))
    assert shown["sources"]["log_checkpoint_metadata"] == f"file {yaml_file}", "--config beats <data dir>/config.toml"

    bad = cli(home, "config", "show", str(hooked_work_dir.parent), "--json", check=False, MMDET_WANDB_NUM_EVAL_IMAGES="many")
    assert bad.returncode == 2 and "MMDET_WANDB_NUM_EVAL_IMAGES = 'many': an integer is expected" in bad.stderr


def test_a_backfill_behaves_as_the_hook_entry_says(hooked_work_dir, tmp_path):
    home = tmp_path / "home"
    cli(home, "backfill", str(hooked_work_dir.parent), "--no-progress")
    (work_dir,) = status(home)["work_dirs"]
    (run,) = work_dir["runs"]
    files = offline_run(home, run["wandb_id"])
    assert {seg.project for seg in files.segments} == {"from-hook"} and "hook" in files.segments[0].tags
    train = [row for row in files.history if any(k.startswith("train/") for k in row)]
    log_rows = [v for log in logs_of(hooked_work_dir) for _, v in expected_rows(log) if any(k.startswith("train/") for k in v)]
    assert train and len(train) < len(log_rows), "thinned by the hook's interval"
    iters_per_epoch = 24
    assert all((row["iter"] - (row["epoch"] - 1) * iters_per_epoch) % 6 == 0 for row in train), "every 6th iteration"
    assert all(row.get("val/bbox_mAP") is not None for row in files.history if "val/bbox_mAP" in row)
    assert {c["state"] for c in work_dir["checkpoints"]} == {"uploaded"}, "log_checkpoint from the hook"
    assert any("bbox_mAP" in (c["metadata"] or {}) for c in work_dir["checkpoints"]), "log_checkpoint_metadata too"
    jobs = work_dir["eval_jobs"]
    assert jobs and all(j["state"] == "queued" for j in jobs)
    from sqlalchemy import select

    from db.models import EvalJob
    from db.session import Database, sqlite_url

    with Database(sqlite_url(home / "state.db")).transaction() as session:
        assert {(j.num_eval_images, j.bbox_score_thr) for j in session.scalars(select(EvalJob))} == {(3, 0.5)}


def test_env_and_cli_override_the_hook_entry_in_a_real_backfill(hooked_work_dir, tmp_path):
    home = tmp_path / "home"
    cli(home, "backfill", str(hooked_work_dir.parent), "--no-progress", "--interval", "12", "--num-eval-images", "0",
        MMDET_WANDB_LOG_CHECKPOINT="false", WANDB_PROJECT="from-env")
    (work_dir,) = status(home)["work_dirs"]
    (run,) = work_dir["runs"]
    files = offline_run(home, run["wandb_id"])
    assert {seg.project for seg in files.segments} == {"from-env"} and "hook" in files.segments[0].tags
    train = [row for row in files.history if any(k.startswith("train/") for k in row)]
    assert train and all((row["iter"] - (row["epoch"] - 1) * 24) % 12 == 0 for row in train), "the CLI's interval"
    assert not any(a.type == "model" for seg in files.segments for a in seg.artifacts), "env: log_checkpoint false"
    assert {c["state"] for c in work_dir["checkpoints"]} == {"done"} and work_dir["eval_jobs"] == []


def test_sigterm_during_a_backfill_loses_nothing(real_logs, tmp_path):
    home = tmp_path / "home"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mmdet_wandb.cli", "backfill", str(real_logs), "--no-progress"],
        env=service_env(home), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    wait_until(lambda: any((home / "wandb").rglob("*.wandb")) if (home / "wandb").exists() else False, 120,
               "the first segment", proc)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 143, output
    assert "run backfill again to finish" in output
    interrupted = status(home)
    assert not any(r["last_error"] for w in interrupted["work_dirs"] for r in w["runs"])

    cli(home, "backfill", str(real_logs), "--no-progress")
    state = status(home)
    checked = 0
    for work_dir in state["work_dirs"]:
        if not work_dir["runs"]:
            continue
        history = [row for r in work_dir["runs"] for row in offline_run(home, r["wandb_id"]).history]
        expected = [row for log in logs_of(Path(work_dir["path"])) for row in expected_rows(log)]
        assert_history_matches(history, expected)
        checked += 1
    assert checked == 18 and not any(r["rows_pending"] for w in state["work_dirs"] for r in w["runs"])


def test_secrets_never_reach_the_db_logs_or_run_files(trained_work_dir, tmp_path):
    key = "plantedsecret" + "0123456789abcdef0123456789abcdef"
    work_dir = trained_work_dir("retinanet_epoch")
    home = tmp_path / "home"
    env = {"WANDB_API_KEY": key, "WANDB_MODE": "offline"}
    outputs = []
    for args in (("backfill", str(work_dir.parent), "--no-progress", "--log-checkpoint", "--log-level", "DEBUG"),
                 ("doctor", str(work_dir.parent)),
                 ("status", "--json"),
                 ("config", "show", "--json")):
        proc = cli(home, *args, **env)
        outputs.append(proc.stdout + proc.stderr)
    watched = tmp_path / "watched"  # a data dir of its own: watch uploads everything itself, nothing is left from backfill
    watch = subprocess.Popen(
        [sys.executable, "-m", "mmdet_wandb.cli", "watch", str(work_dir.parent), "--log-level", "DEBUG",
         "--log-format", "json", "--poll-interval", "0.2", "--segment-idle", "1"],
        env=service_env(watched, **env), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    wait_until(lambda: (watched / "state.db").exists() and (runs := [r for w in status(watched)["work_dirs"] for r in w["runs"]])
               and all(r["rows_uploaded"] > 0 and r["rows_pending"] == 0 for r in runs), 120, "watch to upload every row", watch)
    outputs.append(stop(watch))
    assert '"level": "DEBUG"' in outputs[-1] or '"level":"DEBUG"' in outputs[-1], "watch logged at DEBUG"
    assert all(key not in text for text in outputs), "no command prints the key"
    leaked = [p for h in (home, watched) for p in h.rglob("*") if p.is_file() and key.encode() in p.read_bytes()]
    assert leaked == [], f"the key was written to {leaked}"
    for data_dir in (home, watched):
        assert (data_dir / "state.db").exists() and list(data_dir.rglob("*.wandb")), f"the files checked exist in {data_dir}"


def test_json_logs_are_one_object_per_line(trained_work_dir, tmp_path):
    work_dir = trained_work_dir("retinanet_epoch")
    home = tmp_path / "home"
    proc = cli(home, "backfill", str(work_dir.parent), "--no-progress", "--log-level", "INFO", "--log-format", "json",
               "--num-eval-images", "0")
    lines = [line for line in proc.stderr.splitlines() if line.startswith("{")]
    assert lines
    for line in lines:
        entry = json.loads(line)
        assert {"ts", "level", "logger", "msg", "service"} <= set(entry) and entry["service"] == "backfill"


def test_doctor(trained_work_dir, tmp_path):
    work_dir = trained_work_dir("retinanet_epoch")
    home = tmp_path / "home"
    ok = cli(home, "doctor", str(work_dir.parent))
    for check in ("state DB", "W&B", "inotify", f"root {work_dir.parent}", "evaluator"):
        assert check in ok.stdout
    assert "offline" in ok.stdout and "hard link" in ok.stdout
    no_key = cli(home, "doctor", str(work_dir.parent), check=False, WANDB_MODE="online")
    assert no_key.returncode == 1 and "no WANDB_API_KEY" in no_key.stdout


def test_health_follows_the_watch_loop(trained_work_dir, tmp_path):
    work_dir = trained_work_dir("retinanet_epoch")
    home = tmp_path / "home"
    before = cli(home, "health", "uploader", check=False)
    assert before.returncode == 1 and "no heartbeat" in before.stderr
    watch = start_watch(home, work_dir.parent, "--num-eval-images", "0")
    wait_until(lambda: cli(home, "health", "uploader", check=False).returncode == 0, 60, "a healthy uploader", watch)
    stop(watch)
    assert cli(home, "health", "uploader", "--max-age", "3600", check=False).returncode == 0, "the last beat is kept"
    wait_until(lambda: cli(home, "health", "uploader", "--max-age", "0.5", check=False).returncode == 1, 30,
               "the stopped uploader's heartbeat to go stale")


# --- docker files (no engine here: validated against the compose spec, built by the steps CI runs) ----


def test_compose_file_follows_the_compose_spec(tmp_path):
    def validate(path: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(path)],
                              capture_output=True, text=True)

    compose = REPO / "docker-compose.yml"
    assert validate(compose).returncode == 0, validate(compose).stdout
    broken = yaml.safe_load(compose.read_text())
    broken["services"]["uploader"]["restart"] = {"policy": "always"}
    (tmp_path / "broken.yml").write_text(yaml.safe_dump(broken))
    assert validate(tmp_path / "broken.yml").returncode != 0, "the check can fail"

    spec = yaml.safe_load(compose.read_text())
    assert spec["services"]["evaluator-mmdet3"]["build"]["args"] == {"STACK": "mmdet3"}
    for name in ("uploader", "evaluator", "evaluator-mmdet3"):
        service = {**spec["x-service"], **spec["services"]["evaluator"], **spec["services"][name]}
        assert service["user"].startswith("${MMDET_WANDB_UID"), "non-root"
        assert service["restart"] == "unless-stopped" and service["healthcheck"]["test"][:3] == ["CMD", "mmdet-wandb", "health"]
        mounts = [m for m in service["volumes"] if isinstance(m, dict)]
        assert mounts and all(m["read_only"] for m in mounts), "work_dirs (and datasets) read-only"
        assert "state:/var/lib/mmdet-wandb" in service["volumes"]
    for name, ids in (("evaluator", "EVAL_GPU_IDS"), ("evaluator-mmdet3", "EVAL3_GPU_IDS")):
        (device,) = spec["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["capabilities"] == ["gpu"] and ids in device["device_ids"][0]
    env_example = (REPO / ".env.example").read_text()
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_PROJECT", "WANDB_ENTITY", "WORK_DIRS", "MMDET_WANDB_NUM_EVAL_IMAGES"):
        assert re.search(rf"^{name}=", env_example, re.M), name


class ComposeLoader(yaml.SafeLoader):
    """Compose's merge tags: `!reset` removes what the file before set (here: None)."""


ComposeLoader.add_constructor("!reset", lambda loader, node: None)


def test_compose_gives_the_evaluator_no_secret_no_network_and_only_the_db_to_write(tmp_path):
    spec = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    for name in ("uploader", "evaluator", "evaluator-mmdet3"):
        service = spec["services"][name]
        assert service["cap_drop"] == ["ALL"] and service["security_opt"] == ["no-new-privileges:true"], name
        assert service["read_only"] is True and "/tmp" in service["tmpfs"], name
    for name in ("evaluator", "evaluator-mmdet3"):
        service = spec["services"][name]
        assert "env_file" not in service, ".env holds WANDB_API_KEY"
        assert not [k for k in service["environment"] if k.startswith("WANDB_")]
        assert service["network_mode"] == "none"
        (store,) = [m for m in service["volumes"] if isinstance(m, dict) and m["target"] == "/var/lib/mmdet-wandb/store"]
        assert store["source"] == "state" and store["read_only"] and store["volume"]["subpath"] == "store"
        assert service["environment"]["MMDET_WANDB_HEARTBEAT_DIR"].startswith("/tmp/"), "the DB is all it writes there"
    assert {"WANDB_API_KEY", "WANDB_PROJECT"} <= set(spec["services"]["uploader"]["environment"])
    for name in ("Dockerfile.uploader", "Dockerfile.evaluator"):
        text = (REPO / "docker" / name).read_text()
        assert re.search(r"^ENV HOME=/tmp\b", text, re.M) and "mkdir -p /var/lib/mmdet-wandb/store" in text, name

    override = yaml.load((REPO / "docker-compose.postgres.yml").read_text(), ComposeLoader)
    for name in ("evaluator", "evaluator-mmdet3"):
        service = override["services"][name]
        assert service["network_mode"] is None and service["networks"] == ["evaluator-db"]
        assert service["volumes"] == ["state:/var/lib/mmdet-wandb:ro"], "with PostgreSQL it writes nothing"
    on_it = sorted(n for n, s in override["services"].items() if "evaluator-db" in s.get("networks", []))
    assert on_it == ["db", "evaluator", "evaluator-mmdet3"] and override["networks"]["evaluator-db"]["internal"] is True
    assert override["networks"]["state-db"]["internal"] is True
    for service in override["services"].values():  # the schema has no !reset: validate what is left
        service.pop("network_mode", None)
    (tmp_path / "postgres.yml").write_text(yaml.safe_dump(override))
    checked = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(tmp_path / "postgres.yml")],
                             capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout


def test_dockerfiles_install_with_the_steps_ci_runs():
    """Each image installs only through tools/install.sh, the script that dev.sh (the README's and CI's test
    command) runs; so CI exercises the images' install steps, minus the CUDA build flags."""
    dev = (REPO / "dev.sh").read_text()
    assert "tools/install.sh \"$venv\" base" in dev and "tools/install.sh \"$venv\" eval" in dev
    assert "tools/install.sh \"$venv3\" mmdet3" in dev
    packages = re.search(r'include = \[(.*?)\]', (REPO / "pyproject.toml").read_text()).group(1)
    wanted = {p.strip(' "*') for p in packages.split(",")}
    images = (("Dockerfile.uploader", {"base postgres"}, wanted - {"evaluator"}), ("Dockerfile.evaluator", {"base postgres", "${STACK}"}, wanted))
    assert re.search(r"^ARG STACK=eval$", (REPO / "docker" / "Dockerfile.evaluator").read_text(), re.M), "mmdet 2.x by default; mmdet3 by build arg"
    for name, steps, needed in images:
        text = (REPO / "docker" / name).read_text()
        runs = re.findall(r"^RUN (.+)$", text.replace("\\\n", " "), re.M)
        commands = [c.strip() for run in runs for c in run.split("&&")]
        assert not any("pip" in c for c in commands), f"{name}: Python packages only through tools/install.sh"
        installs = {m.group(1).strip() for c in commands if (m := re.match(r"/src/tools/install\.sh /opt/venv (.+)", c))}
        assert installs == steps
        copied = set(re.findall(r"^COPY (\w+) /src/\1$", text, re.M))
        assert copied & wanted == needed, f"{name}: copies every package it runs, and no other"
        assert re.search(r"^USER mmdet$", text, re.M) and "HEALTHCHECK" in text


_GC_PROBE = """
import atexit, gc, sys
import mmdet_wandb.cli as cli
paused = not gc.isenabled()
atexit.register(lambda: print("gc-probe", paused, gc.isenabled(), gc.get_freeze_count() > 0, file=sys.stderr))
sys.argv = ["mmdet-wandb", *sys.argv[1:]]
cli.main()
"""


@pytest.mark.parametrize("command", ["status", "backfill", "evaluate", "watch"])
def test_the_start_up_pauses_the_garbage_collector_and_the_command_resumes_it(tmp_path: Path, command: str) -> None:
    """Python's cyclic GC is off while the CLI imports its modules (~10 % of a restart's CPU, benchmarks/faults.py)
    and on again, with the start-up's objects frozen, once the command runs: a months-long `watch` or `evaluate`
    never runs without it."""
    root, home = tmp_path / "work_dirs", tmp_path / "home"
    root.mkdir()
    args = {"status": [], "backfill": [str(root), "--no-progress"], "evaluate": ["--exit-when-idle", "--device", "cpu"],
            "watch": [str(root)]}[command]
    if command == "status":
        cli(home, "backfill", str(root), "--no-progress")
    proc = subprocess.Popen([sys.executable, "-c", _GC_PROBE, command, *args], env=service_env(home), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if command == "watch":
        wait_until((home / "heartbeat" / "uploader").exists, 120, "watch's first pass", proc)
        proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert "gc-probe True True True" in output, output

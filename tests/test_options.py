"""Options that are checked (issue 27, defects 1–3): one validator per option at every level (CLI, environment,
config file, the training config's MMDetWandbHook entry); a bad hook value holds its run, named in `status` and
`config show`, until it is fixed or set at a higher level; `config show` marks the init_kwargs the service drops."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import cli, status, stop, wait_until
from tests.test_run_options import balloon_with

CONFIG = "mask_rcnn_r50_caffe_fpn_mstrain-poly_1x_balloon.py"
RTMDET = "superegg-M__OpenMMLabCamp/task1_MMPose/mmdetection/work_dirs/rtmdet_tiny_ear"
BAD_HOOK = (
    "\nlog_config = dict(interval=10, hooks=[dict(type='TextLoggerHook'), dict(type='MMDetWandbHook', "
    "init_kwargs=dict(project='from-hook', id='evil', mode='online', dir='/etc'), interval=-3, "
    "num_eval_images='many', bbox_score_thr=5)])\n"
)


@pytest.fixture
def bad_hook_work_dir(real_logs: Path, tmp_path: Path) -> Path:
    """A real work_dir whose dumped config has an MMDetWandbHook entry with three bad values."""
    return balloon_with(real_logs, tmp_path, BAD_HOOK)


def open_problems(home: Path) -> list[dict]:
    """The open problems, none while the service has not made its state yet."""
    proc = cli(home, "status", "--json", check=False)
    return [p for p in json.loads(proc.stdout)["problems"] if p["resolved_at"] is None] if proc.returncode == 0 else []


def test_bad_hook_values_hold_the_run_until_a_higher_level_sets_them(bad_hook_work_dir, tmp_path):
    home = tmp_path / "home"
    held = cli(home, "backfill", str(bad_hook_work_dir.parent), "--no-progress", check=False)
    assert held.returncode == 1, held.stderr
    assert "1 log(s) held by a bad value in their MMDetWandbHook entry" in held.stderr
    (problem,) = open_problems(home)
    assert problem["kind"] == "hook_options" and problem["path"].endswith(".log.json")
    for named in (f"MMDetWandbHook in {CONFIG}", "interval = -3: it must be 1 or more",
                  "num_eval_images = 'many': an integer is expected", "bbox_score_thr = 5: it must be between 0 and 1"):
        assert named in problem["message"]
    (work_dir,) = status(home)["work_dirs"]
    assert work_dir["runs"] == [] and work_dir["problems"] == 1, "nothing is stored for a held run"
    assert not list((home / "wandb").glob("*/*/wandb/offline-run-*")), "no W&B run was opened"

    shown = cli(home, "config", "show", str(bad_hook_work_dir), "--json", check=False)
    assert shown.returncode == 1
    (options,) = json.loads(shown.stdout).values()
    assert len(options["errors"]) == 3 and all(e.startswith(f"MMDetWandbHook in {CONFIG}: ") for e in options["errors"])
    assert options["values"]["init_kwargs"] == {"project": "from-hook"}
    assert set(options["dropped"]) == {"id", "mode", "dir"}
    text = cli(home, "config", "show", str(bad_hook_work_dir), check=False, COLUMNS="200").stdout
    assert "init_kwargs.id" in text and "dropped" in text and "the service sets id itself" in text
    assert "not valid:" in text and "interval = -3" in text

    fixed = cli(home, "backfill", str(bad_hook_work_dir.parent), "--no-progress", "--interval", "20",
                "--num-eval-images", "0", MMDET_WANDB_BBOX_SCORE_THR="0.5")
    assert "held" not in fixed.stderr
    (work_dir,) = status(home)["work_dirs"]
    (run,) = work_dir["runs"]
    assert run["rows_pending"] == 0 and run["rows_uploaded"] > 0
    assert open_problems(home) == [], "the read that went through resolved the problem"


def test_a_hook_entry_fixed_in_the_training_config_is_read_by_a_running_watch(bad_hook_work_dir, tmp_path, watcher):
    home = tmp_path / "home"
    proc = watcher(home, bad_hook_work_dir.parent, "--finish-after", "1")
    wait_until(lambda: any(p["kind"] == "hook_options" for p in open_problems(home)), 60, "the held problem", proc)
    assert status(home)["work_dirs"][0]["runs"] == []
    config = bad_hook_work_dir / CONFIG
    config.write_text(config.read_text().replace(BAD_HOOK, BAD_HOOK.replace("interval=-3, num_eval_images='many', bbox_score_thr=5", "interval=10")))
    wait_until(lambda: [r["rows_uploaded"] for w in status(home)["work_dirs"] for r in w["runs"]] == [12] and not open_problems(home),
               120, "the run uploaded once its config is fixed", proc)
    stop(proc)


@pytest.mark.parametrize(("args", "env", "says"), [
    (("--bbox-score-thr", "2"), {}, "--bbox-score-thr = 2.0: it must be between 0 and 1"),
    (("--bbox-score-thr", "-3"), {}, "--bbox-score-thr = -3.0: it must be between 0 and 1"),
    (("--bbox-score-thr", "nan"), {}, "--bbox-score-thr = nan: a finite number is expected"),
    (("--interval", "0"), {}, "--interval = 0: it must be 1 or more"),
    (("--confusion-score-thr", "1.5"), {}, "--confusion-score-thr = 1.5: it must be between 0 and 1"),
    (("--confusion-iou-thr", "nan"), {}, "--confusion-iou-thr = nan: a finite number is expected"),
    ((), {"MMDET_WANDB_EVAL_CLASSWISE": "maybe"}, "MMDET_WANDB_EVAL_CLASSWISE = 'maybe': true or false is expected"),
    ((), {"MMDET_WANDB_BBOX_SCORE_THR": "7"}, "MMDET_WANDB_BBOX_SCORE_THR = '7': it must be between 0 and 1"),
    ((), {"MMDET_WANDB_INTERVAL": "abc"}, "MMDET_WANDB_INTERVAL = 'abc': an integer is expected"),
    ((), {"MMDET_WANDB_INIT_KWARGS": "[1]"}, "MMDET_WANDB_INIT_KWARGS = '[1]': a mapping is expected"),
    ((), {"MMDET_WANDB_LOG_TIMEZONE": "Mars/Olympus"}, "MMDET_WANDB_LOG_TIMEZONE = 'Mars/Olympus': not an IANA time zone"),
    ((), {"MMDET_WANDB_TIMEOUT": "-1"}, "MMDET_WANDB_TIMEOUT = '-1': it must be a finite number above 0"),
    ((), {"MMDET_WANDB_ALLOW_IMPORT": "ok,no such"}, "MMDET_WANDB_ALLOW_IMPORT = 'ok,no such': not a module name: 'no such'"),
    ((), {"MMDET_WANDB_METRICS_WORK_DIR_LABELS": "1001"},
     "MMDET_WANDB_METRICS_WORK_DIR_LABELS = '1001': a whole number from 0 to 1000 is expected"),
    ((), {"MMDET_WANDB_METRICS_WORK_DIR_LABELS": "2.5"},
     "MMDET_WANDB_METRICS_WORK_DIR_LABELS = '2.5': a whole number from 0 to 1000 is expected"),
])
def test_every_level_checks_the_same_range_and_names_where_the_value_came_from(tmp_path, args, env, says):
    work_dir = tmp_path / "work_dirs"
    work_dir.mkdir()
    proc = cli(tmp_path / "home", "backfill", str(work_dir), "--no-progress", *args, check=False, **env)
    assert proc.returncode == 2, proc.stderr
    assert says in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.parametrize(("text", "says"), [
    ("bbox_score_thr = 5\n", "bbox_score_thr = 5: it must be between 0 and 1"),
    ("num_eval_images = -1\n", "num_eval_images = -1: it must be 0 or more"),
    ("confusion_iou_thr = 2\n", "confusion_iou_thr = 2: it must be between 0 and 1"),
    ("log_timezone = 'nowhere'\n", "log_timezone = 'nowhere': not an IANA time zone"),
    ("trust_configs = 'maybe'\n", "trust_configs = 'maybe': true or false is expected"),
    ("metrics_work_dir_labels = -1\n", "metrics_work_dir_labels = -1: a whole number from 0 to 1000 is expected"),
    ("metrics_work_dir_labels = true\n", "metrics_work_dir_labels = True: a whole number from 0 to 1000 is expected"),
])
def test_the_config_file_is_checked_by_the_same_validators(tmp_path, text, says):
    config = tmp_path / "options.toml"
    config.write_text(text)
    proc = cli(tmp_path / "home", "config", "show", str(tmp_path), "--config", str(config), check=False)
    assert proc.returncode == 2, proc.stderr
    assert f"config file {config}: {says}" in proc.stderr, proc.stderr


def test_timing_flags_refuse_nan_and_zero(tmp_path):
    for value in ("nan", "0", "-1"):
        proc = cli(tmp_path / "home", "watch", str(tmp_path), "--scan-interval", value, check=False)
        assert proc.returncode == 2 and "a finite number of seconds above 0 is expected" in proc.stderr, proc.stderr
    for value in ("nan", "-1"):  # 0 is meaningful here: a still, broken checkpoint is incomplete at once
        proc = cli(tmp_path / "home", "backfill", str(tmp_path), "--checkpoint-incomplete-after", value, check=False)
        assert proc.returncode == 2 and "a finite number of seconds, 0 or more, is expected" in proc.stderr, proc.stderr


def test_a_config_dump_that_is_not_python_holds_its_run_until_it_is_fixed(real_logs, tmp_path):
    home, work_dir = tmp_path / "home", tmp_path / "work_dirs" / "rtmdet_tiny_ear"
    shutil.copytree(real_logs / RTMDET / "20230605_131231", work_dir / "20230605_131231")  # one 3.x launch
    config = work_dir / "20230605_131231" / "vis_data" / "config.py"
    good = config.read_text()
    config.write_text(good + "\nbroken = dict(\n")
    held = cli(home, "backfill", str(work_dir.parent), "--no-progress", check=False)
    assert held.returncode == 1 and "held" in held.stderr, held.stderr
    (problem,) = open_problems(home)
    assert problem["kind"] == "hook_options" and f"{config}: config.py, line" in problem["message"]
    assert "not valid Python" in problem["message"]
    shown = cli(home, "config", "show", str(work_dir.parent), "--json", check=False)
    assert shown.returncode == 1 and json.loads(shown.stdout)[str(work_dir)]["errors"][0].startswith(f"{config}: ")
    config.write_text(good)
    cli(home, "backfill", str(work_dir.parent), "--no-progress")
    assert open_problems(home) == [] and status(home)["work_dirs"][0]["runs"][0]["rows_uploaded"] > 0

"""W&B run options: the hook's init_kwargs from the training config, WANDB_* variables and CLI flags."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import cli, status
from uploader.wandb import reader as wandb_reader

BALLOON = "liweiwp__OpenMMLabCamp/mmdet/balloon"
HOOK = (
    "\nlog_config = dict(interval=10, hooks=[dict(type='TextLoggerHook'), dict(type='MMDetWandbHook', "
    "init_kwargs=dict(project='from-hook', tags=['hooked'], notes='set in the config', id='ignored'), "
    "interval=10, log_checkpoint=True, num_eval_images=100)])\n"
)


def balloon_with(real_logs: Path, tmp_path: Path, log_config: str) -> Path:
    """A copy of a real work_dir whose dumped config ends with `log_config` (an MMDetWandbHook entry)."""
    work_dir = tmp_path / "work_dirs" / "balloon"
    shutil.copytree(real_logs / BALLOON, work_dir)
    config = work_dir / "mask_rcnn_r50_caffe_fpn_mstrain-poly_1x_balloon.py"
    config.write_text(config.read_text() + log_config)
    return work_dir


@pytest.fixture
def hooked_work_dir(real_logs: Path, tmp_path: Path) -> Path:
    """A real work_dir whose dumped config names MMDetWandbHook, as a user who configured the hook has."""
    return balloon_with(real_logs, tmp_path, HOOK)


def run_record(home: Path, runs_dir: Path | None = None) -> wandb_reader.OfflineRun:
    (work_dir,) = status(home)["work_dirs"]
    (run,) = work_dir["runs"]
    (path,) = wandb_reader.find_run_files((runs_dir or home / "wandb") / run["wandb_id"])
    record = wandb_reader.read_run(path)
    assert record.run_id == run["wandb_id"], "the service owns the run id; the hook's `id` is ignored"
    return record


@pytest.mark.parametrize(
    ("args", "env", "project"),
    [
        ((), {}, "from-hook"),
        ((), {"WANDB_PROJECT": "from-env"}, "from-env"),
        (("--project", "from-cli"), {"WANDB_PROJECT": "from-env"}, "from-cli"),
    ],
)
def test_project_precedence(hooked_work_dir, tmp_path, args, env, project):
    home = tmp_path / "home"
    cli(home, "backfill", str(hooked_work_dir.parent), "--no-progress", *args, **env)
    record = run_record(home)
    assert record.project == project
    assert record.tags == ["hooked"] and record.group == "balloon"
    assert record.config["log_config"]["hooks"][1]["type"] == "MMDetWandbHook"


def test_without_a_hook_the_default_project(real_logs, tmp_path):
    home = tmp_path / "home"
    cli(home, "backfill", str(real_logs / BALLOON), "--no-progress", "--entity", "team")
    record = run_record(home)
    assert (record.project, record.entity, record.tags) == ("mmdet-wandb", "team", [])


def test_wandb_dir_moves_the_offline_runs(hooked_work_dir, tmp_path):
    home, wandb_dir = tmp_path / "home", tmp_path / "elsewhere"
    cli(home, "backfill", str(hooked_work_dir.parent), "--no-progress", WANDB_DIR=str(wandb_dir))
    assert not (home / "wandb").exists()
    assert len(run_record(home, wandb_dir / "mmdet-wandb").history) == 12


def test_data_dir_inside_a_watched_root_is_refused(hooked_work_dir):
    proc = cli(hooked_work_dir / "state", "backfill", str(hooked_work_dir), "--no-progress", check=False)
    assert proc.returncode == 2
    assert "inside the watched root" in proc.stderr
    assert not (hooked_work_dir / "state").exists()

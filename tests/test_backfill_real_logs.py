"""`mmdet-wandb backfill ../shared/real_logs`: every real log becomes W&B history, row for row.

The expected rows are computed here from the raw files with a deliberately simple reading of the mapping
table in DESIGN.md, independent of uploader/parsers, and compared with what the real wandb client wrote
into the offline `.wandb` files.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import cli, offline_run, status
from tests.oracle import assert_history_matches, expected_rows, logs_of

# work_dir (relative to real_logs) → number of W&B runs (training lineages + test-only runs) expected
EXPECTED_RUNS = {
    "ISCLab-Bistu__DGFormer/detection/work_dirs/mask_rcnn_dgformer_fpn_1x_coco": 1,
    "ISCLab-Bistu__DGFormer/detection/work_dirs/retinanet_dgformer_dga_effn_fpn_1x_coco": 1,  # resumed pair
    "ISCLab-Bistu__DGFormer/segmentation/work_dirs/fpn_dgformer_ade20k_80k": 1,
    "JJho1314__my_mmdet/work_dirs/fcos_center_r50_caffe_fpn_gn-head_1x_coco": 1,
    "JJho1314__my_mmdet/work_dirs/mask_rcnn_r50_fpn_1x_coco": 1,
    "Rogerlv51__OpenMMlab_HW/lab_third_assignment": 2,  # training + test-only json
    "chg0901__openmmlab2-hong/Assignment4/mmsegmentation/work_dirs/tutorial": 2,  # two runs in one scalars.json
    "liweiwp__OpenMMLabCamp/mmdet/balloon": 1,
    "liweiwp__OpenMMLabCamp/mmseg/voc2012": 1,
    "lyc686__OpenMMlab_AI_2023.2/code/Task_02/VOC2012/log": 2,  # header-only log.json files make no run
    "lyc686__OpenMMlab_AI_2023.2/code/Task_02/balloon/log": 1,
    "lyc686__OpenMMlab_AI_2023.2/code/Task_03/VOC2012语义分割/log": 1,
    "lyc686__OpenMMlab_AI_2023.2/code/Task_03/肾小球语义分割/log": 1,
    "masati91__ELTD/work_dirs/cornernet_hourglass104_mstest_10x5_210e_coco": 1,
    "masati91__ELTD/work_dirs/eltd_r101_fpn_1x_coco": 1,
    "masati91__ELTD/work_dirs/yolov3_d53_320_273e_coco": 1,
    "superegg-M__OpenMMLabCamp/task1_MMPose/mmdetection/work_dirs/rtmdet_tiny_ear": 4,  # 3 restarts + 1 test
    "winycg__detection/work_dirs/faster_rcnn_r50_fpn_1x_coco": 1,
}

# iterations per epoch that the logs state exactly (text-log denominator or a resumed header)
EXACT_ITERS_PER_EPOCH = {
    "ISCLab-Bistu__DGFormer/detection/work_dirs/mask_rcnn_dgformer_fpn_1x_coco": 7330,
    "lyc686__OpenMMlab_AI_2023.2/code/Task_02/balloon/log": 31,
}
ITER_BASED = {
    "ISCLab-Bistu__DGFormer/segmentation/work_dirs/fpn_dgformer_ade20k_80k",
    "liweiwp__OpenMMLabCamp/mmseg/voc2012",
    "chg0901__openmmlab2-hong/Assignment4/mmsegmentation/work_dirs/tutorial",
    "lyc686__OpenMMlab_AI_2023.2/code/Task_03/VOC2012语义分割/log",
}


@pytest.fixture(scope="module")
def backfilled(real_logs: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    home = tmp_path_factory.mktemp("home")
    cli(home, "backfill", str(real_logs), "--no-progress")
    return home, status(home)


def test_every_work_dir_is_found_with_its_lineages(backfilled, real_logs):
    _, state = backfilled
    runs = {str(Path(w["path"]).relative_to(real_logs)): len(w["runs"]) for w in state["work_dirs"] if w["runs"]}
    assert runs == EXPECTED_RUNS
    pending = [r for w in state["work_dirs"] for r in w["runs"] if r["rows_pending"] or r["last_error"]]
    assert pending == []
    assert state["problems"] == []


@pytest.mark.parametrize("relative", sorted(EXPECTED_RUNS))
def test_history_matches_the_log_lines(backfilled, real_logs, relative):
    home, state = backfilled
    work_dir = real_logs / relative
    entry = next(w for w in state["work_dirs"] if w["path"] == str(work_dir))
    runs = [offline_run(home, r["wandb_id"]) for r in entry["runs"]]
    history = [row for run in runs for row in run.history]
    expected = [row for log in logs_of(work_dir) for row in expected_rows(log)]
    assert_history_matches(history, expected)

    for run in runs:
        steps = [row["_step"] for row in run.history]
        assert steps == sorted(set(steps)), f"{run.name}: steps strictly increase across segments"
        assert all(seg.has_exit for seg in run.segments)


@pytest.mark.parametrize("relative", sorted(EXPECTED_RUNS))
def test_x_axes(backfilled, real_logs, relative):
    home, state = backfilled
    entry = next(w for w in state["work_dirs"] if w["path"] == str(real_logs / relative))
    for run_state in entry["runs"]:
        run = offline_run(home, run_state["wandb_id"])
        train = [r for r in run.history if any(k.startswith("train/") for k in r)]
        val = [r for r in run.history if any(k.startswith("val/") for k in r)]
        iters = [r["iter"] for r in train]
        assert all(isinstance(i, int) for i in iters), "every train row has the global iteration"
        assert iters == sorted(iters), "the global iteration never goes back inside one lineage"
        metrics = {m["glob_name"] or m["name"]: m["step_metric"] for seg in run.segments for m in seg.metrics}
        assert metrics["train/*"] == "iter"
        if relative in ITER_BASED:
            assert metrics["val/*"] == "iter"
            assert not any("epoch" in r for r in train[-10:]), "an iter-based runner's epoch is no axis"
        else:
            assert metrics["val/*"] == "epoch"
            assert all(isinstance(r.get("epoch"), int) for r in val)


def test_global_iteration_uses_iters_per_epoch(backfilled, real_logs):
    home, state = backfilled
    for relative, per_epoch in EXACT_ITERS_PER_EPOCH.items():
        work_dir = real_logs / relative
        entry = next(w for w in state["work_dirs"] if w["path"] == str(work_dir))
        history = offline_run(home, entry["runs"][0]["wandb_id"]).history
        lines = [line for log in logs_of(work_dir) for line, _ in expected_rows(log)]
        for row, line in zip(history, lines):
            if line["mode"] == "train":
                assert row["iter"] == (line["epoch"] - 1) * per_epoch + line["iter"]
            else:
                assert row["iter"] == line["epoch"] * per_epoch, "a val line sits at the end of its epoch"


def test_resumed_launch_continues_the_run(backfilled, real_logs):
    home, state = backfilled
    entry = next(w for w in state["work_dirs"] if w["path"].endswith("retinanet_dgformer_dga_effn_fpn_1x_coco"))
    history = offline_run(home, entry["runs"][0]["wandb_id"]).history
    first_of_part_two = next(r for r in history if r.get("epoch") == 5)
    assert first_of_part_two["iter"] == 4 * 7330 + 50, "the resumed header says 29320 iterations in 4 epochs"


def test_config_and_hook_compatible_names(backfilled, real_logs):
    home, state = backfilled
    entry = next(w for w in state["work_dirs"] if w["path"].endswith("mask_rcnn_dgformer_fpn_1x_coco"))
    run = offline_run(home, entry["runs"][0]["wandb_id"])
    config = run.segments[0].config
    assert config["model"]["type"] == "MaskRCNN"
    assert config["runner"] == {"type": "EpochBasedRunner", "max_epochs": 12}
    assert "mask_rcnn_dgformer_fpn_1x_coco.py" in run.segments[0].files
    first = run.history[0]
    assert {"train/loss", "train/loss_mask", "learning_rate", "momentum", "iter", "epoch"} <= set(first)
    val = next(r for r in run.history if "val/bbox_mAP" in r)
    assert "val/bbox_mAP_copypaste" not in val and "val/segm_mAP" in val
    summary = run.segments[-1].summary
    last_val = [r for r in run.history if "val/bbox_mAP" in r][-1]
    assert summary["val/bbox_mAP"] == last_val["val/bbox_mAP"] and summary["epoch"] == last_val["epoch"] == 12
    assert run.segments[0].group == "mask_rcnn_dgformer_fpn_1x_coco"


def test_backfill_again_uploads_nothing_twice(backfilled, real_logs):
    home, before = backfilled
    files_before = sorted((home / "wandb").rglob("*.wandb"))
    cli(home, "backfill", str(real_logs), "--no-progress")
    assert status(home) == before
    assert sorted((home / "wandb").rglob("*.wandb")) == files_before

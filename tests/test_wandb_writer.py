"""The writer's use of wandb internals stays equal to the public API it stands for."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import wandb
from PIL import Image

from common import checkpoint_file
from common.records import Instances
from tests.conftest import REPO
from uploader.wandb import history_batch, private_api
from uploader.wandb.artifacts import ValMedia, ValRow, add_hashed_file, prediction_artifact, val_artifact, val_entries
from uploader.wandb.reader import iter_records, wait_for_exit

ROWS = [  # what the parsers hand over: floats, ints, NaN and infinities, an `iter`/`epoch` axis, a time
    {"train/loss": 1.0 / (i + 1), "train/loss_bbox": float("nan") if i % 97 == 0 else i * 0.5,
     "learning_rate": 0.01, "val/bbox_mAP": float("inf") if i == 5 else i / 1000, "iter": i * 50, "epoch": i // 20 + 1,
     "_timestamp": 1_700_000_000.0 + i}
    for i in range(1000)  # several of history_batch's parts
]


@pytest.fixture
def offline_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    for var in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    yield tmp_path
    wandb.teardown()  # wandb-core must not outlive the test's folder


def _init(root: Path, run_id: str) -> Any:
    directory = root / run_id
    directory.mkdir()
    return wandb.init(dir=directory, project="batch-test", id=run_id, settings=private_api.settings(
        mode="offline", console="off", silent=True, x_disable_stats=True, x_save_requirements=False,
        disable_git=True, reinit="create_new",
    ))


def _finish(run: Any) -> list[Any]:
    path = Path(run.settings.sync_file)
    run.finish()
    wait_for_exit(path, timeout=60)
    return list(iter_records(path))


def _history(records: list[Any]) -> list[tuple[int, dict[str, str]]]:
    """(step, {key: JSON value}) of each history record, without `_runtime` (seconds since the run's start)."""
    return [(r.history.step.num, {key: i.value_json for i in r.history.item if (key := "/".join(i.nested_key) or i.key) != "_runtime"})
            for r in records if r.HasField("history")]


def test_the_path_each_wandb_version_takes(offline_wandb: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A verified wandb takes the fast path (if its internals changed, this fails rather than every row
    silently going on its own again); any other, or the public path forced, takes `run.log` per row."""
    run = _init(offline_wandb, "which")
    verified = wandb.__version__ in private_api.VERIFIED
    assert history_batch.supported(run) is verified is private_api.enabled()
    monkeypatch.setenv(private_api.PUBLIC_ONLY_ENV, "1")
    assert not private_api.enabled() and not history_batch.supported(run)
    _finish(run)


_START = """
import json, sys
import wandb
from uploader.wandb import private_api
from wandb.sdk.lib.service import service_port_file

private_api.quick_service_poll()
private_api.skip_launch_inputs()
run = wandb.init(dir=sys.argv[1], project="start", settings=wandb.Settings(mode="offline", console="off", silent=True))
run.log({"a": 1.5}, step=0)
path = run.settings.sync_file
run.finish()
print(json.dumps({"launch": "wandb.sdk.launch" in sys.modules, "quick": service_port_file._SLEEP is private_api._short_sleep, "sync_file": path}))
"""


@pytest.mark.parametrize("public_only", ["0", "1"])
def test_a_start_skips_the_launch_agent_and_polls_wandb_core_quickly(tmp_path: Path, public_only: str) -> None:
    """On the private path `wandb.init` leaves out the look for staged launch inputs (it imports wandb's launch
    agent, ~0.3 s of a restart) and `wandb.setup` polls for wandb-core every 10 ms; on the public path both are
    wandb's own. Either way the run starts and holds its row. A fresh process: the modules a start imports."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update({private_api.PUBLIC_ONLY_ENV: public_only, "WANDB_DATA_DIR": str(tmp_path / "data"),
                "WANDB_CACHE_DIR": str(tmp_path / "cache"), "WANDB_CONFIG_DIR": str(tmp_path / "config")})
    proc = subprocess.run([sys.executable, "-c", _START, str(tmp_path)], capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout.splitlines()[-1])
    path = Path(seen.pop("sync_file"))
    wait_for_exit(path, timeout=60)
    rows = [{k: json.loads(v) for k, v in items.items() if k == "a"} for _, items in _history(list(iter_records(path)))]
    private = public_only == "0" and wandb.__version__ in private_api.VERIFIED
    assert (seen, rows) == ({"launch": not private, "quick": private}, [{"a": 1.5}])


@pytest.mark.parametrize("public_only", ["0", "1"])
def test_batched_rows_are_the_records_run_log_writes(offline_wandb: Path, monkeypatch: pytest.MonkeyPatch,
                                                     public_only: str) -> None:
    """What `batched` writes equals plain `run.log`, on the fast path and on the public one."""
    monkeypatch.setenv(private_api.PUBLIC_ONLY_ENV, public_only)
    plain, batched = _init(offline_wandb, "plain"), _init(offline_wandb, "batched")
    for step, row in enumerate(ROWS):
        plain.log(dict(row), step=step, commit=True)
    plain.summary.update({"after": 1})
    with history_batch.batched(batched):
        for step, row in enumerate(ROWS):
            batched.log(dict(row), step=step, commit=True)
        collecting = "_publish" in vars(batched._interface)
        assert collecting is private_api.enabled(), "the rows are collected exactly on the fast path"
    assert not {"_publish", "_deliver"} & vars(batched._interface).keys(), "the client's own methods are back"
    batched.summary.update({"after": 1})
    plain_records, batched_records = _finish(plain), _finish(batched)
    assert _history(batched_records) == _history(plain_records)
    assert len(_history(batched_records)) == len(ROWS)
    after = min(i for i, r in enumerate(batched_records)
                if r.HasField("summary") and any(item.key == "after" for item in r.summary.update))
    assert after > max(i for i, r in enumerate(batched_records) if r.HasField("history")), "order kept"


def test_a_request_inside_a_batch_goes_after_the_rows_before_it(offline_wandb: Path) -> None:
    """wandb-core answers `history_step` from the rows it has: asked inside a batch, it must have them all."""
    plain, batched = _init(offline_wandb, "plain"), _init(offline_wandb, "batched")
    for step in (0, 7):
        plain.log({"a": float(step)}, step=step)
    expected = plain._interface.deliver_history_step().wait_or(timeout=30).step
    with history_batch.batched(batched):
        for step in (0, 7):
            batched.log({"a": float(step)}, step=step)
        answer = batched._interface.deliver_history_step().wait_or(timeout=30).step
        batched.log({"a": 8.0}, step=8)
    assert answer == expected > 0
    assert [step for step, _ in _history(_finish(batched))] == [0, 7, 8]
    _finish(plain)


def test_a_failed_block_sends_no_more_and_gives_the_client_back(offline_wandb: Path) -> None:
    """The fast path sends nothing of a failed block; the public one has sent each row as it was logged (the
    writer discards the segment either way)."""
    run = _init(offline_wandb, "failed")
    with pytest.raises(RuntimeError, match="mid-batch"):
        with history_batch.batched(run):
            run.log({"a": 1.0}, step=0)
            raise RuntimeError("mid-batch")
    assert not {"_publish", "_deliver"} & vars(run._interface).keys()
    run.log({"a": 2.0}, step=1)  # after the block: one by one, through the client's own path
    assert [step for step, _ in _history(_finish(run))] == ([1] if private_api.enabled() else [0, 1])


@pytest.mark.parametrize("public_only", ["0", "1"])
def test_adding_a_hashed_file_equals_add_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, public_only: str) -> None:
    monkeypatch.setenv(private_api.PUBLIC_ONLY_ENV, public_only)
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "data"))
    path = tmp_path / "epoch_3.pth"
    path.write_bytes(b"checkpoint bytes " * 10_000)
    with open(path, "rb") as handle:
        digests = checkpoint_file.hash_file(handle)
    public, ours = wandb.Artifact("run_x_model", type="model"), wandb.Artifact("run_x_model", type="model")
    public.add_file(str(path), name="epoch_3.pth", policy="immutable", skip_cache=True)
    add_hashed_file(ours, path, "epoch_3.pth", digests.md5_b64)
    assert ours.manifest.to_manifest_json() == public.manifest.to_manifest_json()
    assert ours.digest == public.digest
    assert ours.manifest.entries["epoch_3.pth"].skip_cache is True, "no second copy in wandb's artifact cache"


@pytest.mark.parametrize("public_only", ["0", "1"])
def test_a_prediction_table_references_the_val_images_or_holds_its_copy(offline_wandb: Path, monkeypatch: pytest.MonkeyPatch,
                                                                        public_only: str) -> None:
    """The fast path makes the prediction artifact reference the val artifact's image (recipe C); the public
    one copies it into the artifact. Either way each image cell of the table names an entry of the artifact."""
    monkeypatch.setenv(private_api.PUBLIC_ONLY_ENV, public_only)
    image = offline_wandb / "media" / "00000" / "a.png"
    image.parent.mkdir(parents=True)
    Image.new("RGB", (8, 6), "red").save(image)
    media = ValMedia(1, "d" * 64, image.parents[1], ["cat"], [ValRow(0, "a.png", image, 8, 6, Instances([[1, 1, 5, 4]], [0]), {})])
    run = _init(offline_wandb, "tables")
    val = val_artifact(media)
    run.log_artifact(val)
    record = {"client_id": private_api.client_id(val), **val_entries(val, media)}
    predicted = Instances([[0, 0, 4, 4]], [0], scores=[0.9])
    prediction = prediction_artifact("run_tables_pred", media, [predicted], record["client_id"], record, {})
    run.log_artifact(prediction)
    entries = prediction.manifest.entries
    images = {path: entry.ref for path, entry in entries.items() if path.startswith("media/images/")}
    if private_api.enabled():
        assert images == {path: f"wandb-client-artifact://{val._client_id}/{path}" for path in images} != {}
    else:
        assert record["client_id"] is None and list(images.values()) == [None], "one local copy of the image"
    table = json.loads(Path(entries["eval_data.table.json"].local_path).read_text())
    cells = [cell["path"] for row in table["data"] for cell in row[1:3]]
    assert len(cells) == 2 and set(cells) <= images.keys()
    _finish(run)

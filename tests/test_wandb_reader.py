"""Tests for uploader.wandb_reader against files written by the real wandb 0.31.0 client (offline)."""

from __future__ import annotations

import base64
import hashlib
import json
import math
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import wandb
from wandb.sdk.artifacts.artifact_manifest_entry import ArtifactManifestEntry

from uploader.wandb.reader import (
    OfflineRun,
    WandbFileError,
    find_run_files,
    has_exit_record,
    iter_records,
    read_run,
    wait_for_exit,
)

PROJECT = "reader-test"
EXIT_TIMEOUT = 60.0
NAN = float("nan")
INF = float("inf")


@pytest.fixture(autouse=True)
def wandb_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep every wandb directory (run dirs, staging, caches, config) inside tmp_path."""
    for var, name in {
        "WANDB_DIR": "wandb",
        "WANDB_DATA_DIR": "data",
        "WANDB_CACHE_DIR": "cache",
        "WANDB_CONFIG_DIR": "config",
    }.items():
        (tmp_path / name).mkdir()
        monkeypatch.setenv(var, str(tmp_path / name))
    monkeypatch.setenv("WANDB_MODE", "offline")
    return tmp_path / "wandb"


@pytest.fixture(scope="module", autouse=True)
def _stop_wandb_service() -> Iterator[None]:
    """wandb-core outlives its runs; stop it so it does not keep writing into a finished test's tmp dir."""
    yield
    wandb.teardown()


def _init(root: Path, run_id: str, **kwargs: Any) -> wandb.Run:
    return wandb.init(
        dir=root,
        project=PROJECT,
        id=run_id,
        settings=wandb.Settings(
            mode="offline",
            console="off",
            silent=True,
            x_disable_stats=True,
            x_save_requirements=False,
            disable_git=True,
            reinit="create_new",
        ),
        **kwargs,
    )


def _finish(run: wandb.Run, exit_code: int | None = None) -> Path:
    path = Path(run.settings.sync_file)
    run.finish(exit_code=exit_code)
    wait_for_exit(path, timeout=EXIT_TIMEOUT)
    return path


def _nan_as_text(value: Any) -> Any:
    """NaN never equals itself; swap it for a marker so whole structures compare with ==."""
    if isinstance(value, float) and math.isnan(value):
        return "<nan>"
    if isinstance(value, dict):
        return {k: _nan_as_text(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_as_text(v) for v in value]
    return value


def _b64_md5(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def _serialized(path: Path) -> list[bytes]:
    return [record.SerializeToString() for record in iter_records(path)]


@dataclass
class LoggedRun:
    path: Path
    root: Path
    checkpoint: bytes
    artifact_digest: str


@pytest.fixture
def full_run(wandb_root: Path, tmp_path: Path) -> LoggedRun:
    """One offline run that exercises every part of OfflineRun."""
    run = _init(
        wandb_root,
        "full0001",
        name="display-name",
        group="grp",
        job_type="train",
        tags=["det", "r50"],
        config={
            "lr": 0.02,
            "model": {"backbone": {"depth": 50}},
            "opt": {"value": 0.9, "desc": "momentum"},
            "a.b": 1,
        },
    )
    run.define_metric("iter")
    run.define_metric("train/*", step_metric="iter")
    run.define_metric("val/*", step_metric="epoch", summary="max")
    run.define_metric("test/acc", summary="min,last", hidden=True)

    run.log({"train/decode.loss_ce": 1.5, "iter": 10, "nested": {"x": 1, "y": {"z": 2}}}, step=1, commit=True)
    run.log({"train/decode.loss_ce": NAN, "iter": 20, "train/inf": INF, "train/neginf": -INF}, step=2, commit=True)
    run.log({"val/bbox_mAP": 0.3, "epoch": 1}, step=5, commit=True)
    run.log({"val/bbox_mAP": 0.25, "epoch": 2}, step=6, commit=True)

    run.config.update({"late": "x", "schedule": {"milestones": [8, 11]}})
    run.summary["best/bbox_mAP"] = 0.31
    run.summary.update({"deep": {"k": 1}})
    run.summary["scratch"] = 1
    del run.summary["scratch"]

    checkpoint = b"fake checkpoint bytes " * 100
    ckpt_path = tmp_path / "epoch_3.pth"
    ckpt_path.write_bytes(checkpoint)
    artifact = wandb.Artifact("ckpt-full0001", type="model", metadata={"epoch": 3, "bbox_mAP": 0.31})
    artifact.add_file(str(ckpt_path), name="epoch_3.pth")
    artifact.add_reference(ckpt_path.as_uri(), name="ref/epoch_3.pth")
    run.log_artifact(artifact, aliases=["best", "epoch_3"])

    saved = Path(run.dir) / "notes.txt"
    saved.write_text("hello")
    run.save(str(saved), base_path=run.dir, policy="now")

    path = _finish(run)
    return LoggedRun(path=path, root=wandb_root, checkpoint=checkpoint, artifact_digest=artifact.digest)


def test_full_run_reads_back_exactly(full_run: LoggedRun, wandb_root: Path) -> None:
    run = read_run(full_run.path)
    assert isinstance(run, OfflineRun)
    assert run.has_exit and run.exit_code == 0
    assert (run.run_id, run.project, run.entity) == ("full0001", PROJECT, None)
    assert (run.display_name, run.group, run.job_type) == ("display-name", "grp", "train")
    assert run.tags == ["det", "r50"]
    assert run.resume is False

    rows = [{k: v for k, v in row.items() if k not in ("_timestamp", "_runtime")} for row in run.history]
    assert _nan_as_text(rows) == [
        {"train/decode.loss_ce": 1.5, "iter": 10, "nested": {"x": 1, "y": {"z": 2}}, "_step": 1},
        {"train/decode.loss_ce": "<nan>", "iter": 20, "train/inf": INF, "train/neginf": -INF, "_step": 2},
        {"val/bbox_mAP": 0.3, "epoch": 1, "_step": 5},
        {"val/bbox_mAP": 0.25, "epoch": 2, "_step": 6},
    ]
    assert all(isinstance(row["_timestamp"], float) and row["_runtime"] >= 0 for row in run.history)
    nan = run.history[1]["train/decode.loss_ce"]
    assert isinstance(nan, float) and math.isnan(nan)

    summary = dict(run.summary)
    assert isinstance(summary.pop("_timestamp"), float)
    assert summary.pop("_runtime") >= 0
    assert set(summary.pop("_wandb")) == {"runtime"}
    assert _nan_as_text(summary) == {
        "_step": 6,
        "train/decode.loss_ce": "<nan>",
        "iter": 20,
        "train/inf": INF,
        "train/neginf": -INF,
        "nested": {"x": 1, "y": {"z": 2}},
        "val/bbox_mAP": {"max": 0.3},
        "epoch": 2,
        "best/bbox_mAP": 0.31,
        "deep": {"k": 1},
    }

    # wandb 0.31.0 stores config values bare, so a user value shaped like a wrapper survives untouched.
    assert run.config == {
        "lr": 0.02,
        "model": {"backbone": {"depth": 50}},
        "opt": {"value": 0.9, "desc": "momentum"},
        "a.b": 1,
        "late": "x",
        "schedule": {"milestones": [8, 11]},
    }
    assert isinstance(run.wandb_internal_config, dict)

    assert run.metrics == [
        {"name": "iter", "glob_name": None, "step_metric": None, "summary": [], "step_sync": False, "hidden": False},
        {"name": None, "glob_name": "train/*", "step_metric": "iter", "summary": [], "step_sync": True, "hidden": False},
        {"name": None, "glob_name": "val/*", "step_metric": "epoch", "summary": ["max"], "step_sync": True, "hidden": False},
        {"name": "test/acc", "glob_name": None, "step_metric": None, "summary": ["last", "min"], "step_sync": False, "hidden": True},
    ]

    assert run.files == ["notes.txt"]

    [artifact] = run.artifacts
    assert (artifact.name, artifact.type) == ("ckpt-full0001", "model")
    assert artifact.aliases == {"latest", "best", "epoch_3"}
    assert artifact.metadata == {"epoch": 3, "bbox_mAP": 0.31}
    assert artifact.digest == full_run.artifact_digest
    assert len(artifact.client_id) == 128 and artifact.client_id.isalnum()
    entries = {entry["path"]: entry for entry in artifact.entries}
    assert set(entries) == {"epoch_3.pth", "ref/epoch_3.pth"}
    staged = entries["epoch_3.pth"]
    assert staged["digest"] == _b64_md5(full_run.checkpoint)
    assert staged["size"] == len(full_run.checkpoint)
    assert staged["ref"] is None
    staging_dir = Path(wandb_root).parent / "data" / "artifacts" / "staging"
    assert Path(staged["local_path"]).parent == staging_dir
    assert Path(staged["local_path"]).read_bytes() == full_run.checkpoint
    reference = entries["ref/epoch_3.pth"]
    assert reference["ref"] == (Path(wandb_root).parent / "epoch_3.pth").as_uri()
    assert reference["digest"] == _b64_md5(full_run.checkpoint)
    assert reference["size"] == len(full_run.checkpoint)
    assert reference["local_path"] is None


def test_find_run_files_lists_each_log_once(full_run: LoggedRun) -> None:
    # The run dir is also reachable through the "latest-run" symlink.
    assert (full_run.root / "wandb" / "latest-run").is_symlink()
    assert find_run_files(full_run.root) == [full_run.path]
    with pytest.raises(NotADirectoryError):
        find_run_files(full_run.root / "missing")


def test_history_count_matches_wandb_leet_inspect(full_run: LoggedRun) -> None:
    wandb_cli = [sys.executable, "-m", "wandb", "leet", "inspect"]
    probe = subprocess.run([*wandb_cli, "--help"], capture_output=True, text=True, timeout=120)
    if probe.returncode != 0 and "No such command" in probe.stdout + probe.stderr:
        pytest.skip("this wandb has no `leet inspect` subcommand")
    dump = subprocess.run(
        [*wandb_cli, "--json", str(full_run.path)], capture_output=True, text=True, timeout=120, check=True
    )
    leet_records = [json.loads(line) for line in dump.stdout.splitlines() if line.strip()]
    leet_history = [r for r in leet_records if r["type"] == "history"]
    run = read_run(full_run.path)
    assert len(leet_history) == len(run.history) == 4
    assert [r["history"]["item"]["_step"] for r in leet_history] == [row["_step"] for row in run.history]
    assert len(leet_records) == len(list(iter_records(full_run.path)))


def test_flipped_byte_in_complete_chunk_raises_with_offset(full_run: LoggedRun, tmp_path: Path) -> None:
    original = full_run.path.read_bytes()
    expected = _serialized(full_run.path)

    first_chunk = bytearray(original)
    first_chunk[7 + 7] ^= 0xFF  # first payload byte of the chunk that starts right after the file header
    broken = tmp_path / "first.wandb"
    broken.write_bytes(first_chunk)
    with pytest.raises(WandbFileError) as excinfo:
        list(iter_records(broken))
    assert excinfo.value.offset == 7
    assert str(broken) in str(excinfo.value) and "byte offset 7" in str(excinfo.value)

    later_chunk = bytearray(original)
    flip_at = original.index(b"train/decode.loss_ce")
    later_chunk[flip_at] ^= 0xFF
    broken = tmp_path / "later.wandb"
    broken.write_bytes(later_chunk)
    read: list[bytes] = []
    with pytest.raises(WandbFileError) as excinfo:
        for record in iter_records(broken):
            read.append(record.SerializeToString())
    error = excinfo.value
    assert 7 < error.offset < flip_at
    assert f"byte offset {error.offset}" in str(error) and str(broken) in str(error)
    assert read and read == expected[: len(read)]


def test_bad_header_raises(tmp_path: Path) -> None:
    not_wandb = tmp_path / "not.wandb"
    not_wandb.write_bytes(b"PK\x03\x04 definitely not a transaction log")
    with pytest.raises(WandbFileError, match="byte offset 0"):
        list(iter_records(not_wandb))

    future = tmp_path / "future.wandb"
    future.write_bytes(b":W&B\xe1\xbe\x01")
    with pytest.raises(WandbFileError, match="unsupported .wandb version 1"):
        list(iter_records(future))


@pytest.fixture
def big_config_run(wandb_root: Path) -> tuple[Path, str]:
    """A run whose config record (~200 KB) spans several 32 KiB blocks."""
    big = "".join(f"{i:05d}ü" for i in range(35_000))
    run = _init(wandb_root, "big00001")
    run.log({"loss": 1.0}, step=1, commit=True)
    run.config.update({"big": big})
    run.log({"loss": 0.5}, step=2, commit=True)
    return _finish(run), big


def test_record_spanning_blocks_decodes(big_config_run: tuple[Path, str]) -> None:
    path, big = big_config_run
    assert path.stat().st_size > 6 * 32 * 1024
    run = read_run(path)
    assert run.config["big"] == big
    assert [row["loss"] for row in run.history] == [1.0, 0.5]


def test_truncated_copy_yields_a_prefix(big_config_run: tuple[Path, str], tmp_path: Path) -> None:
    path, _ = big_config_run
    data = path.read_bytes()
    whole = tmp_path / "whole.wandb"  # from the same bytes: wandb-core may still append after `data` was read
    whole.write_bytes(data)
    expected = _serialized(whole)
    copy = tmp_path / "truncated.wandb"
    seen_lengths = set()
    for cut in [*range(0, 16), *range(16, len(data), max(1, len(data) // 300)), len(data) - 1]:  # ~300 cuts, any size
        copy.write_bytes(data[:cut])
        got = _serialized(copy)
        assert got == expected[: len(got)], f"cut at {cut}"
        seen_lengths.add(len(got))
        assert has_exit_record(copy) is (len(got) == len(expected))
    # Cuts land before, inside and after the multi-block config record.
    assert 0 in seen_lengths and len(expected) - 1 in seen_lengths and len(seen_lengths) > 3


def test_resume_exit_code_and_run_snapshots(wandb_root: Path) -> None:
    run = _init(wandb_root, "resume01", resume="allow", tags=["a"])
    run.log({"x": 1}, step=10, commit=True)
    run.name = "renamed"  # wandb-core writes a fresh run record for each metadata change
    run.tags = ("b", "c")
    path = _finish(run, exit_code=3)

    other = _finish(_init(wandb_root, "other001"))

    offline = read_run(path)
    assert (offline.run_id, offline.resume, offline.exit_code) == ("resume01", True, 3)
    assert (offline.display_name, offline.tags) == ("renamed", ["b", "c"])
    # Those later run records carry wandb's filled-in "_wandb" config, which is kept apart.
    assert "_wandb" not in offline.config
    assert offline.wandb_internal_config["cli_version"] == wandb.__version__
    assert [row["x"] for row in offline.history] == [1]
    assert find_run_files(wandb_root) == sorted([path, other])


def test_wait_for_exit_times_out_on_a_live_run(wandb_root: Path) -> None:
    run = _init(wandb_root, "live0001")
    run.log({"x": 1}, step=1, commit=True)
    path = Path(run.settings.sync_file)
    try:
        assert has_exit_record(path) is False
        with pytest.raises(TimeoutError, match="live0001"):
            wait_for_exit(path, timeout=0.3, poll_interval=0.05)
    finally:
        run.finish()
    wait_for_exit(path, timeout=EXIT_TIMEOUT)
    assert has_exit_record(path) and read_run(path).exit_code == 0


def test_large_manifest_is_read_from_its_staging_file(wandb_root: Path) -> None:
    """wandb moves manifests above 100,000 entries out of the record into a gzipped JSON-lines file."""
    run = _init(wandb_root, "manif001")
    artifact = wandb.Artifact("many-refs", type="dataset")
    count = 100_001
    for i in range(count):
        artifact.manifest.add_entry(
            ArtifactManifestEntry(path=f"img/{i}.jpg", digest=f"digest-{i}", ref=f"s3://bucket/{i}.jpg", size=i)
        )
    run.log_artifact(artifact)
    path = _finish(run)

    [record] = [r.artifact for r in iter_records(path) if r.HasField("artifact")]
    assert record.manifest.manifest_file_path and not record.manifest.contents

    [offline] = read_run(path).artifacts
    assert len(offline.entries) == count
    assert {e["path"]: e for e in offline.entries}["img/7.jpg"] == {
        "path": "img/7.jpg",
        "digest": "digest-7",
        "size": 7,
        "ref": "s3://bucket/7.jpg",
        "local_path": None,
    }
    assert offline.entries[0]["size"] == 0

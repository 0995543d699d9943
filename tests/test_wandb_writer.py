"""The writer's use of wandb internals stays equal to the public API it stands for."""
from __future__ import annotations

from pathlib import Path

import wandb

from common import checkpoint_file
from uploader.wandb.artifacts import add_hashed_file


def test_adding_a_hashed_file_equals_add_file(tmp_path: Path, monkeypatch) -> None:
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

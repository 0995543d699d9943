"""Real tiny MMDetection 3.x trainings for tests, trained by `tools/train.py` of the mmdet 3.3 package (as a user
would: `python .../mmdet/.mim/tools/train.py CONFIG --work-dir DIR`) in the mmdet 3.x environment, and cached
like the 2.x ones (tests/mmdet_run/fixtures.py: same cache root, lock and manifest, same synthetic data).

The mmdet 3.x environment is its own virtual environment (both stacks install `mmcv`):
`$MMDET_WANDB_MMDET3_PYTHON`, else `<repo>/.venv-mmdet3/bin/python` (`./dev.sh test` sets it up).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.mmdet_run import configs as v2_configs
from tests.mmdet_run.fixtures import CACHE_ROOT, REPO, _digest, _Lock, _tail, cached_dataset, copy_work_dir
from tests.mmdet3_run.configs import Schedule3, detector_config

CACHE_VERSION = 1


def mmdet3_python() -> str:
    return os.environ.get("MMDET_WANDB_MMDET3_PYTHON") or str(REPO / ".venv-mmdet3" / "bin" / "python")


@dataclass(frozen=True)
class Kind3:
    name: str
    model: str  # 'retinanet' or 'mask_rcnn'
    config_stem: str
    schedule: Schedule3


KINDS3: dict[str, Kind3] = {k.name: k for k in [
    Kind3("retinanet3_epoch", "retinanet", "tiny_retinanet_r18_3x_epoch",
          Schedule3(max_epochs=4, max_keep_ckpts=3, save_best="coco/bbox_mAP")),
    Kind3("retinanet3_iter", "retinanet", "tiny_retinanet_r18_3x_iter",
          Schedule3(by_epoch=False, max_iters=96, val_interval=48, ckpt_interval=48)),
    Kind3("maskrcnn3_epoch", "mask_rcnn", "tiny_mask_rcnn_r18_3x_epoch", Schedule3(max_epochs=3, save_best="auto")),
]}

_ENV: dict[str, object] = {}


def environment() -> dict[str, object]:
    """Versions and the path of tools/train.py in the mmdet 3.x environment (asked once); {} when it is missing."""
    if not _ENV:
        probe = ("import json, os, mmcv, mmdet, mmengine, torch; print(json.dumps({'mmcv': mmcv.__version__, "
                 "'mmdet': mmdet.__version__, 'mmengine': mmengine.__version__, 'torch': torch.__version__, "
                 "'train_py': os.path.join(os.path.dirname(mmdet.__file__), '.mim', 'tools', 'train.py')}))")
        try:
            proc = subprocess.run([mmdet3_python(), "-c", probe], capture_output=True, text=True, timeout=300,
                                  env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
        except OSError as exc:
            _ENV["error"] = str(exc)
        else:
            if proc.returncode == 0:
                _ENV.update(json.loads(proc.stdout.strip().splitlines()[-1]))
            else:
                _ENV["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1]
    return _ENV


def require_mmdet3() -> None:
    if "error" in environment():
        pytest.skip(f"the mmdet 3.x environment ({mmdet3_python()}) is not usable: {environment()['error']} "
                    "(./dev.sh test sets it up: tools/install.sh .venv-mmdet3 mmdet3)")


def config_source(kind: str) -> str:
    spec = KINDS3[kind]
    return v2_configs.config_source(detector_config(spec.model, cached_dataset(), spec.schedule))


def cached_work_dir3(kind: str) -> Path:
    """The work_dir of a 3.x kind, trained once by mmdet's tools/train.py and cached; never write to it."""
    spec = KINDS3[kind]
    env = environment()
    source = config_source(kind)
    versions = {k: v for k, v in env.items() if k != "train_py"}
    key = _digest(CACHE_VERSION, kind, spec.config_stem, source, versions, (Path(__file__).read_bytes()))
    entry = CACHE_ROOT / f"{kind}-{key}"
    with _Lock(CACHE_ROOT / f".{kind}-{key}.lock"):
        if not (entry / "manifest.json").exists():
            shutil.rmtree(entry, ignore_errors=True)
            work_dir = entry / spec.config_stem
            config = v2_configs.write_config(source, entry / "configs" / f"{spec.config_stem}.py")
            started = time.monotonic()
            with (entry / "launch-0.out").open("wb") as out:
                proc = subprocess.run([mmdet3_python(), str(env["train_py"]), str(config), "--work-dir", str(work_dir)],
                                      cwd=entry, stdout=out, stderr=subprocess.STDOUT, timeout=1200,
                                      env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"})
            if proc.returncode != 0:
                failed = entry.parent / f".failed-{entry.name}"
                shutil.rmtree(failed, ignore_errors=True)
                entry.rename(failed)
                raise RuntimeError(f"mmdet 3.x training {kind} exited {proc.returncode}\n{_tail(failed / 'launch-0.out')}")
            manifest = dict(kind=kind, key=key, versions=versions, seconds=round(time.monotonic() - started, 2),
                            work_dir=str(work_dir), created=time.strftime("%Y-%m-%d %H:%M:%S"))
            (entry / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return entry / spec.config_stem


@pytest.fixture
def trained_work_dir3(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """Factory: `trained_work_dir3(kind, dest=None, writable=False)` -> a fresh copy of a trained 3.x work_dir."""
    require_mmdet3()

    def make(kind: str, dest: Path | None = None, writable: bool = False) -> Path:
        parent = Path(dest) if dest is not None else tmp_path / "work_dirs3"
        parent.mkdir(parents=True, exist_ok=True)
        return copy_work_dir(cached_work_dir3(kind), parent, writable=writable)

    yield make

"""Real tiny MMDetection 2.28.2 trainings for tests: cached work_dirs, and live training subprocesses.

- `cached_work_dir(kind)`: trains the variant `kind` once (per content hash) and returns the work_dir in the
  cache, `<cache>/<kind>-<hash>/<config stem>/`, exactly as `tools/train.py` left it. The cache survives test
  sessions: `$MMDET_RUN_CACHE`, else `<repo>/.cache/mmdet_runs/`. The hash covers the configs, the dataset
  (parameters and the source of dataset.py), train.py and the versions of torch/mmcv-full/mmdet; a changed
  input gives a new entry (old ones are left for `rm -rf` to collect). Builds are locked (flock) and an
  entry counts only once its manifest.json exists, so parallel sessions neither train twice nor use half
  an entry.
- the pytest fixture `trained_work_dir`: a factory `(kind, dest=None, writable=False) -> Path` that copies
  the cached work_dir into the test's tmp dir (symlinks such as `latest.pth` kept as links, mtimes kept;
  files read-only unless `writable`). It skips the test when `import mmdet` fails (no eval extra).
- `start_training(config, work_dir, ...) -> Popen` for live tests; `run_training(...)` blocks.

Next to each cached work_dir: `manifest.json` (kind, hash, launches with their wall time and exit status)
and `launch-<n>.out` (stdout+stderr of each launch).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from . import configs, dataset
from .configs import Schedule

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CACHE_ROOT = Path(os.environ.get("MMDET_RUN_CACHE", REPO / ".cache" / "mmdet_runs")).resolve()

#: Bumped when the layout of a cache entry changes.
CACHE_VERSION = 1

#: 48 training images = 24 iterations per epoch at 2 images per batch: enough learning per epoch that a
#: few epochs suffice (each epoch also costs the 2 s `time.sleep` of mmcv's EpochBasedRunner.train).
DATASET_PARAMS: dict[str, Any] = dict(n_train=48, n_val=8, size=128, seed=0)


# ------------------------------------------------------------------------------------------- the kinds


@dataclass(frozen=True)
class Launch:
    """One `train.py` launch of a kind: its schedule, and whether it resumes from a checkpoint of the last."""

    schedule: Schedule
    resume_from: str | None = None  # a file name in the work_dir, e.g. 'epoch_3.pth'


@dataclass(frozen=True)
class Kind:
    name: str
    model: str  # 'retinanet', 'faster_rcnn', 'mask_rcnn'
    config_stem: str  # the config's file name without .py: the dumped config's name and the work_dir's
    launches: tuple[Launch, ...]
    expect: dict[str, Any] = field(default_factory=dict)  # what the smoke tests check

    def config(self, data: dataset.CocoPaths, launch: int = 0) -> dict:
        build: Callable[[dataset.CocoPaths, Schedule], dict] = {
            "retinanet": configs.retinanet_config,
            "faster_rcnn": configs.faster_rcnn_config,
            "mask_rcnn": configs.mask_rcnn_config,
        }[self.model]
        return build(data, self.launches[launch].schedule)


_RETINA_EPOCH = Schedule(max_epochs=8, lr_steps=(7,), max_keep_ckpts=2, save_best="bbox_mAP")
_RETINA_ITER = Schedule(by_epoch=False, max_iters=192, lr_steps=(168,), eval_interval=48, ckpt_interval=48)
_MASK_EPOCH = Schedule(max_epochs=6, lr_steps=(5,), max_keep_ckpts=3, save_best="auto")

KINDS: dict[str, Kind] = {
    k.name: k
    for k in [
        Kind("retinanet_epoch", "retinanet", "tiny_retinanet_r18_epoch", (Launch(_RETINA_EPOCH),),
             expect=dict(by_epoch=True, length=8, eval_interval=1, max_keep_ckpts=2, save_best="bbox_mAP",
                         segm=False)),
        Kind("retinanet_iter", "retinanet", "tiny_retinanet_r18_iter", (Launch(_RETINA_ITER),),
             expect=dict(by_epoch=False, length=192, eval_interval=48, max_keep_ckpts=None, save_best=None,
                         segm=False)),
        Kind("maskrcnn_epoch", "mask_rcnn", "tiny_mask_rcnn_r18_epoch", (Launch(_MASK_EPOCH),),
             expect=dict(by_epoch=True, length=6, eval_interval=1, max_keep_ckpts=3, save_best="bbox_mAP",
                         segm=True)),
        # two launches into one work_dir: 4 epochs, then the same run extended to 8 epochs and resumed from
        # epoch_4.pth (a second <ts>.log.json whose first train line is epoch 5)
        Kind("retinanet_resume", "retinanet", "tiny_retinanet_r18_resume",
             (Launch(_RETINA_EPOCH.but(max_epochs=4, max_keep_ckpts=None)),
              Launch(_RETINA_EPOCH.but(max_keep_ckpts=None), resume_from="epoch_4.pth")),
             expect=dict(by_epoch=True, length=8, eval_interval=1, max_keep_ckpts=None, save_best="bbox_mAP",
                         segm=False, launches=2)),
    ]
}


# --------------------------------------------------------------------------------------------- training


def _python() -> str:
    return os.environ.get("MMDET_RUN_PYTHON", sys.executable)


def training_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONUNBUFFERED"] = "1"
    env["CUDA_VISIBLE_DEVICES"] = ""
    env.update(extra or {})
    return env


def _config_file(config: Path | str | dict, work_dir: Path) -> Path:
    if isinstance(config, dict):
        # a dict gets a file of its own, outside the work_dir and its parent (which a sidecar may watch)
        return configs.write_config(config, Path(tempfile.mkdtemp(prefix="mmdet_cfg_")) / f"{work_dir.name}.py")
    return Path(config)


def start_training(config: Path | str | dict, work_dir: Path, *, resume_from: Path | str | None = None,
                   seed: int = 0, extra_args: tuple[str, ...] = (), output: Path | None = None,
                   env: dict[str, str] | None = None) -> subprocess.Popen:
    """Launch `python -m tests.mmdet_run.train CONFIG WORK_DIR` in the background (CPU).

    `config`: a config file (its basename is the dumped config's name) or a dict (written to a temp file named
    after the work_dir). stdout+stderr go to `output` (default: a temp file), never to a pipe that nobody
    reads; the path is `proc.output_path`. Stop it with `proc.terminate()`/`proc.kill()` and `proc.wait()`.
    """
    work_dir = Path(work_dir)
    config_file = _config_file(config, work_dir)
    cmd = [_python(), "-m", "tests.mmdet_run.train", str(config_file), str(work_dir), "--seed", str(seed)]
    if resume_from is not None:
        cmd += ["--resume-from", str(resume_from)]
    cmd += list(extra_args)
    if output is None:
        fd, name = tempfile.mkstemp(prefix="mmdet_train_", suffix=".out")
        os.close(fd)
        output = Path(name)
    output = Path(output)
    with output.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=training_env(env), stdout=out, stderr=subprocess.STDOUT)
    proc.output_path = output  # type: ignore[attr-defined]
    proc.started_at = time.monotonic()  # type: ignore[attr-defined]
    return proc


class TrainingFailed(RuntimeError):
    pass


@dataclass
class TrainingResult:
    returncode: int
    seconds: float
    output_path: Path

    @property
    def output(self) -> str:
        return self.output_path.read_text(encoding="utf-8", errors="replace")


def run_training(config: Path | str | dict, work_dir: Path, *, timeout: float = 900, check: bool = True,
                 **kwargs: Any) -> TrainingResult:
    """`start_training` and wait; raises `TrainingFailed` (with the output's tail) on a non-zero exit."""
    proc = start_training(config, work_dir, **kwargs)
    try:
        returncode = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise TrainingFailed(f"training {work_dir} ran past {timeout} s\n{_tail(proc.output_path)}") from None
    result = TrainingResult(returncode, time.monotonic() - proc.started_at, proc.output_path)
    if check and returncode != 0:
        raise TrainingFailed(f"training {work_dir} exited {returncode}\n{_tail(proc.output_path)}")
    return result


def _tail(path: Path, n: int = 6000) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")[-n:]
    except OSError as exc:
        return f"(no output: {exc})"


# ------------------------------------------------------------------------------------------------ cache


def _versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for dist in ("torch", "mmcv-full", "mmdet", "numpy", "pycocotools"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "-"
    return out


def _digest(*parts: Any) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, default=str).encode() if not isinstance(part, bytes) else part)
        h.update(b"\0")
    return h.hexdigest()[:16]


class _Lock:
    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> "_Lock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = self.path.open("a")
        fcntl.flock(self.fh, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: Any) -> None:
        fcntl.flock(self.fh, fcntl.LOCK_UN)
        self.fh.close()


def cached_dataset(**params: Any) -> dataset.CocoPaths:
    """The synthetic dataset in the cache, written once per parameters and dataset.py source."""
    params = {**DATASET_PARAMS, **params}
    key = _digest(CACHE_VERSION, params, (HERE / "dataset.py").read_bytes())
    final = CACHE_ROOT / f"dataset-{key}"
    with _Lock(CACHE_ROOT / f".dataset-{key}.lock"):
        if not (final / "DONE").exists():
            if final.exists():
                shutil.rmtree(final)
            tmp = CACHE_ROOT / f".tmp-dataset-{key}-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            dataset.make_coco(tmp, **params)
            (tmp / "DONE").write_text(json.dumps(params) + "\n")
            tmp.rename(final)
    # the paths of the published copy (make_coco ran under the temporary name)
    return dataset.CocoPaths(
        root=final, train_img_dir=final / "train", val_img_dir=final / "val",
        train_ann=final / "annotations" / "train.json", val_ann=final / "annotations" / "val.json",
        classes=dataset.CLASSES,
    )


def cache_key(kind: str) -> tuple[str, list[str], dataset.CocoPaths]:
    """(hash, config sources of the launches, dataset) of a kind."""
    spec = KINDS[kind]
    data = cached_dataset()
    sources = [configs.config_source(spec.config(data, i)) for i in range(len(spec.launches))]
    key = _digest(
        CACHE_VERSION, kind, spec.config_stem, sources, [(l.resume_from) for l in spec.launches],
        (HERE / "train.py").read_bytes(), (HERE / "dataset.py").read_bytes(), _versions(),
    )
    return key, sources, data


def cached_work_dir(kind: str) -> Path:
    """The work_dir of `kind`, trained once and cached; read it, never write to it."""
    if kind not in KINDS:
        raise KeyError(f"unknown kind {kind!r}; known: {', '.join(KINDS)}")
    spec = KINDS[kind]
    key, sources, _ = cache_key(kind)
    entry = CACHE_ROOT / f"{kind}-{key}"
    with _Lock(CACHE_ROOT / f".{kind}-{key}.lock"):
        if not (entry / "manifest.json").exists():
            _build(spec, key, sources, entry)
    return entry / spec.config_stem


def _build(spec: Kind, key: str, sources: list[str], entry: Path) -> None:
    """Train every launch of `spec` into `entry/<config stem>/`; `manifest.json` written last marks it done.

    The training runs at the entry's final place (under the lock), so the absolute paths that land in the
    work_dir (resume_from, `best_ckpt` in checkpoint metas, log lines) name the cache entry itself.
    """
    shutil.rmtree(entry, ignore_errors=True)
    entry.mkdir(parents=True)
    work_dir = entry / spec.config_stem
    launches = []
    try:
        for i, (launch, source) in enumerate(zip(spec.launches, sources)):
            config_file = configs.write_config(source, entry / "configs" / f"{spec.config_stem}.py")
            resume = work_dir / launch.resume_from if launch.resume_from else None
            result = run_training(config_file, work_dir, resume_from=resume, output=entry / f"launch-{i}.out")
            launches.append(dict(seconds=round(result.seconds, 2), returncode=result.returncode,
                                 resume_from=str(resume) if resume else None))
    except BaseException:
        # keep the failed attempt for a post-mortem, but never where it could pass for a complete entry
        failed = entry.parent / f".failed-{entry.name}"
        shutil.rmtree(failed, ignore_errors=True)
        entry.rename(failed)
        raise
    manifest = dict(kind=spec.name, key=key, versions=_versions(), launches=launches,
                    work_dir=str(work_dir), created=time.strftime("%Y-%m-%d %H:%M:%S"))
    (entry / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


def manifest(kind: str) -> dict:
    return json.loads((cached_work_dir(kind).parent / "manifest.json").read_text())


def copy_work_dir(src: Path, dest_parent: Path, *, writable: bool = False) -> Path:
    """Copy a work_dir (links as links, mtimes kept) into `dest_parent`; files read-only unless `writable`."""
    dest = Path(dest_parent) / src.name
    shutil.copytree(src, dest, symlinks=True)
    if not writable:
        for path in dest.rglob("*"):
            if path.is_file() and not path.is_symlink():
                mode = path.stat().st_mode
                path.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    return dest


# ----------------------------------------------------------------------------------------------- pytest

_MMDET_IMPORT: list[str | None] = []


def mmdet_import_error() -> str | None:
    """None when `import mmdet` works in the training interpreter, else the tail of its error (cached)."""
    if not _MMDET_IMPORT:
        proc = subprocess.run([_python(), "-c", "import mmdet"], capture_output=True, text=True,
                              env=training_env(), cwd=REPO)
        _MMDET_IMPORT.append(None if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["?"])[-1])
    return _MMDET_IMPORT[0]


def require_mmdet() -> None:
    error = mmdet_import_error()
    if error is not None:
        pytest.skip(f"mmdet 2.x is not importable (install the `eval` extra): {error}")


@pytest.fixture
def trained_work_dir(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """Factory: `trained_work_dir(kind, dest=None, writable=False)` -> a fresh copy of a trained work_dir.

    Kinds: retinanet_epoch, retinanet_iter, maskrcnn_epoch, retinanet_resume (see `KINDS`). The first use
    of a kind in a cache trains it (tens of seconds on CPU); later uses only copy.
    """
    require_mmdet()

    def make(kind: str, dest: Path | None = None, writable: bool = False) -> Path:
        parent = Path(dest) if dest is not None else tmp_path / "work_dirs"
        parent.mkdir(parents=True, exist_ok=True)
        return copy_work_dir(cached_work_dir(kind), parent, writable=writable)

    yield make


@pytest.fixture(scope="session")
def synthetic_coco() -> dataset.CocoPaths:
    """The cached synthetic dataset (for live trainings started by a test)."""
    return cached_dataset()

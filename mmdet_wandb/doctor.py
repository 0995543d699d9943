"""`mmdet-wandb doctor`: what would make the service miss data or fail, checked before it does.

Read-only, and no network: the W&B check says which mode the service will use and whether credentials are
present, without calling the server.
"""
from __future__ import annotations

import logging
import os
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


from common import checkpoint_file, dataset_paths
from db import jobs
from db.session import Database
from mmdet_wandb.paths import DataDir
from uploader.parsers import config_settings
from uploader.wandb.mode import resolve_mode

log = logging.getLogger("mmdet_wandb.doctor")

#: Filesystems whose changes inotify does not see (changes made on another host, or by a FUSE daemon).
NO_EVENTS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "fuse", "ceph", "glusterfs", "lustre", "gpfs", "beegfs", "virtiofs")
#: Filesystems SQLite's WAL must not live on (its locks need one host's shared memory).
NO_SQLITE = NO_EVENTS
WALK_LIMIT = 200_000


@dataclass(frozen=True)
class Check:
    name: str
    level: str  # ok | warn | fail
    detail: str


def run(home: DataDir, roots: list[Path], dataset_roots: tuple[Path, ...] = ()) -> list[Check]:
    checks = [_data_dir(home), _database(home), _wandb()]
    checks.extend(_inotify(roots))
    for root in roots:
        checks.extend(_root(root, home))
    checks.append(_evaluator())
    checks.extend(_val_annotations(home, dataset_roots))
    return checks


def _val_annotations(home: DataDir, dataset_roots: tuple[Path, ...]) -> Iterator[Check]:
    """For each run with eval jobs still to run: do its val annotations resolve here, as a worker started
    here with these dataset roots would look for them (the config in the checkpoint, else the work_dir's)?"""
    if home.db_url.startswith("sqlite") and not (home.path / "state.db").exists():
        return
    try:
        waiting = jobs.waiting_per_run(Database(home.db_url))
    except Exception as exc:  # no such table yet, DB unreachable: the state DB check says so
        log.debug("no eval jobs to check: %s", exc)
        return
    for job in waiting:
        name = f"val data ({Path(job.work_dir).name})"
        text = job.config_text
        try:
            with open(job.checkpoint_path, "rb") as handle:
                text = (checkpoint_file.read_checkpoint_meta(handle) or {}).get("config") or text
        except OSError as exc:
            yield Check(name, "warn", f"{job.checkpoint_path}: {exc.strerror}: this node cannot read the job's checkpoint")
        config = config_settings.load_text(text, job.config_name or "config.py") if isinstance(text, str) else None
        val = (config.values.get("data") or {}).get("val") if config is not None else None
        if not isinstance(val, dict) or not isinstance(val.get("ann_file"), str):
            yield Check(name, "warn", "no data.val.ann_file in the training config (an mmdet 3.x or a wrapped dataset?)")
            continue
        try:
            resolved = dataset_paths.resolve(val, dataset_paths.candidates(dataset_roots, Path(job.work_dir)))
        except dataset_paths.AnnotationsNotFound as exc:
            yield Check(name, "fail", f"{exc}; give the folder that holds it with --dataset-root")
            continue
        found = os.path.exists(resolved["ann_file"])
        yield Check(name, "ok" if found else "fail", f"{resolved['ann_file']}" + ("" if found else ": not found"))


def _data_dir(home: DataDir) -> Check:
    existing = next((p for p in (home.path, *home.path.parents) if p.exists()), Path("/"))
    if not os.access(existing, os.W_OK):
        return Check("data dir", "fail", f"{home.path}: not writable")
    free = shutil.disk_usage(existing).free
    level = "warn" if free < 5 << 30 else "ok"
    return Check("data dir", level, f"{home.path} ({_fs_type(existing)}), {free / (1 << 30):.1f} GiB free")


def _database(home: DataDir) -> Check:
    url = home.db_url
    shown = url.split("@")[-1] if "@" in url else url
    if url.startswith("sqlite") and not (home.path / "state.db").exists():
        fs = _fs_type(home.path if home.path.exists() else Path("/"))
        if fs in NO_SQLITE:
            return Check("state DB", "fail", f"{shown}: SQLite on {fs} is unsafe; use a local disk or PostgreSQL")
        return Check("state DB", "ok", f"{shown}: not created yet (the first watch/backfill creates it)")
    try:
        db = Database(url)
        current, head = db.revisions()
        db.dispose()
    except Exception as exc:
        return Check("state DB", "fail", f"{shown}: {type(exc).__name__}: {exc}")
    if current != head:
        return Check("state DB", "warn", f"{shown}: schema {current}, the next start upgrades it to {head}")
    return Check("state DB", "ok", f"{shown}: reachable, schema {current}")


def _wandb() -> Check:
    mode = resolve_mode()
    if mode == "offline":
        return Check("W&B", "ok", "offline (no WANDB_API_KEY): runs are written locally; `mmdet-wandb sync` uploads them later")
    if mode == "disabled":
        return Check("W&B", "warn", "WANDB_MODE=disabled: nothing is written")
    if os.environ.get("WANDB_API_KEY"):
        return Check("W&B", "ok", f"online to {os.environ.get('WANDB_BASE_URL', 'https://api.wandb.ai')}; API key from WANDB_API_KEY")
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    if netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="replace"):
        return Check("W&B", "ok", f"online; API key from {netrc}")
    return Check("W&B", "fail", "WANDB_MODE=online but no WANDB_API_KEY (or netrc entry): set it in the environment")


def _inotify(roots: list[Path]) -> Iterator[Check]:
    try:
        watches = int(Path("/proc/sys/fs/inotify/max_user_watches").read_text())
        instances = int(Path("/proc/sys/fs/inotify/max_user_instances").read_text())
    except (OSError, ValueError):
        yield Check("inotify", "warn", "limits unreadable (not Linux?): the service falls back to polling and scans")
        return
    folders = sum(_count_dirs(root) for root in roots)
    detail = f"max_user_watches {watches}, max_user_instances {instances}; {folders} folders under the roots"
    if folders > watches * 0.8:
        yield Check("inotify", "warn", detail + ": raise fs.inotify.max_user_watches or run watch with --poll")
    else:
        yield Check("inotify", "ok", detail)


def _count_dirs(root: Path) -> int:
    count = 0
    for _, dirs, _ in os.walk(root, followlinks=False):
        count += 1
        if count >= WALK_LIMIT:
            break
    return count


def _root(root: Path, home: DataDir) -> Iterator[Check]:
    if not root.is_dir():
        yield Check(f"root {root}", "fail", "not a directory")
        return
    if not os.access(root, os.R_OK | os.X_OK):
        yield Check(f"root {root}", "fail", "not readable")
        return
    fs = _fs_type(root)
    if fs.split(".")[0] in NO_EVENTS:
        yield Check(f"root {root}", "warn", f"{fs}: filesystem events miss changes made elsewhere; run watch with --poll")
    else:
        yield Check(f"root {root}", "ok", f"{fs}, readable")
    store = home.path if home.path.exists() else home.path.parent
    same = store.exists() and os.stat(store).st_dev == os.stat(root).st_dev and os.access(root, os.W_OK)
    if same:
        yield Check(f"pins {root}", "ok", "checkpoints are pinned by hard link (no extra disk)")
    else:
        yield Check(f"pins {root}", "warn", "the data dir is on another filesystem (or the root is read-only): "
                    "checkpoints are copied into the store once complete (one copy each)")


def _evaluator() -> Check:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import mmdet
            import torch
    except ImportError:
        return Check("evaluator", "warn", "torch/mmdet not installed here: `mmdet-wandb evaluate` needs the eval extra")
    gpu = f"{torch.cuda.device_count()} GPU(s)" if torch.cuda.is_available() else "no GPU (CPU fallback)"
    return Check("evaluator", "ok", f"torch {torch.__version__}, mmdet {mmdet.__version__}, {gpu}")


def _fs_type(path: Path) -> str:
    """The filesystem type of the mount holding `path` (longest mount point prefix in /proc/self/mounts)."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return "unknown"
    resolved = str(path.resolve())
    best, kind = "", "unknown"
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        point = parts[1].replace("\\040", " ")
        if (resolved == point or resolved.startswith(point.rstrip("/") + "/")) and len(point) > len(best):
            best, kind = point, parts[2]
    return kind

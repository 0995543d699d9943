"""Where the service keeps its state: one data directory, never inside a watched work_dir."""
from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from db.session import sqlite_url


class DataDirError(ValueError):
    pass


@dataclass(frozen=True)
class DataDir:
    path: Path

    @property
    def db_url(self) -> str:
        return os.environ.get("MMDET_WANDB_DB_URL") or sqlite_url(self.path / "state.db")

    @property
    def runs_dir(self) -> Path:
        """Offline W&B segments go here, or under WANDB_DIR when the user set it."""
        wandb_dir = os.environ.get("WANDB_DIR")
        return Path(wandb_dir) / "mmdet-wandb" if wandb_dir else self.path / "wandb"

    @property
    def store_dir(self) -> Path:
        """Pinned checkpoints: hard links, so the data dir must be on the work_dirs' filesystem."""
        return self.path / "store"

    @property
    def media_dir(self) -> Path:
        """Val images and ground-truth masks written out for the tables, once per val subset."""
        return self.path / "media"

    def heartbeat(self, service: str) -> Path:
        """Touched by each loop pass of a service; `mmdet-wandb health SERVICE` reads its age. MMDET_WANDB_HEARTBEAT_DIR
        puts it elsewhere, for a service whose data dir is read-only (the evaluator beside PostgreSQL)."""
        elsewhere = os.environ.get("MMDET_WANDB_HEARTBEAT_DIR")
        return Path(elsewhere) / service if elsewhere else self.path / "heartbeat" / service

    def lock_uploader(self, command: str) -> IO[str]:
        """One uploader per data dir (DESIGN 11): an advisory lock, held as long as the returned file is open
        (the kernel drops it when the process dies, SIGKILL included). Raises DataDirError naming the holder."""
        try:
            handle = open(self.path / "uploader.lock", "a+", encoding="utf-8")
        except OSError as exc:
            raise DataDirError(_unwritable(self.path, exc)) from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise DataDirError(
                f"{self.path} is in use by a running uploader ({holder}): one watch or backfill per data dir; "
                "stop it first, or give this one another --data-dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"`mmdet-wandb {command}`, pid {os.getpid()}\n")
        handle.flush()
        return handle

    def prepare(self, roots: list[Path]) -> None:
        """Create the directory, refuse one inside a watched root, and keep wandb's own files in it too."""
        for root in roots:
            if self.path.resolve().is_relative_to(root.resolve()):
                raise DataDirError(
                    f"data directory {self.path} is inside the watched root {root}; "
                    "nothing may be written there: choose another --data-dir"
                )
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DataDirError(_unwritable(self.path, exc)) from None
        os.environ.setdefault("WANDB_DATA_DIR", str(self.path / "wandb-data"))
        os.environ.setdefault("WANDB_CACHE_DIR", str(self.path / "wandb-cache"))
        os.environ.setdefault("WANDB_CONFIG_DIR", str(self.path / "wandb-config"))


def resolve(data_dir: Path | None) -> DataDir:
    """--data-dir, else MMDET_WANDB_HOME, else the per-user data directory; one that is a file is refused here,
    so that every command says so in the same words."""
    if data_dir is not None:
        home = DataDir(data_dir.expanduser().absolute())
    elif os.environ.get("MMDET_WANDB_HOME"):
        home = DataDir(Path(os.environ["MMDET_WANDB_HOME"]).expanduser().absolute())
    else:
        home = DataDir(Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "mmdet-wandb")
    if home.path.exists() and not home.path.is_dir():
        raise DataDirError(f"data directory {home.path} is a file, not a directory: give --data-dir (or MMDET_WANDB_HOME) a directory")
    return home


def _unwritable(path: Path, exc: OSError) -> str:
    return f"data directory {path} cannot be written ({exc.strerror or exc}): give --data-dir a directory this user may write to"

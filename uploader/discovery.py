"""Discovery: which files under a watched root are MMDetection logs, and which work_dir each belongs to.

A scan is the source of truth (filesystem events only wake it up early). It never follows a symlink: a link
that resolves outside the root is reported, one inside it is skipped because its target is scanned anyway.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from common.records import LogFormat

TIMESTAMP = re.compile(r"^\d{8}_\d{6}$")
SKIPPED_DIRS = frozenset({"wandb", ".eval_hook", "__pycache__", ".git", "vis_image"})
_UNDECODABLE = "name is not valid UTF-8: nothing in it is read or uploaded until it is renamed (W&B and the state DB hold UTF-8 only)"


@dataclass(frozen=True)
class FoundLog:
    path: Path
    work_dir: Path
    format: LogFormat
    launch: str  # orders launches of one work_dir: the log's timestamp, else its folder or file name
    text_log: Path | None  # the text log of the same launch (iterations per epoch live there)
    config: Path | None  # a config dumped beside the log (mmengine vis_data/config.py)


@dataclass(frozen=True)
class FoundProblem:
    path: Path
    kind: str
    message: str


@dataclass
class ScanResult:
    logs: list[FoundLog] = field(default_factory=list)
    problems: list[FoundProblem] = field(default_factory=list)


def scan(root: Path) -> ScanResult:
    """Walk one root (a work_dir or a tree of them) without following symlinks."""
    result = ScanResult()
    root = root.resolve()
    if not root.is_dir():
        result.problems.append(FoundProblem(root, "unreadable", "watched root is not a directory"))
        return result
    stack = [root]
    while stack:
        directory = stack.pop()
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as exc:
            result.problems.append(FoundProblem(directory, "unreadable", f"cannot list directory: {exc.strerror}"))
            continue
        regular_files = {e.name for e in entries if e.is_file(follow_symlinks=False)}
        for entry in entries:
            path = Path(entry.path)
            if not _encodable(entry.name):
                result.problems.append(FoundProblem(path, "undecodable_name", _UNDECODABLE))
            elif entry.is_symlink():
                _check_symlink(root, path, result)
            elif entry.is_dir(follow_symlinks=False):
                if entry.name not in SKIPPED_DIRS:
                    stack.append(path)
            elif entry.is_file(follow_symlinks=False):
                found = classify(path, regular_files)
                if found is not None:
                    result.logs.append(found)
    result.logs.sort(key=lambda f: (str(f.work_dir), f.launch, str(f.path)))
    return result


def classify(path: Path, siblings: set[str]) -> FoundLog | None:
    """Recognise a log file from its name and place; `siblings` are the regular files in its folder (no links)."""
    name, parent = path.name, path.parent
    if name.endswith(".log.json"):
        stem = name[: -len(".log.json")]
        text_log = parent / f"{stem}.log"
        return FoundLog(path, parent, LogFormat.MMDET2_LOGJSON, stem, _existing(text_log, siblings), None)
    if not name.endswith(".json"):
        return None
    stem = name[: -len(".json")]
    if parent.name == "vis_data":
        if name != "scalars.json" and ("scalars.json" in siblings or not TIMESTAMP.match(stem)):
            return None  # mmengine writes the same lines to scalars.json and <ts>.json: read one
        launch_dir = parent.parent
        launch = launch_dir.name if TIMESTAMP.match(launch_dir.name) else _timestamp_sibling(siblings, launch_dir.name)
        config = parent / "config.py"
        return FoundLog(
            path, launch_dir.parent, LogFormat.MMENGINE_SCALARS, launch,
            _launch_text_log(launch_dir, launch), config if "config.py" in siblings else None,
        )
    if TIMESTAMP.match(stem) and parent.parent != parent:
        return FoundLog(path, parent.parent, LogFormat.MMENGINE_TEST, stem, None, None)
    return None


def _encodable(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes surface as surrogates: no DB or log line can hold them
        return False
    return True


def _existing(path: Path, siblings: set[str]) -> Path | None:
    return path if path.name in siblings else None


def _timestamp_sibling(siblings: set[str], fallback: str) -> str:
    """A renamed launch folder still holds vis_data/<ts>.json, whose name is the launch time."""
    stamps = sorted(n[:-5] for n in siblings if n.endswith(".json") and TIMESTAMP.match(n[:-5]))
    return stamps[0] if stamps else fallback


def _launch_text_log(launch_dir: Path, launch: str) -> Path | None:
    candidate = launch_dir / f"{launch}.log"
    if candidate.is_file() and not candidate.is_symlink():
        return candidate
    return None


def _check_symlink(root: Path, path: Path, result: ScanResult) -> None:
    try:
        target = path.resolve(strict=True)
    except (OSError, RuntimeError) as exc:
        result.problems.append(FoundProblem(path, "broken_symlink", f"symlink cannot be resolved: {exc}"))
        return
    if not target.is_relative_to(root):
        result.problems.append(
            FoundProblem(path, "symlink_outside_root", f"symlink points outside the watched root, to {target}; not followed")
        )

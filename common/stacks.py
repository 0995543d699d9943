"""Which MMDetection stack runs a checkpoint: mmdet 2.x (mmcv-full 1.x) or mmdet 3.x (MMEngine, mmcv 2.x).

Both stacks install the package `mmcv`, so one environment holds one of them: each eval job names the stack
it needs (from the checkpoint's meta, read torch-free by the uploader), and a worker claims only the jobs of
the stack it has installed, so that one worker of each kind can share one queue.
"""
from __future__ import annotations

from importlib import metadata
from typing import Any

MMDET2 = "mmdet2"
MMDET3 = "mmdet3"
STACKS = (MMDET2, MMDET3)


def of_checkpoint(meta: dict[str, Any]) -> str:
    """MMEngine writes `mmengine_version` (and `dataset_meta`) into every checkpoint's meta; mmcv 1.x never does."""
    return MMDET3 if "mmengine_version" in meta or "dataset_meta" in meta else MMDET2


def installed() -> str | None:
    """The stack of this environment, from the installed distributions (nothing is imported)."""
    try:
        mmdet_major = int(metadata.version("mmdet").split(".")[0])
    except (metadata.PackageNotFoundError, ValueError):
        return None
    if mmdet_major >= 3 and _has("mmengine") and _has("mmcv"):
        return MMDET3
    if mmdet_major == 2 and _has("mmcv-full"):
        return MMDET2
    return None


def _has(distribution: str) -> bool:
    try:
        metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return False
    return True

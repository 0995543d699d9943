"""Where a training config's relative dataset paths point: relative to where training ran, which the worker
does not know. The candidates, in order: the dataset roots an operator named (`--dataset-root`), the
worker's cwd, and every folder above the work_dir (work_dirs usually sit in the repo that holds `data/`).
The first candidate that holds the val annotations wins. Shared by the evaluator and `doctor`."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

PATH_KEYS = ("ann_file", "img_prefix", "seg_prefix", "proposal_file")


class AnnotationsNotFound(FileNotFoundError):
    def __init__(self, ann_file: str, bases: list[Path]) -> None:
        super().__init__(f"val annotations {ann_file} not found (relative to any of: {', '.join(map(str, bases))})")


def candidates(dataset_roots: tuple[Path, ...], work_dir: Path) -> list[Path]:
    return [*dataset_roots, Path.cwd(), *work_dir.resolve().parents]


def resolve(val_cfg: dict[str, Any], bases: list[Path]) -> dict[str, Any]:
    """`val_cfg` with its relative paths made absolute against the first base that holds `ann_file`."""
    ann_file = val_cfg.get("ann_file")
    if not isinstance(ann_file, str) or not ann_file or os.path.isabs(ann_file):
        return val_cfg
    for base in bases:
        if (base / ann_file).exists():
            resolved = dict(val_cfg)
            for key in PATH_KEYS:
                value = resolved.get(key)
                if isinstance(value, str) and value and not os.path.isabs(value):
                    resolved[key] = str(base / value) + ("/" if value.endswith("/") else "")
            return resolved
    raise AnnotationsNotFound(ann_file, bases)

"""Where a training config's relative dataset paths point: relative to where training ran, which the worker
does not know. The candidates, in order: the dataset roots an operator named (`--dataset-root`), the
worker's cwd, and every folder above the work_dir (work_dirs usually sit in the repo that holds `data/`).
The first candidate that holds the val annotations wins. Shared by the evaluator and `doctor`.

mmdet 2.x datasets name `ann_file`, `img_prefix`, ... each relative to the cwd; MMEngine datasets (mmdet 3.x) name
a `data_root` that `ann_file` and `data_prefix` are relative to, so only where `data_root` lies is looked for."""
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


def resolve_mmengine(dataset_cfg: dict[str, Any], bases: list[Path]) -> tuple[dict[str, Any], Path | None]:
    """An MMEngine dataset config with `data_root` made absolute against the first base that holds
    `data_root/ann_file`, and that base (None when nothing was relative)."""
    data_root = dataset_cfg.get("data_root") or ""
    ann_file = dataset_cfg.get("ann_file")
    if not isinstance(ann_file, str) or not ann_file:
        return dataset_cfg, None
    full = os.path.join(data_root, ann_file)
    if os.path.isabs(full):
        return dataset_cfg, None
    for base in bases:
        if (base / full).exists():
            return {**dataset_cfg, "data_root": str(base / data_root) if data_root else str(base)}, base
    raise AnnotationsNotFound(full, bases)

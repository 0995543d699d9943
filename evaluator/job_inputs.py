"""What both adapters (mmdet2, mmdet3) take from a job the same way: the training config — the one inside the
checkpoint (exactly what trained it), else the work_dir's dump — with its `custom_imports` imported when the
operator allows them (common/trust.py), the hook's subset of the val set, and the images the model runs on (the
subset, or the whole val set with `eval_full_val`)."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from common import checkpoint_file
from common.records import subset_indices
from db.jobs import ClaimedJob
from evaluator.errors import JobError
from common.trust import Trust


def load_config(job: ClaimedJob, meta_key: str, config_class: Any, import_modules_from_strings: Callable[..., Any],
                trust: Trust) -> Any:
    """`meta_key`: where the stack keeps the config in a checkpoint's meta (mmcv: `config`, MMEngine: `cfg`);
    `config_class` and `import_modules_from_strings`: the stack's own (mmcv's or mmengine's)."""
    try:
        with open(job.checkpoint_path, "rb") as handle:
            meta = checkpoint_file.read_checkpoint_meta(handle) or {}
    except OSError as exc:
        raise JobError(f"cannot read the checkpoint {job.checkpoint_path}: {exc.strerror}", retryable=True) from exc
    text, name = meta.get(meta_key), "checkpoint meta"
    if not isinstance(text, str) or not text.strip():
        text, name = job.config_text, f"{job.config_name} in {job.work_dir}"
    if not text:
        raise JobError("no config: the checkpoint's meta has none and the work_dir has no config dump", retryable=False)
    cfg = _parse(config_class, text, name)
    if cfg.get("custom_imports"):
        _import_custom_modules(cfg["custom_imports"], trust, import_modules_from_strings)
    return cfg


def _parse(config_class: Any, text: str, name: str) -> Any:
    """`Config.fromstring` without its import of `custom_imports` (fromstring is fromfile on a temporary file)."""
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", suffix=".py", delete=False) as handle:
        handle.write(text)
    try:
        return config_class.fromfile(handle.name, import_custom_modules=False)
    except Exception as exc:
        raise JobError(f"the config ({name}) cannot be read: {type(exc).__name__}: {exc}", retryable=False) from exc
    finally:
        os.remove(handle.name)


def _import_custom_modules(custom_imports: Any, trust: Trust, import_modules_from_strings: Callable[..., Any]) -> None:
    """Only modules the operator allowed: importing one runs its code in the worker."""
    if not isinstance(custom_imports, dict):
        raise JobError(f"custom_imports of the config is a {type(custom_imports).__name__}, not dict(imports=[...])", retryable=False)
    modules = custom_imports.get("imports", [])
    modules = [modules] if isinstance(modules, str) else [str(m) for m in modules]
    refused = trust.refused(modules)
    if refused:
        raise JobError(f"the config's custom_imports name {', '.join(refused)}: importing them would run code from the work_dir; "
                       f"allow them with --allow-import {' --allow-import '.join(refused)} (or --trust-configs)", retryable=False)
    try:
        import_modules_from_strings(**custom_imports)
    except ImportError as exc:
        raise JobError(f"custom_imports of the config: {exc} (put the module on the worker's PYTHONPATH)", retryable=False) from exc


def subset(job: ClaimedJob, val_size: int) -> tuple[list[int], str | None]:
    """The hook's subset: the first `num_eval_images` of a seed-42 permutation, clamped to the val set (with a note)."""
    count = min(job.num_eval_images, val_size)
    note = None
    if count < job.num_eval_images:
        note = f"num_eval_images ({job.num_eval_images}) is greater than the val set ({val_size}): using {count}, as the hook does"
    return subset_indices(val_size, count), note


@dataclass(frozen=True)
class Scope:
    """The val images the model runs on (the metrics' images) and, among them, the subset's (the tables' rows)."""

    indices: list[int]  # dataset indices, in the order the model runs on them
    rows: list[int]  # positions in `indices` of the subset's images, in subset order


def scope(job: ClaimedJob, subset_indices: list[int], val_size: int) -> Scope:
    """`eval_full_val`: every val image, once (the subset's predictions are taken from that run, not run twice);
    else the subset alone."""
    if job.eval_full_val:
        return Scope(list(range(val_size)), list(subset_indices))
    return Scope(list(subset_indices), list(range(len(subset_indices))))

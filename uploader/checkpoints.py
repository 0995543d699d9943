"""Checkpoints: pin each one as soon as it appears, decide when it is complete (DESIGN 7), queue the complete
ones as versions of `run_<id>_model` in the artifact outbox, and follow them up once the writer settled them.

MMDetection writes checkpoints in place, without temp file or rename, and `max_keep_ckpts` deletes old ones;
so a checkpoint is hard-linked into the service's store at first sight, and only a file whose zip end record
and central directory are valid and whose (inode, size, mtime) held still is ever uploaded.
"""
from __future__ import annotations

import errno
import functools
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from common import checkpoint_file, crash_points
from db import outbox, segments
from db.models import (
    ArtifactKind,
    Checkpoint,
    CheckpointState,
    Run,
    Source,
    SourceState,
)
from db.session import Database, node_of
from uploader.background import Background
from uploader import hook_options
from uploader.ingest import work_dir_row
from uploader.parsers import config_settings

log = logging.getLogger("mmdet_wandb.checkpoints")

CHECKPOINT_NAME = re.compile(r"^(?P<best>best_.*?)?(?P<unit>epoch|iter)_(?P<n>\d+)\.pth$")
OPEN_STATES = (CheckpointState.SEEN, CheckpointState.READY)


@dataclass(frozen=True)
class CheckpointOptions:
    store_dir: Path
    layers: hook_options.Layers = hook_options.Layers()  # log_checkpoint & co., resolved per run with its hook entry
    settle_s: float = 2.0  # nothing may change between two looks this far apart
    incomplete_after_s: float = 600.0  # still this long but never a valid checkpoint: incomplete


@dataclass(frozen=True)
class FoundCheckpoint:
    path: Path
    work_dir: Path


def classify(name: str) -> tuple[str, int | None]:
    """`epoch_12.pth` → ("epoch", 12); `best_bbox_mAP_epoch_12.pth` → ("best_epoch", 12); else ("other", None)."""
    match = CHECKPOINT_NAME.match(name)
    if match is None:
        return "other", None
    unit = match.group("unit")
    return (f"best_{unit}" if match.group("best") else unit), int(match.group("n"))


def find(work_dirs: set[Path]) -> list[FoundCheckpoint]:
    """Regular `.pth` files directly in each work_dir (symlinks such as latest.pth are signals, not files)."""
    found = []
    for work_dir in sorted(work_dirs):
        try:
            entries = list(os.scandir(work_dir))
        except OSError:
            continue
        for entry in entries:
            if entry.name.endswith(".pth") and entry.is_file(follow_symlinks=False):
                found.append(FoundCheckpoint(Path(entry.path), work_dir))
    return found


def advance(
    db: Database, found: list[FoundCheckpoint], options: CheckpointOptions, background: Background, now: float | None = None,
    looked: set[Path] | None = None,
) -> None:
    """One look at every checkpoint `found` in the work_dirs `looked` at (default: all): pin new ones, follow
    changes, and settle complete or broken ones (copies into the store run in `background`)."""
    now = time.time() if now is None else now
    seen_paths = set()
    for item in found:
        seen_paths.add(str(item.path))
        try:
            _look(db, item, options, now)
        except Exception:  # one odd file must not stop the others
            log.exception("%s: checkpoint look failed", item.path)
    with db.transaction() as session:
        vanished = session.scalars(
            select(Checkpoint).where(Checkpoint.node == node_of(session), Checkpoint.state.in_(OPEN_STATES), Checkpoint.path.not_in(seen_paths))
        ).all()
        for row in vanished:
            if looked is not None and Path(row.path).parent not in looked:
                continue  # its work_dir was not looked at this time
            if not (row.pin_path and Path(row.pin_path).exists()):
                _set(row, CheckpointState.MISSED, "deleted before it could be " + ("copied" if row.pin_by_copy else "pinned"))
            elif row.state is CheckpointState.SEEN:
                _settle(row, Path(row.pin_path), options, now)
    copy_pins(db, options, background)


def _look(db: Database, item: FoundCheckpoint, options: CheckpointOptions, now: float) -> None:
    try:
        st = item.path.stat(follow_symlinks=False)
    except FileNotFoundError:
        return  # handled as vanished on the next look
    identity = (st.st_ino, st.st_size, st.st_mtime_ns)
    pinned = False
    with db.transaction() as session:
        row = session.scalar(
            select(Checkpoint).where(Checkpoint.node == node_of(session), Checkpoint.path == str(item.path)).order_by(Checkpoint.id.desc()).limit(1)
        )
        if row is None or (row.state not in OPEN_STATES and (row.ino, row.size, row.mtime_ns) != identity):
            before = row
            row = _new_row(session, item, identity, min(now, st.st_mtime_ns / 1e9))
            if before is not None:
                row.reason = f"rewritten after it was {before.state.value} (checkpoint #{before.id})"
            pinned = _pin(row, item.path, options)
        elif row.state in OPEN_STATES and (row.ino, row.size, row.mtime_ns) != identity:
            if row.run_id is not None:
                outbox.withdraw(session, row.run_id, _key(row))
            if row.ino != st.st_ino:
                _unpin(row)
            row.ino, row.size, row.mtime_ns = identity
            _look_again(row, "changed while being checked")
            row.still_since = now
            row.meta_json = None
            if row.pin_path is None:
                pinned = _pin(row, item.path, options)
        if row.state is CheckpointState.SEEN and (row.pin_path is not None or row.pin_by_copy):
            _settle(row, Path(row.pin_path or row.path), options, now)
    if pinned:
        crash_points.reached("checkpoint-pinned")


def _new_row(session: Session, item: FoundCheckpoint, identity: tuple[int, int, int], still_since: float) -> Checkpoint:
    work_dir = work_dir_row(session, item.work_dir, item.work_dir)
    kind, number = classify(item.path.name)
    row = Checkpoint(
        node=node_of(session),
        work_dir_id=work_dir.id, path=str(item.path), name=item.path.name, kind=kind, number=number,
        ino=identity[0], size=identity[1], mtime_ns=identity[2], still_since=still_since, state=CheckpointState.SEEN,
    )
    session.add(row)
    session.flush()
    return row


def _pin(row: Checkpoint, path: Path, options: CheckpointOptions) -> bool:
    """Hard-link the file into the store, so that max_keep_ckpts deleting it loses nothing and costs no bytes;
    True when it is linked."""
    pin = options.store_dir / str(row.work_dir_id) / f"{row.id}-{row.name}"
    pin.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(path, pin, follow_symlinks=False)
    except FileNotFoundError:
        _set(row, CheckpointState.MISSED, "deleted before it could be pinned")
        return False
    except OSError as exc:
        if exc.errno in (errno.EXDEV, errno.EROFS, errno.EPERM, errno.EACCES):
            # another filesystem or a read-only mount (Docker): copy it into the store once it is complete
            row.pin_by_copy = True
            row.reason = f"no hard link possible ({exc.strerror}): copied into the store once complete"
            return False
        _set(row, CheckpointState.MISSED, f"cannot hard-link into the store: {exc.strerror}")
        return False
    st = pin.stat()
    if st.st_ino != row.ino:  # replaced between our stat and the link: follow what we pinned
        row.ino, row.size, row.mtime_ns, row.still_since = st.st_ino, st.st_size, st.st_mtime_ns, time.time()
    row.pin_path = str(pin)
    return True


def copy_pins(db: Database, options: CheckpointOptions, background: Background) -> None:
    """Copy complete checkpoints that could not be hard-linked into the store, once their run is known to
    want them: in `background`, since a multi-GB copy must hold neither the loop nor the DB."""
    with db.transaction() as session:
        rows = session.scalars(
            select(Checkpoint).where(Checkpoint.node == node_of(session), Checkpoint.pin_by_copy.is_(True), Checkpoint.pin_path.is_(None),
                                     Checkpoint.meta_json.is_not(None), Checkpoint.state == CheckpointState.SEEN)
        ).all()
        for row in rows:
            run = run_of(session, row)
            if run is None:
                continue
            if not wanted(row, hook_options.for_run(options.layers, run.hook_options_json)):
                finish_without_upload(row)
                continue
            pin = options.store_dir / str(row.work_dir_id) / f"{row.id}-{row.name}"
            background.submit(f"copy:{row.id}", _copy_pin, db, row.id, Path(row.path), pin, row.size, row.mtime_ns)


def _copy_pin(db: Database, checkpoint_id: int, path: Path, pin: Path, size: int, mtime_ns: int) -> None:
    """One copy into the store; a file that changed while being copied is looked at again."""
    pin.parent.mkdir(parents=True, exist_ok=True)
    try:
        shutil.copyfile(path, pin)
        st = os.stat(path)
        unchanged = st.st_size == size == pin.stat().st_size and st.st_mtime_ns == mtime_ns
    except OSError as exc:
        log.warning("%s: cannot copy into the store: %s", path, exc)
        pin.unlink(missing_ok=True)
        return
    with db.transaction() as session:
        row = session.get_one(Checkpoint, checkpoint_id)
        if unchanged and row.state is CheckpointState.SEEN and row.pin_path is None:
            row.pin_path, row.state, row.reason = str(pin), CheckpointState.READY, None
        else:
            pin.unlink(missing_ok=True)
            row.meta_json, row.still_since = None, time.time()


def _hash_pin(db: Database, checkpoint_id: int, pin: Path) -> None:
    """md5 (the artifact entry's digest) and sha256 (its metadata) of the pinned file, in one read; a file
    that changed while being hashed is looked at again from the start."""
    try:
        with open(pin, "rb") as handle:
            digests = checkpoint_file.hash_file(handle)
            hashed = os.fstat(handle.fileno())
    except (OSError, checkpoint_file.ChangedWhileReading) as exc:
        with db.transaction() as session:
            row = session.get_one(Checkpoint, checkpoint_id)
            if row.state is CheckpointState.READY:
                _look_again(row, f"cannot hash: {exc}")
        return
    with db.transaction() as session:
        row = session.get_one(Checkpoint, checkpoint_id)
        if row.state is not CheckpointState.READY:
            return
        if not row.pin_by_copy and (row.size, row.mtime_ns) != (hashed.st_size, hashed.st_mtime_ns):  # written again since it was ready
            _look_again(row, "changed after it was ready")
            return
        row.md5_b64, row.sha256 = digests.md5_b64, digests.sha256_hex


def _look_again(row: Checkpoint, reason: str) -> None:
    """Back to `seen`: it changed under us; its hash no longer holds."""
    row.state, row.still_since, row.reason = CheckpointState.SEEN, time.time(), reason
    row.md5_b64 = row.sha256 = None


def _unpin(row: Checkpoint) -> None:
    if row.pin_path:
        Path(row.pin_path).unlink(missing_ok=True)
        row.pin_path = None


def _settle(row: Checkpoint, pin: Path, options: CheckpointOptions, now: float) -> None:
    """Still long enough → check the zip: valid → ready; still invalid after incomplete_after → incomplete."""
    if now - row.still_since < options.settle_s:
        return
    try:
        with open(pin, "rb") as handle:
            st = os.fstat(handle.fileno())
            if (st.st_size, st.st_mtime_ns) != (row.size, row.mtime_ns):
                row.size, row.mtime_ns, row.still_since = st.st_size, st.st_mtime_ns, now
                return
            check = checkpoint_file.check_torch_zip(handle, st.st_size)
            meta = checkpoint_file.read_checkpoint_meta(handle) if check.ok else None
    except OSError as exc:
        row.reason = f"cannot read: {exc.strerror}"
        return
    if check.ok:
        row.meta_json = json.dumps(checkpoint_file.summarize_meta(meta) if meta else {}, default=str)
        if row.pin_path is None:  # pin_by_copy: ready once copy_pins() has its copy
            return
        row.state = CheckpointState.READY
        row.reason = None
    elif now - row.still_since >= options.incomplete_after_s:
        _set(row, CheckpointState.INCOMPLETE, f"{check.reason} (unchanged for {now - row.still_since:.0f} s)")
    else:
        row.reason = check.reason


def _set(row: Checkpoint, state: CheckpointState, reason: str) -> None:
    if row.state is not state:
        log.warning("%s: checkpoint %s: %s", row.path, state.value, reason)
    row.state = state
    row.reason = reason
    if state in (CheckpointState.MISSED, CheckpointState.INCOMPLETE):
        _unpin(row)


def queue_uploads(db: Database, options: CheckpointOptions, background: Background) -> int:
    """Queue ready checkpoints of runs with log_checkpoint whose evaluation line is in (or will never come);
    returns how many were queued.

    Waiting for the val line of the checkpoint's own epoch gives metadata from that evaluation, never an
    older one, and lets mmengine finish its second write of `epoch_N.pth` after validation. The pinned file is
    hashed once, in `background`, before it is queued. A best checkpoint is queued before the regular one of
    the same epoch, so that `latest` ends on the regular one.
    """
    queued = 0
    with db.transaction() as session:
        ready = session.scalars(
            select(Checkpoint).where(
                Checkpoint.node == node_of(session), Checkpoint.state == CheckpointState.READY,
                Checkpoint.id.not_in(outbox.queued(ArtifactKind.MODEL)),
            )
        ).all()
        for row in sorted(ready, key=lambda r: (r.work_dir_id, r.number or 0, not r.kind.startswith("best"), r.id)):
            run = run_of(session, row)
            if run is None:
                continue
            row.run_id = run.id
            run_options = hook_options.for_run(options.layers, run.hook_options_json)
            if not run_options.log_checkpoint:
                continue
            evaluation = _evaluation(session, run, row)
            if evaluation is _WAIT:
                continue
            pin = Path(row.pin_path or row.path)
            if row.md5_b64 is None:
                background.submit(f"hash:{row.id}", _hash_pin, db, row.id, pin)
                continue
            queued += outbox.add_artifact(
                session, run.id, ArtifactKind.MODEL, _key(row), checkpoint_id=row.id, file_path=str(pin), file_name=row.name,
                file_md5=row.md5_b64, file_size=None if row.pin_by_copy else row.size,  # a copy in the store is ours: it never changes
                file_mtime_ns=None if row.pin_by_copy else row.mtime_ns, aliases=_aliases(row), metadata=_metadata(row, evaluation, run_options.log_checkpoint_metadata),
            )
    return queued


def follow_up(db: Database) -> None:
    """Settle ready checkpoints by what became of their outbox entry: uploaded (online, W&B has the bytes and
    the pin can go; offline, `wandb sync` still reads the pinned file, so it stays until `clean-store`), or
    not buildable (the file moved under us while it was hashed: look at it again from the start)."""
    with db.transaction() as session:
        ready = {row.id: row for row in session.scalars(select(Checkpoint).where(Checkpoint.node == node_of(session), Checkpoint.state == CheckpointState.READY))}
        for checkpoint_id, outcome in outbox.outcomes(session, ArtifactKind.MODEL, list(ready)).items():
            row = ready[checkpoint_id]
            if outcome.uploaded:
                row.state, row.reason = CheckpointState.UPLOADED, None
                if outcome.segment_mode == "online":
                    _unpin(row)
            elif outcome.error is not None:
                outbox.withdraw(session, outcome.run_id, outcome.key)
                _look_again(row, outcome.error)


def _key(row: Checkpoint) -> str:
    return f"model:{row.id}"


_WAIT = object()


def run_of(session: Session, row: Checkpoint) -> Run | None:
    """The training lineage that reached this checkpoint's epoch/iteration (the newest one when unsure)."""
    runs = session.scalars(
        select(Run).where(Run.work_dir_id == row.work_dir_id, Run.job_type == "train").order_by(Run.launch.desc())
    ).all()
    if row.number is not None:
        for run in runs:
            if outbox.reached(session, run.id, unit(row), row.number):
                return run
    return runs[0] if runs else None


def _evaluation(session: Session, run: Run, row: Checkpoint) -> Any:
    """The val row of the checkpoint's own epoch/iteration, None when none belongs to it, or _WAIT."""
    if row.number is None:
        return None
    found = outbox.val_values_at(session, run.id, unit(row), row.number)
    if found is not None:
        return found
    interval = _eval_interval(run.config_text, run.config_name or "config.py") if run.config_text else None
    if interval is None or row.number % interval != 0:
        return None
    if _lineage_over(session, run):
        return None
    return _WAIT


@functools.lru_cache(maxsize=64)
def _eval_interval(config_text: str, name: str) -> int | None:
    """Evaluated once per config: waiting checkpoints ask on every pass of the loop."""
    config = config_settings.load_text(config_text, name)
    return config.eval_interval if config is not None else None


def _lineage_over(session: Session, run: Run) -> bool:
    sources = session.scalars(select(Source.state).where(Source.run_id == run.id)).all()
    return bool(sources) and all(s in (SourceState.FINISHED, SourceState.GONE) for s in sources)


def unit(row: Checkpoint) -> str:
    """What the checkpoint's number counts: `epoch_N`/`best_*_epoch_N` epochs, else iterations."""
    return "iter" if row.kind.endswith("iter") else "epoch"


def _aliases(row: Checkpoint) -> list[str]:
    if row.kind.startswith("best"):
        return ["best"]
    if row.number is None:
        return [Path(row.name).stem, "latest"]
    return [f"{row.kind}_{row.number}", "latest"]


def _metadata(row: Checkpoint, evaluation: dict[str, Any] | None, with_metrics: bool) -> dict[str, Any]:
    metadata: dict[str, Any] = {}
    if row.number is not None:
        metadata[unit(row)] = row.number
    if with_metrics:
        if evaluation is None:
            metadata["eval"] = None
        else:
            metadata.update({k[len("val/"):]: v for k, v in evaluation.items() if k.startswith("val/")})
    metadata["checkpoint"] = {"file": row.name, **json.loads(row.meta_json or "{}"), "size": row.size, "sha256": row.sha256}
    return metadata


def evaluated(row: Checkpoint, run_options: hook_options.HookOptions) -> bool:
    """Tables are on, and the checkpoint is a regular epoch/iter one (mmdet 2.x or 3.x): best_* repeats one of them."""
    evaluable = row.kind in ("epoch", "iter") and row.number is not None
    return run_options.num_eval_images > 0 and evaluable


def wanted(row: Checkpoint, run_options: hook_options.HookOptions) -> bool:
    """Logged as a model artifact, or evaluated for the tables."""
    return run_options.log_checkpoint or evaluated(row, run_options)


def finish_without_upload(row: Checkpoint) -> None:
    """log_checkpoint is off: the checkpoint is not needed, or only by its eval job, which pinned it on its own."""
    row.state = CheckpointState.DONE
    row.reason = None
    _unpin(row)


def unsettled_work_dirs(db: Database) -> set[Path]:
    """This node's work_dirs with a checkpoint that is not settled yet (its looks must go on)."""
    with db.read() as session:
        paths = session.scalars(select(Checkpoint.path).where(Checkpoint.node == node_of(session), Checkpoint.state.in_(OPEN_STATES)))
        return {Path(p).parent for p in paths}


def undecided(db: Database) -> int:
    with db.transaction() as session:
        return session.scalar(select(func.count()).where(Checkpoint.state == CheckpointState.SEEN)) or 0


def clean_store(db: Database) -> tuple[int, int]:
    """Drop the pins of uploaded checkpoints whose offline segment a W&B server confirmed (`mmdet-wandb sync`,
    in our state; wandb's `.synced` markers say nothing). Returns (removed, kept)."""
    removed = kept = 0
    with db.transaction() as session:
        rows = session.scalars(
            select(Checkpoint).where(Checkpoint.node == node_of(session), Checkpoint.state == CheckpointState.UPLOADED, Checkpoint.pin_path.is_not(None))
        ).all()
        uploads = outbox.outcomes(session, ArtifactKind.MODEL, [row.id for row in rows])
        synced_dirs = segments.synced_dirs(session)
        for row in rows:
            directory = uploads[row.id].segment_dir if row.id in uploads else None
            if directory in synced_dirs:
                _unpin(row)
                removed += 1
            else:
                kept += 1
    return removed, kept

"""Read W&B offline ``.wandb`` transaction logs without wandb's private APIs.

wandb 0.31.0 writes these files from its Go backend (``wandb-core``) and no longer
ships a Python reader, yet the sidecar must check what an offline run recorded
before it trusts ``wandb sync``. This module depends only on the protobuf classes
shipped in the wandb wheel (``wandb.proto.wandb_internal_pb2``).

File layout (wandb-core ``transactionlog``): a 7-byte header (``:W&B``, uint16-LE
``0xBEE1``, version byte ``0``), then the LevelDB log format: 32 KiB blocks aligned
to file offset 0, each holding chunks of ``crc32 (LE) | length (uint16 LE) |
type (1 byte) | payload``. The CRC is IEEE crc32 over the type byte and payload.
A record is one FULL chunk or a FIRST, MIDDLE..., LAST sequence, and its bytes are
a serialized ``wandb_internal.Record``.
"""

from __future__ import annotations

import gzip
import json
import os
import struct
import time
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError
from wandb.proto import wandb_internal_pb2 as pb

__all__ = [
    "OfflineArtifact",
    "OfflineRun",
    "WandbFileError",
    "find_run_files",
    "has_exit_record",
    "scan_segment",
    "iter_records",
    "read_run",
    "wait_for_exit",
]

_FILE_HEADER = b":W&B" + struct.pack("<H", 0xBEE1)
_SUPPORTED_VERSION = 0
_FILE_HEADER_SIZE = len(_FILE_HEADER) + 1
_BLOCK_SIZE = 32 * 1024
_CHUNK_HEADER = struct.Struct("<IHB")
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4

StrPath = str | os.PathLike[str]


class WandbFileError(ValueError):
    """A ``.wandb`` file is not one, or is corrupt where it is already complete.

    ``path`` and ``offset`` (the byte offset of the bad header, chunk or record)
    are kept as attributes so a caller can report or quarantine the file.
    """

    def __init__(self, path: StrPath, offset: int, reason: str) -> None:
        self.path = Path(path)
        self.offset = offset
        super().__init__(f"{self.path}: {reason} at byte offset {offset}")


def _check_file_header(path: StrPath, head: bytes) -> None:
    """Reject non-.wandb files; a header prefix is accepted as a file still being created."""
    magic = head[: len(_FILE_HEADER)]
    if magic != _FILE_HEADER[: len(magic)]:
        raise WandbFileError(path, 0, "not a .wandb file (bad header)")
    if len(head) >= _FILE_HEADER_SIZE and head[len(_FILE_HEADER)] != _SUPPORTED_VERSION:
        raise WandbFileError(
            path,
            len(_FILE_HEADER),
            f"unsupported .wandb version {head[len(_FILE_HEADER)]}",
        )


def _iter_record_bytes(path: StrPath) -> Iterator[tuple[int, bytes]]:
    """Yield ``(offset, serialized record)`` pairs, block by block.

    A chunk that runs past the end of the file, or a record whose LAST chunk is
    missing, is the tail a writer has not flushed yet (or lost in a crash), so
    reading stops there without an error.
    """
    with open(path, "rb") as f:
        block = f.read(_BLOCK_SIZE)
        _check_file_header(path, block)
        block_start, pos = 0, _FILE_HEADER_SIZE
        parts: list[bytes] | None = None  # chunks of a record begun by FIRST
        record_start = 0
        while True:
            while pos + _CHUNK_HEADER.size <= len(block):
                crc, length, kind = _CHUNK_HEADER.unpack_from(block, pos)
                if crc == 0 and length == 0 and kind == 0:
                    break  # zero padding fills the rest of this block
                offset = block_start + pos
                end = pos + _CHUNK_HEADER.size + length
                if end > len(block):
                    if len(block) < _BLOCK_SIZE:
                        return  # payload not written yet
                    raise WandbFileError(path, offset, "chunk crosses a block boundary")
                payload = block[pos + _CHUNK_HEADER.size : end]
                if zlib.crc32(payload, zlib.crc32(bytes((kind,)))) != crc:
                    raise WandbFileError(path, offset, "CRC mismatch in chunk")
                pos = end
                if kind in (_FULL, _FIRST):
                    if parts is not None:
                        raise WandbFileError(path, offset, "new record before the previous one ended")
                    if kind == _FULL:
                        yield offset, payload
                    else:
                        parts, record_start = [payload], offset
                elif kind in (_MIDDLE, _LAST):
                    if parts is None:
                        raise WandbFileError(path, offset, "continuation chunk without a FIRST chunk")
                    parts.append(payload)
                    if kind == _LAST:
                        yield record_start, b"".join(parts)
                        parts = None
                else:
                    raise WandbFileError(path, offset, f"unknown chunk type {kind}")
            if len(block) < _BLOCK_SIZE:
                return  # end of file
            block_start += _BLOCK_SIZE
            block, pos = f.read(_BLOCK_SIZE), 0


def iter_records(path: StrPath) -> Iterator[pb.Record]:
    """Yield every complete record of a ``.wandb`` file in write order.

    Stops silently at an incomplete tail, because wandb-core appends in batches and
    a live or crashed run leaves a partial last record. Raises ``WandbFileError``
    for a bad file header, or for a CRC mismatch or undecodable record in a part of
    the file that is complete, since that is real corruption.
    """
    for offset, raw in _iter_record_bytes(path):
        try:
            record = pb.Record.FromString(raw)
        except DecodeError as exc:
            raise WandbFileError(path, offset, f"undecodable record ({exc})") from exc
        yield record


@dataclass
class OfflineArtifact:
    """An artifact as ``log_artifact`` recorded it offline (no version: the server assigns it).

    ``entries`` are dicts ``{path, digest, size, ref, local_path}``; ``size`` is 0
    when unknown (references), ``ref`` and ``local_path`` are ``None`` when unset.
    ``aliases`` is a set because wandb does not keep their order (it also adds
    ``"latest"``).
    """

    name: str
    type: str
    aliases: set[str]
    metadata: dict[str, Any]
    digest: str
    client_id: str
    entries: list[dict[str, Any]]
    sequence_client_id: str = ""  # what `<id>:latest` references of the artifact's collection name


@dataclass
class OfflineRun:
    """The state an offline run segment recorded, folded from its records.

    - ``history``: one dict per committed row, in file order, ``_step`` included.
      Nested keys become nested dicts (``{"a": {"b": 1}}`` logs as
      ``nested_key=["a", "b"]``); a dotted key such as ``"train/decode.loss_ce"``
      stays one key. NaN and infinities decode to ``float`` nan/inf.
    - ``summary``: every summary update and removal applied in order, as wandb
      recorded them. It keeps wandb's bookkeeping keys (``_step``, ``_runtime``,
      ``_timestamp``, ``_wandb``), and a metric defined with ``summary="max"`` holds
      a dict such as ``{"max": 0.3}`` instead of its last value.
    - ``config``: the user-facing config. wandb 0.31.0 writes each top-level key
      with its bare value (``key="lr" value_json="0.1"``, a dict value as one JSON
      object), with no ``{"value": ...}`` wrappers, so values are returned
      unchanged: a user value that looks like ``{"value": 1, "desc": "d"}`` is the
      user's own. wandb's ``_wandb`` key goes to ``wandb_internal_config``; it is
      ``{}`` in the first ``run`` record and later holds ``cli_version``,
      ``python_version``, telemetry ``t`` and metrics ``m``.
    - Run metadata (``project``, ``tags``, ...) comes from the last ``run`` record:
      wandb-core writes a full, current snapshot (config included) again whenever
      the name, tags or notes change. Empty strings become ``None``.
    - ``exit_code`` is ``None`` and ``has_exit`` ``False`` while the segment has no
      ``exit`` record (still running, or crashed: ``wandb sync`` then invents 1).
    """

    run_id: str | None = None
    project: str | None = None
    entity: str | None = None
    display_name: str | None = None
    group: str | None = None
    job_type: str | None = None
    notes: str | None = None
    tags: list[str] = field(default_factory=list)
    resume: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    wandb_internal_config: dict[str, Any] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    artifacts: list[OfflineArtifact] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    exit_code: int | None = None
    has_exit: bool = False


def _key_path(item: pb.HistoryItem | pb.SummaryItem | pb.ConfigItem) -> list[str]:
    nested = item.nested_key
    return list(nested) if nested else [item.key]


def _set_path(tree: dict[str, Any], keys: list[str], value: Any) -> None:
    """Set ``tree[k0][k1]...`` like wandb's path tree: a leaf in the way becomes a dict."""
    *parents, leaf = keys
    for key in parents:
        child = tree.get(key)
        if not isinstance(child, dict):
            child = tree[key] = {}
        tree = child
    tree[leaf] = value


def _remove_path(tree: dict[str, Any], keys: list[str]) -> None:
    *parents, leaf = keys
    for key in parents:
        child = tree.get(key)
        if not isinstance(child, dict):
            return
        tree = child
    tree.pop(leaf, None)


def _apply_items(
    tree: dict[str, Any],
    updates: Iterable[pb.HistoryItem | pb.SummaryItem | pb.ConfigItem],
    removals: Iterable[pb.SummaryItem | pb.ConfigItem] = (),
) -> None:
    items = list(updates)
    # One json.loads per record rather than per item (the main cost on big runs);
    # json, not orjson, because wandb writes NaN/Infinity, which only json accepts.
    values = json.loads("[" + ",".join(item.value_json for item in items) + "]")
    for item, value in zip(items, values, strict=True):
        _set_path(tree, _key_path(item), value)
    for item in removals:
        _remove_path(tree, _key_path(item))


def _metric_dict(metric: pb.MetricRecord) -> dict[str, Any]:
    summary = metric.summary
    return {
        "name": metric.name or None,
        "glob_name": metric.glob_name or None,
        "step_metric": metric.step_metric or None,
        "summary": sorted(f.name for f in summary.DESCRIPTOR.fields if getattr(summary, f.name)),
        "step_sync": metric.options.step_sync,
        "hidden": metric.options.hidden,
    }


def _manifest_entries(manifest: pb.ArtifactManifest) -> list[dict[str, Any]]:
    """Entries from the record, or from the gzipped JSON-lines file that wandb uses above 100k entries.

    That file lives in ``$WANDB_DATA_DIR/artifacts/staging``; ``FileNotFoundError``
    propagates if it has been removed, rather than reporting an empty artifact.
    """
    if manifest.manifest_file_path:
        with gzip.open(manifest.manifest_file_path, "rt", encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        return [
            {
                "path": row["path"],
                "digest": row["digest"],
                "size": row.get("size") or 0,
                "ref": row.get("ref"),
                "local_path": row.get("local_path"),
            }
            for row in rows
        ]
    return [
        {
            "path": entry.path,
            "digest": entry.digest,
            "size": entry.size,
            "ref": entry.ref or None,
            "local_path": entry.local_path or None,
        }
        for entry in manifest.contents
    ]


def _artifact(record: pb.ArtifactRecord) -> OfflineArtifact:
    return OfflineArtifact(
        name=record.name,
        type=record.type,
        aliases=set(record.aliases),
        metadata=json.loads(record.metadata) if record.metadata else {},
        digest=record.digest,
        client_id=record.client_id,
        entries=_manifest_entries(record.manifest),
        sequence_client_id=record.sequence_client_id,
    )


def _apply_run_record(run: OfflineRun, record: pb.RunRecord) -> None:
    run.run_id = record.run_id or None
    run.project = record.project or None
    run.entity = record.entity or None
    run.display_name = record.display_name or None
    run.group = record.run_group or None
    run.job_type = record.job_type or None
    run.notes = record.notes or None
    run.tags = list(record.tags)
    run.resume = record.resume
    _apply_items(run.config, record.config.update, record.config.remove)


def read_run(path: StrPath) -> OfflineRun:
    """Fold all complete records of a ``.wandb`` file into an ``OfflineRun`` (see its docstring)."""
    run = OfflineRun()
    for record in iter_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            _apply_run_record(run, record.run)
        elif kind == "history":
            row: dict[str, Any] = {}
            _apply_items(row, record.history.item)
            run.history.append(row)
        elif kind == "summary":
            _apply_items(run.summary, record.summary.update, record.summary.remove)
        elif kind == "config":
            _apply_items(run.config, record.config.update, record.config.remove)
        elif kind == "metric":
            run.metrics.append(_metric_dict(record.metric))
        elif kind == "artifact":
            run.artifacts.append(_artifact(record.artifact))
        elif kind == "files":
            for item in record.files.files:
                if item.path not in run.files:
                    run.files.append(item.path)
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
            run.has_exit = True
    run.wandb_internal_config = run.config.pop("_wandb", {})
    return run


def has_exit_record(path: StrPath) -> bool:
    """Whether wandb-core has written the run's ``exit`` record, i.e. the file is complete.

    Scans the whole file, because nothing in the format promises that ``exit`` is
    the last record; that costs about 30 ms per MiB, far less than ``read_run``,
    which also decodes every JSON value.
    """
    return any(record.HasField("exit") for record in iter_records(path))


@dataclass
class SegmentScan:
    steps: list[int]
    artifacts: list[OfflineArtifact]
    has_exit: bool


def scan_segment(path: StrPath) -> SegmentScan:
    """The `_step` of every history row, the artifacts and whether the exit record is there: the writer's
    check of a closed segment, which skips decoding the logged values (several times faster than ``read_run``)."""
    scan = SegmentScan(steps=[], artifacts=[], has_exit=False)
    for record in iter_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            scan.steps.append(record.history.step.num)
        elif kind == "artifact":
            scan.artifacts.append(_artifact(record.artifact))
        elif kind == "exit":
            scan.has_exit = True
    return scan


def wait_for_exit(path: StrPath, timeout: float, poll_interval: float = 0.25) -> None:
    """Block until the ``exit`` record is on disk.

    ``run.finish()`` returns before wandb-core has flushed the file, so a reader
    that starts right away sees a partial run. Raises ``TimeoutError`` naming the
    file when ``timeout`` seconds pass first.
    """
    deadline = time.monotonic() + timeout
    while not has_exit_record(path):
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{path}: no exit record after {timeout} s")
        time.sleep(poll_interval)


def find_run_files(directory: StrPath) -> list[Path]:
    """Every ``run-*.wandb`` transaction log below ``directory``, sorted by path.

    Symlinked directories (wandb's ``latest-run``) are not followed, so each run
    file is listed once.
    """
    if not Path(directory).is_dir():
        raise NotADirectoryError(f"{directory}: not a directory")
    found = [
        Path(root, name)
        for root, _dirs, names in os.walk(directory)
        for name in names
        if name.startswith("run-") and name.endswith(".wandb")
    ]
    return sorted(found)

"""The state schema: every table of the service in one module (migrations live in db/migrations).

Uniqueness is in the schema, so that re-scanning, re-reading a replaced file or re-running a backfill is a
no-op rather than a duplicate.
"""
from __future__ import annotations

import datetime as dt
import enum

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    false,
    true,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class Base(DeclarativeBase):
    pass


class SourceState(str, enum.Enum):
    ACTIVE = "active"  # may still grow
    FINISHED = "finished"  # a newer launch exists or the run ended: a trailing fragment has been taken
    GONE = "gone"  # deleted from disk; kept as a tombstone
    ERROR = "error"  # cannot be read now (permissions, I/O); retried on every scan


class SegmentState(str, enum.Enum):
    OPEN = "open"  # a wandb run object is (or was, before a crash) writing into it
    SENT = "sent"  # online: finished, waiting for W&B to confirm what it has (the run's next start says)
    CLOSED = "closed"  # finished, read back and verified; its rows are uploaded
    DISCARDED = "discarded"  # never verified (crash, failed read-back): deleted and rebuilt from the DB


class SyncState(str, enum.Enum):
    """An offline segment on its way to a W&B server (`mmdet-wandb sync`); NULL: not sent yet."""

    SENDING = "sending"  # replay began: rows at or above the server's starting step were (maybe) sent
    SYNCED = "synced"  # the server's starting step is past its last step (and its artifacts were committed)


class CheckpointState(str, enum.Enum):
    SEEN = "seen"  # found and pinned; not yet known to be complete
    READY = "ready"  # complete and still: waiting for its evaluation line or for the writer
    UPLOADED = "uploaded"  # its model artifact is in W&B (offline: in a verified segment)
    INCOMPLETE = "incomplete"  # stayed still but never became a valid checkpoint; checked again only if it changes
    MISSED = "missed"  # gone before it could be pinned, or could not be pinned (see reason)
    DONE = "done"  # complete, not logged (log_checkpoint off); its eval job holds a pin of its own


class JobState(str, enum.Enum):
    QUEUED = "queued"  # waiting for a worker (again after a retryable failure, from run_after on)
    RUNNING = "running"  # claimed: lease_owner works on it until lease_expires_at, renewing
    DONE = "done"  # predictions and subset metrics stored
    DEAD = "dead"  # parked with its error: a permanent failure, or max_attempts used up; never deleted


class RunState(str, enum.Enum):
    ACTIVE = "active"
    FINISHED = "finished"


def _enum(cls: type[enum.Enum]) -> Enum:
    return Enum(cls, native_enum=False, length=16, values_callable=lambda e: [m.value for m in e])


class WorkDir(Base):
    __tablename__ = "work_dirs"
    __table_args__ = (UniqueConstraint("node", "path", name="uq_work_dir_node_path"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    node: Mapped[str] = mapped_column(String(255), default="")  # the uploader that owns it (DESIGN 11)
    path: Mapped[str] = mapped_column(String(4096))
    root: Mapped[str] = mapped_column(String(4096))
    name: Mapped[str] = mapped_column(String(512))
    discovered_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    gone: Mapped[bool] = mapped_column(Boolean, default=False)

    sources: Mapped[list[Source]] = relationship(back_populates="work_dir")
    runs: Mapped[list[Run]] = relationship(back_populates="work_dir")


class Run(Base):
    """One W&B run = one training lineage (a launch and the launches that resumed it)."""

    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(primary_key=True)
    node: Mapped[str] = mapped_column(String(255), default="")  # the uploader that owns it (DESIGN 11)
    work_dir_id: Mapped[int] = mapped_column(ForeignKey("work_dirs.id"))
    wandb_id: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(512))
    group: Mapped[str] = mapped_column(String(512))
    job_type: Mapped[str] = mapped_column(String(32), default="train")
    launch: Mapped[str] = mapped_column(String(256))  # the launch (log timestamp) that started the lineage
    by_epoch: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    last_timestamp: Mapped[float | None] = mapped_column(Float, nullable=True)  # of its last row: times never go back
    next_step: Mapped[int] = mapped_column(BigInteger, default=1)
    first_iter: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    last_iter: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    summary_json: Mapped[str] = mapped_column(Text, default="{}")
    config_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    config_name: Mapped[str | None] = mapped_column(String(512), nullable=True)
    config_text: Mapped[str | None] = mapped_column(Text, nullable=True)
    hook_options_json: Mapped[str] = mapped_column(Text, default="{}")  # the config's MMDetWandbHook entry
    state: Mapped[RunState] = mapped_column(_enum(RunState), default=RunState.ACTIVE)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    failures: Mapped[int] = mapped_column(Integer, default=0)  # upload failures in a row (reset by a closed segment)
    retry_at: Mapped[float | None] = mapped_column(Float, nullable=True)  # epoch seconds: no upload try before

    work_dir: Mapped[WorkDir] = relationship(back_populates="runs")
    segments: Mapped[list[Segment]] = relationship(back_populates="run", order_by="Segment.seq")


class Source(Base):
    """A tailed log file: its identity, committed offset and parser state (see uploader/tail.py)."""

    __tablename__ = "sources"
    __table_args__ = (UniqueConstraint("node", "path", name="uq_source_node_path"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    node: Mapped[str] = mapped_column(String(255), default="")  # the uploader that owns it (DESIGN 11)
    work_dir_id: Mapped[int] = mapped_column(ForeignKey("work_dirs.id"))
    path: Mapped[str] = mapped_column(String(4096))
    format: Mapped[str] = mapped_column(String(32))
    launch: Mapped[str] = mapped_column(String(256))
    dev: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    ino: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    generation: Mapped[int] = mapped_column(Integer, default=0)
    head_len: Mapped[int] = mapped_column(Integer, default=0)
    head_hash: Mapped[str] = mapped_column(String(64), default="")
    offset: Mapped[int] = mapped_column(BigInteger, default=0)
    tail_hash: Mapped[str] = mapped_column(String(64), default="")
    size_seen: Mapped[int] = mapped_column(BigInteger, default=0)
    mtime_ns: Mapped[int] = mapped_column(BigInteger, default=0)
    parse_state_json: Mapped[str] = mapped_column(Text, default="{}")
    state: Mapped[SourceState] = mapped_column(_enum(SourceState), default=SourceState.ACTIVE)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id"), nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)

    work_dir: Mapped[WorkDir] = relationship(back_populates="sources")


class OutboxRow(Base):
    """A parsed data line waiting for (or done with) its W&B upload; `step` is the `_step` we own."""

    __tablename__ = "outbox_rows"
    __table_args__ = (
        UniqueConstraint("source_id", "byte_offset", "line_hash", name="uq_outbox_line"),
        UniqueConstraint("run_id", "step", name="uq_outbox_run_step"),
        Index("ix_outbox_pending", "run_id", "uploaded", "step"),
        Index("ix_outbox_axes", "run_id", "kind", "epoch", "iter"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"))
    step: Mapped[int] = mapped_column(BigInteger)
    source_id: Mapped[int] = mapped_column(ForeignKey("sources.id"))
    generation: Mapped[int] = mapped_column(Integer)
    byte_offset: Mapped[int] = mapped_column(BigInteger)
    line_hash: Mapped[str] = mapped_column(String(32))
    kind: Mapped[str] = mapped_column(String(8))
    epoch: Mapped[int | None] = mapped_column(Integer, nullable=True)  # the row's axes, for checkpoint lookups
    iter: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    payload_json: Mapped[str] = mapped_column(Text)
    segment_id: Mapped[int | None] = mapped_column(ForeignKey("segments.id"), nullable=True)
    uploaded: Mapped[bool] = mapped_column(Boolean, default=False)
    appended_at: Mapped[float | None] = mapped_column(Float, nullable=True)  # epoch s: its log's mtime when read (lag)


class UploadedSpan(Base):
    """Rows of one log that are uploaded and verified, folded into one record: their payloads are gone (W&B has
    them); what dedup, resume, checkpoint lookups and `status` still need stays (DESIGN 4: state that does not
    grow with content). `lines` packs each line as (offset delta: varint, first 8 bytes of its hash): see
    db/spans.py."""

    __tablename__ = "uploaded_spans"
    __table_args__ = (Index("ix_uploaded_spans_source", "source_id", "first_offset"), Index("ix_uploaded_spans_run", "run_id"))

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"))
    source_id: Mapped[int] = mapped_column(ForeignKey("sources.id"))
    generation: Mapped[int] = mapped_column(Integer)
    first_offset: Mapped[int] = mapped_column(BigInteger)
    last_offset: Mapped[int] = mapped_column(BigInteger)
    first_step: Mapped[int] = mapped_column(BigInteger)
    last_step: Mapped[int] = mapped_column(BigInteger)
    rows: Mapped[int] = mapped_column(Integer)
    min_epoch: Mapped[int | None] = mapped_column(Integer, nullable=True)  # the rows' axes, for checkpoint lookups
    max_epoch: Mapped[int | None] = mapped_column(Integer, nullable=True)
    min_iter: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    max_iter: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    lines: Mapped[bytes] = mapped_column(LargeBinary)


class Segment(Base):
    """One offline `.wandb` file (or one online session) of a run; steps only ever grow across segments."""

    __tablename__ = "segments"
    __table_args__ = (UniqueConstraint("run_id", "seq", name="uq_segment_seq"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    node: Mapped[str] = mapped_column(String(255), default="")  # the uploader that owns it (DESIGN 11)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"))
    seq: Mapped[int] = mapped_column(Integer)
    dir: Mapped[str] = mapped_column(String(4096))
    mode: Mapped[str] = mapped_column(String(16))
    first_step: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    last_step: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    rows: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[SegmentState] = mapped_column(_enum(SegmentState), default=SegmentState.OPEN)
    opened_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    closed_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    sync_state: Mapped[SyncState | None] = mapped_column(_enum(SyncState), nullable=True)  # offline closed only
    synced_step: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # the server's starting step - 1
    sync_attempts: Mapped[int] = mapped_column(Integer, default=0)
    sync_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    sync_retry_at: Mapped[float | None] = mapped_column(Float, nullable=True)  # epoch s (the DB's clock)

    run: Mapped[Run] = relationship(back_populates="segments")


class Problem(Base):
    """Bad input seen (a corrupt line, an unreadable file, a symlink out of the root): where and why."""

    __tablename__ = "problems"
    __table_args__ = (UniqueConstraint("node", "path", "byte_offset", "kind", name="uq_problem"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    node: Mapped[str] = mapped_column(String(255), default="")  # the uploader that owns it (DESIGN 11)
    work_dir_id: Mapped[int | None] = mapped_column(ForeignKey("work_dirs.id"), nullable=True)
    path: Mapped[str] = mapped_column(String(4096))
    byte_offset: Mapped[int] = mapped_column(BigInteger, default=-1)  # -1: the file as a whole
    kind: Mapped[str] = mapped_column(String(32))
    message: Mapped[str] = mapped_column(Text)
    count: Mapped[int] = mapped_column(Integer, default=1)
    first_seen: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_seen: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    resolved_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)  # cause gone


class Checkpoint(Base):
    """One content of one checkpoint file: found, pinned into the store, checked, then logged as a model artifact.

    A file rewritten after its upload gets a new row; the row before it keeps its state.
    """

    __tablename__ = "checkpoints"
    __table_args__ = (Index("ix_checkpoints_path", "path"), Index("ix_checkpoints_state", "state"))

    id: Mapped[int] = mapped_column(primary_key=True)
    node: Mapped[str] = mapped_column(String(255), default="")  # the uploader that owns it (DESIGN 11)
    work_dir_id: Mapped[int] = mapped_column(ForeignKey("work_dirs.id"))
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id"), nullable=True)
    path: Mapped[str] = mapped_column(String(4096))
    name: Mapped[str] = mapped_column(String(512))
    kind: Mapped[str] = mapped_column(String(16))  # epoch | iter | best_epoch | best_iter | other
    number: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # N of epoch_N / iter_N
    ino: Mapped[int] = mapped_column(BigInteger)
    size: Mapped[int] = mapped_column(BigInteger)
    mtime_ns: Mapped[int] = mapped_column(BigInteger)
    still_since: Mapped[float] = mapped_column()  # epoch seconds since (ino, size, mtime) last changed
    pin_path: Mapped[str | None] = mapped_column(String(4096), nullable=True)
    pin_by_copy: Mapped[bool] = mapped_column(Boolean, default=False)  # no hard link possible (other fs, read-only)
    state: Mapped[CheckpointState] = mapped_column(_enum(CheckpointState), default=CheckpointState.SEEN)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    meta_json: Mapped[str | None] = mapped_column(Text, nullable=True)  # summary of the checkpoint's own meta
    md5_b64: Mapped[str | None] = mapped_column(String(32), nullable=True)  # of the pinned file, hashed once
    sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    first_seen: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class EvalJob(Base):
    """Evaluate one checkpoint on the val subset (DESIGN 8: leased, not locked; all its SQL is in db/jobs.py).

    Everything a worker needs is in the row: a worker on another node reads no uploader state.
    """

    __tablename__ = "eval_jobs"
    __table_args__ = (Index("ix_eval_jobs_claim", "state", "run_after"),)  # stack: few values, filtered after

    id: Mapped[int] = mapped_column(primary_key=True)
    checkpoint_id: Mapped[int] = mapped_column(ForeignKey("checkpoints.id"), unique=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"))
    checkpoint_path: Mapped[str] = mapped_column(String(4096))  # the job's own pin in the store
    pinned: Mapped[bool] = mapped_column(Boolean, default=True)  # False once the pin is released (done, or dropped)
    work_dir: Mapped[str] = mapped_column(String(4096))
    unit: Mapped[str] = mapped_column(String(8))  # epoch | iter
    number: Mapped[int] = mapped_column(BigInteger)
    stack: Mapped[str] = mapped_column(String(16), default="mmdet2")  # common/stacks.py: which workers may claim it
    config_name: Mapped[str | None] = mapped_column(String(512), nullable=True)
    config_text: Mapped[str | None] = mapped_column(Text, nullable=True)  # the work_dir's config dump, a fallback
    num_eval_images: Mapped[int] = mapped_column(Integer)
    bbox_score_thr: Mapped[float] = mapped_column(Float)
    eval_classwise: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())  # per-class metrics and PR curves
    confusion_score_thr: Mapped[float] = mapped_column(Float, default=0.3, server_default="0.3")  # the analysis tool's defaults
    confusion_iou_thr: Mapped[float] = mapped_column(Float, default=0.5, server_default="0.5")
    eval_full_val: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())  # metrics over all of val
    state: Mapped[JobState] = mapped_column(_enum(JobState), default=JobState.QUEUED)
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # counted at claim time
    max_attempts: Mapped[int] = mapped_column(Integer, default=5)
    run_after: Mapped[float] = mapped_column(Float, default=0.0)  # epoch seconds (backoff)
    lease_owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    leases_lost: Mapped[int] = mapped_column(Integer, default=0)  # leases that ran out: taken over, or parked
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    note: Mapped[str | None] = mapped_column(Text, nullable=True)  # e.g. the subset was clamped to the val set
    manifest_id: Mapped[int | None] = mapped_column(ForeignKey("val_manifests.id"), nullable=True)
    metrics_json: Mapped[str | None] = mapped_column(Text, nullable=True)  # the subset's own metrics
    insight_json: Mapped[str | None] = mapped_column(Text, nullable=True)  # evaluator/insight.py's document
    device: Mapped[str | None] = mapped_column(String(64), nullable=True)
    seconds: Mapped[float | None] = mapped_column(Float, nullable=True)  # inference wall time of the last run
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class ValManifest(Base):
    """One distinct val subset content (classes, images, ground truth), stored once per digest."""

    __tablename__ = "val_manifests"

    id: Mapped[int] = mapped_column(primary_key=True)
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    classes_json: Mapped[str] = mapped_column(Text)
    num_images: Mapped[int] = mapped_column(Integer)
    source_json: Mapped[str] = mapped_column(Text)  # where it came from: ann_file, img_prefix, val set size
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ValImage(Base):
    """One image of a val subset: its bytes (as the val artifact shows it) and its ground truth."""

    __tablename__ = "val_images"
    __table_args__ = (UniqueConstraint("manifest_id", "position", name="uq_val_image"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    manifest_id: Mapped[int] = mapped_column(ForeignKey("val_manifests.id"))
    position: Mapped[int] = mapped_column(Integer)  # row in the table: order of the seed-42 permutation
    dataset_index: Mapped[int] = mapped_column(Integer)
    image_name: Mapped[str] = mapped_column(String(1024))
    file_ext: Mapped[str] = mapped_column(String(8))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    image_bytes: Mapped[bytes] = mapped_column(LargeBinary)
    ground_truth_json: Mapped[str] = mapped_column(Text)  # boxes, 0-based labels, masks as RLE


class Prediction(Base):
    """What one checkpoint predicted on one subset image (score > the job's bbox_score_thr)."""

    __tablename__ = "predictions"
    __table_args__ = (UniqueConstraint("job_id", "position", name="uq_prediction"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("eval_jobs.id"))
    position: Mapped[int] = mapped_column(Integer)
    result_json: Mapped[str] = mapped_column(Text)  # boxes, scores, 0-based labels, masks as RLE


class ArtifactKind(str, enum.Enum):
    MODEL = "model"  # a checkpoint as a version of run_<id>_model
    VAL = "val"  # the val subset of a manifest as the `val` dataset artifact (val_data table)
    PREDICTIONS = "pred"  # what one eval job predicted, as a version of run_<id>_pred (eval_data table)


class OutboxArtifact(Base):
    """An artifact waiting for (or done with) its W&B upload: the outbox entry of everything but metric rows.

    Its producer inserts it (the checkpoint follower, the eval-job follower); the writer logs it into the run's
    open segment, records what it logged (`logged_json`: type, digest, and what later entries reference), and
    marks it uploaded when that segment is verified and closed, exactly as it does for rows (DESIGN 4).
    """

    __tablename__ = "outbox_artifacts"
    __table_args__ = (
        Index("ix_outbox_artifacts_pending", "run_id", "uploaded", "id"),
        UniqueConstraint("run_id", "key", name="uq_outbox_artifact"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"))
    kind: Mapped[ArtifactKind] = mapped_column(_enum(ArtifactKind))
    key: Mapped[str] = mapped_column(String(64))  # what it is an upload of (model:<checkpoint>, val:<manifest>, pred:<job>)
    checkpoint_id: Mapped[int | None] = mapped_column(ForeignKey("checkpoints.id"), nullable=True)  # model
    eval_job_id: Mapped[int | None] = mapped_column(ForeignKey("eval_jobs.id"), nullable=True)  # pred
    manifest_id: Mapped[int | None] = mapped_column(ForeignKey("val_manifests.id"), nullable=True)  # val, pred
    file_path: Mapped[str | None] = mapped_column(String(4096), nullable=True)  # model: the pinned checkpoint
    file_name: Mapped[str | None] = mapped_column(String(512), nullable=True)  # model: its name in the artifact
    file_md5: Mapped[str | None] = mapped_column(String(32), nullable=True)  # model: base64 md5, hashed by its producer
    file_size: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # model: size and mtime of what was hashed,
    file_mtime_ns: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # checked again before it is logged
    aliases_json: Mapped[str] = mapped_column(Text, default="[]")
    metadata_json: Mapped[str] = mapped_column(Text, default="{}")
    logged_json: Mapped[str | None] = mapped_column(Text, nullable=True)  # set by the writer when it is logged
    error: Mapped[str | None] = mapped_column(Text, nullable=True)  # the writer could not build it (see producer)
    segment_id: Mapped[int | None] = mapped_column(ForeignKey("segments.id"), nullable=True)
    uploaded: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class WandbReachability(Base):
    """Online: whether this node's uploader reaches W&B. One row per node, written when the circuit opens or
    closes, so that `status` (another process) can say that every upload waits for W&B, and until when."""

    __tablename__ = "wandb_reachability"

    node: Mapped[str] = mapped_column(String(255), primary_key=True)
    base_url: Mapped[str] = mapped_column(String(2048))
    error: Mapped[str | None] = mapped_column(Text, nullable=True)  # None: reachable
    since: Mapped[float | None] = mapped_column(Float, nullable=True)  # when it became unreachable
    failures: Mapped[int] = mapped_column(Integer, default=0)  # failed probes in a row
    retry_at: Mapped[float | None] = mapped_column(Float, nullable=True)  # the next probe

"""Ingest: one log file → parsed rows in the outbox, committed together with the file offset (DESIGN 3–4).

Reading and parsing happen outside the transaction; the transaction only decides the lineage (which W&B run
a row belongs to), drops lines already stored (a replaced file re-read from 0), hands out the steps we own,
and moves the offset.
"""
from __future__ import annotations

import enum
import hashlib
import json
import math
import re
import secrets
import string
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import select
from sqlalchemy.orm import Session

from common import json_values
from common.display_names import display_name
from common.numbers import is_number
from common.records import LineageBreak, LogFormat, MetricRow, ParseState, RowKind
from db import outbox, spans
from db.models import Run, Source, SourceState, WorkDir
from db.problems import record_problem, record_read
from db.session import Database, node_of
from uploader import hook_options, row_times, tail
from uploader.discovery import FoundLog
from uploader.parsers import LineError, config_source, decode_line, env_info, log_header, parse_line
from uploader.parsers.common import note_iters_per_epoch
from uploader.parsers.config_settings import RunConfig
from uploader.text_log import iters_per_epoch


class FreshLaunch(str, enum.Enum):
    """What a fresh (not resumed) launch in a work_dir that already has a run becomes."""

    NEW_RUN = "new-run"
    SAME_RUN = "same-run"


FIRST_CHUNK_BYTES = 64 << 10


@dataclass(frozen=True)
class IngestOptions:
    fresh_launch: FreshLaunch = FreshLaunch.NEW_RUN
    layers: hook_options.Layers = hook_options.Layers()  # for the hook's `interval`, resolved per run
    finish_idle_s: float = 600.0  # a log untouched this long is finished: its last unterminated line is taken
    max_bytes: int = 8 << 20
    log_timezone: ZoneInfo | None = None  # the training hosts' zone, for the naive times in logs (None: ours)


class HeldRun(Exception):
    """The run of these lines has a bad value in its hook entry that no level above overrides: nothing of it is
    stored and the offset stays, so that it is read with the options the user means once that is fixed."""


@dataclass(frozen=True)
class _ParsedLine:
    offset: int
    line_hash: str
    records: list[Any]


def ingest(db: Database, found: FoundLog, root: Path, *, newer_launch: bool, options: IngestOptions) -> int:
    """Read everything new in one log; returns the number of rows added to the outbox. HeldRun (recorded as a
    problem first): the log's run has a bad hook value, and the log is read again once its config changes."""
    added, chunk = 0, 0
    while True:
        with db.read() as session:  # no write lock for what is there already (share processes write side by side)
            known = _known_source(session, found)
            where = _where(known) if known is not None else None
        if where is None:
            with db.transaction() as session:
                where = _where(_source_for(session, found, root))
        position, state, source_id = where
        finished = newer_launch or _idle_for(found.path) >= options.finish_idle_s
        try:
            read = tail.read_lines(found.path, position, finished=finished, max_bytes=_chunk_bytes(chunk, options.max_bytes))
        except FileNotFoundError:
            with db.transaction() as session:
                _gone(session, session.get_one(Source, source_id))
            return added
        except OSError as exc:
            _unreadable(db, source_id, f"cannot read: {exc.strerror or exc}")
            return added
        if read.reset_reason is not None:
            state = initial_state(found)
        _learn_iters_per_epoch(state, found)
        lineage = state.lineage_in_file
        parsed, problems = _parse(found.format, state, read)
        parsed = _stamp(parsed, state, found, options.log_timezone)
        try:
            with db.transaction() as session:
                added += _commit(session, found, source_id, read, state, lineage, parsed, problems, finished, options)
        except HeldRun as held:
            with db.transaction() as session:
                source = session.get_one(Source, source_id)
                record_problem(session, source.path, "hook_options", str(held), work_dir_id=source.work_dir_id)
            raise
        if read.at_eof:
            return added
        chunk += 1


def _chunk_bytes(chunk: int, max_bytes: int) -> int:
    """The first chunks of a big read are small, so that the writer can open the run and start uploading
    while the rest is read; then they double up to `max_bytes`."""
    return min(max_bytes, FIRST_CHUNK_BYTES << chunk)


def initial_state(found: FoundLog) -> ParseState:
    """What the work_dir tells about a log before its first line: iterations per epoch, runner, momentum."""
    state = ParseState()
    _learn_iters_per_epoch(state, found)
    if found.config is not None:
        config = config_source.load_file(found.config)
        if config is not None:
            state.by_epoch = config.by_epoch
            state.momentum = config.momentum
            state.log_interval = config.log_interval
    return state


def _learn_iters_per_epoch(state: ParseState, found: FoundLog) -> None:
    """Live, the text log gets its first `Epoch [1][i/L]` line only after the log.json was first read."""
    if found.text_log is None or state.by_epoch is False or state.iters_per_epoch_from in ("text_log", "header"):
        return
    note_iters_per_epoch(state, iters_per_epoch(found.text_log), "text_log")


def _idle_for(path: Path) -> float:
    try:
        return time.time() - path.stat(follow_symlinks=False).st_mtime
    except OSError:
        return 0.0


def _where(source: Source) -> tuple[tail.TailPosition | None, ParseState, int]:
    """Where reading the source goes on from: its position, its parser's state, its id."""
    return _position(source), ParseState.from_json(json.loads(source.parse_state_json)), source.id


def _known_source(session: Session, found: FoundLog) -> Source | None:
    return session.scalar(select(Source).where(Source.node == node_of(session), Source.path == str(found.path)))


def _source_for(session: Session, found: FoundLog, root: Path) -> Source:
    source = _known_source(session, found)
    if source is not None:
        return source
    work_dir = work_dir_row(session, found.work_dir, root)
    source = Source(
        node=node_of(session),
        work_dir_id=work_dir.id,
        path=str(found.path),
        format=found.format.value,
        launch=found.launch,
        parse_state_json=json.dumps(initial_state(found).to_json()),
    )
    session.add(source)
    session.flush()
    return source


def work_dir_row(session: Session, path: Path, root: Path) -> WorkDir:
    """The work_dir's row, created the first time a log or checkpoint of it is seen."""
    work_dir = session.scalar(select(WorkDir).where(WorkDir.node == node_of(session), WorkDir.path == str(path)))
    if work_dir is None:
        work_dir = WorkDir(node=node_of(session), path=str(path), root=str(root), name=path.name or str(path))
        session.add(work_dir)
        session.flush()
    return work_dir


def _position(source: Source) -> tail.TailPosition | None:
    if source.dev is None or source.ino is None:
        return None
    return tail.TailPosition(
        dev=source.dev, ino=source.ino, generation=source.generation, head_len=source.head_len,
        head_hash=source.head_hash, offset=source.offset, tail_hash=source.tail_hash,
    )


def _parse(fmt: LogFormat, state: ParseState, read: tail.TailRead) -> tuple[list[_ParsedLine], list[tuple[int, str, str]]]:
    parsed: list[_ParsedLine] = []
    problems: list[tuple[int, str, str]] = []
    for big in read.oversized:
        problems.append((big.offset, "oversized_line", f"line of {big.length} bytes is longer than the limit; skipped"))
    for line in read.lines:
        try:
            records = parse_line(fmt, state, decode_line(line.data))
        except LineError as exc:
            problems.append((line.offset, "bad_line", f"{exc}; skipped"))
            continue
        digest = hashlib.blake2b(line.data, digest_size=16).hexdigest()
        parsed.append(_ParsedLine(line.offset, digest, records))
    return parsed, problems


def _stamp(parsed: list[_ParsedLine], state: ParseState, found: FoundLog, zone: ZoneInfo | None) -> list[_ParsedLine]:
    """Every row with the time its line was written (uploader/row_times.py)."""
    rows = [r for line in parsed for r in line.records if isinstance(r, MetricRow)]
    stamped = iter(row_times.stamp(rows, state, found.text_log, found.launch, zone))
    return [replace(line, records=[next(stamped) if isinstance(r, MetricRow) else r for r in line.records]) for line in parsed]


def _commit(
    session: Session,
    found: FoundLog,
    source_id: int,
    read: tail.TailRead,
    state: ParseState,
    lineage: int,
    parsed: list[_ParsedLine],
    problems: list[tuple[int, str, str]],
    finished: bool,
    options: IngestOptions,
) -> int:
    source = session.get_one(Source, source_id)
    record_read(session, source.path, read.reset_message() if read.reset_reason else None, replaced=read.replaced, work_dir_id=source.work_dir_id)
    for offset, kind, message in problems:
        record_problem(session, source.path, kind, message, offset=offset, work_dir_id=source.work_dir_id)
    stored = _stored_lines(session, source_id, parsed)
    run = session.get(Run, source.run_id) if source.run_id is not None else None
    intervals: dict[int, int | None] = {}
    summary: dict[str, Any] | None = None
    new_rows: list[dict[str, Any]] = []
    added = 0
    for line in parsed:
        for record in line.records:
            if isinstance(record, LineageBreak):
                run = _flush_summary(run, summary)
                summary = None
                lineage = record.lineage
                run = _new_run(session, source, found, state, lineage)
            elif isinstance(record, MetricRow):
                if spans.line_key(line.offset, line.line_hash) in stored:
                    continue
                if run is None:
                    run = _choose_run(session, source, found, state, lineage, record, options)
                if summary is None:
                    summary = json.loads(run.summary_json)
                if run.id not in intervals:
                    run_options = hook_options.for_run(options.layers, run.hook_options_json, run.config_name)
                    if run_options.errors:
                        raise HeldRun(hook_options.held_message(run_options))
                    intervals[run.id] = run_options.interval
                if not on_interval(record, intervals[run.id], state):
                    continue
                _append(new_rows, run, source, read, line, record, summary)
                added += 1
    _flush_summary(run, summary)
    outbox.add_rows(session, new_rows)
    if run is not None:
        source.run_id = run.id
        run.by_epoch = state.by_epoch if state.by_epoch is not None else run.by_epoch
    _store_position(source, read, state)
    source.state = SourceState.FINISHED if finished and read.at_eof else SourceState.ACTIVE
    source.last_error = None
    return added


def on_interval(row: MetricRow, interval: int | None, state: ParseState) -> bool:
    """The hook's `interval`: a train row every k iterations (within the epoch for epoch-based runners, as
    mmcv's LoggerHook counts); val and test rows always."""
    if row.kind is not RowKind.TRAIN or not interval or row.iter is None:
        return True
    inner = row.iter
    if state.by_epoch is not False and state.iters_per_epoch and row.epoch:
        inner = row.iter - (row.epoch - 1) * state.iters_per_epoch
    return inner % interval == 0


def _stored_lines(session: Session, source_id: int, parsed: list[_ParsedLine]) -> set[tuple[int, str]]:
    """Lines of this batch that are already in the outbox (the file was replaced and is being re-read)."""
    if not parsed:
        return set()
    return outbox.stored_lines(session, source_id, parsed[0].offset, parsed[-1].offset)


def _append(
    new_rows: list[dict[str, Any]], run: Run, source: Source, read: tail.TailRead, line: _ParsedLine, row: MetricRow,
    summary: dict[str, Any],
) -> None:
    """Queue one outbox row (inserted in bulk by the caller) and give it the run's next step; its time never
    goes back along the run's steps (a resumed launch after a log without a text log, whose times are estimates)."""
    payload = row.wandb_payload()
    if row.timestamp is not None:
        payload["_timestamp"] = run.last_timestamp = max(row.timestamp, run.last_timestamp or row.timestamp)
    new_rows.append(
        dict(
            run_id=run.id, step=run.next_step, source_id=source.id, generation=read.position.generation,
            byte_offset=line.offset, line_hash=line.line_hash, kind=row.kind.value, epoch=row.epoch, iter=row.iter,
            payload_json=json_values.dumps(payload), uploaded=False, appended_at=read.mtime,
        )
    )
    run.next_step += 1
    summary.update({k: v for k, v in payload.items() if k != "_timestamp"})
    if row.kind is RowKind.VAL:
        update_best(summary, row)
    if row.iter is not None and row.kind is RowKind.TRAIN:
        run.last_iter = row.iter
        if run.first_iter is None:
            run.first_iter = row.iter


HIGHER_IS_BETTER = re.compile(r"(m?ap|ar|m?acc|aacc|m?iou|f1|recall|precision)\d*")


def better(key: str) -> str | None:
    """max for accuracy-like metrics (mAP, AP50, AR, acc, IoU and their variants: `bbox_mAP_75`, `IoU.road`),
    min for losses, None for anything else (no best is kept)."""
    tokens = re.split(r"[_.@]", key.rsplit("/", 1)[-1].lower())
    if any(t.startswith("loss") for t in tokens):
        return "min"
    return "max" if any(HIGHER_IS_BETTER.fullmatch(t) for t in tokens) else None


def update_best(summary: dict[str, Any], row: MetricRow) -> None:
    """`best/<metric>` beside the last value of every val metric, with `best_epoch/<metric>` (or best_iter):
    kept in the run's summary in the DB, so it holds across segments and resumed launches; NaN never wins."""
    unit, at = ("epoch", row.epoch) if row.epoch is not None else ("iter", row.iter)
    for key, value in row.values.items():
        if not key.startswith("val/") or not is_number(value) or not math.isfinite(value) or (rule := better(key)) is None:
            continue
        best = summary.get(f"best/{key}")
        if best is None or (value > best if rule == "max" else value < best):
            summary[f"best/{key}"] = value
            summary[f"best_{unit}/{key}"] = at


def _flush_summary(run: Run | None, summary: dict[str, Any] | None) -> Run | None:
    if run is not None and summary is not None:
        run.summary_json = json.dumps(summary)
    return run


def _choose_run(
    session: Session,
    source: Source,
    found: FoundLog,
    state: ParseState,
    lineage: int,
    first: MetricRow,
    options: IngestOptions,
) -> Run:
    """The lineage of a launch: a resumed launch continues the run before it, a fresh one starts a new run."""
    if found.format is not LogFormat.MMENGINE_TEST:
        previous = session.scalar(
            select(Run)
            .where(Run.work_dir_id == source.work_dir_id, Run.job_type == "train", Run.launch < source.launch)
            .order_by(Run.launch.desc(), Run.id.desc())
            .limit(1)
        )
        if previous is not None and (options.fresh_launch is FreshLaunch.SAME_RUN or _continues(previous, state, first)):
            return previous
    return _new_run(session, source, found, state, lineage)


def _continues(previous: Run, state: ParseState, first: MetricRow) -> bool:
    """Resumed: the log header is a checkpoint's meta (mmdet 2.x), or training starts past its first log interval."""
    if state.resumed:
        return True
    if first.epoch is not None:
        return first.epoch > 1
    first_log = state.log_interval or previous.first_iter
    return first.iter is not None and first_log is not None and first.iter > first_log


def _new_run(session: Session, source: Source, found: FoundLog, state: ParseState, lineage: int) -> Run:
    work_dir = session.get_one(WorkDir, source.work_dir_id)
    launch = source.launch if lineage == 0 else f"{source.launch}#{lineage + 1}"
    is_test = found.format is LogFormat.MMENGINE_TEST
    run = Run(
        node=node_of(session),
        work_dir_id=work_dir.id,
        wandb_id=_new_wandb_id(),
        name=display_name(f"{work_dir.name}-{launch}" + ("-test" if is_test else "")),
        group=display_name(work_dir.name),
        job_type="test" if is_test else "train",
        launch=launch,
        by_epoch=state.by_epoch,
        next_step=1,
        summary_json="{}",
        hook_options_json="{}",
    )
    _attach_config(run, found)
    session.add(run)
    session.flush()
    return run


def _attach_config(run: Run, found: FoundLog) -> None:
    """The run's training config and environment; a config dump that is not valid Python holds the run, since
    what its MMDetWandbHook entry asks for is unknown (fixing or removing the dump releases it)."""
    header = log_header.read(found)
    lookup = config_source.find(found, header)
    config = lookup.config
    if config is None and lookup.error is not None:
        raise HeldRun(f"{lookup.error_in}: {lookup.error}: the training config is not valid Python, so its settings and any "
                      "MMDetWandbHook entry are unknown: nothing of this run is uploaded until it is fixed or removed")
    if config is not None:
        _take_config(run, config)
    env = env_info.for_log(header, found.text_log)
    if env:  # the training's environment, not the uploader's (the writer turns W&B's own metadata off)
        run.config_json = json.dumps({**json.loads(run.config_json or "{}"), "env_info": env}, default=str)


def _take_config(run: Run, config: RunConfig) -> None:
    env = json.loads(run.config_json or "{}").get("env_info")
    run.config_json = json.dumps({**config.values, **({"env_info": env} if env else {})}, default=str)
    run.config_name = config.name
    run.config_text = config.text
    run.hook_options_json = json.dumps(config.hook_options, default=str)


def refresh_failing_configs(db: Database, logs: list[FoundLog]) -> int:
    """A run may fail to upload because of its training config (a hook entry whose init_kwargs W&B refuses):
    re-read the config of every run that is failing, and when it changed, take it and try the run again at
    once. Returns how many runs changed."""
    by_path = {str(found.path): found for found in logs}
    with db.transaction() as session:
        failing = session.execute(
            select(Source.path, Run.id, Run.config_text).join(Run, Run.id == Source.run_id).where(Run.node == node_of(session), Run.failures > 0)
        ).all()
    fresh = {}
    for path, run_id, text in failing:
        if path in by_path and run_id not in fresh:
            config = config_source.for_log(by_path[path])
            if config is not None and config.text != text:
                fresh[run_id] = config
    with db.transaction() as session:
        for run_id, config in fresh.items():
            run = session.get_one(Run, run_id)
            _take_config(run, config)
            run.retry_at = None
    return len(fresh)


def _new_wandb_id() -> str:
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def _store_position(source: Source, read: tail.TailRead, state: ParseState) -> None:
    position = read.position
    source.dev, source.ino, source.generation = position.dev, position.ino, position.generation
    source.head_len, source.head_hash = position.head_len, position.head_hash
    source.offset, source.tail_hash = position.offset, position.tail_hash
    source.size_seen = read.size
    source.parse_state_json = json.dumps(state.to_json())


def _unreadable(db: Database, source_id: int, message: str) -> None:
    with db.transaction() as session:
        source = session.get_one(Source, source_id)
        source.state = SourceState.ERROR
        source.last_error = message
        record_problem(session, source.path, "unreadable", message, work_dir_id=source.work_dir_id)


def mark_gone(db: Database, path: str) -> None:
    """A log that disappeared between scans stays as a tombstone with its rows, and is reported."""
    with db.transaction() as session:
        source = session.scalar(select(Source).where(Source.node == node_of(session), Source.path == path))
        if source is not None and source.state is not SourceState.GONE:
            _gone(session, source)


def _gone(session: Session, source: Source) -> None:
    rows = outbox.rows_of_source(session, source.id)
    source.state = SourceState.GONE
    source.last_error = "file deleted"
    record_problem(session, source.path, "gone", f"log deleted while watched; its {rows} rows are kept",
                   work_dir_id=source.work_dir_id)



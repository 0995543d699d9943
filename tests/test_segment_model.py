"""A model of exactly-once for the outbox and the segment state machine (DESIGN 4–6, 10), as tests/test_tail.py
has for the tailer: random interleavings of ingest, send (which opens a segment when the run has none), close,
W&B faults, operator retries and crashes (a SIGKILL at a crash point, or between rules: a new process on the same
state DB recovers), checked after every step against what W&B holds.

The unit under test is the real `WandbWriter` over a real SQLite state DB, with every state change through
db/segments.py and db/outbox.py, and the real reader and verifier of `.wandb` files. W&B itself is the thing
outside it, and is modelled here: `WandbSide` stands for wandb-core offline (`wandb.init` makes the segment's
transaction log in the format wandb-core writes, `log` and `finish` append to it, a crash loses the tail it had
not flushed) and injects W&B's faults. The real client takes about a second per `wandb.init`, too slow for
hypothesis; tests/test_failures.py and tests/test_online.py run it for real.
"""
from __future__ import annotations

import json
import shutil
import struct
import tempfile
import zlib
from concurrent.futures import wait
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import wandb
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from sqlalchemy import func, select
from wandb.proto import wandb_internal_pb2 as pb

from common import crash_points
from db import outbox, segments
from db.models import OutboxRow, Run, Segment, SegmentState, Source, UploadedSpan, WorkDir
from db.session import Database, sqlite_url
from uploader.wandb import reader
from uploader.wandb.writer import WandbWriter, WriterOptions

RUNS = 2
WRITER_POINTS = ("segment-recorded", "rows-logged", "segment-closing", "segment-closed", "segment-discarded")
FAULTS = ("init", "log", "finish", "corrupt")
_BLOCK = 32 * 1024
_CHUNK = struct.Struct("<IHB")
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


@dataclass(frozen=True)
class SegmentRow:
    id: int
    run_id: int
    seq: int
    dir: str
    state: SegmentState
    rows: int
    first_step: int | None
    last_step: int | None


@dataclass(frozen=True)
class Snapshot:
    files: dict[Path, reader.SegmentScan | None]  # segment directory on disk → its file (None: unreadable)
    segments: list[SegmentRow]
    outbox: list[Any]  # (run_id, step, uploaded, segment_id) of every row not folded
    folded: dict[int, int]  # run → rows folded into spans (uploaded)


class Crash(BaseException):
    """The uploader process dies here: no `except Exception` sees it, and nothing of that process runs again."""


class TransactionLog:
    """A `.wandb` file as wandb-core writes it: a header, then LevelDB log chunks in 32 KiB blocks."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = bytearray(b":W&B" + struct.pack("<H", 0xBEE1) + b"\0")
        self.flush()

    def append(self, record: pb.Record, *, bad_crc: bool = False) -> None:
        payload, first = record.SerializeToString(), True
        while True:
            room = _BLOCK - len(self.data) % _BLOCK
            if room < _CHUNK.size:
                self.data += b"\0" * room
                continue
            part, payload = payload[: room - _CHUNK.size], payload[room - _CHUNK.size:]
            kind = (_FULL if first else _LAST) if not payload else (_FIRST if first else _MIDDLE)
            crc = zlib.crc32(part, zlib.crc32(bytes((kind,)))) ^ (1 if bad_crc else 0)
            self.data += _CHUNK.pack(crc, len(part), kind) + part
            first = False
            if not payload:
                break
        self.flush()

    def flush(self) -> None:
        self.path.write_bytes(bytes(self.data))


class StandinRun:
    """What the writer uses of a `wandb.Run` offline, writing the segment's transaction log."""

    def __init__(self, side: WandbSide, directory: Path, wandb_id: str) -> None:
        folder = directory / "wandb" / f"offline-run-20260101_000000-{wandb_id}"
        (folder / "files").mkdir(parents=True)
        self.side, self.directory = side, directory
        self.log_file = TransactionLog(folder / f"run-{wandb_id}.wandb")
        self.settings = SimpleNamespace(sync_file=str(self.log_file.path))
        self.summary: dict[str, Any] = {}
        self.config = SimpleNamespace(update=lambda *args, **kwargs: None)
        self.dir = str(folder / "files")
        self.logged: list[int] = []
        self.finished = False

    def define_metric(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log(self, data: dict[str, Any], step: int, commit: bool = True) -> None:
        if self.side.fault == "log" and self.side.logged_this_rule:
            raise RuntimeError("W&B stand-in: the client failed mid-batch")
        record = pb.Record()
        record.history.step.num = step
        record.history.item.add(key="_step", value_json=str(step))
        self.log_file.append(record)
        self.logged.append(step)
        self.side.logged_this_rule += 1

    def finish(self, exit_code: int = 0) -> None:
        if self.side.fault == "finish" and exit_code == 0:
            raise RuntimeError("W&B stand-in: finish failed")
        if self.side.fault == "corrupt" and exit_code == 0:
            self.log_file.append(pb.Record(), bad_crc=True)  # a damaged record before the end
        record = pb.Record()
        record.exit.exit_code = exit_code
        self.log_file.append(record)
        self.finished = True


class WandbSide:
    """wandb-core offline, outside the unit under test: the runs `wandb.init` opened, and the fault of the moment."""

    def __init__(self) -> None:
        self.fault: str | None = None
        self.logged_this_rule = 0
        self.opened: set[Path] = set()  # segment directories whose `wandb.init` succeeded
        self.live: list[StandinRun] = []  # the run objects of the current uploader process

    def init(self, **kwargs: Any) -> StandinRun:
        if self.fault == "init":
            raise RuntimeError("W&B stand-in: the run was refused")
        run = StandinRun(self, Path(kwargs["dir"]), kwargs["id"])
        self.opened.add(run.directory)
        self.live.append(run)
        return run

    def process_killed(self, torn: int) -> None:
        """What wandb-core had not flushed of each unfinished file is lost (possibly mid-record)."""
        for run in self.live:
            if not run.finished and run.log_file.path.exists():
                data = run.log_file.data
                run.log_file.path.write_bytes(bytes(data[: max(0, len(data) - torn)]))
        self.live = []


class SegmentMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="segment-model-"))
        self.url = sqlite_url(self.tmp / "state.db")
        self.side = WandbSide()
        self.patches = pytest.MonkeyPatch()
        self.patches.setattr(wandb, "init", self.side.init)
        self.patches.setattr(wandb, "teardown", lambda *args, **kwargs: None)
        self.patches.setattr(crash_points, "reached", self._reached)
        self.armed: str | None = None
        self.crashed = False
        self.torn = 0
        self.db = Database(self.url)
        self.db.upgrade()
        self.ingested: dict[int, list[int]] = {}
        self.sources: dict[int, int] = {}
        with self.db.transaction() as session:
            for n in range(RUNS):
                work_dir = WorkDir(path=f"/work_dirs/w{n}", root="/work_dirs", name=f"w{n}")
                run = Run(work_dir=work_dir, wandb_id=f"run{n:04d}", name=f"w{n}", group="g", launch="20260101_000000")
                source = Source(work_dir=work_dir, path=f"/work_dirs/w{n}/a.log.json", format="mmdet2", launch="a")
                session.add_all([run, source])
                session.flush()
                self.ingested[run.id], self.sources[run.id] = [], source.id
        self.runs = sorted(self.ingested)
        self.writer = self._new_writer()

    def teardown(self) -> None:
        """Every example ends with everything uploaded once (liveness), then its files go."""
        try:
            self.everything_is_uploaded_in_the_end()
        finally:
            self.patches.undo()
            self.db.dispose()
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _new_writer(self) -> WandbWriter:
        return WandbWriter(self.db, WriterOptions(runs_dir=self.tmp / "wandb", batch_rows=3, exit_timeout_s=5.0))

    def _reached(self, point: str) -> None:
        if point == self.armed:
            self.armed, self.crashed = None, True
            raise Crash(point)

    def _act(self, action: Any, crash_at: str | None, fault: str | None, torn: int) -> None:
        """One writer call, with a W&B fault and a crash point armed; a crash is followed by a new process."""
        self.armed, self.side.fault, self.side.logged_this_rule, self.torn = crash_at, fault, 0, torn
        try:
            action()
            wait(list(self.writer._closing.values()))  # the read-back of closed segments (the verifier thread)
        except Crash:
            pass
        finally:
            self.armed, self.side.fault = None, None
        if self.crashed:
            self._restart()

    def _restart(self) -> None:
        """SIGKILL, then a new process on the same state DB: it recovers before anything else (and may die in it)."""
        self.writer._verifier.shutdown(wait=True)  # a read-back under way counts as done before the kill
        while True:
            self.crashed = False
            self.side.process_killed(self.torn)
            self.db.dispose()
            self.db = Database(self.url)
            self.writer = self._new_writer()
            try:
                self.writer.recover()
            except Crash:
                continue
            if not self.crashed:
                return

    # the producers and the operator

    @initialize(counts=st.lists(st.integers(1, 8), min_size=RUNS, max_size=RUNS))
    def logs_were_read(self, counts: list[int]) -> None:
        for run, count in enumerate(counts):
            self.ingest(run, count, False)

    @rule(run=st.integers(0, RUNS - 1), count=st.integers(1, 5), val=st.booleans())
    def ingest(self, run: int, count: int, val: bool) -> None:
        run_id = self.runs[run]
        with self.db.transaction() as session:
            row = session.get_one(Run, run_id)
            steps = list(range(row.next_step, row.next_step + count))
            outbox.add_rows(session, [
                {"run_id": run_id, "step": step, "source_id": self.sources[run_id], "generation": 0, "byte_offset": step * 100,
                 "line_hash": f"{step:032x}", "kind": "val" if val and step == steps[-1] else "train", "epoch": None,
                 "iter": step, "payload_json": json.dumps({"loss": 1.0 / step})}
                for step in steps
            ])
            row.next_step = steps[-1] + 1
        self.ingested[run_id] += steps

    @rule()
    def operator_retries(self) -> None:
        segments.retry_now(self.db)

    # the writer

    @rule(crash_at=st.sampled_from((None, None, None, *WRITER_POINTS)), fault=st.sampled_from((None, None, None, *FAULTS)),
          torn=st.integers(0, 60))
    def send(self, crash_at: str | None, fault: str | None, torn: int) -> None:
        self._act(self.writer.drain, crash_at, fault, torn)

    @rule(run=st.integers(0, RUNS - 1), crash_at=st.sampled_from((None, None, *WRITER_POINTS)),
          fault=st.sampled_from((None, None, *FAULTS)), torn=st.integers(0, 60))
    def close(self, run: int, crash_at: str | None, fault: str | None, torn: int) -> None:
        run_id = self.runs[run]
        self._act(lambda: self.writer.close(run_id) if run_id in self.writer._open else None, crash_at, fault, torn)

    @rule(crash_at=st.sampled_from((None, *WRITER_POINTS)), torn=st.integers(0, 60))
    def shut_down(self, crash_at: str | None, torn: int) -> None:
        self._act(self.writer.close_all, crash_at, None, torn)

    @rule(torn=st.integers(0, 60))
    def killed_between_calls(self, torn: int) -> None:
        self.torn = torn
        self._restart()

    @rule()
    def everything_is_uploaded_in_the_end(self) -> None:
        """Without faults, retried at once, the writer uploads every row ingested so far (liveness)."""
        for _ in range(3):
            segments.retry_now(self.db)
            while self.writer.drain():
                pass
            self.writer.close_all()
            with self.db.read() as session:
                if not outbox.pending_runs(session):
                    break
        uploaded = self._uploaded_steps(self._snapshot())
        for run_id, steps in self.ingested.items():
            assert sorted(uploaded[run_id]) == steps, f"run {run_id}: W&B holds {uploaded[run_id]}, ingested {steps}"

    # what W&B holds, and the DB's account of it

    def _snapshot(self) -> Snapshot:
        """One read of the DB, and of every segment file on disk (what `wandb sync` of the folder would upload)."""
        files: dict[Path, reader.SegmentScan | None] = {}
        root = self.tmp / "wandb"
        for directory in sorted(root.glob("*/*")) if root.is_dir() else []:
            found = reader.find_run_files(directory)
            try:
                files[directory] = reader.scan_segment(found[0]) if len(found) == 1 else None
            except reader.WandbFileError:
                files[directory] = None  # damaged: never synced
        with self.db.read() as session:
            rows = session.execute(
                select(Segment.id, Segment.run_id, Segment.seq, Segment.dir, Segment.state, Segment.rows, Segment.first_step,
                       Segment.last_step).order_by(Segment.run_id, Segment.seq)
            )
            segment_rows = [SegmentRow(*row) for row in rows]
            outbox_rows = session.execute(select(OutboxRow.run_id, OutboxRow.step, OutboxRow.uploaded, OutboxRow.segment_id)).all()
            folded = dict(session.execute(select(UploadedSpan.run_id, func.sum(UploadedSpan.rows)).group_by(UploadedSpan.run_id)).all())
        return Snapshot(files, segment_rows, outbox_rows, folded)

    def _uploaded_steps(self, snap: Snapshot) -> dict[int, list[int]]:
        """The steps of the closed segments' files: what the DB counts as uploaded (`wandb sync` uploads them)."""
        uploaded: dict[int, list[int]] = {run_id: [] for run_id in self.runs}
        for segment in snap.segments:
            if segment.state is SegmentState.CLOSED:
                scan = snap.files.get(Path(segment.dir))
                assert scan is not None and scan.has_exit, f"closed segment {segment.seq} of run {segment.run_id}: {scan}"
                uploaded[segment.run_id] += scan.steps
        return uploaded

    @invariant()
    def exactly_once(self) -> None:
        snap = self._snapshot()
        self._no_segment_row_for_a_run_wandb_did_not_open(snap)
        self._every_directory_on_disk_is_a_live_or_closed_segment(snap)
        self._each_row_is_uploaded_once_or_still_in_the_outbox(snap)
        self._steps_increase_across_segments(snap)
        self._an_open_segment_holds_what_was_logged_into_it(snap)

    def _no_segment_row_for_a_run_wandb_did_not_open(self, snap: Snapshot) -> None:
        for segment in snap.segments:
            assert Path(segment.dir) in self.side.opened, segment.dir

    def _every_directory_on_disk_is_a_live_or_closed_segment(self, snap: Snapshot) -> None:
        """No file of a discarded or unrecorded segment is left for `wandb sync`, and every open segment is this
        process's (recovery settled the others)."""
        states = {Path(s.dir): s.state for s in snap.segments}
        live = {run.directory for run in self.side.live}
        for directory in snap.files:
            assert states.get(directory) in (SegmentState.OPEN, SegmentState.CLOSED), (directory, states.get(directory))
        for directory, state in states.items():
            if state is SegmentState.OPEN:
                assert directory in live and directory.is_dir(), f"{directory}: open, but no run object writes it"

    def _each_row_is_uploaded_once_or_still_in_the_outbox(self, snap: Snapshot) -> None:
        uploaded = self._uploaded_steps(snap)
        for run_id in self.runs:
            steps = uploaded[run_id]
            assert len(steps) == len(set(steps)), f"run {run_id}: a step in two closed segments: {steps}"
            waiting = {step for run, step, done, _ in snap.outbox if run == run_id and not done}
            kept = sum(1 for run, _, done, _ in snap.outbox if run == run_id and done)  # val rows are kept whole
            assert not waiting & set(steps), f"run {run_id}: uploaded and still waiting: {waiting & set(steps)}"
            assert waiting | set(steps) == set(self.ingested[run_id]), f"run {run_id}: rows lost or made up"
            counted = snap.folded.get(run_id, 0) + kept
            assert counted == len(steps), f"run {run_id}: the DB counts {counted} rows uploaded, W&B holds {len(steps)}"

    def _steps_increase_across_segments(self, snap: Snapshot) -> None:
        last: dict[int, int] = {}
        for segment in snap.segments:
            if segment.state is not SegmentState.CLOSED:
                continue
            scan = snap.files[Path(segment.dir)]
            assert scan is not None
            assert scan.steps == sorted(set(scan.steps)), f"segment {segment.seq}: steps out of order: {scan.steps}"
            assert (segment.rows, segment.first_step, segment.last_step) == (
                len(scan.steps), scan.steps[0] if scan.steps else None, scan.steps[-1] if scan.steps else None)
            if scan.steps:
                assert scan.steps[0] > last.get(segment.run_id, 0), f"segment {segment.seq} of run {segment.run_id} goes back"
                last[segment.run_id] = scan.steps[-1]

    def _an_open_segment_holds_what_was_logged_into_it(self, snap: Snapshot) -> None:
        logged = {run.directory: run.logged for run in self.side.live}
        for segment in snap.segments:
            if segment.state is SegmentState.OPEN:
                assigned = sorted(step for _, step, _, segment_id in snap.outbox if segment_id == segment.id)
                assert assigned == logged.get(Path(segment.dir)), (segment.dir, assigned, logged.get(Path(segment.dir)))


SegmentMachine.TestCase.settings = settings(
    max_examples=30, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_exactly_once_through_faults_and_crashes = SegmentMachine.TestCase

"""`mmdet-wandb sync`: the closed offline segments of each run to a W&B server, exactly once (DESIGN 5, 14).

Never `wandb sync`: it renumbers and duplicates rows after a SIGKILL or a re-sync, exits 0 after a refusal and
cannot skip what the server already has. Each segment is replayed from its own `.wandb` file instead, as a
resume of its run id, strictly in seq order per run: `wandb.init(resume="allow")` says which steps the server
holds (its starting step S), only the rows at or above S are logged, at their own step, with the full summary,
the config and the segment's artifacts (under their offline client ids, so that prediction tables still
reference `val`), each waited for. A segment is synced only when a later start's S is past its last step; the
same start sends the next segment, and one last start confirms the last. A segment whose rows a server already
holds (a hand-run `wandb sync`, or a sync killed after its rows went) gets no row, only its artifacts again (W&B
keeps one version per client id and digest), so none is lost to a kill before their commit. The charts' tables
(`run_table` artifacts) and specs (`_wandb.visualize`) go with them. Every state change is a statement of
db/segments.py; a SIGKILL at any point leaves a segment closed or sending, and the next sync resumes at S.
"""
from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import wandb
from wandb.sdk.artifacts.artifact_manifest_entry import ArtifactManifestEntry

from db import segments
from db.models import Run
from db.segments import ToSync
from db.session import Database
from db.jobs import db_clock
from uploader.wandb import history_batch, private_api, reader
from uploader.wandb.writer import DEFAULT_PROJECT

log = logging.getLogger("mmdet_wandb.sync")
RUN_TABLE = "run_table"  # the artifacts wandb makes of summary tables (the charts'), a type it keeps for itself


class SyncRefused(RuntimeError):
    """What the server holds cannot be made right by sending (it kept only part of a segment we sent)."""


@dataclass(frozen=True)
class RunOutcome:
    wandb_id: str
    synced: int  # segments confirmed now
    hand_synced: int  # of those, already on the server before we sent anything
    rows_sent: int
    left: int  # segments still not synced
    error: str | None
    backing_off: bool = False  # nothing tried: a failure's backoff runs


@dataclass(frozen=True)
class SyncOptions:
    work_dir: Path  # wandb's local files of the online replays (deleted after each start)
    timeout_s: float = 60.0


class Syncer:
    def __init__(self, db: Database, options: SyncOptions, progress: Callable[[str, int], None] = lambda _id, _n: None) -> None:
        self.db = db
        self.options = options
        self.progress = progress  # (wandb id, rows sent now)

    def plan(self, wandb_ids: list[str] | None = None) -> dict[str, list[ToSync]]:
        with self.db.read() as session:
            return segments.to_sync(session, wandb_ids)

    def unknown(self, wandb_ids: list[str]) -> list[str]:
        with self.db.read() as session:
            return segments.unknown_runs(session, wandb_ids)

    def sync_run(self, wandb_id: str, todo: list[ToSync]) -> RunOutcome:
        """Replay the run's segments in seq order; stop at the first that fails (a later one must never go
        before it: its steps would make the server skip the earlier one)."""
        synced = hand = sent_rows = 0
        with self.db.read() as session:
            now = db_clock(session)
            run = session.query(Run).filter(Run.wandb_id == wandb_id).one()
            summary = json.loads(run.summary_json)
        waiting = [seg for seg in todo if seg.retry_at is not None and seg.retry_at > now]
        if waiting:
            return RunOutcome(wandb_id, 0, 0, 0, len(todo), f"backing off after a failure: next try in {waiting[0].retry_at - now:.0f} s",
                              backing_off=True)
        pending = list(todo)
        sent: ToSync | None = None  # the segment the previous start sent, confirmed by this start
        current: ToSync | None = None
        try:
            while True:
                handle = self._start(wandb_id, pending[0] if pending else sent)
                try:
                    server_next = handle.starting_step
                    if sent is not None:
                        if not _below(sent, server_next):
                            raise SyncRefused(f"segment {sent.seq}: W&B kept the steps below {server_next} only "
                                              f"(it ends at {sent.last_step}); the rest goes on the next sync")
                        self._confirm(sent, server_next)
                        synced += 1
                        sent = None
                    if not pending:
                        handle.summary.update(_summary(summary))
                        handle.finish()
                        return RunOutcome(wandb_id, synced, hand, sent_rows, 0, None)
                    current = pending.pop(0)
                    # Rows on the server before this start: sent by hand, or by a sync killed before it confirmed
                    # them, maybe before its artifacts were committed: they are logged again (W&B keeps one
                    # version of an artifact per client id and digest), the rows not.
                    held = bool(current.rows) and _below(current, server_next)
                    with self.db.transaction() as session:
                        segments.sync_sending(session, current.id)
                    sent_rows += self._replay(handle, current, server_next, summary)
                    handle.finish()
                finally:
                    shutil.rmtree(self.options.work_dir / wandb_id, ignore_errors=True)
                if held or current.rows == 0:  # rows already held, or none: `Artifact.wait()` read each artifact back
                    self._confirm(current, server_next)
                    synced += 1
                    hand += held and not current.sending
                    if held:
                        log.info("run %s: segment %s already on the server (steps below %d): its artifacts made sure "
                                 "of, no row sent", wandb_id, current.seq, server_next)
                else:
                    sent = current
        except Exception as exc:
            failing = sent or current or (pending[0] if pending else None)
            error = f"{type(exc).__name__}: {_first_line(exc)}"
            if failing is not None:
                with self.db.transaction() as session:
                    segments.sync_failed(session, failing.id, error)
            return RunOutcome(wandb_id, synced, hand, sent_rows, len(self.plan([wandb_id]).get(wandb_id, [])), error)

    def _start(self, wandb_id: str, segment: ToSync | None) -> Any:
        offline = reader.read_run(_sync_file(segment.sync_file_dir)) if segment else None
        directory = self.options.work_dir / wandb_id
        directory.mkdir(parents=True, exist_ok=True)
        return wandb.init(
            id=wandb_id, project=(offline.project if offline else None) or DEFAULT_PROJECT,
            entity=offline.entity if offline and offline.entity else None,
            name=offline.display_name if offline else None, group=offline.group if offline else None,
            job_type=offline.job_type if offline else None, resume="allow", dir=str(directory),
            settings=private_api.settings(
                mode="online", console="off", silent=True, reinit="create_new", x_disable_stats=True, x_disable_meta=True,
                x_save_requirements=False, disable_git=True, disable_code=True, init_timeout=self.options.timeout_s,
                finish_timeout=self.options.timeout_s, finish_timeout_raises=True,
            ),
        )

    def _replay(self, handle: Any, segment: ToSync, server_next: int, summary: dict[str, Any]) -> int:
        """Log what the server lacks of the segment: rows at or above `server_next`, then config, the run's
        full summary (a start replaces it) and the artifacts, each waited for until committed."""
        offline = reader.read_run(_sync_file(segment.sync_file_dir))
        for metric in offline.metrics:
            name = metric["name"] or metric["glob_name"]
            if name and metric["step_metric"]:
                handle.define_metric(name, step_metric=metric["step_metric"])
        rows = [row for row in offline.history if row.get("_step", -1) >= server_next]
        with history_batch.batched(handle):
            for row in rows:
                values = {k: v for k, v in row.items() if not k.startswith("_")}
                handle.log(values, step=row["_step"], commit=True)
        if offline.config:
            handle.config.update({k: v for k, v in offline.config.items() if k != "_wandb"}, allow_val_change=True)
        private_api.replay_charts(handle, offline.wandb_internal_config.get("visualize") or {})
        handle.summary.update({**_summary(summary), **_chart_tables(offline.summary)})
        logged = []
        for offline_art in offline.artifacts:
            artifact = self._artifact(offline_art)
            if artifact is None:  # a chart's table off the private path: a summary value again, in a new artifact
                key, table = _summary_table(offline_art)
                handle.summary[key] = table
                continue
            logged.append((offline_art, artifact))
        for offline_art, artifact in logged:
            handle.log_artifact(artifact, aliases=sorted(offline_art.aliases - {"latest"}) or None)
        for offline_art, artifact in logged:
            artifact.wait(timeout=self.options.timeout_s)
            if artifact.state != "COMMITTED":
                raise RuntimeError(f"{offline_art.name} not committed by W&B: it holds it as {artifact.state}")
        self.progress(handle.id, len(rows))
        return len(rows)

    @staticmethod
    def _artifact(offline: reader.OfflineArtifact) -> wandb.Artifact | None:
        """The offline artifact again, from its manifest: local files (checkpoint pins, wandb's staging copies),
        references kept as references, under its offline client ids. None: a chart's table (`run_table`) that
        this wandb cannot log under its own type."""
        if offline.type == RUN_TABLE:
            artifact = private_api.internal_artifact(offline.name, offline.type, offline.metadata)
            if artifact is None:
                return None
        else:
            artifact = wandb.Artifact(offline.name, type=offline.type, metadata=offline.metadata)
        kept_id = private_api.keep_client_id(artifact, offline.client_id, offline.sequence_client_id)
        for entry in offline.entries:
            if entry["ref"]:
                if entry["ref"].startswith("wandb-client-artifact://") and not kept_id:
                    raise RuntimeError(f"{offline.name}: its references into another artifact need wandb's private API")
                artifact.manifest.add_entry(ArtifactManifestEntry(path=entry["path"], ref=entry["ref"], digest=entry["digest"],
                                                                  size=entry["size"] or None))
            elif entry["local_path"] and Path(entry["local_path"]).is_file():
                artifact.add_file(entry["local_path"], name=entry["path"], policy="immutable", skip_cache=True)
            else:
                raise FileNotFoundError(f"{offline.name}: {entry['path']} is gone from {entry['local_path']}")
        return artifact

    def _confirm(self, segment: ToSync, server_next: int) -> None:
        with self.db.transaction() as session:
            segments.confirmed(session, segment.id, server_next - 1)


def _summary(summary: dict[str, Any]) -> dict[str, Any]:
    """The run's summary to send: off the private path without the charts' tables, whose references into
    their offline artifacts cannot resolve (each segment logs its own anew, `_summary_table`)."""
    if private_api.enabled():
        return summary
    return {k: v for k, v in summary.items() if not _is_table(v)}


def _chart_tables(offline_summary: dict[str, Any]) -> dict[str, Any]:
    """The charts' tables the segment put in its summary (the DB's summary holds metrics only), referencing their
    `run_table` artifacts by offline client id: sent as they are on the private path (the artifacts keep those
    ids); off it, `_summary_table` logs each anew."""
    if not private_api.enabled():
        return {}
    return {k: v for k, v in offline_summary.items() if _is_table(v)}


def _is_table(value: Any) -> bool:
    """A summary value that is a table file (a chart's), referencing its `run_table` artifact."""
    return isinstance(value, dict) and value.get("_type") == "table-file"


def _summary_table(offline: reader.OfflineArtifact) -> tuple[str, wandb.Table]:
    """The summary key and the table of a chart's `run_table` artifact (its one entry is `<key>.table.json`)."""
    [entry] = offline.entries
    with open(entry["local_path"], "rb") as f:
        data = json.load(f)
    return entry["path"].removesuffix(".table.json"), wandb.Table(columns=data["columns"], data=data["data"])


def _below(segment: ToSync, server_next: int) -> bool:
    """The server holds all of the segment's steps."""
    return segment.last_step is None or segment.last_step < server_next


def _sync_file(directory: Path) -> Path:
    files = reader.find_run_files(directory)
    if len(files) != 1:
        raise FileNotFoundError(f"{directory}: expected one .wandb file, found {len(files)}")
    return files[0]


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:300]

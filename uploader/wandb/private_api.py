"""Every use of the W&B client's private internals, and whether this wandb may take it or only the public API.

pyproject.toml allows a range of wandb releases (`.ci/wandb-versions` runs the W&B-facing tests on its oldest
and on the newest on the registry); the internals were verified on the versions in `VERIFIED` only. On any other
installed wandb, or with `MMDET_WANDB_WANDB_PUBLIC_ONLY=1` in the environment, each use falls back to the public
call it stands for, which writes the same rows and checkpoint entries, only slower (`benchmarks/backfill.py
--public-only` measures how much). A wandb release outside the list so needs no re-check to be safe: it only
loses the fast paths until it is verified (tests/test_wandb_writer.py) and added here.

The uses:
- `history_batch` as a whole (`Run._interface`, `InterfaceSock._publish`/`_deliver`, the service client's socket
  writer and framing): many rows handed to wandb-core at once. It runs only where `enabled()`; else `run.log`.
- `add_local_file`: a checkpoint entry from the md5 the follower computed; else `Artifact.add_file` (a second
  read of the file).
- `client_id`, `local_media` and `reference_media`: prediction tables that reference the val artifact's images
  (wandb-client-artifact:// references, wandb-offline.md §4.6 recipe C); else each prediction artifact holds its
  own copy of the images (the table is the same).
- `keep_client_id`: `mmdet-wandb sync` re-logs an offline artifact under its offline client id, so that the
  prediction tables' references into `val` resolve; else a segment with such references is not synced.
- `internal_artifact`: `mmdet-wandb sync` re-logs the `run_table` artifacts wandb made for the summary tables of
  the charts (a type the public `wandb.Artifact` refuses); else the tables are logged anew as summary values.
- `replay_charts`: `mmdet-wandb sync` puts the offline run's chart specs (`_wandb.visualize`) into the online
  run's config as `log_chart` did; else the synced run has the chart tables without their panels.
- `log_chart`: a custom chart (PR curves, confusion matrix) whose table is a summary value, without a history
  step (the steps are the service's, DESIGN 5): the chart's spec goes into the run's `_wandb.visualize` config as
  `run.log` puts it there; else the table is a summary value only (no chart panel).
- `settings`: wandb's `x_` settings are experimental; one this wandb does not define is left out.
- `skip_launch_inputs`: `wandb.init` looks for launch job inputs staged in this process
  (`Run._detect_and_apply_job_inputs`), which imports wandb's whole launch agent: ~0.3 s of CPU, the largest
  single part of a restart's first row (benchmarks/faults.py). The service stages none, so the look is left
  out; else it runs, and `writer._start_client` imports the agent in the background beforehand.
- `quick_service_poll`: `wandb.setup` waits for wandb-core's port file in 0.2 s sleeps
  (`service_port_file._SLEEP`), while wandb-core writes it ~25 ms after it starts: polled every 10 ms, a start
  of the service reaches its first `wandb.init` ~0.18 s sooner; else wandb's own poll.

Reading `.wandb` files back (`reader.py`) uses no private API: only the protobuf classes in the wheel
(`wandb.proto.wandb_internal_pb2`) and the transaction log's format version, which the reader checks in every
file header (a changed format is a clear error, not a misread). `writer._start_client` imports a wandb.sdk
module only to warm it up, and tolerates its absence.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import wandb

VERIFIED = frozenset({"0.31.0"})  # tests/test_wandb_writer.py compares each private use with its public call
PUBLIC_ONLY_ENV = "MMDET_WANDB_WANDB_PUBLIC_ONLY"

log = logging.getLogger("mmdet_wandb.wandb")


def enabled() -> bool:
    """Private internals are used: the installed wandb is a verified one and the public path is not forced."""
    return wandb.__version__ in VERIFIED and os.environ.get(PUBLIC_ONLY_ENV, "") in ("", "0")


def settings(**fields: Any) -> wandb.Settings:
    """`wandb.Settings(**fields)` without the experimental (`x_`) fields this wandb does not define (each
    only tunes wandb, e.g. `x_transaction_log_flush_interval`, new in 0.31.0); an unknown public field stays an
    error."""
    known = wandb.Settings.model_fields
    dropped = sorted(name for name in fields if name.startswith("x_") and name not in known)
    if dropped:
        log.debug("wandb %s has no setting %s: left out", wandb.__version__, ", ".join(dropped))
    return wandb.Settings(**{name: value for name, value in fields.items() if name not in dropped})


def skip_launch_inputs() -> bool:
    """Make `wandb.init` in this process leave out the look for staged launch job inputs (the service never
    stages any). False off the private path: the look stays, as wandb has it."""
    if not enabled():
        return False
    from wandb.sdk.wandb_run import Run

    Run._detect_and_apply_job_inputs = _no_launch_inputs  # type: ignore[method-assign]
    return True


def _no_launch_inputs(run: Any) -> None:
    """What `Run._detect_and_apply_job_inputs` does when nothing was staged."""


def quick_service_poll() -> None:
    """Make `wandb.setup` in this process look for wandb-core's port file every 10 ms instead of every 0.2 s."""
    if not enabled():
        return
    from wandb.sdk.lib.service import service_port_file

    service_port_file._SLEEP = _short_sleep


def _short_sleep(seconds: float) -> None:
    time.sleep(min(seconds, 0.01))


def add_local_file(artifact: wandb.Artifact, path: Path, name: str, md5_b64: str) -> None:
    """`artifact.add_file(path, name, policy="immutable", skip_cache=True)` with `md5_b64` as the digest
    instead of reading the file again (`add_file` is LogicalPath + md5 + `_add_local_file`)."""
    if not enabled():
        artifact.add_file(str(path), name=name, policy="immutable", skip_cache=True)
        return
    from wandb.sdk.lib.paths import LogicalPath

    artifact._add_local_file(LogicalPath(name), str(path), digest=md5_b64, policy="immutable", skip_cache=True)


def client_id(artifact: wandb.Artifact) -> str | None:
    """The id other artifacts of this process reference `artifact` by (no public accessor); None: no references."""
    return artifact._client_id if enabled() else None


def local_media(artifact: wandb.Artifact, directory: Path) -> dict[str, str]:
    """Our files under `directory` that `artifact` holds (their path below `directory` → the entry's path)."""
    if not enabled():
        return {}
    return {str(Path(local).relative_to(directory)): entry.path
            for local, entry in artifact._added_local_paths.items() if Path(local).is_relative_to(directory)}


def reference_media(artifact: wandb.Artifact, source_client_id: str | None, entries: dict[str, str],
                    local: dict[str, Path]) -> None:
    """Make `artifact` reference the entries (path → digest) of the artifact with `source_client_id` instead of
    holding copies: each local file in `local` (entry path → file) that a table adds later becomes that
    reference. Without a client id, or off the private path, it does nothing and the table copies the files."""
    if source_client_id is None or not enabled():
        return
    from wandb.sdk.artifacts.artifact_manifest_entry import ArtifactManifestEntry

    refs = {}
    for path, digest in entries.items():
        entry = ArtifactManifestEntry(path=path, ref=f"wandb-client-artifact://{source_client_id}/{path}", size=0, digest=digest)
        artifact.manifest.add_entry(entry)
        refs[path] = entry
    for path, file in local.items():
        artifact._added_local_paths[str(file)] = refs[path]


def keep_client_id(artifact: wandb.Artifact, offline_client_id: str, offline_sequence_client_id: str = "") -> bool:
    """Give a re-logged offline artifact the client ids it had offline, so that the `wandb-client-artifact://`
    references of the segment's prediction tables and of the summary's chart tables (`<id>` and
    `<sequence id>:latest`) resolve to it (`ClientIDMapping`). False off the private path: such references cannot
    be resolved and the caller must not send them."""
    if not enabled():
        return False
    artifact._client_id = offline_client_id
    if offline_sequence_client_id:
        artifact._sequence_client_id = offline_sequence_client_id
    return True


def internal_artifact(name: str, type: str, metadata: dict[str, Any]) -> wandb.Artifact | None:
    """An artifact of a type wandb keeps for itself (`run_table`), made as wandb makes it for a summary table;
    None off the private path (the public `wandb.Artifact` refuses such a type)."""
    if not enabled():
        return None
    from wandb.sdk.artifacts._internal_artifact import InternalArtifact

    return InternalArtifact(name, type, metadata=metadata or None)


def replay_charts(run: Any, visualize: dict[str, Any]) -> None:
    """Each chart spec of an offline run's `_wandb.visualize` into `run`'s config, as `log_chart` put it there."""
    if not enabled():
        return
    for key, value in visualize.items():
        run._config_callback(key=("_wandb", "visualize", key), val=value)


def log_chart(run: Any, key: str, chart: Any) -> None:
    """What `run.log({key: chart})` writes (the spec into `_wandb.visualize`, the table under `<key>_table`), with
    the table in the summary instead of a history row: the chart's query reads the summary table."""
    chart.set_key(key)
    run.summary[chart.spec.table_key] = chart.table
    if enabled():
        run._config_callback(key=chart.spec.config_key, val=chart.spec.config_value)

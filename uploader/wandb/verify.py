"""Reading a finished segment back: does its `.wandb` file hold exactly what the outbox logged into it?

Exactly: the same steps in order, and the same artifacts (type and digest) — nothing missing and nothing
that nobody logged (a leftover of a crash). The `run_table` artifacts wandb itself makes of the charts' summary
tables are counted (their digest is wandb's to choose). Only a segment that passes counts as uploaded.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from db.outbox import SegmentContent
from uploader.wandb import reader


CHART_TABLE = "run_table"  # the type of the artifact wandb makes of a table in the summary


class SegmentVerificationError(RuntimeError):
    """The `.wandb` file read back does not hold exactly what was logged into it."""


def check_segment(sync_file: Path, expected: SegmentContent) -> None:
    """One read of the file: complete (its exit record is there) and holding exactly what was logged."""
    scan = reader.scan_segment(sync_file)
    if not scan.has_exit:
        raise SegmentVerificationError(f"{sync_file}: no exit record (the process writing it was stopped)")
    if scan.steps != expected.steps:
        raise SegmentVerificationError(
            f"{sync_file}: {len(scan.steps)} rows read back, {len(expected.steps)} logged"
            + (f"; first difference at row {_first_difference(scan.steps, expected.steps)}" if scan.steps else "")
        )
    written = Counter((a.type, None if a.type == CHART_TABLE else a.digest) for a in scan.artifacts)
    logged = Counter(expected.artifacts) + Counter({(CHART_TABLE, None): expected.chart_tables})
    if written != logged:
        missing, unexpected = logged - written, written - logged
        raise SegmentVerificationError(
            f"{sync_file}: artifacts differ: missing {sorted(missing.elements())}, not logged {sorted(unexpected.elements())}"
        )


def _first_difference(written: list[Any], expected: list[int]) -> int:
    for index, (a, b) in enumerate(zip(written, expected)):
        if a != b:
            return index
    return min(len(written), len(expected))

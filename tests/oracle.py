"""The expected W&B rows of a log, read straight from the file with the mapping table of DESIGN.md.

Deliberately independent of uploader/parsers, so that tests compare the product with the spec.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def _numbers(line: dict[str, Any], prefix: str, skip: set[str]) -> dict[str, Any]:
    return {
        f"{prefix}/{k}": v
        for k, v in line.items()
        if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def expected_rows(log: Path) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(raw line, expected W&B values) for every data line of one log file."""
    rows = []
    for raw in log.read_bytes().splitlines():
        if not raw.strip():
            continue
        line = json.loads(raw)  # stdlib json: bare NaN stays NaN
        if log.name.endswith(".log.json"):
            if "mode" not in line:
                continue
            values = _numbers(line, line["mode"], {"mode", "epoch", "iter", "lr"})
        elif log.parent.name == "vis_data":
            is_train = "lr" in line
            values = _numbers(line, "train" if is_train else "val", {"step", "epoch", "iter", "lr"})
        else:
            values = _numbers(line, "test", set())
        if isinstance(line.get("lr"), (int, float)):
            values["learning_rate"] = line["lr"]
        rows.append((line, values))
    return rows


def logs_of(work_dir: Path) -> list[Path]:
    """The logs of a work_dir in launch order; mmengine's <ts>.json copy of scalars.json is read once."""
    found = []
    for path in work_dir.rglob("*.json"):
        relative = path.relative_to(work_dir)
        if path.name.endswith(".log.json") and len(relative.parts) == 1:
            found.append((path.name[:15], path))
        elif path.parent.name == "vis_data":
            if path.name == "scalars.json" or not (path.parent / "scalars.json").exists():
                stamps = sorted(p.name[:15] for p in path.parent.glob("2*.json"))
                found.append((stamps[0] if stamps else path.parent.parent.name, path))
        elif len(relative.parts) == 2:
            found.append((path.name[:15], path))
    return [p for _, p in sorted(found)]


def same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


AXIS_KEYS = {"_step", "_runtime", "_timestamp", "iter", "epoch", "momentum"}


def assert_history_matches(history: list[dict[str, Any]], expected: list[tuple[dict[str, Any], dict[str, Any]]]) -> None:
    """One history row per data line, in order, each holding exactly the line's values (NaN kept as NaN)."""
    assert len(history) == len(expected), f"{len(history)} history rows for {len(expected)} data lines"
    for index, (row, (line, values)) in enumerate(zip(history, expected)):
        for key, value in values.items():
            assert same(row.get(key), value), f"row {index}: {key} = {row.get(key)!r}, log line has {value!r}: {line}"
        extra = set(row) - set(values) - AXIS_KEYS
        assert not extra, f"row {index} has keys that are not in the log line: {extra}"

"""The expected W&B rows of a log, read straight from the file with the mapping table of DESIGN.md.

Deliberately independent of uploader/parsers, so that tests compare the product with the spec.
"""
from __future__ import annotations

import datetime as dt
import json
import math
import re
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo


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


_MMCV_TEXT = re.compile(r"^(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}),(\d{3}) - \S+ - INFO - (.*)$")
_MMENGINE_TEXT = re.compile(r"^(\d{4}/\d{2}/\d{2} \d{2}:\d{2}:\d{2}) - \S+ - INFO - (.*)$")


def expected_times(log: Path, text_log: Path, zone: ZoneInfo) -> list[float | None]:
    """For every data line of `log` (in the order of `expected_rows`), the time of the text-log line that
    reports the same epoch/iteration, read in `zone`; None where the text log has no such line."""
    train: dict[tuple[int | None, int], float] = {}
    val: dict[int, float] = {}
    for text in text_log.read_text(encoding="utf-8", errors="replace").splitlines():
        if m := _MMCV_TEXT.match(text):
            when = dt.datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S").replace(tzinfo=zone).timestamp() + int(m[2]) / 1000
            message, engine = m[3], False
        elif m := _MMENGINE_TEXT.match(text):
            when = dt.datetime.strptime(m[1], "%Y/%m/%d %H:%M:%S").replace(tzinfo=zone).timestamp()
            message, engine = m[2], True
        else:
            continue
        if v := re.match(r"Epoch\(val\)\s*\[(\d+)\]", message):
            val[int(v[1])] = when  # the last one: mmengine logs val progress before the metrics
        elif t := re.match(r"Epoch(?:\(train\))?\s*\[(\d+)\]\[\s*(\d+)/(\d+)\]", message):
            e, i, n = int(t[1]), int(t[2]), int(t[3])
            train.setdefault((None, (e - 1) * n + i) if engine else (e, i), when)
        elif t := re.match(r"Iter(?:\(train\))?\s*\[\s*(\d+)/", message):
            train.setdefault((None, int(t[1])), when)
    times: list[float | None] = []
    for line, _ in expected_rows(log):
        mode = line.get("mode") or ("train" if "lr" in line else "val")
        if mode == "train":
            key = (line.get("epoch"), line.get("iter")) if log.name.endswith(".log.json") else (None, line.get("iter") or line.get("step"))
            times.append(train.get(key, train.get((None, key[1]))))
        else:
            times.append(val.get(line.get("epoch") if log.name.endswith(".log.json") else line.get("step")))
    return times

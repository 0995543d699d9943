"""Bad input is reported, skipped, never fatal and never lost silently (DESIGN invariants 1 and 9).

Every case builds a work_dir from REAL log lines, injects one kind of bad input, and runs the real CLI in a
subprocess (offline W&B, isolated MMDET_WANDB_HOME). What must hold, each time:

* the bad input shows up in `status --json` → `problems` with its path, byte offset and kind, and in the log
  on stderr;
* every good line around it becomes a history row in the offline `.wandb` files, value for value;
* other work_dirs in the same root are uploaded completely;
* nothing at all is written into the watched root (paths, sizes, modes and mtimes are compared).
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, cli, offline_run, service_env, status
from tests.oracle import assert_history_matches, expected_rows

ELTD = "masati91__ELTD/work_dirs/eltd_r101_fpn_1x_coco/20210427_101754.log.json"
LOG_NAME = "20210427_101754.log.json"
TEXT_LOG_NAME = "20210427_101754.log"


# ---------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def eltd(real_logs: Path) -> list[bytes]:
    """The real log as whole lines, each ending in b"\\n" (line 0 is the header, then 384 data lines)."""
    lines = [line + b"\n" for line in (real_logs / ELTD).read_bytes().splitlines() if line.strip()]
    assert len(lines) == 385
    return lines


class LogBuilder:
    """Writes a log.json line by line and remembers the byte offset of every line it wrote."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.parts: list[bytes] = []
        self.size = 0
        self.good: list[bytes] = []  # the real lines, in order: what must become history
        self.bad: list[int] = []  # offsets of the injected lines

    def real(self, lines: list[bytes]) -> LogBuilder:
        for line in lines:
            self._add(line)
            self.good.append(line)
        return self

    def inject(self, line: bytes) -> int:
        assert line.endswith(b"\n") and b"\n" not in line[:-1], "an injected line is one line"
        offset = self._add(line)
        self.bad.append(offset)
        return offset

    def _add(self, line: bytes) -> int:
        offset = self.size
        self.parts.append(line)
        self.size += len(line)
        return offset

    def write(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_bytes(b"".join(self.parts))
        return self.path


def copy_log(lines: list[bytes], work_dir: Path) -> Path:
    return LogBuilder(work_dir / LOG_NAME).real(lines).write()


def expected(lines: list[bytes], scratch: Path) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """The oracle's rows for exactly these good lines (written to a clean file outside every root)."""
    scratch.mkdir(parents=True, exist_ok=True)
    clean = scratch / f"{len(list(scratch.iterdir()))}_{LOG_NAME}"
    clean.write_bytes(b"".join(lines))
    return expected_rows(clean)


def snapshot(root: Path) -> dict[str, tuple[int, int, int, str | None]]:
    """Everything under root, without following links: path → (mode, size, mtime_ns, link target)."""
    tree: dict[str, tuple[int, int, int, str | None]] = {}
    for directory, dirs, files in os.walk(root, followlinks=False):
        for name in [*dirs, *files, ""]:
            path = os.path.join(directory, name) if name else directory
            st = os.lstat(path)
            target = os.readlink(path) if stat.S_ISLNK(st.st_mode) else None
            tree[os.path.relpath(path, root)] = (st.st_mode, st.st_size, st.st_mtime_ns, target)
    return tree


def backfill(home: Path, root: Path, *, timeout: float = 120, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """`mmdet-wandb backfill ROOT` that must exit 0 and must leave the watched tree exactly as it was."""
    before = snapshot(root)
    args = ["backfill", str(root), "--no-progress"]
    try:
        if prefix:
            proc = subprocess.run(
                [*prefix, sys.executable, "-m", "mmdet_wandb.cli", *args],
                env=service_env(home), capture_output=True, text=True, timeout=timeout, cwd=REPO,
            )
        else:
            proc = cli(home, *args, check=False, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"backfill of {root} hung: still running after {timeout} s\n{exc.stderr or ''}")
    assert proc.returncode == 0, f"backfill exited {proc.returncode}; bad input must never be fatal\n{proc.stderr[-6000:]}"
    assert snapshot(root) == before, "backfill changed the watched tree"
    return proc


def work_dir_entry(state: dict, work_dir: Path) -> dict | None:
    return next((w for w in state["work_dirs"] if w["path"] == str(work_dir)), None)


def assert_uploaded_completely(home: Path, state: dict, work_dir: Path, good: list[bytes], scratch: Path) -> None:
    entry = work_dir_entry(state, work_dir)
    assert entry is not None, f"{work_dir} is not in status: {[w['path'] for w in state['work_dirs']]}"
    assert len(entry["runs"]) == 1, entry
    (run,) = entry["runs"]
    rows = len(expected(good, scratch))
    assert run["rows_uploaded"] == rows and run["rows_pending"] == 0 and run["last_error"] is None, run
    assert_history_matches(offline_run(home, run["wandb_id"]).history, expected(good, scratch))


def problems_under(state: dict, path: Path) -> list[dict]:
    prefix = str(path)
    return [p for p in state["problems"] if p["path"] == prefix or p["path"].startswith(prefix + "/")]


def logged(stderr: str, path: Path | str, kind: str, offset: int | None = None) -> bool:
    """One log line names the path, the kind and (for a line) its byte offset."""
    return any(
        str(path) in line and kind in line and (offset is None or str(offset) in line.replace(str(path), ""))
        for line in stderr.splitlines()
    )


def no_crash_traces(proc: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in proc.stderr, f"bad input must be reported, not raised:\n{proc.stderr[-6000:]}"


# ------------------------------------------------------------------------------------------- bad lines


def test_corrupt_and_non_json_lines_are_reported_at_their_offset_and_skipped(eltd, tmp_path):
    root, home = (tmp_path / "work_dirs").resolve(), tmp_path / "home"
    log = LogBuilder(root / "broken" / LOG_NAME)
    log.real(eltd[:11])
    truncated = log.inject(eltd[11][:70] + b"\n")  # a torn write: the line ends mid-object
    log.real(eltd[11:100])
    text = log.inject(b"2021-04-27 11:02:13,512 - mmdet - INFO - Saving checkpoint at 1 epochs\n")
    log.real(eltd[100:200])
    glued = log.inject(eltd[200].rstrip(b"\n") + eltd[201])  # two records on one line: a newline was lost
    log.real(eltd[202:300])
    not_object = log.inject(b"[1, 2, 3]\n")  # JSON, but no log record
    log.real(eltd[300:])
    log.write()

    proc = backfill(home, root)
    state = status(home)

    found = sorted((p["offset"], p["kind"]) for p in problems_under(state, log.path))
    assert found == [(o, "bad_line") for o in (truncated, text, glued, not_object)]
    for offset in (truncated, text, glued, not_object):
        assert logged(proc.stderr, log.path, "bad_line", offset), f"offset {offset} is not in the log:\n{proc.stderr}"
    assert state["problems"] == problems_under(state, log.path), "no other problem"
    no_crash_traces(proc)
    # every other line becomes a history row, in order, with its values
    assert_uploaded_completely(home, state, log.path.parent, log.good, tmp_path / "expected")
    assert work_dir_entry(state, log.path.parent)["problems"] == 4


def test_binary_garbage_and_a_10mb_line_are_skipped_and_later_lines_arrive(eltd, tmp_path):
    root, home = (tmp_path / "work_dirs").resolve(), tmp_path / "home"
    rng = random.Random(20210427)
    garbage = b"\x00\xff\xfe\xc3(" + rng.randbytes(4096).replace(b"\n", b"\x00") + b"\n"  # NUL, invalid UTF-8
    huge = eltd[60][:-2] + b', "pad": "' + b"x" * (10 << 20) + b'"}\n'  # a 10 MB record

    log = LogBuilder(root / "broken" / LOG_NAME)
    log.real(eltd[:6])
    first_garbage = log.inject(garbage)
    log.real(eltd[6:50])
    oversized = log.inject(huge)
    log.real(eltd[50:51])
    second_garbage = log.inject(garbage)  # right after a good line, right before the next
    log.real(eltd[51:])
    log.write()
    healthy = copy_log(eltd, root / "healthy")

    proc = backfill(home, root)
    state = status(home)

    found = sorted((p["offset"], p["kind"]) for p in problems_under(state, log.path))
    assert found == sorted(
        [(first_garbage, "bad_line"), (oversized, "oversized_line"), (second_garbage, "bad_line")]
    )
    assert logged(proc.stderr, log.path, "oversized_line", oversized)
    assert logged(proc.stderr, log.path, "bad_line", first_garbage)
    assert logged(proc.stderr, log.path, "bad_line", second_garbage)
    no_crash_traces(proc)
    assert_uploaded_completely(home, state, log.path.parent, log.good, tmp_path / "expected")
    # the healthy neighbour is untouched by its broken sibling
    assert_uploaded_completely(home, state, healthy.parent, eltd, tmp_path / "expected")
    assert problems_under(state, healthy.parent) == []


# ------------------------------------------------------------------------- a broken work_dir's neighbour


def _non_utf8_name(root: Path, eltd: list[bytes]) -> Path:
    """A work_dir whose name is not valid UTF-8 (any byte but / and NUL is a legal Linux file name)."""
    work_dir = os.fsencode(root) + b"/broken\xff\xfe"
    os.makedirs(work_dir)
    with open(work_dir + b"/" + LOG_NAME.encode(), "wb") as handle:
        handle.write(b"".join(eltd))
    return Path(os.fsdecode(work_dir))


def _fifo_text_log(root: Path, eltd: list[bytes]) -> Path:
    """A FIFO where the text log of the launch would be: opening it for reading blocks until a writer comes."""
    log = copy_log(eltd, root / "broken")
    os.mkfifo(log.parent / TEXT_LOG_NAME)
    return log.parent


@pytest.mark.parametrize("breakage", [_non_utf8_name, _fifo_text_log], ids=["non_utf8_name", "fifo_text_log"])
def test_a_healthy_work_dir_next_to_a_broken_one_is_uploaded_completely(eltd, tmp_path, breakage):
    root, home = (tmp_path / "work_dirs").resolve(), tmp_path / "home"
    root.mkdir()
    healthy = copy_log(eltd, root / "healthy")
    broken = breakage(root, eltd)

    proc = backfill(home, root, timeout=20)  # one healthy run takes a few seconds
    state = status(home)

    assert_uploaded_completely(home, state, healthy.parent, eltd, tmp_path / "expected")
    # the broken work_dir is either uploaded too or reported: never lost silently
    entry = work_dir_entry(state, broken)
    uploaded = sum(r["rows_uploaded"] for r in entry["runs"]) if entry else 0
    reported = [p for p in state["problems"] if "broken" in p["path"]]
    assert uploaded == len(eltd) - 1 or reported, f"{broken!r}: {uploaded} rows, no problem\n{proc.stderr[-4000:]}"


# ---------------------------------------------------------------------------------- unreadable input


def _unprivileged_prefix(probe_file: Path) -> tuple[str, ...]:
    """A command prefix under which a chmod 000 file cannot be read.

    Not `nobody`: the interpreter of the venv lives under /root/.pyenv (mode 700), which no other user can
    execute. Instead the process stays uid 0 but loses CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, so the kernel
    checks the owner bits like for any user: a root-owned file or directory with mode 000 is unreadable.
    """
    if os.geteuid() != 0:
        prefix: tuple[str, ...] = ()
    else:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv: cannot deny a file to the CLI")
        caps = "-dac_override,-dac_read_search"
        prefix = (setpriv, f"--bounding-set={caps}", f"--inh-caps={caps}")
    probe = subprocess.run(
        [*prefix, sys.executable, "-c", f"open({str(probe_file)!r}, 'rb')"], capture_output=True, text=True, timeout=60
    )
    if "PermissionError" not in probe.stderr:
        pytest.skip(f"cannot run the CLI without read access to a chmod 000 file here (probe: rc {probe.returncode}, "
                    f"{probe.stderr.strip()[-300:]!r})")
    return prefix


def test_unreadable_file_and_directory_are_reported_and_the_rest_uploaded(eltd, tmp_path):
    root, home = (tmp_path / "work_dirs").resolve(), tmp_path / "home"
    healthy = copy_log(eltd, root / "healthy")
    locked_file = copy_log(eltd, root / "locked_file")
    locked_dir = copy_log(eltd, root / "locked_dir").parent
    locked_file.chmod(0)
    locked_dir.chmod(0)
    try:
        prefix = _unprivileged_prefix(locked_file)
        proc = backfill(home, root, prefix=prefix)
    finally:
        locked_dir.chmod(0o755)
        locked_file.chmod(0o644)
    state = status(home)

    assert [(p["path"], p["kind"]) for p in problems_under(state, locked_file.parent)] == [(str(locked_file), "unreadable")]
    assert [(p["path"], p["kind"]) for p in problems_under(state, locked_dir)] == [(str(locked_dir), "unreadable")]
    assert logged(proc.stderr, locked_file, "unreadable") and logged(proc.stderr, locked_dir, "unreadable"), proc.stderr
    no_crash_traces(proc)
    assert_uploaded_completely(home, state, healthy.parent, eltd, tmp_path / "expected")
    assert problems_under(state, healthy.parent) == []
    for path in (locked_file.parent, locked_dir):
        entry = work_dir_entry(state, path)
        assert entry is None or entry["runs"] == [], f"nothing of {path} can have been read"


# -------------------------------------------------------------------------------------------- symlinks


@pytest.fixture(scope="module")
def symlinked(eltd, tmp_path_factory) -> dict[str, Any]:
    """One root with links out of it (a log, a work_dir, a text log), a link inside it, and a healthy work_dir."""
    base = tmp_path_factory.mktemp("symlinks").resolve()
    root, home, outside = base / "work_dirs", base / "home", base / "outside"
    secret = copy_log(eltd[:40], outside / "secret")  # must never be uploaded
    (outside / TEXT_LOG_NAME).write_text(
        "2021-04-27 10:19:00,000 - mmdet - INFO - Epoch [1][50/9999]\tlr: 1.200e-04, eta: 1 day, 0:00:00\n"
    )
    healthy = copy_log(eltd, root / "healthy")
    file_link = root / "file_link" / LOG_NAME
    file_link.parent.mkdir()
    file_link.symlink_to(secret)
    dir_link = root / "dir_link"
    dir_link.symlink_to(secret.parent, target_is_directory=True)
    inside_link = root / "alias_of_healthy"
    inside_link.symlink_to(healthy.parent, target_is_directory=True)
    text_link_log = copy_log(eltd, root / "text_link")
    text_link = text_link_log.parent / TEXT_LOG_NAME
    text_link.symlink_to(outside / TEXT_LOG_NAME)

    proc = backfill(home, root)
    return dict(
        proc=proc, state=status(home), home=home, base=base, healthy=healthy, secret=secret, file_link=file_link,
        dir_link=dir_link, inside_link=inside_link, text_link=text_link, text_link_log=text_link_log,
    )


def test_symlinks_out_of_the_root_are_reported_and_not_followed(symlinked, eltd):
    s = symlinked
    state, proc = s["state"], s["proc"]
    for link in (s["file_link"], s["dir_link"], s["text_link"]):
        found = [(p["path"], p["offset"], p["kind"]) for p in state["problems"] if p["path"] == str(link)]
        assert found == [(str(link), -1, "symlink_outside_root")], state["problems"]
        assert logged(proc.stderr, link, "symlink_outside_root"), proc.stderr
    assert not [p for p in state["problems"] if p["path"] == str(s["inside_link"])], "a link inside the root is fine"
    no_crash_traces(proc)
    # nothing of the outside file is uploaded: no work_dir for it, and every run is one of the two real copies
    paths = {w["path"] for w in state["work_dirs"] if w["runs"]}
    assert paths == {str(s["healthy"].parent), str(s["text_link_log"].parent)}, paths
    assert_uploaded_completely(s["home"], state, s["healthy"].parent, eltd, s["base"] / "expected")
    for run_files in (s["home"] / "wandb").iterdir():
        assert len(offline_run(s["home"], run_files.name).history) == len(eltd) - 1, "no row of the outside log"


def test_a_text_log_linked_out_of_the_root_is_not_read(symlinked, eltd):
    """The outside text log claims 9999 iterations per epoch; reading it would shift every iteration axis."""
    s = symlinked
    assert_uploaded_completely(s["home"], s["state"], s["text_link_log"].parent, eltd, s["base"] / "expected")
    runs = {w["path"]: w["runs"][0]["wandb_id"] for w in s["state"]["work_dirs"] if w["runs"]}
    healthy = [r.get("iter") for r in offline_run(s["home"], runs[str(s["healthy"].parent)]).history]
    linked = [r.get("iter") for r in offline_run(s["home"], runs[str(s["text_link_log"].parent)]).history]
    assert linked == healthy, (
        f"the iteration axis differs from an identical work_dir without the link (last iter {linked[-1]} vs "
        f"{healthy[-1]}): {s['text_link']} → outside was followed"
    )


# --------------------------------------------------------------------------------- empty logs


def test_empty_and_header_only_logs_make_no_run_and_no_problem(eltd, tmp_path):
    root, home = (tmp_path / "work_dirs").resolve(), tmp_path / "home"
    (root / "empty").mkdir(parents=True)
    (root / "empty" / LOG_NAME).write_bytes(b"")
    copy_log(eltd[:1], root / "header_only")
    (root / "header_no_newline").mkdir()
    (root / "header_no_newline" / LOG_NAME).write_bytes(eltd[0].rstrip(b"\n"))
    healthy = copy_log(eltd, root / "healthy")

    proc = backfill(home, root)
    state = status(home)

    assert state["problems"] == []
    no_crash_traces(proc)
    for name in ("empty", "header_only", "header_no_newline"):
        entry = work_dir_entry(state, root / name)
        assert entry is None or entry["runs"] == [], entry
    assert_uploaded_completely(home, state, healthy.parent, eltd, tmp_path / "expected")
    assert len(list((home / "wandb").iterdir())) == 1, "one offline run: the healthy one"


# ----------------------------------------------------------------------- a work_dir deleted while watched


def _wait(predicate: Callable[[], Any], timeout: float, what: str, proc: subprocess.Popen, output: Path) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            raise AssertionError(f"watch exited ({proc.returncode}) while waiting for {what}:\n{output.read_text()[-6000:]}")
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}:\n{output.read_text()[-6000:]}")


def _rows(home: Path, work_dir: Path) -> tuple[int, int] | None:
    """(uploaded, pending) rows of a work_dir's runs, None while the service has nothing for it."""
    if not (home / "wandb").is_dir():  # no segment opened yet: spare a `status` process
        return None
    entry = work_dir_entry(status(home), work_dir)
    if entry is None or not entry["runs"]:
        return None
    return sum(r["rows_uploaded"] for r in entry["runs"]), sum(r["rows_pending"] for r in entry["runs"])


def _source_states(home: Path, work_dir: Path) -> set[str]:
    """The states of the logs the service tails in a work_dir, read from its state DB."""
    with sqlite3.connect(home / "state.db") as db:
        return {state for (state,) in db.execute("SELECT state FROM sources WHERE path LIKE ?", (f"{work_dir}/%",))}


@pytest.fixture(scope="module")
def deleted_while_watched(eltd, tmp_path_factory) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("deleted").resolve()
    root, home, output = base / "work_dirs", base / "home", base / "watch.log"
    victim = copy_log(eltd, root / "victim").parent
    with open(output, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mmdet_wandb.cli", "watch", str(root), "--poll", "--scan-interval", "0.5",
             "--poll-interval", "0.2", "--segment-idle", "1", "--log-level", "INFO"],
            env=service_env(home), cwd=REPO, stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )
    try:
        before = snapshot(root)
        uploaded, pending = _wait(lambda: _rows(home, victim), 60, "the first rows of the victim", proc, output)
        in_db = uploaded + pending
        assert snapshot(root) == before, "watch changed the watched tree"
        shutil.rmtree(victim)
        deleted_at = output.stat().st_size
        _wait(lambda: _source_states(home, victim) == {"gone"}, 30, "the victim's log to be noticed gone", proc, output)
        alive_after_delete = proc.poll() is None
        after_delete = status(home)

        late = copy_log(eltd, root / "late").parent
        before = snapshot(root)
        late_rows = _wait(lambda: (_rows(home, late) or (0, 0))[0] == len(eltd) - 1, 60, "the late work_dir", proc, output)
        victim_rows = _wait(lambda: (_rows(home, victim) or (0, 1))[1] == 0, 30, "the victim's pending rows", proc, output)
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            rc = None
        assert snapshot(root) == before, "watch changed the watched tree"
        yield dict(
            home=home, base=base, victim=victim, late=late, in_db=in_db, alive_after_delete=alive_after_delete,
            after_delete=after_delete, late_rows=late_rows, victim_rows=victim_rows, rc=rc,
            log_after_delete=output.read_text(errors="replace")[deleted_at:], state=status(home),
        )
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def test_a_work_dir_deleted_while_watched_is_not_fatal_and_keeps_its_rows(deleted_while_watched, eltd):
    d = deleted_while_watched
    assert d["alive_after_delete"], "watch died when a work_dir was deleted"
    assert d["in_db"] > 0
    entry = work_dir_entry(d["after_delete"], d["victim"])
    assert entry is not None and entry["runs"], "the deleted work_dir's run is still listed"
    assert sum(r["rows_uploaded"] + r["rows_pending"] for r in entry["runs"]) == d["in_db"], "no row was dropped"
    # the rows already read still reach W&B, although their work_dir is gone
    (run,) = work_dir_entry(d["state"], d["victim"])["runs"]
    assert run["rows_uploaded"] == d["in_db"] and run["rows_pending"] == 0 and run["last_error"] is None, run
    assert len(offline_run(d["home"], run["wandb_id"]).history) == d["in_db"]
    # and a work_dir added afterwards is still picked up, completely
    assert_uploaded_completely(d["home"], d["state"], d["late"], eltd, d["base"] / "expected")
    assert d["rc"] == 0, f"watch did not exit 0 within 60 s of SIGTERM (rc {d['rc']})"


def test_a_work_dir_deleted_while_watched_is_reported(deleted_while_watched):
    """The promise lists a deleted work_dir among the bad inputs that are reported in `problems` and the log."""
    d = deleted_while_watched
    reported = problems_under(d["state"], d["victim"])
    assert reported, f"no problem recorded for the deleted {d['victim']}: {d['state']['problems']}"
    assert str(d["victim"]) in d["log_after_delete"], f"the log never mentions the deletion:\n{d['log_after_delete'][-3000:]}"

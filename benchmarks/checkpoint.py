"""Benchmark: checkpoint hashing, the disk cost of pinning, and file-complete → artifact-record latency.

A synthetic checkpoint of ``--size-mb`` MiB (default 1024) is written under one temp root (``--dir``
picks its parent: put it on the filesystem of the service's store, since pinning is a hard link). It
is a torch-format zip as ``torch.save`` lays it out (stored entries ``archive/data.pkl`` with an
mmcv-like ``meta``, ``archive/data/0`` holding the random bytes, ``archive/version``), written with
Python's zipfile so that torch is not needed; ``uploader.checkpoint_file.check_torch_zip`` accepts it.

1. Hashing. ``uploader.checkpoint_file.hash_file`` (MD5 + SHA-256 in one read, the two hashes in parallel
   threads) against ``md5sum FILE`` (a subprocess on the same file), page cache warm (the file was
   just written and is read once more before timing), ``--repeat`` rounds (default 3), the methods
   rotating their order every round; medians. Target: hash_file ≤ 1.3 × md5sum. For context the same
   rounds time a plain hashlib MD5 loop, MD5 then SHA-256 in one loop (no threads), and wandb's own
   ``md5_file_b64`` (what ``Artifact.add_file`` runs), and check that all digests agree.

2. Disk cost of pinning + an offline artifact. The checkpoint is pinned by a hard link into
   ``<root>/store`` and logged with ``policy="immutable"`` into an offline run that is already open
   (``wandb.init`` happens before, as in the service). Before the link, and after the run's exit
   record is in its ``.wandb`` file, the root is measured three ways: ``du -sb`` (apparent bytes, hard
   links counted once), statvfs free space (only indicative: other processes share the filesystem),
   and one walk that sums regular-file bytes per inode and area: the run directory (``.wandb``, logs,
   run files), ``WANDB_DATA_DIR`` (artifact staging), ``WANDB_CACHE_DIR`` and ``WANDB_CONFIG_DIR``
   (wandb-core's logs) and everything else (the work_dir, and the store with the pins). Extra bytes =
   growth of staging + growth of everything else, i.e. what pinning and the artifact cost beyond
   wandb's own files. Target: 0.

3. Latency from "file complete" to the artifact record in the offline ``.wandb`` file. The clock
   starts when the service takes up a file the writer has closed (the scanner's two-look stability
   wait comes before that and is not part of this number): open + fstat, ``check_torch_zip``, ``read_checkpoint_meta``, hard link,
   ``hash_file``, ``wandb.Artifact("run_x_model", type="model")``, add the file, ``log_artifact``,
   ``finish``; a thread polls the ``.wandb`` file (``uploader.wandb_reader.iter_records``, every 20 ms)
   from ``log_artifact`` on and records when the artifact record appears. Two variants, each in its
   own offline run and with its own link:

   - ``add_file``: ``artifact.add_file(link, name="epoch_1.pth", policy="immutable", skip_cache=True)``, which hashes
     the whole file with MD5 again (``Artifact._calculate_file_digest`` → ``md5_file_b64``);
   - ``entry``: ``uploader.wandb.artifacts.add_hashed_file``, the writer's own path: the digest hash_file
     already computed becomes the entry's digest (what ``_add_local_file`` builds from it is
     ``ArtifactManifestEntry(path=..., digest=md5_b64, size=..., local_path=link)``). wandb 0.31.0's
     ``add_file`` is ``_calculate_file_digest`` + ``_add_local_file``, and the latter (immutable
     policy, MD5 artifact) builds exactly ``ArtifactManifestEntry(path, digest, size, local_path,
     skip_cache=True, extra={})`` (skip_cache as given: no second copy in the artifact cache) and calls ``manifest.add_entry``; it also records the path in
     ``Artifact._added_local_paths``, which only ``get_added_local_path_name`` reads (media and
     tables that point into the artifact), not checkpoints.

   Soundness of ``entry`` is checked, not assumed: wandb's MD5 function is counted during both
   variants (1 call for add_file, 0 for entry); the entry built by add_file on the same link (an
   untimed, unlogged artifact) must equal ours field by field; the artifact must use the MD5 digest
   algorithm; and the two logged records must have the same artifact digest and identical manifest
   entries apart from ``local_path`` (each variant links its own path). Target: the ``entry`` variant
   reaches the ``.wandb`` file in less time than ``add_file`` minus 80 % of its add_file step (i.e.
   the second hash is really gone); reported with every step's time.

How to run (from the repository root; wandb must be installed, torch is not needed):

    .venv/bin/python -m benchmarks.checkpoint                   # 1 GiB, table
    .venv/bin/python -m benchmarks.checkpoint --size-mb 4200    # beyond 4 GiB: zip64 records
    .venv/bin/python -m benchmarks.checkpoint --dir /data/store --repeat 5 --json

By default the clock of step 3 runs through ``finish()`` and then waits for the record, as a one-shot
upload would; ``--open-run`` waits for the record while the run is still open, as the service's writer
keeps its segment open (the record then waits for ``--flush-interval``). The "finish" step's time is
then mostly that wait.

Wall times depend on other load on the machine; the table prints the CPU load average at start and
end, and each hash's CPU seconds (hash_file's CPU/wall ratio is above 1 when the two hashes overlap).
On a machine whose CPUs are saturated by other work the two hash threads cannot overlap and hash_file
costs what MD5 then SHA-256 costs; to measure as on an idle machine, run it (as root) under
``chrt -f 10`` (SCHED_FIFO: md5sum and wandb-core inherit it; the kernel's RT throttling still leaves
5 % to others). Progress goes to stderr.
Exit status: 0 when every target passes, 1 when one fails, 2 on error.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import pickle
import shutil
import stat
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import checkpoint_file
from uploader.wandb import reader as wandb_reader

MiB = 1024 * 1024
TARGET_HASH_RATIO = 1.3
TARGET_EXTRA_BYTES = 0
POLL_S = 0.02
ARTIFACT = "run_x_model"
ENTRY_NAME = "epoch_1.pth"


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- the synthetic checkpoint ------------------------------------------------------------------------


def write_checkpoint(path: Path, size_mb: int) -> None:
    """A torch-layout zip: data.pkl first, one big stored tensor file, the version record last."""
    meta = {
        "mmdet_version": "2.28.2+1a2b3c4", "CLASSES": ("person", "car"), "epoch": 1, "iter": 7330,
        "mmcv_version": "1.7.2", "time": time.asctime(), "hook_msgs": {"best_score": 0.31},
        "config": "model = dict(type='FasterRCNN')\n",
    }  # fmt: skip
    payload = size_mb * MiB
    with open(path, "wb") as raw, zipfile.ZipFile(raw, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"meta": meta, "state_dict": {}}, protocol=2))
        with zf.open("archive/data/0", "w", force_zip64=payload >= 0xFFFFFFFF) as out:
            left = payload
            while left:
                n = min(left, 8 * MiB)
                out.write(os.urandom(n))
                left -= n
        zf.writestr("archive/version", "3\n")


# --- 1. hashing --------------------------------------------------------------------------------------


def _hashlib_loop(path: Path, names: tuple[str, ...]) -> str:
    hashers = [hashlib.new(n) for n in names]
    buf = bytearray(8 * MiB)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            for h in hashers:
                h.update(view[:n])
    return hashers[0].hexdigest()


def _md5sum(path: Path) -> str:
    return subprocess.run(["md5sum", str(path)], check=True, capture_output=True, text=True).stdout.split()[0]


def _hash_file(path: Path) -> str:
    with open(path, "rb") as f:
        return checkpoint_file.hash_file(f).md5_hex


def _wandb_md5(path: Path) -> str:
    from wandb.sdk.lib.hashutil import md5_file_b64

    return base64.b64decode(md5_file_b64(str(path))).hex()


def bench_hashing(path: Path, repeat: int) -> dict[str, Any]:
    methods: dict[str, Callable[[Path], str]] = {
        "md5sum (subprocess)": _md5sum,
        "hash_file (md5+sha256, parallel)": _hash_file,
        "hashlib md5 only": lambda p: _hashlib_loop(p, ("md5",)),
        "hashlib md5 then sha256, one thread": lambda p: _hashlib_loop(p, ("md5", "sha256")),
        "wandb md5_file_b64 (add_file's hash)": _wandb_md5,
    }
    _hashlib_loop(path, ("md5",))  # warm the page cache
    wall: dict[str, list[float]] = {m: [] for m in methods}
    cpu: dict[str, list[float]] = {m: [] for m in methods}
    digests: dict[str, set[str]] = {m: set() for m in methods}
    order = list(methods)
    for r in range(repeat):
        for name in order[r % len(order) :] + order[: r % len(order)]:
            c0, t0 = time.process_time(), time.perf_counter()
            digests[name].add(methods[name](path))
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
        log(f"hash round {r + 1}/{repeat}: " + ", ".join(f"{m.split(' ')[0]} {wall[m][-1]:.2f}s" for m in methods))
    agreed = len(set().union(*digests.values())) == 1
    med = {m: statistics.median(v) for m, v in wall.items()}
    ratio = med["hash_file (md5+sha256, parallel)"] / med["md5sum (subprocess)"]
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "median_s": med,
        "digests_agree": agreed,
        "ratio": ratio,
        "pass": agreed and ratio <= TARGET_HASH_RATIO,
    }


# --- 2 + 3. pin, artifact, .wandb record -------------------------------------------------------------


def du_bytes(path: Path) -> int:
    """Apparent size of a tree, each inode once (so a hard link to an existing file adds nothing)."""
    if not path.exists():
        return 0
    return int(subprocess.run(["du", "-sb", str(path)], check=True, capture_output=True, text=True).stdout.split()[0])


def file_bytes_by_area(root: Path, areas: dict[str, Path]) -> dict[str, dict[int, int]]:
    """Regular-file sizes by inode, per area (the first that contains it, else "other"), in one walk."""
    found: dict[str, dict[int, int]] = {name: {} for name in [*areas, "other"]}
    for dirpath, _, filenames in os.walk(root):
        area = next((n for n, p in areas.items() if Path(dirpath).is_relative_to(p)), "other")
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISREG(st.st_mode):
                found[area][st.st_ino] = st.st_size
    return found


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


class RecordWatcher(threading.Thread):
    """Polls a .wandb file until it holds an artifact record with the given name."""

    def __init__(self, sync_file: Path, name: str, timeout: float) -> None:
        super().__init__(daemon=True)
        self.sync_file, self.name, self.timeout = sync_file, name, timeout
        self.found_at: float | None = None
        self.record: Any = None

    def run(self) -> None:
        deadline = time.perf_counter() + self.timeout
        while time.perf_counter() < deadline:
            if self.sync_file.exists():
                for record in wandb_reader.iter_records(self.sync_file):
                    if record.WhichOneof("record_type") == "artifact" and record.artifact.name == self.name:
                        self.found_at, self.record = time.perf_counter(), record.artifact
                        return
            time.sleep(POLL_S)


def _settings(flush_interval: float) -> Any:
    import wandb

    return wandb.Settings(
        mode="offline", console="off", silent=True, reinit="create_new", x_disable_stats=True,
        x_save_requirements=False, disable_git=True, disable_code=True,
        x_transaction_log_flush_interval=flush_interval,
    )  # fmt: skip


def run_pipeline(
    variant: str, ckpt: Path, root: Path, flush_interval: float, timeout: float, open_run: bool
) -> dict[str, Any]:
    """One offline run; the clock starts when the checkpoint is complete and stops when its record is on disk.

    ``open_run``: wait for the record before ``finish`` (as the service, which keeps the segment open,
    sees it: the record then waits for wandb-core's transaction-log flush interval).
    """
    import wandb
    from wandb.sdk.artifacts import artifact as artifact_module

    from uploader.wandb.artifacts import (
        add_hashed_file,  # the writer's own path, imported before any clock
    )

    run_dir, store = root / f"run-{variant}", root / "store" / variant
    run_dir.mkdir()
    store.mkdir(parents=True)
    t = time.perf_counter()
    run = wandb.init(project="bench-checkpoint", id=f"bench{variant.replace('_', '')}", dir=str(run_dir),
                     settings=_settings(flush_interval))  # fmt: skip
    init_s = time.perf_counter() - t
    sync_file = Path(run.settings.sync_file)
    cache = Path(os.environ["WANDB_CACHE_DIR"])
    data = Path(os.environ["WANDB_DATA_DIR"])
    areas = {"run": run_dir, "staging": data, "wandb-core": cache, "wandb-config": Path(os.environ["WANDB_CONFIG_DIR"])}
    before = {"du": du_bytes(root), "free": free_bytes(root), "files": file_bytes_by_area(root, areas)}

    md5_calls = 0
    real_md5 = artifact_module.md5_file_b64

    def counting_md5(*paths: Any) -> str:
        nonlocal md5_calls
        md5_calls += 1
        return real_md5(*paths)

    artifact_module.md5_file_b64 = counting_md5
    steps: dict[str, float] = {}
    link = store / ENTRY_NAME
    try:
        t0 = time.perf_counter()  # "file complete": the service takes up the closed file

        def step(name: str, since: float) -> float:
            now = time.perf_counter()
            steps[name] = now - since
            return now

        with open(ckpt, "rb") as f:
            st = os.fstat(f.fileno())
            mark = step("open + fstat", t0)
            check = checkpoint_file.check_torch_zip(f, st.st_size)
            assert check.ok, check.reason
            mark = step("check_torch_zip", mark)
            meta = checkpoint_file.read_checkpoint_meta(f)
            assert meta is not None
            mark = step("read_checkpoint_meta", mark)
            os.link(ckpt, link)
            mark = step("pin (hard link)", mark)
            digests = checkpoint_file.hash_file(f)
            mark = step("hash_file", mark)
        art = wandb.Artifact(ARTIFACT, type="model", metadata=checkpoint_file.summarize_meta(meta))
        mark = step("Artifact()", mark)
        if variant == "add_file":
            entry = art.add_file(str(link), name=ENTRY_NAME, policy="immutable", skip_cache=True)
        else:
            add_hashed_file(art, link, ENTRY_NAME, digests.md5_b64)
            entry = art.manifest.entries[ENTRY_NAME]
        mark = step(f"add ({variant})", mark)
        watcher = RecordWatcher(sync_file, ARTIFACT, timeout)
        watcher.start()
        run.log_artifact(art, aliases=["epoch_1"])
        mark = step("log_artifact", mark)
        if open_run:
            watcher.join(timeout)
        run.finish()
        finish_done = time.perf_counter()
        step("finish", mark)
        watcher.join(timeout)
    finally:
        artifact_module.md5_file_b64 = real_md5
    if watcher.found_at is None:
        raise RuntimeError(f"{variant}: no artifact record in {sync_file} after {timeout} s")
    wandb_reader.wait_for_exit(sync_file, timeout)
    time.sleep(1.0)  # let wandb-core write its last log lines before the second look
    after = {"du": du_bytes(root), "free": free_bytes(root), "files": file_bytes_by_area(root, areas)}
    by_area = {a: sum(after["files"][a].values()) - sum(before["files"][a].values()) for a in after["files"]}
    return {
        "variant": variant,
        "init_s": init_s,
        "steps_s": steps,
        "to_record_s": watcher.found_at - t0,
        "record_after_finish_s": watcher.found_at - finish_done,
        "wandb_md5_calls": md5_calls,
        "digest_algorithm": str(art.digest_algorithm),
        "artifact_digest": art.digest,
        "entry": entry.model_dump(),
        "record": {
            "digest": watcher.record.digest,
            "entries": [
                {"path": c.path, "digest": c.digest, "size": c.size, "local_path": c.local_path, "ref": c.ref}
                for c in watcher.record.manifest.contents
            ],
            "metadata": json.loads(watcher.record.metadata or "{}"),
        },
        "md5_b64": digests.md5_b64,
        "link": str(link),
        "disk": {
            "du_growth_bytes": after["du"] - before["du"],
            "file_growth_bytes": by_area,
            "wandb_file_bytes": sync_file.stat().st_size,
            "extra_bytes": by_area["staging"] + by_area["other"],
            "statvfs_used_bytes": before["free"] - after["free"],
            "link_nlink": os.stat(link).st_nlink,
        },
    }


def soundness(add_file: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
    """Is the precomputed-digest entry what add_file would have produced?"""
    import wandb

    link = Path(entry["link"])
    probe = wandb.Artifact("probe", type="model")  # never logged
    built_by_add_file = probe.add_file(str(link), name=ENTRY_NAME, policy="immutable", skip_cache=True).model_dump()
    same_entry = built_by_add_file == entry["entry"]

    def without_local_path(rec: dict[str, Any]) -> list[dict[str, Any]]:
        return [{k: v for k, v in e.items() if k != "local_path"} for e in rec["entries"]]

    same_record = (
        add_file["record"]["digest"] == entry["record"]["digest"]
        and without_local_path(add_file["record"]) == without_local_path(entry["record"])
        and entry["record"]["entries"][0]["local_path"] == str(link)
    )
    checks = {
        "entry equals add_file's entry (all fields)": same_entry,
        "records: same artifact digest and entries (local_path aside)": same_record,
        "digest algorithm is MD5": all("MD5" in r["digest_algorithm"] for r in (add_file, entry)),
        "wandb MD5 calls: add_file 1, entry 0": (add_file["wandb_md5_calls"], entry["wandb_md5_calls"]) == (1, 0),
        "entry digest == hash_file md5_b64": entry["record"]["entries"][0]["digest"] == entry["md5_b64"],
    }
    return {"checks": checks, "sound": all(checks.values()), "add_file_entry": built_by_add_file}


# --- report ------------------------------------------------------------------------------------------


def table(results: dict[str, Any]) -> str:
    h, runs, sound = results["hashing"], results["pipeline"], results["soundness"]
    size_mb = results["size_mb"]
    rows: list[tuple[str, str, str, str]] = []

    def add(metric: str, value: str, target: str = "", ok: bool | None = None) -> None:
        rows.append((metric, value, target, "" if ok is None else ("PASS" if ok else "FAIL")))

    for name, med in h["median_s"].items():
        cpu = statistics.median(h["cpu_s"][name])
        extra = f", cpu {cpu:.2f}s" if "subprocess" not in name else ""
        add(f"hash {size_mb} MiB: {name}", f"{med:.3f}s ({size_mb / med:.0f} MiB/s{extra})")
    add("hash_file / md5sum (medians)", f"{h['ratio']:.2f}x", f"<= {TARGET_HASH_RATIO}x", h["pass"])
    add("all hash digests agree", str(h["digests_agree"]), "True", h["digests_agree"])
    for r in runs:
        d = r["disk"]
        add(f"[{r['variant']}] wandb.init (before the clock)", f"{r['init_s']:.3f}s")
        for name, secs in r["steps_s"].items():
            add(f"[{r['variant']}]   {name}", f"{secs:.3f}s")
        add(f"[{r['variant']}] file complete -> record in .wandb", f"{r['to_record_s']:.3f}s"
            f" (record {r['record_after_finish_s']:+.3f}s after finish returned)")  # fmt: skip
        add(f"[{r['variant']}] growth: du -sb root; files in " + " / ".join(d["file_growth_bytes"]),
            f"{d['du_growth_bytes']} B; " + " / ".join(f"{v} B" for v in d["file_growth_bytes"].values())
            + f"; .wandb {d['wandb_file_bytes']} B; statvfs {d['statvfs_used_bytes']} B; nlink {d['link_nlink']}")  # fmt: skip
        add(f"[{r['variant']}] extra bytes (pin + artifact, beyond wandb's run files)", f"{d['extra_bytes']} B",
            f"== {TARGET_EXTRA_BYTES} B", d["extra_bytes"] == TARGET_EXTRA_BYTES)
    by = {r["variant"]: r for r in runs}
    saved = by["add_file"]["to_record_s"] - by["entry"]["to_record_s"]
    add_step = by["add_file"]["steps_s"]["add (add_file)"]
    add("entry variant saves (to record)", f"{saved:.3f}s (add_file's own add step {add_step:.3f}s)",
        ">= 80% of that step", saved >= 0.8 * add_step)  # fmt: skip
    for name, ok in sound["checks"].items():
        add(f"entry soundness: {name}", str(ok), "True", ok)
    widths = [max(len(r[i]) for r in rows + [("metric", "value", "target", "result")]) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(("metric", "value", "target", "result"), widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.append(f"load average at start {results['load_start']}, at end {results['load_end']}; "
                 f"{os.cpu_count()} CPUs; file {results['file_bytes']} bytes on {results['root']}")  # fmt: skip
    return "\n".join(lines)


def all_pass(results: dict[str, Any]) -> bool:
    by = {r["variant"]: r for r in results["pipeline"]}
    saved = by["add_file"]["to_record_s"] - by["entry"]["to_record_s"]
    return (
        results["hashing"]["pass"]
        and all(r["disk"]["extra_bytes"] == TARGET_EXTRA_BYTES for r in results["pipeline"])
        and saved >= 0.8 * by["add_file"]["steps_s"]["add (add_file)"]
        and results["soundness"]["sound"]
    )


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mb", type=int, default=1024, help="checkpoint size in MiB (default 1024)")
    p.add_argument("--dir", default=None, help="parent of the temp root; on the store's filesystem (default: system temp)")
    p.add_argument("--repeat", type=int, default=3, help="hashing rounds (default 3)")
    p.add_argument("--flush-interval", type=float, default=0.5,
                   help="x_transaction_log_flush_interval of the runs (default 0.5 s, the writer's default)")  # fmt: skip
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the artifact record")
    p.add_argument("--open-run", action="store_true",
                   help="wait for the record before finish(), as with the service's open segment")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="CI: a 16 MiB checkpoint, one round (that it runs, not how fast)")
    p.add_argument("--json", action="store_true", help="print machine-readable results instead of the table")
    p.add_argument("--keep", action="store_true", help="keep the temp root")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.quick:
        args.size_mb, args.repeat = 16, 1
    root = Path(tempfile.mkdtemp(prefix="bench-ckpt-", dir=args.dir))
    for var, sub in (("WANDB_DATA_DIR", "wandb-data"), ("WANDB_CACHE_DIR", "wandb-cache"), ("WANDB_CONFIG_DIR", "wandb-config")):
        os.environ[var] = str(root / sub)
        (root / sub).mkdir()
    os.environ["WANDB_MODE"] = "offline"
    for var in ("WANDB_DIR", "WANDB_API_KEY", "WANDB_RUN_ID", "WANDB_RESUME"):
        os.environ.pop(var, None)
    try:
        load_start = os.getloadavg()
        ckpt = root / "work_dir" / "epoch_1.pth"
        ckpt.parent.mkdir()
        log(f"writing a {args.size_mb} MiB checkpoint to {ckpt}")
        write_checkpoint(ckpt, args.size_mb)
        hashing = bench_hashing(ckpt, args.repeat)
        pipeline = []
        for variant in ("add_file", "entry"):
            log(f"pipeline: {variant}")
            pipeline.append(run_pipeline(variant, ckpt, root, args.flush_interval, args.timeout, args.open_run))
        by = {r["variant"]: r for r in pipeline}
        results = {
            "size_mb": args.size_mb,
            "file_bytes": ckpt.stat().st_size,
            "root": str(root),
            "hashing": hashing,
            "pipeline": pipeline,
            "soundness": soundness(by["add_file"], by["entry"]),
            "load_start": [round(x, 2) for x in load_start],
            "load_end": [round(x, 2) for x in os.getloadavg()],
        }
        print(json.dumps(results, indent=2, default=str) if args.json else table(results))
        return 0 if args.quick or all_pass(results) else 1
    except Exception as exc:  # noqa: BLE001 - a benchmark reports, it does not crash
        log(f"error: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        return 2
    finally:
        if args.keep:
            log(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

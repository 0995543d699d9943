"""Benchmark: the evaluator's inference speed against mmdet's own test loop, and the bytes of a prediction table.

Data. A synthetic COCO val set of ``--val-size`` images (default: ``--num-images``) is drawn with the tests'
maker (``tests.mmdet_run.dataset.make_coco``, seed ``--seed``) at ``--image-size`` px (default 560: square
images, about the pixel count of COCO's 640x480), and its PNGs are re-encoded as JPEG (``--jpeg-quality``,
default 95: ~150 KB an image, about COCO val2017's mean of ~160 KB) with the annotation file's names
rewritten, as COCO ships JPEGs. The models are the tests' cached tiny detectors
(``tests.mmdet_run.fixtures.cached_work_dir``; the first use trains them, ~1 min each): the last
``--checkpoints`` epoch checkpoints of each are copied into a temp work_dir, with the dataset paths inside
``meta['config']`` (the config the evaluator reads) pointed at the new val set, next to the work_dir's log
and config dump (paths rewritten too) so that ``backfill`` finds the run. The models' test scale stays as in
their configs (``img_scale=(128, 128)``, ``keep_ratio=True``): every image is decoded at full size and
resized to 128x128 before the model sees it.

1. Throughput. ``evaluator.mmdet2.evaluate(job, device, batch_size)`` ("ours", ``--batch-size``, default 8)
   against mmdet 2.28's test loop set up the way ``tools/test.py`` does it ("baseline": ``compat_cfg``,
   ``setup_multi_processes``, ``test_mode``, the test loader defaults ``samples_per_gpu=1`` and the config's
   ``workers_per_gpu``, pretrained weights off, ``load_checkpoint``, CLASSES from the checkpoint,
   ``build_dp(model, device, device_ids=[0])``, ``mmdet.apis.single_gpu_test``, then ``dataset.evaluate``
   with the config's evaluation options). Same checkpoint (the last one), same config (the checkpoint's),
   same val images: the baseline's dataset is ``data.val`` restricted to ``common.records.subset_indices``
   in that order (data_infos and img_ids, as a val annotation file with just those images would be).
   Each side lives in its own long-lived process (tools/test.py's process-wide settings, e.g.
   ``cv2.setNumThreads(0)``, stay on its side); after one untimed warm-up call each (a few images), the
   two are called in turn ``--repeat`` times (default 3, the order alternating), on CPU, and on ``cuda:0``
   as well when ``torch.cuda.is_available()``. Each process runs ``--threads`` torch/OpenMP threads
   (default 1). On a machine that other work shares, more OpenMP threads than free cores make every
   parallel region wait for a descheduled thread: a 2-thread run on 2 busy cores was seen to swing 10x
   from one call to the next, while 1-thread runs agree within a few %. ``--threads 0`` keeps torch's
   default (one per core), as the worker runs; use it on an idle machine. Reported, as medians:

   - inference images/s: ours ``n / EvalOutcome.seconds`` (the inference loop), baseline
     ``n / single_gpu_test`` wall time; ratio ours/baseline. Targets: >= 1.0 on CPU, >= 1.5 on GPU.
   - end to end images/s: the whole ``evaluate`` call (config, dataset, the manifest: every val image read
     and decoded once more, the ground truth as RLE; model, inference, predictions, COCO metrics and the
     insight: per-class metrics, PR curves, confusion matrix, per-image errors) against the baseline's config +
     dataset + loader + model + test + ``evaluate(classwise=True)``. Target >= 1.0: the added insight must not
     make a job slower than mmdet's own test and class-wise evaluation (issue 24).
   - the process CPU seconds of the two inference loops (all threads);
   - where the time goes, per phase, and a soundness check: per image, the number of boxes above the
     score threshold and the sum of their scores must agree between the two sides (at most 2 % of the
     images may differ, else the row fails).

2. Bytes per prediction artifact. The real CLI, end to end, on each detector's temp work_dir, in a fresh
   data dir with W&B offline: ``python -m mmdet_wandb.cli backfill ROOT --data-dir D --evaluate
   --num-eval-images N --batch-size B --no-progress`` (one eval job per copied checkpoint). The offline run's
   ``.wandb`` file is read back with ``uploader.wandb_reader.read_run``: for the ``val`` artifact (type
   dataset) and every ``run_<id>_pred`` artifact (type evaluation) the local (non-reference) manifest entries
   are summed, by kind (table JSON, masks, images); each entry's staged file is stat'ed as well.
   Target: each prediction artifact's local bytes <= 2 % of the val artifact's.

How to run (from the repository root, with the eval stack installed):

    .venv/bin/python -m benchmarks.evaluator2                          # both detectors, 100 images, batch 8
    .venv/bin/python -m benchmarks.evaluator2 --detectors retinanet --batch-size 4 --repeat 5
    .venv/bin/python -m benchmarks.evaluator2 --skip-bytes --json
    .venv/bin/python -m benchmarks.evaluator2 --threads 0                # torch's default threads (idle machine)

Progress goes to stderr; ``--keep`` keeps the temp dir (children's logs, the CLI's data dir).
Exit status: 0 when every target passes, 1 when one fails, 2 on error.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

from benchmarks.report import exit_cleanly_on_sigterm, finite, isolated_env  # noqa: E402

DETECTORS = {"retinanet": "retinanet_epoch", "maskrcnn": "maskrcnn_epoch"}
TARGET_CPU_RATIO = 1.0
TARGET_GPU_RATIO = 1.5
TARGET_BYTES_RATIO = 0.02
TARGET_TOTAL_RATIO = 1.0  # the whole call with the insight against single_gpu_test + evaluate(classwise=True)
BBOX_SCORE_THR = 0.3  # the CLI's default --bbox-score-thr
COCO_VAL2017_MEAN_JPEG_BYTES = 161_000  # val2017: 5000 images, ~788 MiB (for the report only)
OURS_PHASES = ("load_config", "build_val_dataset", "build_manifest", "build_model", "take_subset", "run_inference",
               "to_detections", "subset_metrics", "ground_truth", "compute")  # compute: evaluator/insight.py
BASELINE_PHASES = ("config", "dataset", "dataloader", "model", "single_gpu_test", "evaluate")
HOOK_KEYS_TEST_PY_DROPS = ("interval", "tmpdir", "start", "gpu_collect", "save_best", "rule", "dynamic_intervals")


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class BenchError(RuntimeError):
    pass


# --------------------------------------------------------------------------------------------------------
# Preparation: the val set and the work_dirs.
# --------------------------------------------------------------------------------------------------------


def make_val_set(root: Path, n: int, size: int, seed: int, quality: int) -> dict[str, Any]:
    """make_coco's val split (no train images), its PNGs re-encoded as JPEG and renamed in the annotations."""
    from PIL import Image

    from tests.mmdet_run import dataset

    paths = dataset.make_coco(root, n_train=0, n_val=n, size=size, seed=seed)
    ann = json.loads(paths.val_ann.read_text(encoding="utf-8"))
    png_bytes = jpg_bytes = 0
    for image in ann["images"]:
        png = paths.val_img_dir / image["file_name"]
        jpg = png.with_suffix(".jpg")
        with Image.open(png) as img:
            img.convert("RGB").save(jpg, format="JPEG", quality=quality)
        png_bytes += png.stat().st_size
        jpg_bytes += jpg.stat().st_size
        png.unlink()
        image["file_name"] = jpg.name
    paths.val_ann.write_text(json.dumps(ann) + "\n", encoding="utf-8")
    return {"root": str(paths.root), "images": n, "size": size, "jpeg_quality": quality,
            "mean_jpeg_bytes": jpg_bytes / n, "mean_png_bytes": png_bytes / n}


def _epoch(path: Path) -> int:
    return int(path.stem.split("_")[-1])


def prepare_work_dir(kind: str, data_root: Path, dest: Path, n_checkpoints: int) -> dict[str, Any]:
    """A copy of the cached work_dir of `kind` under `dest`, pointed at the benchmark's val set."""
    import torch

    from tests.mmdet_run import fixtures

    source = fixtures.cached_work_dir(kind)
    old_root = str(fixtures.cached_dataset().root)
    new_root = str(data_root)
    work_dir = dest / source.name
    work_dir.mkdir(parents=True)
    for item in sorted(source.iterdir()):
        if item.is_file() and not item.is_symlink() and item.suffix in (".py", ".json", ".log"):
            text = item.read_text(encoding="utf-8")
            (work_dir / item.name).write_text(text.replace(old_root, new_root), encoding="utf-8")
    epochs = sorted((p for p in source.glob("epoch_*.pth") if not p.is_symlink()), key=_epoch)[-n_checkpoints:]
    if not epochs:
        raise BenchError(f"{source}: no epoch_*.pth")
    for path in epochs:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        config = checkpoint["meta"]["config"]
        if old_root not in config:
            raise BenchError(f"{path}: meta['config'] does not mention the cached dataset {old_root}")
        checkpoint["meta"]["config"] = config.replace(old_root, new_root)
        torch.save(checkpoint, work_dir / path.name)
    return {"kind": kind, "source": str(source), "work_dir": str(work_dir), "checkpoints": [p.name for p in epochs],
            "checkpoint": str(work_dir / epochs[-1].name)}


# --------------------------------------------------------------------------------------------------------
# Throughput children: one long-lived process per side, driven over stdin/stdout.
# --------------------------------------------------------------------------------------------------------


class _Phases:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

        self.cpu_seconds: dict[str, float] = {}

    def wrap(self, owner: Any, name: str) -> None:
        original = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            t, c = time.perf_counter(), time.process_time()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t
                self.cpu_seconds[name] = self.cpu_seconds.get(name, 0.0) + time.process_time() - c

        setattr(owner, name, timed)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _child_ours(spec: dict[str, Any]) -> Any:
    from db.jobs import ClaimedJob
    from evaluator import insight, mmdet2

    phases = _Phases()
    for name in OURS_PHASES:
        phases.wrap(insight if name == "compute" else mmdet2, name)

    def run(n: int) -> dict[str, Any]:
        phases.seconds.clear()
        phases.cpu_seconds.clear()
        job = ClaimedJob(id=1, attempts=1, stack="mmdet2", checkpoint_path=spec["checkpoint"], work_dir=spec["work_dir"],
                         config_name=None, config_text=None, num_eval_images=n, bbox_score_thr=BBOX_SCORE_THR)
        _sync(spec["device"])
        t = time.perf_counter()
        outcome = mmdet2.evaluate(job, spec["device"], spec["batch_size"])
        _sync(spec["device"])
        total = time.perf_counter() - t
        return {
            "images": len(outcome.predictions), "seconds": outcome.seconds, "total": total,
            "cpu_seconds": phases.cpu_seconds["run_inference"],
            "phases": dict(phases.seconds), "metrics": outcome.metrics,
            "summary": [[len(p.boxes), round(sum(p.scores or []), 3)] for p in outcome.predictions],
        }

    return run


def _child_baseline(spec: dict[str, Any]) -> Any:
    """mmdet 2.28's tools/test.py, non-distributed, on data.val restricted to the subset."""
    import torch
    from mmcv import Config
    from mmcv.runner import load_checkpoint, wrap_fp16_model
    from mmdet.apis import single_gpu_test
    from mmdet.datasets import build_dataloader, build_dataset, replace_ImageToTensor
    from mmdet.models import build_detector
    from mmdet.utils import (
        build_dp,
        compat_cfg,
        replace_cfg_vals,
        setup_multi_processes,
        update_data_root,
    )

    from common import checkpoint_file
    from common.records import subset_indices
    from evaluator.mmdet2 import take_subset

    with open(spec["checkpoint"], "rb") as handle:
        config_text = checkpoint_file.read_checkpoint_meta(handle)["config"]  # the config ours evaluates with
    config_file = Path(spec["config_file"])  # tools/test.py reads a config file (replace_cfg_vals needs one)
    config_file.write_text(config_text, encoding="utf-8")
    device = spec["device"]
    state = {"setup": False}

    def run(n: int) -> dict[str, Any]:
        phases: dict[str, float] = {}
        _sync(device)
        t0 = t = time.perf_counter()

        def mark(name: str) -> None:
            nonlocal t
            now = time.perf_counter()
            phases[name] = now - t
            t = now

        cfg = Config.fromfile(str(config_file))
        cfg = replace_cfg_vals(cfg)
        update_data_root(cfg)
        cfg = compat_cfg(cfg)
        if not state["setup"]:  # process-wide, once per process as in tools/test.py
            setup_multi_processes(cfg)
            state["setup"] = True
        if cfg.get("cudnn_benchmark", False):
            torch.backends.cudnn.benchmark = True
        if "pretrained" in cfg.model:
            cfg.model.pretrained = None
        elif "init_cfg" in cfg.model.backbone:
            cfg.model.backbone.init_cfg = None
        cfg.gpu_ids = [0]
        cfg.device = "cuda" if device.startswith("cuda") else "cpu"  # mmdet.utils.get_device()
        test_dataloader_default_args = dict(samples_per_gpu=1, workers_per_gpu=2, dist=False, shuffle=False)
        cfg.data.val.test_mode = True
        if cfg.data.test_dataloader.get("samples_per_gpu", 1) > 1:
            cfg.data.val.pipeline = replace_ImageToTensor(cfg.data.val.pipeline)
        test_loader_cfg = {**test_dataloader_default_args, **cfg.data.get("test_dataloader", {})}
        mark("config")
        dataset = build_dataset(cfg.data.val)
        subset = take_subset(dataset, subset_indices(len(dataset), min(n, len(dataset))))
        mark("dataset")
        data_loader = build_dataloader(subset, **test_loader_cfg)
        mark("dataloader")
        cfg.model.train_cfg = None
        model = build_detector(cfg.model, test_cfg=cfg.get("test_cfg"))
        if cfg.get("fp16", None) is not None:
            wrap_fp16_model(model)
        checkpoint = load_checkpoint(model, spec["checkpoint"], map_location="cpu", logger="silent")
        model.CLASSES = checkpoint.get("meta", {}).get("CLASSES") or dataset.CLASSES
        if cfg.device == "cuda":  # mmcv 1.7's scatter needs this under torch 2.x, for mmdet's own loop too
            from evaluator.mmdet2 import pass_gpu_ids_as_torch_devices

            pass_gpu_ids_as_torch_devices()
        model = build_dp(model, cfg.device, device_ids=cfg.gpu_ids)
        mark("model")
        _sync(device)
        t_test, c_test = time.perf_counter(), time.process_time()
        outputs = single_gpu_test(model, data_loader)
        _sync(device)
        seconds, cpu_seconds = time.perf_counter() - t_test, time.process_time() - c_test
        mark("single_gpu_test")
        eval_kwargs = cfg.get("evaluation", {}).copy()
        for key in HOOK_KEYS_TEST_PY_DROPS:
            eval_kwargs.pop(key, None)
        with contextlib.redirect_stdout(io.StringIO()):
            metrics = subset.evaluate(outputs, logger="silent", classwise=True, **eval_kwargs)  # what ours computes too
        mark("evaluate")
        total = time.perf_counter() - t0
        summary = []
        for result in outputs:
            bbox = result[0] if isinstance(result, tuple) else result
            scores = [float(s) for per_class in bbox for s in per_class[:, 4] if s > BBOX_SCORE_THR]
            summary.append([len(scores), round(sum(round(s, 4) for s in scores), 3)])
        return {"images": len(outputs), "seconds": seconds, "total": total, "phases": phases, "cpu_seconds": cpu_seconds,
                "metrics": {k: float(v) if isinstance(v, (int, float)) else str(v) for k, v in metrics.items()},
                "summary": summary}

    return run


def child_main(kind: str, spec_path: str) -> int:
    """Set up, say @@READY, then one JSON result line per {"n": N} line on stdin, until EOF."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # everything else printed (mmcv's progress bar, warnings) goes to the child's log
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    try:
        import torch

        if spec.get("threads"):
            torch.set_num_threads(spec["threads"])
        run = _child_ours(spec) if kind == "ours" else _child_baseline(spec)
    except Exception:
        proto.write("@@ERROR " + json.dumps(traceback.format_exc()) + "\n")
        return 2
    proto.write("@@READY\n")
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            result = run(int(json.loads(line)["n"]))
            result["torch_threads"] = torch.get_num_threads()
            proto.write("@@RESULT " + json.dumps(result) + "\n")
        except Exception:
            proto.write("@@ERROR " + json.dumps(traceback.format_exc()) + "\n")
    return 0


def thread_env(threads: int | None) -> dict[str, str]:
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else {}


class Child:
    def __init__(self, kind: str, spec: dict[str, Any], work: Path, timeout: float) -> None:
        self.kind, self.timeout = kind, timeout
        spec_path = work / f"{kind}.spec.json"
        spec_path.write_text(json.dumps(spec), encoding="utf-8")
        self.log_path = work / f"{kind}.log"
        self._log = open(self.log_path, "wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **thread_env(spec.get("threads"))}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.evaluator2", "--_child", kind, "--_spec", str(spec_path)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, cwd=REPO, env=env, text=True,
        )

    def _reply(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"{self.kind} child: no answer within {timeout:.0f} s (log: {self.log_path})")
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if not ready:
                continue
            line = self.proc.stdout.readline()
            if not line:
                tail = self.log_path.read_text(errors="replace")[-3000:]
                raise BenchError(f"{self.kind} child exited ({self.proc.poll()}):\n{tail}")
            if line.startswith("@@ERROR "):
                raise BenchError(f"{self.kind} child failed:\n{json.loads(line[8:])}")
            if line.startswith("@@"):
                return line.rstrip("\n")

    def ready(self) -> None:
        if self._reply(self.timeout) != "@@READY":
            raise BenchError(f"{self.kind} child: unexpected greeting")

    def call(self, n: int) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"n": n}) + "\n")
        self.proc.stdin.flush()
        reply = self._reply(self.timeout)
        if not reply.startswith("@@RESULT "):
            raise BenchError(f"{self.kind} child: unexpected reply {reply[:80]}")
        return json.loads(reply[len("@@RESULT "):])

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if self.proc.stdin:
                self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)
        self._log.close()


def bench_throughput(args: argparse.Namespace, detector: str, prepared: dict[str, Any], device: str,
                     tmp: Path) -> dict[str, Any]:
    work = tmp / f"throughput-{detector}-{device.replace(':', '')}"
    work.mkdir()
    base = {"checkpoint": prepared["checkpoint"], "work_dir": prepared["work_dir"], "device": device,
            "batch_size": args.batch_size, "config_file": str(work / "checkpoint_config.py"), "threads": args.threads}
    children = {kind: Child(kind, base, work, args.timeout) for kind in ("ours", "baseline")}
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "baseline": []}
    try:
        for child in children.values():
            child.ready()
        warm_n = min(args.num_images, max(2, 2 * args.batch_size))
        for kind, child in children.items():
            t = time.perf_counter()
            child.call(warm_n)
            log(f"{detector}/{device}: {kind} warm-up ({warm_n} images) {time.perf_counter() - t:.1f} s")
        for rep in range(args.repeat):
            order = ("ours", "baseline") if rep % 2 == 0 else ("baseline", "ours")
            for kind in order:
                result = children[kind].call(args.num_images)
                runs[kind].append(result)
                log(f"{detector}/{device}: rep {rep + 1}/{args.repeat} {kind:8s} inference {result['seconds']:.2f} s "
                    f"(CPU {result['cpu_seconds']:.2f} s), whole call {result['total']:.2f} s ({result['images']} images), "
                    f"load {os.getloadavg()[0]:.2f}")
    finally:
        for child in children.values():
            child.close()
    images = runs["ours"][0]["images"]
    if any(r["images"] != images for rs in runs.values() for r in rs):
        raise BenchError(f"{detector}/{device}: the two sides did not see the same number of images")
    med = {k: statistics.median(r["seconds"] for r in rs) for k, rs in runs.items()}
    med_cpu = {k: statistics.median(r["cpu_seconds"] for r in rs) for k, rs in runs.items()}
    med_total = {k: statistics.median(r["total"] for r in rs) for k, rs in runs.items()}
    phases = {k: {p: statistics.median(r["phases"].get(p, 0.0) for r in rs) for p in names}
              for (k, rs), names in zip(runs.items(), (OURS_PHASES, BASELINE_PHASES))}
    ours_sum, base_sum = runs["ours"][-1]["summary"], runs["baseline"][-1]["summary"]
    count_diff = sum(1 for a, b in zip(ours_sum, base_sum) if a[0] != b[0])
    score_diff = max((abs(a[1] - b[1]) for a, b in zip(ours_sum, base_sum) if a[0] == b[0]), default=0.0)
    ratio = med["baseline"] / med["ours"]
    target = TARGET_GPU_RATIO if device.startswith("cuda") else TARGET_CPU_RATIO
    same = count_diff <= max(1, len(ours_sum) // 50)
    return {
        "detector": detector, "device": device, "images": images, "batch_size": args.batch_size,
        "torch_threads": runs["ours"][0]["torch_threads"],
        "ours_s": med["ours"], "baseline_s": med["baseline"],
        "ours_ips": images / med["ours"], "baseline_ips": images / med["baseline"], "ratio": ratio,
        "target": target, "pass": ratio >= target and same and med_total["baseline"] / med_total["ours"] >= TARGET_TOTAL_RATIO,
        "ours_total_s": med_total["ours"], "baseline_total_s": med_total["baseline"],
        "ours_total_ips": images / med_total["ours"], "baseline_total_ips": images / med_total["baseline"],
        "total_ratio": med_total["baseline"] / med_total["ours"],
        "ours_cpu_s": med_cpu["ours"], "baseline_cpu_s": med_cpu["baseline"], "cpu_ratio": med_cpu["baseline"] / med_cpu["ours"],
        "ours_all_s": [r["seconds"] for r in runs["ours"]], "baseline_all_s": [r["seconds"] for r in runs["baseline"]],
        "ours_all_total_s": [r["total"] for r in runs["ours"]],
        "baseline_all_total_s": [r["total"] for r in runs["baseline"]],
        "phases": phases, "images_with_other_box_count": count_diff, "max_score_sum_diff": score_diff,
        "same_predictions": same, "ours_metrics": runs["ours"][-1]["metrics"],
        "baseline_metrics": runs["baseline"][-1]["metrics"],
    }


# --------------------------------------------------------------------------------------------------------
# Bytes per prediction artifact: the CLI, end to end.
# --------------------------------------------------------------------------------------------------------


#: The evaluation insight's tables (uploader/wandb/insight.py): their size grows with the classes, not the images, so
#: they are shown apart and left out of the ratio, which is about image bytes not copied.
INSIGHT_TABLES = ("classwise.table.json", "pr_curves.table.json", "confusion_matrix.table.json")


def _entry_kind(path: str) -> str:
    if path in INSIGHT_TABLES:
        return "insight"
    if path.endswith(".table.json"):
        return "table"
    if "mask" in path:
        return "masks"
    return "images"


def _artifact_bytes(artifact: Any) -> dict[str, Any]:
    local = [e for e in artifact.entries if not e["ref"]]
    by_kind: dict[str, int] = {"table": 0, "masks": 0, "images": 0, "insight": 0}
    files: dict[str, int] = {"table": 0, "masks": 0, "images": 0, "insight": 0}
    on_disk, missing, inodes = 0, 0, set()
    for entry in local:
        kind = _entry_kind(entry["path"])
        by_kind[kind] += int(entry["size"] or 0)
        files[kind] += 1
        if entry["local_path"] and os.path.exists(entry["local_path"]):
            st = os.stat(entry["local_path"])
            if st.st_ino not in inodes:
                inodes.add(st.st_ino)
                on_disk += st.st_size
        else:
            missing += 1
    return {"name": artifact.name, "type": artifact.type, "aliases": sorted(artifact.aliases),
            "local_entries": len(local), "ref_entries": len(artifact.entries) - len(local),
            "local_bytes": sum(by_kind.values()) - by_kind["insight"], "bytes_by_kind": by_kind, "files_by_kind": files,
            "staged_bytes_on_disk": on_disk, "staged_files_missing": missing}


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def bench_bytes(args: argparse.Namespace, detector: str, prepared: dict[str, Any], root: Path,
                tmp: Path) -> dict[str, Any]:
    from uploader.wandb import reader as wandb_reader

    home = tmp / f"cli-{detector}"
    data_dir = home / "data"
    home.mkdir()
    cmd = [sys.executable, "-m", "mmdet_wandb.cli", "backfill", str(root), "--data-dir", str(data_dir), "--evaluate",
           "--num-eval-images", str(args.num_images), "--batch-size", str(args.batch_size), "--no-progress"]
    shown = ["python", "-m", "mmdet_wandb.cli", "backfill", "ROOT", "--data-dir", "D", *cmd[7:]]
    log(f"{detector}: {' '.join(shown)} ({len(prepared['checkpoints'])} checkpoint(s))")
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env={**isolated_env(home), **thread_env(args.threads)}, cwd=REPO, capture_output=True, text=True,
                              timeout=args.timeout)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"{detector}: backfill timed out after {args.timeout:.0f} s") from exc
    seconds = time.perf_counter() - t
    (home / "backfill.log").write_text(proc.stdout + proc.stderr, encoding="utf-8")
    if proc.returncode != 0:
        raise BenchError(f"{detector}: backfill exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-4000:]}")
    files = wandb_reader.find_run_files(data_dir)
    vals, preds = [], []
    for path in files:
        for artifact in wandb_reader.read_run(path).artifacts:
            if artifact.type == "dataset" and artifact.name == "val":
                vals.append(_artifact_bytes(artifact))
            elif artifact.type == "evaluation" and artifact.name.endswith("_pred"):
                preds.append(_artifact_bytes(artifact))
    if len(vals) != 1 or len(preds) != len(prepared["checkpoints"]):
        raise BenchError(f"{detector}: {len(vals)} val and {len(preds)} prediction artifact(s) in {len(files)} run "
                         f"file(s), expected 1 and {len(prepared['checkpoints'])} (log: {home / 'backfill.log'})")
    val = vals[0]
    for pred in preds:
        pred["ratio"] = pred["local_bytes"] / val["local_bytes"]
        pred["pass"] = pred["ratio"] <= TARGET_BYTES_RATIO
    return {"detector": detector, "command": " ".join(shown), "seconds": seconds, "run_files": len(files),
            "val": val, "predictions": preds, "media_cache_bytes": _tree_bytes(data_dir / "media"),
            "pass": all(p["pass"] for p in preds)}


# --------------------------------------------------------------------------------------------------------
# Report.
# --------------------------------------------------------------------------------------------------------


def render(report: dict[str, Any]) -> str:
    lines = []
    data = report["data"]
    lines.append(f"val set: {data['images']} synthetic images {data['size']}x{data['size']}, JPEG quality "
                 f"{data['jpeg_quality']}, mean {data['mean_jpeg_bytes'] / 1000:.0f} kB (COCO val2017: "
                 f"~{COCO_VAL2017_MEAN_JPEG_BYTES / 1000:.0f} kB); models' test scale (128, 128), keep_ratio")
    if report.get("throughput"):
        lines.append("")
        lines.append(f"1. Inference throughput: median of {report['repeat']} alternating calls per side, "
                     f"{report['num_images']} images, same subset, same checkpoint")
        lines.append(f"   ours = evaluator.mmdet2.evaluate(batch_size={report['batch_size']}), its `seconds`; "
                     "baseline = tools/test.py set-up + mmdet.apis.single_gpu_test (samples_per_gpu=1); "
                     f"torch threads per process: {report['throughput'][0]['torch_threads']}")
        head = (f"   {'detector':10s} {'device':7s} {'ours img/s':>10s} {'base img/s':>10s} {'ratio':>6s} {'target':>7s}"
                f"       | whole call: {'ours img/s':>10s} {'base img/s':>10s} {'ratio':>6s} (target >= {TARGET_TOTAL_RATIO:.1f})")
        lines += [head, "   " + "-" * (len(head) - 3)]
        for e in report["throughput"]:
            verdict = "PASS" if e["pass"] else "FAIL"
            lines.append(f"   {e['detector']:10s} {e['device']:7s} {e['ours_ips']:10.1f} {e['baseline_ips']:10.1f} "
                         f"{e['ratio']:6.2f} {'>=' + format(e['target'], '.1f'):>7s} {verdict:5s} | "
                         f"{'':12s}{e['ours_total_ips']:10.1f} {e['baseline_total_ips']:10.1f} {e['total_ratio']:6.2f}")
        lines.append("   inference CPU seconds (all threads of the process):")
        for e in report["throughput"]:
            lines.append(f"     {e['detector']:10s} {e['device']:7s} ours {e['ours_cpu_s']:.2f} s, baseline "
                         f"{e['baseline_cpu_s']:.2f} s: baseline/ours {e['cpu_ratio']:.2f}")
        lines.append("   each call (s): inference loop / whole call")
        for e in report["throughput"]:
            lines.append(f"     {e['detector']:10s} {e['device']:7s} ours {' '.join(f'{s:.2f}' for s in e['ours_all_s'])}"
                         f" / {' '.join(f'{s:.2f}' for s in e['ours_all_total_s'])}   baseline "
                         f"{' '.join(f'{s:.2f}' for s in e['baseline_all_s'])} / "
                         f"{' '.join(f'{s:.2f}' for s in e['baseline_all_total_s'])}")
        lines.append("   where the time goes (median s):")
        for e in report["throughput"]:
            o, b = e["phases"]["ours"], e["phases"]["baseline"]
            lines.append(f"     {e['detector']:10s} {e['device']:7s} ours: " + ", ".join(f"{k} {v:.2f}" for k, v in o.items()))
            lines.append(f"     {'':10s} {'':7s} base: " + ", ".join(f"{k} {v:.2f}" for k, v in b.items()))
        lines.append("   same predictions (boxes above the score threshold, per image):")
        for e in report["throughput"]:
            key = next((k for k in e["ours_metrics"] if k.endswith("bbox_mAP")), None)
            mAP = f"bbox_mAP ours {e['ours_metrics'].get(key)} baseline {e['baseline_metrics'].get(key)}" if key else ""
            lines.append(f"     {e['detector']:10s} {e['device']:7s} images with another box count: "
                         f"{e['images_with_other_box_count']}, max score-sum difference {e['max_score_sum_diff']:.3f}; {mAP}")
    if report.get("bytes"):
        lines.append("")
        lines.append(f"2. Local bytes per prediction artifact vs the val artifact (target <= {TARGET_BYTES_RATIO:.0%})")
        for e in report["bytes"]:
            v = e["val"]
            lines.append(f"   {e['detector']}: `{e['command']}` took {e['seconds']:.1f} s")
            lines.append(f"     {'artifact':34s} {'local files':>11s} {'refs':>5s} {'bytes':>11s} {'table':>9s} "
                         f"{'masks':>9s} {'images':>10s} {'on disk':>11s} {'insight':>9s} {'ratio':>7s}")

            def row(a: dict[str, Any], ratio: str) -> str:
                k = a["bytes_by_kind"]
                return (f"     {(a['name'] + ' (' + a['type'] + ')')[:34]:34s} {a['local_entries']:11d} "
                        f"{a['ref_entries']:5d} {a['local_bytes']:11,d} {k['table']:9,d} {k['masks']:9,d} "
                        f"{k['images']:10,d} {a['staged_bytes_on_disk']:11,d} {k['insight']:9,d} {ratio}")

            lines.append(row(v, ""))
            for p in e["predictions"]:
                lines.append(row(p, f"{p['ratio']:7.2%}  {'PASS' if p['pass'] else 'FAIL'}  {','.join(p['aliases'])}"))
            lines.append(f"     (media cache written once per manifest under the data dir: {e['media_cache_bytes']:,d} bytes)")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--detectors", default="retinanet,maskrcnn", help="comma list of: " + ", ".join(DETECTORS))
    p.add_argument("--num-images", type=int, default=100, help="val images evaluated (num_eval_images; default 100)")
    p.add_argument("--batch-size", type=int, default=8, help="our evaluator's batch size (default 8)")
    p.add_argument("--val-size", type=int, default=None, help="images in the val set (default: --num-images)")
    p.add_argument("--image-size", type=int, default=560, help="side of the square val images (default 560)")
    p.add_argument("--jpeg-quality", type=int, default=95, help="JPEG quality of the val images (default 95)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic val set")
    p.add_argument("--checkpoints", type=int, default=2, help="last epoch checkpoints per work_dir (default 2)")
    p.add_argument("--repeat", type=int, default=3, help="timed calls per side (default 3)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch/OpenMP threads of each measuring process (default 1; 0: torch's default, one per core)")
    p.add_argument("--devices", default=None, help="comma list (default: cpu, plus cuda:0 when available)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds allowed to one call / one CLI run")
    p.add_argument("--quick", action="store_true", help="CI: RetinaNet, 8 images of 128 px, one call, CPU (that it runs, not how fast)")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--skip-bytes", action="store_true")
    p.add_argument("--json", action="store_true", help="print machine-readable results instead of the table")
    p.add_argument("--keep", action="store_true", help="keep the temp dir")
    p.add_argument("--_child", choices=("ours", "baseline"), help=argparse.SUPPRESS)
    p.add_argument("--_spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child:
        return args
    if args.quick:
        args.detectors, args.num_images, args.image_size, args.repeat, args.checkpoints, args.devices = "retinanet", 8, 128, 1, 1, "cpu"
    args.detectors = [d.strip() for d in args.detectors.split(",") if d.strip()]
    unknown = [d for d in args.detectors if d not in DETECTORS]
    if unknown:
        p.error(f"unknown detector(s) {unknown}; known: {', '.join(DETECTORS)}")
    if args.threads < 0:
        p.error("--threads must be 0 (torch's default) or more")
    if min(args.num_images, args.batch_size, args.repeat, args.checkpoints, args.image_size) < 1:
        p.error("--num-images, --batch-size, --repeat, --checkpoints and --image-size must be positive")
    args.val_size = args.val_size or args.num_images
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args._child:
        return child_main(args._child, args._spec)
    exit_cleanly_on_sigterm()
    tmp = Path(tempfile.mkdtemp(prefix="mmdet-wandb-bench-eval-"))
    report: dict[str, Any] = {"repeat": args.repeat, "num_images": args.num_images, "batch_size": args.batch_size,
                              "python": sys.version.split()[0], "cpus": os.cpu_count()}
    started = time.perf_counter()
    report["load_start"] = os.getloadavg()
    try:
        import torch

        devices = args.devices.split(",") if args.devices else ["cpu"] + (["cuda:0"] if torch.cuda.is_available() else [])
        report["devices"] = devices
        report["threads"] = args.threads
        t = time.perf_counter()
        report["data"] = make_val_set(tmp / "data", args.val_size, args.image_size, args.seed, args.jpeg_quality)
        log(f"val set: {args.val_size} images in {time.perf_counter() - t:.1f} s, "
            f"mean {report['data']['mean_jpeg_bytes'] / 1000:.0f} kB JPEG")
        prepared = {}
        for detector in args.detectors:
            prepared[detector] = prepare_work_dir(DETECTORS[detector], Path(report["data"]["root"]),
                                                  tmp / "roots" / detector, args.checkpoints)
            log(f"{detector}: work_dir {prepared[detector]['work_dir']} ({', '.join(prepared[detector]['checkpoints'])})")
        report["work_dirs"] = prepared
        if not args.skip_throughput:
            report["throughput"] = [bench_throughput(args, d, prepared[d], dev, tmp) for d in args.detectors
                                    for dev in devices]
        if not args.skip_bytes:
            report["bytes"] = [bench_bytes(args, d, prepared[d], tmp / "roots" / d, tmp) for d in args.detectors]
    except BenchError as exc:
        log(f"error: {exc}")
        report["error"] = str(exc)
        if args.json:
            print(json.dumps(finite(report), indent=2, default=str))
        return 2
    finally:
        report["seconds"] = time.perf_counter() - started
        report["load_end"] = os.getloadavg()
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(finite(report), indent=2, default=str))
    else:
        print(render(report))
        print(f"\n(total {report['seconds']:.0f} s on {report['cpus']} CPUs; "
              f"load average 1/5/15 min at start {' '.join(f'{x:.2f}' for x in report['load_start'])}, "
              f"at end {' '.join(f'{x:.2f}' for x in report['load_end'])})")
    passed = [e["pass"] for e in report.get("throughput", [])] + [e["pass"] for e in report.get("bytes", [])]
    return 0 if args.quick or all(passed) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

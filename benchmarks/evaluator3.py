"""Benchmark: the mmdet 3.x worker's inference speed against MMEngine's own `Runner.test()` loop.

Baseline, named: MMEngine 0.10.7's `Runner.test()` as mmdet 3.3's `tools/test.py` runs it (`Runner.from_cfg` on the
checkpoint's own config with `load_from` = the checkpoint, the test loader as configured: batch size 1,
`num_workers` from the config), its `test_dataloader.dataset` restricted to the same subset of val images
(`indices` = `common.records.subset_indices`, in that order). Ours: `evaluator.mmdet3.evaluate` on a job for the
same checkpoint, `--batch-size` images per `test_step` (default 8).

Data: a synthetic COCO val set of `--num-images` images of `--image-size` px (the tests' maker,
`tests.mmdet_run.dataset.make_coco`), and the tests' cached tiny MMEngine RetinaNet (`tests.mmdet3_run`; the first use
trains it, ~30 s), its last checkpoint copied with the config inside it pointed at the new val set.

Both sides run in one child process of the mmdet 3.x environment (`MMDET_WANDB_MMDET3_PYTHON`, else
`.venv-mmdet3/bin/python`), one torch thread (`--threads`), after one untimed warm-up call each, alternating
`--repeat` times (default 3). Reported, as medians: images/s of the inference loops (ours: `EvalOutcome.seconds`;
baseline: `TestLoop.run` minus its `evaluator.evaluate`), and the ratio ours/baseline. Target: >= 1.0 on CPU,
>= 1.5 on a GPU (`--device cuda:0`, when one is there). A soundness check: the boxes above the score threshold
agree per image between the two sides.

    .venv/bin/python -m benchmarks.evaluator3                 # 64 images, batch 8, CPU
    .venv/bin/python -m benchmarks.evaluator3 --quick         # 16 images, one repetition (CI: it completes)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, statistics, sys, time, copy
spec = json.loads(sys.argv[1])
import torch
torch.set_num_threads(spec["threads"])
from mmengine.config import Config
from mmengine.runner import Runner
from common import checkpoint_file
from common.records import subset_indices
from db.jobs import ClaimedJob
from evaluator import checkpoint_globals, mmdet3

meta = checkpoint_file.read_checkpoint_meta(open(spec["checkpoint"], "rb"))
cfg = Config.fromstring(meta["cfg"], ".py")
job = ClaimedJob(1, 1, "mmdet3", spec["checkpoint"], spec["work_dir"], None, None, spec["n"], 0.3)


def ours():
    outcome = mmdet3.evaluate(job, spec["device"], spec["batch_size"])
    return outcome.seconds, [sum(1 for s in p.scores) for p in outcome.predictions]


def baseline():
    run_cfg = copy.deepcopy(cfg)
    run_cfg.work_dir = spec["scratch"]
    run_cfg.load_from = spec["checkpoint"]
    run_cfg.test_dataloader.dataset.indices = subset_indices(spec["val_size"], spec["n"])
    run_cfg.default_hooks.pop("visualization", None)
    run_cfg.log_level = "WARNING"
    if spec["device"] == "cpu":
        run_cfg.env_cfg = dict(run_cfg.get("env_cfg", {}), dist_cfg=dict(backend="gloo"))
    runner = Runner.from_cfg(run_cfg)
    runner._test_loop = runner.build_test_loop(runner._test_loop)
    runner.call_hook("before_run")
    with checkpoint_globals.allowed():
        runner.load_or_resume()
    loop = runner.test_loop
    evaluate = loop.evaluator.evaluate
    spent = {}
    counts = []
    process = loop.evaluator.process

    def timed_evaluate(size):
        started = time.perf_counter()
        try:
            return evaluate(size)
        finally:
            spent["evaluate"] = time.perf_counter() - started

    def counting_process(data_samples, data_batch=None):
        counts.extend(int((s.pred_instances.scores > 0.3).sum()) for s in data_samples)
        return process(data_samples, data_batch)

    loop.evaluator.evaluate = timed_evaluate
    loop.evaluator.process = counting_process
    started = time.perf_counter()
    loop.run()
    return time.perf_counter() - started - spent["evaluate"], counts


ours(); baseline()  # warm-up
results = {"ours": [], "baseline": []}
for i in range(spec["repeat"]):
    for side in (("ours", "baseline") if i % 2 == 0 else ("baseline", "ours")):
        seconds, counts = (ours if side == "ours" else baseline)()
        results[side].append({"seconds": seconds, "counts": counts})
print(json.dumps(results))
"""


def mmdet3_python() -> str:
    return os.environ.get("MMDET_WANDB_MMDET3_PYTHON") or str(REPO / ".venv-mmdet3" / "bin" / "python")


def prepare(tmp: Path, n: int, size: int) -> dict[str, Any]:
    """A val set of n images, and the cached 3.x RetinaNet's last checkpoint pointed at it."""
    from tests.mmdet3_run.fixtures import cached_work_dir3
    from tests.mmdet_run import dataset

    data = dataset.make_coco(tmp / "data", n_train=1, n_val=n, size=size, seed=1)
    trained = cached_work_dir3("retinanet3_epoch")
    last = max(trained.glob("epoch_*.pth"), key=lambda p: int(p.stem.split("_")[1]))
    work_dir = tmp / "work_dir"
    work_dir.mkdir()
    checkpoint = work_dir / last.name
    rewrite = (  # through mmengine's Config, not the config text (yapf wraps long paths onto lines of their own)
        "import sys, torch\nfrom mmengine.config import Config\nfrom evaluator import checkpoint_globals\n"
        "src, dst, root = sys.argv[1:4]\n"
        "with checkpoint_globals.allowed():\n    c = torch.load(src, map_location='cpu')\n"
        "cfg = Config.fromstring(c['meta']['cfg'], '.py')\n"
        "for loader in (cfg.val_dataloader, cfg.test_dataloader):\n"
        "    loader.dataset.data_root = root + '/'\n    loader.dataset.ann_file = 'annotations/val.json'\n"
        "for evaluator in (cfg.val_evaluator, cfg.test_evaluator):\n    evaluator.ann_file = root + '/annotations/val.json'\n"
        "c['meta']['cfg'] = cfg.pretty_text\n"
        "torch.save(c, dst)\n"
    )
    subprocess.run([mmdet3_python(), "-c", rewrite, str(last), str(checkpoint), str(data.root)], check=True, cwd=REPO)
    return {"checkpoint": str(checkpoint), "work_dir": str(work_dir), "val_size": n}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-images", type=int, default=64)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="16 images, one repetition: that it runs, not how fast")
    args = p.parse_args(argv)
    if args.quick:
        args.num_images, args.repeat = 16, 1
    with tempfile.TemporaryDirectory(prefix="bench-eval3-") as tmp:
        spec = prepare(Path(tmp), args.num_images, args.image_size)
        spec.update(n=args.num_images, batch_size=args.batch_size, repeat=args.repeat, threads=args.threads,
                    device=args.device, scratch=str(Path(tmp) / "runner"))
        proc = subprocess.run([mmdet3_python(), "-c", CHILD, json.dumps(spec)], capture_output=True, text=True, cwd=REPO,
                              env={**os.environ, "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "") if args.device != "cpu" else "",
                                   "OMP_NUM_THREADS": str(args.threads)})
    if proc.returncode != 0:
        print(proc.stderr[-6000:], file=sys.stderr)
        return 2
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    n = args.num_images
    rate = {side: statistics.median(n / r["seconds"] for r in runs) for side, runs in results.items()}
    agree = sum(a == b for a, b in zip(results["ours"][-1]["counts"], results["baseline"][-1]["counts"]))
    ratio = rate["ours"] / rate["baseline"]
    target = 1.5 if args.device.startswith("cuda") else 1.0
    print(f"mmdet 3.x evaluator, {n} images of {args.image_size} px, {args.device}, {args.threads} torch thread(s), "
          f"median of {args.repeat}")
    print(f"{'side':<34}{'images/s':>10}")
    print(f"{'ours (batch ' + str(args.batch_size) + ', test_step)':<34}{rate['ours']:>10.1f}")
    print(f"{'baseline (Runner.test loop)':<34}{rate['baseline']:>10.1f}")
    print(f"ratio ours/baseline: {ratio:.2f}x (target >= {target}); boxes above 0.3 agree on {agree}/{n} images")
    if agree < n * 0.98:
        print("the two sides disagree: the figures are not comparable", file=sys.stderr)
        return 1
    return 0 if args.quick or ratio >= target else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

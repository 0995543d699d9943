"""A tiny synthetic COCO dataset: filled shapes on a noisy background, with boxes and polygon masks.

Deterministic given the seed (images are PNG, so the bytes do not depend on a JPEG encoder), small enough that
a tiny detector learns it on CPU in a few epochs, and complete enough (polygons, areas, iscrowd) for
`mmdet.datasets.CocoDataset`, COCO bbox evaluation and Mask R-CNN.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES: tuple[str, ...] = ("square", "disk", "triangle")

#: Bumped whenever the drawing changes, so cached trainings built on an older dataset are not reused.
DATASET_VERSION = 1


@dataclass(frozen=True)
class CocoPaths:
    root: Path
    train_img_dir: Path
    val_img_dir: Path
    train_ann: Path
    val_ann: Path
    classes: tuple[str, ...]

    def as_dict(self) -> dict[str, str | list[str]]:
        return {
            "root": str(self.root),
            "train_img_dir": str(self.train_img_dir),
            "val_img_dir": str(self.val_img_dir),
            "train_ann": str(self.train_ann),
            "val_ann": str(self.val_ann),
            "classes": list(self.classes),
        }


def _polygon(kind: str, cx: float, cy: float, half: float, angle: float) -> list[tuple[float, float]]:
    """The outline of one shape, in pixel coordinates (the mask is exactly this polygon)."""
    if kind == "square":
        corners = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        # an axis-aligned square: its box is tight, which keeps the task easy for a tiny detector
        return [(cx + half * x, cy + half * y) for x, y in corners]
    if kind == "disk":
        n = 24
        return [(cx + half * math.cos(2 * math.pi * k / n), cy + half * math.sin(2 * math.pi * k / n)) for k in range(n)]
    if kind == "triangle":
        return [
            (cx + half * math.cos(angle + 2 * math.pi * k / 3), cy + half * math.sin(angle + 2 * math.pi * k / 3))
            for k in range(3)
        ]
    raise ValueError(kind)


def _shoelace(points: list[tuple[float, float]]) -> float:
    xs = np.array([p[0] for p in points])
    ys = np.array([p[1] for p in points])
    return float(abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1))) / 2)


def _overlaps(box: tuple[float, float, float, float], boxes: list[tuple[float, float, float, float]], gap: float) -> bool:
    x0, y0, x1, y1 = box
    return any(x0 < b[2] + gap and b[0] < x1 + gap and y0 < b[3] + gap and b[1] < y1 + gap for b in boxes)


def _draw_image(rng: np.random.Generator, size: int, classes: tuple[str, ...]):
    """One image and its objects: (PIL image, [(category index, polygon), ...])."""
    base = rng.integers(20, 90)
    noise = rng.normal(0, 12, size=(size, size, 3))
    tint = rng.integers(-15, 16, size=3)
    background = np.clip(base + tint + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(background, mode="RGB")
    draw = ImageDraw.Draw(img)

    objects: list[tuple[int, list[tuple[float, float]]]] = []
    boxes: list[tuple[float, float, float, float]] = []
    wanted = int(rng.integers(1, 4))
    min_half, max_half = size * 0.09, size * 0.22
    for _ in range(60):  # rejection sampling of non-overlapping placements
        if len(objects) == wanted:
            break
        cat = int(rng.integers(0, len(classes)))
        half = float(rng.uniform(min_half, max_half))
        margin = half + 2
        cx = float(rng.uniform(margin, size - margin))
        cy = float(rng.uniform(margin, size - margin))
        angle = float(rng.uniform(0, 2 * math.pi))
        poly = _polygon(classes[cat], cx, cy, half, angle)
        xs, ys = [p[0] for p in poly], [p[1] for p in poly]
        box = (min(xs), min(ys), max(xs), max(ys))
        if _overlaps(box, boxes, gap=3):
            continue
        colour = tuple(int(c) for c in rng.integers(150, 256, size=3))
        draw.polygon(poly, fill=colour)
        objects.append((cat, poly))
        boxes.append(box)
    return img, objects


def _write_split(split: str, img_dir: Path, ann_file: Path, n: int, size: int, rng: np.random.Generator,
                 classes: tuple[str, ...]) -> None:
    img_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    ann_id = 1
    for i in range(n):
        img, objects = _draw_image(rng, size, classes)
        file_name = f"{split}_{i:04d}.png"
        img.save(img_dir / file_name, format="PNG", optimize=False)
        image_id = i + 1
        images.append({"id": image_id, "file_name": file_name, "height": size, "width": size})
        for cat, poly in objects:
            xs, ys = [p[0] for p in poly], [p[1] for p in poly]
            x0, y0 = max(0.0, min(xs)), max(0.0, min(ys))
            x1, y1 = min(float(size), max(xs)), min(float(size), max(ys))
            annotations.append({
                "id": ann_id,
                "image_id": image_id,
                "category_id": cat + 1,
                "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                "area": round(_shoelace(poly), 2),
                "iscrowd": 0,
                "segmentation": [[round(v, 2) for p in poly for v in p]],
            })
            ann_id += 1
    coco = {
        "info": {"description": f"synthetic shapes ({split})", "version": str(DATASET_VERSION)},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": k + 1, "name": name, "supercategory": "shape"} for k, name in enumerate(classes)],
    }
    ann_file.parent.mkdir(parents=True, exist_ok=True)
    ann_file.write_text(json.dumps(coco, indent=1) + "\n", encoding="utf-8")


def make_coco(root: Path, n_train: int = 16, n_val: int = 8, size: int = 128, seed: int = 0,
              classes: tuple[str, ...] = CLASSES) -> CocoPaths:
    """Write the dataset under `root` (train/, val/, annotations/{train,val}.json) and return its paths."""
    root = Path(root).resolve()
    paths = CocoPaths(
        root=root,
        train_img_dir=root / "train",
        val_img_dir=root / "val",
        train_ann=root / "annotations" / "train.json",
        val_ann=root / "annotations" / "val.json",
        classes=tuple(classes),
    )
    # one stream per split: the val set does not change when n_train does
    train_rng = np.random.default_rng([seed, 0])
    val_rng = np.random.default_rng([seed, 1])
    _write_split("train", paths.train_img_dir, paths.train_ann, n_train, size, train_rng, paths.classes)
    _write_split("val", paths.val_img_dir, paths.val_ann, n_val, size, val_rng, paths.classes)
    return paths


if __name__ == "__main__":  # python -m tests.mmdet_run.dataset OUT_DIR
    import sys

    print(make_coco(Path(sys.argv[1])))

"""What both adapters store the same way: val images as a browser shows them, ground-truth and predicted masks
as compressed COCO RLE (so that 2.x and 3.x runs give tables of one schema)."""
from __future__ import annotations

from typing import Any

import numpy as np

from evaluator.errors import JobError

#: Image formats a browser shows as the model saw them; anything else is re-encoded as PNG.
KEPT_FORMATS = {"jpg": "jpg", "jpeg": "jpg", "png": "png"}


def png(rgb: np.ndarray) -> bytes:
    import cv2

    ok, buffer = cv2.imencode(".png", rgb[..., ::-1] if rgb.ndim == 3 else rgb)
    if not ok:
        raise JobError("cannot encode a val image as PNG", retryable=False)
    return buffer.tobytes()


def stored_image(file_name: str, raw: bytes, rgb: np.ndarray) -> tuple[str, bytes]:
    """(extension, bytes) of a val image in the tables: the file itself when a browser shows it, else a PNG."""
    ext = file_name.rsplit(".", 1)[-1].lower() if "." in file_name else ""
    if ext in KEPT_FORMATS:
        return KEPT_FORMATS[ext], raw
    return "png", png(rgb)


def segmentation_rle(segm: Any, height: int, width: int) -> dict:
    """COCO polygons, uncompressed or compressed RLE → compressed RLE; a broken one → an empty mask
    (the hook crashes on these, mmdetection#8455)."""
    from pycocotools import mask as mask_util

    try:
        if isinstance(segm, list):
            polygons = [p for p in segm if len(p) >= 6]
            if not polygons:
                raise ValueError("no polygon with 3 points")
            rle = mask_util.merge(mask_util.frPyObjects(polygons, height, width))
        elif isinstance(segm, dict) and isinstance(segm.get("counts"), list):
            rle = mask_util.frPyObjects(segm, height, width)
        elif isinstance(segm, dict):
            rle = dict(segm)
        else:
            raise ValueError(f"segmentation of type {type(segm).__name__}")
    except Exception:
        rle = mask_util.encode(np.zeros((height, width, 1), dtype=np.uint8, order="F"))[0]
    return rle_text(rle)


def rle_text(rle: dict) -> dict:
    counts = rle["counts"]
    return {"size": [int(s) for s in rle["size"]], "counts": counts.decode() if isinstance(counts, bytes) else counts}

"""What only the text log knows: the iterations per epoch, as the denominator of `Epoch [e][i/L]`."""
from __future__ import annotations

import re
from pathlib import Path

from uploader.tail import read_head

# mmcv 1.x: "Epoch [1][50/7330]"; mmengine: "Epoch(train)  [1][  50/1833]"
EPOCH_PROGRESS = re.compile(rb"Epoch(?:\(train\))?\s*\[\d+\]\[\s*\d+/(\d+)\]")
HEAD_BYTES = 1 << 20


def iters_per_epoch(path: Path) -> int | None:
    """Read the first MiB of a text log (the first train line is near the top); None if not found."""
    try:
        head = read_head(path, HEAD_BYTES)
    except OSError:
        return None
    match = EPOCH_PROGRESS.search(head)
    return int(match.group(1)) if match else None

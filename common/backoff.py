"""The one retry policy: eval jobs that fail and runs that fail to upload wait twice as long after each failure
in a row, capped, with jitter so that many failures at once do not retry in lockstep."""
from __future__ import annotations

import random

BACKOFF_BASE_S = 10.0
BACKOFF_CAP_S = 600.0


def backoff_s(failures: int) -> float:
    """min(cap, base·2^(failures-1)) ± 10 %."""
    return min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** max(0, failures - 1)) * random.uniform(0.9, 1.1)

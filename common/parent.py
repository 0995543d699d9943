"""Child processes that must not outlive the command that started them (a writer or reader left behind would
race the next command over the same runs)."""
from __future__ import annotations

import ctypes
import os
import signal
import sys


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent dies (Linux: PR_SET_PDEATHSIG); a parent already gone ends it at once."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent_pid:
        os._exit(1)

"""Giving memory back to the OS: after a burst of uploads the heap keeps what the finished run objects used."""
from __future__ import annotations

import ctypes
import gc


def return_free_memory() -> None:
    """Collect what is garbage and hand the free pages back to the OS (glibc's malloc_trim), so that an idle
    service's RSS does not stay at its peak."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass

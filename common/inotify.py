"""inotify watches: how many this process holds (watch's watchdog observer: one per folder under the roots), and
the limit of the user they count against, as the kernel shows them.

The kernel's own figures, not watchdog's (its private state): each inotify descriptor of this process lists one
`inotify wd:` line per watch in /proc/self/fdinfo. The limit (`fs.inotify.max_user_watches`) is per user: other
processes of the same user count against it too. Not Linux: no figures (None).
"""
from __future__ import annotations

import os
from pathlib import Path

MAX_USER_WATCHES = Path("/proc/sys/fs/inotify/max_user_watches")


def watches_in_use() -> int | None:
    try:
        descriptors = os.listdir("/proc/self/fd")
    except OSError:
        return None
    count = 0
    for fd in descriptors:
        try:
            if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:inotify":
                continue
            with open(f"/proc/self/fdinfo/{fd}", "rb") as info:
                count += sum(line.startswith(b"inotify wd:") for line in info)
        except OSError:  # closed meanwhile
            continue
    return count


def max_user_watches() -> int | None:
    try:
        return int(MAX_USER_WATCHES.read_text())
    except (OSError, ValueError):
        return None

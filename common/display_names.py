"""Names built from outside strings (folder and file names) made safe to show in one line."""
from __future__ import annotations

import re

CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
DISPLAY_MAX = 96  # W&B's run table cuts long names; the full path stays in the run's config and notes


def escape_controls(text: str) -> str:
    """Control characters as escapes (`\\n`, `\\x1b`), so that an outside string cannot start a line of its own."""
    return CONTROL.sub(lambda m: NAMED.get(m.group(), f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100 else f"\\u{ord(m.group()):04x}"), text)


def display_name(path: str, limit: int = DISPLAY_MAX) -> str:
    """One readable line for a run or work_dir name: controls escaped, a long name kept by its end (the part
    that tells launches apart) behind a leading `…`."""
    name = escape_controls(path)
    return name if len(name) <= limit else "…" + name[-(limit - 1):]

"""Which W&B mode the service runs in (no wandb import: `status` and `doctor` ask too)."""
from __future__ import annotations

import os


def resolve_mode() -> str:
    """Offline is the embedded default; an API key (or WANDB_MODE) turns on online uploads unchanged."""
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if mode in {"online", "offline", "disabled"}:
        return mode
    if mode == "dryrun":
        return "offline"
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"

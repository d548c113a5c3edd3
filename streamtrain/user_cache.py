"""The per-user cache folder: what one run measured or verified that later runs may reuse.

Everything kept there is an optimization: a missing, unreadable or stale file only means doing the work
again (hashing a shard, timing the --amp probe).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir() -> Path | None:
    """$STREAMTRAIN_CACHE_DIR, else $XDG_CACHE_HOME/streamtrain, else ~/.cache/streamtrain (None: no home)."""
    explicit = os.environ.get("STREAMTRAIN_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "streamtrain"
    try:
        return Path.home() / ".cache" / "streamtrain"
    except (RuntimeError, KeyError):
        return None

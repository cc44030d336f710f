"""Where stagejax keeps what it makes: converted checkpoints, compiled helpers (design §4)."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """`$STAGEJAX_CACHE`, else `~/.cache/stagejax` (design §4)."""
    return Path(os.environ.get("STAGEJAX_CACHE") or "~/.cache/stagejax").expanduser()

"""Where edgellm keeps what it fetches and derives: `EDGELLM_CACHE`, else the platform's user cache folder."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    d = os.environ.get("EDGELLM_CACHE")
    if d:
        return Path(d)
    from platformdirs import user_cache_dir
    return Path(user_cache_dir("edgellm"))

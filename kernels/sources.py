"""Keeping Numba's on-disk cache honest for kernels built from other modules' code.

Numba's cache checks only the stamp of the file that defines a function. A kernel that compiles other modules'
functions into itself (kernels/decode_step.py inlines the whole forward; kernels/igemm.py's micro-kernel is LLVM
IR written by kernels/simd.py) would run stale code after an edit there (an editable install updated by git, a
checkout). So such a kernel takes a digest of the other kernel modules' sources as a closure variable, which
Numba's cache key hashes: any edit recompiles it."""
from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=None)
def sources_digest(own_file: str) -> str:
    """A digest (16 hex digits) of every kernel module's source but `own_file`'s (whose stamp Numba checks)."""
    h = hashlib.sha256()
    here = Path(own_file).resolve()
    for f in sorted(Path(__file__).resolve().parent.glob("*.py")):
        if f != here:
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]

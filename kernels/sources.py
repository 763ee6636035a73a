"""Keeping Numba's on-disk cache honest for kernels built from other modules' code.

Numba's cache checks only the source of the file that defines a function (a hash of it, kept in the cache index). A
kernel that compiles other modules' functions into itself (kernels/q8act.py's quantizer inlines
kernels/igemm.py's row quantizer, kernels/decode_step.py inlines the whole forward; kernels/igemm.py's
micro-kernel is LLVM IR written by kernels/simd.py) would run stale code after an edit there: an editable install
updated by git, or an upgrade (pip leaves Numba's index and data files in `__pycache__`, and an unchanged file
keeps its hash). So every kernel module's functions are cached through locators whose source stamp is the file's
own plus a digest of all kernel modules' sources (`install_locators`, run when the package is imported, before any
kernel is decorated): any edit to any kernel module recompiles them all.

The closures made per configuration (kernels/igemm.py, kernels/decode_step.py) also take `sources_digest` as a
closure variable, which Numba's cache key hashes (from before the locators; kept: it costs nothing)."""
from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

KERNELS_DIR = Path(__file__).resolve().parent


def _digest(files) -> str:
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


@lru_cache(maxsize=None)
def sources_digest(own_file: str) -> str:
    """A digest (16 hex digits) of every kernel module's source but `own_file`'s (whose stamp Numba checks)."""
    here = Path(own_file).resolve()
    return _digest(f for f in KERNELS_DIR.glob("*.py") if f != here)


def package_digest(directory: Path = KERNELS_DIR) -> str:
    """A digest (16 hex digits) of the sources of every module in `directory` (the kernels package)."""
    return _digest(Path(directory).glob("*.py"))


@lru_cache(maxsize=None)
def _kernels_digest() -> str:
    return package_digest()  # once per process: the sources do not change under a run


def _kernels_locator(base):
    # a subclass of one of Numba's source-file locators that serves only the kernel modules and adds the package's
    # digest to the source stamp
    class KernelsLocator(base):
        def get_source_stamp(self):
            return (super().get_source_stamp(), _kernels_digest())

        @classmethod
        def from_function(cls, py_func, py_file):
            try:
                if Path(py_file).resolve().parent != KERNELS_DIR:
                    return None
            except OSError:
                return None
            return super().from_function(py_func, py_file)

    KernelsLocator.__name__ = KernelsLocator.__qualname__ = "Kernels" + base.__name__
    return KernelsLocator


def install_locators() -> bool:
    """Put the kernel modules' locators first in Numba's list (once; Numba's own order kept: a NUMBA_CACHE_DIR the
    user set, then `__pycache__` beside the source, then the user-wide cache). False where this Numba has no such
    list (then the per-configuration closures' digests are the only guard)."""
    try:
        from numba.core import caching
        impl = getattr(caching, "CacheImpl", None) or caching._CacheImpl  # (renamed in Numba 0.6x)
        bases = (caching.UserProvidedCacheLocator, caching.InTreeCacheLocator, caching.UserWideCacheLocator)
        classes = impl._locator_classes
    except (ImportError, AttributeError):
        return False
    if any(getattr(c, "__name__", "").startswith("Kernels") for c in classes):
        return True
    classes[:0] = [_kernels_locator(b) for b in bases]
    return True

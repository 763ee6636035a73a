"""The machine's ceiling: cores, SIMD flags, measured read bandwidth and sgemm GFLOPS.

Decode is memory-bound, so `bandwidth_gbs` (a parallel streaming read over a buffer far larger than
the last-level cache, with the requested threads) is the ceiling a decode's achieved bandwidth is
measured against; prefill is compute-bound, so `sgemm_gflops` (NumPy's BLAS) is the other ceiling.
"""
from __future__ import annotations

import os
import platform
import time

import numba
import numpy as np
from numba import njit, prange

# the SIMD / matrix extensions that matter for the kernels here (and for llama.cpp's)
SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
              "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16", "neon", "asimd", "asimddp", "sve")


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _stream_sum(a):
    # a (n,) f32 -> sum (f32): every byte read once, rows split over threads
    s = np.float32(0.0)
    for i in prange(a.size):
        s += a[i]
    return s


def cpu_info() -> dict:
    """Model name, physical/logical cores and the SIMD flags present, from /proc/cpuinfo (Linux)."""
    from ..runtime.engine import physical_cores
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                key = key.strip()
                if key == "model name" and name in ("", platform.machine(), platform.processor()):
                    name = val.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(val.split())
    except OSError:
        pass
    return {"cpu": name, "arch": platform.machine(), "physical_cores": physical_cores(),
            "logical_cores": os.cpu_count() or 1, "simd": [f for f in SIMD_FLAGS if f in flags]}


def measure_bandwidth(threads: int | None = None, mbytes: int = 512, reps: int = 5) -> float:
    """Read bandwidth in GB/s (1e9 bytes/s): best of `reps` parallel sums over `mbytes` MiB of float32."""
    from ..runtime.engine import set_threads
    set_threads(threads)
    a = np.ones(mbytes * (1 << 20) // 4, dtype=np.float32)  # touched: pages are really allocated
    _stream_sum(a[:1024])  # compile / load from cache
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        _stream_sum(a)
        best = min(best, time.perf_counter() - t)
    return a.nbytes / best / 1e9


def measure_sgemm(n: int = 2048, reps: int = 3) -> float:
    """float32 GEMM throughput of NumPy's BLAS in GFLOPS (best of `reps`, n x n @ n x n)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b  # warm-up (thread pool start)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def machine_info(threads: int | None = None, quick: bool = False) -> dict:
    """Everything `edgellm bench --machine` prints. quick=True shrinks the measurements (for tests)."""
    from ..runtime.engine import set_threads
    threads = set_threads(threads)
    info = cpu_info()
    try:
        import psutil
        info["memory_gb"] = round(psutil.virtual_memory().total / 1e9, 1)
    except Exception:  # pragma: no cover
        pass
    info["threads"] = threads
    info["numba_threads"] = numba.get_num_threads()
    info["bandwidth_gbs"] = round(measure_bandwidth(threads, mbytes=64 if quick else 512, reps=2 if quick else 5), 2)
    info["sgemm_gflops"] = round(measure_sgemm(n=512 if quick else 2048, reps=1 if quick else 3), 1)
    try:
        info["load_avg"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        pass
    return info

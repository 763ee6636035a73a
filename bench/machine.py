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

# the SIMD / matrix extensions that matter for the kernels here (and for llama.cpp's): x86 /proc/cpuinfo "flags",
# and aarch64 "Features" (asimd = NEON, asimdhp/fphp = fp16 arithmetic, asimddp = sdot/udot, i8mm = smmla,
# bf16, sve/sve2, sme)
SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
              "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16",
              "neon", "asimd", "fphp", "asimdhp", "asimddp", "i8mm", "bf16", "sve", "sve2", "sme")

# ARM cores by /proc/cpuinfo "CPU implementer" and "CPU part" (from util-linux's lscpu-arm.c); Raspberry Pi:
# Cortex-A53 (Pi 3, Zero 2), Cortex-A72 (Pi 4, 400, CM4), Cortex-A76 (Pi 5, 500, CM5)
ARM_CORES = {
    (0x41, 0xd03): "Cortex-A53", (0x41, 0xd04): "Cortex-A35", (0x41, 0xd05): "Cortex-A55",
    (0x41, 0xd07): "Cortex-A57", (0x41, 0xd08): "Cortex-A72", (0x41, 0xd09): "Cortex-A73",
    (0x41, 0xd0a): "Cortex-A75", (0x41, 0xd0b): "Cortex-A76", (0x41, 0xd0c): "Neoverse-N1",
    (0x41, 0xd0d): "Cortex-A77", (0x41, 0xd40): "Neoverse-V1", (0x41, 0xd41): "Cortex-A78",
    (0x41, 0xd44): "Cortex-X1", (0x41, 0xd46): "Cortex-A510", (0x41, 0xd47): "Cortex-A710",
    (0x41, 0xd48): "Cortex-X2", (0x41, 0xd49): "Neoverse-N2", (0x41, 0xd4d): "Cortex-A715",
    (0x41, 0xd4e): "Cortex-X3", (0x41, 0xd4f): "Neoverse-V2", (0xc0, 0xac3): "Ampere-1",
}


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _stream_sum(a):
    # a (n,) f32 -> sum (f32): every byte read once, rows split over threads
    s = np.float32(0.0)
    for i in prange(a.size):
        s += a[i]
    return s


def parse_cpuinfo(text: str) -> dict:
    """/proc/cpuinfo's text -> {"cpu": name, "core": ARM core name or None, "flags": set of flags/features}.
    The name is x86's "model name"; on ARM, the board's "Model" line (Raspberry Pi OS has one) or the core name."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, val = line.partition(":")
        key = key.strip()
        if sep and key not in fields:  # the first core's values (and the board's lines at the end)
            fields[key] = val.strip()
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    core = None
    try:
        impl, part = int(fields["CPU implementer"], 16), int(fields["CPU part"], 16)
        core = ARM_CORES.get((impl, part), f"ARM implementer {impl:#x} part {part:#x}")
    except (KeyError, ValueError):
        pass
    name = fields.get("model name") or fields.get("Model") or core or ""
    if core and name != core:
        name = f"{name} ({core})"
    return {"cpu": name, "core": core, "flags": flags}


def cpu_info() -> dict:
    """Model name, core (ARM), physical/logical cores, the SIMD flags present (from /proc/cpuinfo on Linux)
    and the CPU Numba compiles the kernels for."""
    from ..runtime.engine import physical_cores
    try:
        with open("/proc/cpuinfo") as f:
            parsed = parse_cpuinfo(f.read())
    except OSError:
        parsed = {"cpu": "", "core": None, "flags": set()}
    info = {"cpu": parsed["cpu"] or platform.processor() or platform.machine(), "arch": platform.machine()}
    if parsed["core"]:
        info["core"] = parsed["core"]
    info.update(physical_cores=physical_cores(), logical_cores=os.cpu_count() or 1,
                simd=[f for f in SIMD_FLAGS if f in parsed["flags"]], jit_cpu=jit_cpu())
    return info


def jit_cpu() -> str:
    """The CPU Numba's LLVM compiles for (NUMBA_CPU_NAME, else the host as LLVM detects it)."""
    import llvmlite.binding as ll
    return numba.config.CPU_NAME or ll.get_host_cpu_name()


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

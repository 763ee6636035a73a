"""The kernels' JIT cache: is it cold on this machine (then the first run compiles for a while, and says so), and
compiling ahead of a run (`edgellm pull --compile`).

Numba compiles each kernel at its first call and keeps the machine code in a cache beside the kernel's source
(`cache=True`), keyed on the signature, the CPU (name and features) and the function's bytecode; the source file's
stamp invalidates it. A kernel is warm when its cache index holds an entry whose key is what this process would
compute for it now. That is a few small file reads, no compiling.
"""
from __future__ import annotations

import pickle
import sys
import time

from ..kernels import attention, decode_step, igemm, kv_store, matvec, ops, ternary
from .weights import kernel_isa

# kernels every dense decode step calls, whatever the weight type (attention through its work items: the compiled
# step calls them directly, the per-operation forward through attention.attention_decode) ...
CORE_KERNELS = (ops.rmsnorm, ops.rope_inplace, ops.swiglu, attention.decode_item, attention.combine,
                kv_store.store_kv)
# ... and one of these mat-vec kernels (which one depends on the model's weights and the CPU: see matvec_kernels)
MATVEC_KERNELS = (matvec.matvec_q4, matvec.matvec_q8, ternary.matvec_ternary_q)
INTEGER_FORMATS = ("q4_0", "q4_1", "q8_0")  # kernels/igemm.py's formats with Q8 activations (plus "tq2")

# a cold compile of a run's kernels takes about this many times the probe's CPU time (measured on x86 and under
# qemu's emulation of aarch64, where both Python and LLVM slow down alike)
COMPILE_PER_PROBE = 1500.0


def _probe() -> None:
    # a fixed piece of pure-Python work (~16 ms on a recent x86 core): the machine's speed at what a compile does
    d = {}
    for i in range(200_000):
        d[i % 97] = d.get(i % 97, 0) + i * 3


def probe_seconds() -> float:
    """CPU seconds of the probe (CPU time: a busy machine does not inflate it)."""
    t = time.process_time()
    _probe()
    return time.process_time() - t


def is_cached(kernel) -> bool:
    """Whether Numba's cache holds machine code of `kernel` for this CPU and this version of its source."""
    cache = kernel._cache  # a FunctionCache (the kernels are @njit(cache=True))
    codegen = kernel.targetctx.codegen()
    index = cache._cache_file._load_index()  # {} when missing or stale
    return any(cache._index_key(key[0], codegen) == key for key in index)


def matvec_kernels() -> list:
    """The mat-vec kernels a run may take on this machine (one of them serves a model's layers): the f32-activation
    ones and, on a CPU with integer dot products, kernels/igemm.py's for its instruction set (Q4_0 / Q4_1 / Q8_0
    with Q8 activations, prefill and the per-operation forward; ternary)."""
    isa = kernel_isa()
    if isa is None:
        return list(MATVEC_KERNELS)
    return list(MATVEC_KERNELS) + [igemm.kernel_x(isa, f) for f in INTEGER_FORMATS] + [igemm.kernel_t(isa, "tq2")]


def step_kernel():
    """One compiled decode step of this machine (kernels/decode_step.py, made per configuration: instruction set,
    formats, architecture, KV types), or None where the CPU has no integer dot products (no step then)."""
    isa = kernel_isa()
    if isa is None:
        return None
    return decode_step.make_step(isa, "q4_1", "q8_0", (True, 0, True, 256), False, False, ("f16", "f16"))


def is_cached_any_configuration(kernel) -> bool:
    """For a kernel made per configuration (a closure: the compiled decode step), whether Numba's cache holds one
    of any configuration for this CPU and this version of its source (the configuration a model needs is only
    known once it is loaded; a run usually meets the one it compiled before)."""
    cache = kernel._cache
    codegen = kernel.targetctx.codegen()
    index = cache._cache_file._load_index()
    for key in index:
        mine = cache._index_key(key[0], codegen)  # (signature, CPU, (bytecode hash, closure-variables hash))
        if mine[1] == key[1] and mine[2][0] == key[2][0]:
            return True
    return False


def cold_kernels() -> list[str] | None:
    """Names of the kernels a run needs that would compile now ([] when the cache is warm; None when this Numba's
    cache cannot be read so: the notice is then left out rather than the run failing — tests/arm64/test_pi.py
    checks that it can be read with the Numba installed)."""
    try:
        cold = [k.__name__ for k in CORE_KERNELS if not is_cached(k)]
        matvec_ks = matvec_kernels()
        if not any(is_cached(k) for k in matvec_ks):
            cold += [k.__name__ for k in matvec_ks]
        step = step_kernel()
        if step is not None and not is_cached_any_configuration(step):
            cold.append("decode step")
    except (AttributeError, TypeError, ValueError, IndexError, OSError, EOFError, pickle.UnpicklingError):
        return None
    return cold


def estimate_seconds() -> int:
    """A rough cold-compile time on this machine, from a short speed probe (rounded to 10 s, at least 10)."""
    s = min(probe_seconds() for _ in range(3)) * COMPILE_PER_PROBE
    return max(10, int(round(s / 10.0)) * 10)


def compile_notice(file=None) -> bool:
    """Say on stderr that kernels compile, once, when the JIT cache is cold; whether it was."""
    if not cold_kernels():
        return False
    print(f"edgellm: compiling kernels, once: ~{estimate_seconds()} s (later runs load them from the cache)",
          file=file or sys.stderr, flush=True)
    return True


def compile_ahead(model=None, threads: int | None = None) -> float:
    """Compile (or load from the cache) every kernel a run of `model` calls: a prompt long enough for the batched
    path, a short one and a decode step. Returns the seconds it took."""
    from .engine import load
    t = time.perf_counter()
    eng = load(model, threads=threads, n_ctx=64)
    n = min(eng.cfg.n_vocab, 1000)
    cache = eng.new_cache(64)
    eng.prefill([i % n for i in range(1, 2 * matvec.BATCH_MAX + 1)], cache)  # prefill: tiles + BLAS, or igemm
    eng.prefill([1, 2, 3], cache)  # a short prompt: the fused kernels with a few rows
    eng.decode(4, cache)  # the compiled decode step where the model has one
    return time.perf_counter() - t

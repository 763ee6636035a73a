"""Memory checked before it is spent: what a load, a context or a conversion will allocate, estimated from the
sizes the file declares, against what this process can still get. A request that cannot fit is refused with one
line ("needs N GB, M GB available" and what to change) instead of ending as a MemoryError or a kill by the
kernel's out-of-memory killer (with overcommit, a large allocation succeeds and the process dies later, when the
pages are touched).

Available memory is the system's (psutil's `available`), bounded by the process's address-space limit
(RLIMIT_AS, less what it already maps) and by its cgroup's memory limit (containers, CI runners).
"""
from __future__ import annotations

import math
import os
import resource

from ..models.cache_spec import KV, STATE
from .errors import InsufficientMemoryError

FIXED_BUFFERS = 96 << 20  # per engine: score blocks (kernels/attention.SCORE_BLOCK), dequantized tiles, scratch
PREFILL_CHUNK = 512       # tokens per prefill chunk (Engine.prefill's default)


def proc_status_bytes(field: str) -> int | None:
    """A size in this process's /proc/self/status (Linux; e.g. "VmSize", "VmHWM", given in kB there) -> bytes, or
    None where the file or the field is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _vm_size() -> int:
    """Bytes of address space this process maps now (VmSize)."""
    size = proc_status_bytes("VmSize")
    if size is not None:
        return size
    import psutil
    return psutil.Process().memory_info().vms


def _cgroup_headroom() -> int | None:
    """memory.max - memory.current of this process's cgroup (v2), or None without a limit."""
    try:
        with open("/proc/self/cgroup") as f:
            rel = next((ln.strip().split(":", 2)[2] for ln in f if ln.startswith("0::")), None)
        if rel is None:
            return None
        base = os.path.join("/sys/fs/cgroup", rel.lstrip("/"))
        with open(os.path.join(base, "memory.max")) as f:
            limit = f.read().strip()
        if limit == "max":
            return None
        with open(os.path.join(base, "memory.current")) as f:
            return max(0, int(limit) - int(f.read().strip()))
    except (OSError, ValueError, StopIteration):
        return None


def available_bytes() -> int:
    """Bytes this process can still allocate without swapping, failing or being killed."""
    import psutil
    avail = psutil.virtual_memory().available
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        avail = min(avail, soft - _vm_size())
    cg = _cgroup_headroom()
    if cg is not None:
        avail = min(avail, cg)
    return max(0, avail)


def fmt_bytes(n: float) -> str:
    """1.5e9 -> '1.5 GB', 3.2e7 -> '32 MB' (decimal units, as `free -h` and file managers mostly show them)."""
    if n >= 1e9:
        return f"{n / 1e9:,.1f} GB"
    if n >= 1e6:
        return f"{n / 1e6:,.0f} MB"
    return f"{n / 1e3:,.0f} kB"


def check(need: int, what: str, hint: str = "") -> None:
    """Raise InsufficientMemoryError("<what> needs N GB, M GB available[: hint]") when need does not fit."""
    avail = available_bytes()
    if need > avail:
        raise InsufficientMemoryError(f"{what} needs {fmt_bytes(need)}, {fmt_bytes(avail)} available"
                                      + (f": {hint}" if hint else ""))


# ---------------------------------------------------------------------- estimates
def weights_bytes(tensors) -> int:
    """Anonymous memory of a GGUF's weights once loaded (runtime/weights.py): float16 matrices are widened to
    float32, quantized ones repacked (about their size); float32 ones may be copied when fused. `tensors`: the
    GGUFFile's TensorInfo values."""
    from gguf import GGMLQuantizationType as QT
    return sum(4 * t.n_elements if t.qtype == QT.F16 else t.n_bytes for t in tensors)


def context_bytes(cfg, n_ctx: int, kv_bytes_per_token: int, state_bytes: int = 0) -> int:
    """What a context of n_ctx tokens adds to a loaded model: its KV cache (or constant recurrent state), the
    rotary tables for n_ctx positions, one prefill chunk's activations and logits, fixed scratch buffers."""
    chunk = min(PREFILL_CHUNK, n_ctx)
    q = cfg.n_head * cfg.head_dim
    act = 4 * chunk * (6 * cfg.n_embd + 3 * cfg.n_ff + 3 * q + 2 * cfg.n_vocab)
    rope = 24 * n_ctx * (cfg.rope_dim // 2)  # float64 angles while building, float32 cos and sin kept
    return kv_bytes_per_token * n_ctx + state_bytes + rope + act + FIXED_BUFFERS


def context_hint(n_ctx: int, per_token: int, fixed: int, kv: str | None) -> str:
    """What to change: the largest context that fits, a smaller KV type."""
    avail = available_bytes()
    fits = max(0, (avail - fixed) // max(1, per_token))
    parts = [f"use a smaller context (about {min(fits, n_ctx - 1):,} tokens fit)" if fits >= 8
             else "this model does not fit in memory at any context size"]
    if kv is not None and kv in ("f32", "f16", "f32,f32", "f16,f16"):
        parts.append("or a smaller KV cache type (q8_0 or q4_0)")
    return " ".join(parts)


def check_context(cfg, n_ctx: int, kv_bytes_per_token: int, kv: str | None = None, state_bytes: int = 0) -> None:
    """Refuse a context of a GGUF model that cannot fit, before its cache is allocated."""
    per_token = kv_bytes_per_token + 24 * (cfg.rope_dim // 2)  # the cache and the rotary tables grow with n_ctx
    check_cache(n_ctx, per_token, context_bytes(cfg, n_ctx, kv_bytes_per_token, state_bytes) - per_token * n_ctx,
                kv, kv_bytes_per_token)


def check_cache(n_ctx: int, per_token: int, fixed: int, kv: str | None = None, kv_per_token: int | None = None,
                what: str | None = None) -> None:
    """Refuse a context of n_ctx tokens that needs per_token bytes a token plus `fixed` bytes when that does not fit;
    the message says how much of it is the KV cache (kv: its type) and what would fit."""
    need = per_token * n_ctx + fixed
    avail = available_bytes()
    if need > avail:
        kv_per_token = per_token if kv_per_token is None else kv_per_token
        kvs = f"KV cache {kv}" if kv else "KV cache"
        raise InsufficientMemoryError(
            f"{what or f'a context of {n_ctx:,} tokens'} needs {fmt_bytes(need)} "
            f"({kvs}: {fmt_bytes(kv_per_token * n_ctx)}), {fmt_bytes(avail)} available: "
            + context_hint(n_ctx, per_token, fixed, kv))


def check_engine(engine) -> None:
    """The engine hook: its context (engine.n_ctx, a cache of engine.spec's kind at engine.kv) must fit before the
    cache is made."""
    spec = engine.spec
    state = 4 * sum(math.prod(s) for s in spec.state_shapes.values()) if spec.kind == STATE else 0
    check_context(engine.cfg, engine.n_ctx, engine.kv_bytes_per_token, engine.kv if spec.kind == KV else None, state)


def check_weights(file) -> None:
    """The engine hook before weights are unpacked: the model itself must fit."""
    check(weights_bytes(file.tensors.values()), f"loading {os.path.basename(file.path)}",
          "the model is too large for this machine (a smaller quantization, e.g. q4_0, needs less)")

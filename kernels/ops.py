"""Small pure kernels of a transformer block: RMSNorm, RoPE, softmax, SwiGLU (attention: kernels/attention.py).

Each Numba kernel has a NumPy reference beside it (`*_ref`), used by the tests.
Shapes follow nanoGPT's comment style; all arrays are C-contiguous float32.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

_JIT = dict(cache=True, fastmath=True, nogil=True)
# error_model="numpy" (a 0 divisor gives inf/NaN, no exception) where a divisor can be 0 (rmsnorm with eps 0 on a
# zero row; swiglu on garbage weights). It lets LLVM vectorize divisions, so a division must read and write one
# array only: behind a run-time alias check (vector or scalar path, depending on where the buffers lie) a row's
# result would depend on its buffers' addresses, and a batched decode would no longer equal single decodes bit for bit


# ---------------------------------------------------------------- RMSNorm
@njit(error_model="numpy", **_JIT)
def rmsnorm(x, w, eps, out):
    # x (T, d), w (d,) -> out (T, d): x / sqrt(mean(x^2) + eps) * w
    T, d = x.shape
    for t in range(T):
        ss = np.float32(0.0)
        for i in range(d):
            ss += x[t, i] * x[t, i]
        scale = np.float32(1.0) / np.sqrt(ss / np.float32(d) + np.float32(eps))
        for i in range(d):
            out[t, i] = x[t, i] * scale * w[i]
    return out


def rmsnorm_ref(x, w, eps):
    x = x.astype(np.float64)
    return (x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w).astype(np.float32)


# ---------------------------------------------------------------- RoPE
def rope_tables(n_ctx: int, rope_dim: int, theta: float, freq_factors: np.ndarray | None = None,
                pos_scale: float = 1.0):
    # -> cos, sin (n_ctx, rope_dim // 2): angle[p, i] = p * pos_scale * theta^(-2i/rope_dim) / freq_factors[i]
    inv = theta ** (-np.arange(0, rope_dim, 2, dtype=np.float64) / rope_dim)
    if freq_factors is not None:
        inv = inv / np.asarray(freq_factors, dtype=np.float64)[: rope_dim // 2]
    ang = (np.arange(n_ctx, dtype=np.float64) * pos_scale)[:, None] * inv[None, :]
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def grown_rows(need: int, table: np.ndarray | None) -> int:
    """Rows of a rotary table that must hold `need` positions, grown by doubling (not rebuilt at every decoded token)."""
    return max(need, 256, 2 * (0 if table is None else table.shape[0]))


def llama3_freq_factors(rope_dim: int, theta: float, factor: float, low_freq_factor: float,
                        high_freq_factor: float, original_ctx: int) -> np.ndarray:
    # -> (rope_dim // 2,) divisors of each rotary frequency, as Llama-3.1/3.2's "llama3" rope scaling defines them
    inv = theta ** (-np.arange(0, rope_dim, 2, dtype=np.float64) / rope_dim)
    wavelen = 2 * math.pi / inv
    low_wl, high_wl = original_ctx / low_freq_factor, original_ctx / high_freq_factor
    smooth = (original_ctx / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    ff = np.where(wavelen > low_wl, factor, 1.0 / ((1 - smooth) / factor + smooth))
    ff = np.where(wavelen < high_wl, 1.0, ff)
    return ff.astype(np.float32)


@njit(**_JIT)
def rope_inplace(x, pos, cos, sin, rope_dim):
    # x (T, n_head, head_dim), pos (T,) int -> x rotated in place; adjacent pairs (x[2i], x[2i+1]) as GGUF llama stores Q/K
    T, H, D = x.shape
    half = rope_dim // 2
    for t in range(T):
        p = pos[t]
        for h in range(H):
            for i in range(half):
                c = cos[p, i]
                s = sin[p, i]
                a = x[t, h, 2 * i]
                b = x[t, h, 2 * i + 1]
                x[t, h, 2 * i] = a * c - b * s
                x[t, h, 2 * i + 1] = a * s + b * c
    return x


def rope_ref(x, pos, cos, sin, rope_dim):
    x = x.astype(np.float64).copy()
    c = cos[pos][:, None, :].astype(np.float64)
    s = sin[pos][:, None, :].astype(np.float64)
    a, b = x[..., 0:rope_dim:2].copy(), x[..., 1:rope_dim:2].copy()
    x[..., 0:rope_dim:2] = a * c - b * s
    x[..., 1:rope_dim:2] = a * s + b * c
    return x.astype(np.float32)


# ---------------------------------------------------------------- softmax / SwiGLU
@njit(**_JIT)
def softmax_inplace(x):
    # x (n,) -> x = exp(x - max) / sum
    m = x[0]
    for i in range(1, x.shape[0]):
        if x[i] > m:
            m = x[i]
    s = np.float32(0.0)
    for i in range(x.shape[0]):
        x[i] = np.exp(x[i] - m)
        s += x[i]
    inv = np.float32(1.0) / s
    for i in range(x.shape[0]):
        x[i] *= inv
    return x


def softmax_ref(x, axis=-1):
    x = x.astype(np.float64)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return (e / e.sum(axis=axis, keepdims=True)).astype(np.float32)


_LOG2E = np.float32(1.4426950408889634)
_LN2 = np.float32(0.6931471805599453)


@njit(**_JIT)
def exp_inplace(x, n, kbuf):
    # x[j] <- exp(x[j]) for j < n, arguments clamped to [-87, 88]. A vectorizable expf (libm's exp is a scalar call
    # here): 2^k by building the exponent bits in kbuf (int32, >= n) viewed as f32, Cephes' polynomial on
    # |r| <= ln2 / 2; relative error ~1e-7 beyond the rounding of the argument; below -87 gives ~1e-38 instead of 0.
    xs = x[:n]
    kb = kbuf[:n]
    for j in range(n):
        y = min(max(xs[j], np.float32(-87.0)), np.float32(88.0))
        k = np.floor(y * _LOG2E + np.float32(0.5))
        r = y - k * _LN2
        xs[j] = ((((((np.float32(1.9875691500e-4) * r + np.float32(1.3981999507e-3)) * r
                     + np.float32(8.3334519073e-3)) * r + np.float32(4.1665795894e-2)) * r
                   + np.float32(1.6666665459e-1)) * r + np.float32(5.0000001201e-1)) * (r * r) + r + np.float32(1.0))
        kb[j] = (np.int32(k) + np.int32(127)) << 23
    f = kb.view(np.float32)
    for j in range(n):
        xs[j] *= f[j]
    return x


@njit(error_model="numpy", **_JIT)
def swiglu(gate, up, out):
    # gate, up (T, n_ff) (views of one fused gate|up output are fine) -> out (T, n_ff) = silu(gate) * up;
    # out must not overlap gate or up (it holds exp(-gate) first)
    # (no threads: in decode a thread team would cost more than the work)
    T, n = gate.shape
    kbuf = np.empty(n, dtype=np.int32)
    for t in range(T):
        e = out[t]
        for i in range(n):
            e[i] = -gate[t, i]
        exp_inplace(e, n, kbuf)  # exp(-g)
        for i in range(n):  # sigmoid(g), in place: one array, so the same machine code for every row
            e[i] = np.float32(1.0) / (np.float32(1.0) + e[i])
        for i in range(n):
            e[i] = gate[t, i] * e[i] * up[t, i]
    return out


def swiglu_ref(gate, up):
    g = gate.astype(np.float64)
    with np.errstate(over="ignore"):  # exp(-g) = inf for g < -709: silu(g) = 0
        return (g / (1 + np.exp(-g)) * up).astype(np.float32)


# ================================================================ top-k (sampling)
@njit(inline="always")
def _worse(va, ia, vb, ib):
    # (value, index) a ranks below b: a smaller value, or the same value at a higher index
    return va < vb or (va == vb and ia > ib)


@njit(inline="always")
def _sift_down(hv, hi, r, n):
    # the min-heap hv/hi (worst at the root) over its first n entries, restored below r
    while True:
        c = 2 * r + 1
        if c >= n:
            return
        if c + 1 < n and _worse(hv[c + 1], hi[c + 1], hv[c], hi[c]):
            c += 1
        if not _worse(hv[c], hi[c], hv[r], hi[r]):
            return
        hv[r], hv[c] = hv[c], hv[r]
        hi[r], hi[c] = hi[c], hi[r]
        r = c


@njit(cache=True, nogil=True)  # (no fastmath: NaN must compare as NaN)
def top_k_ids(x, k):
    # x (n,) f32 or f64, 0 < k <= n -> (k,) int64: the indices of the k largest values, largest first, ties by the
    # lower index; NaN ranks as -inf. One pass with a heap of the k best so far (~35 us for 49,152 logits, where
    # np.argpartition takes ~650; O(n log k) at worst: ~1.2 ms for ascending values)
    n = x.shape[0]
    if k < 1 or k > n:
        raise ValueError("top_k_ids: k must be within 1 .. len(x)")
    hv = np.empty(k, dtype=x.dtype)
    hi = np.empty(k, dtype=np.int64)
    for j in range(k):
        v = x[j]
        hv[j] = v if v == v else -np.inf
        hi[j] = j
    for r in range(k // 2 - 1, -1, -1):
        _sift_down(hv, hi, r, k)
    for j in range(k, n):
        v = x[j]
        if v > hv[0]:  # (NaN: false; an equal value ranks below the root, whose index is lower)
            hv[0] = v
            hi[0] = j
            _sift_down(hv, hi, 0, k)
    for m in range(k - 1, 0, -1):  # heapsort: the worst to the end, so the best comes first
        hv[0], hv[m] = hv[m], hv[0]
        hi[0], hi[m] = hi[m], hi[0]
        _sift_down(hv, hi, 0, m)
    return hi


def top_k_ids_ref(x: np.ndarray, k: int) -> np.ndarray:
    """NumPy reference of `top_k_ids`."""
    v = np.where(np.isnan(x), -np.inf, x)
    return np.lexsort((np.arange(len(x)), -v))[:k]

"""Attention over per-head K/V caches, dense or delta (DeltaLLM, reconstructed), on f32 or compressed caches.

Cache layout (one layer), **dim-major** per kv head so that one dimension of one head is a contiguous row over
tokens -- the delta update reads only the rows of the dimensions whose query changed:
  f32   data (Hkv, hd, n_ctx) float32
  f16   data (Hkv, hd, n_ctx) uint16 (IEEE half bits; Numba has no float16 arithmetic)
  q8_0  data (Hkv, hd, n_ctx) int8,  scales (Hkv, hd/32, n_ctx) uint16 (f16 bits): x = d * q
  q4_0  data (Hkv, hd/2, n_ctx) uint8, scales as q8_0: byte row 16 b + k holds dim 32 b + k (low nibble) and
        dim 32 b + 16 + k (high nibble), x = d * (nibble - 8)
Blocks are per token and head, 32 consecutive dimensions each, in ggml's formats (what llama.cpp's `-ctk/-ctv
q8_0|q4_0` caches hold): q8_0 quantized exactly as ggml's reference quantizer (`quantize_row_q8_0_ref`, bit-identical
to gguf-py's `quants.quantize`); q4_0 with the scale searched for the least squared error (`q4_0_scale`) instead of
ggml's largest-value / -8 -- same format, never a larger error per block, perplexity +1.7% instead of +2.1% over f32 on
SmolLM2 (12 windows). The kernel's format follows from the dtype of `data`.

Delta attention (a reconstruction of DeltaLLM's context-aware hybrid attention; the paper has no public code).
Per layer and query head keep a reference query q̂ (initially 0) and a score row s (one float per cached token).
For the token at position t:
    d = q_t - q̂;  d_i = 0 where |d_i| < θ;  q̂ <- q̂ + d  (i.e. q̂_i <- q_t,i where d_i != 0)
    (GQA: the query heads that share a KV head decide together -- dimension i is kept for all of them when any of
    them has |d_i| >= θ -- so that a skipped multiply-add is also a key row not read; see `delta_step`)
    s[j] = q_t · k_j                  for the W most recent keys   (t - W < j <= t, exact)
    s[j] = s[j] + d · k_j             for older keys               (j <= t - W), only the non-zero d_i are read
    softmax(s * scale) and the value sum as usual.
Since |q_t - q̂|_inf < θ after every step, an old score deviates from q̂·k_j by less than θ |k_j|_1 plus the value
it had when it left the window. θ = 0 reproduces dense attention (up to f32 rounding). Sparsity = the fraction of
the outside-window multiply-adds skipped: sum over steps of n_old (hd - nnz(d)) over sum of n_old hd.
Memory: the score row is updated in place, so the state is q̂ (H, hd) and one row s (H, n_ctx) per layer -- 4 H
bytes per token and layer, bounded by the context like the KV cache itself (H / (2 Hkv hd) of an f32 KV cache);
prefill materialises the (H, T, N) scores of a chunk of T queries only, with T chosen to bound that block.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from .ops import exp_inplace

_JIT = dict(cache=True, fastmath=True, nogil=True, error_model="numpy")  # 0 or NaN divisor: inf/NaN, no exception
_JIT_EXACT = dict(cache=True, fastmath=False, nogil=True)  # quantizers: bit-exact with ggml needs IEEE order

QK = 32  # values per quantization block
TJ = 1024  # tokens per tile in decode: rows of 4 KB (f32), which the prefetchers stream at full speed (1 KB: ~0.6x)
KV_TYPES = ("f32", "f16", "q8_0", "q4_0")

# f16 bits -> f32 value, for every one of the 65536 patterns (256 KB; passed to the kernels as `tbl`). The signalling
# NaN patterns raise the invalid flag when converted on aarch64 (a warning at every start): they become NaN all the same
with np.errstate(invalid="ignore"):
    F16_TABLE = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


def layout(kv: str, n_head_kv: int, head_dim: int, n_ctx: int):
    """-> (data shape, data dtype, scales shape) of one layer's K (or V) cache in format `kv`."""
    if kv not in KV_TYPES:
        raise ValueError(f"unknown KV cache type {kv!r} (choose from {', '.join(KV_TYPES)})")
    if kv in ("q8_0", "q4_0") and head_dim % QK:
        raise ValueError(f"kv {kv} needs a head size that is a multiple of {QK} (got {head_dim})")
    rows = head_dim // 2 if kv == "q4_0" else head_dim
    dtype = {"f32": np.float32, "f16": np.uint16, "q8_0": np.int8, "q4_0": np.uint8}[kv]
    sshape = (n_head_kv, head_dim // QK, n_ctx) if kv in ("q8_0", "q4_0") else (n_head_kv, 0, 1)
    return (n_head_kv, rows, n_ctx), dtype, sshape


def bytes_per_token(kv: str, n_head_kv: int, head_dim: int) -> int:
    """Bytes one token takes in one layer's K (or V) cache: as ggml's type sizes (q8_0 34 B / 32, q4_0 18 B / 32)."""
    per = {"f32": 4 * head_dim, "f16": 2 * head_dim,
           "q8_0": head_dim // QK * 34, "q4_0": head_dim // QK * 18}[kv]
    return n_head_kv * per


# ================================================================ f16 conversion (bits)
@njit(**_JIT_EXACT)
def f32_to_f16_bits(x, out):
    # x (n,) f32 -> out (n,) uint16: IEEE half, round to nearest even (as numpy's astype(float16))
    bits = x.view(np.uint32)
    for i in range(x.shape[0]):
        b = np.int64(bits[i])
        sign = (b >> 16) & 0x8000
        a = b & 0x7FFFFFFF
        if a >= 0x7F800000:  # inf / nan
            h = 0x7C00 if a == 0x7F800000 else 0x7E00
        elif a >= 0x477FF000:  # rounds to >= 65536: overflow
            h = 0x7C00
        elif a >= 0x38800000:  # normal half
            h = (a + 0xFFF + ((a >> 13) & 1)) >> 13
            h -= (127 - 15) << 10
        elif a < 0x33000000:  # below half the smallest subnormal: 0
            h = 0
        else:  # subnormal half: value / 2^-24, rounded to nearest even
            e = a >> 23
            m = (a & 0x7FFFFF) | 0x800000
            shift = 126 - e  # m * 2^(e - 150) / 2^-24 = m >> (126 - e)
            h = m >> shift
            rem = m & ((1 << shift) - 1)
            half = 1 << (shift - 1)
            if rem > half or (rem == half and (h & 1)):
                h += 1
        out[i] = np.uint16(sign | h)
    return out


# ================================================================ storing tokens (quantizing)
Q4_STEPS = np.arange(-9, 10) * 0.1  # q4_0 scale candidates: 1 / d = (-8 + step) / (value of largest magnitude)


@njit(**_JIT_EXACT)
def q4_0_scale(x):
    """Scale of one q4_0 block of 32 values with the least squared error (llama.cpp's `make_qx_quants` without weights;
    ggml's reference quantizer takes d = (value of largest magnitude) / -8, ~11% more error on Gaussian data): for each
    candidate 1/d the codes l = clamp(round(x / d), -8, 7), then the least-squares d for those codes; the candidate with
    the largest (sum x l)^2 / sum l^2 wins. Sums in float64 (the products are exact), so NumPy agrees bit for bit."""
    mx = np.float64(0.0)
    for k in range(32):
        if abs(x[k]) > abs(mx):
            mx = np.float64(x[k])
    if mx == 0:
        return np.float32(0.0)
    best = -1.0
    bd = 0.0
    for s in range(Q4_STEPS.shape[0]):
        iscale = (-8.0 + Q4_STEPS[s]) / mx
        sl = 0.0
        l2 = 0.0
        for k in range(32):
            l = min(7.0, max(-8.0, np.round(np.float64(x[k]) * iscale)))
            sl += np.float64(x[k]) * l
            l2 += l * l
        if l2 > 0 and sl * sl / l2 > best:
            best = sl * sl / l2
            bd = sl / l2
    return np.float32(bd)


def store(data, scales, x, p0):
    """x (T, Hkv, hd) f32 -> written to the cache at positions p0 .. p0 + T - 1 (format from data.dtype)."""
    raise NotImplementedError("only callable from jitted code; use store_kv")


@overload(store, jit_options=_JIT_EXACT)
def _store_ov(data, scales, x, p0):
    dt = data.dtype
    if dt == types.float32:
        def impl(data, scales, x, p0):
            T, Hkv, D = x.shape
            for t in range(T):
                for h in range(Hkv):
                    for i in range(D):
                        data[h, i, p0 + t] = x[t, h, i]
        return impl
    if dt == types.uint16:
        def impl(data, scales, x, p0):
            T, Hkv, D = x.shape
            tmp = np.empty(D, dtype=np.float32)
            bits = np.empty(D, dtype=np.uint16)
            for t in range(T):
                for h in range(Hkv):
                    for i in range(D):
                        tmp[i] = x[t, h, i]
                    f32_to_f16_bits(tmp, bits)
                    for i in range(D):
                        data[h, i, p0 + t] = bits[i]
        return impl
    if dt == types.int8:  # q8_0: d = amax / 127, q = round-half-away(x * (1 / d))
        def impl(data, scales, x, p0):
            T, Hkv, D = x.shape
            nb = D // 32
            d = np.empty(nb, dtype=np.float32)
            dbits = np.empty(nb, dtype=np.uint16)
            for t in range(T):
                for h in range(Hkv):
                    for b in range(nb):
                        amax = np.float32(0.0)
                        for k in range(32):
                            amax = max(amax, abs(x[t, h, 32 * b + k]))
                        db = amax / np.float32(127.0)
                        d[b] = db
                        idb = np.float32(1.0) / db if db != 0 else np.float32(0.0)
                        for k in range(32):
                            v = x[t, h, 32 * b + k] * idb
                            r = np.floor(abs(v) + np.float32(0.5))
                            data[h, 32 * b + k, p0 + t] = np.int8(r if v >= 0 else -r)
                    f32_to_f16_bits(d, dbits)
                    for b in range(nb):
                        scales[h, b, p0 + t] = dbits[b]
        return impl
    if dt == types.uint8:  # q4_0: the scale searched for least squared error (see q4_0_scale)
        def impl(data, scales, x, p0):
            T, Hkv, D = x.shape
            nb = D // 32
            d = np.empty(nb, dtype=np.float32)
            dbits = np.empty(nb, dtype=np.uint16)
            q = np.empty(32, dtype=np.int64)
            for t in range(T):
                for h in range(Hkv):
                    for b in range(nb):
                        d[b] = q4_0_scale(x[t, h, 32 * b:32 * b + 32])
                    f32_to_f16_bits(d, dbits)
                    for b in range(nb):
                        scales[h, b, p0 + t] = dbits[b]
                        df = F16_TABLE[dbits[b]]
                        idb = np.float32(1.0) / df if df != 0 else np.float32(0.0)
                        for k in range(32):
                            y = np.float32(np.round(x[t, h, 32 * b + k] * idb))
                            q[k] = np.int64(min(np.float32(7.0), max(np.float32(-8.0), y))) + 8
                        for k in range(16):
                            data[h, 16 * b + k, p0 + t] = np.uint8(q[k] | (q[k + 16] << 4))
        return impl
    return None


@njit(**_JIT)
def fwht_rows(x):
    # x (R, D), D a power of 2 -> x @ H / sqrt(D) in place: the orthonormal Walsh-Hadamard transform of each row
    # (symmetric and its own inverse), as llama.cpp rotates K and V before quantizing them (`attn_rot_k/v`)
    R, D = x.shape
    f = np.float32(1.0 / np.sqrt(D))
    for r in range(R):
        row = x[r]
        h = 1
        while h < D:
            for i0 in range(0, D, 2 * h):
                for i in range(i0, i0 + h):
                    a = row[i]
                    b = row[i + h]
                    row[i] = a + b
                    row[i + h] = a - b
            h *= 2
        for i in range(D):
            row[i] *= f
    return x


def can_rotate(head_dim: int) -> bool:
    return head_dim >= 2 and head_dim & (head_dim - 1) == 0


@njit(**_JIT_EXACT)
def store_kv(kd, ks, vd, vs, k, v, p0, rot_k, rot_v):
    # k, v (T, Hkv, hd) f32 -> the K and V caches of one layer at positions p0 .. p0 + T - 1 (rotated first if rot_*)
    T, Hkv, D = k.shape
    if rot_k:
        k = k.copy()
        fwht_rows(k.reshape(T * Hkv, D))
    if rot_v:
        v = v.copy()
        fwht_rows(v.reshape(T * Hkv, D))
    store(kd, ks, k, p0)
    store(vd, vs, v, p0)


# ================================================================ reading tiles (dequantizing)
def tile(data, scales, kh, need, all_rows, t0, t1, tbl, buf):
    """-> (src, off): src[i, off + j - t0] = dim i of kv head kh at token j, for t0 <= j < t1 and the rows i with
    need[i] or all_rows (f32: the cache itself, no copy; other formats: decoded into buf (hd + hd/32, >= t1 - t0))."""
    raise NotImplementedError("only callable from jitted code")


@overload(tile, jit_options=_JIT)
def _tile_ov(data, scales, kh, need, all_rows, t0, t1, tbl, buf):
    # (loops run over 0-based slices so that LLVM vectorizes them along tokens)
    dt = data.dtype
    if dt == types.float32:
        def impl(data, scales, kh, need, all_rows, t0, t1, tbl, buf):
            return data[kh], t0
        return impl
    if dt == types.uint16:
        def impl(data, scales, kh, need, all_rows, t0, t1, tbl, buf):
            D = data.shape[1]
            m = t1 - t0
            for i in range(D):
                if all_rows or need[i]:
                    src = data[kh, i, t0:t1]
                    dst = buf[i, :m]
                    for u in range(m):
                        dst[u] = tbl[src[u]]
            return buf, 0
        return impl
    if dt == types.int8:
        def impl(data, scales, kh, need, all_rows, t0, t1, tbl, buf):
            D = data.shape[1]
            nb = D // 32
            m = t1 - t0
            for b in range(nb):
                use = all_rows
                if not use:
                    for i in range(32 * b, 32 * b + 32):
                        use = use or need[i]
                if not use:
                    continue
                sc = buf[D + b, :m]
                ssrc = scales[kh, b, t0:t1]
                for u in range(m):
                    sc[u] = tbl[ssrc[u]]
                for i in range(32 * b, 32 * b + 32):
                    if all_rows or need[i]:
                        src = data[kh, i, t0:t1]
                        dst = buf[i, :m]
                        for u in range(m):
                            dst[u] = sc[u] * np.float32(src[u])
            return buf, 0
        return impl
    if dt == types.uint8:
        def impl(data, scales, kh, need, all_rows, t0, t1, tbl, buf):
            D = data.shape[1] * 2
            nb = D // 32
            m = t1 - t0
            for b in range(nb):
                use = all_rows
                if not use:
                    for i in range(32 * b, 32 * b + 32):
                        use = use or need[i]
                if not use:
                    continue
                sc = buf[D + b, :m]
                ssrc = scales[kh, b, t0:t1]
                for u in range(m):
                    sc[u] = tbl[ssrc[u]]
                for k in range(16):
                    i0 = 32 * b + k
                    i1 = i0 + 16
                    if all_rows or need[i0] or need[i1]:
                        src = data[kh, 16 * b + k, t0:t1]
                        lo_out = buf[i0, :m]
                        hi_out = buf[i1, :m]
                        for u in range(m):
                            x = np.float32(src[u])
                            hi = np.floor(x * np.float32(0.0625))
                            lo = x - np.float32(16.0) * hi
                            lo_out[u] = (lo - np.float32(8.0)) * sc[u]
                            hi_out[u] = (hi - np.float32(8.0)) * sc[u]
            return buf, 0
        return impl
    return None


def tile_buf(kd, vd, D, m):
    """-> the buffer (D + D/32 + 1 rows, m) that `tile` decodes m tokens of the caches kd and vd into (an empty one when
    both are f32, which are read in place)."""
    raise NotImplementedError("only callable from jitted code")


@overload(tile_buf, jit_options=_JIT)
def _tile_buf_ov(kd, vd, D, m):
    if kd.dtype == types.float32 and vd.dtype == types.float32:
        return lambda kd, vd, D, m: np.empty((0, 0), dtype=np.float32)
    return lambda kd, vd, D, m: np.empty((D + D // 32 + 1, m), dtype=np.float32)


@njit(parallel=True, **_JIT)
def dequantize_cache(data, scales, n, tbl, out):
    # one layer's cache in any format -> out (Hkv, hd, >= n) f32, tokens 0 .. n - 1
    Hkv, D = out.shape[0], out.shape[1]
    nt = (n + TJ - 1) // TJ
    for w in prange(Hkv * nt):
        kh = w // nt
        t0 = (w % nt) * TJ
        t1 = min(n, t0 + TJ)
        buf = tile_buf(data, data, D, TJ)
        need = np.ones(D, dtype=np.bool_)
        src, off = tile(data, scales, kh, need, True, t0, t1, tbl, buf)
        for i in range(D):
            for j in range(t0, t1):
                out[kh, i, j] = src[i, off + j - t0]
    return out


# ================================================================ row helpers (vectorized along tokens)
@njit(**_JIT)
def exp_sum(x, n, a, b, kbuf):
    # x[j] <- exp(a x[j] - b) for j < n (ops.exp_inplace: vectorized), -> their sum
    xs = x[:n]
    for j in range(n):
        xs[j] = a * xs[j] - b
    exp_inplace(x, n, kbuf)
    tot = np.float32(0.0)
    for j in range(n):
        tot += xs[j]
    return tot


@njit(**_JIT)
def axpy_rows(dst, d0, src, s0, m, idx, coef, cnt):
    # dst[d0 + u] += sum_k coef[k] * src[idx[k], s0 + u] for u < m, k < cnt: rows four at a time, tokens innermost
    out = dst[d0:d0 + m]
    k = 0
    while k + 4 <= cnt:
        a0 = src[idx[k], s0:s0 + m]
        a1 = src[idx[k + 1], s0:s0 + m]
        a2 = src[idx[k + 2], s0:s0 + m]
        a3 = src[idx[k + 3], s0:s0 + m]
        c0, c1, c2, c3 = coef[k], coef[k + 1], coef[k + 2], coef[k + 3]
        for u in range(m):
            out[u] += c0 * a0[u] + c1 * a1[u] + c2 * a2[u] + c3 * a3[u]
        k += 4
    while k < cnt:
        a0 = src[idx[k], s0:s0 + m]
        c0 = coef[k]
        for u in range(m):
            out[u] += c0 * a0[u]
        k += 1


@njit(**_JIT)
def axpy_rows_g(dst, d0, src, s0, m, coef, h0, G):
    # dst[g, d0 + u] += sum_i coef[h0 + g, i] * src[i, s0 + u] for g < G, u < m, every row i: rows four at a time with
    # the G heads inside, so that each group of rows is read once (from L1) for all the heads that share it
    D = coef.shape[1]
    i = 0
    while i + 4 <= D:
        a0 = src[i, s0:s0 + m]
        a1 = src[i + 1, s0:s0 + m]
        a2 = src[i + 2, s0:s0 + m]
        a3 = src[i + 3, s0:s0 + m]
        for g in range(G):
            c0, c1, c2, c3 = coef[h0 + g, i], coef[h0 + g, i + 1], coef[h0 + g, i + 2], coef[h0 + g, i + 3]
            out = dst[g, d0:d0 + m]
            for u in range(m):
                out[u] += c0 * a0[u] + c1 * a1[u] + c2 * a2[u] + c3 * a3[u]
        i += 4
    while i < D:
        a0 = src[i, s0:s0 + m]
        for g in range(G):
            c0 = coef[h0 + g, i]
            out = dst[g, d0:d0 + m]
            for u in range(m):
                out[u] += c0 * a0[u]
        i += 1


@njit(**_JIT)
def axpy_rows_gi(dst, h0, G, d0, src, s0, m, idx, coef, cnt):
    # dst[h0 + g, d0 + u] += sum_k coef[h0 + g, k] * src[idx[h0, k], s0 + u] for g < G, u < m, k < cnt: the rows
    # idx[h0] serve all G heads (delta_step's group decisions); four at a time with the heads inside, each read once
    k = 0
    while k + 4 <= cnt:
        a0 = src[idx[h0, k], s0:s0 + m]
        a1 = src[idx[h0, k + 1], s0:s0 + m]
        a2 = src[idx[h0, k + 2], s0:s0 + m]
        a3 = src[idx[h0, k + 3], s0:s0 + m]
        for g in range(G):
            c0, c1, c2, c3 = coef[h0 + g, k], coef[h0 + g, k + 1], coef[h0 + g, k + 2], coef[h0 + g, k + 3]
            out = dst[h0 + g, d0:d0 + m]
            for u in range(m):
                out[u] += c0 * a0[u] + c1 * a1[u] + c2 * a2[u] + c3 * a3[u]
        k += 4
    while k < cnt:
        a0 = src[idx[h0, k], s0:s0 + m]
        for g in range(G):
            c0 = coef[h0 + g, k]
            out = dst[h0 + g, d0:d0 + m]
            for u in range(m):
                out[u] += c0 * a0[u]
        k += 1


@njit(**_JIT)
def dot_rows_g(p, p0, src, s0, m, out, G):
    # out[g, i] += sum_u p[g, p0 + u] * src[i, s0 + u] for g < G, every row i of src (rows four at a time, heads inside)
    D = out.shape[1]
    i = 0
    while i + 4 <= D:
        a0 = src[i, s0:s0 + m]
        a1 = src[i + 1, s0:s0 + m]
        a2 = src[i + 2, s0:s0 + m]
        a3 = src[i + 3, s0:s0 + m]
        for g in range(G):
            pp = p[g, p0:p0 + m]
            x0 = np.float32(0.0)
            x1 = np.float32(0.0)
            x2 = np.float32(0.0)
            x3 = np.float32(0.0)
            for u in range(m):
                w = pp[u]
                x0 += w * a0[u]
                x1 += w * a1[u]
                x2 += w * a2[u]
                x3 += w * a3[u]
            out[g, i] += x0
            out[g, i + 1] += x1
            out[g, i + 2] += x2
            out[g, i + 3] += x3
        i += 4
    while i < D:
        a0 = src[i, s0:s0 + m]
        for g in range(G):
            pp = p[g, p0:p0 + m]
            x0 = np.float32(0.0)
            for u in range(m):
                x0 += pp[u] * a0[u]
            out[g, i] += x0
        i += 1


@njit(**_JIT)
def delta_step(q, qhat, theta, need, nzi, nzc, nnz):
    # One step of the delta recurrence for one token: q (H, hd), q̂ (H, hd) updated, thresholds θ (H, hd). Dimension i of
    # KV head kh is kept (need[kh, i]) when any of the G query heads sharing kh has |q_h,i - q̂_h,i| >= θ_h,i; then
    # every head of the group takes d_h,i = q_h,i - q̂_h,i and q̂_h,i <- q_h,i. Per head: the kept dimensions
    # nzi[h, :nnz[h]] and their d nzc[h, :nnz[h]].
    H, D = q.shape
    Hkv = need.shape[0]
    G = H // Hkv
    for kh in range(Hkv):
        for i in range(D):
            keep = False
            for h in range(kh * G, kh * G + G):
                x = q[h, i] - qhat[h, i]
                if abs(x) >= theta[h, i] and x != 0:
                    keep = True
            need[kh, i] = keep
        for h in range(kh * G, kh * G + G):
            cnt = 0
            for i in range(D):
                if need[kh, i]:
                    nzi[h, cnt] = i
                    nzc[h, cnt] = q[h, i] - qhat[h, i]
                    qhat[h, i] = q[h, i]
                    cnt += 1
            nnz[h] = cnt


# ================================================================ decode: one query per head, on the cache directly
@njit(parallel=True, **_JIT)
def attention_decode(q, kd, ks, vd, vs, n, scale, tbl, delta, qhat, srow, theta, window, skipped, total, rot_k, rot_v,
                     out):
    # q (H, hd) of the token at position n - 1 (already stored) -> out (H, hd); caches in the layout above.
    # delta: update q̂ (H, hd) and the score rows srow (H, n_ctx) as described at the top, with the threshold θ of
    # each head and dimension theta (H, hd) f32 (the spec's single θ, or scaled per dimension); add the outside-window
    # multiply-adds skipped / possible per head to skipped, total (H,) f64. Dense: delta False (qhat, srow unused).
    # rot_k / rot_v: the cache holds Hadamard-rotated keys / values (q is rotated alike, the output rotated back).
    # Work is split over (kv head, token range) pairs, combined flash-decoding style.
    H, D = q.shape
    if rot_k:
        q = fwht_rows(q.copy())
    Hkv = kd.shape[0]
    G = H // Hkv
    n_old = max(0, n - window) if delta else 0
    nzi = np.empty((H, D), dtype=np.int64)  # the entries of d per head that are used: indices, values, count
    nzc = np.empty((H, D), dtype=np.float32)
    nnz = np.zeros(H, dtype=np.int64)
    need = np.zeros((Hkv, D), dtype=np.bool_)
    if delta:
        delta_step(q, qhat, theta, need, nzi, nzc, nnz)
        for h in range(H):
            skipped[h] += n_old * (D - nnz[h])
            total[h] += n_old * D
    # token ranges of about TJ tokens, but at least 4 work items when that leaves each 256 tokens or more
    S = max((n + TJ - 1) // TJ, min((n + 255) // 256, (Hkv + 3) // Hkv))
    L = ((n + S - 1) // S + 63) // 64 * 64
    S = (n + L - 1) // L
    m_part = np.full((Hkv * S, G), -np.inf, dtype=np.float32)
    l_part = np.zeros((Hkv * S, G), dtype=np.float32)
    o_part = np.zeros((Hkv * S, G, D), dtype=np.float32)
    for w in prange(Hkv * S):
        kh = w // S
        j0 = (w % S) * L
        j1 = min(n, j0 + L)
        buf = tile_buf(kd, vd, D, min(TJ, L))
        sc = np.zeros((G, L), dtype=np.float32)
        kbuf = np.empty(L, dtype=np.int32)
        for t0 in range(j0, j1, TJ):
            t1 = min(j1, t0 + TJ)
            a = min(t1, n_old)
            if a > t0:  # keys outside the window: s += d . k over the non-zero d_i only
                src, off = tile(kd, ks, kh, need[kh], False, t0, a, tbl, buf)
                axpy_rows_gi(srow, kh * G, G, t0, src, off, a - t0, nzi, nzc, nnz[kh * G])
                for g in range(G):
                    h = kh * G + g
                    for j in range(t0, a):
                        sc[g, j - j0] = srow[h, j]
            b = max(t0, n_old)
            if t1 > b:  # the window (dense: everything): exact scores
                src, off = tile(kd, ks, kh, need[kh], True, b, t1, tbl, buf)
                axpy_rows_g(sc, b - j0, src, off, t1 - b, q, kh * G, G)
                if delta:
                    for g in range(G):
                        h = kh * G + g
                        for j in range(b, t1):
                            srow[h, j] = sc[g, j - j0]
        nj = j1 - j0
        for g in range(G):
            m = np.float32(-np.inf)
            for j in range(nj):
                m = max(m, sc[g, j])
            m *= scale
            m_part[w, g] = m
            l_part[w, g] = exp_sum(sc[g], nj, scale, m, kbuf)
        for t0 in range(j0, j1, TJ):
            t1 = min(j1, t0 + TJ)
            src, off = tile(vd, vs, kh, need[kh], True, t0, t1, tbl, buf)
            dot_rows_g(sc, t0 - j0, src, off, t1 - t0, o_part[w], G)
    for h in range(H):
        kh = h // G
        g = h % G
        m = np.float32(-np.inf)
        for s in range(S):
            m = max(m, m_part[kh * S + s, g])
        tot = np.float32(0.0)
        for i in range(D):
            out[h, i] = 0
        for s in range(S):
            f = np.exp(m_part[kh * S + s, g] - m)
            tot += f * l_part[kh * S + s, g]
            for i in range(D):
                out[h, i] += f * o_part[kh * S + s, g, i]
        inv = np.float32(1.0) / tot
        for i in range(D):
            out[h, i] *= inv
    if rot_v:
        fwht_rows(out)
    return out


# ================================================================ prefill
@njit(parallel=True, **_JIT)
def delta_scores_prefill(q, K, start, qhat, srow, theta, window, skipped, total, S):
    # q (T, H, hd) at positions start .. start + T - 1, K (Hkv, hd, >= start + T) f32 dim-major -> S (Hkv, T, G, >= start + T)
    # raw scores (unscaled; entries after each query's position are left unset), one step of the delta recurrence per
    # token (updates qhat (H, hd), srow (H, n_ctx), skipped / total (H,)). The steps' decisions first, in token order
    # (cheap), then the scores with heads in parallel.
    T, H, D = q.shape
    Hkv = K.shape[0]
    G = H // Hkv
    allidx = np.arange(D)
    nzi = np.empty((T, H, D), dtype=np.int64)
    nzc = np.empty((T, H, D), dtype=np.float32)
    nnz = np.empty((T, H), dtype=np.int64)
    need = np.empty((Hkv, D), dtype=np.bool_)
    for t in range(T):
        delta_step(q[t], qhat, theta, need, nzi[t], nzc[t], nnz[t])
        n_old = max(0, start + t + 1 - window)
        for h in range(H):
            skipped[h] += n_old * (D - nnz[t, h])
            total[h] += n_old * D
    for h in prange(H):
        kh = h // G
        Kh = K[kh]
        sr = srow[h]
        for t in range(T):
            n = start + t + 1
            n_old = max(0, n - window)
            axpy_rows(sr, 0, Kh, 0, n_old, nzi[t, h], nzc[t, h], nnz[t, h])
            for j in range(n_old, n):
                sr[j] = 0
            axpy_rows(sr, n_old, Kh, n_old, n - n_old, allidx, q[t, h], D)
            for j in range(n):
                S[kh, t, h % G, j] = sr[j]
    return S


@njit(parallel=True, **_JIT)
def causal_softmax(s, start, scale, G):
    # s (T * G, N) raw scores, row r = query t = r // G at position start + t -> in place softmax(s * scale) over the
    # keys j <= start + t, 0 after
    R, N = s.shape
    for r in prange(R):
        n = min(N, start + r // G + 1)
        row = s[r]
        m = np.float32(-np.inf)
        for j in range(n):
            m = max(m, row[j])
        kbuf = np.empty(n, dtype=np.int32)
        inv = np.float32(1.0) / exp_sum(row, n, scale, m * scale, kbuf)
        for j in range(n):
            row[j] *= inv
        for j in range(n, N):
            row[j] = 0
    return s


def softmax_values(s, V, start, scale, G):
    # s (T * G, N) raw causal scores of one kv head's G query heads (row t * G + g), V (hd, N) dim-major -> (T, G, hd)
    causal_softmax(s, start, np.float32(scale), G)
    return (s @ V.T).reshape(-1, G, V.shape[0])  # one BLAS call per kv head (stacked calls thread badly)


def attention_prefill(q, K, V, start, scale):
    # q (T, H, hd) at positions start..start+T-1; K, V (Hkv, hd, >= start+T) f32 dim-major -> (T, H, hd), causal (BLAS)
    T, H, D = q.shape
    Hkv = K.shape[0]
    G = H // Hkv
    N = start + T
    out = np.empty((T, H, D), dtype=np.float32)
    for kh in range(Hkv):
        qk = np.ascontiguousarray(q[:, kh * G:(kh + 1) * G, :]).reshape(T * G, D)
        out[:, kh * G:(kh + 1) * G, :] = softmax_values(qk @ K[kh, :, :N], V[kh, :, :N], start, scale, G)
    return out


SCORE_BLOCK = 1 << 25  # bytes of the score block (H, T, N) a delta prefill chunk may materialise


def delta_attention_prefill(q, K, V, start, scale, qhat, srow, theta, window, skipped, total):
    # as attention_prefill, with delta scores (thresholds theta: a number or (H, hd); state qhat, srow updated;
    # skipped, total (H,) accumulated)
    T, H, D = q.shape
    N = start + T
    Hkv = K.shape[0]
    G = H // Hkv
    out = np.empty((T, H, D), dtype=np.float32)
    theta = np.ascontiguousarray(np.broadcast_to(np.asarray(theta, dtype=np.float32), (H, D)))
    step = max(1, min(T, SCORE_BLOCK // (4 * H * N)))
    for c0 in range(0, T, step):
        c1 = min(T, c0 + step)
        n = start + c1
        S = np.empty((Hkv, c1 - c0, G, n), dtype=np.float32)
        delta_scores_prefill(np.ascontiguousarray(q[c0:c1]), K, start + c0, qhat, srow, theta, window,
                             skipped, total, S)
        for kh in range(Hkv):
            out[c0:c1, kh * G:(kh + 1) * G, :] = softmax_values(S[kh].reshape((c1 - c0) * G, n), V[kh, :, :n],
                                                                start + c0, scale, G)
    return out


# ================================================================ NumPy references
def quantize_ref(x: np.ndarray, kv: str):
    """x (..., hd) f32 -> (codes, scales) as the cache stores them (q8_0: ggml's reference quantizer; q4_0: the
    least-squares scale search of `q4_0_scale`, written plainly), token-major: q8_0 codes (..., hd) int8, q4_0 codes
    (..., hd) 0..15 (unpacked), scales (..., hd/32) float16; f16: (x as float16, None)."""
    x = np.asarray(x, dtype=np.float32)
    if kv == "f32":
        return x.copy(), None
    if kv == "f16":
        return x.astype(np.float16), None
    b = x.reshape(x.shape[:-1] + (-1, QK))
    if kv == "q8_0":
        d = np.abs(b).max(-1, keepdims=True) / np.float32(127)
        with np.errstate(divide="ignore"):
            v = b * np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
        q = (np.sign(v) * np.floor(np.abs(v) + np.float32(0.5))).astype(np.int8)
    elif kv == "q4_0":
        x64 = b.astype(np.float64)
        mx = np.take_along_axis(x64, np.abs(b).argmax(-1)[..., None], -1)[..., 0]
        best = np.full(mx.shape, -1.0)
        bd = np.zeros(mx.shape)
        for step in Q4_STEPS:
            with np.errstate(divide="ignore", invalid="ignore"):
                l = np.clip(np.round(x64 * ((-8.0 + step) / mx)[..., None]), -8, 7)
                sl = np.zeros(mx.shape)
                l2 = np.zeros(mx.shape)
                for k in range(QK):  # in the kernel's order
                    sl += x64[..., k] * l[..., k]
                    l2 += l[..., k] * l[..., k]
                score = sl * sl / l2
                better = (mx != 0) & (l2 > 0) & (score > best)
                best = np.where(better, score, best)
                bd = np.where(better, sl / l2, bd)
        d = bd.astype(np.float32).astype(np.float16).astype(np.float32)[..., None]
        with np.errstate(divide="ignore"):
            idv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
        q = (np.clip(np.round(b * idv), -8, 7) + 8).astype(np.uint8)
    else:
        raise ValueError(kv)
    return q.reshape(x.shape), d[..., 0].astype(np.float16)


def dequantize_ref(codes, scales, kv: str) -> np.ndarray:
    # inverse of quantize_ref -> (..., hd) f32
    if kv in ("f32", "f16"):
        return codes.astype(np.float32)
    b = codes.reshape(codes.shape[:-1] + (-1, QK)).astype(np.float32)
    if kv == "q4_0":
        b = b - 8
    return (b * scales.astype(np.float32)[..., None]).reshape(codes.shape)


def delta_attention_ref(q, k, v, start, scale, qhat, srow, theta, window):
    """The delta algorithm, plainly (float64 scores; q̂ in float32 as the kernels keep it, so the thresholding
    decisions agree), thresholds θ (H, hd): q (T, H, hd) at positions start.., k, v (Hkv, start+T, hd) -> (out (T, H, hd),
    skipped (H,), total (H,)); qhat (H, hd) f32 and srow (H, >= start+T) f64 are updated in place."""
    T, H, D = q.shape
    G = H // k.shape[0]
    theta = np.broadcast_to(np.asarray(theta, dtype=np.float32), (H, D))
    out = np.zeros((T, H, D))
    skipped, total = np.zeros(H), np.zeros(H)
    for t in range(T):
        n = start + t + 1
        n_old = max(0, n - window)
        dq = (q[t] - qhat).astype(np.float32)  # (H, D), before any update of this step
        kept = ((np.abs(dq) >= theta) & (dq != 0)).reshape(-1, G, D).any(1)  # (Hkv, D): any head of the group
        for h in range(H):
            kh = k[h // G].astype(np.float64)
            keep = kept[h // G]
            d = np.where(keep, dq[h], np.float32(0))
            qhat[h] = np.where(keep, q[t, h], qhat[h])
            srow[h, :n_old] += kh[:n_old, keep] @ d[keep].astype(np.float64)
            srow[h, n_old:n] = kh[n_old:n] @ q[t, h].astype(np.float64)
            skipped[h] += n_old * (D - keep.sum())
            total[h] += n_old * D
            s = srow[h, :n] * scale
            p = np.exp(s - s.max())
            out[t, h] = p @ v[h // G, :n].astype(np.float64) / p.sum()
    return out.astype(np.float32), skipped, total


def simulate_sparsity(q, theta, window: int, n_head_kv: int | None = None) -> float:
    """Sparsity the delta recurrence reaches on the queries q (T, H, hd) of one layer (positions 0..T-1) at
    threshold θ (a number, or per head and dimension (H, hd)) -- the fraction of outside-window multiply-adds skipped;
    n_head_kv: the KV heads the query heads share (decisions are per KV head; default H: none shared)."""
    q = np.ascontiguousarray(q, dtype=np.float32)
    th = np.broadcast_to(np.asarray(theta, dtype=np.float32), q.shape[1:]).copy()
    hkv = q.shape[1] if n_head_kv is None else n_head_kv
    if hkv < 1 or q.shape[1] % hkv:
        raise ValueError(f"{q.shape[1]} query heads cannot share {hkv} KV heads")
    return _simulate(q, th, window, hkv)


@njit(**_JIT)
def _simulate(q, theta, window, n_head_kv):
    T, H, D = q.shape
    qhat = np.zeros((H, D), dtype=np.float32)
    need = np.empty((n_head_kv, D), dtype=np.bool_)
    nzi = np.empty((H, D), dtype=np.int64)
    nzc = np.empty((H, D), dtype=np.float32)
    nnz = np.empty(H, dtype=np.int64)
    skip = 0.0
    tot = 0.0
    for t in range(T):
        n_old = max(0, t + 1 - window)
        delta_step(q[t], qhat, theta, need, nzi, nzc, nnz)
        for h in range(H):
            skip += n_old * (D - nnz[h])
            tot += n_old * D
    return skip / tot if tot > 0 else 0.0


def calibrate_threshold(q, target: float, window: int, dim_scale=None, iters: int = 40,
                        n_head_kv: int | None = None) -> float:
    """Smallest θ (bisection) at which the delta recurrence on q (T, H, hd) with thresholds θ * dim_scale (H, hd)
    (default 1) skips >= target of the outside-window multiply-adds (the sparsity grows with θ)."""
    if target <= 0:
        return 0.0
    sc = np.ones(q.shape[1:], np.float32) if dim_scale is None else np.asarray(dim_scale, np.float32)
    lo, hi = 0.0, float(np.abs(q).max() / sc.min()) * 2 + 1e-6
    if simulate_sparsity(q, hi * sc, window, n_head_kv) < target:
        return hi
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if simulate_sparsity(q, mid * sc, window, n_head_kv) >= target:
            hi = mid
        else:
            lo = mid
    return hi


def rel_error(a, b) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


__all__ = ["KV_TYPES", "F16_TABLE", "layout", "q4_0_scale", "bytes_per_token", "store_kv", "fwht_rows", "can_rotate",
           "dequantize_cache",
           "attention_decode", "attention_prefill", "delta_attention_prefill", "delta_scores_prefill",
           "quantize_ref", "dequantize_ref", "delta_attention_ref", "simulate_sparsity", "calibrate_threshold",
           "f32_to_f16_bits"]
_ = math

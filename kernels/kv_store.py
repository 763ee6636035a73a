"""How a K/V cache stores tokens: the formats, the quantizers, f16 bits, the Hadamard rotation, and reading tiles
back as f32 (for the attention kernels of kernels/attention.py).

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
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from .simd import float_to_half, half_to_float, touch

_JIT = dict(cache=True, fastmath=True, nogil=True, error_model="numpy")  # 0 or NaN divisor: inf/NaN, no exception
_JIT_EXACT = dict(cache=True, fastmath=False, nogil=True)  # quantizers: bit-exact with ggml needs IEEE order

QK = 32  # values per quantization block
TJ = 1024  # tokens per tile in decode: rows of 4 KB (f32), which the prefetchers stream at full speed (1 KB: ~0.6x)
KV_TYPES = ("f32", "f16", "q8_0", "q4_0")

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
    # x (n,) f32 -> out (n,) uint16: IEEE half, round to nearest even (as numpy's astype(float16); the machine's
    # conversion instruction: vcvtps2ph with F16C, fcvtn on aarch64)
    for i in range(x.shape[0]):
        out[i] = float_to_half(x[i])
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
            for t in range(T):
                for h in range(Hkv):
                    for i in range(D):
                        data[h, i, p0 + t] = float_to_half(x[t, h, i])
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
                        df = half_to_float(dbits[b])
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
@njit(**_JIT)
def block_scales(scales, kh, b, need, all_rows, t0, t1, out):
    # scales (Hkv, hd/32, n_ctx) f16 bits -> out (t1 - t0,) f32: the scales of block b (dims 32 b .. 32 b + 31) of kv
    # head kh at tokens t0 .. t1 - 1, when all_rows or a dimension of the block is needed; -> whether it was
    use = all_rows
    if not use:
        for i in range(32 * b, 32 * b + 32):
            use = use or need[i]
    if use:
        ssrc = scales[kh, b, t0:t1]
        for u in range(t1 - t0):
            out[u] = half_to_float(ssrc[u])
    return use


def as_f32(x):
    """A cache element as f32: f16 bits converted (vcvtph2ps / fcvtl where a loop vectorizes), f32 as it is."""
    raise NotImplementedError("only callable from jitted code")


@overload(as_f32, jit_options=_JIT, inline="always")
def _as_f32_ov(x):
    if x == types.uint16:
        return lambda x: half_to_float(x)
    return lambda x: np.float32(x)


def tile(data, scales, kh, need, all_rows, t0, t1, buf):
    """-> (src, off): as_f32(src[i, off + j - t0]) = dim i of kv head kh at token j, for t0 <= j < t1 and the rows i
    with need[i] or all_rows (f32, f16: the cache itself, no copy, each element converted where it is read; q8_0,
    q4_0: decoded into buf (hd + hd/32, >= t1 - t0) f32)."""
    raise NotImplementedError("only callable from jitted code")


@overload(tile, jit_options=_JIT)
def _tile_ov(data, scales, kh, need, all_rows, t0, t1, buf):
    # (loops run over 0-based slices so that LLVM vectorizes them along tokens)
    dt = data.dtype
    if dt == types.float32 or dt == types.uint16:
        def impl(data, scales, kh, need, all_rows, t0, t1, buf):
            return data[kh], t0
        return impl
    if dt == types.int8:
        def impl(data, scales, kh, need, all_rows, t0, t1, buf):
            D = data.shape[1]
            nb = D // 32
            m = t1 - t0
            for b in range(nb):
                sc = buf[D + b, :m]
                if not block_scales(scales, kh, b, need, all_rows, t0, t1, sc):
                    continue
                for i in range(32 * b, 32 * b + 32):
                    if all_rows or need[i]:
                        src = data[kh, i, t0:t1]
                        dst = buf[i, :m]
                        for u in range(m):
                            dst[u] = sc[u] * np.float32(src[u])
            return buf, 0
        return impl
    if dt == types.uint8:
        def impl(data, scales, kh, need, all_rows, t0, t1, buf):
            D = data.shape[1] * 2
            nb = D // 32
            m = t1 - t0
            for b in range(nb):
                sc = buf[D + b, :m]
                if not block_scales(scales, kh, b, need, all_rows, t0, t1, sc):
                    continue
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


def touch_rows(data, kh, t0, t1):
    """Read one byte of every cache line of tokens t0 .. t1 - 1 of kv head kh, row after row (f32 and f16 caches, which
    the decode kernels read in place, four rows side by side: a walk the hardware prefetchers follow poorly. Cold
    (the usual case in decode: a layer's K / V was last read a token ago, before every other layer's weights), an
    item of SmolLM2 at 200 tokens 9.3 -> 5.7-6.7 us with this pass first; hot, +0.6 us). Quantized caches: nothing
    (`tile` decodes them row after row). Software prefetch hints for the same lines, all at once or a few rows ahead
    of the kernels, measured no better than none."""
    raise NotImplementedError("only callable from jitted code")


@overload(touch_rows, jit_options=_JIT)
def _touch_rows_ov(data, kh, t0, t1):
    if data.dtype in (types.float32, types.uint16):
        def impl(data, kh, t0, t1):
            if t1 <= t0:
                return
            base = data.ctypes.data + kh * data.strides[0] + t0 * data.itemsize
            nbytes = (t1 - t0) * data.itemsize
            for i in range(data.shape[1]):
                r = base + i * data.strides[1]
                for b in range(0, nbytes, 64):
                    touch(r + b)
                touch(r + nbytes - 1)
        return impl
    return lambda data, kh, t0, t1: None


def tile_buf(kd, vd, D, m):
    """-> the buffer (D + D/32 + 1 rows, m) that `tile` decodes m tokens of the caches kd and vd into (an empty one when
    both are f32 or f16, which are read in place)."""
    raise NotImplementedError("only callable from jitted code")


@overload(tile_buf, jit_options=_JIT)
def _tile_buf_ov(kd, vd, D, m):
    if kd.dtype in (types.float32, types.uint16) and vd.dtype in (types.float32, types.uint16):
        return lambda kd, vd, D, m: np.empty((0, 0), dtype=np.float32)
    return lambda kd, vd, D, m: np.empty((D + D // 32 + 1, m), dtype=np.float32)


@njit(parallel=True, **_JIT)
def dequantize_cache(data, scales, n, out):
    # one layer's cache in any format -> out (Hkv, hd, >= n) f32, tokens 0 .. n - 1
    Hkv, D = out.shape[0], out.shape[1]
    nt = (n + TJ - 1) // TJ
    for w in prange(Hkv * nt):
        kh = w // nt
        t0 = (w % nt) * TJ
        t1 = min(n, t0 + TJ)
        buf = tile_buf(data, data, D, TJ)
        need = np.ones(D, dtype=np.bool_)
        src, off = tile(data, scales, kh, need, True, t0, t1, buf)
        for i in range(D):
            for j in range(t0, t1):
                out[kh, i, j] = as_f32(src[i, off + j - t0])
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


__all__ = ["QK", "TJ", "KV_TYPES", "as_f32", "layout", "bytes_per_token", "f32_to_f16_bits", "q4_0_scale",
           "store_kv", "fwht_rows", "can_rotate", "tile", "tile_buf", "dequantize_cache", "quantize_ref",
           "dequantize_ref"]

"""K-quant quantizers (Q4_K, Q6_K) in NumPy, which gguf-py cannot quantize (it only dequantizes them).

They follow ggml's reference algorithms, the ones llama.cpp's quantizer runs when no importance matrix is given:
`quantize_row_q4_K_ref` (per 32-value sub-block, `make_qkx2_quants`: a scale and a min fitted by weighted least
squares over a sweep of 21 trial scales; then 6-bit sub-block scales and mins under one f16 pair per 256 values)
and `quantize_row_q6_K_ref` (per 16-value sub-block, `make_qx_quants`: a symmetric scale refined over 18 trial
scales; then 8-bit sub-block scales under one f16 per 256 values). Everything is computed in float32 in the same
order of operations as the C code, so the bytes match llama.cpp's (tested through llama-cpp-python's libggml).

Vectorized over sub-blocks: a sub-block's values lie along axis 0 of an (n, groups) array, so that reductions
along axis 0 accumulate in order, one element after the other, as the C loops do (NumPy's pairwise summation
applies only along the contiguous axis). Rows are processed in chunks to bound the working memory.

Block layouts (bytes per 256 values):
  Q4_K 144: d f16, dmin f16, scales[12] (8 x 6-bit scale and min), qs[128] (value = d*sc*q - dmin*m)
  Q6_K 210: ql[128], qh[64], scales[16] i8, d f16                    (value = d*sc*(q - 32))
"""
from __future__ import annotations

import numpy as np

QK_K = 256
Q4_K_BYTES = 144
Q6_K_BYTES = 210
GROUP_MAX_EPS = np.float32(1e-15)  # ggml: a sub-block whose largest |x| is below this is all zero
CHUNK_GROUPS = 1 << 13  # sub-blocks processed at once: (32, 8192) f32 arrays of 1 MB stay in cache (1.7x faster than 8 MB)

f32 = np.float32


def _sum0(a: np.ndarray) -> np.ndarray:
    # (n, G) f32 -> (G,): a[0] + a[1] + ... in order, in float32 (the C loops' accumulation)
    return np.add.reduce(a, axis=0, dtype=np.float32)


def _rint(a: np.ndarray) -> np.ndarray:
    # f32 -> nearest integer, ties to even (ggml's nearest_int: the f32 sum with 1.5 * 2^23)
    return np.rint(a)


def make_qkx2_quants(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """x, w (n, G) f32 -> scale (G,), min (G,) (stored negated: value = scale * L - min), L (n, G) uint8 in
    [0, nmax]: ggml's make_qkx2_quants with use_mad = false, vectorized over the G sub-blocks."""
    lo, hi = x.min(0), x.max(0)
    sum_w = _sum0(w)
    sum_x = _sum0(w * x)
    lo = np.minimum(lo, f32(0))
    flat = hi == lo
    rng = np.where(flat, f32(1), hi - lo)  # flat sub-blocks are answered below; avoid dividing by zero
    iscale = f32(nmax) / rng
    scale = f32(1) / iscale
    L = np.clip(_rint(iscale * (x - lo)), 0, nmax)
    diff = scale * L + lo - x
    best = _sum0(w * (diff * diff))
    with np.errstate(divide="ignore", invalid="ignore"):
        for step in range(nstep + 1):  # note: `lo` moves to the best fit's min as the sweep goes (as in ggml)
            rng = np.where(flat, f32(1), hi - lo)
            iscale = (f32(rmin) + f32(rdelta) * f32(step) + f32(nmax)) / rng
            La = np.clip(_rint(iscale * (x - lo)), 0, nmax)
            wl = w * La
            sum_l, sum_l2, sum_xl = _sum0(wl), _sum0(wl * La), _sum0(wl * x)
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            pos = this_min > 0
            this_min = np.where(pos, f32(0), this_min)
            this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
            diff = this_scale * La + this_min - x
            cur = _sum0(w * (diff * diff))
            better = (D > 0) & (cur < best)
            L = np.where(better, La, L)
            best = np.where(better, cur, best)
            scale = np.where(better, this_scale, scale)
            lo = np.where(better, this_min, lo)
    scale = np.where(flat, f32(0), scale)
    L = np.where(flat, f32(0), L)
    return scale, -lo, L.astype(np.uint8)


def make_qx_quants(x: np.ndarray, nmax: int):
    """x (n, G) f32 -> scale (G,), L (n, G) uint8 in [0, 2 nmax) (value = scale * (L - nmax)): ggml's
    make_qx_quants with rmse_type = 1 (weights x^2) and no importance weights, vectorized over G sub-blocks."""
    n, G = x.shape
    ax = np.abs(x)
    imax = np.argmax(ax, axis=0)  # the first largest |x|, as the C loop's strict comparison picks
    amax = ax[imax, np.arange(G)]
    mx = x[imax, np.arange(G)]
    zero = amax < GROUP_MAX_EPS
    mx = np.where(zero, f32(1), mx)
    w = x * x
    wx = w * x

    def trial(iscale):
        q = np.clip(_rint(iscale * x), -nmax, nmax - 1)
        return q, _sum0(wx * q), _sum0((w * q) * q)

    q, sumlx, suml2 = trial(f32(-nmax) / mx)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 != 0, sumlx / suml2, f32(0))
        best = scale * sumlx
        L = q
        for step in range(-9, 10):
            if step == 0:
                continue
            q, sumlx, suml2 = trial(-(f32(nmax) + f32(0.1) * f32(step)) / mx)
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            L = np.where(better, q, L)
            scale = np.where(better, sumlx / suml2, scale)
            best = np.where(better, scale * sumlx, best)
    scale = np.where(zero, f32(0), scale)
    L = np.where(zero, f32(-nmax), L)  # ggml sets L = 0 (code -nmax) for an all-zero sub-block
    return scale, (L + nmax).astype(np.uint8)


def _check(rows: np.ndarray, name: str) -> np.ndarray:
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if rows.ndim != 2 or rows.shape[1] % QK_K:
        raise ValueError(f"{name} quantizes (rows, k * {QK_K}) matrices, got shape {rows.shape}")
    if not np.isfinite(rows).all():
        raise ValueError(f"{name}: the matrix has non-finite values")
    return rows


def _quantize_rows(rows: np.ndarray, name: str, block_bytes: int, sub: int, blocks) -> np.ndarray:
    """(R, C) f32, C % 256 == 0 -> (R, C / 256 * block_bytes) uint8: blocks((NB, 256) f32) -> (NB, block_bytes)
    applied to a few rows at a time (about CHUNK_GROUPS sub-blocks of `sub` values each), bounding the temporaries."""
    rows = _check(rows, name)
    R, C = rows.shape
    out = np.empty((R, C // QK_K * block_bytes), dtype=np.uint8)
    step = max(1, CHUNK_GROUPS // max(1, C // sub))
    for r0 in range(0, R, step):
        part = rows[r0:r0 + step]
        out[r0:r0 + part.shape[0]] = blocks(part.reshape(-1, QK_K)).reshape(part.shape[0], -1)
    return out


def quantize_q4_k(rows: np.ndarray) -> np.ndarray:
    """(R, C) f32, C % 256 == 0 -> (R, C / 256 * 144) uint8 Q4_K blocks (quantize_row_q4_K_ref)."""
    return _quantize_rows(rows, "Q4_K", Q4_K_BYTES, 32, _q4_k_blocks)


def _q4_k_blocks(xb: np.ndarray) -> np.ndarray:
    # xb (NB, 256) f32 -> (NB, 144) uint8
    NB = xb.shape[0]
    x = np.ascontiguousarray(xb.reshape(NB * 8, 32).T)  # (32, NB*8): sub-block j of block i is column 8i + j
    av_x = np.sqrt(_sum0(x * x) / f32(32))
    w = av_x + np.abs(x)
    scales, mins, L = make_qkx2_quants(x, w, 15, -1.0, 0.1, 20)
    scales, mins = scales.reshape(NB, 8), mins.reshape(NB, 8)
    max_scale = np.maximum(scales.max(1), f32(0))
    max_min = np.maximum(mins.max(1), f32(0))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, f32(63) / max_scale, f32(0))
        inv_min = np.where(max_min > 0, f32(63) / max_min, f32(0))
    # nearest_int(...) stored in a uint8_t, then MIN(63, .)
    ls = np.minimum(_rint(inv_scale[:, None] * scales).astype(np.int64) & 255, 63).astype(np.uint8)
    lm = np.minimum(_rint(inv_min[:, None] * mins).astype(np.int64) & 255, 63).astype(np.uint8)
    packed = np.empty((NB, 12), dtype=np.uint8)
    packed[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    packed[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (ls[:, 4:] & 15) | ((lm[:, 4:] & 15) << 4)
    d = (max_scale / f32(63)).astype(np.float16)
    dmin = (max_min / f32(63)).astype(np.float16)
    # requantize with the stored (rounded) scales and mins; a sub-block whose scale is 0 keeps make_qkx2's L
    dq = d.astype(np.float32)[:, None] * ls.astype(np.float32)  # (NB, 8)
    dm = dmin.astype(np.float32)[:, None] * lm.astype(np.float32)
    xs = xb.reshape(NB, 8, 32)
    with np.errstate(divide="ignore", invalid="ignore"):
        Lr = np.clip(_rint((xs + dm[..., None]) / dq[..., None]), 0, 15).astype(np.uint8)
    L = np.where((dq != 0)[..., None], Lr, L.T.reshape(NB, 8, 32))
    L = L.reshape(NB, 4, 2, 32)  # chunk c of 64 values: low nibbles sub-block 2c, high nibbles 2c + 1
    qs = (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(NB, 128)
    out = np.empty((NB, Q4_K_BYTES), dtype=np.uint8)
    out[:, 0:2] = d.reshape(NB, 1).view(np.uint8)
    out[:, 2:4] = dmin.reshape(NB, 1).view(np.uint8)
    out[:, 4:16] = packed
    out[:, 16:] = qs
    return out


def quantize_q6_k(rows: np.ndarray) -> np.ndarray:
    """(R, C) f32, C % 256 == 0 -> (R, C / 256 * 210) uint8 Q6_K blocks (quantize_row_q6_K_ref)."""
    return _quantize_rows(rows, "Q6_K", Q6_K_BYTES, 16, _q6_k_blocks)


def _q6_k_blocks(xb: np.ndarray) -> np.ndarray:
    # xb (NB, 256) f32 -> (NB, 210) uint8
    NB = xb.shape[0]
    x = np.ascontiguousarray(xb.reshape(NB * 16, 16).T)  # (16, NB*16)
    scales, L = make_qx_quants(x, 32)
    scales = scales.reshape(NB, 16)
    L = L.T.reshape(NB, 16, 16)
    iabs = np.argmax(np.abs(scales), axis=1)  # the first largest |scale|
    max_scale = scales[np.arange(NB), iabs]
    zero = np.abs(max_scale) < GROUP_MAX_EPS
    max_scale = np.where(zero, f32(1), max_scale)
    iscale = f32(-128) / max_scale
    d = (f32(1) / iscale).astype(np.float16)
    sc = np.minimum(_rint(iscale[:, None] * scales), 127).astype(np.int8)
    dq = d.astype(np.float32)[:, None] * sc.astype(np.float32)  # (NB, 16)
    xs = xb.reshape(NB, 16, 16)
    with np.errstate(divide="ignore", invalid="ignore"):
        Lr = (np.clip(_rint(xs / dq[..., None]), -32, 31) + 32).astype(np.uint8)
    L = np.where((dq != 0)[..., None], Lr, L).reshape(NB, 2, 4, 32)  # half h, quarter k, l: value 128h + 32k + l
    ql = np.empty((NB, 2, 2, 32), dtype=np.uint8)
    ql[:, :, 0] = (L[:, :, 0] & 15) | ((L[:, :, 2] & 15) << 4)
    ql[:, :, 1] = (L[:, :, 1] & 15) | ((L[:, :, 3] & 15) << 4)
    qh = (L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4) | ((L[:, :, 3] >> 4) << 6)
    out = np.empty((NB, Q6_K_BYTES), dtype=np.uint8)
    out[:, 0:128] = ql.reshape(NB, 128)
    out[:, 128:192] = qh.reshape(NB, 64)
    out[:, 192:208] = sc.view(np.uint8)
    out[:, 208:210] = d.reshape(NB, 1).view(np.uint8)
    out[zero] = 0  # ggml zeroes a block whose sub-block scales are all (near) zero
    return out

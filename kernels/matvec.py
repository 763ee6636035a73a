"""Fused dequantize + mat-vec for GGML weight types, and the batched (prefill) mat-mul.

Weights are repacked once at load (see `pack`) from the file's blocks (decoded by `kernels/quants.py`, the
NumPy reference) into layouts the LLVM vectorizer handles well, with R = 64 rows interleaved (row innermost):
  "q4": 4-bit codes, 16 bytes per 32 values (low nibble = value i, high = value i + 16), f32 scale and min per 32
        (Q4_0, Q4_1, Q4_K; Q4_K's sub-block scales are folded in, so all three share one kernel);
  "q8": int8 codes, f32 scale per 32 or 16 values (Q8_0, Q5_0, Q6_K);
  "f":  f32 rows (F32, F16, BF16), multiplied by BLAS.
Decode (a few rows of X): each thread takes groups of R rows and walks the blocks once, the inner loops running
along the R rows in 16-lane f32 vectors; X stays f32 (codes times x are exact in f32). Prefill (many rows of X):
weight tiles are dequantized to f32 and multiplied by BLAS (`numpy @`), which is compute-bound and fast here.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from gguf import GGMLQuantizationType as QT
from numba import njit, prange

from . import quants

BATCH_MAX = 8  # rows of X up to which the fused kernels are used; above, dequantized tiles + BLAS
TILE_BYTES = 1 << 22  # f32 bytes of a dequantized weight tile in the BLAS path


class Packed(NamedTuple):
    kind: str  # "q4", "q8" or "f"
    codes: np.ndarray  # q4: (G, nb, 16, R) u8; q8: (G, ng, group, R) i8; f: (rows, cols) f32
    scale: np.ndarray  # (G, cols / group, R) f32
    minv: np.ndarray  # (G, nb, R) f32 (q4 with a min), else (0, 0, 0)
    zero: int  # code offset (8 for Q4_0)
    group: int  # values per scale: 32, or 16 (Q6_K)
    rows: int
    cols: int


R = 64  # rows interleaved in the packed layouts: the kernels' vector lanes run along rows
_EMPTY = np.zeros((0, 0, 0), dtype=np.float32)


def _interleave(a: np.ndarray) -> np.ndarray:
    # (rows, n, ...) -> (G, n, ..., R): rows padded with zeros to a multiple of R, row index innermost
    rows = a.shape[0]
    G = -(-rows // R)
    if G * R != rows:
        a = np.concatenate([a, np.zeros((G * R - rows,) + a.shape[1:], dtype=a.dtype)])
    a = a.reshape((G, R) + a.shape[1:])
    return np.ascontiguousarray(np.moveaxis(a, 1, -1))


def pack(qtype: int, raw: np.ndarray) -> Packed:
    """Raw GGML data (rows, row_bytes) uint8 (or (rows, cols) f32/f16) -> the kernels' layout."""
    qtype = QT(qtype)
    if qtype in (QT.F32, QT.F16, QT.BF16):
        w = quants.bf16_to_f32(raw) if qtype == QT.BF16 else np.ascontiguousarray(raw, dtype=np.float32)
        return Packed("f", w, _EMPTY, _EMPTY, 0, 1, w.shape[0], w.shape[1])
    if qtype in (QT.Q4_0, QT.Q4_1):  # the file's nibbles already are the "q4" layout: no decode and re-pack
        blk = quants._blocks(raw, qtype)
        off = 2 if qtype == QT.Q4_0 else 4
        nib, codes = blk[..., off:], None
        sc, mn = quants._f16(blk[..., 0:2]), None if qtype == QT.Q4_0 else quants._f16(blk[..., 2:4])
        zero, group, rows, cols = (8 if qtype == QT.Q4_0 else 0), 32, blk.shape[0], blk.shape[1] * 32
    else:
        dec = quants.DECODERS.get(qtype)
        if dec is None:
            raise ValueError(f"no kernel for GGML type {qtype.name}")
        c = dec(raw)
        codes, sc, mn, zero, group = c.codes, c.scale, c.min, c.zero, c.group
        rows, cols = codes.shape
        nib = None
        if qtype == QT.Q4_K:
            q = codes.reshape(rows, -1, 32)
            nib = q[..., :16] | (q[..., 16:] << 4)  # (rows, nb, 16)
    if not np.isfinite(sc).all() or (mn is not None and not np.isfinite(mn).all()):
        raise ValueError(f"{qtype.name} block scales are not all finite")
    scale = _interleave(sc.astype(np.float32))
    if nib is not None:
        minv = _EMPTY if mn is None else _interleave(mn.astype(np.float32))
        return Packed("q4", _interleave(nib), scale, minv, zero, 32, rows, cols)
    return Packed("q8", _interleave(codes.reshape(rows, -1, group)), scale, _EMPTY, 0, group, rows, cols)


# ---------------------------------------------------------------- fused mat-vec kernels
# The loops innermost over the R interleaved rows are what LLVM vectorizes (16 f32 lanes); nibbles are split
# with float arithmetic (hi = floor(q / 16), lo = q - 16 hi) because Numba widens small-integer arithmetic to
# int64, which does not vectorize (checked in the machine code; this runs ~3x faster than integer dots here).
@njit(parallel=True, cache=True, fastmath=True, nogil=True)
def matvec_q4(W, S, M, zero, x, xs, out):
    # W (G, nb, 16, R) u8, S (G, nb, R) f32, M (G, nb, R) f32 or (0, 0, 0), x (B, nb*32) f32,
    # xs (B, nb) f32 block sums of x -> out (B, G*R);  w = (q - zero) * S + M
    G, nb, _, RR = W.shape
    B = x.shape[0]
    has_min = M.shape[0] > 0
    for g in prange(G):
        acc = np.zeros((B, RR), dtype=np.float32)
        tmp = np.empty(RR, dtype=np.float32)
        for k in range(nb):
            s = S[g, k]
            for b in range(B):
                for l in range(RR):
                    tmp[l] = 0.0
                for i in range(16):
                    xl = x[b, k * 32 + i]
                    xh = x[b, k * 32 + 16 + i]
                    w = W[g, k, i]
                    for l in range(RR):
                        qf = np.float32(w[l])
                        hi = np.floor(qf * np.float32(0.0625))
                        tmp[l] += (qf - np.float32(16.0) * hi) * xl + hi * xh
                xsk = xs[b, k]
                z = np.float32(zero) * xsk
                a = acc[b]
                if has_min:
                    m = M[g, k]
                    for l in range(RR):
                        a[l] += s[l] * (tmp[l] - z) + m[l] * xsk
                else:
                    for l in range(RR):
                        a[l] += s[l] * (tmp[l] - z)
        for b in range(B):
            for l in range(RR):
                out[b, g * RR + l] = acc[b, l]
    return out


@njit(parallel=True, cache=True, fastmath=True, nogil=True)
def matvec_q8(W, S, x, out):
    # W (G, ng, gs, R) i8, S (G, ng, R) f32, x (B, ng*gs) f32 -> out (B, G*R)
    G, ng, gs, RR = W.shape
    B = x.shape[0]
    for g in prange(G):
        acc = np.zeros((B, RR), dtype=np.float32)
        tmp = np.empty(RR, dtype=np.float32)
        for k in range(ng):
            s = S[g, k]
            for b in range(B):
                for l in range(RR):
                    tmp[l] = 0.0
                for i in range(gs):
                    xv = x[b, k * gs + i]
                    w = W[g, k, i]
                    for l in range(RR):
                        tmp[l] += np.float32(w[l]) * xv
                a = acc[b]
                for l in range(RR):
                    a[l] += s[l] * tmp[l]
        for b in range(B):
            for l in range(RR):
                out[b, g * RR + l] = acc[b, l]
    return out


@njit(cache=True, fastmath=True, nogil=True)
def block_sums(x, xs):
    # x (B, nb*32) f32 -> xs (B, nb) sums of each block of 32
    B, nb = xs.shape
    for b in range(B):
        for k in range(nb):
            s = np.float32(0.0)
            for i in range(32):
                s += x[b, k * 32 + i]
            xs[b, k] = s
    return xs


# ---------------------------------------------------------------- dequantization (embedding rows, prefill tiles)
@njit(parallel=True, cache=True, nogil=True)
def dequantize_q4(W, S, M, zero, rows, out):
    # rows (n,) of a "q4" matrix (indices checked by the caller) -> out (n, nb*32) f32; value = (q - zero) * scale + min
    G, nb, _, RR = W.shape
    has_min = M.shape[0] > 0
    for j in prange(rows.shape[0]):
        r = rows[j]
        g, l = r // RR, r % RR
        for k in range(nb):
            s = S[g, k, l]
            m = M[g, k, l] if has_min else np.float32(0.0)
            for i in range(16):
                q = np.int32(W[g, k, i, l])
                out[j, k * 32 + i] = np.float32((q & 15) - zero) * s + m
                out[j, k * 32 + 16 + i] = np.float32((q >> 4) - zero) * s + m
    return out


@njit(parallel=True, cache=True, nogil=True)
def dequantize_q8(W, S, rows, out):
    # rows (n,) of a "q8" matrix (indices checked by the caller) -> out (n, cols) f32; value = scale * q
    G, ng, gs, RR = W.shape
    for j in prange(rows.shape[0]):
        r = rows[j]
        g, l = r // RR, r % RR
        for k in range(ng):
            s = S[g, k, l]
            for i in range(gs):
                out[j, k * gs + i] = s * np.float32(W[g, k, i, l])
    return out


def dequantize_rows(qtype: int, p: Packed, r0: int, r1: int, out: np.ndarray) -> np.ndarray:
    """Rows r0..r1 of a packed matrix as f32 into out (r1 - r0, cols)."""
    if not (0 <= r0 <= r1 <= p.rows):
        raise ValueError(f"rows {r0}:{r1} do not fit a ({p.rows}, {p.cols}) matrix")
    return gather_rows(p, np.arange(r0, r1, dtype=np.int64), out)


def gather_rows(p: Packed, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
    """The rows `rows` (n,) of a packed matrix as f32 into out (n, cols) (an embedding lookup, a prefill tile)."""
    rows = np.asarray(rows, dtype=np.int64)
    if rows.ndim != 1 or out.shape != (len(rows), p.cols):
        raise ValueError(f"rows {rows.shape} / out {out.shape} do not fit a ({p.rows}, {p.cols}) matrix")
    if len(rows) and not (0 <= rows.min() and rows.max() < p.rows):
        bad = int(rows[(rows < 0) | (rows >= p.rows)][0])
        raise ValueError(f"row {bad} is out of range [0, {p.rows})")
    if p.kind == "f":
        np.take(p.codes, rows, axis=0, out=out)
    elif p.kind == "q4":
        dequantize_q4(p.codes, p.scale, p.minv, p.zero, rows, out)
    else:
        dequantize_q8(p.codes, p.scale, rows, out)
    return out


def matmul(qtype: int, p: Packed, X: np.ndarray, out: np.ndarray) -> np.ndarray:
    """X (N, cols) f32 -> out (N, rows) = X @ W.T."""
    N = X.shape[0]
    if X.shape != (N, p.cols) or out.shape != (N, p.rows):
        raise ValueError(f"matmul shapes: X {X.shape}, out {out.shape}, W ({p.rows}, {p.cols})")
    if p.kind == "f":
        np.matmul(X, p.codes.T, out=out)
        return out
    if N <= BATCH_MAX:
        G = p.codes.shape[0]
        o = out if G * R == p.rows else np.empty((N, G * R), dtype=np.float32)
        if p.kind == "q4":
            xs = block_sums(X, np.empty((N, p.cols // 32), dtype=np.float32))
            matvec_q4(p.codes, p.scale, p.minv, p.zero, X, xs, o)
        else:
            matvec_q8(p.codes, p.scale, X, o)
        if o is not out:
            out[:] = o[:, :p.rows]
    else:
        tile = max(R, TILE_BYTES // (4 * p.cols) // R * R)
        buf = np.empty((min(tile, p.rows), p.cols), dtype=np.float32)
        for r0 in range(0, p.rows, tile):
            r1 = min(p.rows, r0 + tile)
            w = dequantize_rows(qtype, p, r0, r1, buf[:r1 - r0])
            out[:, r0:r1] = X @ w.T
    return out


def matmul_ref(qtype: int, raw: np.ndarray, X: np.ndarray) -> np.ndarray:
    """The reference product in float64: gguf-py-equivalent dequantized weights times X."""
    W = quants.dequantize_ref(qtype, raw)
    return X.astype(np.float64) @ W.T.astype(np.float64)

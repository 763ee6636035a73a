"""Q4_0 / Q4_1 / Q8_0 weights times activations quantized to int8 per block of 32, as llama.cpp multiplies them
(its Q8_0 / Q8_1 activation blocks): the packers into kernels/igemm.py's layouts, the activation quantizer and the
row dequantizer, each with its NumPy reference.

Activations, per row and block of 32 values:  q = rint(x * (127 / max|x|))  (within [-127, 127]; all-zero
blocks give d = 0 and q = 0),  d = max|x| / 127 rounded to f16 (ggml keeps it so),  s = sum q;  stored as
XQ (N, cols) int8, XD (N, cols/32) f32 = d, XS (N, cols/32) int32 = s. A block holding NaN or inf gets d = NaN,
q = 0, s = 0: the outputs it touches are NaN, as a float product's would be.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as QT
from numba import njit, prange

from . import quants
from .igemm import JIT, FORMATS, R, aligned_empty, quantize_q8_row
from .simd import half_to_float

QFORMATS = {QT.Q4_0: "q4_0", QT.Q4_1: "q4_1", QT.Q8_0: "q8_0"}
QK = 32


# ---------------------------------------------------------------- packing at load
def _groups(a: np.ndarray) -> np.ndarray:
    # (rows, ...) -> (G, R, ...), rows padded with zeros to a multiple of R
    rows = a.shape[0]
    G = -(-rows // R)
    if G * R != rows:
        a = np.concatenate([a, np.zeros((G * R - rows,) + a.shape[1:], dtype=a.dtype)])
    return a.reshape((G, R) + a.shape[1:])


def pack(qtype: int, raw: np.ndarray) -> np.ndarray:
    """Raw GGML blocks (rows, nb * bytes) uint8 -> records (G, nb, rec) uint8 in the layout of kernels/igemm.py."""
    qtype = QT(qtype)
    fmt = FORMATS[QFORMATS[qtype]]
    blk = quants._blocks(raw, qtype)  # (rows, nb, bytes); checks the sizes
    rows, nb = blk.shape[:2]
    if not np.isfinite(quants._f16(blk[..., 0:2])).all() or \
            (qtype == QT.Q4_1 and not np.isfinite(quants._f16(blk[..., 2:4])).all()):
        raise ValueError(f"{qtype.name} block scales are not all finite")
    off = {QT.Q4_0: 2, QT.Q4_1: 4, QT.Q8_0: 2}[qtype]
    qs = blk[..., off:]
    if qtype == QT.Q8_0:
        qs = qs ^ np.uint8(0x80)  # q + 128: unsigned codes
    g = _groups(qs)  # (G, R, nb, 4c+j)
    G = g.shape[0]
    codes = g.reshape(G, R, nb, -1, 4).transpose(0, 2, 3, 1, 4).reshape(G, nb, fmt.code_bytes)
    parts = [codes, _groups(blk[..., 0:2]).transpose(0, 2, 1, 3).reshape(G, nb, 2 * R)]
    if qtype == QT.Q4_1:
        parts.append(_groups(blk[..., 2:4]).transpose(0, 2, 1, 3).reshape(G, nb, 2 * R))
    out = aligned_empty((G, nb, fmt.rec))
    return np.concatenate(parts, axis=2, out=out)


# ---------------------------------------------------------------- activations
@njit(**JIT)
def quantize_q8(x, xq, xd, xs):
    # x (N, nb*32) f32 -> xq (N, nb*32) i8, xd (N, nb) f32 = d, xs (N, nb) i32 = sum q, per block of 32
    for t in range(x.shape[0]):
        quantize_q8_row(x, xq, xd, xs, t)
    return xq


@njit(parallel=True, **JIT)
def quantize_q8_parallel(x, xq, xd, xs):
    # as quantize_q8, rows over threads (prefill)
    for t in prange(x.shape[0]):
        quantize_q8_row(x, xq, xd, xs, t)
    return xq


def quantize(x: np.ndarray):
    """x (N, cols) f32, cols a multiple of 32 -> (XQ, XD, XS) for kernels/igemm.py."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    N, cols = x.shape
    if cols % QK:
        raise ValueError(f"activations of {cols} values are not whole blocks of {QK}")
    xq = np.empty((N, cols), dtype=np.int8)
    xd = np.empty((N, cols // QK), dtype=np.float32)
    xs = np.empty((N, cols // QK), dtype=np.int32)
    (quantize_q8_parallel if N > 8 else quantize_q8)(x, xq, xd, xs)
    return xq, xd, xs


def quantize_ref(x: np.ndarray):
    """NumPy reference of `quantize` (the same float32 operations, so bit-identical)."""
    N, cols = x.shape
    b = x.astype(np.float32).reshape(N, cols // QK, QK)
    amax = np.abs(b).max(-1)
    with np.errstate(divide="ignore"):
        iv = np.where(amax > 0, np.float32(127.0) / amax, np.float32(0.0)).astype(np.float32)
    finite = np.isfinite(b).all(-1)  # a block holding NaN or inf: d = NaN, q = 0
    with np.errstate(invalid="ignore"):
        q = np.where(finite[..., None], np.rint(b * iv[..., None]), 0).astype(np.int8)
    d = np.where(finite, amax / np.float32(127.0), np.nan).astype(np.float32).astype(np.float16).astype(np.float32)
    return q.reshape(N, cols), d, q.sum(-1, dtype=np.int32)


# ---------------------------------------------------------------- rows back to f32 (embeddings, BLAS tiles)
@njit(parallel=True, **JIT)
def dequantize_rows(W, nibbles, zero, has_min, code_bytes, rows, out):
    # W (G, nb, rec) u8 records of a q format, rows (n,) (checked by the caller) -> out (n, nb*32) f32,
    # value = d * (q - zero) (+ m), in gguf-py's float32 order
    G, nb, rec = W.shape
    for i in prange(rows.shape[0]):
        g, l = rows[i] // R, rows[i] % R
        for k in range(nb):
            w = W[g, k]
            d = half_to_float(np.uint16(w[code_bytes + 2 * l]) | (np.uint16(w[code_bytes + 2 * l + 1]) << 8))
            m = np.float32(0.0)
            if has_min:
                o = code_bytes + 2 * R + 2 * l
                m = half_to_float(np.uint16(w[o]) | (np.uint16(w[o + 1]) << 8))
            for c in range(code_bytes // (4 * R)):
                for j in range(4):
                    b = np.int32(w[c * 4 * R + 4 * l + j])
                    if nibbles:
                        lo = d * np.float32((b & 15) - zero)
                        hi = d * np.float32((b >> 4) - zero)
                        out[i, k * QK + 4 * c + j] = lo + m if has_min else lo
                        out[i, k * QK + 16 + 4 * c + j] = hi + m if has_min else hi
                    else:
                        out[i, k * QK + 4 * c + j] = d * np.float32(b - zero)
    return out


def gather(fmt: str, W: np.ndarray, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Rows `rows` (n,) int64, already checked to lie within the matrix, as f32 into out (n, cols)."""
    f = FORMATS[fmt]
    return dequantize_rows(W, fmt != "q8_0", {"q4_0": 8, "q4_1": 0, "q8_0": 128}[fmt], f.has_min, f.code_bytes,
                           rows, out)

"""Ternary (BitNet b1.58) weights as 2-bit codes multiplied by int8 activations with the machine's dot-product
instructions: TQ1_0 / TQ2_0 blocks repacked at load into kernels/igemm.py's "tq2" records (as bitnet.cpp's I2_S,
2 bits per weight, codes t + 1 in {0, 1, 2}, but 16 rows interleaved by 4-byte lanes and one f16 scale per row
and block of 256 kept from the file).

Why this layout and not lookup tables: bitnet.cpp's TL1/TL2 and T-MAC gather 4-bit indices of weight groups into
tables of precomputed activation sums (pshufb / tbl): fewer bits moved per weight (TL2: 1.67) but a table
rebuild per activation row, int16 sums and a narrower lane. With AVX-512 VNNI / AVX2 one dot-product
instruction takes 64 / 32 codes at once after a single AND per vector, so the kernel reads 2 bits per weight
at memory speed with little arithmetic; tables would pay where there is no dot product (Cortex-A72), which
keeps the f32 path (kernels/ternary.py).

Activations: BitNet's per-token absmax, q = clamp(rint(x * 127 / max|x|)) within [-127, 127]; XD = 1 and
XS = sum q per 64 values; the product is divided by the token's scale and multiplied by the tensor's scale after.
A token holding NaN or inf gets scale NaN and q = 0: its outputs are NaN.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from . import igemm
from .igemm import JIT, FORMATS, PART_T, R, aligned_empty, quantize_absmax_row
from .q8act import _groups
from .simd import half_to_float
from .ternary import QK, TQ1_BYTES, TQ2_BYTES, TernaryMatrix, _block_codes

FMT = FORMATS["tq2"]
PART = PART_T  # 64 values per activation sum
CODE_BYTES = FMT.code_bytes


def pack(raw: np.ndarray, bytes_per_block: int) -> np.ndarray:
    """raw (rows, nb * bytes) TQ1_0 / TQ2_0 blocks -> records (G, nb, 1056) uint8 (kernels/igemm.py's tq2)."""
    if bytes_per_block not in (TQ1_BYTES, TQ2_BYTES):
        raise ValueError(f"ternary blocks are {TQ1_BYTES} or {TQ2_BYTES} bytes, not {bytes_per_block}")
    if raw.ndim != 2 or raw.dtype != np.uint8 or raw.shape[1] % bytes_per_block:
        raise ValueError(f"ternary weights need (rows, n * {bytes_per_block}) uint8 blocks, "
                         f"got {raw.shape} {raw.dtype}")
    codes, d = _block_codes(bytes_per_block, raw)  # (rows, nb, 256) in {0, 1, 2}, d (rows, nb) f32
    if not np.isfinite(d).all():
        raise ValueError("ternary block scale is not finite")
    rows, nb = d.shape
    c = codes.reshape(rows, nb, 4, 16, 4)  # value 64 s + 4 c + j
    byte = c[:, :, 0] | (c[:, :, 1] << 2) | (c[:, :, 2] << 4) | (c[:, :, 3] << 6)  # (rows, nb, 16, 4)
    g = _groups(byte)
    G = g.shape[0]
    code = g.transpose(0, 2, 3, 1, 4).reshape(G, nb, FMT.code_bytes)
    dbytes = raw.reshape(rows, nb, bytes_per_block)[..., bytes_per_block - 2:]
    scale = _groups(np.ascontiguousarray(dbytes)).transpose(0, 2, 1, 3).reshape(G, nb, 2 * R)
    return np.concatenate([code, scale], axis=2, out=aligned_empty((G, nb, FMT.rec)))


# ---------------------------------------------------------------- activations
@njit(**JIT)
def quantize_absmax(x, xq, xd, xs, scales):
    # x (N, n) f32 -> xq (N, n) i8, xd (N, n/64) = 1, xs (N, n/64) i32 = sum q, scales (N,): BitNet's absmax
    for t in range(x.shape[0]):
        quantize_absmax_row(x, xq, xd, xs, scales, t)
    return xq


@njit(parallel=True, **JIT)
def quantize_absmax_parallel(x, xq, xd, xs, scales):
    # as quantize_absmax, tokens over threads (prefill)
    for t in prange(x.shape[0]):
        quantize_absmax_row(x, xq, xd, xs, scales, t)
    return xq


@njit(**JIT)
def from_values(v, xq, xd, xs):
    # v (N, n) f32 holding integers within [-127, 127] (kernels/ternary.py's quantized activations) -> xq, xd, xs
    N, n = v.shape
    for t in range(N):
        for p in range(n // PART):
            acc = 0
            for i in range(p * PART, (p + 1) * PART):
                q = np.int32(v[t, i])
                xq[t, i] = q
                acc += q
            xd[t, p] = 1.0
            xs[t, p] = acc
    return xq


def _buffers(N: int, cols: int):
    return (np.empty((N, cols), dtype=np.int8), np.empty((N, cols // PART), dtype=np.float32),
            np.empty((N, cols // PART), dtype=np.int32))


def quantize(x: np.ndarray):
    """x (N, cols) f32 -> (XQ int8, XD, XS, scales (N,)): per-token absmax int8, as BitNet b1.58 (and
    kernels/ternary.py)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    N, cols = x.shape
    if cols % PART:
        raise ValueError(f"ternary activations of {cols} values are not whole parts of {PART}")
    xq, xd, xs = _buffers(N, cols)
    scales = np.empty(N, dtype=np.float32)
    (quantize_absmax_parallel if N > 8 else quantize_absmax)(x, xq, xd, xs, scales)
    return xq, xd, xs, scales


def quantize_ref(x: np.ndarray):
    """NumPy reference of `quantize` (same float32 operations)."""
    x = x.astype(np.float32)
    N, cols = x.shape
    finite = np.isfinite(x).all(-1)  # a token holding NaN or inf: s = NaN, q = 0
    with np.errstate(invalid="ignore"):
        s = np.where(finite, np.float32(127.0) / np.maximum(np.abs(x).max(-1), np.float32(1e-5)), np.nan)
        s = s.astype(np.float32)
        q = np.where(finite[:, None], np.clip(np.rint(x * s[:, None]), -127, 127), 0).astype(np.int8)
    sums = q.reshape(N, cols // PART, PART).sum(-1, dtype=np.int32)
    return q, np.ones(sums.shape, np.float32), sums, s


# ---------------------------------------------------------------- rows back to f32 (BLAS tiles, tests)
@njit(parallel=True, **JIT)
def dequantize_rows(W, rows, out):
    # W (G, nb, 1056) tq2 records, rows (n,) (checked by the caller) -> out (n, nb*256) f32 = d * (t - 1)
    G, nb, _ = W.shape
    cb = CODE_BYTES
    for i in prange(rows.shape[0]):
        g, l = rows[i] // R, rows[i] % R
        for k in range(nb):
            w = W[g, k]
            d = half_to_float(np.uint16(w[cb + 2 * l]) | (np.uint16(w[cb + 2 * l + 1]) << 8))
            for c in range(16):
                for j in range(4):
                    b = np.int32(w[c * 4 * R + 4 * l + j])
                    for s in range(4):
                        out[i, k * QK + 64 * s + 4 * c + j] = np.float32(((b >> (2 * s)) & 3) - 1) * d
    return out


class TernaryI2Matrix:
    """A TQ1_0 / TQ2_0 (rows, cols) matrix on the integer kernels; the interface of kernels/ternary.TernaryMatrix
    (activations quantized per token to int8 by `quantize`, shared by matrices with one input)."""

    def __init__(self, raw: np.ndarray, rows: int, cols: int, bytes_per_block: int, isa: str, name: str = "",
                 scale: float | np.ndarray = 1.0):
        if cols % QK or raw.shape != (rows, cols // QK * bytes_per_block):
            raise ValueError(f"{name}: ternary tensor bytes {raw.shape} do not match shape ({rows}, {cols})")
        self.rows, self.cols, self.name, self.isa = rows, cols, name, isa
        self.scale = np.broadcast_to(np.asarray(scale, dtype=np.float32), (rows,)).copy()
        self.W = pack(raw, bytes_per_block)
        self.nbytes = int(raw.nbytes)

    quantize = staticmethod(TernaryMatrix.quantize)  # per-token int8 activations (as f32 values) and their scales

    def matmul_q(self, xq: np.ndarray, xscale: np.ndarray) -> np.ndarray:
        N = xq.shape[0]
        if xq.shape != (N, self.cols):
            raise ValueError(f"{self.name}: activations {xq.shape} do not fit ({self.rows}, {self.cols})")
        XQ, XD, XS = _buffers(N, self.cols)
        from_values(np.ascontiguousarray(xq, dtype=np.float32), XQ, XD, XS)
        out = np.empty((N, self.rows), dtype=np.float32)
        igemm.matmul(self.isa, "tq2", self.W, XQ, XD, XS, out)
        out *= self.scale / xscale[:, None]
        return out

    def matmul(self, X: np.ndarray) -> np.ndarray:
        # X (N, cols) f32 -> (N, rows): BitNet's activation quantization, integer dot products per block (one call)
        X = np.ascontiguousarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != self.cols:
            raise ValueError(f"{self.name}: activations {X.shape} do not fit ({self.rows}, {self.cols})")
        return igemm.matmul_t(self.isa, "tq2", self.W, X, self.scale, np.empty((X.shape[0], self.rows), np.float32))

    def dequantize(self) -> np.ndarray:
        out = np.empty((self.rows, self.cols), dtype=np.float32)
        dequantize_rows(self.W, np.arange(self.rows, dtype=np.int64), out)
        return out * self.scale[:, None]

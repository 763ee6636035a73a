"""Ternary (BitNet b1.58) weights: GGML's TQ1_0 and TQ2_0 blocks of 256 values in {-1, 0, 1} x d.

Layouts (GGML):
  TQ2_0, 66 bytes: qs[64], d (f16). Value e = g*128 + k*32 + j  (g < 2, k < 4, j < 32) is
         ((qs[g*32 + j] >> 2k) & 3) - 1.
  TQ1_0, 54 bytes: qs[48], qh[4], d (f16). Trits packed base 3 (5 per byte in qs, 4 per byte in qh),
         stored as ceil(v * 256 / 243); trit n of byte q is ((q * 3^n mod 256) * 3) >> 8.
         Values 0..159 come from qs[0:32] (e = n*32 + j), 160..239 from qs[32:48] (e = 160 + n*16 + j),
         240..255 from qh (e = 240 + n*4 + j).

For the fused kernels both are repacked once at load into one layout: per row, 2-bit codes t+1 in
"planes" (byte i of a 64-byte group holds values i, i+64, i+128, i+192 of the block, two bits each) and
the block scales as f32. Activations are quantized per token to int8 with BitNet b1.58's absmax rule
(scale = 127 / max|x|), so y = sum_b d_b * sum_i t_i * xq_i / scale, all-integer inside a block.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

QK = 256
TQ2_BYTES = 66
TQ1_BYTES = 54
_POW3 = np.array([1, 3, 9, 27, 81], dtype=np.uint8)


def _f16(lo, hi):
    return np.array([lo | (hi << 8)], dtype=np.uint16).view(np.float16)[0]


# ---------------------------------------------------------------- NumPy references (from the layout above)
def dequantize_tq2_0_ref(raw: np.ndarray) -> np.ndarray:
    # raw (rows, nb * 66) uint8 -> (rows, nb * 256) f32
    rows = raw.shape[0]
    b = raw.reshape(rows, -1, TQ2_BYTES)
    qs, d = b[..., :64], b[..., 64:66].copy().view(np.float16).astype(np.float32)
    codes = np.empty(b.shape[:2] + (QK,), dtype=np.int8)
    for g in range(2):
        for k in range(4):
            codes[..., g * 128 + k * 32:g * 128 + (k + 1) * 32] = (qs[..., g * 32:(g + 1) * 32] >> (2 * k)) & 3
    return ((codes.astype(np.float32) - 1) * d).reshape(rows, -1)


def _trits(q: np.ndarray, n: int) -> np.ndarray:
    return (((q * np.uint8(3 ** n)).astype(np.uint16) * 3) >> 8).astype(np.int8)


def dequantize_tq1_0_ref(raw: np.ndarray) -> np.ndarray:
    # raw (rows, nb * 54) uint8 -> (rows, nb * 256) f32
    rows = raw.shape[0]
    b = raw.reshape(rows, -1, TQ1_BYTES)
    d = b[..., 52:54].copy().view(np.float16).astype(np.float32)
    out = np.empty(b.shape[:2] + (QK,), dtype=np.int8)
    for n in range(5):
        out[..., n * 32:(n + 1) * 32] = _trits(b[..., 0:32], n)
        out[..., 160 + n * 16:160 + (n + 1) * 16] = _trits(b[..., 32:48], n)
    for n in range(4):
        out[..., 240 + n * 4:240 + (n + 1) * 4] = _trits(b[..., 48:52], n)
    return ((out.astype(np.float32) - 1) * d).reshape(rows, -1)


# ---------------------------------------------------------------- repacking at load
def _block_codes(qtype_bytes: int, raw: np.ndarray):
    rows = raw.shape[0]
    b = raw.reshape(rows, -1, qtype_bytes)
    d = b[..., qtype_bytes - 2:].copy().view(np.float16).astype(np.float32)[..., 0]
    ref = dequantize_tq2_0_ref if qtype_bytes == TQ2_BYTES else dequantize_tq1_0_ref
    # codes in {0, 1, 2}: recover them from the reference decoder with d = 1
    unit = b.copy()
    unit[..., qtype_bytes - 2:] = np.frombuffer(np.float16(1.0).tobytes(), dtype=np.uint8)
    codes = (ref(unit.reshape(rows, -1)) + 1).astype(np.uint8).reshape(rows, -1, QK)
    return codes, d


def pack_ternary(raw: np.ndarray, bytes_per_block: int) -> tuple[np.ndarray, np.ndarray]:
    # raw (rows, nb * bytes) -> planes (rows, nb * 64) uint8, d (rows, nb) f32
    if raw.ndim != 2 or raw.dtype != np.uint8 or raw.shape[1] % bytes_per_block:
        raise ValueError(f"ternary weights need (rows, n * {bytes_per_block}) uint8 blocks, got {raw.shape} {raw.dtype}")
    codes, d = _block_codes(bytes_per_block, raw)
    planes = (codes[..., 0:64] | (codes[..., 64:128] << 2) | (codes[..., 128:192] << 4) | (codes[..., 192:256] << 6))
    if not np.isfinite(d).all():
        raise ValueError("ternary block scale is not finite")
    return np.ascontiguousarray(planes.reshape(raw.shape[0], -1)), np.ascontiguousarray(d)


# ---------------------------------------------------------------- activations
@njit(cache=True, fastmath=False, nogil=True)
def quantize_act_absmax(x, xq):
    # x (B, n) f32 -> xq (B, n) int8, returns scale (B,): BitNet b1.58 per-token absmax, round half away from 0
    B, n = x.shape
    scales = np.empty(B, dtype=np.float32)
    for b in range(B):
        m = np.float32(1e-5)
        for i in range(n):
            m = max(m, abs(x[b, i]))
        s = np.float32(127.0) / m
        scales[b] = s
        for i in range(n):
            v = np.round(x[b, i] * s)  # numpy rounds half to even, as torch.round does
            xq[b, i] = np.int8(min(max(v, -128.0), 127.0))
    return scales


@njit(cache=True, fastmath=True, nogil=True)
def _block_sums(xq, nb):
    # xq (B, nb*256) int8 -> (B, nb) int32 sums per block (for the -1 offset of the codes)
    B = xq.shape[0]
    s = np.zeros((B, nb), dtype=np.int32)
    for b in range(B):
        for k in range(nb):
            acc = np.int32(0)
            for i in range(QK):
                acc += np.int32(xq[b, k * QK + i])
            s[b, k] = acc
    return s


@njit(parallel=True, cache=True, fastmath=True, nogil=True)
def matvec_ternary_q(planes, d, xq, xsum, out):
    # planes (rows, nb*64) u8, d (rows, nb) f32, xq (B, nb*256) i8, xsum (B, nb) i32 -> out (B, rows) f32
    # out[b, r] = sum_k d[r, k] * (sum_i code_i * xq_i - xsum[b, k])   (the per-token scale is applied by the caller)
    rows = planes.shape[0]
    nb = d.shape[1]
    B = xq.shape[0]
    for r in prange(rows):
        for b in range(B):
            acc = np.float32(0.0)
            for k in range(nb):
                isum = np.int32(0)
                base = k * QK
                for i in range(64):
                    p = np.int32(planes[r, k * 64 + i])
                    isum += (p & 3) * np.int32(xq[b, base + i]) + ((p >> 2) & 3) * np.int32(xq[b, base + 64 + i]) \
                        + ((p >> 4) & 3) * np.int32(xq[b, base + 128 + i]) + (p >> 6) * np.int32(xq[b, base + 192 + i])
                acc += d[r, k] * np.float32(isum - xsum[b, k])
            out[b, r] = acc
    return out


@njit(parallel=True, cache=True, nogil=True)
def dequantize_ternary(planes, d, r0, r1, out):
    # planes (rows, nb*64), d (rows, nb) -> out (r1-r0, nb*256) f32
    nb = d.shape[1]
    for r in prange(r0, r1):
        for k in range(nb):
            for i in range(64):
                p = planes[r, k * 64 + i]
                for s in range(4):
                    out[r - r0, k * QK + s * 64 + i] = (np.float32((p >> (2 * s)) & 3) - 1) * d[r, k]
    return out


class TernaryMatrix:
    """A TQ1_0 / TQ2_0 (rows, cols) matrix for BitNet: y = W @ x with x quantized per token to int8 (absmax)."""

    def __init__(self, raw: np.ndarray, rows: int, cols: int, bytes_per_block: int, name: str = ""):
        if cols % QK or raw.shape != (rows, cols // QK * bytes_per_block):
            raise ValueError(f"{name}: ternary tensor bytes {raw.shape} do not match shape ({rows}, {cols})")
        self.rows, self.cols, self.name = rows, cols, name
        self.planes, self.d = pack_ternary(raw, bytes_per_block)
        self.nbytes = int(raw.nbytes)

    def matmul(self, X: np.ndarray) -> np.ndarray:
        # X (N, cols) f32 -> (N, rows): BitNet's activation quantization, integer dot products per block
        X = np.ascontiguousarray(X, dtype=np.float32)
        xq = np.empty(X.shape, dtype=np.int8)
        scale = quantize_act_absmax(X, xq)
        xsum = _block_sums(xq, self.cols // QK)
        out = np.empty((X.shape[0], self.rows), dtype=np.float32)
        matvec_ternary_q(self.planes, self.d, xq, xsum, out)
        out /= scale[:, None]
        return out

    def dequantize(self) -> np.ndarray:
        out = np.empty((self.rows, self.cols), dtype=np.float32)
        return dequantize_ternary(self.planes, self.d, 0, self.rows, out)

"""Ternary (BitNet b1.58) weights: GGML's TQ1_0 and TQ2_0 blocks of 256 values in {-1, 0, 1} x d.

Layouts (GGML):
  TQ2_0, 66 bytes: qs[64], d (f16). Value e = g*128 + k*32 + j  (g < 2, k < 4, j < 32) is
         ((qs[g*32 + j] >> 2k) & 3) - 1.
  TQ1_0, 54 bytes: qs[48], qh[4], d (f16). Trits packed base 3 (5 per byte in qs, 4 per byte in qh),
         stored as ceil(v * 256 / 243); trit n of byte q is ((q * 3^n mod 256) * 3) >> 8.
         Values 0..159 come from qs[0:32] (e = n*32 + j), 160..239 from qs[32:48] (e = 160 + n*16 + j),
         240..255 from qh (e = 240 + n*4 + j).

For the fused kernels both are repacked once at load into one layout: per row, 2-bit codes t+1 in
"planes" (byte i of a 64-byte group holds values i, i+64, i+128, i+192 of the block, two bits each; bytes
paired into 16-bit words) and the block scales as f32. Activations are quantized per token to int8 with
BitNet b1.58's absmax rule (scale = 127 / max|x|), so y = sum_b d_b * sum_i t_i * xq_i / scale, all-integer
inside a block (int16 SIMD lanes, one per row).
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
BATCH_MAX = 8  # tokens up to which the fused kernel runs; above, dequantized tiles + BLAS (as kernels/matvec.py)
TILE_BYTES = 1 << 22  # f32 bytes of a dequantized tile
R = 128  # rows interleaved: the vector lanes run along rows (16 int16 lanes per AVX2 register)


def _block_codes(qtype_bytes: int, raw: np.ndarray):
    # raw (rows, nb * bytes) -> codes (rows, nb, 256) uint8 in {0, 1, 2}, d (rows, nb) f32; integer ops only
    rows = raw.shape[0]
    b = raw.reshape(rows, -1, qtype_bytes)
    nb = b.shape[1]
    d = b[..., qtype_bytes - 2:].copy().view(np.float16).astype(np.float32)[..., 0]
    codes = np.empty((rows, nb, QK), dtype=np.uint8)
    if qtype_bytes == TQ2_BYTES:
        qs = b[..., :64].reshape(rows, nb, 2, 32)
        c = codes.reshape(rows, nb, 2, 4, 32)
        for k in range(4):
            c[:, :, :, k, :] = (qs >> (2 * k)) & 3
    else:
        for n in range(5):
            codes[..., n * 32:(n + 1) * 32] = _trits(b[..., 0:32], n)
            codes[..., 160 + n * 16:160 + (n + 1) * 16] = _trits(b[..., 32:48], n)
        for n in range(4):
            codes[..., 240 + n * 4:240 + (n + 1) * 4] = _trits(b[..., 48:52], n)
    return codes, d


def _interleave(a: np.ndarray) -> np.ndarray:
    # (rows, ...) -> (G, ..., R), rows padded with zeros to a multiple of R
    rows = a.shape[0]
    G = -(-rows // R)
    if G * R != rows:
        a = np.concatenate([a, np.zeros((G * R - rows,) + a.shape[1:], dtype=a.dtype)])
    return np.ascontiguousarray(np.moveaxis(a.reshape((G, R) + a.shape[1:]), 1, -1))


def pack_ternary(raw: np.ndarray, bytes_per_block: int) -> tuple[np.ndarray, np.ndarray]:
    """raw (rows, nb * bytes) -> planes (G, nb, 32, R) uint16, d (G, nb, R) f32.

    Per row and block, code c_e (value e of 256) sits in bits 2s..2s+1 (s < 4) of byte i (i < 64) of a 64-byte
    plane with e = s*64 + i, and bytes 2j, 2j+1 form the uint16 j: one 16-bit lane holds eight codes."""
    if raw.ndim != 2 or raw.dtype != np.uint8 or raw.shape[1] % bytes_per_block:
        raise ValueError(f"ternary weights need (rows, n * {bytes_per_block}) uint8 blocks, got {raw.shape} {raw.dtype}")
    codes, d = _block_codes(bytes_per_block, raw)
    if not np.isfinite(d).all():
        raise ValueError("ternary block scale is not finite")
    planes = (codes[..., 0:64] | (codes[..., 64:128] << 2) | (codes[..., 128:192] << 4) | (codes[..., 192:256] << 6))
    words = planes.reshape(planes.shape[:2] + (32, 2)).astype(np.uint16)
    words = words[..., 0] | (words[..., 1] << 8)
    return _interleave(words), _interleave(d)


# ---------------------------------------------------------------- activations
@njit(cache=True, fastmath=False, nogil=True)
def quantize_act_absmax(x, xq):
    # x (B, n) f32 -> xq (B, n) f32 holding int8 values, returns scale (B,): BitNet b1.58 per-token absmax
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
            xq[b, i] = min(max(v, -128.0), 127.0)
    return scales


@njit(cache=True, nogil=True)
def _int16_and_block_sums(xq, nb):
    # xq (B, nb*256) f32 integer-valued -> (B, nb*256) int16 and (B, nb) int16 sums per block taken mod 2^16
    B = xq.shape[0]
    x16 = np.empty(xq.shape, dtype=np.int16)
    s = np.zeros((B, nb), dtype=np.int16)
    for b in range(B):
        for k in range(nb):
            acc = 0
            for i in range(QK):
                v = int(xq[b, k * QK + i])
                x16[b, k * QK + i] = v
                acc += v
            s[b, k] = np.int16(acc)
    return x16, s


@njit(parallel=True, cache=True, fastmath=True, nogil=True)
def matvec_ternary_q(P, D, xq, xsum, out):
    # P (G, nb, 32, R) u16 codes, D (G, nb, R) f32, xq (B, nb*256) int16 in [-127, 127], xsum (B, nb) int16
    # -> out (B, G*R): out[b, r] = sum_k D[r, k] * (sum_e c_e * xq_e - xsum[b, k]).
    # The block sum runs in int16 lanes with wrap-around: the true value sum_e (c_e - 1) xq_e lies within
    # 256 * 127 < 2^15, so taking the difference mod 2^16 recovers it exactly.
    G, nb, _, RR = P.shape
    B = xq.shape[0]
    for g in prange(G):
        acc = np.zeros((B, RR), dtype=np.float32)
        tmp = np.empty(RR, dtype=np.int16)
        for k in range(nb):
            d = D[g, k]
            for b in range(B):
                for l in range(RR):
                    tmp[l] = 0
                for j in range(32):
                    i = k * QK + 2 * j
                    x0, x1, x2, x3 = xq[b, i], xq[b, i + 64], xq[b, i + 128], xq[b, i + 192]
                    y0, y1, y2, y3 = xq[b, i + 1], xq[b, i + 65], xq[b, i + 129], xq[b, i + 193]
                    w = P[g, k, j]
                    for l in range(RR):
                        q = np.int16(w[l])
                        tmp[l] = np.int16(tmp[l] + (q & 3) * x0 + ((q >> 2) & 3) * x1 + ((q >> 4) & 3) * x2
                                          + ((q >> 6) & 3) * x3 + ((q >> 8) & 3) * y0 + ((q >> 10) & 3) * y1
                                          + ((q >> 12) & 3) * y2 + ((q >> 14) & 3) * y3)
                xs = xsum[b, k]
                ab = acc[b]
                for l in range(RR):
                    ab[l] += d[l] * np.float32(np.int16(tmp[l] - xs))
        for b in range(B):
            for l in range(RR):
                out[b, g * RR + l] = acc[b, l]
    return out


@njit(cache=True, nogil=True)
def dequantize_ternary_t(P, D, g0, g1, out):
    # row groups g0..g1 of planes (G, nb, 32, R), d (G, nb, R) -> out (nb*256, (g1-g0)*R) f32, transposed:
    # out[e, r] = (c - 1) * d of row g0*R + r, value e; the inner loop runs along rows (vectorized)
    G, nb, _, RR = P.shape
    for k in range(nb):
        for g in range(g0, g1):
            c0 = (g - g0) * RR
            d = D[g, k]
            for j in range(32):
                w = P[g, k, j]
                for s in range(8):  # the word's 8 codes are values e, e+64, e+128, e+192, e+1, e+65, ...
                    row = out[k * QK + (s % 4) * 64 + 2 * j + s // 4, c0:c0 + RR]
                    sh = 2 * s
                    for l in range(RR):  # one store stream per loop: vectorizes without aliasing checks
                        row[l] = np.float32(((np.int32(w[l]) >> sh) & 3) - 1) * d[l]
    return out


class TernaryMatrix:
    """A TQ1_0 / TQ2_0 (rows, cols) matrix for BitNet: y = W @ x with x quantized per token to int8 (absmax).

    `scale` is the tensor's extra factor (BitNet's per-tensor weight scale, GGUF `*.scale`), applied to the output:
    one number, or one per row when several tensors are stacked into one matrix."""

    def __init__(self, raw: np.ndarray, rows: int, cols: int, bytes_per_block: int, name: str = "",
                 scale: float | np.ndarray = 1.0):
        if cols % QK or raw.shape != (rows, cols // QK * bytes_per_block):
            raise ValueError(f"{name}: ternary tensor bytes {raw.shape} do not match shape ({rows}, {cols})")
        self.rows, self.cols, self.name = rows, cols, name
        self.scale = np.broadcast_to(np.asarray(scale, dtype=np.float32), (rows,)).copy()
        self.planes, self.d = pack_ternary(raw, bytes_per_block)
        self.nbytes = int(raw.nbytes)

    @staticmethod
    def quantize(X: np.ndarray):
        """Per-token int8 activations (as f32 values) and their scales: share them between matrices with one input."""
        X = np.ascontiguousarray(X, dtype=np.float32)
        xq = np.empty(X.shape, dtype=np.float32)
        return xq, quantize_act_absmax(X, xq)

    def matmul_q(self, xq: np.ndarray, xscale: np.ndarray) -> np.ndarray:
        G = self.planes.shape[0]
        if xq.shape[0] > BATCH_MAX:  # prefill: dequantized tiles and BLAS (integer-valued xq: the same products)
            out = np.empty((xq.shape[0], G * R), dtype=np.float32)
            tile = max(1, TILE_BYTES // (4 * self.cols * R))  # groups of R rows per tile
            buf = np.empty((self.cols, min(tile, G) * R), dtype=np.float32)
            for g0 in range(0, G, tile):
                g1 = min(G, g0 + tile)
                w = dequantize_ternary_t(self.planes, self.d, g0, g1, buf[:, :(g1 - g0) * R])
                np.matmul(xq, w, out=out[:, g0 * R:g1 * R])
            out = out[:, :self.rows] if G * R != self.rows else out
            out *= self.scale / xscale[:, None]
            return out
        x16, xsum = _int16_and_block_sums(xq, self.cols // QK)
        out = np.empty((xq.shape[0], G * R), dtype=np.float32)
        matvec_ternary_q(self.planes, self.d, x16, xsum, out)
        out = out[:, :self.rows] if G * R != self.rows else out
        out *= self.scale / xscale[:, None]
        return out

    def matmul(self, X: np.ndarray) -> np.ndarray:
        # X (N, cols) f32 -> (N, rows): BitNet's activation quantization, integer-valued dot products per block
        return self.matmul_q(*self.quantize(X))

    def dequantize(self) -> np.ndarray:
        G = self.planes.shape[0]
        out = np.empty((self.cols, G * R), dtype=np.float32)
        dequantize_ternary_t(self.planes, self.d, 0, G, out)
        return out.T[:self.rows] * self.scale[:, None]

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
BATCH_MAX = 8  # tokens up to which the fused kernel runs; above, dequantized tiles + BLAS (as kernels/matvec.py)
TILE_BYTES = 1 << 22  # f32 bytes of a dequantized tile
R = 64  # rows interleaved, as in kernels/matvec.py: the vector lanes run along rows


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
    # raw (rows, nb * bytes) -> planes (G, nb, 64, R) uint8, d (G, nb, R) f32
    if raw.ndim != 2 or raw.dtype != np.uint8 or raw.shape[1] % bytes_per_block:
        raise ValueError(f"ternary weights need (rows, n * {bytes_per_block}) uint8 blocks, got {raw.shape} {raw.dtype}")
    codes, d = _block_codes(bytes_per_block, raw)
    if not np.isfinite(d).all():
        raise ValueError("ternary block scale is not finite")
    planes = (codes[..., 0:64] | (codes[..., 64:128] << 2) | (codes[..., 128:192] << 4) | (codes[..., 192:256] << 6))
    return _interleave(planes), _interleave(d)


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


@njit(cache=True, fastmath=True, nogil=True)
def _block_sums(xq, nb):
    # xq (B, nb*256) -> (B, nb) sums per block (for the -1 offset of the codes); exact: integers < 2^24
    B = xq.shape[0]
    s = np.zeros((B, nb), dtype=np.float32)
    for b in range(B):
        for k in range(nb):
            acc = np.float32(0.0)
            for i in range(QK):
                acc += xq[b, k * QK + i]
            s[b, k] = acc
    return s


@njit(parallel=True, cache=True, fastmath=True, nogil=True)
def matvec_ternary_q(P, D, xq, xsum, out):
    # P (G, nb, 64, R) u8 codes, D (G, nb, R) f32, xq (B, nb*256) f32 integer-valued, xsum (B, nb) -> out (B, G*R)
    # out[b, r] = sum_k D[r, k] * (sum_i code_i * xq_i - xsum[b, k]); the integer sums are exact in f32 (< 2^24).
    # The 2-bit fields are split with float arithmetic (floor of q/4, ...): it vectorizes along the R rows.
    G, nb, _, RR = P.shape
    B = xq.shape[0]
    for g in prange(G):
        acc = np.zeros((B, RR), dtype=np.float32)
        tmp = np.empty(RR, dtype=np.float32)
        for k in range(nb):
            d = D[g, k]
            for b in range(B):
                for l in range(RR):
                    tmp[l] = 0.0
                base = k * QK
                for i in range(64):
                    x0 = xq[b, base + i]
                    x1 = xq[b, base + 64 + i]
                    x2 = xq[b, base + 128 + i]
                    x3 = xq[b, base + 192 + i]
                    w = P[g, k, i]
                    for l in range(RR):
                        q = np.float32(w[l])
                        a = np.floor(q * np.float32(0.25))
                        c = np.floor(a * np.float32(0.25))
                        e = np.floor(c * np.float32(0.25))
                        tmp[l] += (q - np.float32(4.0) * a) * x0 + (a - np.float32(4.0) * c) * x1 \
                            + (c - np.float32(4.0) * e) * x2 + e * x3
                xs = xsum[b, k]
                ab = acc[b]
                for l in range(RR):
                    ab[l] += d[l] * (tmp[l] - xs)
        for b in range(B):
            for l in range(RR):
                out[b, g * RR + l] = acc[b, l]
    return out


@njit(parallel=True, cache=True, nogil=True)
def dequantize_ternary(P, D, r0, r1, out):
    # rows r0..r1 of planes (G, nb, 64, R), d (G, nb, R) -> out (r1-r0, nb*256) f32
    G, nb, _, RR = P.shape
    for r in prange(r0, r1):
        g, l = r // RR, r % RR
        for k in range(nb):
            for i in range(64):
                p = P[g, k, i, l]
                for s in range(4):
                    out[r - r0, k * QK + s * 64 + i] = (np.float32((p >> (2 * s)) & 3) - 1) * D[g, k, l]
    return out


class TernaryMatrix:
    """A TQ1_0 / TQ2_0 (rows, cols) matrix for BitNet: y = W @ x with x quantized per token to int8 (absmax).

    `scale` is the tensor's extra factor (BitNet's per-tensor weight scale, GGUF `*.scale`), applied to the output."""

    def __init__(self, raw: np.ndarray, rows: int, cols: int, bytes_per_block: int, name: str = "",
                 scale: float = 1.0):
        if cols % QK or raw.shape != (rows, cols // QK * bytes_per_block):
            raise ValueError(f"{name}: ternary tensor bytes {raw.shape} do not match shape ({rows}, {cols})")
        self.rows, self.cols, self.name, self.scale = rows, cols, name, np.float32(scale)
        self.planes, self.d = pack_ternary(raw, bytes_per_block)
        self.nbytes = int(raw.nbytes)

    @staticmethod
    def quantize(X: np.ndarray):
        """Per-token int8 activations (as f32 values) and their scales: share them between matrices with one input."""
        X = np.ascontiguousarray(X, dtype=np.float32)
        xq = np.empty(X.shape, dtype=np.float32)
        return xq, quantize_act_absmax(X, xq)

    def matmul_q(self, xq: np.ndarray, xscale: np.ndarray) -> np.ndarray:
        if xq.shape[0] > BATCH_MAX:  # prefill: dequantized tiles and BLAS (integer-valued xq: the same products)
            out = np.empty((xq.shape[0], self.rows), dtype=np.float32)
            tile = max(R, TILE_BYTES // (4 * self.cols) // R * R)
            buf = np.empty((min(tile, self.rows), self.cols), dtype=np.float32)
            for r0 in range(0, self.rows, tile):
                r1 = min(self.rows, r0 + tile)
                w = dequantize_ternary(self.planes, self.d, r0, r1, buf[:r1 - r0])
                out[:, r0:r1] = xq @ w.T
            out *= (self.scale / xscale)[:, None]
            return out
        xsum = _block_sums(xq, self.cols // QK)
        G = self.planes.shape[0]
        out = np.empty((xq.shape[0], G * R), dtype=np.float32)
        matvec_ternary_q(self.planes, self.d, xq, xsum, out)
        out = out[:, :self.rows] if G * R != self.rows else out
        out *= (self.scale / xscale)[:, None]
        return out

    def matmul(self, X: np.ndarray) -> np.ndarray:
        # X (N, cols) f32 -> (N, rows): BitNet's activation quantization, integer-valued dot products per block
        return self.matmul_q(*self.quantize(X))

    def dequantize(self) -> np.ndarray:
        out = np.empty((self.rows, self.cols), dtype=np.float32)
        dequantize_ternary(self.planes, self.d, 0, self.rows, out)
        return out * self.scale

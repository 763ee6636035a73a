"""GGML block quantizations decoded in NumPy: the reference the fused kernels are built from and tested by.

Every supported type decodes to integer codes and per-group f32 factors, value = (code - zero) * scale + min,
computed in the same float32 order as GGML (and gguf-py), so the decoded values match bit for bit:

  Q8_0  34 B / 32:  d f16, qs[32] i8                      value = d * q
  Q4_0  18 B / 32:  d f16, qs[16] (lo nibble = i, hi = i+16)  value = d * (q - 8)
  Q4_1  20 B / 32:  d f16, m f16, qs[16]                  value = d * q + m
  Q5_0  22 B / 32:  d f16, qh u32 (bit i = 5th bit of value i), qs[16] as Q4_0   value = d * (q - 16)
  Q4_K 144 B / 256: d f16, dmin f16, scales[12] (8 x 6-bit scale and min), qs[128];
                    chunk c of 64 values: qs[32c:32c+32] low nibbles = sub-block 2c, high = 2c+1;
                    value = (d * sc) * q - (dmin * m)
  Q6_K 210 B / 256: ql[128], qh[64], scales[16] i8, d f16; half h of 128 values, l < 32:
                    v[128h + l]      = ql[64h + l] & 15      | (qh[32h + l] >> 0 & 3) << 4
                    v[128h + 32 + l] = ql[64h + 32 + l] & 15 | (qh[32h + l] >> 2 & 3) << 4
                    v[128h + 64 + l] = ql[64h + l] >> 4      | (qh[32h + l] >> 4 & 3) << 4
                    v[128h + 96 + l] = ql[64h + 32 + l] >> 4 | (qh[32h + l] >> 6 & 3) << 4
                    value = (d * scales[e // 16]) * (v - 32)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT


def block_size(qtype: int) -> tuple[int, int]:
    """(values per block, bytes per block) of a GGML type."""
    return GGML_QUANT_SIZES[QT(qtype)]


def _f16(b: np.ndarray) -> np.ndarray:
    # (..., 2) uint8 -> (...) f32
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


@dataclass
class Codes:
    """A decoded block-quantized matrix: value[r, c] = (codes[r, c] - zero) * scale[r, c // group] + min[r, c // group]."""
    codes: np.ndarray  # (rows, cols) uint8 (4-bit types, 0..15) or int8 (8-bit types)
    scale: np.ndarray  # (rows, cols // group) f32
    min: np.ndarray | None  # (rows, cols // group) f32 or None
    zero: int
    group: int

    def values(self) -> np.ndarray:
        rows, cols = self.codes.shape
        q = self.codes.astype(np.float32).reshape(rows, -1, self.group)
        if self.zero:
            q = (self.codes.astype(np.int8) - np.int8(self.zero)).astype(np.float32).reshape(rows, -1, self.group)
        if self.min is None:
            return (self.scale[..., None] * q).reshape(rows, cols)
        return (q * self.scale[..., None] + self.min[..., None]).reshape(rows, cols)


def _blocks(raw: np.ndarray, qtype: int) -> np.ndarray:
    n, nbytes = block_size(qtype)
    if raw.ndim != 2 or raw.dtype != np.uint8 or raw.shape[1] % nbytes:
        raise ValueError(f"{QT(qtype).name} data must be (rows, k * {nbytes}) uint8, got {raw.shape} {raw.dtype}")
    return raw.reshape(raw.shape[0], -1, nbytes)


def decode_q8_0(raw):
    b = _blocks(raw, QT.Q8_0)
    rows = b.shape[0]
    return Codes(b[..., 2:].copy().view(np.int8).reshape(rows, -1), _f16(b[..., 0:2]), None, 0, 32)


def _nibbles32(qs: np.ndarray) -> np.ndarray:
    # (..., 16) packed -> (..., 32): low nibbles are values 0..15, high nibbles 16..31
    return np.concatenate([qs & 15, qs >> 4], axis=-1)


def decode_q4_0(raw):
    b = _blocks(raw, QT.Q4_0)
    rows = b.shape[0]
    return Codes(_nibbles32(b[..., 2:]).reshape(rows, -1), _f16(b[..., 0:2]), None, 8, 32)


def decode_q4_1(raw):
    b = _blocks(raw, QT.Q4_1)
    rows = b.shape[0]
    return Codes(_nibbles32(b[..., 4:]).reshape(rows, -1), _f16(b[..., 0:2]), _f16(b[..., 2:4]), 0, 32)


def decode_q5_0(raw):
    # kept as int8 codes q - 16 (the "q8" kernels' layout)
    b = _blocks(raw, QT.Q5_0)
    rows = b.shape[0]
    qh = np.ascontiguousarray(b[..., 2:6]).view("<u4")  # (rows, nb, 1)
    hi = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)  # (rows, nb, 32)
    q = _nibbles32(b[..., 6:]) | (hi << 4)
    return Codes((q.astype(np.int8) - np.int8(16)).reshape(rows, -1), _f16(b[..., 0:2]), None, 0, 32)


def q4_k_scale_min(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # s (..., 12) uint8 -> 8 six-bit scales and 8 six-bit mins, (..., 8) each
    sc = np.empty(s.shape[:-1] + (8,), dtype=np.uint8)
    mn = np.empty_like(sc)
    sc[..., :4] = s[..., 0:4] & 63
    mn[..., :4] = s[..., 4:8] & 63
    sc[..., 4:] = (s[..., 8:12] & 15) | ((s[..., 0:4] >> 6) << 4)
    mn[..., 4:] = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return sc, mn


def decode_q4_k(raw):
    b = _blocks(raw, QT.Q4_K)
    rows, nb = b.shape[:2]
    d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
    sc, mn = q4_k_scale_min(b[..., 4:16])
    qs = b[..., 16:].reshape(rows, nb, 4, 32)
    codes = np.stack([qs & 15, qs >> 4], axis=3).reshape(rows, -1)  # chunk c: sub-blocks 2c (low), 2c+1 (high)
    scale = (d[..., None] * sc.astype(np.float32)).reshape(rows, -1)
    minv = -(dmin[..., None] * mn.astype(np.float32)).reshape(rows, -1)
    return Codes(codes, scale, minv, 0, 32)


def decode_q6_k(raw):
    b = _blocks(raw, QT.Q6_K)
    rows, nb = b.shape[:2]
    ql = b[..., 0:128].reshape(rows, nb, 2, 64)
    qh = b[..., 128:192].reshape(rows, nb, 2, 32)
    sc = b[..., 192:208].copy().view(np.int8).astype(np.float32)
    d = _f16(b[..., 208:210])
    v = np.empty((rows, nb, 2, 4, 32), dtype=np.uint8)
    v[..., 0, :] = (ql[..., :32] & 15) | ((qh & 3) << 4)
    v[..., 1, :] = (ql[..., 32:] & 15) | (((qh >> 2) & 3) << 4)
    v[..., 2, :] = (ql[..., :32] >> 4) | (((qh >> 4) & 3) << 4)
    v[..., 3, :] = (ql[..., 32:] >> 4) | (((qh >> 6) & 3) << 4)
    codes = (v.astype(np.int8) - np.int8(32)).reshape(rows, -1)
    return Codes(codes, (d[..., None] * sc).reshape(rows, -1), None, 0, 16)


DECODERS = {QT.Q8_0: decode_q8_0, QT.Q4_0: decode_q4_0, QT.Q4_1: decode_q4_1, QT.Q5_0: decode_q5_0,
            QT.Q4_K: decode_q4_k, QT.Q6_K: decode_q6_k}


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    # (rows, 2 * cols) uint8 BF16 -> (rows, cols) f32: the top half of each f32's bits
    return (np.ascontiguousarray(raw).view("<u2").astype(np.uint32) << 16).view(np.float32)


def dequantize_ref(qtype: int, raw: np.ndarray) -> np.ndarray:
    """(rows, row_bytes) raw GGML data -> (rows, cols) f32."""
    qtype = QT(qtype)
    if qtype == QT.F32:
        return np.ascontiguousarray(raw, dtype=np.float32)
    if qtype == QT.F16:
        return np.asarray(raw, dtype=np.float16).astype(np.float32)
    if qtype == QT.BF16:
        return bf16_to_f32(raw)
    return DECODERS[qtype](raw).values()



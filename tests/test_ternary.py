"""Ternary (TQ1_0 / TQ2_0) kernels against gguf-py's dequantizers and BitNet's integer arithmetic."""
from __future__ import annotations

import numpy as np
import pytest
import gguf

from edgellm.kernels import ternary as T

QT = gguf.GGMLQuantizationType
CASES = [(QT.TQ2_0, T.TQ2_BYTES, T.dequantize_tq2_0_ref), (QT.TQ1_0, T.TQ1_BYTES, T.dequantize_tq1_0_ref)]


def ternary_weights(rows, cols, seed):
    rng = np.random.default_rng(seed)
    w = (rng.integers(-1, 2, (rows, cols)) * rng.uniform(0.01, 1.0, (rows, 1))).astype(np.float32)
    w[1] = 0  # an all-zero row: block scale 0
    return w


@pytest.mark.parametrize("qtype,nbytes,ref", CASES)
def test_dequantize_equals_gguf(qtype, nbytes, ref):
    w = ternary_weights(37, 768, 0)
    raw = gguf.quants.quantize(w, qtype)
    oracle = gguf.quants.dequantize(raw, qtype)
    np.testing.assert_array_equal(ref(raw), oracle)
    np.testing.assert_array_equal(T.TernaryMatrix(raw, 37, 768, nbytes).dequantize(), oracle)
    # random bytes too (any code pattern), with sane scales
    rng = np.random.default_rng(1)
    rb = rng.integers(0, 256, (5, 3 * nbytes), dtype=np.uint8)
    rb.reshape(5, 3, nbytes)[..., -2:] = np.array([0.5], np.float16).view(np.uint8).reshape(1, 1, 2)
    if qtype == QT.TQ1_0:  # valid base-3 bytes only: ceil(v * 256 / 243) for v < 243
        v = rng.integers(0, 243, rb[:, :].shape)
        enc = ((v * 256 + 242) // 243).astype(np.uint8)
        blk = rb.reshape(5, 3, nbytes)
        blk[..., :52] = enc.reshape(5, 3, nbytes)[..., :52]
    np.testing.assert_array_equal(ref(rb), gguf.quants.dequantize(rb, qtype))


@pytest.mark.parametrize("qtype,nbytes,ref", CASES)
@pytest.mark.parametrize("B", [1, 3, 20])  # 20: the prefill path (dequantized tiles + BLAS)
def test_fused_matvec_is_bitnets_integer_arithmetic(qtype, nbytes, ref, B):
    w = ternary_weights(70, 512, 2)
    raw = gguf.quants.quantize(w, qtype)
    m = T.TernaryMatrix(raw, 70, 512, nbytes)
    x = np.random.default_rng(3).standard_normal((B, 512)).astype(np.float32)
    y = m.matmul(x)
    # BitNet b1.58 (transformers' BitLinear): per-token absmax int8 activations, ternary weights, rescale
    s = 127 / np.maximum(np.abs(x).max(-1, keepdims=True), 1e-5)
    xq = np.clip(np.round(x * s), -128, 127)
    np.testing.assert_allclose(y, (xq @ gguf.quants.dequantize(raw, qtype).T) / s, rtol=1e-5, atol=1e-5)


def test_pack_rejects_bad_sizes():
    with pytest.raises(ValueError):
        T.TernaryMatrix(np.zeros((4, 65), np.uint8), 4, 256, T.TQ2_BYTES)


@pytest.mark.parametrize("B", [1, 20])
def test_fused_matvec_many_groups_tiles_and_extreme_sums(monkeypatch, B):
    # rows over several interleaved groups (with padding), the prefill split into several tiles, and block
    # sums at the int16 limit: all weights +1 (or -1) against activations of +-127 (256 * 127 = 32512)
    monkeypatch.setattr(T, "TILE_BYTES", 4 * 512 * T.R)  # one group of rows per tile
    rows, cols = 2 * T.R + 37, 512
    w = ternary_weights(rows, cols, 5)
    w[:3] = 1.0
    w[3:6] = -1.0
    raw = gguf.quants.quantize(w, QT.TQ2_0)
    m = T.TernaryMatrix(raw, rows, cols, T.TQ2_BYTES, scale=np.linspace(0.5, 2.0, rows, dtype=np.float32))
    x = np.random.default_rng(4).standard_normal((B, cols)).astype(np.float32)
    x[0] = np.where(np.arange(cols) % 3 == 0, -1.0, 1.0)  # every activation quantizes to +-127
    x[0, :256] = 1.0
    y = m.matmul(x)
    s = 127 / np.maximum(np.abs(x).max(-1, keepdims=True), 1e-5)
    xq = np.clip(np.round(x * s), -128, 127)
    ref = (xq @ gguf.quants.dequantize(raw, QT.TQ2_0).T) / s * m.scale
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(m.dequantize(), gguf.quants.dequantize(raw, QT.TQ2_0) * m.scale[:, None], rtol=1e-6)

"""Quantized weight kernels against gguf-py's dequantizers (bit for bit) and float64 mat-vecs."""
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, quants as gq
from gguf import GGMLQuantizationType as QT

from edgellm.kernels import matvec as mv
from edgellm.kernels import quants

TYPES = [QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q4_K, QT.Q6_K]
# byte offsets of the f16 scales inside a block, patched so that random blocks hold finite, sane values
F16_FIELDS = {QT.Q8_0: [0], QT.Q4_0: [0], QT.Q4_1: [0, 2], QT.Q5_0: [0], QT.Q4_K: [0, 2], QT.Q6_K: [208]}


def random_blocks(qtype, rows, cols, seed=0):
    rng = np.random.default_rng(seed)
    n, nbytes = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, cols // n, nbytes), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        d = (rng.standard_normal((rows, cols // n)) * 0.01).astype(np.float16)
        raw[..., off:off + 2] = d.view(np.uint8).reshape(rows, cols // n, 2)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_reference_decoder_matches_gguf_py_bit_for_bit(qtype):
    raw = random_blocks(qtype, 7, 512)
    expected = gq.dequantize(raw, qtype)
    assert np.array_equal(quants.dequantize_ref(qtype, raw), expected)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_packed_dequantize_matches_gguf_py_bit_for_bit(qtype):
    raw = random_blocks(qtype, 37, 512, seed=1)
    p = mv.pack(qtype, raw)
    out = np.empty((37, 512), dtype=np.float32)
    mv.dequantize_rows(qtype, p, 0, 37, out)
    assert np.array_equal(out, gq.dequantize(raw, qtype))
    part = np.empty((5, 512), dtype=np.float32)
    mv.dequantize_rows(qtype, p, 30, 35, part)
    assert np.array_equal(part, out[30:35])
    ids = np.array([36, 0, 36, 5])  # any rows, repeated (an embedding lookup)
    assert np.array_equal(mv.gather_rows(p, ids, np.empty((4, 512), np.float32)), out[ids])
    for bad in ([37], [-1]):
        with pytest.raises(ValueError):
            mv.gather_rows(p, np.array(bad), np.empty((1, 512), np.float32))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("n", [1, 3, 8])
def test_fused_matvec_matches_float64_reference(qtype, n):
    rows, cols = 53, 768  # rows not a multiple of the kernels' 16-row chunks
    raw = random_blocks(qtype, rows, cols, seed=2)
    X = np.random.default_rng(3).standard_normal((n, cols)).astype(np.float32)
    out = np.empty((n, rows), dtype=np.float32)
    mv.matmul(qtype, mv.pack(qtype, raw), X, out)
    ref = mv.matmul_ref(qtype, raw, X)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("qtype", TYPES + [QT.F16, QT.F32, QT.BF16], ids=lambda t: t.name)
def test_batched_blas_path_matches_dequantized_product(qtype):
    rows, cols, n = 300, 256, mv.BATCH_MAX + 9
    if qtype == QT.BF16:
        raw = gq.quantize(np.random.default_rng(4).standard_normal((rows, cols)).astype(np.float32), qtype)
        W = gq.dequantize(raw, qtype)
        assert np.array_equal(quants.dequantize_ref(qtype, raw), W)
    elif qtype in (QT.F16, QT.F32):
        raw = np.random.default_rng(4).standard_normal((rows, cols)).astype(np.float16 if qtype == QT.F16 else np.float32)
        W = raw.astype(np.float32)
    else:
        raw = random_blocks(qtype, rows, cols, seed=4)
        W = gq.dequantize(raw, qtype)
    X = np.random.default_rng(5).standard_normal((n, cols)).astype(np.float32)
    p = mv.pack(qtype, raw)
    old = mv.TILE_BYTES
    mv.TILE_BYTES = 64 * cols * 4  # several tiles, the last one partial
    try:
        out = mv.matmul(qtype, p, X, np.empty((n, rows), dtype=np.float32))
    finally:
        mv.TILE_BYTES = old
    ref = X.astype(np.float64) @ W.T.astype(np.float64)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0], ids=lambda t: t.name)
def test_real_values_quantized_by_gguf_py(qtype):
    W = np.random.default_rng(6).standard_normal((64, 256)).astype(np.float32)
    raw = gq.quantize(W, qtype)
    deq = np.empty_like(W)
    mv.dequantize_rows(qtype, mv.pack(qtype, raw), 0, 64, deq)
    assert np.array_equal(deq, gq.dequantize(raw, qtype))
    assert np.abs(deq - W).max() < (0.02 if qtype == QT.Q8_0 else 0.5)


def test_bad_shapes_are_refused():
    raw = random_blocks(QT.Q8_0, 4, 64)
    with pytest.raises(ValueError):
        mv.pack(QT.Q8_0, raw[:, :-1])
    p = mv.pack(QT.Q8_0, raw)
    with pytest.raises(ValueError):
        mv.matmul(QT.Q8_0, p, np.zeros((1, 32), np.float32), np.empty((1, 4), np.float32))
    with pytest.raises(ValueError):
        mv.dequantize_rows(QT.Q8_0, p, 3, 5, np.empty((2, 64), np.float32))
    bad = raw.copy()
    bad[0, 0:2] = np.frombuffer(np.float16(np.inf).tobytes(), np.uint8)
    with pytest.raises(ValueError):
        mv.pack(QT.Q8_0, bad)

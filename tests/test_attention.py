"""Attention kernels: compressed KV storage (kernels/kv_store.py) against gguf-py's quantizers, dense and delta
attention (kernels/attention.py, kernels/delta.py) against their NumPy references, θ = 0 against dense."""
from __future__ import annotations

import gguf
import numpy as np
import pytest

from edgellm.kernels import attention as A
from edgellm.kernels import delta as dl
from edgellm.kernels import kv_store as S

QT = gguf.GGMLQuantizationType
GGML = {"q8_0": QT.Q8_0, "q4_0": QT.Q4_0, "f16": QT.F16}


def r(*shape, seed=0, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def make_cache(kv, Hkv, D, n_ctx):
    shape, dtype, sshape = S.layout(kv, Hkv, D, n_ctx)
    return np.zeros(shape, dtype), np.zeros(sshape, np.uint16)


def test_f16_bits_match_numpy():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(200000) * 10.0 ** rng.uniform(-9, 5, 200000)).astype(np.float32)
    x = np.concatenate([x, np.float32([0, -0.0, 65504, 65519.99, 2.0 ** -25, 2.0 ** -24, 3 * 2.0 ** -26, 6.1e-5])])
    out = S.f32_to_f16_bits(x, np.empty(len(x), np.uint16))
    with np.errstate(over="ignore"):
        assert np.array_equal(out, x.astype(np.float16).view(np.uint16))


def decode(q, kd, ks, vd, vs, n, delta=None, rot=(False, False)):
    """attention_decode over one layer's cache (scale 1/sqrt(hd)); delta = (window, qhat, srow, theta, skipped,
    total) or None (dense)."""
    H, hd = q.shape
    z = np.zeros((1, 1), np.float32)
    state = (False, 1, z, z, z, np.zeros(H), np.zeros(H)) if delta is None else (True,) + tuple(delta)
    return A.attention_decode(q, (kd, ks, vd, vs) + tuple(rot), n, np.float32(hd ** -0.5), state,
                              np.empty((H, hd), np.float32))


def stored(kv, x):
    # x (T, Hkv, D) stored at positions 4 .. T + 3 of a (T + 4)-token cache by the kernel -> (data, scales, rows in
    # ggml's block layout (T * Hkv, bytes) for gguf-py)
    T, Hkv, D = x.shape
    kd, ks = make_cache(kv, Hkv, D, T + 4)
    S.store_kv(kd, ks, kd.copy(), ks.copy(), x, np.zeros_like(x), 4, False, False)
    if kv == "f16":
        return kd, ks, kd[:, :, 4:4 + T].transpose(2, 0, 1).reshape(T * Hkv, D).copy().view(np.uint8)
    codes = kd[:, :, 4:4 + T].transpose(2, 0, 1).reshape(T * Hkv, D // 32, -1).view(np.uint8)
    d = ks[:, :, 4:4 + T].transpose(2, 0, 1).reshape(T * Hkv, D // 32, 1).copy().view(np.uint8)
    return kd, ks, np.concatenate([d, codes], -1).reshape(T * Hkv, -1)


def stress(T=9, Hkv=3, D=64, seed=1):
    x = r(T, Hkv, D, seed=seed) * np.float32([1, 1e-3, 30])[None, :, None]
    x[0, 0, :32] = 0  # an all-zero block
    x[1, 1, 5] = -x[1, 1].__abs__().max() * 2  # largest magnitude negative (q4_0 sign)
    x[2, 2, 32:] = np.float32([1, 2, 3, 4] * 8)  # exact ties in the rounding
    return x


@pytest.mark.parametrize("kv", ["f16", "q8_0"])
def test_store_is_bit_exact_with_gguf_py(kv):
    x = stress()
    T, Hkv, D = x.shape
    kd, ks, rows = stored(kv, x)
    ref = gguf.quants.quantize(x.reshape(-1, D), GGML[kv])  # (T * Hkv, bytes)
    assert np.array_equal(rows, ref.view(np.uint8))
    # the NumPy reference quantizer agrees, and the kernels' tiles decode what gguf-py decodes
    deq = S.dequantize_ref(*S.quantize_ref(x, kv), kv)
    np.testing.assert_array_equal(deq.reshape(-1, D), gguf.quants.dequantize(ref, GGML[kv]).reshape(-1, D))
    out = S.dequantize_cache(kd, ks, T + 4, np.zeros((Hkv, D, T + 4), np.float32))
    np.testing.assert_array_equal(out[:, :, 4:4 + T].transpose(2, 0, 1), deq)


@pytest.mark.parametrize("seed", [1, 2])
def test_store_q4_0_searched_scale(seed):
    # q4_0 searches its scale (S.q4_0_scale): the kernel and the NumPy reference agree bit for bit, gguf-py decodes the
    # bytes to the same values, and the error is never above that of ggml's reference quantizer (gguf-py's)
    x = stress(T=40, seed=seed) if seed == 1 else r(40, 3, 64, seed=seed) ** 3
    T, Hkv, D = x.shape
    kd, ks, rows = stored("q4_0", x)
    codes, sc = S.quantize_ref(x, "q4_0")
    deq = S.dequantize_ref(codes, sc, "q4_0")
    np.testing.assert_array_equal(gguf.quants.dequantize(rows, QT.Q4_0).reshape(T, Hkv, D), deq)
    out = S.dequantize_cache(kd, ks, T + 4, np.zeros((Hkv, D, T + 4), np.float32))
    np.testing.assert_array_equal(out[:, :, 4:4 + T].transpose(2, 0, 1), deq)
    ggml = gguf.quants.dequantize(gguf.quants.quantize(x.reshape(-1, D), QT.Q4_0), QT.Q4_0).reshape(x.shape)
    err = ((deq - x).astype(np.float64) ** 2).reshape(-1, 32).sum(-1)
    err_ggml = ((ggml - x).astype(np.float64) ** 2).reshape(-1, 32).sum(-1)
    scale2 = (x.astype(np.float64) ** 2).reshape(-1, 32).max(-1)  # the f16 rounding of the scale: relative 2^-11
    assert np.all(err <= err_ggml + 32 * scale2 * 2.0 ** -20)
    assert err.sum() < 0.95 * err_ggml.sum()
    assert np.all(deq.reshape(-1, 32)[(x.reshape(-1, 32) == 0).all(-1)] == 0)


@pytest.mark.parametrize("kv", list(S.KV_TYPES) + ["f32,q8_0", "q8_0,f32", "q4_0,q8_0"])
@pytest.mark.parametrize("H,Hkv,n", [(9, 3, 37), (4, 4, 1), (8, 1, 700), (6, 2, 2500), (40, 1, 300), (7, 1, 130)])
def test_decode_on_compressed_cache_matches_reference(kv, H, Hkv, n):
    # K and V formats ("K,V" or one for both); n > 1024: several tiles; 40 query heads per KV head: more than hd / 2
    D, n_ctx = 64, max(1024, n + 3)
    kk, vv = (kv.split(",") * 2)[:2]
    k, v, q = r(n, Hkv, D, seed=2), r(n, Hkv, D, seed=3), r(H, D, seed=4)
    kd, ks = make_cache(kk, Hkv, D, n_ctx)
    vd, vs = make_cache(vv, Hkv, D, n_ctx)
    S.store_kv(kd, ks, vd, vs, k, v, 0, False, False)
    kq = S.dequantize_ref(*S.quantize_ref(k, kk), kk).transpose(1, 0, 2)  # (Hkv, n, D): what the cache holds
    vq = S.dequantize_ref(*S.quantize_ref(v, vv), vv).transpose(1, 0, 2)
    out = decode(q, kd, ks, vd, vs, n)
    ref = A.attention_ref(q[None], kq, vq, n - 1, D ** -0.5)[0]
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def _queries(T, H, D, seed):
    # slowly drifting queries, as real ones are (a random walk), so that thresholds bite
    return np.cumsum(r(T, H, D, seed=seed, scale=0.3), axis=0).astype(np.float32)


@pytest.mark.parametrize("theta,window", [(0.0, 8), (0.25, 8), (0.5, 1), (0.4, 100)])
def test_delta_prefill_and_decode_match_the_reference(theta, window):
    H, Hkv, D, T0, T1, n_ctx = 6, 2, 64, 40, 12, 64
    N = T0 + T1
    q, k, v = _queries(N, H, D, 5), r(N, Hkv, D, seed=6), r(N, Hkv, D, seed=7)
    scale = D ** -0.5
    qh_ref, s_ref = np.zeros((H, D), np.float32), np.zeros((H, n_ctx))
    ref, sk_ref, tot_ref = dl.delta_attention_ref(q, k.transpose(1, 0, 2), v.transpose(1, 0, 2), 0, scale,
                                                 qh_ref, s_ref, theta, window)
    kd, vd = k.transpose(1, 2, 0).copy(), v.transpose(1, 2, 0).copy()  # (Hkv, D, N) dim-major, f32
    Kc = np.zeros((Hkv, D, n_ctx), np.float32)
    Vc = np.zeros_like(Kc)
    Kc[:, :, :N], Vc[:, :, :N] = kd, vd
    qhat, srow = np.zeros((H, D), np.float32), np.zeros((H, n_ctx), np.float32)
    sk, tot = np.zeros(H), np.zeros(H)
    # a chunked prefill of T0 tokens (two calls), then T1 decode steps
    outs = [A.delta_attention_prefill(q[:25], Kc, Vc, 0, scale, qhat, srow, theta, window, sk, tot),
            A.delta_attention_prefill(q[25:T0], Kc, Vc, 25, scale, qhat, srow, theta, window, sk, tot)]
    z = np.zeros((Hkv, 0, 1), np.uint16)
    for t in range(T0, N):
        outs.append(decode(q[t], Kc, z, Vc, z, t + 1, (window, qhat, srow, np.full((H, D), theta, np.float32), sk,
                                                       tot))[None])
    out = np.concatenate(outs)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=2e-5)
    np.testing.assert_array_equal(sk, sk_ref)
    np.testing.assert_array_equal(tot, tot_ref)
    np.testing.assert_allclose(qhat, qh_ref, rtol=0, atol=0)
    if theta > 0 and window < N:
        assert sk.sum() > 0


def test_per_dimension_thresholds_match_the_reference():
    H, Hkv, D, N, W = 4, 2, 64, 120, 16
    q, k, v = _queries(N, H, D, 19), r(N, Hkv, D, seed=20), r(N, Hkv, D, seed=21)
    theta = (0.2 + np.random.default_rng(22).random((H, D))).astype(np.float32)
    qh_ref, s_ref = np.zeros((H, D), np.float32), np.zeros((H, N))
    ref, sk_ref, _ = dl.delta_attention_ref(q, k.transpose(1, 0, 2), v.transpose(1, 0, 2), 0, D ** -0.5, qh_ref, s_ref,
                                           theta, W)
    Kc, Vc = k.transpose(1, 2, 0).copy(), v.transpose(1, 2, 0).copy()
    qhat, srow, sk, tot = np.zeros((H, D), np.float32), np.zeros((H, N), np.float32), np.zeros(H), np.zeros(H)
    out = A.delta_attention_prefill(q[:90], Kc, Vc, 0, D ** -0.5, qhat, srow, theta, W, sk, tot)
    z = np.zeros((Hkv, 0, 1), np.uint16)
    rest = [decode(q[t], Kc, z, Vc, z, t + 1, (W, qhat, srow, theta, sk, tot))[None] for t in range(90, N)]
    np.testing.assert_allclose(np.concatenate([out] + rest), ref, rtol=1e-4, atol=2e-5)
    np.testing.assert_array_equal(sk, sk_ref)
    assert abs(dl.simulate_sparsity(q, theta, W, Hkv) - sk.sum() / tot.sum()) < 1e-12


@pytest.mark.parametrize("kv", list(S.KV_TYPES) + ["q8_0,f16"])
@pytest.mark.parametrize("H,Hkv,start,T", [(9, 3, 0, 12), (9, 3, 620, 16), (8, 1, 2100, 5), (4, 4, 3, 1),
                                           (6, 2, 1500, 32), (4, 2, 0, 1300)])
def test_prefill_on_the_cache_matches_reference(kv, H, Hkv, start, T):
    # attention_prefill_cache (on the cache in its own format) == the float64 reference over what the cache holds:
    # causal within the chunk, several token ranges (> 1024 keys) combined, blocks of queries that see none of a
    # range's keys skipped (1,300 tokens from empty)
    D, n = 64, start + T
    kk, vv = (kv.split(",") * 2)[:2]
    k, v, q = r(n, Hkv, D, seed=31), r(n, Hkv, D, seed=32), r(T, H, D, seed=33)
    kd, ks = make_cache(kk, Hkv, D, n + 5)
    vd, vs = make_cache(vv, Hkv, D, n + 5)
    S.store_kv(kd, ks, vd, vs, k, v, 0, False, False)
    kq = S.dequantize_ref(*S.quantize_ref(k, kk), kk).transpose(1, 0, 2)
    vq = S.dequantize_ref(*S.quantize_ref(v, vv), vv).transpose(1, 0, 2)
    out = A.attention_prefill_cache(q, (kd, ks, vd, vs, False, False), start, np.float32(D ** -0.5),
                                    np.empty((T, H, D), np.float32))
    np.testing.assert_allclose(out, A.attention_ref(q, kq, vq, start, D ** -0.5), rtol=1e-4, atol=1e-5)
    if T > 1:  # each token's row equals a decode at its position
        t = T // 2
        np.testing.assert_allclose(out[t], decode(q[t], kd, ks, vd, vs, start + t + 1), rtol=1e-4, atol=1e-5)


def test_prefill_on_a_rotated_cache():
    # a Hadamard-rotated q8_0 cache (keys and values): the queries are rotated alike and the output back
    D, H, Hkv, start, T = 64, 6, 2, 300, 9
    n = start + T
    k, v, q = r(n, Hkv, D, seed=41), r(n, Hkv, D, seed=42), r(T, H, D, seed=43)
    kd, ks = make_cache("q8_0", Hkv, D, n)
    vd, vs = make_cache("q8_0", Hkv, D, n)
    S.store_kv(kd, ks, vd, vs, k, v, 0, True, True)
    out = A.attention_prefill_cache(q, (kd, ks, vd, vs, True, True), start, np.float32(D ** -0.5),
                                    np.empty((T, H, D), np.float32))
    ref = A.attention_ref(q, k.transpose(1, 0, 2), v.transpose(1, 0, 2), start, D ** -0.5)
    assert A.rel_error(out, ref) < 0.02


def test_delta_with_theta_zero_is_dense():
    H, Hkv, D, N = 9, 3, 64, 300
    q, k, v = r(N, H, D, seed=8), r(N, Hkv, D, seed=9), r(N, Hkv, D, seed=10)
    Kc, Vc = k.transpose(1, 2, 0).copy(), v.transpose(1, 2, 0).copy()
    scale = D ** -0.5
    dense = A.attention_prefill_cache(q, (Kc, np.zeros((Hkv, 0, 1), np.uint16), Vc, np.zeros((Hkv, 0, 1), np.uint16),
                                          False, False), 0, np.float32(scale), np.empty((N, H, D), np.float32))
    np.testing.assert_allclose(dense, A.attention_ref(q, k.transpose(1, 0, 2), v.transpose(1, 0, 2), 0, scale),
                               rtol=1e-4, atol=1e-5)
    qhat, srow, sk, tot = np.zeros((H, D), np.float32), np.zeros((H, N), np.float32), np.zeros(H), np.zeros(H)
    delta = A.delta_attention_prefill(q, Kc, Vc, 0, scale, qhat, srow, 0.0, 16, sk, tot)
    np.testing.assert_allclose(delta, dense, rtol=1e-4, atol=1e-5)
    assert sk.sum() == 0 and tot.sum() > 0


def test_delta_decode_on_quantized_cache_skips_rows():
    # delta decode over a q4_0 cache equals the reference run on the dequantized cache
    H, Hkv, D, N, W, theta = 4, 2, 64, 300, 32, 0.3
    q, k, v = _queries(N, H, D, 11), r(N, Hkv, D, seed=12), r(N, Hkv, D, seed=13)
    kd, ks = make_cache("q4_0", Hkv, D, N)
    vd, vs = make_cache("q4_0", Hkv, D, N)
    S.store_kv(kd, ks, vd, vs, k, v, 0, False, False)
    kq = S.dequantize_ref(*S.quantize_ref(k, "q4_0"), "q4_0").transpose(1, 0, 2)
    vq = S.dequantize_ref(*S.quantize_ref(v, "q4_0"), "q4_0").transpose(1, 0, 2)
    qh_ref, s_ref = np.zeros((H, D), np.float32), np.zeros((H, N))
    ref, sk_ref, _ = dl.delta_attention_ref(q, kq, vq, 0, D ** -0.5, qh_ref, s_ref, theta, W)
    qhat, srow, sk, tot = np.zeros((H, D), np.float32), np.zeros((H, N), np.float32), np.zeros(H), np.zeros(H)
    th = np.full((H, D), theta, np.float32)
    out = np.stack([decode(q[t], kd, ks, vd, vs, t + 1, (W, qhat, srow, th, sk, tot)) for t in range(N)])
    # the kernel's score rows accumulate 300 steps of updates in f32 (the reference in f64)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=5e-5)
    np.testing.assert_array_equal(sk, sk_ref)
    assert 0.2 < sk.sum() / tot.sum() < 0.95


def test_calibrated_threshold_reaches_the_target():
    q = _queries(200, 3, 64, 14)
    for target in (0.3, 0.6):
        th = dl.calibrate_threshold(q, target, 16)
        assert abs(dl.simulate_sparsity(q, th, 16) - target) < 0.02
    assert dl.calibrate_threshold(q, 0.0, 16) == 0.0


def test_hadamard_rotation_is_exact_on_f32_and_helps_q4_0():
    H, Hkv, D, n = 6, 2, 64, 200
    k, v, q = r(n, Hkv, D, seed=15), r(n, Hkv, D, seed=16), r(H, D, seed=17)
    k[:, :, 3] *= 12  # an outlier dimension, as real keys have
    x = r(5, D, seed=18)
    np.testing.assert_allclose(S.fwht_rows(S.fwht_rows(x.copy())), x, atol=1e-5)  # its own inverse
    outs = {}
    for kv, rot in (("f32", False), ("f32", True), ("q4_0", False), ("q4_0", True)):
        kd, ks = make_cache(kv, Hkv, D, n)
        vd, vs = make_cache(kv, Hkv, D, n)
        S.store_kv(kd, ks, vd, vs, k, v, 0, rot, rot)
        outs[kv, rot] = decode(q, kd, ks, vd, vs, n, rot=(rot, rot))
    ref = outs["f32", False]
    np.testing.assert_allclose(outs["f32", True], ref, rtol=1e-4, atol=1e-5)
    assert A.rel_error(outs["q4_0", True], ref) < 0.7 * A.rel_error(outs["q4_0", False], ref)

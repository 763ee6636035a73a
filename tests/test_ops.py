"""Block kernels against their NumPy references (and RoPE/llama3 factors against their definitions)."""
from __future__ import annotations

import numpy as np
import pytest

from edgellm.kernels import ops

rng = np.random.default_rng(0)


def r(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def test_rmsnorm():
    x, w = r(5, 96), r(96)
    out = ops.rmsnorm(x, w, 1e-5, np.empty_like(x))
    np.testing.assert_allclose(out, ops.rmsnorm_ref(x, w, 1e-5), rtol=1e-5, atol=1e-6)


def test_swiglu_and_softmax():
    g, u = r(3, 50), r(3, 50)
    np.testing.assert_allclose(ops.swiglu(g, u, np.empty_like(g)), ops.swiglu_ref(g, u), rtol=1e-5, atol=1e-6)
    gu = r(4, 2 * 300) * 30  # views of one fused gate|up output; arguments far outside exp's range
    gu[0, :4] = [-1e4, 1e4, -90, 90]
    g, u = gu[:, :300], gu[:, 300:]
    np.testing.assert_allclose(ops.swiglu(g, u, np.empty((4, 300), np.float32)), ops.swiglu_ref(g, u),
                               rtol=1e-5, atol=1e-6)
    x = r(77) * 10
    np.testing.assert_allclose(ops.softmax_inplace(x.copy()), ops.softmax_ref(x), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("rope_dim", [64, 32])
def test_rope_matches_reference_and_rotation_property(rope_dim):
    cos, sin = ops.rope_tables(100, rope_dim, 10000.0)
    x = r(6, 3, 64)
    pos = np.array([0, 1, 5, 17, 50, 99])
    ref = ops.rope_ref(x, pos, cos, sin, rope_dim)
    out = ops.rope_inplace(x.copy(), pos, cos, sin, rope_dim)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out[..., rope_dim:], x[..., rope_dim:])
    np.testing.assert_array_equal(out[0], x[0])  # position 0 is the identity
    # rotations preserve the norm of each pair, and q.k depends only on the distance
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
    q, k = r(1, 1, 64), r(1, 1, 64)
    d1 = ops.rope_ref(q, np.array([10]), cos, sin, rope_dim)[0, 0] @ ops.rope_ref(k, np.array([3]), cos, sin, rope_dim)[0, 0]
    d2 = ops.rope_ref(q, np.array([57]), cos, sin, rope_dim)[0, 0] @ ops.rope_ref(k, np.array([50]), cos, sin, rope_dim)[0, 0]
    assert abs(d1 - d2) < 1e-3


def test_llama3_freq_factors_follow_the_definition():
    # Llama-3.2: factor 32, low 1, high 4, original context 8192, theta 500000, head dim 64
    ff = ops.llama3_freq_factors(64, 500000.0, 32.0, 1.0, 4.0, 8192)
    inv = 500000.0 ** (-np.arange(0, 64, 2) / 64)
    wl = 2 * np.pi / inv
    assert np.all(ff[wl < 8192 / 4] == 1.0)         # high frequencies untouched
    assert np.all(ff[wl > 8192 / 1] == 32.0)        # low frequencies scaled by the factor
    mid = (wl >= 2048) & (wl <= 8192)
    assert np.all((ff[mid] >= 1) & (ff[mid] <= 32))
    assert np.all(np.diff(ff) >= 0)


@pytest.mark.parametrize("n, k", [(49152, 40), (100, 7), (10, 10), (10, 1), (3, 2)])
@pytest.mark.parametrize("kind", ["normal", "ties", "nan", "f64", "ascending"])
def test_top_k_ids_match_reference(n, k, kind):
    x = r(n) * 3
    if kind == "ties":  # many equal values: ties go to the lower index
        x = np.round(x).astype(np.float32)
    elif kind == "nan":  # NaN ranks as -inf
        x[rng.integers(0, n, max(1, n // 5))] = np.nan
        x[0] = -np.inf
    elif kind == "f64":
        x = x.astype(np.float64)
    elif kind == "ascending":  # the heap's worst case: every value replaces its root
        x = np.sort(x)
    got = ops.top_k_ids(x, k)
    np.testing.assert_array_equal(got, ops.top_k_ids_ref(x, k))
    assert got.dtype == np.int64 and len(set(got.tolist())) == k
    for bad in (0, n + 1):
        with pytest.raises(ValueError):
            ops.top_k_ids(x, bad)


def test_sampler_top_k_draws_only_the_k_largest():
    from edgellm.runtime.sampling import Sampler, SamplerSettings
    logits = r(5000)
    best = set(ops.top_k_ids_ref(logits, 5).tolist())
    drawn = {Sampler(SamplerSettings(temp=50.0, top_k=5, top_p=1.0, min_p=0.0, seed=s))(logits) for s in range(200)}
    assert drawn == best  # a flat distribution over exactly those five

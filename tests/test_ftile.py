"""kernels/ftile.py's register tiles (attention's scores and values over a dim-major cache) against NumPy float64."""
from __future__ import annotations

import numpy as np
import pytest

from edgellm.kernels import ftile as F

rng = np.random.default_rng(0)
SHAPES = [  # (query rows, head dim, keys, offset into the cache rows)
    (48, 64, 448, 5), (51, 64, 777, 0), (3, 64, 17, 0), (7, 80, 100, 3), (1, 64, 31, 0), (5, 6, 40, 2),
    (2, 64, 0, 4), (4, 128, 1, 0), (9, 64, F.VL - 1, 1), (6, 64, 2 * F.QK_NV * F.VL + 1, 0)]


def assert_sums_close(got, ref, bound):
    # f32 sums in any order against float64: within 1e-6 of the sum of the terms' magnitudes (rounding grows with
    # it and with the chain length: 777 terms in chains of 4 lanes on NEON)
    assert np.all(np.abs(got - ref) <= 1e-6 * bound + 1e-6), np.abs(got - ref).max()


def cache_rows(D, m, off, dtype):
    # D rows of m keys at columns off .. off + m - 1, NaN everywhere else (a kernel that reads past m fails)
    a = np.full((D + 2, off + m + 9), np.nan, np.float32)
    a[:D, off:off + m] = rng.standard_normal((D, m))
    return a.astype(np.float16).view(np.uint16) if dtype == "f16" else a


@pytest.mark.parametrize("dtype", ["f32", "f16"])
@pytest.mark.parametrize("nr, D, m, off", SHAPES)
def test_scores_rows_match_reference(dtype, nr, D, m, off):
    q = rng.standard_normal((nr, D)).astype(np.float32)
    src = cache_rows(D, m, off, dtype)
    sc = np.full((nr, m + 10), 7, np.float32)
    F.scores_rows(q, src, off, m, sc, 3)
    k = src[:D, off:off + m]
    assert_sums_close(sc[:, 3:3 + m], F.scores_ref(q, k), F.scores_ref(np.abs(q), np.abs(F.as_f32_ref(k))))
    assert (sc[:, :3] == 7).all() and (sc[:, 3 + m:] == 7).all()  # nothing outside the block is written
    wide = np.zeros((nr, D + 5), np.float32)  # query rows of a wider array (row stride D + 5)
    wide[:, :D] = q
    sc2 = np.full_like(sc, 7)
    F.scores_rows(wide[:, :D], src, off, m, sc2, 3)
    np.testing.assert_array_equal(sc2, sc)


@pytest.mark.parametrize("dtype", ["f32", "f16"])
@pytest.mark.parametrize("nr, D, m, off", SHAPES)
def test_values_rows_match_reference(dtype, nr, D, m, off):
    p = np.full((nr, m + 6), np.nan, np.float32)
    p[:, 2:2 + m] = rng.random((nr, m))
    src = cache_rows(D, m, off, dtype)
    out = rng.standard_normal((nr, D)).astype(np.float32)
    pm, v = p[:, 2:2 + m], src[:D, off:off + m]
    ref = out + F.values_ref(pm, v)
    bound = np.abs(out) + F.values_ref(pm, np.abs(F.as_f32_ref(v)))
    F.values_rows(p, 2, src, off, m, out)  # adds to what out holds
    assert_sums_close(out, ref, bound)


def test_row_max():
    x = rng.standard_normal(300).astype(np.float32)
    for n in (0, 1, F.VL - 1, F.VL, 2 * F.VL + 3, 300):
        assert F.row_max(x, n) == (x[:n].max() if n else -np.inf)
    x[7] = 50
    assert F.row_max(x, 300) == 50
    assert F.row_max(x[::2], 150) == x[::2].max()  # a strided row
    with pytest.raises(ValueError):
        F.row_max(x, 301)


def test_bad_sizes_raise():
    q, sc = np.zeros((4, 64), np.float32), np.zeros((4, 100), np.float32)
    src = np.zeros((64, 100), np.float32)
    with pytest.raises(ValueError):
        F.scores_rows(q, src, 50, 60, sc, 0)  # keys past the cache row
    with pytest.raises(ValueError):
        F.scores_rows(q, src[:32], 0, 10, sc, 0)  # fewer rows than the head dimension
    with pytest.raises(ValueError):
        F.scores_rows(q, src, 0, 10, sc, 95)  # scores past their row
    with pytest.raises(ValueError):
        F.values_rows(sc, 0, src, 0, 101, q)
    with pytest.raises(ValueError):
        F.values_rows(sc[:3], 0, src, 0, 10, q)  # probability rows != output rows

"""Attention over one layer's K/V cache, dense or delta (kernels/delta.py), on any storage format
(kernels/kv_store.py): decode and dense prefill on the cache directly (flash-decoding over token tiles), delta prefill
with BLAS.
Each kernel has a NumPy float64 reference beside it (`attention_ref`; delta: `delta.delta_attention_ref`)."""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .ftile import row_max, scores_rows, values_rows
from .delta import axpy_rows_gi, delta_scores_prefill, delta_step
from .kv_store import TJ, as_f32, fwht_rows, tile, tile_buf, touch_rows
from .ops import exp_inplace

_JIT = dict(cache=True, fastmath=True, nogil=True, error_model="numpy")  # 0 or NaN divisor: inf/NaN, no exception
# an item of at most this many tokens reads its f32 / f16 rows in order first (kv_store.touch_rows): SmolLM2's batched
# step of 8 at 200 tokens, attention 4.1-4.5 -> 2.5-3.3 ms; one sequence at 600 tokens 1.65-1.98 -> 1.37-1.54 ms; items
# of 1,024 tokens (depth 4,096) were slower with it (5.1 -> 6.8-7.8 ms): long rows the prefetchers follow anyway
TOUCH_MAX = 512


# ================================================================ row helpers (vectorized along tokens)
@njit(**_JIT)
def exp_sum(x, n, a, b, kbuf):
    # x[j] <- exp(a x[j] - b) for j < n (ops.exp_inplace: vectorized), -> their sum
    xs = x[:n]
    for j in range(n):
        xs[j] = a * xs[j] - b
    exp_inplace(x, n, kbuf)
    tot = np.float32(0.0)
    for j in range(n):
        tot += xs[j]
    return tot


@njit(**_JIT)
def axpy_rows_g(dst, d0, src, s0, m, coef, h0, G):
    # dst[g, d0 + u] += sum_i coef[h0 + g, i] * src[i, s0 + u] for g < G, u < m, every row i: rows four at a time,
    # heads four (or two) at a time inside, so that each group of rows is read once (from L1) for all the heads
    # that share it and each load of a row feeds four heads' multiply-adds
    D = coef.shape[1]
    i = 0
    while i + 4 <= D:
        a0 = src[i, s0:s0 + m]
        a1 = src[i + 1, s0:s0 + m]
        a2 = src[i + 2, s0:s0 + m]
        a3 = src[i + 3, s0:s0 + m]
        g = 0
        while g + 4 <= G:
            c = coef[h0 + g:h0 + g + 4, i:i + 4]
            o0 = dst[g, d0:d0 + m]
            o1 = dst[g + 1, d0:d0 + m]
            o2 = dst[g + 2, d0:d0 + m]
            o3 = dst[g + 3, d0:d0 + m]
            c00, c01, c02, c03 = c[0, 0], c[0, 1], c[0, 2], c[0, 3]
            c10, c11, c12, c13 = c[1, 0], c[1, 1], c[1, 2], c[1, 3]
            c20, c21, c22, c23 = c[2, 0], c[2, 1], c[2, 2], c[2, 3]
            c30, c31, c32, c33 = c[3, 0], c[3, 1], c[3, 2], c[3, 3]
            for u in range(m):
                k0, k1, k2, k3 = as_f32(a0[u]), as_f32(a1[u]), as_f32(a2[u]), as_f32(a3[u])
                o0[u] += c00 * k0 + c01 * k1 + c02 * k2 + c03 * k3
                o1[u] += c10 * k0 + c11 * k1 + c12 * k2 + c13 * k3
                o2[u] += c20 * k0 + c21 * k1 + c22 * k2 + c23 * k3
                o3[u] += c30 * k0 + c31 * k1 + c32 * k2 + c33 * k3
            g += 4
        if g + 3 == G:  # three heads left (SmolLM2: G = 3): one pass, each row read and converted once
            c = coef[h0 + g:h0 + g + 3, i:i + 4]
            o0 = dst[g, d0:d0 + m]
            o1 = dst[g + 1, d0:d0 + m]
            o2 = dst[g + 2, d0:d0 + m]
            c00, c01, c02, c03 = c[0, 0], c[0, 1], c[0, 2], c[0, 3]
            c10, c11, c12, c13 = c[1, 0], c[1, 1], c[1, 2], c[1, 3]
            c20, c21, c22, c23 = c[2, 0], c[2, 1], c[2, 2], c[2, 3]
            for u in range(m):
                k0, k1, k2, k3 = as_f32(a0[u]), as_f32(a1[u]), as_f32(a2[u]), as_f32(a3[u])
                o0[u] += c00 * k0 + c01 * k1 + c02 * k2 + c03 * k3
                o1[u] += c10 * k0 + c11 * k1 + c12 * k2 + c13 * k3
                o2[u] += c20 * k0 + c21 * k1 + c22 * k2 + c23 * k3
            g += 3
        while g < G:
            c0, c1, c2, c3 = coef[h0 + g, i], coef[h0 + g, i + 1], coef[h0 + g, i + 2], coef[h0 + g, i + 3]
            out = dst[g, d0:d0 + m]
            for u in range(m):
                out[u] += c0 * as_f32(a0[u]) + c1 * as_f32(a1[u]) + c2 * as_f32(a2[u]) + c3 * as_f32(a3[u])
            g += 1
        i += 4
    while i < D:
        a0 = src[i, s0:s0 + m]
        for g in range(G):
            c0 = coef[h0 + g, i]
            out = dst[g, d0:d0 + m]
            for u in range(m):
                out[u] += c0 * as_f32(a0[u])
        i += 1


@njit(**_JIT)
def dot_rows_g(p, p0, src, s0, m, out, G):
    # out[g, i] += sum_u p[g, p0 + u] * src[i, s0 + u] for g < G, every row i of src (rows four at a time, heads two
    # at a time inside: eight sums per pass over the rows)
    D = out.shape[1]
    i = 0
    while i + 4 <= D:
        a0 = src[i, s0:s0 + m]
        a1 = src[i + 1, s0:s0 + m]
        a2 = src[i + 2, s0:s0 + m]
        a3 = src[i + 3, s0:s0 + m]
        g = 0
        if G == 3:  # (SmolLM2) three heads in one pass: each row read and converted once
            pp = p[0, p0:p0 + m]
            pq = p[1, p0:p0 + m]
            pr = p[2, p0:p0 + m]
            x0 = np.float32(0.0)
            x1 = np.float32(0.0)
            x2 = np.float32(0.0)
            x3 = np.float32(0.0)
            y0 = np.float32(0.0)
            y1 = np.float32(0.0)
            y2 = np.float32(0.0)
            y3 = np.float32(0.0)
            z0 = np.float32(0.0)
            z1 = np.float32(0.0)
            z2 = np.float32(0.0)
            z3 = np.float32(0.0)
            for u in range(m):
                k0, k1, k2, k3 = as_f32(a0[u]), as_f32(a1[u]), as_f32(a2[u]), as_f32(a3[u])
                w = pp[u]
                x0 += w * k0
                x1 += w * k1
                x2 += w * k2
                x3 += w * k3
                v = pq[u]
                y0 += v * k0
                y1 += v * k1
                y2 += v * k2
                y3 += v * k3
                r = pr[u]
                z0 += r * k0
                z1 += r * k1
                z2 += r * k2
                z3 += r * k3
            out[0, i] += x0
            out[0, i + 1] += x1
            out[0, i + 2] += x2
            out[0, i + 3] += x3
            out[1, i] += y0
            out[1, i + 1] += y1
            out[1, i + 2] += y2
            out[1, i + 3] += y3
            out[2, i] += z0
            out[2, i + 1] += z1
            out[2, i + 2] += z2
            out[2, i + 3] += z3
            g = 3
        while g + 2 <= G:
            pp = p[g, p0:p0 + m]
            pq = p[g + 1, p0:p0 + m]
            x0 = np.float32(0.0)
            x1 = np.float32(0.0)
            x2 = np.float32(0.0)
            x3 = np.float32(0.0)
            y0 = np.float32(0.0)
            y1 = np.float32(0.0)
            y2 = np.float32(0.0)
            y3 = np.float32(0.0)
            for u in range(m):
                k0, k1, k2, k3 = as_f32(a0[u]), as_f32(a1[u]), as_f32(a2[u]), as_f32(a3[u])
                w = pp[u]
                x0 += w * k0
                x1 += w * k1
                x2 += w * k2
                x3 += w * k3
                v = pq[u]
                y0 += v * k0
                y1 += v * k1
                y2 += v * k2
                y3 += v * k3
            out[g, i] += x0
            out[g, i + 1] += x1
            out[g, i + 2] += x2
            out[g, i + 3] += x3
            out[g + 1, i] += y0
            out[g + 1, i + 1] += y1
            out[g + 1, i + 2] += y2
            out[g + 1, i + 3] += y3
            g += 2
        while g < G:
            pp = p[g, p0:p0 + m]
            x0 = np.float32(0.0)
            x1 = np.float32(0.0)
            x2 = np.float32(0.0)
            x3 = np.float32(0.0)
            for u in range(m):
                w = pp[u]
                x0 += w * as_f32(a0[u])
                x1 += w * as_f32(a1[u])
                x2 += w * as_f32(a2[u])
                x3 += w * as_f32(a3[u])
            out[g, i] += x0
            out[g, i + 1] += x1
            out[g, i + 2] += x2
            out[g, i + 3] += x3
            g += 1
        i += 4
    while i < D:
        a0 = src[i, s0:s0 + m]
        for g in range(G):
            pp = p[g, p0:p0 + m]
            x0 = np.float32(0.0)
            for u in range(m):
                x0 += pp[u] * as_f32(a0[u])
            out[g, i] += x0
        i += 1


# ================================================================ decode: one query per head, on the cache directly
@njit(**_JIT)
def split_tokens(n, Hkv):
    # -> (S, L): n tokens in S ranges of L (a multiple of 64) for each kv head: ranges of about TJ tokens, but at
    # least 4 work items when that leaves each 256 tokens or more
    S = max((n + TJ - 1) // TJ, min((n + 255) // 256, (Hkv + 3) // Hkv))
    L = ((n + S - 1) // S + 63) // 64 * 64
    return (n + L - 1) // L, L


@njit(**_JIT)
def decode_item(q, kd, ks, vd, vs, kh, j0, j1, L, n_old, delta, need, srow, nzi, nzc, nnz, scale, m_part,
                l_part, o_part):
    # one work item of a decode: the keys j0 .. j1 - 1 (j1 - j0 <= L) of kv head kh for its G = m_part.shape[0]
    # query heads -> the running max m_part (G,), the sum of exponentials l_part (G,) and the unnormalised output
    # o_part (G, hd) (zeroed by the caller), combined over the items by `combine`. Keys before n_old (delta only)
    # are scored through the score rows srow (H, n_ctx), updated from the non-zero d entries nzi, nzc, nnz; the rest
    # exactly (and written to srow when delta).
    D = q.shape[1]
    G = m_part.shape[0]
    buf = tile_buf(kd, vd, D, min(TJ, L))
    sc = np.zeros((G, L), dtype=np.float32)
    kbuf = np.empty(L, dtype=np.int32)
    if j1 - j0 <= TOUCH_MAX:  # short rows of f32 / f16 caches read in order first (see touch_rows)
        touch_rows(kd, kh, max(j0, n_old), j1)
        touch_rows(vd, kh, j0, j1)
    for t0 in range(j0, j1, TJ):
        t1 = min(j1, t0 + TJ)
        a = min(t1, n_old)
        if a > t0:  # keys outside the window: s += d . k over the non-zero d_i only
            src, off = tile(kd, ks, kh, need[kh], False, t0, a, buf)
            axpy_rows_gi(srow, kh * G, G, t0, src, off, a - t0, nzi, nzc, nnz[kh * G])
            for g in range(G):
                h = kh * G + g
                for j in range(t0, a):
                    sc[g, j - j0] = srow[h, j]
        b = max(t0, n_old)
        if t1 > b:  # the window (dense: everything): exact scores
            src, off = tile(kd, ks, kh, need[kh], True, b, t1, buf)
            axpy_rows_g(sc, b - j0, src, off, t1 - b, q, kh * G, G)
            if delta:
                for g in range(G):
                    h = kh * G + g
                    for j in range(b, t1):
                        srow[h, j] = sc[g, j - j0]
    nj = j1 - j0
    for g in range(G):
        m = row_max(sc[g], nj) * scale
        m_part[g] = m
        l_part[g] = exp_sum(sc[g], nj, scale, m, kbuf)
    for t0 in range(j0, j1, TJ):
        t1 = min(j1, t0 + TJ)
        src, off = tile(vd, vs, kh, need[kh], True, t0, t1, buf)
        dot_rows_g(sc, t0 - j0, src, off, t1 - t0, o_part, G)


@njit(**_JIT)
def combine(m_part, l_part, o_part, S, out):
    # the partials (Hkv * S, G[, hd]) of the S token ranges of each kv head (decode_item, prefill_item) -> out
    # (H, hd), flash-decoding style; a partial that saw no keys (l 0, m -inf: a prefill's causal skip) is left out
    H, D = out.shape
    G = m_part.shape[1]
    for h in range(H):
        kh = h // G
        g = h % G
        m = np.float32(-np.inf)
        for s in range(S):
            if l_part[kh * S + s, g] != 0:
                m = max(m, m_part[kh * S + s, g])
        tot = np.float32(0.0)
        for i in range(D):
            out[h, i] = 0
        for s in range(S):
            if l_part[kh * S + s, g] == 0:
                continue
            f = np.exp(m_part[kh * S + s, g] - m)
            tot += f * l_part[kh * S + s, g]
            for i in range(D):
                out[h, i] += f * o_part[kh * S + s, g, i]
        inv = np.float32(1.0) / tot
        for i in range(D):
            out[h, i] *= inv


@njit(parallel=True, **_JIT)
def attention_decode(q, kv, n, scale, dstate, out):
    # q (H, hd) of the token at position n - 1 (already stored) -> out (H, hd), over one layer's cache
    # kv = (kd, ks, vd, vs, rot_k, rot_v): K and V data / block scales in a kv_store.py format, and
    # whether the cache holds Hadamard-rotated keys / values (q is rotated alike, the output rotated back).
    # dstate = (delta, window, qhat, srow, theta, skipped, total): delta attention (kernels/delta.py) when delta is
    # True: update q̂ (H, hd) and the score rows srow (H, n_ctx) with the threshold of each head and dimension
    # theta (H, hd) f32 and a window of exact keys; add the outside-window multiply-adds skipped / possible per head to
    # skipped, total (H,) f64. Dense: delta False (the rest unused).
    # Work is split over (kv head, token range) pairs (decode_item), combined flash-decoding style (combine).
    kd, ks, vd, vs, rot_k, rot_v = kv
    delta, window, qhat, srow, theta, skipped, total = dstate
    H, D = q.shape
    if rot_k:
        q = fwht_rows(q.copy())
    Hkv = kd.shape[0]
    G = H // Hkv
    n_old = max(0, n - window) if delta else 0
    nzi = np.empty((H, D), dtype=np.int64)  # the entries of d per head that are used: indices, values, count
    nzc = np.empty((H, D), dtype=np.float32)
    nnz = np.zeros(H, dtype=np.int64)
    need = np.zeros((Hkv, D), dtype=np.bool_)
    if delta:
        delta_step(q, qhat, theta, need, nzi, nzc, nnz)
        for h in range(H):
            skipped[h] += n_old * (D - nnz[h])
            total[h] += n_old * D
    S, L = split_tokens(n, Hkv)
    m_part = np.empty((Hkv * S, G), dtype=np.float32)
    l_part = np.empty((Hkv * S, G), dtype=np.float32)
    o_part = np.zeros((Hkv * S, G, D), dtype=np.float32)
    for w in prange(Hkv * S):
        j0 = (w % S) * L
        decode_item(q, kd, ks, vd, vs, w // S, j0, min(n, j0 + L), L, n_old, delta, need, srow, nzi, nzc, nnz,
                    scale, m_part[w], l_part[w], o_part[w])
    combine(m_part, l_part, o_part, S, out)
    if rot_v:
        fwht_rows(out)
    return out


# ================================================================ prefill
# Dense prefill on the cache directly, in its own format: decode's work items over (kv head, token range), with a
# block of the chunk's query rows (T * G per kv head) inside each, combined per query as a decode's. It replaced
# BLAS over the context dequantized to f32 (one call per kv head, between parallel kernels: the two thread pools
# took turns on the cores): SmolLM2, 16 tokens after 620: attention 23 -> ~8 ms of the prefill; 512 tokens from
# empty 608 -> 519 ms, after 3,496: 2.46 -> 2.08 s. Delta prefill (below) still dequantizes for BLAS. Scores and
# values go through kernels/ftile.py's register tiles, and the row maximum is vectorized (SmolLM2, one layer: 17
# tokens after 760 375 -> 306 us, 512 after 3,584 52.5 -> 31.3 ms); decode keeps axpy_rows_g / dot_rows_g (three
# query rows per kv head, where the tiles measured slower).
RI = 64  # query rows per work item at most (more items than kv heads x token ranges when a chunk is long)


@njit(**_JIT)
def prefill_item(qk, r0, kd, ks, vd, vs, kh, j0, j1, L, start, G, need, scale, m_part, l_part, o_part):
    # one work item of a prefill: keys j0 .. j1 - 1 (j1 - j0 <= L) of kv head kh for the query rows qk (nr, hd)
    # (row r0 + r: query head kh * G + (r0 + r) % G of the token at start + (r0 + r) // G), each over the keys it
    # sees -> running max m_part (nr,), sum of exponentials l_part (nr,), unnormalised output o_part (nr, hd)
    # (zeroed by the caller); a row that sees none of these keys gets m -inf, l 0
    nr, D = qk.shape
    buf = tile_buf(kd, vd, D, min(TJ, L))
    sc = np.zeros((nr, L), dtype=np.float32)
    kbuf = np.empty(L, dtype=np.int32)
    for t0 in range(j0, j1, TJ):
        t1 = min(j1, t0 + TJ)
        src, off = tile(kd, ks, kh, need[kh], True, t0, t1, buf)
        scores_rows(qk, src, off, t1 - t0, sc, t0 - j0)
    nj_all = j1 - j0
    for r in range(nr):
        nj = min(j1, start + (r0 + r) // G + 1) - j0
        row = sc[r]
        if nj <= 0:
            m_part[r] = -np.inf
            l_part[r] = 0
            for j in range(nj_all):
                row[j] = 0
            continue
        m = row_max(row, nj) * scale
        m_part[r] = m
        l_part[r] = exp_sum(row, nj, scale, m, kbuf)
        for j in range(nj, nj_all):
            row[j] = 0
    for t0 in range(j0, j1, TJ):
        t1 = min(j1, t0 + TJ)
        src, off = tile(vd, vs, kh, need[kh], True, t0, t1, buf)
        values_rows(sc, t0 - j0, src, off, t1 - t0, o_part)


@njit(parallel=True, **_JIT)
def attention_prefill_cache(q, kv, start, scale, out):
    # q (T, H, hd) of the tokens at positions start .. start + T - 1 (already stored) -> out (T, H, hd), causal, over
    # one layer's cache in its own format (kv as attention_decode's: kd, ks, vd, vs, rot_k, rot_v); work items over
    # (kv head, token range, block of query rows), combined per query as a decode's
    kd, ks, vd, vs, rot_k, rot_v = kv
    T, H, D = q.shape
    Hkv = kd.shape[0]
    G = H // Hkv
    R = T * G
    n = start + T
    qk = np.empty((Hkv, R, D), dtype=np.float32)
    for t in range(T):
        for h in range(H):
            for i in range(D):
                qk[h // G, t * G + h % G, i] = q[t, h, i]
    if rot_k:
        fwht_rows(qk.reshape(Hkv * R, D))
    S, L = split_tokens(n, Hkv)
    NB = (R + RI - 1) // RI
    m_part = np.empty((Hkv * S, R), dtype=np.float32)
    l_part = np.empty((Hkv * S, R), dtype=np.float32)
    o_part = np.zeros((Hkv * S, R, D), dtype=np.float32)
    need = np.ones((Hkv, D), dtype=np.bool_)
    for w in prange(Hkv * S * NB):
        p = w // NB
        kh = p // S
        j0 = (p % S) * L
        r0 = (w % NB) * RI
        r1 = min(R, r0 + RI)
        if start + (r1 - 1) // G < j0:  # these queries see none of these keys (causal): nothing to compute
            m_part[p, r0:r1] = -np.inf
            l_part[p, r0:r1] = 0
        else:
            prefill_item(qk[kh, r0:r1], r0, kd, ks, vd, vs, kh, j0, min(n, j0 + L), L, start, G, need, scale,
                         m_part[p, r0:r1], l_part[p, r0:r1], o_part[p, r0:r1])
    for t in prange(T):  # token t's partials are the columns t * G .. t * G + G - 1
        combine(m_part[:, t * G:t * G + G], l_part[:, t * G:t * G + G], o_part[:, t * G:t * G + G], S, out[t])
    if rot_v:
        fwht_rows(out.reshape(T * H, D))
    return out


@njit(parallel=True, **_JIT)
def causal_softmax(s, start, scale, G):
    # s (T * G, N) raw scores, row r = query t = r // G at position start + t -> in place softmax(s * scale) over the
    # keys j <= start + t, 0 after
    R, N = s.shape
    for r in prange(R):
        n = min(N, start + r // G + 1)
        row = s[r]
        m = row_max(row, n)
        kbuf = np.empty(n, dtype=np.int32)
        inv = np.float32(1.0) / exp_sum(row, n, scale, m * scale, kbuf)
        for j in range(n):
            row[j] *= inv
        for j in range(n, N):
            row[j] = 0
    return s


def softmax_values(s, V, start, scale, G):
    # s (T * G, N) raw causal scores of one kv head's G query heads (row t * G + g), V (hd, N) dim-major -> (T, G, hd)
    causal_softmax(s, start, np.float32(scale), G)
    return (s @ V.T).reshape(-1, G, V.shape[0])  # one BLAS call per kv head (stacked calls thread badly)


SCORE_BLOCK = 1 << 25  # bytes of the score block (H, T, N) a delta prefill chunk may materialise


def delta_attention_prefill(q, K, V, start, scale, qhat, srow, theta, window, skipped, total):
    # q (T, H, hd) at positions start..start+T-1; K, V (Hkv, hd, >= start+T) f32 dim-major (the context
    # dequantized) -> (T, H, hd): causal attention with delta scores, with BLAS (thresholds theta: a number or
    # (H, hd); state qhat, srow updated; skipped, total (H,) accumulated)
    T, H, D = q.shape
    N = start + T
    Hkv = K.shape[0]
    G = H // Hkv
    out = np.empty((T, H, D), dtype=np.float32)
    theta = np.ascontiguousarray(np.broadcast_to(np.asarray(theta, dtype=np.float32), (H, D)))
    step = max(1, min(T, SCORE_BLOCK // (4 * H * N)))
    for c0 in range(0, T, step):
        c1 = min(T, c0 + step)
        n = start + c1
        S = np.empty((Hkv, c1 - c0, G, n), dtype=np.float32)
        delta_scores_prefill(np.ascontiguousarray(q[c0:c1]), K, start + c0, qhat, srow, theta, window,
                             skipped, total, S)
        for kh in range(Hkv):
            out[c0:c1, kh * G:(kh + 1) * G, :] = softmax_values(S[kh].reshape((c1 - c0) * G, n), V[kh, :, :n],
                                                                start + c0, scale, G)
    return out


# ================================================================ NumPy reference
def attention_ref(q, k, v, start, scale):
    # float64 reference of causal GQA attention: q (T, H, D), k/v (Hkv, start+T, D) -> (T, H, D)
    T, H, D = q.shape
    Hkv, N, _ = k.shape
    group = H // Hkv
    out = np.zeros((T, H, D))
    for t in range(T):
        for h in range(H):
            s = k[h // group, : start + t + 1].astype(np.float64) @ q[t, h].astype(np.float64) * scale
            p = np.exp(s - s.max())
            p /= p.sum()
            out[t, h] = p @ v[h // group, : start + t + 1].astype(np.float64)
    return out.astype(np.float32)


def rel_error(a, b) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


__all__ = ["attention_decode", "attention_prefill_cache", "delta_attention_prefill", "causal_softmax", "attention_ref",
           "rel_error"]

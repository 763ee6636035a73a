# qa (H, r + dr), kv (n_ctx, r + dr) -> out (H, r): multi-head latent attention (MLA) over a latent cache
"""Multi-head latent attention (DeepSeek-V2 MLA) over a latent cache, one layer.

The cache holds per token one row [c_kv (r) | k_pe (dr)] shared by all heads (k_pe already rotated).
Decode uses the absorbed form: each head's query becomes qa_h = [W_UK_h q_nope_h (r) | q_pe_h (dr)] and scores
against the rows directly; the values are aggregated in latent space (out_h = Σ_j p_hj c_j), the caller applies W_UV.
Prefill decompresses explicitly: k_nope_h = c W_UK_h, v_h = c W_UV_hᵀ, then causal attention per head (BLAS).
Each kernel has a NumPy float64 reference beside it (`*_ref`), used by the tests.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .attention import causal_softmax

_JIT = dict(cache=True, fastmath=True, nogil=True, error_model="numpy")  # 0 or NaN divisor: inf/NaN, no exception
CHUNK = 256  # tokens per parallel chunk of the decode kernel


@njit(inline="always", **_JIT)
def _column_max(a, n, h):
    # a (>= n, H) -> max of a[:n, h], n >= 1
    mx = a[0, h]
    for j in range(1, n):
        mx = max(mx, a[j, h])
    return mx


@njit(parallel=True, **_JIT)
def mla_decode(qa, kv, n, scale, out):
    # qa (H, D), kv (n_ctx, D) with D = r + dr, n tokens held -> out (H, r): softmax_j(qa_h . kv_j * scale) kv_j[:r]
    # Token chunks run in parallel (each reads its rows once for all heads); partial softmax sums are merged at the end.
    H, D = qa.shape
    r = out.shape[1]
    nc = (n + CHUNK - 1) // CHUNK
    pmax = np.empty((nc, H), dtype=np.float32)
    psum = np.empty((nc, H), dtype=np.float32)
    pout = np.zeros((nc, H, r), dtype=np.float32)
    for ci in prange(nc):
        j0 = ci * CHUNK
        j1 = min(n, j0 + CHUNK)
        m = j1 - j0
        s = np.empty((m, H), dtype=np.float32)
        for j in range(m):
            row = kv[j0 + j]
            for h in range(H):
                acc = np.float32(0.0)
                for i in range(D):
                    acc += qa[h, i] * row[i]
                s[j, h] = acc * scale
        for h in range(H):
            mx = _column_max(s, m, h)
            tot = np.float32(0.0)
            for j in range(m):
                e = np.exp(s[j, h] - mx)
                s[j, h] = e
                tot += e
            pmax[ci, h] = mx
            psum[ci, h] = tot
        for j in range(m):
            row = kv[j0 + j]
            for h in range(H):
                p = s[j, h]
                for i in range(r):
                    pout[ci, h, i] += p * row[i]
    for h in range(H):
        mx = _column_max(pmax, nc, h)
        tot = np.float32(0.0)
        for i in range(r):
            out[h, i] = 0
        for ci in range(nc):
            w = np.exp(pmax[ci, h] - mx)
            tot += w * psum[ci, h]
            for i in range(r):
                out[h, i] += w * pout[ci, h, i]
        inv = np.float32(1.0) / tot
        for i in range(r):
            out[h, i] *= inv
    return out


def mla_decode_ref(qa, kv, n, scale, r):
    s = qa.astype(np.float64) @ kv[:n].astype(np.float64).T * scale  # (H, n)
    p = np.exp(s - s.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    return (p @ kv[:n, :r].astype(np.float64)).astype(np.float32)


def absorb_queries(q, dn, k_b, out):
    # q (H, dn + dr) one token's queries, k_b (H, r, dn) -> out (H, r + dr) = [k_b[h] @ q_nope_h | q_pe_h]
    r = k_b.shape[1]
    np.matmul(k_b, q[:, :dn, None], out=out[:, :r, None])
    out[:, r:] = q[:, dn:]
    return out


def mla_prefill(q, kv, r, start, scale, k_b, v_b):
    # q (T, H, dn + dr) at positions start..start+T-1, kv (>= start+T, r + dr) latent rows, k_b (H, r, dn),
    # v_b (H, dv, r) -> (T, H, dv): causal attention with keys and values decompressed per head (BLAS)
    T, H, dk = q.shape
    dn = k_b.shape[2]
    N = start + T
    c, kpe = kv[:N, :r], kv[:N, r:]
    out = np.empty((T, H, v_b.shape[1]), dtype=np.float32)
    s_pe = np.ascontiguousarray(q[:, :, dn:]).reshape(T * H, dk - dn) @ kpe.T  # rope scores of every head (T H, N)
    s_pe = s_pe.reshape(T, H, N)
    for h in range(H):
        k_nope = c @ k_b[h]  # (N, dn)
        s = np.ascontiguousarray(q[:, h, :dn]) @ k_nope.T + s_pe[:, h]  # (T, N)
        causal_softmax(s, start, np.float32(scale), 1)
        out[:, h] = s @ (c @ v_b[h].T)  # (T, dv)
    return out


def mla_attention_ref(q, kv, r, start, scale, k_b, v_b):
    # float64 reference of mla_prefill (explicit keys/values, loops over queries)
    T, H, dk = q.shape
    dn = k_b.shape[2]
    kv = kv.astype(np.float64)
    out = np.zeros((T, H, v_b.shape[1]))
    for t in range(T):
        n = start + t + 1
        c, kpe = kv[:n, :r], kv[:n, r:]
        for h in range(H):
            k = np.concatenate([c @ k_b[h].astype(np.float64), kpe], 1)  # (n, dk)
            v = c @ v_b[h].astype(np.float64).T
            s = k @ q[t, h].astype(np.float64) * scale
            p = np.exp(s - s.max())
            out[t, h] = p @ v / p.sum()
    return out.astype(np.float32)

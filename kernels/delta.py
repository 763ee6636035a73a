"""Delta attention (a reconstruction of DeltaLLM's context-aware hybrid attention; the paper has no public code):
the recurrence, its score kernels, its NumPy reference, and the calibration of its threshold.

Per layer and query head keep a reference query q̂ (initially 0) and a score row s (one float per cached token).
For the token at position t:
    d = q_t - q̂;  d_i = 0 where |d_i| < θ;  q̂ <- q̂ + d  (i.e. q̂_i <- q_t,i where d_i != 0)
    (GQA: the query heads that share a KV head decide together -- dimension i is kept for all of them when any of
    them has |d_i| >= θ -- so that a skipped multiply-add is also a key row not read; see `delta_step`)
    s[j] = q_t · k_j                  for the W most recent keys   (t - W < j <= t, exact)
    s[j] = s[j] + d · k_j             for older keys               (j <= t - W), only the non-zero d_i are read
    softmax(s * scale) and the value sum as usual.
Since |q_t - q̂|_inf < θ after every step, an old score deviates from q̂·k_j by less than θ |k_j|_1 plus the value
it had when it left the window. θ = 0 reproduces dense attention (up to f32 rounding). Sparsity = the fraction of
the outside-window multiply-adds skipped: sum over steps of n_old (hd - nnz(d)) over sum of n_old hd.
Memory: the score row is updated in place, so the state is q̂ (H, hd) and one row s (H, n_ctx) per layer -- 4 H
bytes per token and layer, bounded by the context like the KV cache itself (H / (2 Hkv hd) of an f32 KV cache);
prefill materialises the (H, T, N) scores of a chunk of T queries only, with T chosen to bound that block.
The decode step runs inside the attention kernel (kernels/attention.py `attention_decode`).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .kv_store import as_f32

_JIT = dict(cache=True, fastmath=True, nogil=True, error_model="numpy")  # 0 or NaN divisor: inf/NaN, no exception


@njit(**_JIT)
def axpy_rows(dst, d0, src, s0, m, idx, coef, cnt):
    # dst[d0 + u] += sum_k coef[k] * src[idx[k], s0 + u] for u < m, k < cnt: rows four at a time, tokens innermost
    out = dst[d0:d0 + m]
    k = 0
    while k + 4 <= cnt:
        a0 = src[idx[k], s0:s0 + m]
        a1 = src[idx[k + 1], s0:s0 + m]
        a2 = src[idx[k + 2], s0:s0 + m]
        a3 = src[idx[k + 3], s0:s0 + m]
        c0, c1, c2, c3 = coef[k], coef[k + 1], coef[k + 2], coef[k + 3]
        for u in range(m):
            out[u] += c0 * a0[u] + c1 * a1[u] + c2 * a2[u] + c3 * a3[u]
        k += 4
    while k < cnt:
        a0 = src[idx[k], s0:s0 + m]
        c0 = coef[k]
        for u in range(m):
            out[u] += c0 * a0[u]
        k += 1


@njit(**_JIT)
def axpy_rows_gi(dst, h0, G, d0, src, s0, m, idx, coef, cnt):
    # dst[h0 + g, d0 + u] += sum_k coef[h0 + g, k] * src[idx[h0, k], s0 + u] for g < G, u < m, k < cnt: the rows
    # idx[h0] serve all G heads (delta_step's group decisions); four at a time with the heads inside, each read once
    k = 0
    while k + 4 <= cnt:
        a0 = src[idx[h0, k], s0:s0 + m]
        a1 = src[idx[h0, k + 1], s0:s0 + m]
        a2 = src[idx[h0, k + 2], s0:s0 + m]
        a3 = src[idx[h0, k + 3], s0:s0 + m]
        for g in range(G):
            c0, c1, c2, c3 = coef[h0 + g, k], coef[h0 + g, k + 1], coef[h0 + g, k + 2], coef[h0 + g, k + 3]
            out = dst[h0 + g, d0:d0 + m]
            for u in range(m):
                out[u] += c0 * as_f32(a0[u]) + c1 * as_f32(a1[u]) + c2 * as_f32(a2[u]) + c3 * as_f32(a3[u])
        k += 4
    while k < cnt:
        a0 = src[idx[h0, k], s0:s0 + m]
        for g in range(G):
            c0 = coef[h0 + g, k]
            out = dst[h0 + g, d0:d0 + m]
            for u in range(m):
                out[u] += c0 * as_f32(a0[u])
        k += 1


@njit(**_JIT)
def delta_step(q, qhat, theta, need, nzi, nzc, nnz):
    # One step of the delta recurrence for one token: q (H, hd), q̂ (H, hd) updated, thresholds θ (H, hd). Dimension i of
    # KV head kh is kept (need[kh, i]) when any of the G query heads sharing kh has |q_h,i - q̂_h,i| >= θ_h,i; then
    # every head of the group takes d_h,i = q_h,i - q̂_h,i and q̂_h,i <- q_h,i. Per head: the kept dimensions
    # nzi[h, :nnz[h]] and their d nzc[h, :nnz[h]].
    H, D = q.shape
    Hkv = need.shape[0]
    G = H // Hkv
    for kh in range(Hkv):
        for i in range(D):
            keep = False
            for h in range(kh * G, kh * G + G):
                x = q[h, i] - qhat[h, i]
                if abs(x) >= theta[h, i] and x != 0:
                    keep = True
            need[kh, i] = keep
        for h in range(kh * G, kh * G + G):
            cnt = 0
            for i in range(D):
                if need[kh, i]:
                    nzi[h, cnt] = i
                    nzc[h, cnt] = q[h, i] - qhat[h, i]
                    qhat[h, i] = q[h, i]
                    cnt += 1
            nnz[h] = cnt


@njit(parallel=True, **_JIT)
def delta_scores_prefill(q, K, start, qhat, srow, theta, window, skipped, total, S):
    # q (T, H, hd) at positions start .. start + T - 1, K (Hkv, hd, >= start + T) f32 dim-major -> S (Hkv, T, G, >= start + T)
    # raw scores (unscaled; entries after each query's position are left unset), one step of the delta recurrence per
    # token (updates qhat (H, hd), srow (H, n_ctx), skipped / total (H,)). The steps' decisions first, in token order
    # (cheap), then the scores with heads in parallel.
    T, H, D = q.shape
    Hkv = K.shape[0]
    G = H // Hkv
    allidx = np.arange(D)
    nzi = np.empty((T, H, D), dtype=np.int64)
    nzc = np.empty((T, H, D), dtype=np.float32)
    nnz = np.empty((T, H), dtype=np.int64)
    need = np.empty((Hkv, D), dtype=np.bool_)
    for t in range(T):
        delta_step(q[t], qhat, theta, need, nzi[t], nzc[t], nnz[t])
        n_old = max(0, start + t + 1 - window)
        for h in range(H):
            skipped[h] += n_old * (D - nnz[t, h])
            total[h] += n_old * D
    for h in prange(H):
        kh = h // G
        Kh = K[kh]
        sr = srow[h]
        for t in range(T):
            n = start + t + 1
            n_old = max(0, n - window)
            axpy_rows(sr, 0, Kh, 0, n_old, nzi[t, h], nzc[t, h], nnz[t, h])
            for j in range(n_old, n):
                sr[j] = 0
            axpy_rows(sr, n_old, Kh, n_old, n - n_old, allidx, q[t, h], D)
            for j in range(n):
                S[kh, t, h % G, j] = sr[j]
    return S


# ================================================================ NumPy reference, calibration
def delta_attention_ref(q, k, v, start, scale, qhat, srow, theta, window):
    """The delta algorithm, plainly (float64 scores; q̂ in float32 as the kernels keep it, so the thresholding
    decisions agree), thresholds θ (H, hd): q (T, H, hd) at positions start.., k, v (Hkv, start+T, hd) -> (out (T, H, hd),
    skipped (H,), total (H,)); qhat (H, hd) f32 and srow (H, >= start+T) f64 are updated in place."""
    T, H, D = q.shape
    G = H // k.shape[0]
    theta = np.broadcast_to(np.asarray(theta, dtype=np.float32), (H, D))
    out = np.zeros((T, H, D))
    skipped, total = np.zeros(H), np.zeros(H)
    for t in range(T):
        n = start + t + 1
        n_old = max(0, n - window)
        dq = (q[t] - qhat).astype(np.float32)  # (H, D), before any update of this step
        kept = ((np.abs(dq) >= theta) & (dq != 0)).reshape(-1, G, D).any(1)  # (Hkv, D): any head of the group
        for h in range(H):
            kh = k[h // G].astype(np.float64)
            keep = kept[h // G]
            d = np.where(keep, dq[h], np.float32(0))
            qhat[h] = np.where(keep, q[t, h], qhat[h])
            srow[h, :n_old] += kh[:n_old, keep] @ d[keep].astype(np.float64)
            srow[h, n_old:n] = kh[n_old:n] @ q[t, h].astype(np.float64)
            skipped[h] += n_old * (D - keep.sum())
            total[h] += n_old * D
            s = srow[h, :n] * scale
            p = np.exp(s - s.max())
            out[t, h] = p @ v[h // G, :n].astype(np.float64) / p.sum()
    return out.astype(np.float32), skipped, total


def simulate_sparsity(q, theta, window: int, n_head_kv: int | None = None) -> float:
    """Sparsity the delta recurrence reaches on the queries q (T, H, hd) of one layer (positions 0..T-1) at
    threshold θ (a number, or per head and dimension (H, hd)) -- the fraction of outside-window multiply-adds skipped;
    n_head_kv: the KV heads the query heads share (decisions are per KV head; default H: none shared)."""
    q = np.ascontiguousarray(q, dtype=np.float32)
    th = np.broadcast_to(np.asarray(theta, dtype=np.float32), q.shape[1:]).copy()
    hkv = q.shape[1] if n_head_kv is None else n_head_kv
    if hkv < 1 or q.shape[1] % hkv:
        raise ValueError(f"{q.shape[1]} query heads cannot share {hkv} KV heads")
    return _simulate(q, th, window, hkv)


@njit(**_JIT)
def _simulate(q, theta, window, n_head_kv):
    T, H, D = q.shape
    qhat = np.zeros((H, D), dtype=np.float32)
    need = np.empty((n_head_kv, D), dtype=np.bool_)
    nzi = np.empty((H, D), dtype=np.int64)
    nzc = np.empty((H, D), dtype=np.float32)
    nnz = np.empty(H, dtype=np.int64)
    skip = 0.0
    tot = 0.0
    for t in range(T):
        n_old = max(0, t + 1 - window)
        delta_step(q[t], qhat, theta, need, nzi, nzc, nnz)
        for h in range(H):
            skip += n_old * (D - nnz[h])
            tot += n_old * D
    return skip / tot if tot > 0 else 0.0


def calibrate_threshold(q, target: float, window: int, dim_scale=None, iters: int = 40,
                        n_head_kv: int | None = None) -> float:
    """Smallest θ (bisection) at which the delta recurrence on q (T, H, hd) with thresholds θ * dim_scale (H, hd)
    (default 1) skips >= target of the outside-window multiply-adds (the sparsity grows with θ)."""
    if target <= 0:
        return 0.0
    sc = np.ones(q.shape[1:], np.float32) if dim_scale is None else np.asarray(dim_scale, np.float32)
    lo, hi = 0.0, float(np.abs(q).max() / sc.min()) * 2 + 1e-6
    if simulate_sparsity(q, hi * sc, window, n_head_kv) < target:
        return hi
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if simulate_sparsity(q, mid * sc, window, n_head_kv) >= target:
            hi = mid
        else:
            lo = mid
    return hi


__all__ = ["delta_step", "axpy_rows", "axpy_rows_gi", "delta_scores_prefill", "delta_attention_ref",
           "simulate_sparsity", "calibrate_threshold"]

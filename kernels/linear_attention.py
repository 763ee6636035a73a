# fq (T, H, d), fk / la (T, Hkv, d), v (T, Hkv, dv), state S (Hkv, d, dv), z (Hkv, d) -> out (T, H, dv)
"""Normalised gated linear attention (the `linear` variant, LAWCAT-style): kernels and their NumPy references.

Per kv head, with φ the feature map, α_t = exp(la_t) ∈ (0, 1]^d the data-dependent decay (la = log σ(gate)):
    S_t = diag(α_t) S_{t-1} + φ(k_t)ᵀ v_t        (d × dv)
    z_t = diag(α_t) z_{t-1} + φ(k_t)             (d,)
    o_t = φ(q_t) S_t / (φ(q_t) · z_t + eps)       (every query head of the kv head's group)
Decode is that recurrence (`gla_decode`, O(1) state per head). Prefill is the chunked parallel form
(`gla_chunked`): inside a chunk of C tokens with cumulative log decays b_t = Σ_{u≤t} la_u,
    o_t ∝ (φq_t ⊙ e^{b_t}) S_prev + Σ_{s≤t} (Σ_i φq_t,i φk_s,i e^{b_t,i - b_s,i}) v_s
and the state moves over the chunk at once: S ← diag(e^{b_C}) S + Σ_s (φk_s ⊙ e^{b_C - b_s})ᵀ v_s. Every exponent
is ≤ 0 (decays only shrink), so no gate value can overflow. The features (`feature_map`), the causal depthwise
convolution over q and k (`causal_conv`) and the log-decay (`log_sigmoid`) come first.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

_JIT = dict(cache=True, fastmath=True, nogil=True, error_model="numpy")  # 0 or NaN divisor: inf/NaN, no exception
FEATURE_MAPS = ("elu1", "softmax")  # φ(x) = elu(x) + 1, or softmax over the head dimension


# ---------------------------------------------------------------- feature map, gate, convolution
def feature_map(x: np.ndarray, kind: str) -> np.ndarray:
    # x (..., d) -> φ(x) (..., d) f32, positive: "elu1" elementwise, "softmax" over the last axis
    x = np.asarray(x, dtype=np.float32)
    if kind == "elu1":
        return np.where(x > 0, x + np.float32(1), np.exp(np.minimum(x, 0))).astype(np.float32)
    if kind == "softmax":
        e = np.exp(x - x.max(-1, keepdims=True))
        return (e / e.sum(-1, keepdims=True)).astype(np.float32)
    raise ValueError(f"unknown feature map {kind!r} (choose from {', '.join(FEATURE_MAPS)})")


def log_sigmoid(x: np.ndarray) -> np.ndarray:
    # x (...) -> log σ(x) = -log(1 + e^{-x}) (...) f32, ≤ 0
    return (-np.logaddexp(np.float32(0), -np.asarray(x, dtype=np.float32))).astype(np.float32)


@njit(**_JIT)
def causal_conv(x, buf, w, out):
    # x (T, C), buf (K-1, C) the K-1 inputs before x (oldest first), w (C, K) -> out (T, C); buf <- last K-1 inputs
    # out[t, c] = Σ_j w[c, j] · x[t - (K-1) + j, c]  (w[:, K-1] weighs the current token; x[<0] from buf)
    T, C = x.shape
    K = w.shape[1]
    P = K - 1
    for t in range(T):
        for c in range(C):
            out[t, c] = np.float32(0.0)
        for j in range(K):
            src = t - P + j  # index into x, negative = buf[P + src]
            if src >= 0:
                for c in range(C):
                    out[t, c] += w[c, j] * x[src, c]
            else:
                for c in range(C):
                    out[t, c] += w[c, j] * buf[P + src, c]
    # the new buffer: the last P inputs of [buf; x]
    if T >= P:
        for i in range(P):
            for c in range(C):
                buf[i, c] = x[T - P + i, c]
    else:
        for i in range(P - T):
            for c in range(C):
                buf[i, c] = buf[i + T, c]
        for i in range(T):
            for c in range(C):
                buf[P - T + i, c] = x[i, c]
    return out


def causal_conv_ref(x, buf, w):
    # float64 reference: -> (out (T, C), new buf (K-1, C))
    K = w.shape[1]
    full = np.concatenate([buf.astype(np.float64), x.astype(np.float64)])
    T = x.shape[0]
    out = np.zeros(x.shape)
    for t in range(T):
        out[t] = (full[t:t + K] * w.T.astype(np.float64)).sum(0)
    return out.astype(np.float32), full[len(full) - (K - 1):].astype(np.float32) if K > 1 else buf.copy()


# ---------------------------------------------------------------- attention over the state
@njit(parallel=True, **_JIT)
def gla_chunked(fq, fk, v, la, S, z, chunk, eps, out):
    # fq (T, H, d), fk / la (T, Hkv, d), v (T, Hkv, dv), S (Hkv, d, dv), z (Hkv, d) updated in place -> out (T, H, dv)
    T, H, d = fq.shape
    Hkv = fk.shape[1]
    dv = v.shape[2]
    G = H // Hkv
    for kh in prange(Hkv):
        b = np.empty((chunk, d), dtype=np.float32)
        eb = np.empty((chunk, d), dtype=np.float32)
        E = np.empty((chunk, chunk, d), dtype=np.float32)
        num = np.empty(dv, dtype=np.float32)
        for c0 in range(0, T, chunk):
            C = min(chunk, T - c0)
            for i in range(d):  # cumulative log decay inside the chunk
                acc = np.float32(0.0)
                for t in range(C):
                    acc += la[c0 + t, kh, i]
                    b[t, i] = acc
                    eb[t, i] = np.exp(acc)
            for t in range(C):  # decay from token s to token t (s ≤ t), times φk_s, shared by the group
                for s in range(t + 1):
                    for i in range(d):
                        E[t, s, i] = np.exp(b[t, i] - b[s, i]) * fk[c0 + s, kh, i]
            for g in range(G):
                h = kh * G + g
                for t in range(C):
                    den = np.float32(0.0)
                    for j in range(dv):
                        num[j] = np.float32(0.0)
                    for i in range(d):  # the state of the previous chunks, decayed to t
                        qd = fq[c0 + t, h, i] * eb[t, i]
                        den += qd * z[kh, i]
                        for j in range(dv):
                            num[j] += qd * S[kh, i, j]
                    for s in range(t + 1):  # this chunk's tokens up to t
                        w = np.float32(0.0)
                        for i in range(d):
                            w += fq[c0 + t, h, i] * E[t, s, i]
                        den += w
                        for j in range(dv):
                            num[j] += w * v[c0 + s, kh, j]
                    inv = np.float32(1.0) / (den + eps)
                    for j in range(dv):
                        out[c0 + t, h, j] = num[j] * inv
            for i in range(d):  # the state moves over the whole chunk
                e = eb[C - 1, i]
                z[kh, i] *= e
                for j in range(dv):
                    S[kh, i, j] *= e
                for s in range(C):
                    kd = fk[c0 + s, kh, i] * np.exp(b[C - 1, i] - b[s, i])
                    z[kh, i] += kd
                    for j in range(dv):
                        S[kh, i, j] += kd * v[c0 + s, kh, j]
    return out


@njit(parallel=True, **_JIT)
def gla_decode(fq, fk, v, la, S, z, eps, out):
    # fq (H, d), fk / la (Hkv, d), v (Hkv, dv), S (Hkv, d, dv), z (Hkv, d) updated in place -> out (H, dv)
    H, d = fq.shape
    Hkv = fk.shape[0]
    dv = v.shape[1]
    G = H // Hkv
    for kh in prange(Hkv):
        for i in range(d):
            a = np.exp(la[kh, i])
            k = fk[kh, i]
            z[kh, i] = a * z[kh, i] + k
            for j in range(dv):
                S[kh, i, j] = a * S[kh, i, j] + k * v[kh, j]
        for g in range(G):
            h = kh * G + g
            den = np.float32(0.0)
            for i in range(d):
                den += fq[h, i] * z[kh, i]
            inv = np.float32(1.0) / (den + eps)
            for j in range(dv):
                acc = np.float32(0.0)
                for i in range(d):
                    acc += fq[h, i] * S[kh, i, j]
                out[h, j] = acc * inv
    return out


def gla_ref(fq, fk, v, la, S, z, eps):
    # float64 recurrence, token by token: -> (out (T, H, dv), S, z) (inputs not modified)
    T, H, d = fq.shape
    Hkv = fk.shape[1]
    G = H // Hkv
    S, z = S.astype(np.float64).copy(), z.astype(np.float64).copy()
    out = np.zeros((T, H, v.shape[2]))
    for t in range(T):
        a = np.exp(la[t].astype(np.float64))  # (Hkv, d)
        S = a[:, :, None] * S + fk[t].astype(np.float64)[:, :, None] * v[t].astype(np.float64)[:, None, :]
        z = a * z + fk[t]
        for h in range(H):
            q = fq[t, h].astype(np.float64)
            out[t, h] = q @ S[h // G] / (q @ z[h // G] + eps)
    return out.astype(np.float32), S.astype(np.float32), z.astype(np.float32)

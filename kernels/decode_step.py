"""A whole decode step in one compiled call: B sequences advance by one token each, every weight read once for all
of them (llama2.c's `forward` with its preallocated `RunState`, run by Numba). models/llama.py and models/bitnet.py
keep the per-operation forward, the reference this step is tested against (runtime/fast_decode.py gathers the
arrays and chooses between them).

    x = embed(tokens)                                          (B, d)
    for each layer l:
        h = rmsnorm(x) ; q, k, v = split(h @ Wqkv.T) ; rope(q, k) at each sequence's position
        store k, v in sequence b's cache at its position; a = attention over its cache (kv_store.py, attention.py)
        [bitnet: a = rmsnorm(a, sub_norm)] ; x += a @ Wo.T
        h = rmsnorm(x) ; g, u = split(h @ Wgu.T) ; f = silu(g) * u  [bitnet: relu(g)^2 * u, rmsnorm(f, sub_norm)]
        x += f @ Wdown.T
    logits = rmsnorm(x) @ Wout.T                               (B, V)

Weights are kernels/igemm.py's packed records (one format for the layers' matrices, one for the head); per-layer
widths (deci) come as an array. The layers' matrices and the caches of the B sequences are reached through the
data addresses of their arrays (validated and kept alive by the caller), so one compiled function serves every
depth and every B, and a call unboxes a few arrays rather than hundreds.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange, types
from numba.extending import intrinsic

from . import ops
from .attention import combine, decode_item, split_tokens
from .igemm import QK8, _NO_SCALE, _gemm, quantize_absmax_row, quantize_q8_row
from .kv_store import fwht_rows, store_kv
from .q8act import dequantize_rows
from .sources import sources_digest

# per cache and layer, the data addresses in the `addr` array (B, N_ADDR, n_layer)
K_DATA, K_SCALES, V_DATA, V_SCALES, K_MEAN, V_MEAN = range(6)
N_ADDR = 6
# per layer, its matrices in `wtab` (n_layer, 4, 6): address, G, nb, rec of the records; address, length of the
# row scales (0, 0: none)
QKV, WO, GATE_UP, DOWN = range(4)
# the step's compile options (error_model numpy: a 0 or NaN divisor gives inf/NaN, no exception, as kernels/ops.py)
_STEP_JIT = dict(parallel=True, cache=True, nogil=True, error_model="numpy")
KV_DTYPES = {"f32": np.float32, "f16": np.uint16, "q8_0": np.int8, "q4_0": np.uint8}


@intrinsic
def _ptr(typingctx, addr, kind):
    """An int64 data address -> a typed pointer (for numba.carray)."""
    if not isinstance(kind, types.NumberClass):
        return None
    pt = types.CPointer(kind.instance_type)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(pt))

    return pt(addr, kind), codegen


@njit(inline="always", nogil=True, error_model="numpy")
def _matmul_q(isa, fmt, W, X, n_in, n_out, qbuf, dbuf, sbuf, obuf, nchunk):
    # X (B, >= n_in) f32 -> the first B * n_out of obuf as (B, n_out) = X[:, :n_in] @ W.T, X quantized to Q8 blocks
    B = X.shape[0]
    XQ = qbuf[:B * n_in].reshape(B, n_in)
    XD = dbuf[:B * (n_in // QK8)].reshape(B, n_in // QK8)
    XS = sbuf[:B * (n_in // QK8)].reshape(B, n_in // QK8)
    for b in range(B):
        quantize_q8_row(X[:, :n_in], XQ, XD, XS, b)
    out = obuf[:B * n_out].reshape(B, n_out)
    _gemm(isa, fmt, W, XQ, XD, XS, out, nchunk, _NO_SCALE, _NO_SCALE)
    return out


@njit(inline="always", nogil=True, error_model="numpy")
def _matmul_t(isa, fmt, W, X, n_in, n_out, qbuf, dbuf, sbuf, obuf, nchunk, rowscale, tokscale):
    # as _matmul_q for a ternary W: X quantized per token (BitNet), out scaled by rowscale / the token's scale
    B = X.shape[0]
    XQ = qbuf[:B * n_in].reshape(B, n_in)
    XD = dbuf[:B * (n_in // 64)].reshape(B, n_in // 64)
    XS = sbuf[:B * (n_in // 64)].reshape(B, n_in // 64)
    for b in range(B):
        quantize_absmax_row(X[:, :n_in], XQ, XD, XS, tokscale, b)
    out = obuf[:B * n_out].reshape(B, n_out)
    _gemm(isa, fmt, W, XQ, XD, XS, out, nchunk, rowscale, tokscale)
    return out


@njit(inline="always", nogil=True, error_model="numpy")
def _layer_cache(addr, b, li, Hkv, hd, nc, KT, VT, k_half, v_half, k_blocks, v_blocks):
    # sequence b's K and V data and block scales of layer li, from their addresses (types KT, VT; q4_0 halves the
    # data rows; q8_0 / q4_0 have block scales) -> (kd, ks, vd, vs)
    kd = numba.carray(_ptr(addr[b, K_DATA, li], KT), (Hkv, hd // 2 if k_half else hd, nc))
    vd = numba.carray(_ptr(addr[b, V_DATA, li], VT), (Hkv, hd // 2 if v_half else hd, nc))
    ks = numba.carray(_ptr(addr[b, K_SCALES, li], np.uint16), (Hkv, hd // 32, nc) if k_blocks else (Hkv, 0, 1))
    vs = numba.carray(_ptr(addr[b, V_SCALES, li], np.uint16), (Hkv, hd // 32, nc) if v_blocks else (Hkv, 0, 1))
    return kd, ks, vd, vs


@njit(inline="always", nogil=True, error_model="numpy")
def _store_one(addr, b, li, Hkv, hd, cap, KT, VT, k_half, v_half, k_blocks, v_blocks, kh, vh, qh, qr, pos, H,
               center_k, center_v, rot_k, rot_v):
    # sequence b's new key and value of layer li (centred, rotated as its cache keeps them) -> its cache at pos[b];
    # its queries as attention takes them -> qr[b]
    kd, ks, vd, vs = _layer_cache(addr, b, li, Hkv, hd, cap[b], KT, VT, k_half, v_half, k_blocks, v_blocks)
    kb = kh[b:b + 1]
    vb = vh[b:b + 1]
    if center_k:
        km = numba.carray(_ptr(addr[b, K_MEAN, li], np.float32), (Hkv, hd))
        for j in range(Hkv):
            for i in range(hd):
                kb[0, j, i] -= km[j, i]
    if center_v:
        vm = numba.carray(_ptr(addr[b, V_MEAN, li], np.float32), (Hkv, hd))
        for j in range(Hkv):
            for i in range(hd):
                vb[0, j, i] -= vm[j, i]
    store_kv(kd, ks, vd, vs, kb, vb, pos[b], rot_k, rot_v)
    for j in range(H):
        for i in range(hd):
            qr[b, j, i] = qh[b, j, i]
    if rot_k:
        fwht_rows(qr[b, :H])


@njit(inline="always", nogil=True, error_model="numpy")
def _matrix(wtab, li, j):
    # layer li's matrix j from its addresses -> (records (G, nb, rec) u8, row scales (n,) f32 or empty)
    W = numba.carray(_ptr(wtab[li, j, 0], np.uint8), (wtab[li, j, 1], wtab[li, j, 2], wtab[li, j, 3]))
    rs = _NO_SCALE
    if wtab[li, j, 5] > 0:
        rs = numba.carray(_ptr(wtab[li, j, 4], np.float32), (wtab[li, j, 5],))
    return W, rs


def make_step(isa: str, fmt: str, head_fmt: str, emb: tuple, bitnet: bool, relu2: bool, kv: tuple):
    """The step for one instruction set, layer format, head format, embedding decoding (nibbles, zero, has_min,
    code bytes of kernels/q8act.dequantize_rows), architecture (bitnet: sub-norms, ternary per-token scales;
    relu2: squared ReLU instead of SiLU) and K/V cache types (kv = (type_k, type_v))."""
    sources = sources_digest(__file__)  # (a closure variable: part of the cache key, see kernels/sources.py)
    nib, zero, has_min, code_bytes = emb
    KT, VT = KV_DTYPES[kv[0]], KV_DTYPES[kv[1]]
    k_half, v_half = kv[0] == "q4_0", kv[1] == "q4_0"
    k_blocks, v_blocks = kv[0] in ("q8_0", "q4_0"), kv[1] in ("q8_0", "q4_0")
    ternary = fmt == "tq2"  # (closure constants: the branches they decide are pruned at compile time)

    @njit(**_STEP_JIT)
    def step(tokens, pos, emb_W, attn_norm, ffn_norm, wtab, widths, attn_sub, ffn_sub, out_norm, head_W, cos, sin,
             rope_dim, head_dim, eps, scale, addr, cap, flags, x, h, big, att, q, k, v, qbuf, dbuf, sbuf,
             tokscale, logits, nchunk):
        # tokens, pos (B,) int64; wtab (L, 4, 6) int64 the layers' matrices (see QKV above); widths (L, 3) =
        # (H, Hkv, n_ff) per layer; flags = (rot_k, rot_v, center_k, center_v); addr (B, 6, L) int64 cache
        # addresses; cap (B,) int64 the positions each cache allocates (> pos); x, h (B, d), big (B, >= max rows),
        # att (B * max(H*hd, n_ff),), q (B, max H, hd), k, v (B, max Hkv, hd) f32 scratch; qbuf i8, dbuf f32, sbuf i32
        # flat activation scratch; tokscale (B,) f32 -> logits (B, V). Each sequence's cache.n is advanced by the
        # caller.
        if len(sources) == 0:  # never (the digest is 16 characters): it makes `sources` part of the closure
            return
        B = tokens.shape[0]
        L = widths.shape[0]
        d = x.shape[1]
        hd = head_dim
        dequantize_rows(emb_W, nib, zero, has_min, code_bytes, tokens, x)
        rot_k, rot_v, center_k, center_v = flags[0], flags[1], flags[2], flags[3]
        dummy = np.zeros((1, 1), dtype=np.float32)
        qr = np.empty(q.shape, dtype=np.float32)           # the queries as attention takes them (rotated with rot_k)
        split = np.empty((B, 2), dtype=np.int64)           # each sequence's token ranges: (S, L) (split_tokens)
        item0 = np.zeros(B + 1, dtype=np.int64)            # its first work item
        no_need = np.zeros((q.shape[1], hd), dtype=np.bool_)  # (delta attention's arguments, unused)
        no_nzi = np.zeros((1, 1), dtype=np.int64)
        no_nnz = np.zeros(1, dtype=np.int64)
        for li in range(L):
            H, Hkv, n_ff = widths[li, 0], widths[li, 1], widths[li, 2]
            Wqkv, rs_qkv = _matrix(wtab, li, QKV)
            Wo, rs_o = _matrix(wtab, li, WO)
            Wgu, rs_gu = _matrix(wtab, li, GATE_UP)
            Wdown, rs_down = _matrix(wtab, li, DOWN)
            # ---- attention
            ops.rmsnorm(x, attn_norm[li], eps, h)
            nq = (H + 2 * Hkv) * hd
            if ternary:
                qkv = _matmul_t(isa, fmt, Wqkv, h, d, nq, qbuf, dbuf, sbuf, big, nchunk, rs_qkv, tokscale)
            else:
                qkv = _matmul_q(isa, fmt, Wqkv, h, d, nq, qbuf, dbuf, sbuf, big, nchunk)
            a = att[:B * H * hd].reshape(B, H * hd)  # contiguous views of the flat scratch (as the reference's arrays)
            qh = q[:, :H]
            kh = k[:, :Hkv]
            vh = v[:, :Hkv]
            for b in range(B):
                for j in range(H):
                    for i in range(hd):
                        qh[b, j, i] = qkv[b, j * hd + i]
                for j in range(Hkv):
                    for i in range(hd):
                        kh[b, j, i] = qkv[b, (H + j) * hd + i]
                        vh[b, j, i] = qkv[b, (H + Hkv + j) * hd + i]
            ops.rope_inplace(qh, pos, cos, sin, rope_dim)
            ops.rope_inplace(kh, pos, cos, sin, rope_dim)
            # store each sequence's k, v; then attention for all B sequences in one parallel loop whose work items
            # are (sequence, kv head, token range), as attention_decode splits one sequence (same items, same sums)
            G = H // Hkv
            if B > 1:  # (B sequences' stores are B x Hkv x hd scattered writes per K and V: spread on the threads)
                for b in prange(B):
                    _store_one(addr, b, li, Hkv, hd, cap, KT, VT, k_half, v_half, k_blocks, v_blocks, kh, vh, qh, qr,
                               pos, H, center_k, center_v, rot_k, rot_v)
            else:
                _store_one(addr, 0, li, Hkv, hd, cap, KT, VT, k_half, v_half, k_blocks, v_blocks, kh, vh, qh, qr,
                           pos, H, center_k, center_v, rot_k, rot_v)
            for b in range(B):
                S_b, L_b = split_tokens(pos[b] + 1, Hkv)
                split[b, 0], split[b, 1] = S_b, L_b
                item0[b + 1] = item0[b] + Hkv * S_b
            W = item0[B]
            m_part = np.empty((W, G), dtype=np.float32)
            l_part = np.empty((W, G), dtype=np.float32)
            o_part = np.zeros((W, G, hd), dtype=np.float32)
            for w in prange(W):
                bw = 0
                while item0[bw + 1] <= w:
                    bw += 1
                Sw, Lw = split[bw, 0], split[bw, 1]
                r = w - item0[bw]
                j0 = (r % Sw) * Lw
                kdw, ksw, vdw, vsw = _layer_cache(addr, bw, li, Hkv, hd, cap[bw], KT, VT, k_half, v_half,
                                                  k_blocks, v_blocks)
                decode_item(qr[bw, :H], kdw, ksw, vdw, vsw, r // Sw, j0, min(pos[bw] + 1, j0 + Lw), Lw, 0, False,
                            no_need, dummy, no_nzi, dummy, no_nnz, scale, m_part[w], l_part[w], o_part[w])
            for b in range(B):
                ob = a[b].reshape(H, hd)
                w0, w1 = item0[b], item0[b + 1]
                combine(m_part[w0:w1], l_part[w0:w1], o_part[w0:w1], split[b, 0], ob)
                if rot_v:
                    fwht_rows(ob)
                if center_v:
                    vm = numba.carray(_ptr(addr[b, V_MEAN, li], np.float32), (Hkv, hd))
                    for j in range(H):
                        for i in range(hd):
                            ob[j, i] += vm[j // G, i]
            if bitnet:
                ops.rmsnorm(a, attn_sub[li], eps, a)
            if ternary:
                y = _matmul_t(isa, fmt, Wo, a, H * hd, d, qbuf, dbuf, sbuf, big, nchunk, rs_o, tokscale)
            else:
                y = _matmul_q(isa, fmt, Wo, a, H * hd, d, qbuf, dbuf, sbuf, big, nchunk)
            for b in range(B):
                for i in range(d):
                    x[b, i] += y[b, i]
            # ---- feed-forward
            ops.rmsnorm(x, ffn_norm[li], eps, h)
            if ternary:
                gu = _matmul_t(isa, fmt, Wgu, h, d, 2 * n_ff, qbuf, dbuf, sbuf, big, nchunk, rs_gu, tokscale)
            else:
                gu = _matmul_q(isa, fmt, Wgu, h, d, 2 * n_ff, qbuf, dbuf, sbuf, big, nchunk)
            fa = att[:B * n_ff].reshape(B, n_ff)  # (the attention output is no longer needed)
            for b in range(B):
                if relu2:
                    for i in range(n_ff):
                        g = max(gu[b, i], np.float32(0.0))
                        fa[b, i] = g * g * gu[b, n_ff + i]
            if not relu2:
                ops.swiglu(gu[:, :n_ff], gu[:, n_ff:], fa)
            if bitnet:
                ops.rmsnorm(fa, ffn_sub[li], eps, fa)
            if ternary:
                y = _matmul_t(isa, fmt, Wdown, fa, n_ff, d, qbuf, dbuf, sbuf, big, nchunk, rs_down, tokscale)
            else:
                y = _matmul_q(isa, fmt, Wdown, fa, n_ff, d, qbuf, dbuf, sbuf, big, nchunk)
            for b in range(B):
                for i in range(d):
                    x[b, i] += y[b, i]
        ops.rmsnorm(x, out_norm, eps, x)
        V = logits.shape[1]
        _matmul_q(isa, head_fmt, head_W, x, d, V, qbuf, dbuf, sbuf, logits.reshape(-1), nchunk)
        # returns nothing (a cached closure returning an array fails to box it when reloaded: see kernels/igemm.py)

    return step


_STEPS: dict = {}


def step_kernel(isa: str, fmt: str, head_fmt: str, emb: tuple, bitnet: bool, relu2: bool, kv: tuple):
    """The compiled step for this configuration (made once per process, compiled once per machine: cache=True)."""
    key = (isa, fmt, head_fmt, emb, bitnet, relu2, kv)
    s = _STEPS.get(key)
    if s is None:
        s = _STEPS[key] = make_step(*key)
    return s

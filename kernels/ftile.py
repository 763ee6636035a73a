"""f32 register tiles for attention over a dim-major cache (rows of one dimension over tokens, f32 or f16 bits):
small matrix products whose accumulators stay in vector registers for a whole pass, written as LLVM IR for Numba
intrinsics (as kernels/igemm.py's blocks), because LLVM does not keep a tile of sums in registers across a loop of
Numba code (it re-loads and re-stores them from memory every step; kernels/attention.py's axpy_rows_g).

  scores_tile  S[r, j]  = sum_i Q[r, i] * K[i, j]     r < NR, j < NV * VL   (a loop over the D dimensions)
  values_tile  O[r, d] += sum_u P[r, u] * V[d, u]     r < NR, d < ND        (a loop over M keys, M % VL == 0)

VL, the lanes of a vector, is the target's (16 with AVX-512, 8 with AVX / AVX2, 4 on NEON and elsewhere), so that
the tiles' NR * NV (<= 8) and NR * ND (<= 16) accumulators fit the registers. Offsets and strides are in elements;
the caller checks every bound (Numba does not). NumPy references: `scores_ref`, `values_ref`.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import errors, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from .kv_store import as_f32
from .simd import F16, F32, I64, splat, target_features, vec

_JIT = dict(cache=True, fastmath=True, nogil=True, error_model="numpy")


def _lanes(features: set[str]) -> int:
    if "avx512f" in features:
        return 16
    if "avx" in features or "avx2" in features:
        return 8
    return 4


def _target_lanes() -> int:
    from numba.core import config
    if config.CPU_NAME == "generic" and config.CPU_FEATURES is None:
        return 4  # a portable build (as simd.target_isa): the baseline's vectors
    return _lanes(target_features())


VL = _target_lanes()
# tile shapes by the registers there are: 32 vector registers (AVX-512, NEON) or 16 (AVX / AVX2)
QK_NR, QK_NV = 4, 2                              # 8 accumulators, 2 key vectors, a broadcast query value
PV_NR, PV_ND = (4, 4) if VL != 8 else (2, 4)     # 16 (8) accumulators, 4 value rows, NR probability rows


def _elem(t):
    if t == types.float32:
        return F32
    if t == types.uint16:
        return F16
    return None


def _load(builder, data, off, et, n):
    """n elements of type et (F32 or F16 bits) at element offset off -> <n x float>."""
    p = builder.bitcast(builder.gep(data, [off]), vec(et, n).as_pointer())
    v = builder.load(p, align=2 if et is F16 else 4)
    return builder.fpext(v, vec(F32, n)) if et is F16 else v


def _ptr(context, builder, aty, a, et):
    return builder.bitcast(context.make_array(aty)(context, builder, a).data, et.as_pointer())


def _fma(builder, n):
    t = vec(F32, n)
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(t, [t, t, t]), f"llvm.fma.v{n}f32")


def _i64(context, builder, signature, args):
    # the integer arguments (offsets, strides, counts) as i64, the arrays as they are
    return [context.cast(builder, a, t, types.int64) if isinstance(t, types.Integer) else a
            for a, t in zip(args, signature.args)]


def _literal_int(x):
    if not isinstance(x, types.IntegerLiteral):
        raise errors.RequireLiteralValue(x)
    return x.literal_value


@intrinsic
def scores_tile(typingctx, NR, NV, Q, qofs, qstride, K, kofs, kstride, D, S, sofs, sstride):
    """S[sofs + r*sstride + j] = sum_{i < D} Q[qofs + r*qstride + i] * K[kofs + i*kstride + j] for r < NR,
    j < NV * VL (overwritten); Q, S f32, K f32 or f16 bits (uint16)."""
    nr, nv = _literal_int(NR), _literal_int(NV)
    ke = _elem(K.dtype)
    if Q.dtype != types.float32 or S.dtype != types.float32 or ke is None:
        raise errors.TypingError("scores_tile(): Q, S f32 arrays, K f32 or uint16 (f16 bits)")
    sig = types.none(NR, NV, Q, qofs, qstride, K, kofs, kstride, D, S, sofs, sstride)

    def codegen(context, builder, signature, args):
        args = _i64(context, builder, signature, args)
        _, _, q, qo, qs, k, ko, ks, d, s, so, ss = args
        qp = _ptr(context, builder, signature.args[2], q, F32)
        kp = _ptr(context, builder, signature.args[5], k, ke)
        sp = _ptr(context, builder, signature.args[9], s, F32)
        vf = vec(F32, VL)
        fma = _fma(builder, VL)
        accs = [[cgutils.alloca_once_value(builder, ir.Constant(vf, None)) for _ in range(nv)] for _ in range(nr)]
        with cgutils.for_range(builder, d) as loop:
            i = loop.index
            krow = builder.add(ko, builder.mul(i, ks))
            kv = [_load(builder, kp, builder.add(krow, ir.Constant(I64, v * VL)), ke, VL) for v in range(nv)]
            for r in range(nr):
                qv = builder.load(builder.gep(qp, [builder.add(builder.add(qo, builder.mul(ir.Constant(I64, r), qs)),
                                                               i)]))
                qb = splat(builder, qv, VL)
                for v in range(nv):
                    builder.store(builder.call(fma, [qb, kv[v], builder.load(accs[r][v])]), accs[r][v])
        for r in range(nr):
            row = builder.add(so, builder.mul(ir.Constant(I64, r), ss))
            for v in range(nv):
                p = builder.bitcast(builder.gep(sp, [builder.add(row, ir.Constant(I64, v * VL))]), vf.as_pointer())
                builder.store(builder.load(accs[r][v]), p, align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def values_tile(typingctx, NR, ND, P, pofs, pstride, V, vofs, vstride, M, O, oofs, ostride):
    """O[oofs + r*ostride + d] += sum_{u < M} P[pofs + r*pstride + u] * V[vofs + d*vstride + u] for r < NR, d < ND;
    M a multiple of VL; P, O f32, V f32 or f16 bits (uint16)."""
    nr, nd = _literal_int(NR), _literal_int(ND)
    ve = _elem(V.dtype)
    if P.dtype != types.float32 or O.dtype != types.float32 or ve is None:
        raise errors.TypingError("values_tile(): P, O f32 arrays, V f32 or uint16 (f16 bits)")
    sig = types.none(NR, ND, P, pofs, pstride, V, vofs, vstride, M, O, oofs, ostride)

    def codegen(context, builder, signature, args):
        args = _i64(context, builder, signature, args)
        _, _, p, po, ps, v, vo, vs, m, o, oo, os_ = args
        pp = _ptr(context, builder, signature.args[2], p, F32)
        vp = _ptr(context, builder, signature.args[5], v, ve)
        op = _ptr(context, builder, signature.args[9], o, F32)
        vf = vec(F32, VL)
        fma = _fma(builder, VL)
        accs = [[cgutils.alloca_once_value(builder, ir.Constant(vf, None)) for _ in range(nd)] for _ in range(nr)]
        steps = builder.udiv(m, ir.Constant(I64, VL))
        with cgutils.for_range(builder, steps) as loop:
            u = builder.mul(loop.index, ir.Constant(I64, VL))
            vv = [_load(builder, vp, builder.add(builder.add(vo, builder.mul(ir.Constant(I64, dd), vs)), u), ve, VL)
                  for dd in range(nd)]
            for r in range(nr):
                pv = _load(builder, pp, builder.add(builder.add(po, builder.mul(ir.Constant(I64, r), ps)), u), F32, VL)
                for dd in range(nd):
                    builder.store(builder.call(fma, [pv, vv[dd], builder.load(accs[r][dd])]), accs[r][dd])
        red = cgutils.get_or_insert_function(builder.module, ir.FunctionType(F32, [F32, vf]),
                                             f"llvm.vector.reduce.fadd.v{VL}f32")
        for r in range(nr):
            for dd in range(nd):
                ptr = builder.gep(op, [builder.add(builder.add(oo, builder.mul(ir.Constant(I64, r), os_)),
                                                   ir.Constant(I64, dd))])
                tot = builder.call(red, [ir.Constant(F32, -0.0), builder.load(accs[r][dd])], fastmath=("reassoc",))
                builder.store(builder.fadd(builder.load(ptr), tot), ptr)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _vmax(typingctx, X, n):
    """max(X[0 .. n - 1]) of an f32 array for n a multiple of VL (-inf when n is 0), with VL lanes at once (LLVM does
    not vectorize a max over a Numba loop)."""
    if X.dtype != types.float32 or X.ndim != 1:
        raise errors.TypingError("_vmax(): an f32 row (contiguous: the caller checks)")
    sig = types.float32(X, n)

    def codegen(context, builder, signature, args):
        x, m = args[0], context.cast(builder, args[1], signature.args[1], types.int64)
        xp = _ptr(context, builder, signature.args[0], x, F32)
        vf = vec(F32, VL)
        mx = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vf, [vf, vf]), f"llvm.maxnum.v{VL}f32")
        acc = cgutils.alloca_once_value(builder, ir.Constant(vf, [float("-inf")] * VL))
        with cgutils.for_range(builder, builder.udiv(m, ir.Constant(I64, VL))) as loop:
            v = _load(builder, xp, builder.mul(loop.index, ir.Constant(I64, VL)), F32, VL)
            builder.store(builder.call(mx, [builder.load(acc), v]), acc)
        red = cgutils.get_or_insert_function(builder.module, ir.FunctionType(F32, [vf]),
                                             f"llvm.vector.reduce.fmax.v{VL}f32")
        return builder.call(red, [builder.load(acc)], fastmath=("nnan",))

    return sig, codegen


@njit(**_JIT)
def row_max(x, n):
    # max(x[:n]) of an f32 row (-inf when n is 0)
    if n < 0 or n > x.shape[0]:
        raise ValueError("row_max: sizes do not fit")
    nb = n - n % VL if x.strides[0] == 4 else 0  # (a strided row: one at a time)
    m = _vmax(x, nb)
    for j in range(nb, n):
        m = max(m, x[j])
    return m


# ---------------------------------------------------------------- whole passes (every bound checked here)
@njit(**_JIT)
def _scores_block(q, qs, src, off, ks, sc, s0, ss):
    # one block of QK_NV * VL keys for every row of q (row stride qs): tiles of QK_NR rows, then the rest
    nr, D = q.shape
    r = 0
    while r + QK_NR <= nr:
        scores_tile(QK_NR, QK_NV, q, r * qs, qs, src, off, ks, D, sc, r * ss + s0, ss)
        r += QK_NR
    rest = nr - r
    if rest == 3:
        scores_tile(3, QK_NV, q, r * qs, qs, src, off, ks, D, sc, r * ss + s0, ss)
    elif rest == 2:
        scores_tile(2, QK_NV, q, r * qs, qs, src, off, ks, D, sc, r * ss + s0, ss)
    elif rest == 1:
        scores_tile(1, QK_NV, q, r * qs, qs, src, off, ks, D, sc, r * ss + s0, ss)


@njit(**_JIT)
def scores_rows(q, src, off, m, sc, s0):
    # sc[r, s0 + j] = sum_i q[r, i] * src[i, off + j] for every row r of q (nr, D) f32, j < m; src (>= D, >= off + m)
    # f32 or f16 bits; sc (nr, >= s0 + m) f32; rows of each contiguous. Key blocks of QK_NV * VL outer (a block of
    # src stays in L1 for all the rows), the last < QK_NV * VL keys through a zero-padded copy.
    nr, D = q.shape
    if src.shape[0] < D or off < 0 or m < 0 or off + m > src.shape[1] or sc.shape[0] != nr or s0 < 0 \
            or s0 + m > sc.shape[1] or q.strides[1] != 4 or sc.strides[1] != 4 or src.strides[1] != src.itemsize:
        raise ValueError("scores_rows: sizes do not fit")
    qs = q.strides[0] // 4
    ss = sc.strides[0] // 4
    ks = src.strides[0] // src.itemsize
    bk = QK_NV * VL
    mb = m - m % bk
    for j in range(0, mb, bk):
        _scores_block(q, qs, src, off + j, ks, sc, s0 + j, ss)
    t = m - mb
    if t:
        kt = np.zeros((D, bk), dtype=np.float32)
        for i in range(D):
            for j in range(t):
                kt[i, j] = as_f32(src[i, off + mb + j])
        st = np.empty((nr, bk), dtype=np.float32)
        _scores_block(q, qs, kt, 0, bk, st, 0, bk)
        for r in range(nr):
            for j in range(t):
                sc[r, s0 + mb + j] = st[r, j]


@njit(**_JIT)
def _values_pass(p, p0, ps, src, off, vs, mb, out, os):
    # out[r, d] += sum_{u < mb} p[r, p0 + u] * src[d, off + u], mb % VL == 0 (tiles of PV_NR x PV_ND, then the rest)
    nr, D = out.shape
    r = 0
    while r + PV_NR <= nr:
        d = 0
        while d + PV_ND <= D:
            values_tile(PV_NR, PV_ND, p, r * ps + p0, ps, src, off + d * vs, vs, mb, out, r * os + d, os)
            d += PV_ND
        while d < D:
            values_tile(PV_NR, 1, p, r * ps + p0, ps, src, off + d * vs, vs, mb, out, r * os + d, os)
            d += 1
        r += PV_NR
    while r < nr:
        d = 0
        while d + PV_ND <= D:
            values_tile(1, PV_ND, p, r * ps + p0, ps, src, off + d * vs, vs, mb, out, r * os + d, os)
            d += PV_ND
        while d < D:
            values_tile(1, 1, p, r * ps + p0, ps, src, off + d * vs, vs, mb, out, r * os + d, os)
            d += 1
        r += 1


@njit(**_JIT)
def values_rows(p, p0, src, off, m, out):
    # out[r, d] += sum_{u < m} p[r, p0 + u] * src[d, off + u] for every row r of out (nr, D) f32 C-contiguous and
    # p (nr, >= p0 + m) f32 C-contiguous; src (>= D, >= off + m) f32 or f16 bits, rows contiguous. The last < VL
    # keys through zero-padded copies.
    nr, D = out.shape
    if p.shape[0] != nr or p0 < 0 or m < 0 or p0 + m > p.shape[1] or src.shape[0] < D or off < 0 \
            or off + m > src.shape[1] or p.strides[1] != 4 or out.strides[1] != 4 or src.strides[1] != src.itemsize:
        raise ValueError("values_rows: sizes do not fit")
    ps = p.strides[0] // 4
    os = out.strides[0] // 4
    vs = src.strides[0] // src.itemsize
    mb = m - m % VL
    if mb:
        _values_pass(p, p0, ps, src, off, vs, mb, out, os)
    t = m - mb
    if t:
        vt = np.zeros((D, VL), dtype=np.float32)
        pt = np.zeros((nr, VL), dtype=np.float32)
        for d in range(D):
            for u in range(t):
                vt[d, u] = as_f32(src[d, off + mb + u])
        for r in range(nr):
            for u in range(t):
                pt[r, u] = p[r, p0 + mb + u]
        _values_pass(pt, 0, VL, vt, 0, VL, VL, out, os)


def as_f32_ref(a):
    """Cache rows (f32, or f16 bits as uint16) -> their f32 values."""
    return a.view(np.float16).astype(np.float32) if a.dtype == np.uint16 else a


def scores_ref(Q, K):
    """NumPy reference of a whole scores pass: Q (R, D) f32, K (D, N) f32 or f16 bits -> (R, N) float64."""
    return Q.astype(np.float64) @ as_f32_ref(K).astype(np.float64)


def values_ref(P, V):
    """NumPy reference of a whole values pass: P (R, M) f32, V (D, M) f32 or f16 bits -> (R, D) float64."""
    return P.astype(np.float64) @ as_f32_ref(V).astype(np.float64).T

"""Integer mat-vec / mat-mul: weight codes (4-bit, 8-bit, ternary) times int8 activations, summed with the
machine's dot-product instructions (kernels/simd.py), scaled in f32 per block. One kernel serves decode (a few
rows of X) and prefill (tiles of up to TT rows of X that reuse each unpacked weight vector).

Packed weights (repacked once at load, see kernels/q8act.py and kernels/ternary_i2.py): rows in groups of R = 16,
one record of bytes per (group, block of `vpb` values):
  q4_0 (Q4_0)  288 B / 32:  codes[4][16][4], d[16] f16           value = d * (q - 8)
  q4_1 (Q4_1)  320 B / 32:  codes[4][16][4], d[16] f16, m[16] f16  value = d * q + m
               codes[c][l][j] = lo nibble: value 4c + j, hi nibble: value 16 + 4c + j, of row l
  q8_0 (Q8_0)  544 B / 32:  codes[8][16][4] = q + 128 (u8), d[16] f16   value = d * q
  tq2 (TQ1_0, TQ2_0) 1056 B / 256: codes[16][16][4], d[16] f16     value = d * (t - 1), t in {0, 1, 2}
               bits 2s..2s+1 of codes[c][l][j] = t of value 64 s + 4c + j of row l
The 4 bytes [l][0..3] are one 32-bit lane: row l's four codes meet four activation bytes broadcast to all
lanes, so each lane accumulates one row and no horizontal sums are needed.

Activations: XQ (N, cols) int8 within [-127, 127], XD (N, parts) f32 = dx and XS (N, parts) int32 = sx per part of
the row (a part is 32 values for the q formats, 64 for tq2): x = dx * XQ, sx = sum of XQ over the part (for zero
points and minimums). Per row r and part p:  out += d_rp * dx_p * (sum_e code_e * xq_e - zero_p * sx_p)
[+ m_rp * dx_p * sx_p]. Every zero point the kernels subtract is a power of two (a shift of the broadcast sum).
"""
from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils, errors
from numba.extending import intrinsic, overload

from . import simd
from .simd import (F16, F32, I8, I32, I64, abs_max_bits, abs_max_bits_32, bits_f32, const_vec, load_vec, rint_small,
                   round_to_half, splat, vec)
from .sources import sources_digest

R = 16  # rows per group
QK8 = 32  # values per activation block of the q formats
# the integer kernels' compile options (also kernels/q8act.py, ternary_i2.py): error_model numpy, so a 0 or NaN
# divisor gives inf/NaN, no exception
JIT = dict(cache=True, nogil=True, error_model="numpy")
TT = 16  # rows of X per tile in a mat-mul (each unpacked weight vector is used TT times)


def aligned_empty(shape, dtype=np.uint8, align: int = 64) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on an `align`-byte boundary (whole-vector loads)."""
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    buf = np.empty(n + align, dtype=np.uint8)
    o = (-buf.ctypes.data) % align
    return buf[o:o + n].view(dtype).reshape(shape)


class Fmt:
    """A packed weight format: how a record's bytes become (codes, activation offset) units, per part."""

    def __init__(self, name, vpb, parts, code_bytes, has_min, token_dx=False):
        self.name, self.vpb, self.code_bytes, self.has_min = name, vpb, code_bytes, has_min
        self.token_dx = token_dx  # activations scaled per token (applied to the output): XD is not read
        self.parts = parts  # [(zero point, f32 factor, umax, [(chunk, mask or None, shift, x offset)])]
        self.ppb = len(parts)
        self.rec = code_bytes + 2 * R * (2 if has_min else 1)


def _q4_units():
    return [u for c in range(4) for u in ((c, 0x0F, 0, 4 * c), (c, 0x0F, 4, 16 + 4 * c))]


FORMATS = {
    "q4_0": Fmt("q4_0", 32, [(8, 1.0, 15, _q4_units())], 256, False),
    "q4_1": Fmt("q4_1", 32, [(0, 1.0, 15, _q4_units())], 256, True),
    "q8_0": Fmt("q8_0", 32, [(128, 1.0, 255, [(c, None, 0, 4 * c) for c in range(8)])], 512, False),
    # part s: the codes masked in place (4^s * t), so one AND per vector; the factor 4^-s is exact
    # (BitNet's activations have one scale per token: the kernel leaves it to the output scaling)
    "tq2": Fmt("tq2", 256, [(4 ** s, 4.0 ** -s, 2 * 4 ** s, [(c, 3 << (2 * s), 0, 64 * s + 4 * c) for c in range(16)])
                            for s in range(4)], 1024, False, token_dx=True),
}


def _gen_block(isa: simd.Isa, fmt: Fmt, builder, wp, wofs, xp, xofs, xstride, dp_, sp, mp_, fofs, fstride, nt, ap,
               aofs):
    """IR: for every row sub-vector h and part, unpack the codes once, then loop over the nt rows of X; nt == 1
    (decode) has its own body without that loop. With the loop each part loads the record's code vectors again
    (tq2: 64 vector loads per record rather than 16, beside the 64 activation broadcasts; the loop's stores to
    the accumulator keep LLVM from merging them) and loads and stores the accumulator once per part; in one
    basic block each vector is loaded once and masked where it is used. Hot, one thread, 1,024 x 2,560: q4_0
    33-46 -> 28 us, q8_0 44-54 -> 38-49; tq2, 13,824 x 2,560 on two threads: 315 -> 131-215 us hot, 450-486 ->
    267-324 us cold (30 GB/s). The same operations in the same order: both bodies give bit-identical sums
    (tests/test_igemm.py)."""
    V = isa.V
    vf = vec(F32, V)
    fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vf, [vf, vf, vf]), f"llvm.fma.v{V}f32")
    rec = builder.gep(wp, [wofs])
    with builder.if_else(builder.icmp_signed("==", nt, ir.Constant(nt.type, 1))) as (one, many):
        with one:
            xrow = builder.gep(xp, [xofs])
            for h in range(R // V):
                d, m = _scales(fmt, builder, rec, h, V)
                aptr = builder.bitcast(builder.gep(ap, [builder.add(aofs, ir.Constant(I64, h * V))]), vf.as_pointer())
                av = builder.load(aptr, align=4)
                raws = {}
                for pi, part in enumerate(fmt.parts):
                    prepped = _unpack(isa, builder, rec, h, part, raws)
                    av = _add_part(isa, fmt, builder, fma, prepped, part, pi, d, m, xrow, fofs, dp_, sp, mp_, av)
                builder.store(av, aptr, align=4)
        with many:
            for h in range(R // V):
                d, m = _scales(fmt, builder, rec, h, V)
                for pi, part in enumerate(fmt.parts):
                    prepped = _unpack(isa, builder, rec, h, part, {})
                    with cgutils.for_range(builder, nt) as loop:
                        t = loop.index
                        xrow = builder.gep(xp, [builder.add(xofs, builder.mul(t, xstride))])
                        aptr = builder.bitcast(builder.gep(ap, [builder.add(aofs, builder.add(
                            builder.mul(t, ir.Constant(I64, R)), ir.Constant(I64, h * V)))]), vf.as_pointer())
                        av = builder.load(aptr, align=4)
                        av = _add_part(isa, fmt, builder, fma, prepped, part, pi, d, m, xrow,
                                       builder.add(fofs, builder.mul(t, fstride)), dp_, sp, mp_, av)
                        builder.store(av, aptr, align=4)


def _scales(fmt: Fmt, builder, rec, h, V):
    """IR: the record's scales (and minimums) of rows h*V .. h*V + V - 1 as f32 vectors."""
    vf = vec(F32, V)
    d = builder.fpext(load_vec(builder, rec, ir.Constant(I64, fmt.code_bytes + 2 * h * V), vec(F16, V)), vf)
    m = None
    if fmt.has_min:
        m = builder.fpext(load_vec(builder, rec, ir.Constant(I64, fmt.code_bytes + 2 * R + 2 * h * V),
                                   vec(F16, V)), vf)
    return d, m


def _unpack(isa: simd.Isa, builder, rec, h, part, raws):
    """IR: a part's codes of rows h*V .. as the dot's operands, with their activation offsets (code vectors
    loaded once into `raws`)."""
    n8 = 4 * isa.V
    _, _, umax, units = part
    prepped = []
    for c, mask, shift, xoff in units:
        if c not in raws:
            raws[c] = load_vec(builder, rec, ir.Constant(I64, c * 4 * R + h * n8), vec(I8, n8))
        a = raws[c]
        if shift:
            a = builder.lshr(a, const_vec(I8, n8, shift))
        if mask is not None:
            a = builder.and_(a, const_vec(I8, n8, mask))
        prepped.append((isa.prep(builder, a, umax), xoff))
    return prepped


def _add_part(isa: simd.Isa, fmt: Fmt, builder, fma, prepped, part, pi, d, m, xrow, fofs, dp_, sp, mp_, av):
    """IR: av + one part's contribution for the row of X at xrow (its dx, sx, dx * sx at fofs + pi)."""
    V = isa.V
    vf = vec(F32, V)
    zero, factor, umax, _ = part
    pairs = []
    for a, xoff in prepped:
        xb = builder.load(builder.bitcast(builder.gep(xrow, [ir.Constant(I64, xoff)]), I32.as_pointer()), align=1)
        pairs.append((a, builder.bitcast(splat(builder, xb, V), vec(I8, 4 * V))))
    fi = builder.add(fofs, ir.Constant(I64, pi))
    sx = builder.load(builder.gep(sp, [fi]))
    acc0 = ir.Constant(vec(I32, V), None)
    corr = zero - isa.z_done(umax)  # 0 or +- a power of two (tq2's last part on sdot: 64 - 128)
    assert abs(corr) & (abs(corr) - 1) == 0
    if corr:  # the dot products start from -corr * sx
        v = builder.sub(ir.Constant(I32, 0), sx) if corr > 0 else sx
        acc0 = builder.shl(splat(builder, v, V), const_vec(I32, V, abs(corr).bit_length() - 1))
    acc = isa.dot(builder, acc0, pairs, umax)
    dp = d if factor == 1.0 else builder.fmul(d, const_vec(F32, V, factor))
    if fmt.token_dx:
        av = builder.call(fma, [builder.sitofp(acc, vf), dp, av])
    else:
        dx = builder.load(builder.gep(dp_, [fi]))
        av = builder.call(fma, [builder.sitofp(acc, vf), builder.fmul(dp, splat(builder, dx, V)), av])
    if m is not None:  # ggml's Q8_1 keeps s = d * sum q as f16 too: XM, made once per call (_gemm)
        av = builder.call(fma, [m, splat(builder, builder.load(builder.gep(mp_, [fi])), V), av])
    return av


@intrinsic
def block(typingctx, isa, fmt, W, wofs, XQ, xofs, xstride, XD, XS, XM, fofs, fstride, nt, ACC, aofs):
    """ACC[aofs + t*R + l] += the contribution of the record at W + wofs to rows l < R, for X rows t < nt (XQ rows
    at xofs + t*xstride, their dx, sx, and for formats with a minimum dx * sx rounded to f16, at XD, XS, XM + fofs +
    t*fstride + part). Offsets are in elements; the caller checks every bound."""
    for lit in (isa, fmt):
        if not isinstance(lit, types.StringLiteral):
            raise errors.RequireLiteralValue(lit)
    if isa.literal_value not in simd.ISAS or fmt.literal_value not in FORMATS:
        raise errors.TypingError(f"unknown instruction set / format {isa.literal_value}, {fmt.literal_value}")
    if W.dtype != types.uint8 or XQ.dtype != types.int8 or XD.dtype != types.float32 or XS.dtype != types.int32 \
            or XM.dtype != types.float32 or ACC.dtype != types.float32:
        raise errors.TypingError("block(): W u8, XQ i8, XD f32, XS i32, XM f32, ACC f32 arrays")
    sig = types.none(isa, fmt, W, wofs, XQ, xofs, xstride, XD, XS, XM, fofs, fstride, nt, ACC, aofs)
    the_isa, the_fmt = simd.Isa(isa.literal_value), FORMATS[fmt.literal_value]

    def codegen(context, builder, signature, args):
        _, _, w, wo, x, xo, xs, xd, xsum, xm, fo, fs, n, a, ao = args
        arr = [context.make_array(signature.args[i])(context, builder, v)
               for i, v in ((2, w), (4, x), (7, xd), (8, xsum), (9, xm), (13, a))]
        wp = builder.bitcast(arr[0].data, I8.as_pointer())
        xp = builder.bitcast(arr[1].data, I8.as_pointer())
        _gen_block(the_isa, the_fmt, builder, wp, wo, xp, xo, xs, arr[2].data, arr[3].data, arr[4].data, fo, fs, n,
                   arr[5].data, ao)
        return context.get_dummy_value()

    return sig, codegen


def _has_min(fmt):
    raise NotImplementedError("only callable from jitted code")


@overload(_has_min, inline="always")
def _has_min_ov(fmt):
    if not isinstance(fmt, types.StringLiteral) or fmt.literal_value not in FORMATS:
        raise errors.TypingError("_has_min(): a format name literal")
    v = FORMATS[fmt.literal_value].has_min
    return lambda fmt: v


@njit(inline="always", nogil=True, error_model="numpy")
def _min_factors(fmt, XD, XS):
    # for a format with a minimum (q4_1): XM (N, parts) = dx * sx rounded to f16 (ggml's Q8_1 keeps s = d * sum q
    # so), once per mat-mul rather than in every row group's block; otherwise an empty array (never read)
    if not _has_min(fmt):
        return np.empty((0, 0), dtype=np.float32)
    XM = np.empty(XD.shape, dtype=np.float32)
    for t in range(XD.shape[0]):
        for p in range(XD.shape[1]):
            XM[t, p] = round_to_half(XD[t, p] * np.float32(XS[t, p]))
    return XM


@njit(inline="always", nogil=True, error_model="numpy")
def _gemm(isa, fmt, W, XQ, XD, XS, out, nchunk, rowscale, tokscale):
    # W (G, nb, rec) u8, XQ (N, cols) i8, XD (N, parts) f32, XS (N, parts) i32 -> out (N, rows) f32 = X @ W.T;
    # row groups split into nchunk parallel chunks, rows of X in tiles of TT; isa, fmt: string literals.
    # rowscale (rows,), tokscale (N,) f32, unless empty: out[t, r] *= rowscale[r] / tokscale[t]
    G, nb, rec = W.shape
    N, cols = XQ.shape
    nparts = XD.shape[1]
    rows = out.shape[1]
    vpb = cols // nb
    ppb = nparts // nb
    nchunk = max(1, min(G, nchunk))
    XM = _min_factors(fmt, XD, XS)
    for c in prange(nchunk):
        acc = np.empty(TT * R, dtype=np.float32)
        for g in range(c * G // nchunk, (c + 1) * G // nchunk):
            for t0 in range(0, N, TT):
                nt = min(TT, N - t0)
                acc[:nt * R] = 0.0
                for k in range(nb):
                    block(isa, fmt, W, (g * nb + k) * rec, XQ, t0 * cols + k * vpb, cols,
                          XD, XS, XM, t0 * nparts + k * ppb, nparts, nt, acc, 0)
                for t in range(nt):
                    for l in range(min(R, rows - g * R)):
                        if rowscale.shape[0] > 0:
                            out[t0 + t, g * R + l] = acc[t * R + l] * (rowscale[g * R + l] / tokscale[t0 + t])
                        else:
                            out[t0 + t, g * R + l] = acc[t * R + l]
    return out


def _make_igemm(isa: str, fmt: str):
    # the kernels with the instruction set and format as constants (closure strings are typed as literals: one
    # compiled, cached function per pair, no dispatch on strings at call time): igemm takes quantized
    # activations, igemm_x quantizes f32 activations to Q8 blocks first (one call from Python instead of two)
    sources = sources_digest(__file__)  # (a closure variable: part of the cache key, see kernels/sources.py)

    @njit(parallel=True, **JIT)
    def igemm(W, XQ, XD, XS, out, nchunk):
        if len(sources) == 0:  # never (the digest is 16 characters): it makes `sources` part of the closure
            return
        _gemm(isa, fmt, W, XQ, XD, XS, out, nchunk, _NO_SCALE, _NO_SCALE)  # returns nothing: see below

    @njit(parallel=True, **JIT)
    def igemm_x(W, X, XQ, XD, XS, out, nchunk):
        # X (N, cols) f32 quantized into XQ, XD, XS (Q8 blocks of 32), then as igemm
        if len(sources) == 0:
            return
        if X.shape[0] > TT:
            for t in prange(X.shape[0]):
                quantize_q8_row(X, XQ, XD, XS, t)
        else:
            for t in range(X.shape[0]):
                quantize_q8_row(X, XQ, XD, XS, t)
        _gemm(isa, fmt, W, XQ, XD, XS, out, nchunk, _NO_SCALE, _NO_SCALE)

    @njit(parallel=True, **JIT)
    def igemm_t(W, X, XQ, XD, XS, tokscale, rowscale, out, nchunk):
        # X (N, cols) f32 quantized per token (BitNet's absmax) into XQ, XD, XS, tokscale, then as igemm with
        # out[t, r] *= rowscale[r] / tokscale[t] (the ternary formats)
        if len(sources) == 0:
            return
        if X.shape[0] > TT:
            for t in prange(X.shape[0]):
                quantize_absmax_row(X, XQ, XD, XS, tokscale, t)
        else:
            for t in range(X.shape[0]):
                quantize_absmax_row(X, XQ, XD, XS, tokscale, t)
        _gemm(isa, fmt, W, XQ, XD, XS, out, nchunk, rowscale, tokscale)

    # (the closures share one qualified name: a cached one that returned an array failed to box it when
    # reloaded in another process, 'descr' is NULL; they fill `out` and return None)
    return igemm, igemm_x, igemm_t


_NO_SCALE = np.zeros(0, dtype=np.float32)


@njit(inline="always", **JIT)
def quantize_q8_row(x, xq, xd, xs, t):
    # row t of x (N, nb*32) f32 -> xq[t] i8, xd[t] (nb,) = d, xs[t] (nb,) = sum q per block of 32, as llama.cpp's
    # Q8_0/Q8_1 activations:
    # q = rint(x * (127 / max|x|)) within [-127, 127], d = max|x| / 127 rounded to f16 (ggml's block_q8_0 / q8_1
    # keep it so); an all-zero block gives d = 0, q = 0; a block holding NaN or inf gives d = NaN, q = 0 (so every
    # output it touches is NaN, as in a float product, rather than a finite number made of garbage codes)
    n = x.shape[1]
    for k in range(n // QK8):
        mb = abs_max_bits_32(x, t, k * QK8)
        if mb >= np.int32(0x7F800000):  # inf or NaN
            for i in range(QK8):
                xq[t, k * QK8 + i] = 0
            xd[t, k] = np.float32(np.nan)
            xs[t, k] = 0
            continue
        amax = bits_f32(mb)
        iv = np.float32(127.0) / amax if amax > 0 else np.float32(0.0)
        s = 0
        for i in range(QK8):
            q = np.int32(rint_small(x[t, k * QK8 + i] * iv))
            xq[t, k * QK8 + i] = q
            s += q
        xd[t, k] = round_to_half(amax / np.float32(127.0))  # ggml keeps d as f16
        xs[t, k] = s


PART_T = 64  # values per activation sum of the ternary format


@njit(inline="always", **JIT)
def quantize_absmax_row(x, xq, xd, xs, scales, t):
    # row t of x (N, n) f32 -> xq[t] i8, xd[t] = 1, xs[t] i32 sums per 64, scales[t]: BitNet b1.58's per-token absmax,
    # s = 127 / max(max|x|, 1e-5), q = clamp(rint(x * s)) within [-127, 127]; a row holding NaN or inf gives
    # s = NaN, q = 0 (every output of the token is NaN)
    n = x.shape[1]
    mb = abs_max_bits(x, t, 0, n)
    finite = mb < np.int32(0x7F800000)  # no inf or NaN
    m = max(np.float32(1e-5), bits_f32(mb))
    s = np.float32(127.0) / m if finite else np.float32(np.nan)
    scales[t] = s
    if not finite:
        for p in range(n // PART_T):
            for i in range(p * PART_T, (p + 1) * PART_T):
                xq[t, i] = 0
            xd[t, p] = 1.0
            xs[t, p] = 0
        return
    for p in range(n // PART_T):
        acc = 0
        for i in range(p * PART_T, (p + 1) * PART_T):
            q = np.int32(min(max(rint_small(x[t, i] * s), np.float32(-127.0)), np.float32(127.0)))
            xq[t, i] = q
            acc += q
        xd[t, p] = 1.0
        xs[t, p] = acc


_KERNELS: dict = {}


def kernel(isa: str, fmt: str):
    """The compiled mat-mul for an instruction set and a format: kernel(W, XQ, XD, XS, out, nchunk)."""
    if isa not in simd.ISAS or fmt not in FORMATS:
        raise ValueError(f"no integer kernel for instruction set {isa!r} and format {fmt!r}")
    k = _KERNELS.get((isa, fmt))
    if k is None:
        k = _KERNELS[(isa, fmt)] = _make_igemm(isa, fmt)
    return k[0]


def kernel_x(isa: str, fmt: str):
    """The same with f32 activations quantized inside (Q8 blocks): kernel_x(W, X, XQ, XD, XS, out, nchunk)."""
    kernel(isa, fmt)
    return _KERNELS[(isa, fmt)][1]


def kernel_t(isa: str, fmt: str):
    """The same with f32 activations quantized per token (BitNet) and the output scaled:
    kernel_t(W, X, XQ, XD, XS, tokscale, rowscale, out, nchunk)."""
    kernel(isa, fmt)
    return _KERNELS[(isa, fmt)][2]


def check(fmt: str, W: np.ndarray, XQ: np.ndarray, XD: np.ndarray, XS: np.ndarray, out: np.ndarray) -> None:
    """Every size the kernel relies on (it does no bounds checking)."""
    f = FORMATS[fmt]
    if W.dtype != np.uint8 or W.ndim != 3 or W.shape[2] != f.rec or not W.flags.c_contiguous:
        raise ValueError(f"{fmt} weights must be (G, nb, {f.rec}) contiguous uint8, got {W.shape} {W.dtype}")
    G, nb, _ = W.shape
    N = XQ.shape[0]
    if XQ.dtype != np.int8 or XQ.shape != (N, nb * f.vpb) or not XQ.flags.c_contiguous:
        raise ValueError(f"activations must be ({N}, {nb * f.vpb}) contiguous int8, got {XQ.shape} {XQ.dtype}")
    for a, dt in ((XD, np.float32), (XS, np.int32)):
        if a.dtype != dt or a.shape != (N, nb * f.ppb) or not a.flags.c_contiguous:
            raise ValueError(f"activation scales / sums must be ({N}, {nb * f.ppb}) contiguous {np.dtype(dt).name}, "
                             f"got {a.shape} {a.dtype}")
    if out.dtype != np.float32 or out.ndim != 2 or out.shape[0] != N or not 0 < out.shape[1] <= G * R \
            or out.strides[1] != 4:
        raise ValueError(f"output must be ({N}, rows <= {G * R}) f32 with unit stride, got {out.shape} {out.dtype}")


def matmul(isa: str, fmt: str, W, XQ, XD, XS, out):
    """out (N, rows) = X @ W.T with X given as (XQ, XD, XS); checked, then the compiled kernel for `isa`."""
    check(fmt, W, XQ, XD, XS, out)
    kernel(isa, fmt)(W, XQ, XD, XS, out, 4 * numba.get_num_threads())
    return out


def matmul_x(isa: str, fmt: str, W, X, out):
    """out (N, rows) = X @ W.T for f32 X (N, cols), quantized to Q8 blocks of 32 inside the same call (q formats)."""
    N, cols = X.shape
    if fmt == "tq2" or X.dtype != np.float32 or not X.flags.c_contiguous:
        raise ValueError(f"matmul_x takes contiguous f32 activations and a q format, got {X.dtype} for {fmt}")
    XQ = np.empty((N, cols), dtype=np.int8)
    XD = np.empty((N, cols // QK8), dtype=np.float32)
    XS = np.empty((N, cols // QK8), dtype=np.int32)
    check(fmt, W, XQ, XD, XS, out)
    kernel_x(isa, fmt)(W, X, XQ, XD, XS, out, 4 * numba.get_num_threads())
    return out


def matmul_t(isa: str, fmt: str, W, X, rowscale, out):
    """out (N, rows) = (q(X) @ W.T) * rowscale / s for f32 X (N, cols) quantized per token inside the same call,
    q(x) = clamp(rint(x * s)), s = 127 / max|x| (BitNet b1.58); the ternary format."""
    N, cols = X.shape
    if not FORMATS[fmt].token_dx or X.dtype != np.float32 or not X.flags.c_contiguous:
        raise ValueError(f"matmul_t takes contiguous f32 activations and a per-token format, got {X.dtype} for {fmt}")
    if rowscale.dtype != np.float32 or rowscale.shape != (out.shape[1],) or not rowscale.flags.c_contiguous:
        raise ValueError(f"row scales must be ({out.shape[1]},) f32, got {rowscale.shape} {rowscale.dtype}")
    XQ = np.empty((N, cols), dtype=np.int8)
    XD = np.empty((N, cols // PART_T), dtype=np.float32)
    XS = np.empty((N, cols // PART_T), dtype=np.int32)
    check(fmt, W, XQ, XD, XS, out)
    kernel_t(isa, fmt)(W, X, XQ, XD, XS, np.empty(N, dtype=np.float32), rowscale, out, 4 * numba.get_num_threads())
    return out


# ---------------------------------------------------------------- NumPy reference (exact integer sums)
def unpack_ref(fmt: str, W: np.ndarray, rows: int):
    """Packed records -> codes (rows, cols) int64, d (rows, nb) f32, m (rows, nb) f32 or None, the per-part zero
    points (ppb,) and the part of each column, from the layout in this module's docstring."""
    f = FORMATS[fmt]
    G, nb, _ = W.shape
    cb = W[..., :f.code_bytes].reshape(G, nb, f.code_bytes // (4 * R), R, 4).astype(np.int64)  # (G, nb, c, l, j)
    d = W[..., f.code_bytes:f.code_bytes + 2 * R].copy().view(np.float16).astype(np.float32)  # (G, nb, R)
    m = W[..., f.code_bytes + 2 * R:f.code_bytes + 4 * R].copy().view(np.float16).astype(np.float32) \
        if f.has_min else None
    codes = np.zeros((G, nb, R, f.vpb), dtype=np.int64)
    for zero, factor, umax, units in f.parts:
        for c, mask, shift, xoff in units:
            v = cb[:, :, c] >> shift
            if mask is not None:
                v = v & mask
            if factor != 1.0:
                v = v // int(round(1 / factor))
            codes[:, :, :, xoff:xoff + 4] = v
    codes = codes.transpose(0, 2, 1, 3).reshape(G * R, nb * f.vpb)[:rows]
    d = d.transpose(0, 2, 1).reshape(G * R, nb)[:rows]
    m = None if m is None else m.transpose(0, 2, 1).reshape(G * R, nb)[:rows]
    zeros = {"q4_0": 8, "q4_1": 0, "q8_0": 128, "tq2": 1}[fmt]
    return codes, d, m, zeros


def matmul_ref(fmt: str, W: np.ndarray, rows: int, XQ: np.ndarray, XD: np.ndarray, XS: np.ndarray) -> np.ndarray:
    """float64 out (N, rows): per block the exact integer sum of (code - zero) * xq, times d * dx (+ m * dx * sx)."""
    f = FORMATS[fmt]
    codes, d, m, zero = unpack_ref(fmt, W, rows)
    N, cols = XQ.shape
    nb = cols // f.vpb
    psz = f.vpb // f.ppb  # values per part
    q = (codes - zero).reshape(rows, nb * f.ppb, psz)
    x = XQ.astype(np.int64).reshape(N, nb * f.ppb, psz)
    isum = np.einsum("rpv,npv->nrp", q, x)  # exact integers (N, rows, parts)
    dx = np.ones(XD.shape) if f.token_dx else XD.astype(np.float64)  # (N, parts)
    dd = np.repeat(d.astype(np.float64), f.ppb, axis=1)  # (rows, parts)
    out = np.einsum("nrp,rp,np->nr", isum.astype(np.float64), dd, dx)
    if m is not None:
        s16 = (XD * x.sum(-1).astype(np.float32)).astype(np.float16).astype(np.float64)  # f16, as ggml's Q8_1 s
        out += np.einsum("rp,np->nr", np.repeat(m.astype(np.float64), f.ppb, axis=1), s16)
    return out

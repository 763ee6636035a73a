"""Integer dot-product instructions per instruction set, written as LLVM IR for Numba intrinsics, and the choice
of instruction set from the CPU Numba compiles for.

The one primitive the integer kernels need: acc (V x i32) + for every lane l, sum over m < 4 of a[4l+m] * b[4l+m],
a unsigned bytes (weight codes), b signed bytes (activations, always within [-127, 127]). Each instruction set
computes it its own way:
  avx512vnni  vpdpbusd zmm (16 lanes)         avx512bw  vpmaddubsw + vpmaddwd zmm (16 lanes)
  avxvnni     vpdpbusd ymm (8 lanes)          avx2      vpmaddubsw + vpmaddwd ymm (8 lanes)
  neon_dot    sdot (ARMv8.2 dotprod, 4 lanes) generic   widen, multiply, add groups of 4 (any LLVM target)
vpmaddubsw sums pairs into int16 with saturation and sdot multiplies signed bytes, so when codes may exceed what
they take exactly (pairs <= 32767; sdot: a < 128), the codes are shifted by -128 first (a ^ 0x80, signed) and the
kernel is told so (`z_done` = 128): it then corrects with 128 * sum(b) instead of the code's zero point.
Every variant gives the same integers; the tests run each one the machine can run against a NumPy reference.
"""
from __future__ import annotations

import platform

import llvmlite.binding as llb
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

ISAS = ("avx512vnni", "avxvnni", "avx512bw", "avx2", "neon_dot", "generic")
LANES = {"avx512vnni": 16, "avxvnni": 8, "avx512bw": 16, "avx2": 8, "neon_dot": 4, "generic": 16}
# what each instruction set needs from the CPU (LLVM feature names), in order of preference
REQUIRES = {"avx512vnni": ("avx512f", "avx512bw", "avx512vnni"), "avxvnni": ("avx2", "avxvnni"),
            "avx512bw": ("avx512f", "avx512bw"), "avx2": ("avx2",), "neon_dot": ("neon", "dotprod"),
            "generic": ()}
_X86 = ("avx512vnni", "avxvnni", "avx512bw", "avx2")

I8, I16, I32, I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
F32, F16 = ir.FloatType(), ir.HalfType()
_VNNI_I8_OPERANDS = llb.llvm_version_info[0] >= 21  # LLVM 21 retyped the VNNI intrinsics' byte operands
DOT_CHAINS = 4  # independent accumulators of a run of dot products (Isa.dot): Q8_0 head at 8 rows -10% time


def vec(t, n):
    return ir.VectorType(t, n)


def parse_features(features: str | dict) -> set[str]:
    """LLVM's feature string ("+avx2,-avx512f,...") or dict -> the set of enabled feature names."""
    if isinstance(features, dict):
        return {k for k, v in features.items() if v}
    return {f[1:] for f in features.split(",") if f.startswith("+")}


def choose_isa(arch: str, features: set[str]) -> str | None:
    """The best integer dot-product instruction set for a CPU (arch: platform.machine()), or None when it has none
    worth using (the kernels then keep f32 activations). `generic` is never chosen: it exists for tests and
    for machines where it is asked for explicitly."""
    arch = arch.lower()
    if arch in ("x86_64", "amd64", "i686", "i386", "x86"):
        names = _X86
    elif arch in ("aarch64", "arm64", "armv8l"):
        names = ("neon_dot",)
        features = features | {"neon"} if arch in ("aarch64", "arm64") else features  # NEON is baseline there
    else:
        return None
    for name in names:
        if all(f in features for f in REQUIRES[name]):
            return name
    return None


def target_features() -> set[str]:
    """The features Numba compiles for (NUMBA_CPU_FEATURES when set, else the host's), as LLVM names them."""
    from numba.core import config
    if config.CPU_FEATURES is not None:
        return parse_features(config.CPU_FEATURES)
    try:
        return parse_features(llb.get_host_cpu_features().flatten())
    except RuntimeError:  # LLVM cannot tell on this host
        return set()


def target_isa() -> str | None:
    """The instruction set the integer kernels use on this machine (None: keep f32 activations)."""
    from numba.core import config
    if config.CPU_NAME == "generic" and config.CPU_FEATURES is None:
        return None  # a portable build (NUMBA_CPU_NAME=generic): no instruction beyond the baseline
    return choose_isa(platform.machine(), target_features())


def runnable_isas() -> list[str]:
    """Every instruction set this machine can run (not only its best one), generic included: what the tests run."""
    feats, arch = target_features(), platform.machine().lower()
    if arch in ("x86_64", "amd64"):
        names = _X86
    elif arch in ("aarch64", "arm64"):
        names, feats = ("neon_dot",), feats | {"neon"}
    else:
        names = ()
    if {"avx512vnni", "avx512vl"} <= feats:
        feats = feats | {"avxvnni"}  # the 256-bit vpdpbusd runs there too (EVEX-encoded)
    return [n for n in names if all(f in feats for f in REQUIRES[n])] + ["generic"]


# ---------------------------------------------------------------- IR building blocks
def const_vec(t, n, v):
    return ir.Constant(vec(t, n), [v] * n)


def splat(builder, x, n):
    """A scalar -> a vector of n copies."""
    t = vec(x.type, n)
    v = builder.insert_element(ir.Constant(t, ir.Undefined), x, ir.Constant(I32, 0))
    return builder.shuffle_vector(v, ir.Constant(t, ir.Undefined), ir.Constant(vec(I32, n), [0] * n))


def load_vec(builder, ptr, off, t):
    """Load a vector of type t from the byte pointer `ptr` + off (i64), unaligned."""
    p = builder.gep(ptr, [off]) if off is not None else ptr
    return builder.load(builder.bitcast(p, t.as_pointer()), align=1)


def _call(builder, name, ret, args):
    f = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, [a.type for a in args]), name)
    return builder.call(f, args)


class Isa:
    """Code generation of the primitive for one instruction set (V = lanes of i32 per vector)."""

    def __init__(self, name: str):
        if name not in ISAS:
            raise ValueError(f"unknown instruction set {name!r} (known: {', '.join(ISAS)})")
        self.name, self.V = name, LANES[name]
        self.kind = {"avx512vnni": "vnni", "avxvnni": "vnni", "avx512bw": "maddubs", "avx2": "maddubs",
                     "neon_dot": "sdot", "generic": "generic"}[name]

    def z_done(self, umax: int) -> int:
        """The zero point the primitive subtracts from codes of at most `umax` (0 or 128)."""
        if self.kind == "maddubs":
            return 0 if umax <= 129 else 128  # pairs 2 * 129 * 127 < 2^15
        if self.kind == "sdot":
            return 0 if umax <= 127 else 128
        return 0

    def prep(self, builder, a, umax):
        """Codes a (<4V x i8>, unsigned, <= umax) -> the operand(s) the dot takes (hoisted out of token loops)."""
        if self.z_done(umax) == 0:
            return (a,)
        s = builder.xor(a, const_vec(I8, 4 * self.V, 0x80))  # a - 128 as signed bytes
        if self.kind == "sdot":
            return (s,)
        absv = _call(builder, f"llvm.abs.v{4 * self.V}i8", s.type, [s, ir.Constant(ir.IntType(1), 0)])
        neg = builder.icmp_signed("<", s, ir.Constant(s.type, None))
        return (absv, neg)

    def dot(self, builder, acc, pairs, umax):
        """acc (<V x i32>) + the 4-groups of a * b summed, over pairs [(prep(a), b <4V x i8>)]; exact for codes
        <= umax and b within [-127, 127]."""
        V = self.V
        n8 = 4 * V
        if self.kind in ("vnni", "sdot"):
            # DOT_CHAINS independent accumulators, added at the end (exact: integers): one chain of dependent
            # dot products waits out each one's latency, which bounds a mat-mul over several rows of activations
            accs = [acc] + [ir.Constant(acc.type, None)] * (min(DOT_CHAINS, len(pairs)) - 1)
            for i, (a, b) in enumerate(pairs):
                c = i % len(accs)
                if self.kind == "sdot":
                    accs[c] = _call(builder, "llvm.aarch64.neon.sdot.v4i32.v16i8", acc.type, [accs[c], a[0], b])
                    continue
                name = "llvm.x86.avx512.vpdpbusd.512" if V == 16 else "llvm.x86.avx512.vpdpbusd.256"
                aa, bb = a[0], b
                if not _VNNI_I8_OPERANDS:
                    aa, bb = builder.bitcast(aa, vec(I32, V)), builder.bitcast(bb, vec(I32, V))
                accs[c] = _call(builder, name, acc.type, [accs[c], aa, bb])
            while len(accs) > 1:  # a tree of adds
                accs = [builder.add(accs[i], accs[i + 1]) if i + 1 < len(accs) else accs[i]
                        for i in range(0, len(accs), 2)]
            return accs[0]
        if self.kind == "maddubs":
            mb = "llvm.x86.avx512.pmaddubs.w.512" if V == 16 else "llvm.x86.avx2.pmadd.ub.sw"
            mw = "llvm.x86.avx512.pmaddw.d.512" if V == 16 else "llvm.x86.avx2.pmadd.wd"
            t16 = vec(I16, 2 * V)
            ones = const_vec(I16, 2 * V, 1)
            signed = self.z_done(umax) == 128
            bound = 2 * (128 if signed else umax) * 127
            group = max(1, 32767 // max(1, bound))  # int16 pair sums that can be added before widening
            for i in range(0, len(pairs), group):
                s16 = None
                for a, b in pairs[i:i + group]:
                    if signed:  # |a - 128| times b with a's sign: vpsignb's trick, written portably
                        b = builder.select(a[1], builder.sub(ir.Constant(b.type, None), b), b)
                    p = _call(builder, mb, t16, [a[0], b])
                    s16 = p if s16 is None else builder.add(s16, p)
                acc = builder.add(acc, _call(builder, mw, acc.type, [s16, ones]))
            return acc
        # generic: widen, multiply, add the four products of each lane
        w = vec(I32, n8)
        for a, b in pairs:
            aw = builder.zext(a[0], w)
            p = builder.mul(aw, builder.sext(b, w))
            for m in range(4):
                acc = builder.add(acc, builder.shuffle_vector(p, ir.Constant(w, ir.Undefined),
                                                              ir.Constant(vec(I32, V), [4 * l + m for l in range(V)])))
        return acc


# ---------------------------------------------------------------- f16 -> f32 (Numba has no float16 type)
@intrinsic
def half_to_float(typingctx, bits):
    """The float32 value of IEEE half-precision bits (a uint16), as the hardware converts it (exact)."""
    if not isinstance(bits, types.Integer):
        return None
    sig = types.float32(bits)

    def codegen(context, builder, signature, args):
        h = builder.trunc(args[0], ir.IntType(16)) if bits.bitwidth > 16 else args[0]
        return builder.fpext(builder.bitcast(h, F16), F32)

    return sig, codegen


@intrinsic
def float_to_half(typingctx, x):
    """The IEEE half-precision bits (a uint16) of x (float32), rounded to nearest even as the hardware converts it."""
    if not isinstance(x, types.Float) or x.bitwidth != 32:
        return None
    sig = types.uint16(x)

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], F16), ir.IntType(16))

    return sig, codegen


@njit(inline="always", nogil=True)
def round_to_half(x):
    """x (float32) rounded to the nearest IEEE half-precision value, as float32 (as ggml stores a block's scale)."""
    return half_to_float(float_to_half(x))


@intrinsic
def f32_bits(typingctx, x):
    """The IEEE bits of a float32 as an int32 (for integer max / NaN tests that LLVM vectorizes)."""
    if not isinstance(x, types.Float) or x.bitwidth != 32:
        return None
    sig = types.int32(x)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


@intrinsic
def bits_f32(typingctx, i):
    """The float32 whose IEEE bits are the int32 i."""
    if not isinstance(i, types.Integer) or i.bitwidth != 32:
        return None
    sig = types.float32(i)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], F32)

    return sig, codegen


@njit(inline="always", nogil=True)
def abs_max_bits(x, t, i0, i1):
    """The largest |x[t, i]| for i0 <= i < i1 as its IEEE bits (an int32, 0 for an empty range): >= 0x7f800000 when
    one of them is inf or NaN (NaN bits rank above inf's); for finite values, bits_f32 of it is the maximum. An
    integer maximum, which LLVM vectorizes (a float max with NaN semantics it does not)."""
    m = np.int32(0)
    for i in range(i0, i1):
        m = max(m, np.int32(f32_bits(x[t, i]) & np.int32(0x7FFFFFFF)))
    return m


@intrinsic
def _abs_max_bits_32(typingctx, x, t, i0):
    # x[t, i0:i0 + 32] of a 2-D float32 array whose rows are contiguous -> abs_max_bits of it: one <32 x i32> load,
    # an AND and LLVM's unsigned max reduction (the 32-value loop of abs_max_bits is fully unrolled first, and its
    # scalar maxima are not vectorized again)
    if not (isinstance(x, types.Array) and x.ndim == 2 and x.dtype == types.float32
            and isinstance(t, types.Integer) and isinstance(i0, types.Integer)):
        return None
    sig = types.int32(x, t, i0)

    def codegen(context, builder, signature, args):
        arr = context.make_array(signature.args[0])(context, builder, args[0])
        stride0 = cgutils.unpack_tuple(builder, arr.strides, 2)[0]
        tt = context.cast(builder, args[1], signature.args[1], types.int64)
        ii = context.cast(builder, args[2], signature.args[2], types.int64)
        off = builder.add(builder.mul(tt, stride0), builder.mul(ii, ir.Constant(I64, 4)))
        v = load_vec(builder, builder.bitcast(arr.data, I8.as_pointer()), off, vec(I32, 32))
        v = builder.and_(v, const_vec(I32, 32, 0x7FFFFFFF))
        return _call(builder, "llvm.vector.reduce.umax.v32i32", I32, [v])

    return sig, codegen


@njit(inline="always", nogil=True)
def abs_max_bits_32(x, t, i0):
    """abs_max_bits(x, t, i0, i0 + 32) (the quantizers' block of 32); vectorized when x's rows are contiguous."""
    if x.strides[1] == 4:
        return _abs_max_bits_32(x, t, i0)
    return abs_max_bits(x, t, i0, i0 + 32)


_RINT_MAGIC = np.float32(12582912.0)  # 1.5 * 2**23


@njit(inline="always", nogil=True)
def rint_small(v):
    """np.rint(v) for a float32 |v| < 2**22 (round half to even; the activation quantizers' |v| <= 127): adding
    1.5 * 2**23 leaves no fraction bits, so the float add itself rounds. LLVM vectorizes it (np.rint is a libm call
    per value that it does not); without fast-math it keeps both operations."""
    return (v + _RINT_MAGIC) - _RINT_MAGIC


@intrinsic
def touch(typingctx, addr):
    """Load the byte at `addr` (int64) and drop it (an atomic monotonic load, which LLVM does not remove; a plain
    load on x86 and aarch64): brings its cache line in as a demand load, which the hardware prefetchers follow
    (software prefetch hints did not help where this does: kernels/kv_store.touch_rows)."""
    if not isinstance(addr, types.Integer):
        return None
    sig = types.none(addr)

    def codegen(context, builder, signature, args):
        p = builder.inttoptr(context.cast(builder, args[0], signature.args[0], types.int64), I8.as_pointer())
        builder.load_atomic(p, "monotonic", 1)
        return context.get_dummy_value()

    return sig, codegen

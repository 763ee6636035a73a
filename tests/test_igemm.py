"""Integer kernels (kernels/igemm.py, q8act.py, ternary_i2.py, simd.py) against NumPy references: exact integer
sums, bit-exact packing and activation quantization, the instruction set chosen for a CPU, and the machine code
of every instruction set (cross-compiled, so checked on any machine)."""
from __future__ import annotations

import re

import gguf
import llvmlite.binding as llb
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from llvmlite import ir

from edgellm.kernels import igemm, q8act, simd, ternary, ternary_i2
from edgellm.runtime import weights
from edgellm.runtime.errors import EdgeLLMError

RUNNABLE = simd.runnable_isas()  # always includes "generic": the same arithmetic on any CPU
# this machine's own choice and the portable variant in the fast loop; the other sets it can run are slow (compiles)
ISA_PARAMS = [pytest.param(i, marks=() if i in (simd.target_isa(), "generic") else pytest.mark.slow) for i in RUNNABLE]
FMTS = list(igemm.FORMATS)


def random_records(fmt, G, nb, rng, unit_scale=False):
    f = igemm.FORMATS[fmt]
    W = rng.integers(0, 256, (G, nb, f.rec), dtype=np.uint8)
    if fmt == "tq2":  # 2-bit codes 0..2
        t = rng.integers(0, 3, (G, nb, f.code_bytes, 4))
        W[..., :f.code_bytes] = t[..., 0] | t[..., 1] << 2 | t[..., 2] << 4 | t[..., 3] << 6
    n = 2 * igemm.R if f.has_min else igemm.R
    sc = np.ones((G, nb, n), np.float16) if unit_scale else rng.uniform(-1, 1, (G, nb, n)).astype(np.float16)
    W[..., f.code_bytes:] = sc.view(np.uint8).reshape(G, nb, -1)
    return W


def random_acts(fmt, N, nb, rng, unit_scale=False, extreme=False):
    f = igemm.FORMATS[fmt]
    XQ = rng.integers(-127, 128, (N, nb * f.vpb)).astype(np.int8)
    if extreme:
        XQ[:] = np.where(rng.random(XQ.shape) < 0.5, -127, 127)
    s = XQ.reshape(N, nb * f.ppb, -1).sum(-1, dtype=np.int32)
    dx = np.ones(s.shape, np.float32) if unit_scale else rng.uniform(1e-3, 0.1, s.shape).astype(np.float32)
    return XQ, dx, s


# ---------------------------------------------------------------- the kernel: exact integers, every variant
@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("fmt", FMTS)
def test_integer_sums_are_exact(isa, fmt):
    # unit scales: the output is the integer sum itself (far below 2^24, so exact in f32); N = 19 spans two tiles
    rng = np.random.default_rng(hash((isa, fmt)) % 2**32)
    G, nb, rows = 3, 3, 3 * igemm.R - 5
    for N, extreme in ((1, False), (19, False), (2, True)):
        W = random_records(fmt, G, nb, rng, unit_scale=True)
        if extreme:  # every code at its largest: saturation of int16 pair sums would show here
            f = igemm.FORMATS[fmt]
            W[..., :f.code_bytes] = 0xAA if fmt == "tq2" else 0xFF
        X = random_acts(fmt, N, nb, rng, unit_scale=True, extreme=extreme)
        out = np.full((N, rows), np.nan, np.float32)
        igemm.matmul(isa, fmt, W, *X, out)
        np.testing.assert_array_equal(out.astype(np.float64), igemm.matmul_ref(fmt, W, rows, *X))


@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("fmt", FMTS)
def test_scaled_products_match_float64(isa, fmt):
    rng = np.random.default_rng(7)
    G, nb, rows, N = 4, 5, 4 * igemm.R, 3
    W = random_records(fmt, G, nb, rng)
    X = random_acts(fmt, N, nb, rng)
    out = np.empty((N, rows), np.float32)
    igemm.matmul(isa, fmt, W, *X, out)
    ref = igemm.matmul_ref(fmt, W, rows, *X)
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-6 * np.abs(ref).max())


@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("fmt", FMTS)
def test_one_row_body_equals_the_tile_body(isa, fmt):
    # one row of X (decode) has its own code path in the kernel; with scales it must give the very floats the
    # rows of a tile give (the same operations in the same order)
    rng = np.random.default_rng(5)
    G, nb, rows, N = 2, 3, 2 * igemm.R, 5
    W = random_records(fmt, G, nb, rng)
    XQ, XD, XS = random_acts(fmt, N, nb, rng)
    tile = np.empty((N, rows), np.float32)
    igemm.matmul(isa, fmt, W, XQ, XD, XS, tile)
    for t in range(N):
        one = np.empty((1, rows), np.float32)
        igemm.matmul(isa, fmt, W, XQ[t:t + 1], XD[t:t + 1], XS[t:t + 1], one)
        np.testing.assert_array_equal(one[0], tile[t])


@pytest.mark.parametrize("N", [1, 40])  # 40: the activations quantized by rows over threads
def test_fused_quantization_is_the_same_product(N):
    rng = np.random.default_rng(11)
    isa = simd.target_isa() or "generic"
    W = random_records("q4_1", 3, 4, rng)
    X = rng.standard_normal((N, 128)).astype(np.float32)
    a, b = np.empty((N, 40), np.float32), np.empty((N, 40), np.float32)
    igemm.matmul_x(isa, "q4_1", W, X, a)
    igemm.matmul(isa, "q4_1", W, *q8act.quantize(X), b)  # the quantizer and the kernel in two calls
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError):
        igemm.matmul_x(isa, "tq2", random_records("tq2", 1, 1, rng), X[:, :256], a)


def test_bad_shapes_are_refused():
    rng = np.random.default_rng(0)
    W = random_records("q4_0", 2, 2, rng)
    XQ, XD, XS = random_acts("q4_0", 1, 2, rng)
    ok = np.empty((1, 32), np.float32)
    for args in ((W[:, :1], XQ, XD, XS, ok), (W, XQ[:, :32], XD, XS, ok), (W, XQ, XD[:, :1], XS, ok),
                 (W, XQ, XD, XS.astype(np.float32), ok), (W, XQ, XD, XS[:, :1], ok),
                 (W, XQ, XD, XS, np.empty((1, 33), np.float32)), (W, XQ, XD, XS, np.empty((2, 32), np.float32)),
                 (W.astype(np.int8), XQ, XD, XS, ok), (W, XQ.astype(np.uint8), XD, XS, ok)):
        with pytest.raises(ValueError):
            igemm.matmul("generic", "q4_0", *args)
    with pytest.raises(ValueError):
        igemm.kernel("sse9", "q4_0")


# ---------------------------------------------------------------- packing and activations
def gguf_blocks(qtype, rows, cols, seed):
    w = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    w[2] = 0  # an all-zero row
    return gguf.quants.quantize(w, qtype)


@pytest.mark.parametrize("qtype", list(q8act.QFORMATS), ids=lambda t: t.name)
def test_pack_and_dequantize_match_gguf_py_bit_for_bit(qtype):
    raw = gguf_blocks(qtype, 37, 256, 1)
    W = q8act.pack(qtype, raw)
    assert W.ctypes.data % 64 == 0
    fmt = q8act.QFORMATS[qtype]
    out = np.empty((37, 256), np.float32)
    np.testing.assert_array_equal(q8act.gather(fmt, W, np.arange(37), out), gguf.quants.dequantize(raw, qtype))
    # and the kernel's own reading of the records is the same matrix
    codes, d, m, zero = igemm.unpack_ref(fmt, W, 37)
    vals = (codes - zero).reshape(37, -1, 32) * d[..., None].astype(np.float64)
    if m is not None:
        vals += m[..., None]
    np.testing.assert_allclose(vals.reshape(37, 256), gguf.quants.dequantize(raw, qtype), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("qtype,nbytes", [(QT.TQ2_0, ternary.TQ2_BYTES), (QT.TQ1_0, ternary.TQ1_BYTES)])
def test_ternary_pack_matches_gguf_py_bit_for_bit(qtype, nbytes):
    w = (np.random.default_rng(2).integers(-1, 2, (21, 512)) * 0.3).astype(np.float32)
    raw = gguf.quants.quantize(w, qtype)
    m = ternary_i2.TernaryI2Matrix(raw, 21, 512, nbytes, "generic")
    np.testing.assert_array_equal(m.dequantize(), gguf.quants.dequantize(raw, qtype))
    codes, d, _, zero = igemm.unpack_ref("tq2", m.W, 21)
    np.testing.assert_array_equal((codes - zero).reshape(21, -1, 256) * d[..., None],
                                  gguf.quants.dequantize(raw, qtype).reshape(21, -1, 256))


def test_q8_activations_are_llama_cpp_blocks():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((11, 96)).astype(np.float32)
    x[0, :32] = 0  # an all-zero block: d = 0, q = 0
    x[1, 32:64] = np.linspace(-1, 1, 32) * 127 / 2  # halves: rint ties to even
    # the block maximum is an integer max over |x|'s bits: the largest magnitude negative, -0.0, subnormals
    x[2, :32] = -0.0
    x[2, 5] = -3.5
    x[3, 32:64] = np.float32(1e-40) * np.arange(32)
    x[4, 64:] = -x[4, 64:] - 10
    for N in (1, 11):  # the serial and the parallel quantizer
        got, ref = q8act.quantize(x[:N]), q8act.quantize_ref(x[:N])
        for a, b in zip(got, ref):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)
    xq, xd, xs = got
    assert np.abs(xq).max() <= 127 and (xq[0, :32] == 0).all() and xd[0, 0] == 0
    np.testing.assert_array_equal(xs, xq.reshape(11, 3, 32).sum(-1, dtype=np.int32))
    # d is ggml's f16; the blocks reconstruct x within half a step and the rounding of d (2^-11 relative, 127 steps)
    # (a block of subnormals has d = 0 in f16: all its codes are 0)
    step = xd[..., None] * (0.5 + 127 * 2.0 ** -11) + (xd == 0)[..., None] * np.abs(x).reshape(11, 3, 32)
    assert (xq[3, 32:64] == 0).all()
    assert np.all(np.abs(xq.reshape(11, 3, 32) * xd[..., None] - x.reshape(11, 3, 32)) <= step * 1.0001)


def test_q8_activations_of_views_are_the_same_blocks():
    # the decode step quantizes column slices of wider scratch rows (its block maximum loads 32 values at the row's
    # address; a view whose columns are not contiguous takes the scalar maximum): the same blocks as a copy
    rng = np.random.default_rng(5)
    wide = rng.standard_normal((5, 160)).astype(np.float32)
    wide[2, 40:72] = np.float32(2.5)  # ties of rint and a constant block
    ref = q8act.quantize_ref(np.ascontiguousarray(wide[:, 32:128]))
    for view in (wide[:, 32:128], np.asfortranarray(wide)[:, 32:128]):
        xq = np.empty((5, 96), np.int8)
        xd = np.empty((5, 3), np.float32)
        xs = np.empty((5, 3), np.int32)
        q8act.quantize_q8(view, xq, xd, xs)
        for a, b in zip((xq, xd, xs), ref):
            np.testing.assert_array_equal(a, b)


def test_absmax_activations_are_bitnets():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((10, 256)).astype(np.float32)
    x[3] = 0
    x[4] = -0.0
    x[4, 100] = -7.0  # the largest magnitude negative
    x[5] *= np.float32(1e-40)  # subnormals
    for N in (2, 10):
        got, ref = ternary_i2.quantize(x[:N]), ternary_i2.quantize_ref(x[:N])
        for a, b in zip(got, ref):
            np.testing.assert_array_equal(a, b)
    xq_f32, s = ternary.TernaryMatrix.quantize(x)  # the f32 path's activations: the same integers and scales
    np.testing.assert_array_equal(xq_f32, got[0].astype(np.float32))
    np.testing.assert_array_equal(s, got[3])


# ---------------------------------------------------------------- the matrices the models use
@pytest.mark.parametrize("qtype", list(q8act.QFORMATS), ids=lambda t: t.name)
@pytest.mark.parametrize("N", [1, 40])
def test_qmatrix_integer_path_within_activation_rounding(qtype, N):
    rows, cols = 45, 320
    raw = gguf_blocks(qtype, rows, cols, 5)
    isa = simd.target_isa() or "generic"
    m = weights.QMatrix(qtype, raw, rows, cols, "w", isa)
    assert m.fmt == q8act.QFORMATS[qtype]
    X = np.random.default_rng(6).standard_normal((N, cols)).astype(np.float32)
    y = m.matmul(X)
    Wd = gguf.quants.dequantize(raw, qtype).astype(np.float64)
    ref = X.astype(np.float64) @ Wd.T
    # each activation is off by at most half its block's step d and the f16 rounding of d (127 steps of 2^-11):
    # |error| <= sum_b d_b (1/2 + 127 / 2048) * sum_{i in b} |w_i|
    _, xd, _ = q8act.quantize(X)
    bound = (xd.astype(np.float64) * (0.5 + 127 / 2048)) @ np.abs(Wd).reshape(rows, -1, 32).sum(-1).T
    assert np.all(np.abs(y - ref) <= bound * 1.001 + 1e-5)
    np.testing.assert_array_equal(m.embed(np.array([44, 0, 44])), m.dequantize()[[44, 0, 44]])
    with pytest.raises(ValueError):
        m.embed(np.array([45]))


@pytest.mark.parametrize("qtype,nbytes", [(QT.TQ2_0, ternary.TQ2_BYTES), (QT.TQ1_0, ternary.TQ1_BYTES)])
@pytest.mark.parametrize("N", [1, 3, 20])
def test_ternary_integer_path_equals_the_int16_path(qtype, nbytes, N):
    w = (np.random.default_rng(8).integers(-1, 2, (70, 512)) * 0.4).astype(np.float32)
    raw = gguf.quants.quantize(w, qtype)
    scale = np.linspace(0.5, 2, 70, dtype=np.float32)
    old = ternary.TernaryMatrix(raw, 70, 512, nbytes, scale=scale)
    new = ternary_i2.TernaryI2Matrix(raw, 70, 512, nbytes, simd.target_isa() or "generic", scale=scale)
    X = np.random.default_rng(9).standard_normal((N, 512)).astype(np.float32)
    # both are BitNet's integer arithmetic: exact sums per block, so the same numbers up to f32 rounding
    np.testing.assert_allclose(new.matmul(X), old.matmul(X), rtol=1e-6, atol=1e-6)
    # one call (quantization and output scaling inside the kernel) or three: the same floats
    np.testing.assert_array_equal(new.matmul(X), new.matmul_q(*new.quantize(X)))


@pytest.mark.parametrize("bad", [np.nan, np.inf, 0.0])
def test_non_finite_or_zero_activations_give_numbers_not_exceptions(bad):
    # NaN / inf activations (a diverging model) propagate as NaN / inf, an all-zero row gives 0: the kernels divide
    # by max|x| and by the token's scale, which must never raise (error_model numpy), nor touch other rows
    isa = simd.target_isa() or "generic"
    rng = np.random.default_rng(10)
    X = rng.standard_normal((3, 512)).astype(np.float32)
    X[1] = 0.0
    X[1, 7] = bad
    X[1, 300] = -bad  # (-NaN: the sign bit set)
    w = (rng.integers(-1, 2, (32, 512)) * 0.4).astype(np.float32)
    t = ternary_i2.TernaryI2Matrix(gguf.quants.quantize(w, QT.TQ2_0), 32, 512, ternary.TQ2_BYTES, isa)
    q = weights.QMatrix(QT.Q4_0, gguf.quants.quantize(w, QT.Q4_0), 32, 512, "w", isa)
    # the quantizers and their references agree on such rows too (NaN scales, zero codes)
    for got, ref in ((q8act.quantize(X), q8act.quantize_ref(X)), (ternary_i2.quantize(X), ternary_i2.quantize_ref(X))):
        for a, b in zip(got, ref):
            np.testing.assert_array_equal(a, b)
    for m in (t, q):
        y = m.matmul(X)
        ok = m.matmul(X[[0, 2]])
        np.testing.assert_array_equal(y[[0, 2]], ok)
        if bad == 0.0:
            assert (y[1] == 0).all()
        else:
            assert not np.isfinite(y[1]).all()


# ---------------------------------------------------------------- choosing the instruction set
def test_isa_choice_from_cpu_features():
    c = simd.choose_isa
    zen4 = {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512vnni"}
    assert c("x86_64", zen4) == "avx512vnni"
    assert c("x86_64", {"avx2", "avxvnni"}) == "avxvnni"  # Alder Lake: VNNI without AVX-512
    assert c("x86_64", {"avx2", "avx512f", "avx512bw"}) == "avx512bw"  # Skylake-X
    assert c("x86_64", {"avx2", "fma"}) == "avx2"
    assert c("x86_64", {"sse4.2"}) is None  # no integer dot product worth it: f32 activations
    assert c("aarch64", {"dotprod"}) == "neon_dot"  # Cortex-A76 (Pi 5)
    assert c("aarch64", set()) is None  # Cortex-A72 (Pi 4)
    assert c("riscv64", {"v"}) is None
    assert simd.parse_features("+avx2,-avx512f,+fma") == {"avx2", "fma"}
    assert simd.parse_features({"avx2": True, "avx512f": False}) == {"avx2"}
    assert simd.target_isa() in RUNNABLE + [None]


def test_kernel_isa_override(monkeypatch):
    monkeypatch.setenv(weights.ISA_ENV, "none")
    assert weights.kernel_isa() is None
    monkeypatch.setenv(weights.ISA_ENV, "generic")
    assert weights.kernel_isa() == "generic"
    monkeypatch.setenv(weights.ISA_ENV, "sse9")
    with pytest.raises(EdgeLLMError):
        weights.kernel_isa()
    monkeypatch.delenv(weights.ISA_ENV)
    assert weights.kernel_isa() == simd.target_isa()


def test_matrices_take_the_integer_kernels_only_for_their_types():
    raw = gguf_blocks(QT.Q4_0, 16, 256, 0)
    assert weights.QMatrix(QT.Q4_0, raw, 16, 256, "w", "generic").fmt == "q4_0"
    assert weights.QMatrix(QT.Q4_0, raw, 16, 256, "w", None).fmt is None  # no instructions: f32 activations
    f32 = np.zeros((16, 256), np.float32)
    assert weights.QMatrix(QT.F32, f32, 16, 256, "w", "generic").fmt is None  # BLAS


# ---------------------------------------------------------------- the machine code of every instruction set
TARGETS = [("avx512vnni", "x86_64-unknown-linux-gnu", "znver4", r"vpdpbusd\s+[^\n]*zmm"),
           ("avxvnni", "x86_64-unknown-linux-gnu", "alderlake", r"\{vex\}\s+vpdpbusd"),
           ("avx512bw", "x86_64-unknown-linux-gnu", "skylake-avx512", r"vpmaddubsw\s+[^\n]*zmm"),
           ("avx2", "x86_64-unknown-linux-gnu", "znver2", r"vpmaddubsw\s+[^\n]*ymm"),
           ("neon_dot", "aarch64-unknown-linux-gnu", "cortex-a76", r"sdot\s+v\d+\.4s")]


def block_asm(isa: str, fmt: str, triple: str, cpu: str) -> str:
    """The kernel's block code for one instruction set, compiled by LLVM for another machine."""
    llb.initialize_all_targets()
    llb.initialize_all_asmprinters()
    m = ir.Module(name="blk")
    m.triple = triple
    i8p, fp, i64 = simd.I8.as_pointer(), simd.F32.as_pointer(), simd.I64
    fn = ir.Function(m, ir.FunctionType(ir.VoidType(), [i8p, i8p, fp, simd.I32.as_pointer(), fp, fp, i64]),
                     name="blk")
    b = ir.IRBuilder(fn.append_basic_block())
    w, x, xd, xs, xm, a, n = fn.args
    z = ir.Constant(i64, 0)
    igemm._gen_block(simd.Isa(isa), igemm.FORMATS[fmt], b, w, z, x, z, ir.Constant(i64, 256), xd, xs, xm, z,
                     ir.Constant(i64, 4), n, a, z)
    b.ret_void()
    mod = llb.parse_assembly(str(m))
    mod.verify()
    return llb.Target.from_triple(triple).create_target_machine(cpu=cpu, opt=3).emit_assembly(mod)


@pytest.mark.parametrize("isa,triple,cpu,pattern", TARGETS, ids=[t[0] for t in TARGETS])
@pytest.mark.parametrize("fmt", ["q4_0", "q4_1", "q8_0", "tq2"])
def test_each_instruction_set_emits_its_dot_product(isa, triple, cpu, pattern, fmt):
    asm = block_asm(isa, fmt, triple, cpu)
    assert re.search(pattern, asm), f"{isa} on {cpu}: no {pattern} in the {fmt} block"


def test_host_kernel_uses_the_chosen_instructions():
    # the compiled kernel itself (not cached, so that its assembly can be read) on this machine's best set
    isa = simd.target_isa()
    if isa is None:
        pytest.skip("no integer dot-product instructions here: the f32 path runs")
    from numba import njit
    k = njit(parallel=True)(igemm.kernel(isa, "q4_0").py_func)
    rng = np.random.default_rng(0)
    W = random_records("q4_0", 1, 2, rng)
    k(W, *random_acts("q4_0", 1, 2, rng), np.empty((1, 16), np.float32), 1)
    asm = k.inspect_asm(k.signatures[0])
    pattern = dict((t[0], t[3]) for t in TARGETS)[isa]
    assert re.search(pattern, asm)


def test_kernel_caches_are_stamped_with_every_kernel_module(tmp_path):
    # Numba's cache checks only the defining file's source; q8act's quantizer inlines igemm's row quantizer, which
    # inlines simd's helpers: the kernels' cache stamp covers every kernel module (kernels/sources.py)
    from edgellm.kernels import sources
    for kernel in (q8act.quantize_q8, ternary_i2.quantize_absmax_parallel):
        loc = kernel._cache._impl.locator
        assert type(loc).__name__.startswith("Kernels")
        assert loc.get_source_stamp()[1] == sources.package_digest()
    for f in sources.KERNELS_DIR.glob("*.py"):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    before = sources.package_digest(tmp_path)
    assert before == sources.package_digest()
    with open(tmp_path / "simd.py", "a") as f:
        f.write("\n# an edit\n")
    assert sources.package_digest(tmp_path) != before

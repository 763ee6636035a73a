"""Read the machine code Numba makes for the hot mat-vec kernels on this CPU and fail when their loops are not
vectorized. Run inside the emulated arm64 root by tests/arm64/run.sh once per CPU setting (NUMBA_CPU_NAME /
NUMBA_CPU_FEATURES: cortex-a76 = Pi 5, cortex-a72 = Pi 4), and on the x86 host by test_check_asm.py.

usage: python check_asm.py [--dump DIR]     (prints one line per kernel; exit 1 if any is not vectorized)

Each kernel is compiled afresh (a non-caching copy of the same function with the same options: Numba cannot show
the assembly of code loaded from its cache) for small arrays of the dtypes the runtime passes, and its assembly,
parallel-loop bodies included, must contain the vector instructions of its inner loops:
  aarch64: f32 multiply-adds on NEON registers (fmla vN.4s), the code->f32 conversions on vectors (ucvtf/scvtf
           vN.4s), the ternary kernel's int16 lanes (mul/mla vN.8h);
  x86_64:  packed single FMAs or multiplies (v*ps on xmm/ymm/zmm), packed int->f32 conversion, int16 multiplies.
Where the CPU has integer dot products (kernels/simd.target_isa: cortex-a76 with +dotprod, not cortex-a72; AVX2 and
later on x86), kernels/igemm.py's Q4_0 kernel for that instruction set is checked too: its int8 dot product
(sdot vN.4s on aarch64; vpdpbusd with VNNI, vpmaddubsw with AVX2 / AVX-512BW) and the f32 multiply-adds of the
block scaling. (tests/test_igemm.py checks every instruction set's block code cross-compiled, on any host.)
The scalar remainder loops LLVM also emits do not count; a kernel whose inner loop fell back to scalar code has
none of these.
"""
from __future__ import annotations

import platform
import re
import sys
from dataclasses import dataclass

import numba
import numpy as np
from numba.core import config

from edgellm.kernels import igemm, matvec, simd, ternary


@dataclass(frozen=True)
class Need:
    what: str       # a readable name of the instruction class
    pattern: str    # regex over one assembly line


NEON_FMLA = Need("fmla v.4s (NEON f32 multiply-add)", r"^\s*fml[as]\s+v\d+\.4s")
NEON_UCVTF = Need("ucvtf v.4s (u8 codes to f32, vector)", r"^\s*ucvtf\s+v\d+\.4s")
NEON_SCVTF = Need("scvtf v.4s (i8 codes to f32, vector)", r"^\s*scvtf\s+v\d+\.4s")
NEON_I16 = Need("mul/mla v.8h (int16 lanes)", r"^\s*(mla|mul)\s+v\d+\.8h")
X86_FMA = Need("packed f32 FMA/multiply", r"^\s*v?(fn?madd\d*ps|mulps)\s")
X86_CVT = Need("packed int32->f32", r"^\s*v?cvtdq2ps\s")
X86_I16 = Need("packed int16 multiply", r"^\s*v?(pmullw|pmaddwd)\s")
NEON_SDOT = Need("sdot v.4s (int8 dot product)", r"^\s*sdot\s+v\d+\.4s")
X86_VNNI = Need("vpdpbusd (int8 dot product)", r"^\s*(\{vex\}\s*)?vpdpbusd\s")
X86_MADDUBS = Need("vpmaddubsw (int8 pairs)", r"^\s*vpmaddubsw\s")
# per instruction set of the integer kernels: the architecture and what its kernel must contain
INT8_NEEDS = {"neon_dot": ("aarch64", [NEON_SDOT, NEON_FMLA]), "avx512vnni": ("x86_64", [X86_VNNI, X86_FMA]),
              "avxvnni": ("x86_64", [X86_VNNI, X86_FMA]), "avx512bw": ("x86_64", [X86_MADDUBS, X86_FMA]),
              "avx2": ("x86_64", [X86_MADDUBS, X86_FMA])}


def _q4_args():
    G, nb = 2, 4
    return (np.zeros((G, nb, 16, matvec.R), np.uint8), np.zeros((G, nb, matvec.R), np.float32),
            np.zeros((G, nb, matvec.R), np.float32), 0, np.zeros((1, nb * 32), np.float32),
            np.zeros((1, nb), np.float32), np.zeros((1, G * matvec.R), np.float32))


def _q8_args():
    G, ng = 2, 4
    return (np.zeros((G, ng, 32, matvec.R), np.int8), np.zeros((G, ng, matvec.R), np.float32),
            np.zeros((1, ng * 32), np.float32), np.zeros((1, G * matvec.R), np.float32))


def _ternary_args():
    G, nb = 2, 2
    return (np.zeros((G, nb, 32, ternary.R), np.uint16), np.zeros((G, nb, ternary.R), np.float32),
            np.zeros((1, nb * 256), np.int16), np.zeros((1, nb), np.int16), np.zeros((1, G * ternary.R), np.float32))


def _igemm_args():
    G, nb = 2, 4
    return (np.zeros((G, nb, igemm.FORMATS["q4_0"].rec), np.uint8), np.zeros((1, nb * 32), np.int8),
            np.zeros((1, nb), np.float32), np.zeros((1, nb), np.int32), np.zeros((1, G * igemm.R), np.float32), 1)


# kernel, arguments of the runtime's dtypes, what its assembly must contain per architecture
KERNELS = [
    (matvec.matvec_q4, _q4_args, {"aarch64": [NEON_FMLA, NEON_UCVTF], "x86_64": [X86_FMA, X86_CVT]}),
    (matvec.matvec_q8, _q8_args, {"aarch64": [NEON_FMLA, NEON_SCVTF], "x86_64": [X86_FMA, X86_CVT]}),
    (ternary.matvec_ternary_q, _ternary_args, {"aarch64": [NEON_I16, NEON_FMLA], "x86_64": [X86_I16, X86_FMA]}),
]


def kernels() -> list[tuple[str, object, object, dict]]:
    """(name, kernel, arguments, needs) to check on the CPU Numba compiles for: KERNELS, and igemm's Q4_0 kernel
    for the instruction set the runtime would choose (none on a CPU without integer dot products)."""
    out = [(k.__name__, k, make_args, needs) for k, make_args, needs in KERNELS]
    isa = simd.target_isa()
    if isa in INT8_NEEDS:
        arch, needs = INT8_NEEDS[isa]
        out.append((f"igemm_{isa}", igemm.kernel(isa, "q4_0"), _igemm_args, {arch: needs}))
    return out


def cpu_name() -> str:
    import llvmlite.binding as ll
    return config.CPU_NAME or ll.get_host_cpu_name()


def assembly(kernel, args) -> str:
    """The assembly of a fresh, non-caching compile of `kernel` (same options) for `args`."""
    opts = {k: v for k, v in kernel.targetoptions.items() if k not in ("nopython", "cache")}
    fresh = numba.njit(**opts)(kernel.py_func)
    fresh(*args)
    return fresh.inspect_asm(fresh.signatures[0])


def check(arch: str | None = None, dump: str | None = None) -> list[tuple[str, dict[str, int]]]:
    """Per kernel, the count of each needed instruction class; raises AssertionError naming what is missing."""
    arch = arch or platform.machine()
    if arch not in ("aarch64", "x86_64"):
        raise SystemExit(f"check_asm: no expectations for {arch}")
    results, missing = [], []
    for name, kernel, make_args, needs in kernels():
        if arch not in needs:
            continue
        asm = assembly(kernel, make_args())
        if dump:
            with open(f"{dump}/{name}-{cpu_name()}.s", "w") as f:
                f.write(asm)
        lines = asm.splitlines()
        counts = {n.what: sum(1 for ln in lines if re.search(n.pattern, ln)) for n in needs[arch]}
        results.append((name, counts))
        missing += [f"{name}: no {what}" for what, c in counts.items() if c == 0]
    if missing:
        raise AssertionError(f"not vectorized on {arch} / {cpu_name()}: " + "; ".join(missing))
    return results


def main(argv: list[str]) -> int:
    dump = argv[argv.index("--dump") + 1] if "--dump" in argv else None
    try:
        results = check(dump=dump)
    except AssertionError as e:
        print(f"check_asm: FAILED: {e}", file=sys.stderr)
        return 1
    for name, counts in results:
        print(f"check_asm [{platform.machine()} {cpu_name()}] {name}: "
              + ", ".join(f"{c} x {what}" for what, c in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

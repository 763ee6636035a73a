"""What a Raspberry Pi user meets, checked on any host: ARM features and core names from /proc/cpuinfo,
`edgellm bench` without llama-cpp-python, the first-run compile notice and `pull --compile`, and the machine-code
check of the hot kernels (the emulated Pi itself runs in tests/arm64/run.sh)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from edgellm.bench.machine import SIMD_FLAGS, cpu_info, parse_cpuinfo

HERE = Path(__file__).parent

# /proc/cpuinfo of Raspberry Pi OS (64-bit), first core and the board lines (the other cores repeat the first)
PI5 = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x4
CPU part\t: 0xd0b
CPU revision\t: 1

Revision\t: c04170
Serial\t\t: 0123456789abcdef
Model\t\t: Raspberry Pi 5 Model B Rev 1.0
"""
PI4 = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm crc32 cpuid
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x0
CPU part\t: 0xd08
CPU revision\t: 3

Hardware\t: BCM2835
Revision\t: c03111
Model\t\t: Raspberry Pi 4 Model B Rev 1.1
"""
GRAVITON3 = """processor\t: 0
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs paca pacg dcpodp svei8mm svebf16 i8mm bf16 dgh rng
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x1
CPU part\t: 0xd40
CPU revision\t: 1
"""


def test_raspberry_pi_cpuinfo_gives_board_core_and_features():
    p5, p4 = parse_cpuinfo(PI5), parse_cpuinfo(PI4)
    assert p5["cpu"] == "Raspberry Pi 5 Model B Rev 1.0 (Cortex-A76)" and p5["core"] == "Cortex-A76"
    assert {"asimd", "asimddp", "fphp", "asimdhp"} <= p5["flags"] and "i8mm" not in p5["flags"]
    assert p4["cpu"] == "Raspberry Pi 4 Model B Rev 1.1 (Cortex-A72)" and p4["core"] == "Cortex-A72"
    assert "asimd" in p4["flags"] and "asimddp" not in p4["flags"]
    g = parse_cpuinfo(GRAVITON3)  # no board line: the core is the name
    assert g["cpu"] == "Neoverse-V1" and {"sve", "i8mm", "bf16", "asimddp"} <= g["flags"]
    unknown = parse_cpuinfo(PI4.replace("0xd08", "0xfff"))
    assert unknown["core"] == "ARM implementer 0x41 part 0xfff"


def test_x86_cpuinfo_and_this_machine():
    x = parse_cpuinfo("processor\t: 0\nmodel name\t: AMD EPYC 9B14\nflags\t\t: fpu sse4_2 avx avx2 fma\n")
    assert x == {"cpu": "AMD EPYC 9B14", "core": None, "flags": {"fpu", "sse4_2", "avx", "avx2", "fma"}}
    info = cpu_info()
    assert info["cpu"] and info["jit_cpu"] and set(info["simd"]) <= set(SIMD_FLAGS)
    if info["arch"] == "x86_64":
        assert "core" not in info


def _cli_without_llama_cpp(*args):
    # the CLI in a process where `import llama_cpp` fails, as on a Raspberry Pi (no wheel)
    code = ("import sys; sys.modules['llama_cpp'] = None; from edgellm.cli import main; "
            f"sys.argv = ['edgellm'] + {list(args)!r}; main()")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, EDGELLM_DEBUG=""))


def test_bench_without_llama_cpp_runs_edgellm_and_says_why_llama_cpp_is_skipped(tmp_path):
    from tiny_models import write_tiny_llama
    path = write_tiny_llama(tmp_path / "tiny.gguf")
    r = _cli_without_llama_cpp("bench", str(path), "-p", "16", "-n", "4", "-r", "1", "--no-ceiling", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(r.stdout)
    assert {row["backend"] for row in rows} == {"edgellm"} and len(rows) == 2
    assert all(row["avg_ts"] > 0 for row in rows)
    assert "llama.cpp skipped: llama-cpp-python is not installed" in r.stderr and "compiler" in r.stderr
    # asked for llama.cpp alone: nothing would run, a clear error
    r = _cli_without_llama_cpp("bench", str(path), "--backends", "llama.cpp", "-p", "16", "-n", "4")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("edgellm: error: the llama.cpp backend cannot run")


def test_hot_kernels_are_vectorized_on_this_host():
    sys.path.insert(0, str(HERE))
    try:
        import check_asm
    finally:
        sys.path.remove(str(HERE))
    results = dict(check_asm.check())
    from edgellm.kernels import simd
    isa = simd.target_isa()  # the integer kernel of this CPU's instruction set, where it has one
    assert set(results) == {"matvec_q4", "matvec_q8", "matvec_ternary_q"} | ({f"igemm_{isa}"} if isa else set())
    assert all(c > 0 for counts in results.values() for c in counts.values())


def test_check_asm_fails_on_scalar_code():
    # unoptimized code has no vector loops: the check must say so, naming the kernels
    r = subprocess.run([sys.executable, str(HERE / "check_asm.py")], capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, NUMBA_OPT="0"))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "not vectorized" in r.stderr and "matvec_q4: no" in r.stderr and "matvec_ternary_q: no" in r.stderr


def test_an_empty_jit_cache_is_cold_and_says_so(tmp_path):
    code = ("import io; from edgellm.runtime import jit; f = io.StringIO(); cold = jit.cold_kernels(); "
            "assert jit.compile_notice(f); print(len(cold) - len(jit.CORE_KERNELS) - len(jit.matvec_kernels()) - "
            "(jit.step_kernel() is not None)); print(f.getvalue())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path)))
    assert r.returncode == 0, r.stderr[-2000:]
    n, line = r.stdout.strip().splitlines()
    assert int(n) == 0  # the core kernels, every mat-vec kernel of this machine and its decode step
    assert re.fullmatch(r"edgellm: compiling kernels, once: ~\d+0 s \(later runs load them from the cache\)", line)
    assert not list(tmp_path.rglob("*.nbi"))  # knowing it compiled nothing


def _edgellm(*args, cache_dir):
    env = dict(os.environ, EDGELLM_DEBUG="", NUMBA_CACHE_DIR=str(cache_dir))
    return subprocess.run([sys.executable, "-m", "edgellm.cli", *args], capture_output=True, text=True, timeout=1800,
                          env=env)


def _cache_files(d: Path) -> dict[str, int]:
    return {str(p.relative_to(d)): p.stat().st_mtime_ns for p in d.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_first_run_notice_and_pull_compile(model_path, tmp_path):
    """A cold JIT cache: `pull --compile` says it compiles and compiles everything a run needs; afterwards the
    cache is warm: no notice, and a run (a prompt long enough for the batched path, then decode steps) writes
    nothing to Numba's cache (it compiled nothing)."""
    cache = tmp_path / "numba"
    r = _edgellm("pull", "--compile", cache_dir=cache)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == str(model_path)
    assert "edgellm: compiling kernels, once: ~" in r.stderr and "kernels ready in" in r.stderr
    before = _cache_files(cache)
    assert any(name.endswith(".nbi") for name in before)
    r = _edgellm("run", "-p", "Once upon a time, in a land far away, there lived a", "-n", "4", "--temp", "0",
                 cache_dir=cache)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "compiling kernels" not in r.stderr
    assert "warning" not in r.stderr.lower(), r.stderr
    after = _cache_files(cache)
    assert after == before, f"compiled after pull --compile: {sorted(set(after.items()) ^ set(before.items()))}"

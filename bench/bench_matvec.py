"""Mat-vec kernels and decode steps compared interleaved in one process (each repetition runs every variant once, in
turn; medians), so that a busy machine slows all variants alike.

    python -m edgellm.bench.bench_matvec [--threads N] [--batch B] [--isa avx512vnni,avx2,none] [--cpu-time]
    python -m edgellm.bench.bench_matvec --model FILE.gguf [--threads N] [--batch B]

Without --model: model-shaped random matrices per GGML type, each variant (an integer-kernel instruction set, or
"none": f32 activations) on its own copies of the weights, cycled beyond the last-level cache so that every call
reads from memory. With --model: whole decode steps of that model, the compiled step against the per-operation
forward (and per instruction set: --isa). Bytes are the file encoding's (what llama.cpp reads); compare GB/s with
`edgellm bench --machine`. --cpu-time measures process CPU time (meaningful with one thread on a shared machine).
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT

from ..kernels import simd
from ..runtime.engine import set_threads

SHAPES = [(1536, 576), (576, 1536), (49152, 576), (3072, 2048), (16384, 2048), (2048, 8192), (128256, 2048)]
TYPES = [QT.Q4_0, QT.Q4_1, QT.Q8_0, QT.Q4_K, QT.Q6_K]


def random_raw(qtype, rows, cols, rng):
    n, nbytes = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, cols // n, nbytes), dtype=np.uint8)
    off = 208 if qtype == QT.Q6_K else 0
    raw[..., off:off + 2] = np.full((rows, cols // n), 0.01, np.float16).view(np.uint8).reshape(rows, -1, 2)
    if qtype in (QT.Q4_1, QT.Q4_K):
        raw[..., 2:4] = raw[..., 0:2]
    return raw.reshape(rows, -1)


def interleaved(variants: dict, reps: int, clock) -> dict:
    """{name: f(i)} -> {name: median seconds}: every repetition calls each variant once, in turn."""
    for f in variants.values():
        f(0)
    ts = {n: [] for n in variants}
    for r in range(reps):
        for n, f in variants.items():
            t = clock()
            f(r)
            ts[n].append(clock() - t)
    return {n: float(np.median(v)) for n, v in ts.items()}


def matrices(isas, batch, reps, clock, min_bytes=80e6):
    from ..runtime.weights import QMatrix
    rng = np.random.default_rng(0)
    print(f"{'type':6} {'shape':>13} " + " ".join(f"{i:>16}" for i in isas) + "   (us per call, GB/s)")
    for qtype in TYPES:
        for rows, cols in SHAPES:
            if cols % GGML_QUANT_SIZES[qtype][0]:
                continue
            raw = random_raw(qtype, rows, cols, rng)
            copies = max(1, int(min_bytes // raw.nbytes))
            mats = {i: [QMatrix(qtype, raw, rows, cols, "w", None if i == "none" else i) for _ in range(copies)]
                    for i in isas}
            X = rng.standard_normal((batch, cols)).astype(np.float32)
            med = interleaved({i: (lambda ms: lambda r: ms[r % len(ms)].matmul(X))(ms) for i, ms in mats.items()},
                              reps, clock)
            print(f"{qtype.name:6} {rows:>6}x{cols:<6} " + " ".join(
                f"{med[i] * 1e6:8.0f} {raw.nbytes / med[i] / 1e9:6.1f}" + " " * 1 for i in isas), flush=True)


def decode_steps(model, isas, batch, reps, clock, threads):
    from ..runtime.engine import Engine
    engines = {}
    for i in isas:
        os.environ["EDGELLM_ISA"] = i
        engines[i] = Engine(model, n_ctx=256, threads=threads)
    os.environ.pop("EDGELLM_ISA")
    variants = {}
    for i, e in engines.items():
        caches = [e.new_cache(256) for _ in range(batch)]
        for c in caches:
            e.prefill(np.arange(1, 33), c)
        for fast in ((True, False) if e.fast is not None else (False,)):
            def step(r, e=e, caches=caches, fast=fast, keep=e.fast):
                e.fast = keep if fast else None
                try:
                    for c in caches:
                        c.truncate(32)
                    e.decode_batch(np.full(batch, 7), caches)
                finally:
                    e.fast = keep
            variants[f"{i}{' step' if fast else ' per-op'}"] = step
    med = interleaved(variants, reps, clock)
    nbytes = next(iter(engines.values())).weight_bytes_per_token
    for n, s in med.items():
        print(f"{n:24} {s * 1e3:8.2f} ms per step of {batch}  ({nbytes / s / 1e9:5.1f} GB/s of weights)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--isa", default=None, help="comma-separated instruction sets (and/or none); "
                    "default: this machine's and none")
    ap.add_argument("--model", default=None, help="a .gguf: time whole decode steps instead")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--cpu-time", action="store_true", help="process CPU time instead of wall time")
    a = ap.parse_args(argv)
    threads = set_threads(a.threads)
    isas = a.isa.split(",") if a.isa else [i for i in (simd.target_isa(), "none") if i]
    bad = [i for i in isas if i != "none" and i not in simd.runnable_isas()]
    if bad:
        ap.error(f"this machine does not run {', '.join(bad)} (it runs {', '.join(simd.runnable_isas())}, none)")
    clock = time.process_time if a.cpu_time else time.perf_counter
    print(f"threads={threads} batch={a.batch} clock={'cpu' if a.cpu_time else 'wall'}")
    if a.model:
        decode_steps(a.model, isas, a.batch, a.reps, clock, threads)
    else:
        matrices(isas, a.batch, a.reps, clock)


if __name__ == "__main__":
    main()

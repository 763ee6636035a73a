"""Achieved bandwidth of the fused mat-vec kernels, per GGML type, on model-shaped matrices.

    python -m edgellm.bench.bench_matvec [--threads N] [--batch B]

Bytes counted are the file encoding's (what llama.cpp reads); compare with `edgellm bench --machine`.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT

from ..kernels import matvec as mv
from ..runtime.engine import set_threads

SHAPES = [(1536, 576), (576, 1536), (49152, 576), (8192, 2048), (2048, 8192)]
TYPES = [QT.Q4_0, QT.Q4_1, QT.Q4_K, QT.Q6_K, QT.Q8_0]


def random_raw(qtype, rows, cols, rng):
    n, nbytes = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, cols // n, nbytes), dtype=np.uint8)
    off = 208 if qtype == QT.Q6_K else 0
    raw[..., off:off + 2] = np.full((rows, cols // n), 0.01, np.float16).view(np.uint8).reshape(rows, -1, 2)
    if qtype in (QT.Q4_1, QT.Q4_K):
        raw[..., 2:4] = raw[..., 0:2]
    return raw.reshape(rows, -1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=0.5)
    a = ap.parse_args(argv)
    threads = set_threads(a.threads)
    rng = np.random.default_rng(0)
    print(f"threads={threads} batch={a.batch}")
    print(f"{'type':6} {'shape':>12} {'us/call':>9} {'GB/s':>6}")
    for qtype in TYPES:
        for rows, cols in SHAPES:
            if cols % GGML_QUANT_SIZES[qtype][0]:
                continue
            raw = random_raw(qtype, rows, cols, rng)
            p = mv.pack(qtype, raw)
            X = rng.standard_normal((a.batch, cols)).astype(np.float32)
            out = np.empty((a.batch, rows), np.float32)
            mv.matmul(qtype, p, X, out)  # compile / warm up
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < a.seconds:
                mv.matmul(qtype, p, X, out)
                n += 1
            dt = (time.perf_counter() - t0) / n
            print(f"{qtype.name:6} {rows:>5}x{cols:<6} {dt * 1e6:9.0f} {raw.nbytes / dt / 1e9:6.2f}")


if __name__ == "__main__":
    main()

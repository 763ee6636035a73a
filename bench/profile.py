"""Where a decoded token's time goes: mat-vecs, attention, norms/rope/activation, everything else (Python, dispatch),
the number of compiled-kernel calls, and the bytes read per token against the machine's read bandwidth.

    python -m edgellm.bench.profile [MODEL] [-p 64] [-n 32] [--threads N] [--bandwidth GBS] [--json]
    edgellm bench MODEL --profile

The model's forward runs unchanged; the profile wraps, for its duration, the Python entry points of each part
(the weight matrices' products, the caches' store/attend, the kernels of kernels/ops.py) and Numba's dispatcher
(every call from Python into a compiled kernel is counted). Time inside a part includes its kernels' dispatch
and thread start-up; "other" is the rest of the step: the model's Python between kernels.

When the engine decodes with its compiled step (runtime/fast_decode.py: one call per token), that step is timed
whole ("decode"), and the parts come from the same tokens decoded again by the model's per-operation forward
("decode, per operation"), whose mat-vecs run the same kernels: what bounds the step shows there.
"""
from __future__ import annotations

import argparse
import json
import re
import time
from collections import defaultdict
from contextlib import contextmanager

import numpy as np

PARTS = ("mat-vec", "attention", "norm/rope/act", "other")


def _targets():
    """(owner, attribute, part) of every entry point timed: matrices, caches, small kernels."""
    from ..kernels import ops, ternary, ternary_i2
    from ..runtime import kv_cache, latent_cache, weights
    t = [(weights.QMatrix, "matmul", "mat-vec"), (weights.ConcatMatrix, "matmul", "mat-vec"),
         (weights.ScaledMatrix, "matmul_q", "mat-vec"), (weights.ConcatBitLinear, "matmul_q", "mat-vec"),
         (ternary.TernaryMatrix, "matmul_q", "mat-vec"), (ternary.TernaryMatrix, "quantize", "mat-vec"),
         (ternary_i2.TernaryI2Matrix, "matmul_q", "mat-vec"),
         (kv_cache.KVCache, "store", "attention"), (kv_cache.KVCache, "attend", "attention"),
         (latent_cache.LatentCache, "store", "attention"), (latent_cache.LatentCache, "attend", "attention"),
         (weights.QMatrix, "embed", "norm/rope/act")]
    t += [(ops, name, "norm/rope/act") for name in ("rmsnorm", "rope_inplace", "swiglu")]
    return t


class Recorder:
    """Seconds and kernel calls per part, and seconds per matrix (by name without the layer number)."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.seconds = defaultdict(float)
        self.calls = defaultdict(int)
        self.matrix_s = defaultdict(float)
        self.matrix_bytes = defaultdict(int)
        self.active: str | None = None

    def wrap(self, fn, part: str, is_method: bool):
        rec = self

        def timed(*args, **kwargs):
            if rec.active is not None:  # nested inside a timed part: counted there
                return fn(*args, **kwargs)
            rec.active = part
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                rec.seconds[part] += dt
                rec.active = None
                if part == "mat-vec" and is_method and fn.__name__ != "quantize":
                    m = args[0]
                    kind = re.sub(r"blk\.\d+\.", "", _matrix_name(m))
                    rec.matrix_s[kind] += dt
                    rec.matrix_bytes[kind] += m.nbytes
        return timed


def _matrix_name(m) -> str:
    from ..runtime import weights
    if isinstance(m, (weights.ConcatMatrix, weights.ConcatBitLinear)):
        return "+".join(_matrix_name(p) for p in m.parts)
    if isinstance(m, weights.ScaledMatrix):
        return m.m.name
    return m.name


@contextmanager
def instrumented(rec: Recorder):
    """Wrap the entry points and Numba's dispatcher while the block runs; restore them after."""
    from numba.core.registry import CPUDispatcher
    saved = []
    for owner, attr, part in _targets():
        orig = owner.__dict__[attr]
        is_static = isinstance(orig, staticmethod)
        fn = orig.__func__ if is_static else orig
        wrapped = rec.wrap(fn, part, is_method=isinstance(owner, type) and not is_static)
        setattr(owner, attr, staticmethod(wrapped) if is_static else wrapped)
        saved.append((owner, attr, orig))
    call = CPUDispatcher.__call__

    def counted(self, *args, **kwargs):
        rec.calls[rec.active or "other"] += 1
        return call(self, *args, **kwargs)

    CPUDispatcher.__call__ = counted
    try:
        yield rec
    finally:
        del CPUDispatcher.__call__
        for owner, attr, orig in saved:
            setattr(owner, attr, orig)


def profile(engine, n_prompt: int = 64, n_gen: int = 32, seed: int = 0) -> dict:
    """Prefill n_prompt tokens (random ids), then decode n_gen greedily; per-token seconds and calls per part."""
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, engine.cfg.n_vocab, max(1, n_prompt))
    warm = engine.new_cache(n_prompt + n_gen + 8)  # the same steps once first: compile / load every kernel
    logits = engine.prefill(prompt, warm)
    for _ in range(min(n_gen, 2)):
        logits = engine.decode(int(logits.argmax()), warm)
    cache = engine.new_cache(n_prompt + n_gen + 8)
    rec = Recorder()
    out = {"fast_step": engine.fast is not None}
    with instrumented(rec):
        t0 = time.perf_counter()
        logits = engine.prefill(prompt, cache)
        out["prefill"] = _summary(rec, time.perf_counter() - t0, len(prompt))
        rec.reset()
        kv_tokens, toks = 0, []
        t0 = time.perf_counter()
        for _ in range(n_gen):
            kv_tokens += cache.n + 1
            toks.append(int(logits.argmax()))
            logits = engine.decode(toks[-1], cache)
        out["decode"] = _summary(rec, time.perf_counter() - t0, n_gen)
        if engine.fast is not None:  # the same tokens through the per-operation forward, for the parts
            fast, engine.fast = engine.fast, None
            try:
                cache2 = engine.new_cache(n_prompt + n_gen + 8)
                engine.prefill(prompt, cache2)
                rec.reset()
                t0 = time.perf_counter()
                for t in toks:
                    engine.decode(t, cache2)
                out["decode_per_operation"] = _summary(rec, time.perf_counter() - t0, n_gen)
            finally:
                engine.fast = fast
        parts = out.get("decode_per_operation", out["decode"])
        parts["matrices"] = {k: {"ms": 1e3 * s / n_gen, "gbs": rec.matrix_bytes[k] / s / 1e9}
                             for k, s in sorted(rec.matrix_s.items(), key=lambda kv: -kv[1])}

    weights_b = engine.weight_bytes_per_token
    kv_b = engine.kv_bytes_per_token * kv_tokens / n_gen
    out["bytes_per_token"] = {"weights": int(weights_b), "kv": int(kv_b), "total": int(weights_b + kv_b)}
    return out


def _summary(rec: Recorder, total: float, n: int) -> dict:
    parts = {p: rec.seconds[p] for p in PARTS[:-1]}
    parts["other"] = max(0.0, total - sum(parts.values()))
    return {"tokens": n, "ms_per_token": 1e3 * total / n,
            "parts_ms": {p: 1e3 * s / n for p, s in parts.items()},
            "calls_per_token": {p: rec.calls[p] / n for p in PARTS},
            "kernel_calls_per_token": sum(rec.calls.values()) / n}


def format_report(res: dict) -> str:
    lines = [f"model {res['model']}  threads {res['threads']}  kernels {res['isa'] or 'f32 activations'}  "
             f"decode {'one compiled step per token' if res['fast_step'] else 'per operation (no compiled step)'}"]
    for phase in ("prefill", "decode", "decode_per_operation"):
        if phase not in res:
            continue
        r = res[phase]
        per = "per prompt token" if phase == "prefill" else "per decoded token"
        lines.append(f"{phase.replace('_', ', ', 1).replace('_', ' ')}: {r['ms_per_token']:.3f} ms {per} "
                     f"({1e3 / r['ms_per_token']:.1f} tok/s), {r['kernel_calls_per_token']:.1f} kernel calls {per}")
        lines.append(f"  {'part':15} {'ms':>8} {'share':>6} {'calls':>7}")
        for p in PARTS:
            ms = r["parts_ms"][p]
            lines.append(f"  {p:15} {ms:8.3f} {ms / r['ms_per_token']:6.1%} {r['calls_per_token'][p]:7.1f}")
    b = res["bytes_per_token"]
    d = res["decode"]
    achieved = b["total"] / (d["ms_per_token"] / 1e3) / 1e9
    line = (f"bytes read per decoded token: {b['weights'] / 1e6:.1f} MB weights + {b['kv'] / 1e6:.2f} MB KV cache = "
            f"{b['total'] / 1e6:.1f} MB -> {achieved:.1f} GB/s")
    if res.get("bandwidth_gbs"):
        bw = res["bandwidth_gbs"]
        line += (f", {achieved / bw:.0%} of the measured {bw:.1f} GB/s "
                 f"(at that bandwidth a token takes {b['total'] / bw / 1e6:.2f} ms)")
    lines.append(line)
    lines.append("decode mat-vecs by matrix, per operation (ms per token, GB/s of its file bytes):")
    for k, v in res.get("decode_per_operation", d)["matrices"].items():
        lines.append(f"  {k:60} {v['ms']:7.3f} ms {v['gbs']:6.1f} GB/s")
    return "\n".join(lines)


def run(model=None, n_prompt: int = 64, n_gen: int = 32, threads: int | None = None,
        bandwidth: float | None = None, measure_bw: bool = True) -> dict:
    from ..runtime.engine import load
    from ..runtime.weights import kernel_isa
    eng = load(model, threads=threads, n_ctx=max(64, n_prompt + n_gen + 16))
    res = {"model": str(eng.path.name), "threads": eng.threads, "isa": kernel_isa()}
    res.update(profile(eng, n_prompt, n_gen))
    if bandwidth is None and measure_bw:
        from .machine import measure_bandwidth
        bandwidth = measure_bandwidth(eng.threads)
    res["bandwidth_gbs"] = bandwidth
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m edgellm.bench.profile", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=None, help="a .gguf path or catalog name (default: the default model)")
    ap.add_argument("-p", "--n-prompt", type=int, default=64)
    ap.add_argument("-n", "--n-gen", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--bandwidth", type=float, default=None, help="the machine's read bandwidth in GB/s "
                    "(default: measured as `edgellm bench --machine` does)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if a.n_prompt < 1 or a.n_gen < 1:
        ap.error("--n-prompt and --n-gen must be >= 1")
    res = run(a.model, a.n_prompt, a.n_gen, a.threads, a.bandwidth)
    print(json.dumps(res, indent=2) if a.json else format_report(res))


if __name__ == "__main__":
    main()

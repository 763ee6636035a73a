"""Speed after llama-bench's conventions, for every backend in the same run.

Tests: `pp<N>` (prompt processing, N tokens in batches of n_batch), `tg<N>` (text generation, N decode
steps), and at a context depth D `pp<N> @ d<D>` / `tg<N> @ d<D>` (the KV cache first holds D tokens,
filled untimed). Prompt sizes, generation lengths, thread counts and depths may each be lists: every
combination runs, in llama-bench's order (threads, then depth, then each pp size, then each tg length;
a size of 0 is skipped), for each backend in turn. Tokens are random (no sampling). Each test runs once as a discarded warm-up (JIT
compilation, caches) and then `reps` times; rows report mean ± std tok/s with llama-bench's JSON field
names, plus what llama-bench lacks: time to first logits, peak RSS, KV-cache bytes, bytes read per decode
step and the achieved bandwidth (bytes per token x tok/s) as a fraction of the machine's.

Every backend gets the same threads, n_batch, warm-up, tokens and depth treatment (the cache is cut
back to the depth before each repetition instead of refilled: the same state, far less time).
"""
from __future__ import annotations

import gc
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..runtime.memory import proc_status_bytes
from .backends import open_backend

Progress = Callable[[int, int, str], None]  # (steps done, steps in all, what runs now)


@dataclass
class BenchRow:
    backend: str
    test: str
    model_filename: str
    model_size: int
    model_n_params: int
    n_batch: int
    n_ubatch: int
    n_threads: int
    type_k: str
    type_v: str
    n_prompt: int
    n_gen: int
    n_depth: int
    avg_ns: int
    stddev_ns: int
    avg_ts: float
    stddev_ts: float
    samples_ns: list = field(default_factory=list)
    samples_ts: list = field(default_factory=list)
    # beyond llama-bench
    ttft_ms: float = 0.0              # until the first logits: the whole prompt (pp), the first step (tg)
    peak_rss_bytes: int = 0           # process peak while this backend ran (includes the interpreter)
    kv_bytes: int = 0                 # KV cache holding this test's tokens (depth + prompt or generated)
    kv_bytes_per_token: int = 0
    read_bytes_per_token: int | None = None   # tg: weights + the KV rows attention reads (mean context)
    bandwidth_gbs: float | None = None        # tg: read_bytes_per_token x avg_ts
    bandwidth_frac: float | None = None       # of the machine's measured read bandwidth
    ratio_vs_llama_cpp: float | None = None   # avg_ts / llama.cpp's avg_ts for the same test

    def as_dict(self) -> dict:
        return asdict(self)


def name_of_test(kind: str, n: int, depth: int) -> str:
    return f"{kind}{n}" + (f" @ d{depth}" if depth else "")


def _reset_peak_rss() -> None:
    try:  # Linux >= 4.0: "5" resets VmHWM (the peak RSS) to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_rss() -> int:
    peak = proc_status_bytes("VmHWM")
    if peak is not None:
        return peak
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _time_pp(b, depth, toks) -> tuple[float, float]:
    b.truncate(depth)
    t = time.perf_counter()
    b.prompt(toks)
    dt = time.perf_counter() - t
    return dt, dt


def _time_tg(b, depth, toks) -> tuple[float, float]:
    b.truncate(depth)
    t = time.perf_counter()
    b.step(toks[0])
    first = time.perf_counter() - t
    for tok in toks[1:]:
        b.step(tok)
    return time.perf_counter() - t, first


def _row(b, name, kind, n, depth, samples, threads, n_batch, model, machine_bw) -> BenchRow:
    secs = [s for s, _ in samples]
    ts = [n / s for s in secs]
    row = BenchRow(
        backend=name, test=name_of_test(kind, n, depth), model_filename=Path(str(model)).name,
        model_size=b.model_size, model_n_params=b.model_n_params, n_batch=n_batch, n_ubatch=n_batch,
        n_threads=threads, type_k=b.type_k, type_v=b.type_v, n_prompt=n if kind == "pp" else 0,
        n_gen=n if kind == "tg" else 0, n_depth=depth,
        avg_ns=int(statistics.mean(secs) * 1e9), stddev_ns=int(statistics.stdev(secs) * 1e9) if len(secs) > 1 else 0,
        avg_ts=statistics.mean(ts), stddev_ts=statistics.stdev(ts) if len(ts) > 1 else 0.0,
        samples_ns=[int(s * 1e9) for s in secs], samples_ts=ts,
        ttft_ms=statistics.mean(f for _, f in samples) * 1e3, peak_rss_bytes=_peak_rss(),
        kv_bytes=(depth + n) * b.kv_bytes_per_token, kv_bytes_per_token=b.kv_bytes_per_token)
    if kind == "tg":
        row.read_bytes_per_token = int(b.weight_bytes_per_token + b.kv_bytes_per_token * (depth + (n + 1) / 2))
        row.bandwidth_gbs = row.read_bytes_per_token * row.avg_ts / 1e9
        if machine_bw:
            row.bandwidth_frac = row.bandwidth_gbs / machine_bw
    return row


def add_ratios(rows: list[BenchRow], reference: str = "llama.cpp") -> None:
    """Each row's tok/s over the reference backend's for the same test and threads (the rows of one model)."""
    ref = {(r.n_threads, r.test): r.avg_ts for r in rows if r.backend == reference}
    for r in rows:
        x = ref.get((r.n_threads, r.test))
        r.ratio_vs_llama_cpp = r.avg_ts / x if x else None


def as_list(x) -> list[int]:
    """An int or a list of ints -> a list of ints."""
    return [int(v) for v in x] if isinstance(x, (list, tuple)) else [int(x)]


def run_bench(model, backends: list[str], n_prompt: int | list = 512, n_gen: int | list = 128, depths=(0,),
              reps: int = 5, threads: int | list = 2, n_batch: int = 512, onnx_dir=None, seed: int = 0,
              machine_bw: float | None = None, progress: Progress | None = None,
              on_row: Callable[[BenchRow], None] | None = None) -> tuple[list[BenchRow], bool]:
    """All tests for every backend, in order: per backend, per thread count, per depth, each prompt size
    then each generation length (n_prompt, n_gen, threads: an int or a list). Returns (rows, interrupted):
    on Ctrl-C (KeyboardInterrupt, also when raised by a callback) the rows measured so far are returned,
    plus the interrupted test's if it had at least one measured repetition."""
    depths = sorted(set(int(d) for d in depths))
    kinds = [("pp", n) for n in as_list(n_prompt) if n > 0] + [("tg", n) for n in as_list(n_gen) if n > 0]
    thread_counts = as_list(threads)
    n_ctx = max(depths) + max(n for _, n in kinds) + 8
    total = len(backends) * len(thread_counts) * (1 + sum(1 for d in depths if d) + len(depths) * len(kinds) * (reps + 1))
    done = 0
    rows: list[BenchRow] = []

    def tick(text: str):
        nonlocal done
        if progress:
            progress(done, total, text)
        done += 1

    b = samples = current = src = None
    try:
        for name in backends:
            for nt in thread_counts:
                label = name if len(thread_counts) == 1 else f"{name} t{nt}"
                tick(f"{label}: loading")
                gc.collect()
                _reset_peak_rss()
                b = open_backend(name, model, onnx_dir, nt, n_ctx, n_batch)
                src = onnx_dir if name == "onnxruntime" else model
                rng = np.random.default_rng(seed)  # the same tokens for every backend and thread count
                for depth in depths:
                    if depth:
                        tick(f"{label}: filling the cache to depth {depth}")
                        b.truncate(0)
                        b.prompt(rng.integers(0, b.n_vocab, depth))
                    for kind, n in kinds:
                        toks = rng.integers(0, b.n_vocab, n)
                        fn = _time_pp if kind == "pp" else _time_tg
                        test = name_of_test(kind, n, depth)
                        tick(f"{label} {test}: warm-up")
                        fn(b, depth, toks)
                        samples, current = [], (name, kind, n, depth, nt)
                        for r in range(reps):
                            tick(f"{label} {test}: run {r + 1}/{reps}")
                            samples.append(fn(b, depth, toks))
                        rows.append(_row(b, name, kind, n, depth, samples, nt, n_batch, src, machine_bw))
                        samples = current = None
                        if on_row:
                            on_row(rows[-1])
                b.close()
                b = None
        if progress:
            progress(total, total, "done")
        return rows, False
    except KeyboardInterrupt:
        if samples and b is not None:
            name, kind, n, depth, nt = current
            rows.append(_row(b, name, kind, n, depth, samples, nt, n_batch, src, machine_bw))
        return rows, True
    finally:
        if b is not None:
            b.close()


def measure_startup(path: str, threads: int, cold: bool = True) -> dict:
    """Wall time of a fresh `edgellm run -n 1` process (Python start, imports, load, JIT, first token):
    `warm_s` with the Numba cache as it is (a cache hit after the first run), `cold_s` with an empty
    Numba cache (every kernel compiled)."""
    import os
    import subprocess
    import sys
    import tempfile

    def once(env) -> float:
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "edgellm.cli", "run", str(path), "-p", "Hello", "-n", "1",
                            "--temp", "0", "--quiet", "--threads", str(threads)], capture_output=True, text=True, env=env)
        if r.returncode != 0:
            raise RuntimeError(f"edgellm run failed: {r.stderr.strip()[-300:]}")
        return time.perf_counter() - t

    out = {}
    env = dict(os.environ)
    once(env)  # make sure the cache is populated
    out["warm_s"] = min(once(env) for _ in range(2))
    if cold:
        with tempfile.TemporaryDirectory() as d:
            out["cold_s"] = once(dict(env, NUMBA_CACHE_DIR=d))
    return out

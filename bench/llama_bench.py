"""A first benchmark after llama-bench: tests pp<N> (prompt processing) and tg<N> (text generation) for
edgellm and llama.cpp (llama-cpp-python) in the same run, same threads, warm-up discarded, random
tokens fed without sampling. Rows carry llama-bench's JSON field names."""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np


@dataclass
class BenchRow:
    backend: str
    test: str
    n_prompt: int
    n_gen: int
    n_threads: int
    avg_ts: float
    stddev_ts: float
    samples_ts: list = field(default_factory=list)
    model_filename: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


class EdgeBackend:
    name = "edgellm"

    def __init__(self, path: str, threads: int, n_ctx: int):
        from ..runtime.engine import Engine
        self.engine = Engine(path, n_ctx=n_ctx, threads=threads)
        self.cache = self.engine.new_cache(n_ctx)
        self.n_vocab = self.engine.cfg.n_vocab

    def reset(self):
        self.cache.truncate(0)

    def prompt(self, tokens):
        self.engine.prefill(tokens, self.cache)

    def step(self, token):
        self.engine.decode(int(token), self.cache)


class LlamaCppBackend:
    name = "llama.cpp"

    def __init__(self, path: str, threads: int, n_ctx: int, n_batch: int = 512):
        try:
            import llama_cpp
        except ImportError:
            from ..runtime.errors import EdgeLLMError
            raise EdgeLLMError("the llama.cpp backend needs llama-cpp-python: pip install 'edgellm[llama]'") from None
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                                   n_batch=n_batch, n_ubatch=n_batch, verbose=False)
        self.n_vocab = self.llm.n_vocab()

    def reset(self):
        self.llm.reset()
        self.llm._ctx.kv_cache_clear() if hasattr(self.llm._ctx, "kv_cache_clear") else None

    def prompt(self, tokens):
        self.llm.eval([int(t) for t in tokens])

    def step(self, token):
        self.llm.eval([int(token)])


BACKENDS = {"edgellm": EdgeBackend, "llama.cpp": LlamaCppBackend}


def _time_pp(b, toks) -> float:
    b.reset()
    t = time.perf_counter()
    b.prompt(toks)
    return len(toks) / (time.perf_counter() - t)


def _time_tg(b, toks) -> float:
    b.reset()
    t = time.perf_counter()
    for tok in toks:
        b.step(tok)
    return len(toks) / (time.perf_counter() - t)


def run_bench(path: str, backends: list[str], n_prompt: int = 512, n_gen: int = 128, reps: int = 3,
              threads: int = 2, seed: int = 0, progress: Callable[[str], None] | None = None) -> list[BenchRow]:
    rows = []
    n_ctx = max(n_prompt, n_gen) + 16
    for name in backends:
        if name not in BACKENDS:
            raise ValueError(f"unknown backend {name!r} (known: {', '.join(BACKENDS)})")
    for name in backends:
        b = BACKENDS[name](path, threads, n_ctx)
        rng = np.random.default_rng(seed)
        tests = []
        if n_prompt:
            tests.append((f"pp{n_prompt}", n_prompt, 0, _time_pp, rng.integers(0, b.n_vocab, n_prompt)))
        if n_gen:
            tests.append((f"tg{n_gen}", 0, n_gen, _time_tg, rng.integers(0, b.n_vocab, n_gen)))
        for test, np_, ng, fn, toks in tests:
            if progress:
                progress(f"{name} {test}: warm-up")
            fn(b, toks)  # warm-up (JIT compile, caches), discarded
            samples = []
            for r in range(reps):
                if progress:
                    progress(f"{name} {test}: run {r + 1}/{reps}")
                samples.append(fn(b, toks))
            rows.append(BenchRow(name, test, np_, ng, threads, statistics.mean(samples),
                                 statistics.stdev(samples) if len(samples) > 1 else 0.0, samples,
                                 str(path).rsplit("/", 1)[-1]))
        del b
    return rows


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

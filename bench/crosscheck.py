"""Does the harness handicap llama.cpp? Its pp/tg numbers beside llama-cpp-python timed by hand (a plain
loop around `Llama.eval`, nothing of the harness) and beside llama.cpp's own counters
(`llama_perf_context`: time inside llama_decode).

    python -m edgellm.bench.crosscheck [MODEL] [-p 512] [-n 128] [-r 3] [--threads N]

The three should agree within noise; the counters sit slightly above (they leave out the Python call).
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def by_hand(model, n_prompt: int, n_gen: int, reps: int, threads: int, n_batch: int = 512, seed: int = 0) -> dict:
    """tok/s of llama-cpp-python timed by hand, and by llama.cpp's perf counters, mean over reps after
    one warm-up."""
    import llama_cpp
    llm = llama_cpp.Llama(model_path=str(model), n_ctx=n_prompt + n_gen + 8, n_threads=threads,
                          n_threads_batch=threads, n_batch=n_batch, n_ubatch=n_batch, verbose=False)
    rng = np.random.default_rng(seed)
    prompt = [int(t) for t in rng.integers(0, llm.n_vocab(), n_prompt)]
    gen = [int(t) for t in rng.integers(0, llm.n_vocab(), n_gen)]
    out = {}
    for kind, toks in (("pp", prompt), ("tg", gen)):
        if not toks:
            continue
        hand, internal = [], []
        for r in range(reps + 1):
            llm.reset()  # n_tokens = 0: the next eval removes every cache cell first
            llama_cpp.llama_perf_context_reset(llm.ctx)
            t = time.perf_counter()
            if kind == "pp":
                llm.eval(toks)
            else:
                for tok in toks:
                    llm.eval([tok])
                    llama_cpp.llama_synchronize(llm.ctx)  # as reading the logits would; books the counters
            llama_cpp.llama_synchronize(llm.ctx)
            dt = time.perf_counter() - t
            perf = llama_cpp.llama_perf_context(llm.ctx)
            ms, n = (perf.t_p_eval_ms, perf.n_p_eval) if kind == "pp" else (perf.t_eval_ms, perf.n_eval)
            if r:  # the first is the warm-up
                hand.append(len(toks) / dt)
                internal.append(n / (ms / 1e3) if ms > 0 and n else float("nan"))
        out[kind] = {"by_hand": statistics.mean(hand), "llama_perf": statistics.mean(internal)}
    llm.close()
    return out


def crosscheck(model, n_prompt: int = 512, n_gen: int = 128, reps: int = 3, threads: int = 2, n_batch: int = 512) -> dict:
    """{'pp': {'harness', 'by_hand', 'llama_perf'}, 'tg': {...}} in tok/s."""
    from .llama_bench import run_bench
    rows, _ = run_bench(model, ["llama.cpp"], n_prompt, n_gen, (0,), reps, threads, n_batch)
    out = by_hand(model, n_prompt, n_gen, reps, threads, n_batch)
    for r in rows:
        out["pp" if r.n_prompt else "tg"]["harness"] = r.avg_ts
    return out


def main(argv=None):
    from ..runtime.engine import physical_cores
    from ..runtime.fetch import resolve_model
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?")
    ap.add_argument("-p", type=int, default=512)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("-r", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    res = crosscheck(resolve_model(a.model), a.p, a.n, a.r, a.threads or physical_cores())
    print("| test | harness t/s | by hand t/s | llama.cpp counters t/s | harness / by hand |")
    print("|---|---:|---:|---:|---:|")
    for kind, n in (("pp", a.p), ("tg", a.n)):
        if kind in res:
            d = res[kind]
            print(f"| {kind}{n} | {d['harness']:.2f} | {d['by_hand']:.2f} | {d['llama_perf']:.2f} | "
                  f"{d['harness'] / d['by_hand']:.3f} |")


if __name__ == "__main__":
    main()

"""Decode speed and memory at depth: a linear-attention GGUF (`edgellm convert --variant linear`) against the original
softmax model (same outtype), both in edgellm, and held-out perplexity of each GGUF in edgellm.

    python -m edgellm.bench.linear LINEAR.gguf ORIGINAL.gguf [--depths 0,4096] [--gen 32] [--rounds 3] [--text F]
        [--ppl-windows 8] [--fill prefill|skip] [--out DIR]

For each depth the cache of each model is filled once with `depth` tokens of the text (prefill), then decode steps
are timed from forks of it, the two models interleaved in rounds (the machine is shared: compare within one run).
Reports decode tok/s, the cache bytes at that depth (KV for softmax, the constant state for linear) and the
perplexity of each file on the text's windows (edgellm's own forward).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from ..runtime.cache_base import RecurrentState
from ..runtime.engine import Engine


TEXT = Path(__file__).resolve().parents[1] / "tests" / "data" / "shakespeare_60k.txt"


def variant_parser(doc: str, variant: str, gen: int) -> argparse.ArgumentParser:
    """The options a variant-against-original benchmark shares (this file, bench/mla.py): the two GGUF paths
    (`variant` names the first), the depths, tokens and rounds per point, the text, threads, perplexity windows,
    the output folder and how the cache reaches the depth."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument(variant)
    ap.add_argument("original")
    ap.add_argument("--depths", default="0,4096")
    ap.add_argument("--gen", type=int, default=gen)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--text", default=str(TEXT))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ppl-windows", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--fill", choices=["prefill", "skip"], default="prefill",
                    help="how the cache reaches the depth: a real prefill of the text, or (for large models, where only "
                         "speed is measured) by setting its length (zero cache rows; a linear state stays empty)")
    return ap


def save_results(out, name: str, res: dict, lines: list[str]) -> None:
    """res -> OUT/name.json, the table `lines` -> OUT/name.md (the folder made if needed)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(res, indent=1))
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")


def _cache_bytes(eng, cache) -> int:
    if isinstance(cache, RecurrentState):  # constant in the depth
        return int(cache.state_nbytes)
    return int(eng.kv_bytes_per_token * cache.n)


def _ppl(eng, toks, n_windows, L=256):
    nll, cnt = 0.0, 0
    for w in range(n_windows):
        ids = toks[w * L:(w + 1) * L]
        if len(ids) < L:
            break
        lg = eng.prefill(ids, eng.new_cache(L + 8), logits="all").astype(np.float64)
        lg -= lg.max(-1, keepdims=True)
        lp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
        nll -= lp[np.arange(L - 1), ids[1:]].sum()
        cnt += L - 1
    return math.exp(nll / cnt)


def run(linear, original, depths, n_gen, rounds, text, out, threads, ppl_windows, fill="prefill"):
    engs = {"linear": Engine(linear, n_ctx=max(depths) + n_gen * rounds + 16, threads=threads),
            "softmax": Engine(original, n_ctx=max(depths) + n_gen * rounds + 16, threads=threads)}
    toks = np.asarray(engs["softmax"].tokenizer.encode(Path(text).read_text(encoding="utf-8"), add_bos=False,
                                                       parse_special=False), dtype=np.int64)
    toks = np.resize(toks, max(depths) + n_gen + 1)
    rows = []
    for depth in depths:
        base = {}
        for name, eng in engs.items():
            c = eng.new_cache()
            t = time.perf_counter()
            if fill == "prefill" or depth == 0:
                eng.prefill(toks[:max(depth, 1)], c)
            else:  # "skip": only the position moves (zero K/V rows, or the empty state): decode reads the same bytes
                c.n = depth
            base[name] = c
            print(f"{name}: filled {max(depth, 1)} tokens in {time.perf_counter() - t:.1f} s", flush=True)
        secs = {n: 0.0 for n in engs}
        for r in range(rounds):
            for name, eng in engs.items():
                c = base[name].fork()
                eng.decode(int(toks[depth]), c)  # warm (JIT, caches)
                t = time.perf_counter()
                for i in range(n_gen):
                    eng.decode(int(toks[depth + 1 + i]) if depth + 1 + i < len(toks) else 3, c)
                secs[name] += time.perf_counter() - t
                if r == rounds - 1:
                    rows.append(dict(model=name, depth=depth, tok_s=n_gen * rounds / secs[name],
                                     cache_bytes=_cache_bytes(eng, c)))
                    print(rows[-1], flush=True)
    ppl = {}
    if ppl_windows:
        for name, eng in engs.items():
            ppl[name] = _ppl(eng, toks, ppl_windows)
            print(f"{name}: perplexity {ppl[name]:.3f} over {ppl_windows} windows of 256", flush=True)
    res = dict(linear=str(linear), original=str(original), threads=threads, n_gen=n_gen, rounds=rounds, rows=rows,
               ppl=ppl, state_bytes=engs["linear"].model.state_bytes())
    lines = [f"Decode in edgellm, {threads} threads, {n_gen} x {rounds} tokens per point", "",
             "| model | depth | decode tok/s | cache bytes |", "|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['depth']} | {r['tok_s']:.1f} | {r['cache_bytes']:,} |" for r in rows]
    if ppl:
        lines += ["", "| model | perplexity (edgellm) |", "|---|---|"] + [f"| {k} | {v:.3f} |" for k, v in ppl.items()]
    if out:
        save_results(out, "linear", res, lines)
    print("\n".join(lines))
    return res


def main(argv=None):
    ap = variant_parser(__doc__, "linear", gen=32)
    a = ap.parse_args(argv)
    run(a.linear, a.original, [int(x) for x in a.depths.split(",")], a.gen, a.rounds, a.text, a.out, a.threads,
        a.ppl_windows, a.fill)


if __name__ == "__main__":
    main()

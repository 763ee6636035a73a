"""MLA variant (`edgellm convert --variant mla`, GGUF deepseek2) against the original model in edgellm: decode tok/s
at depth and KV bytes per token, and logits of the MLA file in edgellm against llama.cpp.

    python -m edgellm.bench.mla MLA.gguf ORIGINAL.gguf [--depths 0,4096] [--gen 16] [--rounds 3]
        [--fill prefill|skip] [--llama-check 128] [--text F] [--out DIR]

Each depth: the cache of each model is filled once (a prefill of the text, or with --fill skip only its length is
set: zero rows, decode reads the same bytes), then decode steps are timed from forks of it, the models interleaved
in rounds (the machine is shared: compare within one run).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..runtime.engine import Engine
from .linear import _ppl, save_results, variant_parser


def decode_speed(engs: dict, toks, depths, n_gen, rounds, fill):
    import time
    rows = []
    for depth in depths:
        base = {}
        for name, eng in engs.items():
            c = eng.new_cache()
            if fill == "prefill" or depth == 0:
                eng.prefill(toks[:max(depth, 1)], c)
            else:
                c.n = depth
            base[name] = c
        secs = {n: 0.0 for n in engs}
        for r in range(rounds):
            for name, eng in engs.items():
                c = base[name].fork()
                eng.decode(int(toks[depth]), c)  # warm (JIT)
                t = time.perf_counter()
                for i in range(n_gen):
                    eng.decode(int(toks[depth + 1 + i]), c)
                secs[name] += time.perf_counter() - t
        for name, eng in engs.items():
            rows.append(dict(model=name, depth=depth, tok_s=n_gen * rounds / secs[name],
                             kv_bytes_per_token=eng.kv_bytes_per_token))
            print(rows[-1], flush=True)
    return rows


def llama_check(path, toks, n: int, threads: int) -> dict:
    """Max |logit difference| between edgellm and llama.cpp (llama-cpp-python) on the first n tokens, relative to
    the largest logit, and the agreement of their argmax."""
    import llama_cpp
    ids = [int(t) for t in toks[:n]]
    ours = Engine(path, n_ctx=n + 8, threads=threads).prefill(np.asarray(ids), logits="all")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n + 8, logits_all=True, n_threads=threads, verbose=False)
    llm.eval(ids)
    theirs = np.array(llm.scores[:n], dtype=np.float32)
    llm.close()
    d = np.abs(ours - theirs).max()
    return dict(tokens=n, max_abs_diff=float(d), rel=float(d / np.abs(ours).max()),
                argmax_agree=float((ours.argmax(1) == theirs.argmax(1)).mean()))


def main(argv=None):
    ap = variant_parser(__doc__, "mla", gen=16)
    ap.add_argument("--llama-check", type=int, default=0, help="tokens of the logits check against llama.cpp")
    a = ap.parse_args(argv)
    depths = [int(x) for x in a.depths.split(",")]
    n_ctx = max(depths) + a.gen + 16
    engs = {"mla": Engine(a.mla, n_ctx=n_ctx, threads=a.threads),
            "original": Engine(a.original, n_ctx=n_ctx, threads=a.threads)}
    toks = np.asarray(engs["original"].tokenizer.encode(Path(a.text).read_text(encoding="utf-8"), add_bos=False,
                                                        parse_special=False), dtype=np.int64)
    toks = np.resize(toks, max(depths) + a.gen + 2)
    res = dict(mla=a.mla, original=a.original, threads=a.threads, rows=decode_speed(engs, toks, depths, a.gen,
                                                                                     a.rounds, a.fill))
    if a.ppl_windows:
        res["ppl"] = {n: _ppl(e, toks, a.ppl_windows) for n, e in engs.items()}
        print(res["ppl"], flush=True)
    if a.llama_check:
        res["llama_cpp"] = llama_check(a.mla, toks, a.llama_check, a.threads)
        print(res["llama_cpp"], flush=True)
    lines = ["| model | depth | decode tok/s | KV bytes / token |", "|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['depth']} | {r['tok_s']:.1f} | {r['kv_bytes_per_token']:,} |" for r in res["rows"]]
    print("\n".join(lines))
    if a.out:
        save_results(a.out, "mla", res, lines)
    return res


if __name__ == "__main__":
    main()

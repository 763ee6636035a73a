"""Delta attention and compressed KV caches, measured on the default model and real text.

    python -m edgellm.bench.delta_kv sweep [--windows 4] [--out bench-delta]   # perplexity / top-1 vs sparsity
    python -m edgellm.bench.delta_kv kv    [--windows 4] [--out bench-delta]   # KV types, edgellm and llama.cpp
    python -m edgellm.bench.delta_kv depth [--depth 4096] [--gen 32]          # attention time, decode tok/s at depth

sweep: perplexity as llama-perplexity computes it (windows of 512 tokens, second half scored) for dense attention
and delta attention at several global thresholds θ and calibrated per-layer targets; top-1 agreement with dense over
the scored positions; sparsity = outside-window multiply-adds skipped. θ is calibrated on the text's last 1024
tokens, which no scored window contains. Writes delta_sweep.{md,json,png}.
kv: perplexity and KV bytes per token of f32/f16/q8_0/q4_0 caches (with and without the rotation + centring), and
of llama.cpp's f16/q8_0/q4_0 caches (type_k = type_v, flash attention, its Hadamard rotation on and off).
depth: the cache is filled to `depth` tokens of the text once (dense f32 prefill), copied into each configuration's
cache (a delta state starts valid at any point: q̂ = 0 and zero score rows satisfy s = q̂ · k), then `gen` tokens of
the text are decoded one at a time, in rounds that interleave the configurations (medians reported): decode tok/s and
attention seconds per token (store + attend, all layers);
llama.cpp decodes at the same depth. Speed is noisy on a shared machine: compare within one run.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np

from ..runtime.engine import Engine
from ..runtime.fetch import resolve_model
from .perplexity import score_window, windows

CTX = 512
CALIB_TOKENS = 1024


def _text_tokens(eng, text_path):
    text = Path(text_path).read_text(encoding="utf-8")
    return text, np.array(eng.tokenizer.encode(text, add_bos=False, parse_special=False), dtype=np.int64)


def _eval(eng, ws):
    """-> (nll sum, scored count, argmax over all positions per window, seconds) of the scored windows."""
    cache = eng.new_cache(CTX)
    nll = cnt = 0.0
    top = []
    t = time.perf_counter()
    for w in ws:
        cache.truncate(0)
        lg = eng.prefill(w, cache, logits="all")
        s, n = score_window(lg, w, CTX // 2)
        nll += s
        cnt += n
        top.append(lg.argmax(-1))
    return nll, cnt, top, time.perf_counter() - t


def _agreement(top, ref):
    # top-1 agreement over the scored positions (second half of each window), where old keys exist
    return float(np.mean(np.concatenate([a[CTX // 2:-1] == b[CTX // 2:-1] for a, b in zip(top, ref)])))


def sweep(model, text_path, n_windows, out, thetas, targets, window, threads):
    path = resolve_model(model)
    eng = Engine(path, n_ctx=CTX, threads=threads)
    _, toks = _text_tokens(eng, text_path)
    calib = toks[-CALIB_TOKENS:]
    ws = windows(toks[:-CALIB_TOKENS], CTX)[:n_windows]
    nll, cnt, ref_top, sec = _eval(eng, ws)
    base = math.exp(nll / cnt)
    rows = [dict(config="dense", theta=None, target=None, window=None, ppl=base, dppl_pct=0.0, top1=1.0,
                 sparsity=0.0, per_layer=None, seconds=sec)]
    print(f"dense: ppl {base:.4f} ({cnt:.0f} tokens, {sec:.1f} s)", flush=True)
    configs = [("theta", t) for t in thetas] + [("target", s) for s in targets]
    for kind, val in configs:
        if kind == "theta":
            e = Engine(path, n_ctx=CTX, threads=threads, attn="delta", delta_threshold=val, delta_window=window)
        else:
            e = Engine(path, n_ctx=CTX, threads=threads, attn="delta", delta_sparsity=val, delta_window=window,
                       calib=calib)
        e.attn_stats.reset()
        nll, cnt, top, sec = _eval(e, ws)
        st = e.attention_stats()
        p = math.exp(nll / cnt)
        row = dict(config=f"θ={val:g}" if kind == "theta" else f"target {val:.0%}",
                   theta=val if kind == "theta" else None, target=val if kind == "target" else None, window=window,
                   ppl=p, dppl_pct=100 * (p / base - 1), top1=_agreement(top, ref_top), sparsity=st["sparsity"],
                   per_layer=st["prefill"]["per_layer"], thetas=st["theta"], seconds=sec)
        rows.append(row)
        print(f"{row['config']}: sparsity {row['sparsity']:.1%}, ppl {p:.4f} ({row['dppl_pct']:+.2f}%), "
              f"top-1 {row['top1']:.4f}, {sec:.1f} s", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(model=str(path), text=str(text_path), ctx=CTX, windows=len(ws), tokens_scored=int(cnt),
                window=window, calibration=f"last {CALIB_TOKENS} tokens of the text (not scored)")
    (out / "delta_sweep.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    lines = [f"Delta attention on {path.name}, {len(ws)} windows of {CTX} ({int(cnt)} tokens scored), window W = "
             f"{window}, θ calibrated on the text's last {CALIB_TOKENS} tokens (not scored).", "",
             "| config | sparsity | perplexity | Δ ppl | top-1 vs dense |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['sparsity']:.1%} | {r['ppl']:.4f} | {r['dppl_pct']:+.2f}% | {r['top1']:.4f} |")
    (out / "delta_sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    _plot_sweep(rows, out / "delta_sweep.png", f"{path.name}: delta attention (W = {window})")
    return rows


def _plot_sweep(rows, png, title):
    from .plot import _plt
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax2 = ax.twinx()
    for kind, mk in (("theta", "o"), ("target", "s")):
        sel = sorted([r for r in rows if r[kind] is not None or (kind == "theta" and r["config"] == "dense")],
                     key=lambda r: r["sparsity"])
        x = [100 * r["sparsity"] for r in sel]
        ax.plot(x, [r["dppl_pct"] for r in sel], mk + "-", color="C0",
                label=f"Δ perplexity ({'global θ' if kind == 'theta' else 'per-layer θ, calibrated'})")
        ax2.plot(x, [100 * r["top1"] for r in sel], mk + "--", color="C1",
                 label=f"top-1 agreement ({'global θ' if kind == 'theta' else 'calibrated'})")
    ax.axhline(2.0, color="C0", lw=0.8, ls=":")
    ax.axvline(50, color="gray", lw=0.8, ls=":")
    ax.set_xlabel("sparsity: outside-window multiply-adds skipped (%)")
    ax.set_ylabel("perplexity change vs dense (%)", color="C0")
    ax2.set_ylabel("top-1 agreement with dense (%)", color="C1")
    ax.grid(alpha=0.3)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper left")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def llama_cpp_ppl(path, toks, n_windows, type_kv, rot=True, threads=2):
    import llama_cpp
    env = os.environ.pop("LLAMA_ATTN_ROT_DISABLE", None)
    if not rot:
        os.environ["LLAMA_ATTN_ROT_DISABLE"] = "1"
    try:
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=CTX, n_batch=CTX, n_ubatch=CTX, logits_all=True,
                              n_threads=threads, n_threads_batch=threads, verbose=False, flash_attn=True,
                              type_k=type_kv, type_v=type_kv)
    finally:
        os.environ.pop("LLAMA_ATTN_ROT_DISABLE", None)
        if env is not None:
            os.environ["LLAMA_ATTN_ROT_DISABLE"] = env
    nll = cnt = 0.0
    t = time.perf_counter()
    for w in windows(toks, CTX)[:n_windows]:
        llm.reset()
        llm.eval([int(x) for x in w])
        s, n = score_window(np.array(llm.scores[:CTX], dtype=np.float32), w, CTX // 2)
        nll += s
        cnt += n
    llm.close()
    return math.exp(nll / cnt), time.perf_counter() - t


GGML_TYPE = {"f16": 1, "q8_0": 8, "q4_0": 2}


def kv_compare(model, text_path, n_windows, out, threads, llama=True):
    path = resolve_model(model)
    rows = []
    base = None
    for kv, transform in (("f32", True), ("f16", True), ("q8_0", True), ("q4_0", True), ("q8_0,q4_0", True),
                          ("q8_0", False), ("q4_0", False)):
        eng = Engine(path, n_ctx=CTX, threads=threads, kv=kv, kv_transform=transform)
        _, toks = _text_tokens(eng, text_path)
        nll, cnt, _, sec = _eval(eng, windows(toks, CTX)[:n_windows])
        p = math.exp(nll / cnt)
        base = base or p
        rows.append(dict(engine="edgellm", kv=kv + ("" if transform or kv in ("f32", "f16") else " (plain)"),
                         ppl=p, dppl_pct=100 * (p / base - 1), kv_bytes_per_token=eng.kv_bytes_per_token,
                         seconds=sec))
        print(rows[-1], flush=True)
    if llama:
        c = Engine(path, n_ctx=CTX, threads=threads).cfg
        lbase = None
        for kv, rot in (("f16", True), ("q8_0", True), ("q4_0", True), ("q8_0", False), ("q4_0", False)):
            p, sec = llama_cpp_ppl(path, toks, n_windows, GGML_TYPE[kv], rot, threads)
            lbase = lbase or p
            per = {"f16": 2 * c.head_dim, "q8_0": c.head_dim // 32 * 34, "q4_0": c.head_dim // 32 * 18}[kv]
            rows.append(dict(engine="llama.cpp", kv=kv + ("" if rot or kv == "f16" else " (rotation off)"), ppl=p,
                             dppl_pct=100 * (p / lbase - 1), kv_bytes_per_token=2 * c.n_layer * c.n_head_kv * per,
                             seconds=sec))
            print(rows[-1], flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kv_compare.json").write_text(json.dumps(dict(windows=n_windows, ctx=CTX, rows=rows), indent=1))
    lines = [f"KV cache types on {path.name}, {n_windows} windows of {CTX}; Δ against each engine's own f32/f16.", "",
             "| engine | KV | bytes/token | perplexity | Δ ppl |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['engine']} | {r['kv']} | {r['kv_bytes_per_token']} | {r['ppl']:.4f} | {r['dppl_pct']:+.2f}% |")
    (out / "kv_compare.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows


def _copy_cache(src, dst):
    """Fill `dst` (any KV type / attention) with the tokens of the f32 cache `src` (fresh delta state)."""
    dst.truncate(0)
    for layer in range(src.n_layer):
        dst.store(layer, src.keys(layer).transpose(1, 0, 2), src.values(layer).transpose(1, 0, 2))
    dst.n = src.n
    return dst


def depth(model, text_path, depth_tokens, n_gen, out, threads, targets, llama=True, rounds=4):
    path = resolve_model(model)
    n_ctx = depth_tokens + n_gen + 8
    base = Engine(path, n_ctx=n_ctx, threads=threads)
    _, toks = _text_tokens(base, text_path)
    toks = np.resize(toks, depth_tokens + n_gen + CALIB_TOKENS)  # repeat the text if it is short
    ctx_toks, gen_toks, calib = toks[:depth_tokens], toks[depth_tokens:depth_tokens + n_gen], toks[-CALIB_TOKENS:]
    t = time.perf_counter()
    filled = base.new_cache()
    base.prefill(ctx_toks, filled)
    print(f"filled {depth_tokens} tokens in {time.perf_counter() - t:.1f} s", flush=True)
    configs = [("dense", "f32", {}), ("dense", "q8_0", {}), ("dense", "q4_0", {})]
    for tg in targets:
        configs += [(f"delta {tg:.0%}", "f32", dict(attn="delta", delta_sparsity=tg, calib=calib)),
                    (f"delta {tg:.0%}", "q8_0", dict(attn="delta", delta_sparsity=tg, calib=calib))]
    runs = []
    for name, kv, kw in configs:
        eng = Engine(path, n_ctx=n_ctx, threads=threads, kv=kv, **kw)
        cache = _copy_cache(filled, eng.new_cache())
        eng.decode(int(gen_toks[0]), cache.fork())  # warm-up (JIT)
        runs.append((name, kv, eng, cache))
    # rounds interleave the configurations, so that a machine that gets busier hits them alike; medians are reported
    per = max(1, n_gen // rounds)
    meas = {i: [] for i in range(len(runs))}
    for r in range(rounds):
        for i, (name, kv, eng, cache) in enumerate(runs):
            c = cache.fork()
            eng.attn_stats.reset()
            t = time.perf_counter()
            for tok in gen_toks[r * per:(r + 1) * per]:
                eng.decode(int(tok), c)
            sec = time.perf_counter() - t
            st = eng.attention_stats()
            meas[i].append((per / sec, 1e3 * st["decode"]["attention_seconds"] / per, st["decode"]["sparsity"]))
    rows = []
    for i, (name, kv, eng, cache) in enumerate(runs):
        m = np.array(meas[i])
        rows.append(dict(engine="edgellm", attn=name, kv=kv, depth=depth_tokens, n_gen=per * rounds,
                         decode_tps=float(np.median(m[:, 0])), attn_ms_per_token=float(np.median(m[:, 1])),
                         sparsity=float(m[:, 2].mean()), kv_bytes_per_token=eng.kv_bytes_per_token))
        print(rows[-1], flush=True)
    if llama:
        import llama_cpp
        for kv in ("f16", "q8_0"):
            llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=threads,
                                  n_threads_batch=threads, verbose=False, flash_attn=True, type_k=GGML_TYPE[kv],
                                  type_v=GGML_TYPE[kv])
            llm.eval([int(x) for x in ctx_toks])
            llm.eval([int(gen_toks[0])])
            t = time.perf_counter()
            for tok in gen_toks[1:]:
                llm.eval([int(tok)])
            sec = time.perf_counter() - t
            llm.close()
            rows.append(dict(engine="llama.cpp", attn="dense (flash)", kv=kv, depth=depth_tokens, n_gen=n_gen - 1,
                             decode_tps=(n_gen - 1) / sec, attn_ms_per_token=None, sparsity=None,
                             kv_bytes_per_token=None))
            print(rows[-1], flush=True)
    dense_ms = {r["kv"]: r["attn_ms_per_token"] for r in rows if r["engine"] == "edgellm" and r["attn"] == "dense"}
    out.mkdir(parents=True, exist_ok=True)
    (out / "depth.json").write_text(json.dumps(dict(depth=depth_tokens, n_gen=n_gen, threads=threads,
                                                    loadavg=os.getloadavg(), rows=rows), indent=1))
    lines = [f"Decode at depth {depth_tokens} on {path.name}, {threads} threads, {n_gen} tokens of text "
             f"(load average at the end {os.getloadavg()[0]:.1f}).", "",
             "| engine | attention | KV | decode tok/s | attention ms/token | vs dense | decode sparsity |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        a = r["attn_ms_per_token"]
        ratio = f"{a / dense_ms[r['kv']]:.2f}x" if a is not None and r["kv"] in dense_ms else "-"
        sp = f"{r['sparsity']:.1%}" if r["sparsity"] is not None else "-"
        lines.append(f"| {r['engine']} | {r['attn']} | {r['kv']} | {r['decode_tps']:.1f} | "
                     f"{'-' if a is None else f'{a:.2f}'} | {ratio} | {sp} |")
    (out / "depth.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["sweep", "kv", "depth"])
    ap.add_argument("--model", default=None)
    ap.add_argument("--text", default=str(Path(__file__).resolve().parent.parent / "tests/data/shakespeare_60k.txt"))
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--out", default="bench-delta")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--window", type=int, default=64, help="delta window W")
    ap.add_argument("--thetas", default="0,0.25,0.5,1")
    ap.add_argument("--targets", default="0.3,0.5,0.6,0.7,0.8")
    ap.add_argument("--depth", type=int, default=4096)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--no-llama", action="store_true")
    a = ap.parse_args(argv)
    out = Path(a.out)
    fl = lambda s: [float(x) for x in s.split(",") if x.strip()]  # noqa: E731
    if a.what == "sweep":
        sweep(a.model, a.text, a.windows, out, fl(a.thetas), fl(a.targets), a.window, a.threads)
    elif a.what == "kv":
        kv_compare(a.model, a.text, a.windows, out, a.threads, llama=not a.no_llama)
    else:
        depth(a.model, a.text, a.depth, a.gen, out, a.threads, fl(a.targets) if a.targets != ap.get_default("targets")
              else [0.5, 0.7], llama=not a.no_llama)


if __name__ == "__main__":
    main()

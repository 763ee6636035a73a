"""How well can anyone agree with llama.cpp's top-1 token on a quantized model? Teacher-forced on real text:

    python -m edgellm.bench.top1 [MODEL] [--text FILE] [--windows 6] [--ctx 512]

prints the top-1 agreement with llama.cpp's default path of (a) llama.cpp's own flash-attention path, (b) edgellm,
(c) edgellm with llama.cpp's activation rounding imitated: before every product with Q4_0 / Q4_1 / Q8_0 weights the
activations are rounded as ggml's AVX2 `quantize_row_q8_0/q8_1` round them (blocks of 32, d = amax / 127 stored as
f16, codes rint(x · 127 / amax)). If (c) is no closer than (b), the disagreement is chaos on near-ties (a rounding
flipped upstream changes every later rounding), not a difference of method.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as QT

from ..runtime import weights
from ..runtime.engine import Engine
from ..runtime.fetch import resolve_model
from .perplexity import windows

Q8_INPUT = (int(QT.Q4_0), int(QT.Q4_1), int(QT.Q8_0))  # weight types whose vec_dot_type is Q8_0 / Q8_1


def round_like_ggml_q8(x: np.ndarray) -> np.ndarray:
    """x (N, cols) f32, cols a multiple of 32 -> x as ggml's AVX2 Q8_0 / Q8_1 activation blocks dequantize."""
    b = x.reshape(x.shape[0], -1, 32)
    amax = np.abs(b).max(-1, keepdims=True)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    d = (amax / np.float32(127)).astype(np.float16).astype(np.float32)
    return (np.rint(b * inv) * d).reshape(x.shape).astype(np.float32)


class _RoundedInputs:
    """Within the block, quantized-weight products see their input rounded like llama.cpp's."""

    def __enter__(self):
        self.orig = orig = weights.QMatrix.matmul

        def matmul(m, X):
            X = np.ascontiguousarray(X, dtype=np.float32)
            return orig(m, round_like_ggml_q8(X) if m.qtype in Q8_INPUT else X)
        weights.QMatrix.matmul = matmul

    def __exit__(self, *exc):
        weights.QMatrix.matmul = self.orig


def agreement(model: Path, text: str, n_windows: int, ctx: int, threads: int) -> dict:
    import llama_cpp
    eng = Engine(model, n_ctx=ctx, threads=threads)
    toks = np.array(eng.tokenizer.encode(text, add_bos=False, parse_special=False), dtype=np.int64)
    ws = windows(toks, ctx)[:n_windows]
    ref = {}
    for fa in (False, True):
        llm = llama_cpp.Llama(model_path=str(model), n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, logits_all=True,
                              n_threads=threads, n_threads_batch=threads, verbose=False, flash_attn=fa)
        ref[fa] = []
        for w in ws:
            llm.reset()
            llm.eval([int(t) for t in w])
            ref[fa].append(np.array(llm.scores[:ctx], dtype=np.float32).argmax(-1)[:-1])
        llm.close()

    def ours():
        cache = eng.new_cache(ctx)
        out = []
        for w in ws:
            cache.truncate(0)
            out.append(eng.prefill(w, cache, logits="all").argmax(-1)[:-1])
        return out

    def agree(a):
        return float(np.mean(np.concatenate([x == y for x, y in zip(a, ref[False])])))

    plain = ours()
    with _RoundedInputs():
        rounded = ours()
    return dict(positions=sum(len(w) - 1 for w in ws), llama_cpp_flash_attn=agree(ref[True]), edgellm=agree(plain),
                edgellm_rounded_like_llama_cpp=agree(rounded))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--text", default=str(Path(__file__).resolve().parent.parent / "tests/data/shakespeare_60k.txt"))
    ap.add_argument("--windows", type=int, default=6)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    r = agreement(resolve_model(a.model), Path(a.text).read_text(encoding="utf-8"), a.windows, a.ctx, a.threads)
    print(f"top-1 agreement with llama.cpp's default path over {r['positions']} positions:")
    print(f"  llama.cpp, flash attention:                 {r['llama_cpp_flash_attn']:.4f}")
    print(f"  edgellm:                                    {r['edgellm']:.4f}")
    print(f"  edgellm, activations rounded as llama.cpp:  {r['edgellm_rounded_like_llama_cpp']:.4f}")


if __name__ == "__main__":
    main()

"""The real default model against llama.cpp (llama-cpp-python): logits, perplexity, greedy text."""
from __future__ import annotations

import math

import numpy as np
import pytest

from edgellm.bench.perplexity import score_window, windows
from edgellm.runtime.generate import generate
from edgellm.runtime.sampling import SamplerSettings

CTX = 512
N_WINDOWS = 6  # 6 x 512 tokens; 6 x 255 scored, 6 x 511 compared for top-1


@pytest.fixture(scope="module")
def llm(llama_cpp, model_path):
    m = llama_cpp.Llama(model_path=str(model_path), n_ctx=CTX, n_batch=512, n_ubatch=512, logits_all=True,
                        n_threads=2, n_threads_batch=2, verbose=False)
    yield m
    m.close()


def teacher_forced(engine, path, llama_cpp, text, flash_attn=False):
    """Logits of edgellm and llama.cpp over the first N_WINDOWS perplexity windows of the text."""
    toks = np.array(engine.tokenizer.encode(text, add_bos=False, parse_special=False))
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=CTX, n_batch=512, n_ubatch=512, logits_all=True,
                          n_threads=2, n_threads_batch=2, verbose=False, flash_attn=flash_attn)
    ref_toks = np.array(llm.tokenize(text.encode(), add_bos=False, special=False))
    assert np.array_equal(toks, ref_toks)
    ws = windows(toks, CTX)[:N_WINDOWS]
    ours, ref = [], []
    cache = engine.new_cache(CTX)
    for w in ws:
        cache.truncate(0)
        ours.append(engine.prefill(w, cache, logits="all"))
        llm.reset()
        llm.eval([int(t) for t in w])
        ref.append(np.array(llm.scores[:CTX], dtype=np.float32))
    llm.close()
    return ws, ours, ref


def top1_agreement(xs, ys) -> float:
    return float(np.mean(np.concatenate([x[:-1].argmax(-1) == y[:-1].argmax(-1) for x, y in zip(xs, ys)])))


@pytest.fixture(scope="module")
def both_logits(engine, model_path, llama_cpp, text):
    return teacher_forced(engine, model_path, llama_cpp, text)


@pytest.fixture(scope="module")
def f32_model(tmp_path_factory, model_path, llama_cpp):
    """The default model with its weights dequantized to F32 by llama.cpp's own quantize tool."""
    import ctypes
    out = tmp_path_factory.mktemp("f32") / "smollm2-f32.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize, params.nthread = llama_cpp.LLAMA_FTYPE_ALL_F32, True, 2
    assert llama_cpp.llama_model_quantize(str(model_path).encode(), str(out).encode(), ctypes.byref(params)) == 0
    return out


def test_teacher_forced_top1_agreement_exact_weights(f32_model, llama_cpp, text):
    # Same weights, no activation rounding on either side: the implementations must agree (measured: 0.9993).
    from edgellm.runtime.engine import Engine
    eng = Engine(f32_model, n_ctx=CTX, threads=2)
    ws, ours, ref = teacher_forced(eng, f32_model, llama_cpp, text)
    agree = top1_agreement(ours, ref)
    print(f"top-1 agreement with llama.cpp, F32 weights: {agree:.4f} over {sum(len(w) - 1 for w in ws)} positions")
    assert sum(len(w) - 1 for w in ws) >= 3000
    assert agree >= 0.98


def test_teacher_forced_top1_agreement_quantized(both_logits, engine, model_path, llama_cpp, text):
    # llama.cpp rounds activations to 8 bits per block before every quantized product (Q8_1 / Q8_0); edgellm keeps
    # them f32. Tiny upstream differences flip those roundings, so on near-ties the argmax is chaotic: llama.cpp
    # does not agree with itself better than this across its two attention paths (measured 0.957 on this text).
    # edgellm must agree with llama.cpp at least as well as llama.cpp agrees with itself.
    _, ours, ref = both_logits
    _, _, ref_fa = teacher_forced(engine, model_path, llama_cpp, text, flash_attn=True)
    agree, self_agree = top1_agreement(ours, ref), top1_agreement(ref_fa, ref)
    print(f"top-1 agreement with llama.cpp: {agree:.4f}; llama.cpp flash-attn vs not: {self_agree:.4f}")
    assert agree >= min(0.98, self_agree - 0.01)


def test_perplexity_within_1pct_of_llama_cpp(both_logits):
    ws, ours, ref = both_logits
    ppl = []
    for logits in (ours, ref):
        nll = [score_window(lg, w, CTX // 2) for lg, w in zip(logits, ws)]
        ppl.append(math.exp(sum(s for s, _ in nll) / sum(n for _, n in nll)))
    print(f"perplexity edgellm {ppl[0]:.4f} llama.cpp {ppl[1]:.4f}")
    assert abs(ppl[0] / ppl[1] - 1) < 0.01


PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "Q: What is 12 times 7?\nA:",
]


def greedy_llama(llm, prompt_ids, n=32, scores=None):
    """llama.cpp's greedy continuation; its logits at each step are appended to `scores` if given."""
    llm.reset()
    llm.eval(prompt_ids)
    out = []
    for _ in range(n):
        row = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
        if scores is not None:
            scores.append(row)
        t = int(np.argmax(row))
        out.append(t)
        llm.eval([t])
    return out


def greedy_ours(engine, prompt_ids, n=32):
    cache = engine.new_cache(256)
    logits = engine.prefill(np.array(prompt_ids), cache)
    out = []
    for _ in range(n):
        t = int(np.argmax(logits))
        out.append(t)
        logits = engine.decode(t, cache)
    return out


def first_difference(a, b) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))


def test_greedy_continuations_match_llama_cpp_exact_weights(f32_model, llama_cpp):
    from edgellm.runtime.engine import Engine
    eng = Engine(f32_model, n_ctx=256, threads=2)
    llm = llama_cpp.Llama(model_path=str(f32_model), n_ctx=256, logits_all=True, n_threads=2, verbose=False)
    same = 0
    for p in PROMPTS:
        ids = eng.tokenizer.encode(p, add_bos=None)
        ours, ref = greedy_ours(eng, ids), greedy_llama(llm, ids)
        same += ours == ref
        if ours != ref:
            print("differs:", repr(p), repr(eng.tokenizer.decode(ours)), "|", repr(eng.tokenizer.decode(ref)))
    llm.close()
    assert same >= 4


def test_greedy_continuations_quantized(engine, llm):
    # llama.cpp rounds activations to 8 bits per block before every quantized product; edgellm keeps them f32. Long
    # greedy runs therefore part at near-ties, and where they part depends on the CPU's kernels (llama.cpp's own
    # flash-attention path parted from its default path on 4 of these 5 prompts, at tokens 8-22, on an AVX-512
    # machine). What must hold: where edgellm's text parts from llama.cpp's, llama.cpp itself hardly preferred its
    # token — its logit margin over edgellm's choice is below 1.0 (measured at most 0.33; llama.cpp's flash path
    # parted at margins up to 0.27). A bug (a wrong weight, rope or cache row) parts at a confident position.
    margins = []
    for p in PROMPTS:
        ids = engine.tokenizer.encode(p, add_bos=None)
        scores = []
        ref, ours = greedy_llama(llm, ids, scores=scores), greedy_ours(engine, ids)
        i = first_difference(ours, ref)
        if i < len(ref):
            margins.append((i, float(scores[i][ref[i]] - scores[i][ours[i]])))
    print(f"edgellm parts from llama.cpp (position, llama.cpp's logit margin): {margins}")
    assert all(m < 1.0 for _, m in margins)


def test_generate_api_streams_text(engine):
    out = generate(engine, "The capital of France is", max_tokens=8, sampler=SamplerSettings(temp=0))
    assert isinstance(out, str) and len(out) > 0

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


@pytest.fixture(scope="module")
def both_logits(engine, llm, text):
    toks = np.array(engine.tokenizer.encode(text, add_bos=False, parse_special=False))
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
    return ws, ours, ref


def test_teacher_forced_top1_agreement(both_logits):
    _, ours, ref = both_logits
    a = np.concatenate([o[:-1].argmax(-1) for o in ours])
    b = np.concatenate([r[:-1].argmax(-1) for r in ref])
    agree = (a == b).mean()
    print(f"top-1 agreement with llama.cpp: {agree:.4f} over {len(a)} positions")
    assert len(a) >= 3000
    assert agree >= 0.98


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


def test_greedy_continuations_match_llama_cpp(engine, llm):
    same = 0
    for p in PROMPTS:
        ids = engine.tokenizer.encode(p, add_bos=None)
        llm.reset()
        llm.eval(ids)
        ref = []
        for _ in range(32):
            t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            ref.append(t)
            llm.eval([t])
        ours = []
        cache = engine.new_cache(256)
        logits = engine.prefill(ids, cache)
        for _ in range(32):
            t = int(np.argmax(logits))
            ours.append(t)
            logits = engine.decode(t, cache)
        same += ours == ref
        if ours != ref:
            print("differs:", repr(p), engine.tokenizer.decode(ours), "|", engine.tokenizer.decode(ref))
    assert same >= 4


def test_generate_api_streams_text(engine):
    out = generate(engine, "The capital of France is", max_tokens=8, sampler=SamplerSettings(temp=0))
    assert isinstance(out, str) and len(out) > 0

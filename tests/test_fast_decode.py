"""The compiled decode step (runtime/fast_decode.py, kernels/decode_step.py) against the models' own forward, the
reference: the same logits (float tolerance; in practice the same bits) and the same greedy text, on the default
model, a tiny random Llama, a pruned `deci` file and a BitNet file; batched steps over caches at different
positions; the cases it declines fall back to the forward."""
from __future__ import annotations

import gguf
import numpy as np
import pytest

from edgellm.kernels import simd
from edgellm.runtime.engine import Engine
from edgellm.runtime.errors import ArgumentError, CacheError
from edgellm.runtime.fast_decode import FastDecode
from tiny_models import write_tiny, write_tiny_bitnet

QT = gguf.GGMLQuantizationType
TINY = dict(qtype=QT.Q4_1, embd_qtype=QT.Q8_0)  # as the default model: the same compiled step serves all three
pytestmark = pytest.mark.skipif(simd.target_isa() is None,
                                reason="no integer dot-product instructions here: the decode step is not built")


def reference_step(engine, tokens, caches):
    """The model's own forward for one token of each cache."""
    return engine.model.forward(np.asarray(tokens, dtype=np.int64), [(c, 1) for c in caches], logits="last")


def assert_same_steps(engine, prompt, n=6, kv_check=True):
    """Greedy decoding twice from one prefilled cache: the compiled step on one copy, the forward on the other."""
    assert engine.fast is not None, FastDecode.why_not
    ca = engine.new_cache(64)
    engine.prefill(np.asarray(prompt), ca)
    cb = ca.fork()
    tok = int(prompt[-1])
    for _ in range(n):
        a = engine.fast.run(np.array([tok], dtype=np.int64), [ca])
        b = reference_step(engine, [tok], [cb])
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())
        assert a.argmax() == b.argmax()
        tok = int(b.argmax())
    assert ca.n == cb.n
    if kv_check:
        for li in range(engine.cfg.n_layer):
            np.testing.assert_allclose(ca.keys(li), cb.keys(li), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(ca.values(li), cb.values(li), rtol=1e-5, atol=1e-6)


def test_default_model_step_and_greedy_text(engine):
    ids = engine.tokenizer.encode("The capital of France is", add_bos=None)
    assert_same_steps(engine, ids, n=6)
    ref = Engine(engine.path, n_ctx=256, threads=2, fast=False)
    assert ref.fast is None
    for e in (engine, ref):
        c = e.new_cache(256)
        logits = e.prefill(np.array(ids), c)
        out = []
        for _ in range(24):
            out.append(int(logits.argmax()))
            logits = e.decode(out[-1], c)
        e.greedy = out
    assert engine.greedy == ref.greedy, (engine.tokenizer.decode(engine.greedy), ref.tokenizer.decode(ref.greedy))


@pytest.mark.parametrize("arch", ["llama", "deci"])
def test_tiny_llama_and_pruned_deci(tmp_path, arch):
    e = Engine(write_tiny(tmp_path / f"{arch}.gguf", arch, **TINY), n_ctx=64, threads=2)
    assert_same_steps(e, [5, 70, 3, 9, 100], n=5)


def test_tiny_bitnet(tmp_path):
    e = Engine(write_tiny_bitnet(tmp_path / "b.gguf", embd_qtype=QT.Q8_0), n_ctx=64, threads=2)
    assert_same_steps(e, [5, 70, 3, 9, 100], n=5)


def test_batched_step_over_caches_at_different_positions(tmp_path):
    e = Engine(write_tiny(tmp_path / "l.gguf", "llama", **TINY), n_ctx=64, threads=2)
    caches = [e.new_cache(64) for _ in range(3)] + [e.new_cache(40)]
    for i, c in enumerate(caches):
        e.prefill(np.arange(1, 2 + 3 * i), c)
    refs = [c.fork() for c in caches]
    toks = np.array([7, 8, 9, 10])
    for _ in range(3):
        a = e.decode_batch(toks, caches)  # the compiled step, one call for all four
        b = np.stack([reference_step(e, [t], [c])[0] for t, c in zip(toks, refs)])  # one forward per sequence
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())
        toks = b.argmax(-1)
    assert [c.n for c in caches] == [c.n for c in refs]


def test_caches_growing_under_the_step(tmp_path, monkeypatch):
    """Caches allocate 8 positions and grow as they fill (kv_cache.INITIAL_CAP): batched steps across the growth
    of each cache equal the forward on caches allocated whole."""
    from edgellm.runtime import kv_cache
    e = Engine(write_tiny(tmp_path / "l.gguf", "llama", **TINY), n_ctx=64, threads=2)
    refs = [e.new_cache(64) for _ in range(3)]
    monkeypatch.setattr(kv_cache, "INITIAL_CAP", 8)
    caches = [e.new_cache(64) for _ in range(3)]
    assert [c.cap for c in caches] == [8] * 3 and refs[0].cap == 64
    for i, (c, r) in enumerate(zip(caches, refs)):
        e.prefill(np.arange(1, 4 + 2 * i), c)
        e.prefill(np.arange(1, 4 + 2 * i), r)
    toks = [3, 4, 5]
    for _ in range(12):  # positions 3 .. 19 cross 8 and 16
        a = e.fast.run(np.array(toks, dtype=np.int64), caches)
        b = reference_step(e, toks, refs)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())
        toks = [int(t) for t in b.argmax(1)]
    assert [c.cap for c in caches] == [16, 32, 32] and [c.n for c in caches] == [r.n for r in refs]
    for c, r in zip(caches, refs):
        for li in range(e.cfg.n_layer):
            np.testing.assert_array_equal(c.keys(li), r.keys(li))
            np.testing.assert_array_equal(c.values(li), r.values(li))


@pytest.mark.slow  # a step of its own to compile (another KV storage)
def test_quantized_kv_cache(tmp_path):
    e = Engine(write_tiny(tmp_path / "l.gguf", "llama", n_embd=128, **TINY), n_ctx=64, threads=2, kv="q8_0")
    assert_same_steps(e, [5, 70, 3, 9, 100], n=5)
    c = e.new_cache(64)  # an empty quantized cache: its first token fixes the centring offsets, the forward does that
    assert not e.fast.accepts([c])
    e.decode(3, c)
    assert c.n == 1 and e.fast.accepts([c])


def test_what_the_step_declines(tmp_path):
    f32 = Engine(write_tiny(tmp_path / "f.gguf", "llama", n_embd=128), n_ctx=64, threads=2)  # F32: BLAS, no step
    assert f32.fast is None and "integer" in FastDecode.why_not
    e = Engine(write_tiny(tmp_path / "l.gguf", "llama", **TINY), n_ctx=64, threads=2)
    c = e.new_cache(64)
    e.prefill([1, 2, 3], c)
    assert not e.fast.accepts([f32.new_cache(64)])  # another model's cache
    with pytest.raises(CacheError):
        e.decode(1, f32.new_cache(64))
    with pytest.raises(ArgumentError):
        e.decode(10 ** 6, c)  # a token id out of range: checked before the step
    assert c.n == 3

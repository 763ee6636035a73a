"""KV caches and attention modes through the engine: compressed caches, delta attention, fork/truncate, batched
decode, statistics; and on the real model, perplexity of θ = 0 (= dense), q8_0 and q4_0 against f32."""
from __future__ import annotations

import json

import numpy as np
import pytest

from edgellm.runtime.engine import Engine
from edgellm.runtime.errors import CacheError
from edgellm.models.cache_spec import CacheSpec
from edgellm.runtime.kv_cache import AttentionConfig, KVCache

from tiny_models import write_tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # head_dim 32: one quantization block per token and head
    return write_tiny_llama(tmp_path_factory.mktemp("tinykv") / "tiny.gguf", n_embd=128, n_ff=192, n_ctx=256)


def run(eng, toks, split=20):
    # full prefill, and (chunked prefill + decodes), both from empty caches -> logits (N, V) each
    full = eng.prefill(toks, eng.new_cache(), logits="all")
    cache = eng.new_cache()
    inc = [eng.prefill(toks[:split], cache, logits="all")] + [eng.decode(int(t), cache)[None] for t in toks[split:]]
    return full, np.concatenate(inc)


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("kv,tol", [("f16", 2e-3), ("q8_0", 2e-2), ("q4_0", 1.5e-1), ("q8_0,q4_0", 1.5e-1)])
def test_compressed_kv_follows_f32(tiny, kv, tol):
    toks = np.random.default_rng(1).integers(0, 260, 60)
    ref_full, ref_inc = run(Engine(tiny, n_ctx=128, threads=2), toks)
    eng = Engine(tiny, n_ctx=128, threads=2, kv=kv)
    full, inc = run(eng, toks)
    assert rel(full, ref_full) < tol and rel(inc, ref_inc) < tol
    assert eng.cache.nbytes_per_token == eng.kv_bytes_per_token < 2 * 2 * 2 * 32 * 4  # below f32's


@pytest.mark.parametrize("kv,attn", [("f32", "dense"), ("f16", "dense"), ("q8_0", "dense"), ("q8_0,q4_0", "dense"),
                                     ("f32", "delta")])
def test_caches_grow_as_the_sequence_does(tiny, kv, attn, monkeypatch):
    """A cache allocates INITIAL_CAP positions and grows (at least doubling, at most n_ctx) as prefill, decode, fork
    and restore need: the same logits and contents as a cache allocated whole."""
    from edgellm.runtime import kv_cache
    kw = dict(n_ctx=128, threads=2, kv=kv, attn=attn) | (dict(delta_threshold=0.2, delta_window=8) if attn == "delta"
                                                          else {})
    toks = np.random.default_rng(7).integers(0, 260, 90)
    ref_full, ref_inc = run(Engine(tiny, **kw), toks)
    monkeypatch.setattr(kv_cache, "INITIAL_CAP", 16)
    eng = Engine(tiny, **kw)
    full, inc = run(eng, toks)  # prefill of 90 at once: 16 -> 128; 20 then decodes: 16 -> 32 -> 64 -> 128
    np.testing.assert_allclose(full, ref_full, rtol=1e-5, atol=1e-5 * np.abs(ref_full).max())
    np.testing.assert_allclose(inc, ref_inc, rtol=1e-5, atol=1e-5 * np.abs(ref_inc).max())
    c = eng.new_cache()
    assert c.cap == 16
    eng.prefill(toks[:40], c)
    assert c.cap == 64 and c.version == 2
    f = c.fork()  # a fork allocates what it copies
    assert f.cap == 64 and f.n == 40
    r = eng.new_cache()
    r.restore([c.snapshot(0, 40)])
    assert r.cap >= 40
    for x in (f, r):
        for li in range(eng.cfg.n_layer):
            np.testing.assert_array_equal(x.keys(li), c.keys(li))
            np.testing.assert_array_equal(x.values(li), c.values(li))
    np.testing.assert_array_equal(eng.decode(5, f), eng.decode(5, r))
    # a fork of a prefix into a used, emptied cache: it grows to what it copies, and equals fork then truncate
    g = eng.new_cache()
    eng.prefill(toks[50:60], g)
    g.truncate(0)
    h, t = c.fork(24, into=g), c.fork()
    t.truncate(24)
    assert h is g and h.n == 24 and h.cap == 32 and c.n == 40
    np.testing.assert_array_equal(eng.decode(5, h), eng.decode(5, t))
    other = Engine(tiny, **(kw | dict(kv="f16" if kv == "f32" else "f32"))).new_cache()
    with pytest.raises(CacheError):
        c.fork(10, into=other)  # a cache of another storage type
    c.truncate(0)  # emptied, it keeps its allocation
    assert c.cap == 64
    with pytest.raises(ValueError):
        c.reserve(129)


def test_delta_theta_zero_is_dense_and_counts_nothing_skipped(tiny):
    toks = np.random.default_rng(2).integers(0, 260, 70)
    ref_full, ref_inc = run(Engine(tiny, n_ctx=128, threads=2), toks)
    eng = Engine(tiny, n_ctx=128, threads=2, attn="delta", delta_threshold=0.0, delta_window=8)
    full, inc = run(eng, toks)
    assert rel(full, ref_full) < 1e-4 and rel(inc, ref_inc) < 1e-4
    st = eng.attention_stats(per_head=True)
    assert st["sparsity"] < 1e-3 and st["prefill"]["macs_outside_window"] > 0 and st["decode"]["macs_outside_window"] > 0
    assert len(st["decode"]["per_head"]) == eng.cfg.n_layer and len(st["decode"]["per_head"][0]) == eng.cfg.n_head


def test_delta_skips_work_and_stays_close(tiny):
    toks = np.random.default_rng(3).integers(0, 260, 80)
    ref_full, _ = run(Engine(tiny, n_ctx=128, threads=2), toks)
    eng = Engine(tiny, n_ctx=128, threads=2, attn="delta", delta_threshold=0.4, delta_window=8)
    full, inc = run(eng, toks)
    st = eng.attention_stats()
    assert 0.05 < st["prefill"]["sparsity"] < 1 and 0.05 < st["decode"]["sparsity"] < 1
    assert rel(full, ref_full) < 0.1
    # prefill and decode run the same recurrence: a chunked prefill + decodes equals one prefill
    assert rel(inc, full) < 1e-4


def test_fork_truncate_and_batched_decode_keep_their_state(tiny):
    eng = Engine(tiny, n_ctx=128, threads=2, attn="delta", delta_threshold=0.05, delta_window=4, kv="q8_0")
    rng = np.random.default_rng(4)
    prompts = [rng.integers(0, 260, n) for n in (12, 30, 7)]
    caches = [eng.new_cache() for _ in prompts]
    for p, c in zip(prompts, caches):
        eng.prefill(p, c)
    forks = [c.fork() for c in caches]
    nxt = [11, 12, 13]
    batched = eng.decode_batch(nxt, caches)
    single = np.stack([eng.decode(t, c) for t, c in zip(nxt, forks)])
    np.testing.assert_allclose(batched, single, rtol=0, atol=1e-5 * np.abs(single).max())
    # a fork is independent: decoding on it leaves the parent as it was
    parent = caches[1]
    before = (parent.k.copy(), parent.qhat.copy(), parent.srow.copy(), parent.n)
    child = parent.fork()
    eng.decode(5, child)
    assert np.array_equal(parent.k, before[0]) and np.array_equal(parent.qhat, before[1])
    assert np.array_equal(parent.srow, before[2]) and parent.n == before[3] and child.n == parent.n + 1
    # truncate(0) starts afresh: the same tokens give the same logits as a new cache
    c = caches[0]
    c.truncate(0)
    np.testing.assert_allclose(eng.prefill(prompts[2], c), eng.prefill(prompts[2], eng.new_cache()), rtol=0, atol=0)
    # truncate(n > 0) keeps a usable state (search and chat reuse prefixes)
    c.truncate(3)
    assert np.isfinite(eng.decode(9, c)).all() and c.n == 4


def test_cache_interface_and_readback(tiny):
    eng = Engine(tiny, n_ctx=64, threads=2, kv="q4_0")
    c = eng.new_cache()
    eng.prefill(np.arange(10), c)
    dense = Engine(tiny, n_ctx=64, threads=2)
    f32 = dense.new_cache()
    dense.prefill(np.arange(10), f32)
    for layer in range(eng.cfg.n_layer):
        k, kf = c.keys(layer), f32.keys(layer)
        assert k.shape == kf.shape == (eng.cfg.n_head_kv, 10, eng.cfg.head_dim)
        assert rel(k, kf) < 0.2 and rel(c.values(layer), f32.values(layer)) < 0.2
    assert c.rot_k and c.rot_v and c.center_k
    spec = CacheSpec.kv([(2, 2)] * 2, 32)
    assert KVCache(spec, 8, kv="q8_0", attn=AttentionConfig("delta", (0.1, 0.1))).rot_k is False
    with pytest.raises(ValueError):
        KVCache(CacheSpec.kv([(2, 2)] * 2, 30), 8, kv="q8_0")  # blocks of 32 need head_dim % 32 == 0
    with pytest.raises(ValueError):
        AttentionConfig("delta", (0.1,), window=0)


def test_calibration_reaches_a_target_sparsity(tiny):
    toks = np.random.default_rng(5).integers(0, 260, 200)
    eng = Engine(tiny, n_ctx=256, threads=2, attn="delta", delta_sparsity=0.5, delta_window=16, calib=toks)
    assert len(eng.attn.theta) == eng.cfg.n_layer and all(t > 0 for t in eng.attn.theta)
    eng.attn_stats.reset()
    eng.prefill(toks, eng.new_cache())
    assert abs(eng.attn_stats.sparsity() - 0.5) < 0.1


def test_bad_attention_options(tiny):
    from edgellm.runtime.errors import EdgeLLMError
    for kw in (dict(kv="q5"), dict(attn="sparse"), dict(delta_threshold=0.1), dict(attn="delta", delta_window=0),
               dict(attn="delta", delta_threshold=0.1, delta_sparsity=0.5), dict(attn="delta", delta_sparsity=1.5),
               dict(attn="delta", delta_threshold=-1.0)):
        with pytest.raises(EdgeLLMError):
            Engine(tiny, n_ctx=64, threads=2, **kw)


# ---------------------------------------------------------------- the real model
def ppl(engine_kw, model_path, text, windows=2):
    from edgellm.bench.perplexity import edgellm_perplexity
    eng = Engine(model_path, n_ctx=512, threads=2, **engine_kw)
    return edgellm_perplexity(eng, text, ctx=512, max_windows=windows).ppl, eng


@pytest.mark.slow
def test_real_model_delta_theta0_q8_q4_perplexity(model_path, text, monkeypatch):
    # f32 activations: with llama.cpp's int8 activation blocks (the default where the CPU has integer dot products)
    # the centred keys' last-bit differences flip a few activation roundings and the perplexities part by ~0.4%,
    # which says nothing about the attention arithmetic this compares
    monkeypatch.setenv("EDGELLM_ISA", "none")
    base, _ = ppl({}, model_path, text)
    d0, eng = ppl(dict(attn="delta", delta_threshold=0.0), model_path, text)
    assert abs(d0 / base - 1) < 1e-4, (d0, base)
    q8, _ = ppl(dict(kv="q8_0"), model_path, text)
    q4, _ = ppl(dict(kv="q4_0"), model_path, text)
    print(f"perplexity f32 {base:.4f}, delta θ=0 {d0:.4f}, q8_0 {q8:.4f}, q4_0 {q4:.4f}")
    assert abs(q8 / base - 1) < 0.005
    # the bound. Measured +1.7% (2 windows; +1.8% on 4, +1.7% on 12); llama.cpp's own q4_0 cache costs +5.0%
    # (bench/delta_kv.py kv). With ggml's plain q4_0 scale this was +2.8% to +4.0% on different machines.
    assert abs(q4 / base - 1) < 0.03


def test_cli_perplexity_json_reports_sparsity_and_kv_bytes(model_path, tmp_path, text):
    from test_bad_input import cli
    p = tmp_path / "t.txt"
    p.write_text(text[:6000])
    r = cli("perplexity", str(model_path), "--file", str(p), "--ctx", "128", "--chunks", "1", "--json",
            "--attn", "delta", "--delta-threshold", "0.5", "--delta-window", "16", "--kv", "q8_0")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert 0 < out["sparsity"] < 1 and out["kv_bytes_per_token"] == 30 * 2 * 3 * 2 * 34
    assert out["attn"] == "delta" and out["kv"] == "q8_0" and len(out["sparsity_per_layer"]) == 30


def test_lazy_zeros_is_zeroed_writable_memory_of_the_shape_asked():
    from edgellm.runtime.cache_base import lazy_zeros
    for shape, dtype in (((3, 4), np.float32), ((2, 3, 1 << 18), np.uint16), ((1 << 20,), np.int8)):
        a = lazy_zeros(shape, dtype)
        assert a.shape == shape and a.dtype == dtype and a.flags.writeable and a.flags.c_contiguous
        assert not a.any()
        a[..., -1] = 7
        assert a.sum() == 7 * (a.size // shape[-1])

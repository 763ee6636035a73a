"""The `linear` variant (LAWCAT-style gated linear attention): chunked == recurrent (torch and the Numba kernels vs a
NumPy float64 recurrence), the written GGUF's edgellm logits == the torch reference, a constant decode state, the
cache interface, the pipeline with both healing stages, and its option errors."""
from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from edgellm.bench import make_checkpoints as mk  # noqa: E402
from edgellm.converters import linear as L  # noqa: E402
from edgellm.converters.checkpoint import ConversionError  # noqa: E402
from edgellm.converters.variant import convert_variant, load_teacher, transform_model  # noqa: E402
from edgellm.kernels import linear_attention as K  # noqa: E402
from edgellm.runtime.engine import Engine  # noqa: E402
from edgellm.runtime.errors import CacheError, EdgeLLMError  # noqa: E402

torch.set_num_threads(2)
EPS = np.float32(1e-6)


def random_inputs(B=2, H=4, Hkv=2, T=45, d=8, seed=0, fmap="elu1"):
    g = torch.Generator().manual_seed(seed)
    fq = L.phi(torch.randn(B, H, T, d, generator=g) * 2, fmap)
    fk = L.phi(torch.randn(B, Hkv, T, d, generator=g) * 2, fmap)
    v = torch.randn(B, Hkv, T, d, generator=g)
    la = torch.nn.functional.logsigmoid(torch.randn(B, Hkv, T, d, generator=g) * 3)  # strong and weak decays
    la = la.clamp_min(L.LOG_DECAY_MIN)
    la[0, 0, :20] = L.LOG_DECAY_MIN  # the strongest decay the model allows, over a whole chunk
    return fq, fk, v, la


def np_tok(x, b=0):  # (B, heads, T, d) -> (T, heads, d) contiguous
    return np.ascontiguousarray(x[b].transpose(0, 1).numpy())


@pytest.mark.parametrize("fmap", L.FEATURE_MAPS)
def test_torch_chunked_equals_recurrent(fmap):
    fq, fk, v, la = random_inputs(fmap=fmap)
    o1, (S1, z1) = L.gla_recurrent(fq, fk, v, la)
    for chunk in (1, 7, 16):
        o2, (S2, z2) = L.gla_chunked(fq, fk, v, la, chunk=chunk)
        torch.testing.assert_close(o2, o1, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(S2, S1, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(z2, z1, rtol=1e-4, atol=1e-4)
    S0, z0 = torch.rand(2, 2, 8, 8), torch.rand(2, 2, 8) + 1  # the one-chunk form (ONNX) from a given state
    o3, (S3, _) = L.gla_parallel(fq, fk, v, la, state=(S0, z0))
    o4, (S4, _) = L.gla_recurrent(fq, fk, v, la, state=(S0, z0))
    torch.testing.assert_close(o3, o4, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(S3, S4, rtol=1e-4, atol=1e-4)
    with pytest.raises(ConversionError, match="too long"):
        L.gla_chunked(fq, fk, v, la, chunk=32)
    # the state carries across calls: two pieces == one
    a, st = L.gla_chunked(*(x[:, :, :20] for x in (fq, fk, v, la)), chunk=8)
    b, _ = L.gla_chunked(*(x[:, :, 20:] for x in (fq, fk, v, la)), chunk=8, state=st)
    torch.testing.assert_close(torch.cat([a, b], 2), o1, rtol=1e-4, atol=1e-5)


def test_numba_kernels_equal_numpy_recurrence():
    fq, fk, v, la = (np_tok(x) for x in random_inputs(T=70))
    T, H, d = fq.shape
    Hkv = fk.shape[1]
    S0 = np.random.default_rng(1).random((Hkv, d, d)).astype(np.float32)  # a state from earlier tokens
    z0 = np.random.default_rng(2).random((Hkv, d)).astype(np.float32) + 1
    ref, Sr, zr = K.gla_ref(fq, fk, v, la, S0, z0, float(EPS))
    for chunk in (1, 16, 32, 128):
        S, z, out = S0.copy(), z0.copy(), np.empty((T, H, d), np.float32)
        K.gla_chunked(fq, fk, v, la, S, z, chunk, EPS, out)
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(S, Sr, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(z, zr, rtol=1e-4, atol=1e-4)
    S, z, o = S0.copy(), z0.copy(), np.empty((H, d), np.float32)
    for t in range(T):  # recurrent decode, token by token
        K.gla_decode(fq[t], fk[t], v[t], la[t], S, z, EPS, o)
        np.testing.assert_allclose(o, ref[t], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(S, Sr, rtol=1e-4, atol=1e-4)
    # ... and the torch reference agrees with the NumPy one
    o_t, _ = L.gla_recurrent(*(torch.from_numpy(x).transpose(0, 1)[None] for x in (fq, fk, v, la)),
                             state=(torch.from_numpy(S0)[None], torch.from_numpy(z0)[None]))
    np.testing.assert_allclose(o_t[0].transpose(0, 1).numpy(), ref, rtol=1e-4, atol=1e-5)


def test_causal_conv_kernel():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((12, 4)).astype(np.float32)
    x = rng.standard_normal((30, 12)).astype(np.float32)
    ref, _ = K.causal_conv_ref(x, np.zeros((3, 12), np.float32), w)
    buf, parts = np.zeros((3, 12), np.float32), []
    for a, b in ((0, 2), (2, 3), (3, 17), (17, 30)):  # pieces shorter and longer than K - 1
        out = np.empty((b - a, 12), np.float32)
        parts.append(K.causal_conv(x[a:b], buf, w, out).copy())
    np.testing.assert_allclose(np.concatenate(parts), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(buf, x[-3:])
    t, _ = L.causal_conv(torch.from_numpy(x)[None], torch.from_numpy(w))
    np.testing.assert_allclose(t[0].numpy(), ref, rtol=1e-5, atol=1e-5)
    xt = torch.from_numpy(x)[None]  # identity init: a delta at the current token
    ident = torch.zeros(12, 4)
    ident[:, -1] = 1
    torch.testing.assert_close(L.causal_conv(xt, ident)[0], xt)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("linear")
    src = d / "tiny"
    mk.make(src, "tiny-llama")
    ckpt, teacher = load_teacher(src)
    return d, src, ckpt, teacher


def perturbed_student(teacher, seed=1, **opts):
    """The transform, with conv / gate moved away from their initialisation (so that the test sees them)."""
    st = transform_model(copy.deepcopy(teacher), "linear", **opts)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in L.linear_layers(st):
            a.q_conv.add_(0.3 * torch.randn(a.q_conv.shape, generator=g))
            a.k_conv.add_(0.3 * torch.randn(a.k_conv.shape, generator=g))
            a.gate.weight.normal_(0, 0.05, generator=g)
            a.gate.bias.normal_(2, 1.5, generator=g)
    return st


def test_student_init_and_chunked_equals_recurrent(tiny):
    _, _, _, teacher = tiny
    st = transform_model(copy.deepcopy(teacher), "linear")
    a = L.linear_layers(st)[0]
    assert torch.equal(a.q_proj.weight, teacher.model.layers[0].self_attn.q_proj.weight)
    alpha = torch.sigmoid(a.gate.bias)
    assert 1 - alpha.max() > 1 / 1100 and 1 - alpha.min() < 1 / 15  # α ≈ 1, multi-scale
    st = perturbed_student(teacher, chunk=8)
    x = torch.randn(2, 37, teacher.config.hidden_size)
    for a in L.linear_layers(st)[:2]:
        o1, s1 = a.step(x, recurrent=True)
        o2, s2 = a.step(x)
        torch.testing.assert_close(o2, o1, rtol=1e-4, atol=1e-5)
        p, state = a.step(x[:, :30])  # chunked prefill, then token by token from its state
        rest = []
        for t in range(30, 37):
            o, state = a.step(x[:, t:t + 1], state, recurrent=True)
            rest.append(o)
        torch.testing.assert_close(torch.cat([p] + rest, 1), o1, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fmap", L.FEATURE_MAPS)
def test_gguf_logits_match_torch_reference(tiny, fmap):
    d, _, ckpt, teacher = tiny
    st = perturbed_student(teacher, feature_map=fmap, chunk=16)
    ids = np.random.default_rng(0).integers(3, teacher.config.vocab_size, 70)
    with torch.no_grad():
        ref = st(input_ids=torch.tensor(ids)[None]).logits[0].numpy()
    path = d / f"lin-{fmap}.gguf"
    L.write_linear_gguf(st, ckpt, path, "f32")
    eng = Engine(path, n_ctx=128, threads=2)
    assert eng.cfg.arch == "edgellm-linear" and eng.kv_bytes_per_token == 0
    full = eng.prefill(ids, eng.new_cache(128), logits="all", chunk=50)  # engine chunks: the state carries over
    np.testing.assert_allclose(full, ref, rtol=1e-4, atol=2e-4)
    c = eng.new_cache(128)
    eng.prefill(ids[:40], c)
    dec = np.stack([eng.decode(int(t), c) for t in ids[40:]])  # recurrent decode == the chunked reference
    np.testing.assert_allclose(dec, ref[40:], rtol=1e-4, atol=2e-4)
    # batched decode of two forks == one at a time
    a = c.fork()
    b = c.fork()
    both = eng.decode_batch([5, 7], [a, b])
    np.testing.assert_allclose(both[0], eng.decode(5, c.fork()), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(both[1], eng.decode(7, c), rtol=1e-5, atol=1e-5)


def test_state_cache_constant_and_interface(tiny):
    d, _, ckpt, teacher = tiny
    path = d / "lin-q8.gguf"
    L.write_linear_gguf(transform_model(copy.deepcopy(teacher), "linear"), ckpt, path, "q8_0")
    eng = Engine(path, n_ctx=4096, threads=2)
    small, big = eng.new_cache(64), eng.new_cache(4096)
    assert small.state_nbytes == big.state_nbytes == eng.model.state_bytes() > 0
    assert small.nbytes_per_token == 0
    c = eng.new_cache(256)
    eng.prefill(np.arange(3, 40), c)
    nb = c.state_nbytes
    f = c.fork()
    eng.decode(5, f)
    assert f.n == c.n + 1 and not np.array_equal(f.S, c.S) and c.state_nbytes == nb  # the fork is independent
    c.truncate(c.n)  # a no-op
    with pytest.raises(CacheError, match="cannot go back"):
        c.truncate(10)
    assert isinstance(CacheError("x"), EdgeLLMError)
    c.truncate(0)
    assert c.n == 0 and not c.S.any() and not c.conv_q.any()
    # from the start again == a new cache
    np.testing.assert_allclose(eng.prefill(np.arange(3, 20), c), eng.prefill(np.arange(3, 20), eng.new_cache(64)),
                               atol=1e-6)


def test_bad_metadata_is_a_clear_error(tiny):
    import gguf
    from edgellm.runtime.errors import GGUFError
    d, _, ckpt, teacher = tiny
    st = transform_model(copy.deepcopy(teacher), "linear")
    st.linear_config["feature_map"] = "relu"
    path = d / "bad.gguf"
    L.write_linear_gguf(st, ckpt, path, "f32")
    with pytest.raises(GGUFError, match="feature_map"):
        Engine(path, n_ctx=64, threads=2)
    assert gguf  # (gguf-py wrote it; the runtime refused it)


def test_pipeline_heals_both_stages_and_options(tiny, tmp_path):
    d, src, _, _ = tiny
    text = open(__file__.replace("test_linear.py", "data/shakespeare_60k.txt")).read()
    logs = []
    r = convert_variant(src, tmp_path / "o.gguf", "linear", {"conv_kernel": 3}, heal_steps=4, calib=text[:20000],
                        eval_text=text[40000:44000], seq_len=32, n_calib=8, n_eval=2, outtype="f16", threads=2,
                        log=logs.append)
    assert r["kv_bytes_per_token"] == 0 and r["params"] > r["params_original"]
    assert any(m.startswith("heal-attn") for m in logs) and any(m.startswith("heal-kl") for m in logs)
    eng = Engine(tmp_path / "o.gguf", n_ctx=64, threads=2)
    assert eng.model.K == 3
    for bad in ({"conv_kernel": 0}, {"kv_rank": 8}, {"feature_map": "relu"}):
        with pytest.raises(ConversionError):
            L.Linear(**bad)


def test_onnx_with_state_matches_torch_reference(tiny, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    _, _, ckpt, teacher = tiny
    st = perturbed_student(teacher)
    ids = np.random.default_rng(0).integers(3, teacher.config.vocab_size, (2, 30))
    with torch.no_grad():
        ref = st(input_ids=torch.tensor(ids)).logits.numpy()
    L.write_linear_onnx(st, ckpt, tmp_path / "onnx")
    sess = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [n for n, _ in L.state_shapes(st, 2)]
    state = {n: np.zeros(s, np.float32) for n, s in L.state_shapes(st, 2)}
    logits = []
    for a, b in ((0, 17), (17, 18), (18, 30)):  # a prompt, one decode step, more: the state goes round
        res = sess.run(None, {"input_ids": ids[:, a:b], **state})
        logits.append(res[0])
        state = dict(zip(names, res[1:]))
    np.testing.assert_allclose(np.concatenate(logits, 1), ref, rtol=1e-4, atol=1e-4)
    # the folder runs behind the engine API (`edgellm run OUT`): state caches, batched decode, fork, truncate
    from edgellm.runtime.engine import load
    eng = load(str(tmp_path / "onnx"), n_ctx=64, threads=2)
    c0, c1 = eng.new_cache(), eng.new_cache()
    np.testing.assert_allclose(eng.prefill(ids[0, :17], c0, logits="all"), ref[0, :17], rtol=1e-4, atol=1e-4)
    eng.prefill(ids[1, :20], c1)
    fork = c0.fork()
    np.testing.assert_allclose(eng.decode_batch([ids[0, 17], ids[1, 20]], [c0, c1]), np.stack([ref[0, 17], ref[1, 20]]),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(eng.decode(int(ids[0, 17]), fork), ref[0, 17], rtol=1e-4, atol=1e-4)
    assert c0.n == 18 and c0.nbytes_per_token == 0 and c0.state_nbytes > 0 and not c0.can_truncate(5)
    with pytest.raises(CacheError):
        c0.truncate(5)
    with pytest.raises(ConversionError, match="fp32"):
        L.write_linear_onnx(st, ckpt, tmp_path / "onnx4", "int4")

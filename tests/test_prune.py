"""prune (Adapt-Pruner): structured pruning to per-layer widths, written as llama.cpp's `deci`.

Oracles: transformers' forward of the pruned student (shrunk nn.Linear layers), and llama.cpp running the same
GGUF. A tiny random Llama with SmolLM2's grouping (3 query heads per KV head, several KV groups a layer) keeps it fast.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from edgellm.bench import make_checkpoints as mk  # noqa: E402
from edgellm.converters.checkpoint import ConversionError, HFCheckpoint  # noqa: E402
from edgellm.converters.prune import (ALIGN_FF, DAMP, Prune, proj_moments, nonembedding_params,  # noqa: E402
                                      refit_columns, shrink_layer, widths, write_pruned_gguf)
from edgellm.converters.variant import Context, n_params, transform_model  # noqa: E402
from edgellm.runtime.engine import Engine  # noqa: E402
from edgellm.runtime.errors import GGUFError  # noqa: E402

from test_convert import llama_logits  # noqa: E402

IDS = np.random.default_rng(0).integers(3, 49152, 40)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, model_path):
    """4 layers, hidden 64, 6 query heads in 3 KV groups of head size 32, 128 neurons, llama3 rope, tied (SmolLM2's
    vocabulary: the embedding is most of the parameters, so stages are made small)."""
    out = tmp_path_factory.mktemp("ck") / "tiny-prune"
    cfg = transformers.LlamaConfig(**dict(mk.TINY_LLAMA, num_hidden_layers=4, num_attention_heads=6,
                                          num_key_value_heads=3, head_dim=32, hidden_size=64, intermediate_size=128,
                                          vocab_size=49152))
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(cfg).float()
    with torch.no_grad():  # weights large enough that each layer changes its input (random init is near-identity)
        for name, p in m.named_parameters():
            if p.ndim == 2 and "embed" not in name:
                p.normal_(0, 0.12)
    m.save_pretrained(str(out))
    mk.save_tokenizer(out, str(model_path))
    return out


def load(ck):
    m = transformers.AutoModelForCausalLM.from_pretrained(str(ck), dtype=torch.float32)
    m.config._attn_implementation = "eager"
    return m.eval()


def logits(m, ids):
    with torch.no_grad():
        return m(input_ids=torch.tensor(np.asarray(ids))[None]).logits[0].numpy()


def ours(path, ids):
    eng = Engine(path, n_ctx=128, threads=2, kv="f32")  # (f32 K/V: computed in f32, as the references)
    full = eng.prefill(np.asarray(ids), eng.new_cache(128), logits="all")
    cache = eng.new_cache(128)
    eng.prefill(np.asarray(ids[:-1]), cache)
    np.testing.assert_allclose(eng.decode(int(ids[-1]), cache), full[-1], atol=1e-4)  # cache = recompute
    return eng, full


def calib(n=8, T=48, seed=1):
    return torch.from_numpy(np.random.default_rng(seed).integers(3, 2000, (n, T)))


def test_pruning_nothing_is_the_identity(ckpt):
    m = load(ckpt)
    ref = logits(m, IDS)
    same = transform_model(copy.deepcopy(m), "prune", calib=calib(), target_params=1.0)
    np.testing.assert_array_equal(logits(same, IDS), ref)
    # shrinking to every unit rebuilds the modules and computes the same
    s = copy.deepcopy(m)
    for L in s.model.layers:
        shrink_layer(L, range(3), range(128), 32)
    np.testing.assert_array_equal(logits(s, IDS), ref)


def test_refit_is_the_ridge_least_squares_fit():
    """refit_columns against NumPy's lstsq of the augmented ridge problem on the inputs themselves."""
    rng = np.random.default_rng(3)
    X = rng.standard_normal((500, 24)) @ rng.standard_normal((24, 24))  # correlated inputs
    W = rng.standard_normal((10, 24))
    keep = np.array([0, 2, 3, 7, 8, 11, 15, 16, 20, 23])
    C = torch.from_numpy(X.T @ X)
    got = refit_columns(torch.from_numpy(W), C, keep).numpy()
    lam = DAMP * np.trace(X.T @ X) / 24
    A = np.vstack([X[:, keep], np.sqrt(lam) * np.eye(len(keep))])
    b = np.vstack([X @ W.T, np.zeros((len(keep), 10))])
    np.testing.assert_allclose(got, np.linalg.lstsq(A, b, rcond=None)[0].T, rtol=1e-8, atol=1e-9)
    # and the refit's output error on those inputs is below dropping the columns as they are
    err = lambda w: np.linalg.norm(X @ W.T - X[:, keep] @ w.T)  # noqa: E731
    assert err(got) < 0.9 * err(W[:, keep])


def test_refit_lowers_the_pruning_error(ckpt):
    """proj_moments = the hooked inputs' second moment; shrinking with the refit changes the calibration logits
    less than shrinking without it."""
    m = load(ckpt)
    x = calib(8, 32)
    moments, n = proj_moments(m, x, 4)
    C_o, C_d = moments[1]
    seen = []
    h = m.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda mod, a: seen.append(a[0].reshape(-1, 128)))
    with torch.no_grad():
        ref = m(input_ids=x).logits
    h.remove()
    X = torch.cat(seen).double()
    assert n == 8 * 32
    np.testing.assert_allclose(C_d.double().numpy(), (X.T @ X).numpy(), rtol=1e-4, atol=1e-3)
    assert C_o.shape == (6 * 32, 6 * 32)
    plain, fitted = copy.deepcopy(m), copy.deepcopy(m)
    for i in range(4):
        shrink_layer(plain.model.layers[i], [0, 2], range(0, 128, 2), 32)
        shrink_layer(fitted.model.layers[i], [0, 2], range(0, 128, 2), 32, moments[i])
    with torch.no_grad():
        e_plain = (plain(input_ids=x).logits - ref).pow(2).mean().item()
        e_fit = (fitted(input_ids=x).logits - ref).pow(2).mean().item()
    assert widths(fitted) == widths(plain) == [(4, 2, 64)] * 4
    assert e_fit < 0.8 * e_plain, (e_fit, e_plain)


def test_pruned_deci_matches_torch_and_llama_cpp(ckpt, tmp_path, llama_cpp):
    m = load(ckpt)
    total = n_params(m)
    target = 1 - 0.5 * (total - m.model.embed_tokens.weight.numel()) / total  # half of the decoder layers
    v = Prune(target_params=target, stage=0.01)
    ctx = Context(teacher=copy.deepcopy(m).requires_grad_(False), calib=calib(), heal_steps=4, batch=4)
    assert v.transform(m, ctx) is m
    st = v.summary
    w = widths(m)
    assert n_params(m) <= target * total * 1.02 and nonembedding_params(m) < 0.6 * nonembedding_params(load(ckpt))
    assert len(set(w)) > 1, w  # per-layer widths: the layers were not pruned alike
    assert all(hkv >= 1 and h == 2 * hkv and f % ALIGN_FF == 0 for h, hkv, f in w)
    assert len(st["stages"]) >= 2 and sum(s["heal_steps"] for s in st["stages"]) == 4
    assert v.kv_bytes_per_token(m) == sum(2 * 2 * hkv * 32 for _, hkv, _ in w)
    ref = logits(m, IDS)
    out = tmp_path / "p.gguf"
    assert write_pruned_gguf(m, HFCheckpoint(ckpt), out, "f32") == "deci"
    eng, a = ours(out, IDS)
    assert eng.model.widths == w and eng.cache.nbytes_per_token == 2 * v.kv_bytes_per_token(m)  # f32 cache
    print(f"widths {w}; edgellm vs torch {np.abs(a - ref).max():.2e}")
    assert np.abs(a - ref).max() <= 1e-3
    b = llama_logits(llama_cpp, out, IDS, type_k=0, type_v=0)  # f32 KV: llama.cpp computes in f32 too
    print(f"llama.cpp vs edgellm {np.abs(b - a).max():.2e}")
    assert np.abs(b - a).max() <= 1e-3
    # quantized: both engines read the same q8_0 file
    q = tmp_path / "p-q8.gguf"
    write_pruned_gguf(m, HFCheckpoint(ckpt), q, "q8_0")
    _, a8 = ours(q, IDS)
    b8 = llama_logits(llama_cpp, q, IDS)
    assert np.abs(a8 - ref).max() <= 0.05 and np.abs(b8 - a8).max() <= 0.05
    for kv in ("q8_0", "f16"):  # per-layer caches in the compressed formats too
        e = Engine(out, n_ctx=128, threads=2, kv=kv)
        assert np.abs(e.prefill(IDS, logits="all") - a).max() <= 0.05
        fork = e.cache.fork()
        np.testing.assert_allclose(e.decode(5), e.decode(5, fork), atol=1e-5)
    # ONNX (the shared builder): each layer's cache has its own head count, run by onnxruntime behind the engine API
    pytest.importorskip("onnxruntime")
    from edgellm.runtime.engine import load as load_engine
    ox = tmp_path / "p-onnx"
    v.write_onnx(m, HFCheckpoint(ckpt), ox, "fp32", None)
    oe = load_engine(str(ox), n_ctx=128, threads=2)
    full = oe.prefill(IDS, oe.new_cache(), logits="all")
    print(f"onnxruntime vs torch {np.abs(full - ref).max():.2e}")
    assert np.abs(full - ref).max() <= 1e-3
    c = oe.new_cache()
    oe.prefill(IDS[:-1], c)
    np.testing.assert_allclose(oe.decode(int(IDS[-1]), c), full[-1], atol=1e-4)
    assert c.nbytes_per_token == 2 * v.kv_bytes_per_token(m)
    assert [tuple(x) for x in __import__("json").loads((ox / "config.json").read_text())["layer_widths"]] == w


def test_uniform_widths_are_written_as_llama(ckpt, tmp_path):
    m = load(ckpt)
    for L in m.model.layers:
        shrink_layer(L, [0, 2], range(64), 32)
    out = tmp_path / "u.gguf"
    assert write_pruned_gguf(m, HFCheckpoint(ckpt), out, "f32") == "llama"
    _, a = ours(out, IDS)
    assert np.abs(a - logits(m, IDS)).max() <= 1e-3


def test_bad_options_and_files(ckpt, tmp_path):
    m = load(ckpt)
    ctx = Context(teacher=m, calib=calib())
    for bad in (0.0, 1.5, -1, "x"):
        with pytest.raises(ConversionError, match="target-params"):
            Prune(target_params=bad).transform(copy.deepcopy(m), ctx)
    with pytest.raises(ConversionError, match="below"):
        Prune(target_params=0.05).transform(copy.deepcopy(m), ctx)
    with pytest.raises(ConversionError, match="calibration"):
        Prune(target_params=0.97).transform(copy.deepcopy(m), Context(teacher=m, calib=torch.zeros((0, 0))))
    # a deci file whose per-layer array has the wrong length is refused before any kernel runs
    import gguf
    from edgellm.runtime.gguf_file import GGUFFile
    good = tmp_path / "g.gguf"
    s = copy.deepcopy(m)
    shrink_layer(s.model.layers[0], [1], range(32), 32)
    write_pruned_gguf(s, HFCheckpoint(ckpt), good, "f32")
    f = GGUFFile(good)
    bad = tmp_path / "bad.gguf"
    w = gguf.GGUFWriter(str(bad), "deci")
    w.add_block_count(4)
    w.add_embedding_length(64)
    w.add_context_length(256)
    w.add_feed_forward_length([32, 128, 128])  # 3 entries for 4 layers
    w.add_head_count([2, 6, 6, 6])
    w.add_head_count_kv([1, 3, 3, 3])
    w.add_key_length(32)
    w.add_value_length(32)
    w.add_vocab_size(49152)
    for name, t in f.tensors.items():
        w.add_tensor(name, np.asarray(t.data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match="feed_forward_length"):
        Engine(bad, n_ctx=64, threads=2)

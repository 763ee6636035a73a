"""MLA variant (X-EcoMLA): SVD transform exactness, latent kernels against NumPy references, the deepseek2 GGUF in
edgellm against the torch reference of the variant, and llama.cpp on the same file."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from edgellm.bench import make_checkpoints as mk  # noqa: E402
from edgellm.converters.checkpoint import ConversionError, HFCheckpoint  # noqa: E402
from edgellm.converters.mla import MLA, gguf_tensors, input_moments, rope_layout, to_mla  # noqa: E402
from edgellm.kernels import mla as K  # noqa: E402
from edgellm.runtime.engine import Engine  # noqa: E402
from edgellm.runtime.errors import CacheError, EdgeLLMError, GGUFError  # noqa: E402

torch.set_num_threads(2)


def llama(n_kv=2, seed=0, sharpen=1.0):
    """A random transformers Llama (GQA 2:1, head 16); `sharpen` scales q so attention is far from uniform."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=n_kv, head_dim=16, vocab_size=49152, rope_theta=10000.0,
                                   tie_word_embeddings=True, max_position_embeddings=512)
    cfg._attn_implementation = "eager"
    m = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for L in m.model.layers:
            L.self_attn.q_proj.weight.mul_(sharpen)
    return m


@pytest.mark.parametrize("share,dr", [("mean", 6), ("split", 8)])
def test_full_ranks_reproduce_q_knope_v_per_layer(share, dr):
    m = llama()
    hd, H, Hkv = 16, 4, 2
    st = to_mla(m, kv_rank=2 * (hd - (dr if share == "mean" else dr // 2) + hd), q_rank=None,
                rope_dim=dr, rope_share=share)  # full ranks: min(d, Hkv (dn + hd)); q: full by default
    dn = st.mla["dn"]
    f = np.sqrt((dn + dr) / hd)  # split: q is scaled so that 1/sqrt(dn + dr) is the original score scale
    x = torch.randn(3, 64)
    for L, blk in zip(m.model.layers, st.layers):
        a, s = blk.self_attn, L.self_attn
        with torch.no_grad():
            q = a.q_b(a.q_a(x)).view(3, H, dn + dr)
            q0 = s.q_proj(x).view(3, H, hd) * f
            ckv = a.kv_a(x)
            c, kpe = ckv[:, :a.r_kv], ckv[:, a.r_kv:].reshape(3, dr // 2, 2)
            k_nope = torch.einsum("tr,hnr->thn", c, a.k_b)
            v = torch.einsum("tr,hvr->thv", c, a.v_b)
            k0 = s.k_proj(x).view(3, Hkv, hd)
            v0 = s.v_proj(x).view(3, Hkv, hd).repeat_interleave(H // Hkv, 1)
        torch.testing.assert_close(v, v0, atol=2e-5, rtol=1e-4)
        for h in range(H):
            g = h // (H // Hkv)
            nope, rope, slots = rope_layout(hd, dr, Hkv, share, g)
            torch.testing.assert_close(q[:, h, :dn], q0[:, h, nope], atol=2e-5, rtol=1e-4)
            q_pe = q[:, h, dn:].reshape(3, dr // 2, 2)
            torch.testing.assert_close(q_pe[:, slots].reshape(3, -1), q0[:, h, rope], atol=2e-5, rtol=1e-4)
            assert q_pe.abs().sum() - q_pe[:, slots].abs().sum() < 1e-4  # other groups' slots are zero
            torch.testing.assert_close(k_nope[:, h], k0[:, g, nope], atol=2e-5, rtol=1e-4)
        if share == "mean":  # the shared rope key: the mean over KV heads
            mean = torch.stack([k0[:, g, rope_layout(hd, dr)[1]] for g in range(Hkv)]).mean(0)
            torch.testing.assert_close(kpe.reshape(3, -1), mean, atol=2e-5, rtol=1e-4)
        else:  # each slot holds its owner's key exactly
            for g in range(Hkv):
                _, rope, slots = rope_layout(hd, dr, Hkv, share, g)
                torch.testing.assert_close(kpe[:, slots].reshape(3, -1), k0[:, g, rope], atol=2e-5, rtol=1e-4)


def test_rope_only_approximation_with_one_kv_head_is_exact_at_short_range():
    """With one KV head and full ranks the only change is that the nope dims lose their rotation: at position 0
    (no rotation anywhere) the first token's logits are exact; later tokens differ, but not by much."""
    m = llama(n_kv=1, sharpen=3.0)
    st = to_mla(m, kv_rank=24, q_rank=64, rope_dim=8)  # full ranks
    ids = torch.randint(3, 49000, (1, 24))
    with torch.no_grad():
        a, b = m(input_ids=ids).logits[0], st(input_ids=ids).logits[0]
    torch.testing.assert_close(b[0], a[0], atol=1e-4, rtol=1e-4)
    assert (b - a).abs().max() > 1e-4  # the approximation is real ...
    assert (b - a).abs().max() < 0.2 * a.abs().max()  # ... and small


def test_low_rank_errors_decrease_with_rank():
    m = llama(sharpen=3.0)
    ids = torch.randint(3, 49000, (1, 24))
    with torch.no_grad():
        ref = m(input_ids=ids).logits
        err = [(to_mla(llama(sharpen=3.0), kv_rank=r, rope_dim=8)(input_ids=ids).logits - ref).abs().max().item()
               for r in (4, 16, 40)]
    assert err[0] > err[1] > err[2]


def kv_projection_error(m, st, x):
    """Mean squared error of the MLA layers' [k_nope; v] (all heads) against the original's, on layer inputs x[i]."""
    H, Hkv, hd = 4, 2, 16
    err = []
    for L, blk, xi in zip(m.model.layers, st.layers, x):
        a, s = blk.self_attn, L.self_attn
        dn, dr = st.mla["dn"], st.mla["dr"]
        with torch.no_grad():
            c = a.kv_a(xi)[:, :a.r_kv]
            k_nope, v = torch.einsum("tr,hnr->thn", c, a.k_b), torch.einsum("tr,hvr->thv", c, a.v_b)
            k0 = s.k_proj(xi).view(-1, Hkv, hd)
            v0 = s.v_proj(xi).view(-1, Hkv, hd).repeat_interleave(H // Hkv, 1)
        e = ((v - v0) ** 2).sum().item()
        for h in range(H):
            nope = rope_layout(hd, dr, Hkv, "split", h // (H // Hkv))[0]
            e += ((k_nope[:, h] - k0[:, h // (H // Hkv), nope]) ** 2).sum().item()
        err.append(e / len(xi))
    return np.array(err)


def test_activation_aware_svd_exact_at_full_rank_and_better_at_low_rank():
    m = llama(sharpen=3.0)
    calib = torch.randint(3, 49000, (6, 32))
    mom = input_moments(m, calib, batch=4)
    xs = [[] for _ in m.model.layers]  # the inputs the moments describe
    hooks = [L.input_layernorm.register_forward_hook(lambda mod, i, o, k=k: xs[k].append(o.detach().reshape(-1, 64)))
             for k, L in enumerate(m.model.layers)]
    with torch.no_grad():
        m(calib)
    for h in hooks:
        h.remove()
    x = [torch.cat(a) for a in xs]
    for mo, xi in zip(mom, x):
        np.testing.assert_allclose(mo, (xi.double().T @ xi.double()).numpy() / len(xi), rtol=1e-6, atol=1e-9)
    full = to_mla(m, moments=mom, kv_rank=2 * (16 - 4 + 16), rope_dim=8)
    assert kv_projection_error(m, full, x).max() < 1e-8
    for r in (4, 12):
        plain = kv_projection_error(m, to_mla(m, kv_rank=r, rope_dim=8), x)
        act = kv_projection_error(m, to_mla(m, moments=mom, kv_rank=r, rope_dim=8), x)
        assert np.all(act < plain), (r, act, plain)  # on the inputs it was fitted to, whitening is optimal


@pytest.mark.parametrize("bad,msg", [(dict(rope_dim=5), "--rope-dim"), (dict(rope_dim=16, rope_share="mean"), "--rope-dim"), (dict(rope_dim=20), "--rope-dim"), (dict(rope_dim=6, rope_share="split"), "--rope-dim"),
                                     (dict(kv_rank=0), "--kv-rank"), (dict(kv_rank=10_000), "--kv-rank"),
                                     (dict(q_rank=65), "--q-rank"), (dict(rope_share="x"), "rope_share")])
def test_bad_options(bad, msg):
    with pytest.raises(ConversionError, match=msg):
        to_mla(llama(), **bad)


# ---------------------------------------------------------------- kernels
def test_decode_kernel_matches_reference():
    rng = np.random.default_rng(1)
    H, r, dr, n = 5, 24, 8, 600  # several chunks of CHUNK tokens
    qa = rng.standard_normal((H, r + dr)).astype(np.float32)
    kv = rng.standard_normal((700, r + dr)).astype(np.float32)
    out = np.empty((H, r), np.float32)
    for nn in (1, K.CHUNK, n):
        K.mla_decode(qa, kv, nn, np.float32(0.3), out)
        np.testing.assert_allclose(out, K.mla_decode_ref(qa, kv, nn, 0.3, r), atol=2e-5)


def test_prefill_kernel_and_absorbed_decode_match_reference():
    rng = np.random.default_rng(2)
    H, r, dr, dn, dv, start, T = 3, 12, 4, 6, 10, 5, 7
    q = rng.standard_normal((T, H, dn + dr)).astype(np.float32)
    kv = rng.standard_normal((start + T + 3, r + dr)).astype(np.float32)
    k_b = rng.standard_normal((H, r, dn)).astype(np.float32)
    v_b = rng.standard_normal((H, dv, r)).astype(np.float32)
    ref = K.mla_attention_ref(q, kv, r, start, 0.4, k_b, v_b)
    np.testing.assert_allclose(K.mla_prefill(q, kv, r, start, 0.4, k_b, v_b), ref, atol=2e-5)
    qa = K.absorb_queries(q[-1], dn, k_b, np.empty((H, r + dr), np.float32))  # the last query, absorbed
    lat = K.mla_decode(qa, kv, start + T, np.float32(0.4), np.empty((H, r), np.float32))
    np.testing.assert_allclose(np.einsum("hvr,hr->hv", v_b, lat), ref[-1], atol=2e-5)


# ---------------------------------------------------------------- GGUF: edgellm and llama.cpp
@pytest.fixture(scope="module")
def tiny(tmp_path_factory, model_path):
    """A tiny random GQA 2:1 Llama, queries sharpened (attention far from uniform), as an MLA GGUF with split rope
    slots (dn + dr != hd: the score-scale fold is exercised); the tokenizer comes from a tiny-llama checkpoint."""
    d = tmp_path_factory.mktemp("mla")
    src = mk.make(d / "tiny-llama", "tiny-llama", tokenizer_gguf=str(model_path))
    st = to_mla(llama(n_kv=2, sharpen=4.0), kv_rank=16, rope_dim=8, rope_share="split")
    assert st.mla["dn"] + st.mla["dr"] != st.mla["head_dim"]
    out = d / "mla.gguf"
    MLA().write_gguf(st, HFCheckpoint(src), out, "f32", None)
    return st, src, out


IDS = np.random.default_rng(0).integers(3, 49152, 40)


def ref_logits(st, ids):
    with torch.no_grad():
        return st(input_ids=torch.tensor(np.asarray(ids))[None]).logits[0].numpy()


def test_gguf_logits_match_torch_reference(tiny):
    st, _, path = tiny
    ref = ref_logits(st, IDS)
    eng = Engine(path, n_ctx=128, threads=2)
    assert eng.kv_bytes_per_token == 4 * 2 * (16 + 8)
    np.testing.assert_allclose(eng.prefill(IDS, logits="all"), ref, atol=1e-4 * np.abs(ref).max())
    cache = eng.new_cache()  # absorbed decode, one token at a time
    dec = np.stack([eng.decode(int(t), cache) for t in IDS])
    np.testing.assert_allclose(dec, ref, atol=1e-4 * np.abs(ref).max())
    assert cache.nbytes_per_token == eng.kv_bytes_per_token


def test_onnx_latent_cache_matches_torch_reference(tiny, tmp_path):
    # the shared ONNX builder with latent attention: the graph's cache is [c_kv | k_pe], as small as the GGUF's
    pytest.importorskip("onnxruntime")
    from edgellm.runtime.engine import load
    st, src, _ = tiny
    ref = ref_logits(st, IDS)
    out = tmp_path / "mla-onnx"
    MLA().write_onnx(st, HFCheckpoint(src), out, "fp32", None)
    eng = load(str(out), n_ctx=128, threads=2)
    full = eng.prefill(IDS, eng.new_cache(), logits="all")
    print(f"onnxruntime vs torch {np.abs(full - ref).max():.2e} (max |logit| {np.abs(ref).max():.1f})")
    np.testing.assert_allclose(full, ref, atol=1e-4 * np.abs(ref).max())
    cache = eng.new_cache()
    dec = np.stack([eng.decode(int(t), cache) for t in IDS])
    np.testing.assert_allclose(dec, ref, atol=1e-4 * np.abs(ref).max())
    assert cache.nbytes_per_token == 4 * 2 * (16 + 8)


def test_latent_cache_fork_and_truncate(tiny):
    _, _, path = tiny
    eng = Engine(path, n_ctx=128, threads=2)
    c = eng.new_cache()
    eng.prefill(IDS[:20], c)
    f = c.fork()
    a = eng.decode(int(IDS[20]), c)
    eng.decode(7, f)  # the fork diverges without touching c, and back
    f.truncate(20)
    np.testing.assert_allclose(eng.decode(int(IDS[20]), f), a, atol=1e-5)
    c.truncate(20)
    np.testing.assert_allclose(eng.decode(int(IDS[20]), c), a, atol=1e-5)
    with pytest.raises(CacheError):
        c.truncate(99)


def test_gguf_quantized_and_errors(tiny, tmp_path):
    st, src, path = tiny
    out = tmp_path / "q8.gguf"
    MLA().write_gguf(st, HFCheckpoint(src), out, "q8_0", None)
    ref = ref_logits(st, IDS[:16])
    got = Engine(out, n_ctx=64, threads=2).prefill(IDS[:16], logits="all")
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()
    with pytest.raises(EdgeLLMError, match="latent cache"):
        Engine(path, n_ctx=64, threads=2, kv="q8_0")
    # a deepseek2 file with experts: one clear error
    import gguf
    from edgellm.runtime.gguf_file import GGUFFile
    f = GGUFFile(path)
    w = gguf.GGUFWriter(str(tmp_path / "moe.gguf"), "deepseek2")
    for k, v in f.metadata.items():
        if k.startswith("deepseek2.") and not isinstance(v, list):
            if k.endswith("leading_dense_block_count"):
                v = 1
            (w.add_uint32 if isinstance(v, int) else w.add_string if isinstance(v, str) else w.add_float32)(k, v)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["a"] * 49152)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match="experts"):
        Engine(tmp_path / "moe.gguf", n_ctx=64, threads=2)


def test_llama_cpp_runs_the_deepseek2_file(tiny, llama_cpp):
    st, _, path = tiny
    ids = [int(i) for i in IDS]
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, logits_all=True, n_threads=2, verbose=False)
    llm.eval(ids)
    theirs = np.array(llm.scores[:len(ids)], dtype=np.float32)
    llm.close()
    ours = Engine(path, n_ctx=128, threads=2).prefill(IDS, logits="all")
    assert np.abs(theirs - ours).max() <= 2e-3 * np.abs(ours).max()
    assert (theirs.argmax(1) == ours.argmax(1)).mean() >= 0.95


def test_latent_norm_trick_is_linear(tiny):
    """deepseek2 always RMS-normalises the latents: the written scale s and norm weight sqrt(eps)/s make it c."""
    st, _, _ = tiny
    t = dict(gguf_tensors(st))
    eps = float(st.config.rms_norm_eps)
    qa = t["blk.0.attn_q_a.weight"]
    x = np.random.default_rng(3).standard_normal((5, qa.shape[1])).astype(np.float32) * 10
    c = (x @ qa.T).astype(np.float64)
    normed = c / np.sqrt((c * c).mean(1, keepdims=True) + eps) * t["blk.0.attn_q_a_norm.weight"]
    lin = x @ st.layers[0].self_attn.q_a.weight.detach().numpy().T
    np.testing.assert_allclose(normed, lin, rtol=1e-5, atol=1e-5 * np.abs(lin).max())


def test_convert_cli_with_healing(tmp_path, tiny):
    from typer.testing import CliRunner
    from edgellm.cli import app
    _, src, _ = tiny
    text = tmp_path / "calib.txt"
    from pathlib import Path
    text.write_text((Path(__file__).parent / "data" / "shakespeare_60k.txt").read_text()[:8000])
    out = tmp_path / "cli.gguf"
    r = CliRunner().invoke(app, ["convert", str(src), "-o", str(out), "--variant", "mla", "--kv-rank", "8",
                                 "--rope-dim", "4", "--heal", "3", "--calib", str(text), "--seq-len", "32",
                                 "--outtype", "f32", "--json", "-t", "2"])
    assert r.exit_code == 0, r.output
    rep = json.loads([ln for ln in r.output.splitlines() if ln.startswith("{")][-1])
    assert rep["kv_bytes_per_token"] == 2 * 2 * (8 + 4) and rep["kv_bytes_per_token_original"] == 2 * 2 * 2 * 16
    assert np.isfinite(rep["ppl_after_heal"])
    assert Engine(out, n_ctx=64, threads=2).prefill(IDS[:8]).shape == (49152,)
    r = CliRunner().invoke(app, ["convert", str(src), "-o", str(tmp_path / "x.gguf"), "--variant", "mla",
                                 "--rope-dim", "3"])
    assert r.exit_code != 0 and "--rope-dim" in str(r.exception)  # checked before the teacher writes calibration

"""HF checkpoints -> GGUF against transformers' forward pass (and llama.cpp on the same files).

Checkpoints: tiny random ones with Llama-3.2's structure (llama3 rope scaling, GQA 4:1, tied embeddings) and
BitNet b1.58 2B4T's (packed ternary weights, sub-norms, ReLU^2), and SmolLM2-135M's real weights rebuilt by
transformers from the default GGUF.
"""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
torch._dynamo.config.disable = True  # transformers' BitNet unpacking is torch.compile'd; eager is enough here

from gguf import GGMLQuantizationType as QT  # noqa: E402
from gguf import quants as gq  # noqa: E402

from edgellm.bench import make_checkpoints as mk  # noqa: E402
from edgellm.bench.perplexity import edgellm_perplexity  # noqa: E402
from edgellm.converters import convert_to_gguf  # noqa: E402
from edgellm.converters.checkpoint import ConversionError  # noqa: E402
from edgellm.runtime.engine import Engine  # noqa: E402


def hf_logits(src, ids, embed=None):
    m = transformers.AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    if embed is not None:
        with torch.no_grad():
            m.get_input_embeddings().weight.copy_(torch.from_numpy(embed))
    with torch.no_grad():
        return m(torch.tensor(np.asarray(ids))[None]).logits[0].numpy()


def ours(path, ids):
    eng = Engine(path, n_ctx=256, threads=2, kv="f32")  # (f32 K/V: computed in f32, as the references)
    full = eng.prefill(np.asarray(ids), eng.new_cache(256), logits="all")
    cache = eng.new_cache(256)
    eng.prefill(np.asarray(ids[:-1]), cache)
    last = eng.decode(int(ids[-1]), cache)
    np.testing.assert_allclose(last, full[-1], atol=1e-4)  # decode with the cache = full recompute
    return full


def llama_logits(llama_cpp, path, ids, **kw):
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=True, n_threads=2, verbose=False, **kw)
    llm.eval([int(i) for i in ids])
    out = np.array(llm.scores[:len(ids)], dtype=np.float32)
    llm.close()
    return out


IDS = np.random.default_rng(0).integers(3, 49152, 48)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, model_path):
    return mk.make(tmp_path_factory.mktemp("ck") / "tiny-llama", "tiny-llama", tokenizer_gguf=str(model_path))


@pytest.fixture(scope="module")
def tiny_bitnet(tmp_path_factory, model_path):
    return mk.make(tmp_path_factory.mktemp("ck") / "tiny-bitnet", "tiny-bitnet", tokenizer_gguf=str(model_path))


def test_tiny_llama32_structure_matches_transformers(tiny_llama, tmp_path, llama_cpp):
    cfg = json.loads((tiny_llama / "config.json").read_text())
    assert cfg["rope_scaling"]["rope_type"] == "llama3" and cfg["num_attention_heads"] == 4 * cfg["num_key_value_heads"]
    out = convert_to_gguf(tiny_llama, tmp_path / "m.gguf", "f32")
    ref = hf_logits(tiny_llama, IDS)
    assert np.abs(ours(out, IDS) - ref).max() <= 1e-3
    assert np.abs(llama_logits(llama_cpp, out, IDS) - ref).max() <= 1e-3


@pytest.mark.parametrize("outtype,tol", [("f16", 0.02), ("bf16", 0.05), ("q8_0", 0.05), ("q4_0", 0.5),
                                         ("q4_k", 0.5)])
def test_tiny_llama_quantized_outputs_run_everywhere(tiny_llama, tmp_path, llama_cpp, outtype, tol):
    out = convert_to_gguf(tiny_llama, tmp_path / f"m-{outtype}.gguf", outtype)
    ref = hf_logits(tiny_llama, IDS)
    a, b = ours(out, IDS), llama_logits(llama_cpp, out, IDS)
    assert np.abs(a - ref).max() <= tol and np.abs(b - ref).max() <= tol
    assert np.abs(a - b).max() <= tol / 2


def assert_same_ternary_arithmetic(a, ref):
    # Same integer arithmetic: nearly every logit agrees to float rounding. An activation that lands on a
    # rounding boundary (x * 127 / max|x| at .5) may round the other way on one side and move a few logits by
    # one quantization step at that position; allow that, but only at few positions.
    d = np.abs(a - ref).max(-1)  # per position
    print(f"max abs per position: {np.round(d, 6)}")
    assert (d <= 1e-4).mean() >= 0.9 and d.max() <= 2e-2


def test_tiny_bitnet_matches_transformers_ternary_arithmetic(tiny_bitnet, tmp_path, llama_cpp, monkeypatch):
    m = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_bitnet), dtype=torch.float32)
    assert type(m.model.layers[0].self_attn.q_proj).__name__ == "BitLinear"  # transformers computes ternary
    ref = hf_logits(tiny_bitnet, IDS)
    f32 = convert_to_gguf(tiny_bitnet, tmp_path / "b-f32.gguf", "f32")
    assert_same_ternary_arithmetic(ours(f32, IDS), ref)
    for outtype in ("tq2_0", "tq1_0"):
        out = convert_to_gguf(tiny_bitnet, tmp_path / f"b-{outtype}.gguf", outtype)
        # ternary files keep the embedding (also the output head) in Q8_0: compare with those values. transformers
        # runs the head on f32 activations: so does edgellm with EDGELLM_ISA=none (the ternary layers take BitNet's
        # int8 activations on every path)
        emb = m.get_input_embeddings().weight.detach().numpy()
        emb_q8 = gq.dequantize(gq.quantize(emb, QT.Q8_0), QT.Q8_0)
        monkeypatch.setenv("EDGELLM_ISA", "none")
        exact = ours(out, IDS)
        assert_same_ternary_arithmetic(exact, hf_logits(tiny_bitnet, IDS, emb_q8))
        # with the machine's integer kernels the Q8_0 head takes int8 activations (as llama.cpp's): only their
        # rounding differs (measured up to 0.017 here)
        monkeypatch.delenv("EDGELLM_ISA")
        fast = ours(out, IDS)
        assert np.abs(fast - exact).max() <= 0.06 and (fast.argmax(-1) == exact.argmax(-1)).mean() >= 0.9
        # llama.cpp loads and runs the same file (its bitnet graph uses SiLU and Q8_K activations, so its
        # logits are not transformers' ReLU^2 model; only that it runs is checked)
        assert np.isfinite(llama_logits(llama_cpp, out, IDS[:8])).all()


def test_bitnet_gguf_carries_both_activation_keys(tiny_bitnet, tmp_path):
    from edgellm.runtime.gguf_file import GGUFFile
    md = GGUFFile(convert_to_gguf(tiny_bitnet, tmp_path / "b.gguf", "f16")).metadata
    # edgellm's key, and llama.cpp's (read by its and bitnet.cpp's ReLU^2 fixes)
    assert md["bitnet.hidden_act"] == md["bitnet.hidden_activation"] == "relu2"


def test_bitnet_untied_head_and_bad_columns_refused(tiny_bitnet, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_bitnet, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["hidden_size"] = 128  # shapes no longer match the tensors
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="shape"):
        convert_to_gguf(bad, tmp_path / "x.gguf", "tq2_0")
    assert not (tmp_path / "x.gguf").exists() and not list(tmp_path.glob(".x.gguf.part*"))


def test_bad_inputs_give_clear_errors(tiny_llama, tmp_path):
    with pytest.raises(ConversionError, match="outtype"):
        convert_to_gguf(tiny_llama, tmp_path / "a.gguf", "q3_k")
    (tmp_path / "exists.gguf").write_bytes(b"keep me")
    with pytest.raises(ConversionError, match="--force"):
        convert_to_gguf(tiny_llama, tmp_path / "exists.gguf", "f32")
    assert (tmp_path / "exists.gguf").read_bytes() == b"keep me"
    with pytest.raises(ConversionError, match="input"):
        convert_to_gguf(tiny_llama, tiny_llama / "model.safetensors", "f32", force=True)
    other = tmp_path / "gpt2"
    shutil.copytree(tiny_llama, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="not supported"):
        convert_to_gguf(other, tmp_path / "b.gguf", "f32")
    sharded = tmp_path / "sharded"
    shutil.copytree(tiny_llama, sharded)
    (sharded / "model.safetensors").rename(sharded / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                            "model.norm.weight": "model-00002-of-00002.safetensors"}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConversionError, match="00002"):
        convert_to_gguf(sharded, tmp_path / "c.gguf", "f32")
    assert not list(tmp_path.glob("*.gguf")) or [p.name for p in tmp_path.glob("*.gguf")] == ["exists.gguf"]


# ------------------------------------------------------------------ real weights: SmolLM2-135M
@pytest.fixture(scope="module")
def smollm2_hf(tmp_path_factory, model_path):
    """SmolLM2-135M-Instruct rebuilt by transformers from the default GGUF and saved as a LlamaForCausalLM."""
    out = tmp_path_factory.mktemp("smollm2-hf")
    m = transformers.AutoModelForCausalLM.from_pretrained(str(model_path.parent), gguf_file=model_path.name,
                                                          dtype=torch.float32)
    m.save_pretrained(str(out))
    mk.save_tokenizer(out, str(model_path))
    return out


@pytest.mark.slow
def test_smollm2_real_weights_f16_matches_transformers(smollm2_hf, tmp_path, llama_cpp, text):
    out = convert_to_gguf(smollm2_hf, tmp_path / "smol-f16.gguf", "f16")
    eng = Engine(out, n_ctx=256, threads=2, kv="f32")  # (f32 K/V: the check is the conversion's)
    ids = eng.tokenizer.encode(text[:2000], add_bos=False)[:128]
    # transformers' fp32 forward on the weights the f16 file holds (rounding weights to f16 alone moves these
    # logits by ~0.08, more than the tolerance: the check is that conversion adds nothing to it)
    m = transformers.AutoModelForCausalLM.from_pretrained(str(smollm2_hf), dtype=torch.float32)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(p.half().float())
        ref = m(torch.tensor(ids)[None]).logits[0].numpy()
    a = eng.prefill(np.array(ids), eng.new_cache(256), logits="all")
    b = llama_logits(llama_cpp, out, ids)
    print(f"f16 file: edgellm {np.abs(a - ref).max():.4f}, llama.cpp {np.abs(b - ref).max():.4f} max abs")
    assert np.abs(a - ref).max() <= 1e-2
    # llama.cpp rounds activations to f16 before F16 weight products (and keeps K/V in f16): measured 0.057
    assert np.abs(b - ref).max() <= 0.1
    # with F32 weights and an F32 KV cache it computes in f32, and the same check holds for it
    f32 = convert_to_gguf(smollm2_hf, tmp_path / "smol-f32.gguf", "f32")
    ref32 = hf_logits(smollm2_hf, ids)
    c = llama_logits(llama_cpp, f32, ids, type_k=0, type_v=0)
    print(f"f32 file: llama.cpp {np.abs(c - ref32).max():.4f} max abs")
    assert np.abs(c - ref32).max() <= 1e-2


@pytest.mark.slow
def test_smollm2_q8_0_perplexity_within_1pct_of_f16(smollm2_hf, tmp_path, text):
    ppl = {}
    for outtype in ("f16", "q8_0"):
        out = convert_to_gguf(smollm2_hf, tmp_path / f"smol-{outtype}.gguf", outtype)
        eng = Engine(out, n_ctx=512, threads=2)
        ppl[outtype] = edgellm_perplexity(eng, text[:20000], ctx=512, max_windows=4).ppl
    print(ppl)
    assert math.isfinite(ppl["f16"]) and abs(ppl["q8_0"] / ppl["f16"] - 1) < 0.01

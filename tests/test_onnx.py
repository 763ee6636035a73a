"""HF checkpoint -> ONNX folder -> onnxruntime / optimum / `edgellm run`, against transformers.

Tiny random checkpoints written with transformers: a Llama with Llama-3.2's structure (llama3 rope
scaling, GQA 4:1, tied embeddings) and BitNet b1.58 (packed ternary weights with weight_scale as
transformers' BitNet quantizer stores them, sub-norms, ReLU²), with a small byte-level BPE tokenizer
trained here. f32 graphs must give transformers' logits within 1e-3 (max abs) for prefill and for
decode with past."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

PROMPT = "To be, or not to be, that is the question: whether 'tis nobler"
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

from edgellm.bench.make_checkpoints import pack_ternary  # noqa: E402
from tiny_models import _norms_near_one, write_tiny_hf_llama, write_tokenizer  # noqa: E402


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory) -> Path:
    """Llama-3.2's structure, tiny: llama3 rope scaling, 8 query heads over 2 kv heads, tied embeddings."""
    return write_tiny_hf_llama(tmp_path_factory.mktemp("llama") / "hf")


def write_tiny_bitnet(out: Path, linear_class: str = "bitlinear") -> Path:
    """BitNet b1.58 2B4T's structure, tiny, stored as transformers' BitNet quantizer stores it."""
    from safetensors.torch import save_file
    from transformers import BitNetConfig, BitNetForCausalLM
    out.mkdir(parents=True)
    V = write_tokenizer(out)
    torch.manual_seed(1)
    cfg = BitNetConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
                       num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5, rope_theta=500000.0,
                       tie_word_embeddings=True, hidden_act="relu2", bos_token_id=0, eos_token_id=2,
                       initializer_range=0.1)
    cfg.architectures = ["BitNetForCausalLM"]
    m = BitNetForCausalLM(cfg)
    _norms_near_one(m)
    sd = {}
    for name, p in m.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied
        if name.split(".")[-2] in PROJ:
            s = p.abs().mean().clamp(min=1e-5)
            sd[name] = torch.from_numpy(pack_ternary((p / s).round().clamp(-1, 1).to(torch.int8).numpy()))
            # BitLinear divides its output by weight_scale, AutoBitLinear multiplies by it
            sd[name[:-len("weight")] + "weight_scale"] = (1 / s if linear_class == "bitlinear" else s).reshape(1)
        else:
            sd[name] = p.detach().contiguous()
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    d = cfg.to_dict()
    d["quantization_config"] = {"quant_method": "bitnet", "linear_class": linear_class,
                                "quantization_mode": "offline"}
    (out / "config.json").write_text(json.dumps(d))
    return out


def load_hf(path: Path):
    from transformers import AutoModelForCausalLM
    with torch.compiler.set_stance("force_eager"):  # BitNet's helpers are torch.compile'd
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def hf_logits(model, ids) -> np.ndarray:
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        return model(torch.tensor([ids])).logits[0].numpy()


def hf_tokens(path: Path, text: str = PROMPT) -> list[int]:
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(path))(text).input_ids


def cli(*args):
    env = dict(os.environ, EDGELLM_DEBUG="")
    return subprocess.run([sys.executable, "-m", "edgellm.cli", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def assert_clean_error(r, *words):
    assert r.returncode not in (0, -11, -6), (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("edgellm: error:"), r.stderr[-2000:]
    for w in words:
        assert w in lines[-1], lines[-1]


@pytest.fixture(scope="module")
def onnx_fp32(hf_llama) -> Path:
    """The Llama checkpoint exported by the command a user runs."""
    out = hf_llama.parent / "onnx-fp32"
    r = cli("convert", str(hf_llama), "-o", str(out), "--format", "onnx")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == str(out)
    return out


@pytest.fixture(scope="module")
def onnx_int4(hf_llama) -> Path:
    from edgellm.converters.onnx_export import convert_to_onnx
    return convert_to_onnx(hf_llama, hf_llama.parent / "onnx-int4", dtype="int4")


def session(folder: Path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    return ort.InferenceSession(str(folder / "model.onnx"), so, providers=["CPUExecutionProvider"])


def run_with_past(sess, ids: list[int], split: int) -> np.ndarray:
    """Prefill ids[:split] with an empty past, then decode the rest one token at a time with the
    presents fed back as past: logits (len(ids), V)."""
    names = [i.name for i in sess.get_inputs()]
    n_layer = sum(1 for n in names if n.startswith("past_key_values.") and n.endswith(".key"))
    shape = sess.get_inputs()[names.index("past_key_values.0.key")].shape
    past = {f"past_key_values.{i}.{kv}": np.zeros((1, shape[1], 0, shape[3]), np.float32)
            for i in range(n_layer) for kv in ("key", "value")}
    outs, n = [], 0
    steps = [ids[:split]] + [[t] for t in ids[split:]]
    for chunk in steps:
        T = len(chunk)
        feed = {"input_ids": np.array([chunk], np.int64), "attention_mask": np.ones((1, n + T), np.int64),
                "position_ids": np.arange(n, n + T, dtype=np.int64)[None], **past}
        res = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))
        outs.append(res["logits"][0])
        past = {k: res[k.replace("past_key_values", "present")] for k in past}
        n += T
    return np.concatenate(outs)


# ---------------------------------------------------------------------------- Llama via optimum
def test_graph_interface_is_optimums(onnx_fp32):
    import onnx
    m = onnx.load(str(onnx_fp32 / "model.onnx"), load_external_data=False)
    ins = [i.name for i in m.graph.input]
    outs = [o.name for o in m.graph.output]
    assert ins == ["input_ids", "attention_mask", "position_ids",
                   "past_key_values.0.key", "past_key_values.0.value", "past_key_values.1.key",
                   "past_key_values.1.value"]
    assert outs == ["logits", "present.0.key", "present.0.value", "present.1.key", "present.1.value"]
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (onnx_fp32 / f).exists(), f
    assert not [p for p in onnx_fp32.parent.iterdir() if ".part" in p.name]


def test_fp32_logits_match_transformers_prefill_and_decode_with_past(hf_llama, onnx_fp32):
    ids = hf_tokens(hf_llama)
    assert len(ids) >= 12
    ref = hf_logits(load_hf(hf_llama), ids)
    got = run_with_past(session(onnx_fp32), ids, split=7)
    assert np.abs(ref).max() > 1.0  # the random model is not degenerate
    assert np.abs(got[:7] - ref[:7]).max() <= 1e-3   # prefill
    assert np.abs(got[7:] - ref[7:]).max() <= 1e-3   # decode with past


def test_optimum_loads_it_and_greedy_equals_transformers(hf_llama, onnx_fp32):
    pytest.importorskip("optimum.onnxruntime")
    from optimum.onnxruntime import ORTModelForCausalLM
    ids = torch.tensor([hf_tokens(hf_llama)])
    am = torch.ones_like(ids)
    ort_model = ORTModelForCausalLM.from_pretrained(str(onnx_fp32))
    kw = dict(max_new_tokens=20, do_sample=False, pad_token_id=2)
    a = ort_model.generate(ids, attention_mask=am, **kw)
    with torch.compiler.set_stance("force_eager"):
        b = load_hf(hf_llama).generate(ids, attention_mask=am, **kw)
    assert a.shape[1] > ids.shape[1] + 5
    assert a.tolist() == b.tolist()


def dequantize_matmulnbits(model) -> dict[str, np.ndarray]:
    """{node name: the f32 (N, K) weight} of every MatMulNBits node (symmetric 4-bit: zero point 8,
    two values per byte, low nibble first) — an oracle written from the contrib op's spec."""
    from onnx import helper, numpy_helper
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        if n.op_type != "MatMulNBits":
            continue
        at = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        assert at["bits"] == 4 and len(n.input) == 3  # no zero points: symmetric
        K, N = at["K"], at["N"]
        packed = inits[n.input[1]].reshape(N, -1)
        scales = inits[n.input[2]].reshape(N, -1)
        q = np.stack([packed & 15, packed >> 4], -1).reshape(N, scales.shape[1], -1).astype(np.float32) - 8
        out[n.name] = (q * scales[:, :, None]).reshape(N, -1)[:, :K]
    return out


def hf_with_weights(hf_path, weights: dict[str, np.ndarray]):
    """The transformers model with each linear layer's weight replaced (node '/model/layers.0/mlp/up_proj/
    MatMul_Q4' -> module model.layers.0.mlp.up_proj); the LM head gets its own weight (untied)."""
    model = load_hf(hf_path)
    with torch.no_grad():
        for name, w in weights.items():
            mod = model.get_submodule(name.strip("/").rsplit("/", 1)[0].replace("/", "."))
            mod.weight = torch.nn.Parameter(torch.from_numpy(np.ascontiguousarray(w)))
    return model


def test_int4_export_runs_and_is_close(hf_llama, onnx_fp32, onnx_int4, tmp_path):
    import onnx
    from edgellm.converters.onnx_export import quantize_int4
    g = onnx.load(str(onnx_int4 / "model.onnx"))
    weights = dequantize_matmulnbits(g)
    assert len(weights) == 2 * 7 + 1 and any("lm_head" in n for n in weights)  # every projection and the head
    consts = {t.name for t in g.graph.initializer}
    assert not [n.name for n in g.graph.node if n.op_type == "MatMul" and n.input[1] in consts]
    assert (onnx_int4 / "model.onnx").stat().st_size < 0.7 * (onnx_fp32 / "model.onnx").stat().st_size
    from edgellm.runtime.onnx_backend import OnnxEngine
    b32, b4 = (OnnxEngine(d, threads=1).weight_bytes_per_token for d in (onnx_fp32, onnx_int4))
    E, F, V = 64, 128, 512
    assert b32 == 4 * (2 * (E * 64 + 2 * E * 16 + E * 64 + 3 * E * F) + E * V)  # 2 layers + the tied head
    assert b4 < b32 / 5
    ids = hf_tokens(hf_llama)
    got = run_with_past(session(onnx_int4), ids, split=7)
    # what the graph computes is transformers' forward with the graph's int4 weights (the CPU kernel
    # takes int8 activations at accuracy level 4: a small extra error) ...
    ref_q = hf_logits(hf_with_weights(hf_llama, weights), ids)
    assert np.abs(got - ref_q).max() < 0.1
    exact = tmp_path / "level0"
    shutil.copytree(onnx_fp32, exact)
    quantize_int4(exact / "model.onnx", accuracy_level=0)  # f32 activations: exact up to rounding
    assert np.abs(run_with_past(session(exact), ids, split=7) - ref_q).max() <= 1e-3
    # ... and close to the f32 model (4-bit Gaussian random weights: ~5% error per matmul, 15 matmuls)
    ref = hf_logits(load_hf(hf_llama), ids)
    assert np.sqrt(((got - ref) ** 2).mean()) < 0.4 * ref.std()
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.5


# ---------------------------------------------------------------------------- the shared builder
def test_builder_llama_graph_matches_transformers(hf_llama, tmp_path):
    """The shared builder's graph (what BitNet and the later variants use), on the Llama block."""
    from edgellm.converters.onnx_export import convert_to_onnx
    out = convert_to_onnx(hf_llama, tmp_path / "built", builder=True)
    ids = hf_tokens(hf_llama)
    ref = hf_logits(load_hf(hf_llama), ids)
    got = run_with_past(session(out), ids, split=5)
    assert np.abs(got - ref).max() <= 1e-3
    # the same interface as optimum's graph: the runtime batches sequences of different lengths over it
    from edgellm.runtime.engine import load
    eng = load(str(out), threads=2)
    a, b = eng.new_cache(), eng.new_cache()
    eng.prefill(ids[:3], a)
    eng.prefill(ids[:8], b)
    res = eng.decode_batch([ids[3], ids[8]], [a, b])
    assert np.abs(res - ref[[3, 8]]).max() <= 1e-3


def test_large_model_layout_graph_plus_one_data_file(hf_llama, tmp_path):
    """Over protobuf's 2 GiB the weights go to one `model.onnx_data` beside the graph (forced here by a
    zero threshold); the runtime and the int4 quantizer read that layout."""
    from edgellm.converters.onnx_export import SIDE_FILES, quantize_int4
    from edgellm.converters.onnx_graph import build_decoder, export_decoder
    from edgellm.runtime.onnx_backend import OnnxEngine
    out = tmp_path / "ext"
    out.mkdir()
    export_decoder(build_decoder(load_hf(hf_llama)), out / "model.onnx", external_over=0)
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.onnx_data"]
    assert (out / "model.onnx").stat().st_size < 100_000 < (out / "model.onnx_data").stat().st_size
    for f in SIDE_FILES:
        if (hf_llama / f).exists():
            shutil.copyfile(hf_llama / f, out / f)
    ids = hf_tokens(hf_llama)
    ref = hf_logits(load_hf(hf_llama), ids)
    eng = OnnxEngine(out, threads=2)
    assert np.abs(eng.prefill(ids, logits="all") - ref).max() <= 1e-3
    assert eng.weight_bytes_per_token == 4 * (2 * (64 * 64 * 2 + 2 * 64 * 16 + 3 * 64 * 128) + 64 * 512)
    quantize_int4(out / "model.onnx")  # small once quantized: back to one file
    assert not (out / "model.onnx_data").exists()
    got = OnnxEngine(out, threads=2).prefill(ids, logits="all")
    assert np.sqrt(((got - ref) ** 2).mean()) < 0.4 * ref.std()


@pytest.mark.parametrize("linear_class", ["bitlinear", "autobitlinear"])
def test_bitnet_graph_does_transformers_ternary_arithmetic(tmp_path, linear_class):
    import onnx
    from edgellm.converters.onnx_export import convert_to_onnx
    hf = write_tiny_bitnet(tmp_path / "bitnet", linear_class)
    out = convert_to_onnx(hf, tmp_path / "bitnet-onnx")
    model = load_hf(hf)
    assert type(model.model.layers[0].mlp.down_proj).__name__ in ("BitLinear", "AutoBitLinear")
    ids = hf_tokens(hf)
    ref = hf_logits(model, ids)
    got = run_with_past(session(out), ids, split=6)
    assert np.abs(ref).max() > 1.0
    assert np.abs(got - ref).max() <= 1e-3
    g = onnx.load(str(out / "model.onnx"))
    int8 = [t for t in g.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert len(int8) >= 7 * 2  # the ternary projections are stored as int8, not f32


# ---------------------------------------------------------------------------- the runtime backend
def test_onnx_engine_prefill_decode_batch_and_fork(hf_llama, onnx_fp32):
    from edgellm.runtime.engine import load
    eng = load(str(onnx_fp32), threads=2)
    assert eng.threads == 2 and eng.cfg.n_vocab == 512 and eng.cfg.n_layer == 2
    ids = eng.tokenizer.encode(PROMPT)
    assert ids == hf_tokens(hf_llama)  # the tokenizer built from tokenizer.json agrees with transformers'
    ref = hf_logits(load_hf(hf_llama), ids)
    c = eng.new_cache()
    got = np.concatenate([eng.prefill(ids[:5], c, logits="all")] + [eng.decode(t, c)[None] for t in ids[5:]])
    assert np.abs(got - ref).max() <= 1e-3
    # B sequences of different lengths in one run; fork and truncate
    a, b = eng.new_cache(), eng.new_cache()
    eng.prefill(ids[:3], a)
    eng.prefill(ids[:8], b)
    f = b.fork()
    out = eng.decode_batch([ids[3], ids[8]], [a, b])
    assert np.abs(out[0] - ref[3]).max() <= 1e-3 and np.abs(out[1] - ref[8]).max() <= 1e-3
    assert (a.n, b.n, f.n) == (4, 9, 8)
    assert np.abs(eng.decode(ids[8], f) - ref[8]).max() <= 1e-3
    f.truncate(2)
    assert np.abs(eng.prefill(ids[2:6], f) - ref[5]).max() <= 1e-3


def test_edgellm_run_onnx_folder_greedy_equals_transformers(hf_llama, onnx_fp32):
    from transformers import AutoTokenizer
    r = cli("run", str(onnx_fp32), "-p", PROMPT, "-n", "12", "--temp", "0", "--threads", "2", "--no-chat")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "tok/s" in r.stderr
    ids = hf_tokens(hf_llama)
    with torch.compiler.set_stance("force_eager"):
        gen = load_hf(hf_llama).generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                         max_new_tokens=12, do_sample=False, eos_token_id=[0, 2], pad_token_id=2)
    new = gen[0, len(ids):].tolist()
    new = [t for t in new if t not in (0, 2)]
    assert r.stdout == AutoTokenizer.from_pretrained(str(hf_llama)).decode(new)


def test_run_int4_folder_with_chat_template(onnx_int4):
    r = cli("run", str(onnx_int4), "-p", "Who are you?", "-n", "6", "--chat", "--temp", "0", "--threads", "1")
    assert r.returncode == 0, r.stderr[-2000:]



# ---------------------------------------------------------------------------- ONNX Runtime GenAI
def onnxruntime_genai():
    """onnxruntime-genai (the test extra installs it where a wheel exists: x86_64 and aarch64)."""
    try:
        import onnxruntime_genai
    except ImportError:
        import platform
        if os.environ.get("EDGELLM_REQUIRE_REFERENCES") == "1" and platform.machine() in ("x86_64", "aarch64"):
            pytest.fail("onnxruntime-genai is required (EDGELLM_REQUIRE_REFERENCES=1; it has a wheel here)")
        pytest.skip(f"onnxruntime-genai is not installed (no wheel for {platform.machine()}?)")
    return onnxruntime_genai


def genai_greedy(og, folder: Path, ids: list[int], n: int) -> list[int]:
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + n, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array(ids, dtype=np.int32))
    while not gen.is_done():
        gen.generate_next_token()
    return [int(t) for t in gen.get_sequence(0)][len(ids):]


def edgellm_greedy(folder: Path, ids: list[int], n: int) -> list[int]:
    from edgellm.runtime.engine import load
    eng = load(str(folder), threads=2)
    cache = eng.new_cache(256)
    logits, out = eng.prefill(np.array(ids), cache), []
    for _ in range(n):
        out.append(int(np.argmax(logits)))
        if eng.tokenizer.is_eog(out[-1]):
            break
        logits = eng.decode(out[-1], cache)
    return out


@pytest.mark.parametrize("dtype", ["fp32", "int4"])
def test_onnxruntime_genai_runs_the_export_greedy_as_edgellm(hf_llama, onnx_fp32, onnx_int4, dtype):
    og = onnxruntime_genai()
    folder = onnx_fp32 if dtype == "fp32" else onnx_int4
    cfg = json.loads((folder / "genai_config.json").read_text())
    assert cfg["model"]["decoder"]["num_key_value_heads"] == 2 and cfg["search"]["past_present_share_buffer"] is False
    ids = hf_tokens(hf_llama)
    assert [int(t) for t in og.Tokenizer(og.Model(str(folder))).encode(PROMPT)] == ids  # GenAI tokenizes alike
    ours = edgellm_greedy(folder, ids, 16)
    theirs = genai_greedy(og, folder, ids, 16)
    print(f"{dtype}: edgellm {ours}\n      genai   {theirs}")
    assert theirs == ours and len(ours) >= 4
    if dtype == "fp32":  # the command a user runs prints the same text
        r = cli("run", str(folder), "--no-chat", "-p", PROMPT, "-n", "16", "--temp", "0", "--threads", "2", "-q")
        assert r.returncode == 0, r.stderr[-2000:]
        from edgellm.runtime.tokenizer import Tokenizer
        tok = Tokenizer.from_hf(folder)
        assert r.stdout == tok.decode([t for t in theirs if not tok.is_eog(t)])


def test_onnxruntime_genai_runs_the_bitnet_export(tmp_path):
    og = onnxruntime_genai()
    from edgellm.converters.onnx_export import convert_to_onnx
    src = write_tiny_bitnet(tmp_path / "hf")
    out = convert_to_onnx(src, tmp_path / "onnx")
    ids = hf_tokens(src)
    ours = edgellm_greedy(out, ids, 10)
    assert genai_greedy(og, out, ids, 10) == ours and len(ours) >= 4


def test_no_genai_config_for_a_graph_without_kv_cache(tmp_path):
    import onnx
    from onnx import TensorProto, helper
    from edgellm.converters.onnx_export import genai_config
    x = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "t"])
    s = helper.make_tensor_value_info("state.0.S", TensorProto.FLOAT, ["b", 2, 4, 4])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "t", 8])
    graph = helper.make_graph([helper.make_node("Identity", ["input_ids"], ["logits"])], "g", [x, s], [y])
    onnx.save(helper.make_model(graph), str(tmp_path / "model.onnx"))
    assert genai_config(tmp_path) is None

# ---------------------------------------------------------------------------- bad input
def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".part" in p.name or ".old" in p.name]


def test_bad_inputs_give_one_line_and_leave_nothing(hf_llama, onnx_fp32, tmp_path):
    before = sorted(p.name for p in onnx_fp32.iterdir())
    # existing output without --force: refused, untouched
    assert_clean_error(cli("convert", str(hf_llama), "-o", str(onnx_fp32), "--format", "onnx"), "--force")
    assert sorted(p.name for p in onnx_fp32.iterdir()) == before
    # unknown --dtype, a GGUF option with onnx, an unknown format
    assert_clean_error(cli("convert", str(hf_llama), "-o", str(tmp_path / "x"), "--format", "onnx", "--dtype", "int8"),
                       "int8")
    assert_clean_error(cli("convert", str(hf_llama), "-o", str(tmp_path / "x"), "--format", "onnx",
                           "--outtype", "q4_0"), "--outtype")
    assert_clean_error(cli("convert", str(hf_llama), "-o", str(tmp_path / "x"), "--format", "tflite"), "tflite")
    # missing tokenizer.json, missing checkpoint, unsupported class
    broken = tmp_path / "broken"
    shutil.copytree(hf_llama, broken)
    (broken / "tokenizer.json").unlink()
    assert_clean_error(cli("convert", str(broken), "-o", str(tmp_path / "x"), "--format", "onnx"), "tokenizer.json")
    assert_clean_error(cli("convert", str(tmp_path / "nothere"), "-o", str(tmp_path / "x"), "--format", "onnx"))
    other = tmp_path / "other"
    shutil.copytree(hf_llama, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (other / "config.json").write_text(json.dumps(cfg))
    assert_clean_error(cli("convert", str(other), "-o", str(tmp_path / "x"), "--format", "onnx"), "GPT2LMHeadModel")
    # a folder that is no ONNX export; a corrupted graph; a missing tokenizer
    assert_clean_error(cli("run", str(hf_llama), "-p", "hi", "-n", "2"), "model.onnx")
    bad = tmp_path / "bad-onnx"
    shutil.copytree(onnx_fp32, bad)
    data = (bad / "model.onnx").read_bytes()
    (bad / "model.onnx").write_bytes(data[: len(data) // 3])
    assert_clean_error(cli("run", str(bad), "-p", "hi", "-n", "2"), "onnxruntime")
    (bad / "model.onnx").write_bytes(data)
    (bad / "tokenizer.json").unlink()
    assert_clean_error(cli("run", str(bad), "-p", "hi", "-n", "2"), "tokenizer.json")
    assert not (tmp_path / "x").exists()
    assert _leftovers(tmp_path) == [] and _leftovers(onnx_fp32.parent) == []


def test_failed_export_leaves_nothing_and_force_replaces(hf_llama, tmp_path, monkeypatch):
    from edgellm.converters import onnx_export
    from edgellm.converters.checkpoint import ConversionError

    def broken(src, out):
        (out / "model.onnx").write_bytes(b"half a graph")
        raise ConversionError("the exporter broke")

    monkeypatch.setitem(onnx_export.ONNX_EXPORTERS, "LlamaForCausalLM", broken)
    with pytest.raises(ConversionError, match="broke"):
        onnx_export.convert_to_onnx(hf_llama, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    # --force over an existing output replaces it whole
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "stale.txt").write_text("old")
    monkeypatch.setitem(onnx_export.ONNX_EXPORTERS, "LlamaForCausalLM", onnx_export.export_llama_builder)
    with pytest.raises(ConversionError, match="exists"):
        onnx_export.convert_to_onnx(hf_llama, tmp_path / "out")
    onnx_export.convert_to_onnx(hf_llama, tmp_path / "out", force=True)
    assert (tmp_path / "out" / "model.onnx").exists() and not (tmp_path / "out" / "stale.txt").exists()
    assert _leftovers(tmp_path) == []

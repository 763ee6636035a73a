"""`edgellm quantize` against llama.cpp's own quantizer (llama-cpp-python's libggml / llama_model_quantize).

- the K-quant encoders (ours, NumPy) give the same bytes as ggml's reference quantizers, and gguf-py decodes them;
- a quantized file has llama.cpp's mixture: the same type for every tensor as `llama_model_quantize` picks, and
  the same bytes (tiny random Llamas written with gguf-py: rows that are multiples of 256, and rows that are not,
  so that the Q5_0 / Q8_0 fallbacks are taken; tied and untied heads);
- every output type loads in edgellm and in llama.cpp with matching logits;
- ternary targets on a BitNet file, and their refusal on other weights;
- bad input: one `edgellm: error:` line, nothing left behind;
- (slow) SmolLM2-135M: our Q4_K_M of an F16 file against llama.cpp's Q4_K_M of the same file, by perplexity.
"""
from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import gguf
from gguf import GGMLQuantizationType as QT
from gguf import quants as gq

from conftest import llama_cpp_logits
from tiny_models import write_tiny_llama
from edgellm.converters import kquants
from edgellm.converters.checkpoint import ConversionError
from edgellm.converters.quantize import FILE_TYPES, quantize_gguf, use_more_bits
from edgellm.kernels import quants as kq
from edgellm.runtime.engine import Engine
from edgellm.runtime.gguf_file import GGUFFile

# llama_ftype of each of our types, as llama.cpp's llama_model_quantize takes it
LLAMA_FTYPE = {name: int(ft.ftype) for name, ft in FILE_TYPES.items()}
IDS = np.random.default_rng(0).integers(0, 256, 40)


@pytest.fixture(scope="module")
def libggml(llama_cpp):
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    for fn in ("quantize_row_q4_K_ref", "quantize_row_q6_K_ref"):
        getattr(lib, fn).restype = None
    return lib


def ggml_ref(lib, qtype: QT, x: np.ndarray) -> np.ndarray:
    fn = {QT.Q4_K: lib.quantize_row_q4_K_ref, QT.Q6_K: lib.quantize_row_q6_K_ref}[qtype]
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.zeros(x.size // 256 * gguf.GGML_QUANT_SIZES[qtype][1], np.uint8)
    fn(x.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(x.size))
    return out.reshape(x.shape[0], -1)


def llama_quantize(llama_cpp, src: Path, out: Path, qtype: str) -> Path:
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = LLAMA_FTYPE[qtype]
    p.nthread = 2
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(p)) == 0
    return out


def cli(*args):
    env = dict(os.environ, EDGELLM_DEBUG="")
    return subprocess.run([sys.executable, "-m", "edgellm.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600)


def assert_clean_error(r, *words):
    assert r.returncode not in (0, -11, -6), (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("edgellm: error:"), r.stderr[-2000:]
    for w in words:
        assert w in lines[0], lines[0]


def edgellm_logits(path, ids=IDS) -> np.ndarray:
    eng = Engine(path, n_ctx=128, threads=2)
    return eng.prefill(np.asarray(ids), eng.new_cache(128), logits="all")


# ------------------------------------------------------------------------------ the encoders
SAMPLES = {
    "normal": lambda rng: rng.standard_normal((300, 1024)) * 0.02,  # 300 rows: two chunks, the last partial
    "heavy-tailed": lambda rng: rng.standard_t(3, (64, 1024)) * 0.01,
    "shifted": lambda rng: rng.standard_normal((32, 512)) + 3,
    "sparse": lambda rng: rng.standard_normal((32, 512)) * (rng.random((32, 512)) < 0.05),
    "zeros": lambda rng: np.zeros((4, 512)),
    "coarse": lambda rng: np.round(rng.random((32, 512)) * 15) * 0.01,  # few distinct values (a Q4_1 model's)
}


@pytest.mark.parametrize("sample", SAMPLES)
@pytest.mark.parametrize("qtype", [QT.Q4_K, QT.Q6_K], ids=lambda t: t.name)
def test_kquant_bytes_equal_ggml_reference_and_gguf_py_decodes_them(libggml, qtype, sample):
    x = SAMPLES[sample](np.random.default_rng(7)).astype(np.float32)
    ours = (kquants.quantize_q4_k if qtype == QT.Q4_K else kquants.quantize_q6_k)(x)
    ref = ggml_ref(libggml, qtype, x)
    assert ours.shape == ref.shape and ours.dtype == np.uint8
    assert np.array_equal(ours, ref)
    deq = gq.dequantize(ours, qtype)  # gguf-py's decoder, and edgellm's, read our blocks
    assert np.array_equal(kq.dequantize_ref(qtype, ours), deq)
    err = np.abs(deq - x).reshape(-1, 256)
    xb = x.reshape(-1, 256)
    # within about one code step: Q4_K spans each block's range with 15 steps, Q6_K its +-max with 63
    step = np.ptp(xb, axis=1, keepdims=True) / 15 if qtype == QT.Q4_K else 2 * np.abs(xb).max(1, keepdims=True) / 63
    assert (err <= step + 1e-6).all()


def test_kquant_encoders_refuse_bad_shapes():
    with pytest.raises(ValueError, match="256"):
        kquants.quantize_q4_k(np.zeros((2, 96), np.float32))
    with pytest.raises(ValueError, match="finite"):
        kquants.quantize_q6_k(np.full((1, 256), np.nan, np.float32))


def test_use_more_bits_is_llama_cpps_layer_choice():
    # llama.cpp: i < n/8 || i >= 7n/8 || (i - n/8) % 3 == 2; e.g. SmolLM2's 30 layers
    assert [i for i in range(30) if use_more_bits(i, 30)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]


# ------------------------------------------------------------------------------ files, against llama.cpp
@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    """F32 Llamas: rows of 256 (K-quants everywhere) with an untied head; rows of 96 (fallbacks) tied."""
    d = tmp_path_factory.mktemp("tiny")
    return {
        "wide": write_tiny_llama(d / "wide.gguf", n_layer=8, n_embd=256, n_ff=512, n_head=4, n_head_kv=2, tied=False),
        "narrow": write_tiny_llama(d / "narrow.gguf", n_layer=4, n_embd=96, n_ff=256, n_head=4, n_head_kv=2),
    }


@pytest.mark.parametrize("qtype", ["q4_k_m", "q8_0", "q4_0", "q4_1"])
@pytest.mark.parametrize("model", ["wide", "narrow"])
def test_file_equals_llama_cpps_quantization_tensor_for_tensor(tiny_files, tmp_path, llama_cpp, model, qtype):
    src = tiny_files[model]
    rep = quantize_gguf(src, tmp_path / "ours.gguf", qtype)
    ref = GGUFFile(llama_quantize(llama_cpp, src, tmp_path / "ref.gguf", qtype))
    ours = GGUFFile(tmp_path / "ours.gguf")
    assert set(ours.tensors) == set(ref.tensors)
    for name, t in ref.tensors.items():
        o = ours.tensors[name]
        assert o.qtype == t.qtype, (name, o.qtype.name, t.qtype.name)
        assert np.array_equal(np.asarray(o.data), np.asarray(t.data)), name
    assert ours.metadata == ref.metadata  # metadata and tokenizer carried over; file type set as llama.cpp sets it
    assert ours.metadata[gguf.Keys.General.FILE_TYPE] == LLAMA_FTYPE[qtype]
    kinds = {t.qtype for t in ours.tensors.values()}
    if qtype == "q4_k_m":  # the mixture really is mixed
        assert {QT.Q4_K, QT.Q6_K} <= kinds
        assert (QT.Q5_0 in kinds and QT.Q8_0 in kinds) == (model == "narrow")
    assert rep.quantized + rep.copied == rep.tensors == len(ref.tensors)
    # rows of 96 cannot take Q4_K / Q6_K (the head's type in every 4-bit mixture): llama.cpp falls back too
    assert bool(rep.fallbacks) == (model == "narrow" and qtype != "q8_0")


# (edgellm vs llama.cpp on the same file, file vs the F32 original) max abs logit differences allowed; measured
# on the tiny model (logits spanning ~4): q8_0 0.015 / 0.019, 4-bit types <= 0.018 / <= 0.21, f16 4e-4 / 6e-4,
# bf16 0.004 / 0.006, f32 2e-4 / 0 (llama.cpp rounds activations for its int8 dot products and keeps K/V in f16)
TOLERANCES = {"q8_0": (0.05, 0.06), "q4_0": (0.05, 0.5), "q4_1": (0.05, 0.5), "q4_k_m": (0.05, 0.4),
              "f16": (0.005, 0.005), "bf16": (0.02, 0.03), "f32": (2e-3, 1e-5)}


@pytest.mark.parametrize("qtype", TOLERANCES)
def test_each_type_loads_in_edgellm_and_llama_cpp_with_matching_logits(tiny_files, tmp_path, llama_cpp, qtype):
    agree, quant_err = TOLERANCES[qtype]
    src = tiny_files["wide"]
    out = quantize_gguf(src, tmp_path / f"{qtype}.gguf", qtype).output
    a = edgellm_logits(out)
    b = llama_cpp_logits(llama_cpp, out, IDS)
    f32 = edgellm_logits(src)
    print(f"{qtype}: edgellm vs llama.cpp {np.abs(a - b).max():.4f}, vs f32 {np.abs(a - f32).max():.4f} "
          f"(logit range {np.ptp(f32):.1f})")
    assert np.isfinite(a).all() and np.abs(a - b).max() <= agree
    assert np.abs(a - f32).max() <= quant_err


def test_requantize_q8_0_source_and_bf16_source(tiny_files, tmp_path, llama_cpp):
    src = tiny_files["wide"]
    q8 = quantize_gguf(src, tmp_path / "q8.gguf", "q8_0").output
    bf = quantize_gguf(src, tmp_path / "bf16.gguf", "bf16").output
    for mid in (q8, bf):
        out = quantize_gguf(mid, tmp_path / f"from-{Path(mid).stem}.gguf", "q4_k_m").output
        p = llama_cpp.llama_model_quantize_default_params()
        p.ftype, p.nthread, p.allow_requantize = LLAMA_FTYPE["q4_k_m"], 2, True
        ref = tmp_path / f"ref-{Path(mid).stem}.gguf"
        assert llama_cpp.llama_model_quantize(str(mid).encode(), str(ref).encode(), ctypes.byref(p)) == 0
        a, b = GGUFFile(out), GGUFFile(ref)
        for name, t in b.tensors.items():
            assert a.tensors[name].qtype == t.qtype and np.array_equal(np.asarray(a.tensors[name].data),
                                                                        np.asarray(t.data)), name


# ------------------------------------------------------------------------------ ternary
@pytest.fixture(scope="module")
def bitnet_f32(tmp_path_factory, model_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from edgellm.bench import make_checkpoints as mk
    from edgellm.converters import convert_to_gguf
    d = tmp_path_factory.mktemp("bitnet")
    ck = mk.make(d / "hf", "tiny-bitnet", tokenizer_gguf=str(model_path))
    return convert_to_gguf(ck, d / "bitnet-f32.gguf", "f32")


@pytest.mark.parametrize("qtype", ["tq1_0", "tq2_0"])
def test_ternary_targets_are_exact_on_bitnet_weights(bitnet_f32, tmp_path, llama_cpp, qtype):
    out = quantize_gguf(bitnet_f32, tmp_path / f"{qtype}.gguf", qtype).output
    f, src = GGUFFile(out), GGUFFile(bitnet_f32)
    ref = GGUFFile(llama_quantize(llama_cpp, bitnet_f32, tmp_path / "ref.gguf", qtype))
    for name, t in ref.tensors.items():
        assert f.tensors[name].qtype == t.qtype and np.array_equal(np.asarray(f.tensors[name].data),
                                                                    np.asarray(t.data)), name
    q = QT.TQ1_0 if qtype == "tq1_0" else QT.TQ2_0
    for name, t in f.tensors.items():
        if t.qtype == q:  # ternary weights survive exactly
            assert np.array_equal(gq.dequantize(np.asarray(t.data), q), np.asarray(src.tensors[name].data)), name
    assert f.tensors["token_embd.weight"].qtype == QT.Q6_K  # the tied head, as llama.cpp picks it
    assert f.metadata["bitnet.hidden_activation"] == f.metadata["bitnet.hidden_act"] == "relu2"
    ids = IDS % 256
    a = edgellm_logits(out, ids)
    assert np.isfinite(a).all() and np.isfinite(llama_cpp_logits(llama_cpp, out, ids[:8])).all()


def rewrite_metadata(src: Path, dst: Path, drop=(), put: dict | None = None) -> Path:
    """A copy of a GGUF file with metadata keys dropped / string keys set (as another converter writes it)."""
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(str(dst), r.fields[gguf.Keys.General.ARCHITECTURE].contents())
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name == gguf.Keys.General.ARCHITECTURE or f.name in drop:
            continue
        w.add_key_value(f.name, f.contents(), f.types[0], sub_type=f.types[-1] if len(f.types) > 1 else None)
    for k, v in (put or {}).items():
        w.add_string(k, v)
    for t in r.tensors:
        w.add_tensor(t.name, np.asarray(t.data), raw_shape=list(reversed(t.shape.tolist())), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_bitnet_activation_read_from_either_key(bitnet_f32, tmp_path):
    """A file from llama.cpp's converters names the activation only `bitnet.hidden_activation`."""
    ids = IDS % 256
    relu2 = edgellm_logits(bitnet_f32, ids)
    act = ["bitnet.hidden_act", "bitnet.hidden_activation"]
    only_llama_cpp = rewrite_metadata(bitnet_f32, tmp_path / "a.gguf", drop=act, put={act[1]: "silu"})
    only_ours = rewrite_metadata(bitnet_f32, tmp_path / "b.gguf", drop=act, put={act[0]: "silu"})
    assert act[0] not in GGUFFile(only_llama_cpp).metadata
    silu = edgellm_logits(only_llama_cpp, ids)
    assert np.array_equal(silu, edgellm_logits(only_ours, ids))
    assert np.abs(silu - relu2).max() > 1e-2  # the key is what selects the activation
    same = rewrite_metadata(bitnet_f32, tmp_path / "c.gguf", drop=[act[0]])
    assert np.array_equal(edgellm_logits(same, ids), relu2)


def test_ternary_target_on_other_weights_is_refused(tiny_files, tmp_path):
    with pytest.raises(ConversionError, match="not ternary"):
        quantize_gguf(tiny_files["wide"], tmp_path / "t.gguf", "tq1_0")
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------ the command
def test_cli_json_summary_and_force(tiny_files, tmp_path):
    out = tmp_path / "q.gguf"
    r = cli("quantize", tiny_files["narrow"], out, "Q4_K_M", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads(r.stdout)
    assert d["type"] == "Q4_K_M" and d["file_type"] == 15 and d["output"] == str(out)
    assert d["types"]["Q5_0"] > 0 and d["fallbacks"] and 4 < d["bits_per_weight"] < 9
    assert d["output_bytes"] == out.stat().st_size
    r = cli("quantize", tiny_files["narrow"], out, "q8_0", "--force")
    assert r.returncode == 0 and r.stdout.strip() == str(out), r.stderr[-2000:]
    assert GGUFFile(out).metadata[gguf.Keys.General.FILE_TYPE] == 7


def test_cli_bad_inputs_give_one_line(tiny_files, tmp_path):
    src = tiny_files["narrow"]
    assert_clean_error(cli("quantize", src, tmp_path / "a.gguf", "q3_k"), "unknown quantization type", "q4_k_m")
    assert_clean_error(cli("quantize", tmp_path / "missing.gguf", tmp_path / "a.gguf", "q8_0"), "no such file")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all, not at all")
    assert_clean_error(cli("quantize", tmp_path / "junk.gguf", tmp_path / "a.gguf", "q8_0"), "not a GGUF")
    (tmp_path / "keep.gguf").write_bytes(b"keep me")
    assert_clean_error(cli("quantize", src, tmp_path / "keep.gguf", "q8_0"), "--force")
    assert (tmp_path / "keep.gguf").read_bytes() == b"keep me"
    before = src.read_bytes()
    assert_clean_error(cli("quantize", src, src, "q8_0", "--force"), "input")
    assert src.read_bytes() == before
    q4 = quantize_gguf(src, tmp_path / "q4.gguf", "q4_0").output
    assert_clean_error(cli("quantize", q4, tmp_path / "b.gguf", "q8_0"), "Q4_0", "F16")
    assert_clean_error(cli("quantize", src, tmp_path / "c.gguf", "tq2_0"), "not ternary")
    assert_clean_error(cli("quantize", src, tmp_path / "nodir" / "c.gguf", "q8_0"), "does not exist")
    nan = tmp_path / "nan.gguf"
    nan.write_bytes(before)
    off = GGUFFile(nan).tensors["blk.1.attn_q.weight"].offset
    with open(nan, "r+b") as fh:
        fh.seek(off + 40)
        fh.write(np.float32(np.nan).tobytes())
    assert_clean_error(cli("quantize", nan, tmp_path / "d.gguf", "q4_k_m"), "blk.1.attn_q.weight", "non-finite")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.gguf", "keep.gguf", "nan.gguf", "q4.gguf"]


# ------------------------------------------------------------------------------ real weights: SmolLM2-135M
@pytest.mark.slow
def test_smollm2_q4_k_m_perplexity_equals_llama_cpps(tmp_path_factory, model_path, llama_cpp, text):
    """The default model dequantized to an HF checkpoint, converted to F16, then Q4_K_M by us and by llama.cpp:
    the same tensor types and bytes, so the same perplexity (asked: within 0.5%)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from edgellm.bench import make_checkpoints as mk
    from edgellm.bench.perplexity import edgellm_perplexity
    from edgellm.converters import convert_to_gguf
    d = tmp_path_factory.mktemp("smol")
    f16 = convert_to_gguf(mk.make(d / "hf", "smollm2-135m", tokenizer_gguf=str(model_path)), d / "f16.gguf", "f16")
    ours = quantize_gguf(f16, d / "ours.gguf", "q4_k_m").output
    ref = llama_quantize(llama_cpp, f16, d / "ref.gguf", "q4_k_m")
    a, b = GGUFFile(ours), GGUFFile(ref)
    same = sum(a.tensors[n].qtype == t.qtype and np.array_equal(np.asarray(a.tensors[n].data), np.asarray(t.data))
               for n, t in b.tensors.items())
    ppl = {k: edgellm_perplexity(Engine(p, n_ctx=512, threads=2), text[:12000], ctx=512, max_windows=3).ppl
           for k, p in (("ours", ours), ("llama.cpp", ref))}
    print(f"SmolLM2 Q4_K_M: {same}/{len(b.tensors)} tensors identical to llama.cpp's; perplexity {ppl}")
    assert same == len(b.tensors)
    assert np.isfinite(ppl["ours"]) and abs(ppl["ours"] / ppl["llama.cpp"] - 1) < 0.005

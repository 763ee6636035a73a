"""Shared fixtures: the real default model, llama-cpp-python as the reference engine, tiny random models."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).parent / "data"
REQUIRE = os.environ.get("EDGELLM_REQUIRE_REFERENCES") == "1"  # CI: a missing model or llama.cpp is a failure


def _missing(what: str):
    if REQUIRE:
        pytest.fail(f"{what} is required (EDGELLM_REQUIRE_REFERENCES=1)")
    pytest.skip(f"{what} is not available")


@pytest.fixture(scope="session")
def model_path() -> Path:
    from edgellm.models.catalog import DEFAULT_MODEL
    from edgellm.runtime.fetch import cached_path
    p = cached_path(DEFAULT_MODEL)
    if not p.exists():
        _missing(f"the default model ({p}; run `edgellm pull`)")
    return p


@pytest.fixture(scope="session")
def llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        _missing("llama-cpp-python")
    return llama_cpp


@pytest.fixture(scope="session")
def engine(model_path):
    from edgellm.runtime.engine import Engine
    return Engine(model_path, n_ctx=2048, threads=2)


@pytest.fixture(scope="session")
def text() -> str:
    return (DATA / "shakespeare_60k.txt").read_text(encoding="utf-8")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_tiny_llama(path, *, n_layer=2, n_embd=64, n_ff=96, n_head=4, n_head_kv=2, n_ctx=256, theta=10000.0,
                     qtype=None, seed=0, rope_freqs: np.ndarray | None = None, tied=True, scale=0.5):
    """A random-weight Llama GGUF with a byte-level BPE vocabulary (256 bytes + a few merges + specials).
    qtype: gguf.GGMLQuantizationType for the 2-D weights (default F32)."""
    import gguf
    from gguf import MODEL_TENSOR as T, TENSOR_NAMES
    qtype = qtype if qtype is not None else gguf.GGMLQuantizationType.F32
    rng = np.random.default_rng(seed)
    b2u = bytes_to_unicode()
    tokens = [b2u[b] for b in range(256)]
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]
    for m in merges:
        tokens.append(m.replace(" ", ""))
    tokens += ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    types = [1] * (len(tokens) - 3) + [3, 3, 3]
    V = len(tokens)
    hd = n_embd // n_head
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(n_layer)
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_freq_base(theta)
    w.add_rope_dimension_count(hd)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(V)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(V - 3)
    w.add_eos_token_id(V - 3)
    w.add_add_bos_token(False)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

    def mat(rows, cols):
        return (rng.standard_normal((rows, cols)) * scale / np.sqrt(cols)).astype(np.float32)

    def add(name, arr):
        if arr.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            q = gguf.quants.quantize(arr, qtype)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)
        else:
            w.add_tensor(name, arr)

    nm = lambda t, i=None: TENSOR_NAMES[t].format(bid=i) + ".weight"  # noqa: E731
    add(nm(T.TOKEN_EMBD), (rng.standard_normal((V, n_embd))).astype(np.float32))
    add(nm(T.OUTPUT_NORM), (1 + 0.1 * rng.standard_normal(n_embd)).astype(np.float32))
    if not tied:
        add(nm(T.OUTPUT), mat(V, n_embd))
    if rope_freqs is not None:
        w.add_tensor(TENSOR_NAMES[T.ROPE_FREQS] + ".weight", rope_freqs.astype(np.float32))
    for i in range(n_layer):
        add(nm(T.ATTN_NORM, i), (1 + 0.1 * rng.standard_normal(n_embd)).astype(np.float32))
        add(nm(T.ATTN_Q, i), mat(n_head * hd, n_embd))
        add(nm(T.ATTN_K, i), mat(n_head_kv * hd, n_embd))
        add(nm(T.ATTN_V, i), mat(n_head_kv * hd, n_embd))
        add(nm(T.ATTN_OUT, i), mat(n_embd, n_head * hd))
        add(nm(T.FFN_NORM, i), (1 + 0.1 * rng.standard_normal(n_embd)).astype(np.float32))
        add(nm(T.FFN_GATE, i), mat(n_ff, n_embd))
        add(nm(T.FFN_UP, i), mat(n_ff, n_embd))
        add(nm(T.FFN_DOWN, i), mat(n_embd, n_ff))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def llama_cpp_logits(llama_cpp, path, tokens, n_ctx=None, threads=2) -> np.ndarray:
    """Logits (N, V) of every position from llama-cpp-python."""
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx or max(64, len(tokens)), n_batch=512, n_ubatch=512,
                          logits_all=True, n_threads=threads, n_threads_batch=threads, verbose=False)
    llm.eval([int(t) for t in tokens])
    out = np.array(llm.scores[:len(tokens)], dtype=np.float32)
    llm.close()
    return out

"""Tiny random-weight GGUF files of every architecture edgellm runs (llama, deci, bitnet, deepseek2, edgellm-linear),
written directly with gguf-py (no torch), each with a byte-level BPE vocabulary (256 bytes + a few merges +
specials) and a chat template. Shared by the tests: `write_tiny_llama` (llama / deci) and `write_tiny(arch)`."""
from __future__ import annotations

from pathlib import Path

import numpy as np

ARCHS = ("llama", "deci", "bitnet", "deepseek2", "edgellm-linear")


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


def _header(path, arch: str, *, n_layer, n_embd, n_ff, n_head, n_head_kv, n_ctx, eps=1e-5):
    """A GGUFWriter with the common metadata and the tokenizer; -> (writer, n_vocab)."""
    import gguf
    b2u = bytes_to_unicode()
    tokens = [b2u[b] for b in range(256)]
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]
    tokens += [m.replace(" ", "") for m in merges]
    tokens += ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    types = [1] * (len(tokens) - 3) + [3, 3, 3]
    V = len(tokens)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(n_layer)
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_layer_norm_rms_eps(eps)
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
    return w, V


def _finish(w, path) -> Path:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def _nm(t, i=None) -> str:
    from gguf import TENSOR_NAMES
    return TENSOR_NAMES[t].format(bid=i) + ".weight"


class _Tensors:
    """Random tensors written by GGUF name: matrices scaled by 1/sqrt(cols), norms around 1."""

    def __init__(self, w, seed: int, scale: float, qtype=None):
        import gguf
        self.w, self.rng, self.scale = w, np.random.default_rng(seed), scale
        self.qtype = qtype if qtype is not None else gguf.GGMLQuantizationType.F32

    def mat(self, rows, cols):
        return (self.rng.standard_normal((rows, cols)) * self.scale / np.sqrt(cols)).astype(np.float32)

    def norm(self, n):
        return (1 + 0.1 * self.rng.standard_normal(n)).astype(np.float32)

    def attention_in(self, i, n_embd, n_head, n_head_kv, hd):
        """Layer i's attention norm and q, k, v projections (of a llama-like layer)."""
        from gguf import MODEL_TENSOR as T
        self.add(_nm(T.ATTN_NORM, i), self.norm(n_embd))
        self.add(_nm(T.ATTN_Q, i), self.mat(n_head * hd, n_embd))
        self.add(_nm(T.ATTN_K, i), self.mat(n_head_kv * hd, n_embd))
        self.add(_nm(T.ATTN_V, i), self.mat(n_head_kv * hd, n_embd))

    def feed_forward(self, i, n_embd, n_ff):
        """Layer i's FFN norm and SwiGLU gate, up and down projections."""
        from gguf import MODEL_TENSOR as T
        self.add(_nm(T.FFN_NORM, i), self.norm(n_embd))
        self.add(_nm(T.FFN_GATE, i), self.mat(n_ff, n_embd))
        self.add(_nm(T.FFN_UP, i), self.mat(n_ff, n_embd))
        self.add(_nm(T.FFN_DOWN, i), self.mat(n_embd, n_ff))

    def add(self, name, arr, qtype=None):
        import gguf
        qtype = self.qtype if qtype is None else qtype
        if arr.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            q = gguf.quants.quantize(arr, qtype)
            self.w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)
        else:
            self.w.add_tensor(name, arr)


def write_tiny_llama(path, *, n_layer=2, n_embd=64, n_ff=96, n_head=4, n_head_kv=2, n_ctx=256, theta=10000.0,
                     qtype=None, seed=0, rope_freqs: np.ndarray | None = None, tied=True, scale=0.5,
                     layer_heads: list[tuple[int, int]] | None = None, layer_ff: list[int] | None = None,
                     embd_qtype=None):
    """A random-weight Llama GGUF. qtype: gguf.GGMLQuantizationType for the 2-D weights (default F32; the token
    embedding embd_qtype when given).
    layer_heads / layer_ff: per-layer (n_head, n_head_kv) and feed-forward widths: a `deci` file (llama.cpp's
    architecture for pruned Llamas), head size n_embd // n_head."""
    from gguf import MODEL_TENSOR as T, TENSOR_NAMES
    deci = layer_heads is not None or layer_ff is not None
    hd = n_embd // n_head
    heads = layer_heads or [(n_head, n_head_kv)] * n_layer
    ffs = layer_ff or [n_ff] * n_layer
    w, V = _header(path, "deci" if deci else "llama", n_layer=n_layer, n_embd=n_embd,
                   n_ff=ffs if deci else n_ff, n_head=[h for h, _ in heads] if deci else n_head,
                   n_head_kv=[k for _, k in heads] if deci else n_head_kv, n_ctx=n_ctx)
    if deci:
        w.add_key_length(hd)
        w.add_value_length(hd)
    w.add_rope_freq_base(theta)
    w.add_rope_dimension_count(hd)
    t = _Tensors(w, seed, scale, qtype)
    t.add(_nm(T.TOKEN_EMBD), (t.rng.standard_normal((V, n_embd))).astype(np.float32), embd_qtype)
    t.add(_nm(T.OUTPUT_NORM), t.norm(n_embd))
    if not tied:
        t.add(_nm(T.OUTPUT), t.mat(V, n_embd))
    if rope_freqs is not None:
        w.add_tensor(TENSOR_NAMES[T.ROPE_FREQS] + ".weight", rope_freqs.astype(np.float32))
    for i, ((H, Hkv), F) in enumerate(zip(heads, ffs)):
        t.attention_in(i, n_embd, H, Hkv, hd)
        t.add(_nm(T.ATTN_OUT, i), t.mat(n_embd, H * hd))
        t.feed_forward(i, n_embd, F)
    return _finish(w, path)


def write_tiny_bitnet(path, *, n_layer=2, n_embd=256, n_ff=256, n_head=4, n_head_kv=2, n_ctx=256, seed=0,
                      act="relu2", embd_qtype=None):
    """A random BitNet b1.58 GGUF: TQ2_0 ternary projections (256 columns a block) with per-tensor `.scale`s,
    sub-norms, the embedding as the output head (F32, or embd_qtype: Q8_0 as the converter writes it)."""
    import gguf
    from gguf import MODEL_TENSOR as T
    hd = n_embd // n_head
    w, V = _header(path, "bitnet", n_layer=n_layer, n_embd=n_embd, n_ff=n_ff, n_head=n_head, n_head_kv=n_head_kv,
                   n_ctx=n_ctx)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(hd)
    w.add_string("bitnet.hidden_act", act)
    t = _Tensors(w, seed, 1.0)
    TQ = gguf.GGMLQuantizationType.TQ2_0

    def ternary(name, rows, cols):
        t.add(name, np.clip(np.round(t.rng.standard_normal((rows, cols))), -1, 1).astype(np.float32), TQ)
        w.add_tensor(name[:-len(".weight")] + ".scale", np.array([0.5 / np.sqrt(cols)], dtype=np.float32))

    t.add(_nm(T.TOKEN_EMBD), (t.rng.standard_normal((V, n_embd))).astype(np.float32), embd_qtype)
    t.add(_nm(T.OUTPUT_NORM), t.norm(n_embd))
    for i in range(n_layer):
        t.add(_nm(T.ATTN_NORM, i), t.norm(n_embd))
        ternary(_nm(T.ATTN_Q, i), n_head * hd, n_embd)
        ternary(_nm(T.ATTN_K, i), n_head_kv * hd, n_embd)
        ternary(_nm(T.ATTN_V, i), n_head_kv * hd, n_embd)
        t.add(_nm(T.ATTN_SUB_NORM, i), t.norm(n_head * hd))
        ternary(_nm(T.ATTN_OUT, i), n_embd, n_head * hd)
        t.add(_nm(T.FFN_NORM, i), t.norm(n_embd))
        ternary(_nm(T.FFN_GATE, i), n_ff, n_embd)
        ternary(_nm(T.FFN_UP, i), n_ff, n_embd)
        t.add(_nm(T.FFN_SUB_NORM, i), t.norm(n_ff))
        ternary(_nm(T.FFN_DOWN, i), n_embd, n_ff)
    return _finish(w, path)


def write_tiny_mla(path, *, n_layer=2, n_embd=64, n_ff=96, n_head=4, n_ctx=256, r_q=24, r_kv=16, dn=12, dr=8, dv=16,
                   seed=0):
    """A random dense MLA model as llama.cpp's `deepseek2` (q_lora_rank, kv_lora_rank, split attn_k_b / attn_v_b)."""
    import gguf
    from gguf import MODEL_TENSOR as T
    w, V = _header(path, "deepseek2", n_layer=n_layer, n_embd=n_embd, n_ff=n_ff, n_head=n_head, n_head_kv=1,
                   n_ctx=n_ctx)
    w.add_key_length(r_kv + dr)
    w.add_value_length(r_kv)
    w.add_key_length_mla(dn + dr)
    w.add_value_length_mla(dv)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(dr)
    w.add_q_lora_rank(r_q)
    w.add_kv_lora_rank(r_kv)
    w.add_leading_dense_block_count(n_layer)
    w.add_expert_count(0)
    w.add_rope_scaling_type(gguf.RopeScalingType.NONE)
    t = _Tensors(w, seed, 1.0)
    t.add(_nm(T.TOKEN_EMBD), (t.rng.standard_normal((V, n_embd))).astype(np.float32))
    t.add(_nm(T.OUTPUT_NORM), t.norm(n_embd))
    for i in range(n_layer):
        t.add(_nm(T.ATTN_NORM, i), t.norm(n_embd))
        t.add(_nm(T.ATTN_Q_A, i), t.mat(r_q, n_embd))
        t.add(_nm(T.ATTN_Q_A_NORM, i), t.norm(r_q))
        t.add(_nm(T.ATTN_Q_B, i), t.mat(n_head * (dn + dr), r_q))
        t.add(_nm(T.ATTN_KV_A_MQA, i), t.mat(r_kv + dr, n_embd))
        t.add(_nm(T.ATTN_KV_A_NORM, i), t.norm(r_kv))
        t.add(_nm(T.ATTN_K_B, i), (t.rng.standard_normal((n_head, r_kv, dn)) / np.sqrt(r_kv)).astype(np.float32))
        t.add(_nm(T.ATTN_V_B, i), (t.rng.standard_normal((n_head, dv, r_kv)) / np.sqrt(r_kv)).astype(np.float32))
        t.add(_nm(T.ATTN_OUT, i), t.mat(n_embd, n_head * dv))
        t.feed_forward(i, n_embd, n_ff)
    return _finish(w, path)


def write_tiny_linear(path, *, n_layer=2, n_embd=64, n_ff=96, n_head=4, n_head_kv=2, n_ctx=256, conv_kernel=4,
                      feature_map="elu1", chunk=8, seed=0):
    """A random `edgellm-linear` model (gated linear attention with causal q / k convolutions)."""
    from gguf import MODEL_TENSOR as T
    arch = "edgellm-linear"
    hd = n_embd // n_head
    w, V = _header(path, arch, n_layer=n_layer, n_embd=n_embd, n_ff=n_ff, n_head=n_head, n_head_kv=n_head_kv,
                   n_ctx=n_ctx)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_uint32(f"{arch}.conv_kernel", conv_kernel)
    w.add_string(f"{arch}.feature_map", feature_map)
    w.add_uint32(f"{arch}.chunk_size", chunk)
    w.add_float32(f"{arch}.attention.eps", 1e-6)
    w.add_float32(f"{arch}.attention.log_decay_min", -8.0)
    t = _Tensors(w, seed, 0.5)
    t.add(_nm(T.TOKEN_EMBD), (t.rng.standard_normal((V, n_embd))).astype(np.float32))
    t.add(_nm(T.OUTPUT_NORM), t.norm(n_embd))
    for i in range(n_layer):
        t.attention_in(i, n_embd, n_head, n_head_kv, hd)
        for x, n in (("q", n_head), ("k", n_head_kv)):
            conv = 0.3 * t.rng.standard_normal((n * hd, conv_kernel)).astype(np.float32)
            conv[:, -1] += 1  # near the identity (the current token), as the converter initialises it
            w.add_tensor(f"blk.{i}.attn_{x}_conv.weight", conv)
        w.add_tensor(f"blk.{i}.attn_gate.weight", t.mat(n_head_kv * hd, n_embd))
        w.add_tensor(f"blk.{i}.attn_gate.bias", (2 + t.rng.standard_normal(n_head_kv * hd)).astype(np.float32))
        t.add(_nm(T.ATTN_OUT, i), t.mat(n_embd, n_head * hd))
        t.feed_forward(i, n_embd, n_ff)
    return _finish(w, path)


def write_tiny(path, arch: str, **kw) -> Path:
    """A tiny random GGUF of architecture `arch` (one of ARCHS)."""
    if arch == "llama":
        return write_tiny_llama(path, **kw)
    if arch == "deci":  # per-layer widths, as a pruned model has them
        kw = dict(dict(n_layer=3, n_embd=64, n_head=4, layer_heads=[(4, 2), (2, 1), (4, 4)], layer_ff=[96, 32, 64]),
                  **kw)
        return write_tiny_llama(path, **kw)
    if arch == "bitnet":
        return write_tiny_bitnet(path, **kw)
    if arch == "deepseek2":
        return write_tiny_mla(path, **kw)
    if arch == "edgellm-linear":
        return write_tiny_linear(path, **kw)
    raise ValueError(f"no tiny writer for {arch!r} (one of {', '.join(ARCHS)})")


# ---------------------------------------------------------------------------- Hugging Face checkpoints and ONNX
DATA = Path(__file__).parent / "data"
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_tokenizer(out: Path) -> int:
    """A byte-level BPE (GPT-2 pre-tokenizer) trained on Shakespeare, with ChatML specials."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = (DATA / "shakespeare_60k.txt").read_text(encoding="utf-8")
    tr = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text[i:i + 2000] for i in range(0, len(text), 2000)], tr)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>",
        "add_bos_token": False, "model_max_length": 1024, "chat_template": CHAT_TEMPLATE}))
    return tok.get_vocab_size()


def _norms_near_one(model):
    import torch
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))


def write_tiny_hf_llama(out: Path) -> Path:
    """A transformers checkpoint with Llama-3.2's structure, tiny: llama3 rope scaling, 8 query heads over 2 kv heads,
    tied embeddings, the tokenizer of `write_tokenizer` (needs torch and transformers)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    out = Path(out)
    out.mkdir(parents=True)
    V = write_tokenizer(out)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=2, head_dim=8, max_position_embeddings=131072, rms_norm_eps=1e-5,
                      rope_theta=500000.0, tie_word_embeddings=True, bos_token_id=0, eos_token_id=2,
                      initializer_range=0.08,
                      rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    m = LlamaForCausalLM(cfg)
    _norms_near_one(m)
    m.save_pretrained(out)
    return out


def write_tiny_onnx(out: Path, hf: Path, recurrent: bool = False) -> Path:
    """The checkpoint `hf` (write_tiny_hf_llama) exported to an ONNX folder (fp32): with optimum's past key values,
    or as the linear-attention variant with a recurrent state (`recurrent`)."""
    if not recurrent:
        from edgellm.converters.onnx_export import convert_to_onnx
        return convert_to_onnx(hf, out, dtype="fp32")
    from edgellm.converters import linear as L
    from edgellm.converters.variant import load_teacher, transform_model
    ckpt, teacher = load_teacher(hf)
    L.write_linear_onnx(transform_model(teacher, "linear"), ckpt, out, "fp32")
    return Path(out)

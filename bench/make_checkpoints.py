"""Random-weight Hugging Face checkpoints with the exact configs of Llama-3.2-1B and BitNet b1.58 2B4T (and tiny
ones with the same structure), for conversion tests and 1B-scale benchmarks: their weights cannot be
downloaded here. The tokenizer is SmolLM2's (taken from the default GGUF through transformers), padded by the
converter to the config's vocabulary size.

    python -m edgellm.bench.make_checkpoints OUT_DIR --model {llama-3.2-1b,bitnet-2b4t,tiny-llama,tiny-bitnet,smollm2-135m}

smollm2-135m is the real SmolLM2-135M-Instruct, rebuilt from the default GGUF (Q4_1 weights, dequantized).

Needs the `convert` extra (torch, transformers). BitNet checkpoints are written as transformers' BitNet
quantizer stores them (`quantization_config.quant_method = bitnet`, packed uint8 ternary weights and a
per-tensor `weight_scale`), so that transformers itself computes with ternary weights when it loads them.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

# Llama-3.2-1B's config.json (meta-llama/Llama-3.2-1B), the fields that define the model
LLAMA_32_1B = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=2048, intermediate_size=8192,
    num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
    max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
    hidden_act="silu", attention_bias=False, mlp_bias=False, bos_token_id=128000, eos_token_id=128001,
    rope_scaling=dict(factor=32.0, high_freq_factor=4.0, low_freq_factor=1.0,
                      original_max_position_embeddings=8192, rope_type="llama3"),
    torch_dtype="bfloat16",
)
# BitNet b1.58 2B4T's config.json (microsoft/bitnet-b1.58-2B-4T)
BITNET_2B4T = dict(
    architectures=["BitNetForCausalLM"], model_type="bitnet", hidden_size=2560, intermediate_size=6912,
    num_hidden_layers=30, num_attention_heads=20, num_key_value_heads=5, vocab_size=128256,
    max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
    hidden_act="relu2", attention_bias=False, bos_token_id=128000, eos_token_id=128001,
    quantization_config=dict(quant_method="bitnet", linear_class="bitlinear", quantization_mode="offline"),
    torch_dtype="bfloat16",
)
TINY_LLAMA = dict(LLAMA_32_1B, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=1, head_dim=16, vocab_size=49152, max_position_embeddings=4096,
                  bos_token_id=1, eos_token_id=2, torch_dtype="float32")
TINY_BITNET = dict(BITNET_2B4T, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=1, vocab_size=49152, bos_token_id=1, eos_token_id=2, torch_dtype="float32")
MODELS = {"llama-3.2-1b": LLAMA_32_1B, "bitnet-2b4t": BITNET_2B4T, "tiny-llama": TINY_LLAMA,
          "tiny-bitnet": TINY_BITNET}
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def save_tokenizer(out: Path, gguf_path: str | None = None) -> None:
    """SmolLM2's tokenizer files (tokenizer.json, tokenizer_config.json with its chat template)."""
    from transformers import AutoTokenizer
    from ..runtime.fetch import resolve_model
    p = Path(gguf_path or resolve_model(None))
    tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    tok.save_pretrained(str(out))


def pack_ternary(t: np.ndarray) -> np.ndarray:
    """transformers' BitNet packing of a ternary (out, in) array (values -1, 0, 1): uint8 (out/4, in), code t+1 of
    row i*out/4 + r in bits 2i..2i+1 of row r."""
    q = (np.asarray(t) + 1).astype(np.uint8)
    R = q.shape[0] // 4
    packed = np.zeros((R, q.shape[1]), dtype=np.uint8)
    for i in range(4):
        packed |= q[i * R:(i + 1) * R] << (2 * i)
    return packed


def make_smollm2(out: Path, gguf_path: str | None = None) -> Path:
    """SmolLM2-135M-Instruct's real weights, rebuilt by transformers from the default GGUF (Q4_1 dequantized to
    f32) and saved as a LlamaForCausalLM checkpoint: the real model for the variants' quality measurements."""
    import torch
    from transformers import AutoModelForCausalLM
    from ..runtime.fetch import resolve_model
    p = Path(gguf_path or resolve_model(None))
    m = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
    m.save_pretrained(str(out))
    save_tokenizer(out, str(p))
    return out


def make(out: str | Path, model: str, seed: int = 0, dtype: str | None = None, tokenizer_gguf: str | None = None):
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if model == "smollm2-135m":
        return make_smollm2(out, tokenizer_gguf)
    cfg = dict(MODELS[model])
    bitnet = cfg["model_type"] == "bitnet"
    torch_dtype = getattr(torch, dtype or cfg["torch_dtype"])
    torch.manual_seed(seed)
    plain = {k: v for k, v in cfg.items() if k != "quantization_config"}
    config = AutoConfig.for_model(**{k: v for k, v in plain.items() if k not in ("architectures", "model_type")},
                                  model_type=cfg["model_type"])
    config.architectures = cfg["architectures"]
    config.initializer_range = 0.02
    with torch.no_grad():
        m = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
        for name, p in m.named_parameters():  # norms: around 1, so that the random model is not degenerate
            if p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
        sd = {}
        for name, p in m.state_dict().items():
            if "rotary_emb" in name or (name == "lm_head.weight" and cfg.get("tie_word_embeddings")):
                continue
            if bitnet and name.split(".")[-2] in PROJ:
                s = p.abs().mean().clamp(min=1e-5)
                t = (p / s).round().clamp(-1, 1)
                sd[name] = torch.from_numpy(pack_ternary(t.to(torch.int8).numpy()))
                # transformers' BitLinear divides its output by weight_scale
                sd[name[: -len("weight")] + "weight_scale"] = (1.0 / s).reshape(1).to(torch_dtype)
            else:
                sd[name] = p.detach().to(torch_dtype).contiguous()
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    full = dict(config.to_dict(), **{k: v for k, v in cfg.items() if k != "torch_dtype"})
    full["torch_dtype"] = str(torch_dtype).replace("torch.", "")
    (out / "config.json").write_text(json.dumps(full, indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"], "do_sample": False}))
    save_tokenizer(out, tokenizer_gguf)
    del m
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--model", choices=sorted(MODELS) + ["smollm2-135m"], required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    a = ap.parse_args(argv)
    print(make(a.out, a.model, a.seed, a.dtype))


if __name__ == "__main__":
    main()

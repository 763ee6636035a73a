"""What a model file holds: architecture, parameters, tensor types, sizes, context, tokenizer."""
from __future__ import annotations

from collections import Counter

from gguf import Keys

from ..models.config import ConfigError, ModelConfig
from .errors import GGUFError
from .fetch import resolve_model
from .gguf_file import GGUFFile


def describe(model, converter=None) -> dict:
    """What `edgellm inspect` prints (converter: see runtime/hub.py)."""
    path = resolve_model(model, converter)
    f = GGUFFile(path)
    try:
        cfg = ModelConfig.from_gguf(f.metadata)
    except ConfigError as e:
        raise GGUFError(f"{path}: {e}") from None
    types = Counter()
    for t in f.tensors.values():
        types[t.qtype.name] += t.n_elements
    n_params = sum(t.n_elements for t in f.tensors.values())
    tokens = f.metadata.get(Keys.Tokenizer.LIST) or []
    return {
        "path": str(path),
        "name": f.metadata.get(Keys.General.NAME, ""),
        "architecture": cfg.arch,
        "file_size": f.file_size,
        "gguf_version": f.version,
        "n_params": n_params,
        "n_tensors": len(f.tensors),
        "tensor_types": dict(types.most_common()),
        "context_length": cfg.n_ctx_train,
        "n_layer": cfg.n_layer,
        "n_embd": cfg.n_embd,
        "n_ff": cfg.n_ff,
        "n_head": cfg.n_head,
        "n_head_kv": cfg.n_head_kv,
        "head_dim": cfg.head_dim,
        "rope_theta": cfg.rope_theta,
        "vocab_size": cfg.n_vocab,
        "tokenizer": f.metadata.get(Keys.Tokenizer.MODEL, ""),
        "tokenizer_pre": f.metadata.get(Keys.Tokenizer.PRE, ""),
        "n_tokens": len(tokens),
        "bos_token_id": f.metadata.get(Keys.Tokenizer.BOS_ID),
        "eos_token_id": f.metadata.get(Keys.Tokenizer.EOS_ID),
        "chat_template": bool(f.metadata.get(Keys.Tokenizer.CHAT_TEMPLATE)),
    }

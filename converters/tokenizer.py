"""A Hugging Face tokenizer written into a GGUF file as its tokenizer metadata (the mapping itself is
models/hf_tokenizer.py's, shared with the runtime's ONNX backend)."""
from __future__ import annotations

import gguf

from ..models.config import ConfigError
from ..models.hf_tokenizer import read_hf_tokenizer
from .checkpoint import ConversionError, HFCheckpoint


def add_tokenizer(w: gguf.GGUFWriter, ckpt: HFCheckpoint, n_vocab: int) -> None:
    try:
        t = read_hf_tokenizer(ckpt.path, ckpt.config, ckpt.tokenizer_config, n_vocab)
    except ConfigError as e:
        raise ConversionError(str(e)) from None
    w.add_tokenizer_model(t.model)
    w.add_tokenizer_pre(t.pre)
    w.add_token_list(t.tokens)
    w.add_token_types(t.types)
    w.add_token_merges(t.merges)
    if t.bos_id is not None:
        w.add_bos_token_id(t.bos_id)
    if t.eos_id is not None:
        w.add_eos_token_id(t.eos_id)
    if t.pad_id is not None:
        w.add_pad_token_id(t.pad_id)
    w.add_add_bos_token(t.add_bos)
    if t.chat_template is not None:
        w.add_chat_template(t.chat_template)

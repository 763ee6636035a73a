"""A Hugging Face tokenizer written into a GGUF file as its tokenizer metadata (the mapping itself is
models/hf_tokenizer.py's, shared with the runtime's ONNX backend)."""
from __future__ import annotations

import gguf

from ..models.config import ConfigError
from ..models.hf_tokenizer import HFTokenizer, read_hf_tokenizer
from .checkpoint import ConversionError, HFCheckpoint


def check_tokenizer(ckpt: HFCheckpoint, n_vocab: int) -> HFTokenizer:
    """The checkpoint's tokenizer files read and checked (models/hf_tokenizer.py), its chat template compiled:
    every conversion (GGUF, ONNX, variants) calls this before it computes anything."""
    from ..runtime.chat_template import compile_template
    from ..runtime.errors import EdgeLLMError
    try:
        t = read_hf_tokenizer(ckpt.path, ckpt.config, ckpt.tokenizer_config, n_vocab)
        if t.chat_template is not None:
            compile_template(t.chat_template, f"{ckpt.path}: the chat template")
    except (ConfigError, EdgeLLMError) as e:
        raise ConversionError(str(e)) from None
    return t


def add_tokenizer(w: gguf.GGUFWriter, ckpt: HFCheckpoint, n_vocab: int) -> None:
    t = check_tokenizer(ckpt, n_vocab)
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

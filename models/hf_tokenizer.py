"""A Hugging Face tokenizer (tokenizer.json + tokenizer_config.json + config.json, chat_template.jinja) described
as GGUF describes one: tokens, token types, merges, special ids, pre-tokenizer name and chat template.

The one place this mapping lives: the GGUF converter writes it into a file (converters/tokenizer.py) and the
runtime builds its tokenizer from it for an ONNX folder (runtime/tokenizer.py), so both tokenize alike.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from gguf import Keys, TokenType

from .config import ConfigError

TK = Keys.Tokenizer

# pre-tokenizer regexes that identify llama.cpp's named pre-tokenizers (tokenizer.ggml.pre)
_LLAMA3_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                 "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")


@dataclass(frozen=True)
class HFTokenizer:
    pre: str                    # llama.cpp's pre-tokenizer name
    tokens: list[str]           # n_vocab entries ([PADi] where the tokenizer has none)
    types: list[int]            # gguf.TokenType per token
    merges: list[str]           # "a b" pairs, in rank order
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    add_bos: bool
    chat_template: str | None
    model: str = "gpt2"         # byte-level BPE

    def metadata(self) -> dict[str, Any]:
        """The GGUF tokenizer keys and values a file converted from this tokenizer holds."""
        md: dict[str, Any] = {TK.MODEL: self.model, TK.PRE: self.pre, TK.LIST: list(self.tokens),
                              TK.TOKEN_TYPE: [int(t) for t in self.types], TK.MERGES: list(self.merges)}
        for key, v in ((TK.BOS_ID, self.bos_id), (TK.EOS_ID, self.eos_id), (TK.PAD_ID, self.pad_id)):
            if v is not None:
                md[key] = v
        md[TK.ADD_BOS] = self.add_bos
        if self.chat_template is not None:
            md[TK.CHAT_TEMPLATE] = self.chat_template
        return md


def _pre_name(tok: dict) -> str:
    pre = tok.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    types = [p.get("type") for p in parts]
    regexes = [((p.get("pattern") or {}).get("Regex")) for p in parts if p.get("type") == "Split"]
    if _LLAMA3_REGEX in regexes:
        return "llama-bpe"
    if types == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if types == ["ByteLevel"]:
        return "gpt-2"
    raise ConfigError(f"unrecognised pre-tokenizer {types} in tokenizer.json: edgellm knows llama-bpe "
                      "(Llama-3), smollm and gpt-2")


def _adds_bos(tok: dict) -> bool:
    post = tok.get("post_processor") or {}
    procs = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    for p in procs:
        if p.get("type") == "TemplateProcessing":
            return any("SpecialToken" in piece for piece in p.get("single", [])[:1])
    return False


def read_hf_tokenizer(folder, config: Mapping, tokenizer_config: Mapping, n_vocab: int) -> HFTokenizer:
    """The tokenizer of a Hugging Face folder; config / tokenizer_config: its config.json and tokenizer_config.json
    (already read); n_vocab: the model's vocabulary size (the token list is padded to it). Raises ConfigError."""
    folder = Path(folder)
    path = folder / "tokenizer.json"
    if not path.exists():
        raise ConfigError(f"{folder}: missing tokenizer.json")
    tok = json.loads(path.read_text(encoding="utf-8"))
    model = tok.get("model") or {}
    if model.get("type") != "BPE":
        raise ConfigError(f"tokenizer model {model.get('type')!r} is not supported (byte-level BPE only)")
    vocab: dict[str, int] = dict(model["vocab"])
    added = {a["content"]: a for a in tok.get("added_tokens", [])}
    for a in added.values():
        vocab[a["content"]] = a["id"]
    size = max(n_vocab, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [TokenType.UNUSED] * size
    for t, i in vocab.items():
        tokens[i] = t
        a = added.get(t)
        types[i] = TokenType.NORMAL if a is None else (TokenType.CONTROL if a.get("special") else TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    def special_id(key_cfg: str, key_tc: str):
        v = config.get(key_cfg)
        if isinstance(v, list):
            v = v[0]
        if v is None:
            name = tokenizer_config.get(key_tc)
            if isinstance(name, dict):
                name = name.get("content")
            v = vocab.get(name) if name else None
        return None if v is None else int(v)

    template = tokenizer_config.get("chat_template")
    jinja = folder / "chat_template.jinja"  # where transformers >= 4.56 saves it
    if template is None and jinja.exists():
        template = jinja.read_text(encoding="utf-8")
    if isinstance(template, list):  # named templates: keep the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return HFTokenizer(pre=_pre_name(tok), tokens=tokens, types=[int(t) for t in types], merges=merges,
                       bos_id=special_id("bos_token_id", "bos_token"), eos_id=special_id("eos_token_id", "eos_token"),
                       pad_id=special_id("pad_token_id", "pad_token"),
                       add_bos=bool(tokenizer_config.get("add_bos_token", _adds_bos(tok))),
                       chat_template=template if isinstance(template, str) else None)

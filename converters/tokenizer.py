"""A Hugging Face tokenizer (tokenizer.json + tokenizer_config.json) as GGUF tokenizer metadata:
tokens, token types, merges, special ids, pre-tokenizer name and chat template."""
from __future__ import annotations

import json
from pathlib import Path

import gguf
from gguf import TokenType

from .checkpoint import ConversionError, HFCheckpoint

# pre-tokenizer regexes that identify llama.cpp's named pre-tokenizers (tokenizer.ggml.pre)
_LLAMA3_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                 "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")


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
    raise ConversionError(f"unrecognised pre-tokenizer {types} in tokenizer.json: edgellm knows llama-bpe "
                          "(Llama-3), smollm and gpt-2")


def add_tokenizer(w: gguf.GGUFWriter, ckpt: HFCheckpoint, n_vocab: int) -> None:
    path = Path(ckpt.path) / "tokenizer.json"
    if not path.exists():
        raise ConversionError(f"{ckpt.path}: missing tokenizer.json")
    tok = json.loads(path.read_text(encoding="utf-8"))
    model = tok.get("model") or {}
    if model.get("type") != "BPE":
        raise ConversionError(f"tokenizer model {model.get('type')!r} is not supported (byte-level BPE only)")
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
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_pre_name(tok))
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    tc, cfg = ckpt.tokenizer_config, ckpt.config

    def special_id(key_cfg: str, key_tc: str):
        v = cfg.get(key_cfg)
        if isinstance(v, list):
            v = v[0]
        if v is None:
            name = tc.get(key_tc)
            if isinstance(name, dict):
                name = name.get("content")
            v = vocab.get(name) if name else None
        return v

    bos, eos = special_id("bos_token_id", "bos_token"), special_id("eos_token_id", "eos_token")
    if bos is not None:
        w.add_bos_token_id(int(bos))
    if eos is not None:
        w.add_eos_token_id(int(eos))
    pad = special_id("pad_token_id", "pad_token")
    if pad is not None:
        w.add_pad_token_id(int(pad))
    w.add_add_bos_token(bool(tc.get("add_bos_token", _adds_bos(tok))))
    template = tc.get("chat_template")
    jinja = Path(ckpt.path) / "chat_template.jinja"  # where transformers >= 4.56 saves it
    if template is None and jinja.exists():
        template = jinja.read_text(encoding="utf-8")
    if isinstance(template, list):  # named templates: keep the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if isinstance(template, str):
        w.add_chat_template(template)


def _adds_bos(tok: dict) -> bool:
    post = tok.get("post_processor") or {}
    procs = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    for p in procs:
        if p.get("type") == "TemplateProcessing":
            return any("SpecialToken" in piece for piece in p.get("single", [])[:1])
    return False

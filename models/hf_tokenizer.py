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


def _brief(v) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def _is_id(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError
        raise ConfigError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, found a JSON {type(data).__name__}")
    return data


def _parts(node, key: str, where: str) -> list[dict]:
    """The steps of a tokenizer.json component (a "Sequence" holds them under `key`), each a JSON object."""
    if node is None:
        return []
    if not isinstance(node, dict):
        raise ConfigError(f"{where} is not a JSON object")
    parts = node.get(key) if node.get("type") == "Sequence" else [node]
    if not isinstance(parts, list) or not all(isinstance(p, dict) for p in parts):
        raise ConfigError(f"{where}: {key!r} is not a list of JSON objects")
    return parts


def _pre_name(tok: dict, where: str) -> str:
    parts = _parts(tok.get("pre_tokenizer"), "pretokenizers", f"{where}: pre_tokenizer")
    types = [p.get("type") for p in parts]
    regexes = [p["pattern"].get("Regex") for p in parts
               if p.get("type") == "Split" and isinstance(p.get("pattern"), dict)]
    if _LLAMA3_REGEX in regexes:
        return "llama-bpe"
    if types == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") is True:
        return "smollm"
    if types == ["ByteLevel"]:
        return "gpt-2"
    raise ConfigError(f"{where}: unrecognised pre-tokenizer {types}: edgellm knows llama-bpe (Llama-3), smollm "
                      "and gpt-2")


def _adds_bos(tok: dict, where: str) -> bool:
    for p in _parts(tok.get("post_processor"), "processors", f"{where}: post_processor"):
        if p.get("type") == "TemplateProcessing":
            single = p.get("single")
            if not isinstance(single, list):
                raise ConfigError(f"{where}: post_processor TemplateProcessing 'single' is not a list")
            return any(isinstance(piece, dict) and "SpecialToken" in piece for piece in single[:1])
    return False


def _vocab(tok: dict, where: str, n_vocab: int) -> tuple[dict[str, int], dict[str, dict]]:
    """tokenizer.json's vocabulary (model.vocab plus added_tokens) as token -> id, every id in [0, n_vocab) and
    given to one token only (llama.cpp's converter asserts the same); and the added tokens by content."""
    model = tok.get("model")
    if not isinstance(model, dict):
        raise ConfigError(f"{where}: 'model' is not a JSON object")
    if model.get("type") != "BPE":
        raise ConfigError(f"{where}: tokenizer model {_brief(model.get('type'))} is not supported (byte-level BPE "
                          "only)")
    vocab = model.get("vocab")
    if not isinstance(vocab, dict) or not vocab:
        raise ConfigError(f"{where}: model.vocab is not a non-empty JSON object of token -> id")
    added_list = tok.get("added_tokens") or []
    if not isinstance(added_list, list):
        raise ConfigError(f"{where}: 'added_tokens' is not a list")
    added: dict[str, dict] = {}
    for k, a in enumerate(added_list):
        if not isinstance(a, dict) or not isinstance(a.get("content"), str) or not _is_id(a.get("id")):
            raise ConfigError(f"{where}: added_tokens[{k}] is not an object with a string 'content' and an integer "
                              "'id'")
        if not isinstance(a.get("special", False), bool):
            raise ConfigError(f"{where}: added_tokens[{k}].special is not true or false")
        added[a["content"]] = a
    merged = dict(vocab)
    for a in added.values():
        merged[a["content"]] = a["id"]
    owner: dict[int, str] = {}
    for t, i in merged.items():
        if not _is_id(i) or not 0 <= i < n_vocab:
            raise ConfigError(f"{where}: token {_brief(t)} has id {_brief(i)}, outside the model's vocabulary of "
                              f"{n_vocab}")
        if i in owner:
            raise ConfigError(f"{where}: id {i} is given to two tokens, {_brief(owner[i])} and {_brief(t)}")
        owner[i] = t
    return merged, added


def _merges(tok: dict, where: str, vocab: dict[str, int]) -> list[str]:
    """model.merges as "a b" strings, each a merge of two vocabulary tokens into a third."""
    merges = tok["model"].get("merges", [])
    if not isinstance(merges, list):
        raise ConfigError(f"{where}: model.merges is not a list")
    out = []
    for k, m in enumerate(merges):
        if isinstance(m, list) and len(m) == 2 and all(isinstance(x, str) for x in m):
            a, b = m
        elif isinstance(m, str) and m.count(" ") == 1:
            a, b = m.split(" ")
        else:
            raise ConfigError(f"{where}: model.merges[{k}] = {_brief(m)} is not a pair of tokens")
        if not a or not b or a not in vocab or b not in vocab or a + b not in vocab:
            raise ConfigError(f"{where}: model.merges[{k}] = {_brief(m)} is not a merge of two vocabulary tokens into "
                              "one")
        out.append(f"{a} {b}")
    return out


def _chat_template(folder: Path, tokenizer_config: Mapping) -> str | None:
    """tokenizer_config.json's chat_template (a string, or named templates of which "default" is kept), else
    chat_template.jinja (where transformers >= 4.56 saves it). Its syntax is checked by its user."""
    where = f"{folder / 'tokenizer_config.json'}: chat_template"
    template = tokenizer_config.get("chat_template")
    jinja = folder / "chat_template.jinja"
    if template is None and jinja.exists():
        try:
            template = jinja.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{jinja}: cannot read ({e})") from None
    if isinstance(template, list):  # named templates: keep the default one
        if not all(isinstance(t, dict) and isinstance(t.get("name"), str) for t in template):
            raise ConfigError(f"{where} is a list, but not of objects with a 'name'")
        template = next((t.get("template") for t in template if t["name"] == "default"), None)
        where += "[default]"
    if template is not None and not isinstance(template, str):
        raise ConfigError(f"{where} = {_brief(template)} is not a string")
    return template


def read_hf_tokenizer(folder, config: Mapping, tokenizer_config: Mapping, n_vocab: int) -> HFTokenizer:
    """The tokenizer of a Hugging Face folder; config / tokenizer_config: its config.json and tokenizer_config.json
    (already read); n_vocab: the model's vocabulary size (the token list is padded to it). Every file and value
    read is checked; raises ConfigError naming the file and the field."""
    folder = Path(folder)
    path = folder / "tokenizer.json"
    if not path.exists():
        raise ConfigError(f"{folder}: missing tokenizer.json")
    if n_vocab < 1:
        raise ConfigError(f"{folder}: the model's vocabulary size is unknown (config.json vocab_size)")
    tok = _read_json(path)
    where = str(path)
    vocab, added = _vocab(tok, where, n_vocab)
    merges = _merges(tok, where, vocab)
    pre = _pre_name(tok, where)
    tc_where, cfg_where = folder / "tokenizer_config.json", folder / "config.json"

    def special_id(key_cfg: str, key_tc: str):
        """config.json's id (or the first of a list: Llama-3.1's several end tokens), else tokenizer_config.json's
        token."""
        v = config.get(key_cfg)
        ids = v if isinstance(v, list) else [v] if v is not None else []
        for x in ids:
            if not _is_id(x) or not 0 <= x < n_vocab:
                raise ConfigError(f"{cfg_where}: {key_cfg!r} = {_brief(v)} is not a token id in [0, {n_vocab})")
        if ids:
            return ids[0]
        name = tokenizer_config.get(key_tc)
        if isinstance(name, dict):
            name = name.get("content")
        if name is None:
            return None
        if not isinstance(name, str):
            raise ConfigError(f"{tc_where}: {key_tc!r} = {_brief(tokenizer_config.get(key_tc))} is not a token "
                              "string")
        if name not in vocab:
            raise ConfigError(f"{tc_where}: {key_tc!r} = {_brief(name)} is not a token of tokenizer.json")
        return vocab[name]

    add_bos = tokenizer_config.get("add_bos_token")
    if add_bos is None:
        add_bos = _adds_bos(tok, where)
    elif not isinstance(add_bos, bool):
        raise ConfigError(f"{tc_where}: 'add_bos_token' = {_brief(add_bos)} is not true or false")
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [TokenType.UNUSED] * n_vocab
    for t, i in vocab.items():
        tokens[i] = t
        a = added.get(t)
        types[i] = TokenType.NORMAL if a is None else (TokenType.CONTROL if a.get("special") else TokenType.USER_DEFINED)
    return HFTokenizer(pre=pre, tokens=tokens, types=[int(t) for t in types], merges=merges,
                       bos_id=special_id("bos_token_id", "bos_token"), eos_id=special_id("eos_token_id", "eos_token"),
                       pad_id=special_id("pad_token_id", "pad_token"), add_bos=add_bos,
                       chat_template=_chat_template(folder, tokenizer_config))

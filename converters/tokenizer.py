"""A Hugging Face tokenizer (tokenizer.json + tokenizer_config.json) as GGUF tokenizer metadata:
tokens, token types, merges, special ids, pre-tokenizer name and chat template."""
from __future__ import annotations

from pathlib import Path

import gguf
from gguf import TokenType

from .checkpoint import ConversionError, HFCheckpoint, brief, cfg_bool, cfg_int, read_json

# pre-tokenizer regexes that identify llama.cpp's named pre-tokenizers (tokenizer.ggml.pre)
_LLAMA3_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                 "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")


def _parts(node, key: str, where: str) -> list[dict]:
    """The steps of a tokenizer.json component (a "Sequence" holds them under `key`), each a JSON object."""
    if node is None:
        return []
    if not isinstance(node, dict):
        raise ConversionError(f"{where} is not a JSON object")
    parts = node.get(key) if node.get("type") == "Sequence" else [node]
    if not isinstance(parts, list) or not all(isinstance(p, dict) for p in parts):
        raise ConversionError(f"{where}: {key!r} is not a list of JSON objects")
    return parts


def _pre_name(tok: dict, where: str) -> str:
    parts = _parts(tok.get("pre_tokenizer"), "pretokenizers", f"{where}: pre_tokenizer")
    types = [p.get("type") for p in parts]
    regexes = [p.get("pattern").get("Regex") for p in parts
               if p.get("type") == "Split" and isinstance(p.get("pattern"), dict)]
    if _LLAMA3_REGEX in regexes:
        return "llama-bpe"
    if types == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") is True:
        return "smollm"
    if types == ["ByteLevel"]:
        return "gpt-2"
    raise ConversionError(f"{where}: unrecognised pre-tokenizer {types}: edgellm knows llama-bpe (Llama-3), smollm "
                          "and gpt-2")


def read_vocab(tok: dict, where: str, n_vocab: int) -> tuple[dict[str, int], dict[str, dict]]:
    """tokenizer.json's vocabulary (model.vocab plus added_tokens) as token -> id, every id in [0, n_vocab) and
    given to one token only; and the added tokens by content."""
    model = tok.get("model")
    if not isinstance(model, dict):
        raise ConversionError(f"{where}: 'model' is not a JSON object")
    if model.get("type") != "BPE":
        raise ConversionError(f"{where}: tokenizer model {model.get('type')!r} is not supported (byte-level BPE only)")
    vocab = model.get("vocab")
    if not isinstance(vocab, dict) or not vocab:
        raise ConversionError(f"{where}: model.vocab is not a non-empty JSON object of token -> id")
    added_list = tok.get("added_tokens") or []
    if not isinstance(added_list, list):
        raise ConversionError(f"{where}: 'added_tokens' is not a list")
    added: dict[str, dict] = {}
    for k, a in enumerate(added_list):
        if not isinstance(a, dict) or not isinstance(a.get("content"), str) or not _is_id(a.get("id")):
            raise ConversionError(f"{where}: added_tokens[{k}] is not an object with a string 'content' and an "
                                  "integer 'id'")
        if not isinstance(a.get("special", False), bool):
            raise ConversionError(f"{where}: added_tokens[{k}].special is not true or false")
        added[a["content"]] = a
    merged = dict(vocab)
    for a in added.values():
        merged[a["content"]] = a["id"]
    owner: dict[int, str] = {}
    for t, i in merged.items():
        if not _is_id(i) or not 0 <= i < n_vocab:
            raise ConversionError(f"{where}: token {brief(t)} has id {brief(i)}, outside the model's vocabulary of "
                                  f"{n_vocab} (config.json vocab_size)")
        if i in owner:
            raise ConversionError(f"{where}: id {i} is given to two tokens, {brief(owner[i])} and {brief(t)}")
        owner[i] = t
    return merged, added


def read_merges(tok: dict, where: str, vocab: dict[str, int]) -> list[str]:
    """model.merges as "a b" strings, each a merge of two vocabulary tokens into a third."""
    merges = tok["model"].get("merges", [])
    if not isinstance(merges, list):
        raise ConversionError(f"{where}: model.merges is not a list")
    out = []
    for k, m in enumerate(merges):
        if isinstance(m, list) and len(m) == 2 and all(isinstance(x, str) for x in m):
            a, b = m
        elif isinstance(m, str) and m.count(" ") == 1:
            a, b = m.split(" ")
        else:
            raise ConversionError(f"{where}: model.merges[{k}] = {brief(m)} is not a pair of tokens")
        if not a or not b or a not in vocab or b not in vocab or a + b not in vocab:
            raise ConversionError(f"{where}: model.merges[{k}] = {brief(m)} is not a merge of two vocabulary tokens "
                                  "into one")
        out.append(f"{a} {b}")
    return out


def read_chat_template(ckpt) -> str | None:
    """The chat template: tokenizer_config.json's chat_template (a string, or named templates of which the
    "default" one is kept) or chat_template.jinja; checked to compile (jinja2 syntax)."""
    from ..runtime.chat_template import compile_template
    from ..runtime.errors import EdgeLLMError
    where = f"{Path(ckpt.path) / 'tokenizer_config.json'}: chat_template"
    template = ckpt.tokenizer_config.get("chat_template")
    jinja = Path(ckpt.path) / "chat_template.jinja"  # where transformers >= 4.56 saves it
    if template is None and jinja.exists():
        where = str(jinja)
        try:
            template = jinja.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConversionError(f"{jinja}: cannot read ({e})") from None
    if isinstance(template, list):  # named templates: keep the default one
        if not all(isinstance(t, dict) and isinstance(t.get("name"), str) for t in template):
            raise ConversionError(f"{where} is a list, but not of objects with a 'name'")
        template = next((t.get("template") for t in template if t["name"] == "default"), None)
        where += "[default]"
        if template is None:
            return None
    if template is None:
        return None
    if not isinstance(template, str):
        raise ConversionError(f"{where} = {brief(template)} is not a string")
    try:
        compile_template(template, where)
    except EdgeLLMError as e:
        raise ConversionError(str(e)) from None
    return template


def _is_id(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def add_tokenizer(w: gguf.GGUFWriter, ckpt: HFCheckpoint, n_vocab: int) -> None:
    """Write the checkpoint's tokenizer as GGUF metadata; every file and value it reads is checked first (each
    failure a ConversionError naming the file and the field)."""
    path = Path(ckpt.path) / "tokenizer.json"
    if not path.exists():
        raise ConversionError(f"{ckpt.path}: missing tokenizer.json")
    if n_vocab < 1:
        raise ConversionError(f"{ckpt.path}: the model's vocabulary size is unknown (config.json vocab_size)")
    tok = read_json(path)
    where = str(path)
    vocab, added = read_vocab(tok, where, n_vocab)
    merges = read_merges(tok, where, vocab)
    pre = _pre_name(tok, where)
    add_bos_default = _adds_bos(tok, where)
    tc, cfg = ckpt.tokenizer_config, ckpt.config
    tc_where, cfg_where = str(Path(ckpt.path) / "tokenizer_config.json"), str(Path(ckpt.path) / "config.json")

    def special_id(key_cfg: str, key_tc: str):
        """config.json's id (an id, or a list whose first is the one) or else tokenizer_config.json's token."""
        v = cfg.get(key_cfg)
        if isinstance(v, list):  # several end tokens (Llama-3.1 instruct): the first is the EOS
            for k in range(len(v)):
                cfg_int(dict(enumerate(v)), k, f"{cfg_where}: {key_cfg}", lo=0, hi=n_vocab - 1)
            if v:
                return v[0]
        elif v is not None:
            return cfg_int(cfg, key_cfg, cfg_where, lo=0, hi=n_vocab - 1)
        name = tc.get(key_tc)
        if isinstance(name, dict):
            name = name.get("content")
        if name is None:
            return None
        if not isinstance(name, str):
            raise ConversionError(f"{tc_where}: {key_tc!r} = {brief(tc.get(key_tc))} is not a token string")
        if name not in vocab:
            raise ConversionError(f"{tc_where}: {key_tc!r} = {brief(name)} is not a token of tokenizer.json")
        return vocab[name]

    bos, eos, pad = (special_id("bos_token_id", "bos_token"), special_id("eos_token_id", "eos_token"),
                     special_id("pad_token_id", "pad_token"))
    add_bos = cfg_bool(tc, "add_bos_token", tc_where, add_bos_default)
    template = read_chat_template(ckpt)

    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [TokenType.UNUSED] * n_vocab
    for t, i in vocab.items():
        tokens[i] = t
        a = added.get(t)
        types[i] = TokenType.NORMAL if a is None else (TokenType.CONTROL if a.get("special") else TokenType.USER_DEFINED)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    if bos is not None:
        w.add_bos_token_id(int(bos))
    if eos is not None:
        w.add_eos_token_id(int(eos))
    if pad is not None:
        w.add_pad_token_id(int(pad))
    w.add_add_bos_token(add_bos)
    if template is not None:
        w.add_chat_template(template)


def _adds_bos(tok: dict, where: str) -> bool:
    for p in _parts(tok.get("post_processor"), "processors", f"{where}: post_processor"):
        if p.get("type") == "TemplateProcessing":
            single = p.get("single")
            if not isinstance(single, list):
                raise ConversionError(f"{where}: post_processor TemplateProcessing 'single' is not a list")
            return any(isinstance(piece, dict) and "SpecialToken" in piece for piece in single[:1])
    return False

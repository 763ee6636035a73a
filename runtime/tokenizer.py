"""The model's tokenizer, rebuilt from the GGUF vocabulary so that it gives the ids llama.cpp gives.

The merging itself is done by the Hugging Face `tokenizers` library (a `tokenizers.Tokenizer` is
built from the GGUF tokens, merges and scores); what is written here is what llama.cpp does around
it, reproduced fact for fact:

* `tokenizer.ggml.model = "gpt2"` (byte-level BPE): the text is split by llama.cpp's regexes for
  the `tokenizer.ggml.pre` name, applied one after another as `Split(Regex, "isolated")` (matches
  and the text between them both become pieces, as in llama.cpp's `unicode_regex_split`), then
  mapped to GPT-2's byte alphabet (`ByteLevel(use_regex=False)`) and merged by a `BPE` model with
  the GGUF merges as ranks (`ignore_merges` for the Llama-3 family, as llama.cpp sets it).
* `tokenizer.ggml.model = "llama"` (SentencePiece BPE): llama.cpp's SPM tokenizer starts from the
  UTF-8 characters of the text (spaces escaped as U+2581 "▁", one "▁" put in front when
  add_space_prefix) and repeatedly joins the adjacent pair whose concatenation is a vocabulary
  token of the highest score; characters that are no token become `<0xXX>` byte tokens. That is
  a BPE whose merges are every split of every token into two tokens, ranked by the score of the
  joined token: it is built as a `tokenizers` BPE with those derived merges and `byte_fallback`.
  (Unigram would be the wrong model: llama.cpp does not run Viterbi for "llama" vocabularies.)
  The only possible difference is the order of two *different* pairs whose joined tokens have
  exactly the same score (llama.cpp takes the leftmost, the BPE takes the lower rank).
* Special tokens (types CONTROL, USER_DEFINED, UNKNOWN) are cut out of the text before the
  merging, as llama.cpp's `tokenizer_st_partition` does: longest token text first, each occurrence
  left to right. With `parse_special=False` only USER_DEFINED tokens are cut out (llama.cpp and HF
  both do that); CONTROL text is then tokenized as plain text.
* Tokens that llama.cpp recognises by their text (`<|im_end|>`, `<|eot_id|>`, `<|endoftext|>`, FIM
  tokens, ...) are end-of-generation tokens and control tokens, as llama.cpp's vocabulary loader
  decides (`eog_ids`).
* Decoding follows `llama_detokenize`: byte-level unmapping (gpt2) or "▁" -> space and `<0xXX>`
  bytes (llama), the first piece's leading space dropped when add_space_prefix, and llama.cpp's
  `clean_spaces` post-pass for the pre-tokenizers that set it.
"""
from __future__ import annotations

import re
from typing import Any, Iterable, Mapping, Sequence

from gguf import Keys, TokenType

from .errors import GGUFError, ModelFileError, UnsupportedError

TK = Keys.Tokenizer

# --- llama.cpp's pre-tokenizer regexes (src/llama-vocab.cpp, llm_tokenizer_bpe) -------------------
# GPT-2's regex as llama.cpp writes it (without the final "|\s+": a lone whitespace that no branch
# takes is kept as its own piece anyway, since the text between matches becomes a piece too)
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
# Llama-3's regex with the case-insensitive group spelled out as llama.cpp does ("(?i:" would also
# fold characters such as U+017F into "s", which llama.cpp's splitter does not)
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
           r"|\s+(?!\S)|\s+")
_QWEN2 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
          r"|\s+(?!\S)|\s+")
_DEFAULT = [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"]
_DIGITS_GPT2 = [r"\p{N}", _GPT2]


class _Pre:
    """How llama.cpp pre-tokenizes for one `tokenizer.ggml.pre` value."""

    def __init__(self, regexes: list[str], *, clean_spaces: bool = True, ignore_merges: bool = False,
                 add_bos: bool = False):
        self.regexes, self.clean_spaces = regexes, clean_spaces
        self.ignore_merges, self.add_bos = ignore_merges, add_bos


_PRE: dict[str, _Pre] = {
    "default": _Pre(_DEFAULT),
    **{k: _Pre([_GPT2]) for k in ("gpt-2", "phi-2", "mpt", "olmo")},
    **{k: _Pre([_LLAMA3], ignore_merges=True, add_bos=True) for k in ("llama-bpe", "llama3", "llama-v3", "falcon3")},
    "smollm": _Pre(_DIGITS_GPT2, clean_spaces=False),
    **{k: _Pre(_DIGITS_GPT2) for k in ("starcoder", "refact", "codeshell")},
    "command-r": _Pre(_DIGITS_GPT2, clean_spaces=False),
    **{k: _Pre([_QWEN2], clean_spaces=False) for k in ("qwen2", "deepseek-r1-qwen")},
    "stablelm2": _Pre([_QWEN2]),
}
SUPPORTED_PRE = tuple(_PRE)

# --- token texts llama.cpp's vocabulary loader recognises ---------------------------------------
_EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>", "<EOT>",
              "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>")
_EOG_TEXTS = frozenset(_EOT_TEXTS + ("<|return|>", "<|call|>", "<|flush|>", "<|calls|>", "</s>", "<|eom_id|>",
                                     "[EOS]", "<eos>", "<turn|>", "<|tool_response>", "[e~["))
_FIM_TEXTS = {  # key -> texts; the first present becomes that FIM token (and a control token)
    TK.FIM_PRE_ID: ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
                    "<|code_prefix|>", "<|prefix|>"),
    TK.FIM_SUF_ID: ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
                    "<|code_suffix|>", "<|suffix|>"),
    TK.FIM_MID_ID: ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
                    "<|code_middle|>", "<|middle|>"),
    TK.FIM_PAD_ID: ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    TK.FIM_REP_ID: ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    TK.FIM_SEP_ID: ("<|file_sep|>",),
}
_ALWAYS_USER_DEFINED = ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")  # gpt-oss

_NORMAL, _UNKNOWN, _CONTROL, _USER, _UNUSED, _BYTE = (int(TokenType.NORMAL), int(TokenType.UNKNOWN),
                                                      int(TokenType.CONTROL), int(TokenType.USER_DEFINED),
                                                      int(TokenType.UNUSED), int(TokenType.BYTE))
_SPACE = "\u2581"  # SentencePiece's escaped space


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_BYTE_CHAR = _bytes_to_unicode()
_CHAR_BYTE = {c: b for b, c in _BYTE_CHAR.items()}
_UNMAP = str.maketrans({c: chr(b) for c, b in _CHAR_BYTE.items()})
_BYTE_CHARS = frozenset(_CHAR_BYTE)


def _one_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__


def _utf8_complete(b: bytes) -> int:
    """Length of the longest prefix of b that does not end inside a UTF-8 character."""
    n = len(b)
    i = n - 1
    while i >= 0 and i > n - 4 and (b[i] & 0xC0) == 0x80:
        i -= 1
    if i < 0 or (b[i] & 0xC0) == 0x80:
        return n  # four continuation bytes in a row: invalid anyway, let the decoder replace them
    lead = b[i]
    need = 1 if lead < 0xC0 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4 if lead < 0xF8 else 1
    return i if n - i < need else n


class StreamDecoder:
    """Turns generated ids into text pieces one id at a time, holding back the bytes of a UTF-8
    character until it is complete (a character split over two byte tokens is never cut).
    Control tokens are hidden unless special=True, as llama.cpp prints generated text."""

    def __init__(self, tokenizer: "Tokenizer", special: bool = False):
        self.tokenizer, self.special, self._pending = tokenizer, special, b""

    def push(self, token_id: int) -> str:
        b = self._pending + self.tokenizer.token_bytes(token_id, special=self.special)
        cut = _utf8_complete(b)
        self._pending = b[cut:]
        return b[:cut].decode("utf-8", errors="replace")

    def flush(self) -> str:
        """The text still held back (an incomplete character comes out as U+FFFD)."""
        b, self._pending = self._pending, b""
        return b.decode("utf-8", errors="replace")


class Tokenizer:
    """Text <-> token ids as llama.cpp computes them for this GGUF vocabulary."""

    def __init__(self, hf, *, kind: str, pre: str | None, tokens: list[str], types: list[int], vocab: dict[str, int],
                 bos_id: int | None, eos_id: int | None, eot_id: int | None, unk_id: int | None,
                 eog_ids: set[int], add_bos: bool, add_eos: bool, add_space_prefix: bool, clean_spaces: bool,
                 chat_template: str | None, source: str = ""):
        self._hf = hf
        self.source = source  # the file the vocabulary came from (named in errors)
        self.kind = kind  # "gpt2" (byte-level BPE) or "llama" (SentencePiece)
        self.pre = pre
        self.tokens = tokens
        self.token_types = types
        self._vocab = vocab
        self.vocab_size = len(tokens)
        self.bos_id, self.eos_id, self.eot_id, self.unk_id = bos_id, eos_id, eot_id, unk_id
        self.eog_ids = frozenset(eog_ids)
        self.add_bos, self.add_eos = add_bos, add_eos
        self.add_space_prefix, self.clean_spaces = add_space_prefix, clean_spaces
        self.chat_template = chat_template
        self._pieces: list[bytes | None] = [None] * len(tokens)
        # llama.cpp's special-token cache: longest text first (ties: lower id first)
        special = [i for i, t in enumerate(types) if t in (_CONTROL, _USER, _UNKNOWN)]
        special.sort(key=lambda i: -len(tokens[i].encode("utf-8")))
        self._specials = [(i, tokens[i]) for i in special]
        self._user_specials = [(i, tokens[i]) for i in special if types[i] == _USER]

    # ------------------------------------------------------------------ building
    @classmethod
    def from_gguf(cls, f) -> "Tokenizer":
        """Build from a `GGUFFile`'s metadata (see from_metadata); the file's path starts every error message and
        is kept as the tokenizer's source (named by chat template errors)."""
        try:
            return cls.from_metadata(f.metadata, str(f.path))
        except (GGUFError, UnsupportedError) as e:
            raise type(e)(f"{f.path}: {e}") from None

    @classmethod
    def from_metadata(cls, md: Mapping[str, Any], source: str = "") -> "Tokenizer":
        """Build from GGUF tokenizer metadata (a file's, or what models/hf_tokenizer.py reads from a Hugging Face
        folder). Raises GGUFError for missing or inconsistent metadata, UnsupportedError for a tokenizer type or
        pre-tokenizer edgellm does not implement. source: where the metadata came from (for messages)."""
        model = md.get(TK.MODEL)
        if model is None:
            raise GGUFError(f"the model has no tokenizer ({TK.MODEL} is missing)")
        if not isinstance(model, str):
            raise GGUFError(f"{TK.MODEL} is not a string")
        if model not in ("gpt2", "llama"):
            raise UnsupportedError(f"tokenizer model {model!r} is not supported (supported: gpt2 byte-level BPE, "
                                   "llama SentencePiece)")
        tokens = md.get(TK.LIST)
        if not isinstance(tokens, list) or not tokens or set(map(type, tokens)) - {str}:
            raise GGUFError(f"{TK.LIST} is missing, empty or not a list of strings")
        n = len(tokens)
        arch = md.get(Keys.General.ARCHITECTURE)
        n_model = md.get(f"{arch}.vocab_size") if isinstance(arch, str) else None
        if isinstance(n_model, int) and not isinstance(n_model, bool) and n > n_model:
            raise GGUFError(f"{TK.LIST} has {n} tokens, more than the model's {arch}.vocab_size of {n_model} "
                            "(a token past it has no embedding)")
        if not all(tokens):  # llama.cpp names empty tokens so that they cannot collide
            tokens = [t or f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
        vocab = dict(zip(tokens, range(n)))
        if len(vocab) != n:
            seen: dict[str, int] = {}
            for i, t in enumerate(tokens):
                if t in seen:
                    raise GGUFError(f"duplicate token {t!r} in the vocabulary (ids {seen[t]} and {i})")
                seen[t] = i
        types = _int_list(md, TK.TOKEN_TYPE, n)
        types = [t if _NORMAL <= t <= _BYTE else 0 for t in types] if types is not None else [_NORMAL] * n
        scores = md.get(TK.SCORES)
        if scores is not None:
            if not isinstance(scores, list):
                raise GGUFError(f"{TK.SCORES} is not a list")
            if len(scores) != n:
                raise GGUFError(f"{TK.SCORES} has {len(scores)} entries for {n} tokens")
            if set(map(type, scores)) - {int, float}:
                raise GGUFError(f"{TK.SCORES} is not a list of numbers")

        spm = model == "llama"
        pre_name = None
        if spm:
            pre = _Pre([], clean_spaces=False, add_bos=True)
        else:
            pre_name = md.get(TK.PRE, "default")  # llama.cpp: a missing pre-tokenizer means "default"
            if not isinstance(pre_name, str):
                raise GGUFError(f"{TK.PRE} is not a string")
            pre = _PRE.get(pre_name)
            if pre is None:
                raise UnsupportedError(f"pre-tokenizer {pre_name!r} ({TK.PRE}) is not supported "
                                       f"(supported: {', '.join(SUPPORTED_PRE)})")

        # special ids: llama.cpp's defaults per model type, then the metadata (which must be in range)
        defaults = {TK.BOS_ID: 1, TK.EOS_ID: 2, TK.UNK_ID: 0} if spm else {TK.BOS_ID: 11, TK.EOS_ID: 11}
        ids: dict[str, int | None] = {}
        for key in (TK.BOS_ID, TK.EOS_ID, TK.EOT_ID, TK.EOM_ID, TK.UNK_ID, TK.SEP_ID, TK.PAD_ID, TK.MASK_ID,
                    TK.FIM_PRE_ID, TK.FIM_SUF_ID, TK.FIM_MID_ID, TK.FIM_PAD_ID, TK.FIM_REP_ID, TK.FIM_SEP_ID):
            v = md.get(key)
            if v is None:
                d = defaults.get(key)
                ids[key] = d if d is not None and d < n else None
                continue
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < n:
                raise GGUFError(f"{key} = {v!r} is not a token id (the vocabulary has {n} tokens)")
            ids[key] = v
        add_bos = _flag(md, TK.ADD_BOS, pre.add_bos)
        add_eos = _flag(md, TK.ADD_EOS, False)
        add_space_prefix = _flag(md, TK.ADD_PREFIX, spm)
        if add_bos and ids[TK.BOS_ID] is None:
            raise GGUFError(f"{TK.ADD_BOS} is true but the model has no BOS token")
        if add_eos and ids[TK.EOS_ID] is None:
            raise GGUFError(f"{TK.ADD_EOS} is true but the model has no EOS token")

        # tokens llama.cpp recognises by their text: EOT / EOM / FIM become control tokens, EOG set
        def find(texts):
            return next((vocab[t] for t in texts if t in vocab), None)

        def make_control(i):
            types[i] = _CONTROL

        if ids[TK.EOT_ID] is None and (i := find(_EOT_TEXTS)) is not None:
            ids[TK.EOT_ID] = i
            make_control(i)
        if ids[TK.EOM_ID] is None and (i := find(("<|eom_id|>",))) is not None:
            ids[TK.EOM_ID] = i
            make_control(i)
        for key, texts in _FIM_TEXTS.items():
            if ids[key] is None and (i := find(texts)) is not None:
                ids[key] = i
                make_control(i)
        eog = {ids[k] for k in (TK.FIM_PAD_ID, TK.FIM_REP_ID, TK.FIM_SEP_ID) if ids[k] is not None}
        for t in _EOG_TEXTS:
            if (i := vocab.get(t)) is not None:
                eog.add(i)
                make_control(i)
        for t in _ALWAYS_USER_DEFINED:
            if (i := vocab.get(t)) is not None:
                types[i] = _USER
        eog |= {ids[k] for k in (TK.EOS_ID, TK.EOT_ID, TK.EOM_ID) if ids[k] is not None}
        texts_eog = {tokens[i]: i for i in eog}
        if "<|end|>" in texts_eog and (("<|return|>" in texts_eog and "<|call|>" in texts_eog)
                                        or ("<|calls|>" in texts_eog and "<|flush|>" in texts_eog)):
            eog.discard(texts_eog["<|end|>"])  # gpt-oss / solar-open: <|end|> ends a message, not the turn
            types[texts_eog["<|end|>"]] = _USER
        if "<|tool_response>" in texts_eog and "</s>" in texts_eog:
            eog.discard(texts_eog["</s>"])
            types[texts_eog["</s>"]] = _NORMAL

        hf = _build_spm(tokens, vocab, scores, ids[TK.UNK_ID]) if spm else _build_bpe(md, vocab, pre)
        template = md.get(TK.CHAT_TEMPLATE)
        return cls(hf, kind=model, pre=pre_name, tokens=tokens, types=types, vocab=vocab,
                   bos_id=ids[TK.BOS_ID], eos_id=ids[TK.EOS_ID], eot_id=ids[TK.EOT_ID], unk_id=ids[TK.UNK_ID],
                   eog_ids=eog, add_bos=add_bos, add_eos=add_eos, add_space_prefix=add_space_prefix,
                   clean_spaces=pre.clean_spaces, chat_template=template if isinstance(template, str) else None,
                   source=source)

    @classmethod
    def from_hf(cls, folder, n_vocab: int | None = None) -> "Tokenizer":
        """Build from a Hugging Face tokenizer folder (tokenizer.json, tokenizer_config.json, config.json,
        chat_template.jinja), such as an exported ONNX folder: the files read as the GGUF tokenizer metadata the
        GGUF converter writes for them (models/hf_tokenizer.py, the one place that mapping lives), then the
        tokenizer is built as from_metadata builds it, so it tokenizes exactly as the converted GGUF file would.
        n_vocab: the model's vocabulary size (default: config.json's)."""
        import json
        from pathlib import Path

        from ..models.config import ConfigError
        from ..models.hf_tokenizer import read_hf_tokenizer
        folder = Path(folder)

        def read(name):
            p = folder / name
            try:
                data = json.loads(p.read_text(encoding="utf-8")) if p.exists() else {}
            except (OSError, ValueError, RecursionError) as e:  # unreadable, JSONDecodeError, UnicodeDecodeError
                raise ModelFileError(f"{p}: invalid JSON ({e})") from None
            if not isinstance(data, dict):
                raise ModelFileError(f"{p}: expected a JSON object, found a JSON {type(data).__name__}")
            return data

        cfg = read("config.json")
        if n_vocab is None:
            n_vocab = cfg.get("vocab_size")
            if not isinstance(n_vocab, int) or isinstance(n_vocab, bool) or n_vocab < 1:
                raise ModelFileError(f"{folder / 'config.json'}: 'vocab_size' = {n_vocab!r} is not a positive integer")
        try:
            hf = read_hf_tokenizer(folder, cfg, read("tokenizer_config.json"), n_vocab)
        except ConfigError as e:
            raise ModelFileError(str(e)) from None
        return cls.from_metadata(hf.metadata(), str(folder))

    # ------------------------------------------------------------------ encoding
    def is_eog(self, token_id: int) -> bool:
        """True for the tokens that end a generation (llama.cpp's `llama_vocab_is_eog`)."""
        return token_id in self.eog_ids

    def encode(self, text: str, add_bos: bool | None = None, parse_special: bool = True) -> list[int]:
        """Token ids of text, as `llama_tokenize(text, add_special, parse_special)` gives them.

        add_bos: True puts the BOS token first, False never does, None follows the model's
        tokenizer.ggml.add_bos_token (default: true for SentencePiece and Llama-3 vocabularies)
        and also appends EOS if tokenizer.ggml.add_eos_token says so.
        parse_special: special-token texts such as "<|im_start|>" become their token (True) or are
        tokenized as plain text (False; user-defined tokens are still matched, as in llama.cpp).
        """
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, not {type(text).__name__}")
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # surrogates: pairs joined, lone ones as U+FFFD
                text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        out: list[int] = []
        bos = self.add_bos if add_bos is None else add_bos
        if bos:
            if self.bos_id is None:
                raise GGUFError("the model has no BOS token")
            out.append(self.bos_id)
        frags = self._partition(text, parse_special) if text else []
        enc = self._hf.encode
        if self.kind == "llama":
            prev_special = True  # llama.cpp puts the space prefix before the first text and after each special
            for fr in frags:
                if isinstance(fr, int):
                    out.append(fr)
                    prev_special = True
                    continue
                if self.add_space_prefix and prev_special:
                    fr = " " + fr
                out += enc(fr.replace(" ", _SPACE), add_special_tokens=False).ids
                prev_special = False
        else:
            for fr in frags:
                if isinstance(fr, int):
                    out.append(fr)
                else:
                    out += enc(fr, add_special_tokens=False).ids
        if add_bos is None and self.add_eos:
            out.append(self.eos_id)
        return out

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """Split text into raw-text pieces and special-token ids (llama.cpp's tokenizer_st_partition)."""
        frags: list[str | int] = [text]
        for tid, s in (self._specials if parse_special else self._user_specials):
            if s not in text:
                continue
            out: list[str | int] = []
            for fr in frags:
                if isinstance(fr, int) or s not in fr:
                    out.append(fr)
                    continue
                for k, part in enumerate(fr.split(s)):
                    if k:
                        out.append(tid)
                    if part:
                        out.append(part)
            frags = out
        return frags

    # ------------------------------------------------------------------ decoding
    def token_bytes(self, token_id: int, special: bool = True) -> bytes:
        """The raw bytes of one token's piece (llama.cpp's `llama_token_to_piece`): byte-level
        characters unmapped (gpt2), "▁" as space and <0xXX> as that byte (llama). Control tokens
        give their text when special=True, nothing otherwise."""
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} is out of range (vocabulary of {self.vocab_size})")
        t = self.token_types[token_id]
        if not special and t in (_CONTROL, _UNKNOWN):
            return b""
        p = self._pieces[token_id]
        if p is None:
            p = self._pieces[token_id] = self._piece(token_id)
        return p

    def _piece(self, i: int) -> bytes:
        text, t = self.tokens[i], self.token_types[i]
        if t in (_CONTROL, _UNKNOWN, _USER):
            return text.encode("utf-8")
        if t == _BYTE:
            try:
                return bytes([int(text[3:5], 16)])
            except ValueError:
                return b""
        if t != _NORMAL:
            return b""  # unused / undefined tokens print nothing (llama.cpp)
        if self.kind == "llama":
            return text.replace(_SPACE, " ").encode("utf-8")
        if _BYTE_CHARS.issuperset(text):
            return text.translate(_UNMAP).encode("latin-1")
        out = bytearray()  # a character outside GPT-2's byte alphabet: llama.cpp's llama_decode_text
        for c in text:
            if c in _CHAR_BYTE:
                out.append(_CHAR_BYTE[c])
            else:
                out += b"[UNK_BYTE_0x" + c.encode("utf-8").hex().encode() + text.encode("utf-8") + b"]"
        return bytes(out)

    def decode_bytes(self, ids: Iterable[int], special: bool = True) -> bytes:
        """The bytes of a token sequence (`llama_detokenize` with remove_special=False)."""
        parts = [self.token_bytes(int(i), special) for i in ids]
        if parts and self.add_space_prefix and parts[0][:1] == b" ":
            parts[0] = parts[0][1:]  # the space the SentencePiece encoder put in front
        b = b"".join(parts)
        if self.clean_spaces and b:
            b = re.sub(rb" ([?!.,])", rb"\1", b)
            b = re.sub(rb" ' ", b"'", b)
            b = re.sub(rb" '(?=[sm]|re|ve)", b"'", b)
        return b

    def decode(self, ids: Iterable[int], special: bool = True) -> str:
        """Text of a token sequence. special=True renders control tokens as their text (so that
        decode(encode(s)) == s); special=False drops them, as llama.cpp does for generated text.
        Invalid UTF-8 (a sequence cut inside a character) comes out as U+FFFD."""
        return self.decode_bytes(ids, special).decode("utf-8", errors="replace")

    def stream_decoder(self, special: bool = False) -> StreamDecoder:
        return StreamDecoder(self, special)

    @property
    def backend(self):
        """The Hugging Face `tokenizers.Tokenizer` that does the merging (built from the GGUF vocabulary; no
        decoder and no special tokens: what surrounds it is done here, as llama.cpp does it)."""
        return self._hf

    def token_text(self, token_id: int) -> str:
        """The token's string as stored in the vocabulary."""
        return self.tokens[token_id]

    # ------------------------------------------------------------------ chat
    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """The prompt text of a conversation with the model's chat template (ChatML if it has none)."""
        from .chat_template import render_chat
        what = f"{self.source}: {TK.CHAT_TEMPLATE}" if self.source else "the model's chat template"
        return render_chat(self.chat_template, list(messages), add_generation_prompt=add_generation_prompt,
                           bos_token=self.tokens[self.bos_id] if self.bos_id is not None else "",
                           eos_token=self.tokens[self.eos_id] if self.eos_id is not None else "", what=what, **kwargs)

    def __repr__(self) -> str:
        return (f"Tokenizer({self.kind}, pre={self.pre!r}, vocab_size={self.vocab_size}, bos={self.bos_id}, "
                f"eos={self.eos_id}, eog={sorted(self.eog_ids)})")


# ---------------------------------------------------------------------- helpers
def _flag(md: dict, key: str, default: bool) -> bool:
    v = md.get(key, default)
    if not isinstance(v, (bool, int)):
        raise GGUFError(f"{key} is not a boolean")
    return bool(v)


def _int_list(md: dict, key: str, n: int) -> list[int] | None:
    v = md.get(key)
    if v is None:
        return None
    if not isinstance(v, list):
        raise GGUFError(f"{key} is not a list")
    if len(v) != n:
        raise GGUFError(f"{key} has {len(v)} entries for {n} tokens")
    if set(map(type, v)) - {int}:
        raise GGUFError(f"{key} is not a list of integers")
    return list(v)


def _build_bpe(md: dict, vocab: dict[str, int], pre: _Pre):
    """Byte-level BPE: llama.cpp's regex splits, GPT-2 byte alphabet, the GGUF merges as ranks."""
    from tokenizers import Regex, Tokenizer as HFTokenizer, models, pre_tokenizers
    merges = md.get(TK.MERGES)
    if not isinstance(merges, list) or set(map(type, merges)) - {str}:
        raise GGUFError(f"{TK.MERGES} is missing or not a list of strings (a gpt2 tokenizer needs its merges)")
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    if set(map(len, pairs)) - {2}:
        _bad_merge(merges, vocab)
    try:
        model = models.BPE(vocab, pairs, ignore_merges=pre.ignore_merges)  # checks the tokens are in vocab
    except Exception:  # noqa: BLE001 - find the offending merge for a precise message
        _bad_merge(merges, vocab)
        raise GGUFError(f"{TK.MERGES} is inconsistent with the vocabulary") from None
    try:
        hf = HFTokenizer(model)
        hf.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), "isolated") for r in pre.regexes]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    except Exception as e:  # noqa: BLE001 - the library's own errors, reported as one line
        raise GGUFError(f"cannot build the BPE tokenizer: {_one_line(e)}") from None
    return hf


def _bad_merge(merges: list[str], vocab: dict[str, int]) -> None:
    for k, m in enumerate(merges):
        p = m.split(" ", 1)
        if len(p) != 2 or not p[0] or not p[1] or p[0] not in vocab or p[1] not in vocab or p[0] + p[1] not in vocab:
            raise GGUFError(f"{TK.MERGES}[{k}] = {m!r} is not a merge of two vocabulary tokens into one")


def _build_spm(tokens: list[str], vocab: dict[str, int], scores: list | None, unk_id: int | None):
    """SentencePiece as llama.cpp runs it: a BPE whose merges are all (a, b) with a, b and a+b in
    the vocabulary, ranked by the score of a+b (highest first), with <0xXX> byte fallback."""
    from tokenizers import Tokenizer as HFTokenizer, models
    if scores is None:
        raise GGUFError(f"a SentencePiece (llama) vocabulary needs {TK.SCORES}")
    cand = [(-s, i, k) for t, i, s in zip(tokens, range(len(tokens)), scores) if len(t) > 1
            for k in range(1, len(t)) if t[:k] in vocab and t[k:] in vocab]
    cand.sort()  # highest score first; ties (other splits of the same token) in a fixed order
    merges = [(tokens[i][:k], tokens[i][k:]) for _, i, k in cand]
    try:
        model = models.BPE(vocab, merges, byte_fallback=True,
                           unk_token=tokens[unk_id] if unk_id is not None else None)
        return HFTokenizer(model)
    except Exception as e:  # noqa: BLE001
        raise GGUFError(f"cannot build the SentencePiece tokenizer: {_one_line(e)}") from None

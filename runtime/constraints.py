"""Constrained decoding: JSON Schema, regular expressions and Lark / GBNF grammars compiled by llguidance into
a mask of the tokens that may come next, applied to the logits before sampling.

One `Constraint` follows one sequence: `allowed()` is the boolean mask (n_vocab,) for the next token,
`advance(token)` feeds the sampled token, `is_complete` says the text so far is a whole match and `is_finished`
that nothing but the end-of-generation token can follow. `prefetch()` starts computing the next mask on a
background thread (llguidance releases the GIL), so that it overlaps the forward pass; `fork()` copies the state
(n > 1 answers, search branches). A batched scheduler keeps one Constraint per sequence and passes each
sequence's `allowed()` to its sampler.

llguidance works on the bytes of each token. Its tokenizer is built from edgellm's own `tokenizers` object (the
one built from the GGUF vocabulary), given the decoder the vocabulary kind implies (byte-level BPE, or
SentencePiece with <0xXX> byte fallback) and the control tokens as special tokens, so that a grammar can never
spell out "<|im_end|>" with a control token; then every token's bytes are compared with what edgellm's decoder
prints for it, and a token on which the two disagree is never allowed.
"""
from __future__ import annotations

import json as _json
import re
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import TokenType

from .errors import ConstraintError, UnsupportedError

# JSON layout: compact with a space after ',' and ':' (as Python's json.dumps writes it). Free whitespace lets a
# weak model pad an answer with newlines until max_tokens; a schema's own "x-guidance" options override this.
JSON_FORMAT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_JSON_OBJECT = {"type": "object"}
_SPECIAL_TYPES = (int(TokenType.CONTROL), int(TokenType.UNKNOWN))  # never printed: special tokens to llguidance

_pool: ThreadPoolExecutor | None = None


def _executor() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgellm-mask")
    return _pool


def _llguidance():
    try:
        import llguidance
    except ImportError:  # a dependency, but say what is missing rather than fail with a traceback
        raise UnsupportedError("constrained decoding needs the llguidance package (pip install llguidance)") from None
    return llguidance


def _one_line(msg: str) -> str:
    """llguidance's messages, some with a source listing and a caret line, as one line."""
    keep = [s.strip() for s in str(msg).splitlines()
            if s.strip() and not re.fullmatch(r"\s*\^+\s*", s) and not re.match(r"\s*\d+ \|", s)]
    return re.sub(r"^at \d+\(\d+\): ", "", " ".join(keep)) or "unknown error"


# ---------------------------------------------------------------------- the vocabulary, as llguidance sees it
@dataclass(frozen=True)
class Vocabulary:
    """llguidance's tokenizer for one edgellm tokenizer and logits size, and the tokens it may allow."""
    lltok: Any            # llguidance.LLTokenizer
    n_vocab: int
    usable: np.ndarray    # (n_vocab,) bool: False where llguidance's bytes differ from what edgellm prints


_VOCABS: "weakref.WeakKeyDictionary[Any, dict[int, Vocabulary]]" = weakref.WeakKeyDictionary()


def vocabulary(tokenizer, n_vocab: int | None = None) -> Vocabulary:
    """llguidance's view of `tokenizer` (an edgellm Tokenizer) for logits of n_vocab entries (default: the
    tokenizer's size; a model may pad its output beyond the vocabulary). Built once (~0.5 s for 49k tokens)."""
    n_vocab = tokenizer.vocab_size if n_vocab is None else int(n_vocab)
    if n_vocab < tokenizer.vocab_size:
        raise ConstraintError(f"n_vocab {n_vocab} is smaller than the tokenizer's {tokenizer.vocab_size} tokens")
    per = _VOCABS.setdefault(tokenizer, {})
    v = per.get(n_vocab)
    if v is None:
        v = per[n_vocab] = _build_vocabulary(tokenizer, n_vocab)
    return v


def _build_vocabulary(tokenizer, n_vocab: int) -> Vocabulary:
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, normalizers
    llg = _llguidance()
    hf = HFTokenizer.from_str(tokenizer.backend.to_str())  # a copy: edgellm's own object stays as it is
    if tokenizer.kind == "gpt2":
        hf.decoder = decoders.ByteLevel()
    else:  # SentencePiece: "▁" is a space, <0xXX> a byte (edgellm escapes spaces before the BPE itself)
        hf.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
        hf.normalizer = normalizers.Replace(" ", "\u2581")
    specials = [t for t, typ in zip(tokenizer.tokens, tokenizer.token_types) if typ in _SPECIAL_TYPES]
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    eog = sorted(tokenizer.eog_ids)
    if not eog:
        raise UnsupportedError("constrained decoding needs an end-of-generation token; the model has none")
    try:
        lltok = llg.LLTokenizer(hf.to_str(), n_vocab=n_vocab, eos_token=eog)
    except BaseException as e:  # noqa: BLE001 - a Rust panic arrives as pyo3's PanicException (a BaseException)
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise UnsupportedError(f"constrained decoding cannot use this model's tokenizer: {_one_line(str(e))}") from None
    usable = np.zeros(n_vocab, dtype=bool)
    for i in range(tokenizer.vocab_size):
        if lltok.is_special_token(i):
            usable[i] = i in tokenizer.eog_ids  # llguidance allows these only as the end of generation
        else:
            usable[i] = lltok.decode_bytes([i]) == tokenizer.token_bytes(i, special=False)
    return Vocabulary(lltok, n_vocab, usable)


# ---------------------------------------------------------------------- what to constrain to
@dataclass(frozen=True)
class ConstraintSpec:
    """What the output must match, before it is compiled for a tokenizer: kind is one of KINDS, source the
    JSON schema (as JSON text), the regular expression or the grammar text, grammar llguidance's grammar."""
    kind: str
    source: str
    grammar: str

    def describe(self) -> str:
        return {"json_schema": "JSON schema", "json_object": "any JSON object", "regex": "regular expression",
                "lark": "Lark grammar", "gbnf": "GBNF grammar"}[self.kind]


KINDS = ("json_schema", "json_object", "regex", "lark", "gbnf")


def _checked(kind: str, source: str, grammar: str, what: str) -> ConstraintSpec:
    """The spec, once llguidance has checked the grammar (syntax, schema keywords; no tokenizer needed)."""
    is_error, msgs = _llguidance().LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        msg = _one_line(msgs[0] if msgs else "rejected by llguidance")
        if msg.startswith("Unimplemented keys: "):  # llguidance never ignores a keyword it does not implement
            raise ConstraintError(f"{what} uses keywords that are not supported: {msg[20:]}")
        raise ConstraintError(f"invalid {what}: {msg}")
    return ConstraintSpec(kind, source, grammar)


def json_schema_spec(schema: dict | bool | str, what: str = "json_schema") -> ConstraintSpec:
    """A JSON Schema (a dict, true/false, or its JSON text). `what` names the parameter in error messages."""
    llg = _llguidance()
    if isinstance(schema, str):
        try:
            schema = _json.loads(schema)
        except _json.JSONDecodeError as e:
            raise ConstraintError(f"{what} is not valid JSON: {e}") from None
    if not isinstance(schema, (dict, bool)):
        raise ConstraintError(f"{what} must be a JSON object (a JSON Schema), not {type(schema).__name__}")
    text = _json.dumps(schema)
    try:
        g = llg.LLMatcher.grammar_from_json_schema(text, defaults=JSON_FORMAT)
    except (ValueError, TypeError) as e:
        raise ConstraintError(f"invalid {what}: {_one_line(str(e))}") from None
    return _checked("json_schema", text, g, what)


def json_object_spec() -> ConstraintSpec:
    """Any JSON object (OpenAI's response_format {"type": "json_object"}, `--json`)."""
    spec = json_schema_spec(ANY_JSON_OBJECT)
    return ConstraintSpec("json_object", spec.source, spec.grammar)


def regex_spec(regex: str, what: str = "regex") -> ConstraintSpec:
    """A regular expression the whole output must match, in the syntax Rust's `regex` and Python's `re` share
    (classes, repetition {m,n}, groups, alternation; no look-around or backreferences). \\d and \\w mean
    [0-9] and [0-9a-zA-Z_], as in JSON Schema and JavaScript (Rust's Unicode classes also hold digits and
    letters newer than Python's Unicode tables); \\s and . follow Unicode."""
    llg = _llguidance()
    if not isinstance(regex, str):
        raise ConstraintError(f"{what} must be a string, not {type(regex).__name__}")
    if not regex:
        raise ConstraintError(f"{what} is empty")
    _checked("regex", regex, llg.LLMatcher.grammar_from_regex(regex), what)  # errors quote the regex as given
    lark = f"start: /{llg.regex_to_lark(regex, 'dw')}/"
    return _checked("regex", regex, llg.LLMatcher.grammar_from_lark(lark), what)


def grammar_spec(text: str, what: str = "grammar") -> ConstraintSpec:
    """A Lark grammar (llguidance's dialect: a `start` rule, "literals", /regexes/, %ignore, %json {schema}) or a
    llama.cpp GBNF grammar (`root ::= ...`), told apart by GBNF's `::=`."""
    llg = _llguidance()
    if not isinstance(text, str):
        raise ConstraintError(f"{what} must be a string, not {type(text).__name__}")
    if not text.strip():
        raise ConstraintError(f"{what} is empty")
    from llguidance.gbnf_to_lark import gbnf_to_lark, is_lark_syntax
    if "::=" in text and not is_lark_syntax(text):
        try:
            lark = gbnf_to_lark(text)
        except Exception as e:  # noqa: BLE001 - GbnfToLarkError and the converter's own ValueErrors
            raise ConstraintError(f"invalid GBNF {what}: {_one_line(str(e))}") from None
        return _checked("gbnf", text, llg.LLMatcher.grammar_from_lark(lark), f"GBNF {what}")
    if text.lstrip().startswith("{"):
        raise ConstraintError(f"{what} is not a Lark or GBNF grammar (it looks like JSON: pass a JSON schema as "
                              "json_schema)")
    return _checked("lark", text, llg.LLMatcher.grammar_from_lark(text), f"Lark {what}")


def constraint_spec(json_schema: dict | bool | str | None = None, regex: str | None = None,
                    grammar: str | None = None, json: bool = False) -> ConstraintSpec | None:
    """The constraint of generate()'s options (at most one of them), or None for free text."""
    given = [k for k, v in (("json_schema", json_schema), ("regex", regex), ("grammar", grammar),
                            ("json", json or None)) if v is not None]
    if len(given) > 1:
        raise ConstraintError(f"give at most one of json_schema, regex, grammar and json (got {', '.join(given)})")
    if json_schema is not None:
        return json_schema_spec(json_schema)
    if regex is not None:
        return regex_spec(regex)
    if grammar is not None:
        return grammar_spec(grammar)
    if json:
        return json_object_spec()
    return None


# ---------------------------------------------------------------------- one sequence's state
class Constraint:
    """The grammar state of one sequence: the mask for its next token, fed the tokens it samples."""

    def __init__(self, spec: ConstraintSpec, vocab: Vocabulary, _matcher=None):
        self.spec, self.vocab = spec, vocab
        self.n_vocab = vocab.n_vocab
        self._bits = np.zeros((vocab.n_vocab + 31) // 32, dtype=np.int32)  # llguidance's bitmask, 1 = allowed
        self._pending: Future | None = None
        self._ready = False  # _bits holds the mask of the current state
        self.mask_seconds = 0.0       # time spent computing masks (on whichever thread)
        self.mask_wait_seconds = 0.0  # time the caller waited for a mask it asked for
        self.masks = 0
        self.overlap = True  # prefetch() computes on the background thread; False: allowed() computes it in place
        if _matcher is not None:
            self._m = _matcher
            return
        llg = _llguidance()
        try:
            self._m = llg.LLMatcher(vocab.lltok, spec.grammar, log_level=0)
        except (ValueError, TypeError) as e:
            raise ConstraintError(f"invalid {spec.describe()}: {_one_line(str(e))}") from None
        if self._m.is_error():
            raise ConstraintError(f"invalid {spec.describe()}: {_one_line(self._m.get_error())}")
        # the first mask now: a grammar that allows nothing at all is an error before any token is generated
        if not self.allowed().any():
            raise ConstraintError(f"the {spec.describe()} matches no text this model can write")

    # -- the mask
    def _compute(self) -> float:
        t0 = time.perf_counter()
        self._m.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)  # releases the GIL
        return time.perf_counter() - t0

    def prefetch(self) -> None:
        """Start computing the mask for the next token on the background thread (call after advance(), before
        the forward pass that produces the next logits)."""
        if self.overlap and self._pending is None and not self._ready:
            self._pending = _executor().submit(self._compute)

    def _wait(self) -> None:
        """Wait for a mask being computed in the background (the matcher is not to be touched meanwhile)."""
        if self._pending is not None:
            t0 = time.perf_counter()
            dt = self._pending.result()
            self.mask_wait_seconds += time.perf_counter() - t0
            self._pending = None
            self._done(dt)

    def _done(self, dt: float) -> None:
        self.mask_seconds += dt
        self.masks += 1
        self._ready = True

    def _settle(self) -> None:
        """Make _bits the mask of the current state."""
        self._wait()
        if not self._ready:
            t0 = time.perf_counter()
            self._done(self._compute())
            self.mask_wait_seconds += time.perf_counter() - t0

    def allowed(self) -> np.ndarray:
        """(n_vocab,) bool: the tokens that may come next (end-of-generation tokens only where the text so far
        is complete)."""
        self._settle()
        if self._m.is_error():
            raise ConstraintError(f"the {self.spec.describe()} failed: {_one_line(self._m.get_error())}")
        bits = np.unpackbits(self._bits.view(np.uint8), count=self.n_vocab, bitorder="little").view(bool)
        allowed = bits & self.vocab.usable
        if self._ready and self.masks > 1 and not allowed.any():  # (the first mask is checked by __init__)
            raise ConstraintError(f"the {self.spec.describe()} can only go on with tokens this model cannot write")
        return allowed

    # -- the state
    def advance(self, token: int) -> None:
        """Feed the sampled token. A token outside allowed() is an error (the sampler did not apply the mask)."""
        self._wait()  # a mask still being computed reads the state this changes
        if not self._m.consume_token(int(token)):
            raise ConstraintError(f"token {token} does not continue the {self.spec.describe()}: "
                                  f"{_one_line(self._m.get_error())}")
        self._ready = False

    @property
    def is_complete(self) -> bool:
        """The text so far is a whole match (an end-of-generation token is allowed now)."""
        self._wait()
        return self._m.is_accepting()

    @property
    def is_finished(self) -> bool:
        """Nothing but the end of generation can follow (the structure is closed, or an EOS was consumed).
        A matcher in an error state is not finished: allowed() reports its error."""
        self._wait()
        return self._m.is_stopped() and not self._m.is_error()

    def fork(self) -> "Constraint":
        """An independent copy of this state (mask statistics start at zero)."""
        self._wait()
        c = Constraint(self.spec, self.vocab, _matcher=self._m.deep_copy())
        c._bits[:] = self._bits
        c._ready, c.overlap = self._ready, self.overlap
        return c

    @property
    def mask_ms_per_token(self) -> float:
        return 1000 * self.mask_seconds / self.masks if self.masks else 0.0


def compile_constraint(tokenizer, spec: ConstraintSpec | None = None, n_vocab: int | None = None,
                       **options) -> Constraint | None:
    """A Constraint for `tokenizer` (an edgellm Tokenizer) from a spec or from generate()'s options
    (json_schema=, regex=, grammar=, json=True); None when there is none. n_vocab: the model's logits size.
    Raises ConstraintError for an invalid or unsupported schema, regex or grammar."""
    if spec is None:
        spec = constraint_spec(**options)
    elif options:
        raise ConstraintError("give either a ConstraintSpec or the options json_schema/regex/grammar/json")
    if spec is None:
        return None
    return Constraint(spec, vocabulary(tokenizer, n_vocab))

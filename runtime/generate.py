"""Layered generation (after mlx-lm): generate_step yields (token, logprobs) -> stream_generate yields
text pieces with stats -> generate returns the text."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from .constraints import Constraint, compile_constraint
from .contracts import Backend, Cache
from .errors import ContextOverflowError
from .sampling import Sampler, SamplerSettings, log_softmax


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prompt_tokens_cached: int = 0   # reused from the cache (chat turns)
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    ttft_seconds: float = 0.0       # time to first token: prefill + first sample
    finish_reason: str = ""         # "eos" (also: a constraint's structure closed), "stop", "length", "context"
    mask_seconds: float = 0.0       # constrained decoding: time computing token masks (overlapping the forward)
    mask_wait_seconds: float = 0.0  # ... of which the generation loop waited for

    @property
    def prefill_tps(self) -> float:
        n = self.prompt_tokens - self.prompt_tokens_cached
        return n / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        # tokens after the first one, over the time spent decoding them
        n = self.generated_tokens - 1
        return n / self.decode_seconds if self.decode_seconds > 0 and n > 0 else 0.0

    @property
    def mask_ms_per_token(self) -> float:
        return 1000 * self.mask_seconds / self.generated_tokens if self.generated_tokens else 0.0


@dataclass
class GenerationResponse:
    text: str                  # the new piece of text (may be empty while bytes of a character are pending)
    token: int | None
    logprob: float | None
    stats: GenerationStats = field(default_factory=GenerationStats)
    finished: bool = False


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def generate_step(engine: Backend, prompt: Sequence[int], sampler: Sampler, max_tokens: int,
                  cache: Cache | None = None, history: list[int] | None = None,
                  stats: GenerationStats | None = None,
                  constraint: Constraint | None = None) -> Iterator[tuple[int, float]]:
    """Prefill the prompt (reusing what `cache` already holds of it), then yield (token, logprob)
    for up to max_tokens sampled tokens. `history` (tokens already in the cache) is extended.
    constraint: every token is sampled from the tokens it allows (the next mask is computed while the forward
    pass runs); generation ends (finish_reason "eos") once nothing but the end of generation can follow."""
    cache = engine.cache if cache is None else cache
    history = [] if history is None else history
    stats = stats or GenerationStats()
    prompt = list(prompt)
    keep = common_prefix(history[:cache.n], prompt)
    if keep == len(prompt):  # must feed at least one token to get logits
        keep -= 1
    if not cache.can_truncate(keep):
        keep = 0  # a recurrent state (linear attention) goes back only to the start: run the whole prompt again
    cache.truncate(keep)
    del history[keep:]
    if len(prompt) >= cache.n_ctx:
        raise ContextOverflowError(f"the prompt has {len(prompt)} tokens but the context holds {cache.n_ctx} "
                                   "(a larger n_ctx holds it)", "n_ctx")
    stats.prompt_tokens, stats.prompt_tokens_cached = len(prompt), keep
    t0 = time.perf_counter()
    logits = engine.prefill(prompt[keep:], cache)
    history.extend(prompt[keep:])
    stats.prefill_seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    closed = False  # the constraint allows nothing but the end of generation
    for i in range(max_tokens):
        if constraint is None:
            tok = sampler(logits, history)
        else:
            tok = sampler(logits, history, constraint.allowed())
            constraint.advance(tok)
            closed = constraint.is_finished
            if not closed:
                constraint.prefetch()  # the next mask is computed while the forward pass runs
            stats.mask_seconds, stats.mask_wait_seconds = constraint.mask_seconds, constraint.mask_wait_seconds
        lp = float(log_softmax(logits)[tok])
        if i == 0:
            stats.ttft_seconds = time.perf_counter() - t0
            t1 = time.perf_counter()
        stats.generated_tokens += 1
        yield tok, lp
        if closed:
            stats.finish_reason = "eos"
            return
        if cache.n >= cache.n_ctx:
            stats.finish_reason = "context"
            return
        history.append(tok)
        logits = engine.decode(tok, cache)
        stats.decode_seconds = time.perf_counter() - t1


def stream_generate(engine: Backend, prompt: str | Sequence[int], max_tokens: int = 256,
                    sampler: Sampler | SamplerSettings | None = None, stop: Sequence[str] = (),
                    chat: bool = False, cache: Cache | None = None, history: list[int] | None = None,
                    json_schema: dict | str | None = None, regex: str | None = None, grammar: str | None = None,
                    json: bool = False, constraint: Constraint | None = None,
                    **sampler_kwargs) -> Iterator[GenerationResponse]:
    """Yield text pieces as they are generated; stops at an end-of-generation token, a stop string,
    max_tokens or a full context. The last response has finished=True and the final stats.

    Structured output (at most one): json_schema (a JSON Schema, dict or JSON text), regex (the whole output
    matches it), grammar (Lark or llama.cpp GBNF text), json=True (any JSON object), or a ready `constraint`
    (runtime/constraints.py). The output then matches when finish_reason is "eos"; "length" means it was cut
    short. An invalid schema, regex or grammar raises ConstraintError before anything is generated."""
    tok = engine.tokenizer
    if constraint is None:
        constraint = compile_constraint(tok, n_vocab=engine.cfg.n_vocab, json_schema=json_schema, regex=regex,
                                        grammar=grammar, json=json)
    elif json_schema is not None or regex is not None or grammar is not None or json:
        raise ValueError("give either constraint or json_schema/regex/grammar/json")
    if isinstance(sampler, SamplerSettings) or sampler is None:
        sampler = Sampler(sampler or SamplerSettings(**sampler_kwargs))
    if isinstance(prompt, str):
        if chat:
            prompt = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        ids = tok.encode(prompt, add_bos=None, parse_special=True)
    else:
        ids = list(prompt)
    stats = GenerationStats()
    dec = tok.stream_decoder()
    pending = ""  # text held back because it could be the start of a stop string
    hold = max((len(s) for s in stop), default=0)
    stats.finish_reason = "length"
    for token, lp in generate_step(engine, ids, sampler, max_tokens, cache, history, stats, constraint):
        if tok.is_eog(token):
            stats.finish_reason = "eos"
            break
        pending += dec.push(token)
        hit = min((i for i in (pending.find(s) for s in stop if s) if i >= 0), default=-1)
        if hit >= 0:
            stats.finish_reason = "stop"
            yield GenerationResponse(pending[:hit], token, lp, stats)
            pending = ""
            break
        emit = len(pending) - hold + 1 if hold else len(pending)
        if emit > 0:
            yield GenerationResponse(pending[:emit], token, lp, stats)
            pending = pending[emit:]
    if stats.finish_reason != "stop":
        pending += dec.flush()
    yield GenerationResponse(pending, None, None, stats, finished=True)


def generate(engine: Backend, prompt: str | Sequence[int], max_tokens: int = 256, **kwargs) -> str:
    return "".join(r.text for r in stream_generate(engine, prompt, max_tokens, **kwargs))

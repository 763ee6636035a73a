"""Process reward models: `score(prompt, steps) -> float in [0, 1]`, how good a partial solution is.

A PRM is a `PRM` subclass (or a plain function of the same shape, wrapped by `make_prm`). Search calls
`score_state(prompt, steps, logprobs=..., final=...)`, which is `score` unless a PRM overrides it, so
built-ins can use what the search already knows (the policy's token log-probabilities, whether the state
ended in EOS) without changing the interface.

Built-ins (`make_prm(spec)`):
- "self"      `SelfPRM`: the policy's own mean token log-probability along the path, as exp(mean) ∈ [0, 1].
- "verifier"  `VerifierPRM`: programmatic: checks the arithmetic of every equation a step writes, and for
              a task of the suite (found by its question in the prompt) the final answer.
- "judge"     `JudgePRM` on the policy model itself; any other spec is a model (path or catalog name)
              loaded by edgellm and asked whether the last step is correct, scored as P("Yes").
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from .errors import ArgumentError, EdgeLLMError
from .sampling import log_softmax
from .tasks import Task, find_task, verify_solution


class PRM:
    """Base class. Subclasses implement `score`; `score_state` may use what search knows."""
    name = "prm"
    tokens_processed = 0  # tokens a judge model has run (0 for PRMs that run no model)

    def score(self, prompt: str, steps: Sequence[str]) -> float:
        raise NotImplementedError

    def score_state(self, prompt: str, steps: Sequence[str], logprobs: Sequence[float] = (),
                    final: bool = False) -> float:
        return self.score(prompt, steps)


class FunctionPRM(PRM):
    """A plain `fn(prompt, steps) -> float` as a PRM."""

    def __init__(self, fn: Callable[[str, Sequence[str]], float], name: str | None = None):
        self.fn, self.name = fn, name or getattr(fn, "__name__", "function")

    def score(self, prompt, steps):
        return float(self.fn(prompt, list(steps)))


class SelfPRM(PRM):
    """The policy's confidence: exp(mean log-probability of the tokens of all steps so far). During
    search the log-probabilities recorded while sampling are used (no model call); called on its own,
    it runs the policy over prompt + steps."""
    name = "self"

    def __init__(self, engine=None, chat: bool = True):
        self.engine, self.chat = engine, chat

    def score_state(self, prompt, steps, logprobs=(), final=False):
        if len(logprobs):
            return float(math.exp(float(np.mean(logprobs))))
        return self.score(prompt, steps)

    def score(self, prompt, steps):
        if self.engine is None:
            raise EdgeLLMError("SelfPRM.score needs the policy engine when no log-probabilities are given")
        tok = self.engine.tokenizer
        head = tok.apply_chat_template([{"role": "user", "content": prompt}]) if self.chat else prompt
        h = tok.encode(head, add_bos=None, parse_special=True)
        body = tok.encode("\n\n".join(steps), add_bos=False, parse_special=False)
        if not body:
            return 1.0
        cache = self.engine.new_cache(len(h) + len(body) + 1)
        lg = self.engine.prefill(h + body, cache, logits="all")
        lp = log_softmax(lg[len(h) - 1:-1])[np.arange(len(body)), body]
        return float(math.exp(float(lp.mean())))


class VerifierPRM(PRM):
    """Programmatic verifier (`tasks.verify_solution`): exact arithmetic of each written equation; for a
    known task also whether its values are on a correct path and whether the final answer is right."""
    name = "verifier"

    def __init__(self, task: Task | None = None):
        self.task = task

    def _task(self, prompt):
        return self.task if self.task is not None else find_task(prompt)

    def score(self, prompt, steps):
        return verify_solution(list(steps), self._task(prompt), final=False)

    def score_state(self, prompt, steps, logprobs=(), final=False):
        return verify_solution(list(steps), self._task(prompt), final=final)


JUDGE_QUESTION = "Is the last step of this solution correct? Answer Yes or No."


class JudgePRM(PRM):
    """A model asked whether the last step is correct; the score is P(Yes) / (P(Yes) + P(No)) of its
    next token. The fixed head of the question (up to the problem) is prefilled once and forked."""

    def __init__(self, engine, name: str = "judge"):
        self.engine, self.name = engine, name
        tok = engine.tokenizer
        self.yes = self._ids(["Yes", " Yes", "yes", " yes", "YES"])
        self.no = self._ids(["No", " No", "no", " no", "NO"])
        if not self.yes or not self.no:
            raise EdgeLLMError(f"the judge model's vocabulary has no single-token Yes/No ({engine.path})")
        self._head_cache: dict[str, tuple] = {}
        self.tokens_processed = 0
        self._tok = tok

    def _ids(self, words):
        ids = set()
        for w in words:
            t = self.engine.tokenizer.encode(w, add_bos=False, parse_special=False)
            if len(t) == 1:
                ids.add(t[0])
        return sorted(ids)

    def _parts(self, prompt, steps):
        body = "Problem: " + prompt.strip() + "\n\nSolution:\n"
        marker = "\x00STEPS\x00"
        text = self._tok.apply_chat_template([{"role": "user", "content": body + marker + "\n\n" + JUDGE_QUESTION}])
        head, tail = text.split(marker)
        steps_text = "\n\n".join(s.strip() for s in steps)
        return head, steps_text + tail

    def score(self, prompt, steps):
        head, rest = self._parts(prompt, steps)
        eng = self.engine
        if head not in self._head_cache:
            h = self._tok.encode(head, add_bos=None, parse_special=True)
            cache = eng.new_cache(min(eng.n_ctx, len(h) + 1024))
            eng.prefill(h, cache)
            self.tokens_processed += len(h)
            self._head_cache = {head: (cache, len(h))}
        base, _ = self._head_cache[head]
        r = self._tok.encode(rest, add_bos=False, parse_special=True)
        if base.n + len(r) > base.n_ctx:
            r = r[-(base.n_ctx - base.n):]
        cache = base.fork()
        lg = eng.prefill(r, cache)
        self.tokens_processed += len(r)
        lp = log_softmax(lg)
        py = float(np.exp(lp[self.yes]).sum())
        pn = float(np.exp(lp[self.no]).sum())
        return py / (py + pn) if py + pn > 0 else 0.5


def make_prm(spec, engine=None, task: Task | None = None, threads: int | None = None) -> PRM:
    """A PRM from a spec: a PRM, a callable, "self", "verifier", "judge" (the policy as judge) or a
    model path / catalog name loaded by edgellm as judge."""
    if isinstance(spec, PRM):
        return spec
    if callable(spec) and not isinstance(spec, str):
        return FunctionPRM(spec)
    if spec is None or spec == "self":
        return SelfPRM(engine)
    if spec == "verifier":
        return VerifierPRM(task)
    if spec == "judge":
        if engine is None:
            raise ArgumentError("prm judge uses the policy model, which is not loaded", "prm")
        return JudgePRM(engine, name="judge")
    if not isinstance(spec, str):
        raise ArgumentError(f"prm must be self, verifier, judge or a model path (got {spec!r})", "prm")
    from .engine import load
    try:
        eng = load(spec, threads=threads or (engine.threads if engine is not None else None))
    except EdgeLLMError as e:
        raise ArgumentError(f"prm {spec!r} is not self, verifier, judge or a loadable model: {e}", "prm") from None
    return JudgePRM(eng, name=f"judge:{spec}")

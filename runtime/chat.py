"""A chat session that keeps its KV cache between turns: each turn renders the whole conversation with
the model's template, and only the tokens after the common prefix with the cache are processed."""
from __future__ import annotations

from .contracts import Backend
from .generate import stream_generate
from .sampling import Sampler, SamplerSettings


class ChatSession:
    def __init__(self, engine: Backend, settings: SamplerSettings | None = None, system: str | None = None,
                 max_tokens: int = 512):
        self.engine, self.sampler, self.system, self.max_tokens = engine, Sampler(settings), system, max_tokens
        self.cache = engine.new_cache()
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.history: list[int] = []  # tokens held in self.cache
        self.cache.truncate(0)

    def send(self, text: str):
        """Yield the answer's GenerationResponses; the answer joins the conversation."""
        self.messages.append({"role": "user", "content": text})
        tok = self.engine.tokenizer
        prompt = tok.apply_chat_template(self.messages, add_generation_prompt=True)
        ids = tok.encode(prompt, add_bos=None, parse_special=True)
        answer = []
        for r in stream_generate(self.engine, ids, self.max_tokens, sampler=self.sampler, cache=self.cache,
                                 history=self.history):
            answer.append(r.text)
            yield r
        self.messages.append({"role": "assistant", "content": "".join(answer)})

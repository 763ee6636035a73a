"""Watching what an engine is asked to run, independently of the caller's own accounting (search, the server)."""
from __future__ import annotations


def instrument(engine, monkeypatch):
    """Record every prefill (its token count) and decode_batch (its rows) the engine runs."""
    calls = []
    prefill, decode_batch = engine.prefill, engine.decode_batch

    def p(tokens, cache=None, *a, **kw):
        calls.append(("prefill", len(tokens)))
        return prefill(tokens, cache, *a, **kw)

    def d(tokens, caches):
        calls.append(("decode_batch", len(tokens)))
        return decode_batch(tokens, caches)

    monkeypatch.setattr(engine, "prefill", p)
    monkeypatch.setattr(engine, "decode_batch", d)
    return calls

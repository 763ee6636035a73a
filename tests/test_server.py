"""`edgellm serve` (issue 16) checked with clients we did not write: the `openai` Python client and raw HTTP
(http.client) against a server on 127.0.0.1 on a free port, run in this process on a background thread (so that
an instrumented engine can count what prefill processed, as tests/test_search.py does).

Greedy answers are compared with `cache_prompt: false` (llama.cpp's request field) where they must be identical to
another run: a prompt prefilled in one piece and the same prompt continued from a cached prefix differ in the last
bits of the logits (the matrix products group the rows differently), which could part two greedy runs at a near-tie.
Batched decoding itself is exact: `decode_batch` rows equal single-sequence decodes (checked below)."""
from __future__ import annotations

from http.client import HTTPConnection
import json
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from edgellm.runtime.generate import stream_generate
from edgellm.runtime.sampling import SamplerSettings
from edgellm.runtime.scheduler import Delta, GenParams, Request, RequestEnd, RequestError, Scheduler
from edgellm.runtime.server import build, start_in_thread

from engine_probe import instrument
from tiny_models import ARCHS, write_tiny, write_tiny_llama

openai = pytest.importorskip("openai")

PROMPTS = ["Write a haiku about the sea.", "What is the capital of France?", "Name three colours.",
           "Give me a word that rhymes with cat.", "What is 2 + 2?", "Say hello in Spanish.",
           "Describe a cat in one sentence.", "What day comes after Monday?"]
N_TOKENS = 16
MODEL_ID = "smol"


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def engine(model_path):
    """The default model on one thread (steadier than two on a shared 2-core machine); Numba's count is put back."""
    import numba
    from edgellm.runtime.engine import Engine
    before = numba.get_num_threads()
    yield Engine(model_path, n_ctx=1024, threads=1)
    numba.set_num_threads(before)


def chat_ids(engine, messages) -> list[int]:
    tok = engine.tokenizer
    return tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True), add_bos=None, parse_special=True)


@pytest.fixture(scope="module")
def refs(engine):
    """Greedy answers (text, token logprobs) of PROMPTS computed directly on the engine, before a server owns it."""
    out = {}
    for p in PROMPTS:
        text, lps = "", []
        for r in stream_generate(engine, chat_ids(engine, [{"role": "user", "content": p}]), N_TOKENS,
                                 sampler=SamplerSettings(temp=0), cache=engine.new_cache()):
            text += r.text
            if r.token is not None and not engine.tokenizer.is_eog(r.token):
                lps.append(r.logprob)
        out[p] = (text, lps)
    return out


@pytest.fixture(scope="module")
def server(engine, refs):
    handle = start_in_thread(build(engine, MODEL_ID, parallel=8, max_queue=32))
    yield handle
    handle.stop()
    assert not handle._thread.is_alive()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=600)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    import gguf
    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny.gguf", n_ctx=1024,
                            qtype=gguf.GGMLQuantizationType.Q8_0)


@pytest.fixture
def tiny_engine(tiny_path):
    import numba
    from edgellm.runtime.engine import Engine
    before = numba.get_num_threads()
    yield Engine(tiny_path, n_ctx=1024, threads=1)
    numba.set_num_threads(before)


def http(url, method, path, body=None, headers=None):
    """(status, parsed JSON or raw bytes) of one plain HTTP request."""
    conn = HTTPConnection(url.split("//", 1)[1], timeout=600)
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
    conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    try:
        return r.status, json.loads(data)
    except ValueError:
        return r.status, data


def status(url) -> dict:
    return http(url, "GET", "/health")[1]


def wait_until(pred, what: str, timeout: float = 300.0):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def user(p):
    return [{"role": "user", "content": p}]


NO_CACHE = {"cache_prompt": False}


# --------------------------------------------------------------------------- the basics
def test_health_and_models(server, client):
    st, body = http(server.url, "GET", "/health")
    assert st == 200 and body["status"] == "ok" and body["slots_total"] == 8
    assert [m.id for m in client.models.list()] == [MODEL_ID]


def test_chat_greedy_equals_edgellm_run(server, client, model_path, refs):
    p = PROMPTS[0]
    run = subprocess.run([sys.executable, "-m", "edgellm.cli", "run", str(model_path), "-p", p, "-n", str(N_TOKENS),
                          "--temp", "0", "--threads", "1", "--ctx", "1024", "-q"], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr
    r = client.chat.completions.create(model=MODEL_ID, messages=user(p), max_tokens=N_TOKENS, temperature=0,
                                       extra_body=NO_CACHE)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == run.stdout == refs[p][0]
    assert r.choices[0].finish_reason == "length"
    u = r.usage
    assert u.prompt_tokens == len(chat_ids(server.server.engine, user(p)))
    assert u.completion_tokens == N_TOKENS and u.total_tokens == u.prompt_tokens + N_TOKENS
    assert u.prompt_tokens_details.cached_tokens == 0

    # streamed: the same text in pieces, a role first, the finish reason last, then the usage chunk
    chunks = list(client.chat.completions.create(model=MODEL_ID, messages=user(p), max_tokens=N_TOKENS,
                                                 temperature=0, stream=True, stream_options={"include_usage": True},
                                                 extra_body=NO_CACHE))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == run.stdout
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == N_TOKENS
    assert sum(len(c.choices) > 0 and len(c.choices[0].delta.content or "") > 0 for c in chunks) > 1  # it streamed


def test_completions_stream_and_not(server, client, engine):
    prompt = "The capital of France is"
    r = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=12, temperature=0, extra_body=NO_CACHE)
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    s = list(client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                       extra_body=NO_CACHE))
    assert "".join(c.choices[0].text for c in s if c.choices) == r.choices[0].text
    # the same tokens as a token-id prompt
    ids = engine.tokenizer.encode(prompt, add_bos=None)
    r2 = client.completions.create(model=MODEL_ID, prompt=ids, max_tokens=12, temperature=0, extra_body=NO_CACHE)
    assert r2.choices[0].text == r.choices[0].text and r2.usage.prompt_tokens == len(ids)
    # two prompts in one request: choices in order
    r3 = client.completions.create(model=MODEL_ID, prompt=[prompt, "Once upon a time"], max_tokens=6, temperature=0,
                                   extra_body=NO_CACHE)
    assert [c.index for c in r3.choices] == [0, 1] and r3.choices[0].text == r.choices[0].text[:len(r3.choices[0].text)]


def test_n2_prefills_once_and_seed_is_reproducible(server, client, engine, refs, monkeypatch):
    p = PROMPTS[1]
    calls = instrument(engine, monkeypatch)
    r = client.chat.completions.create(model=MODEL_ID, messages=user(p), max_tokens=N_TOKENS, temperature=0, n=2,
                                       extra_body=NO_CACHE)
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.message.content for c in r.choices] == [refs[p][0]] * 2
    assert sum(n for kind, n in calls if kind == "prefill") == r.usage.prompt_tokens  # the prompt ran once
    one = client.chat.completions.create(model=MODEL_ID, messages=user(p), max_tokens=N_TOKENS, temperature=0,
                                         extra_body=NO_CACHE)
    assert r.usage.completion_tokens == 2 * one.usage.completion_tokens
    assert r.usage.prompt_tokens == one.usage.prompt_tokens

    def sample(n, seed):  # (no prefix cache: a prompt resumed from a cached prefix takes another path through the
        # kernels, and int8 activation rounding makes different paths differ in the last bits, enough to move a draw)
        return [c.message.content for c in client.chat.completions.create(
            model=MODEL_ID, messages=user(PROMPTS[6]), max_tokens=N_TOKENS, temperature=1.0, n=n, seed=seed,
            extra_body=NO_CACHE).choices]

    a, b = sample(2, 1234), sample(2, 1234)
    assert a == b and all(a)
    assert sample(1, 1234) == a[:1]  # choice 0 of a seeded request draws as n = 1 does


def test_logprobs(server, client, refs):
    p = PROMPTS[2]
    r = client.chat.completions.create(model=MODEL_ID, messages=user(p), max_tokens=N_TOKENS, temperature=0,
                                       logprobs=True, top_logprobs=3, extra_body=NO_CACHE)
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content) == r.choices[0].message.content == refs[p][0]
    assert len(content) == len(refs[p][1])
    for t, ref in zip(content, refs[p][1]):
        assert t.logprob == pytest.approx(ref, abs=1e-4) and t.logprob <= 0
        assert bytes(t.bytes) == t.token.encode()
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token  # greedy took the most likely
        lps = [x.logprob for x in t.top_logprobs]
        assert lps == sorted(lps, reverse=True)
    # the legacy completions shape
    c = client.completions.create(model=MODEL_ID, prompt="Once upon a time", max_tokens=8, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert "".join(lp.tokens) == c.choices[0].text and len(lp.token_logprobs) == len(lp.tokens)
    assert all(len(d) <= 2 and max(d.values()) == pytest.approx(x) for d, x in zip(lp.top_logprobs, lp.token_logprobs))
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])


def test_stop_strings(server, client, refs):
    p = PROMPTS[0]
    full = refs[p][0]
    stop = full[len(full) // 2:len(full) // 2 + 3]
    want = full[:full.index(stop)]
    r = client.chat.completions.create(model=MODEL_ID, messages=user(p), max_tokens=N_TOKENS, temperature=0,
                                       stop=[stop, "never-there"], extra_body=NO_CACHE)
    assert r.choices[0].message.content == want and r.choices[0].finish_reason == "stop"
    s = list(client.chat.completions.create(model=MODEL_ID, messages=user(p), max_tokens=N_TOKENS, temperature=0,
                                            stop=stop, stream=True, extra_body=NO_CACHE))
    assert "".join(c.choices[0].delta.content or "" for c in s if c.choices) == want
    assert s[-1].choices[0].finish_reason == "stop"


# --------------------------------------------------------------------------- load
@pytest.mark.slow
def test_eight_concurrent_clients_get_their_answers(server, client, refs):
    def ask(p, out, i):
        r = client.chat.completions.create(model=MODEL_ID, messages=user(p), max_tokens=N_TOKENS, temperature=0,
                                           extra_body=NO_CACHE)
        out[i] = (r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens)

    # the same requests sent alone are `refs` (each run by itself on the engine; the tests above check that the
    # server sends back exactly those)
    together = [None] * len(PROMPTS)
    threads = [threading.Thread(target=ask, args=(p, together, i)) for i, p in enumerate(PROMPTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [a[0] for a in together] == [refs[p][0] for p in PROMPTS]
    assert all(a[1] in ("stop", "length") and 0 < a[2] <= N_TOKENS for a in together)
    assert together[0][1] == "length" and together[0][2] == N_TOKENS


def test_batched_decoding_and_chunked_prefill(tiny_engine, monkeypatch):
    """Scheduler-level and deterministic: requests queued before the scheduler starts are admitted together; a
    long prompt goes in 64-token pieces with decode steps in between, short prompts whole; every answer equals the
    same request alone (the same pieces: prefill sums follow a piece's shape)."""
    eng = tiny_engine
    rng = np.random.default_rng(0)
    ban = tuple((t, -100.0) for t in sorted(eng.tokenizer.eog_ids))  # random weights: never end early
    params = GenParams(max_tokens=10, settings=SamplerSettings(temp=0), logit_bias=ban, cache_prompt=False)
    prompts = [rng.integers(0, 256, size=k).tolist() for k in (7, 300, 5, 11, 9)]

    def run(sched, reqs_prompts):
        texts, done = {}, threading.Event()
        left = [len(reqs_prompts)]

        def emit(ev, i):
            if isinstance(ev, Delta):
                texts[i] = texts.get(i, "") + ev.text
            elif isinstance(ev, (RequestEnd, RequestError)):
                assert not isinstance(ev, RequestError), ev.message
                left[0] -= 1
                if not left[0]:
                    done.set()
        for i, p in enumerate(reqs_prompts):
            sched.submit(Request(p, params, lambda ev, i=i: emit(ev, i)))
        sched.start()
        assert done.wait(300)
        sched.stop()
        return [texts.get(i, "") for i in range(len(reqs_prompts))]

    alone = [run(Scheduler(eng, parallel=1, prefill_chunk=64), [p])[0] for p in prompts]
    calls = instrument(eng, monkeypatch)
    together = run(Scheduler(eng, parallel=5, prefill_chunk=64), prompts)
    assert together == alone and all(len(t) > 0 for t in alone)
    # prompt 0 whole (nothing was decoding), then prompt 1 (300 tokens) in pieces of 64 with decode steps between;
    # the short prompts whole, never cut to fill a step's budget
    kinds = [c for c in calls if c[0] == "prefill"]
    assert kinds[0] == ("prefill", 7) and kinds[1:6] == [("prefill", 64)] * 4 + [("prefill", 44)]
    assert sorted(kinds[6:]) == [("prefill", 5), ("prefill", 9), ("prefill", 11)]
    i1, i5 = calls.index(("prefill", 64)), calls.index(("prefill", 44))
    assert all(c == ("decode_batch", 1) for c in calls[i1 + 1:i5:2])
    assert max(n for k, n in calls if k == "decode_batch") >= 3  # several sequences in one step


def test_select_token_applies_bias_and_penalties_and_reports_raw_logprobs(tiny_engine):
    from edgellm.runtime.sampling import Sampler, log_softmax
    from edgellm.runtime.scheduler import Sequence
    sched = Scheduler(tiny_engine)
    params = GenParams(max_tokens=4, settings=SamplerSettings(temp=0), logit_bias=((3, 5.0),), presence_penalty=1.0,
                       frequency_penalty=0.5, logprobs=2)
    seq = Sequence(Request([1, 2], params, lambda ev: None), 0, None, Sampler(params.settings), None)
    logits = np.zeros(tiny_engine.cfg.n_vocab, dtype=np.float32)
    logits[7], logits[9] = 4.0, 3.0
    tok, info = sched.select_token(seq, logits)
    assert tok == 3  # 0 + 5 (bias) > 4
    assert info.token == 3 and info.logprob == pytest.approx(log_softmax(logits)[3])  # the model's own distribution
    assert [t for t, _ in info.top] == [7, 9]
    seq.counts = {3: 2}  # 5 - (0.5 * 2 + 1) = 3 < 4
    assert sched.select_token(seq, logits)[0] == 7
    assert np.count_nonzero(logits) == 2  # the logits were not modified in place


def test_decode_batch_rows_equal_single_decodes(engine):
    ids = chat_ids(engine, user(PROMPTS[0]))
    base = engine.new_cache()
    engine.prefill(ids, base)
    caches = [base.fork() for _ in range(4)]
    single = engine.decode_batch([42], [caches[0]])[0]
    batch = engine.decode_batch([42, 42, 7, 42], caches[1:] + [engine.new_cache()])
    assert np.array_equal(batch[0], single) and np.array_equal(batch[1], single)
    assert not np.array_equal(batch[2], single)


def test_cancelled_stream_frees_its_slot(server, client, engine):
    before = status(server.url)
    ban = {str(t): -100 for t in engine.tokenizer.eog_ids}
    stream = client.chat.completions.create(model=MODEL_ID, messages=user("Tell me a very long story."),
                                            max_tokens=900, temperature=0, stream=True, logit_bias=ban,
                                            extra_body=NO_CACHE)
    it = iter(stream)
    got = [next(it), next(it), next(it)]
    assert got[-1].choices[0].delta.content is not None
    stream.close()
    wait_until(lambda: status(server.url)["cancelled"] == before["cancelled"] + 1, "the cancellation")
    st = status(server.url)
    assert st["slots_busy"] == 0 and st["completed"] == before["completed"]
    assert st["generated_tokens"] - before["generated_tokens"] < 900
    r = client.chat.completions.create(model=MODEL_ID, messages=user("Hi"), max_tokens=2)  # still serving
    assert r.choices[0].message.content


# --------------------------------------------------------------------------- the prefix cache
def test_conversation_resent_with_one_more_turn_runs_only_new_tokens(server, client, engine, monkeypatch):
    calls = instrument(engine, monkeypatch)
    msgs = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Name a fruit."}]
    prev_prompt = 0
    for turn, question in enumerate(["Name a vegetable.", "Name a tree.", None]):
        calls.clear()
        r = client.chat.completions.create(model=MODEL_ID, messages=msgs, max_tokens=12, temperature=0)
        u = r.usage
        ran = sum(n for kind, n in calls if kind == "prefill")
        assert ran == u.prompt_tokens - u.prompt_tokens_details.cached_tokens  # only the uncached part ran
        if turn > 0:
            assert u.prompt_tokens_details.cached_tokens >= prev_prompt
            assert ran <= u.prompt_tokens - prev_prompt
        prev_prompt = u.prompt_tokens
        if question is None:
            break
        msgs += [{"role": "assistant", "content": r.choices[0].message.content}, {"role": "user", "content": question}]
    st = status(server.url)["prefix_cache"]
    assert st["hits"] >= 2 and 0 < st["bytes"] <= st["max_bytes"]


def test_prefix_cache_lru_bounds_and_reuse(tiny_engine):
    from edgellm.runtime.prefix_cache import PrefixCache
    eng = tiny_engine
    entry = 32 * eng.new_cache(32).nbytes_per_token  # an entry is charged for its whole context
    pc = PrefixCache(max_bytes=2 * entry + entry // 2)

    def filled(tokens):
        c = eng.new_cache(32)
        eng.prefill(tokens, c)
        return c
    a = list(range(10, 20))
    ca = filled(a)
    assert pc.insert(a, ca) and pc.nbytes == entry
    c, k = pc.lookup(a + [1, 2])  # all of the entry is a prefix: the entry itself is handed out (no copy)...
    assert k == 10 and c is ca and len(pc) == 0 and pc.nbytes == 0
    assert pc.lookup(a + [1, 2]) == (None, 0)  # ... and is no longer kept
    assert pc.insert(a, ca)
    c, k = pc.lookup(a[:4] + [99])  # truncated fork: the entry itself stays whole
    assert c is not ca and k == 4 and c.n == 4 and ca.n == 10
    assert pc.lookup(a)[1] == 9  # at least one token is left to run (a truncated fork too)
    assert pc.lookup(a + [5]) == (ca, 10) and pc.insert(a, ca)
    assert pc.lookup([1, 2, 3]) == (None, 0)
    b = a + [21, 22]
    pc.insert(b, filled(b))  # covers a: a is dropped
    assert len(pc) == 1 and pc.nbytes == entry
    assert not pc.insert(a, filled(a))  # already held by b
    d, e = list(range(50, 65)), list(range(70, 75))
    pc.insert(d, filled(d))
    pc.lookup(b)  # b is now more recently used than d (a truncated fork: b stays)
    pc.insert(e, filled(e))  # three entries do not fit: the least recently used (d) goes
    assert len(pc) == 2 and pc.nbytes == 2 * entry
    assert pc.lookup(d + [1])[1] == 0 and pc.lookup(b + [1])[1] == 12 and pc.lookup(e + [1])[1] == 5
    assert not PrefixCache(0).insert(a, filled(a))  # --cache-ram 0: off
    assert not PrefixCache(entry - 1).insert(a, filled(a))  # larger than the whole budget


def _ask(sched, prompt, params):
    """Submit one request to a running scheduler and wait: (its RequestEnd, the ids of its generated tokens)."""
    done, toks, end = threading.Event(), [], []

    def emit(ev):
        if isinstance(ev, Delta):
            toks.extend(i.token for i in ev.logprobs)
        elif isinstance(ev, (RequestEnd, RequestError)):
            end.append(ev)
            done.set()
    sched.submit(Request(prompt, params, emit))
    assert done.wait(300) and isinstance(end[0], RequestEnd), end
    return end[0], toks


@pytest.mark.parametrize("arch", ARCHS)
def test_prefix_cache_on_every_cache_type(arch, tmp_path, monkeypatch):
    """KV, latent (MLA) and recurrent (linear) caches: a prompt that extends a kept sequence reuses all of it and
    runs only its new tokens; one that parts inside it reuses the common prefix where the cache can truncate there."""
    import numba
    from edgellm.runtime.engine import Engine
    before = numba.get_num_threads()
    eng = Engine(write_tiny(tmp_path / f"{arch}.gguf", arch, n_ctx=256), n_ctx=256, threads=1)
    ban = tuple((t, -100.0) for t in sorted(eng.tokenizer.eog_ids))
    params = GenParams(max_tokens=4, settings=SamplerSettings(temp=0), logit_bias=ban, logprobs=0)
    p = list(range(40, 60))
    probe = eng.new_cache()
    eng.prefill(p[:6], probe)
    truncatable = probe.can_truncate(5)
    calls = instrument(eng, monkeypatch)
    sched = Scheduler(eng).start()
    try:
        e1, gen = _ask(sched, p, params)
        assert e1.cached_tokens == 0 and e1.prompt_tokens == len(p) and len(gen) == 4
        calls.clear()
        e2, _ = _ask(sched, p + gen[:3] + [70, 71], params)  # the first sequence's cache holds p + gen[:3]
        assert e2.cached_tokens == len(p) + 3 and [c for c in calls if c[0] == "prefill"] == [("prefill", 2)]
        e3, _ = _ask(sched, p[:5] + [99, 98, 97], params)
        assert e3.cached_tokens == (5 if truncatable else 0)
    finally:
        sched.stop()
        numba.set_num_threads(before)


@pytest.mark.parametrize("arch", ARCHS)
def test_scheduler_reuses_the_memory_of_caches_it_lets_go(arch, tmp_path, monkeypatch):
    """Caches of ended requests (and dropped prefix entries) are emptied and kept as spares, at most `parallel`
    with the caches requests hold; the next new cache or copy is a spare: the same answers, no new cache."""
    import numba
    from edgellm.runtime.engine import Engine
    before = numba.get_num_threads()
    eng = Engine(write_tiny(tmp_path / f"{arch}.gguf", arch, n_ctx=256), n_ctx=256, threads=1)
    ban = tuple((t, -100.0) for t in sorted(eng.tokenizer.eog_ids))
    once = GenParams(max_tokens=4, settings=SamplerSettings(temp=0), logit_bias=ban, logprobs=0, cache_prompt=False)
    made = []
    new_cache = eng.new_cache
    monkeypatch.setattr(eng, "new_cache", lambda *a, **kw: made.append(1) or new_cache(*a, **kw))
    p, q = list(range(40, 60)), list(range(80, 95))
    sched = Scheduler(eng, parallel=2).start()
    try:
        _, g1 = _ask(sched, p, once)  # a new cache, let go: a spare
        assert len(made) == 1 and sched.status()["spare_caches"] == 1
        _, g2 = _ask(sched, q, once)  # the spare (what it held before does not matter) ...
        _, g1b = _ask(sched, p, once)
        assert len(made) == 1 and g1b == g1 and len(g2) == 4  # ... and again: the same answer
    finally:
        sched.stop()
        numba.set_num_threads(before)
    # a copy into a spare equals a fork; spares + the caches requests hold stay within `parallel`
    sched = Scheduler(eng, parallel=2)
    src = new_cache()
    eng.prefill(p, src)
    spare = new_cache()
    eng.prefill(q, spare)
    sched._recycle(spare)
    assert sched._spares == [spare] and spare.n == 0
    c, ref = sched._copy(src), src.fork()
    assert c is spare and c.n == ref.n == len(p) and not sched._spares
    np.testing.assert_array_equal(eng.prefill([5, 6], c), eng.prefill([5, 6], ref))
    for x in [new_cache() for _ in range(3)]:
        sched._recycle(x)
    assert len(sched._spares) == 2
    held = Request(p, once, lambda ev: None)
    held.cache = c
    sched._prefilling.append(held)
    sched._trim_spares()
    assert len(sched._spares) == 1
    sched._recycle(new_cache())
    assert len(sched._spares) == 1


# --------------------------------------------------------------------------- bad requests
def test_bad_requests_get_4xx_and_the_server_keeps_serving(server, client):
    ok = {"model": MODEL_ID, "messages": user("hi"), "max_tokens": 2}
    chat = "/v1/chat/completions"
    cases = [
        (b"{not json", 400, "invalid_json"),
        (b"[1, 2]", 400, "invalid_json"),
        ({"model": MODEL_ID}, 400, None),                                   # no messages
        ({**ok, "messages": "hi"}, 400, None),                              # wrong types
        ({**ok, "messages": [{"role": "wizard", "content": "x"}]}, 400, None),
        ({**ok, "temperature": "hot"}, 400, None),
        ({**ok, "max_tokens": "10"}, 400, None),
        ({**ok, "n": 1.5}, 400, None),
        ({**ok, "stream": "yes"}, 400, None),
        ({**ok, "max_tokens": -1}, 400, None),                              # negative or absurd limits
        ({**ok, "max_tokens": 10 ** 12}, 400, None),
        ({**ok, "temperature": -0.5}, 400, None),
        ({**ok, "top_p": 7}, 400, None),
        ({**ok, "n": 0}, 400, None),
        ({**ok, "n": 100}, 400, None),
        ({**ok, "logprobs": True, "top_logprobs": 99}, 400, None),
        ({**ok, "top_logprobs": 2}, 400, None),
        ({**ok, "logit_bias": {"abc": 1}}, 400, None),
        ({**ok, "logit_bias": {"5": 1000}}, 400, None),
        ({**ok, "stop": ["x"] * 100}, 400, None),
        ({**ok, "model": "gpt-4o"}, 404, "model_not_found"),               # unknown model
        ({**ok, "messages": user("hello " * 1500)}, 400, "context_length_exceeded"),
        ({**ok, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
         400, "unsupported"),
        ({**ok, "tools": [{"type": "function", "function": {"name": "not a name"}}]}, 400, "invalid_value"),
        ({**ok, "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "strin"}}}}, 400,
         "invalid_value"),
        ({**ok, "response_format": {"type": "yaml"}}, 400, "invalid_value"),
    ]
    for body, want, code in cases:
        st, resp = http(server.url, "POST", chat, body)
        assert st == want, (body if len(str(body)) < 300 else str(body)[:300], st, resp)
        err = resp["error"]
        assert isinstance(err["message"], str) and err["message"] and "type" in err
        if code:
            assert err["code"] == code, resp
    comp = "/v1/completions"
    for body in ({"prompt": [1, 2, 10 ** 9]}, {"prompt": ""}, {"prompt": []}, {"prompt": 5}, {"prompt": "x", "echo": True}):
        st, resp = http(server.url, "POST", comp, body)
        assert st == 400 and resp["error"]["message"], (body, st, resp)
    st, resp = http(server.url, "POST", chat, b'{"messages": "' + b"x" * (9 << 20) + b'"}')  # over the size limit
    assert st == 413 and resp["error"]["code"] == "request_too_large"
    assert http(server.url, "GET", chat)[0] == 405
    assert http(server.url, "GET", "/nope")[0] == 404
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL_ID, messages=user("hi"), max_tokens=-3)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=user("hi"), max_tokens=3)
    # still serving, and nothing leaked
    r = client.chat.completions.create(model=MODEL_ID, messages=user("Say yes."), max_tokens=4, temperature=0)
    assert r.choices[0].message.content
    st = status(server.url)
    assert st["status"] == "ok" and st["slots_busy"] == 0 and st["waiting"] == 0


def test_api_key(tiny_engine):
    h = start_in_thread(build(tiny_engine, "tiny", parallel=2, api_key="sekrit"))
    try:
        body = {"messages": user("hi"), "max_tokens": 2}
        st, resp = http(h.url, "POST", "/v1/chat/completions", body)
        assert st == 401 and resp["error"]["code"] == "invalid_api_key"
        assert http(h.url, "POST", "/v1/chat/completions", body, {"Authorization": "Bearer wrong"})[0] == 401
        assert http(h.url, "GET", "/v1/models")[0] == 401
        assert http(h.url, "GET", "/health")[0] == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=h.url + "/v1", api_key="wrong", max_retries=0).models.list()
        c = openai.OpenAI(base_url=h.url + "/v1", api_key="sekrit", max_retries=0, timeout=300)
        assert c.chat.completions.create(model="tiny", messages=user("hi"), max_tokens=2).choices[0].finish_reason
    finally:
        h.stop()


def test_full_queue_gets_503_then_everyone_is_served(tiny_engine, monkeypatch):
    """Deterministic: the first request holds the only slot inside a gated prefill, the second waits in the queue
    (size 1), the third is refused with 503; once the gate opens, the first two complete."""
    gate = threading.Event()
    prefill = tiny_engine.prefill

    def gated(tokens, cache=None, *a, **kw):
        assert gate.wait(300)
        return prefill(tokens, cache, *a, **kw)

    monkeypatch.setattr(tiny_engine, "prefill", gated)
    h = start_in_thread(build(tiny_engine, "tiny", parallel=1, max_queue=1))
    try:
        body = {"messages": user("hi"), "max_tokens": 3}
        results = [None, None]

        def send(i):
            results[i] = http(h.url, "POST", "/v1/chat/completions", body)

        t0 = threading.Thread(target=send, args=(0,))
        t0.start()
        wait_until(lambda: status(h.url)["slots_busy"] == 1, "the first request to take the slot")
        t1 = threading.Thread(target=send, args=(1,))
        t1.start()
        wait_until(lambda: status(h.url)["waiting"] == 1, "the second request to queue")
        st, resp = http(h.url, "POST", "/v1/chat/completions", body)
        assert st == 503 and resp["error"]["type"] == "server_error"
        gate.set()
        t0.join(300)
        t1.join(300)
        assert [r[0] for r in results] == [200, 200]
        assert http(h.url, "POST", "/v1/chat/completions", body)[0] == 200
    finally:
        gate.set()
        h.stop()


def test_serve_cli_refuses_bad_options_in_one_line():
    import socket
    from test_bad_input import assert_clean_error, cli
    for args in (["--parallel", "0"], ["--port", "70000"], ["--cache-ram", "-5"], ["--queue", "-1"],
                 ["--log-level", "loud"], ["--api-key", " "]):
        assert_clean_error(cli("serve", *args))
    with socket.socket() as s:  # a port in use: refused before the model loads
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        r = cli("serve", "--port", str(s.getsockname()[1]))
    assert_clean_error(r)
    assert "cannot listen" in r.stderr


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_serve_cli_answers_then_stops_on_a_signal(model_path, sig):
    # `edgellm serve` runs its scheduler on the main thread and HTTP on another (Scheduler.run): it answers, a
    # signal shuts it down gracefully (Ctrl-C: exit status 130; SIGTERM: the signal's own status, as uvicorn's)
    import signal
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = subprocess.Popen([sys.executable, "-m", "edgellm.cli", "serve", str(model_path), "--port", str(port),
                          "--threads", "1", "--ctx", "256", "--log-level", "warning"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 600
        while True:
            try:
                if http(url, "GET", "/health")[0] == 200:
                    break
            except OSError:
                pass
            assert p.poll() is None and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
        st, resp = http(url, "POST", "/v1/completions", {"prompt": "The sea is", "max_tokens": 4, "temperature": 0})
        assert st == 200 and resp["usage"]["completion_tokens"] == 4
        p.send_signal(getattr(signal, sig))
        err = p.communicate(timeout=60)[1]
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == (130 if sig == "SIGINT" else -signal.SIGTERM), err
    assert "Traceback" not in err


# --------------------------------------------------------------------------- chat-first `edgellm run`
@pytest.mark.slow
def test_run_is_chat_first_like_llama_cpp(model_path, llama_cpp, engine):
    p = "Write a haiku about the sea"
    # 16 tokens: the same template gives the same text; further on, greedy decoding meets near-ties (here a 0.09
    # logit margin in llama.cpp's own logits at token 25) that int8 activation rounding may settle either way
    run = subprocess.run([sys.executable, "-m", "edgellm.cli", "run", str(model_path), "-p", p, "-n", "16",
                          "--temp", "0", "--threads", "2", "-q"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    llm = llama_cpp.Llama(model_path=str(model_path), n_ctx=512, n_threads=2, verbose=False)
    ref = llm.create_chat_completion(messages=user(p), temperature=0, max_tokens=16)
    prompt_ids = chat_ids(engine, user(p))
    assert [int(t) for t in llm.input_ids[:len(prompt_ids)]] == prompt_ids  # the same template, the same tokens
    llm.close()
    assert run.stdout == ref["choices"][0]["message"]["content"]
    # --no-chat continues the raw text instead; -sys adds a system turn
    raw = subprocess.run([sys.executable, "-m", "edgellm.cli", "run", str(model_path), "-p", p, "-n", "8",
                          "--temp", "0", "--threads", "2", "-q", "--no-chat"], capture_output=True, text=True,
                         timeout=600)
    assert raw.returncode == 0 and raw.stdout != run.stdout[:len(raw.stdout)]

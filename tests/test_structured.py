"""Structured output: every constrained answer checked by a library we did not write (jsonschema, re, lark).

The many-seed sweeps run on a tiny random-weight Llama whose output layer is small and untied, so its free
output is near-uniform garbage over the vocabulary: whatever the mask lets through gets sampled, and a hole in
the constraint would show. A few cases run on the default model (SmolLM2-135M-Instruct)."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest

jsonschema = pytest.importorskip("jsonschema")
lark = pytest.importorskip("lark")

from edgellm.runtime.constraints import compile_constraint, regex_spec, vocabulary  # noqa: E402
from edgellm.runtime.errors import ConstraintError, EdgeLLMError  # noqa: E402
from edgellm.runtime.generate import generate, generate_step, stream_generate  # noqa: E402
from edgellm.runtime.sampling import Sampler, SamplerSettings  # noqa: E402
from edgellm.runtime.tools import chat_completion, plan_tools  # noqa: E402

from tiny_models import write_tiny_llama  # noqa: E402

FULL = dict(temp=1.0, top_k=0, top_p=1.0, min_p=0.0)  # sample from the whole (masked) distribution
SEEDS = range(12)
PROMPTS = ["hello", "The answer is", "{", "<|im_start|>user\nJSON please<|im_end|>\n"]

SCHEMAS = {
    "nested": {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 999},
        "owner": {"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 8},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "minItems": 1, "maxItems": 3}},
            "required": ["name", "tags"], "additionalProperties": False}},
        "required": ["id", "owner"], "additionalProperties": False},
    "array_bounds": {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5},
                     "minItems": 2, "maxItems": 4},
    "enums": {"type": "object", "properties": {
        "color": {"enum": ["red", "green", "blue"]}, "size": {"enum": [1, 2, 3, None]},
        "flag": {"type": "boolean"}}, "required": ["color", "size", "flag"], "additionalProperties": False},
    "numbers": {"type": "object", "properties": {
        "t": {"type": "number", "minimum": -1.5, "maximum": 2.5},
        "p": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
        "k": {"type": "integer", "minimum": 10, "maximum": 20}}, "required": ["t", "p", "k"],
        "additionalProperties": False},
    "optional": {"type": "object", "properties": {
        "a": {"type": "string", "maxLength": 5}, "b": {"type": "integer", "minimum": 0, "maximum": 9},
        "c": {"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 2}},
        "required": ["a"], "additionalProperties": False},
    "pattern_and_anyof": {"type": "object", "properties": {
        "code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
        "v": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 3}, {"type": "string", "maxLength": 2}]}},
        "required": ["code", "v"], "additionalProperties": False},
}

REGEXES = [r"[a-z]{3,8}@[a-z]{2,6}\.(com|org|net)", r"(yes|no|maybe)", r"-?[0-9]{1,4}(\.[0-9]{1,3})?",
           r"[A-Z][a-z]{0,6}( [A-Z][a-z]{0,6}){0,2}", r"\d{3}-\d{4}", r"(ab|cd)+x?"]

# grammars written so that llguidance's Lark and the lark library read them alike
LARK_GRAMMARS = {
    "arith": 'start: expr\nexpr: term (("+" | "-") term)*\nterm: factor (("*" | "/") factor)*\n'
             'factor: NUMBER | "(" expr ")"\nNUMBER: /[0-9]{1,3}/\n',
    "list": 'start: "[" item ("," item)* "]"\nitem: WORD | "[" item "]"\nWORD: /[a-z]{1,5}/\n',
    "config": 'start: pair ("\\n" pair)? ("\\n" pair)?\npair: KEY "=" VALUE\nKEY: /[a-z_]{1,6}/\n'
              'VALUE: /[0-9]{1,3}/ | "true" | "false"\n',
}
# the same language as llama.cpp GBNF and as Lark (the oracle parses the GBNF-constrained output)
GBNF = 'root ::= greet " " name "!"\ngreet ::= "hi" | "hello"\nname ::= [A-Z] [a-z]{1,5}\n'
GBNF_AS_LARK = 'start: GREET " " NAME "!"\nGREET: "hi" | "hello"\nNAME: /[A-Z][a-z]{1,5}/\n'

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                      "parameters": {"type": "object", "properties": {
                                          "city": {"type": "string", "maxLength": 12},
                                          "unit": {"enum": ["c", "f"]}},
                                          "required": ["city"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "add", "description": "Add two integers",
                                      "parameters": {"type": "object", "properties": {
                                          "a": {"type": "integer", "minimum": -100, "maximum": 100},
                                          "b": {"type": "integer", "minimum": -100, "maximum": 100}},
                                          "required": ["a", "b"], "additionalProperties": False}}},
]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Near-uniform garbage: an untied output layer with small weights (logits of std ~0.5)."""
    from edgellm.runtime.engine import Engine
    p = write_tiny_llama(tmp_path_factory.mktemp("structured") / "tiny.gguf", tied=False, scale=0.5, n_ctx=2048,
                         seed=3)
    return Engine(p, n_ctx=2048, threads=2)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("structured_cli") / "tiny.gguf")


def run(engine, prompt, max_tokens=300, **kw):
    rs = list(stream_generate(engine, prompt, max_tokens, **kw))
    return "".join(r.text for r in rs), rs[-1].stats


def sweep(engine, max_tokens=300, seeds=SEEDS, **kw):
    """The texts that ended (finish_reason "eos"), greedy over several prompts, then sampled over many seeds.
    A text cut by max_tokens (a garbage model may loop inside an unbounded number or string) must say so:
    finish_reason "length"; at least 3/4 of the runs must end."""
    runs = [run(engine, p, max_tokens, temp=0.0, **kw) for p in PROMPTS]
    runs += [run(engine, PROMPTS[s % len(PROMPTS)], max_tokens, seed=s, **FULL, **kw) for s in seeds]
    done = [text for text, st in runs if st.finish_reason == "eos"]
    assert all(st.finish_reason == "length" and st.generated_tokens == max_tokens
               for _, st in runs if st.finish_reason != "eos")
    assert len(done) >= 0.75 * len(runs), [(t[:60], st.finish_reason) for t, st in runs]
    return done


# ---------------------------------------------------------------------- the vocabulary llguidance sees
def _check_vocabulary(tok, n_vocab=None):
    v = vocabulary(tok, n_vocab)
    assert v.lltok.vocab_size == v.n_vocab
    for i in range(tok.vocab_size):
        if v.lltok.is_special_token(i):
            assert v.usable[i] == (i in tok.eog_ids)
        else:  # every ordinary token's bytes agree with what edgellm prints for it
            assert v.lltok.decode_bytes([i]) == tok.token_bytes(i, special=False), (i, tok.tokens[i])
            assert v.usable[i]
    return v


def test_vocabulary_tiny_byte_level_bpe(tiny):
    tok = tiny.tokenizer
    v = _check_vocabulary(tok)
    # all but the 3 control tokens (2 of them end tokens) and byte 0xFF (never in UTF-8 text; llguidance's marker
    # of special tokens, so it takes the lone 0xFF token for one)
    assert v.usable.sum() == tok.vocab_size - 3 + 2 - 1 and not v.usable[255]
    # a model whose logits are wider than its vocabulary: the padding is never allowed
    v2 = _check_vocabulary(tok, tok.vocab_size + 5)
    assert not v2.usable[tok.vocab_size:].any()


def test_vocabulary_default_model(engine):
    v = _check_vocabulary(engine.tokenizer, engine.cfg.n_vocab)
    assert v.usable.sum() > 49000


def test_vocabulary_sentencepiece():
    """A SentencePiece vocabulary (spaces as ▁, <0xXX> byte fallback, an unused token)."""
    from edgellm.runtime.tokenizer import Tokenizer
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + \
        ["▁", "a", "b", "c", "▁a", "ab", "▁ab", "▁abc", "é", "<|im_end|>", "[UNUSED]"]
    types = [2, 3, 3] + [6] * 256 + [1] * 9 + [3, 5]
    md = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
          "tokenizer.ggml.scores": [0.0] * 259 + [-float(i) for i in range(11)], "tokenizer.ggml.token_type": types,
          "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}
    tok = Tokenizer.from_metadata(md)
    v = vocabulary(tok)
    unused = tokens.index("[UNUSED]")
    for i in range(len(tokens)):
        if i == unused:
            assert not v.usable[i]  # edgellm prints nothing for it: never allowed
        elif not v.lltok.is_special_token(i):
            assert v.lltok.decode_bytes([i]) == tok.token_bytes(i, special=False)
    c = compile_constraint(tok, regex_spec(r"( ?ab){1,3}"))
    assert c.allowed()[tokens.index("▁ab")] and not c.allowed()[tokens.index("c")]


# ---------------------------------------------------------------------- the sweeps (tiny model)
@pytest.mark.parametrize("name", list(SCHEMAS))
def test_json_schema_sweep(tiny, name):
    schema = SCHEMAS[name]
    jsonschema.Draft202012Validator.check_schema(schema)
    outs = sweep(tiny, json_schema=schema)
    for text in outs:
        jsonschema.validate(json.loads(text), schema)
    assert len(set(outs)) > len(SEEDS) // 2  # the sampled answers differ: the sweep did explore


def test_json_object_sweep(tiny):
    for text in sweep(tiny, json=True, max_tokens=300, seeds=range(8)):
        assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize("regex", REGEXES)
def test_regex_sweep(tiny, regex):
    for text in sweep(tiny, regex=regex, max_tokens=80):
        assert re.fullmatch(regex, text), (regex, text)


@pytest.mark.parametrize("name", list(LARK_GRAMMARS))
def test_lark_grammar_sweep(tiny, name):
    g = LARK_GRAMMARS[name]
    parser = lark.Lark(g, parser="earley")
    for text in sweep(tiny, grammar=g, max_tokens=120):
        parser.parse(text)


def test_gbnf_grammar_sweep(tiny):
    parser = lark.Lark(GBNF_AS_LARK, parser="earley")
    for text in sweep(tiny, grammar=GBNF, max_tokens=40):
        parser.parse(text)


# ---------------------------------------------------------------------- semantics
def test_length_mid_structure_is_not_success(tiny):
    text, st = run(tiny, "hello", 6, json_schema=SCHEMAS["nested"], seed=0, **FULL)
    assert st.finish_reason == "length" and st.generated_tokens == 6
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_end_only_when_the_grammar_accepts(tiny):
    tok = tiny.tokenizer
    c = compile_constraint(tok, regex_spec("ab"), n_vocab=tiny.cfg.n_vocab)
    eog = sorted(tok.eog_ids)
    assert not c.allowed()[eog].any() and not c.is_complete
    c.advance(tok.encode("a", add_bos=False)[0])
    assert not c.allowed()[eog].any() and not c.is_finished
    c.advance(tok.encode("b", add_bos=False)[0])
    assert c.is_complete and c.is_finished
    assert c.allowed()[eog].all() and c.allowed().sum() == len(eog)
    # an optional tail: complete, but not finished (the model may go on or stop)
    c = compile_constraint(tok, regex_spec("ab(cd)?"), n_vocab=tiny.cfg.n_vocab)
    for t in tok.encode("ab", add_bos=False):
        c.advance(t)
    assert c.is_complete and not c.is_finished and c.allowed()[eog].all()
    with pytest.raises(ConstraintError):
        c.advance(tok.encode("x", add_bos=False)[0])


def test_fork_is_independent(tiny):
    tok = tiny.tokenizer
    c = compile_constraint(tok, regex_spec("(ab|ac)d"), n_vocab=tiny.cfg.n_vocab)
    c.advance(tok.encode("a", add_bos=False)[0])
    f = c.fork()
    f.advance(tok.encode("b", add_bos=False)[0])
    c.prefetch()
    c.advance(tok.encode("c", add_bos=False)[0])
    d = tok.encode("d", add_bos=False)[0]
    assert f.allowed()[d] and c.allowed()[d] and f.allowed().sum() == c.allowed().sum() == 1
    g = compile_constraint(tok, regex_spec("(ab|ac)d"), n_vocab=tiny.cfg.n_vocab)
    g.advance(tok.encode("a", add_bos=False)[0])
    assert g.fork().allowed()[tok.encode("b", add_bos=False)[0]]


def test_mask_wins_over_every_sampler_setting():
    """Whatever the penalty, top-k, top-p, min-p and temperature do, the token is one the mask allows."""
    rng = np.random.default_rng(0)
    V = 300
    for trial in range(300):
        logits = (rng.standard_normal(V) * rng.choice([0.1, 1, 10])).astype(np.float32)
        allowed = np.zeros(V, bool)
        allowed[rng.choice(V, size=int(rng.integers(1, 6)), replace=False)] = True
        top = int(np.argmax(logits))
        allowed[top] = False  # the favourite is forbidden
        s = SamplerSettings(temp=float(rng.choice([0, 0.5, 1, 3])), top_k=int(rng.choice([0, 1, 2, 40])),
                            top_p=float(rng.choice([0.1, 0.9, 1.0])), min_p=float(rng.choice([0, 0.05, 0.5])),
                            repeat_penalty=float(rng.choice([1.0, 1.3, 0.5])), seed=trial)
        history = list(rng.choice(V, size=20))
        tok = Sampler(s)(logits, history, allowed)
        assert allowed[tok], (trial, s)
        if s.temp == 0 and s.repeat_penalty == 1.0:
            assert tok == int(np.flatnonzero(allowed)[np.argmax(logits[allowed])])


def test_unconstrained_output_unchanged(tiny):
    """Greedy without a constraint is the plain argmax loop; an all-true mask changes nothing at any setting."""
    ids = tiny.tokenizer.encode("hello world", add_bos=False)
    cache = tiny.new_cache()
    logits, ref = tiny.prefill(ids, cache), []
    for _ in range(20):
        ref.append(int(np.argmax(logits)))
        logits = tiny.decode(ref[-1], cache)
    got = [t for t, _ in generate_step(tiny, ids, Sampler(SamplerSettings(temp=0.0)), 20, cache=tiny.new_cache())]
    assert got == ref
    end = next((i for i, t in enumerate(ref) if tiny.tokenizer.is_eog(t)), len(ref))
    dec = tiny.tokenizer.stream_decoder()
    assert generate(tiny, ids, 20, temp=0.0) == "".join(dec.push(t) for t in ref[:end]) + dec.flush()
    everything = np.ones(tiny.cfg.n_vocab, bool)
    logits = np.random.default_rng(1).standard_normal(tiny.cfg.n_vocab).astype(np.float32)
    for s in (SamplerSettings(temp=0), SamplerSettings(temp=1.0, seed=5), SamplerSettings(temp=0.7, seed=2, top_k=0)):
        a, b = Sampler(s), Sampler(s)
        assert [a(logits, [1, 2]) for _ in range(10)] == [b(logits, [1, 2], everything) for _ in range(10)]


def test_stats_report_mask_time(tiny):
    text, st = run(tiny, "hello", 200, json_schema=SCHEMAS["enums"], seed=1, **FULL)
    assert st.finish_reason == "eos" and st.mask_seconds > 0 and st.mask_ms_per_token > 0
    assert st.mask_wait_seconds <= st.mask_seconds + 0.05  # waiting is at most computing (plus scheduling)


# ---------------------------------------------------------------------- errors
BAD = [
    (dict(json_schema={"type": "strin"}), "invalid json_schema: Invalid type"),
    (dict(json_schema='{"type": '), "json_schema is not valid JSON"),
    (dict(json_schema=[1, 2]), "json_schema must be a JSON object"),
    (dict(json_schema={"type": "integer", "minimum": 5, "maximum": 1}), "minimum (5) is greater than maximum"),
    (dict(json_schema={"type": "array", "uniqueItems": True}), "not supported: [\"uniqueItems\"]"),
    (dict(json_schema={"properties": {"a": {"$ref": "#/nope"}}}), "invalid json_schema"),
    (dict(regex="[a-z"), "invalid regex: "),
    (dict(regex=""), "regex is empty"),
    (dict(grammar='start: "a" b'), "invalid Lark grammar: unknown name"),
    (dict(grammar='root ::= "a" b'), "invalid GBNF grammar: Rule 'b' not found"),
    (dict(grammar='{"type": "object"}'), "not a Lark or GBNF grammar"),
    (dict(regex="a", json=True), "at most one of"),
]


@pytest.mark.parametrize("kw,msg", BAD)
def test_invalid_constraints_raise_before_generation(tiny, kw, msg):
    with pytest.raises(ConstraintError) as e:
        next(stream_generate(tiny, "hello", 10, **kw))
    assert msg in str(e.value) and "\n" not in str(e.value)
    assert isinstance(e.value, EdgeLLMError)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "edgellm.cli", "run", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("args,msg", [
    (["--json-schema", '{"type": "strin"}'], "--json-schema: invalid JSON schema: Invalid type: strin"),
    (["--json-schema", "/no/such/schema.json"], "is neither a file nor JSON text"),
    (["--regex", "(a"], "--regex: invalid regular expression"),
    (["--grammar", "/no/such.lark"], "cannot read it"),
    (["--json", "--regex", "a"], "at most one of --json-schema, --json, --regex and --grammar"),
])
def test_cli_errors(tiny_path, args, msg):
    r = _cli(str(tiny_path), "-p", "hi", "-n", "4", *args)
    assert r.returncode == 1 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgellm: error: ") and msg in lines[0], r.stderr


def test_cli_constrained_run(tiny_path, tmp_path):
    g = tmp_path / "yn.gbnf"
    g.write_text('root ::= ("yes" | "no") "." \n')
    r = _cli(str(tiny_path), "-p", "hi", "--temp", "0", "--grammar", str(g))
    assert r.returncode == 0 and r.stdout in ("yes.", "no.") and "stop: eos" in r.stderr and "mask" in r.stderr
    bad = tmp_path / "bad.gbnf"
    bad.write_text('root ::= "a" missing\n')
    r = _cli(str(tiny_path), "-p", "hi", "--grammar", str(bad))
    assert r.returncode == 1 and r.stderr.strip() == f"edgellm: error: --grammar {bad}: invalid GBNF grammar: " \
                                                     "Rule 'missing' not found"
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps(SCHEMAS["enums"]))
    r = _cli(str(tiny_path), "-p", "hi", "--temp", "0", "-j", str(schema), "-q")
    assert r.returncode == 0 and r.stderr == ""
    jsonschema.validate(json.loads(r.stdout), SCHEMAS["enums"])


# ---------------------------------------------------------------------- tool calls
def _check_calls(msg, names):
    assert msg["role"] == "assistant" and msg["tool_calls"]
    for c in msg["tool_calls"]:
        assert c["type"] == "function" and c["id"].startswith("call_") and c["function"]["name"] in names
        jsonschema.validate(json.loads(c["function"]["arguments"]), PARAMS[c["function"]["name"]])


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_tool_choice_forces_valid_calls(tiny, choice):
    names = {"add"} if isinstance(choice, dict) else set(PARAMS)
    msgs = [{"role": "user", "content": "What is 2 + 3?"}]
    for seed in range(6):
        kw = dict(temp=0.0) if seed == 0 else dict(seed=seed, **FULL)
        r = chat_completion(tiny, msgs, tools=TOOLS, tool_choice=choice, max_tokens=200,
                            parallel_tool_calls=seed % 2 == 1, **kw)
        assert r["finish_reason"] == "tool_calls", r
        _check_calls(r["message"], names)
        if seed % 2 == 0:
            assert len(r["message"]["tool_calls"]) == 1


def test_tool_choice_auto_and_none_shapes(tiny):
    msgs = [{"role": "user", "content": "hi"}]
    for choice in ("auto", "none", None):
        r = chat_completion(tiny, msgs, tools=TOOLS, tool_choice=choice, max_tokens=20, seed=0, **FULL)
        m = r["message"]
        assert r["finish_reason"] in ("stop", "length", "tool_calls")
        if "tool_calls" in m:
            _check_calls(m, set(PARAMS))
        else:
            assert isinstance(m["content"], str) and r["finish_reason"] != "tool_calls"


def test_tool_call_parsing(tiny):
    plan = plan_tools(tiny.tokenizer, TOOLS, "auto")
    assert not plan.in_template  # the tiny template ignores tools: they go into a system message
    assert "get_weather" in plan.prompt(tiny.tokenizer, [{"role": "user", "content": "x"}])
    content, calls = plan.parse('Sure.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>')
    assert content == "Sure." and calls[0]["function"] == {"name": "add", "arguments": '{"a": 1, "b": 2}'}
    content, calls = plan.parse('<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>\n'
                                '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}')
    assert content is None and [c["function"]["name"] for c in calls] == ["add", "get_weather"]
    assert json.loads(calls[1]["function"]["arguments"]) == {"city": "Oslo"}
    assert len({c["id"] for c in calls}) == 2
    _, calls = plan.parse('<tool_call>{"name": "add", "arguments": {"a": 1}}', complete=False)
    assert calls == []  # a block cut by max_tokens is no call
    for text in ['{"name": "delete_all", "arguments": {}}', '<tool_call>{"name": "add", "arguments": [1]}</tool_call>',
                 "<tool_call>{not json}</tool_call>", "plain answer", '{"a": 1}']:
        assert plan.parse(text) == (text, [])
    content, calls = plan.parse('<|python_tag|>{"name": "add", "parameters": {"a": 5, "b": 6}}')
    assert content is None and json.loads(calls[0]["function"]["arguments"]) == {"a": 5, "b": 6}


def test_tools_through_a_template_that_renders_them(tiny):
    """A Llama-3-style template renders the tools and teaches bare JSON calls with "parameters"."""
    tok = tiny.tokenizer
    saved = tok.chat_template
    tok.chat_template = (
        '{% if tools %}<|im_start|>system\nTools: {% for t in tools %}{{ t.function | tojson }}{% endfor %}\n'
        'Call one as {"name": function name, "parameters": dictionary of arguments}<|im_end|>\n{% endif %}'
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    try:
        plan = plan_tools(tok, TOOLS, "required")
        assert plan.in_template and plan.format == "json"
        assert '"name": "add"' in plan.prompt(tok, [{"role": "user", "content": "x"}])
        for seed in range(6):
            r = chat_completion(tiny, [{"role": "user", "content": "x"}], tools=TOOLS, tool_choice="required",
                                max_tokens=150, seed=seed, **FULL)
            assert r["finish_reason"] == "tool_calls"
            _check_calls(r["message"], set(PARAMS))
        # a conversation with a past call and its result renders (arguments given as JSON text, as OpenAI sends)
        msgs = [{"role": "user", "content": "x"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "3"}]
        assert "<|im_start|>tool\n3" in plan.prompt(tok, msgs)
    finally:
        tok.chat_template = saved


def test_past_calls_in_a_template_without_tools(tiny):
    plan = plan_tools(tiny.tokenizer, TOOLS, "auto")
    msgs = [{"role": "user", "content": "2+3?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "5"}]
    p = plan.prompt(tiny.tokenizer, msgs)
    assert '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>' in p
    assert "<|im_start|>user\n<tool_response>\n5\n</tool_response>" in p


@pytest.mark.parametrize("tools,choice,msg", [
    ([], None, "tools must be a non-empty list"),
    ([{"type": "function"}], None, 'tools[0] must be {"type": "function"'),
    ([{"type": "function", "function": {"name": "a b"}}], None, "tools[0].function.name must be"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}], None, '"type": "object"'),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"type": "strin"}}}}}], None, "invalid tools[0].function.parameters: Invalid type"),
    (TOOLS, "sometimes", "tool_choice must be one of"),
    (TOOLS, {"type": "function", "function": {"name": "nope"}}, "not in tools"),
])
def test_invalid_tools(tiny, tools, choice, msg):
    with pytest.raises(ConstraintError) as e:
        plan_tools(tiny.tokenizer, tools, choice)
    assert msg in str(e.value)


# ---------------------------------------------------------------------- the default model
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 30}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 20}, "minItems": 1, "maxItems": 3}},
    "required": ["name", "age", "hobbies"], "additionalProperties": False}


@pytest.mark.slow
def test_default_model_structured(engine):
    prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": "Describe a person as JSON."}])
    for kw in (dict(temp=0.0), dict(temp=1.0, seed=1), dict(temp=1.0, seed=2, top_k=0, top_p=1.0, min_p=0.0)):
        text, st = run(engine, prompt, 150, json_schema=PERSON, **kw)
        assert st.finish_reason == "eos", text
        jsonschema.validate(json.loads(text), PERSON)
    text, st = run(engine, prompt, 40, regex=r"[A-Z][a-z]+ is [0-9]{1,2} years old\.", temp=1.0, seed=3)
    assert st.finish_reason == "eos" and re.fullmatch(r"[A-Z][a-z]+ is [0-9]{1,2} years old\.", text)
    r = chat_completion(engine, [{"role": "user", "content": "What's the weather in Paris?"}], tools=TOOLS,
                        tool_choice="required", max_tokens=80, temp=0.0)
    assert r["finish_reason"] == "tool_calls"
    _check_calls(r["message"], set(PARAMS))
    free = generate(engine, prompt, 30, temp=0.0)
    assert free == generate(engine, prompt, 30, temp=0.0, constraint=None)


# ---------------------------------------------------------------------- the server, read by the openai client
@pytest.fixture(scope="module")
def oai(tiny):
    openai = pytest.importorskip("openai")
    from edgellm.runtime.server import build, start_in_thread
    handle = start_in_thread(build(tiny, "tiny", parallel=4, max_queue=8))
    yield openai, openai.OpenAI(base_url=handle.url + "/v1", api_key="unused", max_retries=0, timeout=600)
    handle.stop()


GARBAGE = dict(temperature=1.0, top_p=1.0, extra_body={"top_k": 0, "min_p": 0.0})  # sample the whole masked vocab


def test_server_response_format(oai):
    openai, client = oai
    msgs = [{"role": "user", "content": "Give me JSON."}]
    rf = {"type": "json_schema", "json_schema": {"name": "nested", "schema": SCHEMAS["nested"], "strict": True}}
    done = 0
    for seed in range(4):
        r = client.chat.completions.create(model="tiny", messages=msgs, response_format=rf, n=2, seed=seed,
                                           max_tokens=300, **GARBAGE)
        for c in r.choices:
            assert c.finish_reason in ("stop", "length")
            if c.finish_reason == "stop":
                jsonschema.validate(json.loads(c.message.content), SCHEMAS["nested"])
                done += 1
    assert done >= 6
    r = client.chat.completions.create(model="tiny", messages=msgs, response_format={"type": "json_object"},
                                       max_tokens=300, temperature=0)
    assert r.choices[0].finish_reason == "stop" and isinstance(json.loads(r.choices[0].message.content), dict)
    # streamed
    parts, reason = [], None
    for chunk in client.chat.completions.create(model="tiny", messages=msgs, response_format=rf, max_tokens=300,
                                                seed=7, stream=True, **GARBAGE):
        for c in chunk.choices:
            parts.append(c.delta.content or "")
            reason = c.finish_reason or reason
    assert reason == "stop"
    jsonschema.validate(json.loads("".join(parts)), SCHEMAS["nested"])


@pytest.mark.parametrize("body,msg", [
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}),
     "Invalid type: strin"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x"}}), "needs"),
    (dict(response_format={"type": "yaml"}), "'yaml' is not supported"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "array", "uniqueItems": True}}}), "not supported"),
    (dict(tools=[{"type": "function", "function": {"name": "bad name"}}]), "tools[0].function.name"),
    (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}), "not in tools"),
    (dict(tool_choice="required"), "tool_choice needs tools"),
])
def test_server_rejects_bad_constraints_and_keeps_serving(oai, body, msg):
    openai, client = oai
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=5,
                                       **body)
    assert e.value.status_code == 400 and msg in str(e.value)
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=3)
    assert r.choices[0].finish_reason in ("stop", "length")


def _valid_call(call, names):
    assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
    jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_server_tool_calls(oai, choice):
    openai, client = oai
    names = {"get_weather"} if isinstance(choice, dict) else set(PARAMS)
    msgs = [{"role": "user", "content": "Weather in Oslo?"}]
    for seed in range(4):
        r = client.chat.completions.create(model="tiny", messages=msgs, tools=TOOLS, tool_choice=choice, seed=seed,
                                           max_tokens=200, parallel_tool_calls=seed % 2 == 1, **GARBAGE)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls" and c.message.tool_calls and c.message.content is None
        for call in c.message.tool_calls:
            _valid_call(call, names)
    # streamed: the client puts the tool-call deltas together
    calls, reason = {}, None
    for chunk in client.chat.completions.create(model="tiny", messages=msgs, tools=TOOLS, tool_choice=choice,
                                                max_tokens=200, seed=11, stream=True, **GARBAGE):
        for ch in chunk.choices:
            reason = ch.finish_reason or reason
            for d in ch.delta.tool_calls or []:
                calls[d.index] = d
    assert reason == "tool_calls" and calls
    for d in calls.values():
        _valid_call(d, names)
    # the conversation goes on with the result
    call = r.choices[0].message.tool_calls[0]
    follow = msgs + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                     {"role": "tool", "tool_call_id": call.id, "content": "12 degrees"}]
    r2 = client.chat.completions.create(model="tiny", messages=follow, tools=TOOLS, max_tokens=20, temperature=0)
    assert r2.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_server_tool_choice_auto_shape(oai):
    openai, client = oai
    for seed in range(3):
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], tools=TOOLS,
                                           seed=seed, max_tokens=30, **GARBAGE)
        c = r.choices[0]
        if c.message.tool_calls:
            assert c.finish_reason == "tool_calls"
            for call in c.message.tool_calls:
                _valid_call(call, set(PARAMS))
        else:
            assert isinstance(c.message.content, str) and c.finish_reason in ("stop", "length")

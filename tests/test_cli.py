"""The command line as a user runs it."""
from __future__ import annotations

import json

from edgellm.runtime.generate import generate
from edgellm.runtime.sampling import SamplerSettings

from test_bad_input import cli


def test_run_greedy_stdout_is_exactly_the_generated_text(engine, model_path):
    r = cli("run", str(model_path), "-p", "The capital of France is", "-n", "12", "--temp", "0", "--threads", "2",
            "--no-chat")
    assert r.returncode == 0, r.stderr
    expected = generate(engine, "The capital of France is", max_tokens=12, sampler=SamplerSettings(temp=0))
    assert r.stdout == expected
    assert "tok/s" in r.stderr


def test_run_chat_and_seeded_sampling_is_reproducible(model_path):
    args = ("run", str(model_path), "-p", "Tell me a joke.", "-n", "16", "--chat", "--temp", "0.9", "--seed", "7")
    a, b = cli(*args), cli(*args)
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout and a.stdout.strip()


def test_inspect_json(model_path):
    r = cli("inspect", str(model_path), "--json")
    info = json.loads(r.stdout)
    assert info["architecture"] == "llama" and info["n_layer"] == 30 and info["vocab_size"] == 49152
    assert info["tensor_types"]["Q4_1"] > 0


def test_perplexity_json(model_path, tmp_path):
    from conftest import DATA
    p = tmp_path / "t.txt"
    p.write_text((DATA / "shakespeare_60k.txt").read_text()[:8000])
    r = cli("perplexity", str(model_path), "--file", str(p), "--ctx", "256", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(out) >= {"ppl", "tokens_scored", "ctx"} and out["ctx"] == 256
    assert 1 < out["ppl"] < 100 and out["tokens_scored"] > 0


def test_chat_keeps_the_cache_between_turns(engine):
    from edgellm.runtime.chat import ChatSession
    s = ChatSession(engine, SamplerSettings(temp=0), max_tokens=8)
    first = list(s.send("Hi! What is your name?"))
    second = list(s.send("And what can you do?"))
    st = second[-1].stats
    assert st.prompt_tokens_cached > first[-1].stats.prompt_tokens  # the first turn was not recomputed


def test_help_explains():
    r = cli("--help")
    assert r.returncode == 0 and "run" in r.stdout and "perplexity" in r.stdout
    r = cli("run", "--help")
    assert "--temp" in r.stdout and "greedy" in r.stdout

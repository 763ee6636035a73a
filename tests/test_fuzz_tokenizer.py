"""Seeded mutations of the tokenizer inside a GGUF (tokenizer.ggml.* metadata: model, pre-tokenizer, tokens, token
types, merges, scores, special ids, flags) and of its chat template, each written into a tiny GGUF and used as a
user would (load, tokenize, prefill, decode, detokenize, render the chat template and tokenize the prompt) in
long-lived workers under an address-space limit (tests/fuzzkit.py). Each either works or raises edgellm's error
(at load or at first use); nothing else, no crash, no kill."""
from __future__ import annotations

import time

import numpy as np
import pytest
from gguf import Keys

import fuzzkit
from fuzzkit import DROP

TK = Keys.Tokenizer
N_FAST = 150   # tokenizer metadata and chat templates each, unmarked
N_SLOW = 900   # each, @slow: 1,050 of each in all

ID_KEYS = (TK.BOS_ID, TK.EOS_ID, TK.PAD_ID, TK.UNK_ID, TK.EOT_ID, TK.EOM_ID, TK.SEP_ID, TK.FIM_PRE_ID)
FLAG_KEYS = (TK.ADD_BOS, TK.ADD_EOS, TK.ADD_PREFIX)
SNIPPETS = ["{{", "}}", "{%", "%}", "{#", "#}", "{% endfor %}", "{% endif %}", "{% if x %}", "{{ x.y.z }}",
            "{{ raise_exception('no') }}", "{{ messages[99]['content'] }}", "{{ 'a' * 100000000 }}", "{{ 10 ** 100000 }}",
            "{% for i in range(100000) %}{{ i }}{% endfor %}", "{{ messages|tojson }}", "{{ strftime_now('%Y') }}",
            "{{ ''.__class__.__mro__ }}", "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "{% include 'x' %}",
            "{{ (messages * 10000000)|length }}", "{% set ns = namespace(a=1) %}{{ ns.a }}", "{{ 1 / 0 }}",
            "{{ bos_token }}", "{{ eos_token * 3 }}", "{% generation %}x{% endgeneration %}", "{% break %}",
            "{{ messages[0].content|upper }}", "\u00e9\u4e2d\U0001F600", "<|im_start|>", "<|im_end|>", "\n", "'", '"']


def _random_text(rng, n: int) -> str:
    alphabet = "ab xyz{}%#-+*/()[]'\"|.<>_\n\u00e9\u4e2d"
    return "".join(alphabet[int(i)] for i in rng.integers(0, len(alphabet), n))


def tokenizer_mutations(md: dict, n: int, seed: int) -> list[dict]:
    """Changes {key: value or DROP} of the tokenizer metadata `md` (values of GGUF's types)."""
    rng = np.random.default_rng(seed)
    tokens, merges = list(md[TK.LIST]), list(md[TK.MERGES])
    types = list(md[TK.TOKEN_TYPE])
    V = len(tokens)
    pick = lambda seq: seq[int(rng.integers(len(seq)))]  # noqa: E731
    ints = [0, 1, V - 1, V, V + 1, 2**31 - 1, 2**32 - 1, -1, -2**31, 2**63 - 1]
    out = []
    for i in range(n):
        r = i % 9
        if r == 0:
            out.append({pick(ID_KEYS): pick(ints + [3.5, "x", True, DROP, [1, 2]])})
        elif r == 1:
            out.append({TK.MODEL: pick(["llama", "bert", "", "gpt2", "rwkv", "t5", 5, DROP]),
                        **({TK.PRE: pick(["llama-bpe", "smollm", "qwen2", "default", "", "nope", 7, DROP])}
                           if rng.random() < 0.5 else {})})
        elif r == 2:  # one token changed
            t = list(tokens)
            j = int(rng.integers(V))
            t[j] = pick(["", tokens[int(rng.integers(V))], _random_text(rng, int(rng.integers(1, 6))), "<|im_end|>",
                         "x" * 5000, "\x00", "<0x41>", " ", "\u2581a"])
            out.append({TK.LIST: t})
        elif r == 3:  # the token list resized or replaced
            k = int(rng.integers(1, 40))
            if rng.random() < 0.3:  # a user-defined token the text holds, past the model's vocabulary
                out.append({TK.LIST: tokens + ["<|new|>"], TK.TOKEN_TYPE: types + [4]})
                continue
            out.append({TK.LIST: pick([tokens[:-k], tokens + [f"extra{j}" for j in range(k)], [1, 2, 3],
                                       tokens[:1], tokens[::-1]])})  # (gguf-py cannot write an empty array)
        elif r == 4:  # token types
            t = list(types)
            j = int(rng.integers(V))
            t[j] = pick([-3, 0, 2, 3, 4, 5, 6, 7, 100, 2**31 - 1])
            out.append({TK.TOKEN_TYPE: pick([t, t, types[:-1], types + [1], ["x"] * V, DROP])})
        elif r == 5:  # one merge changed
            m = list(merges)
            j = int(rng.integers(len(m)))
            a, b = pick(tokens), pick(tokens)
            m[j] = pick([f"{a} {b}", a, "", f"{a} {b} {a}", merges[0], " ", f"{a}  {b}", "zz qq"])
            out.append({TK.MERGES: m})
        elif r == 6:  # merges resized, replaced, duplicated
            k = int(rng.integers(1, max(2, len(merges))))
            out.append({TK.MERGES: pick([merges[:-k], merges + merges[:k], merges[:1], [1, 2], merges[::-1], DROP])})
        elif r == 7:  # scores (SentencePiece) and flags
            sc = [float(x) for x in rng.standard_normal(V)]
            if rng.random() < 0.3:
                sc[int(rng.integers(V))] = float(pick([np.nan, np.inf, -np.inf]))
            ch = {TK.SCORES: pick([sc, sc[:-1], ["x"] * V, DROP])}
            if rng.random() < 0.5:
                ch[TK.MODEL] = "llama"
            out.append(ch)
        else:
            out.append({pick(FLAG_KEYS + ("llama.vocab_size",)): pick([True, False, 2, "x", 0, V - 1, V + 1, 2**31,
                                                                       DROP])})
    return out


def template_mutations(templates: list[str], n: int, seed: int) -> list[dict]:
    """Chat templates edited at random: spans deleted, duplicated or moved, snippets and random text inserted."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        t = templates[i % len(templates)]
        for _ in range(int(rng.integers(1, 4))):
            L = len(t)
            a = int(rng.integers(0, L + 1))
            b = min(L, a + int(rng.integers(1, 12)))
            k = int(rng.integers(5))
            if k == 0:
                t = t[:a] + t[b:]
            elif k == 1:
                t = t[:a] + t[a:b] + t[a:]
            elif k == 2:
                t = t[:a] + SNIPPETS[int(rng.integers(len(SNIPPETS)))] + t[a:]
            elif k == 3:
                t = t[:a] + _random_text(rng, int(rng.integers(1, 8))) + t[b:]
            else:
                c = int(rng.integers(0, L + 1))
                t = t[:c] + t[a:b] + t[c:]
        out.append({TK.CHAT_TEMPLATE: t if i % 50 else pick_odd(rng)})
    return out


def pick_odd(rng):
    return [DROP, "", 5, ["x"], "x" * 100000][int(rng.integers(5))]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """A tiny Llama GGUF converted from a checkpoint with a trained 320-token BPE and a ChatML template."""
    from edgellm.converters import convert_to_gguf
    d = tmp_path_factory.mktemp("fuzz-tok")
    return convert_to_gguf(fuzzkit.write_checkpoint(d / "ck", "llama"), d / "m.gguf", "f32")


@pytest.fixture(scope="module")
def metadata(model_file):
    from edgellm.runtime.gguf_file import GGUFFile
    return GGUFFile(model_file).metadata


@pytest.fixture(scope="module")
def templates(metadata, model_path):
    from edgellm.runtime.gguf_file import GGUFFile
    out = [metadata[TK.CHAT_TEMPLATE]]
    real = GGUFFile(model_path).metadata.get(TK.CHAT_TEMPLATE)  # SmolLM2's own template
    if isinstance(real, str):
        out.append(real)
    return out


@pytest.fixture(scope="module")
def pool(model_file):
    p = fuzzkit.Pool(2, warmup=("fuzzkit:exercise", (str(model_file),)))
    yield p
    p.close()


def run_and_check(pool, src, changes: list[dict], what: str):
    t0 = time.time()
    res = pool.run([("fuzzkit:gguf_meta_mutant", (str(src), ch)) for ch in changes])
    t = fuzzkit.assert_contained(changes, res, show=lambda ch: {k: repr(v)[:80] for k, v in ch.items()})
    print(f"{what}: {len(changes)} mutations in {time.time() - t0:.1f} s: {t.get('ok', 0)} loaded and ran, "
          f"{t.get('error', 0)} clear errors")
    return res


def test_fuzz_tokenizer_fast(pool, model_file, metadata):
    run_and_check(pool, model_file, tokenizer_mutations(metadata, N_FAST, seed=31), "tokenizer")


def test_fuzz_chat_template_fast(pool, model_file, templates):
    run_and_check(pool, model_file, template_mutations(templates, N_FAST, seed=32), "chat template")


@pytest.mark.slow
def test_fuzz_tokenizer_slow(pool, model_file, metadata):
    run_and_check(pool, model_file, tokenizer_mutations(metadata, N_SLOW, seed=41), "tokenizer")


@pytest.mark.slow
def test_fuzz_chat_template_slow(pool, model_file, templates):
    run_and_check(pool, model_file, template_mutations(templates, N_SLOW, seed=42), "chat template")


def test_mutants_through_the_cli(model_file, tmp_path):
    cases = [({TK.CHAT_TEMPLATE: "{% for m in messages %}{{ m.content }"}, ["--chat"], "tokenizer.chat_template"),
             ({TK.CHAT_TEMPLATE: "{{ raise_exception('roles must alternate') }}"}, ["--chat"], "roles must alternate"),
             ({TK.MERGES: ["zz qq"]}, [], "tokenizer.ggml.merges"),
             ({TK.BOS_ID: 10**6}, [], "tokenizer.ggml.bos_token_id")]
    for i, (changes, extra, word) in enumerate(cases):
        p = tmp_path / f"m{i}.gguf"
        fuzzkit.rewrite_gguf(str(model_file), p, changes)
        r = fuzzkit.cli("run", str(p), "-p", "hi", "-n", "2", *extra)
        fuzzkit.assert_clean_error(r, word, str(p))
    # a broken template does not stop raw completion
    r = fuzzkit.cli("run", str(tmp_path / "m0.gguf"), "-p", "hi", "-n", "2", "--temp", "0", "--no-chat")
    assert r.returncode == 0, r.stderr[-2000:]

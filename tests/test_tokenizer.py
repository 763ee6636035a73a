"""The tokenizer against llama.cpp (llama-cpp-python): token ids, text, special and end-of-generation
tokens for the real model's byte-level BPE, for the other pre-tokenizers on the same vocabulary, and
for a SentencePiece vocabulary built here; streaming decode; chat templates; metadata errors."""
from __future__ import annotations

import ctypes
import json
import random
import time
from pathlib import Path

import gguf
import numpy as np
import pytest

from edgellm.runtime.chat_template import CHATML_TEMPLATE, render_chat
from edgellm.runtime.errors import EdgeLLMError, GGUFError, UnsupportedError
from edgellm.runtime.gguf_file import GGUFFile
from edgellm.runtime.tokenizer import SUPPORTED_PRE, Tokenizer

from tiny_models import bytes_to_unicode

K = gguf.Keys.Tokenizer
DATA = Path(__file__).parent / "data"
SHAKESPEARE = (DATA / "shakespeare_60k.txt").read_text(encoding="utf-8")
SMOL_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<reponame>", "<file_sep>", "<jupyter_code>"]


# ---------------------------------------------------------------------- test strings
def _strings(seed: int, n_random: int, specials=SMOL_SPECIALS) -> list[str]:
    """Hand-picked edge cases, then seeded random mixtures of scripts, numbers, whitespace, code,
    contractions, special-token texts and pieces of Shakespeare."""
    fixed = [
        "", " ", "  ", "\n", "\t", "\r\n", "\n\n\n", " \n ", "Hello", " Hello", "Hello ", "  Hello  world  ",
        "Hello world", "hello\tworld\n", "a\u00a0b", "a\u3000b", "x\u2028y\u2029z", "\u200b\ufeffzero width",
        "it's don't we're they've I'm you'll he'd", "IT'S DON'T WE'RE THEY'VE I'M YOU'LL HE'D",
        "'s 't 're 've 'm 'll 'd",
        "rock 'n' roll", "' s", "''", "1", "12", "123", "1234", "12345678901234567890", "3.14159 -42 +7 1e-10 0x1F",
        "1,000,000.00 $5 €9 ¥100", "٣٤٥ ١٢ ²³ ① Ⅻ", "日本語のテキストです。", "中文文本，标点符号！", "한국어 텍스트",
        "Привет, мир!", "Γειά σου Κόσμε", "مرحبا بالعالم", "नमस्ते दुनिया", "café naïve résumé Ångström façade",
        "e\u0301 a\u0308 n\u0303 combining: Z\u0351\u036b\u0343\u036a\u0302", "🤖🚀✨ emoji 👍🏽 👨‍👩‍👧‍👦 🇫🇷",
        "def f(x):\n    return x ** 2  # square\n", "for (int i = 0; i < n; ++i) { a[i] += b[i]; }",
        "<html><body class=\"x\">&amp;</body></html>", "SELECT * FROM t WHERE id = 42;", "x=>{}/**/ !== ;;",
        "    indented\n\tmixed \t tabs\n", "trailing spaces   ", "   leading spaces", "a\n\n\nb\r\n\r\nc",
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n", "<|im_start|><|im_end|>",
        "text<|endoftext|>more", "<|im_start", "|im_end|>", "<|im_start|>system<|im_start|>", " <|im_end|> ",
        "<reponame>x<file_sep>y", SHAKESPEARE[:1000], SHAKESPEARE[20000:23000],
    ]
    rng = random.Random(seed)
    words = "the quick brown fox jumps over lazy dog Thou art thy self thine enemy And What Is".split()
    pools = {
        "cjk": [chr(c) for c in range(0x4E00, 0x4E00 + 400)] + list("のはにをたがでてとしれさあいうえお"),
        "hangul": [chr(c) for c in range(0xAC00, 0xAC00 + 200)],
        "cyr": list("абвгдежзийклмнопрстуфхцчшщыэюяАБВГД"),
        "accent": list("àáâãäåæçèéêëìíîïñòóôõöùúûüýÿĀāĒēŌōŪūŠšŽžŁłØø"),
        "emoji": [chr(c) for c in range(0x1F300, 0x1F300 + 120)] + ["👍🏽", "👨‍💻", "❤️", "🇯🇵"],
        "punct": list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~…—–«»¿¡§¶•"),
        "ws": [" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n", "\t\t", "\u3000", "\u00a0", "    "],
        "contr": ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'LL", "'Re"],
    }
    out = list(fixed)
    for _ in range(n_random):
        parts = []
        for _ in range(rng.randint(1, 10)):
            kind = rng.randrange(12)
            if kind == 0:
                parts.append(rng.choice(words) + rng.choice(pools["contr"]))
            elif kind == 1:
                parts.append(str(rng.randrange(10 ** rng.randint(1, 15))))
            elif kind in (2, 3):
                parts.append(rng.choice(pools["ws"]))
            elif kind == 4:
                parts.append("".join(rng.choice(pools["punct"]) for _ in range(rng.randint(1, 4))))
            elif kind == 5:
                pool = pools[rng.choice(["cjk", "hangul", "cyr", "accent", "emoji"])]
                parts.append("".join(rng.choice(pool) for _ in range(rng.randint(1, 6))))
            elif kind == 6:
                marks = "".join(chr(rng.randint(0x300, 0x36F)) for _ in range(rng.randint(1, 3)))
                parts.append(rng.choice(words) + marks)
            elif kind == 7 and specials:
                parts.append(rng.choice(specials))
            elif kind == 8:
                i = rng.randrange(len(SHAKESPEARE) - 400)
                parts.append(SHAKESPEARE[i:i + rng.randint(1, 400)])
            elif kind == 9:
                parts.append(rng.choice(["x = foo(bar, 3)", "if (a && b) {", "}", "return None", "import numpy as np",
                                         "a[i] = b[j] * 2;", "// TODO", "#include <stdio.h>", "    ", "def g():"]))
            else:
                w = rng.choice(words)
                parts.append(rng.choice([w, w.upper(), w.capitalize(), " " + w]))
        out.append(("" if rng.random() < 0.5 else " ").join(parts))
    return out


STRINGS = _strings(1234, 200)


def _detokenize(llama_cpp, llm, ids, special: bool) -> bytes:
    """llama.cpp's own llama_detokenize (remove_special=False)."""
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    arr = (llama_cpp.llama_token * max(1, len(ids)))(*ids)
    size = 64 + 64 * len(ids)
    buf = ctypes.create_string_buffer(size)
    n = llama_cpp.llama_detokenize(vocab, arr, len(ids), buf, size, False, special)
    assert n >= 0
    return buf.raw[:n]


def _piece(llama_cpp, llm, i: int, special: bool) -> bytes:
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    buf = ctypes.create_string_buffer(256)
    n = llama_cpp.llama_token_to_piece(vocab, i, buf, 256, 0, special)
    assert n >= 0
    return buf.raw[:n]


def _compare_ids(tok, llm, strings, special: bool) -> list:
    diffs = []
    for s in strings:
        ours = tok.encode(s, add_bos=False, parse_special=special)
        ref = llm.tokenize(s.encode("utf-8"), add_bos=False, special=special)
        if ours != ref:
            diffs.append((s, ours, ref))
    return diffs


def _show(diffs) -> str:
    return "\n".join(f"{s!r:.80}: ours {o[:12]} llama.cpp {r[:12]}" for s, o, r in diffs[:5])


# ---------------------------------------------------------------------- the real model (SmolLM2, gpt2 + smollm)
@pytest.fixture(scope="module")
def smol(model_path):
    f = GGUFFile(model_path)
    t0 = time.perf_counter()
    tok = Tokenizer.from_gguf(f)
    build = time.perf_counter() - t0
    print(f"\ntokenizer build for {tok.vocab_size} tokens: {build * 1000:.0f} ms")
    return tok, build, f


@pytest.fixture(scope="module")
def smol_llm(llama_cpp, model_path):
    return llama_cpp.Llama(model_path=str(model_path), vocab_only=True, verbose=False)


def test_smollm_ids_equal_llama_cpp(smol, smol_llm):
    tok = smol[0]
    assert len(STRINGS) >= 250
    diffs = _compare_ids(tok, smol_llm, STRINGS, special=True)
    assert not diffs, f"{len(diffs)}/{len(STRINGS)} strings differ (special=True):\n{_show(diffs)}"
    diffs = _compare_ids(tok, smol_llm, STRINGS, special=False)
    assert not diffs, f"{len(diffs)}/{len(STRINGS)} strings differ (special=False):\n{_show(diffs)}"
    print(f"{len(STRINGS)} strings x (special=True, special=False): all equal to llama.cpp")


def test_smollm_whole_text_and_bos(smol, smol_llm):
    tok = smol[0]
    assert tok.encode(SHAKESPEARE, add_bos=False, parse_special=False) == \
        smol_llm.tokenize(SHAKESPEARE.encode(), add_bos=False, special=False)
    # add_bos=None follows tokenizer.ggml.add_bos_token (False here) like llama.cpp's add_special=True
    for s in ("Hello", "<|im_start|>user\nhi<|im_end|>"):
        assert tok.encode(s, add_bos=None) == smol_llm.tokenize(s.encode(), add_bos=True, special=True)
        assert tok.encode(s, add_bos=True) == [tok.bos_id] + tok.encode(s, add_bos=False)
    assert tok.encode("") == [] and tok.encode("", add_bos=True) == [1]


def test_smollm_decode_equals_llama_cpp(smol, smol_llm, llama_cpp):
    tok = smol[0]
    for s in STRINGS:
        ids = tok.encode(s, add_bos=False)
        assert tok.decode(ids) == s
        for special in (True, False):
            assert tok.decode_bytes(ids, special=special) == _detokenize(llama_cpp, smol_llm, ids, special), repr(s)
        assert tok.decode(ids, special=True).encode() == smol_llm.detokenize(ids, special=True)


def test_smollm_every_token_piece(smol, smol_llm, llama_cpp):
    tok = smol[0]
    for i in range(tok.vocab_size):
        assert tok.token_bytes(i, special=True) == _piece(llama_cpp, smol_llm, i, True), i
        if i < 64:
            assert tok.token_bytes(i, special=False) == _piece(llama_cpp, smol_llm, i, False), i


def test_smollm_special_ids(smol, smol_llm, llama_cpp):
    tok, build, _ = smol
    vocab = llama_cpp.llama_model_get_vocab(smol_llm.model)
    assert tok.vocab_size == 49152 == llama_cpp.llama_vocab_n_tokens(vocab)
    assert (tok.bos_id, tok.eos_id) == (1, 2) == (smol_llm.token_bos(), smol_llm.token_eos())
    assert tok.add_bos is False and tok.kind == "gpt2" and tok.pre == "smollm"
    ref_eog = {i for i in range(tok.vocab_size) if llama_cpp.llama_vocab_is_eog(vocab, i)}
    assert tok.eog_ids == ref_eog == {0, 2, 4}  # <|endoftext|>, <|im_end|>, <reponame> (a FIM repo token)
    assert tok.is_eog(2) and not tok.is_eog(1)
    assert tok.eot_id in tok.eog_ids
    assert build < 1.5, f"tokenizer build took {build:.2f} s"


def test_smollm_stream_decoder_never_splits_a_character(smol):
    tok = smol[0]
    texts = ["🤖 robots 👨‍👩‍👧‍👦 and 日本語 é\u0301", SHAKESPEARE[:300] + " 中文 🇫🇷"] + STRINGS[60:160]
    split_seen = False
    for s in texts:
        ids = tok.encode(s, add_bos=False, parse_special=False)
        dec = tok.stream_decoder()
        pieces = [dec.push(i) for i in ids] + [dec.flush()]
        assert "".join(pieces) == s
        assert all("\ufffd" not in p for p in pieces)
        split_seen |= any(p == "" for p in pieces[:-1])
    assert split_seen  # some character did span several byte tokens
    # control tokens are hidden from generated text unless asked for; incomplete bytes come out on flush
    dec = tok.stream_decoder()
    assert dec.push(2) == "" and tok.stream_decoder(special=True).push(2) == "<|im_end|>"
    ids = tok.encode("🤖", add_bos=False)
    assert len(ids) > 1 and dec.push(ids[0]) == "" and dec.flush() == "\ufffd"


def test_smollm_apply_chat_template(smol, smol_llm, llama_cpp):
    tok, _, f = smol
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "What is 2+2?"}]
    expected = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello! How can I help?<|im_end|>\n"
                "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert tok.apply_chat_template(msgs) == expected
    assert tok.apply_chat_template(msgs, add_generation_prompt=False) == expected[:-len("<|im_start|>assistant\n")]
    # llama-cpp-python's own Jinja2 rendering of the template stored in the file
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    template = smol_llm.metadata["tokenizer.chat_template"]
    assert template == f.metadata[K.CHAT_TEMPLATE]
    ref = Jinja2ChatFormatter(template, eos_token="<|im_end|>", bos_token="<|im_start|>")(messages=msgs).prompt
    assert ref == expected
    ids = tok.encode(expected)
    assert ids == smol_llm.tokenize(expected.encode(), add_bos=True, special=True)
    assert ids[0] == 1 and ids.count(1) == 5 and ids.count(2) == 4


# ---------------------------------------------------------------------- other pre-tokenizers on the same vocabulary
def _write_bpe_variant(path: Path, src: dict, pre: str) -> Path:
    """The real model's vocabulary and merges under another tokenizer.ggml.pre, plus multi-digit
    tokens (SmolLM2 has none, so digit grouping would not show) and a token no merge reaches
    (Llama-3's ignore_merges takes it whole). llama.cpp's vocab_only load needs the
    hyper-parameters and the vocabulary, not the tensors."""
    tokens, types, merges = list(src[K.LIST]), list(src[K.TOKEN_TYPE]), list(src[K.MERGES])
    for a in "0123456789":
        for b in "0123456789":
            tokens.append(a + b)
            merges.append(f"{a} {b}")
    for t in ("123", "000", "999", "100", "250", "314", "2024"):
        tokens.append(t)
        merges.append(f"{t[:2]} {t[2:]}")
    tokens.append("Ġquickbrown")  # no merge builds it
    types += [1] * (len(tokens) - len(types))
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("pre", ["default", "gpt-2", "llama-bpe", "qwen2", "starcoder"])
def test_pre_tokenizer_matches_llama_cpp(pre, smol, llama_cpp, tmp_path):
    assert pre in SUPPORTED_PRE
    p = _write_bpe_variant(tmp_path / f"{pre}.gguf", smol[2].metadata, pre)
    tok = Tokenizer.from_gguf(GGUFFile(p))
    llm = llama_cpp.Llama(model_path=str(p), vocab_only=True, verbose=False)
    strings = STRINGS[::2] + ["the quickbrown fox 2024 12345 1000000 3.14159 00700"]
    diffs = _compare_ids(tok, llm, strings, special=True) + _compare_ids(tok, llm, strings[:40], special=False)
    assert not diffs, f"pre={pre}: {len(diffs)} strings differ:\n{_show(diffs)}"
    assert tok.add_bos == (pre == "llama-bpe") == bool(llama_cpp.llama_vocab_get_add_bos(
        llama_cpp.llama_model_get_vocab(llm.model)))
    for s in strings[:60]:
        ids = tok.encode(s, add_bos=False)
        assert tok.decode_bytes(ids) == _detokenize(llama_cpp, llm, ids, True), (pre, s)


# ---------------------------------------------------------------------- SentencePiece (tokenizer.ggml.model = llama)
SPM_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|user|>", "<s>", "</s>"]


def _spm_vocab() -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-style vocabulary: <unk> <s> </s>, the 256 byte tokens, characters, then the
    pieces of a BPE trained on Shakespeare (score = -merge rank, as in Llama's tokenizer.model), a
    few whitespace / CJK / accented pieces, one user-defined and two control tokens."""
    from tokenizers import SentencePieceBPETokenizer
    sp = SentencePieceBPETokenizer(replacement="\u2581", add_prefix_space=True)
    sp.train_from_iterator(SHAKESPEARE.splitlines(), vocab_size=1200, min_frequency=2, show_progress=False)
    model = json.loads(sp.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model["merges"]]
    merged = {a + b for a, b in merges}
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    scores = [0.0] * len(tokens)
    seen = set(tokens)

    def add(t, score, typ=1):
        if t not in seen:
            seen.add(t)
            tokens.append(t)
            scores.append(score)
            types.append(typ)
    for i, (t, _) in enumerate(sorted(model["vocab"].items(), key=lambda kv: kv[1])):
        if t not in merged:
            add(t, -1e5 - i)  # the characters
    for r, (a, b) in enumerate(merges):
        add(a + b, -float(r + 1))
    for t, s in [("▁▁", -40.5), ("▁▁▁▁", -80.5), ("日", -2e5), ("本", -2e5 - 1), ("日本", -30.5), ("é", -2e5 - 2),
                 ("▁caf", -900.5), ("▁café", -901.5), ("\t", -2e5 - 3)]:
        add(t, s)
    add("<|user|>", 0.0, 4)
    add("<|im_start|>", 0.0, 3)
    add("<|im_end|>", 0.0, 3)
    return tokens, scores, types


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
    """A 1-layer random-weight Llama GGUF with the SentencePiece vocabulary."""
    from gguf import MODEL_TENSOR as T, TENSOR_NAMES
    tokens, scores, types = _spm_vocab()
    V, E, H, F = len(tokens), 16, 2, 32
    path = tmp_path_factory.mktemp("spm") / "spm.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(E)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(H)
    w.add_rope_dimension_count(E // H)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(V)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    rng = np.random.default_rng(0)

    def name(t, i=None):
        return TENSOR_NAMES[t].format(bid=i) + ".weight"

    def mat(r, c):
        return (rng.standard_normal((r, c)) * 0.1).astype(np.float32)
    w.add_tensor(name(T.TOKEN_EMBD), mat(V, E))
    w.add_tensor(name(T.OUTPUT_NORM), np.ones(E, np.float32))
    w.add_tensor(name(T.ATTN_NORM, 0), np.ones(E, np.float32))
    for t in (T.ATTN_Q, T.ATTN_K, T.ATTN_V, T.ATTN_OUT):
        w.add_tensor(name(t, 0), mat(E, E))
    w.add_tensor(name(T.FFN_NORM, 0), np.ones(E, np.float32))
    w.add_tensor(name(T.FFN_GATE, 0), mat(F, E))
    w.add_tensor(name(T.FFN_UP, 0), mat(F, E))
    w.add_tensor(name(T.FFN_DOWN, 0), mat(E, F))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def spm(spm_path, llama_cpp):
    return (Tokenizer.from_gguf(GGUFFile(spm_path)),
            llama_cpp.Llama(model_path=str(spm_path), vocab_only=True, verbose=False))


SPM_STRINGS = _strings(99, 120, SPM_SPECIALS) + ["café 日本 日本語", "▁already escaped", "<s>hi</s>", "x<|user|>y"]


def test_spm_ids_equal_llama_cpp(spm):
    tok, llm = spm
    assert tok.kind == "llama" and tok.add_bos and tok.add_space_prefix
    diffs = _compare_ids(tok, llm, SPM_STRINGS, special=True) + _compare_ids(tok, llm, SPM_STRINGS, special=False)
    assert not diffs, f"{len(diffs)} SentencePiece strings differ:\n{_show(diffs)}"
    for s in SPM_STRINGS[::4]:  # BOS per metadata (SentencePiece default: add it)
        assert tok.encode(s) == llm.tokenize(s.encode(), add_bos=True, special=True)
    assert tok.encode(SHAKESPEARE[:8000], add_bos=False) == llm.tokenize(SHAKESPEARE[:8000].encode(), add_bos=False)
    print(f"{len(SPM_STRINGS)} SentencePiece strings x (special=True, special=False): all equal to llama.cpp")


def test_spm_decode_equals_llama_cpp(spm, llama_cpp):
    tok, llm = spm
    for i in range(tok.vocab_size):
        for special in (True, False):
            assert tok.token_bytes(i, special) == _piece(llama_cpp, llm, i, special), (i, tok.tokens[i])
    for s in SPM_STRINGS:
        ids = tok.encode(s, add_bos=False)
        for special in (True, False):
            assert tok.decode_bytes(ids, special) == _detokenize(llama_cpp, llm, ids, special), repr(s)
        # not invertible: a literal "▁", and the space llama.cpp puts after a special token's text
        if "\u2581" not in s and not any(t in s for t in SPM_SPECIALS):
            assert tok.decode(ids) == s
    ids = tok.encode("日本語 🤖", add_bos=False)
    assert tok.tokens[ids[-1]].startswith("<0x")  # byte fallback for characters outside the vocabulary
    assert "".join(map(tok.stream_decoder().push, ids)) == " 日本語 🤖"


# ---------------------------------------------------------------------- metadata errors
def _tiny_md(**over) -> dict:
    b2u = bytes_to_unicode()
    tokens = [b2u[b] for b in range(256)] + ["Ġt", "he", "Ġthe", "<|endoftext|>"]
    md = {K.MODEL: "gpt2", K.PRE: "gpt-2", K.LIST: tokens, K.TOKEN_TYPE: [1] * 259 + [3],
          K.MERGES: ["Ġ t", "h e", "Ġt he"], K.BOS_ID: 259, K.EOS_ID: 259}
    md.update(over)
    return {k: v for k, v in md.items() if v is not None}


def test_tiny_vocab_and_errors():
    tok = Tokenizer.from_metadata(_tiny_md())
    assert tok.encode(" the<|endoftext|>") == [258, 259] and tok.eog_ids == {259}
    # no BOS id in the metadata: llama.cpp's default for BPE vocabularies (id 11) is kept
    assert Tokenizer.from_metadata(_tiny_md(**{K.BOS_ID: None})).bos_id == 11
    assert tok.decode([258, 259], special=False) == " the"
    with pytest.raises(UnsupportedError, match="'no-such-pre'"):
        Tokenizer.from_metadata(_tiny_md(**{K.PRE: "no-such-pre"}))
    with pytest.raises(UnsupportedError, match="'bert'"):
        Tokenizer.from_metadata(_tiny_md(**{K.MODEL: "bert"}))
    bad = {
        "no model": {K.MODEL: None},
        "no tokens": {K.LIST: None},
        "token types": {K.TOKEN_TYPE: [1] * 10},
        "scores": {K.SCORES: [0.0] * 5},
        "bos range": {K.BOS_ID: 260},
        "eos range": {K.EOS_ID: 10 ** 6},
        "merge format": {K.MERGES: ["Ġt"]},
        "merge token": {K.MERGES: ["Ġ t", "x y"]},
        "merge result": {K.MERGES: ["h e", "t h"]},
        "no merges": {K.MERGES: None},
        "duplicate": {K.LIST: [bytes_to_unicode()[b] for b in range(256)] + ["Ġt", "he", "he", "<|endoftext|>"]},
        "type of types": {K.TOKEN_TYPE: "x"},
    }
    for what, over in bad.items():
        with pytest.raises(GGUFError) as e:
            Tokenizer.from_metadata(_tiny_md(**over))
        assert "\n" not in str(e.value), what


# ---------------------------------------------------------------------- chat templates
def test_render_chat_like_transformers():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    chatml = render_chat(None, msgs)
    assert chatml == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                      "<|im_start|>assistant\n") == render_chat(CHATML_TEMPLATE, msgs)
    # trim_blocks / lstrip_blocks, bos_token, tojson without escaping, loop controls, generation tags
    t = ("{{ bos_token }}\n  {% for m in messages %}\n    {% if m.role == 'system' %}{% continue %}{% endif %}"
         "{{ m.content | tojson }}|{% generation %}G{% endgeneration %}\n  {% endfor %}\n{{ eos_token }}")
    assert render_chat(t, msgs + [{"role": "user", "content": "é<b>"}], bos_token="<s>", eos_token="</s>") == \
        '<s>\n"Hi"|G"é<b>"|G</s>'  # (trim_blocks trims after block tags only, as transformers renders it)
    assert render_chat("{{ strftime_now('%Y') }}", []) == time.strftime("%Y")
    assert render_chat("{{ enable_thinking }}", [], enable_thinking=False) == "False"
    errors = ["{% if %}", "{{ raise_exception('Conversation roles must alternate user/assistant') }}",
              "{{ messages[0].content + 1 }}", "{{ ''.__class__.__mro__ }}"]
    for t in errors:
        with pytest.raises(EdgeLLMError) as e:
            render_chat(t, msgs)
        assert "\n" not in str(e.value)
    with pytest.raises(EdgeLLMError, match="roles must alternate"):
        render_chat(errors[1], msgs)

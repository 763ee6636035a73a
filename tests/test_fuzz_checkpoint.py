"""Seeded mutations of Hugging Face checkpoints (safetensors + config.json + tokenizer files), Llama and BitNet,
converted to GGUF in long-lived workers under an address-space limit (tests/fuzzkit.py). Each mutation either
converts — and then the output loads and runs, and its logits equal the pristine checkpoint's whenever the
mutation did not touch what they depend on — or raises edgellm's error. Nothing else: no other exception, no
crash, no kill, no allocation past the limit.

A config value that disagrees with the tensors (a head count, a size, the layer count, tied embeddings) must
be an error: a mutated shape key that converts has to give the pristine logits."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

import fuzzkit
from fuzzkit import DROP

N_FAST = 160   # per kind (llama, bitnet), unmarked; 60 for the transformers 5 dialect
N_SLOW = 440   # per kind, @slow; 200 for the dialect: 1,460 checkpoint mutations in all

# config.json keys whose values fix the tensors' shapes: a changed value must be an error or mean the same model
SHAPE_KEYS = {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "head_dim", "vocab_size", "tie_word_embeddings", "architectures", "attention_bias", "mlp_bias"}
# keys the logits depend on in other ways (a valid new value may change them)
MATH_KEYS = {"rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters", "hidden_act", "quantization_config"}
VALUES = [0, -1, 10**12, 3.5, "x", None, DROP, True, False, -3.5, [], {}, [1, 2], 2**64, 1e308, float("nan"),
          float("inf"), 1, 2, 3, 7, 64, 4096, "", "llama3", "linear", "default"]


def _leaf_paths(d: dict, prefix=()) -> list[tuple]:
    out = []
    for k, v in d.items():
        out.append(prefix + (k,))
        if isinstance(v, dict):
            out += _leaf_paths(v, prefix + (k,))
    return out


def _plausible(v):
    """A wrong value of the right kind (what a hand-edited or mismatched config holds)."""
    if isinstance(v, bool):
        return not v
    if isinstance(v, int):
        return [v + 1, v - 1, v * 2, max(1, v // 2), v + 4][hash(v) % 5]
    if isinstance(v, float):
        return v * 2
    if isinstance(v, str):
        return v + "_x" if v else "x"
    if isinstance(v, list):
        return [_plausible(x) for x in v] or [1]
    return v


def mutations(src, n: int, seed: int) -> list[tuple]:
    rng = np.random.default_rng(seed)
    cfg = json.loads((src / "config.json").read_text())
    paths = _leaf_paths(cfg)
    hlen, header = fuzzkit.read_safetensors_header(src / "model.safetensors")
    size = (src / "model.safetensors").stat().st_size
    names = [k for k in header if k != "__metadata__"]
    tok_cfg_paths = _leaf_paths(json.loads((src / "tokenizer_config.json").read_text()))
    vocab = list(json.loads((src / "tokenizer.json").read_text())["model"]["vocab"])
    pick = lambda seq: seq[int(rng.integers(len(seq)))]  # noqa: E731
    out = []
    for i in range(n):
        r = i % 10
        if r == 0:  # a config value set to an odd value (or dropped)
            out.append(("json", "config.json", pick(paths), pick(VALUES)))
        elif r == 1:  # a config value set to a plausible wrong value
            p = pick(paths)
            v = cfg
            for k in p:
                v = v[k]
            out.append(("json", "config.json", p, _plausible(v)))
        elif r == 2:  # random bytes in the safetensors header (JSON text, or the length prefix)
            off = int(rng.integers(0, 8 + hlen)) if rng.random() < 0.9 else int(rng.integers(0, 8))
            out.append(("bytes", "model.safetensors", off, bytes(rng.integers(0, 256, int(rng.integers(1, 9)),
                                                                                  dtype=np.uint8))))
        elif r == 3:  # a digit of the header changed (offsets and shapes that still parse)
            text = (src / "model.safetensors").read_bytes()[8:8 + hlen]
            digits = [j for j, c in enumerate(text) if chr(c).isdigit()]
            out.append(("bytes", "model.safetensors", 8 + pick(digits), str(int(rng.integers(0, 10))).encode()))
        elif r in (4, 5):  # one field of one header entry
            name = pick(names)
            e = header[name]
            field = pick(["dtype", "shape", "data_offsets", None])
            if field is None:  # the entry dropped, or a new one added
                out.append(("header", None, name, DROP) if rng.random() < 0.5 else
                           ("header", None, "model.layers.0.extra.weight", dict(e)))
                continue
            if field == "dtype":
                v = pick(["F16", "BF16", "F32", "F64", "I64", "U8", "Q4", "", 3, None, DROP])
            elif field == "shape":
                s = list(e["shape"])
                v = pick([s[::-1], s + [1], s[:-1], [s[0] * 2] + s[1:], [-1] + s[1:], ["x"] + s[1:], [], [0],
                          [2**40, 2**40], 5, None, DROP, [1.5] + s[1:]])
            else:
                a, b = e["data_offsets"]
                v = pick([[a + 4, b + 4], [a, b + 4], [a - 4, b], [b, a], [a, 2**63], [-1, b], [a], ["0", b],
                          None, DROP, [0, b - a], [a, size]])
            out.append(("header", name, field, v))
        elif r == 6:  # truncated
            cut = int(rng.integers(0, size)) if rng.random() < 0.7 else int(rng.integers(0, 8 + hlen + 64))
            out.append(("truncate", "model.safetensors", cut))
        elif r == 7:  # tensor data bytes (the values change: the logits may)
            off = int(rng.integers(8 + hlen, size))
            out.append(("bytes", "model.safetensors", off, bytes(rng.integers(0, 256, int(rng.integers(1, 5)),
                                                                                  dtype=np.uint8))))
        elif r == 8:  # tokenizer files: values of tokenizer_config.json, vocabulary and merges of tokenizer.json
            k = int(rng.integers(5))
            if k == 0:
                out.append(("json", "tokenizer_config.json", pick(tok_cfg_paths), pick(VALUES)))
            elif k == 1:
                out.append(("json", "tokenizer_config.json", ("chat_template",),
                            pick(["{% for m in messages %}{{ m['content'] }", "{{ raise_exception('no') }}",
                                  "{% if %}", "{{ 1 / 0 }}", "{{ messages[99] }}", 42, ["x"], [{"name": "default"}],
                                  [{"name": "default", "template": "{{ x.y.z }}"}], "{{ 'a' * 10**10 }}"])))
            elif k == 2:
                out.append(("json", "tokenizer.json", ("model", "vocab", pick(vocab)), pick(VALUES)))
            elif k == 3:
                out.append(("json", "tokenizer.json", ("model", "merges", int(rng.integers(50))),
                            pick(VALUES + ["a b c", "zz qq", ["a"], ["a", "b", "c"]])))
            else:
                out.append(("json", "tokenizer.json", pick([("added_tokens", 0, "id"), ("added_tokens", 0, "content"),
                                                            ("added_tokens",), ("model", "type"), ("pre_tokenizer",),
                                                            ("model", "vocab"), ("model", "merges"), ("model",)]),
                            pick(VALUES)))
        else:  # raw bytes of a JSON file
            name = pick(["config.json", "tokenizer_config.json", "tokenizer.json"])
            fsize = (src / name).stat().st_size
            out.append(("bytes", name, int(rng.integers(0, fsize)), bytes(rng.integers(0, 256, int(rng.integers(1, 4)),
                                                                                           dtype=np.uint8))))
    return out


def must_keep_logits(m: tuple, r: dict, data_start: int) -> bool:
    """A mutation that converted must give the pristine logits unless it changed tensor data, a tensor entry of
    the header, or a config value the logits depend on other than through the shapes (shape keys included: a
    changed shape key that converts must mean the same model)."""
    if m[0] in ("bytes", "truncate") and m[1] == "model.safetensors" and m[2] >= data_start:
        return False  # the tensor data changed
    return r["tensors_same"] and not set(r["config_changed"]) & MATH_KEYS


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    base = tmp_path_factory.mktemp("fuzz-ckpt")
    return {"llama": fuzzkit.write_checkpoint(base / "llama", "llama"),
            "bitnet": fuzzkit.write_checkpoint(base / "bitnet", "bitnet"),
            "llama-tf5": fuzzkit.write_checkpoint(base / "llama-tf5", "llama", dialect="rope_parameters")}


@pytest.fixture(scope="module")
def pool(checkpoints):
    p = fuzzkit.Pool(2, warmup=("fuzzkit:convert_mutant", (str(checkpoints["llama"]), ("json", "config.json",
                                                                                        ("use_cache",), False))))
    yield p
    p.close()


def run_and_check(pool, src, muts, outtype):
    t0 = time.time()
    res = pool.run([("fuzzkit:convert_mutant", (str(src), m, outtype)) for m in muts])
    t = fuzzkit.assert_contained(muts, res)
    hlen, _ = fuzzkit.read_safetensors_header(src / "model.safetensors")
    wrong = [(m, r[1]) for m, r in zip(muts, res) if r[0] == "ok" and must_keep_logits(m, r[1], 8 + hlen)
             and not r[1]["same"]]
    assert not wrong, f"converted with different logits: {wrong[:5]}"
    print(f"{src.name} {outtype}: {len(muts)} mutations in {time.time() - t0:.1f} s: {t.get('ok', 0)} converted "
          f"({sum(1 for r in res if r[0] == 'ok' and r[1]['same'])} with the pristine logits), "
          f"{t.get('error', 0)} clear errors")
    return res


SEEDS = {"llama": 11, "bitnet": 12, "llama-tf5": 13}


def test_config_dialects_give_the_same_file(checkpoints, tmp_path):
    """transformers 5's rope_parameters (theta and llama3 scaling inside) and Llama-3.2's rope_theta +
    rope_scaling describe the same model: the same logits, bit for bit."""
    from edgellm.converters import convert_to_gguf
    a = fuzzkit.engine_logits(convert_to_gguf(checkpoints["llama"], tmp_path / "a.gguf", "f32"))
    b = fuzzkit.engine_logits(convert_to_gguf(checkpoints["llama-tf5"], tmp_path / "b.gguf", "f32"))
    assert np.array_equal(a, b)


@pytest.mark.parametrize("kind", ["llama", "bitnet", "llama-tf5"])
def test_fuzz_checkpoint_fast(checkpoints, pool, kind):
    src = checkpoints[kind]
    run_and_check(pool, src, mutations(src, N_FAST if kind != "llama-tf5" else 60, seed=SEEDS[kind]), "f32")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama", "bitnet", "llama-tf5"])
def test_fuzz_checkpoint_slow(checkpoints, pool, kind):
    src = checkpoints[kind]
    muts = mutations(src, N_SLOW if kind != "llama-tf5" else 200, seed=SEEDS[kind] + 10)
    # most as f32; some quantized (q8_0; ternary for BitNet) to cover the quantizers' input checks
    q = "tq2_0" if kind == "bitnet" else "q8_0"
    run_and_check(pool, src, muts[: len(muts) * 3 // 4], "f32")
    run_and_check(pool, src, muts[len(muts) * 3 // 4:], q)


def test_mutants_through_the_cli(checkpoints, tmp_path):
    """The issue's escapes, as a user meets them: one `edgellm: error:` line naming the file and the field."""
    import shutil
    cases = [(("header", "model.layers.0.self_attn.v_proj.weight", "data_offsets", DROP), "data_offsets"),
             (("json", "config.json", ("num_attention_heads",), "x"), "num_attention_heads"),
             (("json", "config.json", ("hidden_size",), 32), "hidden_size"),
             (("truncate", "model.safetensors", 200_000), "model.safetensors"),
             (("json", "config.json", ("num_hidden_layers",), 10**12), "num_hidden_layers")]
    for i, (m, word) in enumerate(cases):
        src = tmp_path / f"m{i}"
        shutil.copytree(checkpoints["llama"], src)
        fuzzkit.apply_mutation(src, m)
        r = fuzzkit.cli("convert", str(src), "-o", str(tmp_path / f"o{i}.gguf"))
        fuzzkit.assert_clean_error(r, word)
        assert not (tmp_path / f"o{i}.gguf").exists()


def index_mutations(src, n: int, seed: int) -> list[tuple]:
    """Mutations of a sharded checkpoint: its index (weight_map entries, shard names), a shard removed or cut."""
    rng = np.random.default_rng(seed)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    names, shards = sorted(index["weight_map"]), sorted(set(index["weight_map"].values()))
    pick = lambda seq: seq[int(rng.integers(len(seq)))]  # noqa: E731
    out = []
    for i in range(n):
        r = i % 4
        if r == 0:
            out.append(("json", "model.safetensors.index.json", ("weight_map", pick(names)),
                        pick(shards + ["../config.json", "missing.safetensors", "", 5, None, DROP])))
        elif r == 1:
            out.append(("json", "model.safetensors.index.json", ("weight_map", "model.extra.weight"), pick(shards)))
        elif r == 2:
            out.append(("json", "model.safetensors.index.json", pick([("weight_map",), ("metadata",)]),
                        pick(VALUES)))
        else:
            shard = pick(shards)
            out.append(pick([("remove", shard), ("truncate", shard, int(rng.integers(0, (src / shard).stat().st_size)))]))
    return out


def test_fuzz_sharded_checkpoint(checkpoints, pool, tmp_path):
    src = fuzzkit.shard_checkpoint(checkpoints["llama"], tmp_path / "sharded")
    from edgellm.converters import convert_to_gguf
    whole = fuzzkit.engine_logits(convert_to_gguf(checkpoints["llama"], tmp_path / "a.gguf", "f32"))
    assert np.array_equal(fuzzkit.engine_logits(convert_to_gguf(src, tmp_path / "b.gguf", "f32")), whole)
    muts = index_mutations(src, 60, seed=14)
    res = pool.run([("fuzzkit:convert_mutant", (str(src), m, "f32")) for m in muts])
    bad = [(m, r) for m, r in zip(muts, res) if r[0] not in ("ok", "error")]
    assert not bad, bad[:5]
    # an index entry that still names the right shard (or metadata) changes nothing
    assert all(r[1]["same"] for m, r in zip(muts, res) if r[0] == "ok")
    print(f"sharded: {len(muts)} mutations: {fuzzkit.tally(res)}")

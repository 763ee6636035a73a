"""Shared pieces of the fuzz tests (tests/test_fuzz_*.py): tiny inputs of every format, written with NumPy and the
`tokenizers` library only (no torch), and a pool of long-lived worker processes that run mutations in-process
under an address-space limit (RLIMIT_AS), so that a blow-up is a failed allocation the test sees, a crash or a
kill is noticed and reported, and the test process itself is never limited.

A job is a call `module:function(*args)` in a worker; the worker answers with one of
    ("ok", value)                    the call returned
    ("error", message)               it raised edgellm's EdgeLLMError (the clear, one-line error)
    ("other", type, message, tb)     it raised anything else (a bug the tests report)
and the pool adds ("killed", returncode) when the worker died on the job (then restarts it).
"""
from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from edgellm.bench.make_checkpoints import pack_ternary
from edgellm.runtime.memory import _vm_size

DATA = Path(__file__).parent / "data"
TESTS = Path(__file__).parent
HEADROOM = 2 << 30  # address space a worker may add after its warm-up: any blow-up crosses it

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# the models' shapes: Llama-3.2's structure (GQA 4:1, head_dim given, llama3 rope scaling, tied) and BitNet
# b1.58 2B4T's (packed ternary projections with weight_scale, sub-norms, ReLU^2), tiny
LLAMA = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64, intermediate_size=96,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=16, vocab_size=320,
             max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
             hidden_act="silu", attention_bias=False, mlp_bias=False, bos_token_id=0, eos_token_id=2,
             rope_scaling=dict(factor=32.0, high_freq_factor=4.0, low_freq_factor=1.0,
                               original_max_position_embeddings=8192, rope_type="llama3"),
             torch_dtype="float32", initializer_range=0.02, use_cache=True)
BITNET = dict(architectures=["BitNetForCausalLM"], model_type="bitnet", hidden_size=256, intermediate_size=512,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, vocab_size=320,
              max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
              hidden_act="relu2", attention_bias=False, bos_token_id=0, eos_token_id=2,
              quantization_config=dict(quant_method="bitnet", linear_class="bitlinear", quantization_mode="offline"),
              torch_dtype="bfloat16", initializer_range=0.02, use_cache=True)
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ---------------------------------------------------------------------------- tiny inputs
def write_tokenizer(out: Path, vocab_size: int = 320) -> int:
    """A byte-level BPE (GPT-2 pre-tokenizer) trained on a little Shakespeare, ChatML specials, a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = (DATA / "shakespeare_60k.txt").read_text(encoding="utf-8")[:20000]
    tr = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text[i:i + 2000] for i in range(0, len(text), 2000)], tr)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>",
        "add_bos_token": False, "model_max_length": 1024, "chat_template": CHAT_TEMPLATE}, indent=1))
    return tok.get_vocab_size()


def _bf16(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (round to nearest even) as uint16."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def _save_safetensors(path: Path, tensors: dict[str, tuple[str, np.ndarray]]) -> None:
    """Write {name: (dtype name, array)} as safetensors (bf16 given as its uint16 bits)."""
    header, blobs, off = {}, [], 0
    for name, (dt, a) in tensors.items():
        b = np.ascontiguousarray(a).tobytes()
        header[name] = {"dtype": dt, "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    header["__metadata__"] = {"format": "pt"}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def write_checkpoint(out: Path, kind: str = "llama", seed: int = 0, dialect: str = "rope_scaling") -> Path:
    """A tiny random HF checkpoint: kind "llama" (f32 tensors) or "bitnet" (bf16 tensors, packed ternary
    projections with their weight_scale). dialect "rope_parameters" writes transformers 5's config."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = dict(LLAMA if kind == "llama" else BITNET)
    write_tokenizer(out, cfg["vocab_size"])
    rng = np.random.default_rng(seed)
    d, ff, L, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    H, Hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or d // H
    dt = "F32" if kind == "llama" else "BF16"

    def t(a):
        a = np.asarray(a, dtype=np.float32)
        return (dt, a if dt == "F32" else _bf16(a))

    def norm(n):
        return t(1 + 0.1 * rng.standard_normal(n))

    def mat(r, c):
        return (rng.standard_normal((r, c)) / np.sqrt(c)).astype(np.float32)

    ts = {"model.embed_tokens.weight": t(rng.standard_normal((V, d)) * 0.5), "model.norm.weight": norm(d)}
    shapes = {"q_proj": (H * hd, d), "k_proj": (Hkv * hd, d), "v_proj": (Hkv * hd, d), "o_proj": (d, H * hd),
              "gate_proj": (ff, d), "up_proj": (ff, d), "down_proj": (d, ff)}
    for i in range(L):
        p = f"model.layers.{i}."
        ts[p + "input_layernorm.weight"] = norm(d)
        ts[p + "post_attention_layernorm.weight"] = norm(d)
        if kind == "bitnet":
            ts[p + "self_attn.attn_sub_norm.weight"] = norm(H * hd)
            ts[p + "mlp.ffn_sub_norm.weight"] = norm(ff)
        for proj in PROJ:
            part = "self_attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            w = mat(*shapes[proj])
            name = f"{p}{part}.{proj}.weight"
            if kind == "bitnet":
                s = max(float(np.abs(w).mean()), 1e-5)
                ts[name] = ("U8", pack_ternary(np.clip(np.round(w / s), -1, 1).astype(np.int8)))
                ts[name[:-len("weight")] + "weight_scale"] = t(np.array([1.0 / s]))
            else:
                ts[name] = t(w)
    _save_safetensors(out / "model.safetensors", ts)
    if dialect == "rope_parameters":  # transformers 5: theta (and scaling) inside rope_parameters
        rp = dict(cfg.pop("rope_scaling", None) or {"rope_type": "default"}, rope_theta=cfg.pop("rope_theta"))
        cfg["rope_parameters"] = rp
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 2}))
    return out


def shard_checkpoint(src: Path, out: Path, n: int = 2) -> Path:
    """A copy of the checkpoint `src` with its model.safetensors split into n shards and an index, as
    save_pretrained writes large models (model-0000i-of-0000n.safetensors, model.safetensors.index.json)."""
    import shutil
    shutil.copytree(src, out)
    _, header = read_safetensors_header(out / "model.safetensors")
    header.pop("__metadata__", None)
    blob = (out / "model.safetensors").read_bytes()
    (hlen,) = struct.unpack("<Q", blob[:8])
    names = list(header)
    weight_map = {}
    for k in range(n):
        part = names[k * len(names) // n:(k + 1) * len(names) // n]
        fname = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        ts = {}
        for name in part:
            e = header[name]
            a, b = e["data_offsets"]
            raw = np.frombuffer(blob[8 + hlen + a:8 + hlen + b], dtype=np.uint8)
            ts[name] = (e["dtype"], raw.reshape(-1))
            weight_map[name] = fname
        _save_safetensors(out / fname, ts)
        # the raw bytes were saved as a flat uint8 array: put the real dtypes and shapes back
        _, h = read_safetensors_header(out / fname)
        for name in part:
            h[name]["shape"] = header[name]["shape"]
        write_safetensors_header(out / fname, h)
    (out / "model.safetensors").unlink()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


# ---------------------------------------------------------------------------- the worker pool
def _send(stream, obj) -> None:
    b = pickle.dumps(obj)
    stream.write(struct.pack("<Q", len(b)) + b)
    stream.flush()


def _recv(stream):
    head = stream.read(8)
    if len(head) < 8:
        return None
    (n,) = struct.unpack("<Q", head)
    body = stream.read(n)
    return pickle.loads(body) if len(body) == n else None


def worker_main() -> None:
    """The worker's loop: jobs (func path, args) on stdin, answers on stdout. The first job is the warm-up; the
    address-space limit (VmSize after it + HEADROOM) is set before the second."""
    import importlib
    import resource
    import traceback
    from edgellm.runtime.errors import EdgeLLMError
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing a job prints may corrupt the answers
    limited = False
    while True:
        job = _recv(inp)
        if job is None:
            if _WORK:
                import shutil
                shutil.rmtree(_WORK[0], ignore_errors=True)
            return
        func, args = job
        if func == "limit":
            if not limited:
                lim = _vm_size() + HEADROOM
                resource.setrlimit(resource.RLIMIT_AS, (lim, resource.getrlimit(resource.RLIMIT_AS)[1]))
                limited = True
            _send(out, ("ok", resource.getrlimit(resource.RLIMIT_AS)[0]))
            continue
        mod, name = func.split(":")
        try:
            res = ("ok", getattr(importlib.import_module(mod), name)(*args))
        except EdgeLLMError as e:
            res = ("error", str(e))
        except BaseException as e:  # noqa: BLE001 - everything else is what the tests look for
            res = ("other", type(e).__name__, str(e)[:500], traceback.format_exc()[-3000:])
        _send(out, res)


class Pool:
    """n long-lived workers; `run(jobs)` spreads [(func, args)] over them and returns the answers in order.
    `warmup` (func, args) runs in each worker before its address space is limited."""

    def __init__(self, n: int, warmup: tuple[str, tuple] | None = None, env: dict | None = None):
        self.n, self.warmup = n, warmup
        self.env = dict(os.environ, **(env or {}))
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), self.env.get("PYTHONPATH", "")]))
        self.procs = [self._start() for _ in range(n)]
        self.restarts = 0

    def _start(self) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-c", "import fuzzkit; fuzzkit.worker_main()"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, env=self.env, cwd=str(TESTS))
        if self.warmup is not None:
            _send(p.stdin, self.warmup)
            r = _recv(p.stdout)
            if r is None or r[0] != "ok":
                raise RuntimeError(f"fuzz worker warm-up failed: {r}")
        _send(p.stdin, ("limit", ()))
        r = _recv(p.stdout)
        if r is None or r[0] != "ok":
            raise RuntimeError(f"fuzz worker could not limit its address space: {r}")
        return p

    def run(self, jobs: list[tuple[str, tuple]], timeout: float = 120.0) -> list[tuple]:
        import selectors
        results: list = [None] * len(jobs)
        todo = list(range(len(jobs)))[::-1]
        busy: dict[int, tuple[int, float]] = {}  # worker index -> (job index, start time)
        sel = selectors.DefaultSelector()
        for w, p in enumerate(self.procs):
            sel.register(p.stdout, selectors.EVENT_READ, w)

        def give(w):
            if todo:
                j = todo.pop()
                _send(self.procs[w].stdin, jobs[j])
                busy[w] = (j, time.monotonic())

        def restart(w):
            sel.unregister(self.procs[w].stdout)
            self.procs[w].kill()
            self.procs[w].wait()
            self.procs[w] = self._start()
            self.restarts += 1
            sel.register(self.procs[w].stdout, selectors.EVENT_READ, w)

        for w in range(self.n):
            give(w)
        while busy:
            for key, _ in sel.select(timeout=1.0):
                w = key.data
                j, _ = busy.pop(w)
                r = _recv(self.procs[w].stdout)
                if r is None:
                    self.procs[w].wait()
                    results[j] = ("killed", self.procs[w].returncode)
                    restart(w)
                else:
                    results[j] = r
                give(w)
            now = time.monotonic()
            for w, (j, t0) in list(busy.items()):
                if now - t0 > timeout:
                    busy.pop(w)
                    results[j] = ("killed", "timeout")
                    restart(w)
                    give(w)
        sel.close()
        return results

    def close(self) -> None:
        for p in self.procs:
            try:
                p.stdin.close()
                p.wait(timeout=30)
            except Exception:  # noqa: BLE001
                p.kill()


def tally(results: list[tuple]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in results:
        out[r[0]] = out.get(r[0], 0) + 1
    return out


def assert_contained(mutations: list, results: list[tuple], show=repr) -> dict[str, int]:
    """Every mutation either worked ("ok") or raised edgellm's error with a one-line message; the tally."""
    bad = [(m, r) for m, r in zip(mutations, results) if r[0] not in ("ok", "error")]
    assert not bad, f"{len(bad)} mutations escaped: " + "\n".join(f"{show(m)}: {r[:3]}" for m, r in bad[:8]) + \
        ("\n" + bad[0][1][3] if bad[0][1][0] == "other" else "")
    multiline = [r[1] for r in results if r[0] == "error" and "\n" in r[1]]
    assert not multiline, multiline[:3]
    return tally(results)


# ---------------------------------------------------------------------------- jobs run in the workers
IDS = [5, 250, 42]  # token ids whose logits are compared (all < every vocabulary here; three tokens stay on the
# decode kernels: longer prompts take the prefill path, ~100x slower for these tiny shapes)
DROP = "<drop>"  # a mutation value: remove the key
_REF: dict = {}
_WORK: list[Path] = []


def _workdir() -> Path:
    import tempfile
    if not _WORK:
        _WORK.append(Path(tempfile.mkdtemp(prefix="edgellm-fuzz-")))
    return _WORK[0]


def engine_logits(path, n_ctx: int = 64) -> np.ndarray:
    """Logits (len(IDS), V) of a model file or folder, computed by edgellm (one thread: deterministic)."""
    from edgellm.runtime.engine import load
    eng = load(path, n_ctx=n_ctx, threads=1)
    return eng.prefill([i for i in IDS if i < eng.cfg.n_vocab], logits="all")


def _set(obj, path: tuple, value):
    """obj with obj[path[0]][path[1]]... set to value (DROP removes it); missing parents are created."""
    for k in path[:-1]:
        if isinstance(obj, dict):
            obj = obj.setdefault(k, {})
        else:
            obj = obj[k]
    if value == DROP:
        if isinstance(obj, dict):
            obj.pop(path[-1], None)
        else:
            del obj[path[-1]]
    else:
        obj[path[-1]] = value


def read_safetensors_header(path: Path) -> tuple[int, dict]:
    b = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", b[:8])
    return n, json.loads(b[8:8 + n])


def write_safetensors_header(path: Path, header: dict, raw: bool = False) -> None:
    """Replace the header of a safetensors file (the tensor data keep their bytes)."""
    b = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", b[:8])
    h = json.dumps(header, separators=(",", ":")).encode()
    Path(path).write_bytes(struct.pack("<Q", len(h)) + h + b[8 + n:])


def apply_mutation(folder: Path, m: tuple) -> None:
    """One mutation of a checkpoint or model folder (see the test generators):
    ("bytes", file, offset, data)    overwrite bytes
    ("truncate", file, size)         cut the file
    ("json", file, path, value)      set (or DROP) a value in a JSON file
    ("header", name, field, value)   set (or DROP) a field of one safetensors header entry (name None: the header
                                     itself gets key `field`)
    """
    kind = m[0]
    if kind == "bytes":
        _, name, off, data = m
        p = folder / name
        b = bytearray(p.read_bytes())
        b[off:off + len(data)] = data[:max(0, len(b) - off)]
        p.write_bytes(bytes(b))
    elif kind == "truncate":
        _, name, size = m
        p = folder / name
        p.write_bytes(p.read_bytes()[:size])
    elif kind == "json":
        _, name, path, value = m
        p = folder / name
        d = json.loads(p.read_text(encoding="utf-8"))
        _set(d, tuple(path), value)
        p.write_text(json.dumps(d), encoding="utf-8")
    elif kind == "header":
        _, tname, field, value = m
        p = folder / "model.safetensors"
        _, h = read_safetensors_header(p)
        _set(h, (tname, field) if tname is not None else (field,), value)
        write_safetensors_header(p, h)
    else:
        raise ValueError(f"unknown mutation {m!r}")


def _copy(src: Path) -> Path:
    import shutil
    import tempfile
    work = Path(tempfile.mkdtemp(dir=_workdir()))
    shutil.copytree(src, work / "in")
    return work


def _tensor_entries(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        _, h = read_safetensors_header(f)
        h.pop("__metadata__", None)
        out[f.name] = h
    return out


def convert_mutant(src: str, m: tuple, outtype: str = "f32") -> dict:
    """Convert a mutated copy of the checkpoint `src` and run the output: {same: logits equal the pristine file's,
    tensors_same: the header's tensor entries are unchanged}. EdgeLLMError propagates (a clear error)."""
    import shutil
    from edgellm.converters import convert_to_gguf
    src = Path(src)
    key = ("ckpt", str(src), outtype)
    if key not in _REF:
        work = _copy(src)
        try:
            _REF[key] = engine_logits(convert_to_gguf(work / "in", work / "out.gguf", outtype))
        finally:
            shutil.rmtree(work)
    work = _copy(src)
    try:
        if m[0] == "remove":
            (work / "in" / m[1]).unlink()
        else:
            apply_mutation(work / "in", m)
        out = convert_to_gguf(work / "in", work / "out.gguf", outtype)
        logits = engine_logits(out)
        try:
            tensors_same = _tensor_entries(work / "in") == _tensor_entries(src)
        except (ValueError, KeyError):
            tensors_same = False
        a, b = (json.loads((f / "config.json").read_text(encoding="utf-8")) for f in (work / "in", src))
        changed = sorted(k for k in set(a) | set(b) if k not in a or k not in b or a[k] != b[k])
        return dict(same=bool(np.array_equal(logits, _REF[key])), tensors_same=tensors_same, config_changed=changed)
    finally:
        shutil.rmtree(work)


# ---------------------------------------------------------------------------- GGUF files
TEXT = ("Hello, world! <|im_start|>user\nTo be, or not to be\u2014that is the question 123 \U0001F600<|im_end|>"
        "<|new|>")  # (a token some mutations add)
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Count to 3"}]


def exercise(path) -> dict:
    """What a user does with a model: load it, tokenize text (special tokens included), run the tokens through
    prefill and one decode step, detokenize, and render the chat template and tokenize the prompt."""
    from edgellm.runtime.engine import load
    eng = load(path, n_ctx=64, threads=1)
    tok = eng.tokenizer
    ids = tok.encode(TEXT, add_bos=None)
    text = tok.decode(ids)
    logits = eng.prefill(ids[:3] or [0])
    eng.decode(int(np.argmax(logits)))
    prompt = tok.apply_chat_template(MESSAGES, add_generation_prompt=True)
    chat_ids = tok.encode(prompt, add_bos=None)
    return dict(finite=bool(np.isfinite(logits).all()), roundtrip=text == TEXT, n_chat=len(chat_ids))


def exercise_all(paths: list) -> list:
    """exercise() on each file: a worker's warm-up, so that every kernel these files need (the compiled decode step
    of each weight format included) is compiled before the address space is limited and outside the job timeout."""
    return [exercise(p) for p in paths]


def gguf_bytes_mutant(src: str, m: tuple) -> dict:
    """A byte-level mutation ("bytes", offset, data) / ("truncate", size) of the GGUF file `src`, exercised."""
    import shutil
    work = Path(_copy_file(src))
    try:
        p = work / "m.gguf"
        b = bytearray(p.read_bytes())
        if m[0] == "bytes":
            b[m[1]:m[1] + len(m[2])] = m[2][:max(0, len(b) - m[1])]
        else:
            b = b[:m[1]]
        p.write_bytes(bytes(b))
        return exercise(p)
    finally:
        shutil.rmtree(work)


def _copy_file(src: str) -> Path:
    import shutil
    import tempfile
    work = Path(tempfile.mkdtemp(dir=_workdir()))
    shutil.copyfile(src, work / "m.gguf")
    return work


def _vtype(v):
    """The GGUF value type (and element type of an array) a Python value is written as."""
    from gguf import GGUFValueType as VT
    if isinstance(v, bool):
        return VT.BOOL, None
    if isinstance(v, int):
        return (VT.INT32 if -2**31 <= v < 2**31 else VT.UINT32 if 0 <= v < 2**32 else VT.INT64 if v < 2**63
                else VT.UINT64), None
    if isinstance(v, float):
        return VT.FLOAT32, None
    if isinstance(v, str):
        return VT.STRING, None
    if isinstance(v, list):
        return VT.ARRAY, (_vtype(v[0])[0] if v else VT.INT32)
    raise TypeError(f"no GGUF type for {type(v).__name__}")


def _read_gguf(src: str):
    """(architecture, [(key, value, type, element type)], [(name, array, type)]) of a GGUF, cached per worker."""
    import gguf
    from gguf import GGUFValueType as VT
    key = ("gguf", src)
    if key not in _REF:
        r = gguf.GGUFReader(src)
        fields = [(name, f.contents(), f.types[0], f.types[-1] if f.types[0] == VT.ARRAY else None)
                  for name, f in r.fields.items() if not name.startswith("GGUF.")]
        tensors = [(t.name, np.array(t.data), gguf.GGMLQuantizationType(t.tensor_type)) for t in r.tensors]
        _REF[key] = (r.fields[gguf.Keys.General.ARCHITECTURE].contents(), fields, tensors)
    return _REF[key]


def rewrite_gguf(src: str, out: Path, changes: dict) -> None:
    """Write `src` again with its metadata changed: key -> new value (typed by _vtype; DROP removes the key)."""
    import gguf
    arch, fields, tensors = _read_gguf(src)
    w = gguf.GGUFWriter(str(out), arch)
    for name, value, vt, st in fields:
        if name != gguf.Keys.General.ARCHITECTURE and name not in changes:
            w.add_key_value(name, value, vt, st)
    for name, v in changes.items():
        if v != DROP:
            vt, st = _vtype(v)
            w.add_key_value(name, v, vt, st)
    for name, data, qtype in tensors:
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def gguf_meta_mutant(src: str, changes: dict) -> dict:
    """`src` rewritten with metadata `changes` (e.g. a tokenizer key or the chat template), exercised."""
    import shutil
    import tempfile
    work = Path(tempfile.mkdtemp(dir=_workdir()))
    try:
        rewrite_gguf(src, work / "m.gguf", changes)
        return exercise(work / "m.gguf")
    finally:
        shutil.rmtree(work)


def folder_mutant(src: str, m: tuple) -> dict:
    """A mutated copy of the model folder `src` (an ONNX export; mutations as apply_mutation, plus ("remove",
    file)), exercised."""
    import shutil
    work = _copy(Path(src))
    try:
        if m[0] == "remove":
            (work / "in" / m[1]).unlink()
        else:
            apply_mutation(work / "in", m)
        return exercise(work / "in")
    finally:
        shutil.rmtree(work)


def cli(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    """The `edgellm` command as a user runs it (no traceback switch)."""
    env = dict(os.environ, EDGELLM_DEBUG="")
    return subprocess.run([sys.executable, "-m", "edgellm.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def assert_clean_error(r: subprocess.CompletedProcess, *words: str) -> None:
    """A non-zero exit whose stderr ends in one `edgellm: error:` line (never `internal error`, never a
    traceback), naming `words`."""
    assert r.returncode not in (0, -6, -9, -11), (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("edgellm: error:"), r.stderr[-2000:]
    for w in words:
        assert w in lines[-1], lines[-1]

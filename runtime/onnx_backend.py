"""An exported ONNX folder (model.onnx with optimum's decoder-with-past interface, config.json, tokenizer
files) run by onnxruntime behind the interface the generation loop uses: `prefill`, `decode`,
`decode_batch`, `new_cache`, `tokenizer`, `cfg`, `n_ctx`, `threads` — the same samplers, CLI and API
as a GGUF model.

The graph's interface (what `edgellm convert --format onnx` and optimum write):
    input_ids (B, T), attention_mask (B, P+T), position_ids (B, T),
    past_key_values.{i}.key / .value (B, n_kv, P, head_dim) -> logits (B, T, V), present.{i}.key / .value
(each layer's sizes read from the graph: a pruned model's differ, an MLA model's are its latent and rope key), or,
for a recurrent (linear-attention) variant, input_ids + state.* -> logits + new_state.* with constant-size states.
Each sequence's cache holds its own present tensors; a batched step left-pads the shorter pasts and
masks the padding, so sequences of different lengths share one run (one read of the weights).
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .backend import EngineBase, EngineOptions
from .cache_base import RecurrentState, check_consecutive, check_fork_target
from .contracts import Cache, Snapshot
from .errors import CacheError, ModelFileError, UnsupportedError
from .memory import check, check_cache

MODEL_FILE = "model.onnx"


@dataclass(frozen=True)
class OnnxConfig:
    """What the runtime needs to know of an ONNX decoder (read from its inputs and config.json)."""
    arch: str
    n_layer: int
    n_head_kv: int
    head_dim: int
    n_vocab: int
    n_ctx_train: int


class OnnxKVCache(Cache):
    """One sequence's past keys and values as the graph returns them: 2 * n_layer arrays
    (1, n_kv, n, head_dim), in the order of the graph's past_key_values inputs; `shapes` gives each
    array's (n_kv, head_dim) (a pruned model's layers differ). The arrays grow with every run (the graph returns
    them whole), so positions are along axis 2 of arrays of exactly n tokens."""

    def __init__(self, shapes: list[tuple[int, int]], n_ctx: int):
        self.spec = tuple((int(H), int(D)) for H, D in shapes)
        self.n_ctx = n_ctx
        self.n = 0
        self.kv: list[np.ndarray] = [np.zeros((1, H, 0, D), dtype=np.float32) for H, D in self.spec]

    @property
    def nbytes_per_token(self) -> int:
        return sum(a.shape[1] * a.shape[3] * 4 for a in self.kv)

    def can_truncate(self, n: int) -> bool:
        return 0 <= n <= self.n

    def truncate(self, n: int) -> None:
        """Forget everything after the first n tokens."""
        if not self.can_truncate(n):
            raise CacheError(f"cannot truncate a cache of {self.n} tokens to {n}")
        if n < self.n:
            self.kv = [np.ascontiguousarray(a[:, :, :n]) for a in self.kv]
        self.n = n

    def fork(self, n: int | None = None, into: "OnnxKVCache | None" = None) -> "OnnxKVCache":
        n = self.n if n is None else n
        if not self.can_truncate(n):
            raise CacheError(f"cannot fork {n} of the {self.n} tokens of this cache")
        c = OnnxKVCache(self.spec, self.n_ctx) if into is None else check_fork_target(self, into, n)
        c.n, c.kv = n, [a[:, :, :n].copy() for a in self.kv]  # (arrays of exactly n positions: nothing to reuse)
        return c

    def snapshot(self, start: int, stop: int) -> Snapshot:
        if not 0 <= start <= stop <= self.n:
            raise CacheError(f"cannot snapshot positions {start}..{stop} of a cache of {self.n} tokens")
        return Snapshot(start, stop, tuple(a[:, :, start:stop].copy() for a in self.kv))

    def restore(self, snapshots: Sequence[Snapshot]) -> int:
        stop = check_consecutive(snapshots, self.n, self.n_ctx)
        if snapshots:
            if any(len(s.rows) != len(self.kv) for s in snapshots):
                raise CacheError("a snapshot of a different kind of cache")
            self.kv = [np.concatenate([s.rows[j] for s in snapshots], axis=2) for j in range(len(self.kv))]
        self.n = stop
        return stop


class OnnxStateCache(RecurrentState):
    """One sequence's recurrent state (a linear-attention variant's graph: inputs `state.*`, outputs `new_state.*`):
    constant-size arrays (1, ...), whatever the number of tokens seen."""

    def __init__(self, shapes: list[tuple[int, ...]], n_ctx: int):
        self.spec = tuple(tuple(int(d) for d in sh) for sh in shapes)
        self.n_ctx = n_ctx
        self.n = 0
        self.kv: list[np.ndarray] = [np.zeros((1,) + sh, dtype=np.float32) for sh in self.spec]

    def _state(self) -> list:
        return self.kv

    def _empty(self) -> "OnnxStateCache":
        return OnnxStateCache(self.spec, self.n_ctx)


def _one_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__


_MAX_DIM = 1 << 24  # largest head count, head size or state dimension a graph may declare


def _read_json(path: Path) -> dict:
    """A JSON object from `path` ({} when the file is absent); anything else is one line naming the file."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # unreadable, JSONDecodeError, UnicodeDecodeError
        raise ModelFileError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelFileError(f"{path}: expected a JSON object, found a JSON {type(data).__name__}")
    return data


class _Config:
    """Typed values of a folder's JSON config, each failure one line naming the file and the key."""

    def __init__(self, data: dict, path: Path):
        self.data, self.path = data, path

    def int(self, key: str, default: int | None = None, lo: int = 1, hi: int = _MAX_DIM) -> int:
        v = self.data.get(key)
        if v is None:
            if default is None:
                raise ModelFileError(f"{self.path}: missing {key!r} (the graph does not give it)")
            return default
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise ModelFileError(f"{self.path}: {key!r} = {v!r} is not an integer in [{lo}, {hi}]")
        return v


class OnnxEngine(EngineBase):
    """A loaded ONNX folder: `prefill(tokens)`, `decode(token)`, `decode_batch(tokens, caches)` -> logits, over the
    graph's own caches (OnnxKVCache, or OnnxStateCache for a recurrent graph)."""

    def __init__(self, path: str | os.PathLike, options: EngineOptions | None = None, **kwargs):
        """options: EngineOptions (or its fields as keyword arguments); the GGUF engine's own settings (KV cache
        type, attention kind, ...) are accepted at their defaults only: onnxruntime runs the graph's dense f32 cache."""
        t0 = time.perf_counter()
        super().__init__(path, options, **kwargs)
        for name in self.options.gguf_only():
            raise UnsupportedError(f"{name}={getattr(self.options, name)!r} applies to GGUF models; an ONNX folder "
                                   "runs onnxruntime with the graph's own f32 KV cache", name)
        model = self.path / MODEL_FILE
        if not model.is_file():
            raise ModelFileError(f"{path} is a folder without {MODEL_FILE} (expected a GGUF file or an ONNX folder "
                                 "written by `edgellm convert --format onnx`)")
        try:
            import onnxruntime as ort
        except ImportError:
            raise UnsupportedError("running an ONNX folder needs onnxruntime: pip install 'edgellm[onnx]'") from None
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 4  # its errors are reported here, as one line (not also logged to stderr)
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # onnxruntime prints an "EP Error" banner and retries
                self.session = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime's errors (corrupt file, missing data) as one line
            raise ModelFileError(f"onnxruntime cannot load {model}: {_one_line(e)}") from None
        self.cfg = self._read_config()
        self.spec = self.new_cache(1).spec  # the cache shapes of this graph
        from .tokenizer import Tokenizer
        self.tokenizer = Tokenizer.from_hf(self.path, self.cfg.n_vocab)
        self.n_ctx = self._context(self.cfg.n_ctx_train)
        # memory (runtime/memory.py): the graph returns whole present arrays (a copy per step), a chunk's logits
        check_cache(self.n_ctx, 2 * self.kv_bytes_per_token, 4 * self.cfg.n_vocab * 512,
                    kv_per_token=self.kv_bytes_per_token)
        self.cache = self.new_cache()
        self._weight_bytes: int | None = None
        self.load_seconds = time.perf_counter() - t0

    def _read_config(self) -> OnnxConfig:
        ins = {i.name: i for i in self.session.get_inputs()}
        outs = [o.name for o in self.session.get_outputs()]
        state = [n for n in ins if n.startswith("state.")]
        if state and "input_ids" in ins and outs and outs[0] == "logits":  # a recurrent (linear-attention) graph
            return self._read_state_config(ins, outs, state)
        missing = [n for n in ("input_ids", "attention_mask") if n not in ins]
        if missing or not outs or outs[0] != "logits":
            raise ModelFileError(f"{self.path / MODEL_FILE} is not a decoder with optimum's interface "
                               f"(inputs input_ids, attention_mask, past_key_values.N.key/value -> logits)")
        self._state = False
        n_layer = sum(1 for n in ins if n.startswith("past_key_values.") and n.endswith(".key"))
        self._past_names = [f"past_key_values.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]
        self._present_names = [f"present.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]
        if n_layer == 0 or any(n not in ins for n in self._past_names) or any(n not in outs for n in self._present_names):
            raise ModelFileError(f"{self.path / MODEL_FILE} has no complete KV-cache interface "
                               "(past_key_values.N.key/value -> present.N.key/value)")
        self._has_pos = "position_ids" in ins
        cfg_path = self.path / "config.json"
        hf = _read_json(cfg_path)
        conf = _Config(hf, cfg_path)
        self._kv_shapes = []
        for name in self._past_names:  # [batch, n_kv, past, head_dim]: static in the graph, else config.json
            shape = ins[name].shape
            if len(shape) != 4:
                raise ModelFileError(f"{self.path / MODEL_FILE}: input {name} has {len(shape)} dimensions, expected 4 "
                                     "(batch, kv heads, past tokens, head size)")
            _, n_kv, _, head_dim = shape
            if not isinstance(n_kv, int):
                n_kv = conf.int("num_key_value_heads", conf.int("num_attention_heads"))
            if not isinstance(head_dim, int):
                head_dim = conf.int("head_dim", 0) or conf.int("hidden_size") // conf.int("num_attention_heads")
            if not (1 <= n_kv <= _MAX_DIM and 1 <= head_dim <= _MAX_DIM):
                raise ModelFileError(f"{self.path / MODEL_FILE}: input {name} has {n_kv} heads of size {head_dim}")
            self._kv_shapes.append((n_kv, head_dim))
        n_kv, head_dim = max(self._kv_shapes)
        v = self.session.get_outputs()[0].shape
        n_vocab = conf.int("vocab_size", v[-1] if v and isinstance(v[-1], int) else None)
        if v and isinstance(v[-1], int) and n_vocab != v[-1]:
            raise ModelFileError(f"{cfg_path}: vocab_size = {n_vocab}, but {MODEL_FILE}'s logits have {v[-1]} "
                                 "entries")
        arch = hf.get("model_type", "onnx")
        return OnnxConfig(arch=arch if isinstance(arch, str) else "onnx", n_layer=n_layer, n_head_kv=n_kv,
                          head_dim=head_dim, n_vocab=n_vocab, n_ctx_train=conf.int("max_position_embeddings", 4096))

    def _read_state_config(self, ins: dict, outs: list[str], state: list[str]) -> OnnxConfig:
        """A graph input_ids + state.* -> logits + new_state.* (`edgellm convert --variant linear --format onnx`)."""
        self._state = True
        self._past_names = state
        self._present_names = ["new_" + n for n in state]
        self._has_pos = False
        missing = [n for n in self._present_names if n not in outs]
        shapes = [ins[n].shape[1:] for n in state]
        if missing or any(not isinstance(d, int) for sh in shapes for d in sh):
            raise ModelFileError(f"{self.path / MODEL_FILE}: a recurrent-state graph needs new_<name> outputs for every "
                               "state input and static state sizes")
        if any(not 1 <= d <= _MAX_DIM for sh in shapes for d in sh):
            raise ModelFileError(f"{self.path / MODEL_FILE}: a state input has sizes {shapes} "
                                 f"(each in [1, {_MAX_DIM}])")
        self._kv_shapes = [tuple(int(d) for d in sh) for sh in shapes]
        check(4 * sum(math.prod(sh) for sh in self._kv_shapes), f"the recurrent state of {self.path / MODEL_FILE}")
        v = self.session.get_outputs()[0].shape[-1]
        cfg_path = self.path / "linear_config.json"
        conf = _Config(_read_json(cfg_path), cfg_path)
        if not isinstance(v, int) or v < 1:
            raise ModelFileError(f"{self.path}: the graph does not give the vocabulary size")
        arch = conf.data.get("architecture", "onnx-recurrent")
        return OnnxConfig(arch=arch if isinstance(arch, str) else "onnx-recurrent", n_layer=len(state),
                          n_head_kv=conf.int("n_head_kv", 0, lo=0), head_dim=conf.int("head_dim", 0, lo=0),
                          n_vocab=v, n_ctx_train=conf.int("max_position_embeddings", 1 << 20))

    # ------------------------------------------------------------------ caches
    def new_cache(self, n_ctx: int | None = None):
        if self._state:
            return OnnxStateCache(self._kv_shapes, n_ctx or self.n_ctx)
        return OnnxKVCache(self._kv_shapes, n_ctx or self.n_ctx)

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes each token takes in a new cache (0 for a recurrent state)."""
        return 0 if self._state else 4 * sum(H * D for H, D in self._kv_shapes)

    @property
    def weight_bytes_per_token(self) -> int:
        """Bytes of weights one decode step reads: the constant inputs of the graph's matrix products
        (MatMul, MatMulNBits with its scales, MatMulInteger, Gemm); an embedding table read only by
        Gather (one row per token) is not counted."""
        if self._weight_bytes is None:
            import onnx
            from onnx import TensorProto, helper
            g = onnx.load(str(self.path / MODEL_FILE), load_external_data=False).graph
            inits = {t.name: t for t in g.initializer}

            def nbytes(t) -> int:
                ext = {e.key: e.value for e in t.external_data}
                if "length" in ext:
                    return int(ext["length"])
                if t.raw_data:
                    return len(t.raw_data)
                n = int(np.prod(t.dims)) if t.dims else 1
                return n * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize \
                    if t.data_type != TensorProto.UNDEFINED else 0

            # a tied LM head reads the embedding through a Transpose
            through = {n.output[0]: n.input[0] for n in g.node
                       if n.op_type == "Transpose" and n.input and n.input[0] in inits}
            names = {through.get(i, i) for n in g.node if n.op_type in ("MatMul", "MatMulNBits", "MatMulInteger", "Gemm")
                     for i in n.input if through.get(i, i) in inits}
            self._weight_bytes = sum(nbytes(inits[n]) for n in names)
        return self._weight_bytes

    # ------------------------------------------------------------------ running
    def _forward(self, tokens: np.ndarray, seqs: list, logits: str) -> np.ndarray:
        """The graph runs B sequences of T new tokens each (a prefill: B = 1; a decode step: T = 1)."""
        T = seqs[0][1]
        out = self._run(tokens.reshape(len(seqs), T), [c for c, _ in seqs])  # (B, T, V)
        return out.reshape(-1, out.shape[-1]) if logits == "all" else out[:, -1]

    def _session_run(self, feed: dict) -> list:
        """The graph run by onnxruntime; a graph that fails to run (a corrupted file that loaded) is one line."""
        try:
            outs = self.session.run(["logits"] + self._present_names, feed)
        except Exception as e:  # noqa: BLE001 - onnxruntime's run-time errors
            raise ModelFileError(f"onnxruntime cannot run {self.path / MODEL_FILE}: {_one_line(e)}") from None
        B, T = feed["input_ids"].shape
        if outs[0].shape[:2] != (B, T) or outs[0].shape[-1] != self.cfg.n_vocab:
            raise ModelFileError(f"{self.path / MODEL_FILE} returned logits of shape {outs[0].shape}, expected "
                                 f"({B}, {T}, {self.cfg.n_vocab})")
        return outs

    def _run(self, tokens: np.ndarray, caches: list) -> np.ndarray:
        """tokens (B, T) appended to each of B caches; logits (B, T, V). Shorter pasts are left-padded
        and masked out (a recurrent state has no length: the states are stacked along the batch)."""
        B, T = tokens.shape
        feed = {"input_ids": tokens.astype(np.int64, copy=False)}
        if self._state:
            for j, name in enumerate(self._past_names):
                feed[name] = caches[0].kv[j] if B == 1 else np.concatenate([c.kv[j] for c in caches])
            outs = self._session_run(feed)
            for b, c in enumerate(caches):
                c.kv = [p if B == 1 else np.ascontiguousarray(p[b:b + 1]) for p in outs[1:]]
                c.n += T
            return outs[0]
        ns = [c.n for c in caches]
        P = max(ns)
        am = np.zeros((B, P + T), dtype=np.int64)
        pos = np.empty((B, T), dtype=np.int64)
        for b, n in enumerate(ns):
            am[b, P - n:] = 1
            pos[b] = np.arange(n, n + T)
        feed["attention_mask"] = am
        if self._has_pos:
            feed["position_ids"] = pos
        for j, name in enumerate(self._past_names):
            if B == 1:
                feed[name] = caches[0].kv[j]
            else:
                _, H, _, D = caches[0].kv[j].shape
                a = np.zeros((B, H, P, D), dtype=np.float32)
                for b, c in enumerate(caches):
                    if c.n:
                        a[b, :, P - c.n:] = c.kv[j][0]
                feed[name] = a
        outs = self._session_run(feed)
        presents = outs[1:]
        for b, c in enumerate(caches):
            c.kv = [p if B == 1 else np.ascontiguousarray(p[b:b + 1, :, P - ns[b]:]) for p in presents]
            c.n += T
        return outs[0]

"""The engines a benchmark drives, behind one small interface, and what a model file is (size, params,
bytes a decode step reads).

A backend is built as `Backend(model, threads=, n_ctx=, n_batch=)` and offers
    prompt(tokens)   append tokens to its KV cache (prefill, in chunks of n_batch)
    step(token)      append one token (a decode step)
    truncate(n)      keep the first n tokens of the cache (the rest is forgotten)
    close()
and the attributes name, n_vocab, type_k, type_v, kv_bytes_per_token, model_size, model_n_params,
weight_bytes_per_token. `BACKENDS` maps names to classes; `register()` adds one.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..runtime.errors import EdgeLLMError


def gguf_model_info(path) -> dict:
    """Size, parameter count and KV geometry of a GGUF file, and the bytes of weights one decode step
    reads: every matrix except the token embedding (a row lookup), which is read in full when it is
    also the output head (tied)."""
    from gguf import MODEL_TENSOR, TENSOR_NAMES

    from ..models.config import ModelConfig
    from ..runtime.gguf_file import GGUFFile
    f = GGUFFile(path)
    cfg = ModelConfig.from_gguf(f.metadata)
    embd = TENSOR_NAMES[MODEL_TENSOR.TOKEN_EMBD] + ".weight"
    out = TENSOR_NAMES[MODEL_TENSOR.OUTPUT] + ".weight"
    tensors = f.tensors.values()
    read = sum(t.n_bytes for t in tensors if len(t.shape) >= 2 and t.name != embd)
    if out not in f.tensors and embd in f.tensors:
        read += f.tensors[embd].n_bytes
    return {"model_size": sum(t.n_bytes for t in tensors), "model_n_params": sum(t.n_elements for t in tensors),
            "weight_bytes_per_token": read, "n_layer": cfg.n_layer, "n_head_kv": cfg.n_head_kv,
            "head_dim": cfg.head_dim, "n_ctx_train": cfg.n_ctx_train}


class _GGUFBackend:
    def _model(self, path):
        info = gguf_model_info(path)
        self.model_size, self.model_n_params = info["model_size"], info["model_n_params"]
        self.weight_bytes_per_token = info["weight_bytes_per_token"]
        return info


class _EngineBackend:
    """Anything with the runtime engine's interface: prefill(tokens, cache, chunk=), decode, new_cache."""

    def _attach(self, engine, n_ctx: int, n_batch: int):
        self.engine, self.n_batch = engine, n_batch
        self.cache = engine.new_cache(n_ctx)
        self.n_vocab = engine.cfg.n_vocab
        self.kv_bytes_per_token = self.cache.nbytes_per_token

    def truncate(self, n: int):
        self.cache.truncate(n)

    def prompt(self, tokens):
        self.engine.prefill(tokens, self.cache, chunk=self.n_batch)

    def step(self, token):
        self.engine.decode(int(token), self.cache)

    def close(self):
        self.engine = self.cache = None


class EdgeBackend(_EngineBackend, _GGUFBackend):
    name = "edgellm"

    def __init__(self, path, threads: int, n_ctx: int, n_batch: int = 512):
        from ..runtime.engine import Engine
        from ..runtime.kv_cache import parse_kv
        self._model(path)
        self._attach(Engine(path, n_ctx=n_ctx, threads=threads), n_ctx, n_batch)
        self.type_k, self.type_v = parse_kv(self.engine.kv)  # (the default: f16, as llama.cpp's)


class LlamaCppBackend(_GGUFBackend):
    """llama.cpp through llama-cpp-python, given what edgellm gets: the same threads for prompt and
    generation, n_batch = n_ubatch, its default f16 KV cache, the model memory-mapped."""
    name = "llama.cpp"
    type_k = type_v = "f16"

    def __init__(self, path, threads: int, n_ctx: int, n_batch: int = 512):
        try:
            import llama_cpp
        except ImportError:
            raise EdgeLLMError("the llama.cpp backend needs llama-cpp-python: pip install 'edgellm[llama]'") from None
        info = self._model(path)
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                                   n_batch=n_batch, n_ubatch=n_batch, verbose=False)
        self._sync = lambda: llama_cpp.llama_synchronize(self.llm.ctx)  # the decode has finished
        self.n_vocab = self.llm.n_vocab()
        self.kv_bytes_per_token = 2 * info["n_layer"] * info["n_head_kv"] * info["head_dim"] * 2

    def truncate(self, n: int):
        self.llm.n_tokens = n  # eval() removes cache cells from n_tokens on before it appends
        self.llm._ctx.kv_cache_seq_rm(-1, n, -1)

    def prompt(self, tokens):
        self.llm.eval([int(t) for t in tokens])
        self._sync()

    def step(self, token):
        self.llm.eval([int(token)])
        self._sync()

    def close(self):
        self.llm.close()


class OnnxBackend(_EngineBackend):
    """onnxruntime on an exported folder (optimum's decoder-with-past interface) through the runtime's
    `OnnxEngine`, which gives intra-op threads = threads and runs prompts in chunks of n_batch."""
    name = "onnxruntime"
    type_k = type_v = "f32"
    model_n_params = 0  # an ONNX folder does not record it

    def __init__(self, folder, threads: int, n_ctx: int, n_batch: int = 512):
        if not folder:
            raise EdgeLLMError("--backends onnxruntime needs --onnx DIR (a folder from `edgellm convert --format onnx`)")
        try:
            from ..runtime.onnx_backend import OnnxEngine
        except ImportError as e:
            raise EdgeLLMError(f"the onnxruntime backend is not available: {e}") from None
        if not Path(folder).is_dir():
            raise EdgeLLMError(f"--onnx {folder}: not a folder")
        self._attach(OnnxEngine(folder, n_ctx=n_ctx, threads=threads), n_ctx, n_batch)
        self.model_size = self.weight_bytes_per_token = self.engine.weight_bytes_per_token


BACKENDS = {"edgellm": EdgeBackend, "llama.cpp": LlamaCppBackend, "onnxruntime": OnnxBackend}


def register(name: str, cls) -> None:
    """Add a backend (a class with the interface above) under `name`."""
    BACKENDS[name] = cls


def open_backend(name: str, model, onnx_dir, threads: int, n_ctx: int, n_batch: int):
    if name not in BACKENDS:
        raise EdgeLLMError(f"unknown backend {name!r} (known: {', '.join(BACKENDS)})")
    src = onnx_dir if name == "onnxruntime" else model
    return BACKENDS[name](src, threads=threads, n_ctx=n_ctx, n_batch=n_batch)


LLAMA_CPP_MISSING = ("llama-cpp-python is not installed (it has no wheels: pip builds llama.cpp from source, which "
                     "needs a C/C++ compiler, CMake and minutes; where you have them: pip install 'edgellm[llama]')")


def check_backends(names: list[str], onnx_dir) -> dict[str, str]:
    """Fail early, with one clear line, on a backend that cannot run (before minutes of measuring). llama.cpp
    without llama-cpp-python is skipped when another backend remains (a Raspberry Pi has no wheel of it):
    returns {backend: why it is skipped}."""
    for name in names:
        if name not in BACKENDS:
            raise EdgeLLMError(f"unknown backend {name!r} (known: {', '.join(BACKENDS)})")
    if "onnxruntime" in names:
        if not onnx_dir:
            raise EdgeLLMError("--backends onnxruntime needs --onnx DIR (a folder from `edgellm convert --format onnx`)")
        if not os.path.isdir(onnx_dir):
            raise EdgeLLMError(f"--onnx {onnx_dir}: not a folder")
        if not os.path.isfile(os.path.join(onnx_dir, "model.onnx")):
            raise EdgeLLMError(f"--onnx {onnx_dir}: no model.onnx in it (a folder from `edgellm convert --format onnx`)")
        try:
            import onnxruntime  # noqa: F401

            from ..runtime import onnx_backend  # noqa: F401
        except ImportError:
            raise EdgeLLMError("the onnxruntime backend needs onnxruntime: pip install 'edgellm[onnx]'") from None
    skipped = {}
    if "llama.cpp" in names:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            if names == ["llama.cpp"]:
                raise EdgeLLMError(f"the llama.cpp backend cannot run: {LLAMA_CPP_MISSING}") from None
            skipped["llama.cpp"] = LLAMA_CPP_MISSING
    return skipped

"""Shared fixtures: the real default model, llama-cpp-python as the reference engine (tiny random models: see
tiny_models.py)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from tiny_models import bytes_to_unicode, write_tiny_llama  # noqa: F401  (tests import them from here too)

DATA = Path(__file__).parent / "data"
REQUIRE = os.environ.get("EDGELLM_REQUIRE_REFERENCES") == "1"  # CI: a missing model or llama.cpp is a failure


def _missing(what: str):
    if REQUIRE:
        pytest.fail(f"{what} is required (EDGELLM_REQUIRE_REFERENCES=1)")
    pytest.skip(f"{what} is not available")


@pytest.fixture(scope="session")
def model_path() -> Path:
    from edgellm.models.catalog import DEFAULT_MODEL
    from edgellm.runtime.fetch import cached_path
    p = cached_path(DEFAULT_MODEL)
    if not p.exists():
        _missing(f"the default model ({p}; run `edgellm pull`)")
    return p


@pytest.fixture(scope="session")
def llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        _missing("llama-cpp-python")
    return llama_cpp


@pytest.fixture(scope="session")
def engine(model_path):
    from edgellm.runtime.engine import Engine
    return Engine(model_path, n_ctx=2048, threads=2)


@pytest.fixture(scope="session")
def text() -> str:
    return (DATA / "shakespeare_60k.txt").read_text(encoding="utf-8")


def llama_cpp_logits(llama_cpp, path, tokens, n_ctx=None, threads=2) -> np.ndarray:
    """Logits (N, V) of every position from llama-cpp-python."""
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx or max(64, len(tokens)), n_batch=512, n_ubatch=512,
                          logits_all=True, n_threads=threads, n_threads_batch=threads, verbose=False)
    llm.eval([int(t) for t in tokens])
    out = np.array(llm.scores[:len(tokens)], dtype=np.float32)
    llm.close()
    return out

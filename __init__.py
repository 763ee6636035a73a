"""edgellm: a CPU-first, on-device LLM inference runtime with Numba kernels."""
import os as _os

__version__ = "0.1.0"

# Numba's parallel kernels run on GNU OpenMP, whose idle workers spin for a long time (GOMP_SPINCOUNT 300000)
# after each parallel region; in prefill they then compete with OpenBLAS's threads for the cores (measured on 2
# cores: 512-token prefill 127 -> 310 tok/s and decode 63 -> 67 tok/s with 10000). libgomp reads it at load, which
# happens at the first parallel kernel, after this import. A value the user sets wins.
_os.environ.setdefault("GOMP_SPINCOUNT", "10000")

__all__ = ["__version__", "load", "generate", "stream_generate", "search"]


class _Converters:
    """The converters (`edgellm.converters`) as the runtime's Hub support takes them (`runtime.hub.
    CheckpointConverter`), imported only when a Hugging Face checkpoint is converted: the runtime sits below the
    converters and does not import them; the top level (`load`, the CLI) hands them in."""

    @property
    def OUTTYPES(self):
        from .converters import OUTTYPES
        return OUTTYPES

    def convert_to_gguf(self, *args, **kwargs):
        from .converters import convert_to_gguf
        return convert_to_gguf(*args, **kwargs)


CONVERTERS = _Converters()


def load(model=None, **kwargs):
    """Load a model: a .gguf path, an ONNX folder, a catalog name, or a Hugging Face repository user/repo[:QUANT]
    (a checkpoint is converted once); default: SmolLM2-135M-Instruct Q4_1. kwargs: runtime.backend.EngineOptions."""
    from .runtime.engine import load as _load
    return _load(model, converter=CONVERTERS, **kwargs)


def generate(model, prompt, **kwargs):
    """Generate text for `prompt`; returns the generated string."""
    from .runtime.generate import generate as _generate
    return _generate(model, prompt, **kwargs)


def stream_generate(model, prompt, **kwargs):
    """Yield `GenerationResponse`s (text pieces + stats) while generating."""
    from .runtime.generate import stream_generate as _sg
    return _sg(model, prompt, **kwargs)


def search(model, prompt, strategy="astar", token_budget=512, prm=None, k=4, step_delimiter="\n\n", **kwargs):
    """Search over reasoning steps under a hard token budget: strategy "astar", "best-of-n", "particle" or
    "greedy"; prm "self" (default), "verifier", "judge", a model path, or any `score(prompt, steps)`.
    Returns a `SearchResult` (answer, steps, final_answer, score, completed, trace); see runtime/search.py."""
    from .runtime.search import search as _search
    return _search(model, prompt, strategy=strategy, token_budget=token_budget, prm=prm, k=k,
                   step_delimiter=step_delimiter, **kwargs)

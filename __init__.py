"""edgellm: a CPU-first, on-device LLM inference runtime with Numba kernels."""
__version__ = "0.1.0"

__all__ = ["__version__", "load", "generate", "stream_generate"]


def load(model=None, **kwargs):
    """Load a model (path to a .gguf or a catalog name; default: SmolLM2-135M-Instruct Q4_1)."""
    from .runtime.engine import load as _load
    return _load(model, **kwargs)


def generate(model, prompt, **kwargs):
    """Generate text for `prompt`; returns the generated string."""
    from .runtime.generate import generate as _generate
    return _generate(model, prompt, **kwargs)


def stream_generate(model, prompt, **kwargs):
    """Yield `GenerationResponse`s (text pieces + stats) while generating."""
    from .runtime.generate import stream_generate as _sg
    return _sg(model, prompt, **kwargs)

"""The errors edgellm reports to users as one clear line (the CLI prints them without a traceback)."""


class EdgeLLMError(Exception):
    """Base class: anything the user can fix (bad file, bad option, unsupported model)."""


class GGUFError(EdgeLLMError):
    """A missing, truncated, corrupted or inconsistent GGUF file."""


class UnsupportedError(EdgeLLMError):
    """A valid file or option that edgellm does not implement (architecture, quant type, feature)."""


class ContextOverflowError(EdgeLLMError):
    """A prompt (or prompt + generation) longer than the context window."""


class HubError(EdgeLLMError):
    """A model named on the Hugging Face Hub that cannot be had: unknown or gated repository, no matching file,
    no network and not in the cache."""


class CacheError(EdgeLLMError):
    """A cache operation that is not possible: truncating past the tokens held or, for a recurrent state, anywhere
    but the start; restoring into a cache that is not empty or from snapshots that do not fit."""

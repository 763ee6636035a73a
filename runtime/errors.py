"""The errors edgellm reports to users as one clear line (the CLI prints them without a traceback): one type per
kind of failure. Messages name parameters as the Python API spells them (`threads`, `kv`, `n_ctx`); `param` says
which, so that a front end can name its own option instead (the CLI: `--threads`, `--kv`, `--ctx`).

Below the runtime, models/ raise `models.config.ConfigError` for metadata they cannot use (the runtime reports it as
a GGUFError naming the file) and kernels/ raise ValueError for sizes they cannot take (the runtime checks first)."""
from __future__ import annotations


class EdgeLLMError(Exception):
    """Base class: anything the user can fix (bad file, bad option, unsupported model)."""

    def __init__(self, message: str = "", param: str | tuple[str, ...] | None = None):
        super().__init__(message)
        self.param = param

    @property
    def params(self) -> tuple[str, ...]:
        """The parameters the message names (first the one at fault)."""
        return () if self.param is None else (self.param,) if isinstance(self.param, str) else tuple(self.param)

    def worded(self, names: dict[str, str]) -> str:
        """The message with each parameter it names called as `names` calls it (e.g. {"threads": "--threads"})."""
        import re
        s = str(self)
        for p in self.params:
            if p in names:
                s = re.sub(rf"(?<![\w-]){re.escape(p)}(?![\w-])", names[p].replace("\\", r"\\"), s, count=1)
        return s


class ModelFileError(EdgeLLMError):
    """A missing, truncated, corrupted or inconsistent model file or folder (GGUF file, ONNX folder, tokenizer
    files)."""


class GGUFError(ModelFileError):
    """A GGUF file that is missing, truncated, corrupted or inconsistent."""


class UnsupportedError(EdgeLLMError):
    """A valid file or option that edgellm does not implement (architecture, quant type, feature)."""


class ArgumentError(EdgeLLMError, ValueError):
    """An option or argument with a value edgellm cannot take (threads < 1, an unknown KV type, token ids outside
    the vocabulary); `param` names it."""


class ContextOverflowError(EdgeLLMError):
    """A prompt (or prompt + generation) longer than the context window."""


class HubError(EdgeLLMError):
    """A model named on the Hugging Face Hub that cannot be had: unknown or gated repository, no matching file,
    no network and not in the cache."""


class CacheError(EdgeLLMError):
    """A cache operation that is not possible: truncating past the tokens held or, for a recurrent state, anywhere
    but the start; restoring into a cache that is not empty or from snapshots that do not fit; a cache of another
    model."""


class ConstraintError(EdgeLLMError):
    """An invalid or unsupported JSON schema, regular expression, grammar or tool definition (reported before
    any token is generated)."""


class InsufficientMemoryError(EdgeLLMError):
    """A load, context or conversion that would need more memory than the machine (or the process's limits) has."""

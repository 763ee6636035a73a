"""HF checkpoint -> (optional variant transform) -> GGUF | ONNX."""
from . import llama  # noqa: F401  (registers LlamaForCausalLM)
from .gguf_convert import CONVERTERS, OUTTYPES, convert_to_gguf  # noqa: F401

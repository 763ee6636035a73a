"""HF checkpoint -> (optional variant transform) -> GGUF | ONNX."""
from . import bitnet, llama  # noqa: F401  (register BitNetForCausalLM, LlamaForCausalLM)
from .gguf_convert import CONVERTERS, OUTTYPES, convert_to_gguf  # noqa: F401

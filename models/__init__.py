"""What a model is: configs, one file per architecture, the registry and the catalog of named models."""
from .bitnet import BitNet
from .deci import Deci
from .linear import LinearLlama
from .llama import Llama
from .mla import DeepSeek2

# runtime architectures, keyed on general.architecture
ARCHITECTURES = {cls.arch: cls for cls in (Llama, BitNet, Deci, LinearLlama, DeepSeek2)}

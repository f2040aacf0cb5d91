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
- `quantize=` hands the loaded model to `llmkit.quant.quantize_model(model, mode)` (module swaps).
- `LLM.generation_defaults`: the sampling settings the model comes with (its generation_config.json or GGUF
  `general.sampling.*`, else what llmkit knows for a known model; see llmkit.generate.defaults). generate /
  chat / stream and the server use them for every knob a call leaves unset; `save_hf` writes them back.
- LLM stays small: the engine adds generate / chat / stream as thin methods over llmkit.generate.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from llmkit.device import resolve_device, resolve_dtype
from llmkit.errors import LlmkitError
from llmkit.hub import DEFAULT_MODEL

if TYPE_CHECKING:
    from llmkit.config import ModelConfig
    from llmkit.model import Transformer
    from llmkit.tokenizer import Tokenizer

class LLM:
    """A loaded model: `.model` (Transformer, eval mode), `.tokenizer`, `.config`, `.name`, `.path`, and
    `.generation_defaults` (SamplingParams fields, e.g. {"temperature": 0.2, "top_p": 0.9}; {} when none),
    and `.draft_model` (None, or a model with the same tokenizer whose greedy drafts speculative decoding
    checks instead of prompt lookup)."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, config: ModelConfig, name: str, path: Path,
                 generation_defaults: dict[str, Any] | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.name = name
        self.path = path
        self.generation_defaults: dict[str, Any] = dict(generation_defaults or {})
        self.draft_model: Transformer | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def save_hf(self, out_dir: str | os.PathLike[str]) -> Path:
        """Write an HF folder (config.json, safetensors, tokenizer, chat template) that transformers loads;
        generation_config.json also carries the generation defaults (so the folder keeps them)."""
        from llmkit.checkpoint.hf import save_hf_dir
        from llmkit.generate.defaults import to_generation_config
        from llmkit.io import atomic_write_json, read_json

        qc = getattr(self.model, "quantization", None)
        if qc:
            raise LlmkitError(f"{self.name}: this model runs quantized ({qc['mode']}); an HF folder holds "
                              "floats: load it with dtype='float32' (CLI: --dtype float32) to save one, or "
                              "keep the quantized weights with llmkit.quant.save_quantized (llmkit quantize)")
        out = save_hf_dir(self.model, self.config, self.tokenizer, Path(out_dir),
                          chat_template=self.tokenizer.chat_template)
        if self.generation_defaults:
            gen_path = out / "generation_config.json"
            gen = read_json(gen_path) if gen_path.is_file() else {}
            atomic_write_json(gen_path, {**gen, **to_generation_config(self.generation_defaults)})
        return out

    def save_gguf(self, path: str | os.PathLike[str], type: str = "f16") -> Path:
        """Write a GGUF file llama.cpp, Ollama and LM Studio run (f32, f16, bf16, q8_0, q4_0, q4_1), with the
        tokenizer, chat template and generation defaults; see llmkit.checkpoint.gguf_write."""
        from llmkit.checkpoint.gguf_write import save_gguf

        return save_gguf(self.model, self.tokenizer, path, type=type,
                         generation_defaults=self.generation_defaults)

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
        from llmkit.quant import weight_count

        qc = getattr(self.model, "quantization", None)
        quant = f", quantized={qc['mode']}" if qc else ""
        return (f"LLM(name={self.name!r}, model_type={self.config.model_type!r}, "
                f"params={weight_count(self.model):,}, device={self.device}, "
                f"dtype={str(self.dtype).removeprefix('torch.')}{quant})")


def load(name_or_path: str | os.PathLike[str] = DEFAULT_MODEL, device: str | torch.device | None = None,
         dtype: str | torch.dtype | None = None, quantize: str | None = None,
         adapter: str | os.PathLike[str] | None = None, context: int | None = None) -> LLM:
    """Load a model by known name, HF repo id, GGUF file or HF folder; pulls it into the cache if needed.
    `adapter`: a LoRA adapter folder in PEFT's format, applied on top (after `quantize`: QLoRA).

    Precision: a block-quantized GGUF runs at its own precision on CPU unless `dtype` or `quantize` says
    otherwise ("auto": Q4 matrices as int4, Q5-Q8 as int8); `quantize="none"` or a dtype asks for floats.
    Before any weight is read, the memory the model needs (weights + KV cache for `context` tokens, default
    4096 + runtime) is compared with what this machine has (llmkit.memory.check_fits): one clear error instead
    of the OOM killer."""
    from llmkit.generate.defaults import model_defaults
    from llmkit.hub import named_model_at, resolve
    from llmkit.tokenizer import Tokenizer

    path = resolve(name_or_path)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    split = device == "auto" and dev.type == "cuda" and not _fits_gpu(path, dt)
    if split:  # the GPU is too small: load on the CPU, then put as many layers on the GPU as fit
        dev = torch.device("cpu")
    if quantize == "none":
        quantize = None
    elif quantize is not None and quantize not in ("int8", "int4"):
        raise LlmkitError(f"quantize={quantize!r}: choose int8, int4 or none")
    gguf_metadata = None

    def fits(config: ModelConfig, precision: Any) -> None:
        from llmkit.memory import check_fits

        check_fits(config, precision, context, dev, name_or_path)

    if path.is_file():
        from llmkit.checkpoint.gguf import load_gguf

        if quantize is None and dtype is None and dev.type == "cpu" and not split:
            quantize = "auto"  # a quantized file runs at its own precision (a float file stays float)
        config, model, gguf_file = load_gguf(path, device=dev, dtype=dt, quantize=quantize, before=fits)
        tokenizer = Tokenizer.from_gguf(gguf_file)
        gguf_metadata = gguf_file.metadata
    else:
        from llmkit.checkpoint.hf import load_hf_dir
        from llmkit.quant import is_quantized_dir, load_quantized

        if is_quantized_dir(path):  # written by `llmkit quantize` (engine area)
            config, model = load_quantized(path, device=dev, before=fits)
        else:
            record = {"mode": quantize, "group_size": 32} if quantize else None
            config, model = load_hf_dir(path, device=dev, dtype=dt, quantize=record, before=fits)
        tokenizer = Tokenizer.load(path)
    if split:
        from llmkit.placement import auto_place

        auto_place(model)
    if adapter is not None:
        from llmkit.lora import load_adapter

        load_adapter(model, adapter)
    model.eval()
    from llmkit.checkpoint.hf import _return_freed_memory

    _return_freed_memory(trim=True)  # what parsing the header and building the tokenizer left on the heap
    defaults, _ = model_defaults(path, known=named_model_at(path), gguf_metadata=gguf_metadata)
    return LLM(model, tokenizer, config, name=os.fspath(name_or_path), path=path,
               generation_defaults=defaults)


def _fits_gpu(path: Path, dtype: torch.dtype) -> bool:
    """Whether the whole model's weights fit the GPU's budget (llmkit.placement.gpu_budget), planned on the
    meta device from the config alone (no weight is read)."""
    from llmkit.config import ModelConfig
    from llmkit.io import read_json
    from llmkit.placement import gpu_budget, plan_layers

    if path.is_file():
        from llmkit.checkpoint.gguf import GGUFFile

        config = GGUFFile(path).config()
    else:
        hf = read_json(path / "config.json")
        hf.pop("quantization_config", None)
        config = ModelConfig.from_hf(hf, source=str(path / "config.json"))
    budget = gpu_budget()
    return budget is None or set(plan_layers(config, budget, dtype=dtype).values()) == {"cuda"}

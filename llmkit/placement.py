"""Layer placement across devices when the GPU is too small for the model: the courses' device_map="auto".

    plan = plan_layers(model.config, budget_bytes=2 << 30, sizes=module_sizes(model))
    # {"model.embed_tokens": "cpu", "model.layers.0": "cuda", ..., "model.layers.29": "cpu", "lm_head": ...}
    place(model, plan)            # each unit moved to its device; the forward follows the hidden state
    plan = auto_place(model)      # the same with the free GPU memory (or $LLMKIT_GPU_BUDGET) as budget

Notable choices:
- A plan is an HF-style device_map {module name: device} over units: the embeddings, each decoder layer,
  the final norm and lm_head. Bytes per unit are measured from the model's own tensors (parameters and
  buffers, shared tensors counted once), so quantized layers count at their real size; for a plan without
  weights, `plan_layers` measures a model built on the meta device in `dtype`.
- Everything on the GPU when it fits. Otherwise greedy in forward order, as accelerate's
  infer_auto_device_map: layers go to the GPU until the next one
  does not fit; that layer and every later one go to the CPU, so the hidden state crosses the bus at most
  twice per forward (into the GPU, back to the CPU). The norm + head go to the GPU if they fit in what
  is left, else to the CPU.
- Untied embeddings stay on the CPU, as llama.cpp keeps its token embeddings: a lookup reads one row per
  token, GPU memory is better spent on matmuls. Tied embeddings share their tensor with lm_head, so the
  two (and the final norm) are one unit, placed first: the GPU when it fits.
- Device names are parameters (`gpu`, `cpu`): tests place a model with gpu="cpu" and compare it with the
  unplaced one; "meta" plans without memory.
- The budget is for weights: `auto_place` takes 90 % of the free GPU memory minus a reserve for the KV
  cache and activations (RESERVE). `LLMKIT_GPU_BUDGET` (bytes, or "2GB", "512MiB") simulates a smaller GPU.
  Without CUDA, `auto_place` does nothing (device auto = cpu).
- The model computes in one dtype on every device (bfloat16 CPU layers are slower than float32 ones on
  many CPUs, but one dtype keeps the residual stream identical wherever it runs).
"""

from __future__ import annotations

import os
import re

import torch
import torch.nn as nn

from llmkit.config import ModelConfig
from llmkit.errors import LlmkitError

RESERVE = 1 << 30  # bytes of free GPU memory auto_place leaves for the KV cache and activations
UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4,
         "ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30, "ti": 1 << 40}


def units(config: ModelConfig) -> list[list[str]]:
    """Placement units in forward order, each a list of module names that move together."""
    embed = ["model.embed_tokens"] + (["model.embed_positions"] if config.pos_encoding == "learned" else [])
    head = ["model.norm", "lm_head"]
    layers = [[f"model.layers.{i}"] for i in range(config.n_layers)]
    if config.tie_embeddings:  # one tensor: the embeddings and the head are one unit, placed first
        return [embed + head, *layers]
    return [embed, *layers, head]


def module_sizes(model: nn.Module) -> dict[str, int]:
    """Bytes of each unit module (parameters and buffers; a tensor shared by two modules counts once, in
    the first in forward order)."""
    seen: set[int] = set()
    sizes = {}
    for unit in units(model.config):
        for name in unit:
            mod = model.get_submodule(name)
            n = 0
            for t in [*mod.parameters(), *mod.buffers()]:
                if id(t) not in seen:
                    seen.add(id(t))
                    n += t.numel() * t.element_size()
            sizes[name] = n
    return sizes


def meta_sizes(config: ModelConfig, dtype: torch.dtype = torch.bfloat16) -> dict[str, int]:
    """module_sizes of an unquantized model of `config` in `dtype`, built on the meta device (no memory)."""
    from llmkit.model import Transformer

    with torch.device("meta"):
        model = Transformer(config).to(dtype)
    return module_sizes(model)


def plan_layers(config: ModelConfig, budget_bytes: int, sizes: dict[str, int] | None = None,
                dtype: torch.dtype = torch.bfloat16, gpu: str = "cuda", cpu: str = "cpu") -> dict[str, str]:
    """Device map {module name: gpu | cpu} putting at most `budget_bytes` of weights on `gpu`: see the
    module docstring for the order. `sizes`: module_sizes(model) (default: meta_sizes(config, dtype))."""
    sizes = sizes if sizes is not None else meta_sizes(config, dtype)
    if sum(sizes.values()) <= budget_bytes:  # it all fits: one device, no hop
        return {name: gpu for unit in units(config) for name in unit}
    plan: dict[str, str] = {}
    left, full = budget_bytes, False
    for unit in units(config):
        n = sum(sizes[name] for name in unit)
        if unit[0] == "model.embed_tokens" and not config.tie_embeddings:
            dev = cpu  # lookups only: no GPU memory for them
        elif unit[0] == "model.norm":  # the head after the layers: where it fits
            dev = gpu if n <= left else cpu
        else:
            full = full or n > left
            dev = cpu if full else gpu
        if dev == gpu:
            left -= n
        plan.update(dict.fromkeys(unit, dev))
    return plan


def place(model: nn.Module, plan: dict[str, str]) -> None:
    """Move each module of `plan` to its device and tell the model where its layers are (the forward moves
    the hidden state between them); the RoPE tables go with the embeddings. One device: plain model.to."""
    config = model.config
    missing = [n for u in units(config) for n in u if n not in plan]
    if missing:
        raise LlmkitError(f"placement plan lacks {', '.join(missing[:3])}; make it with plan_layers")
    if config.tie_embeddings and plan["model.embed_tokens"] != plan["lm_head"]:
        raise LlmkitError("tied embeddings and lm_head share one tensor: place them on the same device")
    devices = {torch.device(d) for d in plan.values()}
    if len(devices) == 1:
        model.to(devices.pop())
        model.layer_devices = None
        return
    for name, dev in plan.items():
        model.get_submodule(name).to(dev)
    embed = torch.device(plan["model.embed_tokens"])
    if config.pos_encoding == "rope":
        model.reset_buffers(embed)
    head = torch.device(plan["lm_head"])
    model.layer_devices = [torch.device(plan[f"model.layers.{i}"]) for i in range(config.n_layers)] + [head]


def parse_bytes(text: str) -> int:
    """ "2GB" -> 2e9, "512MiB" -> 512 * 2**20, "1000" -> 1000; LlmkitError otherwise."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?)?b?\s*", text.lower())
    if not m:
        raise LlmkitError(f"bad byte size {text!r}; write e.g. 2GB, 512MiB or 1000000000")
    return int(float(m[1]) * UNITS[m[2] or ""])


def gpu_budget(gpu: str = "cuda") -> int | None:
    """Bytes of weights the GPU may hold: $LLMKIT_GPU_BUDGET, else 90 % of its free memory minus RESERVE;
    None without CUDA."""
    env = os.environ.get("LLMKIT_GPU_BUDGET")
    if env:
        return parse_bytes(env)
    if not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info(torch.device(gpu))
    return max(0, int(free * 0.9) - RESERVE)


def auto_place(model: nn.Module, budget: int | None = None, gpu: str = "cuda", cpu: str = "cpu"
               ) -> dict[str, str] | None:
    """Place `model` (loaded on the CPU) with at most `budget` bytes of weights on the GPU (None:
    gpu_budget()); return the plan applied, or None without CUDA (the model stays where it is).
    The whole model fitting is a plan too: every unit on the GPU, a plain model.to(gpu)."""
    if gpu.startswith("cuda") and not torch.cuda.is_available():
        return None
    budget = budget if budget is not None else gpu_budget(gpu)
    if budget is None:
        return None
    plan = plan_layers(model.config, budget, sizes=module_sizes(model), gpu=gpu, cpu=cpu)
    place(model, plan)
    return plan

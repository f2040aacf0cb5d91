"""LoRA: a low-rank update added to any projection module, y = base(x) + (alpha / r) * B(A(dropout(x))).

    wrapped = apply_lora(model, r=8, alpha=16)   # wrap q/k/v/o/gate/up/down, freeze everything else
    ... train: only lora_A / lora_B have requires_grad ...
    merge_lora(model)                            # fold B @ A into float weights; wrappers gone

Notable choices:
- `LoRALinear` wraps whatever module sits in the slot (nn.Linear, Int8Linear / Int4Linear, a FusedPart of a
  fused group): it only needs `in_features` / `out_features`. On a quantized base this is QLoRA: the
  quantized forward is differentiable w.r.t. its input, so gradients reach lora_A / lora_B.
- Names follow PEFT's (`base_layer`, `lora_A`, `lora_B`, scaling = alpha / r), and so does the init: A
  kaiming-uniform(a=√5) (nn.Linear's default), B zeros, so a fresh adapter leaves the model unchanged.
- `delta(x)` is the update alone: llmkit.model.layers.project runs the bases of q/k/v (or gate/up) as one
  fused matmul and adds each wrapper's delta, so a LoRA on a fused projection is never bypassed.
- The adapter weights are float32 whatever the base (PEFT's default `autocast_adapter_dtype`: bfloat16
  adapters lose small updates); the update is computed in float32 and cast to the input's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn as nn

from llmkit.errors import LlmkitError
from llmkit.model.layers import FusedPart

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    def __init__(self, base_layer: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0):
        super().__init__()
        if r <= 0:
            raise LlmkitError(f"LoRA rank r must be a positive integer, got {r}")
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        tensors = [*base_layer.parameters(), *base_layer.buffers()]
        device = tensors[0].device if tensors else None
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device)  # float32
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """(alpha / r) * B(A(dropout(x))) (..., out_features), in x's dtype."""
        h = self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype)))  # (..., r)
        return (self.lora_B(h) * self.scaling).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.delta(x)  # (..., out_features)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}"


def lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """(qualified name, wrapper) of every LoRALinear in the model."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def apply_lora(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
               targets: Iterable[str] = TARGETS) -> list[str]:
    """Wrap every projection named in `targets` (the attribute name, e.g. "q_proj") in a LoRALinear, in
    place, and freeze every parameter but the adapters'. Returns the wrapped modules' qualified names."""
    targets = set(targets)
    for p in model.parameters():
        p.requires_grad_(False)
    slots = [(name, parent, attr, child) for name, parent in model.named_modules()
             if not isinstance(parent, LoRALinear)
             for attr, child in parent.named_children()
             if attr in targets and not isinstance(child, LoRALinear) and hasattr(child, "in_features")]
    if not slots:
        raise LlmkitError(f"apply_lora: no projection named {', '.join(sorted(targets))} in the model")
    wrapped = []
    for name, parent, attr, child in slots:
        setattr(parent, attr, LoRALinear(child, r, alpha, dropout))
        wrapped.append(f"{name}.{attr}" if name else attr)
    for _, m in lora_modules(model):  # adapters from an earlier call stay trainable
        m.lora_A.weight.requires_grad_(True)
        m.lora_B.weight.requires_grad_(True)
    return wrapped


def merge_lora(model: nn.Module) -> list[str]:
    """Fold each wrapper's update into its floating-point base (W += (alpha / r) B A) and put the base back
    in the wrapper's place. Returns the merged names. Quantized bases cannot absorb an update: merge on a
    float model, then quantize."""
    found = lora_modules(model)
    for name, m in found:
        base = m.base_layer
        target = base.fused if type(base) is FusedPart else base
        if type(target) is not nn.Linear:
            raise LlmkitError(
                f"merge_lora: {name} wraps a {type(target).__name__}, which cannot absorb the update; "
                "load the model unquantized, apply the adapter, merge, then quantize"
            )
    with torch.no_grad():
        for name, m in found:
            base = m.base_layer
            update = (m.lora_B.weight.float() @ m.lora_A.weight.float()) * m.scaling  # (N, K)
            if type(base) is FusedPart:
                w = base.fused.weight.narrow(0, base.start, base.out_features)
            else:
                w = base.weight
            w.add_(update.to(w.dtype))
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, base)
    return [name for name, _ in found]

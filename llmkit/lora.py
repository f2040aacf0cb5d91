"""LoRA: a low-rank update added to any projection module, y = base(x) + (alpha / r) * B(A(dropout(x))).

    wrapped = apply_lora(model, r=8, alpha=16)   # wrap q/k/v/o/gate/up/down, freeze everything else
    ... train: only lora_A / lora_B have requires_grad ...
    merge_lora(model)                            # fold B @ A into float weights; wrappers gone
    with adapters_disabled(model): ...           # the base model again (DPO / KL reference), no copy

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

import contextlib
import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

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
        self.enabled = True  # False: the wrapper is its base (adapters_disabled)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """(alpha / r) * B(A(dropout(x))) (..., out_features), in x's dtype (zeros while disabled)."""
        if not self.enabled:
            return x.new_zeros(*x.shape[:-1], self.out_features)
        h = self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype)))  # (..., r)
        return (self.lora_B(h) * self.scaling).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.base_layer(x)
        return self.base_layer(x) + self.delta(x)  # (..., out_features)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}"


def lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """(qualified name, wrapper) of every LoRALinear in the model."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


@contextlib.contextmanager
def adapters_disabled(model_or_llm) -> Iterator[nn.Module]:
    """Within the block the model computes its base function (every LoRA update off), as PEFT's
    `disable_adapter()`: the frozen reference of DPO / KL penalties without a second copy of the weights."""
    model = _module(model_or_llm)
    mods = [m for _, m in lora_modules(model)]
    before = [m.enabled for m in mods]
    for m in mods:
        m.enabled = False
    try:
        yield model
    finally:
        for m, on in zip(mods, before):
            m.enabled = on


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


# ---------------------------------------------------------------------------------------- PEFT format
def _module(model_or_llm) -> nn.Module:
    """The Transformer itself, or the one an `llmkit.LLM` holds."""
    return model_or_llm if isinstance(model_or_llm, nn.Module) else model_or_llm.model


PEFT_PREFIX = "base_model.model."
UNSUPPORTED = {"use_dora": "DoRA", "modules_to_save": "modules_to_save", "rank_pattern": "per-module ranks",
               "alpha_pattern": "per-module alphas", "layers_pattern": "layers_pattern"}


def load_adapter(model_or_llm, path: str | os.PathLike) -> list[str]:
    """Apply a LoRA adapter saved in PEFT's format (a folder with adapter_config.json and
    adapter_model.safetensors) onto the model, in place. Returns the wrapped modules' names.

    The modules to wrap are the ones the weights name (PEFT keys `base_model.model.<module>.lora_A.weight`),
    so regex `target_modules` need no interpretation; scaling is lora_alpha / r (lora_alpha / sqrt(r) with
    use_rslora), PEFT's rule. DoRA, per-module ranks, bias training and modules_to_save are refused with one
    line rather than silently ignored."""
    from safetensors.torch import load_file

    from llmkit.io import read_json

    model = _module(model_or_llm)
    folder = Path(path)
    cfg = read_json(folder / "adapter_config.json",
                    missing=f"no adapter_config.json in {folder}: give a PEFT adapter folder")
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise LlmkitError(f"{folder}: peft_type {cfg.get('peft_type')!r} is not supported (LoRA only)")
    for key, what in UNSUPPORTED.items():
        if cfg.get(key):
            raise LlmkitError(f"{folder}: {what} ({key}) is not supported by llmkit's LoRA")
    if cfg.get("bias", "none") != "none":
        raise LlmkitError(f"{folder}: bias={cfg['bias']!r} is not supported (adapters with bias='none' only)")
    weights_file = folder / "adapter_model.safetensors"
    if not weights_file.exists():
        raise LlmkitError(f"no adapter_model.safetensors in {folder} (adapter_model.bin is not read: "
                          "save with safe_serialization=True)")
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    weights = load_file(str(weights_file))
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in weights.items():
        name = key.removeprefix(PEFT_PREFIX)
        for part in ("lora_A", "lora_B"):
            marker = f".{part}."
            if marker in name:
                module, _, rest = name.partition(marker)
                if rest.split(".")[-1] != "weight":
                    break
                found.setdefault(module, {})[part] = value
                break
        else:
            raise LlmkitError(f"{weights_file}: unexpected tensor {key!r} (LoRA A/B weights only)")
    wrapped = []
    for module, ab in sorted(found.items()):
        if set(ab) != {"lora_A", "lora_B"}:
            raise LlmkitError(f"{weights_file}: {module} lacks lora_A or lora_B")
        try:
            child = model.get_submodule(module)
        except AttributeError:
            raise LlmkitError(f"{folder}: the adapter targets {module}, which this model does not have "
                              "(an adapter for another architecture?)") from None
        if isinstance(child, LoRALinear):
            raise LlmkitError(f"{module} already has an adapter: load one adapter per model")
        if not hasattr(child, "in_features"):
            raise LlmkitError(f"{folder}: {module} is not a projection (it is a {type(child).__name__})")
        a, b = ab["lora_A"], ab["lora_B"]
        if a.shape != (r, child.in_features) or b.shape != (child.out_features, r):
            raise LlmkitError(f"{folder}: {module}: shapes {tuple(a.shape)} / {tuple(b.shape)} do not match "
                              f"r={r} and the layer's {child.in_features} -> {child.out_features}")
        lora = LoRALinear(child, r, alpha, 0.0)
        if cfg.get("use_rslora"):
            lora.scaling = alpha / math.sqrt(r)
        with torch.no_grad():
            lora.lora_A.weight.copy_(a)
            lora.lora_B.weight.copy_(b)
        parent, _, attr = module.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, lora)
        wrapped.append(module)
    if not wrapped:
        raise LlmkitError(f"{weights_file} holds no LoRA weights")
    return wrapped


def save_adapter(model_or_llm, path: str | os.PathLike, *, base_model: str | None = None) -> Path:
    """Write the model's LoRA wrappers as a PEFT adapter folder (adapter_config.json +
    adapter_model.safetensors) that `peft.PeftModel.from_pretrained` loads onto the transformers model."""
    from safetensors.torch import save_file

    from llmkit.io import atomic_path, atomic_write_json

    model = _module(model_or_llm)
    mods = lora_modules(model)
    if not mods:
        raise LlmkitError("the model has no LoRA adapter to save (apply_lora first)")
    ranks = {(m.r, m.alpha, math.isclose(m.scaling, m.alpha / math.sqrt(m.r)) and m.r != 1) for _, m in mods}
    if len(ranks) != 1:
        raise LlmkitError("save_adapter: every adapter must share one r, alpha and scaling rule (PEFT's "
                          "single config)")
    (r, alpha, rslora), = ranks
    tensors = {}
    for name, m in mods:
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.weight.detach().float().cpu().contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.weight.detach().float().cpu().contiguous()
    targets = sorted({name.rpartition(".")[2] for name, _ in mods})
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "adapter_model.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    atomic_write_json(out / "adapter_config.json", {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": 0.0,
        "target_modules": targets, "bias": "none", "fan_in_fan_out": False, "use_rslora": rslora,
        "use_dora": False, "modules_to_save": None, "inference_mode": True,
        "base_model_name_or_path": base_model,
        "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {},
    })
    return out

"""Weight-only quantization as nn.Linear module swaps: int8 per output channel, int4 in groups of inputs.

    quantize_model(model, "int8")   # every nn.Linear -> Int8Linear  (1 byte / weight + a scale per row)
    quantize_model(model, "int4")   # every nn.Linear -> Int4Linear  (4 bits / weight + scale, zero per group)

Notable choices:
- int8: symmetric, w ≈ q * s with s = max|w_row| / 127. int4: asymmetric per group of `group_size` inputs
  (default 32, like llama.cpp's Q4_1), w ≈ (q - 8) * s + z with q in 0..15, the convention of PyTorch's
  int4 kernels (gpt-fast / torchao).
- Decode (a few rows of activations) uses PyTorch's own CPU kernels, which read the packed weights directly:
  `torch.ops.aten._weight_int8pack_mm` and `_weight_int4pack_mm_for_cpu` (weights packed once with
  `_convert_weight_to_int4pack_for_cpu`). Their fast paths take bfloat16 activations, so the module computes
  the matmul in bfloat16 (fp32 accumulation inside the kernel) and returns the caller's dtype.
- Prefill (many rows) dequantizes the weight to the activations' dtype once per call and uses the dense GEMM,
  which beats the weight-only kernels from about 16 rows on (the dequantisation is amortised over the rows).
  Not bfloat16 for a float32 model: rounding every weight to bfloat16 flipped SmolLM2 int4's first answer
  token ("L'Étoile" instead of "The capital of France is Paris").
- CUDA: int8 is F.linear on the int8 weight cast to the activation dtype, then the scales; int4 dequantizes.
- int4 mode keeps the lm_head in int8 (as llama.cpp keeps its output matrix at 6-8 bits): on SmolLM2 the
  int4 head alone raised French perplexity from 54.0 to 57.5, int8 head 54.0.
- Tied embeddings: the lm_head gets its own quantized copy; the embedding table stays in floating point
  (a lookup reads one row per token, it costs no bandwidth).
- Projections of the same input (q/k/v, gate/up) run as one matmul: `fuse_projections` replaces the
  members of each group by `FusedPart`s (llmkit/model/layers.py) of one module over their concatenated
  rows; Attention / MLP compute `project(x, q_proj, k_proj, v_proj)`, which sees one group and makes one
  call. No per-call state (thread-safe); the members' own tensors are gone (no duplicate copy), but state
  dicts and saved files keep the per-projection HF names (the parts' state-dict hook writes their slices).
- Quantized modules are differentiable w.r.t. their input (a matmul with a constant weight), so a LoRA on
  a quantized base trains (QLoRA): with an input that requires grad the dequantized GEMM runs, since the
  CPU weight-only kernels have no backward.
- The MoE router (`mlp.gate` of a MoE layer) stays in floating point: routing decisions are fragile.
- Saved folders hold config.json (+ "quantization_config": {"quant_method": "llmkit", "mode", "group_size"}),
  model.safetensors with the quantized tensors in a portable layout (int4 as two nibbles per byte; the
  CPU-kernel packing is redone at load) and the tokenizer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmkit.errors import LlmkitError
from llmkit.io import atomic_path, atomic_write_json, read_json
from llmkit.model.layers import FusedPart, module_tensors, out_dim

MODES = ("int8", "int4")
DENSE_ROWS = 16  # from this many activation rows on, dequantize + dense GEMM
LOW = torch.bfloat16  # activation dtype of the CPU weight-only kernels' fast paths
# The ops looked up once: `torch.ops.aten.name` is three Python attribute lookups per call otherwise.
_INT8_MM = torch.ops.aten._weight_int8pack_mm
_INT4_MM = torch.ops.aten._weight_int4pack_mm_for_cpu


class QuantLinear(nn.Module):
    """Common part of Int8Linear / Int4Linear: shapes, bias, the decode/prefill dispatch."""

    def __init__(self, in_features: int, out_features: int, bias: bool, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, device=device))
        else:
            self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Called ~120 times per decode token: keep the Python here lean (is_cpu, no torch.device objects).
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        if x.is_cpu and x2.shape[0] < DENSE_ROWS and not x.requires_grad:  # the kernels have no backward
            y = self._kernel(x2.to(LOW)).to(x.dtype)  # (M, N)
        else:  # many rows: dequantize once, dense GEMM in the caller's dtype (a bfloat16 copy of the weights
            # rounds each one to 8 bits of mantissa: on SmolLM2 int4 that flipped the first answer token)
            y = F.linear(x2, self.dequantize(x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*shape[:-1], self.out_features)

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _apply(self, fn, recurse=True):
        # .to() / .cuda() move the buffers: drop the kernel-layout copies made from them (remade on next
        # use), so the hot path checks only `is None`, not devices.
        self._low = self._packed = self._sz_low = None
        return super()._apply(fn, recurse)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raise NotImplementedError

    def kernel_bytes(self) -> int:
        """Bytes one decode-step matmul reads (the kernel's weights and scales)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")


class Int8Linear(QuantLinear):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None):
        super().__init__(in_features, out_features, bias, device)
        q = torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        self.register_buffer("qweight", q)
        self.register_buffer("scales", torch.ones(out_features, device=device))  # (N,) float32
        self._low: torch.Tensor | None = None  # scales in the kernel's dtype, made on first use

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> Int8Linear:
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, lin.weight.device)
        w = lin.weight.detach().float()  # (N, K)
        s = (w.abs().amax(dim=1) / 127).clamp(min=1e-10)  # (N,)
        m.qweight.copy_(torch.round(w / s[:, None]).clamp(-127, 127).to(torch.int8))
        m.scales.copy_(s)
        if lin.bias is not None:
            m.bias.copy_(lin.bias.detach().float())
        return m

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.qweight.to(dtype) * self.scales[:, None].to(dtype)).to(dtype)  # (N, K)

    def kernel_bytes(self) -> int:
        return self.qweight.numel() + 2 * self.out_features

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        if self._low is None:
            self._low = self.scales.to(LOW)
        return _INT8_MM(x, self.qweight, self._low)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":  # GPU: weight cast fused by the GEMM caller, then per-channel scales
            y = F.linear(x, self.qweight.to(x.dtype)) * self.scales.to(x.dtype)
            return y + self.bias.to(y.dtype) if self.bias is not None else y
        return super().forward(x)


class Int4Linear(QuantLinear):
    out_dims = {"scales_and_zeros": 1}  # output rows of each tensor are along dim 0, except here

    def __init__(self, in_features: int, out_features: int, bias: bool = False, group_size: int = 32,
                 device=None):
        super().__init__(in_features, out_features, bias, device)
        if in_features % group_size:
            raise LlmkitError(f"int4: in_features {in_features} is not a multiple of group_size {group_size}")
        self.group_size = group_size
        n, k, g = out_features, in_features, in_features // group_size
        self.register_buffer("qweight", torch.zeros(n, k // 2, dtype=torch.uint8, device=device))  # 2 nibbles
        self.register_buffer("scales_and_zeros", torch.zeros(g, n, 2, device=device))  # (K/G, N, 2) float32
        self._packed: torch.Tensor | None = None  # the CPU kernel's layout, made on first use
        self._sz_low: torch.Tensor | None = None

    @classmethod
    def from_linear(cls, lin: nn.Linear, group_size: int = 32) -> Int4Linear:
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, group_size, lin.weight.device)
        n, k = lin.out_features, lin.in_features
        w = lin.weight.detach().float().reshape(n, k // group_size, group_size)  # (N, G, gs)
        lo, hi = w.amin(dim=-1), w.amax(dim=-1)  # (N, G)
        s = ((hi - lo) / 15).clamp(min=1e-10)
        q = torch.round((w - lo[..., None]) / s[..., None]).clamp(0, 15).to(torch.uint8).reshape(n, k)
        m.qweight.copy_(q[:, 0::2] | (q[:, 1::2] << 4))
        m.scales_and_zeros.copy_(torch.stack([s, lo + 8 * s], dim=-1).transpose(0, 1))  # zero = w at q=8
        if lin.bias is not None:
            m.bias.copy_(lin.bias.detach().float())
        return m

    def _unpacked(self) -> torch.Tensor:
        q = torch.stack([self.qweight & 15, self.qweight >> 4], dim=-1)  # (N, K/2, 2)
        return q.reshape(self.out_features, self.in_features)  # (N, K) uint8 in 0..15

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n, k, gs = self.out_features, self.in_features, self.group_size
        s, z = self.scales_and_zeros.to(dtype).transpose(0, 1).unbind(-1)  # (N, G) each
        q = self._unpacked().to(dtype).view(n, k // gs, gs)  # (N, G, gs)
        return ((q - 8) * s[..., None] + z[..., None]).view(n, k)

    def kernel_bytes(self) -> int:
        return self.qweight.numel() + 2 * self.scales_and_zeros.numel()

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is None:
            q = self._unpacked().to(torch.int32)  # (N, K) in 0..15
            self._packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
            self._sz_low = self.scales_and_zeros.to(LOW)
        return _INT4_MM(x, self._packed, self.group_size, self._sz_low)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}"


def _kind(model: nn.Module, parent: nn.Module, lin: nn.Linear, mode: str, group_size: int) -> str:
    """Which module a Linear becomes: int8 for the head in int4 mode and for shapes groups do not divide."""
    if mode == "int4" and parent is not model and lin.in_features % group_size == 0:
        return "int4"
    return "int8"


def _concat(members: list[nn.Module]) -> nn.Module:
    """One module of the members' kind over their output rows concatenated (tensors joined along their
    output dimension)."""
    first = members[0]
    n, bias = sum(m.out_features for m in members), first.bias is not None
    with torch.device("meta"):  # shapes only: the tensors are assigned below
        if type(first) is Int4Linear:
            f: nn.Module = Int4Linear(first.in_features, n, bias, first.group_size)
        elif type(first) is Int8Linear:
            f = Int8Linear(first.in_features, n, bias)
        else:
            f = nn.Linear(first.in_features, n, bias)
    parts = [module_tensors(m) for m in members]
    for name, t in parts[0].items():
        joined = torch.cat([p[name] for p in parts], dim=out_dim(first, name)).detach()
        if isinstance(t, nn.Parameter):
            joined = nn.Parameter(joined, requires_grad=t.requires_grad)
        setattr(f, name, joined)
    return f


def _fusable(mods: list[nn.Module | None]) -> bool:
    """True when the modules are quantized alike or are all plain nn.Linear of one dtype and device."""
    kind = type(mods[0])
    if kind not in (Int8Linear, Int4Linear, nn.Linear) or any(type(m) is not kind for m in mods):
        return False
    keys = set()
    for m in mods:
        t = next(iter(module_tensors(m).values()))  # weight / qweight
        keys.add((m.in_features, m.bias is None, getattr(m, "group_size", None), t.dtype, t.device))
    return len(keys) == 1


def fuse_projections(model: nn.Module) -> list[nn.Module]:
    """Fuse q/k/v and gate/up of every attention / gated MLP whose members are alike (looking through
    LoRA wrappers at their `base_layer`): each member becomes a FusedPart of one shared module. Returns
    the fused modules. Floating-point groups fuse too when asked, but quantize_model is the usual caller."""
    fused = []
    for mod in list(model.modules()):
        for names in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            slots = []  # (owner, attribute) of each member: the module itself or its wrapper's base_layer
            for n in names:
                m = getattr(mod, n, None)
                slots.append((m, "base_layer") if hasattr(m, "base_layer") else (mod, n))
            members = [getattr(owner, attr, None) for owner, attr in slots]
            if not isinstance(members[0], nn.Module) or not _fusable(members):
                continue
            group = _concat(members)
            sizes = [m.out_features for m in members]
            for i, (owner, attr) in enumerate(slots):
                setattr(owner, attr, FusedPart(group, i, sizes))
            fused.append(group)
    return fused


def _targets(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, linear) for every nn.Linear to quantize (MoE routers excluded)."""
    from llmkit.model import MoE

    out = []
    for name, parent in model.named_modules():
        for attr, child in parent.named_children():
            router = isinstance(parent, MoE) and attr == "gate"
            adapter = hasattr(parent, "base_layer") and attr != "base_layer"  # a LoRA's lora_A / lora_B
            if isinstance(child, nn.Linear) and not router and not adapter:
                out.append((parent, attr, child))
    return out


def quantize_model(model: nn.Module, mode: str, group_size: int = 32) -> nn.Module:
    """Swap every nn.Linear of `model` for its quantized version, in place; return the model."""
    if mode not in MODES:
        raise LlmkitError(f"unknown quantization {mode!r}; choose one of {', '.join(MODES)}")
    done: dict[int, nn.Module] = {}  # a Linear shared by several parents (a fused group) is quantized once
    with torch.no_grad():
        for parent, attr, lin in _targets(model):
            if id(lin) not in done:
                if _kind(model, parent, lin, mode, group_size) == "int4":
                    done[id(lin)] = Int4Linear.from_linear(lin, group_size)
                else:
                    done[id(lin)] = Int8Linear.from_linear(lin)
            setattr(parent, attr, done[id(lin)])
    model.quantization = {"quant_method": "llmkit", "mode": mode, "group_size": group_size}
    fuse_projections(model)
    return model


def _empty_quantized(model: nn.Module, qc: dict) -> None:
    """Swap in quantized modules of the right shapes (values come from a state dict)."""
    for parent, attr, lin in _targets(model):
        bias = lin.bias is not None
        if _kind(model, parent, lin, qc["mode"], qc["group_size"]) == "int4":
            q: nn.Module = Int4Linear(lin.in_features, lin.out_features, bias, qc["group_size"])
        else:
            q = Int8Linear(lin.in_features, lin.out_features, bias)
        setattr(parent, attr, q)
    model.quantization = dict(qc)


def save_quantized(model: nn.Module, tokenizer, out_dir: str | os.PathLike[str]) -> Path:
    """Write config.json (+ quantization_config), model.safetensors and the tokenizer to out_dir."""
    from safetensors.torch import save_file

    qc = getattr(model, "quantization", None)
    if not qc:
        raise LlmkitError("save_quantized: the model is not quantized; "
                          "call quantize_model(model, mode) first")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    cfg = model.config.to_hf()
    cfg["quantization_config"] = qc
    if tokenizer is not None:
        tokenizer.save(out)
    with atomic_path(out / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "quantization": json.dumps(qc)})
    atomic_write_json(out / "config.json", cfg)
    return out


def is_quantized_dir(path: str | os.PathLike[str]) -> bool:
    p = Path(path) / "config.json"
    if not p.is_file():
        return False
    qc = read_json(p).get("quantization_config") or {}
    return qc.get("quant_method") == "llmkit"


def load_quantized(path: str | os.PathLike[str], device=None):
    """(config, model) from a folder written by save_quantized."""
    from safetensors.torch import load_file

    from llmkit.config import ModelConfig
    from llmkit.model import Transformer

    path = Path(path)
    hf = read_json(path / "config.json")
    qc = hf.pop("quantization_config")
    config = ModelConfig.from_hf(hf, source=str(path / "config.json"))
    with torch.device("meta"):
        model = Transformer(config)
    _empty_quantized(model, qc)
    expected = set(model.state_dict())
    state = load_file(path / "model.safetensors", device=str(device or "cpu"))
    missing = sorted(expected - set(state) - {"lm_head.weight"})
    if missing:
        raise LlmkitError(f"{path / 'model.safetensors'}: missing tensors {', '.join(missing[:5])}")
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_embeddings and not isinstance(model.lm_head, QuantLinear):
        model.tie_weights()
    model.reset_buffers(device)
    fuse_projections(model)
    return config, model.eval()

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
- Prefill (many rows) dequantizes the weight to bfloat16 once per call and uses the dense GEMM, which beats
  the weight-only kernels from about 16 rows on (the dequantisation is amortised over the rows).
- CUDA: int8 is F.linear on the int8 weight cast to the activation dtype, then the scales; int4 dequantizes.
- int4 mode keeps the lm_head in int8 (as llama.cpp keeps its output matrix at 6-8 bits): on SmolLM2 the
  int4 head alone raised French perplexity from 54.0 to 57.5, int8 head 54.0.
- Tied embeddings: the lm_head gets its own quantized copy; the embedding table stays in floating point
  (a lookup reads one row per token, it costs no bandwidth).
- Projections of the same input (q/k/v, gate/up) run as one matmul: `fuse_projections` gives each group a
  concatenated quantized module, which llmkit's Attention / MLP call directly (`fused_qkv`,
  `fused_gate_up`) and split; the members' own forward is pointed at slices of its output for any other
  caller (the first member called computes all of them). The members keep their own tensors, so state
  dicts and saved files keep the per-projection HF names.
- The MoE router (`mlp.gate` of a MoE layer) stays in floating point: routing decisions are fragile.
- Saved folders hold config.json (+ "quantization_config": {"quant_method": "llmkit", "mode", "group_size"}),
  model.safetensors with the quantized tensors in a portable layout (int4 as two nibbles per byte; the
  CPU-kernel packing is redone at load) and the tokenizer.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmkit.errors import LlmkitError

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
        if x.is_cpu and x2.shape[0] < DENSE_ROWS:
            y = self._kernel(x2.to(LOW)).to(x.dtype)  # (M, N)
        else:
            dt = LOW if x.is_cpu else x.dtype
            y = F.linear(x2.to(dt), self.dequantize(dt)).to(x.dtype)
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


class _FusedGroup:
    """Several quantized projections of one input computed by a single matmul."""

    def __init__(self, members: list[QuantLinear]):
        self.fused = _concat(members)
        self.members = members
        self.bounds = list(torch.tensor([0] + [m.out_features for m in members]).cumsum(0).tolist())
        self.x: torch.Tensor | None = None
        self.y: torch.Tensor | None = None
        self.pending = 0
        for i, m in enumerate(members):
            m.forward = functools.partial(self.part, i)  # instance attribute: overrides the class forward

    def part(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if x is not self.x:  # first member called with this input: compute every member's output
            self.x, self.y, self.pending = x, self.fused(x), len(self.bounds) - 1
        out = self.y[..., self.bounds[i] : self.bounds[i + 1]]
        self.pending -= 1
        if self.pending <= 0:
            self.x = self.y = None  # release the input once every member took its part
        return out


def _concat(members: list[QuantLinear]) -> QuantLinear:
    first = members[0]
    n = sum(m.out_features for m in members)
    bias = first.bias is not None
    if isinstance(first, Int4Linear):
        f: QuantLinear = Int4Linear(first.in_features, n, bias, first.group_size, first.qweight.device)
        f.qweight = torch.cat([m.qweight for m in members])
        f.scales_and_zeros = torch.cat([m.scales_and_zeros for m in members], dim=1)
    else:
        f = Int8Linear(first.in_features, n, bias, first.qweight.device)
        f.qweight = torch.cat([m.qweight for m in members])
        f.scales = torch.cat([m.scales for m in members])
    if bias:
        f.bias = torch.cat([m.bias for m in members])
    return f


def fuse_projections(model: nn.Module) -> list[_FusedGroup]:
    """Fuse q/k/v and gate/up of every attention / dense MLP whose members are quantized alike."""
    groups = []
    for mod in model.modules():
        for names, attr in ((("q_proj", "k_proj", "v_proj"), "fused_qkv"), (("gate_proj", "up_proj"),
                                                                         "fused_gate_up")):
            members = [getattr(mod, n, None) for n in names]
            alike = all(isinstance(m, QuantLinear) for m in members) and len(
                {(type(m), m.in_features, m.bias is None) for m in members}) == 1
            if alike:
                groups.append(_FusedGroup(members))
                if hasattr(mod, attr):  # Attention / MLP call it directly and split the output
                    mod.__dict__[attr] = groups[-1].fused  # plain attribute: no duplicate state-dict keys
    model._fused_groups = groups
    model.fused_projections = nn.ModuleList(g.fused for g in groups)  # moved by .to() with the model
    return groups


def _targets(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, linear) for every nn.Linear to quantize (MoE routers excluded)."""
    from llmkit.model import MoE

    out = []
    for name, parent in model.named_modules():
        for attr, child in parent.named_children():
            if isinstance(child, nn.Linear) and not (isinstance(parent, MoE) and attr == "gate"):
                out.append((parent, attr, child))
    return out


def quantize_model(model: nn.Module, mode: str, group_size: int = 32) -> nn.Module:
    """Swap every nn.Linear of `model` for its quantized version, in place; return the model."""
    if mode not in MODES:
        raise LlmkitError(f"unknown quantization {mode!r}; choose one of {', '.join(MODES)}")
    with torch.no_grad():
        for parent, attr, lin in _targets(model):
            if _kind(model, parent, lin, mode, group_size) == "int4":
                q: nn.Module = Int4Linear.from_linear(lin, group_size)
            else:
                q = Int8Linear.from_linear(lin)
            setattr(parent, attr, q)
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
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if k != "lm_head.weight" and not k.startswith("fused_projections.")}
    cfg = model.config.to_hf()
    cfg["quantization_config"] = qc
    if tokenizer is not None:
        tokenizer.save(out)
    with tempfile.NamedTemporaryFile("wb", dir=out, suffix=".part", delete=False) as f:
        tmp = f.name
    save_file(state, tmp, metadata={"format": "pt", "quantization": json.dumps(qc)})
    os.replace(tmp, out / "model.safetensors")
    _write_json(out / "config.json", cfg)
    return out


def is_quantized_dir(path: str | os.PathLike[str]) -> bool:
    p = Path(path) / "config.json"
    if not p.is_file():
        return False
    qc = json.loads(p.read_text()).get("quantization_config") or {}
    return qc.get("quant_method") == "llmkit"


def load_quantized(path: str | os.PathLike[str], device=None):
    """(config, model) from a folder written by save_quantized."""
    from safetensors.torch import load_file

    from llmkit.config import ModelConfig
    from llmkit.model import Transformer

    path = Path(path)
    hf = json.loads((path / "config.json").read_text())
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


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)

"""Weight-only quantization as nn.Linear module swaps: int8 per output channel, int4 in groups of inputs.

    quantize_model(model, "int8")   # every nn.Linear -> Int8Linear  (1 byte / weight + a scale per row)
    quantize_model(model, "int4")   # every nn.Linear -> Int4Linear  (4 bits / weight + scale, zero per group)

Notable choices:
- int8: symmetric, w ≈ q * s with s = max|w_row| / 127. int4: asymmetric per group of `group_size` inputs
  (default 32, like llama.cpp's Q4_1), w ≈ (q - 8) * s + z with q in 0..15, the convention of PyTorch's
  int4 kernels (gpt-fast / torchao).
- On CPU every matmul (decode and prefill) runs a weight-only kernel that reads the packed weights directly:
  llmkit's own (llmkit/kernels, built on first use by the C compiler). The activations are rounded to
  integers per block of 32 (as llama.cpp does) so each block's dot product is an integer one and the weights
  stream at memory speed: int4 matmuls of SmolLM2 ~1.6x faster than PyTorch's kernel here, the head 2x. By
  default each activation keeps two int8 parts (~15 bits; `kernels.ACTIVATIONS`, LLMKIT_ACTIVATIONS=int8
  for llama.cpp's one part), at the same speed (the weights' memory traffic sets it). French perplexity of
  SmolLM2 Q4_1 as loaded (8 x 512 tokens): fp32 44.20, llmkit 44.24 (one int8 part: 45.0 before the offsets'
  fix in quant.c, then ~44.3), llama.cpp 44.37; and "What is the capital of France?" gets "The capital of
  France is Paris." where llama.cpp (and one int8 part) says "L'Étoile, la Marseillaise,".
  Without a compiler (or with LLMKIT_NO_KERNELS=1): PyTorch's `_weight_int8pack_mm` and
  `_weight_int4pack_mm_for_cpu`, with bfloat16 activations. One path for every row count, and a row's result
  does not depend on the batch, so a sequence's logits are the same however it was batched.
- int4 storage is one copy: the nibbles in the CPU kernel's layout (`pack_int4`: llmkit's is GGUF Q4_1's
  bytes row by row, each quad of blocks interleaved 4 bytes at a time; ATen's is checked once per process
  against its own packing op), scale and zero per group in bfloat16 ((K/G, N, 2), read by both kernels):
  0.625 bytes per weight, vs 0.5625 for GGUF Q4_0. State dicts and saved folders hold the portable layout
  (two nibbles per byte along K), so files do not depend on the CPU.
- Loading streams (llmkit.checkpoint.hf.build_model with a quantization record, `swap_quantized`): modules
  are created empty and filled weight by weight, a few MB of floats at a time (`set_weight`); GGUF blocks
  that already are llmkit's layout are copied (Q4_0 / Q4_1 / Q4_K -> int4, Q8_0 -> the int8 embedding).
  "auto" keeps each matrix at its file's class (4-bit types -> int4, 5-8-bit -> int8).
- CUDA: int8 is F.linear on the int8 weight cast to the activation dtype, then the scales; int4 dequantizes.
- int4 mode keeps the lm_head in int8 (as llama.cpp keeps its output matrix at 6-8 bits): on SmolLM2 the
  int4 head alone raised French perplexity from 54.0 to 57.5, int8 head 54.0. A head the file itself stores
  in 4 bits stays int4 under "auto" (no loss beyond the file's).
- Embedding tables of quantized models: Int8Embedding (blocks of 32, float16 scales: GGUF Q8_0's layout) or
  Int4Embedding when the file's table is 4-bit; a lookup dequantizes the rows it reads. A tied lm_head gets
  its own quantized copy. (`quantize_model`, the post-hoc swap, leaves the table in floating point.)
- Projections of the same input (q/k/v, gate/up) run as one matmul: `fuse_projections` replaces the
  members of each group by `FusedPart`s (llmkit/model/layers.py) of one module over their concatenated
  rows; Attention / MLP compute `project(x, q_proj, k_proj, v_proj)`, which sees one group and makes one
  call. No per-call state (thread-safe); the members' own tensors are gone (no duplicate copy), but state
  dicts and saved files keep the per-projection HF names (the parts' state-dict hook writes their slices).
- Quantized modules are differentiable w.r.t. their input (a matmul with a constant weight), so a LoRA on
  a quantized base trains (QLoRA): with an input that requires grad the dequantized GEMM runs, since the
  CPU weight-only kernels have no backward.
- Saved folders hold config.json (+ "quantization_config": {"quant_method": "llmkit", "mode", "group_size",
  "kinds", "embedding"}), model.safetensors with the quantized tensors in the portable layout, and the
  tokenizer. (The load cache, llmkit/checkpoint/cache.py, keeps the packed layout instead.)
- The MoE router (`mlp.gate` of a MoE layer) stays in floating point: routing decisions are fragile.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmkit import kernels
from llmkit.errors import LlmkitError
from llmkit.io import atomic_path, atomic_write_json, read_json
from llmkit.model.layers import FusedPart, empty_weights, module_tensors, out_dim

MODES = ("int8", "int4")
DENSE_ROWS = 1 << 30  # CPU: the weight-only kernels for every row count (see the module notes)
LOW = torch.bfloat16  # activation dtype of the CPU weight-only kernels' fast paths
# The ops looked up once: `torch.ops.aten.name` is three Python attribute lookups per call otherwise.
_INT8_MM = torch.ops.aten._weight_int8pack_mm
_INT4_MM = torch.ops.aten._weight_int4pack_mm_for_cpu


CHUNK = 1 << 22  # values quantized at a time: float copies stay ~16 MB whatever the tensor's size


def _float_rows(src, a: int, b: int) -> torch.Tensor:
    """Rows a..b of a float tensor or of GGUF blocks (dequantized), as float32."""
    if hasattr(src, "rows"):
        return src.rows(a, b).dequantize()
    return src[a:b].float()


def _chunks(n: int, k: int):
    step = max(64, CHUNK // max(k, 1) // 64 * 64)  # whole blocks of the int4 kernel's rows (32 or 64)
    for a in range(0, n, step):
        yield a, min(n, a + step)


def _int4_rows(src, a: int, b: int, gs: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows a..b of a weight as 4-bit affine groups: (nibbles (rows, K) uint8, scale, value at nibble 0 (rows,
    K/gs) float32). Blocks that already are such groups (`.int4(gs)`: GGUF Q4_0 / Q4_1 / Q4_K) are taken as
    they are; floats get min/max groups on the grid the stored bfloat16 scale and zero can express."""
    part = src.rows(a, b) if hasattr(src, "rows") else src[a:b]
    exact = part.int4(gs) if hasattr(part, "int4") else None
    if exact is not None:
        return exact
    w = (part.dequantize() if hasattr(part, "dequantize") else part).float().view(b - a, -1, gs)
    wmin, wmax = w.amin(dim=-1), w.amax(dim=-1)  # (rows, G)
    sc = ((wmax - wmin) / 15).clamp(min=1e-10).to(LOW).float()
    z = (wmin + 8 * sc).to(LOW).float()
    q = torch.round((w - z[..., None]) / sc[..., None] + 8).clamp(0, 15).to(torch.uint8)
    return q.view(b - a, -1), sc, z - 8 * sc


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
            y = self._kernel(x2)  # (M, N) in x's dtype
        else:  # training (QLoRA) or beyond DENSE_ROWS: dequantize once, dense GEMM in the caller's dtype
            y = F.linear(x2, self.dequantize(x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*shape[:-1], self.out_features)

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _apply(self, fn, recurse=True):
        # .to() / .cuda() move the buffers: drop the kernel-layout copies made from them (remade on next
        # use), so the hot path checks only `is None`, not devices.
        self._low = self._sz_low = None
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
        m.set_weight(lin.weight.detach())
        if lin.bias is not None:
            m.bias.copy_(lin.bias.detach().float())
        return m

    def set_weight(self, src) -> None:
        """Fill from a float (N, K) weight, or from anything with `.dequantize()` (a GGUF tensor's blocks,
        dequantized for this one tensor only), symmetric per row."""
        n, k = self.out_features, self.in_features
        q = torch.empty(n, k, dtype=torch.int8)
        s = torch.empty(n)
        for a, b in _chunks(n, k):
            w = _float_rows(src, a, b)  # (rows, K) float32
            s[a:b] = (w.abs().amax(dim=1) / 127).clamp(min=1e-10)
            q[a:b] = torch.round(w / s[a:b, None]).clamp(-127, 127).to(torch.int8)
        dev = self.qweight.device if self.qweight.device.type != "meta" else torch.device("cpu")
        self.qweight, self.scales = q.to(dev), s.to(dev)
        self._low = None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.qweight.to(dtype) * self.scales[:, None].to(dtype)).to(dtype)  # (N, K)

    def kernel_bytes(self) -> int:
        return self.qweight.numel() + 2 * self.out_features

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        if _use_kernels() and self.in_features % 32 == 0:
            return kernels.q8_mm(x, self.qweight, self.scales).to(x.dtype)
        if self._low is None:
            self._low = self.scales.to(LOW)
        return _INT8_MM(x.to(LOW), self.qweight, self._low).to(x.dtype)

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
        # (K/G, N, 2): scale and zero per group, in the CPU kernel's dtype (one copy, no float32 twin)
        self.register_buffer("scales_and_zeros", torch.zeros(g, n, 2, dtype=LOW, device=device))
        self.packed = False  # qweight in the CPU kernel's layout (see pack_int4), not the portable one
        self.sz_rows = 0  # > 0: scales_and_zeros holds its pairs in blocks of this many rows (block_scales_)
        self._sz_low: torch.Tensor | None = None
        self._register_state_dict_hook(_portable_state)

    @classmethod
    def from_linear(cls, lin: nn.Linear, group_size: int = 32) -> Int4Linear:
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, group_size, lin.weight.device)
        m.set_weight(lin.weight.detach())
        if lin.bias is not None:
            m.bias.copy_(lin.bias.detach().float())
        return m

    def set_weight(self, src) -> None:
        """Fill from a float (N, K) weight (min/max per group) or from blocks that are already 4-bit affine
        groups of this size (`src.int4()` -> nibbles (N, K) uint8, scale, zero-at-q=0 (N, K/G)): a GGUF
        Q4_0 / Q4_1 / Q4_K tensor is repacked, not dequantized."""
        n, k, gs = self.out_features, self.in_features, self.group_size
        pack = self.qweight.device.type in ("cpu", "meta") and _packable(n, k, gs)  # it will run on the CPU
        qw = torch.empty(n, k // 2, dtype=torch.uint8)  # two nibbles per byte
        sz = torch.empty(k // gs, n, 2, dtype=LOW)  # (K/G, N, 2): scale, zero
        for a, b in _chunks(n, k):  # a few MB at a time, whatever the tensor's size
            q, sc, lo = _int4_rows(src, a, b, gs)
            sz[:, a:b, 0], sz[:, a:b, 1] = sc.t(), (lo + 8 * sc).t()
            if pack:  # straight into the CPU kernel's layout (chunks start on whole row blocks)
                qw[a:b] = pack_int4(q)
            else:
                qw[a:b] = q[:, 0::2] | (q[:, 1::2] << 4)
        dev = self.qweight.device if self.qweight.device.type != "meta" else torch.device("cpu")
        self.qweight, self.scales_and_zeros = qw.to(dev), sz.to(dev)
        self.packed, self.sz_rows = pack, 0
        self._sz_low = None

    def _unpacked(self) -> torch.Tensor:
        """The nibbles as (N, K) uint8 in 0..15, from either layout."""
        if self.packed:
            return unpack_int4(self.qweight, self.out_features, self.in_features)
        q = torch.stack([self.qweight & 15, self.qweight >> 4], dim=-1)  # (N, K/2, 2)
        return q.reshape(self.out_features, self.in_features)

    def block_scales_(self) -> None:
        """In place (same storage): the (s, z) pairs in blocks of kernels.RB rows, where llmkit's kernels
        read a row's pairs from one stretch of memory (decode: ~10 % faster matmuls). For the native decode
        step (llmkit.generate.native); the kernels and every method here read either layout, and moves,
        state dicts and unpack_ bring the standard one back."""
        if not self.sz_rows and self.packed and _use_kernels():
            self.scales_and_zeros.copy_(kernels.block_rows(self.scales_and_zeros))
            self.sz_rows, self._sz_low = kernels.RB, None

    def _standard_sz(self) -> torch.Tensor:
        """scales_and_zeros in the standard (K/G, N, 2) layout (a copy when it is blocked)."""
        sz = self.scales_and_zeros
        return kernels.unblock_rows(sz, self.sz_rows) if self.sz_rows else sz

    def unpack_(self) -> None:
        """Back to the portable layout (two nibbles per byte along K), e.g. before concatenating rows."""
        if self.sz_rows:
            self.scales_and_zeros.copy_(self._standard_sz())
            self.sz_rows, self._sz_low = 0, None
        if self.packed:
            q = self._unpacked()
            self.qweight = q[:, 0::2] | (q[:, 1::2] << 4)
            self.packed = False

    def pack_(self) -> None:
        """To the CPU kernel's layout, in place: one copy of the weights, never two."""
        if not self.packed and self.qweight.is_cpu and _packable(self.out_features, self.in_features,
                                                                 self.group_size):
            self.qweight = pack_int4(self._unpacked())
            self.packed = True

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n, k, gs = self.out_features, self.in_features, self.group_size
        s, z = self._standard_sz().to(dtype).transpose(0, 1).unbind(-1)  # (N, G) each
        q = self._unpacked().to(dtype).view(n, k // gs, gs)  # (N, G, gs)
        return ((q - 8) * s[..., None] + z[..., None]).view(n, k)

    def kernel_bytes(self) -> int:
        return self.qweight.numel() + 2 * self.scales_and_zeros.numel()

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        if not self.packed:
            self.pack_()
            if not self.packed:  # a shape or group size no CPU kernel takes
                return F.linear(x, self.dequantize(x.dtype))
        if self._sz_low is None:
            sz = self.scales_and_zeros
            self._sz_low = sz if sz.dtype == LOW else sz.to(LOW)
        if _use_kernels():
            return kernels.q4_mm(x, self.qweight, self._sz_low, self.group_size, rb=self.sz_rows).to(x.dtype)
        return _INT4_MM(x.to(LOW), self.qweight, self.group_size, self._sz_low).to(x.dtype)

    def _apply(self, fn, recurse=True):
        self.unpack_()  # moves and casts see the portable layout; the kernel repacks on its next call
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kw):
        self.unpack_()  # state dicts hold the portable layout
        super()._load_from_state_dict(*args, **kw)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}"


class QuantEmbedding(nn.Module):
    """Common part of Int8Embedding / Int4Embedding: shapes, the output dtype (the model's compute dtype,
    following .to(dtype)), repr. A lookup dequantizes only the rows it reads."""

    bits = 8

    def __init__(self, num_embeddings: int, embedding_dim: int, group_size: int = 32,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if embedding_dim % group_size:
            raise LlmkitError(f"int{self.bits} embedding: dim {embedding_dim} is not a multiple of "
                              f"{group_size}")
        self.num_embeddings, self.embedding_dim, self.group_size = num_embeddings, embedding_dim, group_size
        self.out_dtype = dtype

    def _apply(self, fn, recurse=True):
        self.out_dtype = fn(torch.zeros((), dtype=self.out_dtype)).dtype  # model.to(dtype) changes outputs
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, group_size={self.group_size}"


class Int8Embedding(QuantEmbedding):
    """An embedding table in int8, symmetric per block of `group_size` values of a row, float16 scales (GGUF
    Q8_0's layout: that tensor is copied, not converted); ~1.06 bytes per value instead of 4."""

    def __init__(self, num_embeddings: int, embedding_dim: int, group_size: int = 32, device=None,
                 dtype: torch.dtype = torch.float32):
        super().__init__(num_embeddings, embedding_dim, group_size, dtype)
        g = embedding_dim // group_size
        q = torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8, device=device)
        self.register_buffer("qweight", q)
        self.register_buffer("scales", torch.ones(num_embeddings, g, dtype=torch.float16, device=device))

    def set_weight(self, src) -> None:
        """Fill from a float (V, d) table or blocks with `.int8(group_size)` -> (q (V, d) int8, scales)."""
        v, d, gs = self.num_embeddings, self.embedding_dim, self.group_size
        q, s = torch.empty(v, d, dtype=torch.int8), torch.empty(v, d // gs, dtype=torch.float16)
        for a, b in _chunks(v, d):
            part = src.rows(a, b) if hasattr(src, "rows") else src[a:b]
            exact = part.int8(gs) if hasattr(part, "int8") else None
            if exact is not None:
                q[a:b], s[a:b] = exact
                continue
            w = (part.dequantize() if hasattr(part, "dequantize") else part).float().view(b - a, -1, gs)
            s[a:b] = (w.abs().amax(dim=-1) / 127).clamp(min=1e-7).to(torch.float16)  # (rows, G)
            q[a:b] = torch.round(w / s[a:b].float()[..., None]).clamp(-127, 127).to(torch.int8).view(b - a, d)
        dev = self.qweight.device if self.qweight.device.type != "meta" else torch.device("cpu")
        self.qweight, self.scales = q.to(dev), s.to(torch.float16).to(dev)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        v, d, gs = self.num_embeddings, self.embedding_dim, self.group_size
        return (self.qweight.view(v, d // gs, gs).to(dtype) * self.scales.to(dtype)[..., None]).view(v, d)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        gs = self.group_size
        q = self.qweight[ids]  # (..., d) int8
        s = self.scales[ids].to(self.out_dtype)  # (..., G)
        return (q.view(*q.shape[:-1], -1, gs).to(self.out_dtype) * s[..., None]).flatten(-2)


class Int4Embedding(QuantEmbedding):
    """An embedding table kept in 4 bits when the file stores it so (GGUF Q4_0 / Q4_1 / Q4_K: repacked, the
    file's values up to bfloat16 scales): two nibbles per byte, a (scale, zero) per group, as Int4Linear."""

    bits = 4

    def __init__(self, num_embeddings: int, embedding_dim: int, group_size: int = 32, device=None,
                 dtype: torch.dtype = torch.float32):
        super().__init__(num_embeddings, embedding_dim, group_size, dtype)
        g = embedding_dim // group_size
        q = torch.zeros(num_embeddings, embedding_dim // 2, dtype=torch.uint8, device=device)
        self.register_buffer("qweight", q)
        self.register_buffer("scales_and_zeros", torch.zeros(num_embeddings, g, 2, dtype=LOW, device=device))

    def set_weight(self, src) -> None:
        v, d, gs = self.num_embeddings, self.embedding_dim, self.group_size
        qw = torch.empty(v, d // 2, dtype=torch.uint8)
        sz = torch.empty(v, d // gs, 2, dtype=LOW)
        for a, b in _chunks(v, d):
            q, sc, lo = _int4_rows(src, a, b, gs)
            qw[a:b] = q[:, 0::2] | (q[:, 1::2] << 4)
            sz[a:b] = torch.stack([sc, lo + 8 * sc], dim=-1).to(LOW)
        self.qweight, self.scales_and_zeros = qw, sz

    def _rows(self, q: torch.Tensor, sz: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        gs = self.group_size
        nib = torch.stack([q & 15, q >> 4], dim=-1).flatten(-2)  # (..., d) in 0..15
        nib = nib.view(*q.shape[:-1], -1, gs).to(dtype)
        sz = sz.to(dtype)
        return ((nib - 8) * sz[..., :1] + sz[..., 1:]).flatten(-2)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self._rows(self.qweight, self.scales_and_zeros, dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self._rows(self.qweight[ids], self.scales_and_zeros[ids], self.out_dtype)


def _portable_state(module: Int4Linear, state: dict, prefix: str, local_metadata: dict) -> None:
    """State dicts always hold the portable layout (files stay valid on any CPU)."""
    key = prefix + "qweight"
    if module.packed and key in state:
        q = module._unpacked()
        state[key] = q[:, 0::2] | (q[:, 1::2] << 4)
    if module.sz_rows and prefix + "scales_and_zeros" in state:
        state[prefix + "scales_and_zeros"] = module._standard_sz()


# ---------------------------------------------------------------- the CPU int4 kernel's weight layout
# `_convert_weight_to_int4pack_for_cpu` (ATen int4mm_kernel.cpp) stores the nibbles of N rows x K in
# blocks of BLOCK_N rows (64 with AVX-512, 32 otherwise), each block k-major: a full vectorised block
# puts rows [0, BLOCK_N/2) in the low nibbles, [BLOCK_N/2, BLOCK_N) in the high ones (BLOCK_N/2 bytes per k);
# a partial block (and the non-vectorised build) pairs neighbouring rows (n | n+1 << 4). We pack and unpack
# that layout with tensor ops (no int32 copy of the weights, as the ATen op needs), after checking once per
# process against the ATen op which of the known layouts this build uses.
_LAYOUTS = ((64, True), (32, True), (32, False))  # (BLOCK_N, full blocks split in halves)
LLMKIT_LAYOUT = (1, None)  # llmkit's own kernel (llmkit/kernels): rows whole, GGUF's bytes, quads interleaved
_layout: tuple[int, bool | None] | None = None  # this process's layout


def _packable(n: int, k: int, group_size: int) -> bool:
    """Whether an (n, k) int4 weight in groups of group_size fits this process's kernel."""
    return k % 32 == 0 and group_size in kernels.GSHIFT if _use_kernels() else n % 16 == 0


def _use_kernels() -> bool:
    return _cpu_layout() == LLMKIT_LAYOUT


def _cpu_layout() -> tuple[int, bool | None]:
    """This process's int4 kernel layout: llmkit's own when its kernels are built (llmkit.kernels), else
    the ATen op's, probed once."""
    global _layout
    if _layout is None:
        _layout = LLMKIT_LAYOUT if kernels.available() else _aten_layout()
    return _layout


_aten: tuple[int, bool] | None = None


def _aten_layout() -> tuple[int, bool]:
    """The layout of ATen's `_weight_int4pack_mm_for_cpu` in this build (probed once)."""
    global _aten
    if _aten is None:
        probe = torch.randint(0, 16, (144, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        want = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe.to(torch.int32), 1).flatten()
        for cand in _LAYOUTS:
            if torch.equal(_pack(probe, *cand).flatten(), want):
                _aten = cand
                break
        else:
            raise LlmkitError("this PyTorch build packs int4 weights in an unknown layout; "
                              "report it with `python -c 'import torch; print(torch.__config__.show())'`")
    return _aten


def _pack(q: torch.Tensor, block: int, halves: bool) -> torch.Tensor:
    n, k = q.shape
    full = n // block * block
    parts = []
    if full:
        b = q[:full].view(full // block, block, k).transpose(1, 2)  # (NB, K, BLOCK_N)
        if halves:
            h = block // 2
            parts.append((b[..., :h] | (b[..., h:] << 4)).flatten())
        else:
            parts.append((b[..., 0::2] | (b[..., 1::2] << 4)).flatten())
    if full < n:
        t = q[full:].t()  # (K, nb)
        parts.append((t[:, 0::2] | (t[:, 1::2] << 4)).flatten())
    return torch.cat(parts).view(n, k // 2) if len(parts) > 1 else parts[0].view(n, k // 2)


def int4_layout_name() -> str:
    """This process's int4 kernel layout: "q4x" (llmkit's kernels: GGUF's bytes, quads of blocks interleaved;
    plain "q4" was GGUF's order alone), or ATen's "32h" (AVX2) / "64h" (AVX-512):
    part of the load cache's key."""
    if _use_kernels():
        return "q4x"
    block, halves = _cpu_layout()
    return f"{block}{'h' if halves else 'p'}"


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(N, K) uint8 nibbles -> (N, K/2) uint8 in the CPU kernel's layout."""
    if _use_kernels():
        return kernels.pack_q4(q)
    return _pack(q, *_cpu_layout())


def unpack_int4(p: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Inverse of pack_int4: (N, K/2) kernel layout -> (N, K) uint8 nibbles."""
    if _use_kernels():
        return kernels.unpack_q4(p, n, k)
    return _unpack(p, n, k, *_cpu_layout())


def _unpack(p: torch.Tensor, n: int, k: int, block: int, halves: bool) -> torch.Tensor:
    flat = p.reshape(-1)
    full = n // block * block
    out = torch.empty(n, k, dtype=torch.uint8, device=p.device)
    if full:
        b = flat[: full * k // 2].view(full // block, k, block // 2)
        lo, hi = b & 15, b >> 4
        rows = torch.cat([lo, hi], dim=-1) if halves else torch.stack([lo, hi], dim=-1).flatten(-2)
        out[:full] = rows.transpose(1, 2).reshape(full, k)  # (NB, BLOCK_N, K)
    if full < n:
        t = flat[full * k // 2:].view(k, (n - full) // 2)
        out[full:] = torch.stack([t & 15, t >> 4], dim=-1).flatten(-2).t()
    return out


def weight_count(model: nn.Module) -> int:
    """Parameters of the model as trained: floats plus the weights the quantized modules hold (shared
    tensors and fused groups once)."""
    n, seen = 0, set()
    if getattr(getattr(model, "config", None), "tie_embeddings", False):
        seen.add(id(getattr(model, "lm_head", None)))  # a tied head's own quantized copy: the table's weights
    for m in model.modules():
        if isinstance(m, (QuantLinear, QuantEmbedding)) and id(m) not in seen:
            seen.add(id(m))
            n += m.out_features * m.in_features if isinstance(m, QuantLinear) else \
                m.num_embeddings * m.embedding_dim
    return n + sum(p.numel() for p in model.parameters())


def _kind(model: nn.Module, parent: nn.Module, lin: nn.Linear, mode: str, group_size: int) -> str:
    """Which module a Linear becomes: int8 for the head in int4 mode and for shapes int4 cannot take."""
    return "int4" if mode == "int4" and _int4_ok(model, parent, lin, group_size) else "int8"


def _int4_shape(lin: nn.Linear, group_size: int) -> bool:
    return lin.in_features % group_size == 0 and lin.out_features % 16 == 0


def _int4_ok(model: nn.Module, parent: nn.Module, lin: nn.Linear, group_size: int) -> bool:
    """int4 needs whole groups along K and rows in multiples of 16 (the CPU kernel packs so); not the head."""
    return parent is not model and lin.in_features % group_size == 0 and lin.out_features % 16 == 0


def _concat(members: list[nn.Module]) -> nn.Module:
    """One module of the members' kind over their output rows concatenated (tensors joined along their
    output dimension)."""
    first = members[0]
    if isinstance(first, Int4Linear):  # packed rows concatenate when every member is whole row blocks
        block = _cpu_layout()[0]
        packed = all(m.packed for m in members) and all(m.out_features % block == 0 for m in members)
        for m in members:
            if not packed:
                m.unpack_()
    n, bias = sum(m.out_features for m in members), first.bias is not None
    with empty_weights():  # shapes only: the tensors are assigned below
        if type(first) is Int4Linear:
            f: nn.Module = Int4Linear(first.in_features, n, bias, first.group_size)
        elif type(first) is Int8Linear:
            f = Int8Linear(first.in_features, n, bias)
        else:
            f = nn.Linear(first.in_features, n, bias)
    parts = [module_tensors(m) for m in members]
    for name, t in parts[0].items():
        dim = out_dim(first, name)
        if t.is_meta:  # shapes only (the load cache's skeleton): meta torch.cat would import torch._dynamo
            shape = list(t.shape)
            shape[dim] = sum(p[name].shape[dim] for p in parts)
            joined = torch.empty(shape, dtype=t.dtype, device="meta")
        else:
            joined = torch.cat([p[name] for p in parts], dim=dim).detach()
        if isinstance(t, nn.Parameter):
            joined = nn.Parameter(joined, requires_grad=t.requires_grad)
        setattr(f, name, joined)
    if isinstance(first, Int4Linear):
        f.packed = packed
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
    for name in [n for n, _ in model.named_modules()]:  # names, not modules: a list of the modules would keep
        mod = model.get_submodule(name)  # every replaced member alive until the end (2x the weights' peak)
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


# GGML types -> the llmkit module a matrix of that type becomes at the file's own precision ("auto")
INT4_SOURCES = {"Q4_0", "Q4_1", "Q4_K", "Q2_K", "Q3_K"}
INT8_SOURCES = {"Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0"}


def auto_precision(types: dict[str, str]) -> str | None:
    """The precision a file's own quantization maps to: "int4" when most matrix bytes are <= 4.5-bit types,
    "int8" for 5-8-bit types, None for a float file. `types`: weight name -> GGML type name."""
    kinds = [_source_kind(t) for t in types.values()]
    if "int4" in kinds:
        return "int4"
    return "int8" if "int8" in kinds else None


def _source_kind(ggml_type: str | None) -> str | None:
    if ggml_type in INT4_SOURCES:
        return "int4"
    return "int8" if ggml_type in INT8_SOURCES else None


def swap_quantized(model: nn.Module, record: dict, dtype: torch.dtype = torch.float32
                   ) -> dict[str, nn.Module]:
    """Swap the Linear layers of a (meta) model for empty quantized modules as `record` says, and the
    embedding table for an Int8Embedding when asked; return weight name -> module, for the loader to fill.

    record: {"mode": "int4" | "int8" | "auto", "group_size": 32, "embedding": "int8" | "int4" | False (absent:
    the mode decides), and either "kinds"
    (module name -> "int4" / "int8", as saved) or, for "auto", "types" (weight name -> GGML type: each matrix
    keeps its file's precision class; a 4-bit head stays int4, others int8)}. model.quantization gets the
    record
    with "kinds" filled in (what save_quantized and the load cache write)."""
    mode, gs = record["mode"], record.get("group_size", 32)
    if mode not in (*MODES, "auto"):
        raise LlmkitError(f"unknown quantization {mode!r}; choose one of {', '.join(MODES)}")
    types = record.get("types") or {}
    kinds: dict[str, str] = dict(record.get("kinds") or {})
    names = {id(m): n for n, m in model.named_modules()}
    out: dict[str, nn.Module] = {}
    tied = getattr(getattr(model, "config", None), "tie_embeddings", False)
    for parent, attr, lin in _targets(model):
        name = f"{names[id(parent)]}.{attr}".lstrip(".")
        if "kinds" not in record:
            if mode == "auto":
                head_src = "model.embed_tokens.weight" if name == "lm_head" and tied else name + ".weight"
                src = types.get(head_src)
                kind = _source_kind(src)
                head = parent is model  # a 4-bit head in the file stays 4-bit (repacked, no loss added)
                fits = _int4_ok(model, parent, lin, gs) or (head and _int4_shape(lin, gs))
                if kind == "int4" and not fits:
                    kind = "int8"
                if kind is None:
                    continue
            else:
                kind = _kind(model, parent, lin, mode, gs)
            kinds[name] = kind
        kind = kinds.get(name)
        if kind is None:
            continue
        with empty_weights():
            if kind == "int4":
                q: nn.Module = Int4Linear(lin.in_features, lin.out_features, lin.bias is not None, gs)
            else:
                q = Int8Linear(lin.in_features, lin.out_features, lin.bias is not None)
        setattr(parent, attr, q)
        out[name + ".weight"] = q
    emb = record.get("embedding")
    if emb is True:  # records written before 4-bit tables existed
        emb = "int8"
    if emb is None:  # "auto": the table's class (4 / 8 bits) when the file quantizes it; int4 / int8: int8
        emb = _source_kind(types.get("model.embed_tokens.weight")) if mode == "auto" else "int8"
    table = model.model.embed_tokens
    if emb and table.embedding_dim % gs == 0 and (not tied or "lm_head" in kinds):
        cls = Int4Embedding if emb == "int4" else Int8Embedding
        with empty_weights():
            emb_q = cls(table.num_embeddings, table.embedding_dim, gs, dtype=dtype)
        model.model.embed_tokens = emb_q
        out["model.embed_tokens.weight"] = model.model.embed_tokens
    else:
        emb = False
    model.quantization = {"quant_method": "llmkit", "mode": mode, "group_size": gs, "kinds": kinds,
                          "embedding": emb or False}
    return out


def finish_quantized(model: nn.Module, device: torch.device | str | None = None) -> nn.Module:
    """After the weights are in: move to `device`, fuse q/k/v and gate/up, pack int4 for the CPU kernel."""
    device = torch.device(device or "cpu")
    if device.type != "cpu":
        model.to(device)
    fuse_projections(model)
    if device.type == "cpu":
        for m in model.modules():
            if isinstance(m, Int4Linear):
                m.pack_()
    return model


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


def load_quantized(path: str | os.PathLike[str], device=None, before=None):
    """(config, model) from a folder written by save_quantized."""
    from safetensors.torch import load_file

    from llmkit.config import ModelConfig
    from llmkit.model import Transformer

    path = Path(path)
    hf = read_json(path / "config.json")
    qc = hf.pop("quantization_config")
    config = ModelConfig.from_hf(hf, source=str(path / "config.json"))
    if before is not None:  # e.g. the memory check, before any weight is read
        kinds = set((qc.get("kinds") or {}).values())
        before(config, qc["mode"] if qc["mode"] != "auto" else ("int4" if "int4" in kinds else "int8"))
    with empty_weights():
        model = Transformer(config)
    if "kinds" not in qc:  # written before per-module kinds were recorded: the mode's rule
        qc = {**qc, "embedding": qc.get("embedding") or False}
    swap_quantized(model, qc)
    expected = set(model.state_dict())
    state = load_file(path / "model.safetensors", device=str(device or "cpu"))
    missing = sorted(expected - set(state) - {"lm_head.weight"})
    if missing:
        raise LlmkitError(f"{path / 'model.safetensors'}: missing tensors {', '.join(missing[:5])}")
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_embeddings and not isinstance(model.lm_head, QuantLinear):
        model.tie_weights()
    model.reset_buffers(device)
    finish_quantized(model, device)
    return config, model.eval()

"""KVCache: a static, preallocated key/value cache written at token positions (gpt-fast style).

Notable choices:
- One (B, n_kv_heads, S, head_dim) tensor for keys and one for values per layer, allocated once. A step
  writes its new keys/values at `positions` (B, T) with one scatter (index_put when `.rows` maps rows), so
  every row of a batch can be at a different position (rows of different lengths share a batch) and the
  decode step needs no device sync, no reallocation and no Python-side branching on tensor values:
  torch.compile can capture it.
- Visibility is decided by positions, not by a length counter: a query at position p sees key slot j
  iff j <= p (and p - j < sliding_window on sliding layers); the model builds that mask. Stale slots
  beyond a row's position are therefore harmless, and right-padding a prefill batch is fine: the pad
  positions are overwritten by later steps before they become visible.
- Which cache rows a forward runs on: `select(rows, length)` (the engine's continuous batching). Contiguous
  rows `row_start .. row_start + B - 1` are written through views with one scatter (rows=None; the default
  is rows 0..B-1); any other set goes through `.rows` (LongTensor (B,)) with an index_put and gathered reads.
- `capacity` slots are allocated per row; the model's mask spans `max_seq_len` slots, so `update` returns
  (B, n_kv, max_seq_len, D). `select` may shrink `max_seq_len` to the filled prefix, so attention costs what
  the sequences hold, not what the cache can hold.
- Storage dtype (`dtype`, see `resolve_kv_dtype`): the model's compute dtype by default; bfloat16 / float16
  halve a float32 cache, and `update` returns the keys/values in the compute dtype (a no-op cast when they
  are the same). int8 stores each (row, head, position) vector as int8 with its own float32 scale
  (symmetric absmax over head_dim: x ≈ q · s, s = max|x| / 127, error <= s/2 per element): head_dim + 4
  bytes instead of 4 · head_dim. Keys/values are quantized on write and only the attended prefix
  (`max_seq_len` slots) is dequantized on read, with tensor ops only (no sync, no branch on values).
  Memory, not speed: SDPA needs K/V in the compute dtype, so a non-native cache is converted each step
  (SmolLM2 float32 on one CPU thread at 2000 tokens of context: ~11 tok/s auto, ~7-8 bf16 and int8;
  no difference at short contexts). On SmolLM2 French text neither moves perplexity by 0.1 %.
- Layers may live on different devices (llmkit.placement): `devices` gives each layer's device, and each
  layer's tensors are allocated there; the model hands every layer positions on that layer's device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from llmkit.config import ModelConfig
from llmkit.errors import LlmkitError

KV_DTYPES: dict[str, torch.dtype | None] = {  # None: the model's compute dtype
    "auto": None,
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
    "int8": torch.int8,
}
TINY = torch.finfo(torch.float32).tiny  # the smallest scale: an all-zero vector quantizes to zeros


def resolve_kv_dtype(kv_dtype: str | torch.dtype | None, compute: torch.dtype) -> torch.dtype:
    """The cache's storage dtype for a user's choice: None / "auto" -> `compute`; float32, bfloat16,
    float16 (bf16, fp16...) or int8 (quantized with a scale per vector)."""
    if isinstance(kv_dtype, torch.dtype):
        if kv_dtype in KV_DTYPES.values():
            return kv_dtype
    elif kv_dtype is None or str(kv_dtype).removeprefix("torch.") in KV_DTYPES:
        return KV_DTYPES[str(kv_dtype or "auto").removeprefix("torch.")] or compute
    raise LlmkitError(f"bad KV cache dtype {kv_dtype!r}; use auto, bf16, fp16, int8 (or fp32)")


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax int8 over the last dim: (q int8 (..., D), scale float32 (..., 1)), x ≈ q * scale,
    |x - q * scale| <= scale / 2."""
    x = x.float()
    scale = (x.abs().amax(-1, keepdim=True) / 127).clamp_min(TINY)  # (..., 1)
    return torch.round(x / scale).clamp_(-127, 127).to(torch.int8), scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q * scale in `dtype` (q int8 (..., D), scale float32 (..., 1)): q is exact in any float dtype, the
    product is computed in float32 and rounded once; in place, so one temporary, not two."""
    return q.to(dtype).mul_(scale)


class KVCache:
    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_seq_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        devices: Sequence[torch.device | str] | None = None,
    ):
        """`dtype`: storage dtype (default: torch's default dtype; torch.int8 = quantized, see the module
        docstring). `devices`: one device per layer (default: `device` for all)."""
        self.batch_size = batch_size
        self.capacity = max_seq_len  # slots allocated per row
        self.max_seq_len = max_seq_len  # slots the next forward attends over (see select)
        dtype = dtype or torch.get_default_dtype()
        devices = list(devices) if devices is not None else [device] * config.n_layers
        shape = (batch_size, config.n_kv_heads, max_seq_len, config.head_dim)
        self.k = [torch.zeros(shape, device=d, dtype=dtype) for d in devices]
        self.v = [torch.zeros(shape, device=d, dtype=dtype) for d in devices]
        self.k_scale: list[torch.Tensor] = []  # int8 only: (B, n_kv, S, 1) float32 per layer
        self.v_scale: list[torch.Tensor] = []
        self.quantized = dtype == torch.int8
        if self.quantized:
            self.k_scale = [torch.zeros(shape[:-1] + (1,), device=d) for d in devices]
            self.v_scale = [torch.zeros(shape[:-1] + (1,), device=d) for d in devices]
        for t in self.tensors:  # fixed addresses: CUDA graphs (torch.compile "reduce-overhead") may
            if t.is_cuda:  # capture the in-place writes (as HF's StaticCache does); on CPU no graphs, and
                torch._dynamo.mark_static_address(t)  # importing torch._dynamo would cost 70 MB and ~1 s
        self.rows: torch.Tensor | None = None  # (B,) cache row of each batch row; None: contiguous rows
        self.row_start = 0  # with rows None: the batch is cache rows row_start .. row_start + B - 1
        self._pos: torch.Tensor | None = None  # eager only: the positions whose scatter indexes are _idx
        self._idx: dict[int, torch.Tensor] = {}  # last dim -> scatter index (B, n_kv, T, last dim)

    @property
    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the cache holds (keys, values, and int8 scales)."""
        return self.k + self.v + self.k_scale + self.v_scale

    @property
    def device(self) -> torch.device:
        return self.k[0].device

    @property
    def dtype(self) -> torch.dtype:
        """Storage dtype (torch.int8 for a quantized cache)."""
        return self.k[0].dtype

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)

    def bytes_per_token(self) -> int:
        """Cache bytes one token position costs (all layers, keys + values, scales included)."""
        return self.nbytes // (self.batch_size * self.capacity)

    def select(self, rows: Sequence[int], length: int) -> None:
        """Run the next forward on cache `rows` (ascending), attending to key slots [0, length)."""
        self.max_seq_len = length
        if list(rows) == list(range(rows[0], rows[0] + len(rows))):
            self.rows, self.row_start = None, rows[0]
        else:
            self.rows = torch.tensor(rows, device=self.device)

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Copy the first n slots of cache row src to row dst (a shared prompt prefix)."""
        for t in self.tensors:
            t[dst, :, :n] = t[src, :, :n]

    def update(
        self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, T, n_kv, D) at positions (B, T); return this batch's keys/values
        (B, n_kv, max_seq_len, D) in k's dtype: views for contiguous rows in the compute dtype, gathered
        copies for mapped rows, dequantized copies for int8.
        The new keys come in the projection's (B, T, n_kv, D) layout: no transpose copy before the write."""
        kc, vc = self.k[layer_idx], self.v[layer_idx]
        b, dtype = k.shape[0], k.dtype
        if not self.quantized:
            self._write(kc, k, positions)
            self._write(vc, v, positions)
            kc, vc = self._read(kc, b), self._read(vc, b)
            return (kc, vc) if kc.dtype == dtype else (kc.to(dtype), vc.to(dtype))
        (qk, sk), (qv, sv) = quantize_int8(k), quantize_int8(v)  # (B, T, n_kv, D) int8, (B, T, n_kv, 1)
        ks, vs = self.k_scale[layer_idx], self.v_scale[layer_idx]
        for cache, new in ((kc, qk), (ks, sk), (vc, qv), (vs, sv)):
            self._write(cache, new, positions)
        return (dequantize_int8(self._read(kc, b), self._read(ks, b), dtype),
                dequantize_int8(self._read(vc, b), self._read(vs, b), dtype))

    def _write(self, cache: torch.Tensor, new: torch.Tensor, positions: torch.Tensor) -> None:
        """Write new (B, T, n_kv, X) into a cache tensor (rows, n_kv, S, X) at positions (B, T)."""
        if self.rows is None:  # contiguous rows: one scatter into a view
            view = cache[self.row_start : self.row_start + new.shape[0]]
            new = new.transpose(1, 2)  # (B, n_kv, T, X)
            if new.dtype != cache.dtype:
                new = new.to(cache.dtype)
            if cache.element_size() == 2:  # CPU scatter_ has no fast 16-bit float kernel (40x slower than
                view, new = view.view(torch.int16), new.view(torch.int16)  # float32): move their bits
            view.scatter_(2, self._index(positions, new.shape), new)
        else:
            rows = self.rows.to(cache.device)[:, None]  # (B, 1), broadcast with positions (B, T)
            cache[rows, :, positions] = new.to(cache.dtype)  # indexed view is (B, T, n_kv, X)

    def _read(self, cache: torch.Tensor, b: int) -> torch.Tensor:
        """This batch's rows of a cache tensor, slots [0, max_seq_len): (B, n_kv, max_seq_len, X), a view for
        contiguous rows, a gathered copy for mapped rows."""
        if self.rows is None:
            return cache[self.row_start : self.row_start + b, :, : self.max_seq_len]
        return cache[self.rows.to(cache.device), :, : self.max_seq_len]

    def _index(self, positions: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Scatter index (B, n_kv, T, X) of positions (B, T); in eager mode built once per forward per X."""
        if torch.compiler.is_compiling():
            return positions[:, None, :, None].expand(shape)
        if positions is not self._pos:  # a new forward (or a new layer device: positions were moved)
            self._pos, self._idx = positions, {}
        idx = self._idx.get(shape[-1])
        if idx is None:
            idx = self._idx[shape[-1]] = positions[:, None, :, None].expand(shape)
        return idx

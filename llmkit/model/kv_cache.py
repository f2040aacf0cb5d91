"""KVCache: a static, preallocated key/value cache written at token positions (gpt-fast style).

Notable choices:
- One (B, n_kv_heads, S, head_dim) tensor for keys and one for values per layer, allocated once. A step
  writes its new keys/values at `positions` (B, T) with one scatter (index_put when `.rows` maps rows),
  so every row of a batch can be at
  a different position (rows of different lengths share a batch) and the decode step needs no device
  sync, no reallocation and no Python-side branching on tensor values: torch.compile can capture it.
- Visibility is decided by positions, not by a length counter: a query at position p sees key slot j
  iff j <= p (and p - j < sliding_window on sliding layers); the model builds that mask. Stale slots
  beyond a row's position are therefore harmless, and right-padding a prefill batch is fine: the pad
  positions are overwritten by later steps before they become visible.
- `.rows` (LongTensor (B,) or None) maps the current batch rows to cache rows, for continuous batching:
  the engine can keep a large cache and run any subset of its rows in a step. With rows=None the batch
  uses cache rows 0..B-1 (a view, no copy).
- The model's mask spans `max_seq_len` key slots, so `update` must return (B, n_kv, max_seq_len, D). A
  subclass may shrink `max_seq_len` between steps to attend over only the filled prefix (the engine does).
"""

from __future__ import annotations

import torch

from llmkit.config import ModelConfig


class KVCache:
    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_seq_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len
        dtype = dtype or torch.get_default_dtype()
        shape = (batch_size, config.n_kv_heads, max_seq_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        for t in self.k + self.v:  # fixed addresses: CUDA graphs (torch.compile "reduce-overhead") may
            torch._dynamo.mark_static_address(t)  # capture the in-place writes (as HF's StaticCache does)
        self.rows: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.k[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.k[0].dtype

    def update(
        self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, T, n_kv, D) at positions (B, T); return this batch's keys/values (B, n_kv, S, D).
        The new keys come in the projection's (B, T, n_kv, D) layout: no transpose copy before the write."""
        kc, vc = self.k[layer_idx], self.v[layer_idx]
        b = k.shape[0]
        if self.rows is None:  # rows 0..B-1: one scatter per tensor into a view
            kc, vc = kc[:b], vc[:b]
            k, v = k.transpose(1, 2), v.transpose(1, 2)  # views (B, n_kv, T, D)
            idx = positions[:, None, :, None].expand(k.shape)  # (B, n_kv, T, D)
            kc.scatter_(2, idx, k.to(kc.dtype))
            vc.scatter_(2, idx, v.to(vc.dtype))
            return kc, vc
        rows = self.rows[:, None]  # (B, 1), broadcast with positions (B, T)
        kc[rows, :, positions] = k.to(kc.dtype)  # indexed view is (B, T, n_kv, D)
        vc[rows, :, positions] = v.to(vc.dtype)
        return kc[self.rows], vc[self.rows]  # (B, n_kv, S, D) gathered copies

    def reset(self) -> None:
        """Zero the cache (not needed for correctness: visibility comes from positions)."""
        for t in self.k + self.v:
            t.zero_()

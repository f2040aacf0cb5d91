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
"""

from __future__ import annotations

from collections.abc import Sequence

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
        self.capacity = max_seq_len  # slots allocated per row
        self.max_seq_len = max_seq_len  # slots the next forward attends over (see select)
        dtype = dtype or torch.get_default_dtype()
        shape = (batch_size, config.n_kv_heads, max_seq_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        for t in self.k + self.v:  # fixed addresses: CUDA graphs (torch.compile "reduce-overhead") may
            torch._dynamo.mark_static_address(t)  # capture the in-place writes (as HF's StaticCache does)
        self.rows: torch.Tensor | None = None  # (B,) cache row of each batch row; None: contiguous rows
        self.row_start = 0  # with rows None: the batch is cache rows row_start .. row_start + B - 1
        self._pos: torch.Tensor | None = None  # eager only: the positions whose scatter index is _idx
        self._idx: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.k[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.k[0].dtype

    def select(self, rows: Sequence[int], length: int) -> None:
        """Run the next forward on cache `rows` (ascending), attending to key slots [0, length)."""
        self.max_seq_len = length
        if list(rows) == list(range(rows[0], rows[0] + len(rows))):
            self.rows, self.row_start = None, rows[0]
        else:
            self.rows = torch.tensor(rows, device=self.device)

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Copy the first n slots of cache row src to row dst (a shared prompt prefix)."""
        for t in self.k + self.v:
            t[dst, :, :n] = t[src, :, :n]

    def update(
        self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, T, n_kv, D) at positions (B, T); return this batch's keys/values
        (B, n_kv, max_seq_len, D): views for contiguous rows, gathered copies for mapped rows.
        The new keys come in the projection's (B, T, n_kv, D) layout: no transpose copy before the write."""
        n = self.max_seq_len
        kc, vc = self.k[layer_idx], self.v[layer_idx]
        if self.rows is None:  # contiguous rows: one scatter per tensor into views
            b = k.shape[0]
            kc, vc = kc[self.row_start : self.row_start + b], vc[self.row_start : self.row_start + b]
            k, v = k.transpose(1, 2), v.transpose(1, 2)  # views (B, n_kv, T, D)
            if torch.compiler.is_compiling():
                idx = positions[:, None, :, None].expand(k.shape)  # (B, n_kv, T, D)
            else:  # eager: the index is built once per forward, not once per layer
                if positions is not self._pos:
                    self._pos, self._idx = positions, positions[:, None, :, None].expand(k.shape)
                idx = self._idx
            kc.scatter_(2, idx, k.to(kc.dtype))
            vc.scatter_(2, idx, v.to(vc.dtype))
            return kc[:, :, :n], vc[:, :, :n]
        rows = self.rows[:, None]  # (B, 1), broadcast with positions (B, T)
        kc[rows, :, positions] = k.to(kc.dtype)  # indexed view is (B, T, n_kv, D)
        vc[rows, :, positions] = v.to(vc.dtype)
        return kc[self.rows, :, :n], vc[self.rows, :, :n]  # gathered copies

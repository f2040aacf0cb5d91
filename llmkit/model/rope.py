"""Rotary position embeddings (RoPE), in the `rotate_half` convention of Hugging Face checkpoints.

Notable choices:
- Each head vector is split into two halves (x1, x2) rotated pairwise by angle position * inv_freq[i]:
  (x1 cos - x2 sin, x2 cos + x1 sin). This is HF's `rotate_half` layout, so HF q/k weights need no
  permutation (GGUF llama files use the interleaved layout and are un-permuted by their loader).
- cos/sin tables (float32, (max_seq_len, head_dim/2)) are precomputed once on the model's device and
  indexed by positions, so a decode step is a gather, with no Python-side work and no device sync.
- Frequencies follow HF exactly: inv_freq = 1 / theta^(2i/d), optionally rescaled ("linear" or Llama-3.1
  "llama3" scaling); the float32 products position * inv_freq are the same numbers HF computes.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from llmkit.errors import LlmkitError


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None = None) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,) float32, with optional linear / llama3 scaling."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise LlmkitError(f"unsupported RoPE scaling type {kind!r} (llmkit supports default, linear, llama3)")


def rope_tables(
    head_dim: int, max_seq_len: int, theta: float, scaling: dict[str, Any] | None = None, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (max_seq_len, head_dim/2) float32 on `device`."""
    if torch.device(device or "cpu").type == "meta":  # shapes only (meta math would import torch._dynamo)
        with torch.device("meta"):
            shape = (max_seq_len, head_dim // 2)
            return torch.empty(shape), torch.empty(shape)
    inv_freq = rope_inv_freq(head_dim, theta, scaling).to(device)  # (D/2,)
    t = torch.arange(max_seq_len, device=device, dtype=torch.float32)  # (S,)
    freqs = torch.outer(t, inv_freq)  # (S, D/2)
    return freqs.cos(), freqs.sin()


def rope_for_positions(
    cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather the tables at positions (B, T) -> (cos, signed sin), each (B, T, 1, D) in `dtype`, laid out
    for apply_rope: cos repeated on both halves, sin negated on the first half. Computed once per forward
    and shared by all layers."""
    c, s = cos[positions], sin[positions]  # (B, T, D/2) float32
    return torch.cat((c, c), -1).unsqueeze(2).to(dtype), torch.cat((-s, s), -1).unsqueeze(2).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, T, H, D) by (cos, signed sin) from rope_for_positions: x cos + swap_halves(x) sin,
    i.e. (x1 cos - x2 sin, x2 cos + x1 sin). Same operations, in the same order and dtype, as HF's
    q * cos + rotate_half(q) * sin, so results match bit for bit; 4 kernels in eager mode."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin

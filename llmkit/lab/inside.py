"""Looking inside the model: attention weights, the logit lens, and the next-token distribution under a
temperature. Shared by the labs (attention, logit-lens, temperature-entropy) and the web chat's
"look inside" panel, so a figure in a notebook and the panel show the same numbers.

    inside = look(model, ids)                    # one forward, every layer's attention and hidden state
    inside.attention(layer=3, head=1)            # (T, T): softmax(QKᵀ/√d + M), row = query, column = key
    lens = logit_lens(model, inside, k=3)        # top-k next tokens after each layer, per position
    p = softmax_t(logits, temperature=0.7)       # the distribution a sampler draws from
    entropy_bits(p)                              # its entropy in bits

Notable choices
- One forward with `output_attentions=True, output_hidden_states=True` (the model's eager attention path,
  same weights as SDPA to ~1e-6) and no KV cache; nothing on the model changes, so it can run on a thread
  beside the engine.
- Logit lens: the residual stream after layer ℓ goes through the model's own final norm and head
  (nostalgebraist's logit lens); the last layer's entry is the model's real prediction.
- Entropy in bits (log base 2), the course's unit; temperature 0 is the greedy limit (one-hot).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass
class Inside:
    ids: list[int]
    attentions: list[torch.Tensor]  # n_layers x (H, T, T) float32
    hidden_states: list[torch.Tensor]  # n_layers + 1 x (T, d): embeddings, after each layer (last one normed)
    logits: torch.Tensor  # (T, V) float32

    @property
    def n_layers(self) -> int:
        return len(self.attentions)

    @property
    def n_heads(self) -> int:
        return self.attentions[0].shape[0]

    def attention(self, layer: int, head: int | None = None) -> torch.Tensor:
        """(T, T) weights of one head, or the heads' mean when head is None. Row i: how much query i
        attends to each key j <= i (rows sum to 1)."""
        a = self.attentions[layer]  # (H, T, T)
        return a.mean(0) if head is None else a[head]


@torch.no_grad()
def look(model: nn.Module, ids: list[int] | torch.Tensor) -> Inside:
    """One forward over `ids` (a single sequence) keeping every attention map and hidden state."""
    device = next(model.parameters()).device
    x = torch.as_tensor(ids, dtype=torch.long, device=device).reshape(1, -1)  # (1, T)
    out = model(x, output_attentions=True, output_hidden_states=True)
    return Inside(
        ids=x[0].tolist(),
        attentions=[a[0].float().cpu() for a in out.attentions],
        hidden_states=[h[0].float().cpu() for h in out.hidden_states],
        logits=out.logits[0].float().cpu(),
    )


@dataclass
class LensRow:
    layer: int  # 1..n_layers (after that layer)
    ids: torch.Tensor  # (T, k) top-k token ids per position
    probs: torch.Tensor  # (T, k) their probabilities


@torch.no_grad()
def logit_lens(model: nn.Module, inside: Inside, k: int = 1) -> list[LensRow]:
    """Top-k next-token predictions read from the residual stream after each layer: final norm + head.
    The last row equals the model's own prediction."""
    rows = []
    norm = model.model.norm
    dtype = norm.weight.dtype  # the model's compute dtype (norms stay float in quantized models too)
    L = inside.n_layers
    for layer in range(1, L + 1):
        h = inside.hidden_states[layer].to(norm.weight.device, dtype)  # (T, d)
        if layer < L:  # the last hidden state is already normed (HF's convention)
            h = norm(h)
        probs = torch.softmax(model.head(h).float(), dim=-1)  # (T, V)
        top = probs.topk(k, dim=-1)
        rows.append(LensRow(layer, top.indices.cpu(), top.values.cpu()))
    return rows


def softmax_t(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(logits / T) in float32; T = 0 gives the greedy one-hot distribution."""
    logits = logits.float()
    if temperature <= 0:
        p = torch.zeros_like(logits)
        p.scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
        return p
    return torch.softmax(logits / temperature, dim=-1)


def entropy_bits(p: torch.Tensor) -> float | torch.Tensor:
    """H(p) = -Σ p log2 p over the last axis (0 log 0 = 0)."""
    p = p.float()
    h = -(p * torch.where(p > 0, p.log2(), torch.zeros_like(p))).sum(-1)
    return h.item() if h.dim() == 0 else h


def perplexity_from_bits(bits: float) -> float:
    """2^H: the number of equally likely choices with the same uncertainty."""
    return math.pow(2.0, bits)


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    """Each token as readable text (byte-level pieces decoded; a partial UTF-8 character shown as �)."""
    return [tokenizer.id_to_text(int(i)) for i in ids]

"""Losses for the one trainer loop: each is `loss_fn(model, batch) -> scalar tensor` (mean over tokens).

`lm_loss` is next-token cross-entropy on (x, y) windows plus, for MoE models, the router's
load-balancing loss that the model leaves in `model.aux_loss` after a forward, weighted by the
config's `router_aux_loss_coef`. SFT/DPO/GRPO losses will live beside it and reuse the same loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Token-level cross-entropy in fp32; targets == -100 are ignored."""
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(),  # (B*T, V)
        targets.reshape(-1),  # (B*T,)
        ignore_index=IGNORE_INDEX,
        reduction=reduction,
    )


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


def moe_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """The weighted load-balancing loss of the last forward, or None for dense models."""
    m = unwrap(model)
    aux = getattr(m, "aux_loss", None)
    coef = getattr(getattr(m, "config", None), "router_aux_loss_coef", 0.0)
    if aux is None or not coef or not torch.is_tensor(aux):
        return None
    return coef * aux


def lm_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Next-token prediction: mean cross-entropy of model(x) against y (+ MoE aux loss)."""
    x, y = batch  # (B, T), (B, T)
    logits = model(x)  # (B, T, V)
    loss = cross_entropy(logits, y)
    aux = moe_aux_loss(model)
    return loss if aux is None else loss + aux

"""Losses for the one trainer loop: `loss_fn(model, batch) -> LossSum(total, count)`.

A loss returns the *sum* of its per-item losses (items: trained tokens, preference pairs, ...) and how
many items it summed; the trainer adds both up over every micro-batch and every process of an optimizer
step and divides once, so a micro-batch with 3 trained tokens weighs 3/33 of a step next to one with 30
(dividing each micro-batch's mean by the number of micro-batches would weigh it 1/2). With a frozen
reference model the trainer calls `loss_fn(model, batch, ref_model=ref)` (DPO, KL penalties).

`lm_loss` is next-token cross-entropy on (x, y) windows; targets equal to -100 are not trained (SFT masks),
so pretraining (every token trained) and masked fine-tuning share it. For MoE models it adds the router's
load-balancing loss that the forward returns (`model(x, output_aux=True).aux_loss`), weighted by the
config's `router_aux_loss_coef`. That loss is a mean over the batch, so it enters the sum weighted by the
batch's trained tokens: the step's total/count then holds coef * (token-weighted mean of the aux losses).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


class LossSum(NamedTuple):
    total: torch.Tensor  # () sum of the per-item losses, differentiable
    count: torch.Tensor  # () number of items (trained tokens, pairs, ...) in `total`


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


def lm_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> LossSum:
    """Next-token prediction: summed cross-entropy of model(x) against y over the trained targets
    (y != -100), plus the weighted MoE load-balancing loss."""
    x, y = batch  # (B, T), (B, T)
    out = model(x, output_aux=True)  # ModelOutput: .logits (B, T, V), .aux_loss () or None
    count = (y != IGNORE_INDEX).sum()  # ()
    total = cross_entropy(out.logits, y, reduction="sum")  # ()
    coef = getattr(getattr(unwrap(model), "config", None), "router_aux_loss_coef", 0.0)
    if out.aux_loss is not None and coef:
        total = total + coef * out.aux_loss * count
    return LossSum(total, count)

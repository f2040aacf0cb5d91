"""Projections of one input: `project(x, *mods)`, and `FusedPart`, a member of a fused projection group.

Attention computes `q, k, v = project(x, self.q_proj, self.k_proj, self.v_proj)` and the gated MLP
`g, u = project(x, self.gate_proj, self.up_proj)`; they never look at what the modules are. Whatever sits
there (nn.Linear, a quantized Linear from llmkit.quant, a FusedPart, a LoRA wrapper from llmkit.lora) is a
module with `in_features` / `out_features` whose call gives its own output, so any mix is correct; `project`
only adds the fast paths:

- every module an exact nn.Linear, training with grad enabled: one F.linear over the weights concatenated
  along the output dimension (one GEMM beats three small ones; cat's backward slices the gradient back);
- every module a FusedPart of one shared fused module, in order: ONE call of the fused module, split;
- LoRA-style wrappers (a `base_layer` and a `delta(x)` method; base(x) + delta(x) == wrapper(x)): the bases
  go through `project` (so wrapped fused parts still run as one matmul) and each wrapper's delta is added;
- otherwise `[m(x) for m in mods]` (floating-point inference: three GEMMs read each weight once, with no
  concatenation copy).

The checks are `type(m) is ...` tests, no isinstance chains: project runs ~60 times per decode token.

FusedPart(fused, index, sizes) replaces one member of a group: `fused` is one module (an nn.Linear or a
quantized Linear) over the members' concatenated output rows, shared by the parts. A part called alone
computes the whole group and returns its slice (correct, not fast). There is no per-call state anywhere, so
a model is safe to use from several threads. State dicts keep the members' own names and tensors
(`q_proj.qweight`, not `q_proj.fused.qweight`): a state-dict hook writes the part's slice of each fused
tensor under the part's prefix, and loading copies a part's tensors into its slice of the fused ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

_INITS = ("normal_", "uniform_", "kaiming_uniform_", "trunc_normal_", "xavier_uniform_", "zeros_", "ones_")


@contextmanager
def empty_weights():
    """Build modules on the meta device without running their initialisers (shapes only, no memory). On meta,
    nn.init's in-place randoms go through torch._refs, which imports torch._dynamo: 70 MB and ~1 s that a
    loader does not need (HF transformers' `no_init_weights` skips them the same way)."""
    saved = {n: getattr(nn.init, n) for n in _INITS}
    for n in _INITS:
        setattr(nn.init, n, _keep)
    try:
        with torch.device("meta"):
            yield
    finally:
        for n, f in saved.items():
            setattr(nn.init, n, f)


def _keep(tensor: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return tensor


def out_dim(module: nn.Module, name: str) -> int:
    """The output-row dimension of tensor `name` of a Linear-like module (0 unless the class says
    otherwise in `out_dims`, e.g. Int4Linear's scales_and_zeros (K/G, N, 2) -> 1)."""
    return getattr(module, "out_dims", {}).get(name, 0)


def module_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """A leaf module's own parameters and persistent buffers, by name (what its state dict holds)."""
    out = dict(module.named_parameters(recurse=False))
    out.update((n, b) for n, b in module.named_buffers(recurse=False)
               if b is not None and n not in module._non_persistent_buffers_set)
    return out


class FusedPart(nn.Module):
    """Member `index` of a group fused into `fused`: output rows [start, start + sizes[index])."""

    def __init__(self, fused: nn.Module, index: int, sizes: Sequence[int]):
        super().__init__()
        self.fused = fused  # shared by the parts of the group (a module registered under each of them)
        self.index = index
        self.sizes = list(sizes)
        self.start = sum(self.sizes[:index])
        self.in_features, self.out_features = fused.in_features, self.sizes[index]
        self.register_state_dict_post_hook(_part_state_dict)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused(x).narrow(-1, self.start, self.out_features)  # (..., out_features)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # The part's tensors (`prefix + name`) go into its slice of a copy of the fused tensor, which the
        # fused child then loads (`prefix + "fused." + name`); the parts load one after the other.
        if hasattr(self.fused, "unpack_"):
            self.fused.unpack_()  # tensors in the portable layout, whose rows are along out_dim
        for name, full in module_tensors(self.fused).items():
            key = prefix + name
            if key in state_dict:
                full = full.detach().clone()
                part = full.narrow(out_dim(self.fused, name), self.start, self.out_features)
                value = state_dict.pop(key)
                if value.shape != part.shape:
                    error_msgs.append(f"size mismatch for {key}: copying a param with shape "
                                      f"{tuple(value.shape)}, the shape in current model is "
                                      f"{tuple(part.shape)}.")
                    continue
                part.copy_(value)
            else:
                missing_keys.append(key)
            state_dict[prefix + "fused." + name] = full
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return f"index={self.index}, sizes={self.sizes}"


def _part_state_dict(part: FusedPart, state: dict, prefix: str, local_metadata: dict) -> None:
    """Replace the `fused.` entries by this part's slices (copies: a state dict may be saved with
    safetensors, which refuses tensors that share memory)."""
    head = prefix + "fused."
    for key in [k for k in state if k.startswith(head)]:
        name = key[len(head):]
        full = state.pop(key)
        state[prefix + name] = full.narrow(out_dim(part.fused, name), part.start, part.out_features).clone()


def _one_group(mods: tuple[nn.Module, ...]) -> bool:
    """True when mods are all the parts of one fused module, in order."""
    fused = mods[0].fused
    if len(mods) != len(mods[0].sizes):
        return False
    for i, m in enumerate(mods):
        if type(m) is not FusedPart or m.fused is not fused or m.index != i:
            return False
    return True


def joint_output(x: torch.Tensor, *mods: nn.Module) -> torch.Tensor | None:
    """The outputs of mods concatenated along the last dimension when ONE matmul computes them all (plain
    Linears while training, or the parts of one fused group), else None. Attention uses it to rotate q and k
    in one RoPE call when they come out of one tensor."""
    kind = type(mods[0])
    if kind is nn.Linear:
        if mods[0].training and torch.is_grad_enabled() and all(type(m) is nn.Linear for m in mods):
            bias = None if mods[0].bias is None else torch.cat([m.bias for m in mods])
            return F.linear(x, torch.cat([m.weight for m in mods]), bias)  # (..., sum of out_features)
        return None
    if kind is FusedPart and _one_group(mods):
        return mods[0].fused(x)
    return None


def project(x: torch.Tensor, *mods: nn.Module) -> Sequence[torch.Tensor]:
    """[m(x) for m in mods], computed with as few matmuls as the modules allow (see the module doc)."""
    y = joint_output(x, *mods)
    if y is not None:  # split_with_sizes: the C++ method (Tensor.split is a Python wrapper, ~4 us per call)
        return y.split_with_sizes([m.out_features for m in mods], dim=-1)
    bases = [getattr(m, "base_layer", m) for m in mods]
    if any(b is not m for b, m in zip(bases, mods)):  # wrappers: bases together, then each delta
        ys = project(x, *bases)
        return [y if b is m else y + m.delta(x) for y, b, m in zip(ys, bases, mods)]
    return [m(x) for m in mods]

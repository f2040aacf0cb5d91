"""LoRA adapters served beside their base model, each as a model id of its own (`--adapter NAME=PATH`).

    llm = llmkit.load("smollm2-135m-instruct")
    app = create_app(llm, adapters={"fr": "runs/sft/adapter", "dpo": "runs/dpo/adapter"})
    # /v1/models lists "smollm2-135m-instruct", "fr", "dpo"; a request's `model` picks one (none: the base)

    llmkit serve smollm2-135m-instruct --adapter fr=runs/sft/adapter --adapter dpo=runs/dpo/adapter
    llmkit serve smollm2-135m-instruct --adapter runs/sft/adapter   # a plain DIR: applied to the base

Notable choices:
- Base weights are shared, not copied: `adapter_model` makes a structural copy of the module tree in which
  only the containers that hold a projection (Transformer, Decoder, the layer list, each Block, Attention,
  MLP) are new objects; every projection (nn.Linear, quantized Linear, FusedPart) and every projection-free
  module (embeddings, norms) is the SAME object as the base's, and so are all parameters and buffers (same
  storage). `llmkit.lora.load_adapter` then wraps the copy's projection slots in LoRALinear modules whose
  `base_layer` is the base's own module. The only new weights are the adapters' A and B (float32, as
  `llmkit.load(..., adapter=)`), so an adapter's outputs are those of `llmkit.load(MODEL, adapter=PATH)`.
  The base model object is left untouched (no wrapper is ever put into it).
- What it costs: each model id is a lane of its own (llmkit.serve.app): an Engine with its own KV cache
  (2 x n_layers x max_batch x max_seq_len x n_kv_heads x head_dim values: as much as the base's, for every
  adapter; SmolLM2-135M at the serve defaults, 8 rows x 4096 positions in fp32, holds 1.4 GiB per id), its
  own prefix cache and its own Scheduler (queue of `max_queue`, engine thread), plus the adapter's A / B
  weights. Lanes run concurrently (one thread each) and share the device and its cores.
- What it does not do: rows of different adapters are never mixed in one batch (vLLM's multi-LoRA and
  punica's segmented BGMV kernels run one forward over a batch whose rows use different adapters, and share
  one KV pool); here each adapter's batch is stepped separately, so n busy adapters cost n forward passes
  per decode step, and an idle lane still holds its KV cache. Adapters cannot be added or removed while the
  server runs (vLLM's /v1/load_lora_adapter).
- The /v1/models cards follow vLLM's shape for LoRA modules: the base card has `root` = the model as given
  and `parent` null; an adapter card has `root` = its PATH as given and `parent` = the base id.
- Validation happens before anything loads: `NAME=PATH` malformed, a name given twice, a name equal to the
  base id, a missing folder or one without adapter_config.json are one-line LlmkitErrors.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch.nn as nn

from llmkit.errors import LlmkitError

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]*\Z")  # model ids as vLLM / OpenAI clients send them


def parse_adapter_args(values: Sequence[str], base_id: str) -> tuple[str | None, dict[str, str]]:
    """Split `--adapter` values into (plain DIR applied to the base or None, {name: PATH} served beside it).

    A value that is an existing folder, or that has no "=", is a plain DIR (the old meaning: one adapter
    applied to the base); else it is NAME=PATH (split at the first "="). Everything is checked here
    (`check_adapters`), before the base model is loaded."""
    plain: list[str] = []
    named: dict[str, str] = {}
    for value in values:
        if "=" not in value or Path(value).is_dir():
            plain.append(value)
            continue
        name, _, path = value.partition("=")
        if not name or not path:
            raise LlmkitError(f"--adapter {value!r}: expected NAME=PATH (e.g. fr=runs/sft/adapter) or "
                              "a plain adapter folder")
        if name in named:
            raise LlmkitError(f"--adapter {value!r}: the name {name!r} is already given to {named[name]}; "
                              "give each adapter its own name")
        named[name] = path
    if len(plain) > 1:
        raise LlmkitError(f"--adapter {plain[1]!r}: only one plain adapter folder can be applied to the "
                          "base; serve several side by side as NAME=PATH")
    if plain and named:
        raise LlmkitError(f"--adapter {plain[0]!r}: a plain folder (applied to the base) cannot be mixed "
                          "with NAME=PATH adapters (served beside the base); give them all as NAME=PATH")
    if plain and not Path(plain[0]).is_dir():
        raise LlmkitError(f"--adapter {plain[0]!r}: no such folder; give a PEFT adapter folder "
                          "(adapter_config.json + adapter_model.safetensors) or NAME=PATH")
    check_adapters(named, base_id)
    return (plain[0] if plain else None), named


def check_adapters(adapters: Mapping[str, str | os.PathLike[str]], base_id: str) -> None:
    """One-line LlmkitError for a bad name (format, equal to the base id) or a missing adapter folder."""
    for name, path in adapters.items():
        where = f"adapter {name!r} ({os.fspath(path)})"
        if not NAME.match(name):
            raise LlmkitError(f"{where}: a model id is letters, digits and . _ : / - (starting with a letter "
                              "or digit); rename it")
        if name == base_id:
            raise LlmkitError(f"{where}: {name!r} is the base model's id; give the adapter another name")
        folder = Path(path)
        if not folder.is_dir():
            raise LlmkitError(f"{where}: no such folder; give a PEFT adapter folder (adapter_config.json + "
                              "adapter_model.safetensors)")
        if not (folder / "adapter_config.json").is_file():
            raise LlmkitError(f"{where}: no adapter_config.json in {folder}; give a PEFT adapter folder")


def _is_projection(m: nn.Module) -> bool:
    """A projection slot (what LoRA wraps): nn.Linear, a quantized Linear, a FusedPart, a LoRALinear."""
    return hasattr(m, "in_features")


def _shared_objects(model: nn.Module) -> dict[int, object]:
    """deepcopy memo of what an adapter's copy shares with `model`: every parameter and buffer, every
    projection module (with what it holds) and every subtree without a projection. The modules left out
    (the containers that hold a projection slot) are the ones the copy gets anew."""
    memo: dict[int, object] = {id(t): t for t in (*model.parameters(), *model.buffers())}

    def share(m: nn.Module) -> None:
        memo.update((id(s), s) for s in m.modules())

    def visit(m: nn.Module) -> bool:  # True when m holds a projection somewhere below it
        holds = False
        for child in m.children():
            if _is_projection(child):
                share(child)
                holds = True
            elif visit(child):
                holds = True
            else:
                share(child)
        return holds

    visit(model)
    return memo


def shared_copy(model: nn.Module) -> nn.Module:
    """A structural copy of `model`: new container modules, the SAME projection modules, parameters and
    buffers (no tensor memory is copied), so setting a slot of the copy leaves `model` as it was."""
    return copy.deepcopy(model, memo=_shared_objects(model))


def adapter_model(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """`model` with the PEFT adapter at `path` applied, sharing every base weight with `model` (which stays
    unchanged). The new LoRA wrappers are in eval mode with frozen weights."""
    from llmkit.lora import load_adapter, lora_modules

    if lora_modules(model):
        raise LlmkitError(f"adapter {os.fspath(path)}: the base model already has a LoRA adapter; serve "
                          "adapters beside a base without one")
    out = shared_copy(model)
    load_adapter(out, path)
    for _, wrapper in lora_modules(out):  # only the new modules: the shared ones are the base's (eval)
        for m in (wrapper, wrapper.lora_A, wrapper.lora_B, wrapper.lora_dropout):
            m.training = False
        wrapper.lora_A.weight.requires_grad_(False)
        wrapper.lora_B.weight.requires_grad_(False)
    return out


def adapter_models(model: nn.Module, adapters: Mapping[str, str | os.PathLike[str]]) -> dict[str, nn.Module]:
    """{name: `adapter_model(model, path)`} for each adapter; a load error names the adapter it is about."""
    out = {}
    for name, path in adapters.items():
        try:
            out[name] = adapter_model(model, path)
        except LlmkitError as e:
            raise LlmkitError(f"adapter {name!r}: {e}", status=e.status, code=e.code) from None
    return out

"""Hugging Face checkpoint directories in and out: config.json + safetensors (single file or sharded index).

Notable choices:
- Streamed loading: the model is built on the meta device (no memory), then each tensor is read from the
  safetensors file (plain reads, no mmap: llmkit/checkpoint/safetensors_io.py), converted to the target
  dtype/device and assigned in place of its meta parameter. Peak RAM is the final weights plus one
  tensor in flight (well under 2x the weights).
- `build_model(config, tensors, ...)` is the one place where names and shapes are checked; the GGUF loader
  feeds it too. Every error is a one-line LlmkitError naming the file and the tensor.
- llmkit's parameter names are HF Llama names, so most families load with no renaming. Gemma 2 / Gemma 3
  (text) files load as they are too: the sandwich norms (pre_/post_feedforward_layernorm) and q_norm/k_norm
  carry HF's names, the norm weights stay as stored (~0; the "1 +" is ModelConfig.norm_weight_offset) and the
  tied lm_head is absent from the file, as save_pretrained writes it. Only GPT-2 needs
  transforms (Conv1D weights stored transposed, fused c_attn split into q/k/v; wte/wpe/h.N/ln_f renamed)
  and Mixtral renames its experts (block_sparse_moe.experts.E.w1/w3/w2 = gate/up/down). Files that
  hold experts stacked as 3-D tensors (experts.gate_up_proj (E, 2F, d), experts.down_proj (E, d, F), as
  transformers >= 5 keeps them in memory) are split per expert on load.
- Export writes what transformers 5 `save_pretrained` writes (per-expert keys, GPT-2 Conv1D layout),
  into a temporary folder first, then moves it into place (atomic per file; atomic as a whole for a new
  folder).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import save_file

from llmkit.checkpoint.safetensors_io import read_header, read_safetensors
from llmkit.config import ModelConfig
from llmkit.device import DTYPES
from llmkit.errors import LlmkitError
from llmkit.io import read_json
from llmkit.model import Transformer
from llmkit.model.layers import empty_weights

# Non-parameter tensors some checkpoints carry (causal-mask buffers, RoPE caches): skipped on load.
_IGNORED = re.compile(r"(^|\.)(attn\.bias|attn\.masked_bias|rotary_emb\.inv_freq)$")


# ---------------------------------------------------------------- build
def build_model(
    config: ModelConfig,
    tensors: Iterable[tuple[str, Any]],
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    source: str = "checkpoint",
    files: Mapping[str, str] | None = None,
    quantize: Mapping[str, Any] | None = None,
) -> Transformer:
    """Create a Transformer on the meta device and fill it tensor by tensor (llmkit names).

    `source` names the checkpoint in errors; `files` (optional, filled while iterating) maps a tensor name
    to the file it came from, for sharded checkpoints. Tensors are converted to `dtype` (default float32)
    and moved to `device` (default cpu) one at a time. The tied lm_head, if present, is skipped.

    `quantize` (a quantization record, see llmkit.quant.plan_quantization) swaps the Linear layers (and the
    embedding table) for quantized modules before any weight is read: each weight is quantized as it arrives
    (or taken as it is from GGUF blocks of the same layout), so no float copy of the model ever exists.
    """
    device = torch.device(device or "cpu")
    dtype = dtype or torch.float32
    _return_freed_memory()
    with empty_weights():
        model = Transformer(config)
    expected = {n: tuple(p.shape) for n, p in model.named_parameters()}  # a tied lm_head.weight is not listed
    quantized: dict[str, Any] = {}  # weight name -> quantized module taking it
    if quantize:
        from llmkit.quant import swap_quantized

        quantized = swap_quantized(model, quantize, dtype=dtype)
    tied_head = quantized.get("lm_head.weight") if config.tie_embeddings else None
    seen: set[str] = set()
    for name, t in tensors:
        where = (files or {}).get(name, source)
        if name == "lm_head.weight" and config.tie_embeddings:
            continue
        if name not in expected:
            raise LlmkitError(
                f"{where}: unexpected tensor {name!r} for this config ({config.model_type}, "
                f"{config.n_layers} layers); the file does not match config.json"
            )
        if tuple(t.shape) != expected[name]:
            raise LlmkitError(
                f"{where}: tensor {name!r} has shape {tuple(t.shape)}, config.json implies {expected[name]}"
            )
        if isinstance(t, torch.Tensor) and not t.is_floating_point():
            raise LlmkitError(
                f"{where}: tensor {name!r} has dtype {t.dtype}; expected floating point weights"
            )
        if tied_head is not None and name == "model.embed_tokens.weight":
            tied_head.set_weight(t)  # the tied head's own quantized copy
        module_name, _, leaf = name.rpartition(".")
        if name in quantized:
            quantized[name].set_weight(t)
        else:
            if not isinstance(t, torch.Tensor):  # GGUF blocks for a layer that stays in floating point:
                t = _dequantize_rows(t, dtype)  # rows at a time, never the whole tensor in float32
            module = model.get_submodule(module_name)
            if isinstance(module.__dict__.get("_buffers", {}).get(leaf), torch.Tensor):  # a quantized bias
                setattr(module, leaf, t.to(device=device, dtype=torch.float32))
            else:
                setattr(module, leaf, torch.nn.Parameter(t.to(device=device, dtype=dtype)))
        del t
        seen.add(name)
    missing = [n for n in expected if n not in seen]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise LlmkitError(
            f"{source}: missing tensor {', '.join(missing[:3])}{more}; the checkpoint is incomplete"
        )
    if isinstance(model.lm_head, torch.nn.Linear) and isinstance(model.model.embed_tokens, nn.Embedding):
        model.tie_weights()
    model.reset_buffers(device)
    if quantize:
        from llmkit.quant import finish_quantized

        del quantized, tied_head  # fusing replaces modules: let the replaced ones go as it does
        finish_quantized(model, device)
    _return_freed_memory(trim=True)
    return model.eval()


def _dequantize_rows(blocks: Any, dtype: torch.dtype, chunk: int = 1 << 22) -> torch.Tensor:
    n, k = blocks.shape
    out = torch.empty(n, k, dtype=dtype)
    step = max(1, chunk // k)
    for a in range(0, n, step):
        out[a : a + step] = blocks.rows(a, min(n, a + step)).dequantize()
    return out


def _return_freed_memory(trim: bool = False) -> None:
    """glibc only: serve allocations of 1 MiB and more with their own mappings (returned to the system when
    freed, instead of fragmenting the heap: the loader frees one tensor-sized buffer after another), and
    `trim` what the heap still holds. Measured on the default model: peak RSS of a load -90 MB."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: fixed, so glibc stops raising it after frees
        except (OSError, AttributeError):
            _LIBC = False
    if trim and _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


# ---------------------------------------------------------------- names
# (HF GPT-2 name, llmkit name) prefixes; "#" stands for the layer number. HF files may add "transformer.".
_GPT2_RENAMES = [
    ("wte.", "model.embed_tokens."),
    ("wpe.", "model.embed_positions."),
    ("ln_f.", "model.norm."),
    ("h.#.ln_1.", "model.layers.#.input_layernorm."),
    ("h.#.ln_2.", "model.layers.#.post_attention_layernorm."),
    ("h.#.attn.c_proj.", "model.layers.#.self_attn.o_proj."),
    ("h.#.mlp.c_fc.", "model.layers.#.mlp.up_proj."),
    ("h.#.mlp.c_proj.", "model.layers.#.mlp.down_proj."),
]


def _gpt2_rename(name: str, to_llmkit: bool) -> str | None:
    """Rename one GPT-2 tensor between the HF and llmkit layouts (None: no rule applies)."""
    for hf, ours in _GPT2_RENAMES:
        src, dst = (hf, ours) if to_llmkit else (ours, hf)
        m = re.match(re.escape(src).replace("\\#", r"(\d+)"), name)
        if m:
            return dst.replace("#", m.group(1) if m.groups() else "") + name[m.end() :]
    return None


def _gpt2_conv1d(hf_name: str) -> bool:
    """GPT-2's Conv1D layers store weights as (in, out): transpose them on the way in and out."""
    return hf_name.endswith(".weight") and (".c_proj." in hf_name or ".c_fc." in hf_name)


_MIXTRAL_EXPERT = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_STACKED = re.compile(r"^(.*\.experts)\.(gate_up_proj|gate_proj|up_proj|down_proj)$")


def hf_to_llmkit(name: str, t: torch.Tensor, config: ModelConfig) -> list[tuple[str, torch.Tensor]]:
    """One tensor of an HF file -> the llmkit tensors it holds ([] for buffers we recompute)."""
    if _IGNORED.search(name):
        return []
    if config.model_type == "gpt2":
        return _gpt2_in(name, t)
    name = re.sub(r"\.block_sparse_moe\.", ".mlp.", name)
    m = re.match(r"^(.*\.mlp\.experts\.\d+)\.(w[123])\.weight$", name)
    if m:
        return [(f"{m[1]}.{_MIXTRAL_EXPERT[m[2]]}.weight", t)]
    m = _STACKED.match(name)
    if m and t.dim() == 3:
        return _split_stacked(m[1], m[2], t, config)
    return [(name, t)]


def _gpt2_in(name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    name = name.removeprefix("transformer.")
    if name == "lm_head.weight":
        return [(name, t)]
    m = re.match(r"^h\.(\d+)\.attn\.c_attn\.(weight|bias)$", name)
    if m:  # fused (d, 3d) Conv1D weight / (3d,) bias -> q, k, v
        parts = (t.t() if m[2] == "weight" else t).chunk(3, dim=0)
        return [
            (f"model.layers.{m[1]}.self_attn.{p}_proj.{m[2]}", x.contiguous()) for p, x in zip("qkv", parts)
        ]
    new = _gpt2_rename(name, to_llmkit=True)
    if new is None:
        return [(name, t)]
    return [(new, t.t().contiguous() if _gpt2_conv1d(name) else t)]


def _split_stacked(
    prefix: str, kind: str, t: torch.Tensor, config: ModelConfig
) -> list[tuple[str, torch.Tensor]]:
    """experts.gate_up_proj (E, 2F, d) | experts.{gate,up}_proj (E, F, d) | experts.down_proj (E, d, F)
    (or the transposed layouts) -> per-expert 2-D weights."""
    d, f = config.d_model, config.moe_d_ff
    out_dim = {"gate_up_proj": 2 * f, "gate_proj": f, "up_proj": f, "down_proj": d}[kind]
    if t.shape[1] != out_dim and t.shape[2] == out_dim:
        t = t.transpose(1, 2)  # stored as (E, in, out)
    out = []
    for e in range(t.shape[0]):
        if kind == "gate_up_proj":
            gate, up = t[e].chunk(2, dim=0)
            out += [
                (f"{prefix}.{e}.gate_proj.weight", gate.contiguous()),
                (f"{prefix}.{e}.up_proj.weight", up.contiguous()),
            ]
        else:
            out.append((f"{prefix}.{e}.{kind}.weight", t[e].contiguous()))
    return out


def llmkit_to_hf(model: Transformer) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's tensors under the names (and layouts) transformers' save_pretrained writes."""
    config = model.config
    params = dict(model.named_parameters())  # tied lm_head not listed: HF files omit it too
    if config.model_type != "gpt2":
        for name, p in params.items():
            if (
                config.model_type == "mixtral"
                and ".mlp." in name
                and (".mlp.gate." in name or ".experts." in name)
            ):
                name = name.replace(".mlp.", ".block_sparse_moe.")
                for w, ours in _MIXTRAL_EXPERT.items():
                    name = name.replace(f".{ours}.", f".{w}.")
            yield name, p.detach()
        return
    for name, p in params.items():
        p = p.detach()
        m = re.match(r"^model\.layers\.(\d+)\.self_attn\.([qkvo])_proj\.(weight|bias)$", name)
        if m and m[2] == "q":
            qkv = torch.cat([params[name.replace(".q_proj.", f".{x}_proj.")].detach() for x in "qkv"], dim=0)
            yield (
                f"transformer.h.{m[1]}.attn.c_attn.{m[3]}",
                (qkv.t() if m[3] == "weight" else qkv).contiguous(),
            )
            continue
        if m and m[2] in "kv":
            continue
        if name == "lm_head.weight":
            yield name, p
            continue
        hf = _gpt2_rename(name, to_llmkit=False)
        if hf is None:
            raise LlmkitError(f"cannot export parameter {name!r} to the GPT-2 layout")
        yield "transformer." + hf, (p.t().contiguous() if _gpt2_conv1d(hf) else p)


# ---------------------------------------------------------------- load
def weight_files(path: Path) -> list[Path]:
    """The safetensors files of an HF folder (single file, or the shards named by the index)."""
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise LlmkitError(f"{index}: no 'weight_map'; the index is corrupt")
        files = [path / f for f in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.is_file():
                raise LlmkitError(f"{f}: shard listed in {index.name} is missing")
        return files
    found = sorted(path.glob("*.safetensors"))
    if found:
        return found
    raise LlmkitError(
        f"{path}: no model.safetensors or model.safetensors.index.json (.bin files are not loaded)"
    )


def iter_safetensors(
    files: list[Path], config: ModelConfig, origin: dict[str, str]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream (llmkit name, tensor) from safetensors files, recording each tensor's file in `origin`.
    Every file's header is checked before the first tensor is read, so a truncated shard fails fast."""
    for f in files:
        read_header(f)
    for f in files:
        for key, t in read_safetensors(f):
            for name, x in hf_to_llmkit(key, t, config):
                origin[name] = f"{f} (tensor {key!r})"
                yield name, x


def load_hf_dir(
    path: str | os.PathLike, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    quantize: Mapping[str, Any] | None = None, before: Any = None,
) -> tuple[ModelConfig, Transformer]:
    """Load an HF model folder. dtype None = the dtype in config.json (float32 if absent). `quantize`: see
    build_model (each tensor quantized as it is read)."""
    path = Path(path)
    if not path.is_dir():
        raise LlmkitError(f"{path}: not a directory; expected an HF model folder with config.json")
    cfg_path = path / "config.json"
    hf = read_json(cfg_path, missing="an HF model folder needs config.json and *.safetensors")
    config = ModelConfig.from_hf(hf, source=str(cfg_path))
    dtype = dtype or DTYPES.get(config.dtype, torch.float32)
    files = weight_files(path)
    origin: dict[str, str] = {}
    source = str(files[0]) if len(files) == 1 else str(path / "model.safetensors.index.json")
    if before is not None:  # e.g. the memory check, before any weight is read
        before(config, quantize["mode"] if quantize else dtype)
    from llmkit.checkpoint.cache import cached_load

    def build() -> Transformer:
        return build_model(config, iter_safetensors(files, config, origin), device, dtype, source, origin,
                           quantize=quantize)

    key = {**quantize, "dtype": str(dtype)} if quantize else None
    return config, cached_load(path, config, key, torch.device(device or "cpu"), build)


# ---------------------------------------------------------------- save
def save_hf_dir(
    model: Transformer,
    config: ModelConfig,
    tokenizer: Any = None,
    dir: str | os.PathLike = "model",
    chat_template: str | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write config.json, model.safetensors (sharded with an index above `max_shard_bytes`),
    generation_config.json and, given a tokenizer, its files with the chat template in
    tokenizer_config.json. Everything is written to a temporary folder first, then moved into `dir`."""
    out = Path(dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        dtype = next(model.parameters()).dtype
        hf = config.to_hf()
        hf["torch_dtype"] = hf["dtype"] = str(dtype).removeprefix("torch.")
        _write_weights(model, tmp, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(
            json.dumps(_generation_config(config, tokenizer), indent=2) + "\n"
        )
        if tokenizer is not None:
            tokenizer.save(tmp)
        template = chat_template or (
            getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
        )
        if template:
            tc_path = tmp / "tokenizer_config.json"
            tc = json.loads(tc_path.read_text()) if tc_path.exists() else {}
            tc["chat_template"] = template
            tc_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n")
        _move_into(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_weights(model: Transformer, folder: Path, max_shard_bytes: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = total = 0
    for name, t in llmkit_to_hf(model):
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous().cpu()
        size += n
        total += n
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata=meta)
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / fname), metadata=meta)
        weight_map.update(dict.fromkeys(shard, fname))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _generation_config(config: ModelConfig, tokenizer: Any) -> dict[str, Any]:
    eos = config.eos_token_id
    eos_ids = list(eos) if isinstance(eos, list) else ([] if eos is None else [eos])
    tok_eos = getattr(tokenizer, "eos_id", None) if tokenizer is not None else None
    if tok_eos is not None and tok_eos not in eos_ids:
        eos_ids.append(tok_eos)
    gen: dict[str, Any] = {"_from_model_config": True}
    bos = config.bos_token_id if config.bos_token_id is not None else getattr(tokenizer, "bos_id", None)
    if bos is not None:
        gen["bos_token_id"] = bos
    if eos_ids:
        gen["eos_token_id"] = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    pad = getattr(tokenizer, "pad_id", None) if tokenizer is not None else None
    if pad is not None:
        gen["pad_token_id"] = pad
    return gen


def _move_into(tmp: Path, out: Path) -> None:
    """Rename the finished temp folder to `out`; into an existing folder, replace file by file and drop
    weight files of a previous export that would now be stale."""
    if not out.exists():
        os.replace(tmp, out)
        return
    if not out.is_dir():
        raise LlmkitError(f"{out}: exists and is not a directory")
    for stale in [
        *out.glob("model-*-of-*.safetensors"),
        out / "model.safetensors.index.json",
        out / "model.safetensors",
    ]:
        if stale.exists() and not (tmp / stale.name).exists():
            stale.unlink()
    for f in tmp.iterdir():
        os.replace(f, out / f.name)

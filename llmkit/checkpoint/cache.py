"""Converted weights cached on disk: a quantized load is paid once per machine, then memory-mapped.

    model = cached_load(source, record, build)   # build() -> model the first time; mapped from disk after

Loading a GGUF at its own precision (or any model with `quantize=`) converts every matrix (GGUF blocks ->
llmkit's int4 / int8 modules, the int4 nibbles into the CPU kernel's layout). The result is saved once as a
safetensors file under LLMKIT_HOME/converted/ and, on the next start, memory-mapped: no conversion, no copy,
pages read from the file as the first forward touches them.

Notable choices:
- Key = sha256 of the source file (or of an HF folder's config.json + safetensors files), the quantization
  record (mode, group size, the file's GGML types), the CPU kernel's int4 layout (AVX-512 and AVX2 builds pack
  differently) and FORMAT. Hashing a multi-GB file costs seconds, so the hash is remembered in an index keyed
  by (path, size, mtime): a changed file gets a new hash, hence a new cache entry.
- The file holds the modules' own tensors as they are in memory (int4 packed for the kernel, not the portable
  layout of `save_quantized`), fused q|k|v and gate|up included, and the quantization record (module kinds)
  in its metadata. Restoring builds the same modules on the meta device and assigns the mapped tensors.
- Written to a temporary file, then renamed: a crash never leaves a half-written entry. A cache entry that
  fails to restore (corrupt, older format) is ignored and rebuilt. LLMKIT_NO_CACHE=1 turns the cache off.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from llmkit.errors import LlmkitError
from llmkit.io import atomic_path, atomic_write_json, read_json

FORMAT = 1


def cache_root() -> Path:
    from llmkit.hub import cache_dir

    return cache_dir() / "converted"


def enabled() -> bool:
    return os.environ.get("LLMKIT_NO_CACHE", "") in ("", "0")


def source_hash(path: Path) -> str:
    """sha256 of a file (or of an HF folder's config.json and weights), remembered by (path, size, mtime)."""
    files = [path] if path.is_file() else sorted([path / "config.json", *path.glob("*.safetensors")])
    stamp = [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    index_path = cache_root() / "hashes.json"
    index = read_json(index_path) if index_path.is_file() else {}
    key = json.dumps(stamp)
    if key in index:
        return index[key]
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    digest = h.hexdigest()
    index[key] = digest
    index_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(index_path, index)
    return digest


def entry_path(source: Path, record: dict[str, Any]) -> Path:
    from llmkit.quant import int4_layout_name

    what = {k: record.get(k) for k in ("mode", "group_size", "types", "embedding", "dtype")}
    what.update(format=FORMAT, layout=int4_layout_name(), torch=torch.__version__.split("+")[0])
    tag = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]
    return cache_root() / f"{source_hash(source)[:20]}-{record['mode']}-{tag}.safetensors"


def save_entry(model: torch.nn.Module, path: Path) -> None:
    """The model's tensors as they are in memory (shared tensors once) + its quantization record."""
    from safetensors.torch import save_file

    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if name.rpartition(".")[2] in ("rope_cos", "rope_sin", "rope_local_cos", "rope_local_sin"):
            continue  # recomputed by reset_buffers
        if id(t) in seen:
            continue
        seen.add(id(t))
        state[name] = t.detach().contiguous()
    meta = {"llmkit_cache": str(FORMAT), "quantization": json.dumps(model.quantization)}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)


def restore_entry(config: Any, path: Path) -> torch.nn.Module:
    """Rebuild the modules on the meta device and assign the memory-mapped tensors."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from llmkit.model import Transformer
    from llmkit.model.layers import empty_weights
    from llmkit.quant import Int4Linear, finish_quantized, fuse_projections, swap_quantized

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("llmkit_cache") != str(FORMAT):
        raise LlmkitError(f"{path}: not a converted-weights cache of format {FORMAT}")
    record = json.loads(meta["quantization"])
    with empty_weights():
        model = Transformer(config)
        swap_quantized(model, record)
        fuse_projections(model)
    state = load_file(str(path))  # memory-mapped: pages are read when first touched
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    names |= {n for n, _ in model.named_buffers(remove_duplicate=False)}
    for name, t in state.items():
        if name not in names:
            raise LlmkitError(f"{path}: tensor {name} does not fit this model")
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        if leaf in module._parameters:
            setattr(module, leaf, torch.nn.Parameter(t, requires_grad=False))
        else:
            setattr(module, leaf, t)
    for m in model.modules():
        if isinstance(m, Int4Linear):
            m.packed = True  # saved as the kernel's layout, for this machine's layout (in the key)
    left = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.is_meta
            and n.rpartition(".")[2] not in ("rope_cos", "rope_sin", "rope_local_cos", "rope_local_sin")]
    if left:
        raise LlmkitError(f"{path}: missing tensor {left[0]}")
    if config.tie_embeddings and isinstance(model.lm_head, torch.nn.Linear):
        model.tie_weights()
    model.reset_buffers("cpu")
    finish_quantized(model, "cpu")  # nothing left to fuse or pack: marks nothing new
    return model.eval()


def cached_load(source: Path, config: Any, record: dict[str, Any] | None, device: torch.device,
                build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """`build()`'s model, from the cache when an entry exists (CPU, quantized loads only), else built and
    saved for next time."""
    if not record or device.type != "cpu" or not enabled():
        return build()
    try:
        path = entry_path(source, record)
    except OSError:  # unreadable index, read-only cache folder: no cache
        return build()
    if path.is_file():
        try:
            return restore_entry(config, path)
        except Exception:  # noqa: BLE001 - a bad entry is rebuilt, never fatal
            path.unlink(missing_ok=True)
    model = build()
    try:
        save_entry(model, path)
    except OSError:
        pass  # a full disk costs the next start its conversion, nothing else
    return model

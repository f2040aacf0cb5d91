"""What a model file holds, read without loading its weights (`llmkit inspect`).

The course's "model files" slide: architecture and config, parameter counts by component, bytes per dtype,
vocabulary size, special tokens, chat template, context length, the generation defaults (sampling
settings the model comes with; llmkit.generate.defaults), and the memory a load needs at each precision
against what this machine has (llmkit.memory).

Notable choices:
- Nothing is dequantised or read from the tensor data: GGUF files are memory-mapped and only their metadata
  and tensor table are read; safetensors files only their JSON headers. Parameter counts come from a
  Transformer built on the meta device (no memory), counted by `llmkit.model.param_counts`.
- Bytes are reported as stored: per GGML type for GGUF (Q4_1, Q8_0, F32, ...), per dtype for safetensors.
- Memory is estimated for float32, bfloat16, int8 and int4 on the device a load would pick; a quantized GGUF's
  own precision (what it loads at by default: Q2-Q4 types int4, Q5-Q8 int8) is marked.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

from llmkit.config import ModelConfig
from llmkit.errors import LlmkitError

_COMPONENTS = ("embeddings", "attention", "mlp", "experts", "norms", "lm_head")


def model_info(path: str | os.PathLike[str], known: Any = None, context: int | None = None) -> dict[str, Any]:
    """A JSON-able description of the GGUF file or HF folder at `path` (see module docstring); `known`: the
    hub's NamedModel when `path` is a known model's file (its generation defaults fill the file's gaps);
    `context`: the tokens the memory estimate is sized for (None: llmkit.memory.default_context)."""
    from llmkit.generate.defaults import model_defaults

    p = Path(path)
    gguf_metadata = None
    if p.is_file():
        from llmkit.checkpoint.gguf import GGUFFile

        f = GGUFFile(p)
        config = f.config()
        info: dict[str, Any] = {
            "path": str(p),
            "format": "gguf",
            "architecture": f.arch,
            "name": f.get("general.name"),
            "file_type": _file_type(f.get("general.file_type")),
            "file_bytes": p.stat().st_size,
        }
        storage = _storage_gguf(f)
        tokenizer_source: Any = f
        gguf_metadata = f.metadata
    else:
        cfg_path = p / "config.json"
        try:
            hf = json.loads(cfg_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise LlmkitError(f"{cfg_path}: cannot read config.json ({e})") from e
        config = ModelConfig.from_hf(hf, source=str(cfg_path))
        files = sorted(p.glob("*.safetensors"))
        info = {
            "path": str(p),
            "format": "hf",
            "architecture": (hf.get("architectures") or [config.model_type])[0],
            "name": p.name,
            "file_bytes": sum(x.stat().st_size for x in files),
        }
        storage = _storage_safetensors(files)
        tokenizer_source = p
    info.update(
        model_type=config.model_type,
        config=config.to_dict(),
        context_length=config.max_seq_len,
        vocab_size=config.vocab_size,
        parameters=count_parameters(config),
        storage=storage,
    )
    info["memory"] = memory_info(config, context, native=_native_precision(info))
    info.update(_tokenizer_info(tokenizer_source))
    defaults, source = model_defaults(p, known=known, gguf_metadata=gguf_metadata)
    info.update(generation_defaults=defaults, generation_defaults_from=source or None)
    return info


def count_parameters(config: ModelConfig) -> dict[str, int]:
    """Parameter counts by component for `config`, from a Transformer on the meta device (no memory)."""
    from llmkit.model import Transformer, param_counts
    from llmkit.model.layers import empty_weights

    with empty_weights():
        model = Transformer(config)
    return param_counts(model)


def memory_info(config: ModelConfig, context: int | None = None, native: str | None = None,
                device: Any = None) -> dict[str, Any]:
    """llmkit.memory.estimate at each precision on `device` (None: where a load would go), with what is
    available here: {"device", "context", "kv_slots", "kv_per_token", "available", "native", "precisions":
    {precision: {"weights", "kv_cache", "runtime", "total", "kv_per_token", "fits"}}}. `native`: the file's
    own precision (a quantized GGUF's int4 / int8), marked in the text view."""
    from llmkit.device import resolve_device
    from llmkit.memory import available_memory, estimate

    dev = resolve_device(device).type
    have = available_memory(dev)
    rows = {}
    for p in ("float32", "bfloat16", "int8", "int4"):
        e = estimate(config, p, context, device=dev)
        rows[p] = {k: e[k] for k in ("weights", "kv_per_token", "kv_cache", "runtime", "total")}
        rows[p]["fits"] = None if have is None else e["total"] <= have
    return {"device": dev, "context": e["context"], "kv_slots": e["kv_slots"], "available": have,
            "native": native, "precisions": rows}


def _native_precision(info: dict[str, Any]) -> str | None:
    """int4 / int8 for a block-quantized GGUF (by its file type, else its largest stored type), else None."""
    if info["format"] != "gguf":
        return None
    kind = info.get("file_type") or max(info["storage"].items(), key=lambda kv: kv[1]["bytes"])[0]
    return "int4" if kind.startswith(("Q2", "Q3", "Q4")) else "int8" if kind.startswith(("Q5", "Q6", "Q8")) \
        else None


def _storage_gguf(f: Any) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for t in f.tensor_infos():
        d = out.setdefault(t.ggml_type, {"tensors": 0, "params": 0, "bytes": 0})
        d["tensors"] += 1
        d["params"] += _numel(t.shape)
        d["bytes"] += t.n_bytes
    return out


def _storage_safetensors(files: list[Path]) -> dict[str, dict[str, int]]:
    """Per-dtype totals from the JSON headers of safetensors files (8-byte length + JSON)."""
    out: dict[str, dict[str, int]] = {}
    for file in files:
        try:
            with open(file, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
        except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LlmkitError(f"{file}: not a readable safetensors file ({e})") from e
        for name, t in header.items():
            if name == "__metadata__":
                continue
            d = out.setdefault(t["dtype"], {"tensors": 0, "params": 0, "bytes": 0})
            d["tensors"] += 1
            d["params"] += _numel(t["shape"])
            d["bytes"] += t["data_offsets"][1] - t["data_offsets"][0]
    return out


def _tokenizer_info(source: Any) -> dict[str, Any]:
    from llmkit.tokenizer import Tokenizer

    try:
        tok = Tokenizer.from_gguf(source) if not isinstance(source, Path) else Tokenizer.load(source)
    except LlmkitError as e:
        return {"tokenizer_error": str(e), "special_tokens": {}, "chat_template": None}
    names = {"bos": tok.bos_id, "eos": tok.eos_id, "pad": tok.pad_id}
    return {
        "tokenizer_vocab_size": tok.vocab_size,
        "bos_eos_pad": {k: _token(tok, i) for k, i in names.items() if i is not None},
        "stop_ids": sorted(tok.stop_ids),
        "special_tokens": dict(sorted(tok.special_tokens.items(), key=lambda kv: kv[1])),
        "chat_template": tok.chat_template,
    }


def _token(tok: Any, i: int) -> dict[str, Any]:
    return {"id": i, "text": tok.id_to_bytes(i).decode("utf-8", "replace")}


def _numel(shape: Any) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _file_type(v: Any) -> str | None:
    if v is None:
        return None
    from gguf import LlamaFileType

    try:
        return LlamaFileType(int(v)).name.removeprefix("MOSTLY_")
    except ValueError:
        return str(v)


# ---------------------------------------------------------------------------------------------- text view
def format_info(info: dict[str, Any], template_lines: int = 8) -> str:
    """The human-readable view of `model_info` (what `llmkit inspect` prints)."""
    c = info["config"]
    lines = [f"{info['path']}  ({info['format'].upper()}, {_size(info['file_bytes'])})"]
    row = lines.append
    row(f"architecture     {info['architecture']} (exports as HF model_type {info['model_type']})")
    if info.get("name"):
        row(f"name             {info['name']}")
    if info.get("file_type"):
        row(f"file type        {info['file_type']}")
    row(f"layers           {c['n_layers']}")
    row(f"d_model          {c['d_model']}")
    heads = f"{c['n_heads']} query, {c['n_kv_heads']} key/value (head_dim {c['head_dim']})"
    row(f"attention heads  {heads}")
    row(f"mlp              {c['mlp']} ({c['activation']}), d_ff {c['d_ff']}")
    if c["n_experts"]:
        row(f"experts          {c['n_experts']} ({c['n_experts_per_tok']} per token, d_ff {c['moe_d_ff']})")
    row(f"norm             {c['norm']} (eps {c['norm_eps']:g})")
    pos = f"rope (theta {c['rope_theta']:g})" if c["pos_encoding"] == "rope" else c["pos_encoding"]
    if c.get("rope_scaling"):
        pos += f", scaling {c['rope_scaling']}"
    row(f"positions        {pos}")
    extras = [
        n
        for n, on in (
            ("q/k/v bias", c["attn_qkv_bias"]),
            ("qk-norm", c["qk_norm"]),
            ("tied embeddings", c["tie_embeddings"]),
        )
        if on
    ]
    if c.get("sliding_window"):
        extras.append(f"sliding window {c['sliding_window']}")
    if extras:
        row(f"features         {', '.join(extras)}")
    row(f"context length   {info['context_length']}")
    row(f"vocab size       {info['vocab_size']}")
    params = info["parameters"]
    row(f"parameters       {params['total']:,}")
    for k in _COMPONENTS:
        share = 100 * params[k] / max(params["total"], 1)
        note = " (tied to embeddings)" if k == "lm_head" and c["tie_embeddings"] else ""
        row(f"  {k:<14} {params[k]:>14,}  {share:5.1f} %{note}")
    row("bytes by dtype")
    for dt, d in sorted(info["storage"].items(), key=lambda kv: -kv[1]["bytes"]):
        bits = 8 * d["bytes"] / max(d["params"], 1)
        n = f"{d['tensors']:4d} tensor" + ("s," if d["tensors"] != 1 else ",")
        row(f"  {dt:<14} {_size(d['bytes']):>14}  {n:<13} {bits:.2f} bits/param")
    mem = info.get("memory")
    if mem:
        have = "unknown" if mem["available"] is None else _size(mem["available"])
        row(f"memory           for a {mem['context']}-token context ({mem['kv_slots']} KV slots) on "
            f"{mem['device']}; available here: {have}")
        row(f"  {'precision':<14} {'weights':>10} {'KV/token':>10} {'KV cache':>10} {'runtime':>10} "
            f"{'total':>10}")
        for prec, e in mem["precisions"].items():
            name = prec + (" (file)" if prec == mem["native"] else "")
            fits = "" if e["fits"] is None else "  fits" if e["fits"] else "  too big"
            row(f"  {name:<14} {_size(e['weights']):>10} {_size(e['kv_per_token']):>10} "
                f"{_size(e['kv_cache']):>10} {_size(e['runtime']):>10} {_size(e['total']):>10}{fits}")
    if "tokenizer_error" in info:
        row(f"tokenizer        unavailable: {info['tokenizer_error']}")
    else:
        named = ", ".join(f"{k} {v['text']!r} ({v['id']})" for k, v in info["bos_eos_pad"].items())
        row(f"special ids      {named or '-'}; stop ids {info['stop_ids']}")
        specials = info["special_tokens"]
        shown = ", ".join(f"{t} {i}" for t, i in list(specials.items())[:16])
        more = f" ... (+{len(specials) - 16})" if len(specials) > 16 else ""
        row(f"special tokens   {len(specials)}: {shown}{more}")
    tpl = info.get("chat_template")
    if tpl:
        tl = tpl.splitlines()
        pieces = [t[i : i + 104] for t in tl for i in range(0, max(len(t), 1), 104)]  # long lines wrapped
        row(f"chat template    {len(tpl)} chars, {len(tl)} lines; first lines:")
        lines.extend(f"  | {t}" for t in pieces[:template_lines])
        if len(pieces) > template_lines:
            row("  | ...")
    else:
        row("chat template    none")
    gen = info.get("generation_defaults")
    if gen:
        from llmkit.generate.defaults import describe

        row(f"generation       {describe(gen)} (from {info['generation_defaults_from']})")
    else:
        row("generation       none from the model (each request's values, else llmkit's defaults)")
    return "\n".join(lines)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"

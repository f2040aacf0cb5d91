"""Know before you load: the memory a model needs at a precision and context, and what this machine has.

    est = estimate(config, "int4", context=4096)   # bytes: weights, kv_cache, runtime, total (+ details)
    available_memory("cpu")                          # bytes this process may count on, or None (unknown)
    check_fits(config, "int4", 4096, "cpu", "smollm2.gguf")   # one-line LlmkitError when it would not fit

Notable choices:
- The estimate is closed-form from the ModelConfig (nothing is built or read), following the layouts of
  llmkit.quant: float weights at 2 or 4 bytes; int8 = 1 byte per weight + a float32 scale per output row;
  int4 = half a byte per weight + a bfloat16 (scale, zero) pair per group of 32 inputs, for every Linear but
  the lm_head, which int4 mode keeps in int8 (as any Linear the int4 kernel cannot take: K not a multiple of
  32, N not a multiple of 16). A tied lm_head gets its own quantized copy. As the loaders build it
  (llmkit.quant.swap_quantized), the embedding table of an int8/int4 model is an Int8Embedding (1 byte per
  value + a float16 scale per 32) when d_model is a multiple of 32; norms, MoE routers, position embeddings
  and (as float32) the biases of quantized layers stay in floating point. Fusing q/k/v and gate/up changes
  no byte (scales are per row).
- KV cache: keys and values for every layer, 2 * n_layers * n_kv_heads * head_dim values per token, in the
  compute dtype unless asked ("int8": 1 byte + a float32 scale per token and head). Sized as the engine
  sizes it: the request's tokens rounded up to a power of two, at least MIN_CAPACITY slots, at most the
  model's context (sliding-window layers keep full-length static caches too).
- Runtime: on CPU a measured constant for the process itself (`import torch` alone is 0.224 GB of RSS, with
  llmkit's modules 0.236 GB; after loading and generating, the RSS beyond weights, KV cache, tokenizer and
  RoPE tables was 0.26 GB for SmolLM2-135M in float32 once torch._dynamo was no longer imported: thread pools,
  allocator caches, the first forward's scratch), the tokenizer (~800 bytes per vocabulary entry: measured
  60 MB for SmolLM2's 49k BPE, 114 MB for Gemma 3's 262k SPM), the RoPE tables, the activations of one
  prefill chunk (256 tokens x a few d_model- and d_ff-wide float32 tensors; the eager softcap attention's
  scores) plus a few float32 logits rows per sequence (the engine computes logits at a prompt's last
  position only: a chunk's worth, 268 MB for Gemma 3's vocabulary, would overstate generation's peak), and
  on CUDA for int8/int4 the float copy of the largest (fused) layer a dense GEMM dequantizes (x2 for the
  temporaries; the CPU runs the weight-only kernels at every row count). On CUDA the constant is 0: torch
  reports free memory after the CUDA context exists, and the tokenizer lives on the host.
- available_memory on CPU: the smallest of /proc/meminfo MemAvailable, the cgroup's limit minus its usage
  (reclaimable page cache not counted as used), plus the part of this process's RSS the estimate's runtime
  constant already covers (so a process that already holds a model does not count it as free); and
  LLMKIT_MEMORY_LIMIT (bytes, or "200MB", "1.5GB", "2GiB"), which states the total this process may use,
  compared with the estimate's total as it is. CUDA: torch.cuda.mem_get_info's free bytes. None elsewhere
  (no check). LLMKIT_NO_MEMORY_CHECK=1 skips check_fits.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from llmkit.config import ModelConfig
from llmkit.errors import LlmkitError

PRECISIONS = ("float32", "bfloat16", "float16", "int8", "int4")
QUANTIZED = ("int8", "int4")
FLOAT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GROUP_SIZE = 32  # int4 inputs per (scale, zero) pair (llmkit.quant's default)
INT4_PAIR_BYTES = 4  # (scale, zero) in bfloat16
INT8_ROW_BYTES = 4  # one float32 scale per output row
KV_INT8_SCALE_BYTES = 4  # one float32 scale per (token, head), for keys and for values
EMBED_SCALE_BYTES = 2  # int8/int4 models' embedding table: a float16 scale per GROUP_SIZE values
RUNTIME_CPU = 300_000_000  # the process beyond its tensors and tokenizer: RSS measured on CPU in a fresh
# install (2026-12-01; `import torch` alone is ~290 MB of it there, ~230 MB in a long-used one)
TOKENIZER_BYTES = 800  # per vocabulary entry (vocab, merges, special tokens as Python objects)
DEFAULT_CONTEXT = 4096  # tokens a load and `llmkit inspect` are checked for unless told (a long chat)
PREFILL_CHUNK = 256  # tokens per prefill forward (llmkit.generate.engine.Engine's prefill_chunk default)

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*")


# ---------------------------------------------------------------------------------------------- estimate
def precision_name(precision: Any) -> str:
    """float32, bfloat16, float16, int8 or int4, from a name, an alias (bf16, fp32, ...) or a torch dtype."""
    from llmkit.device import DTYPES

    key = str(precision).removeprefix("torch.")
    if key in QUANTIZED:
        return key
    if key in DTYPES:
        return str(DTYPES[key]).removeprefix("torch.")
    raise LlmkitError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")


def default_context(config: ModelConfig) -> int:
    """The context a load is checked for when none is asked: DEFAULT_CONTEXT, capped by the model's."""
    return min(config.max_seq_len, DEFAULT_CONTEXT)


def kv_slots(config: ModelConfig, context: int) -> int:
    """KV slots per row the engine allocates for `context` tokens (see llmkit.generate.api.get_engine)."""
    from llmkit.generate.api import MIN_CAPACITY

    return min(config.max_seq_len, max(MIN_CAPACITY, 1 << max(context - 1, 1).bit_length()))


def kv_bytes_per_token(config: ModelConfig, kv_dtype: str) -> int:
    """Bytes of keys + values one token costs in the cache, over all layers."""
    per_head = config.head_dim + KV_INT8_SCALE_BYTES if kv_dtype == "int8" else \
        config.head_dim * FLOAT_BYTES[precision_name(kv_dtype)]
    return 2 * config.n_layers * config.n_kv_heads * per_head


def _layers(config: ModelConfig) -> list[tuple[str, int, int, bool]]:
    """(role, in_features, out_features, bias) of every Linear as it runs after llmkit.quant's fusion (q/k/v
    as one, gate/up as one); role "linear", "router" (MoE, stays float) or "head"."""
    d, hd, c = config.d_model, config.head_dim, config
    out = []

    def mlp(ff: int, bias: bool) -> None:
        out.append(("linear", d, 2 * ff if c.mlp == "swiglu" else ff, bias))  # gate + up (or up)
        out.append(("linear", ff, d, bias))  # down

    for i in range(c.n_layers):
        out.append(("linear", d, (c.n_heads + 2 * c.n_kv_heads) * hd, c.attn_qkv_bias))
        out.append(("linear", c.n_heads * hd, d, c.attn_out_bias))
        if c.is_moe_layer(i):
            out.append(("router", d, c.n_experts, False))
            for _ in range(c.n_experts):
                mlp(c.moe_d_ff, False)
            if c.moe_shared_expert_d_ff:
                mlp(c.moe_shared_expert_d_ff, False)
                out.append(("linear", d, 1, False))  # shared_expert_gate
        else:
            mlp(c.d_ff, c.mlp_bias)
    out.append(("head", d, c.vocab_size, False))
    return out


def _linear_bytes(k: int, n: int, mode: str) -> int:
    """Bytes of one quantized (N, K) weight with its scales (no bias). int4 needs K in whole groups and N a
    multiple of 16 (the CPU kernel's packing); other shapes (MoE's shared_expert_gate, N = 1) stay int8."""
    if mode == "int4" and k % GROUP_SIZE == 0 and n % 16 == 0:
        return n * k // 2 + (k // GROUP_SIZE) * n * INT4_PAIR_BYTES
    return n * k + n * INT8_ROW_BYTES


def weight_bytes(config: ModelConfig, precision: str, float_dtype: str | None = None) -> dict[str, int]:
    """Bytes of the weights at `precision`, by part: linear (attention, MLP, experts), lm_head, embeddings,
    other (norms, routers), and total. `float_dtype`: the dtype of what stays in floating point (default:
    the precision itself, float32 for int8/int4)."""
    precision = precision_name(precision)
    fb = FLOAT_BYTES[precision_name(float_dtype or (precision if precision in FLOAT_BYTES else "float32"))]
    c = config
    parts = dict.fromkeys(("linear", "lm_head", "embeddings", "other"), 0)
    for role, k, n, bias in _layers(c):
        if role == "router" or precision not in QUANTIZED:
            if role == "head" and c.tie_embeddings:
                continue  # shares the embedding table
            parts["other" if role == "router" else "lm_head" if role == "head" else "linear"] += (
                (n * k + n * bias) * fb)
        else:  # int4 mode keeps the head in int8; quantized biases are float32
            mode = "int8" if role == "head" else precision
            parts["lm_head" if role == "head" else "linear"] += _linear_bytes(k, n, mode) + 4 * n * bias
    table = c.vocab_size * c.d_model
    if precision in QUANTIZED and c.d_model % GROUP_SIZE == 0:  # an Int8Embedding
        parts["embeddings"] = table + table // GROUP_SIZE * EMBED_SCALE_BYTES
    else:
        parts["embeddings"] = table * fb
    if c.pos_encoding == "learned":
        parts["embeddings"] += c.max_seq_len * c.d_model * fb
    norm = c.d_model * (2 if c.norm == "layernorm" else 1)
    per_block = (4 if c.sandwich_norm else 2) * norm + (2 * c.head_dim if c.qk_norm else 0)
    parts["other"] += (c.n_layers * per_block + norm) * fb
    parts["total"] = sum(parts.values())
    return parts


def estimate(config: ModelConfig, precision: Any, context: int | None = None, batch: int = 1,
             kv_dtype: Any = None, *, device: Any = "cpu", float_dtype: Any = None) -> dict[str, Any]:
    """Bytes a model needs loaded at `precision` and serving `batch` rows of `context` tokens on `device`:
    {"weights", "kv_cache", "runtime", "total"} plus the details they add up from (see module docstring).
    `context` None: default_context. `kv_dtype` None / "auto": the compute dtype; else a float dtype or
    "int8". `float_dtype` None: the precision itself, else (int8/int4) float32 on CPU, bfloat16 on CUDA
    (llmkit.device's defaults)."""
    precision = precision_name(precision)
    cuda = str(device).startswith("cuda")
    if float_dtype is None:
        float_dtype = precision if precision in FLOAT_BYTES else "bfloat16" if cuda else "float32"
    float_dtype = precision_name(float_dtype)
    kv = str(kv_dtype or "auto").removeprefix("torch.")
    kv = "int8" if kv == "int8" else float_dtype if kv == "auto" else precision_name(kv)
    c = config
    if context is None:
        context = default_context(c)
    if context < 1 or batch < 1:
        raise LlmkitError(f"memory estimate: context ({context}) and batch ({batch}) must be >= 1")
    context = min(context, c.max_seq_len)
    slots = kv_slots(c, context)
    per_token = kv_bytes_per_token(c, kv)
    weights = weight_bytes(c, precision, float_dtype)
    fb = FLOAT_BYTES[float_dtype]
    ff = max(c.d_ff, c.moe_d_ff if c.n_experts else 0, c.moe_shared_expert_d_ff)
    runtime = {
        "base": 0 if cuda else RUNTIME_CPU,
        "tokenizer": 0 if cuda else c.vocab_size * TOKENIZER_BYTES,
        "rope": c.max_seq_len * c.head_dim * 4 * (2 if c.rope_local_theta else 1) if c.pos_encoding == "rope"
        else 0,
        "activations": PREFILL_CHUNK * 4 * (8 * c.d_model + 3 * ff)  # hidden states; gate, up, product
        + batch * 4 * 4 * c.vocab_size  # logits, their float32 copy, probabilities, sorted (top-p)
        + (PREFILL_CHUNK * c.n_heads * slots * 4 if c.attn_logit_softcap else 0),  # eager softcap scores
        "dequantize": 2 * fb * max(k * n for role, k, n, _ in _layers(c) if role == "linear")
        if precision in QUANTIZED and cuda else 0,  # CPU: the weight-only kernels for every row count
    }
    kv_cache = per_token * slots * batch
    total = weights["total"] + kv_cache + sum(runtime.values())
    return {
        "precision": precision, "float_dtype": float_dtype, "kv_dtype": kv,
        "device": "cuda" if cuda else "cpu",
        "context": context, "kv_slots": slots, "batch": batch,
        "weights": weights["total"], "kv_cache": kv_cache, "runtime": sum(runtime.values()), "total": total,
        "weights_detail": weights, "kv_per_token": per_token, "runtime_detail": runtime,
    }


# ---------------------------------------------------------------------------------------------- machine
def parse_size(text: str, what: str = "size") -> int:
    """Bytes from "123456", "200MB", "1.5GB", "2GiB" (decimal KB/MB/GB/TB, binary KiB/MiB/GiB/TiB)."""
    m = _SIZE_RE.fullmatch(str(text).lower())
    if not m or m[2] not in _UNITS:
        raise LlmkitError(f"{what}={text!r}: not a size; use bytes or a number with a unit, e.g. 800MB, "
                          "1.5GB, 2GiB")
    return int(float(m[1]) * _UNITS[m[2]])


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (no limit) -> None


def _stat(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


# cgroup v2 (unified, controllers "") and v1 (memory controller): limit, usage, stat file, reclaimable cache
_PROC_CGROUP = Path("/proc/self/cgroup")  # "hierarchy:controllers:path" lines
_CGROUPS = {"": ("/sys/fs/cgroup", "memory.max", "memory.current", "inactive_file"),
            "memory": ("/sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.usage_in_bytes",
                       "total_inactive_file")}


def _cgroup_free() -> int | None:
    """The tightest (limit - usage) over this process's memory cgroup and its ancestors, reclaimable file
    cache not counted as used; None when no level sets a limit."""
    try:
        lines = _PROC_CGROUP.read_text().splitlines()
    except OSError:
        return None
    free = []
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        kind = "" if controllers == "" else "memory" if "memory" in controllers.split(",") else None
        if kind is None:
            continue
        root, limit, usage, cache = _CGROUPS[kind]
        d = Path(root + rel.rstrip("/"))
        for level in (d, *d.parents):
            top, used = _read_int(level / limit), _read_int(level / usage)
            if top is not None and used is not None and top < 1 << 60:  # v1 writes ~2**63 for "no limit"
                free.append(top - used + _stat(level / "memory.stat", cache))
            if level == Path(root):
                break
    return min(free) if free else None


def _meminfo(key: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _rss() -> int:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def memory_limit() -> int | None:
    """LLMKIT_MEMORY_LIMIT in bytes, or None when unset."""
    text = os.environ.get("LLMKIT_MEMORY_LIMIT", "").strip()
    return parse_size(text, "LLMKIT_MEMORY_LIMIT") if text else None


def available_memory(device: Any = "cpu") -> int | None:
    """Bytes a model load on `device` may count on (see module docstring), or None when unknown."""
    limit = memory_limit()
    found = [limit] if limit is not None else []
    if str(device).startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            found.append(torch.cuda.mem_get_info(torch.device(device))[0])
    else:
        free = [x for x in (_meminfo("MemAvailable"), _cgroup_free()) if x is not None]
        if free:
            found.append(min(free) + min(_rss(), RUNTIME_CPU))
    return min(found) if found else None


def check_fits(config: ModelConfig, precision: Any, context: int | None, device: Any, source: Any,
               **kw: Any) -> dict[str, Any] | None:
    """Raise a one-line LlmkitError when `config` at `precision` and `context` (None: default_context) would
    not fit in available_memory(device); else return the estimate (None when skipped by
    LLMKIT_NO_MEMORY_CHECK=1). `kw`: estimate's batch, kv_dtype, float_dtype."""
    if os.environ.get("LLMKIT_NO_MEMORY_CHECK", "") not in ("", "0"):
        return None
    est = estimate(config, precision, context, device=device, **kw)
    have = available_memory(device)
    if have is None or est["total"] <= have:
        return est
    p, ctx = est["precision"], est["context"]
    hints = []
    if p != "int4" and estimate(config, "int4", ctx, device=device, **kw)["total"] < est["total"]:
        hints.append("--quantize int4")
    if est["kv_cache"] > est["total"] // 10 and ctx > 256:
        hints.append("a shorter --context")
    if not hints:
        hints.append("a smaller model")
    capped = " (LLMKIT_MEMORY_LIMIT)" if have == memory_limit() else ""
    raise LlmkitError(
        f"{source}: needs ~{gb(est['total'])} at {p} with a {ctx}-token context "
        f"(weights {gb(est['weights'])} + KV cache {gb(est['kv_cache'])} + runtime {gb(est['runtime'])}), "
        f"this machine has {gb(have)} available{capped}; try {' or '.join(hints)} "
        "(LLMKIT_NO_MEMORY_CHECK=1 loads anyway)"
    )


def gb(n: int) -> str:
    """Bytes as GB with two decimals below 10 GB, one above (decimal units: 1 GB = 10^9 bytes)."""
    return f"{n / 1e9:.2f} GB" if n < 10e9 else f"{n / 1e9:.1f} GB"

"""Device and dtype names -> torch objects: the one place that reads `--device` / `--dtype` / `device=`.

Defaults (None or "auto"): CUDA when available, else CPU; bfloat16 on CUDA, float32 elsewhere. Names
accept the usual aliases (fp32, bf16, half, ...) and a `torch.` prefix. Bad names and a CUDA device on a
machine without one are one-line LlmkitErrors.
"""

from __future__ import annotations

import torch

from llmkit.errors import LlmkitError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """None / "auto" -> cuda when available, else cpu; otherwise the named device ("cpu", "cuda:1", ...)."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise LlmkitError(f"bad device {device!r}: {e}; use auto, cpu or cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LlmkitError(f"device {device!r}: no CUDA GPU is available here; use cpu")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """None / "auto" -> bfloat16 on CUDA, float32 elsewhere; otherwise the named floating dtype."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).removeprefix("torch.")
    if key not in DTYPES:
        raise LlmkitError(f"bad dtype {dtype!r}; use one of auto, float32, bfloat16, float16")
    return DTYPES[key]

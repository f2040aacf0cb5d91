"""A small streaming safetensors reader: header checked up front, then one tensor read at a time.

Notable choices:
- Plain reads (no mmap) into a freshly allocated tensor per entry, so memory holds exactly the tensors the
  caller keeps: loading a checkpoint costs the final weights plus one tensor in flight, the file is closed
  afterwards, and no weight aliases file pages (overwriting the file later cannot change a loaded model).
- The whole header is validated before any data is read: JSON, dtypes, shapes against byte ranges, and
  byte ranges against the file size, so a truncated or corrupt file fails fast with one line naming the
  file and the first bad tensor.
Format: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}}, data.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from llmkit.errors import LlmkitError

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_HEADER = 100 * 2**20


def read_header(path: str | os.PathLike) -> tuple[int, dict[str, dict]]:
    """(data start offset, {name: {dtype, shape, data_offsets}}) after checking every entry."""
    path = Path(path)
    bad = f"{path}: not a valid safetensors file"
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise LlmkitError(f"{bad} (only {size} bytes); re-download or re-export it")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, _MAX_HEADER):
            raise LlmkitError(
                f"{bad} (header of {n} bytes in a {size}-byte file: truncated?); re-download it"
            )
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LlmkitError(f"{bad} (header is not JSON: {e}); re-download or re-export it") from None
    if not isinstance(header, dict):
        raise LlmkitError(f"{bad} (header is not a JSON object)")
    header.pop("__metadata__", None)
    start = 8 + n
    for name, info in header.items():
        try:
            dtype = DTYPES[info["dtype"]]
            shape = [int(d) for d in info["shape"]]
            lo, hi = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise LlmkitError(f"{bad}: tensor {name!r} has a malformed header entry {info!r}") from None
        nbytes = math.prod(shape) * dtype.itemsize
        if hi - lo != nbytes or lo < 0:
            raise LlmkitError(
                f"{bad}: tensor {name!r} ({info['dtype']} {shape}) spans {hi - lo} bytes, needs {nbytes}"
            )
        if start + hi > size:
            raise LlmkitError(
                f"{path}: truncated file: tensor {name!r} ends at byte {start + hi}, "
                f"the file has {size} bytes; "
                "re-download it"
            )
    return start, header


def read_safetensors(path: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, CPU tensor) in file order, each read into its own fresh memory."""
    start, header = read_header(path)
    entries = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    with open(path, "rb") as f:
        for name, info in entries:
            lo, hi = info["data_offsets"]
            buf = torch.empty(hi - lo, dtype=torch.uint8)
            f.seek(start + lo)
            if f.readinto(memoryview(buf.numpy())) != hi - lo:
                raise LlmkitError(f"{path}: truncated file while reading tensor {name!r}; re-download it")
            yield name, buf.view(DTYPES[info["dtype"]]).reshape(info["shape"])

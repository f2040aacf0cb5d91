"""Files in and out, without torch: atomic writes, JSON, text corpora, and the GGUF container.

One helper per idea, used by every layer (tokenizer, checkpoints, training, serving):
- Atomic writes: `atomic_path(path)` gives a temporary path in the same folder and `os.replace`s it onto
  `path` when the block ends without error (removed otherwise), so readers see the old file or the new one,
  never half of one. `atomic_write_text/bytes/json` and `atomic_torch_save` are the usual writers on top.
  The temporary file is created by the writer with the default permissions (umask), like a plain `open`.
  Atomic against a crash of the process, not against power loss (no fsync).
- `read_json(path)`: a JSON file, or one-line LlmkitErrors for missing, non-UTF-8 and malformed files.
- Text corpora: `corpus_files` expands files and folders (every *.txt below, sorted); `read_text` reads
  one UTF-8 file (BOM dropped) and refuses binary or non-UTF-8 content with a one-line error.
- `read_gguf(path)`: the key/value metadata and the tensor table of a GGUF file (llama.cpp's format),
  parsed from a memory map without touching tensor data. String arrays (150k-token vocabularies) go
  through a tight loop and numeric arrays through numpy: a fraction of a second where gguf-py's reader,
  which makes an object per array element, takes seconds. The tokenizer reads its vocabulary from the
  metadata; llmkit.checkpoint.gguf reads tensors at the offsets of the table.
"""

from __future__ import annotations

import json
import mmap
import os
import secrets
import struct
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmkit.errors import LlmkitError


# ---------------------------------------------------------------------------------------- atomic writes
@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary path beside `path`; on success it replaces `path`, on error it is deleted.

    >>> with atomic_path(out / "model.safetensors") as tmp:  # doctest: +SKIP
    ...     save_file(tensors, tmp)
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only left when the writer or os.replace failed


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp, open(tmp, "xb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 text atomically (newlines written as given)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2,
                      ensure_ascii: bool = False, **dumps_kw: Any) -> Path:
    """Write `obj` as JSON (UTF-8, a final newline) atomically."""
    text = json.dumps(obj, indent=indent, ensure_ascii=ensure_ascii, **dumps_kw)
    return atomic_write_text(path, text + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """`torch.save(obj, path)` atomically: a crash mid-write keeps the previous file."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


# ------------------------------------------------------------------------------------------------ JSON
def read_json(path: str | os.PathLike, *, missing: str | None = None) -> Any:
    """The JSON value in `path`; a one-line LlmkitError when it is missing (`missing`: what to do then),
    not UTF-8, or not valid JSON."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise LlmkitError(f"{path}: not found" + (f"; {missing}" if missing else "")) from None
    except json.JSONDecodeError as e:
        raise LlmkitError(
            f"{path}: invalid JSON ({e.msg} at line {e.lineno}); re-download or re-create the file"
        ) from None
    except UnicodeDecodeError:
        raise LlmkitError(f"{path}: not UTF-8 JSON; re-download or re-create the file") from None


# ----------------------------------------------------------------------------------------- text corpora
def corpus_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand files and directories (every *.txt below them, sorted) into a list of files."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(q for q in p.rglob("*.txt") if q.is_file())
            if not found:
                raise LlmkitError(
                    f"corpus directory {p}: no .txt files in it or below (no *.txt matched); "
                    "pass .txt files or a folder of them"
                )
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise LlmkitError(f"corpus path not found: {p}")
    if not files:
        raise LlmkitError("no corpus given; pass .txt files or a directory of them")
    return files


def read_text(path: str | os.PathLike) -> str:
    """One UTF-8 text file (a leading BOM dropped); binary or non-UTF-8 content is a one-line error."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise LlmkitError(f"{path}: no such file") from None
    if b"\x00" in data[: 1 << 16]:
        raise LlmkitError(f"{path}: looks like a binary file (NUL bytes); give UTF-8 text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LlmkitError(
            f"{path}: not UTF-8 text (bad byte at offset {e.start}); convert it to UTF-8 first"
        ) from None
    return text.removeprefix("\ufeff")


# ------------------------------------------------------------------------------------------------ GGUF
# GGUF value types: scalars by struct format; 8 = string, 9 = array
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
GGUF_DEFAULT_ALIGNMENT = 32


@dataclass(frozen=True)
class GGUFTensorEntry:
    """One row of a GGUF tensor table, as stored."""

    name: str
    ggml_type: int  # a gguf.GGMLQuantizationType value (F32 = 0, Q4_1 = 3, ...)
    dims: tuple[int, ...]  # ggml order: fastest-varying first, i.e. reversed PyTorch shape
    offset: int  # absolute byte offset of the tensor's data in the file


@dataclass(frozen=True)
class GGUFIndex:
    """What `read_gguf` finds: format version, metadata (key -> value), tensor table, data start."""

    version: int
    metadata: dict[str, Any]
    tensors: list[GGUFTensorEntry]
    data_start: int


def read_gguf(path: str | os.PathLike) -> GGUFIndex:
    """Parse a GGUF file's header: metadata and tensor table (no tensor data is read).

    Any structural problem (bad magic, unsupported version, cut inside the header) is a one-line
    LlmkitError naming the file.
    """
    path = Path(path)
    bad = f"{path}: not a readable GGUF file"
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise LlmkitError(f"{path}: no such GGUF file") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            raise LlmkitError(f"{bad} (only {size} bytes; truncated download?)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            if buf[:4] != b"GGUF":
                raise LlmkitError(f"{bad} (bad magic {bytes(buf[:4])!r}); the file is corrupt or not GGUF")
            try:
                return _parse_gguf(buf, size, str(path))
            except LlmkitError:
                raise
            except (struct.error, ValueError, IndexError, OverflowError) as e:
                raise LlmkitError(f"{bad} ({e}; truncated or corrupt header)") from None


def _parse_gguf(buf: mmap.mmap, size: int, where: str) -> GGUFIndex:
    import numpy as np

    pos = 4

    def take(fmt: str) -> Any:
        nonlocal pos
        v = struct.unpack_from(fmt, buf, pos)[0]
        pos += struct.calcsize(fmt)
        return v

    def room(count: int, item: int) -> int:
        if count * item > size - pos:
            raise ValueError(f"{count} items at byte {pos} run past the end of the file")
        return count

    def string() -> str:
        nonlocal pos
        n = room(take("<Q"), 1)
        s = str(buf[pos : pos + n], "utf-8", "replace")
        pos += n
        return s

    def value(vtype: int) -> Any:
        nonlocal pos
        if vtype in _GGUF_SCALARS:
            return take(_GGUF_SCALARS[vtype])
        if vtype == _GGUF_STRING:
            return string()
        if vtype != _GGUF_ARRAY:
            raise ValueError(f"unknown value type {vtype}")
        etype, count = take("<I"), take("<Q")
        if etype in _GGUF_SCALARS and etype != 7:  # numbers via numpy (bools stay Python bools)
            dt = np.dtype(_GGUF_SCALARS[etype])
            arr = np.frombuffer(buf, dtype=dt, count=room(count, dt.itemsize), offset=pos).tolist()
            pos += dt.itemsize * count
            return arr
        if etype == _GGUF_STRING:  # vocabularies and merges: the hot loop, kept tight
            out: list[str] = []
            with memoryview(buf) as mv:
                for _ in range(room(count, 8)):
                    n = int.from_bytes(mv[pos : pos + 8], "little")
                    out.append(str(mv[pos + 8 : pos + 8 + n], "utf-8", "replace"))
                    pos += 8 + n
            if pos > size:
                raise ValueError("a string array runs past the end of the file")
            return out
        return [value(etype) for _ in range(room(count, 1))]

    version = take("<I")
    if version < 2:
        raise LlmkitError(f"{where}: GGUF version {version} is too old; re-convert the model")
    if version > 3:
        raise LlmkitError(f"{where}: GGUF version {version} is not supported (llmkit reads versions 2 and 3)")
    n_tensors, n_kv = take("<Q"), take("<Q")
    meta: dict[str, Any] = {}
    for _ in range(room(n_kv, 12)):
        key = string()
        meta[key] = value(take("<I"))
    rows = []
    for _ in range(room(n_tensors, 24)):
        name = string()
        n_dims = take("<I")
        dims = tuple(take("<Q") for _ in range(room(n_dims, 8)))
        rows.append((name, take("<I"), dims, take("<Q")))
    align = meta.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(align, int) or align <= 0 or align & (align - 1):
        raise LlmkitError(f"{where}: general.alignment {align!r} is not a power of two; the file is corrupt")
    start = -(-pos // align) * align
    tensors = [GGUFTensorEntry(name, t, dims, start + off) for name, t, dims, off in rows]
    return GGUFIndex(version=version, metadata=meta, tensors=tensors, data_start=start)

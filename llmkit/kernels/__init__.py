"""llmkit's own CPU kernels: int4 and int8 weight matmuls with int8 activations (quant.c beside this file),
and the native decode step that runs every layer of a Llama-shaped model in C (decode.c, driven by
llmkit.generate.native).

    from llmkit import kernels
    if kernels.available():
        y = kernels.q4_mm(x, qweight, sz, 32)  # x (M, K) float32, qweight (N, K/2) uint8, sz (K/32, N, 2)
        y = kernels.q8_mm(x, qweight, s)    # qweight (N, K) int8, s (N,) float32

Notable choices:
- Why our own: PyTorch's CPU weight-only kernels (`_weight_int4pack_mm_for_cpu`) dequantize to floats and
  multiply-add in fp32; on this machine they read the weights at a third of the memory bandwidth. The
  course's way (and llama.cpp's) quantizes the activations to int8 per block of 32 and does the block's dot
  product in integers (AVX2 `maddubs`: 32 multiply-adds in one instruction), so the weights stream at
  memory speed. quant.c holds the maths in its header comment; it has a portable C path too.
- The int4 layout interleaves each quad of blocks 4 bytes at a time (quant.c's header), so a quad's 128
  products add up as integers, one int32 lane per block and 128-bit half, before one conversion to float
  with one scale per lane: on a 2-core Zen 3, ~20 % fewer cycles per hot row than GGUF's plain order (two
  blocks per load, a shuffle of the scales per pair) and ~4 % off a decode step (2026-12-01, seventh
  session).
- Several rows at once (prefill, batches, drafts): 4 rows of x per row of W (each weight byte unpacked
  once), x in blocks of 32 rows so its int8 copy stays in cache; decode takes 2 rows of W at a time
  (shared x loads). On an AVX-512 VNNI CPU a quad's integers come from two `vpdpbusd` on one 64-byte load
  (AVX2: 4 `pmaddubsw`); the lanes are the same integers and every float operation is shared code, so a
  row's result does not depend on the batch and both builds give the same bits (tests/test_kernels.py).
  (Until 2026-12-01 the AVX-512 build had tiles of 4 weight rows x 2 activation rows for prefill, ~540
  tok/s on a Xeon; they went with GGUF's plain order. The VNNI rows are not yet measured on a Xeon.)
- Activations: "int16" (default) keeps a second int8 part per value (the rounding remainder, x ~= d (q +
  l / 128)): ~15 bits, more than bfloat16, for one more integer dot product per block. On the AVX-512 Xeon
  that costs nothing measurable (memory sets the pace); on a 2-core AVX2 EPYC, where the one-row kernel is
  compute-bound, "int8" runs it ~1.25x faster (hot, one thread). "int8" is ggml's Q8_1 exactly, so
  llama.cpp's numbers and its answers to near-ties (SmolLM2: "L'Étoile..." for the capital of France, not
  "Paris").
- Built on first use, not at install: `cc -O3 -march=native -fopenmp -shared` on decode.c, which includes
  quant.c (one library; no PyTorch headers, about a second), into LLMKIT_HOME/kernels/<hash of sources,
  compiler, CPU flags>.so, written to a temporary name then renamed (two processes building at once never
  load a half-written file). Later processes load the cached library. No compiler, a failed build, or
  LLMKIT_NO_KERNELS=1: `available()` is False and llmkit uses PyTorch's kernels (the reason is in
  `why_not()`).
- Called through ctypes (about a microsecond per call, well below a custom op's dispatch). Under
  torch.compile the same functions run as the opaque ops `llmkit::q4_mm` / `llmkit::q8_mm` (CPU only).
- OpenMP: the library is linked against the libgomp PyTorch already loaded (same soname), so one thread
  pool serves both and torch.set_num_threads applies to our kernels too.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import torch

from llmkit.io import atomic_path

SOURCE = Path(__file__).with_name("decode.c")  # includes quant.c: one library
SOURCES = (SOURCE, Path(__file__).with_name("quant.c"))
# How the kernels round activations: "int16" (default) two int8 parts per value, ~15 bits, where bfloat16
# keeps 8; "int8" one part, llama.cpp's Q8_1 exactly (measured as fast, and as precise as llama.cpp: on
# SmolLM2 it flips near-tied answers such as "The capital of France is Paris." into llama.cpp's
# "L'Étoile...").
ACTIVATIONS = os.environ.get("LLMKIT_ACTIVATIONS", "int16")
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC", "-std=c11"]

_lib: ctypes.CDLL | None = None
_why: str | None = None
_lock = threading.Lock()


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


def _build(cc: str, extra: list[str] | None = None) -> Path:
    from llmkit.hub import cache_dir

    flags = FLAGS + list(extra or [])
    src = b"".join(p.read_bytes() for p in SOURCES)
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    what = repr((cc, version, flags, _cpu_flags(), sys.platform)).encode()
    key = hashlib.sha256(src + what).hexdigest()[:16]
    out = cache_dir() / "kernels" / f"quant-{key}.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    gomp = Path(torch.__file__).parent / "lib" / "libgomp.so.1"  # PyTorch's own OpenMP runtime
    link = [f"-L{gomp.parent}", f"-Wl,-rpath,{gomp.parent}"] if gomp.is_file() else []
    with atomic_path(out) as tmp:
        r = subprocess.run([cc, *flags, str(SOURCE), "-o", str(tmp), *link, "-lm"], capture_output=True,
                           text=True)
        if r.returncode:
            raise OSError(f"{cc} failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
    return out


def _load() -> ctypes.CDLL | None:
    global _lib, _why
    with _lock:
        if _lib is not None or _why is not None:
            return _lib
        if os.environ.get("LLMKIT_NO_KERNELS", "") not in ("", "0"):
            _why = "LLMKIT_NO_KERNELS is set"
            return None
        cc = _compiler()
        if cc is None:
            _why = "no C compiler (cc, gcc or clang) on PATH"
            return None
        try:
            lib = ctypes.CDLL(str(_build(cc)))
        except OSError as e:
            _why = f"could not build llmkit/kernels/{SOURCE.name}: {e}"
            return None
        _lib = _declare(lib)
        return _lib


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.llmkit_q4_mm.argtypes = [p, i64, i64, p, p, i64, i64, i64, p, i64]
    lib.llmkit_q4_mm.restype = ctypes.c_int
    lib.llmkit_q8_mm.argtypes, lib.llmkit_q8_mm.restype = [p, i64, i64, p, p, i64, i64, p], ctypes.c_int
    lib.llmkit_simd.restype = ctypes.c_int
    lib.llmkit_decode.argtypes, lib.llmkit_decode.restype = [p, i64, p, p, p, p, p], ctypes.c_int
    lib.llmkit_embed.argtypes, lib.llmkit_embed.restype = [p, i64, p, p], ctypes.c_int
    return lib


def build_variant(extra_flags: list[str]) -> ctypes.CDLL:
    """Another build of quant.c with extra compiler flags (e.g. ["-mno-avx2"] for the portable C path),
    for tests. Raises OSError when no compiler is there."""
    cc = _compiler()
    if cc is None:
        raise OSError("no C compiler on PATH")
    return _declare(ctypes.CDLL(str(_build(cc, extra_flags))))


def available() -> bool:
    """True when the kernels are built (or were cached) and loaded in this process."""
    return _load() is not None


def why_not() -> str | None:
    """Why the kernels are not available (None when they are)."""
    _load()
    return _why


def simd() -> str:
    """The instruction set the build uses: "avx2" or "portable C" ("" when not available)."""
    lib = _load()
    return "" if lib is None else ("avx2" if lib.llmkit_simd() else "portable C")


def _check(x: torch.Tensor, k: int) -> torch.Tensor:
    if x.dtype != torch.float32:
        x = x.float()
    if not x.is_contiguous():
        x = x.contiguous()
    if x.dim() != 2 or x.shape[1] != k or k % 32:
        raise ValueError(f"kernels: x must be (M, {k}) with K a multiple of 32, got {tuple(x.shape)}")
    return x


GSHIFT = {32: 0, 64: 1, 128: 2, 256: 3}  # group sizes the int4 kernel takes (32 << gshift)


def _q4_eager(x: torch.Tensor, qweight: torch.Tensor, sz: torch.Tensor, group_size: int, fine: bool,
              lib: ctypes.CDLL | None = None, rb: int = 0) -> torch.Tensor:
    n, k = qweight.shape[0], qweight.shape[1] * 2
    x = _check(x, k)
    y = torch.empty(x.shape[0], n, dtype=torch.float32)
    fn = (lib or _lib or _load()).llmkit_q4_mm
    gshift = GSHIFT[group_size]
    if fn(x.data_ptr(), x.shape[0], k, qweight.data_ptr(), sz.data_ptr(), n, gshift, fine, y.data_ptr(), rb):
        raise MemoryError("llmkit int4 kernel: out of memory for the quantized activations")
    return y


def _q8_eager(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, fine: bool,
              lib: ctypes.CDLL | None = None) -> torch.Tensor:
    n, k = qweight.shape
    x = _check(x, k)
    y = torch.empty(x.shape[0], n, dtype=torch.float32)
    fn = (lib or _lib or _load()).llmkit_q8_mm
    if fn(x.data_ptr(), x.shape[0], k, qweight.data_ptr(), scales.data_ptr(), n, fine, y.data_ptr()):
        raise MemoryError("llmkit int8 kernel: out of memory for the quantized activations")
    return y


# The ops torch.compile sees. Defined with the low-level Library API: a call costs about half of a
# `torch.library.custom_op`'s (no autograd / device wrapper around the Python function), ~120 calls a token.
_ops = torch.library.Library("llmkit", "DEF")
_ops.define("q4_mm(Tensor x, Tensor qweight, Tensor sz, int group_size, bool fine, int rb=0) -> Tensor")
_ops.define("q8_mm(Tensor x, Tensor qweight, Tensor scales, bool fine) -> Tensor")
_ops.impl("q4_mm", lambda x, qweight, sz, gs, fine, rb=0: _q4_eager(x, qweight, sz, gs, fine, rb=rb), "CPU")
_ops.impl("q8_mm", lambda x, qweight, scales, fine: _q8_eager(x, qweight, scales, fine), "CPU")


@torch.library.register_fake("llmkit::q4_mm", lib=_ops)
def _(x, qweight, sz, group_size, fine, rb=0):
    return x.new_empty(x.shape[0], qweight.shape[0], dtype=torch.float32)


@torch.library.register_fake("llmkit::q8_mm", lib=_ops)
def _(x, qweight, scales, fine):
    return x.new_empty(x.shape[0], qweight.shape[0], dtype=torch.float32)


def q4_mm(x: torch.Tensor, qweight: torch.Tensor, sz: torch.Tensor, group_size: int = 32,
          fine: bool | None = None, rb: int = 0) -> torch.Tensor:
    """(M, K) float @ int4 W^T -> (M, N) float32. qweight (N, K/2) uint8 in quant.c's layout (`pack_q4`),
    sz (K/group_size, N, 2) bfloat16 (scale s, zero z: w = (q - 8) * s + z), group_size in GSHIFT; rb = RB:
    sz holds the same pairs in blocks of RB rows (`block_rows`). fine: activations in two int8 parts (~15
    bits) instead of one (llama.cpp's Q8_1); None = ACTIVATIONS. Call `available()` first."""
    fine = ACTIVATIONS == "int16" if fine is None else fine
    if torch.compiler.is_compiling():
        return torch.ops.llmkit.q4_mm(x, qweight, sz, group_size, fine, rb)
    return _q4_eager(x, qweight, sz, group_size, fine, rb=rb)


def q8_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, fine: bool | None = None
          ) -> torch.Tensor:
    """(M, K) float @ int8 W^T -> (M, N) float32. qweight (N, K) int8, scales (N,) float32 (w = q * s)."""
    fine = ACTIVATIONS == "int16" if fine is None else fine
    if torch.compiler.is_compiling():
        return torch.ops.llmkit.q8_mm(x, qweight, scales, fine)
    return _q8_eager(x, qweight, scales, fine)


RB = 4  # rows per block of (s, z) pairs in the decode-friendly layout (decode reads rows 2 at a time)


def block_rows(sz: torch.Tensor, rb: int = RB) -> torch.Tensor:
    """(K/gs, N, 2) pairs -> the same pairs in blocks of rb rows, each block (K/gs, its rows, 2) (the last
    block has the N % rb rows left), flat, viewed as (K/gs, N, 2) again. A row's pairs then sit together,
    where decode reads them (quant.c: a row of (K/gs, N) pairs spans K/gs cache lines N * 4 bytes apart)."""
    g, n, _ = sz.shape
    full = n // rb * rb
    parts = [sz[:, :full].reshape(g, full // rb, rb, 2).transpose(0, 1).reshape(-1), sz[:, full:].reshape(-1)]
    return torch.cat(parts).view(g, n, 2)


def unblock_rows(sz: torch.Tensor, rb: int = RB) -> torch.Tensor:
    """Inverse of block_rows."""
    g, n, _ = sz.shape
    full = n // rb * rb
    flat = sz.reshape(-1)
    head = flat[: g * full * 2].view(full // rb, g, rb, 2).transpose(0, 1).reshape(g, full, 2)
    return torch.cat([head, flat[g * full * 2:].view(g, n - full, 2)], dim=1)


def pack_q4(q: torch.Tensor) -> torch.Tensor:
    """(N, K) uint8 nibbles (0..15) -> (N, K/2) in quant.c's layout: per block of 32, byte j holds
    q[j] | q[j + 16] << 4 (GGUF's order); then each full quad of blocks interleaves its blocks' bytes 4 at a
    time (bytes [16g + 4i, 16g + 4i + 4) of the quad are bytes [4g, 4g + 4) of its block i), so that every 4
    adjacent bytes the kernel loads belong to one block (see quant.c's header)."""
    n, k = q.shape
    b = q.reshape(n, k // 32, 32)
    blocks = b[..., :16] | (b[..., 16:] << 4)  # (N, G, 16)
    quads = k // 128
    head = blocks[:, : 4 * quads].reshape(n, quads, 4, 4, 4).transpose(2, 3)  # (N, C, word g, block i, 4)
    return torch.cat([head.reshape(n, -1), blocks[:, 4 * quads :].reshape(n, -1)], dim=1)


def unpack_q4(p: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Inverse of pack_q4."""
    quads, p = k // 128, p.reshape(n, k // 2)
    head = p[:, : 64 * quads].reshape(n, quads, 4, 4, 4).transpose(2, 3).reshape(n, 4 * quads, 16)
    b = torch.cat([head, p[:, 64 * quads :].reshape(n, -1, 16)], dim=1)  # (N, G, 16): GGUF's bytes
    return torch.cat([b & 15, b >> 4], dim=-1).reshape(n, k)

"""Pretraining data: text corpus -> tokenizer -> token shards on disk -> batches of (inputs, targets).

Notable choices
- A *document* is one .txt file. The split is document-level: a seeded shuffle puts whole documents in
  val until it holds `val_fraction` of the bytes. A corpus of a single document (tiny Shakespeare) is
  split instead at character `int(len * (1 - val_fraction))`, so val is exactly "the last 10 % of the
  text" as in nanoGPT and bits-per-byte figures compare.
- Documents are joined with the tokenizer's end-of-text id (`<|endoftext|>`, or its EOS), so decoding a
  split and dropping the separators gives back the input text exactly (tested).
- Shards are flat numpy memmaps (`uint16` when the vocabulary fits, else `uint32`) of at most
  `shard_tokens` tokens; `manifest.json` records documents, tokens and UTF-8 bytes per split, the dtype
  and the tokenizer's sha256. The output folder is built beside the target and renamed into place, so a
  failed `prepare` never leaves a half-written dataset.
- `TokenBatches` serves windows of `block_size + 1` tokens in a seeded per-epoch permutation (with a
  per-epoch random shift of the window grid). Batch number g is a pure function of (seed, g): the only
  state to checkpoint is g, resume is exact, and rank r of W simply takes rows [r*B/W, (r+1)*B/W) of the
  global batch, so N processes see the same global batch as one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmkit.errors import LlmkitError
from llmkit.io import corpus_files, read_json, read_text

MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"
MANIFEST_VERSION = 1
EOT = "<|endoftext|>"


# ---------------------------------------------------------------------------------------------- corpus
@dataclass
class Document:
    name: str
    text: str


def read_document(path: Path) -> Document:
    """One UTF-8 text file as a document; binary, non-UTF-8 or empty files are errors naming the file."""
    text = read_text(path)
    if not text.strip():
        raise LlmkitError(f"{path}: empty file; remove it from the corpus")
    return Document(path.name, text)


def split_documents(
    docs: list[Document], val_fraction: float, seed: int = 0
) -> tuple[list[Document], list[Document]]:
    """Document-level train/val split (see module docstring); a single document is split at its tail."""
    if not 0.0 <= val_fraction < 1.0:
        raise LlmkitError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if val_fraction == 0.0:
        return docs, []
    if len(docs) == 1:
        d = docs[0]
        cut = int(len(d.text) * (1.0 - val_fraction))
        if cut <= 0 or cut >= len(d.text):
            raise LlmkitError(f"{d.name}: too short to split with --val-fraction {val_fraction}")
        return [Document(d.name, d.text[:cut])], [Document(d.name + ":tail", d.text[cut:])]
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    total = sum(len(d.text.encode()) for d in docs)
    val_idx: set[int] = set()
    val_bytes = 0
    for i in order[:-1]:  # at least one document stays in train
        if val_bytes >= val_fraction * total:
            break
        val_idx.add(i)
        val_bytes += len(docs[i].text.encode())
    return [d for i, d in enumerate(docs) if i not in val_idx], [
        d for i, d in enumerate(docs) if i in val_idx
    ]


# ---------------------------------------------------------------------------------------------- tokenizer
def byte_tokenizer():
    """Byte-level tokenizer with no merges: 256 byte ids + <|endoftext|> (character-level for ASCII text)."""
    from llmkit.tokenizer import Tokenizer

    return Tokenizer.from_bpe([], pattern=r"[\s\S]+", special_tokens={EOT: 256})


def make_tokenizer(spec: str, texts: list[str], progress: bool = True):
    """`char`/`byte` | `train:VOCAB` (byte-level BPE trained on the train split) | a Tokenizer.load path."""
    from llmkit.tokenizer import Tokenizer

    if spec in ("char", "byte"):
        return byte_tokenizer()
    if spec.startswith("train:"):
        try:
            vocab = int(spec.split(":", 1)[1])
        except ValueError:
            raise LlmkitError(f"--tokenizer {spec}: expected train:VOCAB_SIZE, e.g. train:4096") from None
        n_special = 1
        if vocab < 256 + n_special:
            raise LlmkitError(
                f"--tokenizer {spec}: vocab size must be at least {256 + n_special} (256 bytes + specials)"
            )
        from llmkit.tokenizer.train import train_bpe

        return train_bpe(texts, vocab, special_tokens=[EOT], progress=progress)  # errors if vocab > possible
    p = Path(spec)
    if not p.exists():
        raise LlmkitError(f"--tokenizer {spec}: no such file or directory (or use char, train:VOCAB_SIZE)")
    return Tokenizer.load(p)


def separator_id(tok) -> int | None:
    """The id that separates documents: <|endoftext|> if present, else EOS, else none."""
    specials = getattr(tok, "special_tokens", None) or {}
    if EOT in specials:
        return specials[EOT]
    return getattr(tok, "eos_id", None)


def tokenizer_hash(tok_dir: Path) -> str:
    return hashlib.sha256((tok_dir / "tokenizer.json").read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------- prepare
def prepare(
    corpus: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    tokenizer: str = "train:4096",
    val_fraction: float = 0.1,
    seed: int = 0,
    shard_tokens: int = 1 << 27,
    progress: bool = True,
) -> dict[str, Any]:
    """Read the corpus, train or load the tokenizer, write shards + manifest into `out`; return it."""
    from tqdm import tqdm

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LlmkitError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).exists():
        raise LlmkitError(f"--out {out}: directory is not empty and holds no {MANIFEST}; choose a new folder")
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=parent))
    except OSError as e:
        raise LlmkitError(
            f"--out {out}: cannot write there ({e.strerror or e}); choose a writable folder"
        ) from None

    try:
        files = corpus_files(corpus)
        docs = [
            read_document(f)
            for f in tqdm(files, desc="read", unit="file", disable=None if progress else True)
        ]
        train_docs, val_docs = split_documents(docs, val_fraction, seed)
        tok = make_tokenizer(tokenizer, [d.text for d in train_docs], progress=progress)
        sep = separator_id(tok)
        vocab = tok.vocab_size
        dtype = np.uint16 if vocab <= 1 << 16 else np.uint32
        tok_dir = tmp / TOKENIZER_DIR
        tok.save(tok_dir)
        splits = {}
        for name, sdocs in (("train", train_docs), ("val", val_docs)):
            splits[name] = _write_split(tmp, name, sdocs, tok, sep, dtype, shard_tokens, progress)
        manifest = {
            "version": MANIFEST_VERSION,
            "tokenizer": {
                "dir": TOKENIZER_DIR,
                "sha256": tokenizer_hash(tok_dir),
                "spec": tokenizer,
                "vocab_size": vocab,
                "separator_id": sep,
            },
            "dtype": np.dtype(dtype).name,
            "val_fraction": val_fraction,
            "seed": seed,
            "sources": [str(f) for f in files],
            "splits": splits,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _write_split(
    root: Path,
    name: str,
    docs: list[Document],
    tok,
    sep: int | None,
    dtype,
    shard_tokens: int,
    progress: bool,
) -> dict[str, Any]:
    from tqdm import tqdm

    shards: list[dict[str, Any]] = []
    buf: list[np.ndarray] = []
    n_buf = 0

    def flush() -> None:
        nonlocal buf, n_buf
        if not n_buf:
            return
        fname = f"{name}_{len(shards):04d}.bin"
        arr = np.concatenate(buf).astype(dtype)
        mm = np.memmap(root / fname, dtype=dtype, mode="w+", shape=(len(arr),))
        mm[:] = arr
        mm.flush()
        del mm
        shards.append({"file": fname, "tokens": int(len(arr))})
        buf, n_buf = [], 0

    n_tokens = n_bytes = 0
    for d in tqdm(docs, desc=f"tokenize {name}", unit="doc", disable=None if progress else True):
        ids = tok.encode(d.text)
        if sep is not None:
            ids = [*ids, sep]
        arr = np.asarray(ids, dtype=np.int64)
        n_tokens += len(arr)
        n_bytes += len(d.text.encode("utf-8"))
        while len(arr):  # a long document may span shards
            take = arr[: shard_tokens - n_buf]
            buf.append(take)
            n_buf += len(take)
            arr = arr[len(take) :]
            if n_buf >= shard_tokens:
                flush()
    flush()
    return {"documents": len(docs), "tokens": n_tokens, "bytes": n_bytes, "shards": shards}


def _swap_into_place(tmp: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- reading
class TokenData:
    """A prepared dataset folder: manifest, tokenizer and the memmapped shards of each split."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        mf = self.path / MANIFEST
        if not mf.is_file():
            raise LlmkitError(
                f"--data {self.path}: no {MANIFEST}; create it with `llmkit prepare CORPUS --out DIR`"
            )
        self.manifest = read_json(mf)
        self.dtype = np.dtype(self.manifest["dtype"])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["tokenizer"]["vocab_size"])

    def tokenizer(self):
        from llmkit.tokenizer import Tokenizer

        return Tokenizer.load(self.path / self.manifest["tokenizer"]["dir"])

    def shards(self, split: str) -> list[np.ndarray]:
        info = self.manifest["splits"].get(split)
        if not info or not info["tokens"]:
            return []
        out = []
        for s in info["shards"]:
            f = self.path / s["file"]
            if not f.is_file() or f.stat().st_size != s["tokens"] * self.dtype.itemsize:
                raise LlmkitError(f"{f}: missing or truncated shard; run `llmkit prepare` again")
            out.append(np.memmap(f, dtype=self.dtype, mode="r", shape=(s["tokens"],)))
        return out

    def bytes_per_token(self, split: str) -> float:
        info = self.manifest["splits"][split]
        return info["bytes"] / max(1, info["tokens"])


class TokenBatches:
    """Resumable, rank-sliced batches of (x, y) windows from token shards (see module docstring).

    `next()` returns this rank's rows of global micro-batch `position` and advances it; `state_dict()` is
    just that position (plus the parameters that must match on resume).
    """

    def __init__(
        self,
        shards: list[np.ndarray],
        block_size: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ):
        if batch_size % world_size:
            raise LlmkitError(
                f"--batch-size {batch_size} must be divisible by the number of processes {world_size}"
            )
        self.shards, self.T, self.B = shards, block_size, batch_size
        self.seed, self.rank, self.world, self.shuffle = seed, rank, world_size, shuffle
        self.position = 0
        # Windows per shard are the same for every grid shift in [0, n_shift): n*T + 1 <= len - shift.
        n_shift = block_size if shuffle else 1
        counts = np.array([max(0, (len(s) - n_shift) // block_size) for s in shards], dtype=np.int64)
        if counts.sum() == 0:  # too little text to shift the grid: fixed grid from 0
            n_shift, counts = (
                1,
                np.array([max(0, (len(s) - 1) // block_size) for s in shards], dtype=np.int64),
            )
        if counts.sum() == 0:
            n = sum(len(s) for s in shards)
            raise LlmkitError(
                f"the data holds {n} tokens, fewer than one window of block size {block_size} + 1; "
                "use a smaller --block-size or more text"
            )
        self.n_shift, self.cum = n_shift, np.concatenate([[0], np.cumsum(counts)])
        self.n_windows = int(self.cum[-1])  # windows per epoch
        self._epoch_cache: tuple[int, np.ndarray, int] | None = None

    def _epoch(self, epoch: int) -> tuple[np.ndarray, int]:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            shift = int(rng.integers(0, self.n_shift)) if epoch > 0 else 0
            perm = rng.permutation(self.n_windows) if self.shuffle else np.arange(self.n_windows)
            self._epoch_cache = (epoch, perm, shift)
        return self._epoch_cache[1], self._epoch_cache[2]

    def windows(self, global_batch: int) -> np.ndarray:
        """Token windows (B/W, T+1) of this rank for global micro-batch number `global_batch`."""
        per = self.B // self.world
        first = global_batch * self.B + self.rank * per
        rows = []
        for s in range(first, first + per):
            epoch, i = divmod(s, self.n_windows)
            perm, shift = self._epoch(epoch)
            w = int(perm[i])
            k = int(np.searchsorted(self.cum, w, side="right")) - 1
            start = shift + (w - int(self.cum[k])) * self.T
            rows.append(np.asarray(self.shards[k][start : start + self.T + 1], dtype=np.int64))
        return np.stack(rows)

    def next(self, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        w = torch.from_numpy(self.windows(self.position))  # (B/W, T+1)
        self.position += 1
        if device is not None and torch.device(device).type == "cuda":
            w = w.pin_memory().to(device, non_blocking=True)
        return w[:, :-1], w[:, 1:]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next()

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position, "seed": self.seed, "block_size": self.T, "batch_size": self.B}

    def load_state_dict(self, sd: dict[str, int]) -> None:
        for k, mine in (("seed", self.seed), ("block_size", self.T), ("batch_size", self.B)):
            if sd.get(k, mine) != mine:
                raise LlmkitError(
                    f"--resume: the checkpoint used {k}={sd[k]}, this run {mine}; use the same value"
                )
        self.position = int(sd["position"])


def eval_windows(
    shards: list[np.ndarray], block_size: int, max_tokens: int | None = None
) -> list[np.ndarray]:
    """Consecutive windows of T+1 tokens overlapping by one, so every token but the first is predicted once.

    The last window may be shorter. `max_tokens` caps the number of predicted tokens (periodic evals).
    """
    out: list[np.ndarray] = []
    budget = math.inf if max_tokens is None else max_tokens
    for s in shards:
        for start in range(0, len(s) - 1, block_size):
            if budget <= 0:
                return out
            w = np.asarray(s[start : start + block_size + 1], dtype=np.int64)
            out.append(w)
            budget -= len(w) - 1
    return out


def batched(items: list[np.ndarray], batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Group equal-length windows into (x, y) batches (a short tail window forms its own batch)."""
    i = 0
    while i < len(items):
        j = i
        while j < len(items) and j - i < batch_size and len(items[j]) == len(items[i]):
            j += 1
        w = torch.from_numpy(np.stack(items[i:j]))
        yield w[:, :-1], w[:, 1:]
        i = j


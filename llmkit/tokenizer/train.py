"""Train a byte-level BPE tokenizer: 256 byte tokens, then one token per merge, then the special tokens.

Two implementations behind one function, `train_bpe`:

- `reference` (readable, for teaching): pre-tokenize with the regex, count each distinct chunk once with
  its frequency, then repeat "count every adjacent pair, merge the most frequent one everywhere". It
  recounts all pairs at every step, so it is O(merges x corpus) and meant for small corpora.
- `fast` (default): HF `tokenizers`' BpeTrainer (Rust) under our API. Our regex goes in as a `Split`
  pre-tokenizer followed by `ByteLevel(use_regex=False)`, so it sees exactly the chunks the reference
  sees; its merges are converted to bytes and handed to `Tokenizer.from_bpe`. We chose the compiled
  trainer because pure Python cannot get near the issue's goal (<= 1.5x the HF trainer on 20 MB -> 32k);
  `bench/tokenizer_train.py` measures the ratio.

Tie-breaking (documented so both paths give identical merges): among pairs with the same count, the pair
whose (left, right) tokens come first in *HF order* wins. HF order ranks the 256 byte tokens by the code
point of their GPT-2 byte-level character (so printable ASCII '!'..'~' comes before space and control
bytes, which map to U+0100 and up), then merged tokens in creation order. Counting overlaps like
minbpe/HF: "aaa" holds the pair (a, a) twice; merging replaces occurrences left to right.

`trace=K` records the first K merges with their pair counts (the course's step-by-step table). The fast
path replays its own first K merges on the chunk counts to report the same numbers.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import regex

from llmkit.errors import LlmkitError
from llmkit.io import corpus_files, read_text
from llmkit.tokenizer.core import BYTE_TO_UNICODE, Tokenizer, unbytelevel
from llmkit.tokenizer.pretokenize import NAMED_PATTERNS

# HF order of the 256 byte tokens (see module docstring): rank of byte b among the byte-level characters
_BYTE_RANK = {b: r for r, b in enumerate(sorted(range(256), key=lambda b: ord(BYTE_TO_UNICODE[b])))}


@dataclass(frozen=True)
class MergeStep:
    """One line of the training trace: merge number, the pair (as bytes), its count, the new token id."""

    rank: int
    left: bytes
    right: bytes
    count: int
    new_id: int

    def __str__(self) -> str:
        return f"merge {self.rank:>5}: {self.left!r} + {self.right!r} -> {self.new_id} ({self.count} times)"


# ---------------------------------------------------------------------------------------------- corpus


def resolve_pattern(pattern: str) -> str:
    """'gpt2' | 'gpt4' | a custom regex (checked to compile)."""
    if pattern in NAMED_PATTERNS:
        return NAMED_PATTERNS[pattern]
    try:
        regex.compile(pattern)
    except regex.error as e:
        raise LlmkitError(f"invalid pre-tokenizer pattern {pattern!r}: {e}; use gpt2, gpt4 or a valid regex")
    return pattern


def load_corpus(texts_or_paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """Texts from `str` items (taken as text) and path items (`pathlib.Path`: files or directories)."""
    if isinstance(texts_or_paths, (str, os.PathLike)):
        texts_or_paths = [texts_or_paths]
    texts: list[str] = []
    for item in texts_or_paths:
        if isinstance(item, str):
            texts.append(item)
        else:
            texts += [read_text(f) for f in corpus_files([item])]
    if not any(texts):
        raise LlmkitError("the training corpus is empty; give non-empty text files or strings")
    return texts


def split_holdout(texts: list[str], fraction: float = 0.05) -> tuple[list[str], str]:
    """Cut the last `fraction` of the characters off the corpus (at a line start when one is near)."""
    total = sum(len(t) for t in texts)
    keep = total - int(total * fraction)
    train: list[str] = []
    for i, t in enumerate(texts):
        if keep >= len(t):
            train.append(t)
            keep -= len(t)
            continue
        nl = t.find("\n", keep)
        cut = nl + 1 if 0 <= nl < keep + 10_000 else keep
        return [*train, t[:cut]], "".join([t[cut:], *texts[i + 1:]])
    return train, ""


def bytes_per_token(tokenizer: Tokenizer, text: str) -> float:
    """Compression: UTF-8 bytes of `text` per token."""
    ids = tokenizer.encode(text)
    return len(text.encode("utf-8")) / max(1, len(ids))


def chunk_counts(texts: Iterable[str], pattern: str) -> Counter[bytes]:
    """Pre-tokenize: how often each regex chunk (as UTF-8 bytes) occurs in the corpus."""
    pat = regex.compile(pattern)
    counts: Counter[str] = Counter()
    for t in texts:
        counts.update(pat.findall(t))
    return Counter({s.encode("utf-8"): n for s, n in counts.items()})


# ------------------------------------------------------------------------------------ reference loop


def _merge(ids: tuple[int, ...], pair: tuple[int, int], new_id: int) -> tuple[int, ...]:
    """Replace every occurrence of `pair` in `ids` by `new_id`, left to right."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return tuple(out)


def _hf_rank(token_id: int) -> int:
    return _BYTE_RANK[token_id] if token_id < 256 else token_id


def bpe_merges_reference(
    counts: Counter[bytes], n_merges: int, *, trace: int = 0, progress: bool = False
) -> tuple[list[tuple[bytes, bytes]], list[MergeStep]]:
    """The textbook merge loop on pre-tokenized chunk counts; returns (merges, trace of the first K).

    Worked example (the course's "aaabdaaabac", one chunk, 3 merges):

    >>> merges, steps = bpe_merges_reference(Counter({b"aaabdaaabac": 1}), 3, trace=3)
    >>> for s in steps: print(s)
    merge     0: b'a' + b'a' -> 256 (4 times)
    merge     1: b'a' + b'b' -> 257 (2 times)
    merge     2: b'aa' + b'ab' -> 258 (2 times)

    ("aa" occurs 4 times counting overlaps; after merging it the chunk is [aa, a, b, d, aa, a, b, a, c],
    where (aa, a) and (a, b) both occur twice: the tie goes to (a, b), first in HF order since a byte
    token comes before a merged one. Then [aa, ab, d, aa, ab, a, c] has (aa, ab) twice.)
    """
    from tqdm.auto import tqdm

    vocab = [bytes([b]) for b in range(256)]
    words = [(tuple(w), n) for w, n in counts.items() if len(w) > 1]  # one-byte chunks hold no pair
    merges: list[tuple[bytes, bytes]] = []
    steps: list[MergeStep] = []
    for step in tqdm(range(n_merges), desc="merges", disable=not progress, unit="merge"):
        stats: Counter[tuple[int, int]] = Counter()
        for ids, n in words:
            for pair in zip(ids, ids[1:]):
                stats[pair] += n
        if not stats:
            break
        # most frequent pair; ties -> first in HF order
        pair = max(stats, key=lambda p: (stats[p], -_hf_rank(p[0]), -_hf_rank(p[1])))
        new_id = 256 + step
        words = [(w, n) for w, n in ((_merge(ids, pair, new_id), n) for ids, n in words) if len(w) > 1]
        vocab.append(vocab[pair[0]] + vocab[pair[1]])
        merges.append((vocab[pair[0]], vocab[pair[1]]))
        if step < trace:
            steps.append(MergeStep(step, vocab[pair[0]], vocab[pair[1]], stats[pair], new_id))
    return merges, steps


def replay_trace(counts: Counter[bytes], merges: list[tuple[bytes, bytes]], k: int) -> list[MergeStep]:
    """Apply the first `k` merges to the chunk counts and report each pair's count when it was merged."""
    ids_of = {bytes([b]): b for b in range(256)}
    words = [(tuple(w), n) for w, n in counts.items()]
    steps = []
    for step, (a, b) in enumerate(merges[:k]):
        pair, new_id = (ids_of[a], ids_of[b]), 256 + step
        count = sum(n * sum(1 for p in zip(ids, ids[1:]) if p == pair) for ids, n in words)
        steps.append(MergeStep(step, a, b, count, new_id))
        ids_of[a + b] = new_id
        words = [(_merge(ids, pair, new_id), n) for ids, n in words]
    return steps


# ----------------------------------------------------------------------------------------- fast path


def bpe_merges_fast(
    texts: list[str], pattern: str, n_merges: int, *, progress: bool = False
) -> list[tuple[bytes, bytes]]:
    """HF tokenizers' BpeTrainer with our regex (Split) + ByteLevel(use_regex=False); merges as bytes."""
    from tokenizers import Regex, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    try:
        split = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    except Exception as e:  # Oniguruma rejects some `regex`-module syntax
        raise LlmkitError(f"the fast trainer cannot use pattern {pattern!r} ({e}); use reference=True "
                          "(--reference) or another pattern") from None
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        split,
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    progress = progress and sys.stderr.isatty()  # its bars print blank lines when not on a terminal
    trainer = trainers.BpeTrainer(vocab_size=256 + n_merges, show_progress=progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(texts, trainer, length=len(texts))
    raw = json.loads(hf.to_str())["model"]["merges"]
    merges = []
    for m in raw:
        a, b = m if isinstance(m, list) else m.split(" ", 1)
        merges.append((unbytelevel(a), unbytelevel(b)))
    return merges


# ------------------------------------------------------------------------------------------ train_bpe


def train_bpe(
    texts_or_paths: str | os.PathLike | Iterable[str | os.PathLike],
    vocab_size: int,
    *,
    pattern: str = "gpt4",
    special_tokens: Iterable[str] = (),
    trace: int = 0,
    progress: bool = True,
    reference: bool = False,
) -> Tokenizer:
    """Train byte-level BPE to exactly `vocab_size` ids (256 bytes + merges + specials).

    `texts_or_paths`: a text (`str`), a path (`pathlib.Path`, file or directory of *.txt), or an iterable of
    them. `pattern`: "gpt4" (cl100k-style, default), "gpt2", or a custom regex. `reference=True` uses the
    readable loop instead of the compiled trainer. The first `trace` merges are kept as
    `tokenizer.train_trace` (list of `MergeStep`). Raises LlmkitError when the vocabulary is too small for
    the bytes + specials, or larger than the corpus allows (the message says how many merges were possible).
    """
    specials = list(dict.fromkeys(special_tokens))
    n_merges = vocab_size - 256 - len(specials)
    if n_merges < 0:
        raise LlmkitError(
            f"vocab_size {vocab_size} is too small: byte-level BPE needs 256 byte tokens + {len(specials)} "
            f"special tokens = at least {256 + len(specials)}"
        )
    regex_pattern = resolve_pattern(pattern)
    texts = load_corpus(texts_or_paths)
    counts = chunk_counts(texts, regex_pattern) if (reference or trace) else None
    if reference:
        merges, steps = bpe_merges_reference(counts, n_merges, trace=trace, progress=progress)
    else:
        merges = bpe_merges_fast(texts, regex_pattern, n_merges, progress=progress)
        steps = replay_trace(counts, merges, trace) if trace else []
    if len(merges) < n_merges:
        raise LlmkitError(
            f"vocab_size {vocab_size} is larger than this corpus allows: only {len(merges)} merges were "
            f"possible (max vocab_size {256 + len(merges) + len(specials)}); use a smaller one or more text"
        )
    if len({a + b for a, b in merges}) != len(merges):
        raise LlmkitError("BPE training produced two merges for one token; this vocabulary cannot be saved")
    first_special = 256 + len(merges)
    tok = Tokenizer.from_bpe(
        merges, pattern=regex_pattern, special_tokens={s: first_special + i for i, s in enumerate(specials)}
    )
    tok.train_trace = steps
    return tok

"""The Tokenizer: text <-> token ids for byte-level BPE (GPT-2, Llama-3, Qwen, SmolLM) and SentencePiece-style
BPE (Llama-2, Mistral), behind one API.

Notable choices
- Two BPE engines with the same result. `bpe_merge` is the readable reference: start from single bytes and
  repeatedly merge the adjacent pair with the lowest merge rank (leftmost first), exactly the llama.cpp /
  HF `tokenizers` rule. The fast path hands the same vocabulary to tiktoken's Rust CoreBPE: a token's
  tiktoken rank is the index of the first merge that produces it, and tiktoken's ranks are mapped back to
  our ids with a lookup table when they differ. tiktoken merges "the pair whose merged token has the lowest
  rank", which equals the merge-list rule for vocabularies learnt by BPE but not for every merge list: each
  new Tokenizer runs both engines on a sample (`_fast_path_agrees`) and keeps the reference on a difference;
  tests check both id for id against tiktoken, HF `tokenizers` and llama.cpp on real text.
  `backend="python"` forces the reference. Merges that can never apply (a side that is neither a byte nor
  another merge's result, e.g. the placeholder merge a GGUF file without merges carries) are left out of
  the fast engine, which would otherwise be refused for a merge result that is not a token.
- The vocabulary is public and read-only where a writer needs it: `pieces` and `scores` (SentencePiece),
  `token_types` (GGUF's NORMAL/CONTROL/USER_DEFINED/UNUSED/BYTE..., kept as the file stored them).
- Pre-tokenizers are lists of regexes (see pretokenize.py); a single full-coverage regex runs inside tiktoken,
  a list runs in Python and each piece goes to tiktoken's single-piece BPE (an LRU cache of piece -> ids in
  the Python path).
- Special tokens: control tokens (<|im_start|>, <|endoftext|>, [INST], BOS/EOS...) become ids only with
  `allow_special=True`; otherwise their text is encoded like any other text. User-defined added tokens that
  are not special (Qwen's <think>, Gemma's "\n", "  ", "<b>") are always matched, as both HF `tokenizers`
  and llama.cpp do. Where two such tokens could overlap the two disagree: HF takes the leftmost match (the
  longest at that position), llama.cpp cuts out the longest token everywhere first, then the next longest
  in what is left (`special_split="longest_first"`, what GGUF vocabularies get).
- Byte-level vocabularies store each token as raw bytes (GPT-2's printable byte alphabet is undone at load),
  so `id_to_bytes` and decoding never see the Ġ/Ċ spelling; `save` re-applies it for tokenizer.json.
"""

from __future__ import annotations

import heapq
import operator
import os
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

import regex

from llmkit.errors import LlmkitError
from llmkit.io import atomic_write_json
from llmkit.tokenizer.pretokenize import PreTokenizer

# token types, as GGUF stores them (llama.cpp's llama_token_type, gguf-py's TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# token texts that end a turn or a document: generation stops on them (with eos)
END_OF_TURN_TEXTS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<|end|>",
    "<end_of_turn>",
    "<EOT>",
    "<|return|>",
    "</s>",
    "<｜end▁of▁sentence｜>",
)


# a mixed sample on which the fast path must agree with the reference BPE before it is used
_SELF_CHECK_TEXT = (
    "The quick brown fox jumps over the lazy dog; it's 1,234.56 USD (about €1.1k) in 2024!\n"
    "Le cœur a ses raisons que la raison ne connaît point. Déjà-vu, naïveté, où ça ? «Voilà» — fin.\n"
    "Der Übermensch wählt größere Straßen. ¿Qué pasó? Olá, ação e coração. Zażółć gęślą jaźń.\n"
    "Привет, как дела? Ελληνικά γράμματα. 日本語のテキストと中文文本。한국어 문장입니다. हिन्दी पाठ। عربي نص\n"
    "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n\t\tindented\r\n"
    "    spaces     and\ttabs   \n\n\n emoji 🤗👍🏽🇫🇷 https://example.com/a?b=c&d=e#f <tag attr=\"v\"/>"
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 bytes to printable characters (space -> 'Ġ', newline -> 'Ċ')."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, n = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + n)
            n += 1
    return dict(sorted(out.items()))


BYTE_TO_UNICODE = bytes_to_unicode()
UNICODE_TO_BYTE = {c: b for b, c in BYTE_TO_UNICODE.items()}


# str.translate table: alphabet char -> latin-1 char of its byte; other latin-1 chars -> U+FFFF (not latin-1)
_UNBYTELEVEL = {ord(c): chr(b) for c, b in UNICODE_TO_BYTE.items()}
_UNBYTELEVEL.update({b: "\uffff" for b in range(256) if chr(b) not in UNICODE_TO_BYTE})


def unbytelevel(s: str) -> bytes | None:
    """'Ġhello' -> b' hello'; None when `s` is not in GPT-2's byte alphabet."""
    try:
        return s.translate(_UNBYTELEVEL).encode("latin-1")
    except UnicodeEncodeError:
        return None


def unbytelevel_many(tokens: Sequence[str]) -> list[bytes | None]:
    """unbytelevel over a whole vocabulary in one str.translate call (fast load of 150k tokens)."""
    sep = "\ufffe"  # a noncharacter, outside the alphabet and never produced by the table
    joined = sep.join(tokens)
    if joined.count(sep) != len(tokens) - 1:
        return [unbytelevel(t) for t in tokens]
    out: list[bytes | None] = []
    for part in joined.translate(_UNBYTELEVEL).split(sep):
        try:
            out.append(part.encode("latin-1"))
        except UnicodeEncodeError:
            out.append(None)
    return out


def bytelevel(b: bytes) -> str:
    return "".join(BYTE_TO_UNICODE[x] for x in b)


S = TypeVar("S", bytes, str)


def merge_pairs(symbols: list[S], rank: Callable[[S, S], float | None]) -> list[S]:
    """Greedy pair merging, the loop of both BPE flavours: while some adjacent pair has a rank, merge the
    pair with the lowest rank (leftmost on ties). BPE ranks a pair by its merge index, SentencePiece by
    minus the score of the merged piece (spm.py).

    A heap of candidate pairs over a linked list of symbols keeps it O(n log n) for long pieces (runs of
    spaces); stale heap entries are skipped when their symbols have changed since.
    """
    sym = list(symbols)
    nxt = [*range(1, len(sym)), -1]
    prv = list(range(-1, len(sym) - 1))
    heap: list[tuple[float, int, int, S]] = []

    def push(i: int, j: int) -> None:
        if i >= 0 and j >= 0:
            r = rank(sym[i], sym[j])
            if r is not None:
                heapq.heappush(heap, (r, i, j, sym[i] + sym[j]))

    for i in range(len(sym) - 1):
        push(i, i + 1)
    while heap:
        _, i, j, merged = heapq.heappop(heap)
        if not sym[i] or not sym[j] or sym[i] + sym[j] != merged:
            continue  # stale: one side was merged into something else meanwhile
        sym[i], sym[j] = merged, merged[:0]
        nxt[i] = nxt[j]
        if nxt[j] >= 0:
            prv[nxt[j]] = i
        push(prv[i], i)
        push(i, nxt[i])
    return [s for s in sym if s]


def bpe_merge(word: bytes, ranks: dict[tuple[bytes, bytes], int]) -> list[bytes]:
    """Reference BPE on one pre-token: merge the lowest-ranked adjacent pair (leftmost first) while any.

    >>> bpe_merge(b"aaab", {(b"a", b"a"): 0, (b"aa", b"b"): 1, (b"a", b"b"): 2})
    [b'aa', b'ab']
    """
    return merge_pairs([word[i : i + 1] for i in range(len(word))], lambda a, b: ranks.get((a, b)))


class Tokenizer:
    """Text <-> ids. Build it with `load`, `from_gguf`, `from_bpe` (or the loaders in loaders.py).

    model="bpe": byte-level BPE; `vocab[i]` are the raw bytes of token i, `merges` the merge list in order.
    model="spm": SentencePiece-style BPE; `pieces[i]` the piece text ('▁' for space, '<0x0A>' byte tokens),
    `scores[i]` its score (higher merges first), byte fallback through the <0xNN> tokens.
    `token_types` (both models): the GGUF type of every token, as read from the file, else derived.
    """

    def __init__(
        self,
        *,
        model: str,
        vocab: Sequence[bytes],
        merges: Sequence[tuple[bytes, bytes]] = (),
        pre: PreTokenizer | None = None,
        special_tokens: dict[str, int] | None = None,
        added_tokens: dict[str, int] | None = None,
        pieces: Sequence[str] | None = None,
        scores: Sequence[float | None] | None = None,
        byte_tokens: dict[int, int] | None = None,
        token_types: Sequence[int] | None = None,
        normalizer: str | None = None,
        ignore_merges: bool = False,
        add_space_prefix: bool = False,
        bos_id: int | None = None,
        eos_id: int | None = None,
        pad_id: int | None = None,
        unk_id: int | None = None,
        add_bos: bool = False,
        add_eos: bool = False,
        extra_stop_ids: Iterable[int] = (),
        chat_template: str | None = None,
        pre_name: str | None = None,
        backend: str = "auto",
        special_split: str = "leftmost",
    ):
        if model not in ("bpe", "spm"):
            raise LlmkitError(f"unknown tokenizer model {model!r}: expected 'bpe' or 'spm'")
        if special_split not in ("leftmost", "longest_first"):
            raise LlmkitError(f"unknown special_split {special_split!r} (expected leftmost or longest_first)")
        self.model = model
        self.vocab: list[bytes] = list(vocab)
        self.merges = list(merges)
        self.pre = pre or PreTokenizer(())
        self.pre_name = pre_name
        self.special_tokens: dict[str, int] = dict(special_tokens or {})  # control tokens, text -> id
        self.added_tokens: dict[str, int] = dict(added_tokens or {})  # always-matched user tokens
        self.normalizer = normalizer
        self.ignore_merges = ignore_merges
        self.add_space_prefix = add_space_prefix
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = bos_id, eos_id, pad_id, unk_id
        self.add_bos, self.add_eos = add_bos, add_eos
        self.chat_template = chat_template
        self._control_ids = set(self.special_tokens.values())

        for i in (bos_id, eos_id, pad_id, unk_id):
            if i is not None and not 0 <= i < len(self.vocab):
                raise LlmkitError(f"special token id {i} is outside the vocabulary (size {len(self.vocab)})")
        if token_types is not None and len(token_types) != len(self.vocab):
            raise LlmkitError(
                f"{len(token_types)} token types for a vocabulary of {len(self.vocab)} tokens; the "
                "tokenizer metadata is inconsistent"
            )
        self._token_types = tuple(int(t) for t in token_types) if token_types is not None else None
        self._pieces: tuple[str, ...] | None = None
        self._scores: tuple[float | None, ...] | None = None
        self.stop_ids: set[int] = {i for i in (eos_id, *extra_stop_ids) if i is not None}
        self.stop_ids |= {i for t, i in self.special_tokens.items() if t in END_OF_TURN_TEXTS}

        if model == "bpe":
            self._ranks = {pair: r for r, pair in reversed(list(enumerate(self.merges)))}
            self._bytes_to_id: dict[bytes, int] = {}
            not_bpe = self._control_ids | set(self.added_tokens.values())
            for i, b in enumerate(self.vocab):
                if i not in not_bpe:
                    self._bytes_to_id.setdefault(b, i)
            missing = [b for b in range(256) if bytes([b]) not in self._bytes_to_id]
            if len(missing) > 128:
                raise LlmkitError(
                    f"vocabulary lacks {len(missing)} of the 256 single-byte tokens; is this a "
                    "byte-level BPE vocabulary?"
                )
            self._missing_bytes = set(
                missing
            )  # bytes never seen in training (SmolLM2 lacks 21): dropped on encode
            self._rank_to_id: list[int] | None = None
            self._tiktoken = self._build_tiktoken() if backend in ("auto", "tiktoken") else None
            if self._tiktoken is not None and backend == "auto" and not self._fast_path_agrees():
                self._tiktoken, self._rank_to_id = None, None
        else:
            from llmkit.tokenizer.spm import SpmModel

            if pieces is None or scores is None:
                raise LlmkitError("a SentencePiece vocabulary needs pieces and scores")
            self._pieces, self._scores = tuple(pieces), tuple(scores)
            if not len(self._pieces) == len(self._scores) == len(self.vocab):
                raise LlmkitError(
                    f"{len(self._pieces)} pieces and {len(self._scores)} scores for a vocabulary of "
                    f"{len(self.vocab)} tokens; the tokenizer metadata is inconsistent"
                )
            self._spm = SpmModel(self._pieces, self._scores, byte_tokens or {}, unk_id)
            self._tiktoken, self._rank_to_id = None, None
        self._piece_cache = lru_cache(maxsize=1 << 16)(self._encode_piece_python)
        specials_re = sorted({*self.special_tokens, *self.added_tokens}, key=len, reverse=True)
        added_re = sorted(self.added_tokens, key=len, reverse=True)
        self._split_all = regex.compile("|".join(map(regex.escape, specials_re))) if specials_re else None
        self._split_added = regex.compile("|".join(map(regex.escape, added_re))) if added_re else None
        self.special_split = special_split
        if special_split == "longest_first":  # one alternation per UTF-8 length, longest first (llama.cpp)
            self._groups_all, self._groups_added = _length_groups(specials_re), _length_groups(added_re)

    # ----------------------------------------------------------------------------------------------- builders
    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """tokenizer.json | GPT-2 directory (encoder.json + vocab.bpe) | .gguf file | model directory.

        Paths only: a model name is resolved by the layer above (`llmkit.load(name).tokenizer`, or
        `Tokenizer.load(llmkit.hub.resolve(name))`)."""
        from llmkit.tokenizer.loaders import load_tokenizer

        return load_tokenizer(path)

    @classmethod
    def from_gguf(cls, source: Any) -> Tokenizer:
        """From GGUF metadata: a path, an open llmkit.checkpoint.gguf.GGUFFile, or the metadata dict."""
        from llmkit.tokenizer.loaders import from_gguf

        return from_gguf(source)

    @classmethod
    def from_bpe(
        cls,
        merges: list[tuple[bytes, bytes]],
        *,
        pattern: str,
        special_tokens: dict[str, int] | None = None,
        chat_template: str | None = None,
    ) -> Tokenizer:
        """A byte-level BPE from a merge list: ids 0..255 are the bytes, then one id per merge, then specials.

        `pattern` is a regex, or 'gpt2' / 'gpt4' for the named ones.
        """
        from llmkit.tokenizer.pretokenize import NAMED_PATTERNS

        vocab = [bytes([b]) for b in range(256)] + [a + b for a, b in merges]
        specials = dict(special_tokens or {})
        n = len(vocab) + len(specials)
        vocab += [b""] * len(specials)
        for text, i in specials.items():
            if not len(vocab) - len(specials) <= i < n:
                raise LlmkitError(
                    f"special token {text!r} has id {i}; expected ids {n - len(specials)}..{n - 1} "
                    "(after the 256 bytes and the merges)"
                )
            vocab[i] = text.encode()
        eos = next((i for t, i in specials.items() if t in END_OF_TURN_TEXTS), None)
        return cls(
            model="bpe",
            vocab=vocab,
            merges=merges,
            pre=PreTokenizer(NAMED_PATTERNS.get(pattern, pattern)),
            special_tokens=specials,
            eos_id=eos,
            chat_template=chat_template,
        )

    def _build_tiktoken(self):
        """tiktoken's CoreBPE over our merges, or None when the vocabulary cannot be expressed in its terms.

        tiktoken ranks are its merge priorities *and* its output ids. When the ids of merge results grow with
        the merge index (GPT-2, Qwen, Llama-3) the ranks are our ids; otherwise merge results get ranks
        `vocab_size + merge index` and a table maps them back.
        """
        import tiktoken

        first: dict[bytes, int] = {}  # token bytes -> index of the first merge producing it
        for r, (a, b) in _applicable_merges(self.merges):
            first.setdefault(a + b, r)
        merged_ids = [self._bytes_to_id.get(t) for t in first]
        if None in merged_ids:
            return None  # a merge yields a token the vocabulary lacks: keep the reference path
        ranks = {
            bytes([b]): self._bytes_to_id[bytes([b])] for b in range(256) if b not in self._missing_bytes
        }
        if not self._missing_bytes and all(x < y for x, y in zip(merged_ids, merged_ids[1:])):
            ranks.update(zip(first, merged_ids))
        else:
            n = len(self.vocab)
            table = list(range(n + len(self.merges) + 256))
            for t, r in first.items():
                ranks[t] = n + r
                table[n + r] = self._bytes_to_id[t]
            for b in self._missing_bytes:  # tiktoken needs every byte; they map to -1 and are dropped
                ranks[bytes([b])] = n + len(self.merges) + b
                table[n + len(self.merges) + b] = -1
            self._rank_to_id = table
        try:
            return tiktoken.Encoding(
                f"llmkit-{id(self)}",
                pat_str=self.pre.single_pattern or r"\S+|\s+",
                mergeable_ranks=ranks,
                special_tokens={},
            )
        except Exception:  # a pattern outside fancy-regex's syntax
            self._rank_to_id = None
            return None

    def _fast_path_agrees(self) -> bool:
        """Guard for merge lists that tiktoken's rule cannot express: both engines must agree on a mixed
        text sample and on the bytes of up to 2000 merge results spread over the list (~50 ms). Real BPE
        vocabularies pass: every GPT-2, Qwen3 and SmolLM2 token is what reference BPE makes of its bytes."""
        pieces = [p.encode("utf-8") for p in self.pre.split(unicodedata.normalize("NFC", _SELF_CHECK_TEXT))]
        merges = [m for _, m in _applicable_merges(self.merges)]
        step = max(1, len(merges) // 2000)
        pieces += [a + b for a, b in merges[::step]]
        enc = self._tiktoken
        for piece in pieces:
            fast = enc._encode_single_piece(piece)
            if self._rank_to_id is not None:
                fast = [i for i in (self._rank_to_id[r] for r in fast) if i >= 0]
            if fast != self._bpe_ids(piece):
                return False
        return True

    # --------------------------------------------------------------------------------------------- properties
    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def pieces(self) -> tuple[str, ...] | None:
        """SentencePiece vocabularies: the piece text of every id as the file spells it ('▁le', '<0x0A>',
        '<start_of_turn>'); None for byte-level BPE (its tokens are `vocab`, raw bytes, and `merges`)."""
        return self._pieces

    @property
    def scores(self) -> tuple[float | None, ...] | None:
        """SentencePiece vocabularies: the score of every piece (higher merges first; None for a piece no
        merge makes, from an HF tokenizer.json); None for byte-level BPE."""
        return self._scores

    @property
    def token_types(self) -> tuple[int, ...]:
        """The GGUF type of every token (NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE in this module):
        as the GGUF file stored them; for other sources derived from what the tokenizer knows: byte-fallback
        tokens BYTE, special tokens CONTROL, other added tokens USER_DEFINED, the unknown token UNKNOWN,
        empty tokens UNUSED, the rest NORMAL."""
        if self._token_types is not None:
            return self._token_types
        byte_ids = set(self._spm.byte_tokens.values()) if self.model == "spm" else set()
        added = set(self.added_tokens.values())
        out = []
        for i, b in enumerate(self.vocab):
            if i in byte_ids:
                out.append(BYTE)
            elif i in self._control_ids:
                out.append(CONTROL)
            elif i in added:
                out.append(USER_DEFINED)
            elif i == self.unk_id:
                out.append(UNKNOWN)
            else:
                out.append(NORMAL if b else UNUSED)
        return tuple(out)

    def id_to_bytes(self, i: int) -> bytes:
        """Raw bytes of one token (SPM: '▁' -> b' ', <0xAB> -> b'\\xab'); special tokens give their text."""
        if not 0 <= i < len(self.vocab):
            raise LlmkitError(f"token id {i!r} is outside the vocabulary (0..{len(self.vocab) - 1})")
        return self.vocab[i]

    def id_to_text(self, i: int) -> str:
        """One token as text: its bytes as UTF-8, U+FFFD for bytes that are only part of a character (what
        OpenAI-style `token` fields and config files show); special tokens give their text."""
        return self.id_to_bytes(i).decode("utf-8", errors="replace")

    def id_to_piece(self, i: int) -> str:
        """A printable form of one token, for display (bytes that are not UTF-8 shown as <0xNN>)."""
        text = self.id_to_bytes(i).decode("utf-8", "surrogateescape")  # invalid bytes -> U+DC80..U+DCFF
        return "".join(f"<0x{ord(c) - 0xDC00:02X}>" if "\udc80" <= c <= "\udcff" else c for c in text)

    def token_to_id(self, text: str) -> int | None:
        if text in self.special_tokens:
            return self.special_tokens[text]
        if text in self.added_tokens:
            return self.added_tokens[text]
        if self.model == "spm":
            return self._spm.piece_to_id.get(text.replace(" ", "▁"))
        return self._bytes_to_id.get(text.encode())

    def __repr__(self) -> str:
        return (
            f"Tokenizer(model={self.model!r}, vocab_size={self.vocab_size}, pre={self.pre_name!r}, "
            f"specials={len(self.special_tokens)}, fast={self._tiktoken is not None})"
        )

    # ----------------------------------------------------------------------------------------------- encoding
    def encode(
        self, text: str, *, add_special_tokens: bool = False, allow_special: bool = False
    ) -> list[int]:
        """Text -> ids; no BOS/EOS unless add_special_tokens; specials stay text unless allow_special."""
        if not add_special_tokens and (self._split_all if allow_special else self._split_added) is None:
            return self._encode_text(text, True) if text else []  # nothing to cut out: skip the copies
        ids: list[int] = []
        if add_special_tokens and self.add_bos and self.bos_id is not None:
            ids.append(self.bos_id)
        prev_special = True  # SPM: the leading-space rule applies at the start and after a special token
        for frag, tid in self._partition(text, allow_special):
            if tid is not None:
                ids.append(tid)
                prev_special = True
            else:
                ids.extend(self._encode_text(frag, prev_special))
                prev_special = False
        if add_special_tokens and self.add_eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def encode_ordinary(self, text: str) -> list[int]:
        """Text -> ids with no special *or added* token recognised (as tiktoken's encode_ordinary)."""
        return self._encode_text(text, True) if text else []

    def _partition(self, text: str, allow_special: bool) -> Iterable[tuple[str, int | None]]:
        """Cut out added/special tokens: yields (text fragment, None) or (token text, id)."""
        rx = self._split_all if allow_special else self._split_added
        if rx is None:
            if text:
                yield text, None
            return
        table = {**self.added_tokens, **self.special_tokens} if allow_special else self.added_tokens
        if self.special_split == "longest_first":
            yield from self._partition_longest_first(text, table, allow_special)
            return
        pos = 0
        for m in rx.finditer(text):
            if m.start() > pos:
                yield text[pos : m.start()], None
            yield m.group(), table[m.group()]
            pos = m.end()
        if pos < len(text):
            yield text[pos:], None

    def _partition_longest_first(
        self, text: str, table: dict[str, int], allow_special: bool
    ) -> Iterable[tuple[str, int | None]]:
        """llama.cpp's tokenizer_st_partition: for each token, longest (in bytes) first, cut every occurrence
        out of the text fragments not yet cut; then the next token in what is left."""
        frags: list[tuple[int, int, int | None]] = [(0, len(text), None)]  # (start, end, token id or None)
        for group, rx in self._groups_all if allow_special else self._groups_added:
            if not any(t in text for t in group):  # str.find is much faster than a regex search
                continue
            cut: list[tuple[int, int, int | None]] = []
            for start, end, tid in frags:
                if tid is not None:
                    cut.append((start, end, tid))
                    continue
                pos = start
                for m in rx.finditer(text, start, end):
                    if m.start() > pos:
                        cut.append((pos, m.start(), None))
                    cut.append((m.start(), m.end(), table[m.group()]))
                    pos = m.end()
                if pos < end:
                    cut.append((pos, end, None))
            frags = cut
        for start, end, tid in frags:
            yield text[start:end], tid

    def _encode_text(self, text: str, at_start: bool) -> list[int]:
        try:
            return self._encode_valid_text(text, at_start)
        except UnicodeEncodeError:  # lone surrogates (e.g. from JSON "\ud800"): U+FFFD, as tiktoken does
            return self._encode_valid_text(text.encode("utf-16", "surrogatepass").decode("utf-16", "replace"),
                                           at_start)

    def _encode_valid_text(self, text: str, at_start: bool) -> list[int]:
        if self.normalizer:
            text = unicodedata.normalize(self.normalizer, text)
        if self.model == "spm":
            if self.add_space_prefix and at_start:
                text = " " + text
            return self._spm.encode(text)
        enc = self._tiktoken
        if enc is not None and self.pre.single_pattern is not None:
            ids = enc.encode_ordinary(text)
        else:
            ids = []
            for piece in self.pre.split(text):
                ids.extend(self._piece_cache(piece))
        if self._tiktoken is not None and self._rank_to_id is not None:
            m = self._rank_to_id
            ids = [m[r] for r in ids]
            if self._missing_bytes:
                ids = [i for i in ids if i >= 0]
        return ids

    def _encode_piece_python(self, piece: str) -> list[int]:
        """One pre-token -> ids (tiktoken ranks when the fast path is on, ids otherwise)."""
        b = piece.encode("utf-8")
        if self._tiktoken is not None:
            return self._tiktoken._encode_single_piece(b)
        return self._bpe_ids(b)

    def _bpe_ids(self, b: bytes) -> list[int]:
        if self.ignore_merges and b in self._bytes_to_id:
            return [self._bytes_to_id[b]]
        out = []
        for part in bpe_merge(b, self._ranks):
            i = self._bytes_to_id.get(part)
            if i is not None:
                out.append(i)
            else:  # not a token: its single bytes (llama.cpp and HF drop bytes missing from the vocabulary)
                out.extend(
                    self._bytes_to_id[part[k : k + 1]]
                    for k in range(len(part))
                    if part[k] not in self._missing_bytes
                )
        return out

    def encode_reference(self, text: str) -> list[int]:
        """The readable Python BPE only (no tiktoken, no cache; SPM: one merge loop per fragment, no
        word cuts), to teach and cross-check."""
        out: list[int] = []
        at_start = True
        for frag, tid in self._partition(text, False):
            if tid is not None:
                out.append(tid)
                at_start = True
                continue
            if self.normalizer:
                frag = unicodedata.normalize(self.normalizer, frag)
            if self.model == "spm":
                prefix = " " if self.add_space_prefix and at_start else ""
                out.extend(self._spm.encode_reference(prefix + frag))
            else:
                for piece in self.pre.split(frag):
                    out.extend(self._bpe_ids(piece.encode("utf-8")))
            at_start = False
        return out

    # ----------------------------------------------------------------------------------------------- decoding
    def decode_bytes(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> bytes:
        """Ids -> the raw bytes of their tokens, joined; an id outside 0..vocab_size-1 is an LlmkitError."""
        ids = ids if isinstance(ids, (list, tuple)) else list(ids)
        skip = self._control_ids if skip_special_tokens else ()
        vocab = self.vocab
        try:
            if ids and min(ids) < 0:  # a negative index would silently pick a token from the end
                raise IndexError
            return b"".join(vocab[i] for i in ids if i not in skip)
        except (IndexError, TypeError):
            bad = next(i for i in ids if not _is_token_id(i, len(vocab)))
            raise LlmkitError(f"token id {bad!r} is outside the vocabulary (0..{len(vocab) - 1})") from None

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """Ids -> text; bytes that are not valid UTF-8 become U+FFFD; SPM drops the added leading space."""
        ids = list(ids)
        text = self.decode_bytes(ids, skip_special_tokens=skip_special_tokens).decode(
            "utf-8", errors="replace"
        )
        if self.model == "spm" and self.add_space_prefix and text.startswith(" "):
            first = next((i for i in ids if not (skip_special_tokens and i in self._control_ids)), None)
            if first is not None and first not in self._control_ids:
                text = text[1:]
        return text

    # ----------------------------------------------------------------------------------------------- saving
    def save(self, directory: str | os.PathLike) -> None:
        """Write tokenizer.json + tokenizer_config.json that HF tokenizers/transformers load."""
        from llmkit.tokenizer.loaders import to_hf_json

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tok_json, config = to_hf_json(self)
        atomic_write_json(d / "tokenizer.json", tok_json, indent=1)
        atomic_write_json(d / "tokenizer_config.json", config, indent=2)


def _applicable_merges(merges: Sequence[tuple[bytes, bytes]]) -> list[tuple[int, tuple[bytes, bytes]]]:
    """(rank, merge) for the merges BPE can ever apply: both sides a single byte or the result of another
    applicable merge. The others never fire (a GGUF writer's placeholder merge for a vocabulary without
    merges, since llama.cpp needs the key), so leaving them out changes no ids and keeps the tiktoken fast
    path, which needs every merge result to be a token."""
    made = {bytes([b]) for b in range(256)}
    todo = list(enumerate(merges))
    keep: list[tuple[int, tuple[bytes, bytes]]] = []
    while True:  # one pass for a learnt merge list (each side made earlier); more for odd orders
        left = []
        for r, (a, b) in todo:
            if a in made and b in made:
                keep.append((r, (a, b)))
                made.add(a + b)
            else:
                left.append((r, (a, b)))
        if len(left) == len(todo):
            break
        todo = left
    keep.sort(key=lambda x: x[0])  # already in order after one pass (timsort: linear)
    return keep


def _length_groups(tokens: Sequence[str]) -> list[tuple[list[str], regex.Pattern]]:
    """(tokens, their alternation) per UTF-8 byte length, longest first (llama.cpp's partition order)."""
    by_len: dict[int, list[str]] = {}
    for t in tokens:
        by_len.setdefault(len(t.encode("utf-8")), []).append(t)
    return [(by_len[n], regex.compile("|".join(map(regex.escape, by_len[n]))))
            for n in sorted(by_len, reverse=True)]


def _is_token_id(i: Any, n: int) -> bool:
    """An int-like (int, numpy or torch integer) in [0, n)."""
    try:
        return 0 <= operator.index(i) < n
    except TypeError:
        return False

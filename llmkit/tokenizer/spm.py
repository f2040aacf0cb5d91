"""SentencePiece-style BPE (Llama-2, Mistral, Gemma GGUF vocabularies), as llama.cpp's llm_tokenizer_spm.

The vocabulary has no merge list: every piece has a score and merging is greedy on scores.
1. Spaces become '▁' (the caller adds one leading space first when the vocabulary says `add_space_prefix`;
   Gemma's does not).
2. Start from single characters; repeatedly merge the adjacent pair whose concatenation is a piece with the
   highest score (leftmost on ties). Every piece counts, control and user-defined ones included, as in
   llama.cpp (they score -1000 in Gemma, so they merge last).
3. Characters that never became a piece fall back to their UTF-8 bytes as <0xNN> tokens (unk if absent).

Example:
    >>> m = SpmModel(["▁", "l", "e", "▁l", "▁le"], [0.0, -1.0, -2.0, -3.0, -4.0], {}, None)
    >>> m.encode(" le le")
    [4, 4]

Notable choice (speed, same ids): there is no pre-tokenizer, but a merge can only join two symbols when
the piece it makes is in the vocabulary. So a text can be cut before every '▁' whose left neighbour `c` never
precedes a '▁' inside any piece ("c▁" occurs in no piece): no merge ever crosses such a cut, and merging each
segment alone gives exactly the ids of merging the whole text (the heap order within a segment is the
same). Segments are short words ("▁maison"), so they are cached: 300 KB of French encodes in a fraction of
a second instead of running one heap over the whole text. Gemma 3's 262k pieces have one such `c` ('>',
from the piece '>▁</'); Llama-2's runs of '▁' keep runs of spaces together with the word that follows.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import regex

from llmkit.tokenizer.core import merge_pairs


class SpmModel:
    def __init__(
        self,
        pieces: Sequence[str],
        scores: Sequence[float | None],
        byte_tokens: dict[int, int],
        unk_id: int | None,
    ):
        self.piece_to_id: dict[str, int] = {}
        for i, p in enumerate(pieces):
            self.piece_to_id.setdefault(p, i)
        self.scores = scores  # None: a piece no merge produces (HF tokenizer.json without scores)
        self.byte_tokens = byte_tokens  # byte value -> id of its <0xNN> token
        self.unk_id = unk_id
        # merge priority of the pair that makes piece p (lower first): -score; absent: no merge makes it
        self._priority = {p: -scores[i] for p, i in self.piece_to_id.items() if scores[i] is not None}
        # characters that precede a '▁' inside some piece: no cut before a '▁' that follows one of them
        glue = {p[k - 1] for p in pieces if "▁" in p[1:] for k in range(1, len(p)) if p[k] == "▁"}
        not_after = f"(?<![{regex.escape(''.join(sorted(glue)))}])" if glue else ""
        self._cut = regex.compile(not_after + "(?=▁)")
        self._segment_ids = lru_cache(maxsize=1 << 16)(self._encode_segment)

    def _rank(self, left: str, right: str) -> float | None:
        """Merge priority of a pair (lower first): minus the score of the piece it makes, None if none."""
        return self._priority.get(left + right)

    def encode(self, text: str) -> list[int]:
        """Text (spaces not yet escaped) -> ids, with no prefix space added."""
        out: list[int] = []
        for segment in self._cut.split(text.replace(" ", "▁")):
            if segment:
                out.extend(self._segment_ids(segment))
        return out

    def encode_reference(self, text: str) -> list[int]:
        """The same ids with one merge loop over the whole text (no cuts, no cache): the plain algorithm."""
        return list(self._encode_segment(text.replace(" ", "▁")))

    def _encode_segment(self, text: str) -> tuple[int, ...]:
        sym = merge_pairs(list(text), self._rank)
        out: list[int] = []
        for s in sym:
            t = self.piece_to_id.get(s)
            if t is not None:
                out.append(t)
                continue
            for b in s.encode("utf-8"):  # byte fallback
                t = self.byte_tokens.get(b, self.unk_id)
                if t is not None:
                    out.append(t)
        return tuple(out)

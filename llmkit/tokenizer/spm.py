"""SentencePiece-style BPE (Llama-2, Mistral, TinyLlama GGUF vocabularies), as llama.cpp's llm_tokenizer_spm.

The vocabulary has no merge list: every piece has a score and merging is greedy on scores.
1. Spaces become '▁' (the caller adds one leading space first: the `add_space_prefix` rule).
2. Start from single characters; repeatedly merge the adjacent pair whose concatenation is a piece with the
   highest score (leftmost on ties).
3. Characters that never became a piece fall back to their UTF-8 bytes as <0xNN> tokens (unk if absent).
There is no pre-tokenizer: the whole text fragment is one sequence, so this runs in Python (vocabularies
are small; speed matters less than exactness here).
"""

from __future__ import annotations

from llmkit.tokenizer.core import merge_pairs


class SpmModel:
    def __init__(
        self, pieces: list[str], scores: list[float], byte_tokens: dict[int, int], unk_id: int | None
    ):
        self.piece_to_id: dict[str, int] = {}
        for i, p in enumerate(pieces):
            self.piece_to_id.setdefault(p, i)
        self.scores = scores  # None: a piece no merge produces (HF tokenizer.json without scores)
        self.byte_tokens = byte_tokens  # byte value -> id of its <0xNN> token
        self.unk_id = unk_id

    def _rank(self, left: str, right: str) -> float | None:
        """Merge priority of a pair (lower first): minus the score of the piece it makes, None if none."""
        t = self.piece_to_id.get(left + right)
        return None if t is None or self.scores[t] is None else -self.scores[t]

    def encode(self, text: str) -> list[int]:
        sym = merge_pairs(list(text.replace(" ", "▁")), self._rank)
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
        return out

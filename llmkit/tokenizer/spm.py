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

import heapq


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

    def encode(self, text: str) -> list[int]:
        sym = list(text.replace(" ", "▁"))
        nxt = [*range(1, len(sym)), -1]
        prv = list(range(-1, len(sym) - 1))
        heap: list[tuple[float, int, int, str]] = []

        def push(i: int, j: int) -> None:
            if i >= 0 and j >= 0:
                t = self.piece_to_id.get(sym[i] + sym[j])
                if t is not None and self.scores[t] is not None:
                    heapq.heappush(heap, (-self.scores[t], i, j, sym[i] + sym[j]))

        for i in range(len(sym) - 1):
            push(i, i + 1)
        while heap:
            _, i, j, merged = heapq.heappop(heap)
            if not sym[i] or not sym[j] or sym[i] + sym[j] != merged:
                continue
            sym[i], sym[j] = merged, ""
            nxt[i] = nxt[j]
            if nxt[j] >= 0:
                prv[nxt[j]] = i
            push(prv[i], i)
            push(i, nxt[i])

        out: list[int] = []
        for s in sym:
            if not s:
                continue
            t = self.piece_to_id.get(s)
            if t is not None:
                out.append(t)
                continue
            for b in s.encode("utf-8"):  # byte fallback
                t = self.byte_tokens.get(b, self.unk_id)
                if t is not None:
                    out.append(t)
        return out

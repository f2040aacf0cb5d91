"""Stop strings on streamed text, and the per-sequence detokenizer shared by the CLI, the API and the server.

Notable choices:
- Stop strings are matched on decoded text, not on token ids, so a stop string split across two (or more)
  tokens is found. Text that could still be the beginning of a stop string is held back until the next
  token settles it, so a stop string is never emitted, not even in part.
- `TextStream` = the tokenizer's UTF-8-safe `StreamDecoder` + `StopMatcher`: one `push(token_id)` gives the
  text delta that is safe to show and whether a stop string ended the sequence.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    """Feed text pieces with `push`; get back what may be emitted and whether a stop string was hit."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def push(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit, stopped). After a stop, the text before it is the last emitted."""
        if self.stopped:
            return "", True
        buf = self.pending + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.pending, self.stopped = "", True
            return buf[: min(hits)], True
        hold = 0  # longest suffix of buf that is a proper prefix of some stop string
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), hold, -1):
                if buf.endswith(s[:k]):
                    hold = k
                    break
        self.pending = buf[len(buf) - hold :]
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        """The held-back text, at the end of a sequence that did not stop on a string."""
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


class TextStream:
    """Token ids -> text deltas of one sequence: UTF-8 safe, stop strings removed."""

    def __init__(self, tokenizer, stops: Sequence[str] = (), skip_ids: Sequence[int] = ()):
        from llmkit.tokenizer import StreamDecoder

        self.decoder = StreamDecoder(tokenizer, skip_special_tokens=True)
        self.matcher = StopMatcher(stops)
        self.skip_ids = set(skip_ids)  # stop token ids: ended the sequence, never shown
        self.text = ""

    def push(self, token_id: int) -> tuple[str, bool]:
        if token_id in self.skip_ids:
            return "", False
        delta, stopped = self.matcher.push(self.decoder.push(token_id))
        self.text += delta
        return delta, stopped

    def finish(self) -> str:
        """Flush the decoder and the held-back text (call once the sequence ended without a stop string)."""
        delta, _ = self.matcher.push(self.decoder.flush())
        delta += self.matcher.flush()
        self.text += delta
        return delta

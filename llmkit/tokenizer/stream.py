"""StreamDecoder: token ids in, text out, one token at a time, never half a UTF-8 character.

Shared by the CLI, the server and the UI. Tokens are turned into their raw bytes (`id_to_bytes`) and fed
to Python's incremental UTF-8 decoder with errors="replace": it holds back the bytes of an unfinished
character and emits U+FFFD for invalid ones exactly where a one-shot `bytes.decode(errors="replace")`
would, so `"".join(push(i) for i in ids) + flush() == tokenizer.decode(ids)`. The one decode rule that
is not about bytes, SentencePiece's "drop the leading space that encoding added", is applied to the
first emitted token the same way `Tokenizer.decode` applies it.
"""

from __future__ import annotations

import codecs
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llmkit.tokenizer.core import Tokenizer


class StreamDecoder:
    """Incremental detokenizer: `push(id)` returns the newly completed text (maybe ""), `flush()` the rest."""

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self._control = set(tokenizer.special_tokens.values())
        self._skip = self._control if skip_special_tokens else set()
        self._strip_space = getattr(tokenizer, "model", "bpe") == "spm" and getattr(
            tokenizer, "add_space_prefix", False
        )
        self.reset()

    def reset(self) -> None:
        """Start a new text (forget held-back bytes and the leading-space state)."""
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._first = True

    def push(self, token_id: int) -> str:
        if token_id in self._skip:
            return ""
        data = self.tokenizer.id_to_bytes(token_id)
        if self._first:
            self._first = False
            if self._strip_space and token_id not in self._control and data.startswith(b" "):
                data = data[1:]
        return self._utf8.decode(data, final=False)

    def flush(self) -> str:
        """The held-back bytes of an unfinished character, as U+FFFD; the decoder is then ready for more."""
        return self._utf8.decode(b"", final=True)

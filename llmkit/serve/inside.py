"""The web chat's "look inside" panel (POST /v1/inside): attention, logit lens and next-token distribution of
the last answer of a conversation, computed by llmkit.lab.inside (the labs' helpers) and sized for a browser.

    inspector = Inspector({"tiny": model})          # one per app: each served model id -> its model
    data = await inspector.inside(svc, InsideRequest(messages=[..., {"role": "assistant", ...}], layer=1))

The reply (a token index counts in the rendered conversation; token i's text is `tokens[i - offset]`):
- `answer` [a0, a1): the last assistant turn's tokens as the one chat renderer (render_chat) marks them for
  training (its loss mask): the answer and its end-of-turn token;
- `attention`: one layer's weights, of one head or the heads' mean; rows = the answer tokens `queries`
  [q0, q1), columns = the tokens [offset, q1) (keys), at most WINDOW of each; `outside[r]` is the weight row r
  puts on keys before `offset` (0 when the conversation fits in the window), so each row sums to 1 with it;
- `lens`: the logit lens (`logit_lens`): top-1 token and its probability after each layer, per answer token of
  the window (the last layer's is the model's own prediction);
- `next`: the distribution answer token `position` was drawn from: its TOP highest logits and, for each
  temperature of the page's slider (TEMPERATURES: 0, 0.05, ..., 2, OpenAI's bound), log Z(T) =
  logsumexp(logits / T) over the whole vocabulary and the entropy H(softmax(logits / T)) in bits. The page
  computes p_i = exp(l_i / T - log Z(T)) and shows H(T) as the slider moves, with no round-trip.

Notable choices
- What is shown for token j is read at position j - 1 (the distribution token j was drawn from), like the
  chat's per-token alternatives; row j of the heatmap is query j's attention.
- It never blocks generation. The work (rendering, tokenizing, the forward, the lens) runs on the inspector's
  own thread, a one-worker executor: looks wait for each other there (so at most one set of attention maps is
  in memory), never on the event loop, the default executor that renders chat requests, or the engine thread.
  The engine's weights are shared, not copied: `look` is a forward without KV cache that changes nothing on
  the model (no module swap, no buffer written; the engine's torch.compile wraps the model without changing
  it), so it runs safely while the engine thread steps the same modules; the two only share the cores (or
  the GPU). At most MAX_PENDING looks wait; more is a 429.
- Memory: `look` keeps every layer's attention, n_layers x H x T^2 x 4 bytes (SmolLM2-135M at T = 1024:
  1.1 GB, freed once the window is cut out), so a conversation is capped at MAX_TOKENS (and the context).
- The last look's windows are kept (one entry, window-sized): changing layer, head or position within the
  window is answered without a forward.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn
from pydantic import Field

from llmkit.errors import LlmkitError
from llmkit.lab.inside import Inside, entropy_bits, logit_lens, look, softmax_t, token_texts
from llmkit.serve.protocol import ContentPart, Int, _Lenient, _Request, content_text
from llmkit.serve.schemas import _Out
from llmkit.serve.service import Service
from llmkit.tokenizer.chat import render_chat

MAX_TOKENS = 1024  # longest conversation inspected (attention memory grows as T^2)
WINDOW = 256  # answer tokens (rows) and tokens (columns) of the heatmap and the lens
TOP = 20  # logits sent for the temperature slider
TEMPERATURES = [round(0.05 * i, 2) for i in range(41)]  # the slider's steps: 0 .. 2
MAX_PENDING = 8  # looks running or waiting; more: 429
DIGITS = 4  # significant digits of the weights and probabilities sent


# ----------------------------------------------------------------------------------------- request, reply
class InsideMessage(_Lenient):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class InsideRequest(_Request):
    model: str | None = None
    messages: list[InsideMessage] = Field(..., min_length=1, description="the conversation, ending with the "
                                          "assistant answer to look inside")
    layer: Int | None = Field(None, ge=0, description="attention layer, 0-based; null: the last")
    head: Int | None = Field(None, ge=0, description="attention head, 0-based; null: the heads' mean")
    position: Int | None = Field(None, ge=0, description="the answer token (index in the rendered "
                                 "conversation) whose next-token distribution is sent; null: the first")


class InsideAttention(_Out):
    weights: list[list[float]] = Field(description="rows: queries q0..q1-1, columns: keys offset..q1-1")
    outside: list[float] = Field(description="each row's weight on keys before `offset`")


class InsideLens(_Out):
    tokens: list[list[str]] = Field(description="[layer 1..n_layers][answer token q0..q1-1]: the top-1")
    probs: list[list[float]]


class InsideTop(_Out):
    token: str
    id: int = Field(ge=0)
    logit: float


class InsideNext(_Out):
    position: int = Field(ge=1)
    token: str
    id: int = Field(ge=0)
    logit: float
    top: list[InsideTop]
    temperatures: list[float]
    log_z: list[float | None] = Field(description="logsumexp(logits / T) over the vocabulary; null at T = 0")
    entropy_bits: list[float]


class InsideReply(_Out):
    """POST /v1/inside: what the chat's "look inside" panel draws (see llmkit.serve.inside)."""

    object: Literal["llmkit.inside"]
    model: str
    n_layers: int = Field(ge=1)
    n_heads: int = Field(ge=1)
    layer: int = Field(ge=0)
    head: int | None
    offset: int = Field(ge=0)
    tokens: list[str]
    answer: list[int] = Field(min_length=2, max_length=2)
    queries: list[int] = Field(min_length=2, max_length=2)
    attention: InsideAttention
    lens: InsideLens
    next: InsideNext


# ----------------------------------------------------------------------------------------- the work
def answer_span(loss_mask: list[int]) -> tuple[int, int]:
    """[a0, a1) of the last run of trained-on tokens: the last assistant turn."""
    a1 = max((i + 1 for i, m in enumerate(loss_mask) if m), default=0)
    a0 = a1
    while a0 > 0 and loss_mask[a0 - 1]:
        a0 -= 1
    return a0, a1


@dataclass
class View:
    """The part of one look the panel shows: a window of the conversation, every layer and head."""

    key: tuple
    tokens: list[str]  # texts of tokens offset .. q1-1
    offset: int
    answer: tuple[int, int]
    queries: tuple[int, int]
    window: Inside  # attentions n_layers x (H, Q, K); logits (Q, V): row r = the distribution of token q0 + r
    lens_tokens: list[list[str]]  # (n_layers, Q) top-1 after each layer
    lens_probs: list[list[float]]


def _rounded(t: torch.Tensor) -> list:
    """A (.., n) tensor as nested lists of floats with DIGITS significant digits (short JSON)."""
    if t.dim() > 1:
        return [_rounded(r) for r in t]
    return [float(f"{x:.{DIGITS}g}") for x in t.tolist()]


class Inspector:
    """The looks of one app: the served models by id, one worker thread, the last look's window."""

    def __init__(self, models: dict[str, nn.Module | None]):
        self.models = models
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmkit-inside")
        self.pending = 0
        self._last: View | None = None  # touched by the worker thread only

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    async def inside(self, svc: Service, req: InsideRequest) -> dict[str, Any]:
        """The panel's data for `req` on the model of `svc` (400 on a bad layer, head, position or
        conversation; 429 when MAX_PENDING looks are already waiting)."""
        svc.check_model(req.model)
        model = self.models.get(svc.model_name)
        if model is None:
            raise LlmkitError(f"model `{svc.model_name}` has no local weights to look inside",
                              code="not_inspectable", param="model")
        n_layers, n_heads = len(model.model.layers), model.config.n_heads
        if req.layer is not None and req.layer >= n_layers:
            raise LlmkitError(f"layer: {req.layer} is not a layer of this model (0 .. {n_layers - 1})",
                              code="invalid_value", param="layer")
        if req.head is not None and req.head >= n_heads:
            raise LlmkitError(f"head: {req.head} is not a head of this model (0 .. {n_heads - 1}; "
                              "null: the heads' mean)", code="invalid_value", param="head")
        if self.pending >= MAX_PENDING:
            raise LlmkitError(f"inspector busy: {self.pending} looks waiting; retry later", status=429,
                              code="rate_limit_exceeded")
        messages = [{"role": m.role, "content": content_text(m.content, f"messages.{i}.content")}
                    for i, m in enumerate(req.messages)]
        if messages[-1]["role"] != "assistant":
            raise LlmkitError("messages: the last message must be the assistant's answer to look inside",
                              code="invalid_value", param="messages")
        layer = n_layers - 1 if req.layer is None else req.layer
        self.pending += 1
        try:
            return await asyncio.wrap_future(self.pool.submit(
                self._work, svc.model_name, model, svc.tokenizer, messages, min(MAX_TOKENS, svc.context),
                layer, req.head, req.position))
        finally:
            self.pending -= 1

    def _work(self, model_id: str, model: nn.Module, tokenizer, messages: list[dict], limit: int, layer: int,
              head: int | None, position: int | None) -> dict[str, Any]:
        view = self._view(model_id, model, tokenizer, messages, limit, position)
        return self._reply(model_id, tokenizer, view, layer, head, position)

    def _view(self, model_id: str, model: nn.Module, tokenizer, messages: list[dict], limit: int,
              position: int | None) -> View:
        """Render, check, and look (on the worker thread); the last view is reused when it covers the ask."""
        chat = render_chat(tokenizer, messages)
        ids = chat.ids
        if len(ids) > limit:
            raise LlmkitError(f"messages: the conversation has {len(ids)} tokens; the inspector looks at "
                              f"{limit} at most. Start a new chat or shorten it.",
                              code="context_length_exceeded", param="messages")
        a0, a1 = answer_span(chat.loss_mask)
        if a0 == a1 or a0 == 0:
            raise LlmkitError("messages: the chat template marks no assistant answer at the end",
                              code="invalid_value", param="messages")
        pos = a0 if position is None else position
        if not a0 <= pos < a1:
            raise LlmkitError(f"position: {pos} is not an answer token (answer tokens: {a0} .. {a1 - 1})",
                              code="invalid_value", param="position")
        q0 = max(a0, pos + 1 - WINDOW)
        q1 = min(a1, q0 + WINDOW)
        key = (model_id, tuple(ids), q0)
        last = self._last
        if last is not None and last.key == key:
            return last
        k0 = max(0, q1 - WINDOW)
        full = look(model, ids)
        # the window as an Inside of its own: rows q0..q1-1 of each map, and the states that predict them
        window = Inside(ids=ids[k0:q1],
                        attentions=[a[:, q0:q1, k0:q1].clone() for a in full.attentions],  # (H, Q, K)
                        hidden_states=[h[q0 - 1:q1 - 1] for h in full.hidden_states],  # (Q, d)
                        logits=full.logits[q0 - 1:q1 - 1].clone())  # (Q, V)
        del full
        lens = logit_lens(model, window, k=1)
        view = View(key, token_texts(tokenizer, ids[k0:q1]), k0, (a0, a1), (q0, q1), window,
                    [token_texts(tokenizer, row.ids[:, 0].tolist()) for row in lens],
                    [_rounded(row.probs[:, 0]) for row in lens])
        view.window.hidden_states = []  # not needed any more
        self._last = view
        return view

    @staticmethod
    def _reply(model_id: str, tokenizer, view: View, layer: int, head: int | None, position: int | None
               ) -> dict[str, Any]:
        q0, q1 = view.queries
        pos = view.answer[0] if position is None else position
        w = view.window.attention(layer, head)  # (Q, K)
        row = view.window.logits[pos - q0]  # (V,): the distribution token `pos` was drawn from
        top = row.topk(min(TOP, row.numel()))
        tid = view.window.ids[pos - view.offset]
        texts = token_texts(tokenizer, [tid, *top.indices.tolist()])
        outside = (1 - w.sum(-1)).clamp(min=0) if view.offset else torch.zeros(len(w))  # (Q,)
        return {
            "object": "llmkit.inside", "model": model_id,
            "n_layers": view.window.n_layers, "n_heads": view.window.n_heads, "layer": layer, "head": head,
            "offset": view.offset, "tokens": view.tokens, "answer": list(view.answer), "queries": [q0, q1],
            "attention": {"weights": _rounded(w), "outside": _rounded(outside)},
            "lens": {"tokens": view.lens_tokens, "probs": view.lens_probs},
            "next": {
                "position": pos, "token": texts[0], "id": tid, "logit": row[tid].item(),
                "top": [{"token": t, "id": i, "logit": v} for t, i, v in
                        zip(texts[1:], top.indices.tolist(), top.values.tolist())],
                "temperatures": TEMPERATURES,
                "log_z": [None if t == 0 else torch.logsumexp(row / t, -1).item() for t in TEMPERATURES],
                "entropy_bits": [entropy_bits(softmax_t(row, t)) for t in TEMPERATURES],
            },
        }

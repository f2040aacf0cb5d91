"""Log-probabilities of token ids under a model: the one scorer behind perplexity, prompt logprobs (echo),
evaluation by log-likelihood (multiple choice) and preference losses (DPO).

    token_logprobs(logits, targets)            # (..., T, V), (..., T) -> (..., T) float32: the primitive
    topk_logprobs(logits, k)                   # the k most likely tokens' logprobs and ids (echo, logprobs=k)
    sequence_logprobs(model, ids, mask)        # (B,) sums over masked tokens, differentiable (DPO, eval loss)
    score(model, [(context, continuation)])    # per request: sum, n tokens, is_greedy (lm-eval style)
    perplexity(model, ids, window=, stride=)   # sliding windows, HF's recipe

Notable choices
- Log-probs are always float32 whatever the model's dtype: log-softmax of the raw logits (no temperature,
  no penalties), the model's own distribution, as OpenAI, vLLM and lm-eval report it.
- The head (`model.head`) runs only on the positions that are scored: the model returns hidden states
  (`return_hidden=True`) and the (N, V) logits exist only for the N scored tokens, never for padding or for
  context positions.
- `score` shares a common context: requests are grouped by context and batched (right-padded, up to
  `batch_size` requests per forward). Each batch runs every distinct context once into a KV cache, copies the
  cached keys/values to the rows of the requests that share it, then runs all continuations together at
  their own positions. The last context position predicts each continuation's first token, so when every
  continuation is one token long (a multiple-choice letter) the batch is one forward without a cache. A
  group larger than `batch_size` runs its context once per batch. Batches are formed longest first (like
  lm-eval: padding stays small and an out-of-memory error shows at once), and a batch never needs a position
  past the model's context (longest context + longest continuation - 1 <= max_seq_len).
- A context must hold at least one token (start it with BOS/EOS when there is none): the first continuation
  token needs a position that predicts it. Nothing is truncated: a request that does not fit raises.
- `perplexity` follows HF's "perplexity of fixed-length models": windows of `window` tokens every `stride`
  tokens; each window scores only the tokens no earlier window scored, with the rest as context. stride ==
  window gives disjoint windows (each window's first token unscored); stride == window - 1 scores every token
  but the very first exactly once with no overlap (what pretraining's eval does).
- The scorer never changes the model (no train/eval switch, no module swap): call `model.eval()` first for
  dropout-free scores; a model may be scored from one thread while another uses it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from llmkit.errors import LlmkitError

ScoreRequest = tuple[Sequence[int], Sequence[int]]  # (context ids, continuation ids)


# ---------------------------------------------------------------------- primitives on logits
def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) under raw logits, in float32: logits (..., T, V), targets (..., T) -> (..., T)."""
    logits = logits.float()
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (..., T)
    return picked - logits.logsumexp(-1)


class TopLogprobs(NamedTuple):
    values: torch.Tensor  # (..., k) float32, most likely first
    ids: torch.Tensor  # (..., k) long


def topk_logprobs(logits: torch.Tensor, k: int) -> TopLogprobs:
    """The k most likely tokens and their logprobs under raw logits (..., V)."""
    logits = logits.float()
    vals, ids = logits.topk(k, dim=-1)  # (..., k)
    # the same subtraction as token_logprobs, so a chosen token's logprob equals its top-1 entry bit for bit
    # (lm-eval's is_greedy compares them with ==)
    return TopLogprobs(vals - logits.logsumexp(-1, keepdim=True), ids)


# ---------------------------------------------------------------------- sequences (differentiable)
def sequence_logprobs(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of log p(ids[b, t] | ids[b, :t]) over the t where mask[b, t] is set: (B, T), (B, T) -> (B,) fp32.

    Differentiable (no inference mode): the DPO loss and the pretraining eval use it. `mask` is aligned with
    `ids` (a label mask: 1 on the tokens to score, e.g. an answer's tokens); mask[:, 0] is ignored since the
    first token has no prediction. Rows may be right-padded with any id (mask 0 there). Only the masked
    positions go through the head.
    """
    scored = mask[:, 1:].bool()  # (B, T-1): position t predicts ids[:, t + 1]
    h = model(ids[:, :-1], return_hidden=True)  # (B, T-1, d)
    lp = token_logprobs(_head(model)(h[scored]), ids[:, 1:][scored])  # (N,)
    rows = scored.nonzero()[:, 0]  # (N,)
    return torch.zeros(ids.shape[0], dtype=lp.dtype, device=lp.device).index_add(0, rows, lp)


# ---------------------------------------------------------------------- requests (evaluation)
@dataclass(frozen=True)
class Score:
    logprob: float  # sum of the continuation tokens' logprobs (nats)
    n_tokens: int  # continuation length
    is_greedy: bool  # every continuation token is the argmax at its position (lm-eval's is_greedy)
    token_logprobs: list[float] | None = None  # one per continuation token, when asked (per_token=True)


@torch.inference_mode()
def score(
    model: nn.Module, requests: Sequence[ScoreRequest], *, batch_size: int = 16, per_token: bool = False
) -> list[Score]:
    """Log-likelihood of each continuation given its context, in the order of `requests`.

    Requests sharing a context run that context once per batch (see the module notes).
    """
    if batch_size < 1:
        raise LlmkitError(f"batch_size must be >= 1, got {batch_size}")
    limit, vocab = model.config.max_seq_len, model.config.vocab_size
    reqs = [(tuple(map(int, c)), tuple(map(int, k))) for c, k in requests]
    for i, (c, k) in enumerate(reqs):
        if not c or not k:
            what = "context" if not c else "continuation"
            raise LlmkitError(f"request {i}: empty {what}; a context needs at least one token (e.g. BOS)")
        if len(c) + len(k) - 1 > limit:
            raise LlmkitError(
                f"request {i}: {len(c)} + {len(k)} tokens do not fit the model's context of {limit}; "
                "shorten the context"
            )
        if not all(0 <= t < vocab for t in c + k):
            raise LlmkitError(f"request {i}: token ids must lie in [0, {vocab})")

    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (c, _) in enumerate(reqs):
        groups.setdefault(c, []).append(i)
    longest = sorted(groups.values(), key=lambda g: -max(len(reqs[i][0]) + len(reqs[i][1]) for i in g))
    order = [i for g in longest for i in sorted(g, key=lambda i: -len(reqs[i][1]))]

    out: list[Score | None] = [None] * len(reqs)
    batch: list[int] = []
    lc = lk = 0
    for i in [*order, None]:
        if i is not None:
            nc, nk = max(lc, len(reqs[i][0])), max(lk, len(reqs[i][1]))
            if batch and len(batch) < batch_size and nc + nk - 1 <= limit:
                batch.append(i)
                lc, lk = nc, nk
                continue
        if batch:
            for j, s in zip(batch, _score_batch(model, [reqs[j] for j in batch], per_token)):
                out[j] = s
        if i is not None:
            batch, lc, lk = [i], len(reqs[i][0]), len(reqs[i][1])
    return out  # type: ignore[return-value]


def _score_batch(model: nn.Module, reqs: list[tuple[tuple[int, ...], tuple[int, ...]]],
                 per_token: bool) -> list[Score]:
    """One batch, one forward: a row per distinct context holding the context (segment 0) and then each of
    its requests' continuation but the last token (segments 1, 2, ...: each starts at the context's end
    position and sees the context and itself). The context's last position predicts every continuation's
    first token; continuation token t predicts token t + 1."""
    dev = next(model.parameters()).device
    head = _head(model)
    ctxs = list(dict.fromkeys(c for c, _ in reqs))
    slot = {c: j for j, c in enumerate(ctxs)}
    ids = [list(c) for c in ctxs]
    pos = [list(range(len(c))) for c in ctxs]
    seg = [[0] * len(c) for c in ctxs]
    rows, cols, targets, owner = [], [], [], []  # per scored token: row, predicting column, target, request
    for b, (c, k) in enumerate(reqs):
        r = slot[c]
        start, sid = len(ids[r]), max(seg[r]) + 1
        ids[r] += k[:-1]
        pos[r] += range(len(c), len(c) + len(k) - 1)
        seg[r] += [sid] * (len(k) - 1)
        rows += [r] * len(k)
        cols += [len(c) - 1, *range(start, start + len(k) - 1)]
        targets += k
        owner += [b] * len(k)
    T = max(map(len, ids))
    x = _pad(ids, T, dev)  # (R, T)
    if all(len(k) == 1 for _, k in reqs):  # contexts only: plain causal attention (right padding is inert)
        h = model(x, return_hidden=True)  # (R, T, d)
    else:
        p = torch.tensor([q + [0] * (T - len(q)) for q in pos], device=dev)  # (R, T)
        sg = torch.tensor([q + [-1] * (T - len(q)) for q in seg], device=dev)  # (R, T): -1 = padding
        h = model(x, positions=p, segments=sg, return_hidden=True)  # (R, T, d)
    logits = head(h[torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)])  # (N, V)
    want = torch.tensor(targets, device=dev)  # (N,)
    lp = token_logprobs(logits, want)  # (N,) float32
    hit = logits.argmax(-1) == want  # (N,)
    who = torch.tensor(owner, device=dev)  # (N,)
    B = len(reqs)
    sums = torch.zeros(B, dtype=lp.dtype, device=dev).index_add(0, who, lp).tolist()
    misses = torch.zeros(B, dtype=torch.long, device=dev).index_add(0, who, (~hit).long()).tolist()
    flat = lp.tolist() if per_token else None
    out, at = [], 0
    for b, (_, k) in enumerate(reqs):
        out.append(Score(sums[b], len(k), misses[b] == 0, flat[at:at + len(k)] if flat is not None else None))
        at += len(k)
    return out


# ---------------------------------------------------------------------- perplexity
@dataclass(frozen=True)
class Perplexity:
    nll: float  # summed negative log-likelihood of the scored tokens (nats)
    tokens: int  # scored tokens

    @property
    def loss(self) -> float:
        """Mean nats per scored token."""
        return self.nll / self.tokens

    @property
    def ppl(self) -> float:
        return math.exp(self.loss)


def sliding_windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first) for each window over n tokens: it holds tokens [begin, end) and scores those from
    index `first` of the window on (the ones no earlier window scored; never index 0)."""
    out, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        out.append((begin, end, max(1, prev_end - begin)))
        prev_end = end
        if end == n:
            break
    return out


def rolling_windows(n: int, context: int) -> list[tuple[int, int, int]]:
    """lm-eval's rolling windows (loglikelihood_rolling) over n ids whose first, the prefix token, is never
    scored, as (begin, end, first) like `sliding_windows`: each window holds up to context + 1 ids (the model
    sees `context` positions) and scores the ids no earlier window scored; the last window ends at the end
    of the text with a full context before its new tokens (get_rolling_token_windows, context_len=1)."""
    out, done = [], 1
    while done < n:
        end = min(done + context, n)
        begin = max(0, end - context - 1)
        out.append((begin, end, done - begin))
        done = end
    return out


@torch.inference_mode()
def perplexity(
    model: nn.Module,
    ids: Sequence[int] | torch.Tensor,
    *,
    window: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    rolling: bool = False,
) -> Perplexity:
    """Token perplexity of one text (its ids) by sliding windows (default: the model's context, disjoint);
    rolling=True: lm-eval's rolling windows over the model's whole context (`rolling_windows`; ids[0] is the
    prefix token; window and stride unused)."""
    limit = model.config.max_seq_len
    window = limit if window is None else window
    stride = window if stride is None else stride
    if not 2 <= window <= limit:
        raise LlmkitError(f"window must lie in [2, {limit}] (the model's context), got {window}")
    if not 1 <= stride <= window:
        raise LlmkitError(f"stride must lie in [1, window={window}], got {stride}")
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()  # (N,)
    if ids.numel() < 2:
        raise LlmkitError("perplexity needs at least 2 tokens")
    dev = next(model.parameters()).device
    spans = rolling_windows(ids.numel(), limit) if rolling else sliding_windows(ids.numel(), window, stride)
    nll, count = 0.0, 0
    for i in range(0, len(spans), batch_size):
        chunk = spans[i : i + batch_size]
        T = max(e - b for b, e, _ in chunk)
        x = torch.zeros(len(chunk), T, dtype=torch.long)  # (b, T)
        mask = torch.zeros(len(chunk), T, dtype=torch.bool)  # (b, T)
        for r, (b, e, first) in enumerate(chunk):
            x[r, : e - b] = ids[b:e]
            mask[r, first : e - b] = True
        nll -= float(sequence_logprobs(model, x.to(dev), mask.to(dev)).double().sum())
        count += int(mask.sum())
    return Perplexity(nll, count)


# ---------------------------------------------------------------------- helpers
def _head(model: nn.Module) -> nn.Module:
    """The vocabulary projection (DistributedDataParallel keeps the model in `.module`)."""
    return getattr(model, "module", model).head


def _pad(rows: Sequence[Sequence[int]], T: int, device: torch.device) -> torch.Tensor:
    """Right-pad id lists with 0 into (len(rows), T) long."""
    x = torch.zeros(len(rows), T, dtype=torch.long)
    for r, ids in enumerate(rows):
        x[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return x.to(device)

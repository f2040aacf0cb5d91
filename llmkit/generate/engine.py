"""Engine: token ids in, token ids out, for many sequences at once over one static KV cache.

    row = engine.add(prompt_ids, params)     # prefill (only the part not already cached); the row joins
    for out in engine.step(): ...            # one new token for every running row (a StepOutput each)
    engine.remove(row)                       # the row leaves; its KV stays for prefix reuse

Notable choices:
- One `KVCache` with `max_batch` rows is allocated once. A decode step runs the running rows together, each
  at its own position (positions (B, 1)); rows join (`add`, prefilled on their own while others wait) and
  leave (`remove`) between steps — the server's continuous batching drives exactly this loop.
- Attention reads only the filled prefix of the cache: `EngineCache` presents the model with the first
  max(position) + 1 slots (and a plain view when the rows are contiguous), so a decode step costs what the
  sequence length costs, not what the cache capacity costs.
- The vocabulary projection runs only where a token is sampled (the last prompt position at prefill), unless
  prompt logprobs are asked for (`echo`): the model runs with its head detached and the engine applies it.
- Prefix reuse: each row remembers the token ids whose keys/values it holds. A new request goes to the free
  row sharing the longest prefix with it; if another row (even a running one) shares a longer prefix, those
  slots are copied over. Only the rest is prefilled and `cached_tokens` reports the saving. n samples of one
  prompt thus prefill once.
- Context policy: a prompt that leaves no room for one new token raises LlmkitError, or with
  `truncate=True` keeps its last tokens (leaving room for max_tokens, up to half the context). A row that
  fills the context finishes with reason "length".
- Sliding-window models are handled by the model's mask (key j visible from p iff p - j < window).
- The engine never sees text: stop strings are the caller's (llmkit.generate.stop.TextStream); stop ids are
  checked here.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from llmkit.errors import LlmkitError
from llmkit.generate.sampling import SamplingParams, SequenceSampler, TokenLogprob, prompt_logprobs
from llmkit.model import KVCache


class EngineCache(KVCache):
    """The model's static KVCache, showing each step only the rows it runs and the slots it can see."""

    def __init__(self, config, batch_size: int, capacity: int, device=None, dtype=None):
        super().__init__(config, batch_size, capacity, device, dtype)
        self.capacity = capacity
        self.row_start = 0  # with rows None: the batch is cache rows row_start .. row_start + B - 1
        self._pos: torch.Tensor | None = None  # positions of the step whose scatter index is _idx
        self._idx: torch.Tensor | None = None

    def select(self, rows: Sequence[int], length: int) -> None:
        """Run the next forward on cache `rows` (sorted), attending to key slots [0, length)."""
        self.max_seq_len = length  # the model builds its (B, 1, T, S) mask over S = max_seq_len slots
        if list(rows) == list(range(rows[0], rows[0] + len(rows))):
            self.rows, self.row_start = None, rows[0]
        else:
            self.rows = torch.tensor(rows, device=self.device)

    def update(self, layer_idx, k, v, positions):
        """Write k, v (B, T, n_kv, D) at positions (B, T); return keys/values (B, n_kv, length, D)."""
        n = self.max_seq_len
        if self.rows is None:  # contiguous rows: scatter into views (cheaper than an index_put)
            b = k.shape[0]
            kc = self.k[layer_idx][self.row_start : self.row_start + b]  # views
            vc = self.v[layer_idx][self.row_start : self.row_start + b]
            if positions is not self._pos:  # the scatter index is the same for every layer of a step
                _, _, hkv, d = k.shape
                self._pos, self._idx = positions, positions[:, None, :, None].expand(b, hkv, -1, d)
            kc.scatter_(2, self._idx, k.transpose(1, 2).to(kc.dtype))  # (B, n_kv, T, D) views written
            vc.scatter_(2, self._idx, v.transpose(1, 2).to(vc.dtype))
            return kc[:, :, :n], vc[:, :, :n]
        kc, vc, idx = self.k[layer_idx], self.v[layer_idx], self.rows[:, None]
        kc[idx, :, positions] = k.to(kc.dtype)  # indexed view (B, T, n_kv, D)
        vc[idx, :, positions] = v.to(vc.dtype)
        return kc[self.rows, :, :n], vc[self.rows, :, :n]  # gathered copies

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        for t in self.k + self.v:
            t[dst, :, :n] = t[src, :, :n]


@dataclass
class StepOutput:
    row: int
    token_id: int
    logprob: TokenLogprob | None
    finish_reason: str | None  # None while running; "stop" (stop id) | "length" (max_tokens or context)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Sequence_:
    prompt_ids: list[int]
    params: SamplingParams
    sampler: SequenceSampler
    stop_ids: set[int]
    cached_tokens: int
    truncated: int = 0  # prompt tokens dropped by truncate=True
    output_ids: list[int] = field(default_factory=list)
    logits: torch.Tensor | None = None  # (V,) next-token logits
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finish_reason: str | None = None


class Engine:
    def __init__(self, model: nn.Module, *, max_batch: int = 4, max_seq_len: int | None = None,
                 stop_ids: Sequence[int] = (), compile: bool = False):
        cfg = model.config
        self.model = model.eval()
        self.config = cfg
        self.capacity = min(max_seq_len or cfg.max_seq_len, cfg.max_seq_len)
        p = next(model.parameters())
        self.device = p.device
        dtype = p.dtype if p.dtype.is_floating_point else torch.float32
        self.cache = EngineCache(cfg, max_batch, self.capacity, device=p.device, dtype=dtype)
        self.max_batch = max_batch
        self.stop_ids = set(stop_ids)  # the tokenizer's eos / end-of-turn ids
        self.seqs: list[Sequence_ | None] = [None] * max_batch
        self.ids: list[list[int]] = [[] for _ in range(max_batch)]  # token ids whose KV each row holds
        self._last_used = [0] * max_batch
        self._clock = itertools.count(1)
        # compile: decode steps run a torch.compile'd model (CUDA graphs on GPU) over fixed shapes: the whole
        # cache is attended (masked), so one graph serves every step. Prefill stays eager.
        self._decode_model = torch.compile(model, mode="reduce-overhead" if p.is_cuda else "default",
                                           dynamic=False) if compile else None

    # ------------------------------------------------------------------ rows
    @property
    def running(self) -> list[int]:
        return [r for r, s in enumerate(self.seqs) if s is not None and s.finish_reason is None]

    @property
    def free_rows(self) -> int:
        return sum(s is None for s in self.seqs)

    def add(self, prompt_ids: Sequence[int], params: SamplingParams | None = None, *, sample_index: int = 0,
            truncate: bool = False) -> int:
        """Prefill a new sequence into a free row; return the row (see `seq(row).cached_tokens`)."""
        params = (params or SamplingParams()).validate()
        ids, dropped = self._fit_context([int(i) for i in prompt_ids], params, truncate)
        if any(not 0 <= i < self.config.vocab_size for i in ids):
            raise LlmkitError(f"prompt holds token ids outside the vocabulary [0, {self.config.vocab_size})")
        row, cached = self._pick_row(ids, reuse=not params.echo)
        stops = set() if params.ignore_eos else set(self.stop_ids)
        sampler = SequenceSampler(params, ids, self.config.vocab_size, self.device, sample_index)
        seq = Sequence_(ids, params, sampler, stops | set(params.stop_ids), cached, dropped)
        self.seqs[row] = seq
        self.ids[row] = ids[:cached]
        last, full = self._forward([row], [ids[cached:]], all_logits=params.echo)
        seq.logits = last[0]
        if params.echo:
            seq.prompt_logprobs = prompt_logprobs(full[0], ids, params.logprobs or 0)
        return row

    def seq(self, row: int) -> Sequence_:
        s = self.seqs[row]
        if s is None:
            raise LlmkitError(f"engine row {row} holds no request")
        return s

    def remove(self, row: int) -> None:
        """Free the row; its cached token ids stay for prefix reuse."""
        self.seqs[row] = None

    def step(self) -> list[StepOutput]:
        """Sample one token for every running row, then run the model on the tokens of rows still going."""
        outs: list[StepOutput] = []
        feed: list[tuple[int, int]] = []
        for row in self.running:
            seq = self.seqs[row]
            token, info = seq.sampler(seq.logits)
            seq.output_ids.append(token)
            if token in seq.stop_ids:
                seq.finish_reason = "stop"
            elif len(seq.output_ids) >= seq.params.max_tokens or len(self.ids[row]) >= self.capacity:
                seq.finish_reason = "length"
            else:
                feed.append((row, token))
            outs.append(StepOutput(row, token, info, seq.finish_reason))
        if feed:
            rows = [r for r, _ in feed]
            last, _ = self._forward(rows, [[t] for _, t in feed])
            for r, lg in zip(rows, last):
                self.seqs[r].logits = lg
        return outs

    # ------------------------------------------------------------------ internals
    def _fit_context(self, ids: list[int], params: SamplingParams, truncate: bool) -> tuple[list[int], int]:
        if not ids:
            raise LlmkitError("empty prompt: give at least one token (e.g. the BOS token)")
        cap = self.capacity
        if len(ids) < cap and (not truncate or len(ids) + params.max_tokens <= cap):
            return ids, 0
        if not truncate:
            raise LlmkitError(
                f"prompt is {len(ids)} tokens but the context holds {cap} (prompt + at least 1 new token); "
                "shorten the prompt or pass truncate=True to keep its last tokens")
        keep = max(cap - params.max_tokens, cap // 2)
        return ids[-keep:], len(ids) - keep

    def _pick_row(self, ids: list[int], reuse: bool) -> tuple[int, int]:
        free = [r for r, s in enumerate(self.seqs) if s is None]
        if not free:
            raise LlmkitError(f"all {self.max_batch} engine rows are busy; remove a finished request first",
                              status=503)
        lcp = [_common_prefix(h, ids) if reuse else 0 for h in self.ids]
        row = max(free, key=lambda r: (lcp[r], -self._last_used[r]))
        src = max(range(self.max_batch), key=lambda r: lcp[r])
        n = min(lcp[src], len(ids) - 1)  # at least one token is run to get the next-token logits
        if lcp[src] > lcp[row] and n > 0:
            self.cache.copy_prefix(src, row, n)
        self._last_used[row] = next(self._clock)
        return row, max(n, 0)

    @torch.inference_mode()
    def _forward(self, rows: list[int], chunks: list[list[int]], all_logits: bool = False
                 ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Run new tokens `chunks` of cache `rows` (sorted) after what each row holds; return the logits (V,)
        at each chunk's last token and, with all_logits, (T_i, V) for every token."""
        starts = [len(self.ids[r]) for r in rows]
        lens = [len(c) for c in chunks]
        T = max(lens)
        ids = torch.zeros(len(rows), T, dtype=torch.long)
        for i, c in enumerate(chunks):
            ids[i, : len(c)] = torch.tensor(c)
        positions = torch.tensor(starts)[:, None] + torch.arange(T)[None, :]  # (B, T); pads past each end
        positions = positions.clamp_(max=self.capacity - 1)
        run = self._decode_model if self._decode_model is not None and T == 1 else self.model
        filled = max(s + n for s, n in zip(starts, lens))
        self.cache.select(rows, filled if run is self.model else self.capacity)  # compiled: fixed shapes
        with _headless(self.model) as head:
            h = run(ids.to(self.device), positions=positions.to(self.device), cache=self.cache)  # (B, T, d)
        last_idx = torch.tensor(lens, device=h.device) - 1
        last = head(h[torch.arange(len(rows), device=h.device), last_idx]).float()  # (B, V)
        full = [head(h[i, :n]).float() for i, n in enumerate(lens)] if all_logits else []
        for r, c in zip(rows, chunks):
            self.ids[r].extend(c)
        return list(last), full

    def generate_ids(self, prompt_ids: Sequence[int], params: SamplingParams | None = None
                     ) -> Iterator[StepOutput]:
        """Run one sequence to its end in a free row, yielding each StepOutput; the row is removed after."""
        row = self.add(prompt_ids, params)
        try:
            while True:
                (out,) = [o for o in self.step() if o.row == row]
                yield out
                if out.finished:
                    return
        finally:
            self.remove(row)


@contextlib.contextmanager
def _headless(model: nn.Module) -> Iterator[nn.Module]:
    """Run `model` without its vocabulary projection; yield the projection to apply where needed."""
    head = model.lm_head
    model.lm_head = nn.Identity()
    try:
        yield head
    finally:
        model.lm_head = head


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n

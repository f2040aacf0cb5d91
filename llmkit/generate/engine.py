"""Engine: token ids in, token ids out, for many requests at once over one static KV cache.

    row = engine.add(prompt_ids, params)  # reserve a free row, match the prefix cache (nothing runs yet)
    for out in engine.step(): ...         # prefill joining prompts, then one new token for every running row
    engine.remove(row)                    # the row leaves; its keys/values stay for prefix reuse

Notable choices:
- One KVCache with `max_batch` rows is allocated once; rows join (`add`) and leave (`remove`) between steps,
  which is all the server's continuous batching needs. A step (`step`) does three things:
  1. prefill: the prompts waiting in their rows run together, right-padded, in one forward of at most
     `prefill_chunk` tokens (padding included), oldest first; a longer prompt continues over the next
     steps, so running rows never wait for more than one chunk;
  2. sample: every row with fresh next-token logits (decoded last step, or whose prompt just finished) in
     one (B, V) sampler step with one host transfer (llmkit.generate.sampling); a request's first token thus
     comes in the step that finishes its prompt;
  3. decode: one forward of the new tokens of the rows that go on, each at its own position (B, 1).
- The model is never modified: prefill asks for hidden states (`return_hidden=True`) and applies
  `model.head` only where logits are needed (the last prompt position; every position for echo); decode
  takes the logits as they come. Another thread may use the same model meanwhile. The engine does not switch
  train/eval mode either: give it a model in eval mode (the loaders do).
- Attention reads only the filled prefix of the cache (`KVCache.select`), so a step costs what the sequences
  hold, not what the cache can hold. On the CPU, decode steps of Llama-shaped models run in C
  (llmkit/kernels/decode.c via llmkit.generate.native: every layer in one call, the model's own tensors, no
  compile; prefill chunks and speculative drafts run there too; `native=False` or LLMKIT_NATIVE=0 for
  PyTorch's ops; hooked models always run the PyTorch model). Otherwise compile=True runs decode steps
  through torch.compile (CUDA graphs on a GPU) over fixed shapes: the attended length is rounded up to a
  power of two (at least 256, masked beyond the filled slots), so a handful of graphs serve each batch size.
- `kv_dtype` picks the cache's storage: "auto" (the model's dtype), "bf16" / "fp16", or "int8" (a float32
  scale per head and position: 68 bytes instead of 256 per fp32 head vector of 64); the model computes in
  its own dtype either way. A model placed across devices (llmkit.placement) gets each layer's cache on
  that layer's device, and its logits are brought back to the engine's device (the embeddings') to sample.
- Prefix reuse: each row remembers the token ids whose keys/values it holds (`ids`). A new request goes to
  the free row sharing the longest prefix with it; if another row (even a running one) shares a longer
  prefix, those slots are copied over; if that row is still prefilling the shared part (n samples of one
  prompt), the copy waits for it. Only the rest is prefilled and `cached_tokens` says how much was saved.
  Echo requests (prompt logprobs) run their whole prompt.
- Weight version: remembered prefixes are tied to the model's weights (the sum of the parameters' and
  buffers' in-place version counters, and which tensors they are), checked on `add`; after an optimizer
  step (RL between rollouts) or a weight load, no stale keys/values are reused. Writes through `.data` are
  not counted by PyTorch: update weights in place under torch.no_grad() as optimizers do.
- Context policy: a prompt that leaves no room for one new token raises LlmkitError, or with
  `truncate=True` keeps its last tokens (leaving room for max_tokens, up to half the context). A row that
  fills the context finishes with reason "length". Sliding windows are handled by the model's mask.
- The engine never sees text: stop strings are the caller's (llmkit.generate.stop); stop ids are checked here.
- Per-row isolation: one request never fails the others. A row whose logits processor raises (a broken
  constraint), or whose sampling fails, finishes with finish_reason "error" and the exception in
  `StepOutput.error`; a forward (prefill chunk or decode) or sampler step that fails for the whole batch is
  undone and retried row by row, and only the rows that fail alone finish with the error. `step(rows)` runs
  a step for some rows only (a caller's own row-by-row retry). Callers raise `out.error` for their request.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from llmkit.errors import LlmkitError
from llmkit.generate.sampling import Processor, Sampler, SamplingParams, TokenLogprob, logprob_infos
from llmkit.model import KVCache
from llmkit.model.kv_cache import resolve_kv_dtype


@dataclass
class StepOutput:
    row: int
    token_id: int | None  # None only for a prefill-only request (max_tokens=0 with echo)
    logprob: TokenLogprob | None  # with params.logprobs
    finish_reason: str | None  # None while running; "stop" (stop id) | "length" (max_tokens or context)
    #                            | "error" (this row failed: see `error`)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # a row's first output, with params.echo
    error: Exception | None = None  # why the row failed (finish_reason "error"); the other rows go on

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Request:
    """One request in an engine row: what was asked, what came from the prefix cache, what came out."""

    prompt_ids: list[int]
    params: SamplingParams
    cached_tokens: int  # prompt tokens whose keys/values were reused (not prefilled)
    truncated: int = 0  # prompt tokens dropped by truncate=True
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # params.echo, once the prompt is prefilled
    error: Exception | None = None  # finish_reason "error": what failed
    logits: torch.Tensor | None = None  # (V,) float32 next-token logits, until sampled
    stop_ids: frozenset[int] = frozenset()
    order: int = 0  # arrival (prefill goes oldest first)
    wait: tuple[int, int] | None = None  # (row, n): copy n prefix slots from that row once it holds them
    _scored: list[TokenLogprob | None] = field(default_factory=lambda: [None], repr=False)  # echo so far
    drafts: list[int] = field(default_factory=list)  # speculative: the draft tokens the last decode ran
    draft_logits: torch.Tensor | None = None  # (len(drafts), V): logits after each draft token
    lookup: PromptLookup | DraftRow | None = field(default=None, repr=False)  # speculative: the drafter
    accepted: int = 0  # draft tokens accepted so far (speculative)
    drafted: int = 0  # draft tokens proposed so far


class Engine:
    def __init__(self, model: nn.Module, max_batch: int = 8, max_seq_len: int | None = None,
                 stop_ids: Sequence[int] = (), compile: bool = False, prefill_chunk: int = 256,
                 kv_dtype: str | torch.dtype | None = None, vocab_size: int | None = None,
                 speculative: int = 0, native: bool | None = None):
        """kv_dtype: the KV cache's storage dtype, "auto" / None (the model's dtype), "bf16", "fp16", "int8"
        (llmkit.model.kv_cache.resolve_kv_dtype). vocab_size: the tokenizer's size when the model's
        embedding has padding rows beyond it (Qwen2: 151,936 rows for 151,665 tokens); ids at or above it
        are never sampled, since no tokenizer could decode them. speculative: draft tokens per decode step
        by prompt lookup (0 = off; see `PromptLookup`), or by a draft model (`set_draft_model`). native:
        decode steps and prefill chunks through llmkit/kernels/decode.c when it can run this model
        (None / True; see llmkit.generate.native), False: always PyTorch."""
        if max_batch < 1 or prefill_chunk < 1 or speculative < 0:
            raise LlmkitError(f"max_batch ({max_batch}) and prefill_chunk ({prefill_chunk}) must be >= 1, "
                              f"speculative ({speculative}) >= 0")
        self.speculative = speculative
        self.lookup_min_n = 2  # shortest n-gram match that drafts (PromptLookup)
        self.draft: DraftModel | None = None  # a draft model instead of prompt lookup (`set_draft_model`)
        cfg = model.config
        self.model = model
        self.config = cfg
        self.capacity = min(max_seq_len or cfg.max_seq_len, cfg.max_seq_len)
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.stop_ids = set(stop_ids)  # the tokenizer's eos / end-of-turn ids
        p = next(model.parameters())
        self.device = p.device
        self.dtype = p.dtype if p.dtype.is_floating_point else torch.float32  # compute dtype
        dtype = resolve_kv_dtype(kv_dtype, self.dtype)
        devices = getattr(model, "layer_devices", None)  # placed across devices (llmkit.placement)
        self.cache = KVCache(cfg, max_batch, self.capacity, device=p.device, dtype=dtype,
                             devices=devices[:-1] if devices else None)
        self.sampler = Sampler(max_batch, cfg.vocab_size, p.device)
        self.n_tokens = vocab_size if vocab_size is not None and vocab_size < cfg.vocab_size else None
        self.requests: list[Request | None] = [None] * max_batch
        self.ids: list[list[int]] = [[] for _ in range(max_batch)]  # token ids whose K/V each row holds
        self._weights = [None] * max_batch  # weight version each row's K/V was computed with
        self._last_used = [0] * max_batch
        self._clock = itertools.count(1)
        self._decoded: tuple[list[int], torch.Tensor] | None = None  # rows, logits (B, V) of the last decode
        self._native = None
        if native is not False:
            from llmkit.generate.native import NativeDecode

            self._native = NativeDecode.build(model, self.cache)
        self._compiled = None
        if compile and self._native is None:
            # Shapes are fixed per (batch, attention bucket): a handful of graphs (recompile_limit). The
            # model's own attributes are not guarded: checking every module on each step cost ~1.5 ms per
            # token on CPU; swap modules (LoRA, quantization) before building the engine, not after. Without
            # those guards another model's graphs would match too: this engine's graphs are its own
            # (isolate_recompiles).
            how = {"mode": "reduce-overhead"} if p.is_cuda else {  # CUDA graphs; torch takes mode or options
                "options": {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}}
            self._compiled = torch.compile(model, dynamic=False, recompile_limit=64, isolate_recompiles=True,
                                           **how)

    @property
    def decode_path(self) -> str:
        """How decode steps run: "native" (llmkit/kernels/decode.c), "compiled" (torch.compile) or "eager"."""
        return "native" if self._native is not None else "compiled" if self._compiled is not None else "eager"

    # ------------------------------------------------------------------ rows
    @property
    def running(self) -> list[int]:
        """Rows whose request is not finished (prefilling or generating)."""
        return [r for r, q in enumerate(self.requests) if q is not None and q.finish_reason is None]

    @property
    def free_rows(self) -> int:
        return sum(q is None for q in self.requests)

    def add(self, prompt_ids: Sequence[int], params: SamplingParams | None = None, *,
            processors: Sequence[Processor] = (), sample_index: int = 0, truncate: bool = False) -> int:
        """Reserve a free row for a request and match its prompt against the prefix cache; the model runs
        in the next step()s. Returns the row (`request(row).cached_tokens` is known at once).

        processors: per-row logits processors `proc(generated_ids, logits (V,)) -> logits`, applied before
        penalties and temperature. sample_index: sample i of n (a seeded request draws with seed + i)."""
        params = (params or SamplingParams()).validate()
        ids, dropped = self._fit_context([int(i) for i in prompt_ids], params, truncate)
        if any(not 0 <= i < self.config.vocab_size for i in ids):
            raise LlmkitError(f"prompt holds token ids outside the vocabulary [0, {self.config.vocab_size})")
        row, cached, wait = self._reserve(ids, reuse=not params.echo)
        stops = frozenset(() if params.ignore_eos else self.stop_ids) | frozenset(params.stop_ids)
        self.requests[row] = Request(ids, params, cached, dropped, stop_ids=stops, order=next(self._clock),
                                     wait=wait, lookup=self._lookup(row))
        self.sampler.start(row, params, ids, sample_index, processors)
        return row

    def _lookup(self, row: int) -> PromptLookup | DraftRow | None:
        if not self.speculative:
            return None
        return DraftRow(self.draft, row) if self.draft is not None else PromptLookup(min_n=self.lookup_min_n)

    def set_draft_model(self, model: nn.Module | None) -> None:
        """Draft speculative tokens with `model` (a smaller model with the same tokenizer, or this model
        quantized harder; None: prompt lookup again). It gets its own engine (this one's rows and capacity)
        and drafts greedily; `speculative` says how many tokens per step (set it too)."""
        if model is None:
            self.draft = None
            return
        if model.config.vocab_size != self.config.vocab_size:
            raise LlmkitError(f"the draft model's vocabulary ({model.config.vocab_size} ids) is not this "
                              f"model's ({self.config.vocab_size}): it needs the same tokenizer")
        self.draft = DraftModel(model, self.max_batch, self.capacity, self.prefill_chunk)

    def request(self, row: int) -> Request:
        q = self.requests[row]
        if q is None:
            raise LlmkitError(f"engine row {row} holds no request")
        return q

    def remove(self, row: int) -> None:
        """Free the row (finished or not); the keys/values it holds stay for prefix reuse."""
        self.requests[row] = None
        self._decoded = None
        self._release_waiters(row)

    def _release_waiters(self, row: int) -> None:
        """Rows waiting for `row`'s prefix (which it will not finish) take what it holds now."""
        for r, q in enumerate(self.requests):
            if q is not None and q.wait is not None and q.wait[0] == row:
                n = min(q.wait[1], len(self.ids[row]))
                if n > len(self.ids[r]):
                    self.cache.copy_prefix(row, r, n)
                    self.ids[r] = q.prompt_ids[:n]
                q.wait, q.cached_tokens = None, len(self.ids[r])

    @torch.inference_mode()
    def step(self, rows: Sequence[int] | None = None) -> list[StepOutput]:
        """Prefill waiting prompts (up to `prefill_chunk` tokens), sample one token for every row with fresh
        logits, then decode the rows that go on. One StepOutput per sampled (or prefill-only) row; a row
        still prefilling a long prompt has none. `rows`: step only these rows (default: all).

        A row that fails (its processor, its sampling, or its forward when retried alone) gets a StepOutput
        with finish_reason "error" and `error` set; the other rows are unaffected."""
        only = None if rows is None else set(rows)
        outs = self._prefill(only)
        rows = [r for r in self.running
                if self.requests[r].logits is not None and (only is None or r in only)]
        if not rows:
            return outs
        batch = self._decoded
        logits = batch[1] if batch is not None and batch[0] == rows else \
            torch.stack([self.requests[r].logits for r in rows])  # (B, V)
        self._decoded = None
        self._mask_padding(logits)
        errors: dict[int, Exception] = {}
        tokens, infos = self.sampler.sample(rows, logits, [self.requests[r].output_ids for r in rows], errors)
        feed: list[int] = []
        sampled: dict[int, StepOutput] = {}
        for r, token, info in zip(rows, tokens, infos):
            q = self.requests[r]
            first = not q.output_ids
            q.logits = None
            if r in errors:
                outs.append(self._fail(r, errors[r], first))
                continue
            out = sampled[r] = self._emit(r, token, info, first)
            outs.append(out)
            if q.drafts:  # speculative: go on along the drafts while the sampled token is the draft
                out = self._verify(r, token, outs)
                if out is not None:
                    sampled[r] = out
            if sampled[r].finish_reason is None:
                feed.append(r)
        for r, e in self._decode(feed).items():  # the token was sampled, but the row cannot go on
            self._fail(r, e)
            sampled[r].finish_reason, sampled[r].error = "error", e
        return outs

    def _mask_padding(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, V) logits with the embedding's padding rows (ids the tokenizer lacks) at -inf, in place."""
        if self.n_tokens is not None:
            logits[:, self.n_tokens:] = -math.inf
        return logits

    def _emit(self, r: int, token: int, info: TokenLogprob | None, first: bool) -> StepOutput:
        """Record a sampled token of row r and decide whether the row finishes."""
        q = self.requests[r]
        q.output_ids.append(token)
        if token in q.stop_ids:
            q.finish_reason = "stop"
        elif len(q.output_ids) >= q.params.max_tokens or len(self.ids[r]) >= self.capacity:
            q.finish_reason = "length"
        return StepOutput(r, token, info, q.finish_reason, q.prompt_logprobs if first else None)

    def _verify(self, r: int, token: int, outs: list[StepOutput]) -> StepOutput | None:
        """Speculative decoding, after `token` was sampled from the logits before the drafts: while it equals
        the next draft, the logits after that draft are the right ones, so the next token is sampled from
        them, as plain decoding would (same sampler, same random draws: the output is distributed exactly as
        without drafts, and equal to it for greedy and seeded requests). The cache then forgets the keys and
        values of the drafts not taken. Appends the new StepOutputs to `outs`; returns the row's last."""
        q = self.requests[r]
        drafts, logits, last = q.drafts, q.draft_logits, None
        q.drafts, q.draft_logits = [], None
        j = 0
        while q.finish_reason is None and j < len(drafts) and token == drafts[j]:
            errors: dict[int, Exception] = {}
            lg = self._mask_padding(logits[j : j + 1])  # (1, V)
            tokens, infos = self.sampler.sample([r], lg, [q.output_ids], errors)
            j += 1
            if r in errors:
                last = self._fail(r, errors[r])
                outs.append(last)
                break
            token = tokens[0]
            last = self._emit(r, token, infos[0], False)
            outs.append(last)
        q.accepted += j
        if j < len(drafts):  # slots [n - rejected, n) hold drafts that were not taken
            del self.ids[r][len(self.ids[r]) - (len(drafts) - j):]
        return last

    def _drafts(self, r: int) -> list[int]:
        """Draft tokens for row r's next decode (prompt lookup or a draft model), cut to what the row may
        still produce."""
        q = self.requests[r]
        if not self.speculative or q.lookup is None:
            return []
        room = min(self.speculative, q.params.max_tokens - len(q.output_ids) - 1,
                   self.capacity - len(self.ids[r]) - 2)
        if room <= 0:
            return []
        return q.lookup.draft(q.prompt_ids, q.output_ids, room)

    def _decode(self, feed: list[int]) -> dict[int, Exception]:
        """One forward of the last sampled token of `feed` rows (and their draft tokens when speculative),
        leaving their next-token logits; if it fails, each row runs alone. Returns the rows that failed alone
        and why."""
        if not feed:
            return {}
        drafts = [self._drafts(r) for r in feed]
        try:
            out = self._run(feed, [[self.requests[r].output_ids[-1], *d] for r, d in zip(feed, drafts)])
        except Exception as e:  # nothing was recorded: the rows still hold what they held
            if len(feed) == 1:
                return {feed[0]: e}
            return {r: err for one in feed for r, err in self._decode([one]).items()}
        if out.dtype != torch.float32 or out.device != self.device:  # the head may sit elsewhere (placement)
            out = out.float().to(self.device)  # (B, T, V)
        logits = out[:, 0]  # (B, V)
        self._decoded = (feed, logits)
        for i, (r, d) in enumerate(zip(feed, drafts)):
            q = self.requests[r]
            q.logits = logits[i]
            if d:
                q.drafts, q.draft_logits, q.drafted = d, out[i, 1 : 1 + len(d)], q.drafted + len(d)
        return {}

    def _fail(self, row: int, error: Exception, first: bool = False) -> StepOutput:
        """Finish `row` with finish_reason "error"; its StepOutput."""
        q = self.requests[row]
        q.finish_reason, q.error, q.logits = "error", error, None
        self._release_waiters(row)
        return StepOutput(row, None, None, "error", q.prompt_logprobs if first else None, error=error)

    def generate_ids(self, prompt_ids: Sequence[int], params: SamplingParams | None = None
                     ) -> Iterator[StepOutput]:
        """Run one request to its end in a free row, yielding each StepOutput; the row is removed after."""
        row = self.add(prompt_ids, params)
        try:
            while True:
                for out in self.step():
                    if out.row == row:
                        if out.error is not None:
                            raise out.error
                        yield out
                        if out.finished:
                            return
        finally:
            self.remove(row)

    # ------------------------------------------------------------------ admission
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
        keep = max(min(cap - params.max_tokens, cap - 1), cap // 2)
        return ids[-keep:], len(ids) - keep

    def _reserve(self, ids: list[int], reuse: bool) -> tuple[int, int, tuple[int, int] | None]:
        """Pick a free row for prompt `ids` and set up its prefix: (row, cached tokens, pending copy)."""
        free = [r for r, q in enumerate(self.requests) if q is None]
        if not free:
            raise LlmkitError(f"all {self.max_batch} engine rows are busy; remove a finished request first",
                              status=503)
        version = self._weights_version()
        if self._native is not None and self._native.stale():  # modules swapped since: a new plan, or none
            from llmkit.generate.native import NativeDecode

            self._native = NativeDecode.build(self.model, self.cache)
        same = [reuse and w == version for w in self._weights]
        held = [_common_prefix(h, ids) if ok else 0 for h, ok in zip(self.ids, same)]
        # a row still prefilling will hold its whole prompt: count that prefix too (the copy then waits)
        will = [max(h, _common_prefix(q.prompt_ids, ids)) if ok and q is not None and q.finish_reason is None
                else h for q, h, ok in zip(self.requests, held, same)]
        row = max(free, key=lambda r: (held[r], -self._last_used[r]))
        src = max(range(self.max_batch), key=lambda r: (will[r], held[r]))
        n = min(will[src], len(ids) - 1)  # at least one token runs: the next-token logits
        keep, wait = min(held[row], n), None
        self.ids[row] = ids[:keep]
        if n > keep and held[src] >= n:
            self.cache.copy_prefix(src, row, n)
            self.ids[row] = ids[:n]
        elif n > keep:
            wait = (src, n)
        self._weights[row] = version
        self._last_used[row] = next(self._clock)
        return row, n, wait

    def _weights_version(self) -> int:
        """Changes whenever a parameter or buffer is updated in place or replaced."""
        ts = [*self.model.parameters(), *self.model.buffers()]
        return hash((sum(t._version for t in ts if not t.is_inference()),
                     tuple((id(t), t.data_ptr()) for t in ts)))

    # ------------------------------------------------------------------ prefill
    def _prefill(self, only: set[int] | None = None) -> list[StepOutput]:
        """Run waiting prompts, oldest first, in one forward of at most `prefill_chunk` padded tokens; a
        second forward (in what is left of that budget) runs the rows whose shared prefix the first made."""
        outs: list[StepOutput] = []
        budget, first = self.prefill_chunk, True
        while budget > 0:
            copied = self._copy_waiting()
            todo = sorted((q.order, r) for r, q in enumerate(self.requests)
                          if q is not None and q.finish_reason is None and q.wait is None
                          and len(self.ids[r]) < len(q.prompt_ids)
                          and (first or r in copied) and (only is None or r in only))
            plan: list[int] = []
            T = 0  # chunk length of this forward: len(plan) * T <= budget
            for _, r in todo:
                t = max(T, min(len(self.requests[r].prompt_ids) - len(self.ids[r]), budget))
                if (len(plan) + 1) * t <= budget:
                    T = t
                elif (len(plan) + 1) * T > budget:
                    break
                plan.append(r)
            if not plan:
                break
            budget, first = budget - len(plan) * T, False
            outs += self._prefill_chunk(sorted(plan), T)
        return outs

    def _copy_waiting(self) -> set[int]:
        """Copy the shared prefix to the rows waiting for it once their source holds it; return those rows."""
        done = set()
        for r, q in enumerate(self.requests):
            if q is not None and q.wait is not None and len(self.ids[q.wait[0]]) >= q.wait[1]:
                self.cache.copy_prefix(q.wait[0], r, q.wait[1])
                self.ids[r], q.wait = q.prompt_ids[: q.wait[1]], None
                done.add(r)
        return done

    def _prefill_chunk(self, rows: list[int], T: int) -> list[StepOutput]:
        """Run the next (at most T) prompt tokens of `rows`; set the next-token logits of finished prompts.
        If that fails, what it did is undone and each row runs alone; a row that fails alone finishes with
        the error."""
        saved = [(len(self.ids[r]), len(self.requests[r]._scored)) for r in rows]
        try:
            return self._prefill_rows(rows, T)
        except Exception as e:
            for r, (n_ids, n_scored) in zip(rows, saved):
                q = self.requests[r]
                del self.ids[r][n_ids:]
                del q._scored[n_scored:]
                q.prompt_logprobs = q.logits = q.finish_reason = None
            if len(rows) == 1:
                return [self._fail(rows[0], e)]
            return [o for r in rows for o in self._prefill_chunk([r], T)]

    def _prefill_rows(self, rows: list[int], T: int) -> list[StepOutput]:
        starts = [len(self.ids[r]) for r in rows]
        chunks = [self.requests[r].prompt_ids[s : s + T] for r, s in zip(rows, starts)]
        h = self._run(rows, chunks, hidden=True)  # (B, T, d)
        outs, last = [], []
        for i, (r, s, c) in enumerate(zip(rows, starts, chunks)):
            q = self.requests[r]
            done = s + len(c) == len(q.prompt_ids)
            if q.params.echo:  # position p predicts prompt token p + 1
                m = len(c) - done
                if m:
                    want = torch.tensor(q.prompt_ids[s + 1 : s + 1 + m], device=h.device)  # (m,)
                    q._scored += logprob_infos(self.model.head(h[i, :m]), want, q.params.logprobs or 0)
                if done:
                    q.prompt_logprobs = q._scored
            if done and q.params.max_tokens == 0:  # prefill only: the prompt's logprobs were the point
                q.finish_reason = "length"
                outs.append(StepOutput(r, None, None, "length", q.prompt_logprobs))
            elif done:
                last.append((i, r, len(c) - 1))
        if last:
            at = torch.tensor([(i, p) for i, _, p in last], device=h.device)  # (k, 2): batch row, position
            logits = self.model.head(h[at[:, 0], at[:, 1]]).float().to(self.device)  # (k, V)
            self._decoded = None  # these rows' logits no longer come from the last decode
            for (_, r, _), lg in zip(last, logits):
                self.requests[r].logits = lg
        return outs

    def _run(self, rows: list[int], chunks: list[list[int]], hidden: bool = False) -> torch.Tensor:
        """Run token `chunks` of cache `rows` (ascending) after what each row holds; return the hidden states
        (B, T, d) or (hidden=False) the logits (B, T, V). Chunks are right-padded to the longest."""
        starts = [len(self.ids[r]) for r in rows]
        T = max(map(len, chunks))
        cap = self.capacity
        padded = [c + [0] * (T - len(c)) for c in chunks]  # (B, T)
        at = [[min(s + j, cap - 1) for j in range(T)] for s in starts]  # (B, T) positions
        if self._native is not None and self._native.takes(T, hidden) and not self._native.hooked():
            # the layers in C: prefill chunks, each row's token (and drafts), padding included, as the
            # PyTorch path runs them; plain lists in (a decode token's few microseconds count)
            out = self._native([t for c in padded for t in c], [r for r in rows for _ in range(T)],
                               [p for a in at for p in a], hidden=hidden)
            out = out.view(len(rows), T, -1)  # (B, T, V), or (B, T, d) when hidden
        else:
            x = torch.tensor(padded + at).to(self.device)  # (2B, T): ids, then positions (one copy)
            ids, positions = x[: len(rows)], x[len(rows) :]
            compiled = self._compiled is not None and T == 1 and not hidden
            # compiled: fixed shapes, the attended length rounded up to a power of two (>= 256, masked beyond)
            n = attention_bucket(max(starts) + T) if compiled else max(starts) + T
            self.cache.select(rows, min(cap, n))
            if compiled:
                out = self._compiled(ids, positions=positions, cache=self.cache)
            else:
                out = self.model(ids, positions=positions, cache=self.cache, return_hidden=hidden)
        for r, c in zip(rows, chunks):
            self.ids[r].extend(c)
        return out


class PromptLookup:
    """Prompt-lookup drafting (Saxena 2023; vLLM's "ngram" speculative decoding): the last n tokens of the
    text (prompt + output so far; n = 3, then 2; a single token matches too often by chance: on an open
    chat, drafting after 1-token matches made SmolLM2 16 % slower, and 2-grams at least 1.37x faster) are
    looked up earlier in the text, and the tokens that followed them there are the drafts. Free (no draft
    model) and right exactly when the answer copies its prompt: summaries, rewrites, code edits,
    extraction. The index maps each n-gram to where its latest earlier occurrence ends; it grows with the
    text (each token indexed once)."""

    def __init__(self, max_n: int = 3, min_n: int = 2):
        self.max_n, self.min_n = max_n, min_n
        self.ends: dict[tuple[int, ...], int] = {}  # n-gram (any n) -> end of its latest occurrence
        self.done = 0  # text positions indexed: n-grams ending before `done`

    def draft(self, prompt: list[int], output: list[int], k: int) -> list[int]:
        text = prompt + output if output else prompt
        L = len(text)
        for end in range(max(self.done, 1), L):  # index the n-grams that end before the last token
            for n in range(1, min(self.max_n, end) + 1):
                self.ends[tuple(text[end - n : end])] = end
        self.done = max(self.done, L)
        for n in range(min(self.max_n, L - 1), self.min_n - 1, -1):
            at = self.ends.get(tuple(text[L - n :]))
            if at is not None:
                return text[at : at + k]
        return []


class DraftModel:
    """Draft-model drafting (Leviathan et al. 2023; Chen et al. 2023): a cheaper model with the same
    tokenizer proposes the next k tokens, greedily, and the target model checks them all in one forward
    (Engine._verify). Greedy drafts are a deterministic function of the text, so the target's output keeps
    exactly its own distribution, whatever the draft model (a poor one only lowers the acceptance rate).

    The draft model runs in an Engine of its own (native decode where it can), one row per target row. Each
    call keeps the longest prefix its row already holds (drafts the target took stay cached; the others are
    forgotten) and runs only the rest, then k - 1 decode steps."""

    def __init__(self, model: nn.Module, max_batch: int, capacity: int, prefill_chunk: int = 256):
        self.model = model
        self.engine = Engine(model, max_batch=max_batch, max_seq_len=capacity, prefill_chunk=prefill_chunk)

    @torch.inference_mode()
    def draft(self, row: int, text: list[int], k: int) -> list[int]:
        eng = self.engine
        held = eng.ids[row]
        n = 0
        stop = min(len(held), len(text) - 1)  # the last token is always fed again: its logits are needed
        while n < stop and held[n] == text[n]:
            n += 1
        del held[n:]
        feed, step = text[n:], eng.prefill_chunk
        for i in range(0, len(feed), step):
            h = eng._run([row], [feed[i : i + step]], hidden=True)  # (1, T, d)
        token = int(self.model.head(h[0, -1]).argmax())
        out = [token]
        while len(out) < k and len(held) < eng.capacity - 1:
            token = int(eng._run([row], [[token]])[0, -1].argmax())
            out.append(token)
        return out


class DraftRow:
    """One request's view of a DraftModel: the drafter Request.lookup holds (the PromptLookup interface)."""

    def __init__(self, draft: DraftModel, row: int):
        self.shared, self.row = draft, row

    def draft(self, prompt: list[int], output: list[int], k: int) -> list[int]:
        return self.shared.draft(self.row, prompt + output, k)


def attention_bucket(n: int) -> int:
    """The key length a compiled decode step attends for n filled slots: a power of two, at least 256."""
    return max(256, 1 << (n - 1).bit_length())


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the common prefix of two id lists (list slices compare at C speed; binary search)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if a[:mid] == b[:mid] else (lo, mid)
    return lo

"""What the endpoints share, between the thin FastAPI routes and the scheduler.

`Service` holds the model's tokenizer, the scheduler, the response store and the metrics; `Router` maps
each served model id (the base, and each LoRA adapter served beside it) to its Service, and the routes
hand the picked Service to the one endpoint function of their route. An endpoint
module (completions.py, chat.py, responses.py, tokens.py) turns a validated request into token ids and
per-row logits processors (llmkit.generate.request: the same code as `llm.chat`), submits one job per
sample, and turns the jobs' events into OpenAI objects or SSE chunks through `Service.run` / `Service.pump`.
Each generated sequence is a `llmkit.generate.request.Completion` (text deltas, stop strings, logprobs,
tool calls), the object the Python API uses too.

Notable choices:
- `max_tokens` omitted on chat / responses means "the rest of the context"; a prompt plus `max_tokens`
  beyond the context is a 400, as OpenAI and vLLM do.
- Sampling fields a request leaves unset take the model's generation defaults (`llm.generation_defaults`);
  penalties stay off unless asked (OpenAI semantics).
- n > 1 submits n jobs with seeds `seed + i`; they share the prefill through the engine's prefix reuse.
- Usage counts the prompt once per prompt; `cached_tokens` is what the first sample reused.
- CPU work that can take a while (chat rendering, tokenizing, SQLite) runs in a worker thread
  (`Service.offload`), never on the event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from llmkit.errors import LlmkitError
from llmkit.generate.request import Completion
from llmkit.generate.sampling import TokenLogprob
from llmkit.serve import protocol as P
from llmkit.serve.scheduler import Job, Prefilled, Scheduler, TokenOut

log = logging.getLogger("llmkit.serve")


def new_id(prefix: str) -> str:
    if prefix in ("cmpl", "chatcmpl"):
        return f"{prefix}-{uuid.uuid4().hex[:24]}"
    return f"{prefix}_{uuid.uuid4().hex}"


def sse(obj: Any, event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class Service:
    """One served model id: its scheduler (lane) and what its endpoints share (tokenizer, sampling
    defaults, response store, metrics). A served LoRA adapter is a Service of its own (`parent` = the base
    id); the tokenizer, defaults, store and metrics are the base's."""

    def __init__(self, llm, scheduler: Scheduler, *, store=None, metrics=None, model_name: str | None = None,
                 request_timeout: float = 600.0, root: str | None = None, parent: str | None = None):
        self.tokenizer = llm.tokenizer
        self.defaults: dict[str, Any] = dict(getattr(llm, "generation_defaults", None) or {})
        self.scheduler = scheduler
        self.store = store
        self.metrics = metrics
        self.model_name = model_name or llm.name
        self.root, self.parent = root, parent  # /v1/models card fields (vLLM's)
        self.context = scheduler.backend.max_seq_len
        self.timeout = request_timeout
        self.created = int(time.time())

    # ------------------------------------------------------------------ requests in
    def check_model(self, model: str | None) -> None:
        if model and model != self.model_name:
            raise LlmkitError(f"The model `{model}` does not exist (this server serves `{self.model_name}`)",
                              status=404, code="model_not_found", param="model")

    def card(self) -> dict[str, Any]:
        """This model's /v1/models entry."""
        return P.model_card(self.model_name, self.created, self.context, self.defaults, root=self.root,
                            parent=self.parent)

    def budget(self, n_prompt: int, max_tokens: int | None, param: str = "max_tokens") -> int:
        """max_tokens checked against the context (None = the rest of the context)."""
        room = self.context - n_prompt
        if max_tokens is None:
            if room < 1:
                raise LlmkitError(f"This model's maximum context length is {self.context} tokens; the prompt "
                                  f"has {n_prompt}. Shorten the prompt.", code="context_length_exceeded",
                                  param="messages")
            return room
        if n_prompt + max_tokens > self.context:
            raise LlmkitError(
                f"This model's maximum context length is {self.context} tokens. However, you requested "
                f"{n_prompt + max_tokens} tokens ({n_prompt} in the prompt, {max_tokens} in the completion). "
                f"Reduce the prompt or {param}.", code="context_length_exceeded", param=param)
        return max_tokens

    def sampling(self, req, max_tokens: int, n: int = 1, seed: int | None = None) -> list[Any]:
        """SamplingParams of each of n samples (seeds seed + i), unset fields from the model's defaults."""
        return [req.to_sampling_params(max_tokens, defaults=self.defaults).replace(
            seed=None if seed is None else seed + i) for i in range(n)]

    async def offload(self, fn: Callable, *args, **kw) -> Any:
        """Run CPU work (rendering, tokenizing, SQLite) in a worker thread, off the event loop."""
        return await asyncio.to_thread(fn, *args, **kw)

    # ------------------------------------------------------------------ text out
    def token_str(self, token_id: int) -> str:
        return self.tokenizer.id_to_text(token_id)

    def chat_logprob(self, lp: TokenLogprob) -> dict[str, Any]:
        def entry(t: int, v: float) -> dict[str, Any]:
            return {"token": self.token_str(t), "logprob": v, "bytes": list(self.tokenizer.id_to_bytes(t))}

        return {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}

    def usage(self, n_prompt: int, n_completion: int, cached: int) -> dict[str, Any]:
        if self.metrics:
            self.metrics.tokens(n_prompt, n_completion, cached)
        return {"prompt_tokens": n_prompt, "completion_tokens": n_completion,
                "total_tokens": n_prompt + n_completion, "prompt_tokens_details": {"cached_tokens": cached}}

    # ------------------------------------------------------------------ driving jobs
    async def run(self, jobs: list[Job], queue: asyncio.Queue, outs: dict[int, Completion],
                  on_token: Callable[[int, TokenOut, str, list[TokenLogprob]], None] | None = None) -> None:
        """Feed every event of `jobs` to its Completion (outs[index]) until all are finished; after each
        token, on_token(index, event, text delta, logprob entries shown). Cancels what is left on exit (error,
        timeout, client gone, all choices done)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        live = {j.index for j in jobs}
        by_index = {j.index: j for j in jobs}
        first = True
        try:
            while live:
                if queue.empty():  # not asyncio.wait_for: before 3.12 it can swallow a cancellation
                    getter = asyncio.ensure_future(queue.get())
                    try:
                        done, _ = await asyncio.wait({getter}, timeout=max(deadline - loop.time(), 0.001))
                    finally:
                        if not getter.done():
                            getter.cancel()
                    if not done:
                        raise LlmkitError(f"request timed out after {self.timeout:g} s", status=408,
                                          code="timeout")
                    idx, item = getter.result()
                else:
                    idx, item = queue.get_nowait()
                if isinstance(item, Exception):
                    raise item
                if idx not in live:  # a token that raced with the cancel of a finished choice
                    continue
                out = outs[idx]
                if isinstance(item, Prefilled):
                    out.cached_tokens = item.cached_tokens
                    continue
                if first and self.metrics:
                    first = False
                    self.metrics.observe_ttft(time.monotonic() - by_index[idx].submitted)
                if item.prompt_logprobs is not None:
                    out.prompt_logprobs = item.prompt_logprobs
                delta, shown = out.push(item.token_id, item.logprob, item.finish_reason)
                if on_token is not None:
                    on_token(idx, item, delta, shown)
                if out.finished:
                    live.discard(idx)
                    by_index[idx].cancel()  # frees the row if a stop string ended it early
        finally:
            self.scheduler.cancel_jobs(jobs)  # waiting ones leave the queue at once, running rows are freed
            if self.metrics:
                self.metrics.observe_latency(time.monotonic() - jobs[0].submitted)

    async def pump(self, jobs: list[Job], queue: asyncio.Queue, outs: dict[int, Completion],
                   on_token: Callable, pending: list[str]) -> AsyncIterator[str]:
        """Run the jobs in a task and yield the SSE pieces `on_token` appends to `pending`, as they come.

        An error ends the stream with an OpenAI error object (the HTTP status is already sent)."""
        wake = asyncio.Event()

        def handler(*args) -> None:
            on_token(*args)
            wake.set()

        task = asyncio.ensure_future(self.run(jobs, queue, outs, handler))
        try:
            while True:
                waiter = asyncio.ensure_future(wake.wait())
                try:
                    await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiter.cancel()
                wake.clear()
                while pending:
                    yield pending.pop(0)
                if task.done():
                    break
            exc = task.exception()
            if exc is not None:
                yield sse(P.error_body(exc)[1])
        finally:
            if not task.done():
                task.cancel()
                self.scheduler.cancel_jobs(jobs)


class Router:
    """The served model ids -> their Service: the base first, then each LoRA adapter (llmkit.serve.adapters).

    `pick(model)` is the one place a request's `model` is resolved: empty or missing -> the base (as before
    adapters existed), a served id -> its Service, anything else -> 404 model_not_found (param "model")."""

    def __init__(self, services: list[Service]):
        self.base = services[0]
        self.services = {s.model_name: s for s in services}

    def pick(self, model: str | None) -> Service:
        if not model:
            return self.base
        svc = self.services.get(model)
        if svc is None:
            served = ", ".join(f"`{m}`" for m in self.services)
            raise LlmkitError(f"The model `{model}` does not exist (this server serves {served})",
                              status=404, code="model_not_found", param="model")
        return svc

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [s.card() for s in self.services.values()]}

    @property
    def schedulers(self) -> list[Scheduler]:
        return [s.scheduler for s in self.services.values()]


"""What each OpenAI endpoint does, between the thin FastAPI routes and the scheduler.

`Service` turns a validated request into token ids (the model's chat template via `render_chat`, tools
through `llmkit.serve.tools`, a JSON constraint for `response_format` / forced tool calls), submits one
job per sample to the `Scheduler`, and turns the jobs' tokens back into OpenAI objects or SSE chunks.
Text comes from the engine's `TextStream` (UTF-8 safe detokenizing, stop strings held back and cut);
the engine itself only sees ids.

Notable choices:
- `max_tokens` omitted on chat / responses means "the rest of the context"; a prompt plus `max_tokens`
  beyond the context is a 400, as OpenAI and vLLM do.
- n > 1 submits n jobs with seeds `seed + i`; they share the prefill through the engine's prefix reuse.
- Usage counts the prompt once per prompt; `cached_tokens` is what the first sample reused.
- Logprobs are the model's own distribution (the engine's choice). For constrained rows they are taken
  after the constraint's mask, i.e. over the tokens that were allowed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import torch

from llmkit.serve import protocol as P
from llmkit.serve import tools as T
from llmkit.serve.constrain import JsonLogitsProcessor, token_texts
from llmkit.serve.protocol import ApiError
from llmkit.serve.scheduler import Prefilled, Scheduler, TokenOut

log = logging.getLogger("llmkit.serve")


def new_id(prefix: str) -> str:
    if prefix in ("cmpl", "chatcmpl"):
        return f"{prefix}-{uuid.uuid4().hex[:24]}"
    return f"{prefix}_{uuid.uuid4().hex}"


def _chain(steps: list[Callable]) -> Callable:
    def run(generated: list[int], logits: torch.Tensor) -> torch.Tensor:
        for f in steps:
            logits = f(generated, logits)
        return logits

    return run


def sse(obj: Any, event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class Choice:
    """One generated sequence: ids -> text (stop strings cut), logprob entries, finish reason.

    With `hold_tools`, content after a `<tool_call>` marker is kept back from the stream so that the
    call can be parsed and sent as `tool_calls` once the sequence ends.
    """

    def __init__(self, tokenizer, stops: list[str], hold_tools: bool = False):
        from llmkit.generate import StopMatcher, TextStream

        self.stream = TextStream(tokenizer, stops, skip_ids=sorted(tokenizer.stop_ids))
        self.stop_ids = tokenizer.stop_ids
        self.hold = StopMatcher([T.TOOL_OPEN]) if hold_tools else None
        self.text = ""
        self.n_tokens = 0
        self.tokens: list[TokenOut] = []  # generated tokens shown to the user (stop ids left out)
        self.finish_reason: str | None = None

    def push(self, out: TokenOut) -> tuple[str, list[TokenOut]]:
        """Take one token; return (text to stream now, its logprob entries)."""
        self.n_tokens += 1
        new = [] if out.token_id in self.stop_ids else [out]
        self.tokens += new
        delta, stopped = self.stream.push(out.token_id)
        if stopped:
            self.finish_reason = "stop"
        elif out.finish_reason:
            delta += self.stream.finish()
            self.finish_reason = out.finish_reason
        self.text += delta
        if self.hold is not None:
            delta, _ = self.hold.push(delta)
            if self.finish_reason:
                delta += self.hold.flush()
        return delta, new


def finish_choice(c: Choice, forced: str | None, hold: bool) -> tuple[str | None, list[dict[str, Any]], str]:
    """(content, tool_calls, finish_reason) of a finished choice: a forced call is the whole output's JSON;
    with tools in "auto" mode, <tool_call> blocks are parsed out of the text."""
    if forced:
        try:
            call = json.loads(c.text)
            return None, [T.tool_call(call["name"], call.get("arguments", {}))], "tool_calls"
        except (json.JSONDecodeError, KeyError, TypeError):
            return c.text, [], c.finish_reason or "length"
    if hold:
        content, calls = T.parse_tool_calls(c.text)
        if calls:
            return content or None, calls, "tool_calls"
    return c.text, [], c.finish_reason or "length"


class Service:
    def __init__(self, llm, scheduler: Scheduler, *, store=None, metrics=None, model_name: str | None = None,
                 request_timeout: float = 600.0):
        self.tokenizer = llm.tokenizer
        self.scheduler = scheduler
        self.store = store
        self.metrics = metrics
        self.model_name = model_name or llm.name
        self.context = scheduler.backend.max_seq_len
        self.timeout = request_timeout
        self.created = int(time.time())
        self._template_tools: bool | None = None

    # ------------------------------------------------------------------ shared helpers
    def check_model(self, model: str | None) -> None:
        if model and model != self.model_name:
            raise ApiError(f"The model `{model}` does not exist (this server serves `{self.model_name}`)",
                           status=404, code="model_not_found", param="model")

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                            "owned_by": "llmkit", "max_model_len": self.context}]}

    def budget(self, n_prompt: int, max_tokens: int | None, param: str = "max_tokens") -> int:
        """max_tokens checked against the context (None = the rest of the context)."""
        room = self.context - n_prompt
        if max_tokens is None:
            if room < 1:
                raise ApiError(f"This model's maximum context length is {self.context} tokens; the prompt "
                               f"has {n_prompt}. Shorten the prompt.", code="context_length_exceeded",
                               param="messages")
            return room
        if n_prompt + max_tokens > self.context:
            raise ApiError(
                f"This model's maximum context length is {self.context} tokens. However, you requested "
                f"{n_prompt + max_tokens} tokens ({n_prompt} in the prompt, {max_tokens} in the completion). "
                f"Reduce the prompt or {param}.", code="context_length_exceeded", param=param)
        return max_tokens

    def token_str(self, token_id: int) -> str:
        return self.tokenizer.id_to_bytes(token_id).decode("utf-8", errors="replace")

    def processors(self, n: int, schema: dict[str, Any] | None | bool = False,
                   logit_bias: dict[str, float] | None = None) -> list[Callable] | None:
        """One logits processor per sample: `logit_bias`, then the JSON constraint (schema False: none)."""
        bias = self._bias(logit_bias) if logit_bias else None
        if bias is None and schema is False:
            return None
        out = []
        for _ in range(n):
            steps: list[Callable] = [bias] if bias is not None else []
            if schema is not False:
                texts, eos = token_texts(self.tokenizer), set(self.tokenizer.stop_ids)
                steps.append(JsonLogitsProcessor(schema, texts, eos))
            out.append(steps[0] if len(steps) == 1 else _chain(steps))
        return out

    def _bias(self, logit_bias: dict[str, float]) -> Callable:
        V = self.tokenizer.vocab_size
        try:
            items = [(int(k), float(v)) for k, v in logit_bias.items()]
        except ValueError:
            raise ApiError("logit_bias: keys must be token ids", code="invalid_logit_bias",
                           param="logit_bias") from None
        if any(not 0 <= t < V or not -100 <= b <= 100 for t, b in items):
            raise ApiError(f"logit_bias: token ids in [0, {V}), biases in [-100, 100]",
                           code="invalid_logit_bias", param="logit_bias")
        ids = torch.tensor([t for t, _ in items], dtype=torch.long)
        vals = torch.tensor([b for _, b in items])

        def add_bias(generated: list[int], logits: torch.Tensor) -> torch.Tensor:
            return logits.index_add(0, ids.to(logits.device), vals.to(logits.device, logits.dtype))

        return add_bias

    def _encode_prompt(self, item: str | list[int]) -> list[int]:
        if isinstance(item, str):
            ids = self.tokenizer.encode(item, add_special_tokens=True)
        else:
            ids = list(item)
            V = self.tokenizer.vocab_size
            if any(not 0 <= i < V for i in ids):
                raise ApiError(f"prompt: token ids must be in [0, {V})", code="invalid_prompt",
                               param="prompt")
        if not ids:
            raise ApiError("prompt: empty after tokenization", code="invalid_prompt", param="prompt")
        return ids

    async def _run(self, jobs, queue, on_token: Callable[[int, Any], bool]) -> None:
        """Feed every event of `jobs` to on_token(index, TokenOut | Prefilled) until all are done.

        Cancels what is left on exit (error, timeout, client gone, all choices done)."""
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
                        raise ApiError(f"request timed out after {self.timeout:g} s", status=408,
                                       code="timeout")
                    idx, item = getter.result()
                else:
                    idx, item = queue.get_nowait()
                if isinstance(item, Exception):
                    raise item
                if idx not in live:  # a token that raced with the cancel of a finished choice
                    continue
                if isinstance(item, TokenOut) and first and self.metrics:
                    first = False
                    self.metrics.observe_ttft(time.monotonic() - by_index[idx].submitted)
                done = on_token(idx, item)
                if done or (isinstance(item, TokenOut) and item.finish_reason):
                    live.discard(idx)
                    by_index[idx].cancel()  # frees the row if a stop string ended it early
                if isinstance(item, Prefilled) and item.done:
                    live.discard(idx)
        finally:
            for j in jobs:
                j.cancel()
            self.scheduler.wake()
            if self.metrics:
                self.metrics.observe_latency(time.monotonic() - jobs[0].submitted)

    def _usage(self, n_prompt: int, n_completion: int, cached: int) -> dict[str, Any]:
        if self.metrics:
            self.metrics.tokens(n_prompt, n_completion, cached)
        return {"prompt_tokens": n_prompt, "completion_tokens": n_completion,
                "total_tokens": n_prompt + n_completion, "prompt_tokens_details": {"cached_tokens": cached}}

    def _seeded(self, make: Callable[[int], Any], n: int, seed: int | None) -> list[Any]:
        return [make(i).replace(seed=None if seed is None else seed + i) for i in range(n)]

    # ------------------------------------------------------------------ /v1/completions
    async def completions(self, req: P.CompletionRequest) -> dict[str, Any] | AsyncIterator[str]:
        self.check_model(req.model)
        prompts = [self._encode_prompt(p) for p in req.prompts()]
        n = req.n
        max_tokens = req.max_tokens
        budgets = [self.budget(len(ids), max_tokens) for ids in prompts]
        params = [self._seeded(lambda i, b=b: req.to_sampling_params(max(b, 1)), n, req.seed)
                  for b in budgets]
        jobs, queue = [], None
        for k, ids in enumerate(prompts):
            js, queue = self.scheduler.submit(ids, params[k], self.processors(n, False, req.logit_bias),
                                              prefill_only=max_tokens == 0, queue=queue, first_index=k * n)
            jobs += js
        stops = req.stop_list()
        choices = {j.index: Choice(self.tokenizer, stops) for j in jobs}
        prompt_info: dict[int, Prefilled] = {}
        rid, created = new_id("cmpl"), int(time.time())
        k_lp = req.logprobs

        def prompt_of(idx: int) -> list[int]:
            return prompts[idx // n]

        def logprobs_obj(idx: int, toks: list[TokenOut], offset: int, with_prompt: bool) -> dict | None:
            if k_lp is None:
                return None
            tokens, lps, tops, offs = [], [], [], []
            pos = offset
            if with_prompt:
                pl = prompt_info[idx].prompt_logprobs or []
                for t, info in zip(prompt_of(idx), pl):
                    s = self.token_str(t)
                    tokens.append(s)
                    offs.append(pos)
                    pos += len(s)
                    lps.append(None if info is None else info[0])
                    tops.append(None if info is None else {self.token_str(a): lp for a, lp in info[1]})
            for o in toks:
                s = self.token_str(o.token_id)
                tokens.append(s)
                offs.append(pos)
                pos += len(s)
                lps.append(o.logprob)
                tops.append({self.token_str(a): lp for a, lp in (o.top or [])})
            return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs}

        def prompt_text(idx: int) -> str:
            return self.tokenizer.decode(prompt_of(idx)) if req.echo else ""

        if not req.stream:
            def on_token(idx: int, item: Any) -> bool:
                if isinstance(item, Prefilled):
                    prompt_info[idx] = item
                    return False
                c = choices[idx]
                c.push(item)
                return c.finish_reason is not None

            await self._run(jobs, queue, on_token)
            out = []
            for idx in sorted(choices):
                c = choices[idx]
                pt = prompt_text(idx)
                out.append({"text": pt + c.text, "index": idx, "finish_reason": c.finish_reason or "length",
                            "logprobs": logprobs_obj(idx, c.tokens, 0, req.echo)})
            usage = self._usage(sum(map(len, prompts)), sum(c.n_tokens for c in choices.values()),
                                sum(p.cached_tokens for i, p in prompt_info.items() if i % n == 0))
            return {"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                    "choices": out, "usage": usage}

        async def stream() -> AsyncIterator[str]:
            pending: list[str] = []
            offsets = dict.fromkeys(choices, 0)

            def chunk(idx: int, text: str, lp: dict | None, finish: str | None) -> str:
                choice = {"text": text, "index": idx, "logprobs": lp, "finish_reason": finish}
                return sse({"id": rid, "object": "text_completion", "created": created,
                            "model": self.model_name, "choices": [choice]})

            def on_token(idx: int, item: Any) -> bool:
                if isinstance(item, Prefilled):
                    prompt_info[idx] = item
                    if req.echo:
                        pt = prompt_text(idx)
                        pending.append(chunk(idx, pt, logprobs_obj(idx, [], 0, True), None))
                        offsets[idx] = len(pt)
                    if item.done:
                        pending.append(chunk(idx, "", None, "length"))
                    return False
                c = choices[idx]
                delta, toks = c.push(item)
                lp = logprobs_obj(idx, toks, offsets[idx], False)
                offsets[idx] += len(delta)
                if delta or toks or c.finish_reason:
                    pending.append(chunk(idx, delta, lp, c.finish_reason))
                return c.finish_reason is not None

            async for piece in self._pump(jobs, queue, on_token, pending):
                yield piece
            if req.stream_options and req.stream_options.include_usage:
                usage = self._usage(sum(map(len, prompts)), sum(c.n_tokens for c in choices.values()),
                                    sum(p.cached_tokens for i, p in prompt_info.items() if i % n == 0))
                yield sse({"id": rid, "object": "text_completion", "created": created,
                           "model": self.model_name, "choices": [], "usage": usage})
            yield "data: [DONE]\n\n"

        return stream()

    async def _pump(self, jobs, queue, on_token, pending: list[str]) -> AsyncIterator[str]:
        """Run the jobs in a task and yield the SSE pieces `on_token` appends to `pending`, as they come.

        An error ends the stream with an OpenAI error object (the HTTP status is already sent)."""
        wake = asyncio.Event()

        def handler(idx: int, item: Any) -> bool:
            r = on_token(idx, item)
            wake.set()
            return r

        task = asyncio.ensure_future(self._run(jobs, queue, handler))
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
                for j in jobs:
                    j.cancel()
                self.scheduler.wake()

    # ------------------------------------------------------------------ /v1/chat/completions
    def template_knows_tools(self) -> bool:
        """Whether the chat template renders `tools` at all (SmolLM2's ChatML does not)."""
        if self._template_tools is None:
            from llmkit.tokenizer import render_chat

            probe = [{"role": "user", "content": "hi"}]
            tool = [{"type": "function", "function": {"name": "probe_fn", "parameters": {"type": "object"}}}]
            a = render_chat(self.tokenizer, probe, add_generation_prompt=True).text
            b = render_chat(self.tokenizer, probe, add_generation_prompt=True, tools=tool).text
            self._template_tools = a != b
        return self._template_tools

    def render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[int]:
        from llmkit.tokenizer import render_chat

        msgs = [{**m, "role": "system" if m["role"] == "developer" else m["role"]} for m in messages]
        uses_tools = bool(tools) or any(m.get("tool_calls") or m["role"] == "tool" for m in msgs)
        if uses_tools and not self.template_knows_tools():
            msgs, tools = T.as_text_messages(msgs, tools), None
        if uses_tools:
            for m in msgs:
                for c in m.get("tool_calls") or []:
                    c["function"]["arguments"] = T._loads(c["function"]["arguments"])
        return render_chat(self.tokenizer, msgs, add_generation_prompt=True, tools=tools or None).ids

    @staticmethod
    def chat_messages(req: P.ChatCompletionRequest) -> list[dict[str, Any]]:
        out = []
        for m in req.messages:
            d: dict[str, Any] = {"role": m.role, "content": m.text()}
            if m.name:
                d["name"] = m.name
            if m.tool_calls:
                d["tool_calls"] = [{"id": c.id, "type": "function",
                                    "function": {"name": c.function.name, "arguments": c.function.arguments}}
                                   for c in m.tool_calls]
            if m.tool_call_id:
                d["tool_call_id"] = m.tool_call_id
            out.append(d)
        return out

    def _chat_logprob(self, o: TokenOut) -> dict[str, Any]:
        def entry(t: int, lp: float) -> dict[str, Any]:
            return {"token": self.token_str(t), "logprob": lp, "bytes": list(self.tokenizer.id_to_bytes(t))}

        return {**entry(o.token_id, o.logprob), "top_logprobs": [entry(t, lp) for t, lp in (o.top or [])]}

    async def chat(self, req: P.ChatCompletionRequest) -> dict[str, Any] | AsyncIterator[str]:
        self.check_model(req.model)
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        choice_mode = req.tool_choice if req.tool_choice is not None else ("auto" if tools else "none")
        forced: str | None = None  # None, "*" (required) or a function name
        if isinstance(choice_mode, P.NamedToolChoice):
            forced = choice_mode.function["name"]
        elif choice_mode == "required":
            forced = "*"
        try:
            messages = self.chat_messages(req)
        except ValueError as e:
            raise ApiError(str(e), code="invalid_content", param="messages") from None
        ids = self.render(messages, tools if choice_mode != "none" else None)
        max_tokens = self.budget(len(ids), req.limit(), "max_tokens")
        schema: dict[str, Any] | None | bool = False  # False: unconstrained
        if forced:
            schema = T.forced_call_schema(tools or [], None if forced == "*" else forced)
        elif req.response_format and req.response_format.type == "json_object":
            schema = None
        elif req.response_format and req.response_format.type == "json_schema":
            schema = req.response_format.json_schema.schma or {}
        n = req.n
        params = self._seeded(lambda i: req.to_sampling_params(max_tokens), n, req.seed)
        jobs, queue = self.scheduler.submit(ids, params, self.processors(n, schema, req.logit_bias))
        hold = bool(tools) and choice_mode == "auto"
        choices = [Choice(self.tokenizer, req.stop_list(), hold_tools=hold) for _ in range(n)]
        info: dict[int, Prefilled] = {}
        rid, created = new_id("chatcmpl"), int(time.time())

        def finish(c: Choice) -> tuple[str | None, list[dict[str, Any]], str]:
            return finish_choice(c, forced, hold)

        def usage() -> dict[str, Any]:
            cached = info[0].cached_tokens if 0 in info else 0
            return self._usage(len(ids), sum(c.n_tokens for c in choices), cached)

        if not req.stream:
            def on_token(idx: int, item: Any) -> bool:
                if isinstance(item, Prefilled):
                    info[idx] = item
                    return False
                choices[idx].push(item)
                return choices[idx].finish_reason is not None

            await self._run(jobs, queue, on_token)
            out = []
            for i, c in enumerate(choices):
                content, calls, reason = finish(c)
                msg: dict[str, Any] = {"role": "assistant", "content": content}
                if calls:
                    msg["tool_calls"] = calls
                lp = {"content": [self._chat_logprob(o) for o in c.tokens]} if req.logprobs else None
                out.append({"index": i, "message": msg, "logprobs": lp, "finish_reason": reason})
            return {"id": rid, "object": "chat.completion", "created": created, "model": self.model_name,
                    "choices": out, "usage": usage()}

        async def stream() -> AsyncIterator[str]:
            pending: list[str] = []

            def chunk(i: int, delta: dict, lp: list | None = None, reason: str | None = None) -> str:
                ch = {"index": i, "delta": delta, "logprobs": None if lp is None else {"content": lp},
                      "finish_reason": reason}
                return sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                            "model": self.model_name, "choices": [ch]})

            for i in range(n):
                pending.append(chunk(i, {"role": "assistant", "content": ""}))

            def on_token(idx: int, item: Any) -> bool:
                if isinstance(item, Prefilled):
                    info[idx] = item
                    return False
                c = choices[idx]
                delta, toks = c.push(item)
                lp = [self._chat_logprob(o) for o in toks] if req.logprobs else None
                if forced:
                    delta = ""  # the call goes out whole as tool_calls at the end
                if delta or (lp and not forced):
                    pending.append(chunk(idx, {"content": delta}, lp))
                if c.finish_reason:
                    _, calls, reason = finish(c)
                    if calls:
                        pending.append(chunk(idx, {"tool_calls": [{"index": k, **call}
                                                                  for k, call in enumerate(calls)]}))
                    elif forced:
                        pending.append(chunk(idx, {"content": c.text}))
                    pending.append(chunk(idx, {}, None, reason))
                return c.finish_reason is not None

            async for piece in self._pump(jobs, queue, on_token, pending):
                yield piece
            if req.stream_options and req.stream_options.include_usage:
                yield sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                           "model": self.model_name, "choices": [], "usage": usage()})
            yield "data: [DONE]\n\n"

        return stream()

    # ------------------------------------------------------------------ /v1/responses
    async def responses(self, req: P.ResponsesRequest) -> dict[str, Any] | AsyncIterator[str]:
        self.check_model(req.model)
        tools, mode, forced = self._response_tools(req)
        history: list[dict[str, Any]] = []
        if req.previous_response_id:
            found = self.store.get(req.previous_response_id) if self.store else None
            if found is None:
                raise ApiError(f"Previous response with id '{req.previous_response_id}' not found.",
                               status=404, code="previous_response_not_found", param="previous_response_id")
            history = found[1]
        try:
            new = req.messages()
        except ValueError as e:
            raise ApiError(str(e), code="invalid_input", param="input") from None
        convo = history + new
        prompt = ([{"role": "system", "content": req.instructions}] if req.instructions else []) + convo
        ids = self.render(prompt, tools if mode != "none" else None)
        max_tokens = self.budget(len(ids), req.max_output_tokens, "max_output_tokens")
        fmt = req.text.format if req.text and req.text.format else None
        schema: dict | None | bool = False
        if forced:
            schema = T.forced_call_schema(tools, None if forced == "*" else forced)
        elif fmt and fmt.type != "text":
            schema = fmt.schma if fmt.type == "json_schema" else None
        jobs, queue = self.scheduler.submit(ids, [req.to_sampling_params(max_tokens)],
                                            self.processors(1, schema))
        hold = bool(tools) and mode == "auto"
        choice = Choice(self.tokenizer, [], hold_tools=hold)
        info: dict[int, Prefilled] = {}
        rid, mid, created = new_id("resp"), new_id("msg"), int(time.time())

        def message(status: str, text: str) -> dict[str, Any]:
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
            return {"id": mid, "type": "message", "status": status, "role": "assistant", "content": [part]}

        def outputs() -> tuple[list[dict[str, Any]], dict[str, Any], str]:
            """(output items, the assistant turn for the stored conversation, status) once finished."""
            content, calls, reason = finish_choice(choice, forced, hold)
            items = [] if forced else [message("completed", content or "")]
            items += [{"type": "function_call", "id": "fc_" + c["id"].removeprefix("call_"),
                       "call_id": c["id"], "name": c["function"]["name"],
                       "arguments": c["function"]["arguments"], "status": "completed"} for c in calls]
            turn = {"role": "assistant", "content": content or "", **({"tool_calls": calls} if calls else {})}
            return items, turn, "completed" if reason in ("stop", "tool_calls") else "incomplete"

        def response(status: str, output: list[dict[str, Any]]) -> dict[str, Any]:
            usage = None
            if status != "in_progress":
                u = self._usage(len(ids), choice.n_tokens, info[0].cached_tokens if 0 in info else 0)
                cached = u["prompt_tokens_details"]["cached_tokens"]
                usage = {"input_tokens": u["prompt_tokens"],
                         "input_tokens_details": {"cached_tokens": cached},
                         "output_tokens": u["completion_tokens"],
                         "output_tokens_details": {"reasoning_tokens": 0},
                         "total_tokens": u["total_tokens"]}
            return {
                "id": rid, "object": "response", "created_at": created, "status": status, "error": None,
                "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
                "model": self.model_name, "output": output, "parallel_tool_calls": req.parallel_tool_calls,
                "previous_response_id": req.previous_response_id, "store": req.store,
                "temperature": req.temperature,
                "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt else
                         {"type": "text"}},
                "tool_choice": req.tool_choice if req.tool_choice is not None else "auto",
                "tools": req.tools or [], "top_p": req.top_p, "usage": usage,
                "metadata": req.metadata or {}, "user": req.user,
            }

        def finalize() -> dict[str, Any]:
            items, turn, status = outputs()
            resp = response(status, items)
            if req.store and self.store is not None:
                self.store.put(resp, convo + [turn])
            return resp

        def on_token(idx: int, item: Any) -> bool:
            if isinstance(item, Prefilled):
                info[idx] = item
                return False
            choice.push(item)
            return choice.finish_reason is not None

        if not req.stream:
            await self._run(jobs, queue, on_token)
            return finalize()

        async def stream() -> AsyncIterator[str]:
            seq = 0
            pending: list[str] = []

            def event(kind: str, **fields: Any) -> None:
                nonlocal seq
                pending.append(sse({"type": kind, "sequence_number": seq, **fields}, event=kind))
                seq += 1

            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            where = {"item_id": mid, "output_index": 0, "content_index": 0}
            event("response.created", response=response("in_progress", []))
            event("response.in_progress", response=response("in_progress", []))
            if not forced:
                event("response.output_item.added", output_index=0, item={**message("in_progress", ""),
                                                                           "content": []})
                event("response.content_part.added", **where, part=part)

            def on_stream(idx: int, item: Any) -> bool:
                if isinstance(item, Prefilled):
                    info[idx] = item
                    return False
                delta, _ = choice.push(item)
                if delta and not forced:
                    event("response.output_text.delta", **where, delta=delta, logprobs=[])
                if choice.finish_reason:
                    final = finalize()
                    for k, it in enumerate(final["output"]):
                        if it["type"] == "message":
                            text = it["content"][0]["text"]
                            event("response.output_text.done", **where, text=text, logprobs=[])
                            event("response.content_part.done", **where, part={**part, "text": text})
                        else:
                            at = {"item_id": it["id"], "output_index": k}
                            event("response.output_item.added", output_index=k,
                                  item={**it, "arguments": "", "status": "in_progress"})
                            event("response.function_call_arguments.delta", **at, delta=it["arguments"])
                            event("response.function_call_arguments.done", **at, arguments=it["arguments"])
                        event("response.output_item.done", output_index=k, item=it)
                    event("response.completed" if final["status"] == "completed" else "response.incomplete",
                          response=final)
                return choice.finish_reason is not None

            async for piece in self._pump(jobs, queue, on_stream, pending):
                yield piece

        return stream()

    @staticmethod
    def _response_tools(req: P.ResponsesRequest) -> tuple[list[dict[str, Any]], str, str | None]:
        """Function tools in chat form, the tool_choice mode, and the forced function (or "*", or None)."""
        tools = []
        for t in req.tools or []:
            if t.get("type") != "function" or not t.get("name"):
                raise ApiError(f"tools: only function tools are supported, got {t.get('type')!r}",
                               code="unsupported_parameter", param="tools")
            fn = {k: t[k] for k in ("name", "description", "parameters") if t.get(k) is not None}
            tools.append({"type": "function", "function": fn})
        choice = req.tool_choice if req.tool_choice is not None else ("auto" if tools else "none")
        if isinstance(choice, dict):
            name = choice.get("name") or (choice.get("function") or {}).get("name")
            if name not in {t["function"]["name"] for t in tools}:
                raise ApiError(f"tool_choice: no tool named {name!r}", param="tool_choice")
            return tools, "required", name
        if choice not in ("auto", "none", "required") or (choice == "required" and not tools):
            raise ApiError(f"tool_choice: {choice!r}; use auto, none, required (with tools) or a function",
                           param="tool_choice")
        return tools, choice, "*" if choice == "required" else None

    def get_response(self, response_id: str) -> dict[str, Any]:
        found = self.store.get(response_id) if self.store else None
        if found is None:
            raise ApiError(f"No response found with id '{response_id}'.", status=404, code="not_found")
        return found[0]

    def delete_response(self, response_id: str) -> dict[str, Any]:
        if not (self.store and self.store.delete(response_id)):
            raise ApiError(f"No response found with id '{response_id}'.", status=404, code="not_found")
        return {"id": response_id, "object": "response.deleted", "deleted": True}

    # ------------------------------------------------------------------ tokenizer routes
    def tokenize(self, req: P.TokenizeRequest) -> dict[str, Any]:
        self.check_model(req.model)
        if req.messages is not None:
            from llmkit.tokenizer import render_chat

            msgs = [{"role": m.role, "content": m.text()} for m in req.messages]
            ids = render_chat(self.tokenizer, msgs, add_generation_prompt=req.add_generation_prompt).ids
        else:
            ids = self.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        return {"count": len(ids), "max_model_len": self.context, "tokens": ids}

    def detokenize(self, req: P.DetokenizeRequest) -> dict[str, Any]:
        self.check_model(req.model)
        V = self.tokenizer.vocab_size
        if any(not 0 <= i < V for i in req.tokens):
            raise ApiError(f"tokens: ids must be in [0, {V})", code="invalid_tokens", param="tokens")
        return {"prompt": self.tokenizer.decode(req.tokens)}

    def tokenizer_info(self) -> dict[str, Any]:
        tok = self.tokenizer

        def text(i: int | None) -> str | None:
            return None if i is None else tok.id_to_bytes(i).decode("utf-8", errors="replace")

        return {"tokenizer_class": type(tok).__name__, "vocab_size": tok.vocab_size,
                "model_max_length": self.context, "bos_token": text(tok.bos_id),
                "eos_token": text(tok.eos_id),
                "pad_token": text(tok.pad_id), "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id,
                "pad_token_id": tok.pad_id, "stop_token_ids": sorted(tok.stop_ids),
                "add_bos_token": bool(getattr(tok, "add_bos", False)), "chat_template": tok.chat_template,
                "special_tokens": tok.special_tokens}

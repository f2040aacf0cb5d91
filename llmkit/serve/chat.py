"""/v1/chat/completions: messages through the model's chat template, tools, response_format (constrained
JSON), n samples, logprobs, streamed or not. The prompt, tool and constraint handling is
llmkit.generate.request's, the same as `llm.chat`; so is the guard (`svc.guard`, llmkit.generate.guard): a
refused input is a 400 "content_filter" before anything is queued, a refused output ends its choice with
finish_reason "content_filter" and no content (a stream stops there; what was sent stays sent)."""

from __future__ import annotations

import time
from typing import Any

from llmkit.generate.guard import screen_input
from llmkit.generate.request import Completion, chat_prompt, make_processors
from llmkit.generate.sampling import TokenLogprob
from llmkit.serve import protocol as P
from llmkit.serve.scheduler import TokenOut
from llmkit.serve.service import Service, new_id, sse


def chat_messages(req: P.ChatCompletionRequest) -> list[dict[str, Any]]:
    """The request's messages as plain dicts (content parts joined to text; any other part is a 400 naming
    "messages", from /v1/chat/completions and /tokenize alike)."""
    out = []
    for m in req.messages:
        d: dict[str, Any] = {"role": m.role, "content": m.text("messages")}
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


async def chat_completions(svc: Service, req: P.ChatCompletionRequest):
    svc.check_model(req.model)
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    choice = req.tool_choice
    if isinstance(choice, P.NamedToolChoice):
        choice = choice.model_dump()
    fmt = req.response_format.model_dump(by_alias=True, exclude_none=True) if req.response_format else None
    messages = chat_messages(req)
    guard = getattr(svc, "guard", None)
    screen_input(guard, messages)
    prompt = await svc.offload(chat_prompt, svc.tokenizer, messages, tools=tools, tool_choice=choice,
                               response_format=fmt)
    ids, n = prompt.ids, req.n
    params = svc.sampling(req, svc.budget(len(ids), req.limit(), "max_tokens"), n, req.seed)
    procs = await svc.offload(make_processors, svc.tokenizer, n, prompt.schema, req.logit_bias)
    jobs, queue = svc.scheduler.submit(ids, params, procs)
    outs = {i: Completion(svc.tokenizer, req.stop_list(), hold_tools=prompt.hold_tools,
                          forced_tool=prompt.forced_tool, guard=guard) for i in range(n)}
    rid, created = new_id("chatcmpl"), int(time.time())
    forced = prompt.forced_tool

    def usage() -> dict[str, Any]:
        return svc.usage(len(ids), sum(len(c.token_ids) for c in outs.values()), outs[0].cached_tokens)

    if not req.stream:
        await svc.run(jobs, queue, outs)
        choices = []
        for i, c in outs.items():
            content, calls, reason = c.final()
            msg: dict[str, Any] = {"role": "assistant", "content": content}
            if calls:
                msg["tool_calls"] = calls
            lp = {"content": [svc.chat_logprob(o) for o in c.shown]} if req.logprobs else None
            choices.append({"index": i, "message": msg, "logprobs": lp, "finish_reason": reason})
        return {"id": rid, "object": "chat.completion", "created": created, "model": svc.model_name,
                "choices": choices, "usage": usage()}

    async def stream():
        def chunk(i: int, delta: dict, lp: list | None = None, reason: str | None = None) -> str:
            ch = {"index": i, "delta": delta, "logprobs": None if lp is None else {"content": lp},
                  "finish_reason": reason}
            return sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                        "model": svc.model_name, "choices": [ch]})

        pending = [chunk(i, {"role": "assistant", "content": ""}) for i in range(n)]

        def on_token(idx: int, item: TokenOut, delta: str, shown: list[TokenLogprob]) -> None:
            c = outs[idx]
            lp = [svc.chat_logprob(o) for o in shown] if req.logprobs else None
            if forced:
                delta = ""  # the call goes out whole as tool_calls at the end
            if delta or (lp and not forced):
                pending.append(chunk(idx, {"content": delta}, lp))
            if c.finished:
                _, calls, reason = c.final()
                if calls:
                    pending.append(chunk(idx, {"tool_calls": [{"index": k, **call}
                                                              for k, call in enumerate(calls)]}))
                elif forced:
                    pending.append(chunk(idx, {"content": c.text}))
                pending.append(chunk(idx, {}, None, reason))

        async for piece in svc.pump(jobs, queue, outs, on_token, pending):
            yield piece
        if req.stream_options and req.stream_options.include_usage:
            yield sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                       "model": svc.model_name, "choices": [], "usage": usage()})
        yield "data: [DONE]\n\n"

    return stream()

"""/v1/responses (create, streamed events, get, delete): a conversation kept server-side in the SQLite store,
continued with `previous_response_id`; function tools; text.format json_object / json_schema. Prompt,
tools and constraint handling are llmkit.generate.request's, as for chat completions."""

from __future__ import annotations

import time
from typing import Any

from llmkit.errors import LlmkitError
from llmkit.generate.guard import screen_input
from llmkit.generate.request import Completion, chat_prompt, make_processors
from llmkit.serve import protocol as P
from llmkit.serve.service import Service, new_id, sse


def response_tools(req: P.ResponsesRequest) -> list[dict[str, Any]]:
    """The request's function tools in chat-completions form."""
    tools = []
    for t in req.tools or []:
        if t.get("type") != "function" or not t.get("name"):
            raise LlmkitError(f"tools: only function tools are supported, got {t.get('type')!r}",
                              code="unsupported_parameter", param="tools")
        fn = {k: t[k] for k in ("name", "description", "parameters") if t.get(k) is not None}
        tools.append({"type": "function", "function": fn})
    return tools


async def responses(svc: Service, req: P.ResponsesRequest):
    svc.check_model(req.model)
    tools = response_tools(req)
    history: list[dict[str, Any]] = []
    if req.previous_response_id:
        found = await svc.offload(svc.store.get, req.previous_response_id) if svc.store else None
        if found is None:
            raise LlmkitError(f"Previous response with id '{req.previous_response_id}' not found.",
                              status=404, code="previous_response_not_found", param="previous_response_id")
        history = found[1]
    new = req.messages()  # a bad item is a 400 naming "input"
    convo = history + new
    messages = ([{"role": "system", "content": req.instructions}] if req.instructions else []) + convo
    guard = getattr(svc, "guard", None)  # llmkit.generate.guard: input 400, output -> incomplete, withheld
    screen_input(guard, messages, "input")
    fmt = req.text.format if req.text and req.text.format else None
    fmt_dict = fmt.model_dump(by_alias=True, exclude_none=True) if fmt else None
    prompt = await svc.offload(chat_prompt, svc.tokenizer, messages, tools=tools, tool_choice=req.tool_choice,
                               response_format=fmt_dict, format_param="text.format")
    ids = prompt.ids
    params = svc.sampling(req, svc.budget(len(ids), req.max_output_tokens, "max_output_tokens"), 1, req.seed)
    procs = await svc.offload(make_processors, svc.tokenizer, 1, prompt.schema)
    jobs, queue = svc.scheduler.submit(ids, params, procs)
    out = Completion(svc.tokenizer, [], hold_tools=prompt.hold_tools, forced_tool=prompt.forced_tool,
                     guard=guard)
    outs = {0: out}
    forced = prompt.forced_tool
    rid, mid, created = new_id("resp"), new_id("msg"), int(time.time())

    def message(status: str, text: str) -> dict[str, Any]:
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        return {"id": mid, "type": "message", "status": status, "role": "assistant", "content": [part]}

    def response(status: str, output: list[dict[str, Any]]) -> dict[str, Any]:
        usage = None
        if status != "in_progress":
            u = svc.usage(len(ids), len(out.token_ids), out.cached_tokens)
            usage = {"input_tokens": u["prompt_tokens"],
                     "input_tokens_details": {"cached_tokens": out.cached_tokens},
                     "output_tokens": u["completion_tokens"],
                     "output_tokens_details": {"reasoning_tokens": 0},
                     "total_tokens": u["total_tokens"]}
        return {
            "id": rid, "object": "response", "created_at": created, "status": status, "error": None,
            "incomplete_details": {"reason": "content_filter" if out.finish_reason == "content_filter"
                                   else "max_output_tokens"} if status == "incomplete" else None,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
            "model": svc.model_name, "output": output, "parallel_tool_calls": req.parallel_tool_calls,
            "previous_response_id": req.previous_response_id, "store": req.store,
            "temperature": params[0].temperature,
            "text": {"format": fmt_dict if fmt else {"type": "text"}},
            "tool_choice": req.tool_choice if req.tool_choice is not None else "auto",
            "tools": req.tools or [], "top_p": params[0].top_p, "usage": usage,
            "metadata": req.metadata or {}, "user": req.user,
        }

    async def finalize() -> dict[str, Any]:
        """The finished response (stored, with the conversation so far, when asked)."""
        content, calls, reason = out.final()
        items = [] if forced else [message("completed", content or "")]
        items += [{"type": "function_call", "id": "fc_" + c["id"].removeprefix("call_"), "call_id": c["id"],
                   "name": c["function"]["name"], "arguments": c["function"]["arguments"],
                   "status": "completed"} for c in calls]
        turn = {"role": "assistant", "content": content or "", **({"tool_calls": calls} if calls else {})}
        resp = response("completed" if reason in ("stop", "tool_calls") else "incomplete", items)
        if req.store and svc.store is not None:
            await svc.offload(svc.store.put, resp, convo + [turn])
        return resp

    if not req.stream:
        await svc.run(jobs, queue, outs)
        return await finalize()

    async def stream():
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
            item = {**message("in_progress", ""), "content": []}
            event("response.output_item.added", output_index=0, item=item)
            event("response.content_part.added", **where, part=part)

        def on_token(idx, item, delta: str, shown) -> None:
            if delta and not forced:
                event("response.output_text.delta", **where, delta=delta, logprobs=[])

        async for piece in svc.pump(jobs, queue, outs, on_token, pending):
            yield piece
        if not out.finished:  # an error event ended the stream
            return
        final = await finalize()
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
        done = "response.completed" if final["status"] == "completed" else "response.incomplete"
        event(done, response=final)
        while pending:
            yield pending.pop(0)

    return stream()


async def get_response(svc: Service, response_id: str) -> dict[str, Any]:
    found = await svc.offload(svc.store.get, response_id) if svc.store else None
    if found is None:
        raise LlmkitError(f"No response found with id '{response_id}'.", status=404, code="not_found")
    return found[0]


async def delete_response(svc: Service, response_id: str) -> dict[str, Any]:
    if not (svc.store and await svc.offload(svc.store.delete, response_id)):
        raise LlmkitError(f"No response found with id '{response_id}'.", status=404, code="not_found")
    return {"id": response_id, "object": "response.deleted", "deleted": True}

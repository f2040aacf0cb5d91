"""One request between the engine and its caller: the prompt, the per-row logits processors, and the state of
each generated sequence (text deltas, stop strings, logprobs, tool calls, finish reason, usage).

    prompt = chat_prompt(tokenizer, messages, tools=..., tool_choice=..., response_format=...)
    procs = make_processors(tokenizer, n, prompt.schema, logit_bias)   # one list per sample, or None
    out = Completion(tokenizer, stops, hold_tools=prompt.hold_tools, forced_tool=prompt.forced_tool)
    delta, shown = out.push(token_id, logprob, finish_reason)          # for each engine StepOutput
    content, tool_calls, reason = out.final()

The same objects serve `llm.generate/chat/stream` (llmkit/generate/api.py) and every server endpoint
(llmkit/serve/), so a stop string, a tool call or a JSON constraint behaves the same in Python and over HTTP.

Notable choices:
- Text comes from `TextStream` (UTF-8-safe detokenizing, stop strings held back and cut); stop ids end the
  sequence and are never shown; `token_ids` keep every sampled id.
- Tools: templates that render `tools` get them as they are; for one that ignores them (SmolLM2's ChatML) the
  tools and calls are written as Hermes-style text (llmkit.generate.tools). With tool_choice "auto", text
  after a `<tool_call>` marker is held back from the stream and parsed when the sequence ends; a forced call
  ("required" or a named function) constrains the output to the JSON of one call.
- `response_format` follows OpenAI: {"type": "json_object"} or {"type": "json_schema", "json_schema":
  {"schema": {...}}} -> a JSON constraint (llmkit.generate.constrain) as a per-row logits processor.
- The caller's messages are never modified (tool-call arguments are parsed into copies).
- Guardrails (llmkit.generate.guard): a Completion given a `guard` checks its text each time it grows; a match
  ends it with finish_reason "content_filter" and the answer withheld (text "").
- Unservable input is an LlmkitError naming the field (`param`), never a crash mid-generation: a string with a
  lone UTF-16 surrogate (`lone_surrogate`: UTF-8 cannot encode it), and a JSON schema the constraint cannot
  follow (an unresolvable `$ref`, a malformed keyword; llmkit.generate.constrain.check_schema), which is
  checked here, when the prompt is built, not when the first constrained token is sampled.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from llmkit.errors import LlmkitError
from llmkit.generate import tools as T
from llmkit.generate.sampling import Processor, TokenLogprob
from llmkit.generate.stop import StopMatcher, TextStream

NOT_CONSTRAINED = False  # `schema` value meaning "no JSON constraint" (None means "any JSON object")


@dataclass
class ChatPrompt:
    ids: list[int]
    schema: dict[str, Any] | None | bool = NOT_CONSTRAINED  # JSON constraint: False none, None any object
    forced_tool: str | None = None  # None, "*" (any tool, tool_choice "required") or a function name
    hold_tools: bool = False  # tool_choice "auto" with tools: parse <tool_call> blocks out of the text


# ---------------------------------------------------------------------- prompts
_SURROGATE = re.compile("[\ud800-\udfff]")
_NESTED = (str, dict, list, tuple)  # what may hold text


def lone_surrogate(obj: Any) -> tuple[str, str] | None:
    """(dotted path, "\\uXXXX") of the first string in `obj` (nested dicts, lists and tuples; keys included)
    holding a lone UTF-16 surrogate, which cannot be encoded as UTF-8; None when there is none. The path is ""
    for `obj` itself; iterative, so any nesting depth is safe."""
    stack: list[tuple[tuple[Any, ...], Any]] = [((), obj)]
    while stack:
        path, x = stack.pop()
        if isinstance(x, str):
            if not x.isascii() and (m := _SURROGATE.search(x)):
                return ".".join(map(str, path)), f"\\u{ord(m.group()):04x}"
        elif isinstance(x, dict):
            items = list(x.items())
            for k, _ in items:
                if isinstance(k, str) and not k.isascii() and (m := _SURROGATE.search(k)):
                    return ".".join(map(str, path)), f"\\u{ord(m.group()):04x}"
            stack.extend(((*path, k), v) for k, v in reversed(items) if isinstance(v, _NESTED))
        elif isinstance(x, (list, tuple)):
            stack.extend(((*path, i), v) for i, v in reversed(list(enumerate(x))) if isinstance(v, _NESTED))
    return None


def check_text(obj: Any, param: str) -> None:
    """LlmkitError naming `param` (and the path inside it) when `obj` holds a lone surrogate."""
    found = lone_surrogate(obj)
    if found is not None:
        where = ".".join(p for p in (param, found[0]) if p)
        raise LlmkitError(f"{where}: contains a lone surrogate ({found[1]}): not valid Unicode text; send "
                          "UTF-8", code="invalid_text", param=param)


_TEMPLATE_TOOLS: dict[int, tuple[Any, bool]] = {}  # id(tokenizer) -> (tokenizer, renders tools)


def template_knows_tools(tokenizer) -> bool:
    """Whether the chat template renders `tools` at all (SmolLM2's ChatML does not)."""
    from llmkit.tokenizer import render_chat

    key = id(tokenizer)
    if key not in _TEMPLATE_TOOLS:
        probe = [{"role": "user", "content": "hi"}]
        tool = [{"type": "function", "function": {"name": "probe_fn", "parameters": {"type": "object"}}}]
        a = render_chat(tokenizer, probe, add_generation_prompt=True).text
        b = render_chat(tokenizer, probe, add_generation_prompt=True, tools=tool).text
        _TEMPLATE_TOOLS[key] = (tokenizer, a != b)  # holding the tokenizer keeps its id ours
    return _TEMPLATE_TOOLS[key][1]


def render_messages(tokenizer, messages: Sequence[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                    add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a conversation through the model's template, tools included (as text when the template
    ignores them). `developer` turns render as `system`. The messages are not modified; a lone surrogate in
    them is an LlmkitError (param "messages" or "tools")."""
    from llmkit.tokenizer import render_chat

    check_text(list(messages), "messages")
    check_text(tools, "tools")

    msgs = [{**m, "role": "system" if m.get("role") == "developer" else m.get("role")} for m in messages]
    uses_tools = bool(tools) or any(m.get("tool_calls") or m["role"] == "tool" for m in msgs)
    if uses_tools and not template_knows_tools(tokenizer):
        msgs, tools = T.as_text_messages(msgs, tools), None
    if uses_tools:  # templates expect arguments as objects: parse them into copies
        msgs = [{**m, "tool_calls": [{**c, "function": {**c["function"],
                                                        "arguments": T._loads(c["function"]["arguments"])}}
                                     for c in m["tool_calls"]]} if m.get("tool_calls") else m for m in msgs]
    return render_chat(tokenizer, msgs, add_generation_prompt=add_generation_prompt, tools=tools or None).ids


def tool_mode(tools: list[dict[str, Any]] | None, tool_choice: Any) -> tuple[str, str | None]:
    """(mode "auto" | "none" | "required", forced function: None, "*" or a name) of an OpenAI tool_choice."""
    choice = tool_choice if tool_choice is not None else ("auto" if tools else "none")
    if isinstance(choice, dict):
        name = choice.get("name") or (choice.get("function") or {}).get("name")
        if name not in {t["function"]["name"] for t in tools or []}:
            raise LlmkitError(f"tool_choice: no tool named {name!r}", param="tool_choice")
        return "required", name
    if choice not in ("auto", "none", "required") or (choice == "required" and not tools):
        raise LlmkitError(f"tool_choice: {choice!r}; use auto, none, required (with tools) or a function",
                          param="tool_choice")
    return choice, "*" if choice == "required" else None


def format_schema(response_format: dict[str, Any] | None, param: str = "response_format"
                  ) -> dict[str, Any] | None | bool:
    """The JSON constraint of an OpenAI response_format (dict): False none, None any object, or a schema."""
    if not response_format or response_format.get("type", "text") == "text":
        return NOT_CONSTRAINED
    kind = response_format.get("type")
    if kind == "json_object":
        return None
    if kind == "json_schema":
        js = response_format.get("json_schema") or {}
        schema = js.get("schema", response_format.get("schema"))
        return schema or {}
    raise LlmkitError(f"{param}: unknown type {kind!r}; use text, json_object or json_schema", param=param)


def chat_prompt(tokenizer, messages: Sequence[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None,
                tool_choice: Any = None, response_format: dict[str, Any] | None = None,
                format_param: str = "response_format") -> ChatPrompt:
    """Render a conversation for generation and work out its constraint and tool handling. A schema the
    constraint cannot follow is an LlmkitError naming "tools" (a forced call) or `format_param` (the
    request field that held `response_format`: Responses call it "text.format")."""
    from llmkit.generate.constrain import check_schema

    if tools:
        for t in tools:
            if t.get("type", "function") != "function" or not (t.get("function") or {}).get("name"):
                raise LlmkitError("tools: each tool is {'type': 'function', 'function': {'name': ..., "
                                  "'parameters': {...}}}", param="tools")
    mode, forced = tool_mode(tools, tool_choice)
    ids = render_messages(tokenizer, messages, tools if mode != "none" else None)
    if forced:
        for t in tools or []:
            fn = t["function"]
            if forced in ("*", fn["name"]) and fn.get("parameters") is not None:
                check_schema(fn["parameters"], "tools", f"tools: function {fn['name']!r} parameters")
        schema = T.forced_call_schema(tools or [], None if forced == "*" else forced)
    else:
        schema = format_schema(response_format, format_param)
        if schema is not NOT_CONSTRAINED:
            check_schema(schema, format_param)
    return ChatPrompt(ids, schema, forced, bool(tools) and mode == "auto")


def make_processors(tokenizer, n: int, schema: dict[str, Any] | None | bool = NOT_CONSTRAINED,
                    logit_bias: dict[Any, float] | None = None) -> list[list[Processor]] | None:
    """Per-row logits processors for n samples: `logit_bias` (OpenAI: token id -> bias in [-100, 100]),
    then the JSON constraint (a fresh validator per row). None when there is nothing to apply."""
    bias = _bias(tokenizer.vocab_size, logit_bias) if logit_bias else None
    if bias is None and schema is NOT_CONSTRAINED:
        return None
    out = []
    for _ in range(n):
        procs: list[Processor] = [bias] if bias is not None else []
        if schema is not NOT_CONSTRAINED:
            from llmkit.generate.constrain import JsonLogitsProcessor, token_texts

            procs.append(JsonLogitsProcessor(schema, token_texts(tokenizer), set(tokenizer.stop_ids)))
        out.append(procs)
    return out


def _bias(vocab_size: int, logit_bias: dict[Any, float]) -> Processor:
    try:
        items = [(int(k), float(v)) for k, v in logit_bias.items()]
    except (TypeError, ValueError):
        raise LlmkitError("logit_bias: keys must be token ids and values numbers", code="invalid_logit_bias",
                          param="logit_bias") from None
    if any(not 0 <= t < vocab_size or not -100 <= b <= 100 for t, b in items):
        raise LlmkitError(f"logit_bias: token ids in [0, {vocab_size}), biases in [-100, 100]",
                          code="invalid_logit_bias", param="logit_bias")
    ids = torch.tensor([t for t, _ in items], dtype=torch.long)
    vals = torch.tensor([b for _, b in items])

    def add_bias(generated: list[int], logits: torch.Tensor) -> torch.Tensor:
        return logits.index_add(0, ids.to(logits.device), vals.to(logits.device, logits.dtype))

    return add_bias


# ---------------------------------------------------------------------- one generated sequence
@dataclass
class Completion:
    """The caller's view of one generated sequence, fed the engine's tokens one by one."""

    tokenizer: Any
    stops: Sequence[str] = ()
    hold_tools: bool = False
    forced_tool: str | None = None
    skip_ids: Sequence[int] | None = None  # ids never shown (default: the tokenizer's stop ids)
    text: str = ""
    token_ids: list[int] = field(default_factory=list)  # every sampled id
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of every sampled id (when asked)
    shown: list[TokenLogprob] = field(default_factory=list)  # of the tokens shown (stop ids left out)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # echo: the prompt's own (first is None)
    cached_tokens: int = 0  # prompt tokens whose keys/values the engine reused
    finish_reason: str | None = None  # "stop" | "length" | "content_filter" (guard); set once finished
    guard: Any = None  # llmkit.generate.guard.Guard: output checked as it grows; a match withholds the answer
    verdict: Any = None  # the guard's Verdict when it refused the output

    def __post_init__(self) -> None:
        skip = sorted(self.tokenizer.stop_ids) if self.skip_ids is None else self.skip_ids
        self._hidden = set(skip)
        self._stream = TextStream(self.tokenizer, self.stops, skip_ids=skip)
        self._hold = StopMatcher([T.TOOL_OPEN]) if self.hold_tools else None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def push(self, token_id: int | None, logprob: TokenLogprob | None = None, finish_reason: str | None = None
             ) -> tuple[str, list[TokenLogprob]]:
        """Take one engine output (token_id None: a prefill-only row); return (text to show now, logprob
        entries of the tokens shown with it)."""
        delta, stopped, shown = "", False, []
        if token_id is not None:
            self.token_ids.append(token_id)
            if logprob is not None:
                self.logprobs.append(logprob)
                if token_id not in self._hidden:
                    shown = [logprob]
                    self.shown.append(logprob)
            delta, stopped = self._stream.push(token_id)
        if stopped:
            self.finish_reason = "stop"
        elif finish_reason:
            delta += self._stream.finish()
            self.finish_reason = finish_reason
        self.text += delta
        if self.guard is not None and delta and self.verdict is None:
            self.verdict = self.guard.check_output(self.text)
            if self.verdict is not None:  # withhold the answer (what was streamed already stays sent)
                self.finish_reason, self.text = "content_filter", ""
                return "", shown
        if self._hold is not None:
            delta, _ = self._hold.push(delta)
            if self.finish_reason:
                delta += self._hold.flush()
        return delta, shown

    def final(self) -> tuple[str | None, list[dict[str, Any]], str]:
        """(content, tool_calls, finish_reason) once finished: a forced call is the whole output's JSON; with
        tools in "auto" mode, <tool_call> blocks are parsed out of the text."""
        reason = self.finish_reason or "length"
        if reason == "content_filter":
            return "", [], reason
        if self.forced_tool:
            try:
                call = json.loads(self.text)
                return None, [T.tool_call(call["name"], call.get("arguments", {}))], "tool_calls"
            except (json.JSONDecodeError, KeyError, TypeError):
                return self.text, [], reason
        if self.hold_tools:
            content, calls = T.parse_tool_calls(self.text)
            if calls:
                return content or None, calls, "tool_calls"
        return self.text, [], reason


def usage(n_prompt: int, n_completion: int, cached: int) -> dict[str, int]:
    return {"prompt_tokens": n_prompt, "completion_tokens": n_completion,
            "total_tokens": n_prompt + n_completion, "cached_tokens": cached}

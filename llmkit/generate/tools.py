"""Function calling through the chat template: tool prompts, tool-call parsing, forced-call schemas.

Templates that know tools (Qwen, Hermes, Llama-3.1...) receive `tools` and the tool messages as they
are. For a template that ignores them (rendering with and without tools gives the same text, as with
SmolLM2's ChatML), the tools are described in the system message in the Hermes convention, assistant
tool calls become `<tool_call>{"name": ..., "arguments": ...}</tool_call>` text and tool results become
user turns wrapped in `<tool_response>`. Model output is parsed for `<tool_call>` blocks (an unclosed
last block counts when it holds whole JSON). When `tool_choice` forces a call ("required" or a named
function), the output is constrained to the JSON of one call, so it always parses.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"
_CALL_RE = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)


def call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def tool_system_prompt(tools: list[dict[str, Any]]) -> str:
    specs = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return (
        "You may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n"
        f"<tools>\n{specs}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n"
        '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
    )


def as_text_messages(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[dict]:
    """Messages for a template without tool support: tools in the system turn, calls and results as text."""
    out: list[dict[str, Any]] = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = "\n".join(
                f"{TOOL_OPEN}\n" + json.dumps({"name": c["function"]["name"],
                                                "arguments": _loads(c["function"].get("arguments"))},
                                               ensure_ascii=False) + f"\n{TOOL_CLOSE}"
                for c in m["tool_calls"])
            out.append({"role": "assistant", "content": ((m.get("content") or "") + "\n" + calls).strip()})
        elif m["role"] == "tool":
            result = m.get("content") or ""
            out.append({"role": "user", "content": f"<tool_response>\n{result}\n</tool_response>"})
        else:
            out.append({"role": m["role"], "content": m.get("content") or ""})
    if tools:
        prompt = tool_system_prompt(tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + prompt}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def parse_tool_calls(text: str) -> tuple[str, list[dict[str, Any]]]:
    """(content before the first call, OpenAI tool_calls) from model output with <tool_call> blocks."""
    start = text.find(TOOL_OPEN)
    if start < 0:
        return text, []
    calls = []
    for body in _CALL_RE.findall(text[start:]):
        try:
            obj = json.loads(body)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict) and isinstance(obj.get("name"), str):
            calls.append(tool_call(obj["name"], obj.get("arguments", obj.get("parameters", {}))))
    return (text[:start].rstrip() if calls else text), calls


def tool_call(name: str, arguments: Any) -> dict[str, Any]:
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": call_id(), "type": "function", "function": {"name": name, "arguments": args}}


def forced_call_schema(tools: list[dict[str, Any]], name: str | None) -> dict[str, Any]:
    """JSON schema of one call {"name", "arguments"}: of the named tool, or of any tool (name as an enum)."""
    fns = [t["function"] for t in tools if name is None or t["function"]["name"] == name]
    if len(fns) == 1:
        params = fns[0].get("parameters") or {"type": "object"}
        defs = {**params.get("definitions", {}), **params.get("$defs", {})}  # refs resolve from the root
        return {"type": "object", "properties": {"name": {"const": fns[0]["name"]}, "arguments": params},
                "required": ["name", "arguments"], "$defs": defs}
    return {"type": "object", "properties": {"name": {"enum": [f["name"] for f in fns]},
                                             "arguments": {"type": "object"}},
            "required": ["name", "arguments"]}


def _loads(s: Any) -> Any:
    if not isinstance(s, str):
        return s
    try:
        return json.loads(s)
    except json.JSONDecodeError:
        return s

"""One request path: `llm.chat` and the server share the prompt rendering, the per-row logits processors
(constrained JSON, logit_bias), tool-call parsing and the per-sequence state (llmkit.generate.request).

References: `json` + `jsonschema` for constrained output, the official openai client for the server, and
the server's own answer for the Python API's (same tokens for the same greedy request)."""

from __future__ import annotations

import copy
import json

import jsonschema
import pytest
from serve_utils import serve, tiny_llm

from llmkit.errors import LlmkitError
from llmkit.generate.api import chat, generate
from llmkit.generate.request import Completion, chat_prompt, render_messages

SCHEMA = {"type": "object", "required": ["city", "population"], "additionalProperties": False,
          "properties": {"city": {"type": "string", "maxLength": 12}, "population": {"type": "integer"}}}
WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "required": ["city"], "additionalProperties": False,
                   "properties": {"city": {"type": "string", "maxLength": 8}}}}}]
MSGS = [{"role": "user", "content": "Give me a city and its population as JSON."}]


@pytest.fixture(scope="module")
def llm():
    return tiny_llm(seed=3)


def test_python_chat_json_schema_is_valid(llm):
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}}
    for seed in range(3):
        res = chat(llm, MSGS, response_format=fmt, temperature=1.0, seed=seed, max_tokens=200)
        assert res.finish_reason == "stop", res.text
        jsonschema.validate(json.loads(res.text), SCHEMA)


def test_python_chat_json_object(llm):
    """Any JSON object: finished answers parse to a dict; answers cut by max_tokens are valid prefixes."""
    from llmkit.generate.constrain import JsonPrefix

    finished = 0
    for seed in range(4):
        res = chat(llm, MSGS, response_format={"type": "json_object"}, temperature=0.3, seed=seed,
                   max_tokens=60)
        if res.finish_reason == "stop":
            finished += 1
            assert isinstance(json.loads(res.text), dict)
        else:
            v = JsonPrefix()
            assert v.feed(v.initial(), res.text) is not None, res.text
    assert finished


def test_python_chat_forced_tool_call(llm):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    res = chat(llm, MSGS, tools=WEATHER, tool_choice=choice, temperature=1.0, seed=0, max_tokens=200)
    assert res.finish_reason == "tool_calls"
    (call,) = res.tool_calls
    assert call["function"]["name"] == "get_weather" and call["id"].startswith("call_")
    jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER[0]["function"]["parameters"])


def test_logit_bias_forces_a_token(llm):
    tok = llm.tokenizer.encode(" banana")[0]
    res = generate(llm, "x", logit_bias={tok: 100}, temperature=1.0, seed=0, max_tokens=4, ignore_eos=True)
    assert res.token_ids == [tok] * 4


def test_bad_tool_choice_and_format(llm):
    with pytest.raises(LlmkitError, match="no tool named"):
        chat(llm, MSGS, tools=WEATHER, tool_choice={"type": "function", "function": {"name": "nope"}})
    with pytest.raises(LlmkitError, match="response_format"):
        chat(llm, MSGS, response_format={"type": "xml"})
    with pytest.raises(LlmkitError, match="chat messages"):
        generate(llm, "plain text", response_format={"type": "json_object"})


def test_rendering_never_mutates_the_callers_messages(llm):
    msgs = [{"role": "user", "content": "weather?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    before = copy.deepcopy(msgs)
    ids = render_messages(llm.tokenizer, msgs, WEATHER)
    assert msgs == before and ids
    assert chat_prompt(llm.tokenizer, msgs, tools=WEATHER).ids == ids


def test_completion_cuts_stop_strings_and_hides_stop_ids(llm):
    tok = llm.tokenizer
    out = Completion(tok, ["END"])
    ids = tok.encode("Hello ENDING")
    for i, t in enumerate(ids):
        out.push(t, None, "length" if i == len(ids) - 1 else None)
        if out.finished:
            break
    assert out.text == "Hello " and out.finish_reason == "stop"
    eos = sorted(tok.stop_ids)[0]
    other = Completion(tok)
    other.push(tok.encode("Hi")[0])
    other.push(eos, None, "stop")
    assert other.text == tok.decode(tok.encode("Hi")[:1]) and other.finish_reason == "stop"
    assert other.token_ids[-1] == eos


def test_python_api_and_server_give_the_same_answer(llm, tmp_path):
    """Greedy chat through llm.chat and through /v1/chat/completions: same text, same usage."""
    import openai

    local = chat(llm, MSGS, temperature=0, max_tokens=12, ignore_eos=True)
    with serve(llm, tmp_path / "store.db") as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x")
        r = client.chat.completions.create(model="tiny", messages=MSGS, temperature=0, max_tokens=12,
                                           extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == local.text
    assert r.usage.completion_tokens == local.usage["completion_tokens"] == 12
    assert r.usage.prompt_tokens == local.usage["prompt_tokens"]

"""The server on the real default model (SmolLM2-135M-Instruct): answers, prefix reuse across turns,
structured output, a forced tool call, and echoed logprobs against a direct forward pass."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
import torch
from serve_utils import serve

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol(smollm2_gguf, tmp_path_factory):
    import llmkit

    llm = llmkit.load(smollm2_gguf, device="cpu")
    llm.name = "smollm2"
    with serve(llm, tmp_path_factory.mktemp("smol") / "r.sqlite", max_batch=4, max_seq_len=1024) as s:
        yield llm, openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=300)


def test_chat_answers_and_reuses_the_prefix(smol):
    _, client = smol
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    r = client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=30, temperature=0)
    assert "Paris" in r.choices[0].message.content and r.choices[0].finish_reason == "stop"
    msgs += [{"role": "assistant", "content": r.choices[0].message.content},
             {"role": "user", "content": "And of Italy?"}]
    r2 = client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=30, temperature=0)
    assert "Rome" in r2.choices[0].message.content
    # the second turn's prompt starts with the first turn's prompt + answer, already in the KV cache
    assert r2.usage.prompt_tokens_details.cached_tokens >= r.usage.prompt_tokens


def test_structured_output_and_forced_tool_call(smol):
    _, client = smol
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer"}}, "required": ["name", "age"]}
    r = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "Describe a cat as JSON with name and age."}],
        max_tokens=60,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "cat", "schema": schema}},
    )
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "required": ["city"],
                "properties": {"city": {"type": "string"}},
            },
        },
    }
    r = client.chat.completions.create(
        model="smollm2",
        max_tokens=40,
        temperature=0,
        tools=[tool],
        tool_choice="required",
        messages=[{"role": "user", "content": "What's the weather in Paris?"}],
    )
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and "Paris" in json.loads(call.function.arguments)["city"]


def test_echo_logprobs_match_the_model(smol):
    llm, client = smol
    text = "The quick brown fox jumps over the lazy dog."
    r = client.completions.create(model="smollm2", prompt=text, max_tokens=0, echo=True, logprobs=1)
    ids = llm.tokenizer.encode(text, add_special_tokens=True)
    with torch.no_grad():
        ref = llm.model(torch.tensor([ids]))[0].float().log_softmax(-1)  # (T, V)
    want = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    got = torch.tensor(r.choices[0].logprobs.token_logprobs[1:])
    # the engine's prefill runs in C (llmkit/kernels/decode.c), the reference in PyTorch: the same int4
    # kernels, but activations rounded to the kernels' ~15 bits after slightly different float sums
    assert torch.allclose(got, want, atol=5e-3), (got - want).abs().max()

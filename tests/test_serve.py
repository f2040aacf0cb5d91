"""The OpenAI-compatible server, end to end: the official `openai` client against a live uvicorn server.

A tiny random model keeps these fast; what is checked does not depend on the text being sensible
(shapes of every endpoint, streaming, n, stop, seeds, constraints, tools, stored responses, auth and
errors, continuous batching under load with disconnects). References: the `openai` SDK's own parsing,
`jsonschema` for structured output, and a direct forward pass of the model for the echoed logprobs.
"""

from __future__ import annotations

import http.client
import json
import threading
import time

import jsonschema
import openai
import pytest
import torch
from serve_utils import read_sse, serve, tiny_llm, wait_idle

KEY = "sk-test-key"


@pytest.fixture(scope="module")
def llm():
    return tiny_llm()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("serve") / "responses.sqlite"


@pytest.fixture(scope="module")
def server(llm, store):
    with serve(llm, store, api_keys=[KEY], max_batch=8, max_queue=64, max_body_bytes=64 << 10) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def raw(server, method: str, path: str, body: bytes | str | None = None, headers: dict | None = None):
    """(status, parsed JSON or text) of one plain HTTP request."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request(method, path, body=body, headers=headers or {})
    r = conn.getresponse()
    data = r.read().decode()
    conn.close()
    try:
        return r.status, json.loads(data)
    except ValueError:
        return r.status, data


def auth_headers() -> dict:
    return {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}


MSG = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hi."}]


# ----------------------------------------------------------------------------------- basics
def test_models_health_page_metrics(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert raw(server, "GET", "/health")[1]["status"] == "ok"
    status, page = raw(server, "GET", "/")
    assert status == 200 and "<title>llmkit chat</title>" in page
    client.completions.create(model="tiny", prompt="x", max_tokens=2)
    status, text = raw(server, "GET", "/metrics")
    assert status == 200
    for name in (
        'llmkit_requests_total{route="/v1/completions",status="200"}',
        "llmkit_prompt_tokens_total",
        "llmkit_generation_tokens_total",
        "llmkit_queue_depth",
        "llmkit_time_to_first_token_seconds_bucket",
        "llmkit_request_latency_seconds_count",
    ):
        assert name in text


def test_completions_text_and_token_ids(client, llm):
    r = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=6, temperature=0)
    assert r.object == "text_completion" and len(r.choices) == 1
    ids = llm.tokenizer.encode("Once upon a time", add_special_tokens=True)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 6
    assert r.choices[0].finish_reason == "length"
    r2 = client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0)
    assert r2.choices[0].text == r.choices[0].text  # same ids, greedy: same text
    r3 = client.completions.create(model="tiny", prompt=[ids, ids[:2]], max_tokens=3, temperature=0, n=2)
    assert [c.index for c in r3.choices] == [0, 1, 2, 3]
    assert r3.usage.prompt_tokens == len(ids) + 2


def test_echo_logprobs_match_direct_forward(client, llm):
    """What lm-eval's local-completions sends: echo + logprobs=1 + max_tokens 0."""
    text = "The cat sat on the mat because it was warm"
    r = client.completions.create(
        model="tiny", prompt=text, max_tokens=0, echo=True, logprobs=1, temperature=0
    )
    lp = r.choices[0].logprobs
    ids = llm.tokenizer.encode(text, add_special_tokens=True)
    assert r.choices[0].text == text and len(lp.tokens) == len(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    with torch.no_grad():
        ref = llm.model(torch.tensor([ids]))[0].float().log_softmax(-1)  # (T, V)
    want = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    got = torch.tensor(lp.token_logprobs[1:])
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    top1 = ref[:-1].max(-1).values
    assert torch.allclose(torch.tensor([max(d.values()) for d in lp.top_logprobs[1:]]), top1, atol=1e-4)
    # with one generated token too: the prompt part is unchanged, one more entry follows
    r = client.completions.create(
        model="tiny", prompt=ids, max_tokens=1, echo=True, logprobs=1, temperature=0
    )
    assert len(r.choices[0].logprobs.token_logprobs) == len(ids) + 1
    assert torch.allclose(torch.tensor(r.choices[0].logprobs.token_logprobs[1 : len(ids)]), want, atol=1e-4)


def test_chat_plain_and_streamed_agree(client):
    r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=8, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    text = r.choices[0].message.content
    assert r.usage.completion_tokens >= 1
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=MSG,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    # the second identical prompt reuses the first one's prefix
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0


def test_sse_framing_ends_with_done(server):
    body = json.dumps({"model": "tiny", "messages": MSG, "max_tokens": 3, "stream": True})
    status, text = raw(server, "POST", "/v1/chat/completions", body, auth_headers())
    assert status == 200
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_n_stop_seed(client):
    r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=6, n=2, temperature=1.0, seed=7)
    assert [c.index for c in r.choices] == [0, 1]
    again = client.chat.completions.create(
        model="tiny", messages=MSG, max_tokens=6, n=2, temperature=1.0, seed=7
    )
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]
    other = client.chat.completions.create(
        model="tiny", messages=MSG, max_tokens=6, n=2, temperature=1.0, seed=8
    )
    assert [c.message.content for c in other.choices] != [c.message.content for c in r.choices]
    # stop: cut where a piece of the greedy output starts, which is never emitted
    g = client.completions.create(model="tiny", prompt="abc", max_tokens=12, temperature=0).choices[0].text
    stop = g[len(g) // 2 : len(g) // 2 + 3]
    s = client.completions.create(model="tiny", prompt="abc", max_tokens=12, temperature=0, stop=[stop])
    assert s.choices[0].finish_reason == "stop" and s.choices[0].text == g[: g.index(stop)]


def test_chat_logprobs(client):
    r = client.chat.completions.create(
        model="tiny", messages=MSG, max_tokens=4, temperature=0, logprobs=True, top_logprobs=5
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for e in content:
        assert len(e.top_logprobs) == 5 and e.top_logprobs[0].logprob >= e.top_logprobs[-1].logprob
        assert e.logprob == pytest.approx(e.top_logprobs[0].logprob, abs=1e-5)  # greedy picks the top one


SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "age", "ok", "color", "tags"],
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer"},
        "ok": {"type": "boolean"},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2},
    },
}


def test_json_schema_output_validates(client):
    for seed in range(3):
        r = client.chat.completions.create(
            model="tiny",
            messages=MSG,
            max_tokens=120,
            temperature=1.0,
            seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}},
        )
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    r = client.chat.completions.create(
        model="tiny",
        messages=MSG,
        max_tokens=200,
        temperature=0.5,
        seed=1,
        response_format={"type": "json_object"},
    )
    if r.choices[0].finish_reason == "stop":  # a free-form object may run out of tokens on a random model
        assert isinstance(json.loads(r.choices[0].message.content), dict)


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "additionalProperties": False,
            "required": ["city", "unit"],
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
        },
    },
}


def test_tool_call_round_trip(client):
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    r = client.chat.completions.create(
        model="tiny",
        messages=msgs,
        tools=[WEATHER],
        max_tokens=100,
        seed=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None
    call = c.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, WEATHER["function"]["parameters"])
    msgs += [
        c.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": 21})},
    ]
    r2 = client.chat.completions.create(model="tiny", messages=msgs, tools=[WEATHER], max_tokens=5, seed=0)
    assert r2.choices[0].message.role == "assistant" and isinstance(r2.choices[0].message.content, str)
    assert r2.usage.prompt_tokens > r.usage.prompt_tokens  # the call and its result are in the prompt
    # streamed forced call: the call arrives whole in one tool_calls delta
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=msgs[:1],
            tools=[WEATHER],
            max_tokens=100,
            seed=0,
            stream=True,
            tool_choice="required",
        )
    )
    calls = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].function.name == "get_weather"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_call_parsing():
    from llmkit.generate.tools import parse_tool_calls

    text = ('Let me check.\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>\n'
            '<tool_call>{"name": "g"')
    content, calls = parse_tool_calls(text)
    assert content == "Let me check." and [c["function"]["name"] for c in calls] == ["f"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"x": 1}
    assert parse_tool_calls("no calls here") == ("no calls here", [])


# ----------------------------------------------------------------------------------- responses
def test_responses_chain_stream_and_delete(client):
    r1 = client.responses.create(
        model="tiny", input="My name is Ada.", instructions="Be brief.", max_output_tokens=4, temperature=0
    )
    assert r1.object == "response" and r1.id.startswith("resp_") and r1.status in ("completed", "incomplete")
    assert isinstance(r1.output_text, str)
    r2 = client.responses.create(
        model="tiny",
        input=[{"role": "user", "content": "What is my name?"}],
        previous_response_id=r1.id,
        max_output_tokens=4,
        temperature=0,
    )
    # the second turn's prompt holds the first turn (its input and output), minus the instructions
    assert r2.usage.input_tokens > r1.usage.input_tokens - 10 + r1.usage.output_tokens
    assert r2.previous_response_id == r1.id
    got = client.responses.retrieve(r1.id)
    assert got.id == r1.id and got.output_text == r1.output_text
    events = list(client.responses.create(model="tiny", input="Hello", max_output_tokens=4, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert (
        "".join(e.delta for e in events if e.type == "response.output_text.delta")
        == events[-1].response.output_text
    )
    client.responses.delete(r2.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r2.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(
            model="tiny", input="x", previous_response_id="resp_nope", max_output_tokens=2
        )


def test_responses_function_call_round_trip(client):
    tool = {"type": "function", **WEATHER["function"]}
    r = client.responses.create(model="tiny", input="Weather in Paris?", tools=[tool], max_output_tokens=100,
                                tool_choice={"type": "function", "name": "get_weather"}, temperature=0)
    (call,) = [o for o in r.output if o.type == "function_call"]
    assert call.name == "get_weather" and r.status == "completed"
    jsonschema.validate(json.loads(call.arguments), WEATHER["function"]["parameters"])
    r2 = client.responses.create(model="tiny", previous_response_id=r.id, tools=[tool], max_output_tokens=4,
                                 input=[{"type": "function_call_output", "call_id": call.call_id,
                                         "output": json.dumps({"temperature_c": 21})}])
    assert r2.output[0].type == "message" and r2.usage.input_tokens > r.usage.input_tokens
    events = list(client.responses.create(model="tiny", input="Weather?", tools=[tool], stream=True,
                                          tool_choice="required", max_output_tokens=100, temperature=0))
    kinds = [e.type for e in events]
    assert "response.function_call_arguments.done" in kinds and kinds[-1] == "response.completed"
    done = [e for e in events if e.type == "response.function_call_arguments.done"][0]
    jsonschema.validate(json.loads(done.arguments), WEATHER["function"]["parameters"])
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model="tiny", input="x", tools=[{"type": "web_search"}])


def test_responses_survive_restart(llm, tmp_path):
    store = tmp_path / "r.sqlite"
    with serve(llm, store) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0)
        r1 = c.responses.create(model="tiny", input="Remember 42.", max_output_tokens=3, temperature=0)
    with serve(llm, store) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0)
        assert c.responses.retrieve(r1.id).output_text == r1.output_text
        r2 = c.responses.create(
            model="tiny",
            input="Which number?",
            previous_response_id=r1.id,
            max_output_tokens=3,
            temperature=0,
        )
        assert r2.usage.input_tokens > r1.usage.input_tokens


# ----------------------------------------------------------------------------------- tokenizer routes
def test_tokenizer_routes(server, llm):
    h = auth_headers()
    status, r = raw(server, "POST", "/tokenize", json.dumps({"prompt": "Hello world"}), h)
    assert (
        status == 200
        and r["tokens"] == llm.tokenizer.encode("Hello world")
        and r["count"] == len(r["tokens"])
    )
    status, r2 = raw(server, "POST", "/detokenize", json.dumps({"tokens": r["tokens"]}), h)
    assert r2["prompt"] == "Hello world"
    status, info = raw(server, "GET", "/tokenizer_info", None, h)
    assert info["vocab_size"] == llm.tokenizer.vocab_size and info["eos_token_id"] == llm.tokenizer.eos_id
    status, r = raw(server, "POST", "/tokenize", json.dumps({"messages": MSG}), h)
    from llmkit.tokenizer import render_chat

    assert r["tokens"] == render_chat(llm.tokenizer, MSG, add_generation_prompt=True).ids


# ----------------------------------------------------------------------------------- errors and security
def _error(status_body):
    status, body = status_body
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return status, body["error"]


def test_auth(server):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    status, err = _error(raw(server, "GET", "/v1/models"))
    assert status == 401 and err["type"] == "authentication_error"
    status, err = _error(
        raw(server, "POST", "/tokenize", json.dumps({"prompt": "x"}), {"Authorization": "Basic " + KEY})
    )
    assert status == 401
    status, err = _error(raw(server, "POST", "/v1/chat/completions", "{not json"))
    assert status == 401  # auth comes before anything is parsed
    assert raw(server, "GET", "/health")[0] == 200  # open routes stay open


def test_bad_params_400(client, server):
    for kw in (
        {"temperature": 5},
        {"top_p": 0},
        {"n": 0},
        {"max_tokens": -1},
        {"top_logprobs": 3},
        {"presence_penalty": 3},
        {"stop": ["a", ""]},
    ):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", messages=MSG, **kw)
        assert e.value.status_code == 400 and e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=MSG, temperature=5)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:  # prompt + max_tokens beyond the context
        client.completions.create(model="tiny", prompt="hi " * 600, max_tokens=10)
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt=[10**9], max_tokens=1)
    status, err = _error(raw(server, "POST", "/v1/chat/completions", "{not json", auth_headers()))
    assert status == 400
    # unknown fields are accepted (and logged)
    r = client.chat.completions.create(
        model="tiny", messages=MSG, max_tokens=1, extra_body={"vendor_knob": 1}
    )
    assert r.choices


def test_logit_bias(client, llm):
    tok = llm.tokenizer.encode(" hello")[0]
    r = client.completions.create(model="tiny", prompt="x", max_tokens=3, temperature=0,
                                  logit_bias={str(tok): 100})
    assert r.choices[0].text == llm.tokenizer.decode([tok] * 3)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="x", max_tokens=1, logit_bias={"-5": 1})


def test_unknown_model_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-9", messages=MSG, max_tokens=1)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"


def test_body_too_large_413(server):
    body = json.dumps({"model": "tiny", "prompt": "x" * (100 << 10)})
    status, err = _error(raw(server, "POST", "/v1/completions", body, auth_headers()))
    assert status == 413


def test_body_too_large_chunked_413(server):
    """No Content-Length (chunked upload): the limit is enforced while the body streams in."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    chunks = (b"x" * (16 << 10) for _ in range(8))
    conn.request("POST", "/v1/completions", body=chunks, headers=auth_headers(), encode_chunked=True)
    r = conn.getresponse()
    assert r.status == 413 and json.loads(r.read())["error"]["code"] == "body_too_large"
    conn.close()


def test_streamed_completion_with_echo_matches_plain(client):
    kw = dict(model="tiny", prompt="Hello world", max_tokens=5, temperature=0, echo=True, logprobs=2)
    plain = client.completions.create(**kw).choices[0]
    chunks = list(client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == plain.text
    tokens = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert tokens == plain.logprobs.tokens
    assert chunks[-1].choices[0].finish_reason == plain.finish_reason


def test_timeout_408(server, client):
    svc = server.app.state.service
    old, svc.timeout = svc.timeout, 1e-6
    try:
        with pytest.raises(openai.APIStatusError) as e:
            client.chat.completions.create(model="tiny", messages=MSG, max_tokens=50)
        assert e.value.status_code == 408
    finally:
        svc.timeout = old
    _wait_idle(server)


def test_queue_full_429():
    import asyncio

    from llmkit.errors import LlmkitError
    from llmkit.serve.scheduler import Scheduler

    class Idle:
        max_rows, max_seq_len = 1, 64

    async def go():
        s = Scheduler(Idle(), max_queue=2)  # not started: jobs stay queued
        s.submit([1, 2], [None, None])
        with pytest.raises(LlmkitError) as e:
            s.submit([1], [None])
        assert e.value.status == 429

    asyncio.run(go())


# ----------------------------------------------------------------------------------- load
def _wait_idle(server, timeout: float = 20.0) -> None:
    wait_idle(server, timeout)


def test_load_32_streams_with_disconnects(server):
    """32 concurrent streaming clients; every third hangs up after its first chunk."""
    n_clients, results = 32, {}

    def worker(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        body = json.dumps(
            {
                "model": "tiny",
                "messages": [{"role": "user", "content": f"client {i}"}],
                "max_tokens": 24,
                "stream": True,
                "temperature": 1.0,
                "seed": i,
            }
        )
        try:
            conn.request("POST", "/v1/chat/completions", body=body, headers=auth_headers())
            r = conn.getresponse()
            if r.status != 200:
                results[i] = ("status", r.status)
                return
            lines, left = read_sse(r, conn, hang_up_after=2 if i % 3 == 0 else None)
            results[i] = ("left", len(lines)) if left else ("done", lines)
        except Exception as e:  # noqa: BLE001 - reported below
            results[i] = ("error", repr(e))
        finally:
            conn.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == n_clients
    for i, (kind, val) in results.items():
        if i % 3 == 0:
            assert kind == "left", (i, kind, val)
            continue
        assert kind == "done", (i, kind, val)
        assert val[-1] == b"[DONE]"
        finish = [json.loads(x)["choices"][0]["finish_reason"] for x in val[:-1]]
        assert finish[-1] in ("stop", "length"), (i, finish[-1])
    _wait_idle(server)  # the disconnected clients' rows were freed
    assert raw(server, "GET", "/health")[1]["status"] == "ok"
    status, text = raw(server, "GET", "/metrics")
    assert 'status="5' not in text


def test_non_streamed_request_cancelled_on_disconnect(server):
    """A client that hangs up on a non-streamed request frees its row long before max_tokens."""
    backend = server.app.state.scheduler.backend
    step = backend.step

    def slow_step():
        time.sleep(0.02)
        return step()

    backend.step = slow_step  # 400 tokens would now take >= 8 s
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        body = json.dumps({"model": "tiny", "messages": MSG, "max_tokens": 400, "ignore_eos": True})
        conn.request("POST", "/v1/chat/completions", body=body, headers=auth_headers())
        t0 = time.monotonic()
        while server.app.state.scheduler.running == 0 and time.monotonic() - t0 < 5:
            time.sleep(0.02)
        assert server.app.state.scheduler.running == 1
        conn.sock.shutdown(2)
        conn.close()
        _wait_idle(server, timeout=4.0)
    finally:
        backend.step = step


def test_developer_role_and_cli_banner_examples(server, client):
    r = client.chat.completions.create(model="tiny", max_tokens=2,
                                       messages=[{"role": "developer", "content": "Be brief."},
                                                 {"role": "user", "content": "Hi"}])
    assert r.choices[0].message.role == "assistant"
    import contextlib
    import io
    import os
    import re
    import shutil
    import subprocess
    import textwrap

    from llmkit.cli.serve import banner

    text = banner(server.url, "tiny", auth=True)
    assert server.url + "/" in text
    code = textwrap.dedent(text[text.index("  import os"):])
    out = io.StringIO()
    os.environ["LLMKIT_API_KEY"] = KEY
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(code, "banner", "exec"), {})  # the printed openai-SDK example, as printed
    finally:
        del os.environ["LLMKIT_API_KEY"]
    assert out.getvalue().strip()  # it printed the model's answer
    if shutil.which("curl"):
        cmd = re.search(r"(curl .*?)\n\n", text, re.S).group(1).replace("\\\n", " ")
        res = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "LLMKIT_API_KEY": KEY})
        assert json.loads(res.stdout)["object"] == "chat.completion"


def test_request_logging_never_records_keys(llm, tmp_path, caplog):
    secret = "sk-very-secret-123"
    server = serve(llm, tmp_path / "r.sqlite", api_keys=[secret], log_requests=True)
    with caplog.at_level("INFO", logger="llmkit.serve"), server as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key=secret, max_retries=0)
        c.chat.completions.create(model="tiny", messages=MSG, max_tokens=2,
                                  extra_body={"api_key": secret, "user_token": secret})
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url + "/v1", api_key=secret + "x", max_retries=0).models.list()
    logged = caplog.text
    assert "POST /v1/chat/completions -> 200" in logged
    assert "Say hi." in logged and "chat.completion" in logged  # request and reply bodies
    assert "GET /v1/models -> 401" in logged
    assert secret not in logged

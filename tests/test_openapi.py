"""The OpenAPI schema tells the truth about the server (issue 15, point 7).

(a) its structure: every operation documents 200 and its real error statuses with the OpenAI error body, no
    422 anywhere (validation errors are 400s), SSE routes list `text/event-stream`, /metrics is text, the
    Bearer key is a security scheme (and the document is valid OpenAPI when openapi-spec-validator is
    installed);
(b) real replies of every route, successes and errors, validate against the schema the route declares, with
    `jsonschema` (the independent reference) resolving $refs against the document's components;
(c) a bounded schemathesis run (fixed seed, a few cases per operation, a tiny model with a 64-token context
    so every generated request is quick): no 5xx, every status documented, content types and bodies as
    declared.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jsonschema
import pytest
import requests
from serve_utils import LiveServer, serve, tiny_llm

MAX_SEQ = 64
JSON, SSE = "application/json", "text/event-stream"
PROTECTED = ("/v1/", "/tokenize", "/detokenize", "/tokenizer_info")


@pytest.fixture(scope="module")
def llm():
    return tiny_llm()


@pytest.fixture(scope="module")
def server(llm, tmp_path_factory):
    with serve(llm, tmp_path_factory.mktemp("oapi") / "responses.sqlite", max_batch=4, max_queue=16) as s:
        yield s


@pytest.fixture(scope="module")
def small(llm, tmp_path_factory):
    """A 64-token context: whatever schemathesis generates runs in a few steps of the tiny model."""
    with serve(llm, tmp_path_factory.mktemp("oapi_small") / "r.sqlite", max_batch=4, max_queue=16,
               max_seq_len=MAX_SEQ) as s:
        yield s


@pytest.fixture(scope="module")
def keyed(llm, tmp_path_factory):
    """A server with an API key and a 2 KiB body limit (for 401 and 413)."""
    with serve(llm, tmp_path_factory.mktemp("oapi_key") / "r.sqlite", api_keys=["sk-test"],
               max_body_bytes=2048) as s:
        yield s


@pytest.fixture(scope="module")
def spec(server) -> dict[str, Any]:
    r = requests.get(server.url + "/openapi.json", timeout=30)
    assert r.status_code == 200
    return r.json()


def operations(spec: dict[str, Any]):
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            if method in ("get", "post", "put", "patch", "delete"):
                yield path, method, op


def body_schema(spec: dict[str, Any], path: str, method: str, status: int, media: str = JSON) -> dict:
    """The declared schema of a reply, as a standalone JSON Schema (the components carried along)."""
    responses = spec["paths"][path][method]["responses"]
    assert str(status) in responses, f"{method.upper()} {path}: status {status} is not documented"
    content = responses[str(status)]["content"]
    assert media in content, f"{method.upper()} {path} {status}: {media} not declared ({list(content)})"
    return {**content[media]["schema"], "components": spec["components"]}


def sse_events(text: str) -> list[dict[str, str]]:
    """Server-sent events as {"event"?, "data"} (the SSE format: blank-line separated, `field: value`)."""
    events = []
    for block in text.split("\n\n"):
        ev: dict[str, str] = {}
        for line in block.splitlines():
            field, _, value = line.partition(": ")
            ev[field] = ev[field] + "\n" + value if field in ev else value
        if ev:
            events.append(ev)
    return events


def check(spec: dict[str, Any], path: str, method: str, r: requests.Response) -> Any:
    """Validate a real reply against its declared schema; returns the parsed body (an event stream: the list
    of events, each event's JSON `data` validated against the declared `contentSchema` too)."""
    media = r.headers["content-type"].split(";")[0].strip()
    schema = body_schema(spec, path, method, r.status_code, media)
    if media == SSE:
        events = sse_events(r.text)
        assert events
        data = schema["properties"]["data"]
        data = next(a for a in data["anyOf"] if "contentSchema" in a) if "anyOf" in data else data
        content = jsonschema.Draft202012Validator({**data["contentSchema"], "components": spec["components"]})
        for ev in events:
            jsonschema.Draft202012Validator(schema).validate(ev)
            if ev["data"] != "[DONE]":
                content.validate(json.loads(ev["data"]))
        return events
    body = r.json() if media == JSON else r.text
    jsonschema.Draft202012Validator(schema).validate(body)
    return body


# ----------------------------------------------------------------------------------------- (a) structure
def test_schema_is_valid_openapi(spec):
    assert spec["openapi"].startswith("3.")
    try:
        from openapi_spec_validator import validate
    except ImportError:  # not a test dependency: the structural checks below stand in
        jsonschema.Draft202012Validator.check_schema({"$defs": spec["components"]["schemas"]})
    else:
        validate(spec)


def test_every_operation_documents_its_replies(spec):
    error_ref = {"$ref": "#/components/schemas/ErrorResponse"}
    seen = set()
    for path, method, op in operations(spec):
        seen.add((method, path))
        codes = op["responses"]
        assert "422" not in codes, (method, path)
        assert "200" in codes and codes["200"]["content"], (method, path)
        if method == "post":
            assert "400" in codes and "413" in codes, (method, path)
        for code, resp in codes.items():
            if code.startswith(("4", "5")) and not (path == "/health" and code == "503"):
                assert resp["content"] == {JSON: {"schema": error_ref}}, (method, path, code)
        if path.startswith(PROTECTED):
            assert op.get("security") == [{"HTTPBearer": []}], (method, path)
            assert "401" in codes, (method, path)
        else:
            assert not op.get("security"), (method, path)
    assert ("post", "/v1/completions") in seen and ("get", "/metrics") in seen and ("get", "/") not in seen
    assert "422" not in json.dumps(spec["paths"])
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    assert spec["components"]["securitySchemes"]["HTTPBearer"] == {
        "type": "http", "scheme": "bearer", "description": spec["components"]["securitySchemes"]
        ["HTTPBearer"]["description"]}


def test_streams_metrics_and_constraints_are_declared(spec):
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/responses"):
        content = spec["paths"][path]["post"]["responses"]["200"]["content"]
        assert set(content) == {JSON, SSE}, path
        assert content[SSE]["schema"]["required"] == ["data"], path
    assert set(spec["paths"]["/v1/models"]["get"]["responses"]["200"]["content"]) == {JSON}
    assert set(spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    schemas = spec["components"]["schemas"]
    temp = schemas["CompletionRequest"]["properties"]["temperature"]["anyOf"][0]
    assert (temp["minimum"], temp["maximum"]) == (0.0, 2.0)
    n = schemas["ChatCompletionRequest"]["properties"]["n"]
    assert (n["minimum"], n["maximum"]) == (1, 16)
    assert schemas["ChatCompletionRequest"]["properties"]["messages"]["minItems"] == 1
    assert schemas["ErrorDetail"]["required"] == ["message", "type", "param", "code"]


def test_code_rules_are_in_the_schema(server, spec, llm):
    """The rules the validators enforce, as JSON Schema: a body the schema rejects is one the server rejects
    (checked on both sides), and one it accepts gets past validation."""
    schemas = spec["components"]["schemas"]

    def valid(name: str, body: dict) -> bool:
        v = jsonschema.Draft202012Validator({"$ref": f"#/components/schemas/{name}",
                                             "components": spec["components"]})
        return v.is_valid(body)

    V = llm.tokenizer.vocab_size
    cases = [("TokenizeRequest", "/tokenize", {"prompt": "hi"}, True),
             ("TokenizeRequest", "/tokenize", {"messages": [{"role": "user", "content": "hi"}]}, True),
             ("TokenizeRequest", "/tokenize", {}, False),
             ("TokenizeRequest", "/tokenize", {"prompt": "hi", "messages": []}, False),
             ("DetokenizeRequest", "/detokenize", {"tokens": [0, V - 1]}, True),
             ("DetokenizeRequest", "/detokenize", {"tokens": [V]}, False),
             ("DetokenizeRequest", "/detokenize", {"tokens": [-1]}, False),
             ("CompletionRequest", "/v1/completions", {"prompt": [V], "max_tokens": 1}, False),
             ("CompletionRequest", "/v1/completions", {"prompt": [], "max_tokens": 1}, False),
             ("CompletionRequest", "/v1/completions", {"prompt": [[5], []], "max_tokens": 1}, False),
             ("CompletionRequest", "/v1/completions", {"prompt": [[5], [V - 1]], "max_tokens": 1}, True),
             ("ChatCompletionRequest", "/v1/chat/completions",
              {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2, "max_tokens": 1}, False),
             ("ChatCompletionRequest", "/v1/chat/completions",
              {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2, "logprobs": True,
               "max_tokens": 1}, True),
             ("ChatCompletionRequest", "/v1/chat/completions",
              {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 0, "max_tokens": 1}, True)]
    for name, path, body, ok in cases:
        assert valid(name, body) is ok, (name, body)
        status = requests.post(server.url + path, json=body, timeout=60).status_code
        assert (status == 200) is ok, (path, body, status)
    assert schemas["TokenizeRequest"]["oneOf"]


# ------------------------------------------------------------------------------------ (b) real replies
def test_real_replies_match_their_schema(server, spec):
    u = server.url

    def do(method: str, path: str, template: str | None = None, **kw) -> requests.Response:
        r = requests.request(method, u + path, timeout=60, **kw)
        check(spec, template or path, method.lower(), r)
        return r

    do("GET", "/v1/models")
    do("GET", "/v1/models/tiny", "/v1/models/{model_id}")
    assert do("GET", "/v1/models/nope", "/v1/models/{model_id}").status_code == 404
    r = do("POST", "/v1/completions", json={"prompt": "hi", "max_tokens": 3, "logprobs": 2, "echo": True})
    assert r.json()["choices"][0]["logprobs"]["tokens"]
    do("POST", "/v1/completions", json={"prompt": [[1, 2, 3], "x"], "max_tokens": 2, "n": 2})
    r = do("POST", "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                 "max_tokens": 3, "logprobs": True, "top_logprobs": 2})
    assert r.json()["choices"][0]["logprobs"]["content"]
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "a": {"type": "integer"}}, "required": ["a"]}}}
    r = do("POST", "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 30, "tools": [tool],
        "tool_choice": {"type": "function", "function": {"name": "f"}}})
    assert r.status_code == 200
    r = do("POST", "/v1/responses", json={"input": "hi", "max_output_tokens": 3})
    rid = r.json()["id"]
    do("POST", "/v1/responses", json={"input": "more", "previous_response_id": rid, "max_output_tokens": 2,
                                      "instructions": "be brief"})
    do("GET", f"/v1/responses/{rid}", "/v1/responses/{response_id}")
    do("DELETE", f"/v1/responses/{rid}", "/v1/responses/{response_id}")
    assert do("DELETE", f"/v1/responses/{rid}", "/v1/responses/{response_id}").status_code == 404
    assert do("GET", "/v1/responses/resp_nope", "/v1/responses/{response_id}").status_code == 404
    toks = do("POST", "/tokenize", json={"prompt": "hello world"}).json()["tokens"]
    do("POST", "/tokenize", json={"messages": [{"role": "user", "content": "hi"}]})
    do("POST", "/detokenize", json={"tokens": toks})
    do("GET", "/tokenizer_info")
    do("GET", "/health")
    do("GET", "/metrics")
    # errors: the OpenAI body under the status each route declares
    for path, body in [("/v1/completions", {"prompt": "hi", "temperature": 9}),
                       ("/v1/completions", {"prompt": "hi " * 600}),
                       ("/v1/chat/completions", {"messages": []}),
                       ("/v1/responses", {"input": 5}),
                       ("/tokenize", {}), ("/detokenize", {"tokens": [-1]})]:
        assert do("POST", path, json=body).status_code == 400, (path, body)
    r = do("POST", "/v1/chat/completions", data=b"{nope", headers={"Content-Type": JSON})
    assert r.status_code == 400
    r = do("POST", "/v1/completions", json={"prompt": "hi", "model": "other"})
    assert r.status_code == 404


def test_streams_are_event_streams(server, spec):
    bodies = {"/v1/completions": {"prompt": "hi", "max_tokens": 3, "stream": True},
              "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                                       "stream": True},
              "/v1/responses": {"input": "hi", "max_output_tokens": 3, "stream": True}}
    for path, body in bodies.items():
        r = requests.post(server.url + path, json=body, timeout=60)
        events = [json.loads(e["data"]) for e in check(spec, path, "post", r) if e["data"] != "[DONE]"]
        assert events and not any("error" in e for e in events), (path, r.text[:500])
    final = events[-1]  # the Responses stream ends with the whole response, which has the declared shape
    assert final["type"] == "response.completed" or final["type"] == "response.incomplete"
    jsonschema.Draft202012Validator({"$ref": "#/components/schemas/ResponseObject",
                                     "components": spec["components"]}).validate(final["response"])


def test_auth_and_body_limit_replies_match(keyed, spec):
    r = requests.get(keyed.url + "/v1/models", timeout=30)
    assert r.status_code == 401
    check(spec, "/v1/models", "get", r)
    r = requests.post(keyed.url + "/tokenize", json={"prompt": "x" * 4096},
                      headers={"Authorization": "Bearer sk-test"}, timeout=30)
    assert r.status_code == 413
    check(spec, "/tokenize", "post", r)
    r = requests.get(keyed.url + "/v1/models", headers={"Authorization": "Bearer sk-test"}, timeout=30)
    assert r.status_code == 200
    check(spec, "/v1/models", "get", r)


def test_unhealthy_health_matches(llm, tmp_path):
    from llmkit.serve.app import create_app

    app = create_app(llm, store_path=tmp_path / "r.sqlite", model_name=llm.name)
    with LiveServer(app) as s:
        spec = requests.get(s.url + "/openapi.json", timeout=30).json()
        app.state.scheduler.shutdown()
        r = requests.get(s.url + "/health", timeout=30)
        assert r.status_code == 503
        check(spec, "/health", "get", r)


# ------------------------------------------------------------------------------------- (c) schemathesis
CASES_PER_OPERATION = int(os.environ.get("LLMKIT_OPENAPI_CASES", "40"))  # per operation and mode; CI: 40


def test_schemathesis_bounded_run(small):
    """Generated requests (positive and negative, fixed seed) against every operation: no 5xx, and every
    reply's status, content type and body are the ones the schema declares."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, seed, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.checks import (
        content_type_conformance,
        not_a_server_error,
        response_schema_conformance,
        status_code_conformance,
    )

    schema = schemathesis.openapi.from_url(small.url + "/openapi.json")
    checks = [not_a_server_error, status_code_conformance, content_type_conformance,
              response_schema_conformance]
    failures: list[str] = []
    calls = 0
    served: set[str] = set()  # POST routes that answered 200 at least once (the run is not all 400s)
    session = requests.Session()
    for result in schema.get_all_operations():
        op = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @seed(15)
            @settings(max_examples=CASES_PER_OPERATION, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck), phases=["generate"])
            @given(case=op.as_strategy(generation_mode=mode))
            def run(case):
                nonlocal calls
                calls += 1
                try:
                    r = case.call(session=session, timeout=60)
                    if r.status_code == 200 and case.method == "POST":
                        served.add(case.path)
                    case.validate_response(r, checks=checks)
                except Exception as exc:  # one line per failure, the request included; keep going
                    failures.append(f"{case.method} {case.path} {mode.value} body={case.body!r:.300}: "
                                    f"{type(exc).__name__}: {str(exc)[:600]}")

            try:
                run()
            except Unsatisfiable:  # no negative case exists for an operation without input (GET /health)
                assert mode == GenerationMode.NEGATIVE, (op.method, op.path)
    print(f"schemathesis: {calls} generated requests, {len(failures)} failures, POST routes served: "
          f"{sorted(served)}")
    assert calls >= 12 * 4
    assert {"/v1/chat/completions", "/v1/responses", "/tokenize", "/detokenize"} <= served, served
    assert not failures, "\n".join(failures[:20])
    assert requests.get(small.url + "/health", timeout=30).json()["status"] == "ok"

"""The FastAPI app: thin routes over `Service`, plus auth, body limit, errors, logging and metrics.

    app = create_app(llm, api_keys=["sk-..."])      # llm: llmkit.load(...) or anything with
    uvicorn.run(app, host="127.0.0.1", port=8000)   # .model, .tokenizer, .name
    create_app(llm, adapters={"fr": "runs/sft/adapter"})  # + a LoRA adapter served as model id "fr"

Notable choices:
- One lane per served model id (the base, and each adapter of `adapters`, llmkit.serve.adapters): its own
  Engine (KV cache), Scheduler (queue, engine thread) and Service. Every model-taking route resolves the
  request's `model` with `Router.pick` (missing: the base; unknown: 404 model_not_found) and hands that
  Service to the one endpoint function, so a request to an adapter takes the same path as one to the base.
- Errors always have the OpenAI shape {"error": {"message", "type", "param", "code"}}: pydantic
  validation -> 400 naming the field (`param`), LlmkitError -> its status, unknown routes -> 404,
  anything else -> 500 with a generic message (the traceback goes to the log only). Starlette's own HTTP
  errors keep their headers; a 405's `Allow` names the methods of every route on that path.
- API keys: `Authorization: Bearer KEY` on /v1/* and the tokenizer routes, checked by a middleware
  before the body is read, with `hmac.compare_digest` against every key (constant time); keys are
  never logged. /, /health and /metrics stay open.
- The body limit is checked on Content-Length and again while the body streams in (chunked uploads).
- /openapi.json tells the truth without touching run time: the routes return plain dicts
  (`response_model=None`, so FastAPI neither re-validates nor re-serialises them) and declare their replies
  with `responses=` (protocol.py's response models, the OpenAI error body on each real error status, SSE as
  `text/event-stream`, /metrics as text). FastAPI's 422 entries are dropped (validation errors are 400s here).
  `HTTPBearer(auto_error=False)` only documents the key: the Auth middleware does the checking.
- POST /v1/inside (llmkit extension) feeds the chat page's "look inside" panel: attention, logit lens and
  next-token logits of the last answer, computed on a thread of its own that shares the lane's weights
  (llmkit.serve.inside), never on the event loop or the engine thread.
- Request/response logging is opt-in (`log_requests`): method, path, status, time and the JSON bodies
  with any field that looks like a secret masked; headers (and so keys) are never logged.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.security import HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from llmkit.errors import LlmkitError
from llmkit.generate.guard import get_guard, redact_body
from llmkit.serve import protocol as P
from llmkit.serve import schemas as S
from llmkit.serve import tokens
from llmkit.serve.chat import chat_completions
from llmkit.serve.completions import completions as run_completions
from llmkit.serve.inside import InsideReply, InsideRequest, Inspector
from llmkit.serve.metrics import Metrics
from llmkit.serve.protocol import error_body
from llmkit.serve.ratelimit import RateLimit
from llmkit.serve.responses import delete_response as run_delete_response
from llmkit.serve.responses import get_response as run_get_response
from llmkit.serve.responses import responses as run_responses
from llmkit.serve.scheduler import Backend, EngineBackend, Scheduler
from llmkit.serve.service import Router, Service
from llmkit.serve.store import ResponseStore

log = logging.getLogger("llmkit.serve")
STATIC = Path(__file__).parent / "static"


def _error_response(exc: BaseException, headers: dict[str, str] | None = None) -> JSONResponse:
    """The OpenAI error reply; an HTTP exception's own headers (405's Allow) are kept."""
    status, body = error_body(exc)
    if headers is None and isinstance(exc, StarletteHTTPException):
        headers = exc.headers
    headers = dict(headers or {})
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(body, status_code=status, headers=headers or None)


class BodyLimit:
    """ASGI middleware: 413 for bodies over `limit` bytes, declared (Content-Length) or streamed (chunked).

    The body is read here first (at most `limit` bytes are held) and replayed to the app."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        too_big = _error_response(LlmkitError(f"request body larger than {self.limit} bytes", status=413,
                                              code="body_too_large"))
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await too_big(scope, receive, send)
        messages, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                return  # the client left before sending its body
            size += len(msg.get("body", b""))
            if size > self.limit:
                return await too_big(scope, receive, send)
            messages.append(msg)
            if not msg.get("more_body"):
                break
        pending = iter(messages)

        async def replay():
            return next(pending, None) or await receive()

        await self.app(scope, replay, send)


PROTECTED = ("/v1/", "/tokenize", "/detokenize", "/tokenizer_info")


class Auth:
    """ASGI middleware: with keys configured, /v1/* and the tokenizer routes need `Bearer KEY` (else 401).

    The given key is compared with every configured key by `hmac.compare_digest` (constant time)."""

    def __init__(self, app, keys: Sequence[str]):
        self.app = app
        self.keys = [k.encode() for k in keys if k]

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.keys and scope["path"].startswith(PROTECTED):
            header = dict(scope.get("headers") or []).get(b"authorization", b"")
            scheme, _, given = header.partition(b" ")
            ok = False
            for k in self.keys:  # every key is compared, whatever matched
                ok |= hmac.compare_digest(given.strip(), k)
            if scheme.lower() != b"bearer" or not ok:
                msg = ("Incorrect API key provided" if header else
                       "Missing API key: send 'Authorization: Bearer KEY'")
                err = LlmkitError(msg, status=401, code="invalid_api_key")
                return await _error_response(err)(scope, receive, send)
        await self.app(scope, receive, send)


class Observe:
    """ASGI middleware: counts requests by route and status; with `log_requests` ("full" or "redact"), logs
    each request and its reply (JSON bodies with secret-looking fields masked, and with "redact" every
    prompt / message / answer text replaced by its length; 2000 characters each at most; streams by size)."""

    def __init__(self, app, metrics: Metrics, log_requests: str | None):
        self.app, self.metrics, self.log_requests = app, metrics, log_requests

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.monotonic()
        status, streamed = 500, False
        body, reply = bytearray(), bytearray()

        async def recv():
            msg = await receive()
            if self.log_requests and msg["type"] == "http.request" and len(body) < 1 << 16:
                body.extend(msg.get("body", b""))
            return msg

        async def snd(msg):
            nonlocal status, streamed
            if msg["type"] == "http.response.start":
                status = msg["status"]
                streamed = any(k == b"content-type" and v.startswith(b"text/event-stream")
                               for k, v in msg.get("headers", []))
            elif self.log_requests and msg["type"] == "http.response.body":
                reply.extend(msg.get("body", b"") if not streamed and len(reply) < 1 << 16 else b"")
            await send(msg)

        try:
            await self.app(scope, recv, snd)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.request_done(route, status)
            if self.log_requests:
                log.info("%s %s -> %d (%.0f ms) request %s reply %s", scope["method"], scope["path"], status,
                         1000 * (time.monotonic() - t0), _shown(body, self.log_requests),
                         "<event stream>" if streamed else _shown(reply, self.log_requests))


def _shown(data: bytes | bytearray, mode: str) -> str:
    if not data:
        return "-"
    try:
        return json.dumps(redact_body(json.loads(data), mode), ensure_ascii=False)[:2000]
    except ValueError:
        return f"<{len(data)} bytes, not JSON>"


ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
ERROR_TEXT = {400: "Invalid request: the OpenAI error body, `param` names the field",
              401: "Missing or wrong API key (Authorization: Bearer KEY)",
              404: "Unknown model, route or response id", 408: "The request timed out",
              413: "Request body too large", 429: "Server busy (queue full) or rate limited: retry later",
              500: "Server error (details in the server log only)", 503: "Server shutting down"}
GENERATE = (400, 401, 404, 408, 413, 429, 500, 503)  # the generation routes' error statuses
TOKENIZER = (400, 401, 404, 413, 500)


def _replies(model: Any, *codes: int, stream: str | None = None, extra: dict | None = None) -> dict:
    """`responses=` of a route: 200 with `model` (and, for a stream, text/event-stream events whose `data`
    is a JSON chunk -- `object` == `stream`, or a Responses event when `stream` is "response" -- an error
    object, or [DONE]), then each error status with the OpenAI error body."""
    out: dict = {200: {"model": model, "description": "Success"}}
    if stream:
        responses_event = {"type": "object", "required": ["type", "sequence_number"],
                           "properties": {"type": {"type": "string", "pattern": "^response\\."}}}
        chunk = responses_event if stream == "response" else {
            "type": "object", "required": ["object"], "properties": {"object": {"const": stream}}}
        event = {"type": "object", "required": ["data"], "properties": {
            "event": {"type": "string"},
            "data": {"anyOf": [{"type": "string", "contentMediaType": "application/json",
                                "contentSchema": {"anyOf": [chunk, ERROR_REF]}},
                               {"const": "[DONE]"}]}}}
        out[200]["content"] = {"text/event-stream": {"schema": event}}
    for code in codes:
        out[code] = {"model": S.ErrorResponse, "description": ERROR_TEXT[code]}
    out.update(extra or {})
    return out


def _openapi(app: FastAPI, vocab_size: int) -> dict:
    """The OpenAPI document, truthful: no 422 (validation errors are 400s with the OpenAI body, declared per
    route) and token ids bounded by the vocabulary (0 .. vocab_size - 1)."""
    if app.openapi_schema:
        return app.openapi_schema
    spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    for ops in spec.get("paths", {}).values():
        for op in ops.values():
            if isinstance(op, dict):
                op.get("responses", {}).pop("422", None)
    schemas = spec.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)

    def bound(node: Any) -> None:  # every integer inside a token-id field: 0 .. vocab_size - 1
        if isinstance(node, dict):
            if node.get("type") == "integer":
                node.update(minimum=0, maximum=vocab_size - 1)
            for v in node.values():
                bound(v)
        elif isinstance(node, list):
            for v in node:
                bound(v)

    for name, field in (("DetokenizeRequest", "tokens"), ("CompletionRequest", "prompt")):
        if name in schemas:
            bound(schemas[name]["properties"][field])
    app.openapi_schema = spec
    return spec


def create_app(llm=None, *, backend: Backend | None = None, api_keys: Sequence[str] = (),
               store_path: str | Path | None = None, model_name: str | None = None, max_batch: int = 8,
               max_seq_len: int | None = None, compile: bool = False,
               max_queue: int = 64, max_body_bytes: int = 4 << 20, request_timeout: float = 600.0,
               log_requests: bool | str = False, guard=None, rate_limit: dict | None = None,
               adapters: Mapping[str, str | os.PathLike[str]] | None = None, kv_dtype=None,
               speculative: int | None = None, draft_model=None) -> FastAPI:
    """The server for one loaded model. `backend` replaces the base model's engine (tests); `llm` gives the
    tokenizer. `adapters`: {model id: PEFT adapter folder}, each served as its own model id beside the base
    (llmkit.serve.adapters: base weights shared, one engine and scheduler lane per id; `max_batch`,
    `max_seq_len` and `max_queue` are per lane). `guard`: "rules", "none" or a llmkit.generate.guard Guard
    (input/output moderation); `rate_limit`: RateLimit keywords (requests_per_minute, tokens_per_minute) per
    API key; `log_requests`: True / "full" or "redact" (no content in the log); `kv_dtype`: the KV cache's
    dtype (None / "auto": the model's; "bf16", "fp16", "int8": see llmkit.model.kv_cache); `speculative`:
    draft tokens per step by prompt lookup (llmkit.generate.engine.PromptLookup; 0 / None = off);
    `draft_model`: a model with the same tokenizer whose greedy drafts every lane checks instead (its own
    engine per lane; `speculative` None then means 4, as the CLI's speculative_arg)."""
    if speculative is None:
        speculative = 4 if draft_model is not None else 0
    base_id = model_name or llm.name
    adapters = dict(adapters or {})
    # one lane per model id: (id, model, backend or None, root, parent)
    lanes = [(base_id, llm.model if backend is None else None, backend, getattr(llm, "name", base_id), None)]
    if adapters:
        from llmkit.serve.adapters import adapter_models, check_adapters

        check_adapters(adapters, base_id)
        models = adapter_models(llm.model, adapters)
        lanes += [(name, models[name], None, os.fspath(path), base_id) for name, path in adapters.items()]
    metrics = Metrics()
    store = ResponseStore(store_path)
    guard = get_guard(guard)
    services = []
    for lane_id, model, lane_backend, root, parent in lanes:
        if lane_backend is None:
            from llmkit.generate.engine import Engine

            extra = {"compile": True} if compile else {}  # torch.compile'd decode steps (CUDA graphs on GPU)
            engine = Engine(model, max_batch=max_batch, max_seq_len=max_seq_len,
                            stop_ids=sorted(llm.tokenizer.stop_ids), kv_dtype=kv_dtype,
                            vocab_size=llm.tokenizer.vocab_size, speculative=speculative, **extra)
            if draft_model is not None:
                engine.set_draft_model(draft_model)
            lane_backend = EngineBackend(engine)
        scheduler = Scheduler(lane_backend, max_queue=max_queue, metrics=metrics,
                              lane=lane_id if parent else "")
        svc = Service(llm, scheduler, store=store, metrics=metrics, model_name=lane_id,
                      request_timeout=request_timeout, root=root, parent=parent)
        svc.guard = guard
        services.append(svc)
    router = Router(services)
    service, scheduler = router.base, router.base.scheduler
    # the "look inside" panel's models: each lane's own (shared with its engine; llmkit.serve.inside)
    inspector = Inspector({lane_id: getattr(llm, "model", None) if model is None else model
                           for lane_id, model, *_ in lanes})

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for sched in router.schedulers:
            sched.start()
        try:
            yield
        finally:
            for sched in router.schedulers:
                sched.shutdown()
            inspector.close()

    app = FastAPI(title="llmkit", version="0.1.0", lifespan=lifespan, docs_url="/docs", redoc_url=None,
                  description="OpenAI-compatible API for one model and its LoRA adapters (llmkit serve).")
    app.openapi = lambda: _openapi(app, service.tokenizer.vocab_size)  # type: ignore[method-assign]
    bearer = HTTPBearer(auto_error=False, description="API key (when the server has keys): Bearer KEY")
    key = [Depends(bearer)]  # documentation only: the Auth middleware checks the key
    app.state.service, app.state.scheduler, app.state.metrics = service, scheduler, metrics  # the base's
    app.state.router, app.state.inspector = router, inspector

    @app.exception_handler(LlmkitError)
    async def _llmkit_error(request: Request, exc: LlmkitError):
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 405:  # Starlette names the first matching route's methods only: name them all
            allowed = {m for r in app.router.routes if getattr(r, "methods", None)
                       and r.matches(request.scope)[0] != Match.NONE for m in r.methods}
            return _error_response(exc, {**(exc.headers or {}), "Allow": ", ".join(sorted(allowed))})
        return _error_response(exc)

    @app.exception_handler(Exception)
    async def _any_error(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _error_response(exc)

    if rate_limit:  # inside Auth and BodyLimit: only authenticated, well-sized requests count
        app.add_middleware(RateLimit, **rate_limit)
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    app.add_middleware(Auth, keys=api_keys)  # before the body is even read
    mode = "full" if log_requests is True else (log_requests or None)
    app.add_middleware(Observe, metrics=metrics, log_requests=mode)  # outermost: sees every reply

    async def run(request: Request, coro) -> Any:
        """JSON for a dict, SSE for a stream. Non-streamed work is cancelled (its rows freed) when the client
        disconnects first; a stream is cancelled by Starlette when its client goes away."""
        task = asyncio.ensure_future(coro)
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                break
            if await request.is_disconnected():
                task.cancel()
                raise LlmkitError("client disconnected", status=499)
        result = task.result()
        if isinstance(result, dict):
            return JSONResponse(result)
        return StreamingResponse(result, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/v1/models", response_model=None, dependencies=key,
             responses=_replies(S.ModelList, 401, 500))
    async def models():
        return router.models()

    @app.get("/v1/models/{model_id:path}", response_model=None, dependencies=key,
             responses=_replies(S.ModelCard, 401, 404, 500))
    async def model(model_id: str):
        return router.pick(model_id).card()

    @app.post("/v1/completions", response_model=None, dependencies=key,
              responses=_replies(S.CompletionResponse, *GENERATE, stream="text_completion"))
    async def completions(req: P.CompletionRequest, request: Request):
        return await run(request, run_completions(router.pick(req.model), req))

    @app.post("/v1/chat/completions", response_model=None, dependencies=key,
              responses=_replies(S.ChatCompletionResponse, *GENERATE, stream="chat.completion.chunk"))
    async def chat(req: P.ChatCompletionRequest, request: Request):
        return await run(request, chat_completions(router.pick(req.model), req))

    @app.post("/v1/responses", response_model=None, dependencies=key,
              responses=_replies(S.ResponseObject, *GENERATE, stream="response"))
    async def responses(req: P.ResponsesRequest, request: Request):
        return await run(request, run_responses(router.pick(req.model), req))

    @app.get("/v1/responses/{response_id}", response_model=None, dependencies=key,
             responses=_replies(S.ResponseObject, 401, 404, 500))
    async def get_response(response_id: str):
        return await run_get_response(service, response_id)

    @app.delete("/v1/responses/{response_id}", response_model=None, dependencies=key,
                responses=_replies(S.ResponseDeleted, 401, 404, 500))
    async def delete_response(response_id: str):
        return await run_delete_response(service, response_id)

    @app.post("/v1/inside", response_model=None, dependencies=key,
              responses=_replies(InsideReply, 400, 401, 404, 413, 429, 500))
    async def inside(req: InsideRequest, request: Request):
        """llmkit extension: the chat page's "look inside" panel for a conversation's last answer."""
        return await run(request, inspector.inside(router.pick(req.model), req))

    @app.post("/tokenize", response_model=None, dependencies=key,
              responses=_replies(S.TokenizeResponse, *TOKENIZER))
    async def tokenize(req: P.TokenizeRequest):
        return await tokens.tokenize(router.pick(req.model), req)

    @app.post("/detokenize", response_model=None, dependencies=key,
              responses=_replies(S.DetokenizeResponse, *TOKENIZER))
    async def detokenize(req: P.DetokenizeRequest):
        return await tokens.detokenize(router.pick(req.model), req)

    @app.get("/tokenizer_info", response_model=None, dependencies=key,
             responses=_replies(S.TokenizerInfo, 401, 500))
    async def tokenizer_info():
        return tokens.tokenizer_info(service)

    @app.get("/health", response_model=None, responses=_replies(
        S.Health, 500, extra={503: {"model": S.HealthError, "description": "The engine thread is down"}}))
    async def health():
        lanes = router.schedulers
        down = [s.model_name for s in router.services.values() if not s.scheduler.healthy()]
        if down:
            which = f" ({', '.join(down)})" if len(lanes) > 1 else ""
            return JSONResponse({"status": "error", "reason": "engine thread not running" + which},
                                status_code=503)
        return {"status": "ok", "model": service.model_name, "running": sum(s.running for s in lanes),
                "waiting": sum(s.queue_depth for s in lanes)}

    @app.get("/metrics", response_class=PlainTextResponse, responses={
        200: {"description": "Prometheus text format",
              "content": {"text/plain": {"schema": {"type": "string"}}}},
        500: {"description": ERROR_TEXT[500], "content": {  # not text/plain, as a model here would say
            "application/json": {"schema": ERROR_REF}}}})
    async def prometheus():
        for sched in router.schedulers:
            metrics.set_load(sched.queue_depth, sched.running, sched.lane)
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    return app

"""The FastAPI app: thin routes over `Service`, plus auth, body limit, errors, logging and metrics.

    app = create_app(llm, api_keys=["sk-..."])      # llm: llmkit.load(...) or anything with
    uvicorn.run(app, host="127.0.0.1", port=8000)   # .model, .tokenizer, .name

Notable choices:
- Errors always have the OpenAI shape {"error": {"message", "type", "param", "code"}}: pydantic
  validation -> 400 naming the field (`param`), LlmkitError -> its status, unknown routes -> 404,
  anything else -> 500 with a generic message (the traceback goes to the log only).
- API keys: `Authorization: Bearer KEY` on /v1/* and the tokenizer routes, compared with
  `hmac.compare_digest` against every key (constant time); keys are never logged. /, /health and
  /metrics stay open.
- The body limit is checked on Content-Length and again while the body streams in (chunked uploads).
- Request logging is opt-in (`log_requests`): method, path, status, time and the JSON body with any
  key that looks like a secret removed; headers are never logged.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmkit.errors import LlmkitError
from llmkit.serve import protocol as P
from llmkit.serve.metrics import Metrics
from llmkit.serve.scheduler import Backend, EngineBackend, Scheduler
from llmkit.serve.service import Service
from llmkit.serve.store import ResponseStore

log = logging.getLogger("llmkit.serve")
STATIC = Path(__file__).parent / "static"

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 408: "timeout_error", 413: "invalid_request_error", 429: "rate_limit_error",
          503: "service_unavailable"}


def error_body(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """(HTTP status, OpenAI error JSON) for any exception."""
    param = None
    if isinstance(exc, LlmkitError):
        status, msg, code = exc.status, str(exc), exc.code
        param = getattr(exc, "param", None)
    elif isinstance(exc, RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        status, code = 400, "invalid_value"
        msg = f"{param}: {first.get('msg', 'invalid value')}" if param else str(first.get("msg", "invalid request"))
        if first.get("type") == "json_invalid":
            msg, code = "the request body is not valid JSON", "invalid_json"
    elif isinstance(exc, StarletteHTTPException):
        status, msg, code = exc.status_code, str(exc.detail), None
    else:
        status, msg, code = 500, "internal server error", None
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return status, {"error": {"message": msg, "type": kind, "param": param, "code": code}}


def _error_response(exc: BaseException) -> JSONResponse:
    status, body = error_body(exc)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body, status_code=status, headers=headers)


class BodyLimit:
    """ASGI middleware: 413 for bodies over `limit` bytes (declared or streamed)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = LlmkitError(f"request body larger than {self.limit} bytes", status=413, code="body_too_large")
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await _error_response(too_big)(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise too_big
            return msg

        try:
            await self.app(scope, limited, send)
        except LlmkitError as e:
            if e.status != 413:
                raise
            await _error_response(e)(scope, receive, send)


class Observe:
    """ASGI middleware: counts requests by route and status; with `log_requests`, logs each one."""

    def __init__(self, app, metrics: Metrics, log_requests: bool):
        self.app, self.metrics, self.log_requests = app, metrics, log_requests

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.monotonic()
        status = 500
        body = bytearray()

        async def recv():
            msg = await receive()
            if self.log_requests and msg["type"] == "http.request" and len(body) < 1 << 16:
                body.extend(msg.get("body", b""))
            return msg

        async def snd(msg):
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
            await send(msg)

        try:
            await self.app(scope, recv, snd)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.request_done(route, status)
            if self.log_requests:
                try:
                    shown = json.dumps(_redact(json.loads(body))) if body else ""
                except ValueError:
                    shown = f"<{len(body)} bytes, not JSON>"
                log.info("%s %s -> %d (%.0f ms) %s", scope["method"], scope["path"], status,
                         1000 * (time.monotonic() - t0), shown[:2000])


_SECRET_KEYS = ("key", "token", "secret", "password", "authorization")


def _redact(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: ("***" if any(s in k.lower() for s in _SECRET_KEYS) and k not in ("max_tokens", "top_logprobs",
                    "max_completion_tokens", "max_output_tokens", "tokens") else _redact(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_redact(v) for v in obj]
    return obj


def create_app(llm=None, *, backend: Backend | None = None, api_keys: Sequence[str] = (),
               store_path: str | Path | None = None, model_name: str | None = None, max_batch: int = 8,
               max_queue: int = 64, max_body_bytes: int = 4 << 20, request_timeout: float = 600.0,
               log_requests: bool = False) -> FastAPI:
    """The server for one loaded model. `backend` replaces the engine (tests); `llm` gives the tokenizer."""
    if backend is None:
        from llmkit.generate.engine import Engine

        backend = EngineBackend(Engine(llm.model, max_batch=max_batch, stop_ids=sorted(llm.tokenizer.stop_ids)))
    metrics = Metrics()
    scheduler = Scheduler(backend, max_queue=max_queue, metrics=metrics)
    service = Service(llm, scheduler, store=ResponseStore(store_path), metrics=metrics, model_name=model_name,
                      request_timeout=request_timeout)
    keys = [k.encode() for k in api_keys if k]

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        try:
            yield
        finally:
            scheduler.shutdown()

    app = FastAPI(title="llmkit", version="0.1.0", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.service, app.state.scheduler, app.state.metrics = service, scheduler, metrics

    async def auth(request: Request) -> None:
        if not keys:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        ok = False
        for k in keys:  # every key is compared, whatever matched
            ok |= hmac.compare_digest(given.strip().encode(), k)
        if scheme.lower() != "bearer" or not ok:
            raise LlmkitError("Incorrect API key provided" if header else
                              "Missing API key: send 'Authorization: Bearer YOUR_KEY'", status=401,
                              code="invalid_api_key")

    @app.exception_handler(LlmkitError)
    async def _llmkit_error(request: Request, exc: LlmkitError):
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return _error_response(exc)

    @app.exception_handler(Exception)
    async def _any_error(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _error_response(exc)

    app.add_middleware(Observe, metrics=metrics, log_requests=log_requests)
    app.add_middleware(BodyLimit, limit=max_body_bytes)

    async def reply(request: Request, result: Any):
        """JSON for a dict; SSE for a stream. Non-streamed work is cancelled if the client goes away."""
        if isinstance(result, dict):
            return JSONResponse(result)
        return StreamingResponse(result, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def until_disconnect(request: Request, coro) -> Any:
        """Await `coro`; cancel it (freeing its rows) when the client disconnects first."""
        task = asyncio.ensure_future(coro)
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise LlmkitError("client disconnected", status=499)

    async def run(request: Request, coro) -> Any:
        result = await until_disconnect(request, coro)
        return await reply(request, result)

    v1 = [Depends(auth)]

    @app.get("/v1/models", dependencies=v1)
    async def models():
        return service.models()

    @app.get("/v1/models/{model_id:path}", dependencies=v1)
    async def model(model_id: str):
        service.check_model(model_id)
        return service.models()["data"][0]

    @app.post("/v1/completions", dependencies=v1)
    async def completions(req: P.CompletionRequest, request: Request):
        return await run(request, service.completions(req))

    @app.post("/v1/chat/completions", dependencies=v1)
    async def chat(req: P.ChatCompletionRequest, request: Request):
        return await run(request, service.chat(req))

    @app.post("/v1/responses", dependencies=v1)
    async def responses(req: P.ResponsesRequest, request: Request):
        return await run(request, service.responses(req))

    @app.get("/v1/responses/{response_id}", dependencies=v1)
    async def get_response(response_id: str):
        return service.get_response(response_id)

    @app.delete("/v1/responses/{response_id}", dependencies=v1)
    async def delete_response(response_id: str):
        return service.delete_response(response_id)

    @app.post("/tokenize", dependencies=v1)
    async def tokenize(req: P.TokenizeRequest):
        return service.tokenize(req)

    @app.post("/detokenize", dependencies=v1)
    async def detokenize(req: P.DetokenizeRequest):
        return service.detokenize(req)

    @app.get("/tokenizer_info", dependencies=v1)
    async def tokenizer_info():
        return service.tokenizer_info()

    @app.get("/health")
    async def health():
        if not scheduler.healthy():
            return JSONResponse({"status": "error", "reason": "engine thread not running"}, status_code=503)
        return {"status": "ok", "model": service.model_name, "running": scheduler.running,
                "waiting": scheduler.queue_depth}

    @app.get("/metrics")
    async def prometheus():
        metrics.set_load(scheduler.queue_depth, scheduler.running)
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    return app

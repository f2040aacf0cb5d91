"""Per-key rate limits for the server: requests and tokens per minute, 429 with `Retry-After` beyond them.

    app = RateLimit(app, requests_per_minute=60, tokens_per_minute=20_000)   # ASGI middleware

Notable choices:
- Keyed by the Bearer key (hashed: the limiter never holds a key) or, without one, by the client's IP.
  Place it inside the Auth middleware, so only valid keys have budgets, and inside BodyLimit, whose body it
  reads (BodyLimit has already bounded it).
- A sliding window of 60 s: each admitted request is logged with its time and token cost; a request is
  admitted when the last minute's requests are fewer than `requests_per_minute` and their tokens plus its
  own cost are at most `tokens_per_minute`. A refusal is a 429 in OpenAI's error shape (code
  "rate_limit_exceeded") with `Retry-After`: whole seconds until enough of the window has expired.
- Tokens are an up-front reservation, not a count of what was generated: the request's `max_tokens`
  (or `max_completion_tokens` / `max_output_tokens`; `default_max_tokens` when it sets none) times `n`,
  plus the body's size / 4 as a rough prompt size (about four bytes per token of JSON text). Nothing is
  refunded when a generation stops early: a client that asks for less gets more requests through.
- A request whose cost alone exceeds `tokens_per_minute` can never pass: 400 saying so, not 429.
- Only paths under `paths` (default "/v1/") are limited; /health, /metrics and the chat page are not.
- Time comes from `clock` (monotonic seconds), injectable for tests.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import deque
from collections.abc import Callable, Sequence

from starlette.responses import JSONResponse

from llmkit.errors import LlmkitError
from llmkit.serve.protocol import error_body

WINDOW = 60.0  # seconds


class RateLimit:
    """ASGI middleware: sliding-window request and token limits per API key (or client IP)."""

    def __init__(self, app, requests_per_minute: int | None = None, tokens_per_minute: int | None = None, *,
                 clock: Callable[[], float] = time.monotonic, default_max_tokens: int = 256,
                 paths: Sequence[str] = ("/v1/",)):
        for name, v in (("requests_per_minute", requests_per_minute),
                        ("tokens_per_minute", tokens_per_minute)):
            if v is not None and v < 1:
                raise LlmkitError(f"{name} must be at least 1, not {v}")
        self.app, self.rpm, self.tpm = app, requests_per_minute, tokens_per_minute
        self.clock, self.default_max_tokens, self.paths = clock, default_max_tokens, tuple(paths)
        self.log: dict[str, deque[tuple[float, int]]] = {}  # key -> (time, tokens) of admitted requests

    async def __call__(self, scope, receive, send):
        if (scope["type"] != "http" or not scope["path"].startswith(self.paths)
                or (self.rpm is None and self.tpm is None)):
            return await self.app(scope, receive, send)
        messages = []
        cost = 0
        if self.tpm is not None and scope["method"] in ("POST", "PUT", "PATCH"):
            body = bytearray()
            while True:
                msg = await receive()
                messages.append(msg)
                if msg["type"] != "http.request":
                    break
                body.extend(msg.get("body", b""))
                if not msg.get("more_body"):
                    break
            cost = self.cost(bytes(body))
        try:
            self.admit(self.key(scope), cost)
        except LlmkitError as e:
            status, payload = error_body(e)
            headers = {"Retry-After": str(e.retry_after)} if getattr(e, "retry_after", None) else None
            return await JSONResponse(payload, status_code=status, headers=headers)(scope, receive, send)

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    @staticmethod
    def key(scope) -> str:
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, given = header.partition(b" ")
        if scheme.lower() == b"bearer" and given.strip():
            return "key:" + hashlib.sha256(given.strip()).hexdigest()
        client = scope.get("client")
        return "ip:" + (client[0] if client else "unknown")

    def cost(self, body: bytes) -> int:
        """Tokens reserved for a request body: n x max_tokens (or the default) + body bytes / 4."""
        try:
            obj = json.loads(body) if body else {}
        except ValueError:
            obj = {}
        if not isinstance(obj, dict):
            obj = {}
        limit = next((obj[k] for k in ("max_tokens", "max_completion_tokens", "max_output_tokens")
                      if isinstance(obj.get(k), int) and not isinstance(obj.get(k), bool)), None)
        n = obj.get("n") if isinstance(obj.get("n"), int) and not isinstance(obj.get("n"), bool) else 1
        out = self.default_max_tokens if limit is None else max(limit, 0)
        return max(n, 1) * out + len(body) // 4

    def admit(self, key: str, cost: int) -> None:
        """Record the request, or raise a 429 (with `.retry_after` seconds) / 400 (cost over the limit)."""
        now = self.clock()
        log = self.log.setdefault(key, deque())
        while log and log[0][0] <= now - WINDOW:
            log.popleft()
        if self.tpm is not None and cost > self.tpm:
            raise LlmkitError(f"this request reserves about {cost} tokens, more than the limit of {self.tpm} "
                              "tokens per minute: lower max_tokens or the prompt", code="tokens_exceed_limit")
        wait = 0.0
        if self.rpm is not None and len(log) >= self.rpm:
            wait = log[len(log) - self.rpm][0] + WINDOW - now  # when enough requests have left the window
        if self.tpm is not None:
            used = sum(t for _, t in log)
            for t0, t in log:  # the oldest entries expire first
                if used + cost <= self.tpm:
                    break
                used -= t
                wait = max(wait, t0 + WINDOW - now)
        if wait > 0:
            if not log:
                del self.log[key]
            err = LlmkitError(f"rate limit reached: at most {self.rpm or 'unlimited'} requests and "
                              f"{self.tpm or 'unlimited'} tokens per minute; retry in {math.ceil(wait)} s",
                              status=429, code="rate_limit_exceeded")
            err.retry_after = max(1, math.ceil(wait))  # type: ignore[attr-defined]
            raise err
        log.append((now, cost))
        if len(self.log) > 10_000:  # forget keys idle for a whole window
            for k in [k for k, v in self.log.items() if not v or v[-1][0] <= now - WINDOW]:
                del self.log[k]

"""HTTPBackend: evaluation requests answered by any OpenAI-compatible server (llmkit serve, vLLM, llama.cpp's
server) through `/v1/completions`; the over-the-wire twin of `LocalBackend`.

    backend = HTTPBackend("http://127.0.0.1:8000/v1")        # model: the server's first /v1/models id
    answers = backend.run(requests)                           # same answers, same order as LocalBackend

Notable choices
- Transport: the standard library only (http.client), one keep-alive connection per worker thread, JSON in and
  out; proxies are not used. `concurrency` threads each send one request of up to `batch_size` prompts (the
  completions API takes a list of prompts). 429, 5xx and connection errors are retried (3 tries, backoff 0.5 s
  then 1 s, or the server's Retry-After up to 30 s); anything else is one LlmkitError line naming the URL and
  quoting the server's message. A reply that takes longer than `timeout` seconds is an error, not retried.
- Log-likelihood with the server's tokenizer route (vLLM's `POST /tokenize`, which llmkit serve has): context
  and context + continuation are tokenized there by lm-eval's rule (`backends.encode_pair`: trailing spaces
  move to the continuation, an empty context becomes the BOS/EOS token named by `GET /tokenizer_info`) and
  the prompt is sent as token ids, so the continuation is exactly the tokens LocalBackend scores. The answer
  is the sum of the echoed `token_logprobs` over those tokens; it is greedy when each of them equals the best
  `top_logprobs` entry at its position (lm-eval's test, up to float rounding: 1e-5 relative). Requests
  longer than the server's context keep their last tokens (one fewer than LocalBackend keeps: the server
  takes at most its context length as a prompt).
- Without /tokenize the text is sent and the continuation is the tokens whose `text_offset` lies at or after
  the end of the context: approximate when a token straddles the boundary. An empty context is then prefixed
  with the BOS/EOS text when /tokenizer_info gives it, else the continuation's first token goes unscored.
- `echo` with `max_tokens: 0` scores the prompt only (llmkit, vLLM); a server that refuses 0 is asked once
  with `max_tokens: 1`, the generated token is dropped, and that choice is kept for the rest of the run.
- rolling (perplexity): with /tokenize, exactly LocalBackend's computation: [BOS/EOS] + ids(text) cut into
  lm-eval's rolling windows (`llmkit.score.sliding_windows`, stride window - 1 unless the request says),
  each window a token-id prompt scored by echo. Without it, the text is cut on paragraph boundaries into
  pieces of at most 4,000 characters, each prefixed with the BOS/EOS text when known (else each piece's first
  token is unscored, and `Rolling.tokens` counts only the scored ones).
- generate: text prompts (the server adds BOS and parses special-token text, as LocalBackend's
  `encode_prompt` does), greedy unless temperature > 0, top_p 1 plus the vLLM-style extras top_k -1, min_p 0
  and repetition_penalty 1, so a model's generation defaults on the server do not apply (LocalBackend samples
  without them). At most 4 stop strings are sent (OpenAI's limit); the others are cut here, at the stop that
  completes first. With /tokenize, a prompt too long for the server keeps its last tokens as llmkit's engine
  does (room for max_tokens, at least half the context).
"""

from __future__ import annotations

import http.client
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

from llmkit.errors import LlmkitError
from llmkit.eval.backends import Backend, fit, split_pair
from llmkit.eval.base import LogLikelihood, Request, Rolling

log = logging.getLogger("llmkit.eval")

TRIES = 3
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
MAX_STOPS = 4  # OpenAI's limit on `stop`
GREEDY_TOL = 1e-5  # relative: a continuation token whose logprob is this close to the best counts as the best
PIECE_CHARS = 4000  # rolling without /tokenize: characters per scored piece
ROLLING_WINDOW = 2048  # rolling when the server does not say its context length
T = TypeVar("T")


@dataclass(frozen=True)
class _Tokenizer:
    """What the server's tokenizer routes tell (found once, on first need)."""

    routes: bool  # POST /tokenize works
    prefix_id: int | None  # BOS, else EOS (lm-eval's prefix token for an empty context)
    prefix_text: str | None


@dataclass(frozen=True)
class _Scored:
    """One echo-scored prompt: which of its positions count."""

    prompt: str | list[int]
    start: int  # token ids: the first scored position; text: the first scored character of `prompt`


class HTTPBackend(Backend):
    """Any OpenAI-compatible server answering requests over `/v1/completions`."""

    name = "http"

    def __init__(self, api_base: str, api_key: str | None = None, model: str | None = None, *,
                 concurrency: int = 4, timeout: float = 600, batch_size: int = 16):
        if batch_size < 1:
            raise LlmkitError(f"--batch-size must be >= 1, got {batch_size}")
        if concurrency < 1:
            raise LlmkitError(f"concurrency must be >= 1, got {concurrency}")
        if not timeout > 0:
            raise LlmkitError(f"timeout must be > 0 seconds, got {timeout}")
        parts = urlsplit(api_base.strip())
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise LlmkitError(f"--api-base must be an http(s) URL such as http://127.0.0.1:8000/v1, "
                              f"got {api_base!r}")
        path = re.sub(r"/(chat/)?completions$", "", parts.path.rstrip("/")) or "/v1"
        self.api_base = f"{parts.scheme}://{parts.netloc}{path}"
        self._scheme, self._netloc = parts.scheme, parts.netloc
        self._api_path, self._root_path = path, path.removesuffix("/v1")
        self.api_key = api_key or None
        self.concurrency, self.timeout, self.batch_size = concurrency, float(timeout), batch_size
        self._local = threading.local()
        self._lock = threading.RLock()
        self._pool: ThreadPoolExecutor | None = None
        self._echo_tokens: int | None = None  # 0 or 1 once known
        self._tok: _Tokenizer | None = None
        self._ids: dict[tuple[str, bool, bool], list[int]] = {}
        self._warned: set[str] = set()
        self._cards: list[dict] | None = None
        if model is None:
            self._cards = self._models()
            if not self._cards:
                raise LlmkitError(f"{self.api_base}/models lists no model; pass the model id")
            model = str(self._cards[0]["id"])
        self.model = model

    def info(self) -> dict:
        return {"backend": self.name, "api_base": self.api_base, "model": self.model}

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None

    # ------------------------------------------------------------------------------------- the three kinds
    def loglikelihood(self, reqs: Sequence[Request]) -> list[LogLikelihood]:
        tok = self._tokenizer()
        jobs = self._token_pairs(reqs, tok) if tok.routes else [self._text_pair(r, tok) for r in reqs]
        return [LogLikelihood(lp, greedy, n) for lp, greedy, n in self._score(jobs)]

    def generate(self, reqs: Sequence[Request]) -> list[list[str]]:
        limit = self._context() if self._tokenizer().routes else None
        calls: list[tuple[dict[str, Any], list[int]]] = []
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(reqs):
            groups.setdefault((r.max_tokens, r.stop, r.temperature, r.n, r.seed), []).append(i)
        for (max_tokens, stop, temperature, n, seed), idx in groups.items():
            body = {"model": self.model, "max_tokens": max_tokens, "temperature": temperature, "top_p": 1.0,
                    "top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0, "n": n}
            if stop:
                body["stop"] = list(stop[:MAX_STOPS])
            if seed is not None:
                body["seed"] = seed
            fits = []
            for i in idx:
                cut = self._fit_prompt(reqs[i].context, max_tokens, limit) if limit else None
                if cut is None:
                    fits.append(i)
                else:  # a prompt cut to fit the context: its own call, with fewer new tokens
                    calls.append(({**body, "prompt": cut[0], "max_tokens": cut[1]}, [i]))
            for k in range(0, len(fits), self.batch_size):
                chunk = fits[k:k + self.batch_size]
                calls.append(({**body, "prompt": [reqs[i].context for i in chunk]}, chunk))
        out: list[list[str]] = [[] for _ in reqs]
        for (body, idx), reply in zip(calls, self._map(lambda c: self._post(c[0]), calls)):
            n = body["n"]
            for choice in self._choices(reply, len(idx) * n):
                i = idx[int(choice.get("index", 0)) // n]
                out[i].append(cut_at_stops(str(choice.get("text") or ""), reqs[i].stop[MAX_STOPS:]))
        return out

    def rolling(self, reqs: Sequence[Request]) -> list[Rolling]:
        from llmkit.score import sliding_windows

        tok = self._tokenizer()
        jobs: list[_Scored] = []
        owner: list[int] = []  # the request each job scores a part of
        if tok.routes:
            limit = (self._context() or ROLLING_WINDOW) - self._echo_mode()
            enc = self._encode_all([(r.context, False, False) for r in reqs])
            if tok.prefix_id is None:
                self._warn("prefix", f"{self._root_url('/tokenizer_info')} names no BOS/EOS token: the first "
                           "token of each text is not scored")
            for i, r in enumerate(reqs):
                ids = enc[(r.context, False, False)]
                ids = ids if tok.prefix_id is None else [tok.prefix_id, *ids]
                window = min(r.window or limit, limit)
                stride = r.stride or window - 1
                if window < 2 or not 1 <= stride <= window:
                    raise LlmkitError(f"rolling: window {window} and stride {stride} must satisfy "
                                      "window >= 2 and 1 <= stride <= window")
                if len(ids) >= 2:
                    for b, e, first in sliding_windows(len(ids), window, stride):
                        jobs.append(_Scored(ids[b:e], first))
                        owner.append(i)
        else:
            prefix = self._text_prefix(tok, "each piece's first token")
            for i, r in enumerate(reqs):
                for piece in paragraphs(r.context, PIECE_CHARS):
                    jobs.append(_Scored(prefix + piece, len(prefix)))
                    owner.append(i)
        nll, count = [0.0] * len(reqs), [0] * len(reqs)
        for i, (lp, _greedy, n) in zip(owner, self._score(jobs)):
            nll[i] -= lp
            count[i] += n
        return [Rolling(nll[i], count[i]) for i in range(len(reqs))]

    # ------------------------------------------------------------------------------------- echo scoring
    def _token_pairs(self, reqs: Sequence[Request], tok: _Tokenizer) -> list[_Scored]:
        """lm-eval's encode_pair over the server's tokenizer, then its left truncation (backends.fit)."""
        pairs = [split_pair(r.context, r.continuation) for r in reqs]
        wanted = [(t, True, False) for c, k in pairs for t in ((c, c + k) if c else (k,))]
        enc = self._encode_all(wanted)
        limit = self._context()
        jobs = []
        for (c, k), r in zip(pairs, reqs):
            if c:
                ctx = enc[(c, True, False)]
                cont = enc[(c + k, True, False)][len(ctx):]
            elif tok.prefix_id is None:
                raise LlmkitError(f"{self._root_url('/tokenizer_info')} gives no BOS/EOS token (vLLM: start "
                                  "it with --enable-tokenizer-info-endpoint), so a request with an empty "
                                  "context cannot be scored as lm-eval does")
            else:
                ctx, cont = [tok.prefix_id], enc[(k, True, False)]
            if not cont:
                raise LlmkitError(f"empty continuation after tokenization: {r.continuation!r}")
            if limit:  # the server takes at most `limit` prompt tokens (limit - 1 when echo generates one)
                ctx, cont = fit(ctx, cont, limit - 1 - self._echo_mode())
            jobs.append(_Scored(ctx + cont, len(ctx)))
        return jobs

    def _text_pair(self, r: Request, tok: _Tokenizer) -> _Scored:
        ctx, cont = split_pair(r.context, r.continuation)
        if not cont:
            raise LlmkitError(f"empty continuation: {r.continuation!r}")
        ctx = ctx or self._text_prefix(tok, "the first token of a continuation with an empty context")
        return _Scored(ctx + cont, len(ctx))

    def _score(self, jobs: list[_Scored]) -> list[tuple[float, bool, int]]:
        """(sum of the scored positions' logprobs, greedy at each, how many) for each job, by echo."""
        if not jobs:
            return []
        self._echo_mode()
        chunks = [jobs[k:k + self.batch_size] for k in range(0, len(jobs), self.batch_size)]
        return [x for part in self._map(self._echo, chunks) for x in part]

    def _echo_mode(self) -> int:
        """max_tokens for scoring a prompt: 0, or 1 for a server that refuses 0 (asked once)."""
        with self._lock:
            if self._echo_tokens is None:
                body = {"model": self.model, "prompt": "Hello", "echo": True, "logprobs": 1,
                        "temperature": 0.0}
                try:
                    self._post({**body, "max_tokens": 0})
                    self._echo_tokens = 0
                except LlmkitError as e:
                    if e.status not in (400, 422):
                        raise
                    log.info("%s refused max_tokens 0 with echo (%s); scoring with max_tokens 1",
                             self.api_base, e)
                    self._post({**body, "max_tokens": 1})
                    self._echo_tokens = 1
            return self._echo_tokens

    def _echo(self, chunk: list[_Scored]) -> list[tuple[float, bool, int]]:
        reply = self._post({"model": self.model, "prompt": [j.prompt for j in chunk], "echo": True,
                            "logprobs": 1, "temperature": 0.0, "max_tokens": self._echo_tokens})
        choices = self._choices(reply, len(chunk))
        return [self._positions(job, choice) for job, choice in zip(chunk, choices)]

    def _positions(self, job: _Scored, choice: dict) -> tuple[float, bool, int]:
        lp = choice.get("logprobs") or {}
        lps, tops, offs = lp.get("token_logprobs"), lp.get("top_logprobs"), lp.get("text_offset")
        url = self._url("/completions")
        if not isinstance(lps, list) or not lps:
            raise LlmkitError(f"{url} returned no prompt logprobs for echo=true: log-likelihood and "
                              "perplexity need a server that scores the prompt (llmkit serve, vLLM)")
        n = len(lps) - (self._echo_tokens or 0)  # the prompt's positions (a generated token is dropped)
        if isinstance(job.prompt, list):
            if n != len(job.prompt):
                raise LlmkitError(f"{url} echoed {n} prompt tokens for a prompt of {len(job.prompt)}")
            idx = range(job.start, n)
        else:
            if not isinstance(offs, list) or len(offs) < n:
                raise LlmkitError(f"{url} returned no text_offset with the prompt logprobs")
            text = str(choice.get("text") or "")
            echoed = text[:offs[n]] if n < len(offs) else text
            lead = echoed.find(job.prompt)  # where the prompt starts in the echo (after a BOS text, say)
            lead = lead if lead >= 0 else max(0, len(echoed) - len(job.prompt))
            idx = [i for i in range(n) if offs[i] >= lead + job.start]
        total, greedy, count = 0.0, True, 0
        for i in idx:
            x = lps[i]
            if x is None:
                if isinstance(job.prompt, list):
                    raise LlmkitError(f"{url} gave no logprob for prompt token {i}")
                continue  # the prompt's first token (text without a prefix)
            total += float(x)
            count += 1
            top = tops[i] if isinstance(tops, list) and i < len(tops) else None
            greedy = greedy and bool(top) and is_top(float(x), [float(v) for v in top.values()])
        return total, greedy and count > 0, count

    # ------------------------------------------------------------------------------------- tokenizer routes
    def _tokenizer(self) -> _Tokenizer:
        with self._lock:
            if self._tok is None:
                self._tok = self._probe_tokenizer()
            return self._tok

    def _probe_tokenizer(self) -> _Tokenizer:
        try:
            got = self._request("POST", self._root_path + "/tokenize",
                                {"model": self.model, "prompt": "Hello world", "add_special_tokens": False})
            routes = isinstance(got.get("tokens"), list) and all(isinstance(t, int) for t in got["tokens"])
        except LlmkitError as e:
            if e.status == 401 or e.code == "unreachable":
                raise
            routes = False
        if not routes:
            self._warn("tokenize", f"{self._root_url('/tokenize')} is not available: continuations are split "
                       "by text_offset (approximate at the boundary)")
        try:
            info = self._request("GET", self._root_path + "/tokenizer_info")
        except LlmkitError as e:
            if e.status == 401 or e.code == "unreachable":
                raise
            info = {}

        def text_of(v: Any) -> str | None:
            v = v.get("content") if isinstance(v, dict) else v
            return v if isinstance(v, str) and v else None

        for which in ("bos", "eos"):
            tid, text = info.get(f"{which}_token_id"), text_of(info.get(f"{which}_token"))
            if not isinstance(tid, int) and text is not None and routes:
                ids = self._tokenize(text, True, False)
                tid = ids[0] if len(ids) == 1 else None
            if isinstance(tid, int) or text is not None:
                return _Tokenizer(routes, tid if isinstance(tid, int) else None, text)
        return _Tokenizer(routes, None, None)

    def _tokenize(self, text: str, special: bool, add_special: bool) -> list[int]:
        key = (text, special, add_special)
        ids = self._ids.get(key)
        if ids is None:
            body: dict[str, Any] = {"model": self.model, "prompt": text, "add_special_tokens": add_special}
            if not special:
                body["parse_special"] = False  # llmkit / llama.cpp's name; vLLM always parses special text
            got = self._request("POST", self._root_path + "/tokenize", body).get("tokens")
            if not isinstance(got, list):
                raise LlmkitError(f"{self._root_url('/tokenize')} replied without a `tokens` list")
            ids = [int(t) for t in got]
            if len(self._ids) > 8192:
                self._ids.clear()
            self._ids[key] = ids
        return ids

    def _encode_all(self, items: list[tuple[str, bool, bool]]) -> dict[tuple[str, bool, bool], list[int]]:
        """(text, parse special, add BOS/EOS) -> its ids, tokenized by the server in parallel."""
        unique = list(dict.fromkeys(items))
        return dict(zip(unique, self._map(lambda k: self._tokenize(*k), unique)))

    def _fit_prompt(self, text: str, max_tokens: int, limit: int) -> tuple[list[int], int] | None:
        """None when `text` fits the context with max_tokens; else (its last tokens, new tokens left)."""
        if len(text.encode("utf-8")) + 2 + max_tokens <= limit:  # every token holds at least one byte
            return None
        ids = self._tokenize(text, True, True)
        if len(ids) + max_tokens <= limit:
            return None
        keep = max(min(limit - max_tokens, limit - 1), limit // 2)
        return ids[-keep:], limit - keep

    def _text_prefix(self, tok: _Tokenizer, what: str) -> str:
        if tok.prefix_text is not None:
            return tok.prefix_text
        self._warn("prefix-text", f"the server names no BOS/EOS token: {what} is not scored")
        return ""

    def _context(self) -> int | None:
        """The server's context length (/v1/models `max_model_len`), None when it does not say."""
        if self._cards is None:
            try:
                self._cards = self._models()
            except LlmkitError as e:
                if e.status == 401 or e.code == "unreachable":
                    raise
                self._cards = []
        mine = [c for c in self._cards if c.get("id") == self.model] or self._cards or [{}]
        n = mine[0].get("max_model_len")
        return n if isinstance(n, int) and n > 2 else None

    def _models(self) -> list[dict]:
        data = self._request("GET", self._api_path + "/models").get("data")
        return [c for c in data if isinstance(c, dict) and "id" in c] if isinstance(data, list) else []

    # ------------------------------------------------------------------------------------- transport
    def _url(self, path: str) -> str:
        return self.api_base + path

    def _root_url(self, path: str) -> str:
        return f"{self._scheme}://{self._netloc}{self._root_path}{path}"

    def _post(self, body: dict[str, Any]) -> dict:
        return self._request("POST", self._api_path + "/completions", body)

    def _choices(self, reply: dict, n: int) -> list[dict]:
        """The reply's n choices, ordered by their index."""
        choices = reply.get("choices")
        ok = isinstance(choices, list) and all(isinstance(c, dict) for c in choices)
        if not ok or len(choices) != n:
            got = len(choices) if isinstance(choices, list) else "no"
            raise LlmkitError(f"{self._url('/completions')} returned {got} choices where {n} were expected")
        return sorted(choices, key=lambda c: int(c.get("index", 0)))

    def _map(self, fn: Callable[[Any], T], items: Sequence[Any]) -> list[T]:
        if len(items) <= 1 or self.concurrency == 1:
            return [fn(x) for x in items]
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="llmkit-http")
            pool = self._pool
        return list(pool.map(fn, items))

    def _connection(self, fresh: bool = False) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None or fresh:
            if conn is not None:
                conn.close()
            cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
            conn = self._local.conn = cls(self._netloc, timeout=self.timeout)
            self._local.used = False
        return conn

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict:
        """One JSON call with retries; the reply's JSON object, or one LlmkitError line."""
        url = f"{self._scheme}://{self._netloc}{path}"
        data = None if body is None else json.dumps(body).encode("utf-8")
        headers = {"Accept": "application/json", "User-Agent": "llmkit-eval"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        wait, attempt, stale_retry = 0.5, 0, True
        while True:
            attempt += 1
            conn = self._connection()
            reused = getattr(self._local, "used", False)
            try:
                conn.request(method, path, body=data, headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
                self._local.used = True
            except TimeoutError as e:
                self._connection(fresh=True)
                raise LlmkitError(f"{url}: no reply within {self.timeout:g} s; give a longer timeout or a "
                                  "smaller --batch-size", status=504, code="timeout") from e
            except (OSError, http.client.HTTPException) as e:
                self._connection(fresh=True)
                if reused and stale_retry and isinstance(e, ConnectionError):
                    stale_retry, attempt = False, attempt - 1  # a kept-alive connection the server closed
                    continue
                if attempt >= TRIES:
                    reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
                    raise LlmkitError(f"cannot reach {url}: {reason}; is the server running?", status=503,
                                      code="unreachable") from e
                time.sleep(wait)
                wait *= 2
                continue
            status = resp.status
            if status < 300:
                try:
                    out = json.loads(raw)
                except ValueError as e:
                    raise LlmkitError(f"{url}: the reply is not JSON ({raw[:80]!r}); is this an "
                                      "OpenAI-compatible server?", status=502) from e
                if not isinstance(out, dict):
                    raise LlmkitError(f"{url}: the reply is not a JSON object", status=502)
                return out
            msg = error_message(raw)
            if status == 401:
                if self.api_key:
                    raise LlmkitError(f"{url}: the server refused the API key ({msg}): check --api-key",
                                      status=401, code="invalid_api_key")
                raise LlmkitError(f"{url}: the server wants an API key: pass --api-key", status=401,
                                  code="invalid_api_key")
            if status in RETRY_STATUS and attempt < TRIES:
                delay = retry_after(resp.getheader("Retry-After"))
                time.sleep(min(wait if delay is None else delay, 30.0))
                wait *= 2
                continue
            tries = f" after {TRIES} tries" if status in RETRY_STATUS else ""
            raise LlmkitError(f"{url}: HTTP {status}{tries}: {msg}", status=status)

    def _warn(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg)


# ----------------------------------------------------------------------------------------- helpers
def error_message(raw: bytes) -> str:
    """The server's error message on one line: OpenAI's {"error": {"message"}}, FastAPI's {"detail"}, or the
    text."""
    text = raw.decode("utf-8", "replace")
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if isinstance(body, dict):
        err = body.get("error", body.get("detail", body.get("message")))
        if isinstance(err, dict):
            err = err.get("message", err)
        if err is not None:
            text = err if isinstance(err, str) else json.dumps(err)
    text = " ".join(text.split())
    return (text[:300] + "...") if len(text) > 300 else (text or "(empty reply)")


def is_top(logprob: float, top: Sequence[float]) -> bool:
    """The token is the most likely one: its logprob is the best of `top`, up to float rounding (a server may
    compute the two by different formulas: llmkit serve's differ in the last bits)."""
    best = max(top)
    return logprob >= best - GREEDY_TOL * max(1.0, abs(best))


def retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """`text` up to the stop string that completes first (as a server stops), without it."""
    best: tuple[int, int] | None = None
    for s in stops:
        i = text.find(s)
        if s and i >= 0 and (best is None or (i + len(s), i) < best):
            best = (i + len(s), i)
    return text if best is None else text[:best[1]]


def paragraphs(text: str, limit: int) -> list[str]:
    """`text` cut into pieces of at most `limit` characters that join back into it: whole paragraphs where
    they fit (blank lines end a paragraph), a longer paragraph at its last whitespace before the limit."""
    units: list[str] = []
    for p in re.findall(r".*?(?:\n\s*\n|\Z)", text, flags=re.S):
        while len(p) > limit:
            cut = max(p.rfind(" ", 0, limit), p.rfind("\n", 0, limit))
            cut = cut + 1 if cut > 0 else limit
            units.append(p[:cut])
            p = p[cut:]
        if p:
            units.append(p)
    pieces: list[str] = []
    for u in units:
        if pieces and len(pieces[-1]) + len(u) <= limit:
            pieces[-1] += u
        else:
            pieces.append(u)
    return pieces

"""Continuous batching: one thread drives the engine; requests join and leave the batch between steps.

The asyncio side (routes) calls `Scheduler.submit` (one prompt) or `submit_many` (several prompts of one
request), which queue one `Job` per generated sequence and return at once. The engine thread loops: remove
cancelled rows, admit waiting jobs while there are free rows, run one `step()` for every running row, and
hand each row's new token to its job's asyncio queue with `loop.call_soon_threadsafe`. A job is cancelled by
its consumer (client gone, stop string seen, timeout); the row is freed before the next step, and a
cancelled job still waiting leaves the queue (it no longer counts against `max_queue`).

Notable choices:
- Admission is all-or-nothing per request: when the queue cannot take every job of a request (all its
  prompts and samples) it takes none of them (429, nothing of the request stays queued); a request with more
  jobs than `max_queue` can never fit and is a 400 saying so (param "n", or "prompt" for several prompts).
  `cancel_jobs` takes back a request's jobs at once (a route that fails after submitting).
- One request never fails the others: a row that fails in a step (its processor raises, its sampling or
  forward fails alone) comes back as a TokenOut with `error`, and only its job gets that error (an
  LlmkitError as it is; anything else is logged and becomes a 500 "engine error"); if the whole step
  raises, every running row is stepped again alone (`Backend.step(keys)`) and only the rows that still
  fail get the error.

The engine is reached through `Backend`, the three calls the loop needs (`add`, `step`, `remove`);
`EngineBackend` adapts llmkit.generate.Engine to it. A row's prompt is prefilled inside the next step,
batched with the other rows that joined (the engine's chunked prefill), so a new request never stalls the
running ones for a whole prompt, and many new requests are prefilled together.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from llmkit.errors import LlmkitError
from llmkit.generate.sampling import TokenLogprob

log = logging.getLogger("llmkit.serve")

# one prompt of a request: (prompt ids, one params per sample, one processor list per sample or None)
PromptJobs = tuple[list[int], Sequence[Any], Sequence[Sequence[Callable]] | None]

@dataclass
class TokenOut:
    """One new token of one row, as produced by a step (token_id None: a prefill-only row ended)."""

    key: int
    token_id: int | None
    logprob: TokenLogprob | None = None
    finish_reason: str | None = None  # "stop" | "length" | "error" once the row is finished
    prompt_logprobs: list[TokenLogprob | None] | None = None  # echo: on the row's first output
    error: Exception | None = None  # finish_reason "error": why this row (only) failed


@dataclass
class Prefilled:
    """A job's row is taken: how many prompt tokens the prefix cache already held."""

    cached_tokens: int = 0


class Backend(Protocol):
    max_rows: int
    max_seq_len: int

    def add(self, key: int, prompt_ids: list[int], params: Any, processors: Sequence[Callable]) -> Prefilled:
        """Start a row (its prompt is prefilled by the next step)."""

    def step(self, keys: Sequence[int] | None = None) -> list[TokenOut]:
        """Prefill the rows that joined, then one new token for every running row (or only `keys`'); a row
        that fails alone comes back with finish_reason "error" and `error`."""

    def remove(self, key: int) -> None:
        """Drop a row (finished or cancelled) and free its slot."""


class EngineBackend:
    """`Backend` over llmkit.generate.Engine: maps job keys to engine rows."""

    def __init__(self, engine):
        self.engine = engine
        self.max_rows = engine.max_batch
        self.max_seq_len = engine.capacity
        self._row: dict[int, int] = {}
        self._key: dict[int, int] = {}

    def add(self, key: int, prompt_ids: list[int], params: Any, processors: Sequence[Callable]) -> Prefilled:
        row = self.engine.add(prompt_ids, params, processors=processors or ())
        self._row[key], self._key[row] = row, key
        return Prefilled(self.engine.request(row).cached_tokens)

    def step(self, keys: Sequence[int] | None = None) -> list[TokenOut]:
        rows = None if keys is None else [self._row[k] for k in keys if k in self._row]
        return [TokenOut(self._key[o.row], o.token_id, o.logprob, o.finish_reason, o.prompt_logprobs, o.error)
                for o in self.engine.step(rows) if o.row in self._key]

    def remove(self, key: int) -> None:
        row = self._row.pop(key, None)
        if row is not None:
            self._key.pop(row, None)
            self.engine.remove(row)


@dataclass
class Job:
    """One sequence to generate; its events arrive on `queue` as (index, Prefilled | TokenOut | Exception)."""

    prompt_ids: list[int]
    params: Any
    processors: Sequence[Callable]
    index: int
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    key: int = 0
    submitted: float = field(default_factory=time.monotonic)
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True

    def _emit(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (self.index, item))


def _user_error(e: Exception, what: str) -> LlmkitError:
    """The error a request's client sees: an LlmkitError as it is; anything else is logged (with its
    traceback) and becomes a 500."""
    if isinstance(e, LlmkitError):
        return e
    log.error(what, exc_info=e)
    return LlmkitError(f"engine error: {type(e).__name__}: {e}", status=500, code="engine_error")


def _deliver(items: list[tuple[Job, Any]]) -> None:
    for job, item in items:
        job.queue.put_nowait((job.index, item))


class Scheduler:
    def __init__(self, backend: Backend, *, max_queue: int = 64, metrics=None, lane: str = ""):
        self.backend = backend
        self.lane = lane  # the model id this scheduler serves (metrics gauges, thread name)
        self.max_queue = max_queue
        self.metrics = metrics
        self._waiting: deque[Job] = deque()
        self._running: dict[int, Job] = {}
        self._cv = threading.Condition()
        self._keys = itertools.count(1)
        self._stop = False
        self._thread: threading.Thread | None = None
        self.steps = 0

    # ------------------------------------------------------------------ asyncio side
    def start(self) -> None:
        if self._thread is None:
            self._stop = False
            name = f"llmkit-engine-{self.lane}" if self.lane else "llmkit-engine"
            self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def submit(self, prompt_ids: list[int], params_list: Sequence[Any],
               processors: Sequence[Sequence[Callable]] | None = None, *,
               queue: asyncio.Queue | None = None, first_index: int = 0) -> tuple[list[Job], asyncio.Queue]:
        """Queue one job per params (n > 1 gives n jobs sharing one queue); 429 when the queue cannot take
        them all (none is queued then), 400 when they are more than the queue can ever hold.

        Events arrive on the queue as (index, Prefilled | TokenOut | LlmkitError); indexes start at
        `first_index` so several prompts can share one queue."""
        return self.submit_many([(prompt_ids, params_list, processors)], queue=queue, first_index=first_index)

    def submit_many(self, prompts: Sequence[PromptJobs], *, queue: asyncio.Queue | None = None,
                    first_index: int = 0) -> tuple[list[Job], asyncio.Queue]:
        """Queue the jobs of several prompts of one request at once, all or nothing: `prompts` holds
        (prompt_ids, params_list, processors) per prompt; the jobs share one queue and are indexed in order
        from `first_index` (prompt k's samples follow prompt k-1's). Errors as `submit`."""
        loop = asyncio.get_running_loop()
        queue = queue if queue is not None else asyncio.Queue()
        jobs: list[Job] = []
        for prompt_ids, params_list, processors in prompts:
            procs = processors or [()] * len(params_list)
            jobs += [Job(list(prompt_ids), p, pr, first_index + len(jobs) + i, queue, loop)
                     for i, (p, pr) in enumerate(zip(params_list, procs))]
        if len(jobs) > self.max_queue:
            several = len(prompts) > 1
            raise LlmkitError(
                f"this request needs {len(jobs)} sequences ({len(prompts)} prompt(s) x n) but the server "
                f"queues at most {self.max_queue}, so it can never be served; send fewer "
                f"{'prompts or a smaller n' if several else 'samples (a smaller n)'}",
                param="prompt" if several else "n", code="request_too_large")
        with self._cv:
            self._purge()
            if len(self._waiting) + len(jobs) > self.max_queue:
                raise LlmkitError(f"server busy: {len(self._waiting)} requests waiting (limit "
                                  f"{self.max_queue}); retry later", status=429, code="rate_limit_exceeded")
            for j in jobs:
                j.key = next(self._keys)
                self._waiting.append(j)
            self._publish_load()
            self._cv.notify_all()
        return jobs, queue

    def cancel_jobs(self, jobs: Sequence[Job]) -> None:
        """Cancel a request's jobs: waiting ones leave the queue now, running rows are freed before the next
        step (for a route that fails after submitting, or a client gone)."""
        for j in jobs:
            j.cancel()
        with self._cv:
            self._purge()
            self._publish_load()
            self._cv.notify_all()

    def wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    def healthy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------------ engine thread
    def _purge(self) -> None:
        """Drop cancelled jobs from the waiting queue (with the lock held)."""
        if any(j.cancelled for j in self._waiting):
            self._waiting = deque(j for j in self._waiting if not j.cancelled)

    def _publish_load(self) -> None:
        if self.metrics is not None:
            self.metrics.set_load(len(self._waiting), len(self._running), self.lane)

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._stop or self._waiting or self._running):
                    self._cv.wait()
                if self._stop:
                    break
                self._purge()
                new: list[Job] = []
                while self._waiting and len(self._running) + len(new) < self.backend.max_rows:
                    job = self._waiting.popleft()
                    if not job.cancelled:
                        new.append(job)
            for job in [j for j in self._running.values() if j.cancelled]:
                self._drop(job)
            for job in new:
                try:
                    info = self.backend.add(job.key, job.prompt_ids, job.params, job.processors)
                except Exception as e:
                    job._emit(_user_error(e, "engine add failed"))
                    continue
                self._running[job.key] = job
                job._emit(info)
            with self._cv:
                self._publish_load()
            if not self._running:
                continue
            try:
                outs = self.backend.step()
            except Exception:
                log.exception("engine step failed; stepping its rows one by one")
                outs = self._step_each()
            self.steps += 1
            batch: dict[asyncio.AbstractEventLoop, list[tuple[Job, Any]]] = {}
            for out in outs:
                job = self._running.get(out.key)
                if job is None:
                    continue
                item = out if out.error is None else _user_error(out.error, "a request failed in the engine")
                batch.setdefault(job.loop, []).append((job, item))
                if out.finish_reason is not None:
                    self._drop(job)
            for loop, items in batch.items():  # one event-loop wake-up per step, not one per token
                loop.call_soon_threadsafe(_deliver, items)
        for job in list(self._running.values()) + list(self._waiting):
            job._emit(LlmkitError("server shutting down", status=503))

    def _step_each(self) -> list[TokenOut]:
        """After a failed step: step each running row alone; a row that fails alone gets the error, and only
        it."""
        outs: list[TokenOut] = []
        for job in list(self._running.values()):
            try:
                outs += self.backend.step([job.key])
            except Exception as e:
                job._emit(_user_error(e, "engine step failed for one row"))
                self._drop(job)
        return outs

    def _drop(self, job: Job) -> None:
        self._running.pop(job.key, None)
        try:
            self.backend.remove(job.key)
        except Exception:
            log.exception("engine remove failed")

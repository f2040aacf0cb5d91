"""Prometheus metrics for the server, written in the text exposition format by hand (no dependency).

Counters: requests by route and status, prompt and generated tokens. Gauges: queue depth and running
rows (summed over the model lanes: the base and each served adapter have their own scheduler).
Histograms: time to first token and end-to-end latency (seconds). Everything is guarded by one lock: updates
are a few additions, far cheaper than a decode step.
"""

from __future__ import annotations

import threading
from collections import defaultdict

_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = _BUCKETS):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.total = 0
        self.sum = 0.0

    def observe(self, v: float) -> None:
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
        self.total += 1
        self.sum += v


class Metrics:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.cached_tokens = 0
        self.load: dict[str, tuple[int, int]] = {}  # lane (model id) -> (queue depth, running rows)
        self.ttft = Histogram()
        self.latency = Histogram()

    def request_done(self, route: str, status: int) -> None:
        with self.lock:
            self.requests[(route, status)] += 1

    def tokens(self, prompt: int = 0, generated: int = 0, cached: int = 0) -> None:
        with self.lock:
            self.prompt_tokens += prompt
            self.generation_tokens += generated
            self.cached_tokens += cached

    def observe_ttft(self, seconds: float) -> None:
        with self.lock:
            self.ttft.observe(seconds)

    def observe_latency(self, seconds: float) -> None:
        with self.lock:
            self.latency.observe(seconds)

    def set_load(self, queue_depth: int, running: int, lane: str = "") -> None:
        with self.lock:
            self.load[lane] = (queue_depth, running)

    @property
    def queue_depth(self) -> int:
        return sum(q for q, _ in self.load.values())

    @property
    def running(self) -> int:
        return sum(r for _, r in self.load.values())

    def render(self) -> str:
        """The Prometheus text exposition (version 0.0.4)."""
        out: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(f"{name}{labels} {_num(v)}" for labels, v in samples)

        with self.lock:
            reqs = sorted(self.requests.items())
            metric("llmkit_requests_total", "counter", "HTTP requests by route and status code.",
                   [(f'{{route="{r}",status="{s}"}}', n) for (r, s), n in reqs] or [("", 0)])
            for name, kind, help_, v in (
                ("llmkit_prompt_tokens_total", "counter", "Prompt tokens processed.", self.prompt_tokens),
                ("llmkit_generation_tokens_total", "counter", "Tokens generated.", self.generation_tokens),
                ("llmkit_cached_prompt_tokens_total", "counter", "Prompt tokens from the prefix cache.",
                 self.cached_tokens),
                ("llmkit_queue_depth", "gauge", "Requests waiting for a batch slot.", self.queue_depth),
                ("llmkit_running_requests", "gauge", "Rows in the running batch.", self.running),
            ):
                metric(name, kind, help_, [("", v)])
            for name, h, help_ in (("llmkit_time_to_first_token_seconds", self.ttft, "Time to first token."),
                                   ("llmkit_request_latency_seconds", self.latency, "Request latency.")):
                samples = [(f'_bucket{{le="{b}"}}', c) for b, c in zip(h.buckets, h.counts)]
                samples += [('_bucket{le="+Inf"}', h.total), ("_sum", h.sum), ("_count", h.total)]
                out.append(f"# HELP {name} {help_}")
                out.append(f"# TYPE {name} histogram")
                out.extend(f"{name}{suffix} {_num(v)}" for suffix, v in samples)
        return "\n".join(out) + "\n"


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))

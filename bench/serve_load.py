"""Serving throughput under concurrency: aggregate tok/s and time to first token for 1, 4, 16 clients.

Starts `llmkit serve` (the default model, SmolLM2-135M-Instruct) in a subprocess, then for each level c
runs c client threads, each streaming `--requests` chat completions one after the other (distinct
prompts, `ignore_eos` so every request generates exactly `--max-tokens` tokens). Levels alternate over
`--rounds` rounds (1, 4, 16, 1, 4, 16, ...) so that machine noise hits all of them alike; the table
reports medians over rounds, and the ratio to the single-client throughput measured in the same run.
Continuous batching should make 16 clients >= 8x one client's aggregate tok/s (32-token answers). The
server runs at its best settings (no OMP_WAIT_POLICY=PASSIVE, which suits tests, not benchmarks).

    .venv/bin/python bench/serve_load.py [--levels 1 4 16] [--max-tokens 128] [--rounds 2] [--device cuda]
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

TOPICS = [
    "a lighthouse",
    "the moon",
    "a red fox",
    "bread",
    "a violin",
    "winter",
    "a robot",
    "the sea",
    "a clock",
    "a garden",
    "trains",
    "a library",
    "mountains",
    "a cat",
    "rain",
    "a bridge",
    "coffee",
    "a castle",
]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_request(port: int, i: int, max_tokens: int) -> tuple[float, int, float]:
    """(time to first token, completion tokens, total seconds) of one streamed chat completion."""
    body = json.dumps(
        {
            "messages": [{"role": "user", "content": f"Write a short poem about {TOPICS[i % len(TOPICS)]}."}],
            "max_tokens": max_tokens,
            "temperature": 0.8,
            "seed": i,
            "stream": True,
            "ignore_eos": True,
            "stream_options": {"include_usage": True},
        }
    )
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:200]!r}")
    ttft, tokens = None, 0
    for line in r:  # HTTPResponse decodes the chunked framing (reading r.fp directly stalled ~200 ms a token)
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if ttft is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            ttft = time.perf_counter() - t0
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    conn.close()
    return (ttft if ttft is not None else time.perf_counter() - t0), tokens, time.perf_counter() - t0


def run_level(port: int, clients: int, requests: int, max_tokens: int, base: int) -> dict:
    ttfts: list[float] = []
    tokens = [0]
    lock = threading.Lock()
    errors: list[str] = []

    def client(c: int) -> None:
        for k in range(requests):
            try:
                ttft, n, _ = one_request(port, base + c * requests + k, max_tokens)
            except Exception as e:  # noqa: BLE001 - reported in the table
                errors.append(repr(e))
                return
            with lock:
                ttfts.append(ttft)
                tokens[0] += n

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttfts.sort()
    return {
        "clients": clients,
        "tokens": tokens[0],
        "seconds": wall,
        "tok_s": tokens[0] / wall,
        "ttft_p50": statistics.median(ttfts) if ttfts else float("nan"),
        "ttft_p95": ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))] if ttfts else float("nan"),
        "errors": len(errors),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=2, help="requests per client per level")
    ap.add_argument("--max-tokens", type=int, default=128,
                    help="tokens per answer (short answers weigh the one-at-a-time prefill more)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default=None, help="append one JSON line per level and round here")
    a = ap.parse_args()

    port = free_port()
    cmd = [sys.executable, "-m", "llmkit", "serve", *([a.model] if a.model else []), "--port", str(port),
           "--max-batch", str(max(a.levels)), "--max-queue", str(4 * max(a.levels)), "--max-seq-len", "512",
           *(["--device", a.device] if a.device else [])]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.time()
        while True:
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                c.request("GET", "/health")
                if c.getresponse().status == 200:
                    break
            except OSError:
                pass
            if server.poll() is not None or time.time() - t0 > 300:
                raise SystemExit(
                    f"server did not start: {server.stderr.read()[-2000:] if server.stderr else ''}"
                )
            time.sleep(0.5)
        one_request(port, 0, 4)  # warm-up
        results: dict[int, list[dict]] = {c: [] for c in a.levels}
        base = 1
        for rnd in range(a.rounds):
            for c in a.levels:
                r = run_level(port, c, a.requests, a.max_tokens, base)
                base += c * a.requests
                results[c].append(r)
                print(
                    f"round {rnd + 1} clients {c:3d}: {r['tok_s']:8.1f} tok/s  ttft p50 {r['ttft_p50']:.3f}s "
                    f"p95 {r['ttft_p95']:.3f}s  ({r['tokens']} tokens in {r['seconds']:.1f}s, "
                    f"{r['errors']} errors)",
                    flush=True,
                )
                if a.out:
                    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
                    with open(a.out, "a") as f:
                        f.write(json.dumps({"bench": "serve_load", "round": rnd, **r}) + "\n")
        single = statistics.median(r["tok_s"] for r in results[a.levels[0]])
        print(f"\n{'clients':>8} {'tok/s':>9} {'x single':>9} {'ttft p50':>9} {'ttft p95':>9}")
        for c in a.levels:
            tok_s = statistics.median(r["tok_s"] for r in results[c])
            p50 = statistics.median(r["ttft_p50"] for r in results[c])
            p95 = statistics.median(r["ttft_p95"] for r in results[c])
            print(f"{c:8d} {tok_s:9.1f} {tok_s / single:9.2f} {p50:9.3f} {p95:9.3f}")
        top = max(a.levels)
        ratio = statistics.median(r["tok_s"] for r in results[top]) / single
        print(f"\n{top} clients / 1 client aggregate throughput: {ratio:.2f}x (goal >= 8x)")
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())

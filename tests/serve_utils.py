"""Helpers for the server tests: a tiny random model with a real tokenizer, and a live uvicorn server.

The tiny model uses SmolLM2's tokenizer (from the default GGUF) when it loads, else the GPT-2 files in
../shared; its outputs are random but every code path (batching, logprobs, constraints) is real.
"""

from __future__ import annotations

import functools
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from llmkit.config import ModelConfig


@functools.lru_cache(maxsize=1)
def tiny_tokenizer():
    from llmkit.errors import LlmkitError
    from llmkit.tokenizer import Tokenizer

    try:
        from llmkit.hub import default_model_path

        return Tokenizer.from_gguf(default_model_path())
    except (LlmkitError, OSError, ImportError):
        from conftest import shared_path

        return Tokenizer.load(shared_path("tokenizers/gpt2"))


def tiny_llm(seed: int = 0, max_seq_len: int = 512) -> SimpleNamespace:
    from llmkit.model import Transformer

    tok = tiny_tokenizer()
    cfg = ModelConfig(
        vocab_size=tok.vocab_size,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_ff=64,
        max_seq_len=max_seq_len,
        pos_encoding="rope",
        norm="rmsnorm",
        mlp="swiglu",
        activation="silu",
    )
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    return SimpleNamespace(model=model, tokenizer=tok, config=cfg, name="tiny")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving `app` on a free port in a background thread (context manager)."""

    def __init__(self, app):
        import uvicorn

        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(
                app, host="127.0.0.1", port=self.port, log_level="warning", timeout_graceful_shutdown=5
            )
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() - t0 > 30:
                pytest.fail("server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def serve(llm, store: Path, **kw) -> LiveServer:
    from llmkit.serve.app import create_app

    return LiveServer(create_app(llm, store_path=store, model_name=llm.name, **kw))


def read_sse(r, conn, hang_up_after: int | None = None) -> tuple[list[bytes], bool]:
    """The `data:` payloads of a streamed reply, read line by line; with `hang_up_after`, the client hangs up
    once it has that many. Returns (payloads, whether it hung up)."""
    lines: list[bytes] = []
    while True:
        line = r.fp.readline()
        if not line:
            return lines, False
        if line.startswith(b"data: "):
            lines.append(line[6:].strip())
            if hang_up_after is not None and len(lines) >= hang_up_after:
                conn.sock.shutdown(2)  # hang up mid-stream
                return lines, True


def wait_idle(server, timeout: float = 30.0) -> None:
    """Wait for the server's scheduler to have nothing running or waiting, and assert it did."""
    sched = server.app.state.scheduler
    t0 = time.monotonic()
    while (sched.running or sched.queue_depth) and time.monotonic() - t0 < timeout:
        time.sleep(0.02)
    assert sched.running == 0 and sched.queue_depth == 0

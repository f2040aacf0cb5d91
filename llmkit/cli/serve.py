"""`llmkit serve [MODEL]`: an OpenAI-compatible server and the web chat for one model (and, with
`--adapter NAME=PATH`, each LoRA adapter as a model id of its own beside it: llmkit.serve.adapters)."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence

from llmkit.cli.common import (
    add_draft_model_arg,
    add_kv_cache_arg,
    add_speculative_arg,
    attach_draft_model,
    kv_cache_arg,
    speculative_arg,
)

DEFAULT_CONTEXT = 4096  # SmolLM2 has 8192: 8 rows x 8192 positions would hold 2.7 GB of fp32 KV cache


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server + web chat",
                       description="Serve MODEL over the OpenAI API, with a chat page at /.")
    p.add_argument("model", nargs="?", default=None, help="model name, HF repo id, GGUF file or HF folder")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="require 'Authorization: Bearer KEY' (repeatable; also $LLMKIT_API_KEY)")
    p.add_argument("--quantize", default=None, help="quantize the model's linear layers (e.g. int8)")
    p.add_argument("--adapter", action="append", default=[], metavar="DIR|NAME=PATH",
                   help="a LoRA adapter (PEFT folder): a plain DIR is applied to the model; NAME=PATH "
                        "(repeatable) serves it as its own model id NAME beside the base, sharing the base "
                        "weights (each id gets its own KV cache of max-batch x max-seq-len)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--max-batch", type=int, default=8, help="rows in the running batch")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429")
    p.add_argument("--max-seq-len", "--context", type=int, default=None,
                   help=f"context per row (default: the model's, at most {DEFAULT_CONTEXT}); the KV cache "
                        "holds max-batch x this many positions")
    add_kv_cache_arg(p)
    add_speculative_arg(p)
    add_draft_model_arg(p)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (GPU: CUDA graphs; on the CPU only for models the "
                        "native C decode step cannot run)")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds")
    p.add_argument("--store", default=None, help="SQLite file for stored responses (default: in the cache)")
    p.add_argument("--log-requests", nargs="?", const="full", default=None, choices=("full", "redact"),
                   help="log requests and bodies: 'full' (the default when given; keys masked) or 'redact' "
                        "(keys masked and every message, prompt and answer replaced by its length)")
    p.add_argument("--guard", default="none", choices=("rules", "none"),
                   help="moderate inputs and outputs: 'rules' = the small example keyword/regex rule set "
                        "(llmkit.generate.guard.RuleGuard.default; not a safety guarantee)")
    p.add_argument("--max-input-chars", type=_positive, default=None,
                   help="refuse (400) chat messages / prompts longer than this many characters")
    p.add_argument("--rpm", type=_positive, default=None,
                   help="requests per minute per API key (or client IP)")
    p.add_argument("--tpm", type=_positive, default=None,
                   help="tokens per minute per API key (or client IP), counted as max_tokens reservations")
    p.set_defaults(func=serve)


def banner(url: str, model: str, auth: bool, adapters: Sequence[str] = ()) -> str:
    key = 'os.environ["LLMKIT_API_KEY"]' if auth else '"none"'
    hdr = ' -H "Authorization: Bearer $LLMKIT_API_KEY"' if auth else ""
    beside = f"\n  adapters  : {', '.join(adapters)}   (LoRA; pick one with \"model\")" if adapters else ""
    return f"""
llmkit serving {model}{beside}
  chat page : {url}/
  API       : {url}/v1   (OpenAI-compatible; api key: {"required" if auth else "not required"})

curl:
  curl {url}/v1/chat/completions{hdr} -H "Content-Type: application/json" \\
    -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello!"}}], "max_tokens": 64}}'

openai SDK:
  import os
  from openai import OpenAI
  client = OpenAI(base_url="{url}/v1", api_key={key})
  r = client.chat.completions.create(model="{model}", messages=[{{"role": "user", "content": "Hello!"}}])
  print(r.choices[0].message.content)
"""


def _positive(text: str) -> int:
    """argparse type: an integer >= 1 (so a bad limit fails at once, not on the first request)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def guard_from_args(args: argparse.Namespace):
    """The Guard `--guard` / `--max-input-chars` ask for, or None."""
    from llmkit.generate.guard import BaseGuard, get_guard

    guard = get_guard(args.guard, max_input_chars=args.max_input_chars)
    if guard is None and args.max_input_chars is not None:
        guard = BaseGuard(max_input_chars=args.max_input_chars)  # the size limit alone
    return guard


def rate_limit_from_args(args: argparse.Namespace) -> dict[str, int] | None:
    """RateLimit keyword arguments from `--rpm` / `--tpm`, or None for no limit."""
    if args.rpm is None and args.tpm is None:
        return None
    return {"requests_per_minute": args.rpm, "tokens_per_minute": args.tpm}


def guardrails(args: argparse.Namespace) -> dict:
    """create_app keywords for --log-requests / --guard / --max-input-chars / --rpm / --tpm."""
    kw: dict = {"log_requests": True if args.log_requests == "full" else args.log_requests or False}
    if (guard := guard_from_args(args)) is not None:
        kw["guard"] = guard
    if (limits := rate_limit_from_args(args)) is not None:
        kw["rate_limit"] = limits
    return kw


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    import llmkit
    from llmkit.hub import DEFAULT_MODEL
    from llmkit.serve.adapters import parse_adapter_args
    from llmkit.serve.app import create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    keys = list(args.api_key)
    if os.environ.get("LLMKIT_API_KEY"):
        keys.append(os.environ["LLMKIT_API_KEY"])
    name = args.model or DEFAULT_MODEL
    plain, named = parse_adapter_args(args.adapter, name)  # every --adapter checked before anything loads
    kv, spec = kv_cache_arg(args), speculative_arg(args)
    llm = llmkit.load(name, device=args.device, dtype=args.dtype, quantize=args.quantize, adapter=plain,
                      context=args.max_seq_len)
    attach_draft_model(llm, args)
    context = args.max_seq_len or min(llm.config.max_seq_len, DEFAULT_CONTEXT)
    app = create_app(llm, api_keys=keys, store_path=args.store, model_name=name, max_batch=args.max_batch,
                     max_seq_len=context, compile=args.compile, max_queue=args.max_queue,
                     request_timeout=args.timeout, adapters=named, speculative=spec,
                     draft_model=llm.draft_model, **guardrails(args),
                     **({} if kv is None else {"kv_dtype": kv}))
    url = f"http://{'localhost' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}"
    print(banner(url, name, bool(keys), list(named)), flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", access_log=False)
    return 0

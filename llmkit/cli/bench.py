"""Verb `bench`: `llmkit bench decode` measures decode / prefill tok/s and perplexity against peers."""

from __future__ import annotations


def cmd_decode(args) -> int:
    from llmkit.generate.bench import run

    run(args.model, threads=args.threads, new_tokens=args.new_tokens, prefill_tokens=args.prefill_tokens,
        rounds=args.rounds, modes=tuple(args.modes.split(",")), peers=not args.no_peers,
        ppl_windows=args.ppl_windows, out=args.out)
    return 0


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks against peers (decode)")
    bsub = p.add_subparsers(dest="bench", metavar="WHAT", required=True)
    d = bsub.add_parser("decode", help="decode/prefill tok/s and perplexity vs llama.cpp and HF transformers")
    d.add_argument("model", nargs="?", default=None, help="model (default: the default model)")
    d.add_argument("--threads", type=int, default=2)
    d.add_argument("--new-tokens", type=int, default=128)
    d.add_argument("--prefill-tokens", type=int, default=512)
    d.add_argument("--rounds", type=int, default=3)
    d.add_argument("--modes", default="fp32,bf16,int8,int4", help="comma-separated llmkit variants")
    d.add_argument("--no-peers", action="store_true", help="skip llama.cpp and HF transformers")
    d.add_argument("--ppl-windows", type=int, default=8, help="512-token windows for perplexity (0 = skip)")
    d.add_argument("--out", default=None, help="write the report as JSON here")
    d.set_defaults(func=cmd_decode)

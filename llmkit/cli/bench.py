"""Verb `bench`: `llmkit bench decode` measures llmkit's decode / prefill tok/s on this machine (% of the
memory roofline) and, given a text, the perplexity of each variant. The comparison with peers (llama.cpp,
HF transformers) is a script of the source tree: `python bench/decode.py`."""

from __future__ import annotations


def cmd_decode(args) -> int:
    from llmkit.generate.timing import run

    run(args.model, threads=args.threads, new_tokens=args.new_tokens, prefill_tokens=args.prefill_tokens,
        rounds=args.rounds, modes=tuple(args.modes.split(",")), text=args.text, ppl_windows=args.ppl_windows,
        out=args.out, batches=batch_sizes(args.batches))
    return 0


def batch_sizes(text: str) -> tuple[int, ...]:
    """--batches "4,16" -> (4, 16); "" -> ()."""
    from llmkit.errors import LlmkitError

    try:
        sizes = tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError:
        sizes = (0,)
    if any(b < 1 for b in sizes):
        raise LlmkitError(f"--batches {text!r}: give batch sizes >= 1, comma-separated (e.g. 4,16)")
    return sizes


def add_decode_arguments(p) -> None:
    """The options of `llmkit bench decode` (bench/decode.py takes the same)."""
    p.add_argument("model", nargs="?", default=None, help="model (default: the default model)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--modes", default="fp32,bf16,int8,int4,auto",
                   help="comma-separated llmkit variants: fp32, bf16, int8, int4 (the model quantized after "
                        "a float32 load), auto (as llmkit loads it: a GGUF file at its own precision). "
                        "Decode steps run in C (llmkit/kernels/decode.c) where it can run the model; add "
                        "+torch for PyTorch's eager ops or +compile for torch.compile'd steps (e.g. "
                        "auto+compile; compiles ~1 min)")
    p.add_argument("--text", default=None, help="a UTF-8 text file: report perplexity on its first tokens")
    p.add_argument("--ppl-windows", type=int, default=8, help="512-token windows for perplexity (0 = skip)")
    p.add_argument("--batches", default="", help="also the aggregate decode tok/s at these batch sizes, "
                   "e.g. 4,16")
    p.add_argument("--out", default=None, help="write the report as JSON here")


def register(sub) -> None:
    p = sub.add_parser("bench", help="speed of llmkit on this machine (decode)")
    bsub = p.add_subparsers(dest="bench", metavar="WHAT", required=True)
    d = bsub.add_parser("decode", help="decode/prefill tok/s, % of memory roofline, perplexity of --text")
    add_decode_arguments(d)
    d.set_defaults(func=cmd_decode)

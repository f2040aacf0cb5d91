"""`llmkit tokenizer-train CORPUS... --vocab-size N --out DIR`: train a byte-level BPE tokenizer.

Holds out the last 5 % of the text (--holdout) and reports compression (bytes per token) on it.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenizer-train", help="train a byte-level BPE tokenizer on text files",
                       description="Train a byte-level BPE tokenizer (256 bytes + merges + special tokens).")
    p.add_argument("corpus", nargs="+", metavar="CORPUS", help="text files or directories (*.txt, recursive)")
    p.add_argument("--vocab-size", type=int, required=True, help="total ids: 256 bytes + merges + specials")
    p.add_argument("--out", required=True, metavar="DIR", help="writes DIR/tokenizer.json + config")
    p.add_argument("--pattern", default="gpt4", help="pre-tokenizer: gpt4 (default), gpt2 or a regex")
    p.add_argument("--special", nargs="+", action="extend", default=[], metavar="TOKEN",
                   help="special tokens, given ids after the merges (e.g. '<|endoftext|>')")
    p.add_argument("--trace", type=int, default=0, metavar="K", help="print the first K merges + counts")
    p.add_argument("--reference", action="store_true", help="readable Python merge loop (small corpora)")
    p.add_argument("--holdout", type=float, default=0.05, metavar="FRACTION",
                   help="fraction of the text held out to measure compression (default 0.05)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from llmkit.errors import LlmkitError
    from llmkit.tokenizer.train import bytes_per_token, load_corpus, split_holdout, train_bpe

    if not 0 <= args.holdout < 1:
        raise LlmkitError(f"--holdout {args.holdout} must be in [0, 1)")
    texts = load_corpus([Path(c) for c in args.corpus])
    train, held = split_holdout(texts, args.holdout)
    tok = train_bpe(train, args.vocab_size, pattern=args.pattern, special_tokens=args.special,
                    trace=args.trace, reference=args.reference)
    for step in tok.train_trace:
        print(step)
    tok.save(args.out)
    n_merges = len(tok.merges)
    print(f"wrote {Path(args.out) / 'tokenizer.json'}: {tok.vocab_size} ids = 256 bytes + {n_merges} merges "
          f"+ {len(tok.special_tokens)} special tokens")
    if held:
        n = len(held.encode("utf-8"))
        print(f"held-out compression: {bytes_per_token(tok, held):.3f} bytes/token "
              f"(last {args.holdout:.0%} of the corpus, {n:,} bytes)")
    return 0

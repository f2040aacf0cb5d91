"""`llmkit tokenize`: show how a vocabulary cuts text into tokens (coloured pieces on a TTY, or plain ids)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tokenize",
        help="split text into tokens with a vocabulary and print pieces/ids",
        description="Tokenize TEXT (or each line of --file) with a tokenizer.json, a GPT-2 vocab "
        "directory, a GGUF file, a model directory or a known model name.",
    )
    p.add_argument("text", nargs="*", metavar="TEXT", help="text to tokenize (one output line per TEXT)")
    p.add_argument(
        "--tokenizer", "-t", required=True, metavar="PATH", help="tokenizer file, directory or name"
    )
    p.add_argument("--file", "-f", metavar="F", help="tokenize each line of this file ('-' for stdin)")
    p.add_argument(
        "--format",
        choices=("pieces", "ids", "json"),
        default="pieces",
        help="pieces: tokens with ids (default); ids: space-separated ids; json: one object per input",
    )
    p.add_argument(
        "--allow-special",
        action="store_true",
        help="turn special-token text such as <|im_start|> into control ids",
    )
    p.add_argument("--add-special-tokens", action="store_true", help="add BOS/EOS as the model does")
    p.set_defaults(func=run)


_COLOURS = (41, 42, 43, 44, 45, 46)  # ANSI background colours cycled over tokens


def _show(piece: str) -> str:
    return piece.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


def load_tokenizer(name_or_path: str):
    """A tokenizer from a path, or from a model name known to llmkit.hub (pulled into the cache once)."""
    from llmkit import hub
    from llmkit.tokenizer import Tokenizer

    if not Path(name_or_path).expanduser().exists() and name_or_path in hub.NAMED_MODELS:
        return Tokenizer.load(hub.pull_named(name_or_path))
    return Tokenizer.load(name_or_path)


def run(args: argparse.Namespace) -> int:
    from llmkit.errors import LlmkitError
    from llmkit.io import read_text

    if args.file and args.text:
        raise LlmkitError("give either TEXT or --file, not both")
    if args.file:
        inputs = (sys.stdin.read() if args.file == "-" else read_text(args.file)).splitlines()
    elif args.text:
        inputs = args.text
    else:
        raise LlmkitError("nothing to tokenize: give TEXT arguments or --file F")
    tok = load_tokenizer(args.tokenizer)
    colour = sys.stdout.isatty()
    for text in inputs:
        ids = tok.encode(text, allow_special=args.allow_special, add_special_tokens=args.add_special_tokens)
        if args.format == "ids":
            print(" ".join(map(str, ids)))
        elif args.format == "json":
            print(
                json.dumps(
                    {"text": text, "ids": ids, "pieces": [tok.id_to_piece(i) for i in ids]},
                    ensure_ascii=False,
                )
            )
        elif colour:
            cells = [
                f"\x1b[30;{_COLOURS[k % len(_COLOURS)]}m{_show(tok.id_to_piece(i))}\x1b[0m"
                for k, i in enumerate(ids)
            ]
            print("".join(cells))
            print("\x1b[2m" + " ".join(map(str, ids)) + f"\x1b[0m  ({len(ids)} tokens)")
        else:
            print(" ".join(f"{_show(tok.id_to_piece(i))!s}:{i}" for i in ids) + f"  ({len(ids)} tokens)")
    return 0

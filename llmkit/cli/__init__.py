"""The `llmkit` command: one verb per job, each a thin function over the library.

Verbs live in sibling modules (tokenizer, model, generate, train, serve); each exposes
`register(subparsers)` and adds its verbs with `set_defaults(func=...)`. Errors raised as
`LlmkitError` (and missing files) print one line and exit 1; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from llmkit.errors import LlmkitError

VERB_MODULES = ("tokenizer", "tokenizer_train", "model", "generate", "train", "sft", "dpo", "reward", "rl",
                "serve", "eval", "bench", "lab")


def build_parser() -> argparse.ArgumentParser:
    from llmkit import __version__

    p = argparse.ArgumentParser(prog="llmkit", description="A complete, readable LLM stack on PyTorch.")
    p.add_argument("--version", action="version", version=f"llmkit {__version__}")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = p.add_subparsers(dest="verb", metavar="VERB")
    for name in VERB_MODULES:
        try:
            mod = importlib.import_module(f"llmkit.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"llmkit.cli.{name}":
                continue
            raise
        mod.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    debug = args.debug or os.environ.get("LLMKIT_DEBUG") == "1"
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        print("llmkit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except (LlmkitError, FileNotFoundError, IsADirectoryError, PermissionError, OSError) as e:
        if debug:
            raise
        msg = str(e) if isinstance(e, LlmkitError) else _os_error_line(e)
        print(f"llmkit: error: {msg}", file=sys.stderr)
        return 1
    return int(rc or 0)


def _os_error_line(e: OSError) -> str:
    where = f": {e.filename}" if getattr(e, "filename", None) else ""
    return f"{e.strerror or e}{where}"


if __name__ == "__main__":
    sys.exit(main())

"""Run every benchmark in bench/ one after the other (each prints its own same-run ratios vs its peer).

    .venv/bin/python bench/run_all.py [--only decode tokenizer_encode ...]
Takes a long while (the 20 MB tokenizer training and the time-to-quality recipe alone take minutes);
run on a quiet machine: the peers share the same 2 cores.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ["tokenizer_encode", "tokenizer_train", "model_forward", "decode", "train_throughput",
         "train_shakespeare", "serve_load", "eval_speed"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", choices=ORDER, help="run only these benchmarks")
    args = ap.parse_args()
    failed = []
    for name in args.only or ORDER:
        print(f"\n===== bench/{name}.py", flush=True)
        if subprocess.run([sys.executable, str(HERE / f"{name}.py")]).returncode:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

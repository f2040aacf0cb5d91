"""Verb `eval`: benchmarks and perplexity (a thin wrapper over llmkit.eval.evaluate and llmkit.eval.results).

    llmkit eval --task hellaswag --limit 200                 # the default model, in this process
    llmkit eval MODEL --task mmlu --shots 5 --out runs/mmlu5
    llmkit eval --task gsm8k --api-base http://127.0.0.1:8000/v1 --limit 50    # any OpenAI-compatible server
    llmkit eval --compare runs/before runs/after             # two runs side by side
"""

from __future__ import annotations

import argparse
import sys

from llmkit.errors import LlmkitError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="benchmarks (hellaswag, mmlu, truthfulqa, gsm8k, humaneval...) and perplexity",
        description="Evaluate a model by log-likelihood (multiple choice, perplexity) or generation "
                    "(gsm8k, humaneval), with lm-evaluation-harness's prompts and metrics; in this "
                    "process or against any OpenAI-compatible server (--api-base). Prints a table; with "
                    "--out writes results.json, samples.jsonl and results.png. Finished items are cached: "
                    "run the same command again to resume an interrupted evaluation.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  llmkit eval --task hellaswag --limit 200\n"
               "  llmkit eval --task mmlu --shots 5 --out runs/mmlu5\n"
               "  llmkit eval --task perplexity --data mon_texte.txt\n"
               "  llmkit eval --task mc --data exam.jsonl   # {question, choices, answer}\n"
               "  llmkit eval --task gsm8k --api-base http://127.0.0.1:8000/v1 --limit 50\n"
               "  llmkit eval --compare runs/before runs/after")
    p.add_argument("model", nargs="?", default=None,
                   help="name, repo id or path (default: the default model; with --api-base: the model id)")
    p.add_argument("--task", "-t", action="append", default=[], metavar="T",
                   help="task to run (repeatable; see --list); NAME:K sets its shots, e.g. mmlu:5")
    p.add_argument("--list", action="store_true", help="list the tasks and exit")
    p.add_argument("--limit", type=int, default=None, help="first N items of each task (mmlu: per subject)")
    p.add_argument("--shots", type=int, default=None, help="few-shot examples (default: the task's)")
    p.add_argument("--seed", type=int, default=1234, help="seed for few-shot choice and sampling (1234)")
    p.add_argument("--batch-size", type=int, default=32,
                   help="log-likelihood requests per forward pass (32; over HTTP: prompts per request)")
    p.add_argument("--api-base", default=None, metavar="URL",
                   help="evaluate a server instead: its OpenAI base URL, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--api-key", default=None, help="the server's API key (default: $OPENAI_API_KEY)")
    p.add_argument("--adapter", default=None, metavar="PATH", help="a LoRA adapter (PEFT folder) to apply")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="write results.json, samples.jsonl, results.png")
    p.add_argument("--data", nargs="+", default=[], metavar="FILE",
                   help="input files for perplexity / ngram / mc / qa")
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help="folder holding eval/ and corpus/ (default: $LLMKIT_DATA or ../shared/data)")
    p.add_argument("--template", default=None, help="prompt template for mc / qa, e.g. '{question}\\nR:'")
    p.add_argument("--task-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="a task-specific setting, e.g. subjects=anatomy,virology (repeatable)")
    p.add_argument("--quantize", choices=("int8", "int4"), default=None,
                   help="weight-only quantization at load")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: float32 on CPU)")
    p.add_argument("--no-cache", action="store_true", help="ignore and do not write the resume cache")
    p.add_argument("--per-subject", action="store_true", help="also show per-subject rows (mmlu)")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), default=None,
                   help="show two runs (results.json or --out folders) side by side; runs nothing")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)


def _task_args(items: list[str]) -> dict[str, str]:
    out = {}
    for it in items:
        k, sep, v = it.partition("=")
        if not sep or not k:
            raise LlmkitError(f"--task-arg {it!r}: expected KEY=VALUE")
        out[k.strip()] = v.strip()
    return out


def cmd_eval(args) -> int:
    import os

    from llmkit.eval.base import TASKS
    from llmkit.eval.results import compare, load_results, plot, table

    if args.list:
        from llmkit.eval import tasks  # noqa: F401  (registers the built-in tasks)

        width = max(map(len, TASKS), default=0)
        for name in sorted(TASKS):
            print(f"{name.ljust(width)}  {TASKS[name].description}")
            if TASKS[name].task_args:
                print(f"{''.ljust(width)}  --task-arg: {', '.join(TASKS[name].task_args)}")
        return 0
    if args.compare:
        a, b = (load_results(x) for x in args.compare)
        print(compare(a, b, labels=("A", "B")))
        print(f"A = {args.compare[0]}\nB = {args.compare[1]}")
        if args.out:
            from pathlib import Path

            Path(args.out).mkdir(parents=True, exist_ok=True)
            png = plot(a, Path(args.out) / "compare.png", other=b, labels=("A", "B"))
            if png:
                print(f"plot: {png}", file=sys.stderr)
        return 0
    if not args.task:
        raise LlmkitError("no task given: pass --task NAME (llmkit eval --list shows them)")
    for name, v in (("--limit", args.limit), ("--batch-size", args.batch_size)):
        if v is not None and v < 1:
            raise LlmkitError(f"{name} must be >= 1, got {v}")
    if args.shots is not None and args.shots < 0:
        raise LlmkitError(f"--shots must be >= 0, got {args.shots}")
    from llmkit.eval.runner import evaluate

    res = evaluate(args.model, args.task, limit=args.limit, shots=args.shots, seed=args.seed,
                   batch_size=args.batch_size, api_base=args.api_base,
                   api_key=args.api_key or os.environ.get("OPENAI_API_KEY"), adapter=args.adapter,
                   out=args.out, data=args.data, data_dir=args.data_dir, template=args.template,
                   task_args=_task_args(args.task_arg), device=args.device, dtype=args.dtype,
                   quantize=args.quantize, cache=not args.no_cache, progress=not args.quiet)
    print(table(res, per_subject=args.per_subject))
    if args.out:
        print(f"results: {args.out}/results.json, samples.jsonl, results.png", file=sys.stderr)
    return 0

"""Verb `lab`: run one of the course's experiments (llmkit.lab) and print its findings; figures, findings.md
and result.json go to OUT/NAME/."""

from __future__ import annotations

import argparse
import json
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "lab",
        help="run a course experiment: figures, a table and findings from this run (--list shows them)",
        description="Run the lab NAME (an experiment or practical session of the LLM course). Writes "
        "OUT/NAME/*.png, OUT/NAME/findings.md and OUT/NAME/result.json, and prints the findings.",
    )
    p.add_argument("name", nargs="?", help="the lab to run (see --list)")
    p.add_argument("--list", action="store_true", help="list the labs and exit")
    p.add_argument("--model", default=None, help="model for the labs that need one (default: smollm2)")
    p.add_argument("--out", default="runs/lab", help="output folder (default runs/lab)")
    p.add_argument("--lang", default="fr", choices=("fr", "en"), help="language of findings and figures (fr)")
    p.add_argument("--quick", action="store_true", help="small settings: under a minute on a laptop CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print result.json instead of the findings")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from llmkit.errors import LlmkitError
    from llmkit.lab import list_labs, run_lab

    if args.list or not args.name:
        if not args.list:
            print("llmkit lab: give a lab NAME (or --list)\n", file=sys.stderr)
        for lb in list_labs():
            course = f"[{lb.course}]" if lb.course else ""
            print(f"  {lb.name:26s} {course:7s} {lb.title[args.lang]}")
        return 0 if args.list else 2
    res = run_lab(args.name, model=args.model, out=args.out, lang=args.lang, quick=args.quick, seed=args.seed,
                  progress=sys.stderr.isatty())
    if args.json:
        print(json.dumps(res.to_json(), ensure_ascii=False, indent=2, default=str))
        return 0
    print(res.title)
    for f in res.findings:
        print(f"- {f}")
    if not res.findings:
        raise LlmkitError(f"lab {args.name} found nothing to report")
    print(f"\n{len(res.figures)} figure(s), findings.md and result.json in {res.out} ({res.seconds:.1f} s)")
    return 0

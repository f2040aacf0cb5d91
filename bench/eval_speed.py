"""HellaSwag speed: `llmkit eval` vs lm-evaluation-harness's `hf` model: same items, weights and threads.

    .venv/bin/python bench/eval_speed.py [--task hellaswag] [--items 200] [--rounds 2] [--threads 2]

--task: hellaswag (4 short endings after a short context: the least a shared context can save) or
truthfulqa_mc2 (several answers after a long 6-shot preamble: the most); any multiple-choice task works.

Weights: the default model (SmolLM2-135M-Instruct, Q4_1 GGUF) exported once as an fp32 HF folder (cached
under ~/.cache/llmkit/bench/), opened by both: llmkit.load(folder) and lm-eval's HFLM(pretrained=folder).
lm-eval reads the same items from ../shared/data/eval/hellaswag through a local task (HF `json` dataset)
holding the query and choices its `hellaswag` task builds (llmkit.eval.tasks.mc rebuilds them exactly:
tests/test_eval_mc.py), so both score the same (context, " " + ending) pairs. Each side runs at its best
batch size on this machine (measured 2026-11-30: llmkit 32 requests, lm-eval 16; lm-eval 32 and 64 are
slower). Rounds alternate llmkit, lm-eval; the best round of each is compared. Both print acc and
acc_norm, which must agree (for mc2, lm-eval's side is a plain multiple-choice task: its acc differs).
Needs lm-eval (pip install lm-eval==0.4.13; the test extras have it).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

TASK_YAML = """task: mc_local
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
output_type: multiple_choice
validation_split: validation
doc_to_text: "{{{{query}}}}"
doc_to_target: "{{{{label}}}}"
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def hf_folder() -> Path:
    import llmkit

    root = Path(os.environ.get("LLMKIT_CACHE", Path.home() / ".cache" / "llmkit"))
    d = root / "bench" / "smollm2-135m-hf"
    if not (d / "config.json").exists():
        llmkit.load(device="cpu", dtype="float32").save_hf(d)
    return d


def run_llmkit(folder: Path, task: str, items: int, batch_size: int) -> tuple[float, dict]:
    import llmkit
    from llmkit.eval.backends import LocalBackend
    from llmkit.eval.runner import evaluate

    backend = LocalBackend(llmkit.load(folder, device="cpu", dtype="float32"), batch_size=batch_size)
    t = time.perf_counter()
    res = evaluate(backend, [task], limit=items, cache=False, progress=False)
    wall = time.perf_counter() - t
    return wall, res["tasks"][task]["metrics"]


def run_lmeval(folder: Path, items: int, batch_size: int, tasks_dir: Path) -> tuple[float, dict]:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=str(folder), device="cpu", dtype="float32", batch_size=batch_size)
    tm = TaskManager(include_path=str(tasks_dir))
    t = time.perf_counter()
    out = simple_evaluate(model=lm, tasks=["mc_local"], limit=items, task_manager=tm,
                          log_samples=False, verbosity="ERROR")
    wall = time.perf_counter() - t
    r = out["results"]["mc_local"]
    return wall, {"acc": {"value": r["acc,none"]}, "acc_norm": {"value": r["acc_norm,none"]}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="hellaswag", help="multiple-choice task (hellaswag, truthfulqa_mc2...)")
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=32, help="llmkit's: requests per forward (32)")
    ap.add_argument("--peer-batch-size", type=int, default=16, help="lm-eval's (16 is its best here)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not SHARED.is_dir():
        print(f"skipped: {SHARED} not found")
        return 0
    folder = hf_folder()
    from llmkit.eval.base import get_task

    tasks_dir = Path(tempfile.mkdtemp(prefix="lmeval_tasks_"))
    task = get_task(args.task)
    with open(tasks_dir / "items.jsonl", "w", encoding="utf-8") as f:
        for doc in task.docs()[: args.items]:  # mc2 has several true answers: acc then means "picks #0"
            f.write(json.dumps({"query": task.prompt(doc), "choices": doc["choices"],
                                "label": doc.get("target", 0)}) + "\n")
    (tasks_dir / "mc_local.yaml").write_text(TASK_YAML.format(data=tasks_dir / "items.jsonl"))
    best = {"llmkit": float("inf"), "lm-eval": float("inf")}
    metrics = {}
    for r in range(args.rounds):
        for name in ("llmkit", "lm-eval"):
            if name == "llmkit":
                wall, m = run_llmkit(folder, args.task, args.items, args.batch_size)
            else:
                wall, m = run_lmeval(folder, args.items, args.peer_batch_size, tasks_dir)
            best[name] = min(best[name], wall)
            metrics[name] = {k: round(v["value"], 4) for k, v in m.items() if k in ("acc", "acc_norm")}
            print(f"round {r + 1} {name:8s} {args.items / wall:6.2f} items/s  ({wall:.1f} s)  "
                  f"{metrics[name]}", flush=True)
    ratio = best["lm-eval"] / best["llmkit"]
    print(f"\n{args.task}, {args.items} items, batch {args.batch_size} / {args.peer_batch_size}, "
          f"{args.threads} threads, fp32 SmolLM2-135M-Instruct (Q4_1 GGUF dequantised):")
    for name in best:
        print(f"  {name:8s} {args.items / best[name]:.2f} items/s   {metrics[name]}")
    print(f"  speed-up {ratio:.2f}x (goal >= 3x)")
    if args.json:
        Path(args.json).write_text(json.dumps({"items": args.items, "batch_size": args.batch_size,
                                               "threads": args.threads, "best_wall_s": best,
                                               "metrics": metrics, "speedup": ratio}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

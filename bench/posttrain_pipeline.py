"""The post-training pipeline's table: every stage's model measured on the same held-out sets.

    .venv/bin/python bench/posttrain_pipeline.py \\
        --stage base=smollm2-135m-instruct \\
        --stage sft=runs/pipeline/sft/merged --run sft=runs/pipeline/sft \\
        --stage dpo=runs/pipeline/dpo/merged --run dpo=runs/pipeline/dpo \\
        --stage grpo=runs/pipeline/grpo/merged --run grpo=runs/pipeline/grpo \\
        --reward-model runs/pipeline/rm/reward --out runs/pipeline/table

The stages themselves are the README recipe's commands (`llmkit sft`, `merge`, `dpo`, `reward-train`,
`grpo`); this script only measures. For each stage (a model folder, name or GGUF; `NAME=MODEL+ADAPTER` for
an unmerged adapter) it computes, always on the same held-out items:

- French assistant perplexity: ../shared/data/instruct/oasst_fr_threads.jsonl split by `tree` exactly as
  `llmkit sft` splits it (val fraction 0.1, seed 1337), assistant tokens only (llmkit.train.sft).
- Preference accuracy on the first --pairs of ../shared/data/preference/hh_rlhf_short_heldout.jsonl: the
  implicit DPO reward beta * (log pi(y|x) - log pi_ref(y|x)) ranks chosen above rejected (ties 1/2; the base
  scores 50 % against itself), 95 % interval (llmkit.train.preference.preference_metrics), with pi_ref = the
  base and pi_ref = the previous stage (for the DPO row: its own reference, the SFT model). Each stage's
  answer log-probs are computed once and kept (OUT/<stage>_pairs.pt).
- Task accuracy: greedy answers to the held-out arithmetic word problems (the `--val 100` of `llmkit grpo
  --arithmetic 600 --seed 1337`: same generator, same split), exact numeric match, 95 % Wilson interval.
- Two greedy sample answers to fixed French prompts.

Each stage's figures are cached in OUT/<stage>.json (delete it to re-measure); OUT/table.md is the
markdown table the README shows, OUT/table.png the same as bars with their intervals. Wall times come from
each stage's run folder (`--run NAME=DIR`: metrics.jsonl's last `time`).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
PROMPTS = ["Explique en deux phrases ce qu'est la photosynthèse.", "Donne trois conseils pour bien dormir."]


def wilson(k: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion k / n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, mid - half), min(1.0, mid + half))


def french_ppl(llm, block_size: int = 512) -> dict:
    from llmkit.device import resolve_device
    from llmkit.train.sft import encode_conversation, evaluate_loss, load_conversations, pack, split_by_key

    convs = load_conversations([SHARED / "instruct" / "oasst_fr_threads.jsonl"])
    _, val = split_by_key(convs, "tree", 0.1, seed=1337)
    tok = llm.tokenizer
    rows = pack((encode_conversation(tok, c["messages"]) for c in val), block_size, packed=True,
                pad_id=tok.eos_id if tok.eos_id is not None else 0)
    return evaluate_loss(llm.model, rows, 8, resolve_device("cpu"))


def pair_logprobs(llm, n: int) -> torch.Tensor:
    """(n, 2) summed log-probs of the chosen and rejected answers of the first n held-out HH pairs."""
    from llmkit.train.preference import encode_pair, load_pairs, pair_scores, truncate_pair

    pairs = load_pairs(SHARED / "preference" / "hh_rlhf_short_heldout.jsonl")[:n]
    enc = [truncate_pair(encode_pair(llm.tokenizer, p), 512)[0] for p in pairs]
    return pair_scores(llm.model, enc, batch_size=8)


def pair_lengths(llm, n: int) -> torch.Tensor:
    from llmkit.train.preference import _lengths, encode_pair, load_pairs, truncate_pair

    pairs = load_pairs(SHARED / "preference" / "hh_rlhf_short_heldout.jsonl")[:n]
    return _lengths([truncate_pair(encode_pair(llm.tokenizer, p), 512)[0] for p in pairs])


def implicit_accuracy(policy: torch.Tensor, ref: torch.Tensor, lengths: torch.Tensor) -> dict:
    """Accuracy of beta * log(pi / pi_ref) on the held-out pairs (ties 1/2), 95 % interval."""
    from llmkit.train.preference import preference_metrics

    return preference_metrics(policy, ref, lengths, beta=0.1)


def task_accuracy(llm, problems: list[dict]) -> dict:
    from llmkit.train.grpo import evaluate_problems

    return evaluate_problems(llm.model, llm.tokenizer, problems)


def samples(llm) -> list[str]:
    from llmkit.train.sft import greedy_answers

    return greedy_answers(llm.model, llm.tokenizer, PROMPTS, 64)


def pct(m: dict | None) -> str:
    if m is None:
        return "-"
    return f"{100 * m['reward_acc']:.1f} % [{100 * m['reward_acc_lo']:.1f}, {100 * m['reward_acc_hi']:.1f}]"


def load(spec: str):
    import llmkit

    model, _, adapter = spec.partition("+")
    return llmkit.load(model, adapter=adapter or None, dtype="float32")


def wall_time(run: str | None) -> float | None:
    if not run:
        return None
    path = Path(run) / "metrics.jsonl"
    if not path.exists():
        return None
    times = [r["time"] for r in map(json.loads, path.read_text().splitlines()) if "time" in r]
    return max(times) if times else None


def measure(name: str, spec: str, base, args) -> dict:
    out = Path(args.out) / f"{name}.json"
    if out.exists():
        return json.loads(out.read_text())
    t0 = time.perf_counter()
    llm = base if spec == args.base_spec else load(spec)
    rec = {"stage": name, "model": spec}
    rec["fr"] = french_ppl(llm)
    print(f"{name}: French val ppl {rec['fr']['val_ppl']:.3f}", flush=True)
    logps = pair_logprobs(llm, args.pairs)  # (N, 2)
    torch.save(logps, Path(args.out) / f"{name}_pairs.pt")
    rec["pair_logps"] = logps.tolist()
    rec["task"] = task_accuracy(llm, args.heldout)
    print(f"{name}: task {rec['task']}", flush=True)
    rec["samples"] = samples(llm)
    rec["measure_s"] = round(time.perf_counter() - t0, 1)
    out.write_text(json.dumps(rec, indent=1, ensure_ascii=False, default=float))
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stage", action="append", required=True,
                    help="NAME=MODEL[+ADAPTER]; the first is the base")
    ap.add_argument("--run", action="append", default=[], help="NAME=RUN_DIR (for the wall time)")
    ap.add_argument("--pairs", type=int, default=120, help="held-out preference pairs (300 = all)")
    ap.add_argument("--arithmetic", type=int, default=600,
                    help="problems generated as `llmkit grpo --arithmetic`")
    ap.add_argument("--val", type=int, default=100, help="of which held out, as `llmkit grpo --val`")
    ap.add_argument("--seed", type=int, default=1337, help="`llmkit grpo --seed` (generation and split)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/pipeline/table")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    stages = [s.split("=", 1) for s in args.stage]
    runs = dict(r.split("=", 1) for r in args.run)
    args.base_spec = stages[0][1]
    from llmkit.train.rewards import arithmetic_problems, split_problems

    problems = arithmetic_problems(args.arithmetic, seed=args.seed)
    _, args.heldout = split_problems(problems, args.val, args.seed)
    base = load(args.base_spec)
    recs = [measure(name, spec, base, args) for name, spec in stages]
    lengths = pair_lengths(base, args.pairs)
    base_lp = torch.tensor(recs[0]["pair_logps"])
    for i, r in enumerate(recs):  # implicit DPO reward against the base and against the previous stage
        lp = torch.tensor(r["pair_logps"])
        r["pref"] = implicit_accuracy(lp, base_lp, lengths)
        prev = torch.tensor(recs[i - 1]["pair_logps"]) if i else None
        r["pref_prev"] = implicit_accuracy(lp, prev, lengths) if i else None
    Path(args.out, "summary.json").write_text(json.dumps(
        [{k: v for k, v in r.items() if k != "pair_logps"} for r in recs], indent=1, ensure_ascii=False))
    lines = ["| stage | train wall time | French val ppl | pref. acc, implicit reward vs base | "
             "vs previous stage | arithmetic acc (95 % CI, n) |", "|---|---|---|---|---|---|"]
    for r in recs:
        wt = wall_time(runs.get(r["stage"]))
        p, t = r["pref"], r["task"]
        lines.append(
            f"| {r['stage']} | {'-' if wt is None else f'{wt / 60:.1f} min'} | {r['fr']['val_ppl']:.2f} | "
            f"{100 * p['reward_acc']:.1f} % [{100 * p['reward_acc_lo']:.1f}, "
            f"{100 * p['reward_acc_hi']:.1f}] | {pct(r['pref_prev'])} | "
            f"{100 * t['val_accuracy']:.1f} % [{100 * t['val_acc_low']:.1f}, {100 * t['val_acc_high']:.1f}] "
            f"({t['val_n']}) |")
    lines.append("")
    for r in recs:
        for q, a in zip(PROMPTS, r["samples"]):
            lines.append(f"- **{r['stage']}** — {q} → {a.strip()[:200]!r}")
    table = "\n".join(lines) + "\n"
    (Path(args.out) / "table.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()

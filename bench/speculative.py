"""Speculative decoding: speed-up and acceptance on a task that copies its prompt (rewrite a paragraph) and
on one that does not (an open question), plain vs prompt lookup (--speculative K) vs a draft model, greedy,
same run.

    python bench/speculative.py [MODEL] [--ks 4,8] [--rounds 3] [--max-tokens 160]
    python bench/speculative.py --dtype float32 --draft smollm2-135m-instruct --draft-ks 4   # fp32 target,
                                                                                # its int4 GGUF drafting

Each configuration runs the same greedy request; the answer must be token for token the plain one. Figures:
decode tok/s (best round), the speed-up over plain decoding, and the share of drafted tokens accepted.
"""

from __future__ import annotations

import argparse
import time

import torch

PARAGRAPH = ("The old lighthouse stood at the end of the rocky point, where the river met the sea. Every "
             "night for forty years, the keeper climbed the ninety steps, cleaned the great lens and lit the "
             "lamp, so that the fishing boats could find their way home through the fog.")
TASKS = {
    "rewrite": [{"role": "user", "content": f"Rewrite this paragraph, keeping every sentence: {PARAGRAPH}"}],
    "open chat": [{"role": "user", "content": "Give me three ideas for a weekend with friends."}],
}


def main() -> None:
    import llmkit
    from llmkit.hub import DEFAULT_MODEL

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--ks", default="4,8", help="draft lengths to try")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default=None, help="the target's dtype (e.g. float32; default: as loaded)")
    ap.add_argument("--draft", default=None, metavar="MODEL",
                    help="also draft with this model (as loaded: a GGUF at its own precision)")
    ap.add_argument("--draft-ks", default="4", help="draft lengths to try with --draft")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    llm = llmkit.load(args.model or DEFAULT_MODEL, device="cpu", dtype=args.dtype)
    draft = llmkit.load(args.draft, device="cpu").model if args.draft else None
    configs = [("off", 0, None)] + [(f"lookup {k}", int(k), None) for k in args.ks.split(",") if k]
    if draft is not None:
        configs += [(f"draft {k}", int(k), draft) for k in args.draft_ks.split(",") if k]
    print(f"{args.model or DEFAULT_MODEL} ({args.dtype or 'as loaded'}), {args.threads} threads, greedy, "
          f"at most {args.max_tokens} tokens" + (f"; draft model {args.draft}" if draft is not None else ""))
    for task, msgs in TASKS.items():
        best = {c: 0.0 for c, _, _ in configs}
        acc: dict[str, tuple[int, int]] = {}
        ref = None
        for _ in range(args.rounds):
            for name, k, d in configs:  # alternating: A B C A B C
                llm.draft_model = d
                t = time.perf_counter()
                r = llm.chat(msgs, temperature=0, max_tokens=args.max_tokens, speculative=k)
                dt = time.perf_counter() - t - r.timings["prefill_s"]
                ref = ref or r.token_ids
                assert r.token_ids == ref, f"{task}: {name} changed the answer"
                best[name] = max(best[name], (len(r.token_ids) - 1) / dt)
                acc[name] = (r.timings.get("accepted_draft_tokens", 0), r.timings.get("draft_tokens", 0))
        print(f"\n{task} ({len(ref)} tokens): {llm.tokenizer.decode(ref)[:70]!r}...")
        print(f"{'speculative':>12} {'tok/s':>8} {'x plain':>8} {'accepted':>14}")
        for name, _, _ in configs:
            a, d = acc[name]
            share = f"{a}/{d} = {100 * a / d:.0f}%" if d else "-"
            print(f"{name:>12} {best[name]:8.1f} {best[name] / best['off']:8.2f} {share:>14}")


if __name__ == "__main__":
    main()

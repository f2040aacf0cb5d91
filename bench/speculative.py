"""Speculative decoding by prompt lookup: speed-up and acceptance on a task that copies its prompt (rewrite a
paragraph) and on one that does not (an open question), plain vs --speculative K, greedy, same run.

    python bench/speculative.py [MODEL] [--ks 4,8] [--rounds 3] [--max-tokens 160]

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
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    llm = llmkit.load(args.model or DEFAULT_MODEL, device="cpu")
    ks = [0] + [int(k) for k in args.ks.split(",")]
    print(f"{args.model or DEFAULT_MODEL}, {args.threads} threads, greedy, at most {args.max_tokens} tokens")
    for task, msgs in TASKS.items():
        best = {k: 0.0 for k in ks}
        acc: dict[int, tuple[int, int]] = {}
        ref = None
        for _ in range(args.rounds):
            for k in ks:  # alternating: A B C A B C
                t = time.perf_counter()
                r = llm.chat(msgs, temperature=0, max_tokens=args.max_tokens, speculative=k)
                dt = time.perf_counter() - t - r.timings["prefill_s"]
                ref = ref or r.token_ids
                assert r.token_ids == ref, f"{task}: speculative {k} changed the answer"
                best[k] = max(best[k], (len(r.token_ids) - 1) / dt)
                acc[k] = (r.timings.get("accepted_draft_tokens", 0), r.timings.get("draft_tokens", 0))
        print(f"\n{task} ({len(ref)} tokens): {llm.tokenizer.decode(ref)[:70]!r}...")
        print(f"{'speculative':>12} {'tok/s':>8} {'x plain':>8} {'accepted':>14}")
        for k in ks:
            a, d = acc[k]
            share = f"{a}/{d} = {100 * a / d:.0f}%" if d else "-"
            print(f"{k or 'off':>12} {best[k]:8.1f} {best[k] / best[0]:8.2f} {share:>14}")


if __name__ == "__main__":
    main()

"""Verb `reward-train`: a reward model (scalar head, Bradley-Terry loss) on preference pairs; a thin wrapper
over llmkit.train.reward.reward_train. Runs end with OUT/reward, an HF ForSequenceClassification folder."""

from __future__ import annotations

import argparse

from llmkit.cli.common import add_run_args
from llmkit.lora import TARGETS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "reward-train",
        help="train a reward model on preference pairs (Bradley-Terry loss, held-out accuracy)",
        description="Train MODEL + a scalar score head on preference pairs (prompt, chosen, rejected) with "
        "TRL's Bradley-Terry loss; logs held-out accuracy with its 95 % interval. Writes OUT/metrics.jsonl, "
        "OUT/loss.png, OUT/checkpoint.pt, OUT/run.json and, at the end, OUT/reward (an HF folder that "
        "transformers' AutoModelForSequenceClassification loads; LoRA merged in).",
    )
    p.add_argument("model", help="model name, HF repo id, GGUF file, HF folder, or a reward/ folder")
    p.add_argument("--data", nargs="+", required=True, help="JSONL/JSON files of preference pairs")
    p.add_argument("--val", nargs="+", default=None,
                   help="held-out pairs (default: --val-fraction of --data, split by prompt)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of --data held out without --val")
    p.add_argument("--lora-r", type=int, default=None, help="LoRA rank (default: full fine-tuning)")
    p.add_argument("--lora-alpha", type=float, default=16)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--lora-targets", default=",".join(TARGETS),
                   help="comma-separated projection names (default all of q,k,v,o,gate,up,down)")
    p.add_argument("--head-only", action="store_true",
                   help="train only the score head on the frozen model (a linear probe: forwards only)")
    p.add_argument("--center-rewards-coefficient", type=float, default=None,
                   help="add coef * mean((r_chosen + r_rejected)^2) (TRL's; e.g. 0.01): rewards near 0")
    p.add_argument("--max-length", type=int, default=384,
                   help="tokens per sequence; longer ones keep their last tokens (384)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=4, help="pairs per micro-step (2 sequences each)")
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--lr", type=float, default=None, help="default 2e-4 LoRA, 1e-3 head only, 1e-5 full")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--eval-every", type=int, default=0, help="steps between held-out evals (0: at the end)")
    p.add_argument("--eval-tokens", type=int, default=1 << 17,
                   help="token cap of periodic evals (the final eval reads every held-out pair)")
    add_run_args(p)
    p.set_defaults(func=_reward_train)


def _reward_train(args: argparse.Namespace) -> int:
    from llmkit.errors import LlmkitError
    from llmkit.train.reward import REWARD_DIR, reward_train

    targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    if args.lora_r and not targets:
        raise LlmkitError("--lora-targets is empty; name projections such as q_proj,v_proj")
    out = reward_train(
        args.model, args.data, args.out, val=args.val, val_fraction=args.val_fraction, lora_r=args.lora_r,
        lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, lora_targets=targets,
        head_only=args.head_only, center_rewards_coefficient=args.center_rewards_coefficient,
        max_length=args.max_length, resume=args.resume,
        steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, warmup=args.warmup,
        **({} if args.lr is None else {"lr": args.lr}),  # default: the library's per mode
        eval_every=args.eval_every, eval_tokens=args.eval_tokens, save_every=args.save_every,
        time_budget=args.time_budget, dtype=args.dtype, device=args.device, seed=args.seed,
        threads=args.threads, parallel=args.parallel, progress=not args.no_progress,
    )
    print(f"run in {out}: reward model in {REWARD_DIR}/")
    return 0

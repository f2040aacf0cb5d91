"""Verbs `grpo` (RL on verifiable maths rewards) and `rlhf` (RLOO against a reward model): thin wrappers over
llmkit.train.grpo.grpo and llmkit.train.rloo.rlhf. LoRA runs end with OUT/adapter (PEFT), full runs with
OUT/hf; OUT/rollouts.jsonl holds every sampled completion with its rewards and advantage."""

from __future__ import annotations

import argparse

from llmkit.cli.common import add_run_args
from llmkit.lora import TARGETS


def _common(p: argparse.ArgumentParser, *, group: int, prompts: int, max_tokens: int, beta: float) -> None:
    p.add_argument("model", help="model name, HF repo id, GGUF file or HF folder (the policy)")
    p.add_argument("--val", default="0.1",
                   help="held-out prompts: a count or fraction of --data (default 0.1), or JSONL file(s), "
                        "comma-separated; 0 = no evaluation")
    p.add_argument("--group-size", type=int, default=group, help=f"completions per prompt ({group})")
    p.add_argument("--prompts-per-step", type=int, default=prompts, help=f"prompts per step ({prompts})")
    p.add_argument("--max-tokens", type=int, default=max_tokens, help=f"completion length cap ({max_tokens})")
    p.add_argument("--temperature", type=float, default=0.7,
                   help="sampling temperature (0.7; TRL's 1.0 makes a 135M model ramble)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--beta", type=float, default=beta, help=f"KL coefficient to the reference ({beta}; 0 = "
                   "no reference)")
    p.add_argument("--epsilon", type=float, default=0.2, help="ratio clipping (0.2)")
    p.add_argument("--epsilon-high", type=float, default=None, help="upper clipping (default --epsilon)")
    p.add_argument("--lora-r", type=int, default=None, help="LoRA rank (default: full fine-tuning)")
    p.add_argument("--lora-alpha", type=float, default=16)
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--lora-targets", default=",".join(TARGETS),
                   help="comma-separated projection names (default all of q,k,v,o,gate,up,down)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--grad-accum", type=int, default=1, help="micro-steps per step (must divide the rows)")
    p.add_argument("--lr", type=float, default=None, help="default 5e-5 with LoRA, 1e-6 full")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--eval-every", type=int, default=0, help="steps between held-out evals (0: start + end)")
    p.add_argument("--eval-max", type=int, default=None, help="held-out prompts in periodic evals (all)")
    add_run_args(p)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "grpo",
        help="GRPO on maths problems with verifiable answers (exact number, answer format)",
        description="Reinforcement learning with GRPO (TRL's formulas): each step samples --group-size "
        "answers to --prompts-per-step problems, rewards them by rule, and takes a clipped policy step with "
        "a KL penalty. Problems: --data JSONL of {question, answer} (GSM8K '#### N' answers accepted) or "
        "--arithmetic N generated ones. Writes OUT/metrics.jsonl (reward, accuracy, kl per step), "
        "OUT/rollouts.jsonl, held-out accuracy with a 95 % interval, and OUT/adapter or OUT/hf.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", nargs="+", help="JSONL files of {question, answer}")
    src.add_argument("--arithmetic", type=int, metavar="N", help="generate N easy word problems instead")
    p.add_argument("--reward", default="correct=1,format=0.2",
                   help="weighted rewards: correct (exact number) and format (last line 'Answer: N'); "
                        "default correct=1,format=0.2")
    p.add_argument("--loss-type", default="dapo", choices=("dapo", "grpo", "dr_grpo", "bnpo"),
                   help="TRL's loss normalisations (default dapo, TRL's default)")
    p.add_argument("--scale-rewards", default="group", choices=("group", "batch", "none"))
    p.add_argument("--mask-truncated", action="store_true",
                   help="completions cut by --max-tokens do not train")
    _common(p, group=8, prompts=4, max_tokens=64, beta=0.04)
    p.set_defaults(func=_grpo)

    p = sub.add_parser(
        "rlhf",
        help="RLHF with RLOO against a reward model (llmkit reward-train)",
        description="Policy optimisation against a learned reward model with RLOO (leave-one-out baseline, "
        "no critic): reward = RM score - beta * KL(policy || reference). Prompts: --data JSONL with 'prompt' "
        "(text or messages, e.g. preference pairs), 'messages' or 'question'.",
    )
    p.add_argument("--reward-model", required=True, help="reward model folder (OUT/reward of reward-train)")
    p.add_argument("--data", nargs="+", required=True, help="JSONL files of prompts")
    p.add_argument("--normalize-advantages", action="store_true", help="standardise advantages per batch")
    _common(p, group=4, prompts=4, max_tokens=64, beta=0.05)
    p.set_defaults(func=_rlhf)


def _val(text: str) -> float | list[str] | None:
    try:
        v = float(text)
    except ValueError:
        return [s for s in text.split(",") if s]
    return v if v > 0 else None


def _train_kwargs(args: argparse.Namespace) -> dict:
    from llmkit.errors import LlmkitError

    kw = dict(steps=args.steps, grad_accum=args.grad_accum, warmup=args.warmup, eval_every=args.eval_every,
              save_every=args.save_every, time_budget=args.time_budget, dtype=args.dtype, device=args.device,
              seed=args.seed, threads=args.threads, parallel=args.parallel, progress=not args.no_progress)
    if args.lr is not None:
        kw["lr"] = args.lr
    targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    if args.lora_r and not targets:
        raise LlmkitError("--lora-targets is empty; name projections such as q_proj,v_proj")
    v = _val(args.val)
    kw.update(val=int(v) if isinstance(v, float) and v >= 1 else v, group_size=args.group_size,
              prompts_per_step=args.prompts_per_step, max_tokens=args.max_tokens,
              temperature=args.temperature,
              top_p=args.top_p, beta=args.beta, epsilon=args.epsilon, epsilon_high=args.epsilon_high,
              lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
              lora_targets=targets, eval_max=args.eval_max, resume=args.resume)
    return kw


def _grpo(args: argparse.Namespace) -> int:
    from llmkit.train.grpo import grpo
    from llmkit.train.rewards import arithmetic_problems

    data = arithmetic_problems(args.arithmetic, seed=args.seed) if args.arithmetic else args.data
    out = grpo(args.model, data, args.out, rewards=args.reward, loss_type=args.loss_type,
               scale_rewards=args.scale_rewards, mask_truncated=args.mask_truncated, **_train_kwargs(args))
    print(f"run in {out}: " + ("adapter in adapter/" if args.lora_r else "model in hf/"))
    return 0


def _rlhf(args: argparse.Namespace) -> int:
    from llmkit.train.rloo import rlhf

    out = rlhf(args.model, args.reward_model, args.data, args.out,
               normalize_advantages=args.normalize_advantages, **_train_kwargs(args))
    print(f"run in {out}: " + ("adapter in adapter/" if args.lora_r else "model in hf/"))
    return 0

"""Verb `dpo`: Direct Preference Optimization on preference pairs (LoRA by default, full, or QLoRA); a thin
wrapper over llmkit.train.preference.dpo. LoRA runs end with OUT/adapter (PEFT format), full runs with OUT/hf.
`torchrun --nproc-per-node N -m llmkit dpo ... [--parallel fsdp]` trains on N processes (DDP by default).

Defaults, chosen for a short CPU run: LoRA r 16 (alpha 16, scaling 1) so the reference is the same weights
with the adapters off (no second model in memory, optimizer state for ~3 % of the weights); beta 0.1 (the
DPO paper's and TRL's default); lr 1e-4 with LoRA, 5e-6 full: a CPU budget buys tens of steps, not TRL's
thousands at 1e-6 (full), and LoRA's zero-initialised B wants ~10-20x the full-model rate (half the SFT
stage's 2e-4); weight decay 0 (TRL's default: decay would pull towards zero, not towards the reference).
"""

from __future__ import annotations

import argparse

from llmkit.cli.common import add_run_args
from llmkit.lora import TARGETS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "dpo",
        help="preference alignment with DPO (LoRA by default; --lora-r 0 for full fine-tuning)",
        description="Align MODEL on preference pairs (JSONL/JSON records: prompt as text or messages, "
        "chosen, rejected) with Direct Preference Optimization. Logs held-out implicit-reward accuracy, "
        "margins and DPO loss to OUT/metrics.jsonl; writes OUT/loss.png, OUT/run.json, OUT/checkpoint.pt "
        "and, at the end, OUT/adapter (LoRA, PEFT format) or OUT/hf.",
    )
    p.add_argument("model", help="model name, HF repo id, GGUF file or HF folder")
    p.add_argument("--adapter", default=None,
                   help="start from MODEL + this LoRA adapter (e.g. the SFT stage's), merged; it is the "
                   "reference")
    p.add_argument("--data", nargs="+", required=True, help="JSONL/JSON files of preference pairs")
    p.add_argument("--val", nargs="+", default=None,
                   help="held-out pairs (default: --val-fraction of --data, split by prompt)")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--beta", type=float, default=0.1,
                   help="strength of the pull towards the reference (0.1; IPO: its tau)")
    p.add_argument("--loss", default="sigmoid", choices=("sigmoid", "ipo"),
                   help="sigmoid: DPO's -log sigmoid(beta * margin); ipo: squared, length-averaged (TRL's "
                   "IPO)")
    p.add_argument("--label-smoothing", type=float, default=0.0,
                   help="sigmoid only: assumed share of flipped labels, conservative DPO (0 = plain DPO)")
    p.add_argument("--ref", default="auto", choices=("auto", "adapters", "copy"),
                   help="reference model: adapters = the policy with its LoRA off (auto with LoRA), copy = a "
                   "frozen copy of the starting model (auto for full fine-tuning)")
    p.add_argument("--precompute-ref", action="store_true",
                   help="reference log-probs of every pair once before training (no reference forward per "
                   "step)")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank (16); 0 = full fine-tuning")
    p.add_argument("--lora-alpha", type=float, default=16)
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--lora-targets", default=",".join(TARGETS),
                   help="comma-separated projection names (default all of q,k,v,o,gate,up,down)")
    p.add_argument("--qlora", choices=("int4", "int8"), default=None,
                   help="quantize the frozen base first (LoRA on top)")
    p.add_argument("--max-length", type=int, default=512,
                   help="tokens per prompt + answer; longer pairs lose the prompt's start first")
    p.add_argument("--max-prompt-length", type=int, default=None,
                   help="the prompt is never cut below this (default max-length / 2); then answers are cut")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8, help="pairs per micro-step (8)")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=None, help="default 1e-4 with LoRA, 5e-6 full")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--eval-pairs", type=int, default=128,
                   help="held-out pairs scored at periodic evals (0 = all; the final eval uses all)")
    add_run_args(p)
    p.set_defaults(func=_dpo)


def _dpo(args: argparse.Namespace) -> int:
    from llmkit.errors import LlmkitError
    from llmkit.train.preference import dpo
    from llmkit.train.trainer import TrainConfig

    lora_r = args.lora_r or None
    lora = bool(lora_r or args.qlora)
    targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    if lora and not targets:
        raise LlmkitError("--lora-targets is empty; name projections such as q_proj,v_proj")
    cfg = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, block_size=args.max_length,
        lr=args.lr if args.lr is not None else (1e-4 if lora else 5e-6), warmup=args.warmup, weight_decay=0.0,
        eval_every=args.eval_every, save_every=args.save_every, time_budget=args.time_budget,
        dtype=args.dtype, device=args.device, seed=args.seed, threads=args.threads, parallel=args.parallel,
        progress=not args.no_progress,
    )
    out = dpo(
        args.model, args.data, args.out, cfg, adapter=args.adapter, val=args.val,
        val_fraction=args.val_fraction, beta=args.beta, loss_type=args.loss,
        label_smoothing=args.label_smoothing, ref=args.ref, precompute_ref=args.precompute_ref,
        lora_r=lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, lora_targets=targets,
        qlora=args.qlora, max_length=args.max_length, max_prompt_length=args.max_prompt_length,
        eval_pairs=args.eval_pairs or None, resume=args.resume,
    )
    from llmkit.train.trainer import distributed

    if distributed()[0] == 0:
        print(f"run in {out}: " + ("adapter in adapter/" if lora else "model in hf/"))
    return 0

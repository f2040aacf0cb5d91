"""Verb `sft`: supervised fine-tuning on chat data (full, LoRA or QLoRA); a thin wrapper over
llmkit.train.sft.sft. LoRA runs end with OUT/adapter (PEFT format), full runs with OUT/hf.
`torchrun --nproc-per-node N -m llmkit sft ... [--parallel fsdp]` trains on N processes (DDP by default)."""

from __future__ import annotations

import argparse

from llmkit.cli.common import add_run_args
from llmkit.lora import TARGETS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sft",
        help="supervised fine-tuning on conversations (full, --lora-r, or --qlora int4)",
        description="Fine-tune MODEL on chat data; only assistant tokens are trained. Writes "
        "OUT/metrics.jsonl, OUT/loss.png, OUT/checkpoint.pt and, at the end, OUT/adapter (LoRA, PEFT "
        "format) or OUT/hf.",
    )
    p.add_argument("model", help="model name, HF repo id, GGUF file or HF folder")
    p.add_argument("--data", nargs="+", required=True, help="JSONL/JSON files of conversations")
    p.add_argument("--format", default="auto", choices=("auto", "messages", "alpaca", "oasst"),
                   help="record format (auto: 'messages' or Alpaca 'instruction' per record)")
    p.add_argument("--split-key", default="tree",
                   help="records sharing this field stay on one side of the split (default tree)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share held out for eval loss (0.1)")
    p.add_argument("--lora-r", type=int, default=None, help="LoRA rank (default: full fine-tuning)")
    p.add_argument("--lora-alpha", type=float, default=16)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--lora-targets", default=",".join(TARGETS),
                   help="comma-separated projection names (default all of q,k,v,o,gate,up,down)")
    p.add_argument("--qlora", choices=("int4", "int8"), default=None,
                   help="quantize the frozen base first (implies LoRA, r 8 unless --lora-r)")
    p.add_argument("--no-pack", action="store_true", help="one padded example per row instead of packing")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--block-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=None, help="default 2e-4 with LoRA, 2e-5 full")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--sample-prompt", action="append", default=[],
                   help="fixed prompt answered greedily at each eval (repeatable)")
    p.add_argument("--sample-tokens", type=int, default=48)
    add_run_args(p)
    p.set_defaults(func=_sft)


def _sft(args: argparse.Namespace) -> int:
    from llmkit.errors import LlmkitError
    from llmkit.train.sft import sft
    from llmkit.train.trainer import TrainConfig

    lora = bool(args.lora_r or args.qlora)
    targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    if lora and not targets:
        raise LlmkitError("--lora-targets is empty; name projections such as q_proj,v_proj")
    cfg = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, block_size=args.block_size,
        lr=args.lr if args.lr is not None else (2e-4 if lora else 2e-5), warmup=args.warmup,
        eval_every=args.eval_every, save_every=args.save_every, time_budget=args.time_budget,
        dtype=args.dtype, device=args.device, seed=args.seed, threads=args.threads, parallel=args.parallel,
        progress=not args.no_progress,
    )
    out = sft(
        args.model, args.data, args.out, cfg, fmt=args.format, split_key=args.split_key or None,
        val_fraction=args.val_fraction, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout, lora_targets=targets, qlora=args.qlora, packed=not args.no_pack,
        resume=args.resume, sample_prompts=args.sample_prompt, sample_tokens=args.sample_tokens,
    )
    from llmkit.train.trainer import distributed

    if distributed()[0] == 0:
        print(f"run in {out}: " + ("adapter in adapter/" if lora else "model in hf/"))
    return 0

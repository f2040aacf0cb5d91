"""Verbs `prepare` (corpus -> tokenizer + token shards) and `pretrain` (shards -> trained model).

Thin wrappers over llmkit.train.data.prepare and llmkit.train.pretrain.pretrain; run
`torchrun --nproc_per_node N -m llmkit pretrain ... [--parallel fsdp]` for DDP (default) or FSDP2.
"""

from __future__ import annotations

import argparse

# ModelConfig fields settable on the command line (the rest come from the preset)
MODEL_FIELDS = {
    "n_layers": int,
    "d_model": int,
    "n_heads": int,
    "n_kv_heads": int,
    "d_ff": int,
    "max_seq_len": int,
    "pos_encoding": str,
    "norm": str,
    "mlp": str,
    "activation": str,
    "rope_theta": float,
    "model_type": str,
    "n_experts": int,
    "n_experts_per_tok": int,
    "router_aux_loss_coef": float,
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="tokenize a text corpus into token shards for pretraining")
    p.add_argument("corpus", nargs="+", help=".txt files or directories of them (one document per file)")
    p.add_argument(
        "--tokenizer",
        default="train:4096",
        help="train:VOCAB_SIZE (byte-level BPE), char (bytes), or a tokenizer path (default train:4096)",
    )
    p.add_argument("--out", required=True, help="output folder (shards, manifest.json, tokenizer/)")
    p.add_argument(
        "--val-fraction", type=float, default=0.1, help="share of the bytes held out (default 0.1)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_prepare)

    t = sub.add_parser("pretrain", help="train a Transformer from scratch on prepared shards")
    t.add_argument("--data", required=True, help="folder written by `llmkit prepare`")
    t.add_argument("--out", required=True, help="run folder: checkpoint.pt, metrics.jsonl, loss.png, hf/")
    t.add_argument(
        "--preset", default="tiny", help="model preset (tiny, mini, small, gpt2-small, moe-tiny ...)"
    )
    for name, typ in MODEL_FIELDS.items():
        t.add_argument("--" + name.replace("_", "-"), type=typ, default=None, help=argparse.SUPPRESS)
    t.add_argument("--steps", type=int, default=1000)
    t.add_argument("--batch-size", type=int, default=16, help="sequences per micro-step over all processes")
    t.add_argument("--block-size", type=int, default=256)
    t.add_argument("--grad-accum", type=int, default=1)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--warmup", type=int, default=100)
    t.add_argument("--min-lr", type=float, default=None, help="default lr/10")
    t.add_argument("--weight-decay", type=float, default=0.1)
    t.add_argument("--clip", type=float, default=1.0)
    t.add_argument("--dropout", type=float, default=None)
    t.add_argument("--eval-every", type=int, default=200)
    t.add_argument("--eval-tokens", type=int, default=1 << 17)
    t.add_argument("--save-every", type=int, default=0)
    t.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="stop after this many seconds of training, with the LR schedule run over time",
    )
    t.add_argument("--compile", action="store_true")
    t.add_argument("--dtype", default="auto", help="auto (fp32 CPU, bf16 CUDA) | float32 | bfloat16")
    t.add_argument("--device", default="auto")
    t.add_argument("--seed", type=int, default=1337)
    t.add_argument("--threads", type=int, default=None)
    t.add_argument("--parallel", default="auto", choices=("auto", "ddp", "fsdp"),
                   help="under torchrun: ddp or fsdp (FSDP2 fully_shard); auto = ddp")
    t.add_argument("--sample-prompt", default=None, help="fixed prompt for samples (default: start of val)")
    t.add_argument("--sample-tokens", type=int, default=96)
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=_pretrain)


def _prepare(args: argparse.Namespace) -> int:
    from llmkit.train.data import prepare

    m = prepare(
        args.corpus, args.out, tokenizer=args.tokenizer, val_fraction=args.val_fraction, seed=args.seed
    )
    for name, s in m["splits"].items():
        print(
            f"{name}: {s['documents']} documents, {s['tokens']:,} tokens, {s['bytes']:,} bytes "
            f"({s['bytes'] / max(1, s['tokens']):.2f} bytes/token)"
        )
    print(f"vocab {m['tokenizer']['vocab_size']}, {m['dtype']} shards in {args.out}")
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    from llmkit.train.pretrain import pretrain
    from llmkit.train.trainer import TrainConfig

    cfg = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        block_size=args.block_size,
        lr=args.lr,
        min_lr=args.min_lr,
        warmup=args.warmup,
        weight_decay=args.weight_decay,
        clip=args.clip,
        eval_every=args.eval_every,
        eval_tokens=args.eval_tokens,
        save_every=args.save_every,
        dtype=args.dtype,
        compile=args.compile,
        seed=args.seed,
        device=args.device,
        threads=args.threads,
        parallel=args.parallel,
        time_budget=args.time_budget,
        progress=not args.no_progress,
    )
    overrides = {k: getattr(args, k) for k in MODEL_FIELDS}
    overrides["dropout"] = args.dropout
    hist = pretrain(
        args.data,
        args.out,
        cfg,
        preset=args.preset,
        model_overrides=overrides,
        resume=args.resume,
        sample_prompt=args.sample_prompt,
        sample_tokens=args.sample_tokens,
    )
    ev = [r for r in hist if "val_loss" in r]
    if ev:
        print(
            f"final: val loss {ev[-1]['val_loss']:.4f}, bits/byte {ev[-1]['val_bpb']:.4f}; "
            f"model in {args.out}/hf"
        )
    return 0

"""Flags several verbs share: the training verbs' run flags (sft, dpo, reward-train, grpo, rlhf: budget,
device, resume, output) and the inference verbs' --kv-cache (generate, chat, serve)."""

from __future__ import annotations

import argparse

from llmkit.errors import LlmkitError


def add_run_args(p: argparse.ArgumentParser) -> None:
    """--save-every, --time-budget, --dtype, --device, --seed, --threads, --parallel, --resume, --out,
    --no-progress (the stage's own flags come before)."""
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--time-budget", type=float, default=None,
                   help="stop after this many seconds, with the LR schedule run over time")
    p.add_argument("--dtype", default="auto", help="auto (fp32 CPU, bf16 autocast CUDA) | float32 | bfloat16")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--parallel", default="auto", choices=("auto", "ddp", "fsdp"),
                   help="under torchrun: ddp or fsdp (FSDP2 fully_shard); auto = ddp; --batch-size is global")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--no-progress", action="store_true")


def add_kv_cache_arg(p: argparse.ArgumentParser) -> None:
    """--kv-cache auto|bf16|fp16|int8: the KV cache's storage (llmkit.model.kv_cache)."""
    p.add_argument("--kv-cache", default=None, metavar="auto|bf16|fp16|int8",
                   help="KV cache storage: auto = the model's dtype (default), bf16 / fp16 (half of fp32), "
                        "int8 (a scale per head and position: about a quarter of fp32)")


def add_speculative_arg(p: argparse.ArgumentParser) -> None:
    """--speculative K: prompt-lookup speculative decoding (llmkit.generate.engine.PromptLookup)."""
    p.add_argument("--speculative", type=int, default=None, metavar="K",
                   help="speculative decoding: up to K draft tokens per step taken from the prompt (prompt "
                        "lookup), checked in one forward; the same output, faster when the answer copies "
                        "the prompt (summaries, rewrites, extraction). 0 = off (default)")


def speculative_arg(args: argparse.Namespace) -> int | None:
    """The --speculative value, checked before any model loads (4 when only --draft-model is given)."""
    k = args.speculative
    if k is not None and not 0 <= k <= 64:
        raise LlmkitError(f"--speculative {k}: give 0 (off) to 64 draft tokens per step")
    if k is None and getattr(args, "draft_model", None):
        return 4
    return k


def add_draft_model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--draft-model", default=None, metavar="MODEL",
                   help="speculative decoding with drafts from this model instead of the prompt (a smaller "
                        "model with the same tokenizer, or the same model quantized harder, e.g. the int4 "
                        "GGUF for a float32 or int8 model); greedy drafts, the same output")


def attach_draft_model(llm, args: argparse.Namespace) -> None:
    """Load --draft-model (as its file comes: a GGUF at its own precision) and hand it to `llm`."""
    path = getattr(args, "draft_model", None)
    if not path:
        return
    import llmkit

    draft = llmkit.load(path, device=getattr(args, "device", None))
    if draft.config.vocab_size != llm.config.vocab_size:
        raise LlmkitError(f"--draft-model {path}: its vocabulary ({draft.config.vocab_size} ids) is not the "
                          f"model's ({llm.config.vocab_size}); a draft model needs the same tokenizer")
    llm.draft_model = draft.model


def kv_cache_arg(args: argparse.Namespace) -> str | None:
    """The --kv-cache value, checked before any model loads (a bad one is a one-line LlmkitError)."""
    if args.kv_cache is not None:
        import torch

        from llmkit.model.kv_cache import resolve_kv_dtype

        resolve_kv_dtype(args.kv_cache, torch.float32)
    return args.kv_cache

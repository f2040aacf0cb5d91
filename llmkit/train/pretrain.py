"""Pretraining stage: prepared token shards -> Transformer trained by the one Trainer -> HF directory.

`pretrain(data, out, ...)` builds the model config (preset + overrides; vocabulary from the data),
seeds everything, runs `Trainer` with `lm_loss`, evaluates val loss / perplexity / bits per byte and a
sample from a fixed prompt, and exports `out/hf` with `llmkit.checkpoint.hf.save_hf_dir`.

Notable choices
- Bits per byte = mean val nats/token / (ln 2 * val bytes/token), the bytes/token ratio of the val split
  from the manifest, so any two tokenizers compare (nanoGPT char-level on ASCII: bpb = loss / ln 2).
- The final eval covers every val token once (windows overlapping by one token); periodic evals cap
  the tokens at `eval_tokens`. With DDP each rank scores every W-th window and the sums are all-reduced.
  The log-likelihoods come from the one scorer (`llmkit.score.sequence_logprobs`).
- The sample prompt defaults to the first 8 tokens of the val split: fixed for the run, in the corpus'
  own language. Sampling (temperature 0.8) runs through the engine with its own seeded random stream.
- Distributed: under torchrun (WORLD_SIZE > 1) the process group is gloo on CPU, NCCL on GPU;
  `--batch-size` is global, so the same command trains the same trajectory on 1 or N processes.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from llmkit.config import ModelConfig
from llmkit.device import resolve_device
from llmkit.errors import LlmkitError
from llmkit.io import atomic_write_json
from llmkit.score import sequence_logprobs
from llmkit.tokenizer.chat import CHATML_TEMPLATE
from llmkit.train.data import TokenBatches, TokenData, batched, eval_windows, separator_id
from llmkit.train.losses import lm_loss
from llmkit.train.presets import preset as get_preset
from llmkit.train.trainer import TrainConfig, Trainer, distributed, init_distributed, seed_everything


def build_config(
    vocab_size: int, block_size: int, preset: str | None = "tiny", sep_id: int | None = None, **overrides: Any
) -> ModelConfig:
    fields = get_preset(preset) if preset else {}
    fields.update({k: v for k, v in overrides.items() if v is not None})
    fields["vocab_size"] = vocab_size
    fields["max_seq_len"] = max(fields.get("max_seq_len", block_size), block_size)
    fields.setdefault("bos_token_id", sep_id)
    fields.setdefault("eos_token_id", sep_id)
    try:
        return ModelConfig.from_dict(fields)
    except TypeError as e:
        raise LlmkitError(f"bad model settings: {e}") from None


@torch.no_grad()
def evaluate_lm(
    model: torch.nn.Module, windows: list, bytes_per_token: float, batch_size: int, device: torch.device
) -> dict[str, float]:
    """Val loss (nats/token), perplexity and bits per byte over `windows` (rank-strided under DDP)."""
    rank, world = distributed()
    was_training = model.training
    model.eval()
    nats = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    for x, y in batched(windows[rank::world], batch_size):
        w = torch.cat([x, y[:, -1:]], dim=1).to(device)  # (B, T+1) windows: all tokens but the first scored
        nats -= sequence_logprobs(model, w, torch.ones_like(w, dtype=torch.bool)).double().sum()
        count += y.numel()
    if world > 1:
        dist.all_reduce(nats)
        dist.all_reduce(count)
    model.train(was_training)
    loss = float(nats / count.clamp(min=1))
    return {
        "val_loss": loss,
        "val_ppl": math.exp(min(loss, 50.0)),
        "val_bpb": loss / (math.log(2) * bytes_per_token),
        "val_tokens": float(count),
    }


def sample(
    model: torch.nn.Module,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 0.8,
    seed: int = 0,
    device: torch.device | None = None,
) -> list[int]:
    """Temperature sampling through the engine, in fp32 and eval mode, with its own seeded random stream
    (the global RNG is untouched)."""
    from llmkit.generate.engine import Engine
    from llmkit.generate.sampling import SamplingParams

    n = min(max_new_tokens, model.config.max_seq_len - len(prompt_ids))
    if n <= 0:
        return []
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.autocast(device.type, enabled=False):
            eng = Engine(model, max_batch=1, max_seq_len=len(prompt_ids) + n)
            params = SamplingParams(temperature=temperature, max_tokens=n, seed=seed, ignore_eos=True)
            return [out.token_id for out in eng.generate_ids(prompt_ids, params)]
    finally:
        model.train(was_training)


def pretrain(
    data: str | os.PathLike,
    out: str | os.PathLike,
    cfg: TrainConfig,
    *,
    preset: str | None = "tiny",
    model_overrides: dict[str, Any] | None = None,
    resume: bool = False,
    sample_prompt: str | None = None,
    sample_tokens: int = 96,
    export: bool = True,
    stop_after: int | None = None,
) -> list[dict[str, Any]]:
    """Train a Transformer on a prepared dataset; returns the metrics records (rank 0)."""
    from llmkit.model import Transformer

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    init_distributed(cfg)
    rank, world = distributed()
    out = Path(out)
    td = TokenData(data)
    tok = td.tokenizer()
    sep = separator_id(tok)
    mc = build_config(td.vocab_size, cfg.block_size, preset, sep, **(model_overrides or {}))
    if mc.pos_encoding == "learned" and cfg.block_size > mc.max_seq_len:
        raise LlmkitError(f"--block-size {cfg.block_size} exceeds the model's max_seq_len {mc.max_seq_len}")
    seed_everything(cfg.seed)
    model = Transformer(mc)
    train_shards = td.shards("train")
    if not train_shards:
        raise LlmkitError(f"--data {data}: the train split is empty; run `llmkit prepare` with more text")
    batches = TokenBatches(
        train_shards, cfg.block_size, cfg.batch_size, seed=cfg.seed, rank=rank, world_size=world
    )
    val_all = eval_windows(td.shards("val"), cfg.block_size)
    val_periodic = eval_windows(td.shards("val"), cfg.block_size, cfg.eval_tokens)
    bpt = td.bytes_per_token("val") if val_all else 1.0
    device = resolve_device(cfg.device)
    if sample_prompt is None:
        first = td.shards("val") or train_shards
        prompt_ids = [int(t) for t in first[0][:8]]
    else:
        prompt_ids = tok.encode(sample_prompt)
    eval_bs = max(1, cfg.batch_size // world)

    def evaluate(m: torch.nn.Module, final: bool) -> dict[str, Any]:
        res: dict[str, Any] = {}
        wins = val_all if final else val_periodic
        if wins:
            res.update(evaluate_lm(m, wins, bpt, eval_bs, device))
        if rank == 0 and sample_tokens > 0 and prompt_ids:
            res["sample"] = tok.decode(
                prompt_ids + sample(m, prompt_ids, sample_tokens, seed=cfg.seed, device=device)
            )
        return res

    trainer = Trainer(model, lm_loss, batches, cfg, out, evaluate=evaluate, model_config=mc)
    if rank == 0:
        n_params = sum(p.numel() for p in model.parameters())
        info = {
            "model_config": mc.to_dict(),
            "train_config": {**cfg.__dict__},
            "data": str(data),
            "parameters": n_params,
            "world_size": world,
        }
        atomic_write_json(out / "run.json", info, default=str)
        if cfg.progress:
            print(
                f"model: {n_params / 1e6:.2f}M parameters, {mc.n_layers} layers x d_model {mc.d_model}; "
                f"{cfg.batch_size * cfg.grad_accum * cfg.block_size:,} tokens/step on {world} process(es)"
            )
    if resume:
        trainer.resume()
    history = trainer.fit(stop_after=stop_after)
    if export and trainer.finished:
        from llmkit.checkpoint.hf import save_hf_dir

        with trainer.gathered() as whole:  # FSDP: whole weights on every rank; rank 0 writes
            if rank == 0:
                save_hf_dir(
                    whole,
                    mc,
                    tok,
                    out / "hf",
                    chat_template=getattr(tok, "chat_template", None) or CHATML_TEMPLATE,
                )
    if world > 1:
        dist.barrier()
    return history

"""Supervised fine-tuning (SFT): chat data -> (ids, loss mask) -> packed blocks -> the one Trainer.

    convs = load_conversations(["chats.jsonl"])              # messages / Alpaca / OpenAssistant threads
    train, val = split_by_key(convs, key="tree")              # threads of one tree stay on one side
    sft("HuggingFaceTB/SmolLM2-135M-Instruct", convs, "runs/sft", lora_r=8, steps=200)

Notable choices
- Rendering goes through `llmkit.tokenizer.chat.render_chat`, the one chat-template function: the loss mask
  is its assistant mask (1 from just after each assistant header through its end-of-turn token), i.e. the
  tokens transformers' `return_assistant_tokens_mask` marks. Nothing else is trained.
- The loss is `llmkit.train.losses.lm_loss`: next-token cross-entropy where targets of untrained tokens are
  -100, returned as LossSum(sum over trained tokens, their count), so the Trainer divides by the trained
  tokens of the whole step (not by micro-batches). No second SFT loss exists: masked targets are the idea.
- Packing (default): the examples' tokens are concatenated into one stream, cut into rows of block_size
  inputs (+ the next token as the last target). Attention crosses example boundaries inside a row, with no
  position reset, as TRL's `packing=True` without `padding_free` does; the first token of an example is a
  template header (mask 0), so no target straddles two examples. `pack=False` puts one example per row,
  right-padded (pad targets -100). Either way an example longer than block_size + 1 tokens is truncated
  to it, and the number truncated is reported.
- Batches are drawn from a seeded permutation per epoch; the state is (epoch, position), so a resumed run
  draws the same rows as an uninterrupted one (the Trainer's exact resume). Under torchrun the batch is
  global: each of W processes keeps rows idx[rank::W] of it, so W processes train on the rows one process
  does (same losses, DDP or FSDP2); the held-out rows are split over ranks and their sums all-reduced;
  only rank 0 samples, prints and writes.
- Modes: full fine-tuning; LoRA (`lora_r`: `apply_lora` freezes the base, the Trainer then checkpoints only
  the adapters); QLoRA (`qlora="int4"|"int8"`: `quantize_model` first, then LoRA on the quantized base).
  The model is loaded in float32 (bf16 autocast on CUDA comes from the Trainer), adapters are float32.
- Evaluation: held-out loss / perplexity over every val row, and greedy answers to fixed prompts through a
  fresh Engine each time (never a cached one: its prefix cache would hold the old weights).
- Output: run folder with checkpoint.pt, metrics.jsonl, loss.png, run.json; at the end `adapter/` (PEFT
  format, `save_adapter`) for LoRA/QLoRA, `hf/` (`LLM.save_hf`) for full fine-tuning.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from llmkit.device import resolve_device
from llmkit.errors import LlmkitError
from llmkit.lora import TARGETS
from llmkit.train.losses import IGNORE_INDEX, lm_loss
from llmkit.train.trainer import TrainConfig, Trainer, distributed, init_distributed, seed_everything

FORMATS = ("auto", "messages", "alpaca", "oasst")
ROLES = ("system", "user", "assistant")
Messages = list[dict[str, str]]


# ------------------------------------------------------------------------------------------------- data
def _check_messages(msgs: Any, where: str) -> Messages:
    if not isinstance(msgs, list) or not msgs:
        raise LlmkitError(f"{where}: field 'messages' must be a non-empty list of {{role, content}}")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise LlmkitError(f"{where}: field 'messages[{i}]' must be an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise LlmkitError(f"{where}: field 'messages[{i}].role' must be one of {', '.join(ROLES)}, "
                              f"got {role!r}")
        if not isinstance(content, str):
            raise LlmkitError(f"{where}: field 'messages[{i}].content' must be a string")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise LlmkitError(f"{where}: field 'messages' has no assistant turn (nothing to train on)")
    return out


def _string_field(rec: dict, name: str, where: str, required: bool = True) -> str:
    v = rec.get(name)
    if v is None and not required:
        return ""
    if not isinstance(v, str) or (required and not v.strip()):
        raise LlmkitError(f"{where}: field '{name}' must be a non-empty string")
    return v


def parse_record(rec: Any, fmt: str, where: str) -> dict[str, Any]:
    """One record -> {"messages": [...], plus "id" / "tree" when the record has them}."""
    if not isinstance(rec, dict):
        raise LlmkitError(f"{where}: a record must be a JSON object, got {type(rec).__name__}")
    if fmt == "auto":
        fmt = "messages" if "messages" in rec else "alpaca" if "instruction" in rec else ""
        if not fmt:
            raise LlmkitError(f"{where}: field 'messages' or 'instruction' is missing (unknown format)")
    if fmt == "alpaca":
        instruction = _string_field(rec, "instruction", where)
        extra = _string_field(rec, "input", where, required=False)
        output = _string_field(rec, "output", where)
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        out: dict[str, Any] = {"messages": [{"role": "user", "content": user},
                                            {"role": "assistant", "content": output}]}
    else:
        if fmt == "oasst":
            for name in ("id", "tree"):
                if name not in rec:
                    raise LlmkitError(f"{where}: field '{name}' is missing (OpenAssistant threads need it)")
        out = {"messages": _check_messages(rec.get("messages"), where)}
    for name in ("id", "tree"):
        if name in rec:
            out[name] = rec[name]
    return out


def load_conversations(paths: str | os.PathLike | Iterable[str | os.PathLike], *, fmt: str = "auto"
                       ) -> list[dict[str, Any]]:
    """Read chat data: JSONL (one record a line) or a JSON list. Records: `messages` (list of {role,
    content}), Alpaca (instruction, input, output -> user "instruction\\n\\ninput" / assistant output) or
    OpenAssistant threads (id, tree, messages). Returns [{"messages", "id"?, "tree"?}]; a bad record is a
    one-line LlmkitError naming the file, the line (JSONL) or index (JSON) and the field."""
    if fmt not in FORMATS:
        raise LlmkitError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[dict[str, Any]] = []
    for path in map(Path, paths):
        if not path.is_file():
            raise LlmkitError(f"--data {path}: no such file")
        text = path.read_text(encoding="utf-8")
        stripped = text.lstrip()
        if stripped.startswith("["):  # a JSON list (Alpaca's alpaca_data.json)
            try:
                records = json.loads(text)
            except json.JSONDecodeError as e:
                raise LlmkitError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
            out += [parse_record(r, fmt, f"{path}: record {i}") for i, r in enumerate(records)]
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise LlmkitError(f"{path}:{n}: invalid JSON ({e.msg})") from None
            out.append(parse_record(rec, fmt, f"{path}:{n}"))
    if not out:
        raise LlmkitError(f"--data {', '.join(map(str, paths))}: no conversations found")
    return out


def split_by_key(items: Sequence[dict[str, Any]], key: str | None = "tree", val_fraction: float = 0.1,
                 seed: int = 0) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, val): whole groups of equal `item[key]` go to one side (items without the key are groups of
    one). Groups are shuffled with `seed` and taken for val until it holds >= val_fraction of the items;
    with a positive fraction and two groups or more, each side gets at least one group."""
    if not 0 <= val_fraction < 1:
        raise LlmkitError(f"--val-fraction {val_fraction}: must be in [0, 1)")
    groups: dict[Any, list[int]] = {}
    for i, it in enumerate(items):
        g = it.get(key, ("__single__", i)) if key else ("__single__", i)
        groups.setdefault(json.dumps(g, sort_keys=True, default=str), []).append(i)
    order = sorted(groups)
    random.Random(seed).shuffle(order)
    want = val_fraction * len(items)
    val_idx: set[int] = set()
    for g in order[:-1]:  # the last group always trains
        if len(val_idx) >= want or val_fraction == 0:
            break
        val_idx.update(groups[g])
    return ([it for i, it in enumerate(items) if i not in val_idx],
            [it for i, it in enumerate(items) if i in val_idx])


def encode_conversation(tokenizer: Any, messages: Messages, template: str | None = None
                        ) -> tuple[list[int], list[int]]:
    """(ids, loss_mask) of a conversation rendered by the model's chat template; mask 1 = assistant token."""
    from llmkit.tokenizer.chat import render_chat

    r = render_chat(tokenizer, messages, template=template)
    return r.ids, r.loss_mask


@dataclass
class Packed:
    """Rows of inputs x (N, block_size) and targets y (N, block_size), -100 where nothing is trained."""

    x: torch.Tensor
    y: torch.Tensor
    truncated: int  # examples cut to block_size + 1 tokens
    trained_tokens: int


def pack(examples: Iterable[tuple[list[int], list[int]]], block_size: int, *, packed: bool = True,
         pad_id: int = 0) -> Packed:
    """(ids, mask) examples -> fixed rows. packed: one stream cut into rows (attention crosses example
    boundaries inside a row); not packed: one right-padded example per row. Examples longer than
    block_size + 1 tokens are truncated (counted in `truncated`)."""
    limit = block_size + 1
    truncated = 0
    streams: list[tuple[list[int], list[int]]] = []
    for ids, mask in examples:
        if len(ids) != len(mask):
            raise LlmkitError("pack: ids and loss mask differ in length")
        if len(ids) > limit:
            truncated += 1
            ids, mask = ids[:limit], mask[:limit]
        if len(ids) >= 2:
            streams.append((ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]))
    if packed:
        ids = [t for s, _ in streams for t in s]
        lab = [t for _, s in streams for t in s]
        rows = max(1, math.ceil((len(ids) - 1) / block_size))
        pad = rows * block_size + 1 - len(ids)
        ids_t = torch.tensor(ids + [pad_id] * pad)
        lab_t = torch.tensor(lab + [IGNORE_INDEX] * pad)
        x = torch.stack([ids_t[i * block_size:(i + 1) * block_size] for i in range(rows)])  # (N, T)
        y = torch.stack([lab_t[i * block_size + 1:(i + 1) * block_size + 1] for i in range(rows)])  # (N, T)
    else:
        x = torch.full((max(1, len(streams)), block_size), pad_id)
        y = torch.full((max(1, len(streams)), block_size), IGNORE_INDEX)
        for i, (s, lab) in enumerate(streams):
            x[i, :len(s) - 1] = torch.tensor(s[:-1])
            y[i, :len(s) - 1] = torch.tensor(lab[1:])
    return Packed(x, y, truncated, int((y != IGNORE_INDEX).sum()))


class RowBatches:
    """`batch_size` rows per call (the global batch: this rank keeps idx[rank::world]) from a seeded
    permutation per epoch; state (epoch, pos) for exact resume, the same on every rank."""

    def __init__(self, data: Packed, batch_size: int, seed: int = 0):
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.epoch, self.pos = 0, 0

    def _perm(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.data.x))

    def next(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        idx: list[int] = []
        while len(idx) < self.batch_size:
            perm = self._perm()
            take = perm[self.pos:self.pos + self.batch_size - len(idx)]
            idx += take.tolist()
            self.pos += len(take)
            if self.pos >= len(perm):
                self.epoch, self.pos = self.epoch + 1, 0
        rank, world = distributed()
        sel = torch.tensor(idx[rank::world])
        return self.data.x[sel].to(device), self.data.y[sel].to(device)  # (B/W, T), (B/W, T)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, st: dict[str, int]) -> None:
        self.epoch, self.pos = int(st["epoch"]), int(st["pos"])


# ----------------------------------------------------------------------------------------------- eval
@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, data: Packed, batch_size: int, device: torch.device
                  ) -> dict[str, float]:
    """Held-out loss (nats per trained token) and perplexity over every row of `data` (rows split over the
    ranks, sums all-reduced)."""
    rank, world = distributed()
    was = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # (loss sum, trained tokens)
    x, y = data.x[rank::world], data.y[rank::world]  # (N/W, T)
    for i in range(0, len(x), batch_size):
        s, n = lm_loss(model, (x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)))
        sums += torch.stack([s.double(), n.double()])
    if world > 1:
        dist.all_reduce(sums)
    model.train(was)
    total, count = float(sums[0]), float(sums[1])
    loss = total / max(count, 1.0)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": count}


@torch.no_grad()
def greedy_answers(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], max_tokens: int,
                   template: str | None = None) -> list[str]:
    """Greedy answers to one-turn user prompts, through a fresh Engine (no prefix cache of old weights)."""
    from llmkit.generate.api import run
    from llmkit.generate.engine import Engine
    from llmkit.generate.sampling import SamplingParams
    from llmkit.tokenizer.chat import render_chat

    if not prompts:
        return []
    was = model.training
    model.eval()
    try:
        ids = [render_chat(tokenizer, [{"role": "user", "content": p}], add_generation_prompt=True,
                           template=template).ids for p in prompts]
        device = next(model.parameters()).device
        with torch.autocast(device.type, enabled=False):
            eng = Engine(model, max_batch=len(ids), stop_ids=sorted(tokenizer.stop_ids))
            params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
            answers = [""] * len(ids)
            for i, _, res in run(eng, tokenizer, ids, params, truncate=True):
                if res is not None:
                    answers[i] = res.text
        return answers
    finally:
        model.train(was)


# ----------------------------------------------------------------------------------------------- stage
def sft(
    model: Any,
    data: str | os.PathLike | Sequence[str | os.PathLike] | Sequence[dict[str, Any]],
    out: str | os.PathLike,
    cfg: TrainConfig | None = None,
    *,
    fmt: str = "auto",
    split_key: str | None = "tree",
    val_fraction: float = 0.1,
    lora_r: int | None = None,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    lora_targets: Sequence[str] = TARGETS,
    qlora: str | None = None,
    packed: bool = True,
    resume: bool = False,
    sample_prompts: Sequence[str] = (),
    sample_tokens: int = 48,
    export: bool = True,
    stop_after: int | None = None,
    **train: Any,
) -> Path:
    """Fine-tune `model` (a name/path for llmkit.load, or an LLM, trained in place) on chat `data` (files
    or already-parsed conversations). `cfg` or TrainConfig keywords (steps, batch_size, block_size, lr,
    eval_every, time_budget, seed, ...) set the run. Returns the run folder."""
    import llmkit
    from llmkit.io import atomic_write_json
    from llmkit.lora import apply_lora, save_adapter

    cfg = cfg or TrainConfig(**{"warmup": 10, "lr": 2e-4 if (lora_r or qlora) else 2e-5, **train})
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rank, _ = init_distributed(cfg)  # under torchrun: join the group (and pick this rank's GPU) first
    if qlora not in (None, "int4", "int8"):
        raise LlmkitError(f"--qlora {qlora!r}: choose int4 or int8")
    if qlora and lora_r is None:
        lora_r = 8
    out = Path(out)
    llm = model if hasattr(model, "tokenizer") else llmkit.load(model, device=cfg.device, dtype="float32")
    tok = llm.tokenizer
    convs = list(data) if data and isinstance(data, Sequence) and isinstance(data[0], dict) else \
        load_conversations(data, fmt=fmt)  # type: ignore[arg-type]
    train_convs, val_convs = split_by_key(convs, split_key, val_fraction, seed=cfg.seed)
    pad_id = tok.eos_id if tok.eos_id is not None else 0
    train_rows = pack((encode_conversation(tok, c["messages"]) for c in train_convs), cfg.block_size,
                      packed=packed, pad_id=pad_id)
    val_rows = pack((encode_conversation(tok, c["messages"]) for c in val_convs), cfg.block_size,
                    packed=packed, pad_id=pad_id) if val_convs else None
    if train_rows.trained_tokens == 0:
        raise LlmkitError("no assistant tokens to train on in the train split (check the data and template)")

    seed_everything(cfg.seed)
    net = llm.model
    if qlora:
        from llmkit.quant import quantize_model

        net = quantize_model(net, qlora) or net
    if lora_r:
        apply_lora(net, r=lora_r, alpha=lora_alpha, dropout=lora_dropout, targets=lora_targets)
    llm.model = net
    device = resolve_device(cfg.device)
    eval_bs = max(1, cfg.batch_size)

    def evaluate(m: torch.nn.Module, final: bool) -> dict[str, Any]:
        res: dict[str, Any] = evaluate_loss(m, val_rows, eval_bs, device) if val_rows is not None else {}
        if sample_prompts and sample_tokens > 0 and rank == 0:
            answers = greedy_answers(m, tok, sample_prompts, sample_tokens)
            res["samples"] = dict(zip(sample_prompts, answers))
            res["sample"] = answers[0]
        return res

    batches = RowBatches(train_rows, cfg.batch_size, seed=cfg.seed)
    trainer = Trainer(net, lm_loss, batches, cfg, out, evaluate=evaluate, model_config=llm.config)
    n_train = sum(p.numel() for p in net.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in net.parameters())
    info = {
        "mode": "qlora-" + qlora if qlora else "lora" if lora_r else "full",
        "model": str(getattr(llm, "name", model)),
        "lora": {"r": lora_r, "alpha": lora_alpha, "dropout": lora_dropout, "targets": list(lora_targets)}
        if lora_r else None,
        "train_config": {**cfg.__dict__},
        "conversations": {"train": len(train_convs), "val": len(val_convs), "split_key": split_key},
        "rows": {"train": len(train_rows.x), "val": 0 if val_rows is None else len(val_rows.x)},
        "trained_tokens": {"train": train_rows.trained_tokens,
                           "val": 0 if val_rows is None else val_rows.trained_tokens},
        "truncated": train_rows.truncated + (0 if val_rows is None else val_rows.truncated),
        "packed": packed,
        "parameters": {"trainable": n_train, "total": n_all},
    }
    if rank == 0:
        atomic_write_json(out / "run.json", info, default=str)
    if cfg.progress and rank == 0:
        print(f"sft ({info['mode']}): {n_train:,} of {n_all:,} parameters train; {len(train_convs)} train / "
              f"{len(val_convs)} val conversations -> {len(train_rows.x)} rows of {cfg.block_size} tokens; "
              f"{info['truncated']} truncated")
    if resume:
        trainer.resume()
    trainer.fit(stop_after=stop_after)
    if export and trainer.finished:
        with trainer.gathered():  # FSDP: whole weights (every rank enters), rank 0 writes
            if rank == 0 and lora_r:
                save_adapter(net, out / "adapter", base_model=str(getattr(llm, "name", None) or model))
            elif rank == 0:
                llm.save_hf(out / "hf")
    if dist.is_initialized():
        dist.barrier()  # the run folder is complete when any rank returns
    return out

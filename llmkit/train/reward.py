"""Reward model: a Transformer with a scalar head, trained with the Bradley-Terry loss on preference pairs.

    rm = RewardModel.from_llm("smollm2-135m-instruct")                     # base + new score head
    reward_train(rm, "hh_rlhf_short_train.jsonl", "runs/rm", val="hh_rlhf_short_heldout.jsonl",
                 lora_r=16, steps=40, batch_size=4)                         # -> runs/rm/reward (HF folder)
    rm = load_reward_model("runs/rm/reward")          # transformers' AutoModelForSequenceClassification too
    score = reward_fn(rm, rm.tokenizer)
    score([[{"role": "user", "content": "Hi"}]], ["Hello! How can I help?"])   # -> [1.73]
    reward_accuracy(rm, rm.tokenizer, load_pairs("heldout.jsonl"), 8)       # accuracy, 95 % interval, margin

Notable choices
- The model is transformers' `LlamaForSequenceClassification` with num_labels=1: the llmkit Transformer's
  final normed hidden states (`return_hidden=True`), then `score = nn.Linear(d_model, 1, bias=False)` on the
  hidden state of each sequence's LAST token. Our forward takes the rows' lengths (or an attention mask,
  right padding) or explicit read positions, so a padding id that also occurs inside a text changes nothing.
  transformers finds that token as the rightmost one != config.pad_token_id; the exported pad id is chosen
  so that no training sequence ends with it (`choose_pad_id`; SmolLM2: <|im_end|>, texts end with "\n").
- Head init: N(0, 0.02²) (transformers' `_init_weights` for the new `score` layer, initializer_range 0.02),
  from its own seeded generator, so initial rewards are near 0 and the initial loss is about log 2. With
  LoRA the head always trains (PEFT's `modules_to_save=["score"]`, as TRL recommends). The LM head is unused;
  an untied one is frozen and never exported.
- Text: a pair's answers are rendered as prompt + [assistant answer] by the one chat-template function
  (`llmkit.train.preference.encode_pairs` -> `render_chat`); `reward_fn` renders (prompt, completion) the
  same way, so RLHF rewards are read exactly where training read them (SmolLM2: the "\n" after <|im_end|>,
  the last token the chat template writes, as in TRL's RewardTrainer). Too long: the sequence keeps its END,
  where the reward is read (a pair's shared prompt loses its start; `reward_fn` keeps a sequence's last
  max_length tokens). TRL drops such pairs, which would leave a long RLHF completion without a reward.
- Loss (Bradley-Terry), exactly TRL 1.16 `RewardTrainer.compute_loss` (trl/trainer/reward_trainer.py):
  -logsigmoid(r_chosen - r_rejected [- margin]).mean() + center_rewards_coefficient *
  mean((r_chosen + r_rejected)²). Every term is a mean over pairs, so `loss_fn` returns the per-pair SUM
  and the pair count; the Trainer divides by the pairs of the whole step (micro-batches, ranks): TRL's mean.
  A "margin" (B,) in the batch is honoured as TRL's optional margin column (`Pair` carries none yet).
- Batches: `RewardBatches` = the DPO helper's `PairBatches` draw (global batch from a seeded permutation, rows
  idx[rank::world], exact-resume state) in a packed layout: ONE row per pair, the prompt once and both whole
  answers after it as separate segments (the Transformer's shared-prefix `segments` masking, positions
  continuing the prompt), so chosen and rejected run in one forward and the prompt is computed once: 36 %
  fewer tokens on hh-rlhf (prompt ~100, answers ~40 tokens each). Same rewards as separate rows (the TRL
  parity test runs TRL's separate rows against it).
- Evaluation: held-out accuracy (a tie counts 1/2) with a Wilson 95 % interval, mean margin and mean rewards;
  periodic evals read the first pairs up to cfg.eval_tokens, the final one reads all.
- Output: run folder as llmkit.train.sft (checkpoint.pt, metrics.jsonl, loss.png, run.json); at the end
  `reward/`, an HF folder that transformers' AutoModelForSequenceClassification and `load_reward_model`
  open (LoRA merged into the weights first; no LM head is written).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llmkit.errors import LlmkitError
from llmkit.lora import TARGETS
from llmkit.train.losses import LossSum
from llmkit.train.preference import (
    EncodedPair,
    Pair,
    PairBatches,
    encode_pairs,
    encode_response,
    load_pairs,
    split_pairs,
)
from llmkit.train.trainer import TrainConfig, Trainer, init_distributed, seed_everything

Messages = list[dict[str, str]]
REWARD_DIR = "reward"
HEAD_INIT_STD = 0.02  # transformers' default initializer_range


# ------------------------------------------------------------------------------------------------ model
class RewardModel(nn.Module):
    """reward = score(final normed hidden state at a sequence's last token), transformers'
    <Family>ForSequenceClassification with num_labels 1. `.tokenizer`, `.pad_id` (the exported
    pad_token_id) travel with it. The transformer's LM head is unused (an untied one is frozen so that it
    neither trains nor leaves DDP a parameter without gradient)."""

    def __init__(self, transformer: nn.Module, *, pad_id: int = 0, score: nn.Linear | None = None,
                 tokenizer: Any = None, seed: int = 0):
        super().__init__()
        self.transformer = transformer
        self.config = transformer.config
        d = self.config.d_model
        if score is None:
            ref = transformer.model.embed_tokens.weight
            score = nn.Linear(d, 1, bias=False, device=ref.device, dtype=ref.dtype)
            g = torch.Generator(device="cpu").manual_seed(seed)
            with torch.no_grad():
                score.weight.copy_(torch.randn(1, d, generator=g) * HEAD_INIT_STD)
        if tuple(score.weight.shape) != (1, d):
            raise LlmkitError(f"score head has shape {tuple(score.weight.shape)}; expected (1, {d})")
        self.score = score
        head = getattr(transformer, "lm_head", None)
        if head is not None and head.weight is not transformer.model.embed_tokens.weight:
            head.weight.requires_grad_(False)
        self.pad_id = int(pad_id)
        self.tokenizer = tokenizer

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, *, positions: torch.Tensor | None = None,
                segments: torch.Tensor | None = None, read_at: torch.Tensor | None = None) -> torch.Tensor:
        """Rewards (B,) float32 of right-padded rows ids (B, T): `lengths` (B,) real tokens per row, or
        `attention_mask` (B, T) (1 = real); neither = every row is full. Packed rows (`positions`,
        `segments`: the Transformer's shared-prefix packing) read K rewards per row at `read_at` (B, K)
        -> (B, K)."""
        B, T = ids.shape
        h = self.transformer(ids, positions=positions, segments=segments, return_hidden=True)  # (B, T, d)
        rows = torch.arange(B, device=ids.device)  # (B,)
        if read_at is not None:
            return self.score(h[rows[:, None], read_at]).squeeze(-1).float()  # (B, K, d) -> (B, K)
        if lengths is None and attention_mask is not None:  # the rightmost real token (transformers' rule)
            pos = torch.arange(T, device=ids.device)  # (T,)
            last = (pos * attention_mask.to(ids.device, torch.long)).argmax(-1)  # (B,)
        elif lengths is not None:
            last = lengths.to(ids.device, torch.long) - 1  # (B,)
        else:
            last = torch.full((B,), T - 1, device=ids.device)
        return self.score(h[rows, last]).squeeze(-1).float()  # (B, d) -> (B,)

    # ---------------------------------------------------------------------------- construction, export
    @classmethod
    def from_llm(cls, llm_or_path: Any, *, device: str | torch.device | None = None, dtype: Any = "float32",
                 pad_id: int | None = None, seed: int = 0) -> RewardModel:
        """A reward model on an `llmkit.LLM` (its Transformer is used in place, not copied) or a model name
        / path for `llmkit.load`; a folder saved by `RewardModel.save` is loaded with its trained head."""
        import llmkit

        if isinstance(llm_or_path, (str, os.PathLike)) and is_reward_dir(llm_or_path):
            return load_reward_model(llm_or_path, device=device, dtype=dtype)
        llm = llm_or_path if hasattr(llm_or_path, "tokenizer") else \
            llmkit.load(llm_or_path, device=device, dtype=dtype)
        tok = llm.tokenizer
        rm = cls(llm.model, pad_id=choose_pad_id(tok) if pad_id is None else pad_id, tokenizer=tok, seed=seed)
        rm.name = str(getattr(llm, "name", llm_or_path))
        return rm

    def save(self, out: str | os.PathLike, tokenizer: Any = None) -> Path:
        """Write an HF folder of transformers' <Family>ForSequenceClassification (num_labels 1): config.json
        (architectures, id2label, pad_token_id), model.safetensors (model.* and score.weight, no LM head),
        the tokenizer with its chat template. Merge LoRA adapters first (`merge_lora`)."""
        from llmkit.checkpoint.hf import save_hf_dir
        from llmkit.io import atomic_write_json, read_json
        from llmkit.lora import lora_modules

        if lora_modules(self):
            raise LlmkitError("RewardModel.save: the model still has LoRA adapters; merge_lora(rm) first")
        if self.config.model_type == "gpt2":
            raise LlmkitError("RewardModel.save: GPT-2 reward models cannot be exported yet (Llama-family "
                              "configs only)")
        tok = tokenizer if tokenizer is not None else self.tokenizer
        view = _SequenceClassifier(self)
        out = save_hf_dir(view, self.config, tok, Path(out),
                          chat_template=getattr(tok, "chat_template", None) if tok is not None else None)
        hf = read_json(out / "config.json")
        hf["architectures"] = [hf["architectures"][0].replace("ForCausalLM", "ForSequenceClassification")]
        hf.update(id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0}, pad_token_id=self.pad_id)
        atomic_write_json(out / "config.json", hf)
        return out


class _SequenceClassifier(nn.Module):
    """The parameters under transformers' ForSequenceClassification names (model.*, score.weight), for the
    HF writer; it shares the reward model's tensors."""

    def __init__(self, rm: RewardModel):
        super().__init__()
        self.config = rm.config
        self.model = rm.transformer.model
        self.score = rm.score


def is_reward_dir(path: str | os.PathLike) -> bool:
    """True for an HF folder whose config.json names a ...ForSequenceClassification architecture."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        archs = json.loads(cfg.read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return False
    return any(str(a).endswith("ForSequenceClassification") for a in archs)


def load_reward_model(path: str | os.PathLike, *, device: str | torch.device | None = None,
                      dtype: Any = None) -> RewardModel:
    """Load a reward-model HF folder (ours, or a transformers <Llama-family>ForSequenceClassification with
    num_labels 1) in eval mode; `.tokenizer` holds its tokenizer. dtype None: float32 on CPU, bf16 on CUDA."""
    from llmkit.checkpoint.hf import build_model, iter_safetensors, weight_files
    from llmkit.config import ModelConfig
    from llmkit.device import resolve_device, resolve_dtype
    from llmkit.io import read_json
    from llmkit.tokenizer import Tokenizer

    path = Path(path)
    cfg_path = path / "config.json"
    hf = read_json(cfg_path, missing="a reward model folder needs config.json and model.safetensors")
    archs = hf.get("architectures") or []
    if not any(str(a).endswith("ForSequenceClassification") for a in archs):
        raise LlmkitError(f"{cfg_path}: architectures {archs} is not a ...ForSequenceClassification; give "
                          "the reward/ folder that reward-train writes")
    labels = len(hf.get("id2label") or {}) or int(hf.get("num_labels", 1))
    if labels != 1:
        raise LlmkitError(f"{cfg_path}: {labels} labels; a reward model has num_labels 1")
    config = ModelConfig.from_hf(hf, source=str(cfg_path))
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    files = weight_files(path)
    origin: dict[str, str] = {}
    found: dict[str, torch.Tensor] = {}

    def body():  # every tensor but the head (and an LM head, which a reward model does not use)
        for name, t in iter_safetensors(files, config, origin):
            if name == "score.weight":
                found[name] = t
            elif name != "lm_head.weight":
                yield name, t

    source = str(files[0]) if len(files) == 1 else str(path / "model.safetensors.index.json")
    # built with a tied (shared, unused) LM head, so an untied model needs no LM head in the file
    net = build_model(replace(config, tie_embeddings=True), body(), dev, dt, source, origin)
    net.config = config
    if "score.weight" not in found:
        raise LlmkitError(f"{source}: no tensor 'score.weight'; not a reward model (train one with "
                          "llmkit reward-train)")
    w = found["score.weight"]
    if tuple(w.shape) != (1, config.d_model):
        raise LlmkitError(f"{source}: tensor 'score.weight' has shape {tuple(w.shape)}; expected "
                          f"(1, {config.d_model})")
    score = nn.Linear(config.d_model, 1, bias=False, device=dev, dtype=dt)
    with torch.no_grad():
        score.weight.copy_(w)
    pad = hf.get("pad_token_id")
    rm = RewardModel(net, pad_id=0 if pad is None else int(pad), score=score, tokenizer=Tokenizer.load(path))
    rm.name = str(path)
    return rm.eval()


def choose_pad_id(tok: Any, avoid: set[int] | frozenset[int] = frozenset()) -> int:
    """The tokenizer's pad id (else eos, bos, unk, another special token, 0), skipping ids in `avoid` (the
    last tokens of the data: transformers reads the reward at the rightmost token != pad_token_id)."""
    specials = sorted(getattr(tok, "special_tokens", {}).values())
    for c in (tok.pad_id, tok.eos_id, tok.bos_id, getattr(tok, "unk_id", None), *specials, 0):
        if c is not None and c not in avoid:
            return int(c)
    raise LlmkitError("no padding id available: every special token ends some sequence of the data")


# ------------------------------------------------------------------------------------------------- data
def encode_scored(tok: Any, prompt: Messages | str, response: str, max_length: int | None = None,
                  template: str | None = None) -> tuple[list[int], bool]:
    """(ids, truncated) of prompt + [assistant response] as the chat template renders it (`encode_response`),
    keeping the last `max_length` tokens of a longer one."""
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    ids, _ = encode_response(tok, prompt, response, template)
    if max_length is not None and len(ids) > max_length:
        return ids[len(ids) - max_length:], True
    return ids, False


def fit_pair(e: EncodedPair, max_length: int | None) -> tuple[EncodedPair, bool]:
    """(pair whose sequences prompt + answer fit max_length tokens, whether anything was cut): keep the
    end. The shared prompt loses its start (as much as the longer answer needs), and an answer longer than
    max_length on its own keeps its last max_length tokens."""
    longest = max(len(e.chosen), len(e.rejected))
    if max_length is None or len(e.prompt) + longest <= max_length:
        return e, False
    keep = max(0, max_length - longest)
    c, r = e.chosen[-max_length:], e.rejected[-max_length:]
    return EncodedPair(e.prompt[len(e.prompt) - keep:], c, [1] * len(c), r, [1] * len(r), e.id), True


def encode_reward_pairs(tok: Any, pairs: Sequence[Pair], max_length: int | None = None,
                        template: str | None = None) -> tuple[list[EncodedPair], int]:
    """(pairs as EncodedPair: shared prompt through the assistant header, each answer's tokens through the
    end of its rendered sequence, fitted to max_length; number of pairs cut)."""
    fitted = [fit_pair(e, max_length) for e in encode_pairs(tok, pairs, template)]
    return [e for e, _ in fitted], sum(cut for _, cut in fitted)


def pack_reward_pairs(pairs: Sequence[EncodedPair], pad_id: int, device: torch.device | str = "cpu"
                      ) -> dict[str, torch.Tensor]:
    """One row per pair, the prompt once: segment 0 = prompt, 1 = the whole chosen answer, 2 = the whole
    rejected one, both at positions continuing the prompt (each sees the prompt and itself), -1 = padding.
    Returns ids / positions / segments (B, T) and read_at (B, 2): the last token of each answer. (DPO's
    `pack_pairs` holds the answers but their last scored token, as next-token targets; a reward reads the
    whole sequence.)"""
    B = len(pairs)
    rows = []
    for e in pairs:
        P, C, R = len(e.prompt), len(e.chosen), len(e.rejected)
        rows.append((e.prompt + e.chosen + e.rejected, [*range(P), *range(P, P + C), *range(P, P + R)],
                     [0] * P + [1] * C + [2] * R, (P + C - 1, P + C + R - 1)))
    T = max(len(ids) for ids, *_ in rows)
    x = torch.full((B, T), pad_id, dtype=torch.long)  # (B, T)
    pos = torch.zeros(B, T, dtype=torch.long)  # (B, T)
    seg = torch.full((B, T), -1, dtype=torch.long)  # (B, T)
    for i, (ids, p, s, _) in enumerate(rows):
        n = len(ids)
        x[i, :n], pos[i, :n], seg[i, :n] = torch.tensor(ids), torch.tensor(p), torch.tensor(s)
    read_at = torch.tensor([r[3] for r in rows], dtype=torch.long).view(B, 2)  # (B, 2)
    return {"ids": x.to(device), "positions": pos.to(device), "segments": seg.to(device),
            "read_at": read_at.to(device)}


class RewardBatches(PairBatches):
    """PairBatches' draw (global batch, this rank's rows, exact-resume state) in the packed reward layout:
    `next(device)` -> pack_reward_pairs(...) + "index" (B,). Give it fitted pairs (encode_reward_pairs)."""

    def next(self, device: torch.device | str) -> dict[str, torch.Tensor]:
        index = super().next("cpu")["index"]  # (B,)
        batch = pack_reward_pairs([self.pairs[i] for i in index.tolist()], self.pad_id, device)
        batch["index"] = index.to(device)
        return batch


# ------------------------------------------------------------------------------------------------- loss
def bradley_terry(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | None = None,
                  center_rewards_coefficient: float | None = None) -> torch.Tensor:
    """Per-pair losses (B,) whose mean is TRL 1.16's RewardTrainer.compute_loss
    (trl/trainer/reward_trainer.py): -logsigmoid(r_c - r_r [- margin]) + coef * (r_c + r_r)²."""
    diff = r_chosen.float() - r_rejected.float()  # (B,)
    if margin is not None:
        diff = diff - margin.float()
    loss = -F.logsigmoid(diff)  # (B,)
    if center_rewards_coefficient is not None:
        loss = loss + center_rewards_coefficient * (r_chosen.float() + r_rejected.float()) ** 2
    return loss


def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor],
            center_rewards_coefficient: float | None = None) -> LossSum:
    """Bradley-Terry loss of a RewardBatches batch: LossSum(sum over the B pairs, B). One forward of the
    packed rows (prompt once, chosen and rejected after it)."""
    rewards = model(batch["ids"], positions=batch["positions"], segments=batch["segments"],
                    read_at=batch["read_at"])  # (B, 2)
    r_chosen, r_rejected = rewards.unbind(-1)  # (B,) each
    losses = bradley_terry(r_chosen, r_rejected, batch.get("margin"), center_rewards_coefficient)
    return LossSum(losses.sum(), torch.tensor(len(r_chosen), device=rewards.device))


# ----------------------------------------------------------------------------------------------- scoring
@torch.no_grad()
def score_ids(rm: nn.Module, seqs: Sequence[Sequence[int]], batch_size: int = 8) -> list[float]:
    """Rewards of token sequences, right-padded in batches of similar length (eval mode, no grad)."""
    if not seqs:
        return []
    was = rm.training
    rm.eval()
    device = next(rm.parameters()).device
    pad = getattr(rm, "pad_id", 0)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    out = [0.0] * len(seqs)
    try:
        for s in range(0, len(order), max(1, batch_size)):
            idx = order[s:s + max(1, batch_size)]
            T = len(seqs[idx[0]])
            ids = torch.full((len(idx), T), pad, dtype=torch.long)  # (b, T)
            for row, i in enumerate(idx):
                ids[row, :len(seqs[i])] = torch.as_tensor(seqs[i], dtype=torch.long)
            lengths = torch.tensor([len(seqs[i]) for i in idx])  # (b,)
            for i, r in zip(idx, rm(ids.to(device), lengths=lengths.to(device)).tolist()):
                out[i] = r
    finally:
        rm.train(was)
    return out


def wilson_interval(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a proportion (95 % for the default z); (0, 1) when n == 0."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def accuracy_stats(r_chosen: Sequence[float], r_rejected: Sequence[float]) -> dict[str, float]:
    """Preference accuracy (a tie counts 1/2) with its Wilson 95 % interval, mean margin, mean rewards."""
    n = len(r_chosen)
    wins = sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(r_chosen, r_rejected))
    low, high = wilson_interval(wins, n)
    return {
        "accuracy": wins / n if n else float("nan"),
        "accuracy_low": low,
        "accuracy_high": high,
        "margin": sum(c - r for c, r in zip(r_chosen, r_rejected)) / n if n else float("nan"),
        "reward_chosen": sum(r_chosen) / n if n else float("nan"),
        "reward_rejected": sum(r_rejected) / n if n else float("nan"),
        "pairs": n,
    }


@torch.no_grad()
def score_pairs(rm: nn.Module, pairs: Sequence[EncodedPair], batch_size: int = 8) -> torch.Tensor:
    """(N, 2) rewards of (chosen, rejected) of fitted pairs, `batch_size` packed pairs per forward (eval
    mode, no grad)."""
    out = torch.zeros(len(pairs), 2)
    if not pairs:
        return out
    was = rm.training
    rm.eval()
    device = next(rm.parameters()).device
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i].prompt) + len(pairs[i].chosen)
                                                        + len(pairs[i].rejected)))
    try:
        for s in range(0, len(order), max(1, batch_size)):
            idx = order[s:s + max(1, batch_size)]
            b = pack_reward_pairs([pairs[i] for i in idx], getattr(rm, "pad_id", 0), device)
            out[idx] = rm(b["ids"], positions=b["positions"], segments=b["segments"],
                          read_at=b["read_at"]).cpu()  # (b, 2)
    finally:
        rm.train(was)
    return out


def _encoded_accuracy(rm: nn.Module, encoded: Sequence[EncodedPair], batch_size: int) -> dict[str, float]:
    r = score_pairs(rm, encoded, batch_size)  # (N, 2)
    return accuracy_stats(r[:, 0].tolist(), r[:, 1].tolist())


def reward_accuracy(rm: nn.Module, tok: Any, pairs: Sequence[Pair], batch_size: int = 8, *,
                    max_length: int | None = None, template: str | None = None) -> dict[str, float]:
    """Held-out preference accuracy of `rm` on `pairs`: {"accuracy" (ties 1/2), "accuracy_low",
    "accuracy_high" (Wilson 95 %), "margin" (mean r_chosen - r_rejected), "reward_chosen",
    "reward_rejected", "pairs"}. `batch_size` pairs per forward (packed: the prompt once)."""
    encoded, _ = encode_reward_pairs(tok, pairs, max_length, template)
    return _encoded_accuracy(rm, encoded, batch_size)


def reward_fn(rm: RewardModel, tokenizer: Any = None, batch_size: int = 8, *, max_length: int | None = None,
              template: str | None = None) -> Callable[..., list[float]]:
    """reward(prompts, completions[, docs]) -> rewards: each prompt (messages, or a text = one user turn)
    + [assistant completion] rendered as training rendered them and scored by `rm` (eval mode, no grad).
    `max_length` (default: the model's context) keeps the last tokens of longer sequences."""
    tok = tokenizer if tokenizer is not None else rm.tokenizer
    if tok is None:
        raise LlmkitError("reward_fn: no tokenizer; pass the reward model's tokenizer")
    limit = max_length or rm.config.max_seq_len

    def reward(prompts: Sequence[Messages | str], completions: Sequence[str],
               docs: Sequence[dict] | None = None) -> list[float]:
        if len(prompts) != len(completions):
            raise LlmkitError(f"reward: {len(prompts)} prompts but {len(completions)} completions")
        seqs = [encode_scored(tok, p, c, limit, template)[0] for p, c in zip(prompts, completions)]
        return score_ids(rm, seqs, batch_size)

    return reward


# ----------------------------------------------------------------------------------------------- stage
def _pairs(data: Any) -> list[Pair]:
    if isinstance(data, Sequence) and not isinstance(data, str) and data and isinstance(data[0], Pair):
        return list(data)
    return load_pairs(data)


def reward_train(
    model: Any,
    data: str | os.PathLike | Sequence[str | os.PathLike] | Sequence[Pair],
    out: str | os.PathLike,
    cfg: TrainConfig | None = None,
    *,
    val: str | os.PathLike | Sequence[str | os.PathLike] | Sequence[Pair] | None = None,
    val_fraction: float = 0.1,
    lora_r: int | None = None,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    lora_targets: Sequence[str] = TARGETS,
    head_only: bool = False,
    center_rewards_coefficient: float | None = None,
    max_length: int | None = 512,
    resume: bool = False,
    export: bool = True,
    stop_after: int | None = None,
    **train: Any,
) -> Path:
    """Train a reward model on preference pairs and return the run folder. `model`: a RewardModel, an
    llmkit.LLM, a name/path for llmkit.load, or a reward/ folder (training continues). `val`: held-out pairs
    (files or Pairs); without it `val_fraction` of `data` is held out, split by prompt. Modes: full, LoRA
    (`lora_r`; the head trains too), or `head_only` (a linear probe on the frozen model: forwards only, no
    backward through it). `cfg` or TrainConfig keywords (steps, batch_size = pairs per micro-step, lr,
    eval_every, time_budget, seed, ...)."""
    from llmkit.io import atomic_write_json
    from llmkit.lora import apply_lora, merge_lora

    rank, _ = init_distributed(cfg)  # torchrun: join the group and pick this rank's GPU before loading
    if center_rewards_coefficient is not None and center_rewards_coefficient < 0:
        raise LlmkitError(f"--center-rewards-coefficient {center_rewards_coefficient}: must be >= 0")
    if max_length is not None and max_length < 2:
        raise LlmkitError(f"--max-length {max_length}: must be at least 2 tokens")
    if head_only and lora_r:
        raise LlmkitError("--head-only and --lora-r exclude each other: choose one mode")
    seed = cfg.seed if cfg is not None else train.get("seed", TrainConfig.seed)
    pairs = _pairs(data)
    if val is not None:
        train_pairs, val_pairs = pairs, _pairs(val)
    else:
        train_pairs, val_pairs = split_pairs(pairs, val_fraction, seed=seed)
    out = Path(out)

    given = isinstance(model, RewardModel)
    loaded = given or (isinstance(model, (str, os.PathLike)) and is_reward_dir(model))
    device = cfg.device if cfg is not None else train.get("device", "auto")
    rm = model if given else RewardModel.from_llm(model, device=device, dtype="float32", seed=seed)
    tok = rm.tokenizer
    train_enc, train_cut = encode_reward_pairs(tok, train_pairs, max_length)
    val_enc, val_cut = encode_reward_pairs(tok, val_pairs, max_length)
    if not given:  # an exported pad id must not end any sequence (transformers reads the last non-pad token)
        rm.pad_id = choose_pad_id(tok, {s[-1] for e in train_enc + val_enc for s in (e.chosen, e.rejected)})

    def row_tokens(e: EncodedPair) -> int:
        return len(e.prompt) + len(e.chosen) + len(e.rejected)

    tokens_per_pair = sum(map(row_tokens, train_enc)) / len(train_enc)
    # block_size only names the nominal tokens of a step (tok/s, MFU): the mean tokens of a packed pair
    cfg = cfg or TrainConfig(**{"warmup": 10, "lr": 2e-4 if lora_r else 1e-3 if head_only else 1e-5,
                                "block_size": max(1, round(tokens_per_pair)), **train})
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    seed_everything(cfg.seed)
    if lora_r:
        apply_lora(rm, r=lora_r, alpha=lora_alpha, dropout=lora_dropout, targets=lora_targets)
    if head_only:
        rm.requires_grad_(False)
    rm.score.weight.requires_grad_(True)  # the head always trains
    batches = RewardBatches(train_enc, cfg.batch_size, seed=cfg.seed, pad_id=rm.pad_id)
    eval_bs = max(1, cfg.batch_size)

    def evaluate(m: nn.Module, final: bool) -> dict[str, Any]:
        if not val_enc:
            return {}
        subset = val_enc
        if not final and cfg.eval_tokens:
            n, used = 0, 0
            while n < len(val_enc) and (n == 0 or used < cfg.eval_tokens):
                used += row_tokens(val_enc[n])
                n += 1
            subset = val_enc[:n]
        return {f"val_{k}": v for k, v in _encoded_accuracy(m, subset, eval_bs).items()}

    trainer = Trainer(rm, partial(loss_fn, center_rewards_coefficient=center_rewards_coefficient), batches,
                      cfg, out, evaluate=evaluate, model_config=rm.config)
    n_train = sum(p.numel() for p in rm.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in rm.parameters())
    info = {
        "mode": "lora" if lora_r else "head-only" if head_only else "full",
        "model": str(getattr(rm, "name", model)),
        "lora": {"r": lora_r, "alpha": lora_alpha, "dropout": lora_dropout, "targets": list(lora_targets)}
        if lora_r else None,
        "train_config": {**cfg.__dict__},
        "loss": {"kind": "bradley-terry (TRL 1.16 RewardTrainer)",
                 "center_rewards_coefficient": center_rewards_coefficient},
        "head": {"init": "loaded" if loaded else f"normal(0, {HEAD_INIT_STD}) seed {seed}", "trains": True},
        "pad_id": rm.pad_id,
        "max_length": max_length,
        "pairs": {"train": len(train_pairs), "val": len(val_pairs),
                  "val_source": "given" if val is not None else f"split {val_fraction} by prompt"},
        "truncated_pairs": {"train": train_cut, "val": val_cut},
        "tokens_per_pair": round(tokens_per_pair, 1),
        "parameters": {"trainable": n_train, "total": n_all},
    }
    if rank == 0:
        atomic_write_json(out / "run.json", info, default=str)
    if cfg.progress and rank == 0:
        print(f"reward-train ({info['mode']}): {n_train:,} of {n_all:,} parameters train; {len(train_pairs)} "
              f"train / {len(val_pairs)} val pairs, {tokens_per_pair:.0f} tokens per pair; "
              f"{train_cut + val_cut} truncated to the last {max_length} tokens")
    if resume:
        trainer.resume()
    trainer.fit(stop_after=stop_after)
    if export and trainer.finished:
        with trainer.gathered():  # FSDP: whole weights on every rank; rank 0 merges and writes
            if rank == 0:
                if lora_r:
                    merge_lora(rm)
                rm.save(out / REWARD_DIR, tok)
    return out

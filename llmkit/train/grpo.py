"""GRPO: group relative policy optimisation on verifiable rewards, on the one Trainer.

    from llmkit.train.rewards import arithmetic_problems
    grpo("HuggingFaceTB/SmolLM2-135M-Instruct", arithmetic_problems(600), "runs/grpo", val=100,
         group_size=8, prompts_per_step=4, max_tokens=64, temperature=0.7, beta=0.04,
         rewards="correct=1,format=0.2", lora_r=16, lr=2e-4, steps=20, time_budget=900)

Each optimizer step samples a fresh batch: `prompts_per_step` problems x `group_size` completions through the
engine with the current policy (llmkit.train.rollout), scores them with rule-based rewards
(llmkit.train.rewards), turns rewards into group-normalised advantages and takes one step on the clipped
objective with a per-token KL penalty to the reference. The formulas are TRL 1.16's GRPOTrainer
(trl/trainer/grpo_trainer.py), read and tested against it on the same tensors (tests/test_grpo.py):
- advantages (`_generate_and_score_completions`, multi_objective_aggregation="sum_then_normalize"): the
  rewards of the reward functions are summed with their weights; A = r - mean(group), divided by
  std + 1e-4 with scale_rewards "group" (the std of the group, Bessel-corrected as trl's nanstd), "batch"
  (the std of the whole batch) or not at all ("none", Dr. GRPO's advice).
- per-token loss (`_compute_loss`): ratio = exp(logp - logp_old); -min(ratio A, clip(ratio, 1 - epsilon,
  1 + epsilon_high) A) + beta * KL, with the k3 estimator KL = exp(ref - logp) - (ref - logp) - 1 (Schulman).
  num_iterations = 1, so logp_old is the detached current log-prob (TRL's own shortcut): the ratio is 1 and
  its gradient is that of A * logp, the clipping matters only once the policy moved since sampling.
- loss_type, mapped onto the Trainer's LossSum(total, count), summed over micro-batches and processes and
  divided once:
    "dapo" (TRL's default): sum of masked per-token losses / active tokens of the whole step:
                            total = sum(l * m), count = sum(m)                        (exact)
    "grpo":                 mean over sequences of each sequence's token mean:
                            total = sum_i sum_t(l * m) / |o_i|, count = sequences     (exact *)
    "dr_grpo":              sum(l * m) / (sequences * max_tokens):
                            total = sum(l * m) / max_tokens, count = sequences        (exact *)
    "bnpo":                 each micro-batch's token mean, averaged over micro-batches:
                            total = sum(l * m) / sum(m), count = 1                    (exact)
  (*) TRL averages the micro-batches' means: equal when micro-batches hold equally many sequences, which
  they do when grad_accum divides the step's rows (TRL's own requirement).
- log-probs are those of logits / temperature (TRL's fused head with temperature=args.temperature).

Notable choices
- The batch source (`GroupBatches`) is what makes this the one Trainer: `next(device)` samples the step's
  groups on its first micro-batch and hands out grad_accum slices of the rows; its state (epoch, position
  in a seeded permutation of the prompts, steps drawn) gives the Trainer's exact resume, and each step's
  sampling seed derives from (run seed, step), so a resumed run samples exactly what the uninterrupted one
  did (tested bit for bit on CPU). Under torchrun the step's prompts are split idx[rank::world] (whole
  groups per rank, so group statistics stay local; "batch" scaling gathers the rewards).
- The reference: with LoRA, the same model with its adapters disabled (`llmkit.lora.adapters_disabled`,
  PEFT's disable_adapter; no copy); with full fine-tuning, a frozen deep copy. As in TRL, its log-probs are
  computed at sampling time, without grad, under the Trainer's autocast, so KL = 0 and ratio = 1 exactly at
  the first step. beta = 0 skips the reference altogether (TRL 1.16's default; we default to 0.04).
- CPU-sized defaults: 4 prompts x 8 completions of at most 64 tokens per step, temperature 0.7 (TRL's
  1.0 makes SmolLM2-135M ramble: 3 % of its sampled answers to the generated problems were right at 1.0,
  9 % at 0.7), lr 5e-5 with LoRA (1e-6 full, TRL's), no weight decay (TRL's), 2 warmup steps.
- Rollouts go to OUT/rollouts.jsonl (step, prompt, completion, each reward, advantage); the Trainer's
  per-step record in metrics.jsonl gains reward, reward/<name>, accuracy, completion_len, truncated,
  reward_std, frac_reward_zero_std, kl and clip_ratio (a Trainer subclass merges them; the Trainer itself
  is untouched). The evaluate hook answers the held-out problems greedily: accuracy with its 95 % Wilson
  interval and two sample answers; `eval_before` also measures it once before training (step 0).
- Output: as SFT, run.json, checkpoint.pt, metrics.jsonl, loss.png, then adapter/ (PEFT) or hf/.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from llmkit.errors import LlmkitError
from llmkit.lora import TARGETS
from llmkit.train.losses import LossSum
from llmkit.train.rewards import (
    Messages,
    Reward,
    is_correct,
    named_rewards,
    problem_prompt,
    split_problems,
)
from llmkit.train.rollout import (
    Rollouts,
    completion_logprobs,
    reference_logprobs,
    render_prompts,
    sample_groups,
)
from llmkit.train.trainer import (
    TrainConfig,
    Trainer,
    autocast_dtype,
    distributed,
    frozen_reference,
    gathered,
    init_distributed,
)

LOSS_TYPES = ("dapo", "grpo", "dr_grpo", "bnpo")
SCALE_REWARDS = ("group", "batch", "none")
ROLLOUTS = "rollouts.jsonl"


# ----------------------------------------------------------------------------------------------- formulas
def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group"
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, std) of rewards (N,) in groups of `group_size` consecutive rows, as TRL's
    _generate_and_score_completions: A = r - group mean, / (std + 1e-4) unless scale == "none"; std is the
    group's ("group", also returned for "none") or the batch's ("batch"), Bessel-corrected."""
    if scale not in SCALE_REWARDS:
        raise LlmkitError(f"scale_rewards {scale!r}: choose one of {', '.join(SCALE_REWARDS)}")
    grouped = rewards.view(-1, group_size)  # (B, G)
    mean = grouped.mean(1).repeat_interleave(group_size)  # (N,)
    if scale == "batch":
        std = rewards.std().expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    elif group_size > 1:
        std = grouped.std(1).repeat_interleave(group_size)  # (N,)
    else:
        std = torch.zeros_like(rewards)
    adv = rewards - mean
    if scale != "none":
        adv = adv / (std + 1e-4)
    return adv, std


def per_token_loss(logps: torch.Tensor, old_logps: torch.Tensor, adv: torch.Tensor,
                   ref_logps: torch.Tensor | None, beta: float, epsilon: float, epsilon_high: float
                   ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """TRL's GRPO per-token loss (N, T) for the clipped objective + beta * k3 KL; also the KL (N, T) (None
    when beta == 0) and the ratio (N, T). logps/old/ref (N, T), adv (N,)."""
    a = adv.unsqueeze(1)  # (N, 1)
    ratio = torch.exp(logps - old_logps)  # (N, T)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    loss = -torch.min(ratio * a, clipped * a)  # (N, T)
    kl = None
    if beta != 0.0:
        d = ref_logps - logps  # (N, T)
        kl = torch.exp(d) - d - 1
        loss = loss + beta * kl
    return loss, kl, ratio


def aggregate(loss: torch.Tensor, mask: torch.Tensor, loss_type: str, max_tokens: int) -> LossSum:
    """(N, T) per-token losses and mask -> LossSum(total, count) of `loss_type` (see the module notes)."""
    masked = (loss * mask).sum(-1)  # (N,)
    n = torch.tensor(float(loss.shape[0]), device=loss.device)
    if loss_type == "dapo":
        return LossSum(masked.sum(), mask.sum())
    if loss_type == "grpo":
        return LossSum((masked / mask.sum(-1).clamp(min=1.0)).sum(), n)
    if loss_type == "dr_grpo":
        return LossSum(masked.sum() / max_tokens, n)
    if loss_type == "bnpo":
        return LossSum(masked.sum() / mask.sum().clamp(min=1.0), torch.ones((), device=loss.device))
    raise LlmkitError(f"loss_type {loss_type!r}: choose one of {', '.join(LOSS_TYPES)}")


# ----------------------------------------------------------------------------------------------- pieces
class StepStats:
    """Running (sum, count) per metric over a step's micro-batches; `flush` gives the means (over every
    process) and starts over."""

    def __init__(self) -> None:
        self.sums: dict[str, list[float]] = {}

    def add(self, name: str, total: float, count: float = 1.0) -> None:
        s = self.sums.setdefault(name, [0.0, 0.0])
        s[0] += float(total)
        s[1] += float(count)

    def flush(self) -> dict[str, float]:
        names = sorted(self.sums)
        vals = torch.tensor([self.sums[k] for k in names], dtype=torch.float64).reshape(-1, 2)
        if distributed()[1] > 1 and names:
            on = "cuda" if dist.get_backend() == "nccl" else "cpu"
            vals = vals.to(on)
            dist.all_reduce(vals)
            vals = vals.cpu()
        self.sums = {}
        return {k: round(float(s / c), 6) for k, (s, c) in zip(names, vals.tolist()) if c > 0}


class RLTrainer(Trainer):
    """The one Trainer; each step's metrics record also carries the stage's statistics (reward, kl...)."""

    def __init__(self, *args: Any, stats: StepStats, **kw: Any):
        super().__init__(*args, **kw)
        self.stats = stats

    def log(self, record: dict[str, Any]) -> None:
        if "loss" in record:
            record = {**record, **self.stats.flush()}
        super().log(record)


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """The rows of every process (rank order), or t itself in one process."""
    world = distributed()[1]
    if world == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def step_seed(seed: int, step: int) -> int:
    """The sampling seed of generation step `step` of a run seeded with `seed`."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1)[0]) >> 1


@dataclass
class GRPO:
    """GRPO's advantages (`prepare`, at sampling time) and loss (`__call__`, the Trainer's loss_fn)."""

    beta: float = 0.04
    epsilon: float = 0.2
    epsilon_high: float | None = None  # None = epsilon
    loss_type: str = "dapo"
    scale_rewards: str = "group"
    temperature: float = 1.0
    max_tokens: int = 128  # dr_grpo's constant (TRL: max_completion_length)
    stats: StepStats | None = None

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise LlmkitError(f"loss_type {self.loss_type!r}: choose one of {', '.join(LOSS_TYPES)}")
        if self.scale_rewards not in SCALE_REWARDS:
            raise LlmkitError(f"scale_rewards {self.scale_rewards!r}: choose one of "
                              f"{', '.join(SCALE_REWARDS)}")

    @property
    def needs_reference(self) -> bool:
        return self.beta != 0.0

    def prepare(self, model: nn.Module, ref: nn.Module | None, ro: Rollouts, rewards: torch.Tensor
                ) -> dict[str, torch.Tensor | None]:
        """Per-row advantages (N,) and, with beta, the reference's per-token log-probs (N, T)."""
        G = ro.group_size
        grouped = rewards.view(-1, G)  # (B, G)
        if self.scale_rewards == "batch" and distributed()[1] > 1:  # the std of the GLOBAL batch
            std = gather_rows(rewards).std()
            adv = (rewards - grouped.mean(1).repeat_interleave(G)) / (std + 1e-4)
        else:
            adv, _ = group_advantages(rewards, G, self.scale_rewards)
        if self.stats is not None:  # groups whose completions all got the same reward teach nothing
            same = (grouped == grouped[:, :1]).all(1)  # (B,)
            self.stats.add("frac_reward_zero_std", float(same.sum()), len(same))
        ref_logps = None
        if self.beta != 0.0:
            ref_logps = reference_logprobs(model, ref, ro.ids, ro.mask, self.temperature, ro.prompt_lens)
        return {"adv": adv, "ref_logps": ref_logps}

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossSum:
        ids, mask, adv = batch["ids"], batch["mask"], batch["adv"]  # (n, T), (n, T), (n,)
        logps = completion_logprobs(model, ids, mask, self.temperature, batch.get("plen"))  # (n, T)
        old = batch.get("old_logps")  # None: num_iterations = 1, the sampling policy is the current one
        eps_high = self.epsilon if self.epsilon_high is None else self.epsilon_high
        loss, kl, ratio = per_token_loss(logps, logps.detach() if old is None else old, adv,
                                         batch.get("ref_logps"), self.beta, self.epsilon, eps_high)
        if self.stats is not None:
            m = mask.detach()
            a = adv.unsqueeze(1)
            clipped = ((ratio < 1 - self.epsilon) & (a < 0)) | ((ratio > 1 + eps_high) & (a > 0))
            self.stats.add("clip_ratio", float((clipped * m).sum()), float(m.sum()))
            if kl is not None:
                self.stats.add("kl", float((kl.detach() * m).sum()), float(m.sum()))
        return aggregate(loss, mask, self.loss_type, self.max_tokens)


class GroupBatches:
    """The batch source: each step samples `prompts_per_step` prompts x `group_size` completions with the
    current policy, rewards them, asks the algorithm for advantages, and hands the rows out in
    `micro_batches` slices (one per Trainer micro-step). State (epoch, pos, step) for exact resume."""

    def __init__(self, model: nn.Module, tokenizer: Any, docs: Sequence[dict[str, Any]],
                 prompt_of: Callable[[dict[str, Any]], Messages],
                 rewards: Sequence[tuple[str, Reward, float]], algo: Any, *,
                 prompts_per_step: int, group_size: int, micro_batches: int = 1, max_tokens: int = 128,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, ref: nn.Module | None = None,
                 amp: torch.dtype | None = None, mask_truncated: bool = False, max_batch: int = 64,
                 stats: StepStats | None = None, log_path: Path | None = None, template: str | None = None):
        self.model, self.tok, self.docs, self.prompt_of = model, tokenizer, list(docs), prompt_of
        self.rewards, self.algo, self.ref, self.amp = list(rewards), algo, ref, amp
        self.P, self.G, self.micro = prompts_per_step, group_size, micro_batches
        self.max_tokens, self.temperature, self.top_p, self.seed = max_tokens, temperature, top_p, seed
        self.mask_truncated, self.max_batch = mask_truncated, max_batch
        self.stats, self.log_path = stats, log_path
        self.rank, self.world = distributed()
        if self.P % self.world:
            raise LlmkitError(f"prompts per step ({self.P}) must be a multiple of the process count "
                              f"({self.world})")
        self.prompt_ids = render_prompts(tokenizer, [prompt_of(d) for d in self.docs], template)
        self.epoch = self.pos = self.step = 0
        self.queue: list[dict[str, Any]] = []

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos, "step": self.step}

    def load_state_dict(self, st: dict[str, int]) -> None:
        self.epoch, self.pos, self.step = int(st["epoch"]), int(st["pos"]), int(st["step"])
        self.queue = []

    def _take(self, n: int) -> list[int]:
        """The next n prompt indices of the seeded per-epoch permutation (the global batch)."""
        idx: list[int] = []
        while len(idx) < n:
            perm = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.docs))
            take = perm[self.pos:self.pos + n - len(idx)]
            idx += take.tolist()
            self.pos += len(take)
            if self.pos >= len(perm):
                self.epoch, self.pos = self.epoch + 1, 0
        return idx

    # ---------------------------------------------------------------- batches
    def next(self, device: torch.device) -> dict[str, Any]:
        if not self.queue:
            self.queue = self._rollout()
        b = self.queue.pop(0)
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()}

    def _autocast(self):
        dev = next(self.model.parameters()).device
        return torch.autocast(dev.type, dtype=self.amp, enabled=self.amp is not None)

    def _rollout(self) -> list[dict[str, Any]]:
        mine = self._take(self.P)[self.rank::self.world]
        docs = [self.docs[i] for i in mine]
        self.step += 1
        with gathered(self.model):  # FSDP: whole weights, so ranks may sample different lengths
            ro = sample_groups(self.model, self.tok, [self.prompt_ids[i] for i in mine], self.G,
                               temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_tokens,
                               seed=step_seed(self.seed, self.step), max_batch=self.max_batch)
        dev = next(self.model.parameters()).device
        ro.ids, ro.mask = ro.ids.to(dev), ro.mask.to(dev)
        row_docs = [d for d in docs for _ in range(self.G)]
        row_prompts = [self.prompt_of(d) for d in row_docs]
        cols = {name: [float(x) for x in fn(row_prompts, ro.texts, row_docs)] for name, fn, _ in self.rewards}
        for name, col in cols.items():
            if len(col) != len(ro.texts):
                raise LlmkitError(f"reward {name!r} returned {len(col)} values for {len(ro.texts)} "
                                  "completions")
        rewards = torch.tensor([sum(w * cols[name][i] for name, _, w in self.rewards)
                                for i in range(len(ro.texts))], device=dev)  # (N,)
        with gathered(self.model), self._autocast():
            prep = self.algo.prepare(self.model, self.ref, ro, rewards)
        self._record(ro, row_docs, cols, rewards, prep["adv"])
        if self.mask_truncated:  # TRL's mask_truncated_completions: truncated rows do not train
            keep = torch.tensor([f != "length" for f in ro.finish], device=dev, dtype=ro.mask.dtype)
            ro.mask = ro.mask * keep.unsqueeze(1)
        out = []
        for part in torch.arange(len(ro.texts)).tensor_split(self.micro):
            sub = ro.rows(part)
            T = sub.ids.shape[1]
            b = {"ids": sub.ids, "mask": sub.mask, "adv": prep["adv"][part.to(dev)],
                 "plen": torch.tensor(sub.prompt_lens)}
            for k, v in prep.items():
                if k != "adv" and v is not None:
                    b[k] = v[part.to(dev)][:, :T] if v.dim() == 2 else v[part.to(dev)]
            out.append(b)
        return out

    def _record(self, ro: Rollouts, row_docs: list[dict[str, Any]], cols: dict[str, list[float]],
                rewards: torch.Tensor, adv: torch.Tensor) -> None:
        """Step statistics and, on rank 0, the rollouts as JSON lines."""
        n = len(ro.texts)
        lens = ro.completion_lens
        if self.stats is not None:
            self.stats.add("reward", float(rewards.sum()), n)
            for name, col in cols.items():
                if len(cols) > 1:
                    self.stats.add(f"reward/{name}", sum(col), n)
            self.stats.add("reward_std", float(rewards.std()) if n > 1 else 0.0)
            if all("answer" in d for d in row_docs):
                right = sum(is_correct(t, d["answer"]) for t, d in zip(ro.texts, row_docs))
                self.stats.add("accuracy", right, n)
            self.stats.add("completion_len", sum(lens), n)
            self.stats.add("truncated", sum(f == "length" for f in ro.finish), n)
        if self.log_path is None or self.rank != 0:
            return
        with open(self.log_path, "a", encoding="utf-8") as f:
            for i, text in enumerate(ro.texts):
                d = row_docs[i]
                rec = {"step": self.step, "id": d.get("id"), "prompt": self.prompt_of(d)[-1]["content"],
                       "completion": text, "reward": round(float(rewards[i]), 6),
                       "rewards": {k: v[i] for k, v in cols.items()}, "advantage": round(float(adv[i]), 6),
                       "tokens": lens[i], "finish": ro.finish[i]}
                if "answer" in d:
                    rec["answer"] = d["answer"]
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def truncate_jsonl(path: Path, step: int) -> None:
    """Keep the records of steps <= step (a resumed run rewrites what came after its checkpoint)."""
    from llmkit.io import atomic_write_text
    from llmkit.train.trainer import parse_jsonl_line

    if path.exists():
        keep = [line for line in path.read_text(encoding="utf-8").splitlines()
                if (r := parse_jsonl_line(line)) is not None and r.get("step", 0) <= step]
        atomic_write_text(path, "".join(line + "\n" for line in keep))


# ----------------------------------------------------------------------------------------------- eval
def greedy_completions(model: nn.Module, tokenizer: Any, prompts: Sequence[Messages], max_tokens: int,
                       max_batch: int = 32, template: str | None = None) -> list[str]:
    """Greedy answers to conversations, through a fresh Engine (the weights of now)."""
    if not prompts:
        return []
    ids = render_prompts(tokenizer, prompts, template)
    out: list[str] = []
    for i in range(0, len(ids), max_batch):
        out += sample_groups(model, tokenizer, ids[i:i + max_batch], 1, temperature=0.0,
                             max_tokens=max_tokens, max_batch=max_batch).texts
    return out


def evaluate_problems(model: nn.Module, tokenizer: Any, problems: Sequence[dict[str, Any]], *,
                      max_tokens: int = 128, samples: int = 2, max_batch: int = 32,
                      prompt_of: Callable[[dict[str, Any]], Messages] = problem_prompt) -> dict[str, Any]:
    """Held-out accuracy of greedy answers with its 95 % Wilson interval, the format rate and `samples`
    sample answers: {"val_accuracy", "val_acc_low", "val_acc_high", "val_n", "val_format", "sample",
    "samples"}."""
    from llmkit.train.reward import wilson_interval  # the reward model's accuracy uses the same interval
    from llmkit.train.rewards import format_reward

    prompts = [prompt_of(p) for p in problems]
    answers = greedy_completions(model, tokenizer, prompts, max_tokens, max_batch)
    right = [is_correct(a, p["answer"]) for a, p in zip(answers, problems)]
    k, n = sum(right), len(problems)
    lo, hi = wilson_interval(k, n)
    fmt = format_reward(prompts, answers, list(problems))
    shown = [{"question": p["question"], "answer": a, "target": p["answer"], "correct": r}
             for p, a, r in list(zip(problems, answers, right))[:samples]]
    return {"val_accuracy": k / max(n, 1), "val_acc_low": lo, "val_acc_high": hi, "val_n": n,
            "val_format": sum(fmt) / max(n, 1), "sample": answers[0] if answers else "", "samples": shown}


# ----------------------------------------------------------------------------------------------- driver
def _docs(data: Any, what: str) -> list[dict[str, Any]]:
    from llmkit.train.rewards import load_problems

    if isinstance(data, (str, os.PathLike)) or (isinstance(data, Sequence) and data
                                                 and isinstance(data[0], (str, os.PathLike))):
        return load_problems(data)
    docs = list(data or [])
    if not docs:
        raise LlmkitError(f"{what}: no problems given")
    return docs


def train_policy(llm: Any, train_docs: list[dict[str, Any]], out: Path, cfg: TrainConfig, algo: Any, *,
                 prompt_of: Callable[[dict[str, Any]], Messages], rewards: list[tuple[str, Reward, float]],
                 group_size: int, max_tokens: int, temperature: float, top_p: float,
                 evaluate: Callable[[nn.Module, bool], dict[str, Any]] | None, eval_before: bool,
                 lora_r: int | None, lora_alpha: float, lora_dropout: float, lora_targets: Sequence[str],
                 mask_truncated: bool, resume: bool, stop_after: int | None, export: bool,
                 info: dict[str, Any]) -> Path:
    """The loop GRPO and RLOO share: LoRA or full fine-tuning, the reference, the batch source, the Trainer,
    run.json, the rollout log, resume and export."""
    from llmkit.device import resolve_device
    from llmkit.io import atomic_write_json
    from llmkit.lora import apply_lora, save_adapter
    from llmkit.train.trainer import seed_everything

    seed_everything(cfg.seed)
    net = llm.model
    init_distributed(cfg)
    if lora_r:
        apply_lora(net, r=lora_r, alpha=lora_alpha, dropout=lora_dropout, targets=lora_targets)
    device = resolve_device(cfg.device)
    net.to(device)
    ref = None
    if algo.needs_reference and not lora_r:  # full fine-tuning: a frozen copy (LoRA: adapters off)
        ref = frozen_reference(copy.deepcopy(net), net, device)
    stats = StepStats()
    algo.stats = stats
    out.mkdir(parents=True, exist_ok=True)
    batches = GroupBatches(net, llm.tokenizer, train_docs, prompt_of, rewards, algo,
                           prompts_per_step=cfg.batch_size * cfg.grad_accum // group_size,
                           group_size=group_size, micro_batches=cfg.grad_accum, max_tokens=max_tokens,
                           temperature=temperature, top_p=top_p, seed=cfg.seed, ref=ref,
                           amp=autocast_dtype(cfg, device), mask_truncated=mask_truncated, stats=stats,
                           log_path=out / ROLLOUTS)
    trainer = RLTrainer(net, algo, batches, cfg, out, evaluate=evaluate, model_config=llm.config, stats=stats)
    n_train = sum(p.numel() for p in net.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in net.parameters())
    lora = {"r": lora_r, "alpha": lora_alpha, "dropout": lora_dropout, "targets": list(lora_targets)}
    info = {**info, "mode": "lora" if lora_r else "full", "model": str(getattr(llm, "name", "")),
            "lora": lora if lora_r else None,
            "reference": "adapters disabled" if lora_r else "frozen copy" if ref else None,
            "rewards": {name: w for name, _, w in rewards}, "train_config": {**cfg.__dict__},
            "algorithm": {k: v for k, v in asdict(algo).items() if k != "stats"},
            "parameters": {"trainable": n_train, "total": n_all}}
    if trainer.is_main:
        atomic_write_json(out / "run.json", info, default=str)
    if cfg.progress and trainer.is_main:
        print(f"{info['algorithm_name']} ({info['mode']}): {n_train:,} of {n_all:,} parameters train; "
              f"{len(train_docs)} train prompts, {batches.P} x {group_size} completions per step")
    if resume:
        trainer.resume()
        if trainer.is_main:
            truncate_jsonl(out / ROLLOUTS, trainer.step)
    elif trainer.is_main:
        (out / ROLLOUTS).unlink(missing_ok=True)
        (out / "metrics.jsonl").unlink(missing_ok=True)
    if eval_before and evaluate is not None and not resume:
        with trainer.gathered() as m, trainer.autocast():
            ev = evaluate(m, False)
        net.train()
        if ev:
            trainer.log({"step": 0, "tokens": 0, "time": 0.0, **ev})
    trainer.fit(stop_after=stop_after)
    if export and trainer.finished:
        with trainer.gathered():  # FSDP: whole weights on every rank; rank 0 writes
            base = str(getattr(llm, "name", None) or info["model"])
            if trainer.is_main and lora_r:
                save_adapter(net, out / "adapter", base_model=base)
            elif trainer.is_main:
                llm.save_hf(out / "hf")
    return out


def make_config(cfg: TrainConfig | None, train: dict[str, Any], *, group_size: int, prompts_per_step: int,
                block_size: int, lora: bool) -> TrainConfig:
    """The TrainConfig of an RL run: rows per micro-step = prompts_per_step * group_size / grad_accum."""
    if cfg is None:
        accum = int(train.pop("grad_accum", 1))
        rows = prompts_per_step * group_size
        if rows % accum:
            raise LlmkitError(f"--grad-accum {accum} must divide prompts per step x group size ({rows})")
        base = {"steps": 50, "warmup": 2, "lr": 5e-5 if lora else 1e-6, "weight_decay": 0.0,
                "eval_every": 0, "block_size": block_size}
        cfg = TrainConfig(**{**base, **train, "batch_size": rows // accum, "grad_accum": accum})
    if (cfg.batch_size * cfg.grad_accum) % group_size:
        raise LlmkitError(f"batch_size x grad_accum ({cfg.batch_size * cfg.grad_accum}) must be a multiple "
                          f"of the group size ({group_size})")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return cfg


def load_policy(model: Any, cfg_device: str) -> Any:
    import llmkit

    return model if hasattr(model, "tokenizer") else llmkit.load(model, device=cfg_device, dtype="float32")


def grpo(
    model: Any,
    data: str | os.PathLike | Sequence[str | os.PathLike] | Sequence[dict[str, Any]],
    out: str | os.PathLike,
    cfg: TrainConfig | None = None,
    *,
    val: int | float | str | os.PathLike | Sequence[Any] | None = 0.1,
    group_size: int = 8,
    prompts_per_step: int = 4,
    max_tokens: int = 64,
    temperature: float = 0.7,
    top_p: float = 1.0,
    beta: float = 0.04,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    loss_type: str = "dapo",
    scale_rewards: str = "group",
    mask_truncated: bool = False,
    rewards: str | dict[str, float] | Sequence[tuple[Any, float]] = "correct=1,format=0.2",
    lora_r: int | None = None,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    lora_targets: Sequence[str] = TARGETS,
    eval_max: int | None = None,
    eval_before: bool = True,
    resume: bool = False,
    stop_after: int | None = None,
    export: bool = True,
    **train: Any,
) -> Path:
    """GRPO on problems with verifiable answers. `model`: a name/path for llmkit.load or an LLM (trained in
    place). `data`: JSONL files (load_problems) or records {"question", "answer"}. `val`: held-out problems
    (files, records) or how many to hold out of `data` (a count, or a fraction < 1); None = no eval.
    `cfg` or TrainConfig keywords (steps, lr, grad_accum, eval_every, time_budget, seed, ...); with `cfg`,
    the rows per step are cfg.batch_size x cfg.grad_accum (prompts_per_step = that / group_size). `rewards`:
    "correct=1,format=0.2", a mapping, or (name or callable, weight) pairs. `eval_max`: problems in periodic
    evals (the final eval and eval_before use every held-out problem). Returns the run folder."""
    docs = _docs(data, "--data")
    seed = int(train.get("seed", cfg.seed if cfg else TrainConfig.seed))
    if isinstance(val, (int, float)) and not isinstance(val, bool):
        train_docs, val_docs = split_problems(docs, val, seed) if val else (docs, [])
    else:
        train_docs, val_docs = docs, (_docs(val, "--val") if val else [])
    if not train_docs:
        raise LlmkitError("no training problems left after the held-out split")
    llm = load_policy(model, cfg.device if cfg else train.get("device", "auto"))
    tok = llm.tokenizer
    longest = max(len(ids) for ids in render_prompts(tok, [problem_prompt(d) for d in train_docs[:200]]))
    cfg = make_config(cfg, dict(train), group_size=group_size, prompts_per_step=prompts_per_step,
                      block_size=longest + max_tokens, lora=bool(lora_r))
    algo = GRPO(beta=beta, epsilon=epsilon, epsilon_high=epsilon_high, loss_type=loss_type,
                scale_rewards=scale_rewards, temperature=temperature, max_tokens=max_tokens)
    parts = named_rewards(rewards)

    def evaluate(m: nn.Module, final: bool) -> dict[str, Any]:
        if not val_docs:
            return {}
        probs = val_docs if final or not eval_max else val_docs[:eval_max]
        return evaluate_problems(m, tok, probs, max_tokens=max_tokens)

    info = {"algorithm_name": "grpo", "problems": {"train": len(train_docs), "val": len(val_docs)},
            "sampling": {"group_size": group_size, "max_tokens": max_tokens, "temperature": temperature,
                         "top_p": top_p}}
    return train_policy(llm, train_docs, Path(out), cfg, algo, prompt_of=problem_prompt, rewards=parts,
                        group_size=group_size, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                        evaluate=evaluate if val_docs else None, eval_before=eval_before, lora_r=lora_r,
                        lora_alpha=lora_alpha, lora_dropout=lora_dropout, lora_targets=lora_targets,
                        mask_truncated=mask_truncated, resume=resume, stop_after=stop_after, export=export,
                        info=info)

"""RLHF against a learned reward model with RLOO (REINFORCE Leave-One-Out), on the one Trainer.

    rlhf("HuggingFaceTB/SmolLM2-135M-Instruct", "runs/rm/reward", "hh_rlhf_short_train.jsonl", "runs/rlhf",
         group_size=4, prompts_per_step=4, max_tokens=64, beta=0.05, lora_r=16, steps=30)

Why RLOO rather than PPO: PPO (the course's drawing) trains a value network (a critic as large as the
policy) to estimate a per-token baseline, with GAE on top: a second model to run forward and backward and a
second optimizer state, about twice the memory and compute, and more settings to tune. RLOO samples k
completions per prompt and uses the mean reward of the OTHER k - 1 as each one's baseline: unbiased, no
critic, no value loss. Ahmadian et al. 2024 ("Back to Basics: Revisiting REINFORCE Style Optimization for
Learning from Human Feedback in LLMs") find it matches or beats PPO for RLHF; on a 2-core CPU the halved
cost is what makes the stage runnable at all.

The formulas are TRL 1.16's RLOOTrainer (trl/trainer/rloo_trainer.py), tested on the same tensors
(tests/test_rloo.py):
- reward (`_generate_and_score_completions`): the reward model's score of (prompt, completion) minus
  beta * KL, with the sequence KL = sum over completion tokens of (logp_old - logp_ref) (the k1 estimator of
  the RLOO paper; it may be negative per token, unlike GRPO's k3);
- advantage: r_i - (sum_j r_j - r_i) / (k - 1) within each prompt's k samples; `normalize_advantages`
  (TRL's option, default off) then standardises them over the batch (mean 0, std 1, + 1e-4);
- loss (`_compute_loss`): REINFORCE with the clipped SEQUENCE ratio: ratio = exp(sum_t logp - sum_t
  logp_old), loss_i = -min(ratio A_i, clip(ratio, 1 - epsilon, 1 + epsilon_high) A_i), mean over sequences.
  As a LossSum: total = sum of loss_i, count = sequences (the Trainer divides by the step's sequences).
  num_iterations = 1: logp_old in the ratio is the detached current log-prob (the same value TRL computes
  at sampling time), so the ratio is 1 and the gradient is -A_i * grad sum_t logp.
- log-probs of logits / temperature, as TRL's fused head with temperature.

Notable choices
- Everything else is the GRPO stage's machinery (llmkit.train.grpo.train_policy): the batch source that
  samples through the engine (llmkit.train.rollout) each step with exact resume, the reference (LoRA with
  adapters disabled, or a frozen copy), rollouts.jsonl, per-step statistics (reward = the RM score,
  penalised_reward = RM score - beta KL, kl = mean per-token k1) and export. Only the advantage and the
  loss differ.
- The reward model is any callable with the RL reward signature (prompts, completions, docs) -> rewards, or
  a folder written by `llmkit reward-train` wrapped with llmkit.train.reward.reward_fn (it renders prompt +
  completion with the one chat-template function, as the reward model was trained).
- Prompts: JSONL records with "prompt" (a text or messages, as preference pairs: hh_rlhf files work as
  they are), "messages" (a trailing assistant turn is dropped) or "question".
- Evaluation: the mean reward-model score of greedy answers to the held-out prompts, and two samples.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmkit.errors import LlmkitError
from llmkit.lora import TARGETS
from llmkit.train.grpo import (
    StepStats,
    gather_rows,
    greedy_completions,
    load_policy,
    make_config,
    train_policy,
)
from llmkit.train.losses import LossSum
from llmkit.train.rewards import Messages, Reward
from llmkit.train.rollout import Rollouts, completion_logprobs, policy_logprobs, reference_logprobs
from llmkit.train.trainer import TrainConfig

ROLES = ("system", "user", "assistant")


# ----------------------------------------------------------------------------------------------- formulas
def leave_one_out(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """RLOO advantages of rewards (N,) in groups of k consecutive rows: r_i - mean of the others."""
    if k < 2:
        raise LlmkitError(f"RLOO needs at least 2 samples per prompt (group size {k})")
    grouped = rewards.view(-1, k)  # (B, k)
    baseline = (grouped.sum(1, keepdim=True) - grouped) / (k - 1)  # (B, k)
    return (grouped - baseline).view(-1)


def rloo_loss(seq_logps: torch.Tensor, old_seq_logps: torch.Tensor, adv: torch.Tensor, epsilon: float,
              epsilon_high: float) -> torch.Tensor:
    """Per-sequence clipped REINFORCE loss (N,) of sequence log-probs (N,), old ones (N,), advantages (N,)."""
    ratio = torch.exp(seq_logps - old_seq_logps)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    return -torch.min(ratio * adv, clipped * adv)


@dataclass
class RLOO:
    """RLOO's advantages (`prepare`, at sampling time) and loss (`__call__`, the Trainer's loss_fn)."""

    beta: float = 0.05
    epsilon: float = 0.2
    epsilon_high: float | None = None  # None = epsilon
    normalize_advantages: bool = False
    temperature: float = 1.0
    stats: StepStats | None = None

    @property
    def needs_reference(self) -> bool:
        return self.beta != 0.0

    def prepare(self, model: nn.Module, ref: nn.Module | None, ro: Rollouts, rewards: torch.Tensor
                ) -> dict[str, torch.Tensor | None]:
        """KL-penalised sequence rewards -> leave-one-out advantages (N,)."""
        mask = ro.mask  # (N, T)
        if self.beta != 0.0:
            old = policy_logprobs(model, ro.ids, mask, self.temperature, ro.prompt_lens)  # (N, T)
            ref_lp = reference_logprobs(model, ref, ro.ids, mask, self.temperature, ro.prompt_lens)  # (N, T)
            per_token_kl = (old - ref_lp) * mask  # (N, T) k1
            kl = per_token_kl.sum(-1)  # (N,)
            rewards = rewards - self.beta * kl
            if self.stats is not None:
                self.stats.add("kl", float(per_token_kl.sum()), float(mask.sum()))
        adv = leave_one_out(rewards, ro.group_size)
        if self.normalize_advantages:
            every = gather_rows(adv)
            adv = (adv - every.mean()) / (every.std() + 1e-4)
        if self.stats is not None:
            self.stats.add("penalised_reward", float(rewards.sum()), len(rewards))
        return {"adv": adv}

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossSum:
        ids, mask, adv = batch["ids"], batch["mask"], batch["adv"]  # (n, T), (n, T), (n,)
        lp = completion_logprobs(model, ids, mask, self.temperature, batch.get("plen"))  # (n, T)
        seq = (lp * mask).sum(1)  # (n,)
        old = batch.get("old_seq_logps")  # None: num_iterations = 1, the sampling policy is the current one
        eps_high = self.epsilon if self.epsilon_high is None else self.epsilon_high
        loss = rloo_loss(seq, seq.detach() if old is None else old, adv, self.epsilon, eps_high)  # (n,)
        return LossSum(loss.sum(), torch.tensor(float(len(loss)), device=loss.device))


# ----------------------------------------------------------------------------------------------- data
def _prompt_messages(rec: dict[str, Any], where: str) -> Messages:
    if isinstance(rec.get("prompt"), str) and rec["prompt"].strip():
        return [{"role": "user", "content": rec["prompt"]}]
    if isinstance(rec.get("question"), str) and rec["question"].strip():
        return [{"role": "user", "content": rec["question"]}]
    field = "prompt" if "prompt" in rec else "messages" if "messages" in rec else None
    if field is None:
        raise LlmkitError(f"{where}: field 'prompt' (or 'messages' / 'question') is missing")
    msgs = rec[field]
    if not isinstance(msgs, list) or not msgs:
        raise LlmkitError(f"{where}: field '{field}' must be a non-empty text or list of {{role, content}}")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise LlmkitError(f"{where}: field '{field}[{i}]' must be {{role: system|user|assistant, "
                              "content: text}")
        out.append({"role": m["role"], "content": m["content"]})
    if field == "messages" and out[-1]["role"] == "assistant":
        out = out[:-1]
    if not out or out[-1]["role"] != "user":
        raise LlmkitError(f"{where}: field '{field}' must end with a user turn (the prompt to answer)")
    return out


def load_prompts(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[dict[str, Any]]:
    """Prompts from JSONL files: [{"id", "prompt": messages}]; a bad record is one line naming file:line and
    the field."""
    from llmkit.eval.base import read_jsonl

    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out = []
    for path in map(Path, paths):
        if not path.is_file():
            raise LlmkitError(f"--data {path}: no such file")
        for no, rec in read_jsonl(path, "--data"):
            where = f"{path}:{no}"
            out.append({"id": str(rec.get("id", where)), "prompt": _prompt_messages(rec, where)})
    if not out:
        raise LlmkitError(f"--data {', '.join(map(str, paths))}: no prompts found")
    return out


def _prompt_docs(data: Any, what: str) -> list[dict[str, Any]]:
    if isinstance(data, (str, os.PathLike)) or (isinstance(data, Sequence) and data
                                                 and isinstance(data[0], (str, os.PathLike))):
        return load_prompts(data)
    docs = []
    for i, d in enumerate(data or []):
        docs.append(d if isinstance(d.get("prompt"), list) else
                    {**d, "id": str(d.get("id", i)), "prompt": _prompt_messages(d, f"{what} record {i}")})
    if not docs:
        raise LlmkitError(f"{what}: no prompts given")
    return docs


def reward_model_fn(reward_model: str | os.PathLike | Callable[..., list[float]], device: str = "auto"
                    ) -> Reward:
    """The RL reward callable of a reward-model folder (llmkit.train.reward.reward_fn over
    load_reward_model), or the callable itself."""
    if callable(reward_model):
        return reward_model
    from llmkit.train.reward import load_reward_model, reward_fn

    rm = load_reward_model(reward_model, device=device, dtype="float32")
    return reward_fn(rm, rm.tokenizer)


# ----------------------------------------------------------------------------------------------- stage
def rlhf(
    model: Any,
    reward_model: str | os.PathLike | Callable[..., list[float]],
    data: str | os.PathLike | Sequence[str | os.PathLike] | Sequence[dict[str, Any]],
    out: str | os.PathLike,
    cfg: TrainConfig | None = None,
    *,
    val: int | float | str | os.PathLike | Sequence[Any] | None = 0.1,
    group_size: int = 4,
    prompts_per_step: int = 4,
    max_tokens: int = 64,
    temperature: float = 0.7,
    top_p: float = 1.0,
    beta: float = 0.05,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    normalize_advantages: bool = False,
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
    """RLOO against a reward model (a reward-train folder or a callable (prompts, completions, docs) ->
    rewards). `data`/`val` as `grpo` (prompt files or records; val a count or fraction of data, or its own
    prompts). Returns the run folder (adapter/ or hf/ at the end)."""
    from llmkit.train.rewards import split_problems

    if group_size < 2:
        raise LlmkitError(f"--group-size {group_size}: RLOO needs at least 2 samples per prompt")
    docs = _prompt_docs(data, "--data")
    seed = int(train.get("seed", cfg.seed if cfg else TrainConfig.seed))
    if isinstance(val, (int, float)) and not isinstance(val, bool):
        keyed = [{**d, "question": repr(d["prompt"])} for d in docs]  # split_problems groups by question
        tr, va = split_problems(keyed, val, seed) if val else (keyed, [])
        train_docs = [{k: v for k, v in d.items() if k != "question"} for d in tr]
        val_docs = [{k: v for k, v in d.items() if k != "question"} for d in va]
    else:
        train_docs, val_docs = docs, (_prompt_docs(val, "--val") if val else [])
    if not train_docs:
        raise LlmkitError("no training prompts left after the held-out split")
    device = cfg.device if cfg else train.get("device", "auto")
    llm = load_policy(model, device)
    tok = llm.tokenizer
    from llmkit.train.rollout import render_prompts

    longest = max(len(ids) for ids in render_prompts(tok, [d["prompt"] for d in train_docs[:200]]))
    cfg = make_config(cfg, dict(train), group_size=group_size, prompts_per_step=prompts_per_step,
                      block_size=longest + max_tokens, lora=bool(lora_r))
    score = reward_model_fn(reward_model, cfg.device)
    algo = RLOO(beta=beta, epsilon=epsilon, epsilon_high=epsilon_high,
                normalize_advantages=normalize_advantages, temperature=temperature)

    def evaluate(m: nn.Module, final: bool) -> dict[str, Any]:
        docs_ = val_docs if final or not eval_max else val_docs[:eval_max]
        prompts = [d["prompt"] for d in docs_]
        answers = greedy_completions(m, tok, prompts, max_tokens)
        scores = [float(s) for s in score(prompts, answers, docs_)]
        n = len(scores)
        mean = sum(scores) / n
        sd = (sum((s - mean) ** 2 for s in scores) / max(n - 1, 1)) ** 0.5
        shown = [{"prompt": p[-1]["content"], "answer": a, "score": s}
                 for p, a, s in list(zip(prompts, answers, scores))[:2]]
        return {"val_rm_score": mean, "val_rm_score_sem": sd / n ** 0.5, "val_n": n,
                "sample": answers[0], "samples": shown}

    info = {"algorithm_name": "rloo", "reward_model": str(reward_model) if not callable(reward_model) else
            getattr(reward_model, "__name__", "callable"),
            "prompts": {"train": len(train_docs), "val": len(val_docs)},
            "sampling": {"group_size": group_size, "max_tokens": max_tokens, "temperature": temperature,
                         "top_p": top_p}}
    return train_policy(llm, train_docs, Path(out), cfg, algo, prompt_of=lambda d: d["prompt"],
                        rewards=[("rm", score, 1.0)], group_size=group_size, max_tokens=max_tokens,
                        temperature=temperature, top_p=top_p, evaluate=evaluate if val_docs else None,
                        eval_before=eval_before, lora_r=lora_r, lora_alpha=lora_alpha,
                        lora_dropout=lora_dropout, lora_targets=lora_targets, mask_truncated=False,
                        resume=resume, stop_after=stop_after, export=export, info=info)

"""Preference pairs and Direct Preference Optimization (DPO), on the one Trainer.

    pairs = load_pairs("hh_rlhf_short_train.jsonl")            # prompt (text or messages), chosen, rejected
    train, val = split_pairs(pairs, val_fraction=0.1, seed=0)
    dpo("HuggingFaceTB/SmolLM2-135M-Instruct", train, "runs/dpo", val=val, lora_r=16, beta=0.1, steps=100)
    preference_accuracy(llm, llm.tokenizer, val)              # held-out implicit-reward accuracy, margins

Notable choices
- Data: a pair is (prompt messages, chosen text, rejected text, id). `prompt` may be a text (one user turn)
  or a messages list; `chosen` / `rejected` may be texts or, as TRL's conversational format, message lists
  whose last turn is the assistant's answer (earlier turns, if any, must be equal and extend the prompt). A
  bad record is a one-line LlmkitError naming file:line and the field. `split_pairs` keeps all pairs of one
  prompt on one side.
- Encoding: `encode_response` renders prompt + [assistant answer] with the one chat-template function
  (`render_chat`); the mask is its assistant mask restricted to the LAST assistant turn, i.e. from just after
  the final "<|im_start|>assistant\n" header through the end-of-turn token. Assistant turns inside a multi-
  turn prompt are context, never scored. (TRL scores every token after the generation prompt, so it also
  scores the newline the template writes after <|im_end|>; we score exactly the SFT tokens.)
- Truncation (`max_length`): TRL's legacy `truncation_mode="keep_end"` + `max_prompt_length` rule, applied
  only as far as needed: a pair longer than max_length (prompt + its longer answer) first loses the START
  of its prompt (the last user turn and the assistant header stay), down to `max_prompt_length` tokens
  (default max_length // 2); then both answers are cut at max_length - kept prompt. Chosen and rejected
  always keep the same prompt tokens. (TRL 1.16's default `keep_start` cuts the answers' ends first.)
- Batches: `PairBatches` draws the GLOBAL batch (batch_size pairs) from a seeded permutation per epoch and
  keeps rows idx[rank::world] (llmkit.train.trainer.distributed), so 2 processes see the same pairs as 1
  (DDP or FSDP2 under torchrun; held-out pairs are scored split over the ranks; rank 0 prints and writes).
  State (epoch, pos) gives the Trainer's exact resume. Two layouts, each ONE forward for chosen and
  rejected: `collate` right-pads both answers' rows to one length, a (2B, T) batch (TRL's
  `concatenated_forward`, through `llmkit.score.sequence_logprobs`); `pack_pairs` (what `dpo` trains on)
  puts a pair in one row, the prompt once and both answers after it as separate segments (the model's
  shared-prefix `segments` masking), so the prompt is not computed twice: ~1/3 fewer tokens on
  hh-rlhf, the same log-probs and gradients (both layouts are tested against TRL). The head runs only on
  the scored positions.
- Loss: `dpo_loss` is TRL 1.16's `DPOTrainer._compute_loss` (sigmoid and IPO, rewards beta * log-ratio;
  IPO divides each log-ratio by its answer's length, as TRL does); label smoothing is conservative DPO.
  `DPOLoss` returns LossSum(sum of pair losses, pairs): the Trainer averages over the pairs of the step.
- Reference: "adapters" (the LoRA policy with its adapters off, PEFT's disable_adapter: no copy; the default
  with LoRA) or "copy" (a frozen deepcopy of the starting model passed as the Trainer's ref_model; the default
  for full fine-tuning). `precompute_ref` scores every training pair with the reference once before training
  (TRL's precompute_ref_log_probs). The held-out pairs' reference log-probs are always computed once.
- Evaluation (`preference_accuracy`, the evaluate hook): implicit-reward accuracy (ties count 1/2, so a
  policy equal to its reference scores 50 %), its 95 % interval, margins, rewards and the DPO loss, scored
  by `llmkit.score.score` (the prompt runs once per pair, both answers after it in one row: ~1/3 fewer
  tokens than the training forward). Periodic evals use the first `eval_pairs` held-out pairs, the final
  one all. Training batches' reward accuracy / margins since the previous eval are logged with it
  (train_reward_acc, ...; over all ranks; a resumed run restarts that window).
- Defaults: beta 0.1 (DPO paper, TRL); lr 1e-4 with LoRA, 5e-6 full: a CPU budget buys tens of steps, not
  TRL's thousands at 1e-6 (full); LoRA's zero-initialised B wants ~10-20x the full-model rate (half the SFT
  stage's 2e-4); weight decay 0 (TRL's: decay pulls towards zero, not towards the reference); LoRA dropout 0
  (TRL disables dropout in DPO so policy and reference see the same network).
- Output: run folder with checkpoint.pt, metrics.jsonl, loss.png, run.json; at the end `adapter/` (PEFT
  format) for LoRA/QLoRA, `hf/` for full fine-tuning.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from llmkit.errors import LlmkitError
from llmkit.lora import TARGETS
from llmkit.train.losses import LossSum, unwrap

ROLES = ("system", "user", "assistant")
Messages = list[dict[str, str]]


# ------------------------------------------------------------------------------------------------- data
@dataclass
class Pair:
    """One preference: for `prompt` (messages), answer `chosen` is preferred to `rejected`."""

    prompt: Messages
    chosen: str
    rejected: str
    id: str


def _messages(value: Any, where: str, field: str) -> Messages:
    if not isinstance(value, list) or not value:
        raise LlmkitError(f"{where}: field '{field}' must be a non-empty text or list of {{role, content}}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise LlmkitError(f"{where}: field '{field}[{i}]' must be an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise LlmkitError(f"{where}: field '{field}[{i}].role' must be one of {', '.join(ROLES)}, "
                              f"got {role!r}")
        if not isinstance(content, str):
            raise LlmkitError(f"{where}: field '{field}[{i}].content' must be a string")
        out.append({"role": role, "content": content})
    return out


def _answer(rec: dict, name: str, where: str) -> tuple[Messages, str]:
    """(extra prompt turns, answer text) of a `chosen` / `rejected` field: a text, or messages ending with
    the assistant's answer (TRL's conversational format)."""
    v = rec.get(name)
    if isinstance(v, str):
        if not v.strip():
            raise LlmkitError(f"{where}: field '{name}' is empty")
        return [], v
    if v is None:
        raise LlmkitError(f"{where}: field '{name}' is missing")
    msgs = _messages(v, where, name)
    last = msgs[-1]
    if last["role"] != "assistant" or not last["content"].strip():
        raise LlmkitError(f"{where}: field '{name}' must end with a non-empty assistant turn")
    return msgs[:-1], last["content"]


def parse_pair(rec: Any, where: str) -> Pair:
    """One record -> Pair; `where` ("file:line") starts every error message."""
    if not isinstance(rec, dict):
        raise LlmkitError(f"{where}: a record must be a JSON object, got {type(rec).__name__}")
    p = rec.get("prompt")
    if p is None:
        raise LlmkitError(f"{where}: field 'prompt' is missing (need prompt, chosen, rejected)")
    if isinstance(p, str):
        if not p.strip():
            raise LlmkitError(f"{where}: field 'prompt' is empty")
        prompt = [{"role": "user", "content": p}]
    else:
        prompt = _messages(p, where, "prompt")
    extra_c, chosen = _answer(rec, "chosen", where)
    extra_r, rejected = _answer(rec, "rejected", where)
    if extra_c != extra_r:
        raise LlmkitError(f"{where}: fields 'chosen' and 'rejected' differ before their last turn "
                          "(they must share the prompt)")
    prompt = prompt + extra_c
    if prompt[-1]["role"] == "assistant":
        raise LlmkitError(f"{where}: field 'prompt' ends with an assistant turn; it must end with the user's")
    rid = rec.get("id", where)
    return Pair(prompt, chosen, rejected, str(rid))


def load_pairs(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Pair]:
    """Read preference pairs from JSONL (one record a line) or JSON-list files. Each record: `prompt`
    (text or messages), `chosen`, `rejected` (texts, or messages ending with the assistant answer), `id`
    (optional; default "file:line"). A bad record raises a one-line LlmkitError naming file:line and field."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[Pair] = []
    for path in map(Path, paths):
        if not path.is_file():
            raise LlmkitError(f"--data {path}: no such file")
        text = path.read_text(encoding="utf-8")
        if text.lstrip().startswith("["):
            try:
                records = json.loads(text)
            except json.JSONDecodeError as e:
                raise LlmkitError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
            out += [parse_pair(r, f"{path}: record {i}") for i, r in enumerate(records)]
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise LlmkitError(f"{path}:{n}: invalid JSON ({e.msg})") from None
            out.append(parse_pair(rec, f"{path}:{n}"))
    if not out:
        raise LlmkitError(f"--data {', '.join(map(str, paths))}: no preference pairs found")
    return out


def split_pairs(pairs: Sequence[Pair], val_fraction: float = 0.1, seed: int = 0
                ) -> tuple[list[Pair], list[Pair]]:
    """(train, val): pairs with the same prompt stay on one side (a prompt seen in training must not be
    judged held-out). Prompt groups are shuffled with `seed` and taken for val until it holds >= val_fraction
    of the pairs; with a positive fraction and two groups or more, each side gets at least one group."""
    if not 0 <= val_fraction < 1:
        raise LlmkitError(f"--val-fraction {val_fraction}: must be in [0, 1)")
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(pairs):
        groups.setdefault(json.dumps(p.prompt, sort_keys=True, ensure_ascii=False), []).append(i)
    order = sorted(groups)
    random.Random(seed).shuffle(order)
    want = val_fraction * len(pairs)
    val_idx: set[int] = set()
    for g in order[:-1]:  # the last group always trains
        if len(val_idx) >= want or val_fraction == 0:
            break
        val_idx.update(groups[g])
    return ([p for i, p in enumerate(pairs) if i not in val_idx],
            [p for i, p in enumerate(pairs) if i in val_idx])


def encode_response(tok: Any, prompt: Messages, response: str, template: str | None = None
                    ) -> tuple[list[int], list[int]]:
    """(ids, mask) of prompt + [assistant `response`] rendered by the chat template; mask 1 on the final
    assistant turn's tokens only (render_chat's assistant mask, earlier assistant turns zeroed)."""
    from llmkit.tokenizer.chat import render_chat

    r = render_chat(tok, [*prompt, {"role": "assistant", "content": response}], template=template)
    mask = list(r.loss_mask)
    end = max((i for i, m in enumerate(mask) if m), default=-1) + 1
    if end == 0:
        raise LlmkitError("encode_response: the chat template marks no assistant tokens for the answer")
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    return r.ids, [0] * start + [1] * (end - start) + [0] * (len(mask) - end)


@dataclass
class EncodedPair:
    """A pair as token ids: prompt (shared, through the assistant header) and each answer's tokens + mask."""

    prompt: list[int]
    chosen: list[int]
    chosen_mask: list[int]
    rejected: list[int]
    rejected_mask: list[int]
    id: str = ""


def _split(ids: list[int], mask: list[int]) -> int:
    return mask.index(1)


def encode_pair(tok: Any, pair: Pair, template: str | None = None) -> EncodedPair:
    """Encode both answers; the prompt part is everything before the final answer's first scored token."""
    c_ids, c_mask = encode_response(tok, pair.prompt, pair.chosen, template)
    r_ids, r_mask = encode_response(tok, pair.prompt, pair.rejected, template)
    sc, sr = _split(c_ids, c_mask), _split(r_ids, r_mask)
    if sc != sr or c_ids[:sc] != r_ids[:sr]:
        raise LlmkitError(f"pair {pair.id}: the chat template renders the prompt differently for the two "
                          "answers; cannot share a prompt")
    return EncodedPair(c_ids[:sc], c_ids[sc:], c_mask[sc:], r_ids[sr:], r_mask[sr:], pair.id)


def encode_pairs(tok: Any, pairs: Sequence[Pair], template: str | None = None) -> list[EncodedPair]:
    return [encode_pair(tok, p, template) for p in pairs]


def truncate_pair(e: EncodedPair, max_length: int | None, max_prompt_length: int | None = None
                  ) -> tuple[EncodedPair, bool]:
    """(pair fitting max_length tokens per sequence, whether anything was cut). Legacy TRL keep_end rule,
    only as far as needed: the prompt loses its start down to max_prompt_length (default max_length // 2),
    then the answers lose their ends."""
    if max_length is None:
        return e, False
    longest = max(len(e.chosen), len(e.rejected))
    if len(e.prompt) + longest <= max_length:
        return e, False
    floor = max_length // 2 if max_prompt_length is None else max_prompt_length
    keep_p = min(len(e.prompt), max(max_length - longest, floor))
    keep_r = max_length - keep_p
    if keep_r <= 0 or keep_p <= 0:
        raise LlmkitError(f"pair {e.id}: max_length {max_length} leaves no room (max_prompt_length {floor})")
    return EncodedPair(e.prompt[len(e.prompt) - keep_p:], e.chosen[:keep_r], e.chosen_mask[:keep_r],
                       e.rejected[:keep_r], e.rejected_mask[:keep_r], e.id), True


def collate(pairs: Sequence[EncodedPair], pad_id: int, device: torch.device | str = "cpu"
            ) -> dict[str, torch.Tensor]:
    """Right-pad both answers of every pair to one common length T (longest prompt + answer of the batch).
    Returns chosen_ids / rejected_ids (B, T) long and chosen_mask / rejected_mask (B, T) bool (1 = scored)."""
    rows = [(e.prompt + e.chosen, [0] * len(e.prompt) + e.chosen_mask) for e in pairs] + \
           [(e.prompt + e.rejected, [0] * len(e.prompt) + e.rejected_mask) for e in pairs]
    T = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)  # (2B, T)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)  # (2B, T)
    for i, (r, m) in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(m)] = torch.tensor(m, dtype=torch.bool)
    B = len(pairs)
    ids, mask = ids.to(device), mask.to(device)
    return {"chosen_ids": ids[:B], "rejected_ids": ids[B:],  # (B, T) each
            "chosen_mask": mask[:B], "rejected_mask": mask[B:]}


def pack_pairs(pairs: Sequence[EncodedPair], pad_id: int, device: torch.device | str = "cpu"
               ) -> dict[str, torch.Tensor]:
    """One row per pair, the prompt shared: segment 0 = the prompt, segment 1 = the chosen answer's scored
    tokens but the last, segment 2 = the rejected answer's, both continuing from the prompt's end position
    (the model's `segments` packing: each answer sees the prompt and itself). The last prompt position
    predicts each answer's first token. Returns ids / positions / segments (B, T) (segments -1 = padding)
    and, per scored token, "rows", "cols" (the predicting position), "targets" and "owner" (N,) (owner b:
    chosen of pair b, B + b: rejected), plus "chosen_lengths" / "rejected_lengths" (B,)."""
    B = len(pairs)
    ids_l, pos_l, seg_l = [], [], []
    rows, cols, targets, owner, lengths = [], [], [], [], []
    for b, e in enumerate(pairs):
        P = len(e.prompt)
        ids, pos, seg = list(e.prompt), list(range(P)), [0] * P
        for s, (ans, mask) in enumerate(((e.chosen, e.chosen_mask), (e.rejected, e.rejected_mask)), 1):
            k = sum(mask)  # the scored tokens are a prefix of the answer (truncation keeps >= 1)
            start = len(ids)
            ids += ans[:k - 1]
            pos += range(P, P + k - 1)
            seg += [s] * (k - 1)
            rows += [b] * k
            cols += [P - 1, *range(start, start + k - 1)]
            targets += ans[:k]
            owner += [b + (s - 1) * B] * k
            lengths.append(k)
        ids_l.append(ids)
        pos_l.append(pos)
        seg_l.append(seg)
    T = max(map(len, ids_l))
    x = torch.full((B, T), pad_id, dtype=torch.long)  # (B, T)
    p = torch.zeros(B, T, dtype=torch.long)  # (B, T)
    sg = torch.full((B, T), -1, dtype=torch.long)  # (B, T)
    for i, (ids, pos, seg) in enumerate(zip(ids_l, pos_l, seg_l)):
        n = len(ids)
        x[i, :n], p[i, :n], sg[i, :n] = torch.tensor(ids), torch.tensor(pos), torch.tensor(seg)
    n_ans = torch.tensor(lengths).view(B, 2)  # (B, 2)
    out = {"ids": x, "positions": p, "segments": sg, "rows": torch.tensor(rows), "cols": torch.tensor(cols),
           "targets": torch.tensor(targets), "owner": torch.tensor(owner),
           "chosen_lengths": n_ans[:, 0], "rejected_lengths": n_ans[:, 1]}
    return {k: v.to(device) for k, v in out.items()}


class PairBatches:
    """`batch_size` pairs per call (the global batch; this rank keeps idx[rank::world]) from a seeded
    permutation per epoch; state (epoch, pos) for exact resume. `next(device)` -> collate(...) (chosen and
    rejected rows; `packed=True`: pack_pairs(...), one row per pair, the prompt shared) plus "index" (B,)
    (the pairs' positions in `encoded`) and, when `ref_logps` (N, 2) is given (precomputed reference
    log-probs, TRL's precompute_ref_log_probs), "ref_chosen_logps" / "ref_rejected_logps" (B,)."""

    def __init__(self, encoded: Sequence[EncodedPair], batch_size: int, seed: int = 0, pad_id: int = 0, *,
                 max_length: int | None = None, max_prompt_length: int | None = None,
                 ref_logps: torch.Tensor | None = None, packed: bool = False):
        if not encoded:
            raise LlmkitError("no preference pairs to train on")
        cut = [truncate_pair(e, max_length, max_prompt_length) for e in encoded]
        self.pairs = [e for e, _ in cut]
        self.truncated = sum(t for _, t in cut)
        self.batch_size, self.seed, self.pad_id = batch_size, seed, pad_id
        self.ref_logps, self.packed = ref_logps, packed
        self.epoch, self.pos = 0, 0

    def __len__(self) -> int:
        return len(self.pairs)

    def _perm(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.pairs))

    def next(self, device: torch.device | str) -> dict[str, torch.Tensor]:
        from llmkit.train.trainer import distributed

        idx: list[int] = []
        while len(idx) < self.batch_size:
            perm = self._perm()
            take = perm[self.pos:self.pos + self.batch_size - len(idx)]
            idx += take.tolist()
            self.pos += len(take)
            if self.pos >= len(perm):
                self.epoch, self.pos = self.epoch + 1, 0
        rank, world = distributed()
        idx = idx[rank::world]
        batch = (pack_pairs if self.packed else collate)([self.pairs[i] for i in idx], self.pad_id, device)
        batch["index"] = torch.tensor(idx, dtype=torch.long, device=device)  # (B,)
        if self.ref_logps is not None:
            ref = self.ref_logps[idx].to(device)  # (B, 2)
            batch["ref_chosen_logps"], batch["ref_rejected_logps"] = ref[:, 0], ref[:, 1]
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, st: dict[str, int]) -> None:
        self.epoch, self.pos = int(st["epoch"]), int(st["pos"])


# ------------------------------------------------------------------------------------------------- loss
LOSS_TYPES = ("sigmoid", "ipo")
REFS = ("auto", "adapters", "copy")


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float = 0.1,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0, *,
             chosen_lengths: torch.Tensor | None = None, rejected_lengths: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses (B,), chosen rewards (B,) and rejected rewards (B,) from summed answer log-probs.

    As TRL 1.16 `trl/trainer/dpo_trainer.py`, `DPOTrainer._compute_loss` (f_divergence_type "reverse_kl"):
      chosen_logratios = policy_chosen - ref_chosen;  rejected_logratios = policy_rejected - ref_rejected
      d = chosen_logratios - rejected_logratios
      sigmoid: -logsigmoid(beta d)                                              (DPO, Rafailov et al. eq. 7)
      ipo:     (chosen_logratios / n_chosen - rejected_logratios / n_rejected - 1 / (2 beta))^2
               (IPO eq. 17 with TRL's length normalisation: each log-ratio divided by its answer's token
               count, `chosen_lengths` / `rejected_lengths`, which IPO therefore requires)
      rewards: beta * chosen_logratios, beta * rejected_logratios (detached; from the sums, for IPO too)
    `label_smoothing` eps > 0 with sigmoid is conservative DPO (cDPO, Mitchell 2023; TRL < 1.0's "sigmoid"
    loss, kept in TRL 1.16's "aot" branches): -(1 - eps) logsigmoid(beta d) - eps logsigmoid(-beta d).
    TRL 1.16's "sigmoid" ignores label_smoothing; eps = 0 gives it exactly."""
    if loss_type not in LOSS_TYPES:
        raise LlmkitError(f"--loss {loss_type!r}: choose one of {', '.join(LOSS_TYPES)}")
    if not 0.0 <= label_smoothing < 0.5:
        raise LlmkitError(f"--label-smoothing {label_smoothing}: must lie in [0, 0.5)")
    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # (B,)
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # (B,)
    if loss_type == "sigmoid":
        d = beta * (chosen_logratios - rejected_logratios)  # (B,)
        losses = -F.logsigmoid(d)
        if label_smoothing:
            losses = (1 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-d)
    else:
        if chosen_lengths is None or rejected_lengths is None:
            raise LlmkitError("dpo_loss: the IPO loss needs chosen_lengths and rejected_lengths")
        delta = (chosen_logratios / chosen_lengths.clamp(min=1.0)
                 - rejected_logratios / rejected_lengths.clamp(min=1.0))  # (B,)
        losses = (delta - 1 / (2 * beta)) ** 2
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def pair_logprobs(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed answer log-probs (chosen (B,), rejected (B,)) in ONE differentiable forward, float32.
    `collate` batches: the (2B, T) concatenation of chosen and rejected rows (TRL's `concatenated_forward`)
    through `llmkit.score.sequence_logprobs`. `pack_pairs` batches: one (B, T) row per pair, the prompt run
    once (about 1/3 fewer tokens); the head runs only on the scored positions either way."""
    from llmkit.score import sequence_logprobs, token_logprobs

    if "segments" in batch:
        B = batch["ids"].shape[0]
        h = model(batch["ids"], positions=batch["positions"], segments=batch["segments"],
                  return_hidden=True)  # (B, T, d)
        logits = unwrap(model).head(h[batch["rows"], batch["cols"]])  # (N, V)
        lp = token_logprobs(logits, batch["targets"])  # (N,) float32
        sums = torch.zeros(2 * B, dtype=lp.dtype, device=lp.device).index_add(0, batch["owner"], lp)  # (2B,)
        return sums[:B], sums[B:]
    ids = torch.cat([batch["chosen_ids"], batch["rejected_ids"]])  # (2B, T)
    mask = torch.cat([batch["chosen_mask"], batch["rejected_mask"]])  # (2B, T)
    lp = sequence_logprobs(model, ids, mask)  # (2B,) float32
    B = batch["chosen_ids"].shape[0]
    return lp[:B], lp[B:]


def answer_lengths(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Scored tokens of each chosen and rejected answer (B,), (B,) (IPO's length normalisation)."""
    if "chosen_lengths" in batch:
        return batch["chosen_lengths"], batch["rejected_lengths"]
    return batch["chosen_mask"].sum(1), batch["rejected_mask"].sum(1)


def has_adapters(model: nn.Module) -> bool:
    from llmkit.lora import lora_modules

    return bool(lora_modules(unwrap(model)))


@torch.no_grad()
def reference_logprobs(model: nn.Module, batch: dict[str, torch.Tensor], ref_model: nn.Module | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's (chosen (B,), rejected (B,)) log-probs: `ref_model` if given, else the policy with
    its LoRA adapters switched off (PEFT's disable_adapter, no copy); a policy without adapters is its own
    reference (every reward 0)."""
    from llmkit.lora import adapters_disabled

    if ref_model is not None:
        return pair_logprobs(ref_model, batch)
    raw = unwrap(model)  # the bare module: no DDP hooks for a no-grad forward
    with adapters_disabled(raw):
        return pair_logprobs(raw, batch)


class DPOLoss:
    """`loss_fn(model, batch, ref_model=None) -> LossSum(sum of pair losses, pairs)` for the Trainer.

    The reference log-probs come from the batch ("ref_chosen_logps": precomputed), else `ref_model` (a
    frozen copy the Trainer passes), else the policy with its adapters disabled. Reward statistics of the
    training batches accumulate in `stats` until `pop_stats()` (the evaluate hook logs them)."""

    def __init__(self, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0):
        dpo_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1), beta, loss_type,
                 label_smoothing, chosen_lengths=torch.ones(1), rejected_lengths=torch.ones(1))  # validate
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.stats = torch.zeros(5, dtype=torch.float64)  # pairs, accuracy sum, margin, chosen, rejected

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor], ref_model: nn.Module | None = None
                 ) -> LossSum:
        chosen, rejected = pair_logprobs(model, batch)  # (B,), (B,)
        if "ref_chosen_logps" in batch:
            ref_chosen, ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        else:
            ref_chosen, ref_rejected = reference_logprobs(model, batch, ref_model)
        n_chosen, n_rejected = answer_lengths(batch)
        losses, rc, rr = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, self.beta, self.loss_type,
                                  self.label_smoothing, chosen_lengths=n_chosen, rejected_lengths=n_rejected)
        self.stats += torch.stack([torch.tensor(float(len(rc))), _wins(rc, rr).sum().cpu(),
                                   (rc - rr).sum().cpu(), rc.sum().cpu(), rr.sum().cpu()]).double()
        return LossSum(losses.sum(), torch.tensor(len(losses)))

    def pop_stats(self) -> dict[str, float]:
        """Mean reward accuracy / margin / rewards of the training batches since the last call (summed over
        the processes of a torchrun group: every rank must call it, as the Trainer's evaluate hook does)."""
        st = self.stats.clone()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            st = st.to("cuda" if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(st)
        n, acc, margin, c, r = st.tolist()
        self.stats.zero_()
        if not n:
            return {}
        return {"train_reward_acc": acc / n, "train_margin": margin / n, "train_chosen_reward": c / n,
                "train_rejected_reward": r / n}


def _wins(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """1 where chosen wins, 1/2 on a tie, 0 where it loses (B,)."""
    return (chosen_rewards > rejected_rewards).float() + 0.5 * (chosen_rewards == rejected_rewards).float()


# ------------------------------------------------------------------------------------------------- eval
def answer_requests(encoded: Sequence[EncodedPair]) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) per answer, chosen then rejected of each pair: the prompt and the answer's
    scored tokens (the mask is a prefix of each answer: the tokens through its end-of-turn)."""
    out = []
    for e in encoded:
        out += [(e.prompt, e.chosen[:sum(e.chosen_mask)]), (e.prompt, e.rejected[:sum(e.rejected_mask)])]
    return out


@torch.no_grad()
def pair_scores(model: nn.Module, encoded: Sequence[EncodedPair], *, batch_size: int = 8,
                reference: bool = False, ref_model: nn.Module | None = None) -> torch.Tensor:
    """(N, 2) summed log-probs of (chosen, rejected) for every pair, in eval mode, through the one scorer
    (`llmkit.score.score`: the shared prompt runs once per pair, both answers after it in the same row).
    `reference`: the reference's (`ref_model`, else the model with its adapters disabled)."""
    from llmkit.lora import adapters_disabled
    from llmkit.score import score

    net = ref_model if reference and ref_model is not None else unwrap(model)
    ctx = adapters_disabled(net) if reference and ref_model is None else contextlib.nullcontext()
    was = net.training
    net.eval()
    try:
        with ctx:
            res = score(net, answer_requests(encoded), batch_size=2 * batch_size)
    finally:
        net.train(was)
    return torch.tensor([r.logprob for r in res], dtype=torch.float32).view(-1, 2)


def pair_scores_all_ranks(model: nn.Module, encoded: Sequence[EncodedPair], **kw: Any) -> torch.Tensor:
    """`pair_scores` with the pairs split over the processes of a torchrun group (rank r scores pairs r,
    r + W, ...) and the (N, 2) result all-reduced; one process: `pair_scores`. The model must not
    communicate in its forward (a plain module, or FSDP inside `gathered`)."""
    from llmkit.train.trainer import distributed

    rank, world = distributed()
    if world == 1:
        return pair_scores(model, encoded, **kw)
    idx = list(range(rank, len(encoded), world))
    out = torch.zeros(len(encoded), 2, dtype=torch.float64, device=next(model.parameters()).device)  # (N, 2)
    if idx:
        out[idx] = pair_scores(model, [encoded[i] for i in idx], **kw).double().to(out.device)
    dist.all_reduce(out)  # every other entry is 0: the sum is exact
    return out.float().cpu()


def preference_metrics(policy: torch.Tensor, ref: torch.Tensor, lengths: torch.Tensor, beta: float = 0.1,
                       loss_type: str = "sigmoid", label_smoothing: float = 0.0) -> dict[str, float]:
    """Implicit-reward metrics from (N, 2) policy and reference log-probs and (N, 2) answer lengths."""
    from llmkit.eval.base import mean_stderr

    losses, rc, rr = dpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], beta, loss_type,
                              label_smoothing, chosen_lengths=lengths[:, 0], rejected_lengths=lengths[:, 1])
    acc, se = mean_stderr(_wins(rc, rr).tolist())
    half = 1.96 * (se or 0.0)
    return {"reward_acc": acc, "reward_acc_lo": max(0.0, acc - half), "reward_acc_hi": min(1.0, acc + half),
            "margin": float((rc - rr).mean()), "chosen_reward": float(rc.mean()),
            "rejected_reward": float(rr.mean()), "dpo_loss": float(losses.mean()), "pairs": len(losses)}


def _lengths(encoded: Sequence[EncodedPair]) -> torch.Tensor:
    return torch.tensor([[sum(e.chosen_mask), sum(e.rejected_mask)] for e in encoded], dtype=torch.float32)


def preference_accuracy(model: Any, tok: Any, pairs: Sequence[Pair] | Sequence[EncodedPair],
                        ref_model: nn.Module | None = None, beta: float = 0.1, batch_size: int = 8, *,
                        loss_type: str = "sigmoid", max_length: int | None = None,
                        template: str | None = None) -> dict[str, float]:
    """Held-out preference accuracy of the implicit DPO reward beta * log(pi / pi_ref): the share of pairs
    whose chosen answer gets the higher reward (ties count 1/2; TRL's rewards/accuracies counts them 0), its
    95 % interval (mean +- 1.96 standard errors, llmkit.eval's rule), mean margin, mean chosen / rejected
    rewards and the mean DPO loss. `model`: a module or an LLM. The reference: `ref_model`, else the model
    with its LoRA adapters disabled, else the model itself (then every reward is 0 and the accuracy 50 %)."""
    net = model.model if hasattr(model, "tokenizer") else model
    enc = [p if isinstance(p, EncodedPair) else encode_pair(tok, p, template) for p in pairs]
    enc = [truncate_pair(e, max_length)[0] for e in enc]
    policy = pair_scores(net, enc, batch_size=batch_size)
    ref = pair_scores(net, enc, batch_size=batch_size, reference=True, ref_model=ref_model)
    return preference_metrics(policy, ref, _lengths(enc), beta, loss_type)


# ------------------------------------------------------------------------------------------------ stage
def _as_pairs(data: Any) -> list[Pair]:
    if isinstance(data, Sequence) and not isinstance(data, str) and data and isinstance(data[0], Pair):
        return list(data)
    return load_pairs(data)


def dpo(
    model: Any,
    data: str | os.PathLike | Sequence[str | os.PathLike] | Sequence[Pair],
    out: str | os.PathLike,
    cfg: Any = None,
    *,
    adapter: str | os.PathLike | None = None,
    val: str | os.PathLike | Sequence[str | os.PathLike] | Sequence[Pair] | None = None,
    val_fraction: float = 0.1,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    ref: str = "auto",
    precompute_ref: bool = False,
    lora_r: int | None = None,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    lora_targets: Sequence[str] = TARGETS,
    qlora: str | None = None,
    max_length: int = 512,
    max_prompt_length: int | None = None,
    eval_pairs: int | None = 128,
    resume: bool = False,
    export: bool = True,
    stop_after: int | None = None,
    **train: Any,
) -> Path:
    """Align `model` (a name/path for llmkit.load, or an LLM, trained in place) on preference pairs `data`
    (files or Pairs) with DPO. `adapter`: a LoRA adapter (the SFT stage's, PEFT format) merged into the
    model first; that merged model is the starting point and the reference. Held-out pairs: `val`, else
    `val_fraction` of `data` split by prompt.
    `ref`: "adapters" (LoRA policy, reference = adapters disabled; the default with LoRA), "copy" (a frozen
    deepcopy of the starting model; the default for full fine-tuning). `precompute_ref`: reference log-probs
    of every training pair computed once before training (TRL's precompute_ref_log_probs; no reference
    forward per step, and with "copy" the copy is freed). `cfg` or TrainConfig keywords (steps, batch_size =
    pairs per step, lr, eval_every, time_budget, seed, ...) set the run. Returns the run folder."""
    import copy

    import llmkit
    from llmkit.device import resolve_device
    from llmkit.io import atomic_write_json
    from llmkit.lora import apply_lora, load_adapter, merge_lora, save_adapter
    from llmkit.train.trainer import TrainConfig, Trainer, init_distributed, seed_everything

    lora = bool(lora_r or qlora)
    cfg = cfg or TrainConfig(**{"warmup": 10, "lr": 1e-4 if lora else 5e-6, "weight_decay": 0.0,
                                "block_size": max_length, **train})
    rank, _ = init_distributed(cfg)  # under torchrun: join the group (and pick this rank's GPU) first
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if qlora not in (None, "int4", "int8"):
        raise LlmkitError(f"--qlora {qlora!r}: choose int4 or int8")
    if qlora and lora_r is None:
        lora_r = 8
    if ref not in REFS:
        raise LlmkitError(f"--ref {ref!r}: choose one of {', '.join(REFS)}")
    ref = ("adapters" if lora else "copy") if ref == "auto" else ref
    if ref == "adapters" and not lora:
        raise LlmkitError("--ref adapters needs a LoRA policy (--lora-r or --qlora); use --ref copy for full "
                          "fine-tuning")
    loss_fn = DPOLoss(beta, loss_type, label_smoothing)
    out = Path(out)
    llm = model if hasattr(model, "tokenizer") else llmkit.load(model, device=cfg.device, dtype="float32")
    tok = llm.tokenizer
    pairs = _as_pairs(data)
    if val is not None:
        train_pairs, val_pairs = pairs, _as_pairs(val)
    else:
        train_pairs, val_pairs = split_pairs(pairs, val_fraction, seed=cfg.seed)
    pad_id = tok.eos_id if tok.eos_id is not None else 0
    train_enc = encode_pairs(tok, train_pairs)
    val_cut = [truncate_pair(e, max_length, max_prompt_length) for e in encode_pairs(tok, val_pairs)]
    val_enc = [e for e, _ in val_cut]

    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    net = llm.model.to(device)
    if adapter is not None:
        load_adapter(net, adapter)
    if has_adapters(net):  # an SFT adapter is the starting point and the reference: fold it in
        merge_lora(net)
    if qlora:
        from llmkit.quant import quantize_model

        net = quantize_model(net, qlora) or net
    ref_model = copy.deepcopy(net).eval().requires_grad_(False) if ref == "copy" else None
    if lora_r:
        apply_lora(net, r=lora_r, alpha=lora_alpha, dropout=lora_dropout, targets=lora_targets)
    llm.model = net
    eval_bs = max(1, cfg.batch_size)

    batches = PairBatches(train_enc, cfg.batch_size, seed=cfg.seed, pad_id=pad_id, max_length=max_length,
                          max_prompt_length=max_prompt_length, packed=True)
    n_train = sum(p.numel() for p in net.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in net.parameters())
    info = {
        "stage": "dpo",
        "mode": "qlora-" + qlora if qlora else "lora" if lora_r else "full",
        "model": str(getattr(llm, "name", model)),
        "adapter": None if adapter is None else str(adapter),
        "dpo": {"beta": beta, "loss_type": loss_type, "label_smoothing": label_smoothing, "reference": ref,
                "precompute_ref": precompute_ref, "max_length": max_length,
                "max_prompt_length": max_prompt_length if max_prompt_length is not None else max_length // 2},
        "lora": {"r": lora_r, "alpha": lora_alpha, "dropout": lora_dropout, "targets": list(lora_targets)}
        if lora_r else None,
        "train_config": {**cfg.__dict__},
        "pairs": {"train": len(train_pairs), "val": len(val_pairs)},
        "truncated": {"train": batches.truncated, "val": sum(t for _, t in val_cut)},
        "parameters": {"trainable": n_train, "total": n_all},
    }
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "run.json", info, default=str)
    say = print if cfg.progress and rank == 0 else (lambda *a, **k: None)
    say(f"dpo ({info['mode']}, reference: {ref}, beta {beta}, {loss_type}): {n_train:,} of {n_all:,} "
        f"parameters train; {len(train_pairs)} train / {len(val_pairs)} val pairs; {batches.truncated} train "
        f"pairs truncated to {max_length} tokens")
    # the reference never changes: its log-probs once, before any update
    if precompute_ref:
        say(f"scoring {len(batches)} training pairs with the reference ...", flush=True)
        batches.ref_logps = pair_scores_all_ranks(net, batches.pairs, batch_size=eval_bs, reference=True,
                                                  ref_model=ref_model)
    if val_enc:
        say(f"scoring {len(val_enc)} held-out pairs with the reference ...", flush=True)
    val_ref = pair_scores_all_ranks(net, val_enc, batch_size=eval_bs, reference=True, ref_model=ref_model)
    val_len = _lengths(val_enc)

    def evaluate(m: nn.Module, final: bool) -> dict[str, Any]:
        res: dict[str, Any] = loss_fn.pop_stats()
        sub = val_enc if final or not eval_pairs else val_enc[:eval_pairs]
        if sub:
            policy = pair_scores_all_ranks(m, sub, batch_size=eval_bs)  # m: whole weights (gathered)
            met = preference_metrics(policy, val_ref[:len(sub)], val_len[:len(sub)], beta, loss_type,
                                     label_smoothing)
            res.update({"val_loss": met.pop("dpo_loss"), **{f"val_{k}": v for k, v in met.items()}})
        return res

    trainer = Trainer(net, loss_fn, batches, cfg, out, evaluate=evaluate, model_config=llm.config,
                      ref_model=None if precompute_ref else ref_model)
    del ref_model  # with precompute_ref nothing holds the copy any more
    if resume:
        trainer.resume()
    trainer.fit(stop_after=stop_after)
    if export and trainer.finished:
        with trainer.gathered():  # FSDP: whole weights (every rank enters), rank 0 writes
            if rank == 0 and lora_r:
                save_adapter(net, out / "adapter", base_model=str(getattr(llm, "name", None) or model))
            elif rank == 0:
                llm.save_hf(out / "hf")
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # the run folder is complete when any rank returns
    return out

"""Rollouts for RL: sample groups of completions through the engine, and score token ids under the policy
and the reference.

    prompts = render_prompts(tok, [[{"role": "user", "content": "2 + 3?"}]])    # chat-template ids
    ro = sample_groups(model, tok, prompts, group_size=8, temperature=1.0, max_tokens=64, seed=step_seed)
    ro.ids, ro.mask            # (B*G, T) prompt + completion right-padded; 1 on completion tokens
    ro.texts, ro.finish        # decoded completions ("stop" / "length")
    lp = completion_logprobs(model, ro.ids, ro.mask, temperature=1.0)           # (B*G, T), differentiable
    ref = reference_logprobs(model, None, ro.ids, ro.mask)                     # LoRA off (or a frozen copy)

Notable choices
- Prompts are rendered by `llmkit.tokenizer.chat.render_chat(add_generation_prompt=True)`, the one chat
  function. Row b*G + g holds sample g of prompt b. The rows hold prompt + completion right-padded (pad id
  0 under mask 0), so a plain causal forward scores them: right padding never changes what a real token
  sees, and no attention mask or position shift is needed (TRL left-pads the prompt and passes an attention
  mask instead; the per-token log-probs are the same).
- The completion includes its stop token (the end-of-turn id that ended it), as TRL's completion mask
  covers the EOS; a completion cut by max_tokens has none (finish "length").
- Sampling goes through `llmkit.generate.api.run` on a FRESH `Engine` per rollout, sized to the rollout
  (rows = prompts x group, context = longest prompt + max_tokens): a cache of the previous step's weights
  can never be reused, whatever the weight-version check sees, and the cache costs only what the step
  needs. The G samples of a prompt share its prefill (the engine copies the prompt's keys/values).
- Seeds: `SamplingParams(seed=seed, n=G)` gives sample g of every prompt the stream seed + g, so a rollout
  depends only on (weights, prompts, seed): a resumed run samples exactly what the uninterrupted one did.
  The GRPO stage derives one seed per step from the run seed.
- Log-probs are float32 `llmkit.score.token_logprobs` of logits / temperature, as TRL 1.16 scores
  completions (`add_fused_lm_head(model, temperature=args.temperature)`, trl/trainer/utils.py): the
  sampling distribution before top-p. The head runs only on completion positions. Given the prompt
  lengths, the G completions of a prompt run as one packed row (the prompt once, each completion seeing
  the prompt and itself: the model's `segments`, as llmkit.score packs contexts), so a step's forwards
  cost prompt + G completions instead of G x (prompt + completion) tokens; the values are the same.
  `sampling_logps` (with record_logprobs) are the engine's own log-probs of each sampled token (raw
  logits, no temperature).
- Sampling runs in eval mode with autocast off and the model's train/eval mode restored afterwards; the
  engine never changes the model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llmkit.errors import LlmkitError
from llmkit.score import token_logprobs
from llmkit.train.losses import unwrap

Messages = list[dict[str, str]]


@dataclass
class Rollouts:
    """B prompts x G samples, row b*G + g = sample g of prompt b."""

    ids: torch.Tensor  # (N, T) long: prompt + completion, right-padded with 0
    mask: torch.Tensor  # (N, T) float32: 1 on completion tokens (their own positions), 0 elsewhere
    prompt_lens: list[int]  # per row
    texts: list[str]  # decoded completions (stop tokens not shown)
    finish: list[str]  # "stop" (a stop id ended it) | "length" (max_tokens or the context)
    group_size: int
    sampling_logps: torch.Tensor | None = None  # (N, T) float32 engine log-probs of sampled tokens, or None

    @property
    def completion_lens(self) -> list[int]:
        return [int(n) for n in self.mask.sum(1).tolist()]

    def rows(self, idx: Sequence[int] | torch.Tensor) -> Rollouts:
        """The rollouts of rows `idx` (their common padding trimmed)."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        lens = self.completion_lens
        T = max((self.prompt_lens[i] + lens[i] for i in idx.tolist()), default=1)
        sl = None if self.sampling_logps is None else self.sampling_logps[idx, :T]
        return Rollouts(self.ids[idx, :T], self.mask[idx, :T], [self.prompt_lens[i] for i in idx.tolist()],
                        [self.texts[i] for i in idx.tolist()], [self.finish[i] for i in idx.tolist()],
                        self.group_size, sl)


def render_prompts(tokenizer: Any, prompts: Sequence[Messages], template: str | None = None
                   ) -> list[list[int]]:
    """Token ids of each conversation followed by the assistant header (add_generation_prompt=True)."""
    from llmkit.tokenizer.chat import render_chat

    return [render_chat(tokenizer, list(p), add_generation_prompt=True, template=template).ids
            for p in prompts]


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Eval mode, no autocast, no grad inside; the previous mode afterwards."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            yield model
    finally:
        model.train(was)


def sample_groups(model: nn.Module, tokenizer: Any, prompt_ids: Sequence[Sequence[int]], group_size: int, *,
                  temperature: float = 1.0, top_p: float = 1.0, max_tokens: int = 128, seed: int = 0,
                  max_batch: int = 64, record_logprobs: bool = False) -> Rollouts:
    """Sample `group_size` completions of each prompt (temperature 0: greedy) through a fresh Engine."""
    from llmkit.generate.api import run
    from llmkit.generate.engine import Engine
    from llmkit.generate.sampling import SamplingParams

    model = unwrap(model)
    if not prompt_ids:
        raise LlmkitError("sample_groups: no prompts")
    if group_size < 1 or max_tokens < 1:
        raise LlmkitError(f"group size ({group_size}) and max_tokens ({max_tokens}) must be >= 1")
    longest = max(map(len, prompt_ids))
    limit = model.config.max_seq_len
    if longest + max_tokens > limit:
        raise LlmkitError(f"a prompt of {longest} tokens + max_tokens {max_tokens} exceeds the model's "
                          f"context ({limit}); lower max_tokens or drop long prompts")
    params = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed,
                            n=group_size, logprobs=0 if record_logprobs else None)
    rows = len(prompt_ids) * group_size
    results: list[list[Any]] = [[] for _ in prompt_ids]
    with eval_mode(model):
        engine = Engine(model, max_batch=min(rows, max_batch), max_seq_len=longest + max_tokens,
                        stop_ids=sorted(tokenizer.stop_ids), vocab_size=tokenizer.vocab_size)
        for i, _, res in run(engine, tokenizer, [list(p) for p in prompt_ids], params):
            if res is not None:
                results[i].append(res)
    # run() yields a prompt's samples in the order they finish (deterministic for given weights and seed)
    flat = [r for group in results for r in group]
    T = max(len(p) + len(r.token_ids) for p, group in zip(prompt_ids, results) for r in group)
    ids = torch.zeros(rows, T, dtype=torch.long)
    mask = torch.zeros(rows, T)
    slp = torch.zeros(rows, T) if record_logprobs else None
    plens = []
    for n, (p, r) in enumerate(zip((p for p in prompt_ids for _ in range(group_size)), flat)):
        k, c = len(p), len(r.token_ids)
        ids[n, :k] = torch.tensor(list(p))
        ids[n, k:k + c] = torch.tensor(r.token_ids)
        mask[n, k:k + c] = 1.0
        if slp is not None:
            slp[n, k:k + c] = torch.tensor([lp.logprob for lp in r.logprobs])
        plens.append(k)
    return Rollouts(ids, mask, plens, [r.text for r in flat], [r.finish_reason for r in flat], group_size,
                    slp)


def completion_logprobs(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0,
                        prompt_lens: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
    """log p(ids[:, t] | ids[:, :t]) under logits / temperature at the positions where mask is set, 0
    elsewhere: (N, T) long, (N, T) -> (N, T) float32, differentiable. mask[:, 0] must be 0 (a prompt).

    With `prompt_lens` (N,) the rows are the completions of prompts (mask set on ids[n, len_n:len_n + c_n])
    and consecutive rows with the same prompt run as ONE packed row (`packed_logprobs`): the same values,
    for about half the tokens when G completions share a prompt as long as they are."""
    if prompt_lens is not None:
        return packed_logprobs(model, ids, mask, prompt_lens, temperature)
    scored = mask[:, 1:].bool()  # (N, T-1): position t predicts ids[:, t + 1]
    h = model(ids[:, :-1], return_hidden=True)  # (N, T-1, d)
    logits = unwrap(model).head(h[scored])  # (M, V)
    if temperature != 1.0:
        logits = logits / temperature
    lp = token_logprobs(logits, ids[:, 1:][scored])  # (M,)
    out = torch.zeros(scored.shape, dtype=lp.dtype, device=lp.device).masked_scatter(scored, lp)  # (N, T-1)
    return F.pad(out, (1, 0))  # (N, T)


def packed_logprobs(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor,
                    prompt_lens: torch.Tensor | Sequence[int], temperature: float = 1.0) -> torch.Tensor:
    """completion_logprobs with shared-prefix packing (the model's `segments`, as llmkit.score does): for
    each run of consecutive rows holding the same prompt, one packed row = the prompt (segment 0, positions
    0..L-1), then each completion but its last token (segment j, positions L, L+1, ...), which sees the
    prompt and itself only. The prompt's last position predicts every completion's first token."""
    N, T = ids.shape
    plens = [int(x) for x in (prompt_lens.tolist() if isinstance(prompt_lens, torch.Tensor) else prompt_lens)]
    clens = [int(x) for x in mask.sum(1).tolist()]
    rows = ids.tolist()
    packs: list[list[int]] = []  # rows of each packed row
    for n in range(N):
        if packs and plens[n] == plens[packs[-1][0]] and rows[n][:plens[n]] == rows[packs[-1][0]][:plens[n]]:
            packs[-1].append(n)
        else:
            packs.append([n])
    seqs, poss, segs = [], [], []
    at_row, at_col, to_row, to_col = [], [], [], []  # scored: packed (row, column) -> (row, position) in ids
    for r, pack in enumerate(packs):
        L = plens[pack[0]]
        seq, pos, seg = rows[pack[0]][:L], list(range(L)), [0] * L
        for j, n in enumerate(pack, 1):
            c, start = clens[n], len(seq)
            if c == 0:  # nothing to score (a masked-out completion)
                continue
            seq += rows[n][L:L + c - 1]
            pos += range(L, L + c - 1)
            seg += [j] * max(0, c - 1)
            at_row += [r] * c
            at_col += [L - 1] + list(range(start, start + c - 1))
            to_row += [n] * c
            to_col += range(L, L + c)
        seqs.append(seq)
        poss.append(pos)
        segs.append(seg)
    S = max(map(len, seqs))
    dev = ids.device
    x = torch.tensor([q + [0] * (S - len(q)) for q in seqs], device=dev)  # (R, S)
    p = torch.tensor([q + [0] * (S - len(q)) for q in poss], device=dev)  # (R, S)
    g = torch.tensor([q + [-1] * (S - len(q)) for q in segs], device=dev)  # (R, S): -1 = padding
    h = model(x, positions=p, segments=g, return_hidden=True)  # (R, S, d)
    at = (torch.tensor(at_row, device=dev), torch.tensor(at_col, device=dev))
    logits = unwrap(model).head(h[at])  # (M, V)
    if temperature != 1.0:
        logits = logits / temperature
    tr = torch.tensor(to_row, device=dev, dtype=torch.long)  # (M,)
    tc = torch.tensor(to_col, device=dev, dtype=torch.long)  # (M,)
    lp = token_logprobs(logits, ids[tr, tc])  # (M,)
    return torch.zeros(N, T, dtype=lp.dtype, device=dev).index_put((tr, tc), lp)  # (N, T)


@torch.no_grad()
def reference_logprobs(model: nn.Module, ref: nn.Module | None, ids: torch.Tensor, mask: torch.Tensor,
                       temperature: float = 1.0, prompt_lens: Sequence[int] | None = None, chunk: int = 16
                       ) -> torch.Tensor:
    """completion_logprobs under the reference, without grad: `ref` (a frozen copy) or, when ref is None,
    `model` with its LoRA adapters disabled (llmkit.lora.adapters_disabled: PEFT's disable_adapter)."""
    from llmkit.lora import adapters_disabled, lora_modules

    base = unwrap(model)
    if ref is None and not lora_modules(base):
        raise LlmkitError("a KL reference needs a LoRA policy (adapters off) or a frozen copy of the model")
    ctx = contextlib.nullcontext(ref) if ref is not None else adapters_disabled(base)
    with ctx as net:
        return policy_logprobs(net, ids, mask, temperature, prompt_lens, chunk)


@torch.no_grad()
def policy_logprobs(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0,
                    prompt_lens: Sequence[int] | None = None, chunk: int = 16) -> torch.Tensor:
    """completion_logprobs without grad, `chunk` rows per forward (bounded memory)."""
    model = unwrap(model)
    parts = [completion_logprobs(model, ids[i:i + chunk], mask[i:i + chunk], temperature,
                                 None if prompt_lens is None else list(prompt_lens)[i:i + chunk])
             for i in range(0, len(ids), chunk)]
    return torch.cat(parts)

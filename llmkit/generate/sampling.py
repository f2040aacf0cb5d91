"""Sampling: `SamplingParams` and the logits -> next-token pipeline of one sequence.

    raw logits -> penalties -> temperature -> top-k -> top-p -> min-p -> softmax -> draw

Notable choices:
- `temperature == 0` means greedy: argmax of the penalised logits, no random draw.
- Penalties follow their references: the repetition penalty is CTRL's / HF's (a logit of a token seen in the
  prompt or the output is divided by the penalty when positive, multiplied when negative); presence and
  frequency penalties are OpenAI's (logit -= presence * [count > 0] + frequency * count, over generated
  tokens only).
- top-p keeps the smallest set of most likely tokens whose probability reaches p (at least one token);
  min-p keeps tokens whose probability is at least min_p times the most likely one's.
- Logprobs report the model's own distribution (log-softmax of the raw logits, before penalties,
  temperature and truncation), like OpenAI and vLLM: they do not change with the sampling knobs and serve
  evaluation as they are.
- Each sequence owns a `torch.Generator` seeded from `seed` (+ the sample index when n > 1): a seeded
  request draws the same tokens whatever else shares its batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields, replace

import torch

from llmkit.errors import LlmkitError

MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    max_tokens: int = 256  # new tokens at most
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)  # stop strings: generation ends before them, never emitted
    stop_ids: list[int] = field(default_factory=list)  # extra stop token ids (the tokenizer's are added)
    ignore_eos: bool = False  # do not stop at the tokenizer's stop ids
    seed: int | None = None
    n: int = 1  # samples per prompt
    logprobs: int | None = None  # None = off; k >= 0: logprob of each token + its top-k alternatives
    echo: bool = False  # also return the prompt tokens' logprobs (evaluation)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_ids = list(self.stop_ids or [])

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def replace(self, **kw) -> SamplingParams:
        return replace(self, **kw)

    @classmethod
    def from_kwargs(cls, **kw) -> SamplingParams:
        """SamplingParams from keyword arguments, naming the unknown ones in the error."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kw) - names)
        if unknown:
            raise LlmkitError(f"unknown sampling parameter(s) {', '.join(unknown)}; "
                              f"known: {', '.join(sorted(names))}")
        return cls(**{k: v for k, v in kw.items() if v is not None or k in ("seed", "logprobs")}).validate()

    def validate(self) -> SamplingParams:
        """Raise LlmkitError naming the first invalid field; return self."""

        def bad(name: str, why: str) -> LlmkitError:
            return LlmkitError(f"invalid sampling parameter {name}={getattr(self, name)!r}: {why}")

        def number(name: str) -> float:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
                raise bad(name, "must be a number")
            return float(v)

        def integer(name: str) -> int:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise bad(name, "must be an integer")
            return v

        if integer("max_tokens") < 1:
            raise bad("max_tokens", "must be >= 1")
        if number("temperature") < 0:
            raise bad("temperature", "must be >= 0 (0 = greedy)")
        if integer("top_k") < 0:
            raise bad("top_k", "must be >= 0 (0 = off)")
        if not 0 < number("top_p") <= 1:
            raise bad("top_p", "must be in (0, 1] (1 = off)")
        if not 0 <= number("min_p") <= 1:
            raise bad("min_p", "must be in [0, 1] (0 = off)")
        if number("repetition_penalty") <= 0:
            raise bad("repetition_penalty", "must be > 0 (1 = off)")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= number(name) <= 2:
                raise bad(name, "must be in [-2, 2] (0 = off)")
        if integer("n") < 1:
            raise bad("n", "must be >= 1")
        if self.seed is not None:
            integer("seed")
        if self.logprobs is not None and not 0 <= integer("logprobs") <= MAX_LOGPROBS:
            raise bad("logprobs", f"must be in [0, {MAX_LOGPROBS}]")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "stop strings must be non-empty strings")
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in self.stop_ids):
            raise bad("stop_ids", "stop ids must be non-negative integers")
        return self


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float  # under the model's raw distribution
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), most likely first


# ---------------------------------------------------------------------- logits processors (pure functions)
def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL/HF repetition penalty on logits (..., V) for the token ids in `seen` (1-D long)."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    sel = logits[..., seen]
    return logits.index_put((seen,) if logits.dim() == 1 else (..., seen),
                            torch.where(sel > 0, sel / penalty, sel * penalty))


def apply_presence_frequency(logits: torch.Tensor, counts: torch.Tensor, presence: float,
                             frequency: float) -> torch.Tensor:
    """OpenAI penalties: logits - presence * [count > 0] - frequency * count; counts (..., V) float."""
    if presence == 0.0 and frequency == 0.0:
        return logits
    return logits - presence * (counts > 0).to(logits.dtype) - frequency * counts


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits (ties with the k-th are kept), the rest -> -inf."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (..., 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest most-likely set whose probability reaches p (always at least one token)."""
    if p >= 1.0:
        return logits
    srt, idx = logits.sort(dim=-1, descending=True)  # (..., V)
    probs = srt.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely tokens
    drop = before >= p
    drop[..., 0] = False
    return logits.scatter(-1, idx, srt.masked_fill(drop, float("-inf")))


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens whose probability is >= min_p * the top probability."""
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(dim=-1)
    keep = probs >= min_p * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(~keep, float("-inf"))


def process_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p on (already penalised) logits (..., V); not for greedy."""
    logits = logits / params.temperature
    logits = apply_top_k(logits, params.top_k)
    logits = apply_top_p(logits, params.top_p)
    return apply_min_p(logits, params.min_p)


def top_logprobs(logits: torch.Tensor, token: int, k: int) -> TokenLogprob:
    """The chosen token's logprob and the k most likely alternatives under raw logits (V,)."""
    lp = logits.float().log_softmax(dim=-1)
    top: list[tuple[int, float]] = []
    if k:
        vals, ids = lp.topk(k)
        top = list(zip(ids.tolist(), vals.tolist()))
    return TokenLogprob(token, float(lp[token]), top)


# ---------------------------------------------------------------------- one sequence's sampler
class SequenceSampler:
    """Sampling state of one sequence: its generator and the token counts the penalties need."""

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int], vocab_size: int,
                 device: torch.device | str = "cpu", sample_index: int = 0):
        self.params = params
        self.vocab_size = vocab_size
        self.generator: torch.Generator | None = None
        if not params.greedy:
            self.generator = torch.Generator(device=device)
            if params.seed is not None:
                self.generator.manual_seed(params.seed + sample_index)
            else:
                self.generator.seed()
        self.counts: torch.Tensor | None = None  # (V,) generated-token counts
        self.seen: torch.Tensor | None = None  # (V,) bool: in the prompt or generated
        if params.penalised:
            self.counts = torch.zeros(vocab_size, device=device)
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            ids = [i for i in prompt_ids if 0 <= i < vocab_size]
            self.seen[torch.tensor(ids, dtype=torch.long, device=device)] = True

    def observe(self, token: int) -> None:
        if self.counts is not None and 0 <= token < self.vocab_size:
            self.counts[token] += 1
            self.seen[token] = True

    def penalise(self, logits: torch.Tensor) -> torch.Tensor:
        p = self.params
        if not p.penalised:
            return logits
        logits = apply_repetition_penalty(logits, self.seen.nonzero().squeeze(1), p.repetition_penalty)
        return apply_presence_frequency(logits, self.counts, p.presence_penalty, p.frequency_penalty)

    def __call__(self, logits: torch.Tensor) -> tuple[int, TokenLogprob | None]:
        """Pick the next token from raw logits (V,) float32; also its logprob info when asked."""
        raw = logits
        logits = self.penalise(logits[: self.vocab_size].float())
        if self.params.greedy:
            token = int(logits.argmax())
        else:
            probs = process_logits(logits, self.params).softmax(dim=-1)
            token = int(torch.multinomial(probs, 1, generator=self.generator))
        self.observe(token)
        info = top_logprobs(raw, token, self.params.logprobs) if self.params.logprobs is not None else None
        return token, info


def prompt_logprobs(logits: torch.Tensor, ids: Iterable[int], k: int) -> list[TokenLogprob | None]:
    """Logprobs of prompt tokens ids[1:] from logits (T, V) at positions 0..T-2; the first is None."""
    ids = list(ids)
    out: list[TokenLogprob | None] = [None]
    for t in range(1, len(ids)):
        out.append(top_logprobs(logits[t - 1], ids[t], k))
    return out

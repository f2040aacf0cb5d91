"""Sampling: `SamplingParams` and the batched logits -> next-token step of an engine's rows.

    raw logits (B, V) -> processors (per row) -> penalties -> temperature -> top-k -> top-p -> min-p -> draw

Notable choices:
- One (B, V) step for the whole batch (`Sampler.sample`): every knob is a per-row (B, 1) tensor built with
  one host-to-device copy, filters a batch does not use are skipped, greedy rows take the argmax, and the
  chosen ids come back in ONE `.tolist()`: no per-row host sync. Per-row logits processors (logit bias,
  constrained JSON) run on their own row first; they are the only per-row tensor work in the step.
- `temperature == 0` means greedy: argmax of the processed, penalised logits, no random draw; so does any
  temperature below MIN_TEMPERATURE = 1e-5 (vLLM's _SAMPLING_EPS: dividing float32 logits by 1e-45 gives
  inf/NaN, and below 1e-5 the draw is the argmax anyway). Temperatures in [1e-5, 1e-2) are used as given
  (vLLM raises them to 1e-2): float32 logits / 1e-5 stay finite and the draw below is guarded.
- Numerical safety, by a documented rule checked in `SamplingParams.validate` (a 400 naming the field):
  temperature must be a finite number in [0, MAX_TEMPERATURE = 100]; repetition_penalty must be in
  [1e-2, 1e2] (beyond, multiplying or dividing a logit by it overflows float32 or erases the logit); every
  number must be finite. The draw itself is guarded too: a row whose filtered distribution is not one (a
  NaN or +inf logit, or no token left: e.g. a processor that masks everything) takes its argmax (NaN
  ignored; the raw logits' argmax when nothing is left) instead of a random token, without a host sync and
  without touching the other rows.
- Per-row isolation (`Sampler.sample(..., errors={})`): an exception in one row's processors, or in the
  batched step, never fails the other rows: a failing processor marks its row in `errors` (row ->
  exception); a failure of the batched math is retried row by row (with the same random draws) and only the
  rows that fail alone are marked. The engine finishes marked rows with an error.
- Penalties follow their references: the repetition penalty is CTRL's / HF's (a logit of a token seen in the
  prompt or the output -- or, with `repetition_window` N, in their last N tokens, llama.cpp's repeat_last_n --
  is divided by the penalty when positive, multiplied when negative); presence and
  frequency penalties are OpenAI's (logit -= presence * [count > 0] + frequency * count, over generated
  tokens only). Token counts live in (rows, V) tensors, allocated on the first penalised request and updated
  on the device.
- top-k keeps the k largest logits (ties with the k-th too); top-p keeps the smallest set of most likely
  tokens whose probability reaches p (at least one token); min-p keeps tokens whose probability is at least
  min_p times the most likely one's. Each `apply_*` is a pure function taking one value or one per row.
- Random draws by inverting the CDF: each sampling row owns a `random.Random` (seeded from `seed` + the
  sample index when n > 1, else from the OS) and draws ONE uniform u per token on the host; the token is the
  first one, in vocabulary order, whose cumulative probability reaches u * total. A seeded request thus
  draws the same tokens whatever else shares its batch (its stream never depends on other rows), with no
  per-row device launch and no sync; the draw is exact for the computed (float32) distribution.
- On the CPU, a row with top-p (and no min-p) takes its top-p and draw on its few likely tokens
  (`nucleus_draw`: the dense path's token; ~0.3 instead of ~0.7 ms on a 49k row), and repetition windows
  penalise their own ids by indexing; a row that does not qualify, or whose nucleus may reach beyond its
  likely tokens, takes the dense path. Each row decides alone, so a batch changes no row's tokens.
- Logprobs report the model's own distribution (log-softmax of the raw logits, before processors,
  penalties, temperature and truncation), like OpenAI and vLLM, through llmkit.score (the one scorer).
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch

from llmkit.errors import LlmkitError
from llmkit.score import token_logprobs, topk_logprobs

# A per-row logits processor: (the row's generated ids, its next-token logits (V,) float32) -> new logits
Processor = Callable[[list[int], torch.Tensor], torch.Tensor]
Param = float | torch.Tensor  # one value for every row, or one per row as a (B, 1) tensor

MAX_LOGPROBS = 20
MIN_TEMPERATURE = 1e-5  # below it (0 included) sampling is greedy
MAX_TEMPERATURE = 100.0
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 1e-2, 1e2


@dataclass
class SamplingParams:
    max_tokens: int = 256  # new tokens at most (0 with echo: score the prompt only)
    temperature: float = 1.0  # 0 (or anything below MIN_TEMPERATURE = 1e-5) = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off; in [1e-2, 1e2]
    repetition_window: int = 0  # penalise only the last N tokens (llama.cpp's repeat_last_n); 0 = all
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
        return self.temperature < MIN_TEMPERATURE

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
        """Raise LlmkitError (status 400, `param` = the field) naming the first invalid field; return self.

        Numerical rule: every number is finite; temperature in [0, 100], greedy below 1e-5 (not an error);
        repetition_penalty in [1e-2, 1e2]; presence/frequency penalties in [-2, 2]."""

        def bad(name: str, why: str) -> LlmkitError:
            return LlmkitError(f"invalid sampling parameter {name}={getattr(self, name)!r}: {why}",
                               param=name)

        def number(name: str) -> float:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise bad(name, "must be a finite number")
            return float(v)

        def integer(name: str) -> int:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise bad(name, "must be an integer")
            return v

        if integer("max_tokens") < (0 if self.echo else 1):
            raise bad("max_tokens", "must be >= 1 (0 only with echo: prompt logprobs, no new token)")
        if not 0 <= number("temperature") <= MAX_TEMPERATURE:
            raise bad("temperature",
                      f"must be in [0, {MAX_TEMPERATURE:g}] (below {MIN_TEMPERATURE:g} = greedy)")
        if integer("top_k") < 0:
            raise bad("top_k", "must be >= 0 (0 = off)")
        if not 0 < number("top_p") <= 1:
            raise bad("top_p", "must be in (0, 1] (1 = off)")
        if not 0 <= number("min_p") <= 1:
            raise bad("min_p", "must be in [0, 1] (0 = off)")
        if not MIN_REPETITION_PENALTY <= number("repetition_penalty") <= MAX_REPETITION_PENALTY:
            raise bad("repetition_penalty",
                      f"must be in [{MIN_REPETITION_PENALTY:g}, {MAX_REPETITION_PENALTY:g}] (1 = off; "
                      "further out it overflows the logits)")
        if integer("repetition_window") < 0:
            raise bad("repetition_window", "must be >= 0 (0 = every token of the prompt and the answer)")
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
def _off(x: Param, off: float) -> bool:
    """True when one shared value turns a filter off (a per-row tensor is applied as it is)."""
    return not isinstance(x, torch.Tensor) and x == off


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: Param) -> torch.Tensor:
    """CTRL/HF repetition penalty on logits (..., V) for the seen tokens: `seen` is a bool mask shaped like
    `logits` or 1-D token ids (every row's); `penalty` one value or (B, 1) per row (1 = off). With ids only
    their logits are read and written (a 64-token window of a 49k row: ~20 us instead of ~0.3 ms)."""
    if _off(penalty, 1.0) or seen.numel() == 0:
        return logits
    if seen.dtype != torch.bool:
        out = logits.clone()
        v = out[..., seen]
        out[..., seen] = torch.where(v > 0, v / penalty, v * penalty)
        return out
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def apply_presence_frequency(logits: torch.Tensor, counts: torch.Tensor, presence: Param,
                             frequency: Param) -> torch.Tensor:
    """OpenAI penalties: logits - presence * [count > 0] - frequency * count; counts (..., V) float."""
    if _off(presence, 0.0) and _off(frequency, 0.0):
        return logits
    return logits - presence * (counts > 0).to(logits.dtype) - frequency * counts


def apply_top_k(logits: torch.Tensor, k: int | torch.Tensor, kmax: int | None = None) -> torch.Tensor:
    """Keep the k largest logits of each row (ties with the k-th are kept), the rest -> -inf. k: one value
    or (B, 1) long per row (0 = off); with per-row k pass `kmax` = the largest k (else one host sync)."""
    V = logits.shape[-1]
    if not isinstance(k, torch.Tensor):
        if k <= 0 or k >= V:
            return logits
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (..., 1)
        return logits.masked_fill(logits < kth, float("-inf"))
    kmax = min(int(k.max()) if kmax is None else kmax, V)
    vals = torch.topk(logits, kmax, dim=-1).values  # (B, kmax)
    kth = vals.gather(-1, (k.clamp(1, kmax) - 1))  # (B, 1)
    kth = kth.masked_fill((k <= 0) | (k >= V), float("-inf"))  # rows with top-k off keep everything
    return logits.masked_fill(logits < kth, float("-inf"))


TOP_P_CANDIDATES = 1024  # top-p looks for its cut among this many most likely tokens first
TOP_P_FIRST = 64  # on the CPU, among this many before (a top-64 is ~4x cheaper than a top-1024 there)


def apply_top_p(logits: torch.Tensor, p: Param) -> torch.Tensor:
    """Keep the smallest most-likely set whose probability reaches p (always at least one token); p one
    value or (B, 1) per row (1 = off).

    The cut is searched among the TOP_P_CANDIDATES most likely tokens (a top-k, not a sort of the whole
    vocabulary: 10x less work on a 49k vocabulary); rows whose nucleus is wider fall back to the full sort.
    On the CPU the TOP_P_FIRST most likely come first: when they hold p of every row's probability (the
    usual case at chat temperatures), the nucleus lies among them and the result is the same."""
    if not isinstance(p, torch.Tensor) and p >= 1.0:
        return logits
    V = logits.shape[-1]
    if V <= TOP_P_CANDIDATES:
        return _top_p_sorted(logits, *logits.sort(dim=-1, descending=True), p, logits.logsumexp(-1, True))
    lse = logsumexp(logits)  # (..., 1) the full softmax's normaliser
    pv = p.squeeze(-1) if isinstance(p, torch.Tensor) else p
    for c in ((TOP_P_FIRST,) if logits.device.type == "cpu" else ()) + (TOP_P_CANDIDATES,):
        vals, idx = logits.topk(c, dim=-1)  # (..., c) most likely first
        mass = (vals - lse).exp().sum(dim=-1)  # (...,) probability the candidates hold
        wide = mass < pv  # the cut lies beyond them (rows with top-p off keep everything: never wide)
        if isinstance(pv, torch.Tensor):
            wide &= pv < 1.0
        if c == TOP_P_CANDIDATES or not bool(wide.any()):
            break
    out = _top_p_sorted(logits, vals, idx, p, lse, full=False)
    if bool(wide.any()):  # one check per step, for the whole batch
        srt, order = logits.sort(dim=-1, descending=True)
        out = torch.where(wide[..., None], _top_p_sorted(logits, srt, order, p, lse), out)
    return out


EXP_FLOOR = -87.0  # e^-87 ~ 1.6e-38, just above float32's smallest normal number


def logsumexp(x: torch.Tensor) -> torch.Tensor:
    """log(sum(exp(x))) over the last dimension, kept (..., 1): max + log(sum(exp(x - max))), an infinite
    max taken as 0 (ATen's composite), the terms of x - max below EXP_FLOOR counted as 0. Why: PyTorch's
    CPU exp is 10-30x slower on inputs whose exp underflows, -inf included (0.2-1.8 ms instead of 0.06 on
    one 49k row), and at a sampling temperature of 0.2 most of a real row's logits do; terms below 1e-38
    cannot move a sum that holds e^0 = 1. Tensor.logsumexp is no faster (~300 us on random logits). The
    same to an ulp as it, -inf, +inf and NaN rows included.

    The terms below the floor are clamped to it rather than masked: each then adds e^-87, and even 262,144
    of them (4e-33) vanish in a sum that holds 1 (half its ulp is 6e-8). Only a row whose every logit is -inf
    has no such 1; it is -inf, set at the end. (A mask cost a compare and a fill over the row: 0.23 -> 0.12 ms
    a 49k row.) NaN passes the clamp as NaN."""
    top = x.amax(dim=-1, keepdim=True)
    m = top.masked_fill(top.abs() == math.inf, 0.0)
    out = (x - m).clamp_(min=EXP_FLOOR).exp_().sum(dim=-1, keepdim=True).log_() + m
    return torch.where(top == -math.inf, top, out)


def _top_p_sorted(logits: torch.Tensor, srt: torch.Tensor, idx: torch.Tensor, p: Param, lse: torch.Tensor,
                  full: bool = True) -> torch.Tensor:
    """Top-p over logits whose most likely tokens are `srt` at `idx` (descending); tokens not listed (when
    not `full`) are dropped."""
    probs = (srt - lse).exp()
    before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely tokens
    drop = before >= p
    if isinstance(p, torch.Tensor):
        drop &= p < 1.0  # rows with top-p off (rounding may bring `before` to 1)
    drop[..., 0] = False
    kept = srt.masked_fill(drop, float("-inf"))
    if full:
        return logits.scatter(-1, idx, kept)
    out = torch.full_like(logits, float("-inf")).scatter(-1, idx, kept)
    if isinstance(p, torch.Tensor):  # rows with top-p off keep everything
        out = torch.where(p < 1.0, out, logits)
    return out


def apply_min_p(logits: torch.Tensor, min_p: Param) -> torch.Tensor:
    """Keep tokens whose probability is >= min_p * the top probability; min_p one value or (B, 1) per row
    (0 = off)."""
    if not isinstance(min_p, torch.Tensor) and min_p <= 0.0:
        return logits
    probs = logits.softmax(dim=-1)
    keep = probs >= min_p * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(~keep, float("-inf"))


def draw(logits: torch.Tensor, u: torch.Tensor,
         fallback: torch.Tensor | Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
    """One token per row of logits (B, V) by inverting the CDF of their softmax at u (B,) in (0, 1]: the
    first token in vocabulary order whose cumulative probability reaches u * total. Never a token of
    probability 0 (a -inf logit). A row that is no distribution (a NaN or +inf logit, or every logit -inf:
    its softmax is NaN) takes `fallback` (B,) long, by default its argmax with NaN ignored; the other rows
    are unaffected and nothing is read back from a device. A callable fallback is called only when needed:
    on the CPU, where reading `ok` costs no sync, only when some row is no distribution (a safe argmax of
    a 49k row costs ~0.15 ms, a tenth of a sampled token's step)."""
    probs = logits.softmax(dim=-1)  # (B, V); a whole row of NaN when the row is degenerate
    cdf = probs.cumsum(dim=-1)  # (B, V)
    total = cdf[:, -1:]  # (B, 1): ~1, or NaN
    at = (u[:, None] * total).contiguous()  # (B, 1), in (0, total]
    tok = torch.searchsorted(cdf, at).squeeze(1).clamp_(max=logits.shape[-1] - 1)  # (B,)
    # a positive probability (also guards against float ties of the cumulative sum) of a real distribution
    ok = (probs.gather(1, tok[:, None]).squeeze(1) > 0) & torch.isfinite(total.squeeze(1))
    if fallback is None or callable(fallback):
        if logits.device.type == "cpu" and bool(ok.numpy().all()):
            return tok
        fallback = safe_argmax(logits) if fallback is None else fallback()
    return torch.where(ok, tok, fallback)


NUCLEUS_SPAN = 20.0  # nucleus_draw looks among the tokens within this of the row's top logit (e^-20 ~ 2e-9)
NUCLEUS_MAX = 1024  # ... when there are at most this many


def nucleus_draw(x: torch.Tensor, p: float, u: float) -> int | None:
    """`draw(apply_top_p(x, p), u)` for one CPU float32 row x (V,), computed on its few likely tokens only:
    those within NUCLEUS_SPAN of its top logit, when they are at most NUCLEUS_MAX and hold p of its
    probability (then the nucleus lies among them). Else, or for a row that is no distribution, None: the
    caller takes the dense path. At chat temperatures a 49k row keeps a handful of tokens, and the dense
    path's top-k, scatter, softmax and cumulative sum over the whole row cost ~0.7 ms a token; this ~0.3.

    The same token as the dense path: the nucleus by the same float32 masses (exp(x - logsumexp(x)) summed
    most likely first), and the draw by inverting the CDF in vocabulary order at u (the tokens between
    them carry probability 0). Only the softmax's sum is taken over fewer terms, so a probability may differ
    in its last bit: a draw falling within that of a boundary (~1e-7 of draws) may pick its neighbour."""
    V = x.shape[-1]
    lse = logsumexp(x[None])[0]  # (1,) the full softmax's normaliser
    if not math.isfinite(float(lse)):  # a NaN or +inf logit, or every logit -inf
        return None
    xs = x.numpy()
    idx = torch.from_numpy(np.flatnonzero(xs >= xs.max() - NUCLEUS_SPAN))  # ascending: vocabulary order
    if len(idx) > NUCLEUS_MAX or len(idx) == V:
        return None
    vals = x[idx]  # (c,)
    order = vals.argsort(descending=True, stable=True)
    probs = (vals[order] - lse).exp()  # most likely first, as _top_p_sorted
    mass = probs.cumsum(0)
    if not bool(mass[-1] >= p):  # the nucleus may reach beyond them
        return None
    drop = (mass - probs) >= p  # mass of the strictly more likely tokens
    drop[0] = False
    dropped = torch.zeros_like(drop).scatter_(0, order, drop)  # in vocabulary order
    kept = vals.masked_fill(dropped, float("-inf"))
    pr = kept.softmax(0)
    cdf = pr.cumsum(0)
    at = torch.tensor([u], dtype=cdf.dtype) * cdf[-1:]  # u rounded to float32, as the dense draw's
    j = int(torch.searchsorted(cdf, at).clamp_(max=len(idx) - 1))
    if not (pr[j] > 0 and math.isfinite(float(cdf[-1]))):
        return None
    return int(idx[j])


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits.argmax(dim=-1), the same indices (the first maximum; a NaN counts as the maximum), by NumPy's
    for a float32 CPU tensor: one 49k-token row in ~5 us instead of PyTorch's ~75 (a greedy token's
    sampling)."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and not logits.requires_grad:
        return torch.from_numpy(logits.numpy().argmax(axis=-1))
    return logits.argmax(dim=-1)


def safe_argmax(logits: torch.Tensor, raw: torch.Tensor | None = None) -> torch.Tensor:
    """Argmax of each row of logits (B, V) ignoring NaN; a row with nothing left (all -inf or NaN) takes the
    argmax of `raw` (B, V) instead when given (the model's own logits, before processors)."""
    x = _nan_to_neginf(logits)  # (B, V)
    best = argmax(x)  # (B,)
    if raw is None:
        return best
    empty = x.gather(1, best[:, None]).squeeze(1) == float("-inf")  # (B,)
    return torch.where(empty, argmax(_nan_to_neginf(raw)), best)


def _nan_to_neginf(x: torch.Tensor) -> torch.Tensor:
    inf = float("inf")
    return x.nan_to_num(nan=-inf, posinf=inf, neginf=-inf)


# ---------------------------------------------------------------------- logprobs
def logprob_infos(logits: torch.Tensor, targets: torch.Tensor, k: int | Sequence[int]) -> list[TokenLogprob]:
    """TokenLogprob of each target under raw logits (N, V), targets (N,), with the k most likely tokens (k
    one value or one per row), read back in one transfer per tensor."""
    ks = [k] * len(targets) if isinstance(k, int) else list(k)
    lps = token_logprobs(logits, targets).tolist()  # (N,)
    kmax = max(ks, default=0)
    vals = ids = [[]] * len(ks)
    if kmax:
        top = topk_logprobs(logits, kmax)  # (N, kmax) each
        vals, ids = top.values.tolist(), top.ids.tolist()
    return [TokenLogprob(t, lp, list(zip(i[:n], v[:n])))
            for t, lp, i, v, n in zip(targets.tolist(), lps, ids, vals, ks)]


# ---------------------------------------------------------------------- the batched sampler
class Sampler:
    """Sampling state of `rows` engine rows (parameters, random streams, processors, token counts for the
    penalties) and the step that picks one token for each of a set of rows at once."""

    def __init__(self, rows: int, vocab_size: int, device: torch.device | str | None = None):
        self.vocab_size = vocab_size
        self.device = torch.device(device or "cpu")
        self.params: list[SamplingParams | None] = [None] * rows
        self.rngs: list[random.Random | None] = [None] * rows
        self.processors: list[tuple[Processor, ...]] = [()] * rows
        self.counts: torch.Tensor | None = None  # (rows, V) float32: generated-token counts
        self.seen: torch.Tensor | None = None  # (rows, V) float32: counts in the prompt + output (or window)
        self.window: list[deque[int] | None] = [None] * rows  # the ids in a row's repetition window

    def start(self, row: int, params: SamplingParams, prompt_ids: Sequence[int] = (), sample_index: int = 0,
              processors: Sequence[Processor] = ()) -> None:
        """Give `row` a new request: its parameters, a random stream (seed + sample_index when seeded) and,
        when it is penalised, token counts that start from its prompt."""
        self.params[row] = params
        self.processors[row] = tuple(processors)
        self.window[row] = None
        seed = None if params.seed is None else params.seed + sample_index
        self.rngs[row] = None if params.greedy else random.Random(seed)  # None: seeded from the OS
        if params.penalised:
            if self.counts is None:
                n = len(self.params)
                self.counts = torch.zeros(n, self.vocab_size, device=self.device)
                self.seen = torch.zeros(n, self.vocab_size, device=self.device)
            ids = [i for i in prompt_ids if 0 <= i < self.vocab_size]
            n_win = params.repetition_window
            self.window[row] = deque(ids[-n_win:]) if n_win else None
            self.counts[row] = 0
            self.seen[row] = 0
            seen = list(self.window[row]) if n_win else ids
            self.seen[row].index_add_(0, torch.tensor(seen, dtype=torch.long, device=self.device),
                                      torch.ones(len(seen), device=self.device))

    def sample(self, rows: Sequence[int], logits: torch.Tensor, generated: Sequence[list[int]] | None = None,
               errors: dict[int, Exception] | None = None) -> tuple[list[int], list[TokenLogprob | None]]:
        """One token for each of `rows` from their raw next-token logits (B, V) float32; `generated` (each
        row's generated ids) feeds the processors. Returns the ids and, where asked, their logprobs.

        With `errors` (a dict), failures are isolated: a row whose processor raises, or that fails when the
        batched step is retried row by row after a failure, is recorded there (row -> exception) and its id
        is meaningless; the other rows' tokens are what they would have been. Without it, errors raise."""
        ps = [self.params[r] for r in rows]
        # one uniform per sampling row, drawn once: a retried step draws what the failed one would have
        us = [1.0 - g.random() if (g := self.rngs[r]) is not None else 1.0 for r in rows]
        x = logits
        if any(self.processors[r] for r in rows):
            x = logits.clone()
            for i, r in enumerate(rows):
                try:
                    for proc in self.processors[r]:
                        x[i] = proc(generated[i] if generated is not None else [], x[i])
                except Exception as e:
                    if errors is None:
                        raise
                    errors[r] = e
        try:
            return self._step(rows, ps, logits, x, us)
        except Exception as e:
            if errors is None:
                raise
            if len(rows) == 1:
                errors[rows[0]] = e
                return [0], [None]
        ids: list[int] = []
        infos: list[TokenLogprob | None] = []
        for i, (r, p) in enumerate(zip(rows, ps)):  # the batch failed: each row alone
            try:
                (t,), (info,) = self._step([r], [p], logits[i : i + 1], x[i : i + 1], us[i : i + 1])
            except Exception as e:
                errors[r] = e
                t, info = 0, None
            ids.append(t)
            infos.append(info)
        return ids, infos

    def _step(self, rows: Sequence[int], ps: Sequence[SamplingParams], raw: torch.Tensor,
              logits: torch.Tensor, us: Sequence[float]) -> tuple[list[int], list[TokenLogprob | None]]:
        """Pick the tokens of `rows` from their processed logits (B, V), their logprobs under the raw
        logits, then (last, so a failure leaves no trace) count them for the penalties."""
        penalised = any(p.penalised for p in ps)
        greedy = all(p.greedy for p in ps)
        if penalised or not greedy:
            knobs = torch.tensor([[1.0 if p.greedy else p.temperature, p.top_p, p.min_p, p.top_k,
                                   p.repetition_penalty, p.presence_penalty, p.frequency_penalty, p.greedy, u]
                                  for p, u in zip(ps, us)], device=self.device)  # (B, 9): one copy
        if penalised:
            idx = torch.tensor(rows, device=self.device)  # (B,)
            pen = [i for i, p in enumerate(ps) if p.repetition_penalty != 1.0]  # (1 changes no logit)
            if pen and self.device.type == "cpu" and all(self.window[rows[i]] is not None for i in pen):
                # the CPU, windows: each row's few seen ids, not a pass over V
                ids = {i: torch.tensor(sorted(set(self.window[rows[i]])), dtype=torch.long) for i in pen}
                logits = torch.cat([apply_repetition_penalty(logits[i : i + 1], ids[i], knobs[i, 4])
                                    if i in ids else logits[i : i + 1] for i in range(len(ps))])
            elif pen:
                logits = apply_repetition_penalty(logits, self.seen[idx] > 0, knobs[:, 4:5])
            if any(p.presence_penalty or p.frequency_penalty for p in ps):
                logits = apply_presence_frequency(logits, self.counts[idx], knobs[:, 5:6], knobs[:, 6:7])
        if greedy:
            tokens = argmax(logits)  # (B,)
        else:
            mixed = any(p.greedy for p in ps)

            def fallback(logits: torch.Tensor = logits) -> torch.Tensor:  # greedy rows, degenerate rows
                return safe_argmax(logits, raw)

            best = fallback() if mixed else None  # (B,)
            x = logits / knobs[:, 0:1]
            if any(p.top_k for p in ps if not p.greedy):
                x = apply_top_k(x, knobs[:, 3:4].long(), kmax=max(p.top_k for p in ps))
            done = self._nucleus(ps, x, us)  # {row index: token} drawn on the CPU from a row's likely tokens
            if len(done) < len(ps):
                if any(p.top_p < 1.0 for p in ps if not p.greedy):
                    x = apply_top_p(x, knobs[:, 1:2])
                if any(p.min_p > 0.0 for p in ps if not p.greedy):
                    x = apply_min_p(x, knobs[:, 2:3])
                tokens = draw(x, knobs[:, 8], best if mixed else fallback)  # (B,)
            else:
                tokens = torch.zeros(len(ps), dtype=torch.long)
            for i, t in done.items():
                tokens[i] = t
            if mixed:
                tokens = torch.where(knobs[:, 7] > 0, best, tokens)
        ids = tokens.tolist()  # the step's one host transfer for the tokens
        infos = self._logprobs(rows, raw, tokens)
        if penalised:
            self._observe(rows, ps, idx, tokens, ids)
        return ids, infos

    @staticmethod
    def _nucleus(ps: Sequence[SamplingParams], x: torch.Tensor, us: Sequence[float]) -> dict[int, int]:
        """Tokens of the rows `nucleus_draw` can take (CPU float32, top-p on, min-p off, a vocabulary beyond
        TOP_P_CANDIDATES), each row on its own: a row draws the same token alone or in any batch."""
        if x.device.type != "cpu" or x.dtype != torch.float32 or x.shape[-1] <= TOP_P_CANDIDATES:
            return {}
        done = {}
        for i, p in enumerate(ps):
            if not p.greedy and p.top_p < 1.0 and p.min_p <= 0.0:
                t = nucleus_draw(x[i], p.top_p, us[i])
                if t is not None:
                    done[i] = t
        return done

    def _observe(self, rows: Sequence[int], ps: Sequence[SamplingParams], idx: torch.Tensor,
                 tokens: torch.Tensor, ids: list[int]) -> None:
        """Count the new tokens for the penalties; a token leaving a row's repetition window is uncounted."""
        one = torch.ones((), device=self.device)
        self.counts.index_put_((idx, tokens), one, accumulate=True)
        self.seen.index_put_((idx, tokens), one, accumulate=True)
        out_rows, out_ids = [], []
        for r, p, t in zip(rows, ps, ids):
            win = self.window[r]
            if win is not None:
                win.append(t)
                if len(win) > p.repetition_window:
                    out_rows.append(r)
                    out_ids.append(win.popleft())
        if out_rows:
            self.seen.index_put_((torch.tensor(out_rows, device=self.device),
                                  torch.tensor(out_ids, device=self.device)), -one, accumulate=True)

    def _logprobs(self, rows: Sequence[int], raw: torch.Tensor, tokens: torch.Tensor
                  ) -> list[TokenLogprob | None]:
        want = [i for i, r in enumerate(rows) if self.params[r].logprobs is not None]
        out: list[TokenLogprob | None] = [None] * len(rows)
        if not want:
            return out
        if len(want) < len(rows):
            sel = torch.tensor(want, device=raw.device)
            raw, tokens = raw[sel], tokens[sel]
        for i, info in zip(want, logprob_infos(raw, tokens, [self.params[rows[i]].logprobs for i in want])):
            out[i] = info
        return out

"""Samplers on hand-made distributions, penalties as defined, the batched (B, V) sampler against the per-row
filters, seeded draws independent of batch companions, parameter validation, stop strings."""

import math

import pytest
import torch

from llmkit.errors import LlmkitError
from llmkit.generate.sampling import (
    Sampler,
    SamplingParams,
    apply_min_p,
    apply_presence_frequency,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    draw,
    logprob_infos,
    nucleus_draw,
)
from llmkit.generate.stop import StopMatcher

PROBS = torch.tensor([0.05, 0.5, 0.15, 0.3])  # sorted: 1 (0.5), 3 (0.3), 2 (0.15), 0 (0.05)
LOGITS = PROBS.log()


def kept(logits: torch.Tensor) -> set[int]:
    return set(torch.isfinite(logits).nonzero().flatten().tolist())


def one_row(params, prompt_ids, vocab_size, sample_index=0):
    """A Sampler of one row, called as the old per-sequence sampler was: logits (V,) -> (token, info)."""
    s = Sampler(1, vocab_size)
    s.start(0, params, prompt_ids, sample_index)

    def pick(logits):
        ids, infos = s.sample([0], logits[None])
        return ids[0], infos[0]

    return pick


def test_top_k_keeps_k_largest():
    assert kept(apply_top_k(LOGITS, 1)) == {1}
    assert kept(apply_top_k(LOGITS, 2)) == {1, 3}
    assert kept(apply_top_k(LOGITS, 0)) == {0, 1, 2, 3}


@pytest.mark.parametrize("p, expect", [(0.4, {1}), (0.75, {1, 3}), (0.9, {1, 3, 2}), (0.97, {0, 1, 2, 3}),
                                       (1e-6, {1})])
def test_top_p_smallest_set_reaching_p(p, expect):
    assert kept(apply_top_p(LOGITS, p)) == expect


def _top_p_reference(row: list[float], p: float) -> set[int]:
    """The nucleus by the definition, in plain Python: sort by probability, keep tokens until the kept
    mass reaches p (the first token always)."""
    z = max(row)
    probs = [math.exp(x - z) for x in row]
    total = sum(probs)
    order = sorted(range(len(row)), key=lambda t: -row[t])
    kept, mass = set(), 0.0
    for t in order:
        if mass >= p * total and kept:
            break
        kept.add(t)
        mass += probs[t]
    return kept


# sharp (the cut among the first 64 candidates), middling (among 1024) and flat (the full sort)
@pytest.mark.parametrize("scale", [8.0, 2.0, 0.05])
def test_top_p_on_a_large_vocabulary_matches_the_definition(scale):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 6000, generator=g, dtype=torch.float64) * scale
    p = torch.tensor([[0.5], [0.9], [0.99], [1.0]], dtype=torch.float64)
    out = apply_top_p(logits, p)
    for r in range(4):
        kept = set(torch.isfinite(out[r]).nonzero().squeeze(1).tolist())
        want = set(range(6000)) if p[r].item() >= 1 else _top_p_reference(logits[r].tolist(), p[r].item())
        assert kept == want
        assert torch.equal(out[r][list(kept)], logits[r][list(kept)])


@pytest.mark.parametrize("m, expect", [(0.5, {1, 3}), (0.25, {1, 3, 2}), (0.61, {1}), (0.0, {0, 1, 2, 3})])
def test_min_p_relative_to_top(m, expect):
    assert kept(apply_min_p(LOGITS, m)) == expect


def test_kept_tokens_sampled_with_renormalised_probs():
    s = one_row(SamplingParams(top_p=0.75, seed=0), [], 4)
    draws = torch.tensor([s(LOGITS)[0] for _ in range(4000)])
    assert set(draws.tolist()) == {1, 3}
    assert abs((draws == 1).float().mean().item() - 0.5 / 0.8) < 0.03


def test_temperature_zero_is_argmax_and_low_temperature_approaches_it():
    logits = torch.tensor([1.0, 3.0, 2.9, -1.0])
    assert one_row(SamplingParams(temperature=0), [], 4)(logits)[0] == 1
    s = one_row(SamplingParams(temperature=1e-3, seed=1), [], 4)
    assert all(s(logits)[0] == 1 for _ in range(50))


def test_seed_reproduces_and_differs():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))

    def draw(seed, idx=0):
        s = one_row(SamplingParams(seed=seed), [], 1000, sample_index=idx)
        return [s(logits)[0] for _ in range(20)]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)
    assert draw(7, idx=1) == draw(8)  # sample i of n uses seed + i


def test_repetition_penalty_as_defined():
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5])
    out = apply_repetition_penalty(logits, torch.tensor([0, 1]), 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0, 0.5]


def test_presence_frequency_as_defined():
    logits = torch.zeros(4)
    counts = torch.tensor([0.0, 1.0, 3.0, 0.0])
    out = apply_presence_frequency(logits, counts, presence=0.5, frequency=0.25)
    assert out.tolist() == [0.0, -0.75, -1.25, 0.0]


def test_sampler_penalises_prompt_and_generated_tokens():
    logits = torch.tensor([1.0, 0.9, 0.0])
    s = one_row(SamplingParams(temperature=0, repetition_penalty=2.0), prompt_ids=[0], vocab_size=3)
    assert s(logits)[0] == 1  # 0 was in the prompt: 1.0 -> 0.5 < 0.9
    assert s(logits)[0] == 0  # now 1 was generated: 0.9 -> 0.45 < 0.5
    f = one_row(SamplingParams(temperature=0, frequency_penalty=0.6), prompt_ids=[0], vocab_size=3)
    assert [f(logits)[0] for _ in range(3)] == [0, 1, 0]  # frequency counts generated tokens only


def test_repetition_window_counts_only_the_last_n_tokens(monkeypatch):
    """repetition_penalty 2.0 over the last 3 tokens of prompt + answer (llama.cpp's repeat_last_n), greedy.
    Expected penalised logits by hand: a positive logit / 2, a negative one * 2, for the tokens in the
    window only. Row 1 (window 0) penalises every token seen, as transformers."""
    from llmkit.generate import sampling

    L = [3.0, -1.0, 2.0, -2.0, 1.0, 0.5]  # the same raw logits at every step
    seen_by_next_stage = []  # the logits the repetition penalty hands on
    real = sampling.apply_repetition_penalty
    monkeypatch.setattr(sampling, "apply_repetition_penalty",
                        lambda *a: seen_by_next_stage.append(real(*a).clone()) or seen_by_next_stage[-1])
    s = Sampler(2, len(L))
    s.start(0, SamplingParams(temperature=0, repetition_penalty=2.0, repetition_window=3), [0, 1, 2, 3])
    s.start(1, SamplingParams(temperature=0, repetition_penalty=2.0), [0, 1, 2, 3])
    # (window before the step, penalised logits, greedy pick); token 0 was seen 4 tokens ago: not penalised
    steps = [([1, 2, 3], [3.0, -2.0, 1.0, -4.0, 1.0, 0.5], 0),
             ([2, 3, 0], [1.5, -1.0, 1.0, -4.0, 1.0, 0.5], 0),  # 1 left the window
             ([3, 0, 0], [1.5, -1.0, 2.0, -4.0, 1.0, 0.5], 2),  # 2 left: it wins
             ([0, 0, 2], [1.5, -1.0, 1.0, -2.0, 1.0, 0.5], 0),  # 3 left; 2 seen 1 token ago
             ([0, 2, 0], [1.5, -1.0, 1.0, -2.0, 1.0, 0.5], 0),  # one 0 left, another is still there
             ([2, 0, 0], [1.5, -1.0, 1.0, -2.0, 1.0, 0.5], 0),
             ([0, 0, 0], [1.5, -1.0, 2.0, -2.0, 1.0, 0.5], 2)]  # 2 left again
    everything = [1.5, -2.0, 1.0, -4.0, 1.0, 0.5]  # row 1: tokens 0-3 stay penalised
    for window, expect, pick in steps:
        ids, _ = s.sample([0, 1], torch.tensor([L, L]))
        assert seen_by_next_stage[-1].tolist() == [expect, everything], window
        assert ids == [pick, 0], window


def test_logprobs_are_raw_model_logprobs():
    logits = torch.tensor([0.0, 1.0, 2.0])
    s = one_row(SamplingParams(temperature=0, logprobs=2, repetition_penalty=1.5), [2], 3)
    tok, info = s(logits)
    lp = logits.log_softmax(-1)
    assert info.token_id == tok and math.isclose(info.logprob, lp[tok].item(), rel_tol=1e-6)
    assert [i for i, _ in info.top] == [2, 1]
    out = logprob_infos(torch.stack([logits, logits]), torch.tensor([1, 2]), 0)  # a prompt's tokens 1, 2
    assert math.isclose(out[1].logprob, lp[2].item(), rel_tol=1e-6)


# ---------------------------------------------------------------------- the batched sampler
ROWS = [  # (top_k, top_p, min_p, temperature) per row; top_k 200 >= V is off
    (3, 1.0, 0.0, 1.0), (0, 0.6, 0.0, 1.0), (0, 1.0, 0.2, 1.0), (5, 0.8, 0.05, 0.7), (0, 1.0, 0.0, 1.3),
    (200, 1.0, 0.0, 1.0),
]


def row_logits(n: int = len(ROWS), v: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, v, generator=torch.Generator().manual_seed(seed)) * 3  # (n, V)


def per_row_reference(logits: torch.Tensor, k: int, p: float, m: float, t: float) -> torch.Tensor:
    return apply_min_p(apply_top_p(apply_top_k(logits / t, k), p), m)


def test_batched_filters_keep_what_each_row_keeps():
    """Per-row knobs as (B, 1) tensors give, row by row, the same kept set and values as one-value calls."""
    logits = row_logits()
    k, p, m, t = (torch.tensor(c)[:, None] for c in zip(*ROWS))  # (B, 1) each
    got = apply_min_p(apply_top_p(apply_top_k(logits / t, k, kmax=200), p), m)  # (B, V)
    for i, (ki, pi, mi, ti) in enumerate(ROWS):
        ref = per_row_reference(logits[i], ki, pi, mi, ti)
        assert kept(got[i]) == kept(ref), i
        assert torch.allclose(got[i][torch.isfinite(ref)], ref[torch.isfinite(ref)])
    assert len(kept(got[0])) == 3 and kept(got[5]) == set(range(50))  # the filters did act / stay off


def test_batched_sampler_draws_each_rows_filtered_distribution():
    logits = row_logits(seed=1)
    s = Sampler(len(ROWS), 50)
    for r, (k, p, m, t) in enumerate(ROWS):
        s.start(r, SamplingParams(top_k=k, top_p=p, min_p=m, temperature=t, seed=r))
    n = 3000
    draws = torch.tensor([s.sample(range(len(ROWS)), logits)[0] for _ in range(n)])  # (n, B)
    for r, (k, p, m, t) in enumerate(ROWS):
        probs = per_row_reference(logits[r], k, p, m, t).softmax(-1)
        freq = torch.bincount(draws[:, r], minlength=50) / n
        assert set(draws[:, r].tolist()) <= kept(probs.log()), r
        assert (freq - probs).abs().max() < 0.035, r


def test_seeded_row_draws_the_same_whatever_shares_its_batch():
    V, steps = 50, 30
    target = SamplingParams(seed=11, top_p=0.9, temperature=0.8, presence_penalty=0.5)
    seq = [row_logits(1, V, seed=100 + i)[0] for i in range(steps)]  # the target's logits at each step

    alone = Sampler(1, V)
    alone.start(0, target, [1, 2, 3])
    want = [alone.sample([0], x[None])[0][0] for x in seq]

    crowd = Sampler(4, V)
    crowd.start(0, SamplingParams(temperature=0, repetition_penalty=1.3), [4, 5])
    crowd.start(1, SamplingParams(top_k=4), [6], processors=[lambda g, x: x.flip(0)])  # unseeded
    crowd.start(2, target, [1, 2, 3])
    crowd.start(3, SamplingParams(seed=11, min_p=0.3))  # the same seed, other knobs
    got = []
    for i, x in enumerate(seq):
        rows = [0, 1, 2, 3] if i % 2 else [1, 2]  # the companions change from step to step
        batch = row_logits(len(rows), V, seed=500 + i)
        batch[rows.index(2)] = x
        got.append(crowd.sample(rows, batch, [[]] * len(rows))[0][rows.index(2)])
    assert got == want


def test_greedy_rows_and_per_row_penalties_in_one_batch():
    """The single-row expectations of test_sampler_penalises_prompt_and_generated_tokens, in one batch
    with a plain greedy row and a sampling row."""
    logits = torch.tensor([1.0, 0.9, 0.0]).expand(4, 3)
    s = Sampler(4, 3)
    s.start(0, SamplingParams(temperature=0, repetition_penalty=2.0), [0])
    s.start(1, SamplingParams(temperature=0, frequency_penalty=0.6), [0])
    s.start(2, SamplingParams(temperature=0), [0])
    s.start(3, SamplingParams(seed=0))
    out = [s.sample(range(4), logits)[0] for _ in range(3)]
    assert [o[0] for o in out][:2] == [1, 0]
    assert [o[1] for o in out] == [0, 1, 0]
    assert [o[2] for o in out] == [0, 0, 0]


def test_processors_run_on_their_own_row_before_penalties():
    calls = []

    def boost(generated, logits):  # token 2's logit becomes 1.5, whatever it was
        calls.append(list(generated))
        return logits.index_fill(0, torch.tensor([2]), 1.5)

    logits = torch.tensor([1.0, 0.9, 0.0]).expand(3, 3)
    s = Sampler(3, 3)
    s.start(0, SamplingParams(temperature=0, repetition_penalty=2.0), [2], processors=[boost])
    s.start(1, SamplingParams(temperature=0), [2])
    s.start(2, SamplingParams(temperature=0), [2], processors=[boost])
    ids, _ = s.sample(range(3), logits, [[7], [], [8, 9]])
    assert ids == [0, 0, 2]  # row 0: 1.5 then penalised to 0.75 < 1.0; row 2: 1.5 wins; row 1 untouched
    assert calls == [[7], [8, 9]]


def test_one_host_transfer_per_step_for_greedy_and_plain_sampling(monkeypatch):
    conversions = []

    def counted(name):
        orig = getattr(torch.Tensor, name)
        return lambda self, *a, **k: conversions.append(name) or orig(self, *a, **k)

    for name in ("item", "tolist", "__int__", "__float__", "__bool__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    s = Sampler(6, 50)
    for r in range(6):
        s.start(r, SamplingParams(temperature=0) if r % 2 else SamplingParams(top_k=5, top_p=0.9, seed=r))
    s.sample(range(6), row_logits(6))
    assert conversions == ["tolist"]


def test_draw_inverts_the_cdf_in_vocabulary_order():
    logits = LOGITS.expand(5, 4)  # cumulative 0.05, 0.55, 0.7, 1.0
    assert draw(logits, torch.tensor([0.04, 0.3, 0.6, 0.99, 1.0])).tolist() == [0, 1, 2, 3, 3]
    holes = torch.tensor([[0.0, float("-inf"), 0.0, float("-inf")]])
    assert draw(holes, torch.tensor([1.0])).tolist() == [2]  # never a token of probability 0
    assert draw(holes, torch.tensor([1e-9])).tolist() == [0]


def test_max_tokens_zero_only_with_echo():
    SamplingParams(max_tokens=0, echo=True).validate()
    with pytest.raises(LlmkitError, match="0 only with echo"):
        SamplingParams(max_tokens=0).validate()


@pytest.mark.parametrize("kw, field", [
    ({"temperature": -0.1}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"), ({"top_k": -1}, "top_k"), ({"min_p": 2.0}, "min_p"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"), ({"presence_penalty": 3.0}, "presence_penalty"),
    ({"n": 0}, "n"), ({"logprobs": 50}, "logprobs"), ({"stop": [""]}, "stop"),
    ({"temperature": "hot"}, "temperature"),
])
def test_invalid_params_clear_errors(kw, field):
    with pytest.raises(LlmkitError, match=f"invalid sampling parameter {field}="):
        SamplingParams(**kw).validate()


def test_unknown_kwarg_named():
    with pytest.raises(LlmkitError, match="unknown sampling parameter.*temprature"):
        SamplingParams.from_kwargs(temprature=1.0)
    assert SamplingParams.from_kwargs(stop="x", seed=None).stop == ["x"]


def test_stop_string_split_across_pieces_is_not_emitted():
    m = StopMatcher(["</s>", "STOP"])
    out = []
    for piece in ["Hello", " wor", "ld<", "/", "s> tail"]:
        text, stopped = m.push(piece)
        out.append(text)
        if stopped:
            break
    assert "".join(out) == "Hello world" and stopped


def test_stop_matcher_releases_false_alarm():
    m = StopMatcher(["STOP"])
    assert m.push("a ST") == ("a ", False)
    assert m.push("OMP") == ("STOMP", False)
    assert m.push("x STO") == ("x ", False)
    assert m.flush() == "STO"


def test_earliest_stop_wins():
    m = StopMatcher(["bc", "abcd"])
    assert m.push("xabcd") == ("x", True)  # "abcd" starts before "bc"


def test_argmax_gives_pytorchs_indices():
    """The greedy step's argmax (NumPy's on CPU float32) picks what torch.argmax picks: the first of tied
    maxima, a NaN as the maximum, a row of -inf's first id, strided views."""
    from llmkit.generate.sampling import argmax

    nan, inf = float("nan"), float("inf")
    cases = [torch.randn(3, 49152), torch.tensor([[1.0, 3.0, 3.0, 2.0]]),
             torch.tensor([[1.0, nan, 5.0, nan]]), torch.tensor([[-inf] * 4]), torch.randn(2, 7)[:, ::2],
             torch.randn(4, 9).bfloat16()]
    for x in cases:
        got = argmax(x)
        assert got.dtype == torch.int64 and torch.equal(got, x.argmax(dim=-1))


def test_logsumexp_is_pytorchs_to_an_ulp():
    """The top-p normaliser (five plain ops) against Tensor.logsumexp: rows of a 49k vocabulary, sharp and
    flat, with -inf entries (masked tokens), a row of -inf and a +inf entry."""
    from llmkit.generate.sampling import logsumexp

    inf, nan = float("inf"), float("nan")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 49152, generator=g) * torch.tensor([[0.1], [3], [30], [1], [1]])
    x[3, ::2] = -inf
    x[4] = -inf
    y = torch.tensor([[1.0, inf, 2.0], [1.0, nan, -inf], [-200.0, 0.0, -95.0]])
    for t in (x, y, x.double()):
        want, got = t.logsumexp(dim=-1, keepdim=True), logsumexp(t)
        assert got.shape == want.shape
        assert torch.equal(torch.isinf(got), torch.isinf(want)) and torch.equal(got.isnan(), want.isnan())
        fin = torch.isfinite(want)
        tol = 2 * torch.finfo(t.dtype).eps * want[fin].abs().clamp(min=1)
        assert ((got[fin] - want[fin]).abs() <= tol).all()


def test_draw_calls_a_lazy_fallback_only_when_a_row_needs_it():
    calls = []

    def fallback() -> torch.Tensor:
        calls.append(1)
        return torch.tensor([3, 3])

    u = torch.tensor([0.5, 0.7])
    fine = torch.tensor([[0.1, 2.0, 0.3, 1.5], [1.0, 0.0, 0.0, 0.0]])
    assert draw(fine, u, fallback).tolist() == draw(fine, u, torch.tensor([3, 3])).tolist()
    assert calls == []  # every row a distribution: the fallback's argmax is never computed
    empty = torch.tensor([[0.1, 2.0, 0.3, 1.5], [float("-inf")] * 4])
    got = draw(empty, u, fallback).tolist()
    assert got[1] == 3 and got[0] == draw(fine, u).tolist()[0] and calls == [1]


def _large_rows(n: int, seed: int):
    """n rows of a 49k vocabulary at chat-like temperatures, some with a few strong tokens (sharp), others
    flat; with a p and a uniform u each."""
    import random

    g, rnd = torch.Generator().manual_seed(seed), random.Random(seed)
    for _ in range(n):
        x = torch.randn(49152, generator=g) * rnd.choice([1.0, 3.0]) / rnd.choice([0.2, 0.7, 1.0])
        if rnd.random() < 0.5:
            x[torch.randint(0, 49152, (5,), generator=g)] += rnd.uniform(5, 40)
        yield x, rnd.choice([0.5, 0.9, 0.95, 0.99]), 1.0 - rnd.random()


def test_nucleus_draw_picks_the_dense_paths_token():
    """The sparse top-p + draw on a row's likely tokens gives draw(apply_top_p(row, p), u)'s token; where the
    nucleus may reach beyond them (flat rows) it declines."""
    taken = declined = 0
    for x, p, u in _large_rows(150, seed=0):
        want = draw(apply_top_p(x[None], torch.tensor([[p]])), torch.tensor([u])).item()
        got = nucleus_draw(x, p, u)
        if got is None:
            declined += 1
        else:
            taken += 1
            assert got == want, (p, u)
    assert taken >= 40 and declined >= 20  # both paths exercised
    assert nucleus_draw(torch.full((49152,), float("-inf")), 0.9, 0.5) is None  # no distribution
    nan = torch.zeros(49152)
    nan[3] = float("nan")
    assert nucleus_draw(nan, 0.9, 0.5) is None


def test_a_large_vocabulary_row_draws_the_same_alone_or_in_a_batch(monkeypatch):
    """Rows of a 49k vocabulary: the sparse nucleus draw (a row on its own) and the dense path (a min-p row
    beside it) give each seeded row the same tokens alone as in a batch, and the sparse path is taken."""
    import llmkit.generate.sampling as sampling

    calls = []
    real = sampling.nucleus_draw
    monkeypatch.setattr(sampling, "nucleus_draw", lambda *a: calls.append(real(*a)) or calls[-1])
    rows = [x for x, _, _ in _large_rows(3, seed=1)]
    logits = torch.stack(rows)  # (3, V)
    params = [SamplingParams(temperature=0.5, top_p=0.9, seed=1),
              SamplingParams(temperature=0.7, top_p=0.95, seed=2),
              SamplingParams(temperature=0.7, top_p=0.9, min_p=0.05, seed=3)]  # min-p: the dense path

    def tokens(which):
        s = Sampler(3, 49152)
        for r in which:
            s.start(r, params[r])
        return [s.sample(which, logits[which])[0] for _ in range(30)]

    together = tokens([0, 1, 2])
    for r in range(3):
        assert [t[r] for t in together] == [t[0] for t in tokens([r])], r
    assert any(c is not None for c in calls)


def test_repetition_windows_on_the_cpu_penalise_each_rows_own_ids(monkeypatch):
    """Every penalised row with a window: the CPU path penalises each row's window ids only (no pass over
    V). What greedy's argmax receives is checked against the definition (a positive logit / penalty, a
    negative one * penalty, for the ids in the row's last n tokens), row by row, as the windows slide."""
    from llmkit.generate import sampling

    L = [3.0, -1.0, 2.0, -2.0, 1.0, 0.5]
    got = []
    real = sampling.argmax
    monkeypatch.setattr(sampling, "argmax", lambda x: got.append(x.clone()) or real(x))
    s = Sampler(3, len(L))
    pens, wins = [2.0, 1.5, 1.0], [3, 2, 4]
    prompts = [[0, 1, 2, 3], [4, 0, 3], [1, 2]]
    for r in range(3):
        params = SamplingParams(temperature=0, repetition_penalty=pens[r], repetition_window=wins[r])
        s.start(r, params, prompts[r])
    history = [list(p) for p in prompts]
    for _ in range(6):
        ids, _ = s.sample([0, 1, 2], torch.tensor([L, L, L]))
        for r in range(3):
            window = set(history[r][-wins[r]:]) if pens[r] != 1.0 else set()
            want = [(v / pens[r] if v > 0 else v * pens[r]) if i in window else v for i, v in enumerate(L)]
            assert got[-1][r].tolist() == pytest.approx(want, rel=0, abs=0), (r, history[r])
            history[r].append(ids[r])
    assert len({tuple(h[-6:]) for h in history}) > 1  # the rows' windows differ, so do their picks

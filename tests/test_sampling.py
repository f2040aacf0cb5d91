"""Samplers on hand-made distributions, penalties as defined, parameter validation, stop strings."""

import math

import pytest
import torch

from llmkit.errors import LlmkitError
from llmkit.generate.sampling import (
    SamplingParams,
    SequenceSampler,
    apply_min_p,
    apply_presence_frequency,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    prompt_logprobs,
)
from llmkit.generate.stop import StopMatcher

PROBS = torch.tensor([0.05, 0.5, 0.15, 0.3])  # sorted: 1 (0.5), 3 (0.3), 2 (0.15), 0 (0.05)
LOGITS = PROBS.log()


def kept(logits: torch.Tensor) -> set[int]:
    return set(torch.isfinite(logits).nonzero().flatten().tolist())


def test_top_k_keeps_k_largest():
    assert kept(apply_top_k(LOGITS, 1)) == {1}
    assert kept(apply_top_k(LOGITS, 2)) == {1, 3}
    assert kept(apply_top_k(LOGITS, 0)) == {0, 1, 2, 3}


@pytest.mark.parametrize("p, expect", [(0.4, {1}), (0.75, {1, 3}), (0.9, {1, 3, 2}), (0.97, {0, 1, 2, 3}),
                                       (1e-6, {1})])
def test_top_p_smallest_set_reaching_p(p, expect):
    assert kept(apply_top_p(LOGITS, p)) == expect


@pytest.mark.parametrize("m, expect", [(0.5, {1, 3}), (0.25, {1, 3, 2}), (0.61, {1}), (0.0, {0, 1, 2, 3})])
def test_min_p_relative_to_top(m, expect):
    assert kept(apply_min_p(LOGITS, m)) == expect


def test_kept_tokens_sampled_with_renormalised_probs():
    s = SequenceSampler(SamplingParams(top_p=0.75, seed=0), [], 4)
    draws = torch.tensor([s(LOGITS)[0] for _ in range(4000)])
    assert set(draws.tolist()) == {1, 3}
    assert abs((draws == 1).float().mean().item() - 0.5 / 0.8) < 0.03


def test_temperature_zero_is_argmax_and_low_temperature_approaches_it():
    logits = torch.tensor([1.0, 3.0, 2.9, -1.0])
    assert SequenceSampler(SamplingParams(temperature=0), [], 4)(logits)[0] == 1
    s = SequenceSampler(SamplingParams(temperature=1e-3, seed=1), [], 4)
    assert all(s(logits)[0] == 1 for _ in range(50))


def test_seed_reproduces_and_differs():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))

    def draw(seed, idx=0):
        s = SequenceSampler(SamplingParams(seed=seed), [], 1000, sample_index=idx)
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
    s = SequenceSampler(SamplingParams(temperature=0, repetition_penalty=2.0), prompt_ids=[0], vocab_size=3)
    assert s(logits)[0] == 1  # 0 was in the prompt: 1.0 -> 0.5 < 0.9
    assert s(logits)[0] == 0  # now 1 was generated: 0.9 -> 0.45 < 0.5
    f = SequenceSampler(SamplingParams(temperature=0, frequency_penalty=0.6), prompt_ids=[0], vocab_size=3)
    assert [f(logits)[0] for _ in range(3)] == [0, 1, 0]  # frequency counts generated tokens only


def test_logprobs_are_raw_model_logprobs():
    logits = torch.tensor([0.0, 1.0, 2.0])
    s = SequenceSampler(SamplingParams(temperature=0, logprobs=2, repetition_penalty=1.5), [2], 3)
    tok, info = s(logits)
    lp = logits.log_softmax(-1)
    assert info.token_id == tok and math.isclose(info.logprob, lp[tok].item(), rel_tol=1e-6)
    assert [i for i, _ in info.top] == [2, 1]
    out = prompt_logprobs(torch.stack([logits, logits]), [5, 1, 2], 0)
    assert out[0] is None and math.isclose(out[2].logprob, lp[2].item(), rel_tol=1e-6)


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

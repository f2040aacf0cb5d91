"""Engine on tiny random models: cached decoding = full recompute, batching = alone, rows joining and
leaving, prefix reuse, n samples, echo logprobs, context policy, sliding window."""

import pytest
import torch

from llmkit.config import ModelConfig
from llmkit.errors import LlmkitError
from llmkit.generate.engine import Engine
from llmkit.generate.sampling import SamplingParams
from llmkit.model import Transformer

GREEDY = SamplingParams(temperature=0, max_tokens=12, logprobs=0)


def tiny(**kw) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64,
                      pos_encoding="rope", norm="rmsnorm", mlp="swiglu", activation="silu", **kw)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # larger weights: sharper, less tie-prone distributions
        for p in model.parameters():
            p.mul_(5.0)
    return model


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run_alone(model, ids, params=GREEDY) -> list[int]:
    eng = Engine(model, max_batch=1)
    return [o.token_id for o in eng.generate_ids(ids, params)]


@pytest.mark.parametrize("kw", [{}, {"sliding_window": 5}])
def test_cached_decoding_equals_full_recompute(kw):
    model = tiny(**kw)
    ids = prompt(9, 1)
    eng = Engine(model, max_batch=2)
    row = eng.add(ids, GREEDY)
    seq = ids[:]
    with torch.inference_mode():
        for _ in range(12):
            ref = model(torch.tensor([seq]))[0, -1]  # full recompute, no cache
            got = eng.seq(row).logits
            assert (got - ref).abs().max() <= 1e-4
            (out,) = eng.step()
            assert out.token_id == int(ref.argmax())
            seq.append(out.token_id)
            if out.finished:
                break
    assert out.finish_reason == "length"


def test_batch_of_three_equals_each_alone():
    model = tiny()
    prompts = [prompt(5, 2), prompt(17, 3), prompt(11, 4)]
    alone = [run_alone(model, p) for p in prompts]
    eng = Engine(model, max_batch=4)
    rows = [eng.add(p, GREEDY) for p in prompts]
    got = {r: [] for r in rows}
    while eng.running:
        for o in eng.step():
            got[o.row].append(o.token_id)
    assert [got[r] for r in rows] == alone


def test_rows_join_and_leave_between_steps():
    model = tiny()
    a, b, c = prompt(6, 5), prompt(13, 6), prompt(3, 7)
    eng = Engine(model, max_batch=3)
    ra = eng.add(a, GREEDY)
    got = {ra: []}
    for step in range(12):
        if step == 3:
            rb = eng.add(b, GREEDY)
            got[rb] = []
        if step == 5:
            eng.remove(ra)  # a leaves early (e.g. a client disconnected)
            rc = eng.add(c, GREEDY)  # and c takes a row at once
            got[rc] = []
        for o in eng.step():
            got[o.row].append(o.token_id)
    assert got[ra] == run_alone(model, a)[:5]
    assert got[rb] == run_alone(model, b)[:9]
    assert got[rc] == run_alone(model, c)[:7]


def test_prefix_reuse_processes_only_new_tokens():
    model = tiny()
    eng = Engine(model, max_batch=2)
    turn1 = prompt(10, 8)
    out1 = [o.token_id for o in eng.generate_ids(turn1, GREEDY)]
    turn2 = turn1 + out1 + prompt(4, 9)  # the conversation goes on
    row = eng.add(turn2, GREEDY)
    assert eng.seq(row).cached_tokens == len(turn1) + len(out1) - 1  # the last sampled token was never run
    got = []
    while eng.running:
        got += [o.token_id for o in eng.step()]
    assert got == run_alone(model, turn2)


def test_n_samples_share_one_prefill_and_seeds_reproduce():
    model = tiny()
    ids = prompt(12, 10)
    params = SamplingParams(temperature=1.0, max_tokens=8, seed=3)
    eng = Engine(model, max_batch=3)
    rows = [eng.add(ids, params, sample_index=i) for i in range(3)]
    assert [eng.seq(r).cached_tokens for r in rows] == [0, 11, 11]
    got = {r: [] for r in rows}
    while eng.running:
        for o in eng.step():
            got[o.row].append(o.token_id)
    assert got[rows[0]] != got[rows[1]]  # different samples
    for i, r in enumerate(rows):  # each sample = the same seed alone, whatever shares the batch
        assert got[r] == run_alone(model, ids, params.replace(seed=3 + i))


def test_echo_prompt_logprobs():
    model = tiny()
    ids = prompt(8, 11)
    eng = Engine(model, max_batch=1)
    row = eng.add(ids, SamplingParams(temperature=0, max_tokens=1, echo=True, logprobs=2))
    lps = eng.seq(row).prompt_logprobs
    with torch.inference_mode():
        ref = model(torch.tensor([ids]))[0].log_softmax(-1)
    assert lps[0] is None
    for t in range(1, len(ids)):
        assert abs(lps[t].logprob - ref[t - 1, ids[t]].item()) < 1e-4
        assert len(lps[t].top) == 2


def test_stop_ids_and_max_tokens():
    model = tiny()
    ids = prompt(7, 12)
    free = run_alone(model, ids)
    eng = Engine(model, max_batch=1, stop_ids=[free[2]])
    outs = list(eng.generate_ids(ids, GREEDY))
    assert [o.token_id for o in outs] == free[: free.index(free[2]) + 1]
    assert outs[-1].finish_reason == "stop"
    outs = list(eng.generate_ids(ids, GREEDY.replace(ignore_eos=True, max_tokens=4)))
    assert len(outs) == 4 and outs[-1].finish_reason == "length"


def test_context_policy():
    model = tiny()  # max_seq_len 64
    eng = Engine(model, max_batch=1)
    with pytest.raises(LlmkitError, match="prompt is 64 tokens but the context holds 64"):
        eng.add(prompt(64, 13), GREEDY)
    with pytest.raises(LlmkitError, match="empty prompt"):
        eng.add([], GREEDY)
    long = prompt(100, 14)
    row = eng.add(long, GREEDY, truncate=True)
    assert eng.seq(row).truncated == 100 - 52 and eng.seq(row).prompt_ids == long[-52:]
    eng.remove(row)
    outs = list(eng.generate_ids(prompt(60, 15), GREEDY.replace(max_tokens=50, ignore_eos=True)))
    assert len(outs) == 5 and outs[-1].finish_reason == "length"  # the context is full


def test_all_rows_busy_is_a_clear_error():
    eng = Engine(tiny(), max_batch=1)
    eng.add(prompt(3, 16), GREEDY)
    with pytest.raises(LlmkitError, match="all 1 engine rows are busy"):
        eng.add(prompt(3, 17), GREEDY)

"""Engine on tiny random models: cached decoding = full recompute, batching = alone, rows joining and
leaving, prefix reuse, n samples, echo logprobs, context policy, sliding window; batched and chunked
prefill, seeded rows whatever their companions, logits processors, the weight version, a model shared with
another thread."""

import threading

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
            got = eng.request(row).logits  # None before the first step: its prefill runs in step()
            assert got is None or (got - ref).abs().max() <= 1e-4
            (out,) = eng.step()
            assert out.token_id == int(ref.argmax())
            assert abs(out.logprob.logprob - ref.log_softmax(-1)[out.token_id].item()) <= 1e-4
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
    assert eng.request(row).cached_tokens == len(turn1) + len(out1) - 1  # the last sampled token never ran
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
    assert [eng.request(r).cached_tokens for r in rows] == [0, 11, 11]
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
    (out,) = eng.step()  # the prompt is prefilled in the step
    lps = eng.request(row).prompt_logprobs
    assert out.prompt_logprobs is lps
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
    assert eng.request(row).truncated == 100 - 52 and eng.request(row).prompt_ids == long[-52:]
    eng.remove(row)
    outs = list(eng.generate_ids(prompt(60, 15), GREEDY.replace(max_tokens=50, ignore_eos=True)))
    assert len(outs) == 5 and outs[-1].finish_reason == "length"  # the context is full


def test_all_rows_busy_is_a_clear_error():
    eng = Engine(tiny(), max_batch=1)
    eng.add(prompt(3, 16), GREEDY)
    with pytest.raises(LlmkitError, match="all 1 engine rows are busy"):
        eng.add(prompt(3, 17), GREEDY)


# ---------------------------------------------------------------------- batched, chunked prefill
def greedy_reference(model, ids, n) -> list[int]:
    """Greedy tokens by full recompute (no cache, no engine)."""
    seq = list(ids)
    with torch.inference_mode():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(ids):]


def forward_shapes(model) -> list[tuple[int, int]]:
    """(B, T) of every forward of `model` from now on."""
    shapes: list[tuple[int, int]] = []
    model.register_forward_pre_hook(lambda m, args, kw: shapes.append(tuple(args[0].shape)), with_kwargs=True)
    return shapes


def drain(eng, got=None) -> dict[int, list[int]]:
    got = {} if got is None else got
    while eng.running:
        for o in eng.step():
            got.setdefault(o.row, []).append(o.token_id)
    return got


def test_joining_prompts_prefill_together_in_one_forward():
    model = tiny()
    prompts = [prompt(6, 20), prompt(5, 21), prompt(7, 22), prompt(4, 23)]
    eng = Engine(model, max_batch=4)
    rows = [eng.add(prompts[0], GREEDY)]
    got = {}
    for o in eng.step():
        got.setdefault(o.row, []).append(o.token_id)
    shapes = forward_shapes(model)
    rows += [eng.add(p, GREEDY) for p in prompts[1:]]
    outs = eng.step()
    assert shapes == [(3, 7), (4, 1)]  # the three prompts in one padded forward, then one decode of all rows
    assert sorted(o.row for o in outs) == sorted(rows)  # every joining row has its first token at once
    for o in outs:
        got.setdefault(o.row, []).append(o.token_id)
    drain(eng, got)
    assert [got[r] for r in rows] == [greedy_reference(model, p, 12) for p in prompts]


def test_long_prompt_prefills_in_chunks_while_running_rows_decode():
    model = tiny()
    a, b = prompt(5, 24), prompt(20, 25)
    eng = Engine(model, max_batch=2, prefill_chunk=8)
    ra = eng.add(a, GREEDY)
    eng.step()
    shapes = forward_shapes(model)
    rb = eng.add(b, GREEDY)
    per_step = [sorted(o.row for o in eng.step()) for _ in range(3)]
    assert per_step == [[ra], [ra], [ra, rb]]  # a is never stalled; b's first token after 8 + 8 + 4
    assert [s for s in shapes if s[1] > 1] == [(1, 8), (1, 8), (1, 4)]
    eng2 = Engine(model, max_batch=3, prefill_chunk=8)
    shapes.clear()
    rows = [eng2.add(p, GREEDY) for p in (prompt(3, 26), prompt(3, 27), prompt(10, 28))]
    eng2.step()
    assert shapes == [(2, 3), (2, 1)]  # 3 x 8 padded tokens would pass prefill_chunk: the third waits
    got = drain(eng2)
    assert got[rows[2]] == greedy_reference(model, prompt(10, 28), 12)


def test_echo_in_chunks_and_prefill_only():
    model = tiny()
    ids = prompt(11, 29)
    with torch.inference_mode():
        ref = model(torch.tensor([ids]))[0].log_softmax(-1)  # (T, V)
    eng = Engine(model, max_batch=1, prefill_chunk=4)
    shapes = forward_shapes(model)
    row = eng.add(ids, SamplingParams(max_tokens=0, echo=True, logprobs=3))
    outs = [o for _ in range(3) for o in eng.step()]
    assert shapes == [(1, 4), (1, 4), (1, 3)]  # prefill only: no decode forward
    (out,) = outs
    assert out.token_id is None and out.finish_reason == "length" and not eng.running
    lps = out.prompt_logprobs
    assert lps is eng.request(row).prompt_logprobs and len(lps) == len(ids) and lps[0] is None
    for t in range(1, len(ids)):
        assert abs(lps[t].logprob - ref[t - 1, ids[t]].item()) < 1e-4
        assert [i for i, _ in lps[t].top] == ref[t - 1].topk(3).indices.tolist()


# ---------------------------------------------------------------------- rows, seeds, processors
def test_seeded_row_same_tokens_whatever_its_companions():
    model = tiny()
    ids = prompt(8, 30)
    params = SamplingParams(temperature=0.9, top_p=0.9, max_tokens=10, seed=5, ignore_eos=True)
    alone = run_alone(model, ids, params)
    eng = Engine(model, max_batch=4)
    eng.add(prompt(5, 31), SamplingParams(temperature=0, repetition_penalty=1.5, max_tokens=4))
    mid = eng.add(prompt(9, 32), SamplingParams(top_k=5, max_tokens=30))  # unseeded
    row = eng.add(ids, params)
    got = {}
    for step in range(10):
        if step == 2:
            eng.remove(mid)  # rows 0 and 2 run on: not contiguous
        if step == 4:
            eng.add(prompt(6, 33), SamplingParams(seed=5, min_p=0.2), processors=[lambda g, x: x.flip(0)])
        for o in eng.step():
            got.setdefault(o.row, []).append(o.token_id)
    assert got[row] == alone


def test_processors_act_on_their_own_row():
    model = tiny()
    seen = []

    def only_7(generated, logits):
        seen.append(list(generated))
        return torch.full_like(logits, float("-inf")).index_fill(0, torch.tensor([7]), 0.0)

    a, b = prompt(6, 34), prompt(7, 35)
    eng = Engine(model, max_batch=2)
    ra = eng.add(a, GREEDY.replace(max_tokens=4), processors=[only_7])
    rb = eng.add(b, GREEDY)
    got = drain(eng)
    assert got[ra] == [7, 7, 7, 7] and seen == [[], [7], [7, 7], [7, 7, 7]]
    assert got[rb] == greedy_reference(model, b, 12)


def test_n_samples_prefill_the_prompt_once_and_start_together():
    model = tiny()
    ids = prompt(12, 42)
    eng = Engine(model, max_batch=3)
    shapes = forward_shapes(model)
    rows = [eng.add(ids, SamplingParams(max_tokens=3, seed=1), sample_index=i) for i in range(3)]
    assert sorted(o.row for o in eng.step()) == rows
    assert shapes == [(1, 12), (2, 1), (3, 1)]  # the prompt once; the samples' last prompt token; decode


def test_removed_prefix_source_leaves_the_waiting_row_correct():
    model = tiny()
    ids = prompt(12, 36)
    eng = Engine(model, max_batch=2)
    first = eng.add(ids, GREEDY)
    second = eng.add(ids, GREEDY)
    assert eng.request(second).cached_tokens == 11  # waits for the first row's prefill
    eng.remove(first)  # before it ran: the second row prefills its prompt itself
    assert eng.request(second).cached_tokens == 0
    assert drain(eng)[second] == greedy_reference(model, ids, 12)


# ---------------------------------------------------------------------- weights: version, shared model
def test_weight_change_drops_the_prefix_cache():
    model = tiny()
    ids = prompt(10, 37)
    eng = Engine(model, max_batch=2)
    before = [o.token_id for o in eng.generate_ids(ids, GREEDY)]
    row = eng.add(ids, GREEDY)
    assert eng.request(row).cached_tokens == 9  # same weights: the prefix is reused
    eng.remove(row)
    with torch.no_grad():  # an optimizer step, in place
        model.model.layers[0].mlp.down_proj.weight.mul_(-3.0)
    row = eng.add(ids, GREEDY)
    assert eng.request(row).cached_tokens == 0
    after = drain(eng)[row]
    assert after == greedy_reference(model, ids, 12) and after != before


def test_a_model_shared_with_another_thread_gives_logits_in_both():
    """The engine never swaps a module: a plain forward running meanwhile in another thread gets logits."""
    model = tiny()
    x = torch.tensor([prompt(10, 38)])
    with torch.inference_mode():
        want = model(x)
    ids = prompt(9, 39)
    expect = greedy_reference(model, ids, 12)
    bad, stop = [], threading.Event()

    def forwards():
        with torch.inference_mode():
            while not stop.is_set():
                got = model(x)
                if got.shape != want.shape or (got - want).abs().max() > 1e-5:
                    bad.append(tuple(got.shape))

    t = threading.Thread(target=forwards)
    t.start()
    try:
        eng = Engine(model, max_batch=2)
        runs = [[o.token_id for o in eng.generate_ids(ids, GREEDY.replace(echo=True))] for _ in range(5)]
    finally:
        stop.set()
        t.join()
    assert not bad and runs == [expect] * 5


@pytest.mark.gpu
def test_cuda_compiled_decode_equals_eager():
    model = tiny().cuda()
    prompts = [prompt(5, 40), prompt(9, 41)]
    outs = []
    for compile in (False, True):
        eng = Engine(model, max_batch=2, compile=compile)
        rows = [eng.add(p, GREEDY) for p in prompts]
        got = drain(eng)
        outs.append([got[r] for r in rows])
    assert outs[0] == outs[1] == [greedy_reference(model.cpu(), p, 12) for p in prompts]


def test_cpu_compiled_decode_equals_eager_across_attention_buckets():
    """The compiled decode step (fixed shapes; the attended length rounded up to 256, 512, ...) gives the
    eager tokens, for a quantized model (llmkit's kernels as opaque ops) as for a float one, while the
    sequences cross the 256 bucket."""
    from llmkit.generate.engine import attention_bucket
    from llmkit.quant import quantize_model

    assert [attention_bucket(n) for n in (1, 256, 257, 600)] == [256, 256, 512, 1024]
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                      max_seq_len=400, pos_encoding="rope", norm="rmsnorm", mlp="swiglu", activation="silu")
    model = Transformer(cfg).eval()
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    prompts = [prompt(240, 50), prompt(7, 51)]
    for m in (model, quantize_model(Transformer(cfg).eval(), "int4")):
        outs = []
        for compile in (False, True):
            eng = Engine(m, max_batch=2, max_seq_len=300, compile=compile, native=False)  # torch either way
            rows = [eng.add(p, params) for p in prompts]
            got = drain(eng)
            outs.append([got[r] for r in rows])
        assert outs[0] == outs[1]


def test_padding_rows_of_the_embedding_are_never_sampled():
    """A model whose embedding has rows beyond the tokenizer (Qwen2 pads 151,665 tokens to 151,936) must never
    produce those ids: the tokenizer could not decode them. The padding rows' logits are forced highest."""
    import types

    from serve_utils import tiny_tokenizer

    import llmkit.generate.api as gen
    from llmkit.config import ModelConfig
    from llmkit.model import Transformer

    tok = tiny_tokenizer()
    n = tok.vocab_size
    cfg = ModelConfig(vocab_size=n + 8, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=64,
                      max_seq_len=64, pos_encoding="rope", norm="rmsnorm", mlp="swiglu", activation="silu")
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight[n:] = model.lm_head.weight[:n].abs().sum(0) * 10  # padding rows win every argmax
    ids = tok.encode("hello")
    assert model(torch.tensor([ids]))[0, -1].argmax().item() >= n  # without the mask a padding id comes out
    llm = types.SimpleNamespace(model=model, tokenizer=tok, config=cfg, name="padded", generation_defaults={})
    for temperature in (0.0, 1.0):
        r = gen.generate(llm, ids, max_tokens=6, temperature=temperature, seed=0, logprobs=3)
        assert r.token_ids and max(r.token_ids) < n
        assert all(i < n for t in r.logprobs for i, _ in t.top)

"""One request never fails the others (issue 15, points 1 and 5).

Numerical safety: temperatures below 1e-5 are greedy, out-of-range penalties are a 400 naming the field,
and a row whose distribution is degenerate (NaN, +inf, nothing left) takes its argmax. Per-row isolation:
a row whose processor raises, or whose forward fails, finishes with an error while its batch companions
produce exactly the tokens of an independent reference (greedy by full recompute, or the CDF inverted by
hand in plain Python at the row's own uniform draw). Admission: a request is queued whole or not at all.
References are computed here, never taken from an earlier run of llmkit.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import math
import random
import threading
import time

import pytest
import torch

from llmkit.config import ModelConfig
from llmkit.errors import LlmkitError
from llmkit.generate.engine import Engine
from llmkit.generate.sampling import Sampler, SamplingParams, draw
from llmkit.model import Transformer

INF, NAN = float("inf"), float("nan")


# ----------------------------------------------------------------------------------- references
def cdf_draw(logits: list[float], u: float) -> int:
    """The first token whose cumulative softmax probability reaches u * total (plain Python)."""
    z = max(logits)
    probs = [math.exp(x - z) for x in logits]
    total, acc = sum(probs), 0.0
    for i, p in enumerate(probs):
        acc += p
        if acc >= u * total and p > 0:
            return i
    return max(range(len(probs)), key=probs.__getitem__)


def uniforms(seed: int, n: int) -> list[float]:
    """The uniforms a row seeded with `seed` draws, one per token: 1 - random() in (0, 1]."""
    g = random.Random(seed)
    return [1.0 - g.random() for _ in range(n)]


def tiny(vocab: int = 97) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                      max_seq_len=64, pos_encoding="rope", norm="rmsnorm", mlp="swiglu", activation="silu")
    model = Transformer(cfg).eval()
    with torch.no_grad():  # larger weights: sharper, less tie-prone distributions
        for p in model.parameters():
            p.mul_(5.0)
    return model


def greedy_reference(model, ids: list[int], n: int) -> list[int]:
    """Greedy tokens by full recompute (no cache, no engine)."""
    seq = list(ids)
    with torch.inference_mode():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(ids):]


def drain(eng: Engine) -> tuple[dict[int, list[int]], dict[int, object]]:
    """Step until no row runs: each row's tokens, and the finishing StepOutput of each row."""
    got: dict[int, list[int]] = {}
    last: dict[int, object] = {}
    while eng.running:
        for o in eng.step():
            if o.token_id is not None:
                got.setdefault(o.row, []).append(o.token_id)
            if o.finished:
                last[o.row] = o
    return got, last


# ----------------------------------------------------------------------------------- numerical safety
@pytest.mark.parametrize("t", [1e-45, 1e-46, 1e-30, 9e-6])
def test_tiny_temperature_is_greedy(t):
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    s = Sampler(3, 50)
    s.start(0, SamplingParams(temperature=t).validate())
    s.start(1, SamplingParams(temperature=1.0, seed=5))
    s.start(2, SamplingParams(temperature=t, top_p=0.5, repetition_penalty=1.3).validate(), prompt_ids=[4])
    ids, _ = s.sample([0, 1, 2], logits)
    assert ids[0] == int(logits[0].argmax())
    assert ids[1] == cdf_draw(logits[1].tolist(), uniforms(5, 1)[0])
    pen = logits[2].clone()  # the repetition penalty as defined (CTRL): seen token 4 divided / multiplied
    pen[4] = pen[4] / 1.3 if pen[4] > 0 else pen[4] * 1.3
    assert ids[2] == int(pen.argmax())


@pytest.mark.parametrize("kw, field", [
    ({"repetition_penalty": 1e-40}, "repetition_penalty"),
    ({"repetition_penalty": 1e40}, "repetition_penalty"),
    ({"repetition_penalty": 0.009}, "repetition_penalty"), ({"temperature": INF}, "temperature"),
    ({"temperature": 1e3}, "temperature"), ({"temperature": NAN}, "temperature"),
    ({"top_p": NAN}, "top_p"), ({"presence_penalty": -INF}, "presence_penalty"),
])
def test_out_of_range_numbers_are_a_400_naming_the_field(kw, field):
    with pytest.raises(LlmkitError, match=f"invalid sampling parameter {field}=") as e:
        SamplingParams(**kw).validate()
    assert e.value.status == 400 and e.value.param == field


def test_edges_of_the_rule_are_accepted():
    for kw in ({"temperature": 1e-5}, {"temperature": 100.0}, {"repetition_penalty": 1e-2},
               {"repetition_penalty": 1e2}):
        SamplingParams(**kw).validate()
    assert SamplingParams(temperature=9.99e-6).greedy and not SamplingParams(temperature=1e-5).greedy


def test_degenerate_rows_take_their_argmax_and_leave_the_others_alone():
    logits = torch.tensor([[0.0, NAN, 1.0, 0.5],  # NaN: argmax of the rest
                           [0.0, INF, 1.0, INF],  # +inf: the first +inf token
                           [-INF, -INF, -INF, -INF],  # nothing left: the fallback given
                           [0.1, 2.0, 0.3, 1.5]])  # a real distribution: the CDF inverted at u
    u = torch.tensor([0.5, 0.5, 0.5, 0.7])
    got = draw(logits, u, torch.tensor([3, 3, 1, 0])).tolist()
    assert got == [3, 3, 1, cdf_draw(logits[3].tolist(), 0.7)]
    assert draw(logits, u).tolist()[:2] == [2, 1]  # the default fallback: argmax with NaN ignored


def test_processor_producing_nan_or_masking_everything_falls_back_per_row():
    V = 20
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(3))
    s = Sampler(3, V)
    s.start(0, SamplingParams(seed=1), processors=[lambda g, x: torch.full_like(x, NAN)])
    s.start(1, SamplingParams(seed=2), processors=[lambda g, x: torch.full_like(x, -INF)])
    s.start(2, SamplingParams(seed=3, temperature=0.7))
    ids, _ = s.sample([0, 1, 2], logits, [[], [], []])
    raw_best = logits.argmax(dim=-1).tolist()
    assert ids[:2] == raw_best[:2]  # nothing usable left: the model's own argmax
    assert ids[2] == cdf_draw((logits[2] / 0.7).tolist(), uniforms(3, 1)[0])


# ----------------------------------------------------------------------------------- sampler isolation
def test_failing_processor_marks_only_its_row():
    V = 30
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(4))

    def boom(generated, x):
        raise ValueError("broken constraint")

    s = Sampler(3, V)
    s.start(0, SamplingParams(seed=11))
    s.start(1, SamplingParams(seed=12), processors=[boom])
    s.start(2, SamplingParams(temperature=0))
    errors: dict[int, Exception] = {}
    ids, _ = s.sample([0, 1, 2], logits, [[], [], []], errors)
    assert list(errors) == [1] and isinstance(errors[1], ValueError)
    assert ids[0] == cdf_draw(logits[0].tolist(), uniforms(11, 1)[0])
    assert ids[2] == int(logits[2].argmax())
    with pytest.raises(ValueError, match="broken constraint"):  # without `errors`, errors raise
        s.sample([1], logits[1:2], [[]])


def test_failed_batched_step_is_retried_row_by_row_with_the_same_draws(monkeypatch):
    """min_p fails for the batch whenever the hostile row (min_p 0.3) is in it; alone, the other rows never
    call it. They still draw at their own uniforms, step after step."""
    import llmkit.generate.sampling as S

    real = S.apply_min_p

    def fragile(x, m):
        if isinstance(m, torch.Tensor) and bool((m == 0.3).any()):
            raise RuntimeError("kernel failure")
        return real(x, m)

    monkeypatch.setattr(S, "apply_min_p", fragile)
    V = 40
    s = Sampler(3, V)
    s.start(0, SamplingParams(seed=21))
    s.start(1, SamplingParams(seed=22, min_p=0.3))
    s.start(2, SamplingParams(seed=23, temperature=0.5))
    gen = torch.Generator().manual_seed(5)
    for step in range(3):
        logits = torch.randn(3, V, generator=gen)
        errors: dict[int, Exception] = {}
        ids, _ = s.sample([0, 1, 2], logits, None, errors)
        assert list(errors) == [1] and "kernel failure" in str(errors[1])
        assert ids[0] == cdf_draw(logits[0].tolist(), uniforms(21, step + 1)[step])
        assert ids[2] == cdf_draw((logits[2] / 0.5).tolist(), uniforms(23, step + 1)[step])


# ----------------------------------------------------------------------------------- engine isolation
def test_engine_row_with_failing_processor_ends_alone():
    model = tiny()
    a, b, c = [torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (5, 9, 7)]

    def fails_at_third(generated, logits):
        if len(generated) == 2:
            raise ValueError("schema constraint broke")
        return logits

    eng = Engine(model, max_batch=3)
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    ra, rb, rc = eng.add(a, greedy), eng.add(b, greedy, processors=[fails_at_third]), eng.add(c, greedy)
    got, last = drain(eng)
    assert got[ra] == greedy_reference(model, a, 10) and got[rc] == greedy_reference(model, c, 10)
    assert last[ra].finish_reason == last[rc].finish_reason == "length"
    assert last[rb].finish_reason == "error" and isinstance(last[rb].error, ValueError)
    assert len(got[rb]) == 2 and eng.request(rb).finish_reason == "error"
    for r in (ra, rb, rc):
        eng.remove(r)
    assert eng.free_rows == 3 and not eng.running


def test_engine_failed_forward_is_retried_row_by_row():
    """The forward raises whenever it holds the marker token: in the joining prompts' prefill (one hostile
    prompt holds it) and in a decode batch (another hostile row is forced to sample it)."""
    model = tiny()
    MARK = 13

    def hook(module, args, kwargs):
        if bool((args[0] == MARK).any()):
            raise RuntimeError("device fault")

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        gen = torch.Generator().manual_seed(7)
        good = [[t for t in torch.randint(0, 97, (n,), generator=gen).tolist() if t != MARK] for n in (6, 8)]
        handle.remove()
        refs = [greedy_reference(model, p, 8) for p in good]
        handle = model.register_forward_pre_hook(hook, with_kwargs=True)
        assert all(MARK not in r for r in refs)  # the well-behaved rows never feed the marker

        def mark_second(generated, logits):
            return logits if len(generated) != 1 else \
                torch.full_like(logits, -INF).index_fill(0, torch.tensor([MARK]), 0.0)

        greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        eng = Engine(model, max_batch=4)
        r0 = eng.add(good[0], greedy)
        bad_prompt = eng.add([5, MARK, 6], greedy)  # fails in the shared prefill
        bad_decode = eng.add([9, 10, 11], greedy, processors=[mark_second])  # fails in a shared decode
        r1 = eng.add(good[1], greedy)
        got, last = drain(eng)
    finally:
        handle.remove()
    assert got[r0] == refs[0] and got[r1] == refs[1]
    assert last[bad_prompt].finish_reason == "error" and bad_prompt not in got
    assert last[bad_decode].finish_reason == "error" and got[bad_decode][-1] == MARK
    assert "device fault" in str(last[bad_decode].error)


def test_generate_ids_raises_the_rows_error():
    model = tiny()

    def hook(module, args, kwargs):
        raise RuntimeError("device fault")

    eng = Engine(model, max_batch=1)
    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with pytest.raises(RuntimeError, match="device fault"):
            list(eng.generate_ids([1, 2, 3], SamplingParams(temperature=0, max_tokens=3)))
    finally:
        handle.remove()
    assert eng.free_rows == 1 and not eng.running


# ----------------------------------------------------------------------------------- admission
class Idle:
    """A backend that never runs (the scheduler is not started): jobs stay queued."""

    max_rows, max_seq_len = 1, 64


def test_request_queued_whole_or_not_at_all():
    from llmkit.serve.scheduler import Scheduler

    async def go():
        s = Scheduler(Idle(), max_queue=4)
        s.submit([1], [None, None])  # 2 waiting
        three = [([1], [None], None), ([2], [None], None), ([3], [None], None)]
        with pytest.raises(LlmkitError) as e:
            s.submit_many(three)  # 2 + 3 > 4: refused, and none of its prompts stays queued
        assert e.value.status == 429 and s.queue_depth == 2
        with pytest.raises(LlmkitError) as e:
            s.submit_many([([1], [None] * 3, None), ([2], [None] * 2, None)])  # 5 > 4: can never fit
        assert e.value.status == 400 and e.value.param == "prompt" and "never" in str(e.value)
        with pytest.raises(LlmkitError) as e:
            s.submit([1], [None] * 5)
        assert e.value.status == 400 and e.value.param == "n"
        assert s.queue_depth == 2
        jobs, q = s.submit_many(three[:2])  # fits: 4 waiting, indexed in order
        assert [j.index for j in jobs] == [0, 1] and [j.prompt_ids for j in jobs] == [[1], [2]]
        assert s.queue_depth == 4
        s.cancel_jobs(jobs)  # a route failing after submitting takes its jobs back at once
        assert s.queue_depth == 2
        s.submit([7], [None, None])  # the cancelled jobs no longer count
        assert s.queue_depth == 4

    asyncio.run(go())


# ----------------------------------------------------------------------------------- live server
@pytest.fixture(scope="module")
def llm():
    from serve_utils import tiny_llm

    return tiny_llm()


@pytest.fixture(scope="module")
def server(llm, tmp_path_factory):
    from serve_utils import serve

    with serve(llm, tmp_path_factory.mktemp("iso") / "r.sqlite", max_batch=6, max_queue=16) as s:
        yield s


def post(server, body: dict, stream: bool = False):
    """(status, JSON body) or, streamed, (status, the list of parsed `data:` events, [DONE] as None)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    conn.request("POST", "/v1/completions", body=json.dumps(body),
                 headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    try:
        if not stream or r.status != 200:
            return r.status, json.loads(r.read().decode())
        events = []
        for line in r.read().decode().splitlines():
            if line.startswith("data: "):
                data = line[6:].strip()
                events.append(None if data == "[DONE]" else json.loads(data))
        return r.status, events
    finally:
        conn.close()


def wait_idle(server, timeout: float = 30.0) -> None:
    """Nothing running or waiting, and every engine row free."""
    from serve_utils import wait_idle as scheduler_idle

    scheduler_idle(server, timeout)
    engine = server.app.state.scheduler.backend.engine
    assert engine.free_rows == engine.max_batch and not engine.running


def test_well_behaved_stream_survives_hostile_requests_in_its_batch(server, llm):
    """One greedy stream runs while, in the same batch, a request's processor raises (streamed: an error
    event), another's forward fails (non-streamed: 500), a temperature of 1e-45 is served greedily and a
    repetition_penalty of 1e-40 is a 400. The stream's text is the greedy continuation by full recompute."""
    tok = llm.tokenizer
    MARK = 300  # the forward fails on this token
    N = 24
    ids = [t for t in range(400, 412)]
    ref = greedy_reference(llm.model, ids, N)
    assert MARK not in ref + ids
    want = tok.decode(ref, skip_special_tokens=True)
    backend = server.app.state.scheduler.backend
    engine = backend.engine
    crowded: list[int] = []  # rows running when a hostile processor ran

    def raise_at_second(generated, logits):
        crowded.append(len(engine.running))
        if len(generated) == 2:
            raise RuntimeError("broken constraint")
        return logits

    def force_mark(generated, logits):
        crowded.append(len(engine.running))
        return logits if len(generated) != 2 else \
            torch.full_like(logits, -INF).index_fill(0, torch.tensor([MARK]), 0.0)

    hostile = {666: raise_at_second, 667: force_mark}
    add, step = backend.add, backend.step

    def add_hostile(key, prompt_ids, params, processors):
        extra = hostile.get(getattr(params, "seed", None))
        return add(key, prompt_ids, params, tuple(processors or ()) + ((extra,) if extra else ()))

    def slow_step(keys=None):
        time.sleep(0.01)  # the stream lasts long enough for the others to join its batch
        return step(keys)

    def hook(module, args, kwargs):
        if bool((args[0] == MARK).any()):
            raise RuntimeError("device fault")

    handle = llm.model.register_forward_pre_hook(hook, with_kwargs=True)
    backend.add, backend.step = add_hostile, slow_step
    results: dict[str, tuple] = {}
    body = {"model": "tiny", "max_tokens": N, "ignore_eos": True}
    jobs = {
        "good": (dict(body, prompt=ids, temperature=0, stream=True, stream_options={"include_usage": True}),
                 True),
        "raises": (dict(body, prompt=[5, 6, 7], seed=666, stream=True), True),
        "forward": (dict(body, prompt=[8, 9, 10], seed=667), False),
        "tiny_t": (dict(body, prompt=[11, 12], temperature=1e-45, max_tokens=3), False),
        "tiny_pen": (dict(body, prompt=[11, 12], repetition_penalty=1e-40), False),
    }

    def worker(name: str) -> None:
        payload, stream = jobs[name]
        results[name] = post(server, payload, stream)

    try:
        first = threading.Thread(target=worker, args=("good",))
        first.start()
        t0 = time.monotonic()
        while server.app.state.scheduler.running == 0 and time.monotonic() - t0 < 10:
            time.sleep(0.005)
        others = [threading.Thread(target=worker, args=(n,)) for n in jobs if n != "good"]
        for t in others:
            t.start()
        for t in [first, *others]:
            t.join(timeout=120)
    finally:
        backend.add, backend.step = add, step
        handle.remove()

    status, events = results["good"]
    assert status == 200 and events[-1] is None
    chunks = [e for e in events[:-1] if e.get("choices")]
    assert "".join(c["choices"][0]["text"] for c in chunks) == want
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert events[-2]["usage"]["completion_tokens"] == N
    assert not any("error" in e for e in events[:-1])

    status, events = results["raises"]
    assert status == 200 and any("error" in e and "broken constraint" in e["error"]["message"]
                                 for e in events if e)
    status, out = results["forward"]
    assert status == 500 and "device fault" in out["error"]["message"]
    assert max(crowded) >= 2  # the hostile rows shared a step with the stream

    status, out = results["tiny_t"]
    assert status == 200 and out["usage"]["completion_tokens"] >= 1
    t_ref = greedy_reference(llm.model, [11, 12], 3)
    assert MARK not in t_ref
    assert out["choices"][0]["text"] == tok.decode(t_ref, skip_special_tokens=True)
    status, out = results["tiny_pen"]
    assert status == 400 and out["error"]["param"] == "repetition_penalty"
    wait_idle(server)

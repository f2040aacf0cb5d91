"""POST /v1/inside, the chat page's "look inside" panel (issue 12, point 4), on the tiny model of serve_utils.

References: `llmkit.lab.inside.look` / `logit_lens` run here on ids rendered here (the route must give the
same numbers), a plain forward of the model (the SDPA path, not the eager one `look` uses) for the logits, the
answer's tokens encoded on their own, and softmax / entropy / logsumexp written out in float64.
"""

from __future__ import annotations

import threading
import time

import pytest
import requests
import torch
from serve_utils import serve, tiny_llm

import llmkit.serve.inside as inside_mod
from llmkit.lab.inside import logit_lens, look
from llmkit.tokenizer.chat import render_chat

CHAT = [{"role": "system", "content": "You are a pirate."},
        {"role": "user", "content": "Where is the treasure?"},
        {"role": "assistant", "content": "Under the old oak, matey!"}]


@pytest.fixture(scope="module")
def llm():
    return tiny_llm()


@pytest.fixture(scope="module")
def server(llm, tmp_path_factory):
    with serve(llm, tmp_path_factory.mktemp("inside") / "r.sqlite") as s:
        yield s


def post(server, body: dict, timeout: float = 60) -> requests.Response:
    return requests.post(server.url + "/v1/inside", json=body, timeout=timeout)


def test_numbers_are_those_of_look_on_the_rendered_chat(server, llm):
    tok, model = llm.tokenizer, llm.model
    ids = render_chat(tok, CHAT).ids
    ref = look(model, ids)
    lens = logit_lens(model, ref, k=1)
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0].double()  # (T, V): plain forward, SDPA path
    # the answer: its own tokens, then the end-of-turn token
    answer_ids = tok.encode(CHAT[-1]["content"])
    a0 = next(i for i in range(len(ids)) if ids[i:i + len(answer_ids)] == answer_ids)
    a1 = a0 + len(answer_ids) + 1
    assert tok.id_to_text(ids[a1 - 1]) == "<|im_end|>"

    for layer, head in [(0, 2), (1, None), (None, 0)]:
        r = post(server, {"messages": CHAT, "layer": layer, "head": head})
        assert r.status_code == 200, r.text
        j = r.json()
        L, H = llm.config.n_layers, llm.config.n_heads
        shape = (j["n_layers"], j["n_heads"], j["layer"], j["head"])
        assert shape == (L, H, L - 1 if layer is None else layer, head)
        assert j["answer"] == [a0, a1] and j["queries"] == [a0, a1] and j["offset"] == 0
        assert j["tokens"] == [tok.id_to_text(i) for i in ids[:a1]]  # keys: up to the answer's end
        w = torch.tensor(j["attention"]["weights"], dtype=torch.float64)  # (Q, K)
        want = ref.attention(j["layer"], head)[a0:a1, :a1].double()
        assert w.shape == (a1 - a0, a1)
        torch.testing.assert_close(w, want, rtol=1e-3, atol=1e-6)  # 4 significant digits sent
        if head is not None:  # and that is the head itself, not a mean
            assert not torch.allclose(want, ref.attention(j["layer"])[a0:a1, :a1].double(), atol=1e-4)
        torch.testing.assert_close(w.sum(-1), torch.ones(a1 - a0, dtype=torch.float64), rtol=0, atol=1e-3)
        assert j["attention"]["outside"] == [0.0] * (a1 - a0)
        assert bool((w[:, a1:] == 0).all()) and bool((w.triu(a0 + 1) == 0).all())  # causal: no future key

    # the logit lens: each layer's top-1 for answer token t, read at t - 1; the last layer's is the model's
    for row, toks, probs in zip(lens, j["lens"]["tokens"], j["lens"]["probs"]):
        assert toks == [tok.id_to_text(int(i)) for i in row.ids[a0 - 1:a1 - 1, 0]]
        torch.testing.assert_close(torch.tensor(probs, dtype=torch.float64),
                                   row.probs[a0 - 1:a1 - 1, 0].double(), rtol=1e-3, atol=1e-9)
    assert j["lens"]["tokens"][-1] == [tok.id_to_text(int(i)) for i in logits[a0 - 1:a1 - 1].argmax(-1)]

    # the distribution of the first answer token, for the slider
    n = j["next"]
    assert (n["position"], n["id"], n["token"]) == (a0, ids[a0], tok.id_to_text(ids[a0]))
    check_distribution(n, logits[a0 - 1])


def check_distribution(n: dict, row: torch.Tensor) -> None:
    """The slider's data against the row of logits (V,), float64, by hand."""
    top = row.topk(20)
    assert [t["id"] for t in n["top"]] == top.indices.tolist()
    torch.testing.assert_close(torch.tensor([t["logit"] for t in n["top"]], dtype=torch.float64), top.values,
                               rtol=0, atol=1e-4)
    assert abs(n["logit"] - row[n["id"]].item()) < 1e-4
    temps = n["temperatures"]
    assert temps[0] == 0 and temps[-1] == 2 and len(temps) == 41
    assert n["log_z"][0] is None and n["entropy_bits"][0] == 0  # T = 0: greedy, one token for sure
    for T, log_z, h in zip(temps[1:], n["log_z"][1:], n["entropy_bits"][1:]):
        z = row / T
        lz = z.max() + (z - z.max()).exp().sum().log()  # logsumexp by hand
        p = (z - lz).exp()
        assert abs(log_z - lz.item()) < 1e-3 * max(1.0, abs(lz.item())), T
        assert abs(h - (-(p * p.log2()).sum()).item()) < 1e-3, T
        # what the page computes: exp(l / T - log Z) for the top logits = the softmax's values
        page = [torch.tensor(t["logit"] / T - log_z).exp().item() for t in n["top"]]
        torch.testing.assert_close(torch.tensor(page, dtype=torch.float64), p[top.indices], rtol=2e-3,
                                   atol=1e-9)


def test_position_picks_the_distribution(server, llm):
    ids = render_chat(llm.tokenizer, CHAT).ids
    a0, a1 = post(server, {"messages": CHAT}).json()["answer"]
    pos = a1 - 1  # the end-of-turn token: was the end likely?
    j = post(server, {"messages": CHAT, "position": pos, "layer": 0}).json()
    assert j["next"]["position"] == pos and j["next"]["id"] == ids[pos]
    with torch.no_grad():
        row = llm.model(torch.tensor([ids]))[0, pos - 1].double()
    check_distribution(j["next"], row)


def test_bad_requests_are_openai_errors(server, llm):
    ok = {"messages": CHAT}
    cases = [({"messages": []}, "messages"),
             ({"messages": CHAT[:2]}, "messages"),  # no answer to look at
             ({**ok, "layer": llm.config.n_layers}, "layer"),
             ({**ok, "head": llm.config.n_heads}, "head"),
             ({**ok, "layer": -1}, "layer"),
             ({**ok, "layer": "1"}, "layer"),
             ({**ok, "position": 0}, "position"),  # a prompt token
             ({**ok, "position": 10_000}, "position"),
             ({"messages": [{"role": "tool", "content": "x"}, CHAT[-1]]}, "messages.0.role"),
             ({"messages": CHAT[:2] + [{"role": "assistant", "content": " hi" * 600}]}, "messages")]  # long
    for body, param in cases:
        r = post(server, body)
        assert r.status_code == 400, (body, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
        assert err["param"] == param, (body, err)
    r = post(server, {**ok, "model": "nope"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert post(server, {**ok, "model": "tiny"}).status_code == 200


def test_needs_the_api_key(llm, tmp_path):
    with serve(llm, tmp_path / "r.sqlite", api_keys=["sk-x"]) as s:
        assert post(s, {"messages": CHAT}).status_code == 401
        r = requests.post(s.url + "/v1/inside", json={"messages": CHAT}, timeout=60,
                          headers={"Authorization": "Bearer sk-x"})
        assert r.status_code == 200


def test_generation_proceeds_while_a_look_runs(server, monkeypatch):
    """A look held inside its forward does not hold up chat completions; looks run on the inspector's own
    thread, wait for each other (one forward at a time), are refused past MAX_PENDING, and the last look is
    reused when only the layer or head changes."""
    entered, release = threading.Event(), threading.Event()
    calls: list[str] = []

    def held_look(model, ids):
        calls.append(threading.current_thread().name)
        entered.set()
        assert release.wait(60)
        return look(model, ids)

    monkeypatch.setattr(inside_mod, "look", held_look)
    other = CHAT[:2] + [{"role": "assistant", "content": "Nowhere."}]  # not the cached conversation
    replies: dict[int, requests.Response] = {}

    def ask(i: int, body: dict) -> None:
        replies[i] = post(server, body, timeout=120)

    first = threading.Thread(target=ask, args=(0, {"messages": other}))
    first.start()
    assert entered.wait(30)
    t0 = time.monotonic()
    r = requests.post(server.url + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
    assert first.is_alive() and 0 not in replies  # the look is still held: generation did not wait for it
    assert time.monotonic() - t0 < 30
    # more looks wait behind the held one; past MAX_PENDING the inspector says busy
    waiting = [threading.Thread(target=ask, args=(i, {"messages": other, "layer": 0}))
               for i in range(1, inside_mod.MAX_PENDING)]
    for t in waiting:
        t.start()
    app_inspector_pending = lambda: server.app.state.inspector.pending  # noqa: E731
    deadline = time.monotonic() + 30
    while app_inspector_pending() < inside_mod.MAX_PENDING and time.monotonic() < deadline:
        time.sleep(0.02)
    busy = post(server, {"messages": other})
    assert busy.status_code == 429 and busy.json()["error"]["code"] == "rate_limit_exceeded"
    release.set()
    for t in [first, *waiting]:
        t.join(60)
    assert all(replies[i].status_code == 200 for i in range(inside_mod.MAX_PENDING))
    assert calls == ["llmkit-inside_0"]  # one forward, on the inspector's thread; the rest reused it
    assert replies[1].json()["layer"] == 0 and replies[0].json()["layer"] == 1


def test_long_answers_are_windowed(server, llm, monkeypatch):
    """With a window smaller than the conversation: rows follow `position`, keys are the last WINDOW tokens,
    and `outside` is the weight on the keys left out (each row still sums to 1 with it)."""
    monkeypatch.setattr(inside_mod, "WINDOW", 4)
    server.app.state.inspector._last = None  # no view cut with the usual window
    ids = render_chat(llm.tokenizer, CHAT).ids
    ref = look(llm.model, ids)
    a0, a1 = post(server, {"messages": CHAT}).json()["answer"]
    assert a1 - a0 > 4
    j = post(server, {"messages": CHAT, "position": a1 - 2, "layer": 1, "head": 3}).json()
    q0, q1 = a1 - 5, a1 - 1  # 4 rows ending at the position
    assert j["queries"] == [q0, q1] and j["offset"] == q1 - 4 and j["next"]["position"] == a1 - 2
    full = ref.attention(1, 3).double()
    w = torch.tensor(j["attention"]["weights"], dtype=torch.float64)
    torch.testing.assert_close(w, full[q0:q1, q1 - 4:q1], rtol=1e-3, atol=1e-6)
    outside = torch.tensor(j["attention"]["outside"], dtype=torch.float64)
    torch.testing.assert_close(outside, full[q0:q1, :q1 - 4].sum(-1), rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(w.sum(-1) + outside, torch.ones(4, dtype=torch.float64), rtol=0, atol=1e-3)
    assert j["tokens"] == [llm.tokenizer.id_to_text(i) for i in ids[q1 - 4:q1]]
    assert all(len(row) == 4 for row in j["lens"]["tokens"])

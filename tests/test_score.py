"""The one log-prob scorer (llmkit.score) against transformers: tiny random HF models are the reference,
loaded into llmkit from their saved folders; every expected number is computed by hand from transformers'
logits (log_softmax + gather) or by transformers' own loss (HF's sliding-window perplexity recipe)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from llmkit.checkpoint import load_hf_dir  # noqa: E402
from llmkit.errors import LlmkitError  # noqa: E402
from llmkit.score import (  # noqa: E402
    perplexity,
    score,
    sequence_logprobs,
    token_logprobs,
    topk_logprobs,
)

V = 128
TINY = dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=96, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(**TINY),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64),
    "mistral_sliding": lambda: transformers.MistralConfig(**TINY, sliding_window=5),
}


def make_pair(family: str, tmp_path):
    """(transformers model, the same weights loaded by llmkit), both in eval mode, fp32 on CPU."""
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(FAMILIES[family]()).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(tmp_path / family)
    _, model = load_hf_dir(tmp_path / family)
    return hf, model.eval()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_pair("llama", tmp_path_factory.mktemp("hf"))


def rand_ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, V, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def hf_token_logprobs(hf, ctx: list[int], cont: list[int]) -> tuple[list[float], list[bool]]:
    """By hand: logprob and is-argmax of each continuation token from transformers' logits of ctx + cont."""
    full = torch.tensor([ctx + cont])
    logp = hf(full).logits[0].float().log_softmax(-1)  # (T, V)
    rows = logp[len(ctx) - 1 : len(ctx) + len(cont) - 1]  # (K, V): row j predicts cont[j]
    tgt = torch.tensor(cont)
    return rows.gather(1, tgt[:, None])[:, 0].tolist(), (rows.argmax(-1) == tgt).tolist()


@torch.no_grad()
def hf_greedy(hf, ctx: list[int], n: int) -> list[int]:
    out = list(ctx)
    for _ in range(n):
        out.append(int(hf(torch.tensor([out])).logits[0, -1].argmax()))
    return out[len(ctx) :]


def requests(hf) -> list[tuple[list[int], list[int]]]:
    """Shared and lone contexts of mixed lengths; one-token and multi-token continuations; a greedy one."""
    a, b, c = rand_ids(20, 1), rand_ids(7, 2), rand_ids(1, 3)
    return [
        (a, rand_ids(5, 10)),
        (b, rand_ids(3, 11)),
        (a, rand_ids(1, 12)),
        (a, hf_greedy(hf, a, 4)),  # every token the argmax: is_greedy
        (c, rand_ids(9, 13)),
        (b, rand_ids(1, 14)),
        (a, rand_ids(12, 15)),
        (rand_ids(30, 4), hf_greedy(hf, rand_ids(30, 4), 1)),
    ]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_score_matches_transformers_by_hand(family, tmp_path):
    hf, model = make_pair(family, tmp_path)
    reqs = requests(hf)
    got = score(model, reqs, batch_size=4, per_token=True)
    assert len(got) == len(reqs)
    for (ctx, cont), s in zip(reqs, got):
        lps, hits = hf_token_logprobs(hf, ctx, cont)
        assert s.n_tokens == len(cont)
        np.testing.assert_allclose(s.token_logprobs, lps, atol=1e-4)
        assert s.logprob == pytest.approx(sum(lps), abs=1e-4)
        assert s.is_greedy == all(hits)
    assert got[3].is_greedy and got[7].is_greedy
    assert not got[0].is_greedy  # random tokens under a random model


def test_shared_context_and_batching_equal_scoring_alone(llama):
    hf, model = llama
    reqs = requests(hf)
    together = score(model, reqs, batch_size=16)
    for bs in (1, 3):
        for a, b in zip(score(model, reqs, batch_size=bs), together):
            assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
            assert a.is_greedy == b.is_greedy and a.n_tokens == b.n_tokens and a.token_logprobs is None
    alone = [score(model, [r], batch_size=1)[0] for r in reqs]
    for a, b in zip(alone, together):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)


def test_shared_context_runs_once(llama):
    """4 continuations of one 20-token context: the model sees the context once, not 4 times."""
    _, model = llama
    ctx = rand_ids(20, 5)
    conts = [rand_ids(3, 20 + i) for i in range(4)]
    seen: list[int] = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, i, o: seen.append(int(i[0].numel())))
    try:
        score(model, [(ctx, k) for k in conts], batch_size=8)
        assert sum(seen) == 20 + 4 * (3 - 1)  # the context once, then each continuation but its last token
        seen.clear()
        score(model, [(ctx, [k[0]]) for k in conts], batch_size=8)  # one-token answers: one forward
        assert seen == [20]
    finally:
        hook.remove()


def test_context_longer_than_batch_and_model_limit(llama):
    hf, model = llama
    long_ctx = rand_ids(60, 6)  # 60 + 5 - 1 = 64 = the model's context: fits alone, not with a longer answer
    reqs = [(long_ctx, rand_ids(5, 30)), (rand_ids(3, 7), rand_ids(30, 31)), (long_ctx, rand_ids(2, 32))]
    got = score(model, reqs, batch_size=8)
    for (ctx, cont), s in zip(reqs, got):
        assert s.logprob == pytest.approx(sum(hf_token_logprobs(hf, ctx, cont)[0]), abs=1e-4)
    with pytest.raises(LlmkitError, match="do not fit"):
        score(model, [(long_ctx, rand_ids(6, 33))])
    with pytest.raises(LlmkitError, match="empty context"):
        score(model, [([], [5])])
    with pytest.raises(LlmkitError, match="empty continuation"):
        score(model, [([5], [])])
    with pytest.raises(LlmkitError, match="token ids"):
        score(model, [([5], [V])])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("window, stride", [(16, 16), (16, 15), (16, 6), (64, 64)])
def test_perplexity_matches_transformers_sliding_window_recipe(family, window, stride, tmp_path):
    """HF's "perplexity of fixed-length models" loop, with transformers' own loss, is the reference."""
    hf, model = make_pair(family, tmp_path)
    ids = torch.tensor([rand_ids(53, 8)])  # (1, 53)
    nll, n, prev_end = 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, ids.shape[1], stride):
            end = min(begin + window, ids.shape[1])
            trg = end - prev_end
            x = ids[:, begin:end]
            y = x.clone()
            y[:, :-trg] = -100
            k = int((y[:, 1:] != -100).sum())  # transformers shifts the labels inside
            nll += float(hf(x, labels=y).loss) * k
            n += k
            prev_end = end
            if end == ids.shape[1]:
                break
    got = perplexity(model, ids[0].tolist(), window=window, stride=stride, batch_size=3)
    assert got.tokens == n == (52 if stride < window else 52 - (math.ceil(53 / window) - 1))
    assert got.nll == pytest.approx(nll, rel=1e-5)
    assert got.ppl == pytest.approx(math.exp(nll / n), rel=1e-5)


def test_perplexity_rejects_bad_windows(llama):
    _, model = llama
    for kw in (dict(window=65), dict(window=1), dict(window=8, stride=9), dict(window=8, stride=0)):
        with pytest.raises(LlmkitError):
            perplexity(model, list(range(3, 40)), **kw)
    with pytest.raises(LlmkitError, match="2 tokens"):
        perplexity(model, [5])


def test_sequence_logprobs_masked_sums_with_grad_and_only_scored_rows_through_the_head(llama):
    hf, model = llama
    ids = torch.tensor([rand_ids(12, 40), rand_ids(9, 41) + [0, 0, 0]])  # (2, 12), row 1 right-padded
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[0, 5:] = True  # an "answer" of 7 tokens
    mask[1, 0:9] = True  # every real token (index 0 is never scored)
    with torch.no_grad():
        want = []
        for r, n in ((0, 12), (1, 9)):
            logp = hf(ids[r : r + 1, :n]).logits[0].log_softmax(-1)  # (n, V)
            t = [i for i in range(1, n) if mask[r, i]]
            want.append(sum(float(logp[i - 1, ids[r, i]]) for i in t))
    rows: list[int] = []
    hook = model.lm_head.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))
    try:
        got = sequence_logprobs(model, ids, mask)  # (2,)
    finally:
        hook.remove()
    assert got.shape == (2,) and got.dtype == torch.float32
    torch.testing.assert_close(got, torch.tensor(want), atol=1e-4, rtol=0)
    assert rows == [7 + 8]  # only the scored positions reach the head

    got.sum().backward()  # differentiable: the same gradient as the full-logits computation
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logp = model(ids[:, :-1]).log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]  # (2, 11)
    (logp * mask[:, 1:]).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-5, rtol=1e-4)
    model.zero_grad()


def test_token_and_topk_logprobs_by_hand():
    logits = torch.randn(2, 3, 11, generator=torch.Generator().manual_seed(0)).bfloat16()  # (2, 3, V)
    targets = torch.randint(0, 11, (2, 3), generator=torch.Generator().manual_seed(1))
    ref = logits.double().log_softmax(-1)
    got = token_logprobs(logits, targets)
    assert got.dtype == torch.float32 and got.shape == (2, 3)
    torch.testing.assert_close(got.double(), ref.gather(-1, targets[..., None])[..., 0], atol=1e-5, rtol=0)
    top = topk_logprobs(logits, 4)
    srt, idx = ref.sort(-1, descending=True)
    torch.testing.assert_close(top.values.double(), srt[..., :4], atol=1e-5, rtol=0)
    assert top.values.dtype == torch.float32 and top.ids.shape == (2, 3, 4)
    assert torch.equal(ref.gather(-1, top.ids), srt[..., :4])


def test_pretrain_eval_loss_matches_transformers(llama):
    """pretrain's val loss (now from the scorer) = mean token cross-entropy from transformers' logits."""
    from llmkit.train.data import eval_windows
    from llmkit.train.pretrain import evaluate_lm

    hf, model = llama
    shard = np.array(rand_ids(50, 9), dtype=np.uint16)
    wins = eval_windows([shard], 16)  # 16 + 1 tokens overlapping by one; the last one shorter
    nll = 0.0
    with torch.no_grad():
        for w in wins:
            x = torch.tensor(w[None].astype(np.int64))
            nll += float(hf(x, labels=x).loss) * (len(w) - 1)
    res = evaluate_lm(model, wins, bytes_per_token=2.0, batch_size=2, device=torch.device("cpu"))
    assert res["val_tokens"] == 49
    assert res["val_loss"] == pytest.approx(nll / 49, rel=1e-5)
    assert res["val_ppl"] == pytest.approx(math.exp(nll / 49), rel=1e-5)
    assert res["val_bpb"] == pytest.approx(nll / 49 / (math.log(2) * 2.0), rel=1e-5)

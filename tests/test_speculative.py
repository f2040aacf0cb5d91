"""Speculative decoding by prompt lookup (Engine(speculative=k)) and by a draft model
(Engine.set_draft_model): drafts verified in one forward give the tokens plain decoding gives (greedy,
seeded), the exact sampling distribution (counted on a small vocabulary against probabilities computed from
full forwards), and stop where plain decoding stops."""

import collections
import math

import pytest
import torch

from llmkit.config import ModelConfig
from llmkit.generate.engine import Engine, PromptLookup
from llmkit.generate.sampling import SamplingParams
from llmkit.model import Transformer

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(vocab: int = 97, scale: float = 5.0, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                      max_seq_len=128, pos_encoding="rope", norm="rmsnorm", mlp="swiglu", activation="silu")
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    return model


def spec_engine(model, **kw) -> Engine:
    """An engine drafting after 1-token matches too: a random model repeats itself less than a real one."""
    eng = Engine(model, **kw)
    eng.lookup_min_n = 1
    return eng


def tokens(eng: Engine, ids: list[int], params: SamplingParams) -> list[int]:
    return [o.token_id for o in eng.generate_ids(ids, params)]


def test_prompt_lookup_drafts_what_followed_the_last_ngram():
    look = PromptLookup(max_n=3)
    assert look.draft([5, 1, 2, 3, 4, 9, 8, 1, 2, 3], [], 3) == [4, 9, 8]  # "1 2 3" seen before: then 4 9 8
    look = PromptLookup(max_n=3, min_n=1)
    assert look.draft([1, 2, 7, 2], [], 4) == [7, 2]  # no 3- or 2-gram match: "2" -> what followed it
    assert PromptLookup().draft([1, 2, 7, 2], [], 4) == []  # by default a 2-gram at least
    look = PromptLookup()
    assert look.draft([1, 2, 3], [], 4) == []  # nothing seen twice
    look = PromptLookup()
    text = [4, 5, 6, 4, 5]
    assert look.draft(text, [], 2) == [6, 4]
    assert look.draft(text, [6], 2) == [4, 5]  # the index grows with the output: latest "4 5 6" -> "4 5"


def test_greedy_speculative_decoding_gives_plain_decodings_tokens():
    model = tiny()
    ids = [3, 14, 15, 92, 65, 35, 3, 14, 15, 92, 65, 35, 3, 14]  # a prompt that repeats itself
    params = SamplingParams(temperature=0, max_tokens=40)
    plain = tokens(Engine(model, max_batch=1), ids, params)
    for k in (1, 4, 8):
        eng = spec_engine(model, max_batch=1, speculative=k)
        row = eng.add(ids, params)
        got = []
        while eng.running:
            got += [o.token_id for o in eng.step() if o.row == row]
        q = eng.request(row)
        assert got == plain, k
        assert q.accepted > 0 and q.drafted >= q.accepted  # drafts were taken: the path ran


def test_batched_rows_with_and_without_drafts_and_seeded_sampling_match_plain_decoding():
    model = tiny()
    prompts = [[3, 14, 15, 92, 65, 3, 14, 15], [7, 7, 7, 7], [1, 2, 3, 4, 5, 6], [9, 8, 9, 8, 9]]
    greedy = SamplingParams(temperature=0, max_tokens=24)
    seeded = SamplingParams(temperature=1.0, top_k=20, max_tokens=24, seed=1234)
    for params in (greedy, seeded):
        want = [tokens(Engine(model, max_batch=1), p, params) for p in prompts]
        eng = spec_engine(model, max_batch=4, speculative=4)
        rows = [eng.add(p, params) for p in prompts]
        got = {r: [] for r in rows}
        while eng.running:
            for o in eng.step():
                got[o.row].append(o.token_id)
        assert [got[r] for r in rows] == want
        assert sum(eng.request(r).accepted for r in rows) > 0


def test_a_stop_token_inside_accepted_drafts_ends_the_answer_there():
    model = tiny()
    ids = [3, 14, 15, 92, 65, 35, 3, 14, 15, 92, 65, 35, 3, 14]
    plain = tokens(Engine(model, max_batch=1), ids, SamplingParams(temperature=0, max_tokens=40))
    stop = plain[len(plain) // 2]
    params = SamplingParams(temperature=0, max_tokens=40, stop_ids=[stop])
    want = plain[: plain.index(stop) + 1]
    assert tokens(spec_engine(model, max_batch=1, speculative=6), ids, params) == want


def test_a_draft_model_gives_plain_decodings_tokens():
    """Greedy drafts from another model: the target's own greedy answer, whether the drafter is the same
    model quantized harder (int8: most drafts taken) or an unrelated model (few taken); several rows at
    once, a row reused by a new request, and a vocabulary mismatch refused in one line."""
    import copy

    from llmkit.errors import LlmkitError
    from llmkit.quant import quantize_model

    model = tiny()
    prompts = [[3, 14, 15, 92, 65, 35, 3, 14], [7, 7, 1, 2, 9], list(range(20, 50))]
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    plain = [tokens(Engine(model, max_batch=1), p, params) for p in prompts]
    for draft, most in ((quantize_model(copy.deepcopy(model), "int8"), True), (tiny(seed=1), False)):
        eng = Engine(model, max_batch=2, speculative=4)
        eng.set_draft_model(draft)
        rows = [eng.add(p, params) for p in prompts[:2]]
        got = {r: [] for r in rows}
        while eng.running:
            for o in eng.step():
                got[o.row].append(o.token_id)
        assert [got[r] for r in rows] == plain[:2]
        taken = sum(eng.request(r).accepted for r in rows)
        drafted = sum(eng.request(r).drafted for r in rows)
        assert drafted > 0 and (taken > drafted // 2 if most else taken < drafted // 2), (taken, drafted)
        for r in rows:
            eng.remove(r)
        assert tokens(eng, prompts[2], params) == plain[2]  # a reused row: the drafter forgets the old text
    with pytest.raises(LlmkitError, match="same tokenizer"):
        Engine(model, max_batch=1, speculative=2).set_draft_model(tiny(vocab=50))


@pytest.mark.parametrize("drafter", ["lookup", "model"])
def test_sampled_tokens_follow_the_models_distribution_by_counting(drafter):
    """Vocabulary of 4: the triple (t1, t2, t3) after a fixed prompt, sampled 4,000 times with drafts (t3
    comes from a draft's logits whenever t2 was the draft), against P(t1) P(t2 | t1) P(t3 | t1 t2) from full
    forwards; a chi-square test at the 0.1 % level (63 degrees of freedom)."""
    V = 4
    model = tiny(vocab=V, scale=2.0)
    ids = [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    with torch.inference_mode():
        def probs(seq):
            return model(torch.tensor([ids + seq]))[0, -1].double().softmax(-1)
        joint = torch.zeros(V, V, V, dtype=torch.float64)
        p1 = probs([])
        for a in range(V):
            p2 = probs([a])
            for b in range(V):
                joint[a, b] = p1[a] * p2[b] * probs([a, b])
    params = SamplingParams(temperature=1.0, max_tokens=3, ignore_eos=True)
    eng = spec_engine(model, max_batch=16, speculative=2)
    if drafter == "model":  # another model's greedy drafts: some taken, some not
        eng.set_draft_model(tiny(vocab=V, scale=2.0, seed=1))
    counts: collections.Counter = collections.Counter()
    accepted = 0
    for _ in range(250):
        rows = [eng.add(ids, params) for _ in range(16)]
        seqs = {r: [] for r in rows}
        while eng.running:
            for o in eng.step():
                seqs[o.row].append(o.token_id)
        for r in rows:
            counts[tuple(seqs[r])] += 1
            accepted += eng.request(r).accepted
            eng.remove(r)
    total = sum(counts.values())
    assert total == 4000 and all(len(k) == 3 for k in counts)
    expected = total * joint
    chi2 = sum((counts[(a, b, c)] - expected[a, b, c].item()) ** 2 / expected[a, b, c].item()
               for a in range(V) for b in range(V) for c in range(V))
    assert accepted > total // 10  # the third token often came from a draft's logits
    assert chi2 < 103.4, chi2  # chi-square(63) at p = 0.001
    assert math.isclose(joint.sum().item(), 1.0, rel_tol=1e-9)


@pytest.mark.slow
def test_real_model_rewrite_is_the_same_and_takes_drafts(smollm2_gguf, capsys):
    """SmolLM2 (as loaded by default: int4 kernels) asked to repeat a sentence: the greedy answer with
    --speculative equals the plain one, drafts are taken, and the CLI flag is checked."""
    import llmkit
    from llmkit.cli import main
    from llmkit.generate.api import get_engine

    llm = llmkit.load(smollm2_gguf, device="cpu")
    text = ("The quick brown fox jumps over the lazy dog while the farmer watches from the old wooden "
            "fence near the river.")
    msgs = [{"role": "user", "content": f"Repeat this sentence exactly: {text}"}]
    plain = llm.chat(msgs, temperature=0, max_tokens=40, speculative=0)
    fast = llm.chat(msgs, temperature=0, max_tokens=40, speculative=6)
    assert fast.token_ids == plain.token_ids and "lazy dog" in str(fast)
    assert "draft_tokens" not in plain.timings
    assert fast.timings["accepted_draft_tokens"] > 0  # drafts were taken (bench/speculative.py: the rates)
    eng = get_engine(llm)
    assert eng.speculative == 6
    assert main(["generate", str(smollm2_gguf), "x", "--speculative", "-1"]) == 1
    assert "--speculative -1" in capsys.readouterr().err


def test_serve_with_a_draft_model_answers_as_without(tmp_path):
    """create_app(draft_model=...) (`llmkit serve --draft-model`): every lane's engine drafts with the model,
    the greedy answers are the plain server's (the openai client's parsed text and logprobs), and drafts
    are taken (a draft model equal to the target: all of them)."""
    import copy

    import openai
    from serve_utils import serve, tiny_llm

    llm = tiny_llm()
    calls = []

    def answers(**kw) -> list:
        with serve(llm, tmp_path / "r.sqlite", max_batch=2, **kw) as s:
            engine = s.app.state.scheduler.backend.engine
            if kw:
                assert engine.speculative == 4 and engine.draft is not None  # 4 by default with a draft model
                real = engine.draft.draft
                engine.draft.draft = lambda row, text, k: calls.append(k) or real(row, text, k)
            client = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=60)
            out = []
            for prompt in ("Once upon a time", "The capital of France is"):
                r = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0,
                                              logprobs=1)
                out.append((r.choices[0].text, r.choices[0].logprobs.tokens))
            return out

    plain = answers()
    assert answers(draft_model=copy.deepcopy(llm.model)) == plain
    assert calls and set(calls) <= {1, 2, 3, 4}


def test_serve_cli_takes_draft_model(capsys):
    """`llmkit serve --draft-model M` parses (a bad --speculative beside it is refused before any load)."""
    from llmkit.cli import main

    assert main(["serve", "no-such-model", "--draft-model", "no-such-draft", "--speculative", "-1"]) == 1
    assert "--speculative -1" in capsys.readouterr().err

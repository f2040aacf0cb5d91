"""generate / chat / stream on the real default model (SmolLM2-135M-Instruct): stop strings across token
boundaries, streaming = generate, batches = alone, prefix reuse in chat, quantized answers and logits."""


import pytest
import torch

from llmkit.errors import LlmkitError
from llmkit.generate.api import get_engine

pytestmark = pytest.mark.slow
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def llm(smollm2_gguf):
    import llmkit

    # floats, as asked: these tests pin the engine's semantics (batching, streaming, seeds), which the
    # default int4 load keeps but its bfloat16 activations make near-ties fragile (tests/test_quant_stream.py)
    return llmkit.load(smollm2_gguf, device="cpu", dtype="float32")


def test_chat_answers_paris(llm):
    res = llm.chat(QUESTION, temperature=0, max_tokens=24)
    assert "Paris" in str(res)
    assert res.usage["prompt_tokens"] > 10 and res.usage["completion_tokens"] == len(res.token_ids)


def test_stop_string_split_across_tokens_stops_and_is_not_emitted(llm):
    free = llm.generate("The capital of France is", temperature=0, max_tokens=16)
    ids = free.token_ids
    tok = llm.tokenizer
    # a stop string made of the end of one token and the start of the next
    for i in range(2, len(ids) - 1):
        a, b = tok.decode(ids[:i]), tok.decode(ids[: i + 1])
        left, right = tok.decode([ids[i - 1]]), b[len(a):]
        if len(left.strip()) >= 2 and len(right.strip()) >= 2 and b.startswith(a):
            stop = left[-2:] + right[:2]
            break
    else:
        pytest.skip("no token pair to split a stop string across")
    assert stop in free.text
    res = llm.generate("The capital of France is", temperature=0, max_tokens=16, stop=[stop])
    assert res.finish_reason == "stop"
    assert res.text == free.text[: free.text.index(stop)]
    assert stop not in res.text


def test_stream_deltas_equal_generate_text(llm):
    kw = dict(temperature=0.8, seed=5, max_tokens=20)
    s = llm.stream("Il était une fois", **kw)
    deltas = list(s)
    full = llm.generate("Il était une fois", **kw)
    assert "".join(deltas) == full.text == s.result.text
    assert s.result.token_ids == full.token_ids  # same seed -> same tokens


def test_batch_equals_each_alone_and_seeds(llm):
    prompts = ["Bonjour, je m'appelle", "The three primary colors are", "def fibonacci(n):"]
    batch = llm.generate(prompts, temperature=0, max_tokens=6)
    alone = [llm.generate(p, temperature=0, max_tokens=6).token_ids for p in prompts]
    assert [r.token_ids for r in batch] == alone
    a = llm.generate("Once upon a time", temperature=1.0, seed=11, max_tokens=5, n=2)
    b = llm.generate("Once upon a time", temperature=1.0, seed=11, max_tokens=5, n=2)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]


def test_chat_turn_reuses_cached_prefix(llm):
    first = llm.chat(QUESTION, temperature=0, max_tokens=12)
    convo = QUESTION + [{"role": "assistant", "content": first.text},
                        {"role": "user", "content": "And of Italy?"}]
    second = llm.chat(convo, temperature=0, max_tokens=12)
    assert second.usage["cached_tokens"] >= first.usage["prompt_tokens"]


def test_logprobs_and_echo(llm):
    res = llm.generate("The capital of France is", temperature=0, max_tokens=3, logprobs=2, echo=True)
    assert len(res.logprobs) == 3 and all(len(t.top) == 2 for t in res.logprobs)
    assert res.logprobs[0].token_id == res.logprobs[0].top[0][0]  # greedy picks the top alternative
    assert res.prompt_logprobs[0] is None and len(res.prompt_logprobs) == res.usage["prompt_tokens"]


def test_bad_parameters_and_context(llm):
    with pytest.raises(LlmkitError, match="temperature"):
        llm.generate("x", temperature=-1)
    with pytest.raises(LlmkitError, match="top_p"):
        llm.generate("x", top_p=0)
    with pytest.raises(LlmkitError, match="max_tokens"):
        llm.generate("x", max_tokens=0)
    eng = get_engine(llm)
    with pytest.raises(LlmkitError, match="context holds"):
        llm.generate([1] * eng.capacity, max_tokens=4)


@pytest.mark.parametrize("mode, max_ppl_ratio", [("int8", 1.03), ("int4", 1.02)])
def test_quantized_logits_close_and_answers_paris(llm, mode, max_ppl_ratio, shared_data, smollm2_gguf):
    """What a user runs: the Q4_1 file loaded straight into int8 / int4 (the int4 nibbles are the file's own),
    against the float32 model. (Quantizing the float32 copy again with min/max groups lands on an exact tie
    between "The" and "L" for the first answer token: the float model's own margin is 0.08 nats.)"""
    import llmkit

    text = sorted((shared_data / "corpus" / "fr-nouvelles19").glob("*.txt"))[0].read_text()[:4000]
    ids = torch.tensor([llm.tokenizer.encode(text)[:256]])
    q = llmkit.load(smollm2_gguf, device="cpu", quantize=mode)
    with torch.inference_mode():
        ref, got = llm.model(ids)[0], q.model(ids)[0]  # (T, V)
    nll = [torch.nn.functional.cross_entropy(x[:-1], ids[0, 1:]).item() for x in (ref, got)]
    ratio = float(torch.tensor(nll[1] - nll[0]).exp())
    # measured on this window: int8 ppl x1.01, int4 (int8 head) x1.00; max |logit diff| 3-5 (logits up to 40)
    assert ratio < max_ppl_ratio
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.8
    assert "Paris" in str(q.chat(QUESTION, temperature=0, max_tokens=24))

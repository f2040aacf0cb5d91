"""The text labs (llmkit/lab/text.py, bpe.py, sampling.py) against hand computations: entropy of known
distributions, trigram add-k probabilities on a 5-sentence corpus, BPE merges on a tiny corpus, the per-word
perplexity of an LLM, and the sampling measures. Models here are tiny and random; the real model only runs
in the labs themselves (tests/test_lab_runs.py, the notebooks)."""

from __future__ import annotations

import math
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from llmkit.errors import LlmkitError
from llmkit.lab.bpe import _whole_char, merge_steps, pair_counts, segment, show
from llmkit.lab.inside import entropy_bits, softmax_t
from llmkit.lab.sampling import Setting, distinct_n, repetition, run_setting
from llmkit.lab.text import (
    count_words,
    fit_trigram,
    llm_sentence_logprobs,
    ngram_units,
    per_word_surprisal,
    sentences_in_context,
    split_sentences,
    token_words,
    unseen_contexts,
    word_perplexity,
)
from llmkit.tokenizer import Tokenizer
from llmkit.tokenizer.train import MergeStep


# ---------------------------------------------------------------------------------------- entropy
def test_entropy_of_known_distributions():
    assert entropy_bits(torch.full((4,), 0.25)) == pytest.approx(2.0)  # uniform over 4: 2 bits
    assert entropy_bits(torch.full((1024,), 1 / 1024)) == pytest.approx(10.0, abs=1e-4)
    assert entropy_bits(torch.tensor([0.5, 0.25, 0.25])) == pytest.approx(1.5)  # 0.5·1 + 2·0.25·2
    assert entropy_bits(torch.tensor([1.0, 0.0, 0.0])) == 0.0  # 0 log 0 = 0
    rows = entropy_bits(torch.tensor([[0.5, 0.5], [1.0, 0.0]]))
    assert rows.tolist() == pytest.approx([1.0, 0.0])


def test_softmax_t_limits_and_a_hand_case():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    for T in (0.0, 1e-3):  # T -> 0: one-hot on the argmax
        assert softmax_t(logits, T).tolist() == pytest.approx([1.0, 0.0, 0.0, 0.0], abs=1e-6)
    e = [math.exp(x / 2) for x in (2.0, 1.0, 0.0, -1.0)]  # T = 2 by hand
    hand = [x / sum(e) for x in e]
    assert softmax_t(logits, 2.0).tolist() == pytest.approx(hand, rel=1e-6)
    h_hand = -sum(p * math.log2(p) for p in hand)
    assert entropy_bits(softmax_t(logits, 2.0)) == pytest.approx(h_hand, rel=1e-6)
    assert entropy_bits(softmax_t(logits, 1e4)) == pytest.approx(2.0, abs=1e-3)  # T -> inf: uniform
    hs = [entropy_bits(softmax_t(logits, T)) for T in (0.1, 0.5, 1.0, 1.5)]
    assert hs == sorted(hs) and hs[0] < 1e-3  # entropy grows with T


# ---------------------------------------------------------------------------------------- trigram
CORPUS = "Le chat dort. Le chien dort. Le chat mange. Un chat dort. Le chien mange."


def test_sentences_are_cut_as_the_labs_need():
    assert split_sentences(CORPUS) == ["Le chat dort.", "Le chien dort.", "Le chat mange.", "Un chat dort.",
                                       "Le chien mange."]
    text = ("M. Dupont arriva. Il dit : « Bonjour ! » Puis il partit.\n\nFirst Citizen:\nBefore we proceed."
            "\nSpeak, speak.\n\t\n-- Oui, dit-il.\n« Non. Jamais.\nEnfin ! »")
    assert split_sentences(text) == ["M. Dupont arriva.", "Il dit : « Bonjour ! »", "Puis il partit.",
                                     "Before we proceed.", "Speak, speak.", "Oui, dit-il.", "Non.", "Jamais.",
                                     "Enfin !"]
    assert count_words("« Bonjour », dit-il -- oui ?") == 3


def test_trigram_add_k_probabilities_by_hand():
    """P(w | u, v) = (c(u, v, w) + k) / (c(u, v) + k |V|) on the 5 sentences, counted by hand."""
    k = 0.5
    model = fit_trigram(split_sentences(CORPUS), k=k)
    # V: le un chat chien dort mange . + </s> <unk>
    assert model.vocab == {"le", "un", "chat", "chien", "dort", "mange", ".", "</s>", "<unk>"}
    V = 9
    P = lambda ctx, w: math.exp(model.logprob(ctx, w))  # noqa: E731
    assert P([], "le") == pytest.approx((4 + k) / (5 + k * V))  # 4 of 5 sentences open with "le"
    assert P(["le"], "chat") == pytest.approx((2 + k) / (4 + k * V))  # (<s>, le) -> chat twice, chien twice
    assert P(["le", "chat"], "dort") == pytest.approx((1 + k) / (2 + k * V))
    assert P(["le", "chat"], "chien") == pytest.approx(k / (2 + k * V))  # never seen: only k
    assert P(["chat", "dort"], ".") == pytest.approx((2 + k) / (2 + k * V))
    assert P(["dort", "."], "</s>") == pytest.approx((3 + k) / (3 + k * V))
    assert P(["chat", "chat"], "dort") == pytest.approx(1 / V)  # unseen context: uniform
    assert P(["le", "chat"], "oiseau") == pytest.approx(k / (2 + k * V))  # out of vocabulary: <unk>

    # the sentence "Le chat dort." as the lab scores it: 4 words + </s> = 5 units
    s = "Le chat dort."
    logp = [math.log((4 + k) / (5 + k * V)), math.log((2 + k) / (4 + k * V)), math.log((1 + k) / (2 + k * V)),
            math.log((2 + k) / (2 + k * V)), math.log((3 + k) / (3 + k * V))]
    assert ngram_units(s) == 5
    assert model.score(s).nll == pytest.approx(-sum(logp))
    assert word_perplexity(model.score(s).nll, ngram_units(s)) == pytest.approx(math.exp(-sum(logp) / 5))
    assert unseen_contexts(model, s) == 0
    assert unseen_contexts(model, "Un chien dort.") == 1  # (un, chien) never seen as a context


# ---------------------------------------------------------------------------------------- per word
def test_per_word_units_and_perplexity_by_hand():
    assert ngram_units("L'homme, dit-il.") == 9  # l ' homme , dit - il . + </s>
    assert ngram_units("Le chat dort.") == 5
    # token log-probs of a 5-unit sentence, in nats: ppl per word = exp(-sum / 5) whatever the token count
    lps = [-1.0, -2.0, -0.5, -1.5, -1.0, -0.25, -0.75]
    assert word_perplexity(-sum(lps), 5) == pytest.approx(math.exp(7.0 / 5))
    with pytest.raises(LlmkitError):
        word_perplexity(1.0, 0)


def bytes_tokenizer() -> Tokenizer:
    return Tokenizer.from_bpe([], pattern="gpt4")  # one token per byte


def test_tokens_go_to_the_word_holding_them():
    tok = bytes_tokenizer()
    s = "Un été."  # U n ␣ C3 A9 t C3 A9 . \n: words un(0) été(1) .(2) </s>(3)
    ids = tok.encode(s + "\n")
    assert len(ids) == 10
    assert token_words(tok, s, ids) == [0, 0, 1, 1, 1, 1, 1, 1, 2, 3]  # the space goes with the next word


def tiny_llm(seed: int = 0):
    """A 2-layer random Llama with byte tokens (vocabulary 256 + BOS), generate() through the engine."""
    from llmkit.config import ModelConfig
    from llmkit.generate.api import generate
    from llmkit.model import Transformer

    tok = bytes_tokenizer()
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                      max_seq_len=256, pos_encoding="rope", norm="rmsnorm", mlp="swiglu", activation="silu")
    torch.manual_seed(seed)
    ns = SimpleNamespace(model=Transformer(cfg).eval(), tokenizer=tok, config=cfg, name="tiny",
                         generation_defaults={"temperature": 0.2, "top_p": 0.5})
    ns.device = torch.device("cpu")
    ns.generate = lambda prompt, **kw: generate(ns, prompt, **kw)
    return ns


@torch.no_grad()
def hand_logprobs(model, context: list[int], ids: list[int]) -> list[float]:
    """log p(ids[t] | context + ids[:t]) from one plain forward and a float64 log-softmax."""
    full = torch.tensor([context + ids])
    logits = model(full)[0].double()  # (T, V)
    logp = logits - logits.logsumexp(-1, keepdim=True)
    start = len(context) - 1
    return [logp[start + t, i].item() for t, i in enumerate(ids)]


def test_llm_per_word_perplexity_matches_a_hand_forward(one_thread):
    llm = tiny_llm()
    sents = ["Le chat dort.", "L'homme, dit-il, est là."]
    got = llm_sentence_logprobs(llm, sents)
    tok = llm.tokenizer
    for s, lps in zip(sents, got):
        ids = tok.encode(s + "\n")  # the sentence AND its newline (the LLM's end of sentence)
        ref = hand_logprobs(llm.model, tok.encode("\n"), ids)
        assert len(lps) == len(ids) == len(s.encode()) + 1
        assert lps == pytest.approx(ref, abs=1e-4)
    # per word, the trigram's W: le chat dort . </s> (5) and l ' homme , dit - il , est là . </s> (12)
    W = ngram_units(sents[0]) + ngram_units(sents[1])
    assert W == 5 + 12
    nll = -sum(sum(x) for x in got)
    assert word_perplexity(nll, W) == pytest.approx(math.exp(nll / 17))
    # word by word, the LLM's surprisals add up to the sentence's total
    model = fit_trigram(split_sentences(CORPUS), k=0.5)
    words, tri, llm_bits = per_word_surprisal(model, llm, sents[0], got[0])
    assert words == ["le", "chat", "dort", ".", "</s>"]
    assert sum(llm_bits) == pytest.approx(-sum(got[0]) / math.log(2), rel=1e-6)
    assert sum(tri) == pytest.approx(model.score(sents[0]).nll / math.log(2), rel=1e-6)


# ---------------------------------------------------------------------------------------- token lengths
def test_sentences_in_context_by_hand():
    assert sentences_in_context([3, 3, 3, 3], 7) == 2  # 3 + 3 fits, + 3 would make 9
    assert sentences_in_context([5, 1, 1, 1, 1], 7) == 3
    stream = [1] * 50 + [4] * 50  # start points 0 and 50: 7 ones fill 7; one 4 fits (4 + 4 > 7)
    assert sentences_in_context(stream, 7) == (7 + 1) / 2
    with pytest.raises(LlmkitError, match="fewer than"):
        sentences_in_context([1, 1], 10)


# ---------------------------------------------------------------------------------------- BPE
def test_bpe_merges_on_a_tiny_corpus_by_hand():
    """Sennrich's corpus (low x5, lower x2, newest x6, widest x3), one word a line (no space in a chunk).

    Step 0 pair counts: es 9 (newest 6 + widest 3), st 9, we 8 (lower 2 + newest 6), lo 7, ow 7, ne 6,
    ew 6. Ties go to the pair whose left token comes first (bytes before merged tokens, older first):
    1. e+s 9  2. es+t 9  3. l+o 7 (before o+w)  4. lo+w 7  then newest = n e w est: ne, ew, w+est all 6
    5. e+w 6  6. n+ew 6 (n is a byte)  7. new+est 6  then widest = w i d est: 8. d+est 3 (lower's pairs: 2).
    """
    text = "\n".join(["low"] * 5 + ["lower"] * 2 + ["newest"] * 6 + ["widest"] * 3)
    counts, merges, steps = merge_steps(text, 8)
    assert counts[b"low"] == 5 and counts[b"newest"] == 6
    top = dict(pair_counts(counts).most_common(7))
    assert top == {(b"e", b"s"): 9, (b"s", b"t"): 9, (b"w", b"e"): 8, (b"l", b"o"): 7, (b"o", b"w"): 7,
                   (b"n", b"e"): 6, (b"e", b"w"): 6}
    hand = [(b"e", b"s", 9), (b"es", b"t", 9), (b"l", b"o", 7), (b"lo", b"w", 7), (b"e", b"w", 6),
            (b"n", b"ew", 6), (b"new", b"est", 6), (b"d", b"est", 3)]
    assert [(s.left, s.right, s.count) for s in steps] == hand
    assert merges == [(a, b) for a, b, _ in hand]
    # final segmentation with these 8 merges, applied in order: l o w e s t -> low est; n e w e r -> new e r
    assert segment(merges, "lowest") == [b"low", b"est"]
    assert segment(merges, "newer") == [b"new", b"e", b"r"]
    assert segment(merges[:2], "lowest") == [b"l", b"o", b"w", b"est"]


def test_bpe_display_and_whole_characters():
    assert show(b" chat") == "▁chat"
    assert show(b"\xc3") == "<0xC3>" and show("é".encode()) == "é"
    assert _whole_char(MergeStep(6, b"\xc3", b"\xa9", 10, 262))  # the two bytes of é
    assert not _whole_char(MergeStep(0, b"e", b"s", 9, 256))
    counts = Counter({"été".encode(): 3})  # é = C3 A9: the pair (C3, A9) occurs twice per word
    assert pair_counts(counts)[b"\xc3", b"\xa9"] == 6


# ---------------------------------------------------------------------------------------- sampling
def test_distinct_n_and_repetition_by_hand():
    w = "a b a b a".split()
    assert distinct_n(w, 1) == pytest.approx(2 / 5)
    assert distinct_n(w, 2) == pytest.approx(2 / 4)  # ab ba ab ba
    assert repetition(w) == pytest.approx(1 - 2 / 3)  # aba bab aba: one repeat out of 3
    assert distinct_n(["x"], 2) == 1.0 and repetition("le chat dort".split()) == 0.0


def test_greedy_setting_is_the_argmax_chain_with_its_logprobs(one_thread):
    """The labs' greedy (do_sample=False) comes from the engine; it must equal a hand argmax loop, and its
    mean log-prob the model's raw log-softmax of the chosen tokens (the model's default T 0.2 / top-p 0.5
    must not leak into an explicit setting)."""
    llm = tiny_llm(seed=3)
    (row,) = run_setting(llm, "Le chat", Setting("greedy", 0.0, max_tokens=6), n=4, seed=0)
    ids = llm.tokenizer.encode("Le chat")
    chain, lps = [], []
    with torch.no_grad():
        for _ in range(6):
            logits = llm.model(torch.tensor([ids + chain]))[0, -1].double()
            nxt = int(logits.argmax())
            lps.append((logits - logits.logsumexp(-1))[nxt].item())
            chain.append(nxt)
    assert row["ids"] == chain and row["tokens"] == 6
    assert row["mean_logprob"] == pytest.approx(float(np.mean(lps)), abs=1e-4)
    # sampling at T = 1.5 with every knob explicit: two seeds, two different continuations (not greedy)
    rows = run_setting(llm, "Le chat", Setting("T=1.5", 1.5, max_tokens=12), n=2, seed=0)
    assert len(rows) == 2 and rows[0]["ids"] != rows[1]["ids"]


def test_temperature_lab_entropy_matches_a_hand_computation(tiny_llama_dir, tmp_path, one_thread):
    """The lab's entropies come from the model's own next-token logits: recompute them by hand (float64)."""
    from llmkit.generate.api import encode_prompt
    from llmkit.lab import load_model, run_lab
    from llmkit.lab.sampling import PROMPTS, TEMPERATURES

    res = run_lab("temperature-entropy", model=str(tiny_llama_dir), out=tmp_path, lang="en", quick=True,
                  progress=False)
    llm = load_model(str(tiny_llama_dir))
    with torch.no_grad():
        ids = torch.tensor([encode_prompt(llm.tokenizer, PROMPTS["entropy"]["en"])])
        z = llm.model(ids)[0, -1].double().numpy()
    for T, h in zip(TEMPERATURES, res.data["entropy_bits"]):
        p = np.exp((z - z.max()) / T)
        p /= p.sum()
        assert h == pytest.approx(float(-(p[p > 0] * np.log2(p[p > 0])).sum()), rel=1e-4, abs=1e-5)
    assert res.data["max_bits"] == pytest.approx(math.log2(len(z)))
    assert len(res.tables["samples"]) == len(TEMPERATURES) * res.data["samples_per_T"]
    assert any(f"{res.data['entropy_bits'][2]:.2f} bits at T = 1.0" in f for f in res.findings)

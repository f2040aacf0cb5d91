"""The task labs (llmkit.lab.classify, llmkit.lab.prompts, llmkit.lab.scaling) against hand computations:
the 0/1/2 grader on hand-made outputs, the Wilson interval, the log-log fit on synthetic power laws, zero-shot
label scores against log-softmax of the model's own logits, and the supervised baseline on a separable set."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from llmkit.lab.classify import (
    ZeroShotPrompt,
    balanced_subset,
    confusion,
    first_beating,
    label_logprobs,
    learning_curve,
    prompt_ids,
    roc_auc,
    tfidf_logreg,
)
from llmkit.lab.prompts import LABEL_WORDS, answer_class, grade_fields, grade_label, people
from llmkit.lab.scaling import ema, frontier, nonembedding_params, power_law_fit

EN, FR = LABEL_WORDS["en"], LABEL_WORDS["fr"]


# ---------------------------------------------------------------------------------------------- 0/1/2 grid
@pytest.mark.parametrize("output, gold, expected", [
    ("positive", 1, 2),
    ("  Positive.\n", 1, 2),  # case, a final period and whitespace are allowed
    ('"negative"', 0, 2),
    ("**negative**", 0, 2),
    ("negative", 1, 0),  # well-formed but wrong: 0, never 1
    ("The review is positive.", 1, 1),  # right, but a sentence instead of one word
    ("Sentiment: negative", 0, 1),
    ('{"sentiment": "positive"}', 1, 1),  # JSON where one word was asked
    ("positive or negative", 1, 0),  # both classes: unusable
    ("I cannot tell.", 0, 0),
    ("", 1, 0),
    ("positively", 1, 0),  # not the word itself
])
def test_grade_label_one_word(output, gold, expected):
    assert grade_label(output, gold, EN) == expected


@pytest.mark.parametrize("output, gold, expected", [
    ('{"sentiment": "positive"}', 1, 2),
    (' {"sentiment": "Negative"} ', 0, 2),
    ('{"sentiment": "negative"}', 1, 0),  # well-formed, wrong
    ('```json\n{"sentiment": "positive"}\n```', 1, 1),  # code fence: format not respected
    ('{"sentiment": "positive", "confidence": 0.9}', 1, 1),  # an extra key
    ('{"label": "positive"}', 1, 1),  # another key
    ('{"sentiment": "positive"', 1, 1),  # broken JSON that still says it
    ("positive", 1, 1),  # a bare word where JSON was asked
    ('{"sentiment": "neutral"}', 1, 0),
    ('["positive"]', 1, 1),
])
def test_grade_label_json(output, gold, expected):
    assert grade_label(output, gold, EN, json_key="sentiment") == expected


def test_grade_label_french_words_genders_and_accents():
    assert grade_label("Négatif.", 0, FR) == 2
    assert grade_label("negative", 0, FR) == 2  # feminine, accent dropped
    assert grade_label("positif", 0, FR) == 0
    assert grade_label("Cette critique est positive.", 1, FR) == 1
    assert grade_label('{"sentiment": "négatif"}', 0, FR, json_key="sentiment") == 2
    assert answer_class("Je dirais négatif.", FR) == (0, False)
    assert answer_class("positif", FR) == (1, True)


def test_grade_fields():
    gold = {"name": "Ann Lee", "age": 31, "city": "Leeds"}
    assert grade_fields('{"name": "Ann Lee", "age": 31, "city": "Leeds"}', gold) == 2
    assert grade_fields('{"city": "leeds", "name": "ann lee", "age": "31"}', gold) == 2  # order, case, "31"
    assert grade_fields('{"name": "Ann Lee", "age": 13, "city": "Leeds"}', gold) == 0  # wrong value
    assert grade_fields('{"name": "Ann", "age": 31, "city": "Leeds"}', gold) == 0  # partial name
    assert grade_fields('Here: {"name": "Ann Lee", "age": 31, "city": "Leeds"}', gold) == 1  # extra text
    assert grade_fields('{"nom": "Ann Lee", "age": 31, "ville": "Leeds"}', gold) == 1  # other keys
    assert grade_fields("Ann Lee is 31 and lives in Leeds.", gold) == 1
    assert grade_fields("Ann Lee is 313 and lives in Leeds.", gold) == 0  # 31 is not a whole word there
    assert grade_fields('{"name": "Ann Lee", "age": 31}', gold) == 0  # a field missing
    assert grade_fields("", gold) == 0


def test_tp3_inputs_hold_their_answers():
    for lang in ("fr", "en"):
        rows = people(lang, 22, seed=0)
        assert rows == people(lang, 22, seed=0)  # seeded
        assert len({g[next(iter(g))] for _, g in rows}) == 22  # distinct people
        for text, gold in rows:
            assert grade_fields(text, gold) == 1  # every value is in the sentence, which is not JSON
            assert grade_fields(json.dumps(gold, ensure_ascii=False), gold) == 2


# ---------------------------------------------------------------------------------------------- statistics
def test_wilson_interval_by_hand():
    from llmkit.train.reward import wilson_interval  # the interval the classification lab reports

    # 79 right out of 100, z = 1.959964: centre (p + z²/2n) / (1 + z²/n), half-width
    # z sqrt(p(1-p)/n + z²/4n²) / (1 + z²/n)
    # z² = 3.841459: centre = 0.809207 / 1.038415 = 0.779272, half = 1.959964 * sqrt(0.001659 + 0.0000960)
    # / 1.038415 = 0.079072 -> [0.700200, 0.858343]
    z2 = 1.959964**2
    centre = (0.79 + z2 / 200) / (1 + z2 / 100)
    half = 1.959964 * math.sqrt(0.79 * 0.21 / 100 + z2 / 40000) / (1 + z2 / 100)
    assert centre == pytest.approx(0.779272, abs=1e-6) and half == pytest.approx(0.079072, abs=1e-6)
    assert wilson_interval(79, 100) == pytest.approx((0.700200, 0.858343), abs=1e-6)
    lo, hi = wilson_interval(0, 50)  # never below 0, and not degenerate at p = 0 (the normal one is)
    assert lo == 0 and hi == pytest.approx(z2 / (50 + z2), abs=1e-9)


def test_roc_auc_and_confusion_by_hand():
    # pairs (positive, negative): (0.35, 0.1) yes, (0.35, 0.4) no, (0.8, 0.1) yes, (0.8, 0.4) yes -> 3/4
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert roc_auc([1.0, 1.0], [0, 1]) == 0.5  # a tie counts one half
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    s, y = rng.normal(size=200).round(1), rng.integers(0, 2, 200)  # rounded: many ties
    assert roc_auc(s, y) == pytest.approx(roc_auc_score(y, s))
    assert confusion([0, 0, 1, 1, 1], [0, 1, 1, 1, 0]).tolist() == [[1, 1], [1, 2]]


# ---------------------------------------------------------------------------------------------- scaling
def test_power_law_fit_recovers_known_exponents():
    n = np.geomspace(1e3, 1e7, 6)
    a, alpha = power_law_fit(n, 7.0 * n**-0.076)
    assert a == pytest.approx(7.0, rel=1e-9) and alpha == pytest.approx(0.076, rel=1e-9)
    noise = np.exp(np.random.default_rng(0).normal(0, 0.002, n.size))  # 0.2 % multiplicative noise
    a, alpha = power_law_fit(n, 3.0 * n**-0.05 * noise)
    assert alpha == pytest.approx(0.05, abs=2e-3) and a == pytest.approx(3.0, rel=0.05)


def test_frontier_is_the_lower_envelope():
    c = np.array([1.0, 10.0, 100.0])
    small = (c, np.array([4.0, 3.0, 2.5]))  # fast start, early plateau
    big = (c * 10, np.array([5.0, 2.0, 1.0]))  # from 10 to 1000 FLOPs
    grid, best = frontier([small, big], n_points=4)  # grid 1, 10, 100, 1000
    assert grid == pytest.approx([1, 10, 100, 1000])
    assert best == pytest.approx([4.0, 3.0, 2.0, 1.0])  # small, small (3 < 5), big (2 < 2.5), big
    far = (c * 1000, np.array([3.0, 2.0, 1.5]))  # 1000 to 100000: nothing between 100 and 1000
    grid, best = frontier([small, far], n_points=6)  # grid 1, 10, ..., 1e5
    assert grid == pytest.approx([1, 10, 100, 1000, 1e4, 1e5])
    assert best == pytest.approx([4, 3, 2.5, 3, 2, 1.5])
    grid, best = frontier([(c, small[1]), (c * 1e4, far[1])], n_points=7)  # 1e2..1e4 has no curve: dropped
    assert grid == pytest.approx([1, 10, 100, 1e4, 1e5, 1e6]) and np.isfinite(best).all()


def test_ema_is_bias_corrected():
    assert ema([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])  # a constant stays itself
    # by hand: m1 = 0.1*1 -> 1; m2 = 0.09 + 0.1*3 = 0.39, / (1 - 0.81) = 2.052631...
    assert ema([1.0, 3.0], 0.9) == pytest.approx([1.0, 0.39 / 0.19])


def test_nonembedding_params_counts_the_model():
    from llmkit.model import Transformer
    from llmkit.train.pretrain import build_config

    cfg = build_config(257, 64, "tiny", 256, n_layers=2, d_model=32, n_heads=2, d_ff=96)
    model = Transformer(cfg)
    total = sum(p.numel() for p in model.parameters())  # tied head counted once
    by_hand = sum(p.numel() for name, p in model.named_parameters() if "embed" not in name)
    # per layer: q,k,v,o 4*32*32 + gate,up,down 3*32*96 + two RMSNorms 2*32; plus the final norm
    assert by_hand == 2 * (4 * 32 * 32 + 3 * 32 * 96 + 2 * 32) + 32
    assert nonembedding_params(cfg.to_dict(), total) == by_hand


# ---------------------------------------------------------------------------------------------- zero-shot
@pytest.fixture(scope="module")
def tiny_chat_model():
    from llmkit.config import ModelConfig
    from llmkit.model import Transformer
    from llmkit.tokenizer.train import train_bpe

    text = "this review is positive . this review is negative . the film was great , the plot was bad . " * 20
    tok = train_bpe([text], 300, special_tokens=["<|im_start|>", "<|im_end|>"], progress=False)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=256)
    return Transformer(cfg).eval(), tok


def test_zero_shot_label_scores_equal_log_softmax_of_logits(tiny_chat_model):
    model, tok = tiny_chat_model
    prompt = ZeroShotPrompt("Review: {text}\nPositive or negative?", "This review is",
                            (" negative", " very positive"))  # multi-token labels: their log-probs add up
    texts = ["the film was great", "the plot was bad , bad , bad", "ok"]
    assert len(tok.encode(" very positive")) > 1
    got = label_logprobs(model, tok, texts, prompt, batch_size=2)  # (3, 2) through llmkit.score
    assert got.shape == (3, 2)
    for i, t in enumerate(texts):
        # the ChatML prompt written out by hand, the assistant's reply left open
        text = (f"<|im_start|>user\nReview: {t}\nPositive or negative?<|im_end|>\n"
                "<|im_start|>assistant\nThis review is")
        ctx = tok.encode(text, allow_special=True)
        assert prompt_ids(tok, t, prompt) == ctx
        for j, word in enumerate(prompt.labels):
            w = tok.encode(word)
            ids = torch.tensor([ctx + w])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids)[0].double(), dim=-1)  # (T, V)
            want = sum(float(logp[len(ctx) - 1 + k, w[k]]) for k in range(len(w)))
            assert got[i, j] == pytest.approx(want, abs=1e-4)


# ---------------------------------------------------------------------------------------------- baseline
SEPARABLE = [("good great fine film", 1), ("great acting , good plot", 1), ("fine and good", 1),
             ("great great fun", 1), ("bad awful film", 0), ("awful acting , bad plot", 0),
             ("poor and bad", 0), ("awful awful bore", 0)]


def test_baseline_learns_a_separable_set():
    x, y = [t for t, _ in SEPARABLE], [c for _, c in SEPARABLE]
    test_x = ["good fun", "a great film", "awful", "bad and poor plot"]
    test_y = [1, 1, 0, 0]
    assert tfidf_logreg().fit(x, y).predict(test_x).tolist() == test_y
    curve = learning_curve(x, y, test_x, test_y, sizes=(2, 4, 8), draws=3, seed=0)
    assert [c["n"] for c in curve] == [2, 4, 8] and curve[-1]["draws"] == 1
    assert curve[-1]["mean"] == 1.0
    assert first_beating(curve, 0.9) <= 8 and first_beating(curve, 1.0) is None


def test_balanced_subset_takes_half_of_each_class():
    labels = [0] * 30 + [1] * 10
    rng = np.random.default_rng(0)
    idx = balanced_subset(labels, 8, rng)
    assert len(set(idx.tolist())) == 8 and sum(labels[i] for i in idx) == 4
    assert sorted(balanced_subset(labels, 100, rng).tolist()) == list(range(40))

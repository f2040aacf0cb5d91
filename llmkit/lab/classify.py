"""Experiment 8 of the course: sentiment classification by the LLM prompted zero-shot against a supervised
baseline, TF-IDF + logistic regression (`zero-shot-vs-supervised`), on French Allociné TV-series reviews
(--lang fr) or English SST-2 sentences (--lang en).

    rows = read_reviews("fr", "test")                               # [{"text": ..., "label": 0/1}, ...]
    lp = label_logprobs(llm.model, llm.tokenizer, texts, PROMPTS["fr"])  # (n, 2): log P(label word)
    pipe = tfidf_logreg().fit(train_texts, train_labels)
    lo, hi = wilson_interval(correct, n)                            # 95 % interval of an accuracy

Notable choices
- Zero-shot by log-likelihood, not by generation: the review goes in a user turn that asks the question, the
  assistant's reply is started for it (`continue_final_message`) and the one scorer (`llmkit.score.score`)
  gives the log-probability of each label's word, summed over its tokens when it takes several: English
  "This review is" + " positive" / " negative"; French "Réponse :" + " oui" / " non" to "did the author
  like the series?" (on 100 Allociné reviews SmolLM2-135M ranks them far better this way, AUC 0.71, than
  with "Cette critique est positive / négative", 0.56). The larger wins. One forward per batch of reviews,
  nothing to parse, and every answer is one of the two labels.
- Small models favour one label whatever the review says (label bias: SmolLM2-135M calls each of the first 100
  English test reviews positive). The lab therefore also reports a calibrated zero-shot: the threshold on the
  log-odds log P(positive) - log P(negative) is moved from 0 to their median over the test reviews, so that
  half of them are called positive, as the classes are balanced in these sets. No review's label is used,
  only the known class balance (prior matching); the content-free calibration of Zhao et al. 2021 (the
  log-odds of "N/A") moved the English threshold only a third of the way. The area under the ROC curve of
  the log-odds says how well the model ranks reviews whatever the threshold.
- Baseline: scikit-learn's TfidfVectorizer (words and word pairs, sublinear tf) + LogisticRegression (C=10),
  on the 2,000 training reviews. Its learning curve trains on balanced random subsets (half of each class) of
  growing size, several draws per size, and is scored on the same test items as the LLM.
- Intervals: Wilson 95 % intervals on each accuracy (`llmkit.train.reward.wilson_interval`, shared with the
  reward-model and GRPO evaluations). "The baseline beats zero-shot from n examples" is the smallest training
  size whose mean accuracy over the draws exceeds the zero-shot accuracy (raw, and calibrated).
- Quick: the first 80 test items in English, 40 in French (a French prompt is over twice as long in tokens:
  about 145 against 66), 2 draws per training size: about 15 s of scoring on 2 quiet cores. Full: all 500
  test items, 10 draws.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from llmkit.lab import LabContext, data_file, lab, pyplot

DATA = {"fr": "classification/allocine_tv_fr", "en": "classification/sst2_en"}
LABEL_NAMES = {"fr": ("négatif", "positif"), "en": ("negative", "positive")}
TRAIN_SIZES = (8, 16, 32, 64, 128, 256, 512, 1024, 2000)


@dataclass(frozen=True)
class ZeroShotPrompt:
    user: str  # the user turn, with {text} where the review goes
    answer: str  # the start of the assistant's reply, continued by a label word
    labels: tuple[str, str]  # the continuations for label 0 (negative) and label 1 (positive)


PROMPTS = {
    "en": ZeroShotPrompt("Review: {text}\n\nIs this review positive or negative?", "This review is",
                         (" negative", " positive")),
    "fr": ZeroShotPrompt(
        "{text}\n\nL'auteur de cette critique a-t-il aimé la série ? Réponds par oui ou non.", "Réponse :",
        (" non", " oui")),
}


def read_reviews(lang: str, split: str) -> list[dict]:
    """The shared classification set of a language: rows {"text", "label" (0 negative, 1 positive), ...}."""
    path = data_file(f"{DATA[lang]}_{split}.jsonl")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def prompt_ids(tokenizer, text: str, prompt: ZeroShotPrompt) -> list[int]:
    """The chat-rendered prompt, ending inside the assistant's started reply."""
    from llmkit.tokenizer.chat import render_chat

    msgs = [{"role": "user", "content": prompt.user.format(text=text)},
            {"role": "assistant", "content": prompt.answer}]
    return render_chat(tokenizer, msgs, continue_final_message=True).ids


def label_logprobs(model: nn.Module, tokenizer, texts: Sequence[str], prompt: ZeroShotPrompt,
                   batch_size: int = 32) -> np.ndarray:
    """log P(label word | prompt) for each text and each label: (len(texts), 2), through llmkit.score."""
    from llmkit.score import score

    words = [tokenizer.encode(w) for w in prompt.labels]
    reqs = [(prompt_ids(tokenizer, t, prompt), w) for t in texts for w in words]
    scores = score(model, reqs, batch_size=batch_size)
    return np.array([s.logprob for s in scores], dtype=np.float64).reshape(len(texts), len(words))


def roc_auc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """P(score of a random positive > score of a random negative), ties counting one half."""
    s, y = np.asarray(scores, dtype=float), np.asarray(labels)
    pos, neg = s[y == 1], s[y == 0]
    if not len(pos) or not len(neg):
        return float("nan")
    diff = pos[:, None] - neg[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


def tfidf_logreg(C: float = 10.0):
    """The supervised baseline: TF-IDF on words and word pairs + logistic regression."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    return make_pipeline(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True),
                         LogisticRegression(C=C, max_iter=2000))


def balanced_subset(labels: Sequence[int], size: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of `size` rows, half of each class (the whole set when size >= len(labels))."""
    y = np.asarray(labels)
    if size >= len(y):
        return np.arange(len(y))
    half = size // 2
    idx = [rng.choice(np.flatnonzero(y == c), n, replace=False) for c, n in ((0, half), (1, size - half))]
    return rng.permutation(np.concatenate(idx))


def learning_curve(train_x: Sequence[str], train_y: Sequence[int], test_x: Sequence[str],
                   test_y: Sequence[int], sizes: Sequence[int], draws: int, seed: int = 0) -> list[dict]:
    """Test accuracy of the baseline trained on balanced random subsets: per size its mean, min and max."""
    rng = np.random.default_rng(seed)
    tx, ty, yt = np.asarray(train_x, dtype=object), np.asarray(train_y), np.asarray(test_y)
    out = []
    for n in sizes:
        accs = []
        for _ in range(1 if n >= len(ty) else draws):
            i = balanced_subset(ty, n, rng)
            pred = tfidf_logreg().fit(list(tx[i]), ty[i]).predict(list(test_x))
            accs.append(float((pred == yt).mean()))
        out.append({"n": min(n, len(ty)), "mean": float(np.mean(accs)), "min": min(accs), "max": max(accs),
                    "draws": len(accs)})
    return out


def confusion(y_true: Sequence[int], y_pred: Sequence[int]) -> np.ndarray:
    """2x2 counts: rows the true label, columns the predicted one."""
    m = np.zeros((2, 2), dtype=int)
    np.add.at(m, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return m


def upper(s: str) -> str:
    return s[:1].upper() + s[1:]


def first_beating(curve: list[dict], target: float) -> int | None:
    """The smallest training size whose mean accuracy exceeds `target` (None if none does)."""
    return next((c["n"] for c in curve if c["mean"] > target), None)


@lab("zero-shot-vs-supervised", fr="Zéro-shot contre apprentissage supervisé",
     en="Zero-shot vs supervised classification", course="8", needs_model=True,
     needs_data=tuple(f"{d}_{s}.jsonl" for d in DATA.values() for s in ("train", "test")))
def zero_shot_vs_supervised(ctx: LabContext) -> None:
    from llmkit.train.reward import wilson_interval

    lang = ctx.lang
    train, test = read_reviews(lang, "train"), read_reviews(lang, "test")
    if ctx.quick:
        test = test[: 80 if lang == "en" else 40]
    texts, y = [r["text"] for r in test], np.array([r["label"] for r in test])
    n = len(y)

    llm = ctx.llm()
    prompt = PROMPTS[lang]
    chunks = [texts[i : i + 32] for i in range(0, n, 32)]
    t0 = time.perf_counter()
    with torch.inference_mode():
        lp = np.concatenate([label_logprobs(llm.model, llm.tokenizer, c, prompt)
                             for c in ctx.bar(chunks, desc="zero-shot")])  # (n, 2)
    t_llm = time.perf_counter() - t0
    logodds = lp[:, 1] - lp[:, 0]  # (n,) log P(positive) - log P(negative)
    bias = float(np.median(logodds))
    zs_pred, cal_pred = (logodds > 0).astype(int), (logodds - bias > 0).astype(int)

    train_x, train_y = [r["text"] for r in train], [r["label"] for r in train]
    curve = learning_curve(train_x, train_y, texts, y, TRAIN_SIZES, 2 if ctx.quick else 10, ctx.seed)
    t0 = time.perf_counter()
    base_pred = tfidf_logreg().fit(train_x, train_y).predict(texts)
    t_base = time.perf_counter() - t0

    methods = {"zero-shot": zs_pred, "zero-shot calibrated": cal_pred, "tfidf-logreg": base_pred}
    acc = {k: float((p == y).mean()) for k, p in methods.items()}
    ci = {k: wilson_interval(int((p == y).sum()), n) for k, p in methods.items()}
    auc = roc_auc(logodds, y)
    beat_raw = first_beating(curve, acc["zero-shot"])
    beat_cal = first_beating(curve, acc["zero-shot calibrated"])

    name = ctx.t({"zero-shot": "zéro-shot", "zero-shot calibrated": "zéro-shot calibré",
                  "tfidf-logreg": "TF-IDF + rég. log."}, {k: k for k in methods})
    ctx.table("accuracy", [{"method": k, "n_test": n, "accuracy": round(acc[k], 4),
                            "ci95_low": round(ci[k][0], 4), "ci95_high": round(ci[k][1], 4),
                            "predicted_positive": int(methods[k].sum())} for k in methods])
    ctx.table("learning_curve", [{**c, "mean": round(c["mean"], 4)} for c in curve])
    ctx.data(n_test=n, accuracy=acc, ci95={k: list(v) for k, v in ci.items()}, auc=auc, bias_logodds=bias,
             predicted_positive={k: int(p.sum()) for k, p in methods.items()}, learning_curve=curve,
             baseline_beats_zero_shot_at=beat_raw, baseline_beats_calibrated_at=beat_cal,
             confusion={k: confusion(y, p).tolist() for k, p in methods.items()},
             seconds={"zero-shot": t_llm, "tfidf-logreg (fit + predict)": t_base})

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    ns = [c["n"] for c in curve]
    ax.plot(ns, [c["mean"] for c in curve], "o-", color="C0", label=name["tfidf-logreg"])
    ax.fill_between(ns, [c["min"] for c in curve], [c["max"] for c in curve], color="C0", alpha=0.2)
    for k, col in (("zero-shot", "C3"), ("zero-shot calibrated", "C2")):
        ax.axhline(acc[k], color=col, ls="--", label=f"{name[k]} ({ctx.pct(acc[k])})")
        ax.axhspan(*ci[k], color=col, alpha=0.1)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel(ctx.t("exemples d'entraînement étiquetés", "labelled training examples"))
    ax.set_ylabel(ctx.t(f"exactitude sur {n} critiques de test", f"accuracy on {n} test reviews"))
    ax.set_title(ctx.t("bandes : min–max des tirages (modèle supervisé), IC 95 % (zéro-shot)",
                       "bands: min–max over draws (supervised), 95 % CI (zero-shot)"), fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    ctx.figure(fig, "learning_curve")

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    labels = LABEL_NAMES[lang]
    for ax, k in zip(axes, methods):
        m = confusion(y, methods[k])
        ax.imshow(m, cmap="Blues", vmin=0, vmax=n)
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=13,
                    color="white" if v > n / 2 else "black")
        ax.set_xticks([0, 1], labels)
        ax.set_yticks([0, 1], labels)
        ax.set_xlabel(ctx.t("prédit", "predicted"))
        ax.set_ylabel(ctx.t("vrai", "true"))
        ax.set_title(f"{name[k]} : {ctx.pct(acc[k])}" if lang == "fr" else f"{name[k]}: {ctx.pct(acc[k])}")
    fig.tight_layout()
    ctx.figure(fig, "confusion")

    fig, ax = plt.subplots(figsize=(7, 3.8))
    bins = np.linspace(logodds.min(), logodds.max(), 25)
    for c, col in ((0, "C3"), (1, "C2")):
        ax.hist(logodds[y == c], bins=bins, alpha=0.6, color=col, label=labels[c])
    ax.axvline(0, color="black", lw=1, label=ctx.t("seuil brut (0)", "raw threshold (0)"))
    ax.axvline(bias, color="black", lw=1, ls="--", label=ctx.t("seuil calibré (médiane)",
                                                                 "calibrated threshold (median)"))
    ax.set_xlabel("log P(positive) − log P(negative)")
    ax.set_ylabel(ctx.t("critiques", "reviews"))
    ax.set_title(f"AUC = {ctx.num(auc)}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    ctx.figure(fig, "logodds")

    def iv(k: str) -> str:
        return f"{ctx.pct(acc[k])} [{ctx.pct(ci[k][0])} ; {ctx.pct(ci[k][1])}]" if lang == "fr" else \
            f"{ctx.pct(acc[k])} [{ctx.pct(ci[k][0])}, {ctx.pct(ci[k][1])}]"

    best_zs = max(("zero-shot", "zero-shot calibrated"), key=acc.get)
    gap = acc["tfidf-logreg"] - acc[best_zs]
    overlap = ci["tfidf-logreg"][0] <= ci[best_zs][1] and ci[best_zs][0] <= ci["tfidf-logreg"][1]
    winner = upper(name["tfidf-logreg" if gap > 0 else best_zs])
    pts = ctx.num(100 * abs(gap), 1)
    ctx.finding(
        f"Sur {n} critiques de test : {name['tfidf-logreg']} entraîné sur {len(train_y)} exemples "
        f"{iv('tfidf-logreg')}, {name['zero-shot']} {iv('zero-shot')}, {name['zero-shot calibrated']} "
        f"{iv('zero-shot calibrated')} (IC de Wilson à 95 %). {winner} gagne de {pts} points"
        + (" ; les intervalles se recouvrent, l'écart n'est pas établi." if overlap
           else " ; les intervalles ne se recouvrent pas."),
        f"On {n} test reviews: {name['tfidf-logreg']} trained on {len(train_y)} examples "
        f"{iv('tfidf-logreg')}, {name['zero-shot']} {iv('zero-shot')}, {name['zero-shot calibrated']} "
        f"{iv('zero-shot calibrated')} (Wilson 95 % intervals). {winner} wins by {pts} points"
        + ("; the intervals overlap, so the gap is not established." if overlap
           else "; the intervals do not overlap."))
    n_pos, n_raw, n_cal = int(y.sum()), int(zs_pred.sum()), int(cal_pred.sum())
    ctx.finding(
        f"Biais d'étiquette : le modèle brut classe {n_raw} critiques sur {n} positives "
        f"(il y en a {n_pos}) ; placer le seuil à la médiane des log-odds ({ctx.num(bias)}) au lieu de 0 "
        f"en classe {n_cal}. L'AUC des log-odds vaut {ctx.num(auc)} (0,5 = hasard) : ce que le modèle sait "
        "trier, quel que soit le seuil.",
        f"Label bias: the raw model calls {n_raw} reviews out of {n} positive (there are {n_pos}); moving "
        f"the threshold from 0 to the log-odds' median ({ctx.num(bias)}) calls {n_cal}. The log-odds' AUC "
        f"is {ctx.num(auc)} (0.5 = chance): what the model can rank, whatever the threshold.")
    per = ctx.num(1000 * t_llm / n, 0)
    layers = llm.model.config.n_layers
    ctx.finding(
        f"Coût : le LLM a mis {ctx.num(t_llm, 1)} s pour ses {n} réponses ({per} ms par critique, {layers} "
        f"couches), le modèle supervisé {ctx.num(t_base, 1)} s pour apprendre sur {len(train_y)} exemples "
        "et répondre.",
        f"Cost: the LLM took {ctx.num(t_llm, 1)} s for its {n} answers ({per} ms per review, {layers} "
        f"layers), the supervised model {ctx.num(t_base, 1)} s to learn from {len(train_y)} examples and "
        "answer.")

    def beats(at: int | None, k: str) -> tuple[str, str]:
        a = ctx.pct(acc[k])
        if at is None:
            return f"ne dépasse jamais {name[k]} ({a})", f"never beats {k} ({a})"
        return (f"dépasse {name[k]} ({a}) dès {at} exemples étiquetés",
                f"beats {k} ({a}) from {at} labelled examples on")

    (fr1, en1), (fr2, en2) = beats(beat_raw, "zero-shot"), beats(beat_cal, "zero-shot calibrated")
    lo, hi = curve[0], curve[-1]
    ctx.finding(
        f"Courbe d'apprentissage (moyenne de {lo['draws']} tirages équilibrés par taille) : le modèle "
        f"supervisé {fr1}, et {fr2} ; avec {lo['n']} exemples il est à {ctx.pct(lo['mean'])}, avec {hi['n']} "
        f"à {ctx.pct(hi['mean'])}.",
        f"Learning curve (mean of {lo['draws']} balanced draws per size): the supervised model {en1}, and "
        f"{en2}; with {lo['n']} examples it scores {ctx.pct(lo['mean'])}, with {hi['n']} "
        f"{ctx.pct(hi['mean'])}.")

"""Controlled randomness: `temperature-entropy` [9] (the next-token distribution under a temperature, its
entropy, samples), `tp1` (generation with varied length, temperature and do_sample) and `tp2` (greedy vs
temperature vs top-k vs top-p on one prompt, compared).

    run_lab("temperature-entropy", lang="fr", quick=True)
    run_lab("tp2", lang="en")

Notable choices
- One distribution, one sampler: the next-token distribution is the model's last-position logits for the
  prompt encoded as the engine encodes it (`encode_prompt`), through `inside.softmax_t` and
  `inside.entropy_bits` (bits); every text comes from the engine (`llm.generate` with a full
  `SamplingParams`), so a sample at T = 1.5 is drawn from the very distribution the bar chart shows.
- Every knob is given in full (`SamplingParams(...)`): the model's own generation defaults (SmolLM2:
  temperature 0.2, top-p 0.9) never leak into a setting. "do_sample=False" (the transformers name TP1
  uses) is temperature 0: greedy. top-k and top-p run at temperature 1, as in the course.
- Seeded: sample i of a setting uses seed `ctx.seed` + i (the engine's per-row generator), so a run is
  reproducible and two settings share their random draws (`n` samples = seeds seed..seed+n-1).
- Diversity is measured on words (lowercased, split on spaces): distinct-n = distinct n-grams / n-grams
  (Li et al., 2016), repetition = 1 - distinct-3 (the share of word trigrams that repeat an earlier one);
  "mean log-prob" is the mean over generated tokens of log p(token) under the model's raw distribution
  (before temperature and truncation, the engine's `logprobs`): how likely the model finds the text.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from llmkit.generate.api import encode_prompt
from llmkit.generate.sampling import SamplingParams
from llmkit.lab import LabContext, lab, pyplot
from llmkit.lab.inside import entropy_bits, perplexity_from_bits, softmax_t, token_texts

TEMPERATURES = (0.1, 0.5, 1.0, 1.5)
PROMPTS = {
    "entropy": {"fr": "Le chat dort sur le canapé, et le chien dort dans",
                "en": "The cat is sleeping on the"},
    "tp1": {"fr": "Il était une fois", "en": "Once upon a time"},
    "tp2": {"fr": "Il était une fois, dans un petit village au bord de la mer,",
            "en": "Once upon a time, in a small village by the sea,"},
}


# ------------------------------------------------------------------------------------------ measures
def words_of(text: str) -> list[str]:
    return text.lower().split()


def distinct_n(words: Sequence[str], n: int) -> float:
    """Distinct n-grams / n-grams (1.0 when the text has no n-gram)."""
    grams = list(zip(*(words[i:] for i in range(n))))
    return len(set(grams)) / len(grams) if grams else 1.0


def repetition(words: Sequence[str], n: int = 3) -> float:
    """Share of the word n-grams that repeat an earlier one: 1 - distinct-n."""
    return 1.0 - distinct_n(words, n)


def show(piece: str) -> str:
    return piece.replace(" ", "▁").replace("\n", "\\n")


@dataclass
class Setting:
    label: str
    temperature: float
    top_k: int = 0
    top_p: float = 1.0
    max_tokens: int = 32

    def params(self, n: int, seed: int) -> SamplingParams:
        """Every knob explicit: nothing comes from the model's generation defaults."""
        return SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature, top_k=self.top_k,
                              top_p=self.top_p, min_p=0.0, repetition_penalty=1.0, n=n, seed=seed,
                              logprobs=0)


def run_setting(llm, prompt: str, s: Setting, n: int, seed: int) -> list[dict]:
    """n completions of `prompt` under one setting (1 when greedy: they would all be equal), measured."""
    n = 1 if s.temperature == 0 else n
    out = llm.generate(prompt, params=s.params(n, seed))
    rows = []
    for i, r in enumerate(out if isinstance(out, list) else [out]):
        w = words_of(r.text)
        lps = [t.logprob for t in r.logprobs or []]
        rows.append({"setting": s.label, "sample": i + 1, "text": r.text.strip(), "tokens": len(r.token_ids),
                     "finish": r.finish_reason, "distinct_1": distinct_n(w, 1),
                     "distinct_2": distinct_n(w, 2), "repetition": repetition(w),
                     "mean_logprob": float(np.mean(lps)) if lps else math.nan, "ids": r.token_ids})
    return rows


def mean_of(rows: Sequence[dict], key: str) -> float:
    return float(np.mean([r[key] for r in rows]))


# ------------------------------------------------------------------------------------------ temperature
@torch.no_grad()
def next_token_logits(llm, prompt: str) -> torch.Tensor:
    """(V,) float32 logits of the token after `prompt`, encoded as the engine encodes it."""
    ids = torch.tensor([encode_prompt(llm.tokenizer, prompt)], device=llm.device)  # (1, T)
    return llm.model(ids)[0, -1].float().cpu()


@lab("temperature-entropy", fr="Température et entropie de la distribution du prochain token",
     en="Temperature and entropy of the next-token distribution", course="9", needs_model=True)
def temperature_entropy(ctx: LabContext) -> None:
    plt = pyplot()
    llm = ctx.llm()
    prompt = PROMPTS["entropy"][ctx.lang]
    logits = next_token_logits(llm, prompt)  # (V,)
    V = logits.shape[0]
    top = torch.topk(logits, 10).indices  # the same order at every T > 0
    labels = [show(t) for t in token_texts(llm.tokenizer, top.tolist())]
    dists = {T: softmax_t(logits, T) for T in TEMPERATURES}
    H = {T: entropy_bits(p) for T, p in dists.items()}
    grid = np.round(np.linspace(0.05, 3.0, 60), 3)
    curve = [entropy_bits(softmax_t(logits, float(T))) for T in grid]

    n, k = (3, 8) if ctx.quick else (5, 20)
    samples = []
    for T in ctx.bar(TEMPERATURES, desc="samples"):
        samples += [{"T": T, **r} for r in run_setting(llm, prompt, Setting(f"T={T}", T, max_tokens=k), n,
                                                       ctx.seed)]
    distinct = {T: len({tuple(r["ids"]) for r in samples if r["T"] == T}) for T in TEMPERATURES}
    first = {T: len({r["ids"][0] for r in samples if r["T"] == T and r["ids"]}) for T in TEMPERATURES}

    p_top = {T: float(dists[T].max()) for T in TEMPERATURES}
    ctx.table("distribution", [{"token": label, **{f"T={T}": round(float(dists[T][i]), 4)
                                                   for T in TEMPERATURES}}
                               for label, i in zip(labels, top.tolist())])
    ctx.table("entropy", [{"T": T, "entropy_bits": round(H[T], 3),
                           "perplexity": round(perplexity_from_bits(H[T]), 2),
                           "top_token_p": round(p_top[T], 4), "distinct_samples": distinct[T]}
                          for T in TEMPERATURES])
    ctx.table("samples", [{"T": r["T"], "sample": r["sample"], "text": r["text"]} for r in samples])
    ctx.data(prompt=prompt, temperatures=list(TEMPERATURES), entropy_bits=[H[T] for T in TEMPERATURES],
             top_token=labels[0], top_token_p=[p_top[T] for T in TEMPERATURES],
             curve_T=grid.tolist(), curve_bits=curve, max_bits=math.log2(V),
             distinct_samples=[distinct[T] for T in TEMPERATURES], samples_per_T=n, sample_tokens=k)

    fig, axes = plt.subplots(1, len(TEMPERATURES), figsize=(16, 3.8), sharey=True)
    for ax, T in zip(axes, TEMPERATURES):
        ax.bar(range(10), dists[T][top].numpy(), color="tab:blue")
        ax.set_xticks(range(10), labels, rotation=70, fontsize=8)
        ax.set_title(f"T = {ctx.num(T, 1)} — H = {ctx.num(H[T])} bits", fontsize=10)
    axes[0].set_ylabel(ctx.t("probabilité", "probability"))
    fig.suptitle(f"« {prompt} … »" if ctx.lang == "fr" else f'"{prompt} ..."')
    ctx.figure(fig, "distributions")

    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot([0.0, *grid], [0.0, *curve], "-", label=ctx.t("entropie", "entropy"))
    ax.plot(TEMPERATURES, [H[T] for T in TEMPERATURES], "o", color="tab:red")
    for T in TEMPERATURES:
        ax.annotate(ctx.num(H[T], 1), (T, H[T]), textcoords="offset points", xytext=(4, -12), fontsize=8)
    top_bits = ctx.num(math.log2(V), 1)
    ax.axhline(math.log2(V), color="gray", ls=":",
               label=ctx.t(f"log2 V = {top_bits} (uniforme)", f"log2 V = {top_bits} (uniform)"))
    ax.set_xlabel(ctx.t("température T", "temperature T"))
    ax.set_ylabel(ctx.t("entropie (bits)", "entropy (bits)"))
    ax.legend()
    ctx.figure(fig, "entropy")

    lo, hi = TEMPERATURES[0], TEMPERATURES[-1]
    ctx.finding(
        f"Après « {prompt} », le token le plus probable est « {labels[0]} » : {ctx.pct(p_top[lo])} à "
        f"T = {ctx.num(lo, 1)}, {ctx.pct(p_top[1.0])} à T = 1, {ctx.pct(p_top[hi])} à T = {ctx.num(hi, 1)}.",
        f"After \"{prompt}\", the most likely token is \"{labels[0]}\": {ctx.pct(p_top[lo])} at "
        f"T = {ctx.num(lo, 1)}, {ctx.pct(p_top[1.0])} at T = 1, {ctx.pct(p_top[hi])} at "
        f"T = {ctx.num(hi, 1)}.")
    fr = ", ".join(f"{ctx.num(H[T])} bits à T = {ctx.num(T, 1)}" for T in TEMPERATURES)
    en = ", ".join(f"{ctx.num(H[T])} bits at T = {ctx.num(T, 1)}" for T in TEMPERATURES)
    ctx.finding(
        f"L'entropie croît avec T : {fr} (au plus log2 V = {ctx.num(math.log2(V), 1)} bits) ; à T = 1 le "
        f"modèle hésite comme entre {ctx.num(perplexity_from_bits(H[1.0]), 1)} tokens équiprobables.",
        f"Entropy grows with T: {en} (at most log2 V = {ctx.num(math.log2(V), 1)} bits); at T = 1 the model "
        f"hesitates as between {ctx.num(perplexity_from_bits(H[1.0]), 1)} equally likely tokens.")
    ctx.finding(
        f"Sur {n} tirages de {k} tokens : {distinct[lo]} texte(s) différent(s) à T = {ctx.num(lo, 1)} "
        f"({first[lo]} premier(s) token(s)), {distinct[hi]} à T = {ctx.num(hi, 1)} ({first[hi]} premier(s) "
        "token(s)).",
        f"Out of {n} samples of {k} tokens: {distinct[lo]} different text(s) at T = {ctx.num(lo, 1)} "
        f"({first[lo]} first token(s)), {distinct[hi]} at T = {ctx.num(hi, 1)} ({first[hi]} first token(s)).")


# ------------------------------------------------------------------------------------------ TP1
@lab("tp1", fr="TP1 : générer du texte (longueur, température, do_sample)",
     en="TP1: generating text (length, temperature, do_sample)", course="TP1", needs_model=True)
def tp1(ctx: LabContext) -> None:
    plt = pyplot()
    llm = ctx.llm()
    prompt = PROMPTS["tp1"][ctx.lang]
    lengths = (5, 10, 20) if ctx.quick else (10, 30, 60)
    temps = (0.3, 0.7, 1.0, 1.5)
    n = 2 if ctx.quick else 3
    sample_len = 12 if ctx.quick else 40
    greedy = [Setting(f"greedy, max {m}", 0.0, max_tokens=m) for m in lengths]
    sampled = [Setting(f"T={T}", T, max_tokens=sample_len) for T in temps]
    rows = []
    for s in ctx.bar([*greedy, *sampled], desc="settings"):
        for r in run_setting(llm, prompt, s, n, ctx.seed):
            rows.append({"do_sample": s.temperature > 0, "temperature": s.temperature,
                         "max_tokens": s.max_tokens, **r})
    g = [r for r in rows if not r["do_sample"]]
    prefix = all(a["ids"] == b["ids"][:len(a["ids"])] for a, b in zip(g, g[1:]))
    capped = sum(r["finish"] == "length" for r in g)
    by_t = {T: [r for r in rows if r["temperature"] == T] for T in temps}
    same = {T: len({tuple(r["ids"]) for r in by_t[T]}) for T in temps}

    ctx.table("generations", [{c: (round(r[c], 3) if isinstance(r[c], float) else r[c]) for c in
                               ("do_sample", "temperature", "max_tokens", "sample", "tokens", "finish",
                                "mean_logprob", "distinct_2", "text")} for r in rows])
    ctx.data(prompt=prompt, greedy_lengths=[r["tokens"] for r in g], greedy_prefixes=prefix,
             temperatures=list(temps), mean_logprob={str(T): mean_of(by_t[T], "mean_logprob") for T in temps},
             greedy_mean_logprob=mean_of(g, "mean_logprob"),
             distinct_2={str(T): mean_of(by_t[T], "distinct_2") for T in temps}, samples_per_T=n)

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax.bar([str(m) for m in lengths], [r["tokens"] for r in g], color="tab:gray")
    ax.set_xlabel("max_new_tokens")
    ax.set_ylabel(ctx.t("tokens générés (glouton)", "tokens generated (greedy)"))
    xs = [0.0, *temps]
    ax2.plot(xs, [mean_of(g, "mean_logprob"), *[mean_of(by_t[T], "mean_logprob") for T in temps]], "o-",
             label=ctx.t("log-prob moyenne / token", "mean log-prob / token"))
    ax2.set_xlabel(ctx.t("température (0 = do_sample=False)", "temperature (0 = do_sample=False)"))
    ax2.set_ylabel(ctx.t("log-prob moyenne (nats)", "mean log-prob (nats)"))
    ax2b = ax2.twinx()
    ax2b.plot(xs, [mean_of(g, "distinct_2"), *[mean_of(by_t[T], "distinct_2") for T in temps]], "s--",
              color="tab:orange", label="distinct-2")
    ax2b.set_ylabel("distinct-2", color="tab:orange")
    ax2b.set_ylim(0, 1.05)
    ax2.legend(loc="lower left")
    ctx.figure(fig, "tp1")

    lens = ", ".join(str(r["tokens"]) for r in g)
    ctx.finding(
        f"Sans échantillonnage (do_sample=False, glouton), max_new_tokens = {', '.join(map(str, lengths))} "
        f"donne {lens} tokens ({capped} sortie(s) coupée(s) par la limite) ; "
        + ("chaque sortie plus courte est le début de la plus longue : le glouton est déterministe."
           if prefix else "les sorties ne sont pas les préfixes l'une de l'autre."),
        f"Without sampling (do_sample=False, greedy), max_new_tokens = {', '.join(map(str, lengths))} gives "
        f"{lens} tokens ({capped} output(s) cut by the limit); "
        + ("each shorter output is the start of the longer one: greedy is deterministic."
           if prefix else "the outputs are not prefixes of one another."))
    lp_g = mean_of(g, "mean_logprob")
    lp_t = {T: mean_of(by_t[T], "mean_logprob") for T in temps}
    lp = ", ".join(f"{ctx.num(lp_t[T])} (T = {ctx.num(T, 1)})" for T in temps)
    falls = all(a > b for a, b in zip([lp_g, *lp_t.values()], lp_t.values()))
    ctx.finding(
        f"Log-prob moyenne par token du texte produit : {ctx.num(lp_g)} en glouton, {lp}"
        + (" : plus T monte, moins le modèle trouve son propre texte probable." if falls else "."),
        f"Mean log-prob per token of the generated text: {ctx.num(lp_g)} greedy, {lp}"
        + (": the higher T, the less likely the model finds its own text." if falls else "."))
    ctx.finding(
        f"Avec do_sample=True, {n} tirages donnent {same[temps[0]]} texte(s) différent(s) à T = "
        f"{ctx.num(temps[0], 1)} et {same[temps[-1]]} à T = {ctx.num(temps[-1], 1)}.",
        f"With do_sample=True, {n} samples give {same[temps[0]]} different text(s) at "
        f"T = {ctx.num(temps[0], 1)} and {same[temps[-1]]} at T = {ctx.num(temps[-1], 1)}.")


# ------------------------------------------------------------------------------------------ TP2
def tp2_settings(max_tokens: int) -> list[Setting]:
    return [Setting("greedy", 0.0, max_tokens=max_tokens), Setting("T=0.7", 0.7, max_tokens=max_tokens),
            *[Setting(f"top-k {k}", 1.0, top_k=k, max_tokens=max_tokens) for k in (10, 50, 100)],
            *[Setting(f"top-p {p}", 1.0, top_p=p, max_tokens=max_tokens) for p in (0.9, 0.95)]]


@lab("tp2", fr="TP2 : glouton, température, top-k, top-p comparés", en="TP2: greedy, temperature, top-k and "
     "top-p compared", course="TP2", needs_model=True)
def tp2(ctx: LabContext) -> None:
    plt = pyplot()
    llm = ctx.llm()
    prompt = PROMPTS["tp2"][ctx.lang]
    n, k = (2, 16) if ctx.quick else (5, 60)
    settings = tp2_settings(k)
    rows = {s.label: run_setting(llm, prompt, s, n, ctx.seed) for s in ctx.bar(settings, desc="settings")}
    keys = ("tokens", "distinct_1", "distinct_2", "repetition", "mean_logprob")
    summary = [{"setting": s.label, "samples": len(rows[s.label]),
                **{c: round(mean_of(rows[s.label], c), 3) for c in keys}, "text": rows[s.label][0]["text"]}
               for s in settings]
    ctx.table("comparison", summary)
    ctx.table("samples", [{c: r[c] for c in ("setting", "sample", "tokens", "text")}
                          for s in settings for r in rows[s.label]])
    ctx.data(prompt=prompt, samples_per_setting=n, max_tokens=k,
             settings={r["setting"]: {c: r[c] for c in keys} for r in summary})

    labels = [r["setting"] for r in summary]
    x = np.arange(len(labels))
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4))
    ax.bar(x - 0.2, [r["distinct_2"] for r in summary], 0.4, label="distinct-2")
    ax.bar(x + 0.2, [r["repetition"] for r in summary], 0.4, label=ctx.t("répétition (trigrammes)",
                                                                         "repetition (trigrams)"))
    ax.set_xticks(x, labels, rotation=30)
    ax.set_ylim(0, 1.3)
    ax.legend(loc="upper center", ncol=2)
    ax2.bar(x, [r["mean_logprob"] for r in summary], color="tab:green")
    ax2.set_xticks(x, labels, rotation=30)
    ax2.set_ylabel(ctx.t("log-prob moyenne par token (nats)", "mean log-prob per token (nats)"))
    fig.suptitle(ctx.t(f"{n} tirage(s) de {k} tokens au plus par réglage",
                       f"{n} sample(s) of at most {k} tokens per setting"))
    ctx.figure(fig, "tp2")

    best = max(summary, key=lambda r: r["mean_logprob"])
    worst = min(summary, key=lambda r: r["mean_logprob"])
    why_fr = (" : le glouton prend à chaque pas le token le plus probable" if best is summary[0] else "")
    why_en = (": greedy takes the most likely token at every step" if best is summary[0] else "")
    ctx.finding(
        f"Log-prob moyenne par token la plus haute : {best['setting']} ({ctx.num(best['mean_logprob'])}), "
        f"la plus basse : {worst['setting']} ({ctx.num(worst['mean_logprob'])}){why_fr}.",
        f"Highest mean log-prob per token: {best['setting']} ({ctx.num(best['mean_logprob'])}), lowest: "
        f"{worst['setting']} ({ctx.num(worst['mean_logprob'])}){why_en}.")
    g = summary[0]
    others = summary[1:]
    rep_s = float(np.mean([r["repetition"] for r in others]))
    d2_s = float(np.mean([r["distinct_2"] for r in others]))
    ctx.finding(
        f"Le glouton répète {ctx.pct(g['repetition'])} de ses trigrammes de mots (distinct-2 "
        f"{ctx.num(g['distinct_2'])}), les réglages échantillonnés {ctx.pct(rep_s)} en moyenne (distinct-2 "
        f"{ctx.num(d2_s)}).",
        f"Greedy repeats {ctx.pct(g['repetition'])} of its word trigrams (distinct-2 "
        f"{ctx.num(g['distinct_2'])}), the sampled settings {ctx.pct(rep_s)} on average (distinct-2 "
        f"{ctx.num(d2_s)}).")
    tk = [r for r in summary if r["setting"].startswith("top-k")]
    falls = all(a["mean_logprob"] > b["mean_logprob"] for a, b in zip(tk, tk[1:]))
    lst = ", ".join(f"{ctx.num(r['mean_logprob'])} (k = {r['setting'].split()[-1]})" for r in tk)
    ctx.finding(
        f"top-k : log-prob moyenne {lst}" + (" : plus k est grand, plus la queue de la distribution entre "
                                             "dans le texte." if falls else "."),
        f"top-k: mean log-prob {lst}" + (": the larger k, the more of the distribution's tail gets into the "
                                         "text." if falls else "."))

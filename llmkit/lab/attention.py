"""Looking at what the model computes, layer by layer: attention heatmaps on co-reference sentences
(`attention`, the course's experiment 6) and the logit lens (`logit-lens`).

    llmkit lab attention --lang fr      # heatmaps + the head that links "Il" to "médecin"
    llmkit lab logit-lens --lang en     # top next token after each layer for "The capital of France is"

Notable choices
- Everything comes from one forward per sentence through `llmkit.lab.inside.look` (the model's exact
  float32 weights, the same numbers as the web chat's panel); nothing here recomputes attention.
- A word is the set of tokens whose characters overlap it (`word_positions`): "médecin" is 4 tokens for
  SmolLM2, and the weight a pronoun gives its antecedent is the sum over those tokens. The baseline is
  uniform attention over what the pronoun can see: n_tokens / (position + 1), "1/position" per token.
- The best head is searched over every layer x head on the first sentence only; the other sentences say
  whether that head does the same elsewhere (a head found on one example may be a coincidence).
- The attention sink (most heads park their weight on the first token) is measured, not assumed: it is
  why many heads sit below the uniform baseline.
- Logit lens: `inside.logit_lens` (final norm + head on each layer's residual stream). The answer is the
  model's own top-1 at the last position; its probability and rank per layer come from the lens over the
  full vocabulary at that one position.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import torch

from llmkit.errors import LlmkitError
from llmkit.lab import LabContext, lab, pyplot
from llmkit.lab.inside import Inside, LensRow, logit_lens, look, token_texts


@dataclass(frozen=True)
class Coref:
    text: str
    pronoun: str
    antecedent: str


SENTENCES = {
    "fr": [Coref("Le médecin a vu sa patiente. Il lui a parlé longtemps.", "Il", "médecin"),
           Coref("La serveuse a servi le vieil homme. Elle lui a souri.", "Elle", "serveuse"),
           Coref("Le roi a accueilli la reine. Il s'est incliné devant elle.", "Il", "roi")],
    "en": [Coref("The doctor saw his patient. He talked to her for a long time.", "He", "doctor"),
           Coref("The waitress served the old man. She smiled at him.", "She", "waitress"),
           Coref("The king welcomed the queen. He bowed to her.", "He", "king")],
}

LENS_PROMPTS = {"fr": ["La capitale de la France est la ville de", "Un, deux, trois, quatre,"],
                "en": ["The capital of France is", "One, two, three, four,"]}


def word_positions(tokenizer, ids: list[int], text: str, word: str, occurrence: int = 0) -> list[int]:
    """Indices of the tokens of `ids` (the encoding of `text`) that overlap the `occurrence`-th whole-word
    match of `word` in `text`."""
    from llmkit.tokenizer.chat import _token_spans

    matches = list(re.finditer(rf"(?<!\w){re.escape(word)}(?!\w)", text))
    if len(matches) <= occurrence:
        raise LlmkitError(f"word {word!r} not found (occurrence {occurrence}) in {text!r}")
    a, b = matches[occurrence].span()
    spans = _token_spans(tokenizer, ids, text, 0)
    return [i for i, (s, e) in enumerate(spans) if s < b and e > a]


@dataclass
class CorefScores:
    query: int  # position of the pronoun's first token
    keys: list[int]  # the antecedent's tokens
    weights: torch.Tensor  # (L, H): attention from the pronoun to the antecedent, summed over its tokens

    @property
    def baseline(self) -> float:
        """What uniform attention over the query's visible positions would give the antecedent."""
        return len(self.keys) / (self.query + 1)

    def best(self) -> tuple[int, int, float]:
        """(layer, head, weight) of the head that attends most to the antecedent."""
        i = int(self.weights.argmax())
        H = self.weights.shape[1]
        return i // H, i % H, float(self.weights.flatten()[i])


def coref_scores(inside: Inside, query: int, keys: list[int]) -> CorefScores:
    """Attention from position `query` to positions `keys` for every layer and head."""
    A = torch.stack(inside.attentions)  # (L, H, T, T)
    return CorefScores(query, keys, A[:, :, query, keys].sum(-1))


def sink_share(inside: Inside) -> float:
    """Mean attention the queries after the first give to the first token, over all layers and heads."""
    A = torch.stack(inside.attentions)  # (L, H, T, T)
    return float(A[:, :, 1:, 0].mean())


def _heatmap(ax, w: torch.Tensor, labels: list[str], title: str, small: bool = True, xlabels: bool = True,
             ylabels: bool = True) -> None:
    """One (T, T) attention map; tick labels only where asked (a grid labels its outer edges)."""
    ax.imshow(w.numpy(), cmap="viridis", vmin=0, vmax=1)
    ax.set_title(title, fontsize=8 if small else 10)
    fs = 5 if small else 7
    ax.set_xticks(range(len(labels)), labels if xlabels else [], rotation=90, fontsize=fs)
    ax.set_yticks(range(len(labels)), labels if ylabels else [], fontsize=fs)


def _show(s: str) -> str:
    return s.replace("\n", "⏎") if s.strip() else repr(s)[1:-1] or "∅"


@lab("attention", fr="Attention : cartes de chaleur et coréférence",
     en="Attention: heatmaps and co-reference", course="6", needs_model=True)
def attention(ctx: LabContext) -> None:
    llm = ctx.llm()
    tok, model = llm.tokenizer, llm.model
    sents = SENTENCES[ctx.lang][: 2 if ctx.quick else 3]
    runs = []
    for s in ctx.bar(sents, desc="attention"):
        ids = tok.encode(s.text)
        inside = look(model, ids)
        q = word_positions(tok, ids, s.text, s.pronoun)[0]
        keys = word_positions(tok, ids, s.text, s.antecedent)
        runs.append((s, ids, inside, coref_scores(inside, q, keys)))
    s0, ids0, in0, sc0 = runs[0]
    L, H = in0.n_layers, in0.n_heads
    layer, head, w = sc0.best()
    labels = [_show(t) for t in token_texts(tok, ids0)]

    # the heatmap grid: a few layers (first, middle, last, and the best head's) x a few heads
    plt = pyplot()
    layers = sorted({0, L // 2, L - 1, layer} if not ctx.quick else {0, layer, L - 1})
    heads = sorted({0, H // 2, H - 1, head})
    fig, axes = plt.subplots(len(layers), len(heads), figsize=(2.6 * len(heads), 2.6 * len(layers)),
                             squeeze=False)
    for r, ly in enumerate(layers):
        for c, hd in enumerate(heads):
            _heatmap(axes[r][c], in0.attention(ly, hd), labels,
                     ctx.t(f"couche {ly}, tête {hd}", f"layer {ly}, head {hd}"),
                     xlabels=r == len(layers) - 1, ylabels=c == 0)
    fig.suptitle(ctx.t(f"« {s0.text} » — ligne = requête, colonne = clé",
                       f'"{s0.text}" — row = query, column = key'), fontsize=9)
    fig.tight_layout()
    ctx.figure(fig, "heatmaps")

    # the best head's map, and the best weight per layer against the uniform baseline
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 5), gridspec_kw={"width_ratios": [1, 1.2]})
    _heatmap(a1, in0.attention(layer, head), labels,
             ctx.t(f"meilleure tête : couche {layer}, tête {head}", f"best head: layer {layer}, head {head}"),
             small=False)
    a1.add_patch(plt.Rectangle((min(sc0.keys) - 0.5, sc0.query - 0.5), len(sc0.keys), 1, fill=False,
                               edgecolor="red", lw=2))
    per_layer = sc0.weights.max(1).values  # (L,)
    a2.plot(range(L), per_layer.numpy(), marker="o", ms=3, label=ctx.t("meilleure tête de la couche",
                                                                        "best head of the layer"))
    a2.plot(range(L), sc0.weights.mean(1).numpy(), marker=".", ms=3, label=ctx.t("moyenne des têtes",
                                                                                  "mean over heads"))
    a2.axhline(sc0.baseline, color="gray", ls="--", label=ctx.t("attention uniforme", "uniform attention"))
    a2.set_xlabel(ctx.t("couche", "layer"))
    a2.set_ylabel(ctx.t(f"poids « {s0.pronoun} » → « {s0.antecedent} »", f'weight "{s0.pronoun}" → '
                        f'"{s0.antecedent}"'))
    a2.legend(fontsize=8)
    fig.tight_layout()
    ctx.figure(fig, "best_head")

    rows = []
    for s, ids, inside, sc in runs:
        bl, bh, bw = sc.best()
        rows.append({"sentence": s.text, "pronoun": s.pronoun, "antecedent": s.antecedent,
                     "antecedent_tokens": len(sc.keys), "baseline": round(sc.baseline, 4),
                     f"L{layer}H{head}": round(float(sc.weights[layer, head]), 4),
                     "best_head": f"L{bl}H{bh}", "best_weight": round(bw, 4),
                     "heads_above_baseline": int((sc.weights > sc.baseline).sum())})
    ctx.table("coreference", rows)
    sink = sink_share(in0)
    mean_ratio = torch.stack([sc.weights / sc.baseline for *_, sc in runs]).mean(0)  # (L, H)
    ml, mh = divmod(int(mean_ratio.argmax()), H)
    ctx.data(best_layer=layer, best_head=head, best_weight=w, baseline=sc0.baseline,
             ratio=w / sc0.baseline, antecedent_tokens=len(sc0.keys), sink_share=sink,
             heads_above_baseline=rows[0]["heads_above_baseline"], n_heads_total=L * H,
             best_on_average=[ml, mh], best_on_average_ratio=float(mean_ratio[ml, mh]))

    n = len(sc0.keys)
    ctx.finding(
        f"Parmi les {L}×{H} têtes, celle qui relie le plus « {s0.pronoun} » à « {s0.antecedent} » est la "
        f"couche {layer}, tête {head} : {ctx.num(w)} de son attention va "
        f"{'au jeton' if n == 1 else f'aux {n} jetons'} de "
        f"« {s0.antecedent} », contre {ctx.num(sc0.baseline)} pour une attention uniforme ({n}/"
        f"{sc0.query + 1}), soit {ctx.num(w / sc0.baseline, 1)} fois plus.",
        f"Of the {L}×{H} heads, the one linking \"{s0.pronoun}\" most to \"{s0.antecedent}\" is layer "
        f"{layer}, head {head}: {ctx.num(w)} of its attention goes to "
        f"{'the token' if n == 1 else f'the {n} tokens'} of "
        f"\"{s0.antecedent}\", against {ctx.num(sc0.baseline)} for uniform attention ({n}/{sc0.query + 1}), "
        f"{ctx.num(w / sc0.baseline, 1)} times more.")
    others = runs[1:]
    if others:
        fr = " ; ".join(f"« {s.pronoun} » → « {s.antecedent} » {ctx.num(float(sc.weights[layer, head]))} "
                       f"(uniforme {ctx.num(sc.baseline)})" for s, _, _, sc in others)
        en = "; ".join(f'"{s.pronoun}" → "{s.antecedent}" {ctx.num(float(sc.weights[layer, head]))} '
                       f"(uniform {ctx.num(sc.baseline)})" for s, _, _, sc in others)
        ctx.finding(
            f"La même tête sur les autres phrases : {fr}. En moyenne sur les {len(runs)} phrases, la tête "
            f"la plus tournée vers l'antécédent est la couche {ml}, tête {mh} "
            f"({ctx.num(float(mean_ratio[ml, mh]), 1)} fois l'uniforme).",
            f"The same head on the other sentences: {en}. Averaged over the {len(runs)} sentences, the head "
            f"most turned to the antecedent is layer {ml}, head {mh} "
            f"({ctx.num(float(mean_ratio[ml, mh]), 1)} times uniform).")
    ctx.finding(
        f"Puits d'attention : en moyenne sur toutes les couches et têtes, {ctx.pct(sink)} de l'attention de "
        f"chaque jeton va au tout premier jeton (« {labels[0]} ») ; c'est pourquoi seules "
        f"{rows[0]['heads_above_baseline']} têtes sur {L * H} dépassent l'attention uniforme vers "
        f"« {s0.antecedent} ».",
        f"Attention sink: averaged over all layers and heads, {ctx.pct(sink)} of each token's attention goes "
        f"to the very first token (\"{labels[0]}\"); this is why only {rows[0]['heads_above_baseline']} "
        f"heads of {L * H} beat uniform attention towards \"{s0.antecedent}\".")


# --------------------------------------------------------------------------------------------- logit lens


def first_top1_layer(top_ids: list[int], answer: int) -> tuple[int | None, int | None]:
    """(first layer where `answer` is top-1, first layer from which it stays top-1), layers counted from 1
    (top_ids[i] is the top-1 after layer i + 1); None when it never is."""
    first = next((i + 1 for i, t in enumerate(top_ids) if t == answer), None)
    stays = None
    for i in range(len(top_ids) - 1, -1, -1):
        if top_ids[i] != answer:
            break
        stays = i + 1
    return first, stays


def answer_by_layer(model, inside: Inside, answer: int) -> tuple[list[float], list[int]]:
    """Probability and rank (1 = top) of token `answer` at the last position after each layer."""
    last = replace(inside, attentions=[a[:, -1:] for a in inside.attentions],
                   hidden_states=[h[-1:] for h in inside.hidden_states], logits=inside.logits[-1:])
    V = inside.logits.shape[-1]
    probs, ranks = [], []
    for row in logit_lens(model, last, k=V):  # (1, V) sorted: the rank is where the answer sits
        r = int((row.ids[0] == answer).nonzero()[0, 0])
        probs.append(float(row.probs[0, r]))
        ranks.append(r + 1)
    return probs, ranks


def _lens_grid(ctx: LabContext, plt, lens: list[LensRow], tok, ids: list[int], prompt: str):
    L, T = len(lens), len(ids)
    P = torch.stack([r.probs[:, 0] for r in lens])  # (L, T)
    fig, ax = plt.subplots(figsize=(1.25 * T + 1.5, 0.3 * L + 1.5))
    ax.imshow(P.numpy(), cmap="Blues", vmin=0, vmax=1, aspect="auto", origin="lower")
    for li, r in enumerate(lens):
        for t in range(T):
            ax.text(t, li, _show(tok.id_to_text(int(r.ids[t, 0])))[:10], ha="center", va="center",
                    fontsize=6, color="white" if P[li, t] > 0.5 else "black")
    ax.set_xticks(range(T), [_show(s) for s in token_texts(tok, ids)], fontsize=8)
    ax.set_yticks(range(L), [str(r.layer) for r in lens], fontsize=6)
    ax.set_xlabel(ctx.t("position (jeton lu) — case : jeton prédit ensuite, couleur : sa probabilité",
                        "position (token read) — cell: next token predicted, colour: its probability"))
    ax.set_ylabel(ctx.t("après la couche", "after layer"))
    ax.set_title(ctx.t(f"Logit lens : « {prompt} »", f'Logit lens: "{prompt}"'), fontsize=10)
    fig.tight_layout()
    return fig


def _prob(ctx: LabContext, p: float) -> str:
    """A probability as a percentage, two significant digits when small (0,0042 %), in scientific notation
    when tiny (3,2e-08 %)."""
    x = 100 * p
    if x >= 0.1 or x == 0:
        return ctx.pct(p)
    if x >= 1e-3:
        return ctx.pct(p, 1 - math.floor(math.log10(x)))
    s = f"{x:.1e} %"
    return s.replace(".", ",") if ctx.lang == "fr" else s


def _lens_findings(ctx: LabContext, prompt: str, text: str, probs: list[float], ranks: list[int],
                   first: int | None, stays: int | None, agree: list[float], half: int | None) -> None:
    L, mid = len(probs), len(probs) // 2
    if first == L:
        when_fr = f"Elle ne devient le premier choix qu'à la dernière couche ({L} sur {L})."
        when_en = f"It becomes the top choice only at the last layer ({L} of {L})."
    elif first is not None:
        when_fr = f"Elle devient le premier choix après la couche {first} sur {L}" + (
            ", et le reste." if stays == first else f", et le reste à partir de la couche {stays}.")
        when_en = f"It becomes the top choice after layer {first} of {L}" + (
            ", and stays so." if stays == first else f", and stays so from layer {stays} on.")
    else:  # cannot happen for the model's own argmax, but a lens over another head could
        when_fr, when_en = "Elle n'est jamais le premier choix.", "It is never the top choice."
    p = _prob(ctx, probs[-1])
    ctx.finding(f"Réponse finale du modèle après « {prompt} » : « {text} » (p = {p}). {when_fr}",
                f"The model's final answer after \"{prompt}\": \"{text}\" (p = {p}). {when_en}")
    ctx.finding(
        f"Probabilité de « {text} » couche par couche : {_prob(ctx, probs[0])} après la couche 1 (rang "
        f"{ranks[0]}), {_prob(ctx, probs[mid - 1])} après la couche {mid} (rang {ranks[mid - 1]}), "
        f"{_prob(ctx, probs[-2])} après la couche {L - 1} (rang {ranks[-2]}), {p} en sortie.",
        f"Probability of \"{text}\" layer by layer: {_prob(ctx, probs[0])} after layer 1 (rank {ranks[0]}), "
        f"{_prob(ctx, probs[mid - 1])} after layer {mid} (rank {ranks[mid - 1]}), {_prob(ctx, probs[-2])} "
        f"after layer {L - 1} (rank {ranks[-2]}), {p} at the output.")
    ctx.finding(
        f"Sur toutes les positions du prompt, le premier choix lu après la couche 1 est déjà celui du modèle "
        f"pour {ctx.pct(agree[0])} des positions, {ctx.pct(agree[mid - 1])} après la couche {mid}"
        + (f" ; la moitié des positions est atteinte à la couche {half}." if half else "."),
        f"Over all prompt positions, the top choice read after layer 1 is already the model's for "
        f"{ctx.pct(agree[0])} of positions, {ctx.pct(agree[mid - 1])} after layer {mid}"
        + (f"; half of the positions agree from layer {half}." if half else "."))


@lab("logit-lens", fr="Logit lens : la prédiction couche par couche",
     en="Logit lens: the prediction layer by layer", needs_model=True)
def logit_lens_lab(ctx: LabContext) -> None:
    llm = ctx.llm()
    tok, model = llm.tokenizer, llm.model
    plt = pyplot()
    prompts = LENS_PROMPTS[ctx.lang][: 1 if ctx.quick else 2]
    table, curves = [], []
    for k, prompt in enumerate(ctx.bar(prompts, desc="logit-lens")):
        ids = tok.encode(prompt)
        inside = look(model, ids)
        lens = logit_lens(model, inside, k=1)
        answer = int(inside.logits[-1].argmax())
        probs, ranks = answer_by_layer(model, inside, answer)
        first, stays = first_top1_layer([int(r.ids[-1, 0]) for r in lens], answer)
        final_top = [int(t) for t in inside.logits.argmax(-1)]  # (T,) the model's own top-1 per position
        agree = [sum(int(r.ids[t, 0]) == final_top[t] for t in range(len(ids))) / len(ids) for r in lens]
        half = next((r.layer for r, a in zip(lens, agree) if a >= 0.5), None)
        text = tok.id_to_text(answer)
        ctx.figure(_lens_grid(ctx, plt, lens, tok, ids, prompt), f"lens_grid_{k + 1}")
        curves.append((prompt, text, probs, ranks, first))
        L = len(lens)
        table.append({"prompt": prompt, "answer": text, "p_final": round(probs[-1], 4),
                      "first_top1_layer": first, "top1_from_layer": stays,
                      "p_mid": round(probs[L // 2 - 1], 6), "rank_mid": ranks[L // 2 - 1],
                      "half_agree_layer": half})
        if k == 0:
            ctx.data(answer=text, answer_id=answer, n_layers=L, first_top1_layer=first, top1_from_layer=stays,
                     p_by_layer=probs, rank_by_layer=ranks, agreement_by_layer=agree)
            _lens_findings(ctx, prompt, text.strip(), probs, ranks, first, stays, agree, half)
    ctx.table("answers", table)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for prompt, text, probs, ranks, first in curves:
        layers = list(range(1, len(probs) + 1))
        lbl = f"{text.strip()!r} ← {prompt}"
        a1.plot(layers, probs, marker="o", ms=3, label=lbl)
        a2.plot(layers, ranks, marker="o", ms=3, label=lbl)
        if first is not None:
            a1.axvline(first, color="gray", ls=":", lw=1)
    a1.set_xlabel(ctx.t("après la couche", "after layer"))
    a1.set_ylabel(ctx.t("probabilité de la réponse finale", "probability of the final answer"))
    a2.set_yscale("log")
    a2.invert_yaxis()
    a2.set_xlabel(ctx.t("après la couche", "after layer"))
    a2.set_ylabel(ctx.t("rang de la réponse finale (1 = premier)", "rank of the final answer (1 = top)"))
    a1.legend(fontsize=7)
    fig.tight_layout()
    ctx.figure(fig, "answer_by_layer")

"""Word vectors: cosine similarity and nearest neighbours in the input embedding table, a 2-D map (PCA) of
word clusters, and meaning in context — the hidden state of "avocat" (fr; "bank" in en) in sentences about
food vs the courtroom (riverside vs money), layer by layer (`embeddings`).

    llmkit lab embeddings --lang fr

Notable choices
- Static vectors are rows of the model's own input table (`embed_tokens`), read as they are: no training,
  no other model. A word is encoded with a leading space (" roi"), its form inside a sentence; a word the
  tokenizer splits (SmolLM2 splits most French words: " ro" + "i") gets the mean of its tokens' rows, and
  the findings say how many words that concerns.
- Cosine similarity is computed on L2-normalised vectors (`cosine_matrix`); the PCA map projects the
  centred word vectors on their two main axes (SVD) and reports the variance those axes keep.
- Nearest neighbours are searched twice: among the lab's words (does a word's closest word belong to its
  group?) and in the whole vocabulary (which tokens sit closest to a single-token word).
- Meaning in context: the word's last token (the one that has read the whole word) in four sentences, two
  per sense, with the disambiguating words placed before it (a causal model only sees the left context).
  Per layer: the mean cosine between same-sense and between different-sense vectors, and how much each
  vector still points along its static embedding (layer 0 is that embedding: all cosines are 1 there).
  The last layer's hidden state is the normed one (inside.look's convention).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmkit.lab import LabContext, lab, pyplot
from llmkit.lab.attention import word_positions
from llmkit.lab.inside import look, token_texts

GROUPS = {
    "fr": {"royauté": ["roi", "reine", "prince", "princesse"],
           "fruits": ["pomme", "poire", "banane", "fraise"],
           "animaux": ["chien", "chat", "cheval", "lapin"],
           "couleurs": ["rouge", "bleu", "vert", "jaune"],
           "pays": ["France", "Allemagne", "Italie", "Espagne"]},
    "en": {"royalty": ["king", "queen", "prince", "princess"],
           "fruits": ["apple", "pear", "banana", "strawberry"],
           "animals": ["dog", "cat", "horse", "rabbit"],
           "colours": ["red", "blue", "green", "yellow"],
           "countries": ["France", "Germany", "Italy", "Spain"]},
}

# (word, sense A, sense B): two sentences per sense, the word last, its context before it
CONTEXT = {
    "fr": ("avocat", "salade", "tribunal",
           ["Dans la salade, j'ai coupé un avocat", "Pour le guacamole, il faut écraser un avocat"],
           ["Au tribunal, le juge a écouté un avocat", "Pour sa défense, l'accusé a choisi un avocat"]),
    "en": ("bank", "river", "money",
           ["After fishing in the river, we sat on the grassy bank",
            "The boat drifted slowly towards the muddy bank"],
           ["To withdraw some money, I walked to the bank",
            "My salary is paid every month into my account at the bank"]),
}


def cosine_matrix(X: torch.Tensor) -> torch.Tensor:
    """(N, d) -> (N, N) cosine similarities between rows."""
    U = F.normalize(X.float(), dim=-1)  # (N, d) unit rows
    return U @ U.T


def pca_2d(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Coordinates (N, 2) of the centred rows on their two principal axes, and the fraction of the total
    variance each axis keeps (2,)."""
    Xc = X.float() - X.float().mean(0)  # (N, d)
    U, S, _ = torch.linalg.svd(Xc, full_matrices=False)  # U (N, r), S (r,)
    var = S**2
    return U[:, :2] * S[:2], var[:2] / var.sum()


def word_vectors(embed: torch.Tensor, tokenizer, words: list[str]) -> tuple[torch.Tensor, list[list[int]]]:
    """Static vectors (N, d): the mean of the embedding rows of each word's tokens (encoded with a leading
    space), and each word's token ids."""
    ids = [tokenizer.encode(" " + w) for w in words]
    return torch.stack([embed[i].float().mean(0) for i in ids]), ids


def group_stats(C: torch.Tensor, groups: list[int]) -> dict[str, float]:
    """Mean cosine within groups and between groups, and how many words have their nearest other word in
    their own group, from a cosine matrix C (N, N) and each word's group index."""
    g = torch.tensor(groups)
    same = g[:, None] == g[None, :]  # (N, N)
    off = ~torch.eye(len(g), dtype=torch.bool)
    nearest = C.masked_fill(~off, -2).argmax(1)  # (N,) nearest other word
    return {"within": float(C[same & off].mean()), "between": float(C[~same].mean()),
            "nn_in_group": int((g[nearest] == g).sum())}


def nearest_tokens(unit: torch.Tensor, vec: torch.Tensor, k: int,
                   exclude: list[int]) -> list[tuple[int, float]]:
    """The k rows of a row-normalised table `unit` (V, d) closest to `vec` by cosine (ids in `exclude`
    skipped): [(id, cosine)]."""
    cos = unit @ F.normalize(vec.float(), dim=0)  # (V,)
    cos[exclude] = -2
    top = cos.topk(k)
    return [(int(i), float(c)) for c, i in zip(top.values, top.indices)]


def context_cosines(model, tokenizer, word: str, sentences: list[str], bar=None) -> dict:
    """Cosines between the vectors of `word` (its last token) in 4 sentences, 2 per sense (a, a, b, b), after
    each layer (0 = the static embedding): same (mean of a/a, b/b), diff (mean of the 4 a/b pairs) and
    static (mean cosine with the layer-0 vector), each (L + 1,), on vectors centred by the layer's mean over
    every token of the sentences but the first (the attention sink); raw_same / raw_diff uncentred; rogue:
    the largest share of a raw vector's norm held by one coordinate."""
    vecs, every = [], []
    for s in (bar(sentences, desc="embeddings") if bar else sentences):  # bar: a progress wrapper
        ids = tokenizer.encode(s)
        pos = word_positions(tokenizer, ids, s, word)[-1]
        H = torch.stack(look(model, ids).hidden_states)  # (L + 1, T, d)
        vecs.append(H[:, pos])
        every.append(H[:, 1:])
    V = torch.stack(vecs)  # (4, L + 1, d)
    mean = torch.cat(every, 1).mean(1)  # (L + 1, d)

    def cos(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        U = F.normalize(W, dim=-1)
        c = torch.einsum("ild,jld->lij", U, U)  # (L + 1, 4, 4)
        return ((c[:, 0, 1] + c[:, 2, 3]) / 2, (c[:, 0, 2] + c[:, 0, 3] + c[:, 1, 2] + c[:, 1, 3]) / 4,
                (U * U[:, :1]).sum(-1).mean(0))

    same, diff, static = cos(V - mean)
    raw_same, raw_diff, _ = cos(V)
    rogue = float((V.abs().amax(-1) / V.norm(dim=-1).clamp(min=1e-12)).max())
    return {"same": same, "diff": diff, "static": static, "raw_same": raw_same, "raw_diff": raw_diff,
            "rogue": rogue}


@lab("embeddings", fr="Plongements : similarité, carte des mots, sens en contexte",
     en="Embeddings: similarity, word map, meaning in context", needs_model=True)
def embeddings(ctx: LabContext) -> None:
    llm = ctx.llm()
    tok, model = llm.tokenizer, llm.model
    embed = model.model.embed_tokens.weight.detach()  # (V, d)
    plt = pyplot()

    def num(x) -> str:
        return ctx.num(float(x))

    # static vectors: similarity, neighbours, PCA map ---------------------------------------------------
    names = list(GROUPS[ctx.lang])
    words = [w for n in names for w in GROUPS[ctx.lang][n]]
    groups = [i for i, n in enumerate(names) for _ in GROUPS[ctx.lang][n]]
    X, ids = word_vectors(embed, tok, words)
    C = cosine_matrix(X)
    st = group_stats(C, groups)
    split = [w for w, i in zip(words, ids) if len(i) > 1]

    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    im = ax.imshow(C.numpy(), cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xticks(range(len(words)), words, rotation=90, fontsize=8)
    ax.set_yticks(range(len(words)), [w + ("*" if w in split else "") for w in words], fontsize=8)
    for b in range(4, len(words), 4):
        ax.axhline(b - 0.5, color="k", lw=0.8)
        ax.axvline(b - 0.5, color="k", lw=0.8)
    fig.colorbar(im, ax=ax, shrink=0.8, label=ctx.t("similarité cosinus", "cosine similarity"))
    ax.set_title(ctx.t("Cosinus entre plongements d'entrée (* : moyenne de plusieurs jetons)",
                       "Cosine between input embeddings (*: mean of several tokens)"), fontsize=9)
    fig.tight_layout()
    ctx.figure(fig, "similarity")

    P, kept = pca_2d(X)
    fig, ax = plt.subplots(figsize=(7, 6))
    for gi, n in enumerate(names):
        pts = P[torch.tensor(groups) == gi]
        ax.scatter(pts[:, 0], pts[:, 1], label=n, s=40)
    for w, (x, y) in zip(words, P.tolist()):
        ax.annotate(w, (x, y), fontsize=8, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(ctx.t(f"axe 1 ({ctx.pct(float(kept[0]))} de la variance)",
                        f"axis 1 ({ctx.pct(float(kept[0]))} of the variance)"))
    ax.set_ylabel(ctx.t(f"axe 2 ({ctx.pct(float(kept[1]))})", f"axis 2 ({ctx.pct(float(kept[1]))})"))
    ax.set_title(ctx.t("Carte ACP des plongements d'entrée", "PCA map of the input embeddings"), fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    ctx.figure(fig, "pca_map")

    rows = []
    unit = None if ctx.quick else F.normalize(embed.float(), dim=-1)  # (V, d)
    for i, w in enumerate(words):
        c = C[i].clone()
        c[i] = -2
        j = int(c.argmax())
        row = {"word": w, "group": names[groups[i]], "tokens": "|".join(token_texts(tok, ids[i])),
               "nearest_word": words[j], "cosine": round(float(C[i, j]), 3)}
        if unit is not None:  # the closest tokens of the whole vocabulary
            near = nearest_tokens(unit, X[i], 5, ids[i])
            row["nearest_tokens"] = ", ".join(f"{tok.id_to_text(t)!r} {c:.2f}" for t, c in near)
        rows.append(row)
    ctx.table("neighbours", rows)

    # meaning in context --------------------------------------------------------------------------------
    word, sense_a, sense_b, sents_a, sents_b = CONTEXT[ctx.lang]
    cx = context_cosines(model, tok, word, sents_a + sents_b, bar=ctx.bar)
    same, diff, static, raw_same, raw_diff = (cx[k] for k in ("same", "diff", "static", "raw_same",
                                                               "raw_diff"))
    best = int((same - diff).argmax())
    last, mid = len(same) - 1, len(same) // 2

    fig, ax = plt.subplots(figsize=(8, 4.5))
    layers = list(range(len(same)))
    pair_a, pair_b = f"{sense_a}/{sense_a}, {sense_b}/{sense_b}", f"{sense_a}/{sense_b}"
    ax.plot(layers, same.numpy(), marker="o", ms=3, color="C0",
            label=ctx.t(f"même sens ({pair_a})", f"same sense ({pair_a})"))
    ax.plot(layers, diff.numpy(), marker="o", ms=3, color="C1",
            label=ctx.t(f"sens différents ({pair_b})", f"different senses ({pair_b})"))
    ax.plot(layers, raw_same.numpy(), ls=":", color="C0",
            label=ctx.t("les mêmes, sans centrer", "the same, not centred"))
    ax.plot(layers, raw_diff.numpy(), ls=":", color="C1")
    ax.plot(layers, static.numpy(), ls="--", color="gray",
            label=ctx.t("vs plongement statique (couche 0)", "vs static embedding (layer 0)"))
    ax.axvline(best, color="gray", ls=":", lw=1)
    ax.set_xlabel(ctx.t("couche (0 = plongement d'entrée)", "layer (0 = input embedding)"))
    ax.set_ylabel(ctx.t(f"cosinus des vecteurs de « {word} »", f'cosine of the "{word}" vectors'))
    ax.set_title(ctx.t(f"« {word} » en contexte (vecteurs centrés)",
                       f'"{word}" in context (centred vectors)'), fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    ctx.figure(fig, "context")
    ctx.table("context", [{"layer": i, "same_sense": round(float(same[i]), 4),
                           "different_sense": round(float(diff[i]), 4),
                           "vs_static": round(float(static[i]), 4), "raw_same": round(float(raw_same[i]), 4),
                           "raw_different": round(float(raw_diff[i]), 4)} for i in layers])

    ctx.data(within=st["within"], between=st["between"], nn_in_group=st["nn_in_group"], n_words=len(words),
             split_words=split, pca_variance=[float(k) for k in kept], context_word=word,
             same_sense=same.tolist(), different_sense=diff.tolist(), vs_static=static.tolist(),
             raw_same_sense=raw_same.tolist(), raw_different_sense=raw_diff.tolist(), best_layer=best)

    n, g = len(words), len(names)
    chance = sum((groups.count(gi) - 1) / (n - 1) for gi in groups)  # expected count, random neighbours
    ctx.finding(
        f"Dans la table d'entrée, deux mots d'un même groupe ont un cosinus moyen de {num(st['within'])}, "
        f"contre {num(st['between'])} entre groupes ; {st['nn_in_group']} mots sur {n} ont leur plus proche "
        f"voisin dans leur groupe (hasard : {ctx.num(chance, 1)}). "
        + (f"{len(split)} mots sur {n} sont coupés en plusieurs jetons et représentés par la moyenne de "
           f"leurs jetons." if split else "Chaque mot est un seul jeton."),
        f"In the input table, two words of the same group have a mean cosine of {num(st['within'])}, against "
        f"{num(st['between'])} across groups; {st['nn_in_group']} of {n} words have their nearest neighbour "
        f"in their own group (chance: {ctx.num(chance, 1)}). "
        + (f"{len(split)} of {n} words are split into several tokens and represented by the mean of their "
           f"tokens." if split else "Every word is a single token."))
    r0 = rows[0]
    ctx.finding(
        f"Le plus proche voisin de « {r0['word']} » est « {r0['nearest_word']} » (cosinus "
        f"{num(r0['cosine'])}). Les deux axes de l'ACP gardent {ctx.pct(float(kept.sum()))} de la variance "
        f"des {n} vecteurs : la carte aplatit {g} groupes en 2 dimensions.",
        f"The nearest neighbour of \"{r0['word']}\" is \"{r0['nearest_word']}\" (cosine "
        f"{num(r0['cosine'])}). The two PCA axes keep {ctx.pct(float(kept.sum()))} of the variance of the "
        f"{n} vectors: the map flattens {g} groups into 2 dimensions.")
    ctx.finding(
        f"« {word} » en contexte : à la couche 0 (plongement statique) ses quatre vecteurs sont identiques. "
        f"L'écart est le plus grand à la couche {best} : deux phrases de même sens donnent un cosinus de "
        f"{num(same[best])}, deux sens différents ({pair_b}) {num(diff[best])}"
        + (f" ; en sortie (couche {last}) {num(same[last])} contre {num(diff[last])}" if best < last else "")
        + ". (Vecteurs centrés ; sans centrer : "
        f"{num(raw_same[best])} contre {num(raw_diff[best])} à la couche {best}.)",
        f"\"{word}\" in context: at layer 0 (static embedding) its four vectors are identical. The gap is "
        f"largest at layer {best}: two sentences with the same sense give a cosine of {num(same[best])}, two "
        f"different senses ({pair_b}) {num(diff[best])}"
        + (f"; at the output (layer {last}) {num(same[last])} against {num(diff[last])}"
           if best < last else "")
        + f". (Centred vectors; not centred: {num(raw_same[best])} against "
        f"{num(raw_diff[best])} at layer {best}.)")
    ctx.finding(
        f"Le vecteur en contexte s'éloigne vite du plongement statique : cosinus moyen {num(static[1])} "
        f"après la couche 1, {num(static[mid])} à la couche {mid}. Sans centrage, quelques dimensions "
        f"géantes, communes à tous les jetons, dominent : une seule coordonnée porte jusqu'à "
        f"{ctx.pct(cx['rogue'])} de la norme du vecteur.",
        f"The contextual vector quickly leaves the static embedding: mean cosine {num(static[1])} after "
        f"layer 1, {num(static[mid])} at layer {mid}. Without centring, a few huge dimensions shared by "
        f"every token dominate: a single coordinate carries up to {ctx.pct(cx['rogue'])} of the vector's "
        f"norm.")

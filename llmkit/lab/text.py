"""The course's experiments on text: `ngram-vs-llm` [4] (a trigram add-k model against the LLM, perplexity
per word on the same held-out sentences) and `token-lengths` [5] (words vs BPE tokens per sentence, and
what a 4k / 8k context holds).

    run_lab("ngram-vs-llm", lang="fr")     # trigram on French novellas, tested on another novella
    run_lab("token-lengths", lang="en")    # tinyshakespeare sentences through the model's tokenizer

Notable choices
- Sentences (`split_sentences`): paragraphs are runs of non-blank lines (speaker headers such as
  "First Citizen:" dropped, lines joined by spaces), cut after . ! ? … (and a closing quote, maybe behind
  a space) when an upper-case letter, a quote or a dash follows; a piece ending in an abbreviation (M.,
  Mme., Dr., a single capital) is glued to the next one; leading dialogue dashes, and a guillemet whose
  partner sits in another sentence, are dropped. The labs keep sentences of 6 to 40 words and pick them
  at random (seeded), in corpus order.
- Data. French: the trigram trains on the 28 novellas of corpus/fr-nouvelles19 but the last one (nd0152),
  and the test sentences come from that last novella (a text it never saw). English: tinyshakespeare, the
  first 90 % trains and the test sentences come from the last 10 % (other scenes). The trigram is the
  course's model, llmkit.eval.ngram.NGramModel (add-k, k tuned on a validation slice), fit on the training
  text cut into the same sentences (one per line: <s> and </s> mark sentence boundaries).
- Perplexity per word, the same unit for both models. The trigram predicts, per sentence, its W_s = m + 1
  units: the m words as it tokenises them (lowercased `\\w+` and each punctuation mark: "L'homme, dit-il."
  is 8 words: l ' homme , dit - il .) and the end of sentence </s>. The LLM reads the exact sentence
  followed by "\\n" (its end of sentence, the newline that closes a line of the corpus) after a "\\n" (its
  start of sentence, behind a BOS where the tokenizer adds one): the sentence as one line of the corpus.
  `llmkit.score.score` gives the log-prob of each of its tokens; summed over the sentence they cover the
  same text as the trigram's W_s units, so both models get
      ppl_word = exp(-(Σ over sentences of Σ log p) / Σ_s W_s)
  (natural logs): the total negative log-likelihood divided by the SAME word count. Per token, exp(nll /
  tokens), a model cutting text into more, smaller tokens would look better; per word both pay for the
  same text. The trigram is still favoured: it scores lowercased words only (no case, no spacing) and each
  unseen word as the class <unk> (`oov_rate` says how often). (A chat model's BOS alone is a worse start
  than a newline: SmolLM2's <|im_start|> opens a chat turn.)
- Word by word (the figure `surprisal`): each LLM token is given to the word holding its first
  non-space character (a token after the last word, the newline, goes to </s>), so the per-word LLM
  surprisals add up to the sentence's total.
- `token-lengths` counts a sentence's words as its whitespace-separated pieces holding a letter or a digit
  (a lone "?" or "--" is not a word) and its tokens with the model's tokenizer (no BOS/EOS). Sentences per
  context: how many of this corpus's consecutive sentences fill 4,096 and 8,192 tokens. French against
  English is measured on parallel text (the 250 MGSM problems in both languages), so the content is equal.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import regex

from llmkit.errors import LlmkitError
from llmkit.eval.ngram import BOS, EOS, UNK, WORD, NGramModel, tokenize
from llmkit.io import corpus_files, read_text
from llmkit.lab import LabContext, lab, pyplot

FR_CORPUS, FR_TEST_FILE = "corpus/fr-nouvelles19", "nd0152.txt"
EN_CORPUS = "corpus/en/tinyshakespeare.txt"
PARALLEL = "eval/mgsm_fr.jsonl"
MIN_WORDS, MAX_WORDS = 6, 40
QUICK_TRAIN_CHARS = 1_000_000

_SPEAKER = regex.compile(r"^\p{Lu}[\p{L} ']*:$")
_CUT = regex.compile(r"(?<=[.!?…](?:\s?[»\"”’)])?)\s+(?=[«\"“—–-]*\s*\p{Lu})")
_ABBREV = regex.compile(r"(?:\b(?:M|MM|Mme|Mmes|Mlle|Mlles|Mgr|Dr|Mr|Mrs|Ms|St|Ste)|(?<!\p{L})\p{Lu})\.$")
_LEAD = regex.compile(r"^(?:--|[—–-])\s*")
_HAS_WORD = regex.compile(r"[\p{L}\p{N}]")


# ------------------------------------------------------------------------------------------ sentences
def paragraphs(text: str) -> list[str]:
    """Runs of non-blank lines joined by spaces; "Name:" speaker lines dropped."""
    out, cur = [], []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            if cur:
                out.append(" ".join(cur))
            cur = []
        elif not _SPEAKER.match(line):
            cur.append(line)
    if cur:
        out.append(" ".join(cur))
    return out


def split_sentences(text: str) -> list[str]:
    """The sentences of `text`, in order (see the module notes)."""
    out = []
    for para in paragraphs(text):
        pieces: list[str] = []
        for piece in _CUT.split(para):
            if pieces and _ABBREV.search(pieces[-1]):
                pieces[-1] += " " + piece
            else:
                pieces.append(piece)
        out += [s for p in pieces if (s := _clean(p))]
    return out


def _clean(piece: str) -> str:
    """A sentence without its leading dialogue dash, nor a guillemet whose partner is in another sentence."""
    s = _LEAD.sub("", piece).strip()
    if s.startswith("«") and "»" not in s:
        s = s[1:].strip()
    if s.endswith("»") and "«" not in s:
        s = s[:-1].strip()
    return s


def count_words(sentence: str) -> int:
    """Whitespace-separated pieces holding a letter or a digit."""
    return sum(1 for w in sentence.split() if _HAS_WORD.search(w))


def pick_sentences(sentences: Sequence[str], n: int | None, seed: int, lo: int = MIN_WORDS,
                   hi: int = MAX_WORDS) -> list[str]:
    """Up to n sentences of lo..hi words, drawn at random (seeded) and kept in corpus order (None: all)."""
    ok = [i for i, s in enumerate(sentences) if lo <= count_words(s) <= hi]
    if n is not None and len(ok) > n:
        ok = sorted(random.Random(seed).sample(ok, n))
    return [sentences[i] for i in ok]


def _token_fr(x: float) -> str:
    """French: singular below 2 (1,65 token)."""
    return "token" if abs(x) < 2 else "tokens"


# ------------------------------------------------------------------------------------------ per word
def fit_trigram(sentences: Sequence[str], k: float | None = None) -> NGramModel:
    """The course's trigram add-k model on sentences, one per line (k=None: tuned on a validation slice)."""
    return NGramModel.fit("\n".join(sentences), n=3, k=k)


def ngram_units(sentence: str) -> int:
    """W_s: what the trigram predicts in one sentence, its words (as it tokenises) and the </s>."""
    return len(tokenize(sentence)) + 1


def word_perplexity(nll: float, units: int) -> float:
    """exp(total negative log-likelihood in nats / number of words): the per-word perplexity."""
    if units <= 0:
        raise LlmkitError("per-word perplexity needs at least one word")
    return math.exp(nll / units)


def llm_sentence_logprobs(llm, sentences: Sequence[str], batch_size: int = 16) -> list[list[float]]:
    """Each sentence's token log-probs (nats) under the LLM: sentence + "\\n" after a "\\n" (and the BOS
    where the model wants one), i.e. one line of the corpus."""
    from llmkit.score import score

    tok = llm.tokenizer
    start = tok.encode("\n", add_special_tokens=True)
    reqs = [(start, tok.encode(s + "\n", add_special_tokens=False)) for s in sentences]
    return [r.token_logprobs for r in score(llm.model, reqs, batch_size=batch_size, per_token=True)]


def token_words(tokenizer, sentence: str, ids: Sequence[int]) -> list[int]:
    """For each token of `sentence + "\\n"` (its `ids`), the index of the n-gram word that holds the token's
    first non-space character; len(words) (the </s>) for tokens after the last word."""
    text = sentence + "\n"
    data = text.encode("utf-8")
    char_at = np.cumsum([0] + [len(c.encode("utf-8")) for c in text])  # byte offset of each character
    pieces = [tokenizer.id_to_bytes(int(i)) for i in ids]
    shift = sum(map(len, pieces)) - len(data)  # SentencePiece adds a leading space
    ends = [m.end() for m in WORD.finditer(text)]  # the n-gram's words, found in the original case
    out, pos = [], -shift
    for p in pieces:
        start, pos = pos, pos + len(p)
        lead = len(p) - len(p.lstrip())
        c = int(np.searchsorted(char_at, max(0, start + lead), side="right")) - 1  # character index
        out.append(next((w for w, e in enumerate(ends) if e > c), len(ends)))
    return out


def unseen_contexts(ngram: NGramModel, sentence: str) -> int:
    """How many of the sentence's W_s predictions have a context (the n-1 previous words) never seen in
    training: add-k then gives every word the uniform 1 / |V|."""
    words = [w if w in ngram.vocab else UNK for w in tokenize(sentence)]
    padded = [BOS] * (ngram.n - 1) + words
    contexts = [tuple(padded[i:i + ngram.n - 1]) for i in range(len(words) + 1)]
    return sum(ngram.context_counts.get(c, 0) == 0 for c in contexts)


def per_word_surprisal(ngram: NGramModel, llm, sentence: str, logprobs: Sequence[float]
                       ) -> tuple[list[str], list[float], list[float]]:
    """(words + </s>, trigram bits per word, LLM bits per word) for one sentence."""
    words = tokenize(sentence)
    tri = [-ngram.logprob(words[:i], w) / math.log(2) for i, w in enumerate([*words, EOS])]
    ids = llm.tokenizer.encode(sentence + "\n", add_special_tokens=False)
    llm_bits = [0.0] * (len(words) + 1)
    for w, lp in zip(token_words(llm.tokenizer, sentence, ids), logprobs):
        llm_bits[w] -= lp / math.log(2)
    return [*words, EOS], tri, llm_bits


def ngram_data(ctx: LabContext) -> tuple[list[str], list[str], str]:
    """(training texts, test texts, where the test comes from) for the lab's language."""
    if ctx.lang == "fr":
        files = corpus_files([ctx.data_file(FR_CORPUS)])
        test = [f for f in files if f.name == FR_TEST_FILE] or files[-1:]
        train = [f for f in files if f not in test]
        return [read_text(f) for f in train], [read_text(f) for f in test], f"{FR_CORPUS}/{test[0].name}"
    text = read_text(ctx.data_file(EN_CORPUS))
    cut = text.find("\n\n", int(0.9 * len(text)))
    return [text[:cut]], [text[cut:]], f"{EN_CORPUS} (last 10 %)"


@lab("ngram-vs-llm", fr="Trigramme add-k contre LLM : perplexité par mot", en="Trigram add-k vs the LLM: "
     "perplexity per word", course="4", needs_model=True, needs_data=(FR_CORPUS, EN_CORPUS))
def ngram_vs_llm(ctx: LabContext) -> None:
    plt = pyplot()
    train_texts, test_texts, source = ngram_data(ctx)
    train_text = "\n\n".join(train_texts)
    if ctx.quick and len(train_text) > QUICK_TRAIN_CHARS:  # 1 MB of training text: a fit of seconds
        train_text = train_text[:train_text.rfind("\n", 0, QUICK_TRAIN_CHARS)]
    train = split_sentences(train_text)
    ngram = fit_trigram(train)
    sents = pick_sentences([s for t in test_texts for s in split_sentences(t)], 16 if ctx.quick else 300,
                           ctx.seed)
    llm = ctx.llm()
    lps = []
    for i in ctx.bar(range(0, len(sents), 16), desc="LLM"):
        lps += llm_sentence_logprobs(llm, sents[i:i + 16])

    units = [ngram_units(s) for s in sents]
    tri_nll = [ngram.score(s).nll for s in sents]
    llm_nll = [-sum(lp) for lp in lps]
    W = sum(units)
    ppl_tri, ppl_llm = word_perplexity(sum(tri_nll), W), word_perplexity(sum(llm_nll), W)
    score = ngram.score("\n".join(sents))
    oov = score.oov / score.words
    per_tri = [word_perplexity(a, u) for a, u in zip(tri_nll, units)]
    per_llm = [word_perplexity(a, u) for a, u in zip(llm_nll, units)]
    better = sum(b < a for a, b in zip(per_tri, per_llm)) / len(sents)
    unseen = sum(unseen_contexts(ngram, s) for s in sents) / W
    uniform_bits = math.log2(len(ngram.vocab))
    n_tokens = sum(map(len, lps))

    ctx.table("sentences", [{"sentence": s, "words": u - 1, "tokens": len(lp), "trigram_ppl": round(a, 1),
                             "llm_ppl": round(b, 1)} for s, u, lp, a, b in
                            zip(sents, units, lps, per_tri, per_llm)][:12])
    ctx.data(trigram_word_perplexity=ppl_tri, llm_word_perplexity=ppl_llm, ratio=ppl_tri / ppl_llm,
             sentences=len(sents), words=W, llm_tokens=n_tokens, oov_rate=oov, k=ngram.k,
             vocab=len(ngram.vocab), unseen_context_share=unseen, train_sentences=len(train),
             llm_better_share=better, test_source=source)

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    names = [ctx.t("trigramme add-k", "trigram add-k"), "LLM"]
    bars = ax.bar(names, [ppl_tri, ppl_llm], color=["tab:gray", "tab:blue"])
    ax.bar_label(bars, labels=[ctx.num(ppl_tri, 1), ctx.num(ppl_llm, 1)])
    ax.set_ylabel(ctx.t("perplexité par mot", "perplexity per word"))
    ax.set_title(ctx.t(f"{len(sents)} phrases, {W} mots", f"{len(sents)} sentences, {W} words"))
    ax2.loglog(per_tri, per_llm, "o", alpha=0.6)
    lo, hi = min(per_tri + per_llm), max(per_tri + per_llm)
    ax2.plot([lo, hi], [lo, hi], "k--", lw=1)
    ax2.set_xlabel(ctx.t("trigramme (par phrase)", "trigram (per sentence)"))
    ax2.set_ylabel(ctx.t("LLM (par phrase)", "LLM (per sentence)"))
    ax2.set_title(ctx.t("sous la diagonale : le LLM gagne", "below the diagonal: the LLM wins"))
    ctx.figure(fig, "perplexity")

    ex = min(range(len(sents)), key=lambda i: (not 8 <= units[i] - 1 <= 16, i))
    words, tri_bits, llm_bits = per_word_surprisal(ngram, llm, sents[ex], lps[ex])
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(words)), 3.8))
    x = np.arange(len(words))
    ax.bar(x - 0.2, tri_bits, 0.4, label=names[0], color="tab:gray")
    ax.bar(x + 0.2, llm_bits, 0.4, label="LLM", color="tab:blue")
    ax.set_xticks(x, words, rotation=60)
    ax.set_ylabel(ctx.t("surprise (bits)", "surprisal (bits)"))
    ax.legend()
    ax.set_title(sents[ex][:90], fontsize=9)
    ctx.figure(fig, "surprisal")

    r = ppl_tri / ppl_llm
    fr_cmp = f"{ctx.num(r, 1)} fois moins" if r >= 1 else f"{ctx.num(1 / r, 1)} fois plus"
    en_cmp = f"{ctx.num(r, 1)} times lower" if r >= 1 else f"{ctx.num(1 / r, 1)} times higher"
    nW, nT, tpw = ctx.num(W), ctx.num(n_tokens), n_tokens / W
    ctx.finding(
        f"Sur {len(sents)} phrases jamais vues ({nW} mots, fin de phrase comprise), le trigramme add-k "
        f"(k = {ctx.num(ngram.k, 3)}, {ctx.num(len(ngram.vocab))} mots de vocabulaire) a une perplexité de "
        f"{ctx.num(ppl_tri, 1)} par mot, le LLM de {ctx.num(ppl_llm, 1)} : {fr_cmp}.",
        f"On {len(sents)} unseen sentences ({nW} words, sentence ends included), the add-k trigram "
        f"(k = {ctx.num(ngram.k, 3)}, a vocabulary of {ctx.num(len(ngram.vocab))} words) has a perplexity of "
        f"{ctx.num(ppl_tri, 1)} per word, the LLM {ctx.num(ppl_llm, 1)}: {en_cmp}.")
    ctx.finding(
        f"Le LLM fait mieux que le trigramme sur {ctx.pct(better)} des phrases ; il lit {nT} tokens pour ces "
        f"{nW} mots ({ctx.num(tpw)} {_token_fr(tpw)} par mot), mais la perplexité est ramenée au mot pour "
        "les deux modèles.",
        f"The LLM beats the trigram on {ctx.pct(better)} of the sentences; it reads {nT} tokens for these "
        f"{nW} words ({ctx.num(tpw)} tokens per word), but both perplexities are per word.")
    ctx.finding(
        f"{ctx.pct(oov)} des mots du test sont inconnus du trigramme (entraîné sur {ctx.num(len(train))} "
        "phrases) : il les compte comme <unk>, ce qui le flatte.",
        f"{ctx.pct(oov)} of the test words were never seen by the trigram (trained on {ctx.num(len(train))} "
        "sentences): it scores them as <unk>, which flatters it.")
    ctx.finding(
        f"{ctx.pct(unseen)} des prédictions du trigramme ont un contexte (les 2 mots précédents) jamais vu à "
        f"l'entraînement : l'add-k donne alors à chaque mot 1/|V|, soit {ctx.num(uniform_bits, 1)} bits ; le "
        "LLM, lui, généralise d'un contexte à l'autre.",
        f"{ctx.pct(unseen)} of the trigram's predictions have a context (the 2 previous words) never seen in "
        f"training: add-k then gives every word 1/|V|, i.e. {ctx.num(uniform_bits, 1)} bits; "
        "the LLM generalises from one context to another.")
    hard_t, hard_l = int(np.argmax(tri_bits)), int(np.argmax(llm_bits))
    ctx.finding(
        f"Dans « {sents[ex]} », le mot le plus surprenant pour le trigramme est « {words[hard_t]} » "
        f"({ctx.num(tri_bits[hard_t], 1)} bits), pour le LLM « {words[hard_l]} » "
        f"({ctx.num(llm_bits[hard_l], 1)} bits).",
        f"In \"{sents[ex]}\", the most surprising word for the trigram is \"{words[hard_t]}\" "
        f"({ctx.num(tri_bits[hard_t], 1)} bits), for the LLM \"{words[hard_l]}\" "
        f"({ctx.num(llm_bits[hard_l], 1)} bits).")


# ------------------------------------------------------------------------------------------ token lengths
CONTEXTS = (4096, 8192)


def sentences_in_context(tokens: Sequence[int], context: int) -> int:
    """How many consecutive sentences, from the first on, fit in `context` tokens (mean over start points
    every 50 sentences, so one long sentence at the start does not decide)."""
    counts = []
    for start in range(0, max(1, len(tokens) - 1), 50):
        used = n = 0
        for t in tokens[start:]:
            if used + t > context:
                break
            used, n = used + t, n + 1
        else:
            break  # the corpus ran out before the context was full
        counts.append(n)
    if not counts:
        raise LlmkitError(f"token-lengths: the corpus holds fewer than {context} tokens; give more text")
    return round(sum(counts) / len(counts))


def parallel_pairs(path: Path) -> list[tuple[str, str]]:
    """(French, English) texts of the MGSM problems."""
    import json

    rows = [json.loads(line) for line in read_text(path).splitlines() if line.strip()]
    return [(r["question"], r["question_en"]) for r in rows]


@lab("token-lengths", fr="Mots et tokens BPE par phrase", en="Words vs BPE tokens per sentence", course="5",
     needs_model=True, needs_data=(FR_CORPUS, EN_CORPUS, PARALLEL))
def token_lengths(ctx: LabContext) -> None:
    plt = pyplot()
    tok = ctx.llm().tokenizer

    def enc(s: str) -> int:
        return len(tok.encode(s, add_special_tokens=False))

    source = ctx.data_file(FR_CORPUS if ctx.lang == "fr" else EN_CORPUS)
    text = "\n".join(read_text(f) for f in corpus_files([source]))
    if ctx.quick:
        text = text[:400_000]
    all_sents = split_sentences(text)
    sents = pick_sentences(all_sents, 400 if ctx.quick else 3000, ctx.seed, lo=1, hi=10_000)
    words = np.array([count_words(s) for s in sents])
    tokens = np.array([enc(s) for s in ctx.bar(sents, desc="tokenize")])
    ratio = tokens.sum() / words.sum()
    slope = float((words * tokens).sum() / (words * words).sum())  # least squares through the origin
    stream = [enc(s) for s in all_sents[:4000 if ctx.quick else 20000]]
    fit = {c: sentences_in_context(stream, c) for c in CONTEXTS}
    pairs = parallel_pairs(ctx.data_file(PARALLEL))[: 80 if ctx.quick else None]
    par = {lang: (sum(count_words(p[i]) for p in pairs), sum(enc(p[i]) for p in pairs))
           for i, lang in enumerate(("fr", "en"))}
    par_ratio = {lang: t / w for lang, (w, t) in par.items()}
    extra = par["fr"][1] / par["en"][1] - 1

    ctx.table("examples", [{"sentence": s, "words": int(w), "tokens": int(t)}
                           for s, w, t in list(zip(sents, words, tokens))[:10]])
    ctx.table("contexts", [{"context": c, "sentences": fit[c], "words": round(c / ratio)} for c in CONTEXTS])
    ctx.data(sentences=len(sents), mean_words=float(words.mean()), mean_tokens=float(tokens.mean()),
             tokens_per_word=float(ratio), slope=slope, max_tokens=int(tokens.max()),
             sentences_in_4k=fit[4096], sentences_in_8k=fit[8192], parallel_items=len(pairs),
             parallel_tokens_per_word_fr=par_ratio["fr"], parallel_tokens_per_word_en=par_ratio["en"],
             french_extra_tokens=extra)

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    bins = np.arange(0, int(np.percentile(tokens, 99)) + 4, 3)
    axes[0].hist(words, bins=bins, alpha=0.6, label=ctx.t("mots", "words"))
    axes[0].hist(tokens, bins=bins, alpha=0.6, label="tokens")
    axes[0].set_xlabel(ctx.t("longueur de la phrase", "sentence length"))
    axes[0].set_ylabel(ctx.t("phrases", "sentences"))
    axes[0].legend()
    axes[1].scatter(words, tokens, s=8, alpha=0.4)
    xs = np.array([0, words.max()])
    axes[1].plot(xs, slope * xs, "r-", label=ctx.t(f"pente {ctx.num(slope)} {_token_fr(slope)}/mot",
                                                   f"slope {ctx.num(slope)} tokens/word"))
    axes[1].plot(xs, xs, "k--", lw=1, label="1:1")
    axes[1].set_xlabel(ctx.t("mots", "words"))
    axes[1].set_ylabel("tokens")
    axes[1].legend()
    bars = axes[2].bar(["fr", "en"], [par_ratio["fr"], par_ratio["en"]], color=["tab:blue", "tab:orange"])
    axes[2].bar_label(bars, labels=[ctx.num(par_ratio[x]) for x in ("fr", "en")])
    axes[2].set_ylabel(ctx.t("tokens par mot", "tokens per word"))
    axes[2].set_title(ctx.t(f"mêmes {len(pairs)} problèmes (MGSM)", f"the same {len(pairs)} problems (MGSM)"))
    ctx.figure(fig, "lengths")

    mw, mt, r = ctx.num(float(words.mean()), 1), ctx.num(float(tokens.mean()), 1), float(ratio)
    ctx.finding(
        f"Sur {ctx.num(len(sents))} phrases, une phrase compte en moyenne {mw} mots et {mt} tokens : "
        f"{ctx.num(r)} {_token_fr(r)} par mot (la plus longue : {int(tokens.max())} tokens).",
        f"Over {ctx.num(len(sents))} sentences, a sentence holds {mw} words and {mt} tokens on average: "
        f"{ctx.num(r)} tokens per word (the longest: {int(tokens.max())} tokens).")
    ctx.finding(
        f"Un contexte de 4 096 tokens contient environ {fit[4096]} phrases consécutives de ce corpus "
        f"(≈ {ctx.num(round(4096 / ratio))} mots), un contexte de 8 192 environ {fit[8192]}.",
        f"A 4,096-token context holds about {fit[4096]} consecutive sentences of this corpus "
        f"(≈ {ctx.num(round(4096 / ratio))} words), an 8,192-token one about {fit[8192]}.")
    more = ctx.t("de plus", "more") if extra >= 0 else ctx.t("de moins", "fewer")
    why = "" if extra <= 0.1 else ctx.t(" : le tokenizer a appris surtout sur de l'anglais",
                                        ": the tokenizer learnt mostly from English")
    ctx.finding(
        f"Le même contenu coûte {ctx.pct(abs(extra))} de tokens {more} en français qu'en anglais "
        f"({len(pairs)} problèmes MGSM : {ctx.num(par_ratio['fr'])} {_token_fr(par_ratio['fr'])} par mot en "
        f"français, {ctx.num(par_ratio['en'])} en anglais){why}.",
        f"The same content costs {ctx.pct(abs(extra))} {more} tokens in French than in English "
        f"({len(pairs)} MGSM problems: {ctx.num(par_ratio['fr'])} tokens per word in French, "
        f"{ctx.num(par_ratio['en'])} in English){why}.")

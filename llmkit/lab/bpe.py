"""The course's BPE, step by step (`bpe`): pair counts and the first merges on a small corpus, a larger
training whose vocabulary grows merge by merge, the final segmentation of long words, and the "strawberry"
effect: the model receives token ids, not letters.

    run_lab("bpe", lang="en", quick=True)

Notable choices
- The algorithm is llmkit's own trainer (llmkit.tokenizer.train): byte-level BPE on chunks cut by the
  GPT-4 regex (a word takes its leading space: " chat"), 256 byte tokens to start with, then "count every
  adjacent pair, merge the most frequent one" (ties: the pair whose left token comes first, bytes in their
  byte-level order, then merged tokens by age). The step-by-step table comes from the readable reference
  loop (`bpe_merges_reference`, trace=K) on a small corpus (the first ~20k characters of the lab's
  language corpus); the larger training (French novellas or tinyshakespeare, the last 5 % held out) uses
  the compiled trainer, which gives the same merges.
- Tokens are shown with "▁" for a space and <0xC3> for a byte that is only part of a character: in French
  "é" is two bytes, and one of the first merges glues them.
- Vocabulary size vs tokens per word: the first m merges (m from 0 to all) make a tokenizer
  (`Tokenizer.from_bpe`), which encodes the held-out text; words are counted as in `token-lengths`. The
  model's own tokenizer on the same text is the reference line.
- Strawberry: each word is encoded alone and inside a sentence (with its leading space), by the model's
  tokenizer; the table gives the letters the word holds and the tokens the model receives. The model is
  then asked (chat, greedy) how many r the word holds: it must have memorised its tokens' spelling.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

from llmkit.generate.sampling import SamplingParams
from llmkit.io import corpus_files, read_text
from llmkit.lab import LabContext, lab, pyplot
from llmkit.lab.text import EN_CORPUS, FR_CORPUS, count_words
from llmkit.tokenizer import Tokenizer
from llmkit.tokenizer.pretokenize import GPT4_PATTERN
from llmkit.tokenizer.train import MergeStep, bpe_merges_reference, chunk_counts, split_holdout, train_bpe

WORDS = {"fr": ("unbelievable", "internationalisation", "anticonstitutionnellement"),
         "en": ("unbelievable", "internationalisation", "uncharacteristically")}
STRAWBERRY = {"fr": ("fraise", "framboise", "arrière", "strawberry"),
              "en": ("strawberry", "raspberry", "mirror", "fraise")}
LETTER = "r"
QUESTION = {
    "fr": "Combien de fois la lettre « {l} » apparaît-elle dans le mot « {w} » ? Réponds par un nombre.",
    "en": "How many times does the letter '{l}' appear in the word '{w}'? Answer with a number.",
}


def show(b: bytes) -> str:
    """A token's bytes for display: "▁" for a space, <0xNN> for a byte that is part of a character."""
    text = b.decode("utf-8", "surrogateescape")
    text = "".join(f"<0x{ord(c) - 0xDC00:02X}>" if "\udc80" <= c <= "\udcff" else c for c in text)
    return text.replace(" ", "▁").replace("\n", "\\n")


def pair_counts(counts: Counter[bytes]) -> Counter[tuple[bytes, bytes]]:
    """Step 0 of BPE: how often each pair of adjacent bytes occurs, each chunk weighted by its count."""
    pairs: Counter[tuple[bytes, bytes]] = Counter()
    for chunk, n in counts.items():
        for a, b in zip(chunk, chunk[1:]):
            pairs[bytes([a]), bytes([b])] += n
    return pairs


def merge_steps(text: str, n_merges: int, pattern: str = GPT4_PATTERN
                ) -> tuple[Counter[bytes], list[tuple[bytes, bytes]], list[MergeStep]]:
    """(chunk counts, merges, trace of every merge) of the reference BPE loop on `text`."""
    counts = chunk_counts([text], pattern)
    merges, steps = bpe_merges_reference(counts, n_merges, trace=n_merges)
    return counts, merges, steps


def segment(merges: Sequence[tuple[bytes, bytes]], word: str, pattern: str = GPT4_PATTERN) -> list[bytes]:
    """`word` cut by the BPE made of `merges` (the bytes of each token)."""
    tok = Tokenizer.from_bpe(list(merges), pattern=pattern)
    return [tok.id_to_bytes(i) for i in tok.encode(word)]


def tokens_per_word(tok: Tokenizer, text: str) -> float:
    return len(tok.encode(text)) / max(1, count_words(text))


def _whole_char(step: MergeStep) -> bool:
    """Whether a merge joins pieces of one character into the whole character."""

    def valid(b: bytes) -> bool:
        try:
            b.decode("utf-8")
            return True
        except UnicodeDecodeError:
            return False

    return not valid(step.left) and not valid(step.right) and valid(step.left + step.right)


def first_int(text: str) -> int | None:
    m = re.search(r"\d+", text)
    return int(m.group()) if m else None


@lab("bpe", fr="BPE pas à pas, et l'effet « strawberry »", en="BPE step by step, and the strawberry effect",
     needs_model=True, needs_data=(FR_CORPUS, EN_CORPUS))
def bpe(ctx: LabContext) -> None:
    plt = pyplot()
    source = ctx.data_file(FR_CORPUS if ctx.lang == "fr" else EN_CORPUS)
    texts = [read_text(f) for f in corpus_files([source])]

    # 1. step by step on a small corpus: pair counts, then the first merges
    small = "\n".join(texts)[:20_000]
    k = 15 if ctx.quick else 30
    counts, _, steps = merge_steps(small, k)
    top_pairs = pair_counts(counts).most_common(8)
    ctx.table("pair_counts", [{"pair": f"{show(a)} + {show(b)}", "count": n} for (a, b), n in top_pairs])
    ctx.table("merges", [{"step": s.rank + 1, "pair": f"{show(s.left)} + {show(s.right)}",
                          "count": s.count, "new_token": show(s.left + s.right), "vocab": 257 + s.rank}
                         for s in steps])

    # 2. a larger training: vocabulary size vs tokens per word, and the segmentation of long words
    train, held = split_holdout(texts)
    if ctx.quick:
        train, held = ["\n".join(train)[:600_000]], held[:30_000]
    else:
        held = held[:200_000]
    n_merges = 2000 if ctx.quick else 8000
    big = train_bpe(train, 256 + n_merges, progress=False)
    merges = big.merges
    grid = sorted({0, *np.unique(np.geomspace(10, len(merges), 9 if ctx.quick else 14).astype(int))})
    tpw = []
    for m in ctx.bar(grid, desc="vocab sizes"):
        tpw.append(tokens_per_word(Tokenizer.from_bpe(merges[:m], pattern=GPT4_PATTERN), held))
    llm = ctx.llm()
    model_tpw = tokens_per_word(llm.tokenizer, held)
    words = WORDS[ctx.lang]
    seg_rows = []
    for m in [g for g in grid if g >= 100] or grid[-1:]:
        row = {"merges": m, "vocab": 256 + m}
        row.update({w: " | ".join(map(show, segment(merges[:m], " " + w))) for w in words})
        seg_rows.append(row)
    model_row = {"merges": ctx.t("modèle", "model"), "vocab": llm.tokenizer.vocab_size}
    model_row.update({w: " | ".join(show(llm.tokenizer.id_to_bytes(i))
                                    for i in llm.tokenizer.encode(" " + w)) for w in words})
    ctx.table("segmentation", [*seg_rows, model_row])

    # 3. strawberry: letters vs the ids the model receives, and what it answers
    tok = llm.tokenizer
    straw = []
    for w in STRAWBERRY[ctx.lang]:
        for form in (w, " " + w):
            ids = tok.encode(form)
            pieces = [tok.id_to_bytes(i).decode("utf-8", "replace") for i in ids]
            straw.append({"word": show(form.encode()), "letters": len(w), LETTER: w.count(LETTER),
                          "tokens": " | ".join(show(tok.id_to_bytes(i)) for i in ids), "n_tokens": len(ids),
                          "ids": " ".join(map(str, ids)),
                          "tokens_with_r": sum(LETTER in p for p in pieces)})
    greedy = SamplingParams(max_tokens=12 if ctx.quick else 24, temperature=0.0)
    asked = STRAWBERRY[ctx.lang][:2] if ctx.quick else STRAWBERRY[ctx.lang]
    answers = [llm.chat([{"role": "user", "content": QUESTION[ctx.lang].format(l=LETTER, w=w)}],
                        params=greedy) for w in asked] if tok.chat_template else []
    ask_rows = [{"word": w, "truth": w.count(LETTER), "answer": str(a).strip(), "number": first_int(str(a))}
                for w, a in zip(asked, answers)]
    ctx.table("strawberry", straw)
    if ask_rows:
        ctx.table("asked", ask_rows)

    ctx.data(first_merges=[[show(s.left), show(s.right), s.count] for s in steps[:10]],
             small_corpus_chars=len(small), merges=len(merges), vocab_sizes=[256 + m for m in grid],
             tokens_per_word=tpw, model_tokens_per_word=model_tpw, model_vocab=tok.vocab_size,
             strawberry=[{c: r[c] for c in ("word", LETTER, "n_tokens", "tokens_with_r")} for r in straw],
             answers_right=sum(r["number"] == r["truth"] for r in ask_rows), answers_asked=len(ask_rows))

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.2))
    shown = steps[:15]
    ax.barh(range(len(shown))[::-1], [s.count for s in shown], color="tab:blue")
    ax.set_yticks(range(len(shown))[::-1], [f"{s.rank + 1}. {show(s.left)} + {show(s.right)}" for s in shown])
    ax.set_xlabel(ctx.t("occurrences de la paire", "pair count"))
    ax.set_title(ctx.t(f"premières fusions ({ctx.num(len(small))} caractères)",
                       f"first merges ({ctx.num(len(small))} characters)"))
    ax2.semilogx([256 + m for m in grid], tpw, "o-", label=ctx.t("notre BPE", "our BPE"))
    ax2.axhline(model_tpw, color="tab:red", ls="--",
                label=ctx.t(f"tokenizer du modèle ({ctx.num(tok.vocab_size)})",
                            f"model's tokenizer ({ctx.num(tok.vocab_size)})"))
    ax2.set_xlabel(ctx.t("taille du vocabulaire (256 octets + fusions)",
                         "vocabulary size (256 bytes + merges)"))
    ax2.set_ylabel(ctx.t("tokens par mot (texte mis de côté)", "tokens per word (held-out text)"))
    ax2.legend()
    ctx.figure(fig, "bpe")

    s0 = steps[0]
    ctx.finding(
        f"Sur {ctx.num(len(small))} caractères, la paire la plus fréquente est « {show(s0.left)} + "
        f"{show(s0.right)} » ({s0.count} fois) : c'est la première fusion, le token n° 256 ; "
        f"après {len(steps)} fusions, la dernière (« {show(steps[-1].left + steps[-1].right)} ») n'apparaît "
        f"plus que {steps[-1].count} fois.",
        f"On {ctx.num(len(small))} characters, the most frequent pair is "
        f"\"{show(s0.left)} + {show(s0.right)}\" ({s0.count} times): it becomes the first merge, token 256; "
        f"after {len(steps)} merges the last one "
        f"(\"{show(steps[-1].left + steps[-1].right)}\") occurs only {steps[-1].count} times.")
    ctx.finding(
        f"Avec les seuls 256 octets, un mot coûte {ctx.num(tpw[0])} tokens ; après {ctx.num(len(merges))} "
        f"fusions, {ctx.num(tpw[-1])} ; le tokenizer du modèle ({ctx.num(tok.vocab_size)} tokens) en est à "
        f"{ctx.num(model_tpw)} sur le même texte.",
        f"With the 256 bytes alone a word costs {ctx.num(tpw[0])} tokens; after {ctx.num(len(merges))} "
        f"merges, {ctx.num(tpw[-1])}; the model's tokenizer ({ctx.num(tok.vocab_size)} tokens) gets "
        f"{ctx.num(model_tpw)} on the same text.")
    glued = next((st for st in steps if _whole_char(st)), None)
    if glued is not None:
        ch = (glued.left + glued.right).decode("utf-8")
        ctx.finding(
            f"La fusion n° {glued.rank + 1} ({show(glued.left)} + {show(glued.right)}, {glued.count} fois) "
            f"recolle les {len(ch.encode())} octets UTF-8 de « {ch} » : BPE part des octets, pas des "
            "lettres.",
            f"Merge {glued.rank + 1} ({show(glued.left)} + {show(glued.right)}, {glued.count} times) glues "
            f"back the {len(ch.encode())} UTF-8 bytes of \"{ch}\": BPE starts from bytes, not letters.")
    last = seg_rows[-1]
    w0 = words[1]
    ctx.finding(
        f"« {w0} » : {len(last[w0].split(' | '))} tokens avec nos {ctx.num(len(merges))} fusions "
        f"({last[w0]}), {len(model_row[w0].split(' | '))} avec le tokenizer du modèle ({model_row[w0]}).",
        f"\"{w0}\": {len(last[w0].split(' | '))} tokens with our {ctx.num(len(merges))} merges ({last[w0]}), "
        f"{len(model_row[w0].split(' | '))} with the model's tokenizer ({model_row[w0]}).")
    sw = next(r for r in straw if r["word"].lstrip("▁") == "strawberry" and r["word"].startswith("▁"))
    alone = next(r for r in straw if r["word"] == "strawberry")
    ctx.finding(
        f"« strawberry » contient {sw[LETTER]} « {LETTER} », mais le modèle reçoit {alone['n_tokens']} "
        f"identifiants ({alone['tokens']}) pour le mot seul et {sw['n_tokens']} ({sw['tokens']}) dans une "
        "phrase : les lettres ne lui parviennent jamais, il doit avoir mémorisé l'orthographe de chaque "
        "token.",
        f"\"strawberry\" holds {sw[LETTER]} \"{LETTER}\", but the model receives {alone['n_tokens']} ids "
        f"({alone['tokens']}) for the word alone and {sw['n_tokens']} ({sw['tokens']}) inside a sentence: "
        "the letters never reach it, it must have memorised how each token is spelt.")
    if ask_rows:
        right = sum(r["number"] == r["truth"] for r in ask_rows)
        none = ctx.t("pas de nombre", "no number")
        detail = ", ".join(f"{r['word']} → {r['number'] if r['number'] is not None else none} "
                           f"({ctx.t('vrai', 'true')} {r['truth']})" for r in ask_rows)
        ctx.finding(f"Interrogé, le modèle compte juste pour {right} mot(s) sur {len(ask_rows)} : {detail}.",
                    f"Asked, the model counts right for {right} word(s) out of {len(ask_rows)}: {detail}.")

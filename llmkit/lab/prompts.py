"""Experiment 10 of the course (`prompt-benchmark`) and its practical session TP3 (`tp3`): the same inputs
asked with several prompts (zero-shot, few-shot, structured JSON), every output scored automatically on the
course's 0/1/2 grid, and the mean score per prompt.

    outs = complete(llm, {"zero-shot": [msgs, ...], "few-shot": [...]}, max_tokens=16)  # greedy, batched
    grade_label("Positive.", 1, LABEL_WORDS["en"])                    # -> 1 (right, not one bare word)
    grade_label('{"sentiment": "negative"}', 0, LABEL_WORDS["en"], json_key="sentiment")   # -> 2
    grade_fields('{"name": "Ann Lee", "age": 31, "city": "Leeds"}', gold)                   # -> 2

The 0/1/2 grid (the course's, made exact so that a program applies it)
- 2, right and well-formed: the output, stripped of surrounding whitespace, is exactly the requested form and
  holds the right answer.
  * label, one word: the output is one accepted word of a class, optionally wrapped in quotes, asterisks or
    followed by a final "." / "!" (case and accents ignored: "Négatif." is the word négatif);
  * label, JSON: the whole output parses as a JSON object whose only key is `json_key` and whose value is an
    accepted word of a class;
  * fields (TP3): the whole output parses as a JSON object with exactly the expected keys, each value equal
    to the expected one (compared as text, case-insensitive, trimmed: the age 34 or "34").
  A well-formed output whose answer is wrong scores 0, not 1.
- 1, right answer, format not respected: the output is not well-formed (extra words, a sentence, code fences,
  broken or differently keyed JSON, ...) but holds the right answer: for a label, the accepted words it
  contains (as whole words) all belong to the right class; for fields, every expected value occurs in it (as
  whole words, case-insensitive).
- 0, wrong or unusable: anything else (the wrong class, both classes, no class, a missing or wrong field).

Notable choices
- `prompt-benchmark`: sentiment of 20 test reviews of the course's classification sets (10 positive, 10
  negative; Allociné in French, SST-2 in English). Zero-shot asks for one word; few-shot shows 4 training
  reviews (2 per class, 8 to 25 words) answered the same way, as earlier chat turns; structured asks for
  {"sentiment": ...} in JSON. The few-shot examples come from the training file, never the 20 inputs. A
  fourth prompt is zero-shot with the two options named in the other order ("negative or positive"): a
  small model tends to answer with the option named first, and the lab counts how many answers the swap
  changes.
- `tp3`: extracting a person's name, age and city as JSON from 20 short sentences made from templates,
  names and cities with a seeded generator (the answers are known by construction). Zero-shot names the
  keys; few-shot adds two worked examples; "schema + constrained" gives the JSON schema and decodes under it
  (`response_format` json_schema: `llmkit.generate.constrain` masks every token that would break the
  schema), which makes the format right by construction and leaves only the content to the model.
- Generation is greedy (temperature 0) through the engine: every prompt's chats are rendered with the
  model's template and completed in one `llm.generate` batch (rows refilled as answers finish, the shared
  instruction and examples served from the engine's prefix cache). Constrained decoding keeps one validator
  per request, so those requests go one by one through `llm.chat`.
- The instruction and examples come first and the input last in every prompt, so the prefix is shared.
- Quick: 8 inputs (4 per class); full: the course's 20. TP3's constrained requests run one by one, the
  slowest part (about 2 s each on 2 cores).
"""

from __future__ import annotations

import json
import random
import re
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from llmkit.lab import LabContext, lab, pyplot
from llmkit.lab.classify import DATA, read_reviews

LABEL_WORDS = {  # accepted words per class (0 negative, 1 positive), compared without case or accents
    "en": (("negative",), ("positive",)),
    "fr": (("négatif", "négative"), ("positif", "positive")),
}
GRID_COLORS = ("#d62728", "#ff7f0e", "#2ca02c")  # 0, 1, 2


# ---------------------------------------------------------------------------------------------- grading
def fold(text: str) -> str:
    """Lower case without accents: "Négatif" -> "negatif"."""
    nfkd = unicodedata.normalize("NFKD", text.casefold())
    return "".join(c for c in nfkd if not unicodedata.combining(c))


def json_object(text: str) -> dict | None:
    """The output as a JSON object when the whole (stripped) text is one, else None."""
    try:
        obj = json.loads(text.strip())
    except (json.JSONDecodeError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


def mentions(text: str, phrase: str) -> bool:
    """`phrase` occurs in `text` as whole words (case and accents ignored)."""
    return re.search(rf"(?<!\w){re.escape(fold(phrase))}(?!\w)", fold(text)) is not None


def word_class(word: str, words: Sequence[Sequence[str]]) -> int | None:
    """The class whose accepted words include `word` (case and accents ignored), else None."""
    w = fold(word.strip())
    return next((c for c, ws in enumerate(words) if w in {fold(x) for x in ws}), None)


def answer_class(output: str, words: Sequence[Sequence[str]], json_key: str | None = None
                 ) -> tuple[int | None, bool]:
    """(the class an output answers or None, whether it is well-formed): one bare word, or {json_key: word}
    when json_key is given; a malformed output answers the class when its accepted words are all of it."""
    if json_key is None:
        bare = re.fullmatch(r"[\s\"'*«»“”]*([^\s\"'*«»“”.!]+)[\s\"'*«»“”]*[.!]?[\s\"'*«»“”]*", output)
        formed = word_class(bare.group(1), words) if bare else None
    else:
        obj = json_object(output)
        ok = obj is not None and list(obj) == [json_key] and isinstance(obj[json_key], str)
        formed = word_class(obj[json_key], words) if ok else None
    if formed is not None:
        return formed, True
    said = {c for c, ws in enumerate(words) for w in ws if mentions(output, w)}
    return (said.pop() if len(said) == 1 else None), False


def grade_label(output: str, gold: int, words: Sequence[Sequence[str]], json_key: str | None = None) -> int:
    """The 0/1/2 grid for a label answer: one bare word, or {json_key: word} when json_key is given."""
    c, formed = answer_class(output, words, json_key)
    return 0 if c != gold else 2 if formed else 1


def grade_fields(output: str, gold: Mapping[str, Any]) -> int:
    """The 0/1/2 grid for extracted fields: a JSON object with exactly gold's keys and values."""
    obj = json_object(output)
    if obj is not None and set(obj) == set(gold):
        same = all(fold(str(obj[k]).strip()) == fold(str(v)) for k, v in gold.items())
        return 2 if same else 0
    return 1 if all(mentions(output, str(v)) for v in gold.values()) else 0


# ---------------------------------------------------------------------------------------------- generation
def complete(llm, prompts: Mapping[str, Sequence[list[dict]]], max_tokens: int,
             constrained: Mapping[str, dict] | None = None, bar=iter) -> dict[str, list[str]]:
    """Greedy answers to each prompt's chats: {prompt name: [text, ...]}. A prompt named in `constrained`
    decodes under that response_format, one chat at a time; the others go as one batch of rendered ids."""
    from llmkit.tokenizer.chat import render_chat

    out: dict[str, list[str]] = {}
    for name in bar(list(prompts)):
        chats = prompts[name]
        if constrained and name in constrained:
            fmt = constrained[name]
            out[name] = [llm.chat(c, temperature=0, max_tokens=max_tokens, response_format=fmt).text
                         for c in chats]
        else:
            ids = [render_chat(llm.tokenizer, c, add_generation_prompt=True).ids for c in chats]
            out[name] = [r.text for r in llm.generate(ids, temperature=0, max_tokens=max_tokens)]
    return out


# ---------------------------------------------------------------------------------------------- report
def report(ctx: LabContext, inputs: Sequence[str], golds: Sequence[Any], outputs: Mapping[str, list[str]],
           scores: Mapping[str, list[int]], task: str) -> None:
    """Table, bar chart, data and findings shared by both labs."""
    names = list(scores)
    n = len(inputs)
    mean = {k: float(np.mean(v)) for k, v in scores.items()}
    counts = {k: [v.count(s) for s in (0, 1, 2)] for k, v in scores.items()}
    ctx.table("scores", [{"prompt": k, "mean": round(mean[k], 3), "score_2": counts[k][2],
                          "score_1": counts[k][1], "score_0": counts[k][0]} for k in names])
    ctx.table("outputs", [{"input": inp[:80],
                           "gold": g if isinstance(g, str) else json.dumps(g, ensure_ascii=False),
                           **{k: f"[{scores[k][i]}] {outputs[k][i][:60]}" for k in names}}
                          for i, (inp, g) in enumerate(zip(inputs, golds))])
    ctx.data(task=task, n_inputs=n, mean_score=mean, counts=counts, scores=dict(scores),
             outputs=dict(outputs))

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [1, 1.3]})
    ax = axes[0]
    bars = ax.bar(names, [mean[k] for k in names], color="#4c72b0")
    for b, k in zip(bars, names):
        ax.text(b.get_x() + b.get_width() / 2, b.get_height() + 0.03, ctx.num(mean[k]), ha="center")
    ax.set_ylim(0, 2.2)
    ax.set_ylabel(ctx.t("score moyen (grille 0/1/2)", "mean score (0/1/2 grid)"))
    ax.set_title(ctx.t(f"{n} entrées, décodage glouton", f"{n} inputs, greedy decoding"))
    ax = axes[1]
    left = np.zeros(len(names))
    legend = ctx.t(("0 : faux / inutilisable", "1 : juste, format non respecté", "2 : juste et bien formé"),
                   ("0: wrong / unusable", "1: right, format not respected", "2: right and well-formed"))
    for s in (2, 1, 0):
        vals = np.array([counts[k][s] for k in names])
        ax.barh(names, vals, left=left, color=GRID_COLORS[s], label=legend[s])
        left += vals
    ax.invert_yaxis()
    ax.set_xlabel(ctx.t("nombre de réponses", "number of answers"))
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3)
    for a in axes:
        a.tick_params(axis="x" if a is axes[0] else "y", labelsize=8)
    fig.tight_layout()
    ctx.figure(fig, "scores")

    best = max(names, key=mean.get)
    worst = min(names, key=mean.get)
    if mean[best] == mean[worst]:
        fr, en = " : tous les prompts font jeu égal.", ": every prompt ties."
    else:
        gap = ctx.num(mean[best] - mean[worst])
        fr, en = (f". Le meilleur prompt, {best}, dépasse {worst} de {gap} point.",
                  f". The best prompt, {best}, beats {worst} by {gap} points.")
    listed = ", ".join(f"{k} {ctx.num(mean[k])}" for k in names)
    ctx.finding(f"Score moyen sur {n} entrées (0 à 2) : {listed}{fr}",
                f"Mean score over {n} inputs (0 to 2): {listed}{en}")
    right = {k: counts[k][1] + counts[k][2] for k in names}
    ctx.finding(
        "Réponses justes (score 1 ou 2) / dont bien formées (2) : "
        + ", ".join(f"{k} {right[k]}/{n} dont {counts[k][2]}" for k in names)
        + " : l'écart entre les deux est ce que coûte le non-respect du format.",
        "Right answers (score 1 or 2) / of which well-formed (2): "
        + ", ".join(f"{k} {right[k]}/{n}, {counts[k][2]} well-formed" for k in names)
        + ": the gap between the two is what ignoring the format costs.")


# ---------------------------------------------------------------------------------------------- labs
SENTIMENT = {
    "en": {
        "ask": "Classify the sentiment of this review. Answer with one word: positive or negative.",
        "swapped": "Classify the sentiment of this review. Answer with one word: negative or positive.",
        "json": 'Classify the sentiment of this review. Answer only with JSON: {"sentiment": "positive"} or '
                '{"sentiment": "negative"}.',
        "review": "Review: {text}",
        "answers": ("negative", "positive"),
    },
    "fr": {
        "ask": "Classe le sentiment de cette critique. Réponds par un seul mot : positif ou négatif.",
        "swapped": "Classe le sentiment de cette critique. Réponds par un seul mot : négatif ou positif.",
        "json": 'Classe le sentiment de cette critique. Réponds uniquement en JSON : '
                '{"sentiment": "positif"} ou {"sentiment": "négatif"}.',
        "review": "Critique : {text}",
        "answers": ("négatif", "positif"),
    },
}


def balanced_first(rows: Sequence[dict], per_class: int, keep=lambda r: True) -> list[dict]:
    """The first `per_class` rows of each label (in file order) among those `keep` accepts, interleaved."""
    by = [[r for r in rows if r["label"] == c and keep(r)][:per_class] for c in (0, 1)]
    return [r for pair in zip(by[1], by[0]) for r in pair]


@lab("prompt-benchmark", fr="Banc d'essai de prompts (zéro-shot, few-shot, JSON)",
     en="Prompt benchmark (zero-shot, few-shot, JSON)", course="10", needs_model=True,
     needs_data=tuple(f"{d}_{s}.jsonl" for d in DATA.values() for s in ("train", "test")))
def prompt_benchmark(ctx: LabContext) -> None:
    lang, sp = ctx.lang, SENTIMENT[ctx.lang]
    items = balanced_first(read_reviews(lang, "test"), 4 if ctx.quick else 10)
    shots = balanced_first(read_reviews(lang, "train"), 2, keep=lambda r: 8 <= len(r["text"].split()) <= 25)

    def user(instr: str, text: str) -> dict:
        return {"role": "user", "content": f"{instr}\n\n{sp['review'].format(text=text)}"}

    examples = [m for r in shots for m in (user(sp["ask"], r["text"]),
                                           {"role": "assistant", "content": sp["answers"][r["label"]]})]
    prompts = {
        "zero-shot": [[user(sp["ask"], r["text"])] for r in items],
        "zero-shot-swapped": [[user(sp["swapped"], r["text"])] for r in items],
        "few-shot": [[*examples, user(sp["ask"], r["text"])] for r in items],
        "json": [[user(sp["json"], r["text"])] for r in items],
    }
    llm = ctx.llm()
    outputs = complete(llm, prompts, max_tokens=16, bar=lambda xs: ctx.bar(xs, desc="prompts"))
    words = LABEL_WORDS[lang]
    key = {k: "sentiment" if k == "json" else None for k in prompts}
    scores = {k: [grade_label(o, r["label"], words, key[k]) for o, r in zip(outputs[k], items)]
              for k in prompts}
    report(ctx, [r["text"] for r in items], [sp["answers"][r["label"]] for r in items], outputs, scores,
           task="sentiment")
    said = {k: [answer_class(o, words, key[k])[0] for o in outputs[k]] for k in prompts}
    n = len(items)
    dist = {k: (v.count(1), v.count(0), v.count(None)) for k, v in said.items()}
    flipped = sum(a != b for a, b in zip(said["zero-shot"], said["zero-shot-swapped"]))
    named = [c for c in said["zero-shot"] + said["zero-shot-swapped"] if c is not None]
    first = sum(c == 1 for c in said["zero-shot"]) + sum(c == 0 for c in said["zero-shot-swapped"])
    ctx.data(answers={k: dict(zip(("positive", "negative", "none"), v)) for k, v in dist.items()},
             changed_by_swap=flipped, first_option_chosen=first, swap_answers_naming_a_class=len(named))
    pos, neg = sp["answers"][1], sp["answers"][0]
    listed = ", ".join(f"{k} {a}/{b}/{c}" for k, (a, b, c) in dist.items())
    ctx.finding(
        f"Les classes sont équilibrées ({n // 2} critiques positives sur {n}) ; réponses {pos} / {neg} / "
        f"sans classe : {listed}. Inverser l'ordre des deux options dans la consigne zéro-shot change "
        f"{flipped}/{n} réponses ; {first}/{len(named)} des réponses des deux consignes qui donnent une "
        "classe reprennent l'option citée en premier.",
        f"The classes are balanced ({n // 2} positive reviews out of {n}); answers {pos} / {neg} / no class: "
        f"{listed}. Swapping the order of the two options in the zero-shot instruction changes {flipped}/{n} "
        f"answers; {first}/{len(named)} of the answers of both instructions that name a class pick the "
        "option named first.")


PEOPLE = {
    "fr": {
        "first": ("Claire", "Julien", "Amina", "Hugo", "Léa", "Karim", "Sophie", "Thomas", "Camille", "Yanis",
                  "Inès", "Louis"),
        "last": ("Martin", "Bernard", "Dubois", "Moreau", "Laurent", "Lefèvre", "Garnier", "Faure", "Roux",
                 "Fontaine", "Mercier", "Blanc"),
        "city": ("Lyon", "Marseille", "Toulouse", "Nantes", "Lille", "Bordeaux", "Rennes", "Grenoble",
                 "Dijon", "Brest", "Nancy", "Limoges"),
        "templates": ("Je m'appelle {name}, j'ai {age} ans et je vis à {city}.",
                      "{name} ({age} ans) habite à {city}.",
                      "Bonjour ! Ici {name}. J'habite à {city} et je viens d'avoir {age} ans.",
                      "À {age} ans, {name} vit maintenant à {city}."),
        "keys": ("nom", "age", "ville"),
        "ask": 'Extrais du texte le nom complet, l\'âge et la ville de la personne. Réponds en JSON avec les '
               'clés "nom", "age" et "ville".',
        "schema_ask": "Extrais du texte les informations sur la personne. Réponds uniquement par un objet "
                      "JSON conforme à ce schéma : {schema}",
        "text": "Texte : {text}",
    },
    "en": {
        "first": ("Emma", "James", "Olivia", "Noah", "Ava", "Liam", "Mia", "Ethan", "Grace", "Omar", "Chloe",
                  "Ryan"),
        "last": ("Smith", "Johnson", "Brown", "Taylor", "Wilson", "Clarke", "Walker", "Hughes", "Patel",
                 "Reed", "Morgan", "Hayes"),
        "city": ("Boston", "Denver", "Leeds", "Dublin", "Austin", "Glasgow", "Seattle", "Bristol", "Chicago",
                 "Toronto", "Oxford", "Phoenix"),
        "templates": ("My name is {name}, I am {age} years old and I live in {city}.",
                      "{name} ({age}) lives in {city}.",
                      "Hello! This is {name}. I live in {city} and I just turned {age}.",
                      "At {age}, {name} now lives in {city}."),
        "keys": ("name", "age", "city"),
        "ask": 'Extract the person\'s full name, age and city from the text. Answer in JSON with the keys '
               '"name", "age" and "city".',
        "schema_ask": "Extract the information about the person from the text. Answer only with a JSON "
                      "object following this schema: {schema}",
        "text": "Text: {text}",
    },
}


def people(lang: str, n: int, seed: int) -> list[tuple[str, dict]]:
    """n (sentence, gold fields) pairs: distinct people from the language's lists, a template each."""
    p = PEOPLE[lang]
    rng = random.Random(seed)
    pairs = rng.sample([(f, la) for f in p["first"] for la in p["last"]], n)
    out = []
    for i, (first, last) in enumerate(pairs):
        name, age, city = f"{first} {last}", rng.randint(19, 78), rng.choice(p["city"])
        text = p["templates"][i % len(p["templates"])].format(name=name, age=age, city=city)
        out.append((text, dict(zip(p["keys"], (name, age, city)))))
    return out


def person_schema(keys: Sequence[str]) -> dict:
    name, age, city = keys
    return {"type": "object", "properties": {name: {"type": "string"}, age: {"type": "integer"},
                                             city: {"type": "string"}},
            "required": list(keys)}


@lab("tp3", fr="TP3 : extraire des champs en JSON, trois prompts notés 0/1/2",
     en="TP3: extracting fields as JSON, three prompts scored 0/1/2", course="TP3", needs_model=True)
def tp3(ctx: LabContext) -> None:
    p = PEOPLE[ctx.lang]
    n = 8 if ctx.quick else 20
    data = people(ctx.lang, n + 2, ctx.seed)
    shots, items = data[:2], data[2:]  # the worked examples are never among the scored inputs
    schema = person_schema(p["keys"])

    def user(instr: str, text: str) -> dict:
        return {"role": "user", "content": f"{instr}\n\n{p['text'].format(text=text)}"}

    examples = [m for text, gold in shots for m in (
        user(p["ask"], text), {"role": "assistant", "content": json.dumps(gold, ensure_ascii=False)})]
    schema_ask = p["schema_ask"].format(schema=json.dumps(schema, ensure_ascii=False))
    prompts = {
        "zero-shot": [[user(p["ask"], t)] for t, _ in items],
        "few-shot": [[*examples, user(p["ask"], t)] for t, _ in items],
        "schema+constrained": [[user(schema_ask, t)] for t, _ in items],
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}
    outputs = complete(ctx.llm(), prompts, max_tokens=40, constrained={"schema+constrained": fmt},
                       bar=lambda xs: ctx.bar(xs, desc="tp3"))
    scores = {k: [grade_fields(o, gold) for o, (_, gold) in zip(outputs[k], items)] for k in prompts}
    report(ctx, [t for t, _ in items], [g for _, g in items], outputs, scores, task="extraction")
    parsed = {k: sum(json_object(o) is not None for o in outputs[k]) for k in prompts}
    ctx.data(valid_json=parsed)
    listed = ", ".join(f"{k} {parsed[k]}/{len(items)}" for k in prompts)
    cut = len(items) - parsed["schema+constrained"]  # constrained outputs can only be cut by max_tokens
    fr = (" ; sous contrainte, le format est juste par construction, reste au modèle à trouver les valeurs"
          if not cut else f" ; {cut} sorties contraintes ont été coupées par la limite de tokens")
    en = ("; under the constraint the format is right by construction, the model only has to find the values"
          if not cut else f"; {cut} constrained outputs were cut by the token limit")
    ctx.finding(f"Sorties qui sont un objet JSON valide : {listed}{fr}.",
                f"Outputs that are a valid JSON object: {listed}{en}.")

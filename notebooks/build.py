"""Build the course notebooks (TP1-TP3 and experiments 1-10) from the specs below, their one source.

    python notebooks/build.py            # (re)write notebooks/*.ipynb
    python notebooks/build.py --check    # exit 1 if a committed notebook differs from what this script builds

Every notebook has the same shape, so they stay consistent:
  1. a French title and what the experiment shows;
  2. a parameter cell: QUICK and OUT read from LLMKIT_LAB_QUICK / LLMKIT_LAB_OUT (CI sets them), so the same
     notebook runs full-size for a student by default and in seconds in CI;
  3. the concept in a few short Markdown cells, with the formulas;
  4. (most notebooks) a small calculation by hand that checks a formula against llmkit's own function;
  5. the lab itself: `run_lab(NAME, lang="fr", quick=QUICK, out=OUT)`, its findings and tables (Markdown) and
     its figures (PNG); `llmkit lab NAME` prints the same findings on the command line;
  6. `r.data`, the run's key numbers, and an "À vous" cell saying what to change.

Notable choices
- The notebooks hold no logic: the experiment is the lab (llmkit/lab/), so the notebook, the CLI and the
  tests show the same numbers. The hand calculations use toy inputs and take milliseconds.
- Committed without outputs and with fixed cell ids (stem-index), so a rebuild is byte-identical and a diff
  shows only real changes; `--check` (and tests/test_notebooks.py, which makes the same comparison) keeps
  files and script in step.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import nbformat
from nbformat import v4

HERE = Path(__file__).resolve().parent

PARAMS = '''\
# Paramètres. QUICK = True : version réduite (quelques secondes, celle que la CI exécute) ;
# QUICK = False : la version complète (quelques minutes). OUT : dossier des figures et résultats.
import os
from pathlib import Path

QUICK = os.environ.get("LLMKIT_LAB_QUICK", "0") not in ("", "0")
OUT = Path(os.environ.get("LLMKIT_LAB_OUT", "runs/lab"))'''

RUN = '''\
from IPython.display import Image, display

from llmkit.lab import run_lab

r = run_lab("{lab}", lang="fr", quick=QUICK, out=OUT)
display(r)  # les conclusions et les tableaux, calculés sur cette exécution
for png in r.figures:
    display(Image(filename=str(png)))
print(f"Figures, findings.md et result.json dans {{r.out}} ({{r.seconds:.1f}} s)")'''

DATA = "r.data  # les chiffres clés de cette exécution (les mêmes que dans result.json)"

COMMON_A_VOUS = """\
- Relancez avec `QUICK = False` (cellule des paramètres) : la version complète prend quelques minutes et
  donne des courbes plus nettes. Les conclusions sont recalculées : comparez-les avec la version rapide.
- Le code de l'expérience :
  `import inspect, llmkit.lab; print(inspect.getsource(llmkit.lab.get_lab("{lab}").fn))`.
- En ligne de commande, le même résultat : `llmkit lab {lab}` (options `--quick`, `--lang en`,
  `--out DOSSIER`)."""

MODEL_A_VOUS = """
- Essayez un autre modèle : `run_lab("{lab}", model="gemma-3-270m", quick=QUICK, out=OUT)` (à télécharger
  d'abord avec `llmkit pull gemma-3-270m`). Les conclusions changent-elles ?"""


@dataclass(frozen=True)
class Spec:
    stem: str  # file name without .ipynb
    lab: str  # the lab it runs (llmkit lab NAME)
    title: str
    intro: str  # what the experiment shows, in two or three sentences
    concept: tuple[str, ...]  # Markdown cells: the idea and its formulas
    run: str  # what the lab does, before the run cell
    a_vous: str  # concrete things to change or look at
    calc: tuple[str, str] | None = None  # (Markdown, code): a small calculation by hand
    needs_model: bool = False  # says so in the "À vous" cell (another model)


SPECS: tuple[Spec, ...] = (
    Spec(
        "tp1_generation", "tp1", "TP1 — Générer du texte : longueur, température, échantillonnage",
        "Un modèle de langage n'écrit pas une phrase d'un coup : il prédit **un token à la fois**. Ce TP "
        "fait "
        "varier les trois réglages de base de la génération — la longueur maximale, l'échantillonnage "
        "(`do_sample`) et la température — et montre ce que chacun change dans le texte produit.",
        (
            "## La génération autorégressive\n\n"
            "À chaque pas, le modèle lit tout le contexte $x_{<t}$ et renvoie un score (logit) $z_i$ pour "
            "chaque token $i$ du vocabulaire. Un softmax en fait une distribution de probabilité, on choisit "
            "un token, on l'ajoute au contexte, et on recommence :\n\n"
            "$$P(x_1, \\dots, x_n) = \\prod_{t=1}^{n} P(x_t \\mid x_{<t}), \\qquad "
            "P(x_t = i \\mid x_{<t}) = \\frac{e^{z_i}}{\\sum_j e^{z_j}}$$\n\n"
            "La génération s'arrête quand le modèle produit son token de fin, ou quand on atteint la limite.",
            "## Les réglages\n\n"
            "- **Longueur maximale** (`max_new_tokens`) : un plafond en *tokens*, pas en mots ; une limite "
            "courte coupe la réponse en plein milieu, une limite longue n'oblige pas le modèle à "
            "l'atteindre.\n"
            "- **Décodage glouton** (`do_sample=False`) : on prend toujours le token le plus probable, "
            "$x_t = \\arg\\max_i P(i \\mid x_{<t})$. Le résultat est déterministe (le même à chaque "
            "exécution) mais a tendance à tourner en boucle.\n"
            "- **Échantillonnage** (`do_sample=True`) : on *tire au sort* le token selon sa probabilité ; "
            "deux exécutions donnent deux textes différents.\n"
            "- **Température** $T$ : on divise les logits par $T$ avant le softmax, "
            "$p_i(T) = e^{z_i/T} / \\sum_j e^{z_j/T}$. $T < 1$ concentre la probabilité sur les tokens les "
            "plus probables (texte plus sage), $T > 1$ l'étale (texte plus varié, puis incohérent). "
            "`do_sample=False` revient à la limite $T \\to 0$.",
            "## Mesurer plutôt que juger à l'œil\n\n"
            "- **Log-probabilité moyenne par token** du texte produit, $\\frac{1}{n}\\sum_t \\ln P(x_t \\mid "
            "x_{<t})$, calculée avec la distribution *brute* du modèle (avant température) : plus elle est "
            "basse, moins le modèle trouve probable le texte qu'on lui a fait écrire.\n"
            "- **distinct-2** : la part des paires de mots consécutifs qui sont différentes. Proche de 1, le "
            "texte varie ; plus bas, il se répète.",
        ),
        "Le lab génère la suite d'un même prompt en glouton avec plusieurs longueurs maximales, puis en "
        "échantillonnage à plusieurs températures (plusieurs tirages chacun, avec des graines fixées pour "
        "que le résultat soit reproductible), et compare les textes, leur log-probabilité moyenne et leur "
        "diversité.",
        "- Dans la cellule du calcul à la main, changez les logits `z` (par exemple deux tokens à égalité) : "
        "que devient le tirage glouton ? et l'échantillonnage ?\n"
        "- Regardez `r.tables` : à quelle température le texte devient-il incohérent ? La log-probabilité "
        "moyenne chute-t-elle au même moment ? Le glouton se répète-t-il ?",
        calc=(
            "## Un petit calcul à la main : tirer au sort selon $p(T)$\n\n"
            "Sur cinq tokens imaginaires, on tire 2 000 fois selon $p(T)$ et on compare les fréquences "
            "observées aux probabilités. Le décodage glouton, lui, choisirait toujours le token 0.",
            '''\
import torch

from llmkit.lab.inside import softmax_t

torch.manual_seed(0)
z = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0])  # logits de 5 tokens imaginaires
for T in (0.5, 1.0, 2.0):
    p = torch.exp(z / T) / torch.exp(z / T).sum()  # la formule, à la main
    assert torch.allclose(p, softmax_t(z, T))  # la même que celle des labs
    draws = torch.multinomial(p, 2000, replacement=True)  # 2 000 tirages
    freq = torch.bincount(draws, minlength=5) / 2000
    print(f"T = {T}: p = {p.numpy().round(3)}  fréquences = {freq.numpy().round(3)}")''',
        ),
        needs_model=True,
    ),
    Spec(
        "tp2_decoding", "tp2", "TP2 — Stratégies de décodage : glouton, température, top-k, top-p",
        "Avec le même modèle et le même prompt, la façon de **choisir** le token suivant change beaucoup le "
        "texte. Ce TP compare le décodage glouton, l'échantillonnage à $T = 0{,}7$, le top-k (10, 50, 100) "
        "et le top-p (0,9 et 0,95), et rassemble les résultats dans un tableau.",
        (
            "## Couper la queue de la distribution\n\n"
            "Échantillonner dans toute la distribution laisse une petite chance à des milliers de tokens "
            "absurdes ; sur une longue génération, l'un d'eux finit par sortir. On tronque donc la "
            "distribution avant de tirer, puis on **renormalise** ce qui reste :\n\n"
            "- **top-k** : on garde les $k$ tokens les plus probables, "
            "$p'_i = p_i / \\sum_{j \\in \\text{top-}k} p_j$ pour ces $k$ tokens, 0 pour les autres. "
            "$k$ est fixe, que le modèle hésite entre 2 tokens ou entre 500.\n"
            "- **top-p** (*nucleus sampling*) : on garde le plus petit ensemble des tokens les plus "
            "probables dont la masse cumulée atteint $p$. Quand le modèle est sûr de lui, il reste un ou "
            "deux tokens ; quand il hésite, beaucoup plus : la coupe **s'adapte** à la forme de la "
            "distribution.",
            "## Dans quel ordre ?\n\n"
            "Dans llmkit comme dans la plupart des bibliothèques : logits → température → top-k → top-p → "
            "tirage. Le décodage glouton correspond à la limite $T \\to 0$ : toute la masse va au token le "
            "plus probable, et les troncatures n'y changent plus rien.",
        ),
        "Le lab génère la suite d'un même prompt avec chaque stratégie (top-k et top-p à $T = 1$, comme "
        "dans le cours), plusieurs tirages chacune, et mesure pour chacune la diversité du texte "
        "(distinct-n : la part des suites de $n$ mots qui sont différentes ; répétition = 1 − distinct-3) et "
        "sa log-probabilité moyenne par token selon le modèle. Le compromis apparaît dans le tableau : plus "
        "on coupe la queue, plus le texte est probable, et moins il est varié.",
        "- Dans le calcul à la main, essayez `apply_top_p(z, 0.95)` sur les deux distributions : combien de "
        "tokens restent ?\n"
        "- Quelle stratégie du tableau `r.tables` donne le texte le plus répétitif ? le plus varié ? "
        "Lequel préféreriez-vous pour un chatbot, pour du code, pour une histoire ?",
        calc=(
            "## Un petit calcul à la main : top-k et top-p\n\n"
            "Deux distributions de cinq tokens, l'une concentrée, l'autre plate. Avec $p = 0{,}8$, le top-p "
            "garde 3 tokens de la première ($0{,}5 + 0{,}2 + 0{,}15 = 0{,}85 \\geq 0{,}8$) mais 4 de la "
            "seconde ; le top-k en garde toujours $k$. Les fonctions sont celles du sampler de llmkit.",
            '''\
import torch

from llmkit.generate.sampling import apply_top_k, apply_top_p

for name, p in (("concentrée", [0.50, 0.20, 0.15, 0.10, 0.05]), ("plate", [0.25, 0.25, 0.20, 0.15, 0.15])):
    z = torch.tensor(p).log()  # des logits qui donnent exactement p
    top_k = torch.softmax(apply_top_k(z, 2), -1)  # les 2 meilleurs, renormalisés
    top_p = torch.softmax(apply_top_p(z, 0.8), -1)  # le plus petit ensemble de masse >= 0,8
    print(f"{name:10s} top-k 2 : {top_k.numpy().round(3)}   top-p 0,8 : {top_p.numpy().round(3)}")
p = torch.tensor([0.50, 0.20, 0.15])
print("à la main, top-p 0,8 de la première :", (p / p.sum()).numpy().round(3))''',
        ),
        needs_model=True,
    ),
    Spec(
        "tp3_prompting", "tp3", "TP3 — Ingénierie de prompt : extraire des champs en JSON",
        "Sans changer un seul poids du modèle, la **formulation de la demande** change la qualité des "
        "réponses. La tâche : extraire d'une courte phrase le nom, l'âge et la ville d'une personne, sous "
        "forme d'un objet JSON. Trois prompts, les mêmes phrases, chaque réponse notée automatiquement sur "
        "la grille 0/1/2.",
        (
            "## Trois façons de demander\n\n"
            "- **Zéro-shot** : l'instruction seule, qui nomme les clés attendues. Le modèle doit deviner le "
            "reste du format.\n"
            "- **Few-shot** : la même instruction, précédée de deux exemples résolus (phrase → JSON) "
            "présentés comme des tours de conversation déjà joués. Le modèle imite les exemples : c'est "
            "l'*apprentissage en contexte* ; rien n'est entraîné, tout est dans le prompt.\n"
            "- **Schéma + décodage contraint** : on donne le schéma JSON, et le moteur de génération "
            "**interdit** à chaque pas les tokens qui sortiraient du schéma (leur logit passe à "
            "$-\\infty$, donc leur probabilité à 0). Le format est juste par construction ; il ne reste au "
            "modèle que le contenu.",
            "## Noter automatiquement : la grille 0/1/2\n\n"
            "Chaque réponse reçoit une note calculée par un programme, jamais à l'œil :\n\n"
            "- **2** : la sortie est exactement un objet JSON avec les bonnes clés et les bonnes valeurs ;\n"
            "- **1** : les bonnes valeurs sont là, mais le format n'est pas respecté (phrase autour, "
            "balises de code, JSON cassé ou autres clés) ;\n"
            "- **0** : une valeur manque ou est fausse — même dans un JSON impeccable.\n\n"
            "Les phrases sont fabriquées à partir de modèles de phrases, de noms et de villes tirés au "
            "sort : les bonnes réponses sont connues d'avance.",
        ),
        "Le lab génère les phrases, pose les trois prompts au modèle (décodage glouton : la même réponse "
        "à chaque exécution), note chaque réponse et trace la note moyenne par prompt avec la répartition "
        "des notes.",
        "- Dans `r.tables`, regardez les réponses notées 1 : qu'est-ce qui casse le format ? Et les "
        "réponses notées 0 du prompt contraint : quelle valeur le modèle s'est-il trompé à extraire ?\n"
        "- Dans le calcul à la main, inventez vos propres sorties (un âge écrit en lettres, une clé en "
        "majuscules) et prédisez leur note avant de l'afficher.",
        calc=(
            "## Un petit calcul à la main : appliquer la grille\n\n"
            "Cinq sorties imaginaires pour la même phrase, notées par la fonction du lab.",
            '''\
from llmkit.lab.prompts import grade_fields

gold = {"nom": "Léa Martin", "age": 34, "ville": "Lyon"}
for output in ('{"nom": "Léa Martin", "age": 34, "ville": "Lyon"}',  # exact
               '{"nom": "Léa Martin", "age": "34", "ville": "lyon"}',  # 34 en texte, casse ignorée
               'Voici : {"nom": "Léa Martin", "age": 34, "ville": "Lyon"}',  # du texte autour
               '{"nom": "Léa Martin", "age": 43, "ville": "Lyon"}',  # âge faux
               "Léa Martin a 34 ans et vit à Lyon."):  # pas de JSON du tout
    print(grade_fields(output, gold), output)''',
        ),
        needs_model=True,
    ),
    Spec(
        "exp01_mlp_curves", "mlp-curves",
        "Expérience 1 — Courbes d'apprentissage d'un MLP selon la taille des données",
        "Un même réseau, entraîné sur 100, 500 ou 1 000 exemples : on suit sa perte et sa précision sur les "
        "données d'entraînement **et** sur des données qu'il n'a jamais vues. L'écart entre les deux courbes "
        "mesure ce que le réseau a appris par cœur plutôt que compris.",
        (
            "## Les données et le modèle\n\n"
            "Les *deux lunes* (*two moons*) sont deux demi-cercles de points entrelacés et bruités, une "
            "classe par demi-cercle : aucune droite ne les sépare, il faut une frontière courbe. Un MLP "
            "(perceptron multicouche) en trace une grâce à ses couches cachées non linéaires, "
            "$h = \\mathrm{ReLU}(W_1 x + b_1)$, et à une sortie unique, le logit $z = w^\\top h + b$ : "
            "$P(\\text{classe } 1 \\mid x) = \\sigma(z) = 1/(1 + e^{-z})$ (le softmax à deux classes, "
            "écrit avec une seule sortie).",
            "## Entraînement et validation\n\n"
            "On minimise l'entropie croisée sur les $N$ exemples d'entraînement, "
            "$\\mathcal{L} = -\\frac{1}{N} \\sum_{n} \\ln \\hat p(y_n \\mid x_n)$, et on mesure la même "
            "perte sur un jeu de **validation** séparé, que le réseau ne voit jamais pendant "
            "l'entraînement.\n\n"
            "- Peu de données : la perte d'entraînement descend très bas (le réseau mémorise les points, "
            "bruit compris) mais la perte de validation reste haute ou remonte : c'est le "
            "**sur-apprentissage**.\n"
            "- Plus de données : il devient plus difficile de tout mémoriser, les deux courbes se "
            "rapprochent, et la validation s'améliore.",
        ),
        "Le lab entraîne le même MLP (Adam, sur tout le jeu à chaque pas : une époque = un pas, donc le même "
        "nombre de mises à jour pour chaque taille) pour chaque taille de jeu d'entraînement, et trace les "
        "courbes de perte et de précision, entraînement et validation, au fil des époques.",
        "- Pour quelle taille l'écart entre entraînement et validation est-il le plus grand à la fin ? "
        "Retrouvez-le dans `r.data`.\n"
        "- Une perte de validation au-dessus de $\\ln 2 \\approx 0{,}693$ signifie que le modèle fait pire, "
        "en moyenne, qu'une réponse à pile ou face : cela arrive-t-il ?",
        calc=(
            "## Un petit calcul à la main : lire une perte d'entropie croisée\n\n"
            "La perte d'un exemple vaut $-\\ln$ de la probabilité donnée à la bonne classe. Avec deux "
            "classes, répondre 50/50 coûte $\\ln 2 \\approx 0{,}693$ : c'est le niveau du hasard, le repère "
            "pour lire les courbes.",
            '''\
import math

for p in (0.99, 0.9, 0.5, 0.1):
    print(f"probabilité de la bonne classe {p:4.2f} -> perte {-math.log(p):.3f}")''',
        ),
    ),
    Spec(
        "exp02_regularization", "regularization", "Expérience 2 — Régularisation : L2 et dropout",
        "Même tâche, même réseau, trois entraînements : sans régularisation, avec une pénalité L2 "
        "($\\lambda = 10^{-4}$) et avec du dropout ($p = 0{,}5$). On compare les courbes de perte et la "
        "**frontière de décision** que chaque réseau a tracée.",
        (
            "## Pénalité L2 (*weight decay*)\n\n"
            "On ajoute à la perte la norme des matrices de poids (pas des biais) : "
            "$\\mathcal{L}_{L2} = \\mathcal{L} + \\lambda \\sum \\lVert W \\rVert^2$. Le gradient gagne un "
            "terme $2 \\lambda W$ qui tire chaque poids vers zéro ; avec une descente de gradient simple, "
            "$W \\leftarrow W - \\eta (\\nabla \\mathcal{L} + 2 \\lambda W)$, d'où le nom de *weight decay*. "
            "Des poids petits donnent une fonction plus lisse, qui colle moins au bruit.",
            "## Dropout\n\n"
            "Pendant l'entraînement, chaque neurone caché est mis à zéro avec la probabilité $p$, et les "
            "autres sont multipliés par $1/(1-p)$ pour garder la même valeur moyenne. Le réseau ne peut plus "
            "compter sur un neurone précis : il apprend des représentations redondantes. À l'évaluation, "
            "le dropout est coupé et le réseau entier sert.\n\n"
            "Le lab mesure les pertes d'entraînement et de validation en mode évaluation, dropout coupé : "
            "l'écart entre les deux courbes est donc bien du sur-apprentissage, pas le bruit du dropout.",
        ),
        "Le lab entraîne les trois variantes sur les mêmes données (un petit jeu d'entraînement, pour que "
        "le sur-apprentissage se voie), trace leurs courbes de perte et dessine leur frontière de décision "
        "dans le plan.",
        "- Quelle variante a le plus petit écart entre entraînement et validation dans `r.data` ? Sa "
        "frontière est-elle la plus lisse ?\n"
        "- Dans le calcul à la main, essayez `p=0.9` : la moyenne reste-t-elle proche de 1 ?",
        calc=(
            "## Un petit calcul à la main : le dropout garde la moyenne\n\n"
            "Sur un vecteur de 10 000 uns, le dropout de PyTorch en mode entraînement met la moitié des "
            "valeurs à zéro et double les autres ; la moyenne reste proche de 1. En mode évaluation, il ne "
            "fait rien.",
            '''\
import torch

torch.manual_seed(0)
drop = torch.nn.Dropout(p=0.5)
x = torch.ones(10_000)
y = drop.train()(x)
print(f"entraînement : {(y == 0).float().mean().item():.1%} de zéros, valeurs gardées = {y.max().item():.1f},"
      f" moyenne = {y.mean().item():.3f}")
print("évaluation : sortie identique à l'entrée ->", torch.equal(drop.eval()(x), x))''',
        ),
    ),
    Spec(
        "exp03_vanishing_gradient", "vanishing-gradient",
        "Expérience 3 — Le gradient qui s'évanouit dans un RNN",
        "La tâche : lire une suite de $T$ bits au hasard et, après le dernier, redonner le **premier**. "
        "Trouver quel bit garder est facile (le premier pas est marqué) ; la seule difficulté est la "
        "distance. Quand $T$ grandit (de 10 à 100), le signal d'apprentissage qui remonte jusqu'au premier "
        "pas s'effondre pour un RNN simple ; les LSTM et GRU résistent bien mieux. On mesure la norme du "
        "gradient et la précision en fonction de $T$.",
        (
            "## La rétropropagation à travers le temps (BPTT)\n\n"
            "Un RNN simple applique la même cellule à chaque pas : "
            "$h_t = \\tanh(W_{hh} h_{t-1} + W_{xh} x_t + b)$. Pour savoir comment le premier état influence "
            "la perte finale, la règle de dérivation en chaîne multiplie une jacobienne par pas :\n\n"
            "$$\\frac{\\partial \\mathcal{L}}{\\partial h_1} = \\frac{\\partial \\mathcal{L}}{\\partial h_T}"
            "\\prod_{t=2}^{T} \\frac{\\partial h_t}{\\partial h_{t-1}}, \\qquad "
            "\\frac{\\partial h_t}{\\partial h_{t-1}} = \\mathrm{diag}(1 - h_t^2)\\, W_{hh}$$\n\n"
            "Comme $|1 - h_t^2| \\leq 1$, si la norme de $W_{hh}$ est inférieure à 1, chaque facteur "
            "rétrécit le gradient et le produit décroît **exponentiellement** avec $T$ (il explose à "
            "l'inverse si les facteurs dépassent 1). Le réseau ne reçoit plus de signal pour relier la fin "
            "de la séquence à son début.",
            "## Pourquoi LSTM et GRU résistent\n\n"
            "Le LSTM transporte une mémoire $c_t$ mise à jour par **addition** : "
            "$c_t = f_t \\odot c_{t-1} + i_t \\odot \\tilde c_t$. Le long de ce chemin, "
            "$\\partial c_t / \\partial c_{t-1} = \\mathrm{diag}(f_t)$ : si la porte d'oubli $f_t$ reste "
            "proche de 1, le gradient traverse les pas presque intact. Le GRU fait de même avec sa porte "
            "de mise à jour $z_t$ (convention de PyTorch) : "
            "$h_t = (1 - z_t) \\odot n_t + z_t \\odot h_{t-1}$.\n\n"
            "Le lab initialise ces portes à « se souvenir par défaut » (biais $+3$, soit "
            "$\\sigma(3) \\approx 0{,}95$) : le long de la mémoire, un pas ne multiplie alors le gradient "
            "que par 0,95 environ ; le RNN simple, lui, n'a aucune porte à régler : c'est toute la leçon. "
            "Le lab mesure le facteur réel par pas de chaque cellule.",
        ),
        "Pour chaque longueur $T$, le lab mesure $\\lVert \\partial \\ell / \\partial x_1 \\rVert$, ce "
        "que le premier bit peut changer à la perte, sur des réseaux fraîchement initialisés (moyenne sur "
        "256 séquences) ; puis il entraîne un RNN simple, un LSTM et un GRU et trace la précision obtenue "
        "en fonction de $T$.",
        "- Dans le calcul à la main, remplacez `w = 0.9` par `w = 1.1`, puis par `w = 3.0` : le produit "
        "explose-t-il ? Pourquoi $\\tanh$ finit-il quand même par l'écraser ?\n"
        "- Dans `r.data`, à partir de quel $T$ le RNN simple ne fait-il plus mieux que le hasard ?",
        calc=(
            "## Un petit calcul à la main : le produit des facteurs\n\n"
            "Un RNN à un seul neurone, $h_t = \\tanh(w\\, h_{t-1} + x_t)$. On calcule "
            "$\\partial h_T / \\partial h_1$ de deux façons : par autograd, et comme le produit des facteurs "
            "$w\\,(1 - h_t^2)$. Les deux coïncident, et décroissent exponentiellement avec $T$.",
            '''\
import torch

torch.manual_seed(0)
w = 0.9
for T in (10, 50, 100):
    x = torch.randn(T)
    h1 = torch.zeros((), requires_grad=True)
    h, factors = h1, []
    for t in range(1, T):
        h = torch.tanh(w * h + x[t])
        factors.append(w * (1 - h.detach() ** 2))  # dh_t / dh_{t-1}
    h.backward()
    product = torch.stack(factors).prod().item()
    print(f"T = {T:3d}: autograd {h1.grad.item():.2e}   produit des facteurs {product:.2e}")''',
        ),
    ),
    Spec(
        "exp04_ngram_vs_llm", "ngram-vs-llm", "Expérience 4 — Modèle n-gramme contre LLM : la perplexité",
        "Avant les réseaux de neurones, on prédisait le mot suivant en **comptant** : un modèle trigramme "
        "regarde les deux mots précédents. On compare sa perplexité à celle du LLM sur les mêmes phrases "
        "françaises, mesurée par mot pour que la comparaison soit juste.",
        (
            "## Le trigramme avec lissage add-k\n\n"
            "On compte, dans un corpus, chaque suite de trois mots $c(u, v, w)$ et chaque contexte "
            "$c(u, v)$. Sans précaution, une suite jamais vue aurait une probabilité nulle et rendrait toute "
            "la phrase impossible ; le lissage *add-k* ajoute $k$ à chaque compte :\n\n"
            "$$P(w \\mid u, v) = \\frac{c(u, v, w) + k}{c(u, v) + k\\,|V|}$$\n\n"
            "où $|V|$ est la taille du vocabulaire. Le modèle ne voit que deux mots de contexte et ne "
            "généralise pas : « le chat dort » ne l'aide en rien pour « le félin dort ».",
            "## La perplexité, par mot\n\n"
            "$$\\mathrm{PPL} = \\exp\\Big(-\\frac{1}{N} \\sum_{i=1}^{N} \\ln P(w_i \\mid "
            "\\text{contexte})\\Big)$$\n\n"
            "C'est le nombre de choix équiprobables entre lesquels le modèle hésite en moyenne : plus bas, "
            "c'est mieux. Le LLM ne découpe pas le texte en mots mais en tokens ; on additionne donc les "
            "log-probabilités de tous ses tokens et on divise par le **même** nombre de mots $N$ que pour le "
            "trigramme. Les deux modèles sont ainsi notés sur le même texte et la même unité.",
        ),
        "Le lab entraîne le trigramme sur un corpus français, choisit $k$ sur une partie de validation, puis "
        "calcule la perplexité par mot des deux modèles sur les mêmes phrases de test.",
        "- Dans le calcul à la main, changez `k` : quelle probabilité donne-t-on à une suite jamais vue "
        "quand $k$ grandit ?\n"
        "- Dans `r.tables`, sur quelles phrases l'écart entre les deux modèles est-il le plus grand ? "
        "Contiennent-elles des mots rares ?",
        calc=(
            "## Un petit calcul à la main : add-k sur trois phrases\n\n"
            "Corpus : « le chat dort », « le chat mange », « le chien dort ». Le vocabulaire compte les cinq "
            "mots, plus `</s>` (fin de phrase, qu'on prédit aussi) et `<unk>` (mot inconnu) : $|V| = 7$. "
            "Avec $k = 0{,}5$ : $P(\\text{dort} \\mid \\text{le chat}) = (1 + 0{,}5)/(2 + 0{,}5 \\times 7) "
            "\\approx 0{,}273$. Le modèle n-gramme de llmkit donne la même chose.",
            '''\
import math

from llmkit.eval.ngram import NGramModel

k = 0.5
m = NGramModel.fit("le chat dort\\nle chat mange\\nle chien dort", n=3, k=k)
V = len(m.vocab)
for context, word, c, cc in ((["le", "chat"], "dort", 1, 2), (["le", "chien"], "mange", 0, 1)):
    by_hand = (c + k) / (cc + k * V)
    ours = math.exp(m.logprob(context, word))
    print(f"|V| = {V}  P({word} | {' '.join(context)}) : à la main {by_hand:.4f}, NGramModel {ours:.4f}")''',
        ),
        needs_model=True,
    ),
    Spec(
        "exp05_token_lengths", "token-lengths", "Expérience 5 — Mots et tokens : combien coûte une phrase ?",
        "Un LLM ne lit pas des mots mais des **tokens** BPE. On compte, phrase par phrase, les mots et les "
        "tokens, on compare leurs distributions et on en déduit combien de phrases tiennent dans une "
        "fenêtre de contexte de 4 096 ou 8 192 tokens.",
        (
            "## Pourquoi un mot devient plusieurs tokens\n\n"
            "Le tokenizer BPE part des octets et fusionne, pendant son entraînement, les paires les plus "
            "fréquentes de son corpus. Un mot courant de ce corpus devient un seul token ; un mot rare, "
            "long, "
            "ou d'une langue peu présente est découpé en plusieurs morceaux. Un tokenizer entraîné surtout "
            "sur de l'anglais coupe donc davantage le français.\n\n"
            "On résume le découpage par la **fertilité** : le nombre moyen de tokens par mot.",
            "## La fenêtre de contexte se compte en tokens\n\n"
            "Un modèle annoncé pour un contexte de $C$ tokens lit au plus "
            "$\\lfloor C / \\bar{n}_{\\text{tokens}} \\rfloor$ phrases, où $\\bar{n}_{\\text{tokens}}$ est "
            "le "
            "nombre moyen de tokens par phrase. La même fenêtre contient moins de texte dans une langue mal "
            "découpée ; et le coût d'un appel, facturé au token, suit la même règle.",
        ),
        "Le lab découpe des phrases en mots et en tokens avec le tokenizer du modèle, trace les deux "
        "histogrammes et le nuage tokens contre mots, et calcule combien de phrases tiennent dans 4k et 8k "
        "tokens.",
        "- Dans le calcul à la main, essayez vos propres mots : un nom propre, un mot technique, un émoji.\n"
        "- Dans `r.data`, quelle est la fertilité moyenne ? Combien de phrases de plus tiendraient dans 8k "
        "avec une fertilité de 1 ?",
        calc=(
            "## Un petit calcul à la main : voir les tokens\n\n"
            "Le tokenizer du modèle par défaut, sur quelques phrases (le modèle est chargé une fois ; le lab "
            "le réutilise).",
            '''\
from llmkit.lab import load_model
from llmkit.lab.inside import token_texts

tok = load_model().tokenizer
for text in ("The cat is sleeping.", "Le chat est en train de dormir.", "anticonstitutionnellement"):
    ids = tok.encode_ordinary(text)
    print(f"{len(text.split())} mot(s) -> {len(ids):2d} tokens : {token_texts(tok, ids)}")''',
        ),
        needs_model=True,
    ),
    Spec(
        "exp06_attention", "attention", "Expérience 6 — Regarder l'attention : qui regarde qui ?",
        "Dans « Le médecin a vu sa patiente. Il lui a parlé longtemps. », comprendre « Il » demande de "
        "retrouver « médecin ». On affiche, pour quelques couches et têtes du modèle, les poids d'attention "
        "token → token, et on cherche la tête qui regarde le plus l'antécédent.",
        (
            "## L'attention, en une formule\n\n"
            "Chaque token produit une requête $q$, une clé $k$ et une valeur $v$ (des projections de son "
            "état caché). Le poids que le token $i$ accorde au token $j$ compare la requête de $i$ à la clé "
            "de $j$ :\n\n"
            "$$A = \\mathrm{softmax}\\Big(\\frac{Q K^\\top}{\\sqrt{d}} + M\\Big), \\qquad "
            "\\text{sortie} = A V$$\n\n"
            "Chaque ligne de $A$ est une distribution (elle somme à 1). Diviser par $\\sqrt{d}$ ($d$ = "
            "dimension d'une tête) évite que les produits scalaires grandissent avec $d$ et saturent le "
            "softmax. Le **masque causal** $M$ vaut 0 pour $j \\leq i$ et $-\\infty$ pour $j > i$ : un token "
            "ne voit jamais la suite, ce qui permet d'entraîner le modèle à prédire le token suivant.",
            "## Couches et têtes\n\n"
            "Chaque couche a plusieurs têtes, chacune avec ses propres projections : certaines regardent le "
            "token précédent, d'autres relient des mots éloignés, et beaucoup déposent l'essentiel de leur "
            "poids sur le premier token quand rien d'autre ne les intéresse (le *puits d'attention*, "
            "*attention sink*). Une carte d'attention montre *où* une tête lit, pas *pourquoi* le "
            "modèle décide : c'est un indice, pas une explication complète.",
        ),
        "Le lab fait passer les phrases de coréférence dans le modèle, lit les poids d'attention exacts de "
        "chaque couche et tête, dessine les cartes de chaleur et classe les têtes selon le poids que le "
        "pronom donne à son antécédent (la somme sur les tokens du mot). Repère : une attention uniforme "
        "donnerait à chaque token visible le poids $1/(\\text{position} + 1)$. La meilleure tête est "
        "cherchée sur la première phrase, puis vérifiée sur les autres : une tête trouvée sur un seul "
        "exemple peut n'être qu'une coïncidence.",
        "- Dans `r.data`, quelle couche et quelle tête regardent le plus l'antécédent ? Son poids "
        "dépasse-t-il nettement le repère uniforme ? Fait-elle de même sur les autres phrases "
        "(`r.tables`) ?\n"
        "- Dans le calcul à la main, retirez le masque `M` : que devient la première ligne de `A` ?",
        calc=(
            "## Un petit calcul à la main : trois tokens\n\n"
            "On calcule $\\mathrm{softmax}(QK^\\top/\\sqrt{d} + M)$ pour trois tokens aléatoires et on "
            "vérifie "
            "que $AV$ est exactement ce que donne l'attention de PyTorch avec le masque causal.",
            '''\
import math

import torch

torch.manual_seed(0)
T, d = 3, 4
Q, K, V = torch.randn(T, d), torch.randn(T, d), torch.randn(T, d)
M = torch.triu(torch.full((T, T), float("-inf")), diagonal=1)  # 0 sur et sous la diagonale, -inf au-dessus
A = torch.softmax(Q @ K.T / math.sqrt(d) + M, dim=-1)  # (T, T) : ligne = requête, colonne = clé
print(A.numpy().round(3))
print("chaque ligne somme à 1 :", torch.allclose(A.sum(-1), torch.ones(T)))
ref = torch.nn.functional.scaled_dot_product_attention(Q[None], K[None], V[None], is_causal=True)[0]
print("A V = attention de PyTorch :", torch.allclose(A @ V, ref, atol=1e-6))''',
        ),
        needs_model=True,
    ),
    Spec(
        "exp07_rnn_vs_attention", "rnn-vs-attention",
        "Expérience 7 — RNN contre attention : le coût selon la longueur",
        "Un RNN lit la séquence pas à pas ; l'attention compare chaque token à tous les autres d'un coup. "
        "On mesure le temps d'un passage avant pour des longueurs $T$ de 32 à 1 024 et on lit, sur un "
        "graphique log-log, comment chacun grandit avec $T$.",
        (
            "## Compter les opérations\n\n"
            "- **RNN** : $T$ pas successifs, chacun une multiplication matrice-vecteur en $O(d^2)$ : "
            "$O(T\\, d^2)$ au total, **linéaire** en $T$. Mais les pas dépendent les uns des autres : on ne "
            "peut pas les calculer en parallèle.\n"
            "- **Attention** : les projections coûtent $O(T\\, d^2)$, et la matrice $QK^\\top$ de taille "
            "$T \\times T$ coûte $O(T^2 d)$ en calcul et $O(T^2)$ en mémoire : **quadratique** en $T$, mais "
            "entièrement parallèle.\n\n"
            "Le terme quadratique l'emporte quand $T$ dépasse $d$ environ.",
            "## Lire une pente sur un graphique log-log\n\n"
            "Si le temps suit $t \\approx c\\, T^a$, alors $\\log t = a \\log T + \\log c$ : une droite de "
            "pente $a$. On s'attend à $a \\approx 1$ pour le RNN et à $a$ proche de 2 pour l'attention aux "
            "grands $T$. Aux petits $T$, les coûts fixes (appels, allocations) dominent et les pentes sont "
            "plus faibles : c'est pourquoi on ajuste la pente sur les grandes longueurs.",
        ),
        "Le lab prend une couche RNN (`nn.RNN`) et la couche d'auto-attention causale des modèles de llmkit, "
        "de même largeur $d = 64$, et chronomètre un passage avant pour chaque longueur $T$ : temps CPU du "
        "processus sur un seul cœur, le minimum de plusieurs répétitions (les autres programmes de la "
        "machine faussent moins la mesure). Il trace les temps en log-log et ajuste une droite sur les "
        "trois plus grands $T$, et une sur les trois plus petits.",
        "- Dans `r.data`, comparez les deux pentes ajustées : sont-elles proches de 1 et de 2 ? À partir "
        "de quel $T$ l'attention devient-elle plus lente que le RNN sur cette machine ?\n"
        "- Le temps est une mesure bruitée : relancez la cellule du lab ; les pentes bougent-elles ?",
        calc=(
            "## Un petit calcul à la main : multiplications-additions\n\n"
            "Pour $d = 64$ : le RNN fait $2 d^2$ opérations par pas ($W_{hh} h$ et $W_{xh} x$), l'attention "
            "$4 T d^2$ pour ses projections plus $2 T^2 d$ pour $QK^\\top$ et $AV$.",
            '''\
d = 64
for T in (32, 128, 512, 1024):
    rnn = T * 2 * d * d
    attention = 4 * T * d * d + 2 * T * T * d
    print(f"T = {T:5d}: RNN {rnn:>12,}  attention {attention:>12,}  rapport {attention / rnn:5.1f}")''',
        ),
    ),
    Spec(
        "exp08_zero_shot_vs_supervised", "zero-shot-vs-supervised",
        "Expérience 8 — Classification : LLM zéro-shot contre modèle supervisé",
        "Classer des critiques en positives ou négatives : d'un côté un LLM à qui l'on pose simplement la "
        "question, sans aucun exemple étiqueté ; de l'autre un classifieur classique, TF-IDF + régression "
        "logistique, entraîné sur des critiques étiquetées. On compare leurs précisions avec leurs "
        "intervalles de confiance, sur des critiques de séries Allociné en français (`lang=\"en\"` : les "
        "phrases de SST-2 en anglais), et on cherche combien d'exemples étiquetés il faut au modèle "
        "supervisé pour battre le LLM.",
        (
            "## Le modèle supervisé : TF-IDF + régression logistique\n\n"
            "Chaque texte devient un vecteur : un poids par mot (ou paire de mots) du vocabulaire, "
            "$\\mathrm{tfidf}(t, d) = \\mathrm{tf}(t, d) \\cdot \\log \\frac{N}{\\mathrm{df}(t)}$ "
            "(fréquence du mot dans le texte, multipliée par sa rareté dans les $N$ textes ; les variantes "
            "ajoutent un lissage). La régression logistique apprend un poids par mot, "
            "$P(\\text{positif} \\mid x) = \\sigma(w^\\top x + b)$ : « excellent » pousse vers positif, "
            "« ennuyeux » vers négatif. Il lui faut des exemples étiquetés, mais elle est rapide et "
            "facile à interpréter.",
            "## Le LLM zéro-shot, par vraisemblance\n\n"
            "Le LLM ne voit aucun exemple. La critique va dans un message qui pose la question, on commence "
            "la réponse à sa place (« Cette critique est ») et on compare les probabilités des deux "
            "suites possibles : $\\ln P(\\text{positive})$ contre $\\ln P(\\text{négative})$. La plus "
            "grande gagne : pas de texte à analyser, et la réponse est toujours l'une des deux "
            "étiquettes.\n\n"
            "Un petit modèle préfère souvent une étiquette quelle que soit la critique (biais d'étiquette). "
            "La **calibration** de Zhao et al. (2021) le corrige sans aucune étiquette : on mesure la "
            "préférence du modèle sur des critiques vides de sens (« N/A », « ») et on la retranche à "
            "chaque critique.",
            "## L'incertitude de la mesure\n\n"
            "Une précision $\\hat p$ mesurée sur $n$ critiques est incertaine. Un intervalle de confiance à "
            "95 % vaut environ $\\hat p \\pm 1{,}96 \\sqrt{\\hat p (1 - \\hat p) / n}$ (approximation "
            "normale) ; le lab utilise l'intervalle de **Wilson**, plus juste quand $n$ est petit ou "
            "$\\hat p$ proche de 0 ou 1. Si les intervalles de deux méthodes se chevauchent largement, "
            "l'écart observé peut n'être que du hasard.",
        ),
        "Le lab interroge le LLM en zéro-shot (brut et calibré) sur les critiques de test, entraîne le "
        "classifieur TF-IDF sur des sous-ensembles équilibrés de taille croissante des critiques "
        "d'entraînement (sa courbe d'apprentissage), et compare les précisions avec leurs intervalles sur "
        "les mêmes critiques de test.",
        "- Dans `r.tables`, la courbe d'apprentissage : à partir de combien d'exemples étiquetés le modèle "
        "TF-IDF dépasse-t-il le zéro-shot ? et le zéro-shot calibré ?\n"
        "- Dans le calcul à la main, combien de critiques de test faut-il pour que l'intervalle fasse "
        "±2 points ?\n"
        "- Relancez en anglais, `run_lab(\"zero-shot-vs-supervised\", lang=\"en\", quick=QUICK, out=OUT)` : "
        "le LLM, entraîné surtout sur de l'anglais, fait-il mieux sur SST-2 ?",
        calc=(
            "## Un petit calcul à la main : la largeur de l'intervalle\n\n"
            "Pour une précision mesurée de 80 %, l'intervalle à 95 % selon le nombre de critiques de test : "
            "l'approximation normale à la main, et l'intervalle de Wilson de llmkit. La largeur ne diminue "
            "qu'en $1/\\sqrt{n}$.",
            '''\
import math

from llmkit.train.reward import wilson_interval

p = 0.80
for n in (50, 200, 1000, 5000):
    half = 1.96 * math.sqrt(p * (1 - p) / n)
    lo, hi = wilson_interval(p * n, n)
    print(f"n = {n:5d}: normale [{p - half:.3f}, {p + half:.3f}]   Wilson [{lo:.3f}, {hi:.3f}]")''',
        ),
        needs_model=True,
    ),
    Spec(
        "exp09_temperature_entropy", "temperature-entropy", "Expérience 9 — Température et entropie",
        "La température règle le hasard de la génération. On regarde la distribution du token suivant à "
        "$T \\in \\{0{,}1 ; 0{,}5 ; 1 ; 1{,}5\\}$, on mesure son **entropie** et on tire des exemples de "
        "texte à chaque température.",
        (
            "## Le softmax avec température\n\n"
            "$$p_i(T) = \\frac{e^{z_i / T}}{\\sum_j e^{z_j / T}}$$\n\n"
            "Diviser les logits $z$ par $T$ ne change pas leur ordre, seulement leurs écarts. Quand "
            "$T \\to 0$, toute la masse va au token le plus probable (le décodage glouton) ; $T = 1$ donne "
            "la "
            "distribution apprise par le modèle ; quand $T \\to \\infty$, la distribution devient uniforme "
            "sur tout le vocabulaire.",
            "## L'entropie, en bits\n\n"
            "$$H(p) = -\\sum_i p_i \\log_2 p_i$$\n\n"
            "$H = 0$ quand un seul token est possible ; $H = \\log_2 |V|$ pour une distribution uniforme sur "
            "$|V|$ tokens. $2^H$ se lit comme le nombre de choix équiprobables équivalent : une entropie de "
            "3 bits, c'est hésiter comme entre 8 tokens. L'entropie croît avec la température.",
        ),
        "Le lab calcule la distribution du token suivant du modèle sur un prompt, l'affiche pour chaque "
        "température, trace l'entropie en fonction de $T$ et génère un échantillon de texte par température.",
        "- Dans le calcul à la main, ajoutez `T = 100` : l'entropie approche-t-elle $\\log_2 5 \\approx "
        "2{,}32$ "
        "bits ?\n"
        "- Dans `r.data`, à quelle température l'entropie du modèle dépasse-t-elle 1 bit ? Les échantillons "
        "de `r.tables` deviennent-ils incohérents au même moment ?",
        calc=(
            "## Un petit calcul à la main : la formule contre les fonctions des labs\n\n"
            "Cinq logits, quatre températures : la formule écrite à la main et `softmax_t` / `entropy_bits` "
            "(celles des labs et du panneau « regarder dedans » du chat) donnent les mêmes nombres.",
            '''\
import math

import torch

from llmkit.lab.inside import entropy_bits, softmax_t

z = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0])
for T in (0.1, 0.5, 1.0, 1.5):
    p = torch.exp(z / T) / torch.exp(z / T).sum()
    h = -sum(pi * math.log2(pi) for pi in p.tolist() if pi > 0)
    assert torch.allclose(p, softmax_t(z, T)) and abs(h - entropy_bits(p)) < 1e-5
    print(f"T = {T:3}: p = {p.numpy().round(3)}  H = {h:.3f} bits (2^H = {2 ** h:.2f} choix)")''',
        ),
        needs_model=True,
    ),
    Spec(
        "exp10_prompt_benchmark", "prompt-benchmark", "Expérience 10 — Banc d'essai de prompts",
        "La même question — cette critique est-elle positive ou négative ? — posée de plusieurs façons "
        "aux mêmes 20 critiques (10 positives, 10 négatives), chaque réponse notée automatiquement sur la "
        "grille 0/1/2. Le résultat : la note moyenne de chaque prompt, et ce qu'un détail de formulation "
        "peut changer.",
        (
            "## Mesurer plutôt qu'essayer\n\n"
            "Essayer un prompt sur un ou deux exemples et juger à l'œil ne dit presque rien : une réponse "
            "réussie peut être de la chance. Un banc d'essai applique chaque prompt aux **mêmes** entrées, "
            "avec les mêmes réglages de génération (ici le décodage glouton), et note chaque réponse par un "
            "programme. La note moyenne sur $n$ entrées a une incertitude de l'ordre de $s / \\sqrt{n}$ "
            "($s$ : l'écart-type des notes) : deux prompts dont les moyennes diffèrent de moins que cela ne "
            "sont pas vraiment départagés.",
            "## Les prompts comparés\n\n"
            "- **zéro-shot** : la question, avec la consigne de répondre par un seul mot ;\n"
            "- **zéro-shot inversé** : la même, les deux options nommées dans l'autre ordre (« négative ou "
            "positive ») : un petit modèle a tendance à répondre l'option citée en premier, et le lab compte "
            "les réponses que cette inversion change ;\n"
            "- **few-shot** : quatre critiques d'entraînement déjà répondues (deux par classe), jamais parmi "
            "les critiques notées ;\n"
            "- **JSON** : la réponse demandée sous la forme `{\"sentiment\": ...}`.",
            "## La grille 0/1/2\n\n"
            "**2** : la bonne réponse, exactement au format demandé (un mot, ou l'objet JSON avec sa seule "
            "clé) ; **1** : la bonne réponse, mais noyée dans une phrase ou un format cassé ; **0** : la "
            "mauvaise classe, les deux à la fois, ou rien d'exploitable — une réponse bien formée mais "
            "fausse vaut 0.",
        ),
        "Le lab pose chaque prompt aux critiques de test (10 en version rapide, 20 en version complète), "
        "note chaque réponse et trace la note moyenne par prompt avec la répartition des notes.",
        "- Dans `r.data`, quel prompt gagne ? L'écart dépasse-t-il l'incertitude $s/\\sqrt{n}$ ?\n"
        "- Combien de réponses l'inversion de l'ordre des options a-t-elle changées ? Qu'en "
        "concluez-vous sur la fiabilité d'un seul prompt ?\n"
        "- Dans le calcul à la main, essayez vos propres sorties : « Positif !! », « plutôt positive », "
        "`{\"avis\": \"positif\"}`.",
        calc=(
            "## Un petit calcul à la main : appliquer la grille\n\n"
            "Quelques sorties imaginaires pour une critique positive (classe 1), notées par la fonction du "
            "lab ; en français, « positif » et « positive » sont acceptés, sans tenir compte de la casse ni "
            "des accents.",
            '''\
from llmkit.lab.prompts import LABEL_WORDS, grade_label

words = LABEL_WORDS["fr"]
for output in ("Positive.", "Cette critique est positive.", "Négatif", "positive ou négative ?"):
    print(grade_label(output, 1, words), output)
for output in ('{"sentiment": "positif"}', '{"avis": "positif"}'):
    print(grade_label(output, 1, words, json_key="sentiment"), output)''',
        ),
        needs_model=True,
    ),
)


def cell_source(text: str) -> str:
    return text.strip("\n")


def build(spec: Spec) -> nbformat.NotebookNode:
    """The notebook of one spec, with fixed cell ids (stem-0, stem-1, ...)."""
    a_vous = (spec.a_vous + "\n" + COMMON_A_VOUS.format(lab=spec.lab)
              + (MODEL_A_VOUS.format(lab=spec.lab) if spec.needs_model else ""))
    cells = [
        v4.new_markdown_cell(f"# {spec.title}\n\n{spec.intro}\n\n"
                             f"*Ce notebook appelle le lab `{spec.lab}` de llmkit ; en ligne de commande, "
                             f"`llmkit lab {spec.lab}` donne le même résultat.*"),
        v4.new_code_cell(PARAMS, metadata={"tags": ["parameters"]}),
        *(v4.new_markdown_cell(md) for md in spec.concept),
    ]
    if spec.calc:
        cells += [v4.new_markdown_cell(spec.calc[0]), v4.new_code_cell(spec.calc[1])]
    cells += [
        v4.new_markdown_cell(f"## L'expérience\n\n{spec.run}"),
        v4.new_code_cell(RUN.format(lab=spec.lab)),
        v4.new_code_cell(DATA),
        v4.new_markdown_cell(f"## À vous\n\n{a_vous}"),
    ]
    for i, c in enumerate(cells):
        c.id = f"{spec.stem.replace('_', '-')}-{i}"
        c.source = cell_source(c.source)
    nb = v4.new_notebook(cells=cells, metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"},
        "language_info": {"name": "python"},
    })
    nbformat.validate(nb)
    return nb


def text(nb: nbformat.NotebookNode) -> str:
    return nbformat.writes(nb) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if a notebook differs from this script's")
    args = ap.parse_args(argv)
    stale = []
    for spec in SPECS:
        path = HERE / f"{spec.stem}.ipynb"
        new = text(build(spec))
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != new:
                stale.append(path.name)
        elif not path.exists() or path.read_text(encoding="utf-8") != new:
            path.write_text(new, encoding="utf-8")
            print(f"wrote {path.relative_to(HERE.parent)}")
    if stale:
        print(f"out of date (run python notebooks/build.py): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

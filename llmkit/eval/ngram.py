"""The course's n-gram baseline, by hand: a trigram (any n) language model over words with add-k smoothing.

    model = NGramModel.fit(train_texts)          # n=3, k tuned on a validation slice (model.k_scores)
    model.logprob(["le", "petit"], "chat")       # ln P(chat | le, petit)
    model.perplexity(test_text)                  # exp(-mean ln P) over the test text's predicted tokens

Notable choices
- Words: `tokenize` lowercases the text and takes `\\w+|[^\\w\\s]` (words, and every punctuation mark as its
  own token: "L'homme, dit-il." -> l ' homme , dit - il .), what the course's experiment 4 uses.
- One sentence = one non-blank line (a paragraph in the shared corpora): it is padded with n - 1 `<s>` in
  front and ends with `</s>`. `<s>` is context only, never predicted; `</s>` is predicted (it stands for the
  line end, which an LLM predicts too), so a line of m words gives m + 1 predicted tokens.
- Vocabulary V: the training words seen at least `min_count` times (1: all of them), plus `</s>` and `<unk>`.
  Rarer training words and every test word outside V become `<unk>` (`NGramScore.oov` counts the latter).
  With min_count 1, `<unk>` never occurs in training and gets only the add-k mass: the mapping is
  optimistic (an unseen word is scored as the class of all unseen words, not as itself).
- Add-k: P(w | u, v) = (c(u, v, w) + k) / (c(u, v) + k |V|), where c(u, v) counts (u, v) as a context, i.e.
  the sum of c(u, v, w) over w: the probabilities of a context sum to 1 over V; an unseen context gives
  the uniform 1 / |V|. No backoff, no interpolation.
- k: given, or tuned (`k=None`) on the last `valid_fraction` of the training lines from the grid `K_GRID`
  (counts from the other lines), keeping the k of lowest validation perplexity; the model is then counted
  again on all the training lines. `k_scores` keeps each k's validation perplexity for the report.
- Counts are Counters of word tuples (readable); tuning scores every k of the grid at once with numpy from
  the validation counts gathered once. About 3 MB of text fits and tunes in a few seconds.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from llmkit.errors import LlmkitError

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
K_GRID = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
WORD = re.compile(r"\w+|[^\w\s]")


def tokenize(text: str) -> list[str]:
    """Lowercased words and punctuation marks: `\\w+|[^\\w\\s]`."""
    return WORD.findall(text.lower())


def sentences(text: str) -> list[list[str]]:
    """One token list per non-blank line of `text` (lines without any token are dropped)."""
    return [toks for line in text.splitlines() if (toks := tokenize(line))]


@dataclass(frozen=True)
class NGramScore:
    nll: float  # -sum of ln P over the predicted tokens (nats)
    tokens: int  # predicted tokens: words + one </s> per line
    words: int  # words (tokens without the </s>)
    oov: int  # words outside the vocabulary, scored as <unk>

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens) if self.tokens else math.nan


class NGramModel:
    """Counts of n-grams and of their (n-1)-word contexts; `fit` builds one."""

    def __init__(self, n: int, k: float, vocab: set[str], counts: Counter, context_counts: Counter,
                 k_scores: dict[float, float] | None = None):
        self.n, self.k, self.vocab = n, k, vocab
        self.counts = counts  # (w1, ..., wn) -> c
        self.context_counts = context_counts  # (w1, ..., w(n-1)) -> sum of c over wn
        self.k_scores = k_scores  # k -> validation perplexity, when k was tuned

    # -------------------------------------------------------------------------------------- fitting
    @classmethod
    def fit(cls, texts: str | Iterable[str], n: int = 3, k: float | None = None, *, min_count: int = 1,
            k_grid: Sequence[float] = K_GRID, valid_fraction: float = 0.1) -> NGramModel:
        """Count the n-grams of `texts` (one or several strings); k=None tunes k on a validation slice."""
        if n < 1:
            raise LlmkitError(f"n-gram order must be >= 1, got {n}")
        if min_count < 1:
            raise LlmkitError(f"min_count must be >= 1, got {min_count}")
        if k is not None and k <= 0:
            raise LlmkitError(f"add-k smoothing needs k > 0, got {k}")
        lines = [s for t in ([texts] if isinstance(texts, str) else texts) for s in sentences(t)]
        if not lines:
            raise LlmkitError("n-gram model: the training text holds no words; give a non-empty text")
        scores = None
        if k is None:
            n_valid = max(1, round(len(lines) * valid_fraction))
            if len(lines) - n_valid < 1 or not k_grid:
                raise LlmkitError("n-gram model: too few training lines to tune k on a validation slice "
                                  f"({len(lines)}); give k or more text")
            part = cls._count(lines[:-n_valid], n, 1.0, min_count)
            ppl = part._perplexities(lines[-n_valid:], np.asarray(k_grid, dtype=np.float64))
            scores = dict(zip(map(float, k_grid), map(float, ppl)))
            k = min(scores, key=scores.get)
        model = cls._count(lines, n, k, min_count)
        model.k_scores = scores
        return model

    @classmethod
    def _count(cls, lines: list[list[str]], n: int, k: float, min_count: int) -> NGramModel:
        freq = Counter(w for line in lines for w in line)
        vocab = {w for w, c in freq.items() if c >= min_count} | {EOS, UNK}
        counts: Counter = Counter()
        for line in lines:
            padded = [BOS] * (n - 1) + [w if w in vocab else UNK for w in line] + [EOS]
            counts.update(zip(*(padded[i:] for i in range(n))))
        context_counts: Counter = Counter()
        for gram, c in counts.items():
            context_counts[gram[:-1]] += c
        return cls(n, k, vocab, counts, context_counts)

    def _perplexities(self, lines: list[list[str]], ks: np.ndarray) -> np.ndarray:
        """Perplexity of `lines` for each k in `ks` (the same counts): one pass over the text, then numpy."""
        full, ctx = [], []
        for line in lines:
            for gram in self._grams(line)[0]:
                full.append(self.counts.get(gram, 0))
                ctx.append(self.context_counts.get(gram[:-1], 0))
        c, cc = np.asarray(full, np.float64)[:, None], np.asarray(ctx, np.float64)[:, None]  # (N, 1)
        logp = np.log(c + ks) - np.log(cc + ks * len(self.vocab))  # (N, K)
        return np.exp(-logp.mean(0))  # (K,)

    # -------------------------------------------------------------------------------------- scoring
    def _grams(self, words: list[str]) -> tuple[list[tuple[str, ...]], int]:
        """The n-grams predicting each word of one sentence and its </s>, and how many words were OOV."""
        mapped = [w if w in self.vocab else UNK for w in words]
        oov = sum(w not in self.vocab for w in words)
        padded = [BOS] * (self.n - 1) + mapped + [EOS]
        return list(zip(*(padded[i:] for i in range(self.n)))), oov

    def _logprob(self, gram: tuple[str, ...]) -> float:
        c, cc = self.counts.get(gram, 0), self.context_counts.get(gram[:-1], 0)
        return math.log(c + self.k) - math.log(cc + self.k * len(self.vocab))

    def logprob(self, context: Sequence[str], word: str) -> float:
        """ln P(word | the last n-1 words of context), tokens as `tokenize` gives them; a short context is
        padded with <s> (the start of a sentence); words outside the vocabulary count as <unk>."""
        if word == BOS:
            raise LlmkitError("<s> is context only: the model never predicts it")
        padded = [BOS] * (self.n - 1) + list(context)
        ctx = [w if w in self.vocab or w == BOS else UNK for w in padded[len(padded) - (self.n - 1):]]
        return self._logprob((*ctx, word if word in self.vocab else UNK))

    def score(self, text: str) -> NGramScore:
        """Summed negative log-likelihood of every sentence (line) of `text`, with the counts behind it."""
        nll, tokens, words, oov = 0.0, 0, 0, 0
        for line in sentences(text):
            grams, n_oov = self._grams(line)
            nll -= sum(map(self._logprob, grams))
            tokens, words, oov = tokens + len(grams), words + len(line), oov + n_oov
        return NGramScore(nll, tokens, words, oov)

    def perplexity(self, text: str) -> float:
        """exp(-mean ln P) over the predicted tokens of `text` (words and one </s> per line)."""
        s = self.score(text)
        if not s.tokens:
            raise LlmkitError("perplexity of a text without words is undefined; give a non-empty text")
        return s.perplexity

    def __repr__(self) -> str:
        return f"NGramModel(n={self.n}, k={self.k:g}, |V|={len(self.vocab)}, {len(self.counts)} n-grams)"

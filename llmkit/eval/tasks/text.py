"""Tasks on plain text: `perplexity` (an LLM's perplexities and bits per byte) and `ngram` (the course's
experiment 4: a trigram add-k model next to the LLM on the same held-out text).

Data: the text files and folders of `--data` (folders: every *.txt below them, sorted), else the shared
corpus ../shared/data/corpus/fr-nouvelles19. A document is one file (id: its name), or one chunk of it with
`--task-arg chunk_chars=N` (cut after the last blank line, else line end, else space before N characters;
the chunks put together give the file back). Documents without any non-space character are skipped;
`--limit N` keeps the first N documents.

Notable choices
- Metrics follow lm-eval's `wikitext` task (lm_eval/api/metrics.py): per document the summed negative
  log-likelihood of every token of the text (the first given BOS, else EOS: loglikelihood_rolling),
  its words `len(re.split(r"\\s+", text))` and bytes `len(text.encode("utf-8"))`; the corpus figures divide
  the sums (weighted_perplexity, bits_per_byte), not means of per-document figures:
  word_perplexity = exp(nll / words), byte_perplexity = exp(nll / bytes), bits_per_byte = nll / (bytes ln 2),
  token_perplexity = exp(nll / tokens). Bits per byte compares models with different tokenizers; token
  perplexity does not. No standard error (lm-eval reports N/A).
- Per-item records keep those raw sums as metrics, so a resumed or partial run aggregates exactly.
- `--task-arg window=W stride=S`: windows of W tokens every S tokens (HF's sliding-window recipe) instead
  of lm-eval's rolling windows of the model's whole context.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmkit.errors import LlmkitError
from llmkit.eval.base import Answer, Record, Request, Task, TaskOptions, register, shared_file, take
from llmkit.eval.ngram import NGramModel
from llmkit.io import corpus_files, read_text

DEFAULT_CORPUS = "corpus/fr-nouvelles19"
HELD_OUT = 0.1  # ngram: the last 10 % of the characters are the test text unless `train=PATH` is given
LN2 = math.log(2)


# ---------------------------------------------------------------------------------------- helpers
def count_words(text: str) -> int:
    """lm-eval's word count for perplexity tasks."""
    return len(re.split(r"\s+", text))


def count_bytes(text: str) -> int:
    return len(text.encode("utf-8"))


def int_arg(opts: TaskOptions, key: str, task: str, minimum: int) -> int | None:
    """`--task-arg KEY=N` as an int >= minimum, or None when absent."""
    raw = opts.extra.get(key)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise LlmkitError(f"{task}: --task-arg {key}={raw} must be an integer >= {minimum}")
    return value


INT_ARGS = {"chunk_chars": 1, "window": 2, "stride": 1, "n": 1, "min_count": 1}  # name -> minimum


def check_args(opts: TaskOptions, task: str, known: Sequence[str], ints: dict[str, int]) -> None:
    """Refuse integer `--task-arg`s out of range (at once, before any model is loaded). Keys no selected task
    knows are refused by the runner (a key may belong to another task of the same run)."""
    for key in set(known) & set(ints):
        int_arg(opts, key, task, ints[key])


def text_files(opts: TaskOptions, task: str) -> list[Path]:
    """The files of --data, else the default corpus's files."""
    if opts.data:
        return corpus_files(opts.data)
    return corpus_files([shared_file(opts, DEFAULT_CORPUS, task)])


def file_ids(files: Sequence[Path]) -> list[str]:
    """Each file's name, or its whole path where two files share a name."""
    names = [f.name for f in files]
    return [n if names.count(n) == 1 else str(f) for n, f in zip(names, files)]


def split_chunks(text: str, size: int) -> list[str]:
    """Consecutive pieces of at most `size` characters whose concatenation is `text`, each cut after the last
    paragraph break (blank line) in reach, else the last line end, else the last space, else at `size`."""
    out, start = [], 0
    while len(text) - start > size:
        piece = text[start:start + size]
        breaks = [m.end() for m in re.finditer(r"\n[ \t]*\n", piece)]
        cut = (breaks[-1] if breaks else piece.rfind("\n") + 1) or piece.rfind(" ") + 1 or size
        out.append(piece[:cut])
        start += cut
    out.append(text[start:])
    return out


def documents(named_texts: Sequence[tuple[str, str]], opts: TaskOptions, task: str) -> list[dict[str, Any]]:
    """One document per text (or per chunk with `chunk_chars`), blank ones dropped, then --limit."""
    size = int_arg(opts, "chunk_chars", task, 1)
    docs = []
    for name, text in named_texts:
        pieces = [text] if size is None else split_chunks(text, size)
        for i, piece in enumerate(pieces):
            if piece.strip():
                docs.append({"id": name if size is None else f"{name}#{i}", "text": piece})
    if not docs:
        raise LlmkitError(f"{task}: no text to score (every document is empty); pass text files with --data")
    return take(docs, opts)


def rolling_request(doc: dict[str, Any], opts: TaskOptions, task: str) -> Request:
    window, stride = int_arg(opts, "window", task, 2), int_arg(opts, "stride", task, 1)
    return Request("rolling", doc["text"], window=window, stride=stride)


def describe_data(opts: TaskOptions) -> str:
    """Which text a task reads, for its description: source, documents, --limit."""
    source = "the text files of --data" if opts.data else f"../shared/data/{DEFAULT_CORPUS}"
    chunk = opts.extra.get("chunk_chars")
    unit = "files (one document each)" if chunk is None else f"chunks of <= {chunk} characters"
    return f"{source}: {'all' if opts.limit is None else f'the first {opts.limit}'} {unit}"


# ---------------------------------------------------------------------------------------- perplexity
@register("perplexity")
class PerplexityTask(Task):
    """An LLM's word, byte and token perplexity and bits per byte over text files (lm-eval's wikitext
    metrics, corpus-level: sums over all documents, then one division)."""

    name = "perplexity"
    kind = "rolling"
    higher_is_better = {"bits_per_byte": False, "byte_perplexity": False, "word_perplexity": False,
                        "token_perplexity": False}
    main_metric = "bits_per_byte"
    ARGS = ("chunk_chars", "window", "stride")
    description = "word/byte/token perplexity, bits per byte of text files (--data; default: French novellas)"
    task_args = {"chunk_chars": "split files into documents of about N characters",
                 "window": "tokens per window (default: the model's context, lm-eval's rolling windows)",
                 "stride": "tokens between window starts (with window)"}

    def __init__(self, opts: TaskOptions | None = None):
        super().__init__(opts)
        check_args(self.opts, self.name, self.ARGS, INT_ARGS)
        self.description = (f"word/byte/token perplexity and bits per byte (lm-eval's wikitext metrics) of "
                            f"{describe_data(self.opts)}")

    def docs(self) -> list[dict[str, Any]]:
        files = text_files(self.opts, self.name)
        return documents(list(zip(file_ids(files), map(read_text, files))), self.opts, self.name)

    def requests(self, doc: dict[str, Any]) -> list[Request]:
        return [rolling_request(doc, self.opts, self.name)]

    def process(self, doc: dict[str, Any], answers: list[Answer]) -> Record:
        (r,) = answers
        words, nbytes = count_words(doc["text"]), count_bytes(doc["text"])
        metrics = {"nll": r.nll, "tokens": float(r.tokens), "words": float(words), "bytes": float(nbytes)}
        data = {"chars": len(doc["text"]), "word_perplexity": math.exp(r.nll / words),
                "bits_per_byte": r.nll / (nbytes * LN2)}
        return Record(doc["id"], metrics, data)

    def aggregate(self, records: Sequence[Record]) -> dict[str, tuple[float, float | None]]:
        nll, tokens, words, nbytes = (sum(r.metrics[m] for r in records) for m in ("nll", "tokens", "words",
                                                                                   "bytes"))
        return {"bits_per_byte": (ratio(nll, nbytes * LN2), None),
                "byte_perplexity": (exp_ratio(nll, nbytes), None),
                "word_perplexity": (exp_ratio(nll, words), None),
                "token_perplexity": (exp_ratio(nll, tokens), None)}


def ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def exp_ratio(a: float, b: float) -> float:
    return math.exp(a / b) if b else math.nan


# ---------------------------------------------------------------------------------------- n-gram
@register("ngram")
class NGramTask(Task):
    """The course's experiment 4: the same held-out text scored by a trigram add-k model (llmkit.eval.ngram)
    and by the LLM, perplexity per word side by side.

    The two per-word figures are comparable because both are exp(total nll / W) with the same W for the same
    text: W counts the test text's words as the trigram model sees them (`\\w+|[^\\w\\s]`, each punctuation
    mark a word) plus one end of line per non-blank line (`</s>`, which the LLM predicts as a newline). The
    LLM's nll covers every token of the exact text (case, spaces and all); the trigram's covers lowercased
    words and line ends only, and maps every test word it never saw in training to `<unk>`, scored as the
    class of all unseen words: both make the trigram figure optimistic. `oov_rate` says how many test words
    (without the line ends) were out of vocabulary.

    Data: `--task-arg train=PATH[,PATH...]` gives the training text and --data (or the default corpus) the
    test text. Without `train`, the files of --data (or of the default corpus) are one text: the last 10 % of
    its characters, from the next line start on, are the test text, the rest trains the model. The trigram
    model is fit once: order `n=3`, `k` tuned on the last 10 % of the training lines, `min_count=1`, unless
    `--task-arg n=`, `k=`, `min_count=` say otherwise. Metrics: trigram_word_perplexity,
    llm_word_perplexity, llm_bits_per_byte (exact text, like `perplexity`), oov_rate and k (the k used).
    """

    name = "ngram"
    kind = "rolling"
    higher_is_better = {"llm_word_perplexity": False, "trigram_word_perplexity": False,
                        "llm_bits_per_byte": False}
    main_metric = "llm_word_perplexity"
    ARGS = ("train", "k", "n", "min_count", "chunk_chars", "window", "stride")
    description = "the course's trigram add-k baseline vs the LLM: per-word perplexity, same held-out text"
    task_args = {**PerplexityTask.task_args,
                 "train": "training text files, comma-separated (default: a 90 % / 10 % split)",
                 "k": "add-k smoothing (default: tuned on a validation slice)", "n": "n-gram order (3)",
                 "min_count": "words seen fewer times become <unk> (1)"}

    def __init__(self, opts: TaskOptions | None = None):
        super().__init__(opts)
        o = self.opts
        check_args(o, self.name, self.ARGS, INT_ARGS)
        raw_k = o.extra.get("k")
        try:
            self.k = None if raw_k is None else float(raw_k)
        except ValueError:
            self.k = -1.0
        if self.k is not None and not self.k > 0:
            raise LlmkitError(f"{self.name}: --task-arg k={raw_k} must be a number > 0 (add-k smoothing)")
        self.model: NGramModel | None = None
        split = ("trained on --task-arg train" if "train" in o.extra
                 else f"trained on the first {100 - 100 * HELD_OUT:g} % of the text, tested on the rest")
        self.description = (f"per-word perplexity of a trigram add-k model ({split}) and of the LLM on the "
                            f"same test text; {describe_data(o)}")

    def split(self) -> tuple[list[str], list[tuple[str, str]]]:
        """(training texts, (id, text) of each test document before chunking)."""
        files = text_files(self.opts, self.name)
        named = list(zip(file_ids(files), map(read_text, files)))
        if "train" in self.opts.extra:
            paths = [p for p in self.opts.extra["train"].split(",") if p]
            return [read_text(f) for f in corpus_files(paths)], named
        total = sum(len(t) for _, t in named)
        cut, seen = total - math.floor(total * HELD_OUT), 0
        for i, (name, text) in enumerate(named):
            off = cut - seen
            if off < len(text):  # the held-out part starts at the first line start at or after the cut
                at = 0 if off <= 0 else (text.find("\n", off - 1) + 1 or len(text))
                train = [t for _, t in named[:i]] + [text[:at]]
                test = [(name if at == 0 else f"{name}@{at}", text[at:]), *named[i + 1:]]
                if any(t.strip() for _, t in test) and any(t.strip() for t in train):
                    return train, test
                break
            seen += len(text)
        raise LlmkitError(f"{self.name}: the text is too short to hold out its last {100 * HELD_OUT:g} % on "
                          "a line of its own; give more text or the training text: --task-arg train=PATH")

    def docs(self) -> list[dict[str, Any]]:
        o = self.opts
        train, test = self.split()
        n, min_count = int_arg(o, "n", self.name, 1) or 3, int_arg(o, "min_count", self.name, 1) or 1
        self.model = model = NGramModel.fit(train, n=n, k=self.k, min_count=min_count)
        docs = documents(test, o, self.name)
        for d in docs:
            s = model.score(d["text"])
            d.update(trigram_nll=s.nll, words=s.tokens, word_tokens=s.words, oov=s.oov, k=model.k)
        return docs

    def requests(self, doc: dict[str, Any]) -> list[Request]:
        return [rolling_request(doc, self.opts, self.name)]

    def process(self, doc: dict[str, Any], answers: list[Answer]) -> Record:
        (r,) = answers
        m = {"trigram_nll": doc["trigram_nll"], "llm_nll": r.nll, "words": float(doc["words"]),
             "word_tokens": float(doc["word_tokens"]), "oov": float(doc["oov"]),
             "bytes": float(count_bytes(doc["text"])), "k": doc["k"]}
        data = {"chars": len(doc["text"]),
                "trigram_word_perplexity": math.exp(doc["trigram_nll"] / doc["words"]),
                "llm_word_perplexity": math.exp(r.nll / doc["words"])}
        return Record(doc["id"], m, data)

    def aggregate(self, records: Sequence[Record]) -> dict[str, tuple[float, float | None]]:
        tri, llm, words, word_tokens, oov, nbytes = (
            sum(r.metrics[m] for r in records)
            for m in ("trigram_nll", "llm_nll", "words", "word_tokens", "oov", "bytes"))
        return {"trigram_word_perplexity": (exp_ratio(tri, words), None),
                "llm_word_perplexity": (exp_ratio(llm, words), None),
                "llm_bits_per_byte": (ratio(llm, nbytes * LN2), None),
                "oov_rate": (ratio(oov, word_tokens), None),
                "k": (records[0].metrics["k"] if records else math.nan, None)}

"""What every evaluation task and backend agree on: requests, answers, tasks, records, the task registry.

A task turns its documents into backend requests and the answers back into per-item metrics:

    task = get_task("hellaswag", TaskOptions(shots=0))
    docs = task.docs()                                  # list of dicts, each with a unique "id"
    reqs = task.requests(doc)                           # list[Request] for one document
    record = task.process(doc, answers)                 # answers[i] answers reqs[i] -> Record
    metrics = task.aggregate(records)                   # {"acc": (mean, stderr), ...}

Three kinds of request, answered by every backend (llmkit.eval.backends):
- `loglikelihood`: log p(continuation | context) -> LogLikelihood(logprob, is_greedy, n_tokens). Context
  and continuation are text; the backend tokenizes them as lm-eval does (trailing spaces of the context move
  to the continuation; continuation ids = ids(context + continuation) minus the ids of the context).
- `generate`: a completion of `context` (raw text, no chat template), greedy unless temperature > 0, ending at
  a stop string (never included) or after max_tokens -> list of n strings.
- `rolling`: the log-likelihood of a whole text, every token scored (the first one given the BOS/EOS token) by
  sliding windows -> Rolling(nll, tokens): perplexity.

Notable choices
- Per-item metrics are plain floats; a task's aggregate is the mean with its standard error (sample standard
  deviation / sqrt(n), as lm-eval reports it) unless the task overrides `aggregate`.
- Documents carry a stable "id" (the resume cache and `--compare` match items by it).
- The benchmark tasks read ../shared/data; `--task-arg source=hub` (SOURCE_ARG, `data_source`) reads the HF
  hub datasets lm-eval reads instead (llmkit.eval.hub), and auto falls back to them when the files are absent.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from llmkit.errors import LlmkitError

Kind = Literal["loglikelihood", "generate", "rolling"]


@dataclass(frozen=True)
class Request:
    kind: Kind
    context: str  # the prompt (loglikelihood, generate) or the whole text (rolling)
    continuation: str = ""  # loglikelihood only
    max_tokens: int = 256  # generate only
    stop: tuple[str, ...] = ()  # generate only
    temperature: float = 0.0  # generate only: 0 = greedy
    n: int = 1  # generate only: samples
    seed: int | None = None  # generate only (sampling)
    window: int | None = None  # rolling only: tokens per window (None = the model's context)
    stride: int | None = None  # rolling only: None = window - 1 (every token scored once, lm-eval's rolling)


@dataclass(frozen=True)
class LogLikelihood:
    logprob: float  # sum over the continuation tokens (nats)
    is_greedy: bool  # every continuation token is the argmax
    n_tokens: int  # continuation tokens


@dataclass(frozen=True)
class Rolling:
    nll: float  # summed negative log-likelihood of every token of the text (nats)
    tokens: int  # scored tokens


Answer = LogLikelihood | list[str] | Rolling


@dataclass
class Record:
    """One evaluated document: its metrics (floats) and what a reader wants to see (JSON-able)."""

    id: str
    metrics: dict[str, float]
    data: dict[str, Any] = field(default_factory=dict)  # e.g. target, prediction, logprobs, response text


@dataclass
class TaskOptions:
    shots: int | None = None  # None = the task's default
    limit: int | None = None  # first N documents (after a seeded shuffle when `shuffle`)
    seed: int = 1234
    data: list[str] = field(default_factory=list)  # files / folders for tasks that read user data
    data_dir: Path | None = None  # the shared data folder (../shared/data); None = find it
    template: str | None = None  # generic tasks: a prompt template with {question} etc.
    extra: dict[str, str] = field(default_factory=dict)  # task-specific KEY=VALUE (`--task-arg`)


class Task:
    """Base class. Subclasses set `name`, `kind`, `description`, and implement docs/requests/process."""

    name: str = ""
    kind: Kind = "loglikelihood"
    description: str = ""
    higher_is_better: dict[str, bool] = {}  # metric -> direction (for tables and --compare)
    main_metric: str = "acc"
    task_args: dict[str, str] = {}  # `--task-arg KEY=VALUE` keys this task reads -> help

    def __init__(self, opts: TaskOptions | None = None):
        self.opts = opts or TaskOptions()
        if "source" in self.task_args:
            source_arg(self.opts, self.name)  # a bad value fails before any model loads

    def docs(self) -> list[dict[str, Any]]:
        raise NotImplementedError

    def requests(self, doc: dict[str, Any]) -> list[Request]:
        raise NotImplementedError

    def process(self, doc: dict[str, Any], answers: list[Answer]) -> Record:
        raise NotImplementedError

    def aggregate(self, records: Sequence[Record]) -> dict[str, tuple[float, float | None]]:
        """metric -> (value, standard error): means of the per-item metrics by default."""
        out: dict[str, tuple[float, float | None]] = {}
        for name in dict.fromkeys(k for r in records for k in r.metrics):
            xs = [r.metrics[name] for r in records if name in r.metrics]
            out[name] = mean_stderr(xs)
        return out

    def config(self) -> dict[str, Any]:
        """What identifies this task's prompts (stored in results.json and in the resume cache key)."""
        o = self.opts
        return {"task": self.name, "shots": o.shots, "limit": o.limit, "seed": o.seed, "data": list(o.data),
                "template": o.template, "extra": dict(o.extra)}


def mean_stderr(xs: Sequence[float]) -> tuple[float, float | None]:
    """Mean and standard error of the mean (sample standard deviation / sqrt(n)); stderr None when n < 2."""
    n = len(xs)
    if n == 0:
        return math.nan, None
    m = sum(xs) / n
    if n < 2:
        return m, None
    var = sum((x - m) ** 2 for x in xs) / (n - 1)
    return m, math.sqrt(var / n)


# ---------------------------------------------------------------------------------------- registry
TASKS: dict[str, Callable[[TaskOptions], Task]] = {}


def register(name: str):
    """Class decorator: make a Task subclass available as `llmkit eval --task NAME`."""

    def deco(cls):
        TASKS[name] = cls
        return cls

    return deco


def get_task(name: str, opts: TaskOptions | None = None) -> Task:
    from llmkit.eval import tasks  # noqa: F401  (registers the built-in tasks)

    if name not in TASKS:
        raise LlmkitError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name](opts or TaskOptions())


def data_dir(opts: TaskOptions | None = None) -> Path:
    """The shared data folder: opts.data_dir, else $LLMKIT_DATA, else ../shared/data beside the working
    folder or the repository."""
    if opts is not None and opts.data_dir is not None:
        return Path(opts.data_dir)
    env = os.environ.get("LLMKIT_DATA")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parents[2]  # the repository root (llmkit/eval/base.py)
    for base in (Path.cwd(), here):
        cand = base.parent / "shared" / "data"
        if cand.is_dir():
            return cand
    return Path.cwd().parent / "shared" / "data"


def shared_file(opts: TaskOptions | None, rel: str, task: str) -> Path:
    """A file under the shared data folder, or a one-line error saying where it was looked for."""
    p = data_dir(opts) / rel
    if not p.exists():
        raise LlmkitError(f"{task}: data not found at {p}; pass --data-dir DIR (the folder holding {rel}) "
                          "or set LLMKIT_DATA")
    return p


SOURCE_ARG = {"source": "auto (default: the ../shared data when present, else the HF hub), shared or hub "
                        "(the HF hub datasets lm-eval reads; needs `pip install datasets` and network)"}


def source_arg(opts: TaskOptions, task: str) -> str:
    """`--task-arg source`: auto (the default), shared or hub."""
    src = opts.extra.get("source", "auto")
    if src not in ("auto", "shared", "hub"):
        raise LlmkitError(f"{task}: --task-arg source={src!r}: use auto, shared or hub")
    return src


def data_source(opts: TaskOptions, rel: str, task: str) -> Literal["shared", "hub"]:
    """Where a task that takes `--task-arg source` reads its items: "shared" (the file or folder `rel` under
    the shared data folder) or "hub" (llmkit.eval.hub). auto = shared when `rel` exists, else the hub when
    `datasets` is installed, else a one-line error naming both ways."""
    src = source_arg(opts, task)
    if src == "hub":
        return "hub"
    p = data_dir(opts) / rel
    if p.exists():
        return "shared"
    from llmkit.eval import hub

    if src == "auto" and hub.available():
        return "hub"
    raise LlmkitError(f"{task}: data not found at {p}; pass --data-dir DIR (the folder holding {rel}) or set "
                      "LLMKIT_DATA, or --task-arg source=hub with `pip install datasets` and network")


def take(docs: list[dict[str, Any]], opts: TaskOptions) -> list[dict[str, Any]]:
    """The first `opts.limit` documents (all when None), in file order (lm-eval's --limit)."""
    if opts.limit is not None:
        if opts.limit < 1:
            raise LlmkitError(f"--limit must be >= 1, got {opts.limit}")
        return docs[: opts.limit]
    return docs


def read_jsonl(path: Path, task: str) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a .jsonl (or .jsonl.gz) file; a line that is not a
    JSON object, or an unreadable file, is a one-line error naming the file and line."""
    import gzip
    import json

    opener = gzip.open if path.suffix == ".gz" else open
    out = []
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise LlmkitError(f"{task}: {path}, line {no}: not valid JSON ({e.msg}); each line "
                                      "must be one JSON object") from None
                if not isinstance(obj, dict):
                    raise LlmkitError(f"{task}: {path}, line {no}: expected a JSON object, got "
                                      f"{type(obj).__name__}")
                out.append((no, obj))
    except OSError as e:
        raise LlmkitError(f"{task}: cannot read {path} ({e.strerror or e})") from None
    return out


def jsonl_files(opts: TaskOptions, task: str, example: str) -> list[Path]:
    """The files of --data (folders give their *.jsonl files, sorted); `example` shows one line's shape in
    the error when --data is missing."""
    if not opts.data:
        raise LlmkitError(f"{task}: no data given; pass --data FILE.jsonl (lines of {example}) or a folder "
                          "of such files")
    out: list[Path] = []
    for item in opts.data:
        p = Path(item).expanduser()
        if p.is_dir():
            found = sorted(p.glob("*.jsonl"))
            if not found:
                raise LlmkitError(f"{task}: no .jsonl file in {p}")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise LlmkitError(f"{task}: data file not found: {p}")
    return out

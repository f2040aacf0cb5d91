"""Multiple choice by log-likelihood: `hellaswag`, `mmlu`, `truthfulqa_mc1`/`_mc2` and the generic `mc`.

Every item becomes one context and one continuation per choice (`" " + choice`, lm-eval's target_delimiter);
the backend scores each continuation and the item's prediction is the best-scoring choice. Prompts and metrics
are those of lm-evaluation-harness 0.4.13 (its task YAMLs and utils.py), so the figures compare with lm-eval:

- acc: argmax of the summed log-probabilities (first index on ties, as numpy's argmax).
- acc_norm: argmax of logprob / len(choice) in characters, the choice WITHOUT the leading space (lm-eval's
  `completion_len`).
- truthfulqa_mc2 acc: the normalised probability mass of the true answers, exp(ll_i) / sum_j exp(ll_j) summed
  over the answers labelled 1 (lm-eval 0.4.13's process_results_mc2; computed with the max subtracted first,
  which is the same number without underflow).

Notable choices
- hellaswag: the shared file holds "activity label: ctx_a ctx_b" cleaned of WikiHow markers, but with ctx_b as
  in the dataset (lower case). lm-eval capitalises ctx_b (`str.capitalize`, which also lower-cases the rest of
  it), so the query is rebuilt: a lower-case fragment after the context's last sentence end is ctx_b (true of
  every ActivityNet item, where ctx_b is the start of the next sentence; WikiHow items have an empty ctx_b).
  lm-eval's `preprocess` then runs on the query and on every ending, as lm-eval does. Validation split only:
  0-shot (lm-eval draws hellaswag shots from the train split, which the shared data does not hold).
- mmlu: the test CSVs of ../shared/data/eval/mmlu (57 subjects, sorted by name); `--shots K` takes the first K
  dev questions of the same subject (lm-eval's first_n sampler), each followed by its answer letter.
  `--limit N` keeps the first N questions of EACH subject (as lm-eval's --limit does on the mmlu group).
  `--task-arg subjects=a,b` restricts the subjects. The aggregate reports acc (micro: every question weighs
  the same; it equals lm-eval's size-weighted `mmlu` group figure), acc_macro (the mean of the per-subject
  accuracies) and acc/<subject>.
- truthfulqa: the fixed 6-shot QA preamble of lm-eval's truthfulqa_mc1.yaml, 0-shot otherwise. The true
  answers are read from the labels, never from their position.
- mc: JSONL lines {"question", "choices", "answer"} (+ optional "context", "id") from --data files or folders;
  the prompt is ARC's "Question: {question}\\nAnswer:", with "{context}\\n" in front when a line has a
  context; --template overrides it (str.format with {question} and {context}). A bad line is a one-line error
  naming the file, the line and the field.
- `--task-arg source=hub` (hellaswag, mmlu, truthfulqa_mc1/mc2; auto = the ../shared files when present,
  else the hub) reads the HF hub datasets lm-eval reads (llmkit.eval.hub) into the same documents:
  hellaswag's query is then lm-eval's own formula on activity_label, ctx_a and ctx_b; mmlu's subjects are the
  57 configs of cais/mmlu; truthfulqa's choices and labels come as the lists of the `multiple_choice` config.
- Record.data holds the target (or the true labels), the prediction(s) and the per-choice log-probabilities
  (rounded to 1e-6).
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmkit.errors import LlmkitError
from llmkit.eval import hub
from llmkit.eval.base import (
    SOURCE_ARG,
    Answer,
    LogLikelihood,
    Record,
    Request,
    Task,
    TaskOptions,
    data_source,
    jsonl_files,
    mean_stderr,
    read_jsonl,
    register,
    shared_file,
    take,
)

TARGET_DELIMITER = " "  # lm-eval's default: between the context and every choice


def argmax(xs: Sequence[float]) -> int:
    """Index of the largest value, the first one on ties (numpy's argmax)."""
    best = 0
    for i, x in enumerate(xs):
        if x > xs[best]:
            best = i
    return best


class MultipleChoice(Task):
    """Base class: a subclass builds docs with "id", "choices" and "target" and says how to prompt one.

    `prompt(doc)` is the context; each choice is scored as the continuation " " + choice.
    """

    kind = "loglikelihood"
    metrics: tuple[str, ...] = ("acc", "acc_norm")  # which of acc / acc_norm the task reports
    higher_is_better = {"acc": True, "acc_norm": True}
    main_metric = "acc_norm"
    few_shot = False  # whether --shots K > 0 is supported

    def __init__(self, opts: TaskOptions | None = None):
        super().__init__(opts)
        shots = self.opts.shots
        if shots is not None and shots < 0:
            raise LlmkitError(f"{self.name}: --shots must be >= 0, got {shots}")
        if shots and not self.few_shot:
            raise LlmkitError(f"{self.name}: only 0-shot is supported (got --shots {shots}); "
                              f"run {self.name} without --shots")

    def prompt(self, doc: dict[str, Any]) -> str:
        raise NotImplementedError

    def requests(self, doc: dict[str, Any]) -> list[Request]:
        ctx = self.prompt(doc)
        return [Request("loglikelihood", ctx, TARGET_DELIMITER + c) for c in doc["choices"]]

    def process(self, doc: dict[str, Any], answers: list[Answer]) -> Record:
        lls = logprobs(answers, len(doc["choices"]), self.name, doc["id"])
        target = doc["target"]
        pred = argmax(lls)
        metrics = {"acc": float(pred == target)}
        data: dict[str, Any] = {"target": target, "pred": pred}
        if "acc_norm" in self.metrics:
            pred_norm = argmax([ll / len(c) for ll, c in zip(lls, doc["choices"])])
            metrics["acc_norm"] = float(pred_norm == target)
            data["pred_norm"] = pred_norm
        data["logprobs"] = [round(x, 6) for x in lls]
        return Record(doc["id"], metrics, data)


def logprobs(answers: Sequence[Answer], n: int, task: str, doc_id: str) -> list[float]:
    if len(answers) != n or not all(isinstance(a, LogLikelihood) for a in answers):
        raise LlmkitError(f"{task}: item {doc_id} expects {n} log-likelihood answers, got {len(answers)}")
    return [a.logprob for a in answers]  # type: ignore[union-attr]


# ------------------------------------------------------------------------------------------- hellaswag
def preprocess(text: str) -> str:
    """lm-eval's hellaswag `preprocess` (tasks/hellaswag/utils.py), verbatim."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


# the text after the last sentence end of a context (closing quotes/brackets may follow the stop)
_LAST_FRAGMENT = re.compile(r"[.!?][\"')\]]* ([^.!?]*)$")


def hellaswag_query(ctx: str) -> str:
    """lm-eval's query, preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize()), from the shared
    file's ctx (the same text with ctx_b not capitalised): ctx_b is a lower-case last fragment."""
    label, sep, body = ctx.partition(": ")
    if not sep:
        label, body = "", ctx
    m = _LAST_FRAGMENT.search(body)
    if m and m.group(1)[:1].islower():
        body = body[: m.start(1)] + m.group(1).capitalize()
    return preprocess(label + sep + body)


HELLASWAG_FILE = "eval/hellaswag/hellaswag_val.jsonl"


@register("hellaswag")
class HellaSwag(MultipleChoice):
    name = "hellaswag"
    description = "HellaSwag validation (10,042 items), 0-shot, lm-eval's prompt; acc and acc_norm"
    task_args = SOURCE_ARG

    def docs(self) -> list[dict[str, Any]]:
        if data_source(self.opts, HELLASWAG_FILE, self.name) == "hub":
            recs = hub.hellaswag_records(hub.load(hub.HELLASWAG, self.name), self.name)
            items = [(preprocess(r["query"]), r["endings"], r["label"]) for r in recs]
        else:
            items = self.read_shared()
        out = [{"id": str(i), "query": query, "choices": [preprocess(e) for e in endings], "target": label}
               for i, (query, endings, label) in enumerate(items)]
        return take(out, self.opts)

    def read_shared(self) -> list[tuple[str, list[str], int]]:
        """(lm-eval's query, endings, label) per line of the shared file."""
        path = shared_file(self.opts, HELLASWAG_FILE, self.name)
        out = []
        for lineno, rec in read_jsonl(path, self.name):
            try:
                ctx, endings, label = rec["ctx"], rec["endings"], int(rec["label"])
            except (KeyError, TypeError, ValueError) as e:
                raise LlmkitError(f"{self.name}: {path}, line {lineno}: needs ctx, endings, label "
                                  f"({type(e).__name__}: {e})") from e
            out.append((hellaswag_query(ctx), endings, label))
        return out

    def prompt(self, doc: dict[str, Any]) -> str:
        return doc["query"]


# ----------------------------------------------------------------------------------------------- mmlu
LETTERS = ("A", "B", "C", "D")


def read_mmlu_csv(path: Path, task: str = "mmlu") -> list[dict[str, Any]]:
    """Rows of an MMLU CSV (header question,choice0..3,answer) as {"question", "options", "answer"}."""
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        want = ["question", "choice0", "choice1", "choice2", "choice3", "answer"]
        if reader.fieldnames != want:
            raise LlmkitError(f"{task}: {path}: header must be {','.join(want)}, got {reader.fieldnames}")
        for row in reader:
            try:
                answer = int(row["answer"])
                if not 0 <= answer <= 3:
                    raise ValueError
            except (TypeError, ValueError) as e:
                raise LlmkitError(f"{task}: {path}, line {reader.line_num}: field 'answer' must be 0-3, "
                                  f"got {row['answer']!r}") from e
            rows.append({"question": row["question"], "options": [row[f"choice{i}"] for i in range(4)],
                         "answer": answer})
    return rows


def mmlu_description(subject: str) -> str:
    """lm-eval's mmlu task description (the head of every prompt)."""
    topic = subject.replace("_", " ")
    return f"The following are multiple choice questions (with answers) about {topic}.\n\n"


def mmlu_text(q: dict[str, Any]) -> str:
    """lm-eval's mmlu doc_to_text."""
    c = q["options"]
    return f"{q['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:"


@register("mmlu")
class MMLU(MultipleChoice):
    """MMLU test questions, k-shot from the dev split. --limit applies to each subject."""

    name = "mmlu"
    description = ("MMLU (57 subjects), 0-shot by default, --shots K from the dev split (first K); --limit "
                   "is per subject; --task-arg subjects=a,b; acc (micro), acc_macro, acc/<subject>")
    metrics = ("acc",)
    higher_is_better = {"acc": True, "acc_macro": True}  # and acc/<subject>
    main_metric = "acc"
    few_shot = True
    task_args = {"subjects": "comma-separated subjects (default: all 57)", **SOURCE_ARG}

    def __init__(self, opts: TaskOptions | None = None):
        super().__init__(opts)
        self._dev: dict[str, list[dict[str, Any]]] = {}
        self._source: str | None = None

    @property
    def source(self) -> str:
        """"shared" or "hub", chosen on first use (llmkit.eval.base.data_source)."""
        if self._source is None:
            self._source = data_source(self.opts, "eval/mmlu/test", self.name)
        return self._source

    @property
    def shots(self) -> int:
        return self.opts.shots or 0

    def folder(self, split: str) -> Path:
        return shared_file(self.opts, f"eval/mmlu/{split}", self.name)

    def subjects(self) -> list[str]:
        if self.source == "hub":
            known = sorted(hub.MMLU_SUBJECTS)
        else:
            known = sorted(p.name.removesuffix("_test.csv") for p in self.folder("test").glob("*_test.csv"))
        if not known:
            raise LlmkitError(f"mmlu: no <subject>_test.csv file in {self.folder('test')}")
        wanted = self.opts.extra.get("subjects")
        if not wanted:
            return known
        names = [s.strip() for s in wanted.split(",") if s.strip()]
        bad = [s for s in names if s not in known]
        if bad:
            raise LlmkitError(f"mmlu: unknown subject(s) {', '.join(bad)}; known: {', '.join(known)}")
        return list(dict.fromkeys(names))

    def docs(self) -> list[dict[str, Any]]:
        out = []
        for subject in self.subjects():
            rows = self.rows(subject, "test")
            for i, row in enumerate(rows):
                row.update(id=f"{subject}/{i}", subject=subject, choices=list(LETTERS), target=row["answer"])
            out += take(rows, self.opts)
        return out

    def rows(self, subject: str, split: str) -> list[dict[str, Any]]:
        """One subject's questions of the test or dev split, as read_mmlu_csv reads them."""
        if self.source == "hub":
            ds = hub.mmlu(subject, split)
            return hub.mmlu_records(hub.load(ds, self.name), ds, self.name)
        path = self.folder(split) / f"{subject}_{split}.csv"
        if split == "dev" and not path.is_file():
            raise LlmkitError(f"mmlu: --shots {self.shots} needs {subject}'s dev questions at {path}")
        return read_mmlu_csv(path)

    def dev(self, subject: str) -> list[dict[str, Any]]:
        if subject not in self._dev:
            rows = self.rows(subject, "dev")
            if len(rows) < self.shots:
                raise LlmkitError(f"mmlu: --shots {self.shots} but {subject} has {len(rows)} dev questions")
            self._dev[subject] = rows
        return self._dev[subject]

    def prompt(self, doc: dict[str, Any]) -> str:
        subject = doc["subject"]
        text = mmlu_description(subject)
        for s in self.dev(subject)[: self.shots] if self.shots else ():  # lm-eval's first_n sampler
            text += f"{mmlu_text(s)}{TARGET_DELIMITER}{LETTERS[s['answer']]}\n\n"
        return text + mmlu_text(doc)

    def aggregate(self, records: Sequence[Record]) -> dict[str, tuple[float, float | None]]:
        by_subject: dict[str, list[float]] = {}
        for r in records:
            by_subject.setdefault(r.id.rsplit("/", 1)[0], []).append(r.metrics["acc"])
        out = {"acc": mean_stderr([r.metrics["acc"] for r in records])}
        per = {s: mean_stderr(xs) for s, xs in sorted(by_subject.items())}
        if per:
            macro = sum(m for m, _ in per.values()) / len(per)
            ses = [se for _, se in per.values()]
            # the standard error of a mean of independent subject means
            se = None if None in ses else math.sqrt(sum(x * x for x in ses)) / len(per)  # type: ignore[misc]
            out["acc_macro"] = (macro, se)
        out.update({f"acc/{s}": v for s, v in per.items()})
        return out


# ----------------------------------------------------------------------------------------- truthfulqa
# lm-eval's truthfulqa_mc1.yaml doc_to_text: a fixed 6-shot QA preamble, then the question
TRUTHFULQA_PREAMBLE = (
    "Q: What is human life expectancy in the United States?\n"
    "A: Human life expectancy in the United States is 78 years.\n\n"
    "Q: Who was president of the United States in 1955?\n"
    "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
    "Q: Which party did he belong to?\n"
    "A: He belonged to the Republican Party.\n\n"
    "Q: What is the square root of banana?\n"
    "A: I have no comment.\n\n"
    "Q: How does a telescope work?\n"
    "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
    "Q: Where were the 1992 Olympics held?\n"
    "A: The 1992 Olympics were held in Barcelona, Spain."
)


def mc2_score(lls: Sequence[float], labels: Sequence[int]) -> float:
    """The probability mass of the true answers once the choices' probabilities are normalised to 1."""
    m = max(lls)
    probs = [math.exp(x - m) for x in lls]
    return sum(p for p, y in zip(probs, labels) if y == 1) / sum(probs)


TRUTHFULQA_FILE = "eval/truthfulqa/mc_task.json"


class TruthfulQA(MultipleChoice):
    targets = ""  # "mc1_targets" | "mc2_targets"
    metrics = ("acc",)
    higher_is_better = {"acc": True}
    main_metric = "acc"
    task_args = SOURCE_ARG

    def docs(self) -> list[dict[str, Any]]:
        if data_source(self.opts, TRUTHFULQA_FILE, self.name) == "hub":
            items = hub.truthfulqa_records(hub.load(hub.TRUTHFULQA, self.name), self.targets, self.name)
            where = f"hub dataset {hub.TRUTHFULQA}, row"
        else:
            path = shared_file(self.opts, TRUTHFULQA_FILE, self.name)
            items, where = self.read_shared(path), f"{path}, item"
        out = []
        for i, (question, choices, labels) in enumerate(items):
            if not choices or any(v not in (0, 1) for v in labels):
                raise LlmkitError(f"{self.name}: {where} {i}: {self.targets} needs answers labelled 1 (true) "
                                  "or 0 (false)")
            labels = [int(v) for v in labels]
            out.append({"id": str(i), "question": question, "choices": choices, "labels": labels})
            if self.targets == "mc1_targets":
                if labels.count(1) != 1:
                    raise LlmkitError(f"{self.name}: {where} {i}: mc1_targets needs exactly one true answer")
                out[-1]["target"] = labels.index(1)
        return take(out, self.opts)

    def read_shared(self, path: Path) -> list[tuple[str, list[str], list[int]]]:
        """(question, choices, labels) per item of the shared mc_task.json ({answer text: 1 | 0} dicts)."""
        try:
            items = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise LlmkitError(f"{self.name}: {path} is not valid JSON ({e.msg}, line {e.lineno})") from e
        out = []
        for i, item in enumerate(items):
            t = item.get(self.targets) if isinstance(item, dict) else None
            if not isinstance(t, dict) or not t or not isinstance(item.get("question"), str):
                raise LlmkitError(f"{self.name}: {path}, item {i}: needs a question and a {self.targets} "
                                  "dict (answer text -> 1 true / 0 false)")
            out.append((item["question"], list(t), list(t.values())))
        return out

    def prompt(self, doc: dict[str, Any]) -> str:
        return f"{TRUTHFULQA_PREAMBLE}\n\nQ: {doc['question']}\nA:"


@register("truthfulqa_mc1")
class TruthfulQAMC1(TruthfulQA):
    name = "truthfulqa_mc1"
    description = "TruthfulQA MC1 (817 questions, one true answer), lm-eval's 6-shot QA preamble; acc"
    targets = "mc1_targets"


@register("truthfulqa_mc2")
class TruthfulQAMC2(TruthfulQA):
    name = "truthfulqa_mc2"
    description = "TruthfulQA MC2 (817 questions): normalised probability mass on the true answers"
    targets = "mc2_targets"

    def process(self, doc: dict[str, Any], answers: list[Answer]) -> Record:
        lls = logprobs(answers, len(doc["choices"]), self.name, doc["id"])
        return Record(doc["id"], {"acc": mc2_score(lls, doc["labels"])},
                      {"labels": doc["labels"], "pred": argmax(lls), "logprobs": [round(x, 6) for x in lls]})


# ------------------------------------------------------------------------------------------ generic mc
ARC_TEMPLATE = "Question: {question}\nAnswer:"


@register("mc")
class GenericMC(MultipleChoice):
    name = "mc"
    description = ('multiple choice from your JSONL (--data): {"question", "choices", "answer"} (+ '
                   '"context", "id"); ARC\'s prompt "Question: ...\\nAnswer:" unless --template; '
                   'acc, acc_norm')

    def __init__(self, opts: TaskOptions | None = None):
        super().__init__(opts)
        if self.opts.template is not None:
            try:
                self.opts.template.format(question="", context="")
            except (KeyError, IndexError, ValueError) as e:
                raise LlmkitError(f"mc: bad --template {self.opts.template!r} ({type(e).__name__}: {e}); "
                                  "use the fields {question} and {context}, and {{ }} for braces") from e

    def files(self) -> list[Path]:
        return jsonl_files(self.opts, "mc", '{"question": str, "choices": [str, ...], "answer": int}')

    def docs(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        seen: dict[str, str] = {}
        for path in self.files():
            for lineno, rec in read_jsonl(path, self.name):
                doc = check_mc_record(rec, path, lineno)
                doc["id"] = str(rec["id"]) if "id" in rec else f"{path.name}:{lineno}"
                if doc["id"] in seen:
                    raise LlmkitError(f"mc: {path}, line {lineno}: field 'id': {doc['id']!r} already used at "
                                      f"{seen[doc['id']]}; ids must be unique")
                seen[doc["id"]] = f"{path}, line {lineno}"
                out.append(doc)
        return take(out, self.opts)

    def prompt(self, doc: dict[str, Any]) -> str:
        if self.opts.template is not None:
            return self.opts.template.format(question=doc["question"], context=doc["context"])
        text = ARC_TEMPLATE.format(question=doc["question"])
        return f"{doc['context']}\n{text}" if doc["context"] else text


def check_mc_record(rec: dict[str, Any], path: Path, lineno: int) -> dict[str, Any]:
    """{"question", "choices", "target", "context"} from one JSONL object, or a one-line error."""

    def bad(field: str, why: str) -> LlmkitError:
        return LlmkitError(f"mc: {path}, line {lineno}: field '{field}' {why}")

    q, choices, answer = rec.get("question"), rec.get("choices"), rec.get("answer")
    if not isinstance(q, str):
        raise bad("question", "must be a string" if "question" in rec else "is missing")
    if "choices" not in rec:
        raise bad("choices", "is missing")
    ok = isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) and c for c in choices)
    if not ok:
        raise bad("choices", "must be a list of at least 2 non-empty strings")
    if isinstance(answer, bool) or not isinstance(answer, int):
        raise bad("answer", "must be an integer index into choices" if "answer" in rec else "is missing")
    if not 0 <= answer < len(choices):
        raise bad("answer", f"must be between 0 and {len(choices) - 1} (an index into choices), got {answer}")
    context = rec.get("context", "")
    if not isinstance(context, str):
        raise bad("context", "must be a string")
    if "id" in rec and (isinstance(rec["id"], bool) or not isinstance(rec["id"], str | int)):
        raise bad("id", "must be a string or an integer")
    return {"question": q, "choices": choices, "target": answer, "context": context}

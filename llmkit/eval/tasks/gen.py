"""Generative tasks: the model writes an answer, a metric checks it. gsm8k, gsm8k_cot, mgsm_fr, qa, humaneval.

Each reproduces lm-eval 0.4.13's task of the same name (its YAML under lm_eval/tasks/): prompt, stop strings,
answer extraction (its `regex` filter) and metric (its `exact_match`, HF evaluate's rules); the tests check
the prompts, filters and metric against lm-eval's own code.

- gsm8k (gsm8k.yaml): "Question: {q}\\nAnswer:", 5-shot from the train split with the full worked answer as
  target (shots joined by "\\n\\n"), stop at "Question:", "</s>", "<|im_end|>" (the YAML has no "\\n\\n" stop,
  so neither do we), 256 new tokens. Metrics `exact_match,strict-match` ("#### N") and
  `exact_match,flexible-extract` (the last number-like string), both after the YAML's ignore rules.
- gsm8k_cot (gsm8k-cot.yaml): lm-eval's 8 fixed chain-of-thought exemplars, "Q: ...\\nA: ... The answer is
  N.", stop at "Q:"; strict = "The answer is N.", flexible as gsm8k.
- mgsm_fr (mgsm/direct/mgsm_direct_fr.yaml): "Question : {q}\\nRéponse :", 0-shot (../shared holds MGSM's test
  split only), stop at "Question :"; metrics `exact_match,remove_whitespace` (the whole stripped answer) and
  `exact_match,flexible-extract` (the last number), ignoring case and punctuation.
- qa: any JSONL of {"question", "answer"} (`--data`; optional "id"), "Question: {question}\\nAnswer:" or
  `--template`, greedy, stop at "\\n\\n" and "Question:". exact_match: when the answer is a number, the last
  number of the response (commas removed) within 1e-6; else the first line of the response equals the answer
  after SQuAD's normalisation (lowercase, no punctuation, no articles a/an/the, single spaces).
- humaneval (humaneval.yaml): the problem's prompt as is, stop at "\\nclass", "\\ndef", "\\n#", "\\nif",
  "\\nprint"; the program prompt + completion + "\\n" + test + "\\ncheck(entry_point)" runs in
  llmkit.eval.sandbox (never in this process). Greedy pass@1 by default; `--task-arg n=10 temperature=0.8`
  samples n completions per problem and reports the unbiased pass@1 and pass@10 (pass@k for k in 1, 10, 100
  up to n).

Task arguments (`--task-arg KEY=VALUE`; each task reads its own keys and ignores the others, so one run can
hold several tasks): max_tokens (all); n, temperature, timeout (seconds per program, default 10), workers
(parallel sandboxes) for humaneval; source=auto|shared|hub (gsm8k, gsm8k_cot, mgsm_fr, humaneval: the
../shared files, or the HF hub datasets lm-eval reads, llmkit.eval.hub; auto = shared when present). From
the hub, gsm8k's shots come from the hub's train split and mgsm_fr's target is `answer_number`.

Notable choices
- Few-shot examples are drawn as lm-eval draws them: one random.Random(--seed, default 1234) for the task,
  `sample(pool, k)` per document in file order (`k + 1` and the document itself removed when the pool is the
  evaluated set, as for qa). Document i gets the i-th draw whatever --limit, chunking or resuming do, so the
  prompts are lm-eval's for the same seed.
- humaneval's default is 512 new tokens (lm-eval: 1024; `--task-arg max_tokens=1024` restores it): the stop
  strings end almost every completion far earlier and a runaway one costs half as much. The sandbox timeout
  is 10 s per program (HF code_eval, which lm-eval calls: 3 s) so a loaded machine does not fail slow but
  correct code.
- Record.data holds the prompt's tail, the response, what was extracted, the target and whether it passed.
"""

from __future__ import annotations

import math
import os
import random
import re
import string
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from llmkit.errors import LlmkitError
from llmkit.eval import hub
from llmkit.eval.base import (
    SOURCE_ARG,
    Answer,
    Record,
    Request,
    Task,
    TaskOptions,
    data_source,
    jsonl_files,
    read_jsonl,
    register,
    shared_file,
    take,
)
from llmkit.eval.sandbox import pass_at_k, run_code

PROMPT_TAIL = 240  # characters of the prompt kept in Record.data

# ------------------------------------------------------------------------- lm-eval's filters and metric
FALLBACK = "[invalid]"
GSM8K_STRICT = r"#### (\-?[0-9\.\,]+)"
GSM8K_COT_STRICT = r"The answer is (\-?[0-9\.\,]+)."
FLEXIBLE = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"
GSM8K_IGNORE = (",", "\\$", "(?s).*#### ", "\\.$")


def regex_extract(text: str, pattern: str, group_select: int = 0, fallback: str = FALLBACK) -> str:
    """lm-eval's `regex` filter on one response: the group_select-th match (for a pattern with groups, its
    first non-empty group), stripped; `fallback` when nothing matches."""
    found = re.findall(pattern, text)
    if not found:
        return fallback
    m = found[group_select]
    if isinstance(m, tuple):
        m = next((g for g in m if g), fallback)
    return m.strip()


def exact_match(prediction: str, reference: str, *, ignore: tuple[str, ...] = (), ignore_case: bool = False,
                ignore_punctuation: bool = False) -> bool:
    """lm-eval's `exact_match` (HF evaluate's): delete each `ignore` regex from both, then lowercase and drop
    ASCII punctuation when asked, then compare."""
    for pattern in ignore:
        prediction, reference = re.sub(pattern, "", prediction), re.sub(pattern, "", reference)
    if ignore_case:
        prediction, reference = prediction.lower(), reference.lower()
    if ignore_punctuation:
        table = str.maketrans("", "", string.punctuation)
        prediction, reference = prediction.translate(table), reference.translate(table)
    return prediction == reference


# ------------------------------------------------------------------------------------------- helpers
def check_fields(task: str, path: Path, no: int, row: dict[str, Any],
                 **kinds: type | tuple[type, ...]) -> None:
    """A one-line error naming file, line and field when a field is missing or of another type (a number
    field is int or float, never a boolean)."""
    for field, kind in kinds.items():
        value = row.get(field)
        kind = kind if isinstance(kind, tuple) else (kind,)
        if not isinstance(value, kind) or isinstance(value, bool):
            words = {str: "a string", int: "a number", float: "a number"}
            names = " or ".join(dict.fromkeys(words.get(k, k.__name__) for k in kind))
            raise LlmkitError(f"{task}: {path}, line {no}: field {field!r} missing or not {names}")


def fewshot_draws(n_docs: int, pool: int, k: int, seed: int, *, same_pool: bool) -> list[list[int]]:
    """Indices into the pool of the few-shot examples of each document, drawn as lm-eval's ContextSampler
    draws them (one Random(seed), one `sample` per document in order; k + 1 minus the document itself when
    the pool is the evaluated set)."""
    need = k + 1 if same_pool else k
    if k <= 0:
        return [[] for _ in range(n_docs)]
    if need > pool:
        raise LlmkitError(f"--shots {k} needs {need} documents to draw from, only {pool} available")
    rnd = random.Random(seed)
    if not same_pool:
        return [rnd.sample(range(pool), k) for _ in range(n_docs)]
    return [[j for j in rnd.sample(range(pool), need) if j != i][:k] for i in range(n_docs)]


def tail(text: str, n: int = PROMPT_TAIL) -> str:
    return text if len(text) <= n else "…" + text[-n:]


class GenTask(Task):
    """A generation task: one `generate` request per document; subclasses build the prompt and judge."""

    kind = "generate"
    default_shots = 0
    max_shots: int | None = None
    default_max_tokens = 256
    stop: tuple[str, ...] = ()
    task_args: dict[str, str] = {"max_tokens": "new tokens per answer"}

    def __init__(self, opts: TaskOptions | None = None):
        super().__init__(opts)
        self.shots = self.default_shots if self.opts.shots is None else self.opts.shots
        if self.shots < 0 or (self.max_shots is not None and self.shots > self.max_shots):
            top = f"0..{self.max_shots}" if self.max_shots is not None else ">= 0"
            raise LlmkitError(f"{self.name}: --shots must be {top}, got {self.shots}")
        self.max_tokens = self.arg("max_tokens", int, self.default_max_tokens, low=1)
        self._all: list[dict[str, Any]] | None = None
        self._prompts: dict[str, str] = {}

    def arg(self, key: str, cast: type, default: Any, *, low: float | None = None) -> Any:
        """A `--task-arg KEY=VALUE` of this task, converted, or the default."""
        raw = self.opts.extra.get(key)
        if raw is None:
            return default
        try:
            value = cast(raw)
        except ValueError:
            raise LlmkitError(f"{self.name}: --task-arg {key}={raw!r} is not a valid "
                              f"{cast.__name__}") from None
        if low is not None and value < low:
            raise LlmkitError(f"{self.name}: --task-arg {key} must be >= {low}, got {raw}")
        return value

    # subclasses: load() -> every document in file order (dicts with a unique "id"); prompt(doc) -> text
    def load(self) -> list[dict[str, Any]]:
        raise NotImplementedError

    def prompt(self, doc: dict[str, Any]) -> str:
        raise NotImplementedError

    def all_docs(self) -> list[dict[str, Any]]:
        if self._all is None:
            self._all = self.load()
        return self._all

    def docs(self) -> list[dict[str, Any]]:
        return take(self.all_docs(), self.opts)

    def context(self, doc: dict[str, Any]) -> str:
        key = str(doc["id"])
        if key not in self._prompts:
            self._prompts[key] = self.prompt(doc)
        return self._prompts[key]

    def requests(self, doc: dict[str, Any]) -> list[Request]:
        return [Request("generate", self.context(doc), max_tokens=self.max_tokens, stop=self.stop)]

    def config(self) -> dict[str, Any]:
        return {**super().config(), "shots": self.shots, "max_tokens": self.max_tokens}


def _response(answers: list[Answer]) -> str:
    texts = answers[0] if answers else []
    if not isinstance(texts, list):
        raise LlmkitError(f"a generation task got a {type(texts).__name__} answer instead of completions")
    return texts[0] if texts else ""


# --------------------------------------------------------------------------------------------- gsm8k
GSM8K_COT_EXEMPLARS: tuple[tuple[str, str], ...] = (  # lm-eval gsm8k-cot.yaml fewshot_config.samples
    ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they "
     "are done, there will be 21 trees. How many trees did the grove workers plant today?",
     "There are 15 trees originally. Then there were 21 trees after some more were planted. So there "
     "must have been 21 - 15 = 6. The answer is 6."),
    ("If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking"
     " lot?",
     "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5."),
    ("Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left"
     " in total?",
     "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After"
     " eating 35, they had 74 - 35 = 39. The answer is 39."),
    ("Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many "
     "lollipops did Jason give to Denny?",
     "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20"
     " - 12 = 8. The answer is 8."),
    ("Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys "
     "does he have now?",
     "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more "
     "toys. 5 + 4 = 9. The answer is 9."),
    ("There were nine computers in the server room. Five more computers were installed each day, from"
     " monday to thursday. How many computers are now in the server room?",
     "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = "
     "20 computers were added. 9 + 20 is 29. The answer is 29."),
    ("Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How"
     " many golf balls did he have at the end of wednesday?",
     "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After "
     "losing 2 more, he had 35 - 2 = 33 golf balls. The answer is 33."),
    ("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
     "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - "
     "15 dollars left. 23 - 15 is 8. The answer is 8."),
)


@register("gsm8k")
class GSM8K(GenTask):
    name = "gsm8k"
    description = "grade-school math word problems, exact match of the final number (lm-eval gsm8k)"
    main_metric = "exact_match,strict-match"
    higher_is_better = {"exact_match,strict-match": True, "exact_match,flexible-extract": True}
    default_shots = 5
    stop = ("Question:", "</s>", "<|im_end|>")
    strict = GSM8K_STRICT
    task_args = {**GenTask.task_args, **SOURCE_ARG}
    _examples: list[tuple[list[str], list[str]]] | None = None
    _source: str | None = None

    def load(self) -> list[dict[str, Any]]:
        return [{"id": f"gsm8k-{i:04d}", "index": i, "question": d["question"], "answer": d["answer"]}
                for i, d in enumerate(self.read("test"))]

    def read(self, split: str) -> list[dict[str, Any]]:
        """The test or train split as {"question", "answer"} rows, from the source the test split chose."""
        if self._source is None:
            self._source = data_source(self.opts, "eval/gsm8k_test.jsonl", self.name)
        if self._source == "hub":
            ds = hub.gsm8k(split)
            return hub.gsm8k_records(hub.load(ds, self.name), ds, self.name)
        path = shared_file(self.opts, f"eval/gsm8k_{split}.jsonl", self.name)
        rows = read_jsonl(path, self.name)
        for no, d in rows:
            check_fields(self.name, path, no, d, question=str, answer=str)
        return [d for _, d in rows]

    def target(self, doc: dict[str, Any]) -> str:
        return doc["answer"]  # the full worked answer: the ignore rules cut everything up to "#### "

    def examples(self) -> list[tuple[list[str], list[str]]]:
        """Per document (file order): the few-shot questions and targets."""
        train = self.read("train")
        draws = fewshot_draws(len(self.all_docs()), len(train), self.shots, self.opts.seed, same_pool=False)
        return [([train[j]["question"] for j in js], [train[j]["answer"] for j in js]) for js in draws]

    def turn(self, question: str) -> str:
        return f"Question: {question}\nAnswer:"

    def prompt(self, doc: dict[str, Any]) -> str:
        if not self.shots:
            return self.turn(doc["question"])
        if self._examples is None:
            self._examples = self.examples()
        qs, ts = self._examples[doc["index"]]
        return "".join(f"{self.turn(q)} {t}\n\n" for q, t in zip(qs, ts)) + self.turn(doc["question"])

    def process(self, doc: dict[str, Any], answers: list[Answer]) -> Record:
        response = _response(answers)
        target = self.target(doc)
        got = {"strict-match": regex_extract(response, self.strict),
               "flexible-extract": regex_extract(response, FLEXIBLE, -1)}
        metrics = {f"exact_match,{k}": float(exact_match(v, target, ignore=GSM8K_IGNORE, ignore_case=True))
                   for k, v in got.items()}
        return Record(str(doc["id"]), metrics, {
            "prompt": tail(self.context(doc)), "response": response, "extracted": got,
            "target": re.sub("(?s).*#### ", "", target), "correct": metrics[self.main_metric] == 1.0})


@register("gsm8k_cot")
class GSM8KCoT(GSM8K):
    name = "gsm8k_cot"
    description = "gsm8k with lm-eval's 8 chain-of-thought exemplars (Q: ... A: ... The answer is N.)"
    default_shots = 8
    max_shots = len(GSM8K_COT_EXEMPLARS)
    stop = ("Q:", "</s>", "<|im_end|>")
    strict = GSM8K_COT_STRICT

    def target(self, doc: dict[str, Any]) -> str:
        return doc["answer"].split("####")[-1].strip()

    def turn(self, question: str) -> str:
        return f"Q: {question}\nA:"

    def examples(self) -> list[tuple[list[str], list[str]]]:
        chosen = GSM8K_COT_EXEMPLARS[: self.shots]  # lm-eval's first_n sampler: the same ones for every item
        pair = ([q for q, _ in chosen], [t for _, t in chosen])
        return [pair] * len(self.all_docs())


# ------------------------------------------------------------------------------------------- mgsm_fr
@register("mgsm_fr")
class MGSMFr(GenTask):
    name = "mgsm_fr"
    description = "MGSM in French, direct answer, exact match of the number (lm-eval mgsm_direct_fr)"
    main_metric = "exact_match,flexible-extract"
    higher_is_better = {"exact_match,remove_whitespace": True, "exact_match,flexible-extract": True}
    max_shots = 0
    stop = ("Question :", "</s>", "<|im_end|>")
    task_args = {**GenTask.task_args, **SOURCE_ARG}

    def load(self) -> list[dict[str, Any]]:
        if data_source(self.opts, "eval/mgsm_fr.jsonl", self.name) == "hub":
            rows = hub.mgsm_records(hub.load(hub.MGSM_FR, self.name), self.name)
            return [{"id": f"mgsm-fr-{i:03d}", **d} for i, d in enumerate(rows)]
        path = shared_file(self.opts, "eval/mgsm_fr.jsonl", self.name)
        docs = []
        for no, d in read_jsonl(path, self.name):
            check_fields(self.name, path, no, d, question=str, answer=(int, float))
            docs.append({"id": str(d.get("id", f"mgsm-fr-{no - 1:03d}")), "question": d["question"],
                         "answer": d["answer"]})
        return docs

    def prompt(self, doc: dict[str, Any]) -> str:
        return f"Question : {doc['question']}\nRéponse :"

    def process(self, doc: dict[str, Any], answers: list[Answer]) -> Record:
        response = _response(answers)
        a = doc["answer"]
        target = str(int(a)) if float(a).is_integer() else str(a)  # lm-eval: answer_number|string
        got = {"remove_whitespace": response.strip(),
               "flexible-extract": regex_extract(response, FLEXIBLE, -1)}
        metrics = {f"exact_match,{k}": float(exact_match(v, target, ignore_case=True,
                                                         ignore_punctuation=True)) for k, v in got.items()}
        return Record(str(doc["id"]), metrics, {
            "prompt": tail(self.context(doc)), "response": response, "extracted": got, "target": target,
            "correct": metrics[self.main_metric] == 1.0})


# ------------------------------------------------------------------------------------------------ qa
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_PLAIN_NUMBER = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)")


def as_number(value: Any) -> float | None:
    """The answer as a number when it is one (JSON number, or a string like "1,234.5" / "$12"), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value) if math.isfinite(value) else None
    text = str(value).strip().replace(",", "").replace("$", "")
    return float(text) if _PLAIN_NUMBER.fullmatch(text) else None


def last_number(text: str) -> float | None:
    found = _NUMBER.findall(text)
    if not found:
        return None
    digits = found[-1].replace(",", "")
    try:
        return float(digits)
    except ValueError:
        return None


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lowercase, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def qa_match(response: str, answer: Any) -> tuple[bool, str]:
    """(correct, what was compared): numeric when the answer is a number, else the normalised first line."""
    want = as_number(answer)
    if want is not None:
        got = last_number(response)
        shown = "" if got is None else str(int(got)) if got.is_integer() else repr(got)
        return (got is not None and abs(got - want) <= 1e-6), shown
    first = next((line for line in response.splitlines() if line.strip()), "")
    got_s = normalize_answer(first)
    return got_s == normalize_answer(str(answer)), got_s


@register("qa")
class QA(GenTask):
    name = "qa"
    description = "your own question/answer JSONL (--data), numeric or normalised string exact match"
    main_metric = "exact_match"
    higher_is_better = {"exact_match": True}
    stop = ("\n\n", "Question:")
    _draws: list[list[int]] | None = None

    def files(self) -> list[Path]:
        return jsonl_files(self.opts, "qa", '{"question": ..., "answer": ...}')

    def load(self) -> list[dict[str, Any]]:
        files = self.files()
        docs, seen = [], {}
        for path in files:
            for no, d in read_jsonl(path, self.name):
                where = f"qa: {path}, line {no}"
                check_fields(self.name, path, no, d, question=str, answer=(str, int, float))
                q, a = d["question"], d["answer"]
                if not q.strip():
                    raise LlmkitError(f"{where}: field 'question' is empty")
                ident = str(d["id"]) if d.get("id") is not None else f"{path.stem}:{no}"
                if len(files) > 1 and d.get("id") is not None:
                    ident = f"{path.stem}:{ident}"
                if ident in seen:
                    raise LlmkitError(f"{where}: field 'id' {ident!r} repeats line {seen[ident]}; ids "
                                      "must be unique")
                seen[ident] = no
                docs.append({**d, "id": ident, "index": len(docs), "question": q, "answer": a})
        if not docs:
            raise LlmkitError(f"qa: no records in {', '.join(map(str, files))}")
        return docs

    def turn(self, doc: dict[str, Any]) -> str:
        template = self.opts.template or "Question: {question}\nAnswer:"
        try:
            return template.format_map(doc)
        except KeyError as e:
            fields = ", ".join(k for k in doc if k != "index")
            raise LlmkitError(f"qa: --template uses {{{e.args[0]}}}, which record {doc['id']} lacks; its "
                              f"fields: {fields}") from None
        except (ValueError, IndexError) as e:
            raise LlmkitError(f"qa: --template {template!r} is not a valid format string ({e})") from None

    def prompt(self, doc: dict[str, Any]) -> str:
        if not self.shots:
            return self.turn(doc)
        pool = self.all_docs()
        if self._draws is None:
            self._draws = fewshot_draws(len(pool), len(pool), self.shots, self.opts.seed, same_pool=True)
        shots = [pool[j] for j in self._draws[doc["index"]]]
        return "".join(f"{self.turn(s)} {s['answer']}\n\n" for s in shots) + self.turn(doc)

    def process(self, doc: dict[str, Any], answers: list[Answer]) -> Record:
        response = _response(answers)
        ok, got = qa_match(response, doc["answer"])
        return Record(str(doc["id"]), {"exact_match": float(ok)}, {
            "prompt": tail(self.context(doc)), "response": response, "extracted": got,
            "target": doc["answer"], "correct": ok})


# ----------------------------------------------------------------------------------------- humaneval
@register("humaneval")
class HumanEval(GenTask):
    name = "humaneval"
    description = "Python function completion, pass@k by running the tests in a sandbox (lm-eval humaneval)"
    main_metric = "pass@1"
    default_max_tokens = 512
    max_shots = 0
    stop = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
    task_args = {**GenTask.task_args, "n": "completions per problem (pass@k for k <= n)",
                 "temperature": "sampling temperature (needed when n > 1)",
                 "timeout": "seconds per program in the sandbox", "workers": "sandboxes run at once",
                 **SOURCE_ARG}

    def __init__(self, opts: TaskOptions | None = None):
        super().__init__(opts)
        self.n = self.arg("n", int, 1, low=1)
        self.temperature = self.arg("temperature", float, 0.0, low=0.0)
        self.timeout = self.arg("timeout", float, 10.0, low=0.1)
        self.workers = self.arg("workers", int, min(self.n, os.cpu_count() or 1, 8), low=1)
        if self.n > 1 and self.temperature == 0:
            raise LlmkitError("humaneval: n > 1 completions need sampling; add --task-arg temperature=0.8 "
                              "(or another value > 0)")
        self.ks = [k for k in (1, 10, 100) if k <= self.n]
        self.higher_is_better = {f"pass@{k}": True for k in self.ks}

    def load(self) -> list[dict[str, Any]]:
        if data_source(self.opts, "eval/humaneval/HumanEval.jsonl.gz", self.name) == "hub":
            rows = hub.humaneval_records(hub.load(hub.HUMANEVAL, self.name), self.name)
            return [{"id": d["task_id"], **d} for d in rows]
        path = shared_file(self.opts, "eval/humaneval/HumanEval.jsonl.gz", self.name)
        docs = []
        for no, d in read_jsonl(path, self.name):
            check_fields(self.name, path, no, d, task_id=str, prompt=str, test=str, entry_point=str)
            docs.append({"id": d["task_id"], **d})
        return docs

    def prompt(self, doc: dict[str, Any]) -> str:
        return doc["prompt"]

    def requests(self, doc: dict[str, Any]) -> list[Request]:
        return [Request("generate", doc["prompt"], max_tokens=self.max_tokens, stop=self.stop,
                        temperature=self.temperature, n=self.n,
                        seed=self.opts.seed if self.temperature > 0 else None)]

    def config(self) -> dict[str, Any]:
        return {**super().config(), "n": self.n, "temperature": self.temperature, "timeout": self.timeout}

    @staticmethod
    def program(doc: dict[str, Any], completion: str) -> str:
        """What HF code_eval runs for lm-eval: the prompt + completion, then the tests and the check call."""
        return doc["prompt"] + completion + "\n" + doc["test"] + "\n" + f"check({doc['entry_point']})" + "\n"

    def process(self, doc: dict[str, Any], answers: list[Answer]) -> Record:
        completions = answers[0] if answers else []
        if not isinstance(completions, list):
            raise LlmkitError(f"humaneval got a {type(completions).__name__} answer instead of completions")
        programs = [self.program(doc, c) for c in completions]
        if len(programs) > 1 and self.workers > 1:
            with ThreadPoolExecutor(min(self.workers, len(programs))) as pool:
                results = list(pool.map(lambda p: run_code(p, timeout=self.timeout), programs))
        else:
            results = [run_code(p, timeout=self.timeout) for p in programs]
        n, c = len(results), sum(r.passed for r in results)
        metrics = {f"pass@{k}": pass_at_k(n, c, k) if k <= n else 0.0 for k in self.ks}
        first_fail = next((r for r in results if not r.passed), None)
        return Record(str(doc["id"]), metrics, {
            "prompt": tail(doc["prompt"]), "response": completions[0] if completions else "",
            "passed": [r.passed for r in results], "status": [r.status for r in results],
            "detail": (first_fail.detail.strip().splitlines() or [""])[-1][:300] if first_fail else "",
            "correct": c > 0 and results[0].passed})

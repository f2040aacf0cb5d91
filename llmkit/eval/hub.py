"""The optional online source of the benchmark tasks: the HF hub datasets lm-eval reads, through `datasets`.

`--task-arg source=auto|shared|hub` picks where a built-in task (hellaswag, mmlu, truthfulqa_mc1/mc2, gsm8k,
gsm8k_cot, mgsm_fr, humaneval) reads its items: `shared` = the files under ../shared/data (the default when
they exist), `hub` = the dataset lm-eval 0.4.13 names in its task YAML (`dataset_path`, `dataset_name`,
split), downloaded and cached by `datasets` (`pip install datasets`, network on first use).
llmkit.eval.base.data_source makes the choice; the tasks turn the rows below into the same documents as
from the shared files.

Here: `available()`, `load_rows(path, name, split)` (rows as plain dicts) and one converter per hub schema
into the record the task builds its documents from (the shared file's record, or for hellaswag the raw query).

Notable choices
- `datasets` is imported only when a hub row is needed: the package is optional, and importing it is slow.
- Every failure of `load_dataset` (offline, unknown dataset, a removed loading script) is one line naming the
  dataset and pointing at the ../shared data; a row without a field this module reads is one line naming the
  dataset, the row and the field (the hub schema changed).
- Nothing is cached here: `datasets` keeps its own disk cache, and the tasks keep the rows they loaded.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from typing import Any

from llmkit.errors import LlmkitError


@dataclass(frozen=True)
class HubDataset:
    path: str  # lm-eval's dataset_path
    name: str | None  # lm-eval's dataset_name (the config)
    split: str

    def __str__(self) -> str:
        return self.path + (f" ({self.name})" if self.name else "") + f", split {self.split}"


# lm-eval 0.4.13's task YAMLs (hellaswag.yaml, mmlu/default/*, truthfulqa_mc1.yaml, gsm8k.yaml, mgsm/direct,
# humaneval.yaml)
HELLASWAG = HubDataset("Rowan/hellaswag", None, "validation")
TRUTHFULQA = HubDataset("truthfulqa/truthful_qa", "multiple_choice", "validation")
GSM8K_PATH, GSM8K_NAME = "openai/gsm8k", "main"  # splits test (evaluated) and train (few-shot)
MGSM_FR = HubDataset("juletxara/mgsm", "fr", "test")
HUMANEVAL = HubDataset("openai/openai_humaneval", None, "test")
MMLU_PATH = "cais/mmlu"  # one config per subject; splits test (evaluated) and dev (few-shot)
MMLU_SUBJECTS = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge", "college_biology",
    "college_chemistry", "college_computer_science", "college_mathematics", "college_medicine",
    "college_physics", "computer_security", "conceptual_physics", "econometrics", "electrical_engineering",
    "elementary_mathematics", "formal_logic", "global_facts", "high_school_biology", "high_school_chemistry",
    "high_school_computer_science", "high_school_european_history", "high_school_geography",
    "high_school_government_and_politics", "high_school_macroeconomics", "high_school_mathematics",
    "high_school_microeconomics", "high_school_physics", "high_school_psychology", "high_school_statistics",
    "high_school_us_history", "high_school_world_history", "human_aging", "human_sexuality",
    "international_law", "jurisprudence", "logical_fallacies", "machine_learning", "management", "marketing",
    "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition", "philosophy",
    "prehistory", "professional_accounting", "professional_law", "professional_medicine",
    "professional_psychology", "public_relations", "security_studies", "sociology", "us_foreign_policy",
    "virology", "world_religions",
)


def gsm8k(split: str) -> HubDataset:
    return HubDataset(GSM8K_PATH, GSM8K_NAME, split)


def mmlu(subject: str, split: str) -> HubDataset:
    return HubDataset(MMLU_PATH, subject, split)


# ------------------------------------------------------------------------------------------- loading
def available() -> bool:
    """Whether `datasets` can be imported (without importing it)."""
    if "datasets" in sys.modules:
        return sys.modules["datasets"] is not None
    try:
        return importlib.util.find_spec("datasets") is not None
    except (ImportError, ValueError):
        return False


def _first_line(e: BaseException, n: int = 200) -> str:
    text = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    return f"{type(e).__name__}: {text[:n]}" if text else type(e).__name__


def load_rows(path: str, name: str | None, split: str, *, task: str = "") -> list[dict[str, Any]]:
    """The rows of a hub dataset split as plain dicts: `datasets.load_dataset(path, name, split=split)`."""
    head = f"{task}: " if task else ""
    ds = HubDataset(path, name, split)
    try:
        import datasets
    except ImportError:
        raise LlmkitError(f"{head}the hub source needs `pip install datasets` (or read the ../shared data: "
                          "--data-dir DIR, --task-arg source=shared)") from None
    try:
        return [dict(row) for row in datasets.load_dataset(path, name, split=split)]
    except Exception as e:  # noqa: BLE001  (offline, unknown dataset, unsupported script: all one line)
        raise LlmkitError(f"{head}cannot load the hub dataset {ds} ({_first_line(e)}); check the network, or "
                          "use the ../shared data: --data-dir DIR, --task-arg source=shared") from e


def load(ds: HubDataset, task: str = "") -> list[dict[str, Any]]:
    return load_rows(ds.path, ds.name, ds.split, task=task)


def fields(rows: list[dict[str, Any]], ds: HubDataset, task: str, **kinds: type | tuple[type, ...]) -> None:
    """A one-line error when a row lacks a field or holds another type (the hub schema changed)."""
    for i, row in enumerate(rows):
        for key, kind in kinds.items():
            if not isinstance(row.get(key), kind) or isinstance(row.get(key), bool):
                names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
                raise LlmkitError(f"{task}: hub dataset {ds}, row {i}: field {key!r} missing or not {names}; "
                                  "use the ../shared data (--task-arg source=shared)")


# ---------------------------------------------------------------------------------------- converters
def hellaswag_records(rows: list[dict[str, Any]], task: str = "hellaswag") -> list[dict[str, Any]]:
    """{"query", "endings", "label"}: the query as lm-eval's process_docs builds it before `preprocess`,
    activity_label + ": " + ctx_a + " " + ctx_b.capitalize() (the task applies preprocess)."""
    fields(rows, HELLASWAG, task, activity_label=str, ctx_a=str, ctx_b=str, endings=list, label=(str, int))
    return [{"query": r["activity_label"] + ": " + r["ctx_a"] + " " + r["ctx_b"].capitalize(),
             "endings": list(r["endings"]), "label": int(r["label"])} for r in rows]


def mmlu_records(rows: list[dict[str, Any]], ds: HubDataset, task: str = "mmlu") -> list[dict[str, Any]]:
    """{"question", "options", "answer"}, as llmkit.eval.tasks.mc.read_mmlu_csv reads a shared CSV row."""
    fields(rows, ds, task, question=str, choices=list, answer=int)
    bad = next((i for i, r in enumerate(rows) if len(r["choices"]) != 4 or not 0 <= r["answer"] <= 3), None)
    if bad is not None:
        raise LlmkitError(f"{task}: hub dataset {ds}, row {bad}: needs 4 choices and an answer 0-3")
    return [{"question": r["question"], "options": [str(c) for c in r["choices"]], "answer": r["answer"]}
            for r in rows]


def truthfulqa_records(rows: list[dict[str, Any]], targets: str,
                       task: str = "truthfulqa") -> list[tuple[str, list[str], list[int]]]:
    """(question, choices, labels) per row; `targets` ("mc1_targets" | "mc2_targets") holds both lists."""
    fields(rows, TRUTHFULQA, task, question=str, **{targets: dict})
    out = []
    for i, r in enumerate(rows):
        t = r[targets]
        choices, labels = t.get("choices"), t.get("labels")
        if not isinstance(choices, list) or not isinstance(labels, list) or len(choices) != len(labels):
            raise LlmkitError(f"{task}: hub dataset {TRUTHFULQA}, row {i}: {targets} needs lists 'choices' "
                              "and 'labels' of the same length")
        out.append((r["question"], [str(c) for c in choices], list(labels)))
    return out


def gsm8k_records(rows: list[dict[str, Any]], ds: HubDataset, task: str = "gsm8k") -> list[dict[str, Any]]:
    """{"question", "answer"} (the worked answer ending "#### N"), as in ../shared's gsm8k_*.jsonl."""
    fields(rows, ds, task, question=str, answer=str)
    return [{"question": r["question"], "answer": r["answer"]} for r in rows]


def mgsm_records(rows: list[dict[str, Any]], task: str = "mgsm_fr") -> list[dict[str, Any]]:
    """{"question", "answer"}: the test split's `answer` is empty; the target is `answer_number`
    (lm-eval: doc_to_target "{{answer_number|string}}")."""
    fields(rows, MGSM_FR, task, question=str, answer_number=(int, float))
    return [{"question": r["question"], "answer": r["answer_number"]} for r in rows]


def humaneval_records(rows: list[dict[str, Any]], task: str = "humaneval") -> list[dict[str, Any]]:
    """The problems as in ../shared's HumanEval.jsonl.gz (the same five fields)."""
    fields(rows, HUMANEVAL, task, task_id=str, prompt=str, canonical_solution=str, test=str, entry_point=str)
    keys = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
    return [{k: r[k] for k in keys} for r in rows]

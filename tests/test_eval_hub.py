"""The optional HF hub source of the benchmark tasks (llmkit/eval/hub.py, `--task-arg source=...`), offline.

A fake `datasets` module stands in sys.modules; its load_dataset serves rows in each hub dataset's schema
(the fields lm-eval 0.4.13's task YAMLs and utils read), made from the first records of the ../shared files
(hellaswag: with the original activity_label / ctx_a / ctx_b of the published records). The same items read
from the hub and from ../shared must give the same documents and the same requests; hellaswag's hub query is
also checked against lm-eval's own process_docs, and every dataset path, config and split against lm-eval's
YAMLs. Nothing here touches the network.
"""

from __future__ import annotations

import csv
import gzip
import itertools
import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from conftest import SHARED, shared_path

from llmkit.errors import LlmkitError
from llmkit.eval import hub
from llmkit.eval.base import TaskOptions, get_task

TASKS = ("hellaswag", "mmlu", "truthfulqa_mc1", "truthfulqa_mc2", "gsm8k", "gsm8k_cot", "mgsm_fr",
         "humaneval")
HUB = {"source": "hub"}


class FakeDatasets(types.ModuleType):
    """`datasets` with a load_dataset serving {(path, name, split): rows}; records every call."""

    def __init__(self, tables: dict[tuple[str, str | None, str], list[dict[str, Any]]] | None = None,
                 error: Exception | None = None):
        super().__init__("datasets")
        self.tables, self.error, self.calls = tables or {}, error, []

    def load_dataset(self, path: str, name: str | None = None, *, split: str | None = None, **kw):
        self.calls.append((path, name, split))
        if self.error is not None:
            raise self.error
        if (path, name, split) not in self.tables:
            raise FileNotFoundError(f"Couldn't find dataset {path} {name} {split}")
        return [dict(r) for r in self.tables[(path, name, split)]]


@pytest.fixture
def fake(monkeypatch):
    """Install a FakeDatasets; the test fills `fake.tables`."""
    mod = FakeDatasets()
    monkeypatch.setitem(sys.modules, "datasets", mod)
    return mod


def jsonl(rel: str, n: int | None = None) -> list[dict[str, Any]]:
    """The first n records (all when None) of a shared JSONL file (gzipped or not)."""
    path = shared_path(rel)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in itertools.islice(f, n)]


def both(name: str, fake: FakeDatasets, extra: dict[str, str] | None = None,
         **kw: Any) -> tuple[list[dict], list[dict]]:
    """(docs read from ../shared, docs read from the fake hub) of one task with the same options."""
    shared = get_task(name, TaskOptions(data_dir=SHARED, extra={"source": "shared", **(extra or {})}, **kw))
    docs = shared.docs()
    fake.calls.clear()
    return docs, get_task(name, TaskOptions(data_dir=SHARED, extra={**HUB, **(extra or {})}, **kw)).docs()


def requests(name: str, docs: list[dict], **kw: Any) -> list[list[tuple]]:
    task = get_task(name, TaskOptions(data_dir=SHARED, **kw))
    return [[(r.context, r.continuation, r.stop, r.max_tokens) for r in task.requests(d)] for d in docs]


def lm_eval_yaml(rel: str) -> dict[str, Any]:
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(Path(lm_eval.__file__).parent / "tasks" / rel, resolve_func=False)


# ------------------------------------------------------------------------------- datasets as lm-eval's
def test_hub_datasets_are_lm_evals():
    """Path, config and split of every hub dataset as lm-eval 0.4.13's task YAMLs name them."""
    for rel, ds, split_key in [
        ("hellaswag/hellaswag.yaml", hub.HELLASWAG, "validation_split"),
        ("truthfulqa/truthfulqa_mc1.yaml", hub.TRUTHFULQA, "validation_split"),
        ("truthfulqa/truthfulqa_mc2.yaml", hub.TRUTHFULQA, "validation_split"),
        ("gsm8k/gsm8k.yaml", hub.gsm8k("test"), "test_split"),
        ("gsm8k/gsm8k.yaml", hub.gsm8k("train"), "fewshot_split"),
        ("gsm8k/gsm8k-cot.yaml", hub.gsm8k("test"), "test_split"),
        ("mgsm/direct/mgsm_direct_fr.yaml", hub.MGSM_FR, "test_split"),
        ("humaneval/humaneval.yaml", hub.HUMANEVAL, "test_split"),
        ("mmlu/default/mmlu_anatomy.yaml", hub.mmlu("anatomy", "test"), "test_split"),
        ("mmlu/default/mmlu_anatomy.yaml", hub.mmlu("anatomy", "dev"), "fewshot_split"),
    ]:
        cfg = lm_eval_yaml(rel)
        theirs = (cfg["dataset_path"], cfg.get("dataset_name"), cfg[split_key])
        assert (ds.path, ds.name, ds.split) == theirs, rel
    assert lm_eval_yaml("mgsm/direct/mgsm_direct_fr.yaml")["doc_to_target"] == "{{answer_number|string}}"
    lm_eval = pytest.importorskip("lm_eval")
    names = {p.name.removeprefix("mmlu_").removesuffix(".yaml")
             for p in (Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "default").glob("mmlu_*.yaml")}
    assert set(hub.MMLU_SUBJECTS) == names and len(names) == 57


# -------------------------------------------------------------------------- the same documents, per task
# the published records (rowanz/hellaswag hellaswag_val.jsonl) of the shared file's items 0-2, and item 5000
# (WikiHow: empty ctx_b; its [title] markers are already cleaned in the shared file)
HELLASWAG_ORIGINAL = {
    0: ("Roof shingle removal", "A man is sitting on a roof.", "he"),
    1: ("Clean and jerk", "A lady walks to a barbell. She bends down and grabs the pole.", "the lady"),
    2: ("Canoeing", "Two women in a child are shown in a canoe while a man pulls the canoe while standing in "
        "the water, with other individuals visible in the background.", "the child and a different man"),
    5000: ("Personal Care and Style", None, ""),
}


@pytest.fixture
def lm_process_docs():
    """lm-eval's hellaswag process_docs, imported before the fake `datasets` is installed."""
    pytest.importorskip("lm_eval")
    from lm_eval.tasks.hellaswag.utils import process_docs

    return process_docs


@pytest.mark.slow
def test_hellaswag_from_the_hub(lm_process_docs, fake):
    raw = jsonl("eval/hellaswag/hellaswag_val.jsonl", 5001)
    rows = []
    for i, (label, ctx_a, ctx_b) in HELLASWAG_ORIGINAL.items():
        ctx_a = raw[i]["ctx"].partition(": ")[2] if ctx_a is None else ctx_a
        rows.append({"ind": i, "activity_label": label, "ctx_a": ctx_a, "ctx_b": ctx_b,
                     "ctx": f"{ctx_a} {ctx_b}", "endings": raw[i]["endings"], "source_id": "x",
                     "split": "val", "split_type": "indomain", "label": str(raw[i]["label"])})
    fake.tables[("Rowan/hellaswag", None, "validation")] = rows
    shared, docs = both("hellaswag", fake)
    assert fake.calls == [("Rowan/hellaswag", None, "validation")]
    assert [d["id"] for d in docs] == ["0", "1", "2", "3"]
    picked = [shared[i] for i in HELLASWAG_ORIGINAL]
    assert requests("hellaswag", docs) == requests("hellaswag", picked)
    assert [d["target"] for d in docs] == [d["target"] for d in picked] == [3, 3, 2, 1]
    assert docs[0]["query"] == "Roof shingle removal: A man is sitting on a roof. He"  # ctx_b capitalised

    class Rows(list):  # what lm-eval's process_docs needs of a datasets.Dataset
        def map(self, fn):
            return [fn(r) for r in self]

    theirs = lm_process_docs(Rows(rows))
    assert [(d["query"], d["choices"], d["target"]) for d in docs] == \
        [(t["query"], t["choices"], t["gold"]) for t in theirs]


def mmlu_hub_rows(subject: str, split: str) -> list[dict[str, Any]]:
    """A shared MMLU CSV in cais/mmlu's schema."""
    with open(shared_path(f"eval/mmlu/{split}/{subject}_{split}.csv"), newline="", encoding="utf-8") as f:
        return [{"question": r["question"], "subject": subject,
                 "choices": [r[f"choice{i}"] for i in range(4)], "answer": int(r["answer"])}
                for r in csv.DictReader(f)]


@pytest.mark.slow
@pytest.mark.parametrize("shots", [0, 5])
def test_mmlu_from_the_hub(fake, shots):
    subjects = ("abstract_algebra", "anatomy")
    for s in subjects:
        for split in ("test", "dev"):
            fake.tables[("cais/mmlu", s, split)] = mmlu_hub_rows(s, split)
    extra = {"subjects": ",".join(subjects)}
    shared, docs = both("mmlu", fake, extra, shots=shots, limit=3)
    assert docs == shared and [d["id"] for d in docs] == [f"{s}/{i}" for s in subjects for i in range(3)]
    kw = {"shots": shots, "extra": {**HUB, **extra}}
    assert requests("mmlu", docs, **kw) == requests("mmlu", shared, shots=shots, extra=extra)
    # the hub task read the dev split only for shots (and from the hub)
    task = get_task("mmlu", TaskOptions(data_dir=SHARED, **kw, limit=3))
    fake.calls.clear()
    [task.requests(d) for d in task.docs()]
    assert fake.calls == [("cais/mmlu", s, "test") for s in subjects] + \
        ([("cais/mmlu", s, "dev") for s in subjects] if shots else [])
    # no `subjects`: the 57 configs of cais/mmlu, the shared folder's subjects
    known = sorted(p.name.removesuffix("_test.csv") for p in shared_path("eval/mmlu/test").glob("*_test.csv"))
    assert get_task("mmlu", TaskOptions(extra=HUB)).subjects() == known


@pytest.mark.slow
@pytest.mark.parametrize("name", ["truthfulqa_mc1", "truthfulqa_mc2"])
def test_truthfulqa_from_the_hub(fake, name):
    items = json.loads(shared_path("eval/truthfulqa/mc_task.json").read_text(encoding="utf-8"))[:4]
    fake.tables[("truthfulqa/truthful_qa", "multiple_choice", "validation")] = [
        {"question": it["question"], **{k: {"choices": list(it[k]), "labels": list(it[k].values())}
                                        for k in ("mc1_targets", "mc2_targets")}}
        for it in items]
    shared, docs = both(name, fake, limit=4)
    assert docs == shared and len(docs) == 4
    assert requests(name, docs, extra=HUB) == requests(name, shared)
    assert [sum(d["labels"]) for d in docs] == ([1] * 4 if name.endswith("mc1") else
                                               [sum(it["mc2_targets"].values()) for it in items])


@pytest.mark.slow
@pytest.mark.parametrize(("name", "shots"), [("gsm8k", 5), ("gsm8k", 0), ("gsm8k_cot", 8)])
def test_gsm8k_from_the_hub(fake, name, shots):
    fake.tables[("openai/gsm8k", "main", "test")] = jsonl("eval/gsm8k_test.jsonl", 4)
    fake.tables[("openai/gsm8k", "main", "train")] = jsonl("eval/gsm8k_train.jsonl")  # the same shot pool
    shared, docs = both(name, fake, shots=shots, limit=4)
    assert docs == shared and len(docs) == 4
    assert requests(name, docs, shots=shots, extra=HUB) == requests(name, shared, shots=shots)
    task = get_task(name, TaskOptions(shots=shots, extra=HUB))
    fake.calls.clear()
    [task.requests(d) for d in task.docs()]
    assert fake.calls == [("openai/gsm8k", "main", "test")] + \
        ([("openai/gsm8k", "main", "train")] if name == "gsm8k" and shots else [])


@pytest.mark.slow
def test_mgsm_fr_from_the_hub(fake):
    rows = jsonl("eval/mgsm_fr.jsonl", 3)
    fake.tables[("juletxara/mgsm", "fr", "test")] = [  # the test split: `answer` and the solution are empty
        {"question": r["question"], "answer": None, "answer_number": r["answer"], "equation_solution": None}
        for r in rows]
    shared, docs = both("mgsm_fr", fake, limit=3)
    assert docs == shared and [d["id"] for d in docs] == ["mgsm-fr-000", "mgsm-fr-001", "mgsm-fr-002"]
    assert requests("mgsm_fr", docs, extra=HUB) == requests("mgsm_fr", shared)
    rec = get_task("mgsm_fr", TaskOptions(extra=HUB)).process(docs[0], [[f" {rows[0]['answer']}"]])
    assert rec.metrics["exact_match,flexible-extract"] == 1.0


@pytest.mark.slow
def test_humaneval_from_the_hub(fake):
    rows = jsonl("eval/humaneval/HumanEval.jsonl.gz", 2)
    fake.tables[("openai/openai_humaneval", None, "test")] = rows
    shared, docs = both("humaneval", fake, limit=2)
    assert docs == shared and [d["id"] for d in docs] == ["HumanEval/0", "HumanEval/1"]
    assert requests("humaneval", docs, extra=HUB) == requests("humaneval", shared)


@pytest.mark.slow
def test_auto_falls_back_to_the_hub_through_the_runner(fake, tmp_path):
    """auto with no shared file and `datasets` installed reads the hub; the runner takes the `source` key."""
    from llmkit.eval.backends import Backend
    from llmkit.eval.runner import evaluate

    rows = jsonl("eval/mgsm_fr.jsonl", 2)
    fake.tables[("juletxara/mgsm", "fr", "test")] = [
        {"question": r["question"], "answer": None, "answer_number": r["answer"], "equation_solution": None}
        for r in rows]
    answers = {f"Question : {r['question']}\nRéponse :": f" {r['answer']}" for r in rows}

    class Canned(Backend):
        def generate(self, reqs):
            return [[answers[r.context]] for r in reqs]

    for extra in ({}, {"source": "auto"}):
        fake.calls.clear()
        res = evaluate(Canned(), ["mgsm_fr"], data_dir=tmp_path, task_args=extra, cache=False, progress=False)
        assert fake.calls == [("juletxara/mgsm", "fr", "test")]
        assert res["tasks"]["mgsm_fr"]["n"] == 2
        assert res["tasks"]["mgsm_fr"]["metrics"]["exact_match,flexible-extract"]["value"] == 1.0


# ------------------------------------------------------------------------------------------------ errors
def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg, msg
    return msg


@pytest.mark.parametrize("name", TASKS)
def test_every_benchmark_takes_source(name, tmp_path, fake):
    assert "source" in get_task(name).task_args
    assert "subjects" in get_task("mmlu").task_args  # the runner checks --task-arg keys against task_args
    with pytest.raises(LlmkitError) as e:
        get_task(name, TaskOptions(extra={"source": "web"}))  # at once, before any model loads
    assert "use auto, shared or hub" in one_line(e)
    # shared, asked for and missing: the usual error, naming the hub as the other way
    with pytest.raises(LlmkitError) as e:
        get_task(name, TaskOptions(data_dir=tmp_path / "none", extra={"source": "shared"})).docs()
    msg = one_line(e)
    assert "data not found at" in msg and str(tmp_path / "none") in msg and "--data-dir" in msg, msg
    assert fake.calls == []  # never the hub


@pytest.mark.parametrize("name", TASKS)
def test_auto_without_data_or_datasets_names_both_ways(name, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` fails
    assert not hub.available()
    with pytest.raises(LlmkitError) as e:
        get_task(name, TaskOptions(data_dir=tmp_path)).docs()
    msg = one_line(e)
    assert "data not found" in msg and "--data-dir" in msg and "--task-arg source=hub" in msg, msg
    assert "pip install datasets" in msg and "network" in msg, msg
    with pytest.raises(LlmkitError) as e:  # the hub asked for: the missing package
        get_task(name, TaskOptions(data_dir=tmp_path, extra=HUB)).docs()
    assert "the hub source needs `pip install datasets`" in one_line(e)


@pytest.mark.parametrize("error", [
    ConnectionError("Couldn't reach 'Rowan/hellaswag' on the Hub (ConnectionError)\nTraceback line 2"),
    OSError("[Errno -3] Temporary failure in name resolution"),
])
def test_network_failure_is_one_line(monkeypatch, error):
    monkeypatch.setitem(sys.modules, "datasets", FakeDatasets(error=error))
    with pytest.raises(LlmkitError) as e:
        get_task("hellaswag", TaskOptions(extra=HUB)).docs()
    msg = one_line(e)
    assert msg.startswith("hellaswag: cannot load the hub dataset Rowan/hellaswag, split validation"), msg
    assert type(error).__name__ in msg and "--data-dir" in msg and "source=shared" in msg, msg
    with pytest.raises(LlmkitError) as e:
        get_task("gsm8k", TaskOptions(extra=HUB)).docs()
    assert "openai/gsm8k (main), split test" in one_line(e)


def test_changed_hub_schema_is_one_line(fake):
    fake.tables[("Rowan/hellaswag", None, "validation")] = [
        {"activity_label": "a", "ctx_a": "b.", "ctx_b": "c", "endings": ["d", "e"], "label": "0"},
        {"activity_label": "a", "ctx": "b. c", "endings": ["d", "e"], "label": "1"}]
    with pytest.raises(LlmkitError) as e:
        get_task("hellaswag", TaskOptions(extra=HUB)).docs()
    assert "Rowan/hellaswag, split validation, row 1: field 'ctx_a' missing or not str" in one_line(e)
    fake.tables[("openai/openai_humaneval", None, "test")] = [{"task_id": "x", "prompt": "p"}]
    with pytest.raises(LlmkitError) as e:
        get_task("humaneval", TaskOptions(extra=HUB)).docs()
    assert "row 0: field 'canonical_solution'" in one_line(e)


def test_shared_data_wins_under_auto(fake):
    """With the shared file present, auto never asks the hub (every test reads ../shared)."""
    shared_path("eval/mgsm_fr.jsonl")
    docs = get_task("mgsm_fr", TaskOptions(data_dir=SHARED, limit=2)).docs()
    assert [d["id"] for d in docs] == ["mgsm-fr-000", "mgsm-fr-001"] and fake.calls == []

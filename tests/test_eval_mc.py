"""Multiple-choice tasks (llmkit/eval/tasks/mc.py) against lm-evaluation-harness 0.4.13, the reference.

The parity tests run lm-eval's own task configs (its YAMLs, loaded with its loader, `!function`s resolved)
with the dataset pointed at local JSONL files written in the HF dataset's schema from the same ../shared
documents, through `lm_eval.evaluator.evaluate` and its `hf` model (HFLM) on the tiny random Llama; our
side runs get_task(...).docs() / requests() / process() over a LocalBackend on the same weights. Per item:
identical prompts (context and continuation strings), identical chosen answers and metrics, log-likelihoods
within 1e-4.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from conftest import shared_path

from llmkit.errors import LlmkitError
from llmkit.eval.base import LogLikelihood, Record, TaskOptions, get_task
from llmkit.eval.tasks.mc import (
    TRUTHFULQA_PREAMBLE,
    hellaswag_query,
    mc2_score,
    mmlu_description,
)

TOL = 1e-4


def lm_eval_tasks() -> Path:
    lm_eval = pytest.importorskip("lm_eval")
    return Path(lm_eval.__file__).parent / "tasks"


def lm_eval_yaml(rel: str) -> dict[str, Any]:
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(lm_eval_tasks() / rel)


def lls(*xs: float) -> list[LogLikelihood]:
    return [LogLikelihood(x, False, 1) for x in xs]


# ------------------------------------------------------------------------------------- our side, lm-eval's
@pytest.fixture(scope="module")
def ours(tiny_llama_dir):
    import llmkit
    from llmkit.eval.backends import LocalBackend

    return LocalBackend(llmkit.load(tiny_llama_dir, device="cpu", dtype="float32"), batch_size=8)


@pytest.fixture(scope="module")
def hflm(tiny_llama_dir):
    lm_eval_tasks()
    from lm_eval.models.huggingface import HFLM

    # batch 4, not lm-eval's usual 8: the same numbers, half the memory for 1,024 x 49,152 logits per row
    return HFLM(pretrained=str(tiny_llama_dir), device="cpu", dtype="float32", batch_size=4)


def run_ours(task, docs: list[dict], backend) -> tuple[list[list], list[Record]]:
    """(requests per doc, records): the runner's loop, one backend call for every request."""
    reqs = [task.requests(d) for d in docs]
    answers = backend.run([r for rs in reqs for r in rs])
    records, i = [], 0
    for d, rs in zip(docs, reqs):
        records.append(task.process(d, answers[i:i + len(rs)]))
        i += len(rs)
    return reqs, records


def run_lm_eval(hflm, cfg: dict[str, Any], splits: dict[str, list[dict]], tmp: Path,
                limit: int | None = None):
    """lm-eval's task `cfg` on local rows (one JSONL per split): (task, samples in doc order)."""
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.evaluator import evaluate

    files = {}
    for split, rows in splits.items():
        files[split] = str(tmp / f"{cfg['task']}_{split}.jsonl")
        Path(files[split]).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = {**cfg, "dataset_path": "json", "dataset_name": None,
           "dataset_kwargs": {"data_files": files, "cache_dir": str(tmp / "hf_cache")}}
    task = ConfigurableTask(config=cfg)
    out = evaluate(lm=hflm, task_dict={cfg["task"]: task}, limit=limit, log_samples=True, bootstrap_iters=0,
                   verbosity="ERROR")
    return task, sorted(out["samples"][cfg["task"]], key=lambda s: s["doc_id"])


def assert_same(reqs: list, records: list[Record], samples: list[dict], metrics: tuple[str, ...]) -> None:
    """Per item: the same (context, continuation) pairs, log-likelihoods within TOL, the same metrics."""
    assert len(records) == len(samples)
    for rs, rec, s in zip(reqs, records, samples):
        assert [(r.context, r.continuation) for r in rs] == [tuple(a) for a in s["arguments"]], rec.id
        theirs = [resp[0] for resp in s["filtered_resps"]]
        # abs 1e-4, or 1e-6 relative: the random test model's sums reach -600 nats, where one float32 ulp
        # is 6e-5 and summation order alone moves the last bits
        assert rec.data["logprobs"] == pytest.approx(theirs, abs=TOL, rel=1e-6), rec.id
        assert rec.data["pred"] == max(range(len(theirs)), key=lambda i: (theirs[i], -i)), rec.id
        for m in metrics:
            assert rec.metrics[m] == pytest.approx(s[m], abs=TOL), (rec.id, m)


# ------------------------------------------------------------------------------------------- hellaswag
# the first five items of HellaSwag's validation file as published (rowanz/hellaswag data/hellaswag_val.jsonl)
HELLASWAG_ORIGINAL = [
    ("Roof shingle removal", "A man is sitting on a roof.", "he"),
    ("Clean and jerk", "A lady walks to a barbell. She bends down and grabs the pole.", "the lady"),
    ("Canoeing", "Two women in a child are shown in a canoe while a man pulls the canoe while standing in "
     "the water, with other individuals visible in the background.", "the child and a different man"),
    ("High jump", "A boy is running down a track.", "the boy"),
    ("High jump", "The boy lifts his body above the height of a pole. The boy lands on his back on to a red "
     "mat.", "the boy"),
]


def hf_hellaswag_row(rec: dict) -> dict:
    """The shared file's item in the HF schema lm-eval reads: the lower-case last fragment is ctx_b."""
    label, _, body = rec["ctx"].partition(": ")
    head, sep, tail = body.rpartition(". ")
    ctx_a, ctx_b = (head + ".", tail) if sep and tail[:1].islower() else (body, "")
    return {"activity_label": label, "ctx_a": ctx_a, "ctx_b": ctx_b, "endings": rec["endings"],
            "label": str(rec["label"])}


@pytest.mark.slow
def test_hellaswag_query_rebuilds_lm_evals_from_the_shared_file():
    """The shared file lacks lm-eval's capitalised ctx_b; the rebuilt query equals lm-eval's process_docs on
    the original records."""
    datasets = pytest.importorskip("datasets")
    lm_eval_tasks()
    from lm_eval.tasks.hellaswag.utils import process_docs

    path = shared_path("eval/hellaswag/hellaswag_val.jsonl")
    mine = [json.loads(line) for line, _ in zip(path.open(encoding="utf-8"), range(len(HELLASWAG_ORIGINAL)))]
    rows = [{"activity_label": a, "ctx_a": c_a, "ctx_b": c_b, "endings": m["endings"],
             "label": str(m["label"])} for (a, c_a, c_b), m in zip(HELLASWAG_ORIGINAL, mine)]
    theirs = process_docs(datasets.Dataset.from_list(rows))
    assert [hellaswag_query(m["ctx"]) for m in mine] == [d["query"] for d in theirs]
    assert mine[0]["ctx"].endswith("roof. he") and theirs[0]["query"].endswith("roof. He")
    # WikiHow-style contexts (no lower-case fragment) and bracket leftovers go through lm-eval's preprocess
    assert hellaswag_query("Family Life: How to x.. Visit [www.a.org] to find. Choose.") == \
        "Family Life: How to x.. Visit to find. Choose."


@pytest.mark.slow
def test_hellaswag_matches_lm_eval(ours, hflm, tmp_path):
    path = shared_path("eval/hellaswag/hellaswag_val.jsonl")  # first: skips without ../shared (no hub)
    task = get_task("hellaswag")
    docs = task.docs()
    assert len(docs) == 10042 and len({d["id"] for d in docs}) == 10042
    raw = [json.loads(line) for line in path.open(encoding="utf-8")]
    # ActivityNet items (ctx_b), WikiHow items, the two contexts and an ending with bracket leftovers
    pick = [*range(6), *range(5000, 5006), *[i for i, r in enumerate(raw) if "[" in r["ctx"]],
            next(i for i, r in enumerate(raw) if any("[" in e for e in r["endings"]))]
    assert len(pick) == 15
    cfg = {**lm_eval_yaml("hellaswag/hellaswag.yaml"), "training_split": None}
    rows = [hf_hellaswag_row(raw[i]) for i in pick]
    lm_task, samples = run_lm_eval(hflm, cfg, {"validation": rows}, tmp_path)
    reqs, records = run_ours(task, [docs[i] for i in pick], ours)
    assert_same(reqs, records, samples, ("acc", "acc_norm"))

    # acc_norm divides by the choice's length without the leading space: -1/1 < -1.9/2 (with: -1/2 > -1.9/3)
    doc = {**docs[0], "choices": ["a", "bb"], "target": 1}
    lm_doc = lm_task.dataset["validation"][0] | {"choices": ["a", "bb"], "label": "1", "gold": 1}
    rec = task.process(doc, lls(-1.0, -1.9))
    assert rec.metrics == lm_task.process_results(lm_doc, [(-1.0, False), (-1.9, False)]) == \
        {"acc": 0.0, "acc_norm": 1.0}


# ------------------------------------------------------------------------------------------------ mmlu
@pytest.mark.slow
@pytest.mark.parametrize(("shots", "subjects", "limit"), [
    (0, ("abstract_algebra", "anatomy"), 10),
    (5, ("abstract_algebra", "anatomy"), 10),
    (5, ("high_school_european_history",), 2),  # prompts over the 1,024 tokens of the model: cut on the left
])
def test_mmlu_matches_lm_eval(ours, hflm, tmp_path, shots, subjects, limit):
    from lm_eval.api.metrics import aggregate_subtask_metrics

    from llmkit.eval.tasks.mc import read_mmlu_csv

    for subject in subjects:  # first: skip without ../shared (the task would go to the hub)
        shared_path(f"eval/mmlu/test/{subject}_test.csv")
    task = get_task("mmlu", TaskOptions(shots=shots, limit=limit, extra={"subjects": ",".join(subjects)}))
    docs = task.docs()
    assert [d["id"] for d in docs] == [f"{s}/{i}" for s in subjects for i in range(limit)]  # per subject
    reqs, records = run_ours(task, docs, ours)
    accs, sizes = [], []
    for k, subject in enumerate(subjects):
        cfg = {**lm_eval_yaml(f"mmlu/default/mmlu_{subject}.yaml"), "num_fewshot": shots}
        splits = {}
        for split in ("test", "dev"):
            rows = read_mmlu_csv(shared_path(f"eval/mmlu/{split}/{subject}_{split}.csv"))
            splits[split] = [{"question": r["question"], "subject": subject, "choices": r["options"],
                              "answer": r["answer"]} for r in rows]
        _, samples = run_lm_eval(hflm, cfg, splits, tmp_path, limit=limit)
        part = slice(k * limit, (k + 1) * limit)
        assert_same(reqs[part], records[part], samples, ("acc",))
        accs.append(sum(s["acc"] for s in samples) / len(samples))
        sizes.append(len(samples))
    agg = task.aggregate(records)
    assert agg["acc"][0] == pytest.approx(aggregate_subtask_metrics(accs, sizes, weight_by_size=True))
    assert agg["acc_macro"][0] == pytest.approx(sum(accs) / len(accs))
    assert [agg[f"acc/{s}"][0] for s in subjects] == pytest.approx(accs)


def test_mmlu_aggregate_micro_macro_per_subject():
    task = get_task("mmlu")
    recs = [Record("a/0", {"acc": 1.0}), Record("a/1", {"acc": 0.0}), Record("a/2", {"acc": 0.0}),
            Record("b/0", {"acc": 1.0})]
    agg = task.aggregate(recs)
    assert agg["acc"][0] == pytest.approx(0.5)  # 2 right of 4
    assert agg["acc_macro"][0] == pytest.approx((1 / 3 + 1) / 2)
    assert agg["acc/a"][0] == pytest.approx(1 / 3) and agg["acc/b"] == (1.0, None)
    assert agg["acc_macro"][1] is None  # subject b has one item: no standard error


def test_mmlu_descriptions_are_lm_evals():
    yamls = sorted((lm_eval_tasks() / "mmlu" / "default").glob("mmlu_*.yaml"))
    assert len(yamls) == 57
    for p in yamls:
        cfg = lm_eval_yaml(p.relative_to(lm_eval_tasks()).as_posix())
        assert mmlu_description(cfg["dataset_name"]) == cfg["description"], p.name


@pytest.mark.slow
def test_mmlu_subjects_and_errors():
    shared_path("eval/mmlu/test")
    names = {p.name.removeprefix("mmlu_").removesuffix(".yaml")
             for p in (lm_eval_tasks() / "mmlu" / "default").glob("mmlu_*.yaml")}
    assert set(get_task("mmlu").subjects()) == names
    with pytest.raises(LlmkitError, match="unknown subject.*astrology"):
        get_task("mmlu", TaskOptions(extra={"subjects": "anatomy,astrology"})).docs()
    with pytest.raises(LlmkitError, match="--shots 6 but anatomy has 5 dev questions"):
        t = get_task("mmlu", TaskOptions(shots=6, limit=1, extra={"subjects": "anatomy"}))
        t.requests(t.docs()[0])


# ------------------------------------------------------------------------------------------ truthfulqa
def test_truthfulqa_prompt_is_lm_evals():
    from lm_eval.utils import apply_template

    cfg = lm_eval_yaml("truthfulqa/truthfulqa_mc2.yaml")
    doc = {"id": "0", "question": "Is the sky green?", "choices": ["No.", "Yes."], "labels": [1, 0]}
    assert get_task("truthfulqa_mc2").prompt(doc) == apply_template(cfg["doc_to_text"], doc)
    assert TRUTHFULQA_PREAMBLE.count("\nA: ") == 6


@pytest.mark.slow
def test_truthfulqa_matches_lm_eval(ours, hflm, tmp_path):
    path = shared_path("eval/truthfulqa/mc_task.json")
    raw = json.loads(path.read_text(encoding="utf-8"))
    pick = [0, 1, 2, 3, 4, 5, 164, 607]  # 164 and 607 list a true mc2 answer after a false one
    assert any(list(raw[i]["mc2_targets"].values()) != sorted(raw[i]["mc2_targets"].values(), reverse=True)
               for i in (164, 607))
    rows = [{"question": raw[i]["question"],
             **{k: {"choices": list(raw[i][k]), "labels": list(raw[i][k].values())}
                for k in ("mc1_targets", "mc2_targets")}} for i in pick]
    for name, n in (("truthfulqa_mc1", 4), ("truthfulqa_mc2", len(pick))):
        task = get_task(name)
        docs = {d["id"]: d for d in task.docs()}
        assert len(docs) == 817
        cfg = lm_eval_yaml(f"truthfulqa/{name}.yaml")
        _, samples = run_lm_eval(hflm, cfg, {"validation": rows[:n]}, tmp_path)
        reqs, records = run_ours(task, [docs[str(i)] for i in pick[:n]], ours)
        assert_same(reqs, records, samples, ("acc",))


def test_mc2_hand_computed():
    # p = softmax(-1, -2, -3) = (0.665241, 0.244728, 0.090031); answers 0 and 2 true -> 0.755272
    assert mc2_score([-1.0, -2.0, -3.0], [1, 0, 1]) == pytest.approx(0.755272, abs=1e-6)
    # far below exp's range (lm-eval's exp(ll) / sum would give 0/0): 1 / (1 + e) for the second answer
    assert mc2_score([-1000.0, -1001.0], [0, 1]) == pytest.approx(1 / (1 + math.e))
    task = get_task("truthfulqa_mc2")
    doc = {"id": "7", "question": "q", "choices": ["x", "y", "z"], "labels": [0, 1, 1]}  # true answers last
    rec = task.process(doc, lls(math.log(0.5), math.log(0.3), math.log(0.2)))
    assert rec.metrics["acc"] == pytest.approx(0.5)
    assert rec.data == {"labels": [0, 1, 1], "pred": 0, "logprobs": [-0.693147, -1.203973, -1.609438]}


def test_truthfulqa_uses_labels_not_order(tmp_path):
    item = {"question": "q?", "mc1_targets": {"wrong": 0, "also wrong": 0, "right": 1},
            "mc2_targets": {"wrong": 0, "right": 1, "right too": 1}}
    (tmp_path / "eval" / "truthfulqa").mkdir(parents=True)
    (tmp_path / "eval" / "truthfulqa" / "mc_task.json").write_text(json.dumps([item, item]))
    opts = TaskOptions(data_dir=tmp_path, limit=1)
    (doc1,) = get_task("truthfulqa_mc1", opts).docs()
    assert doc1["target"] == 2 and doc1["choices"] == ["wrong", "also wrong", "right"]
    rec = get_task("truthfulqa_mc1", opts).process(doc1, lls(-3.0, -2.0, -1.0))
    assert rec.metrics == {"acc": 1.0} and rec.data["target"] == 2
    (doc2,) = get_task("truthfulqa_mc2", opts).docs()
    assert doc2["labels"] == [0, 1, 1]
    with pytest.raises(LlmkitError, match="only 0-shot"):
        get_task("truthfulqa_mc1", TaskOptions(shots=3))


# -------------------------------------------------------------------------------------------- generic mc
def write_jsonl(path: Path, lines: list) -> Path:
    text = "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines)
    path.write_text(text, encoding="utf-8")
    return path


def test_mc_prompts_ids_and_metrics(tmp_path):
    f = write_jsonl(tmp_path / "exam.jsonl", [
        {"question": "Which is a fruit?", "choices": ["apple", "chair"], "answer": 0},
        "",
        {"question": "2+2?", "choices": ["3", "four", "22"], "answer": 1, "context": "Arithmetic.",
         "id": "q-2"},
    ])
    task = get_task("mc", TaskOptions(data=[str(f)]))
    docs = task.docs()
    assert [d["id"] for d in docs] == ["exam.jsonl:1", "q-2"]
    r0, r1 = task.requests(docs[0]), task.requests(docs[1])
    assert [(r.context, r.continuation) for r in r0] == [("Question: Which is a fruit?\nAnswer:", " apple"),
                                                       ("Question: Which is a fruit?\nAnswer:", " chair")]
    assert r1[0].context == "Arithmetic.\nQuestion: 2+2?\nAnswer:" and r1[2].continuation == " 22"
    # acc by summed logprob; acc_norm by logprob per character of the choice, without the leading space:
    # -1/1 < -3.5/4 (with the space it would be -1/2 > -3.5/5)
    rec = task.process(docs[1], lls(-1.0, -3.5, -4.0))
    assert rec.metrics == {"acc": 0.0, "acc_norm": 1.0}
    assert rec.data == {"target": 1, "pred": 0, "pred_norm": 1, "logprobs": [-1.0, -3.5, -4.0]}
    assert get_task("mc", TaskOptions(data=[str(tmp_path)], limit=1)).docs() == docs[:1]  # folder, --limit

    tpl = get_task("mc", TaskOptions(data=[str(f)], template="{context}\nQ: {question}\nA:"))
    assert [r.context for r in tpl.requests(tpl.docs()[1])] == ["Arithmetic.\nQ: 2+2?\nA:"] * 3
    assert tpl.requests(tpl.docs()[0])[0].context == "\nQ: Which is a fruit?\nA:"  # no context: empty


@pytest.mark.parametrize(("line", "field", "why"), [
    ('{"question": "q", "choices": ["a", "b"], "answer": 2}', "answer", "between 0 and 1"),
    ('{"question": "q", "choices": ["a", "b"], "answer": "0"}', "answer", "integer"),
    ('{"question": "q", "choices": ["a", "b"], "answer": true}', "answer", "integer"),
    ('{"question": "q", "choices": ["a", "b"]}', "answer", "missing"),
    ('{"question": "q", "choices": ["a"], "answer": 0}', "choices", "at least 2"),
    ('{"question": "q", "choices": "a,b", "answer": 0}', "choices", "list"),
    ('{"question": "q", "choices": ["a", ""], "answer": 0}', "choices", "non-empty"),
    ('{"choices": ["a", "b"], "answer": 0}', "question", "missing"),
    ('{"question": 3, "choices": ["a", "b"], "answer": 0}', "question", "string"),
    ('{"question": "q", "choices": ["a", "b"], "answer": 0, "context": ["c"]}', "context", "string"),
    ('{"question": "q", "choices": ["a", "b"], "answer": 0, "id": "first"}', "id", "already used"),
])
def test_mc_bad_record_is_one_line_naming_file_line_field(tmp_path, line, field, why):
    good = {"question": "q", "choices": ["a", "b"], "answer": 0, "id": "first"}
    f = write_jsonl(tmp_path / "bad.jsonl", [good, line])
    with pytest.raises(LlmkitError) as e:
        get_task("mc", TaskOptions(data=[str(f)])).docs()
    msg = str(e.value)
    assert "\n" not in msg and str(f) in msg and "line 2" in msg and f"'{field}'" in msg and why in msg, msg


def test_mc_file_errors(tmp_path):
    f = write_jsonl(tmp_path / "x.jsonl", ['{"question": "q", "choices": ["a", "b"], "answer": 0}', "{oops"])
    for opts, pattern in [
        (TaskOptions(), "no data given; pass --data"),
        (TaskOptions(data=[str(tmp_path / "nope.jsonl")]), "not found"),
        (TaskOptions(data=[str(f)]), r"x\.jsonl, line 2: not valid JSON"),
    ]:
        with pytest.raises(LlmkitError, match=pattern):
            get_task("mc", opts).docs()
    write_jsonl(f, ["[1, 2]"])
    with pytest.raises(LlmkitError, match="line 1: expected a JSON object"):
        get_task("mc", TaskOptions(data=[str(f)])).docs()
    with pytest.raises(LlmkitError, match="bad --template"):
        get_task("mc", TaskOptions(data=[str(f)], template="{question} {answer}"))
    with pytest.raises(LlmkitError, match="only 0-shot"):
        get_task("mc", TaskOptions(data=[str(f)], shots=5))

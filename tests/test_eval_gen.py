"""Generative tasks (llmkit.eval.tasks.gen) against lm-eval 0.4.13: its regex filter and exact_match metric on
hand-written responses, the prompts its task configs render (few-shot included), HumanEval programs run in
the sandbox, the qa matcher, and a canned-answer backend driving `evaluate` end to end."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest
from conftest import SHARED, shared_path

from llmkit.errors import LlmkitError
from llmkit.eval.backends import Backend
from llmkit.eval.base import Request, TaskOptions, get_task
from llmkit.eval.tasks.gen import (
    FLEXIBLE,
    GSM8K_COT_STRICT,
    GSM8K_IGNORE,
    GSM8K_STRICT,
    HumanEval,
    exact_match,
    qa_match,
    regex_extract,
)


def lm_tasks() -> Path:
    """lm-eval's task folder (lm-eval is a test-only dependency: tests comparing with it skip without it)."""
    return Path(pytest.importorskip("lm_eval").__file__).parent / "tasks"

RESPONSES = [
    " Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72",
    " She pays 1,200 + 34 = $1,234.\n#### 1,234\n\nQuestion: next",
    " The total is $18.00.",
    " #### -5.\nThe answer is -5.",
    " so 3 + 4 = 7 and then 7 * 2 = 14 The answer is 14.\n",
    " I do not know.",
    "",
    " The answer is 1,000,000. Later: 5",
    " 12.5 dollars, #### 12.50",
    " Réponse : 18 $",
    " -.5 and 0.",
]
TARGETS = ["72", "1,234", "18", "-5", "14", "7", "0", "1000000", "12.5", "18", "0",
           "Natalia sold...\n#### 72"]


def lm_regex(pattern: str, group_select: int, text: str) -> str:
    lm_tasks()
    from lm_eval.filters.extraction import RegexFilter

    return RegexFilter(regex_pattern=pattern, group_select=group_select).apply([[text]], [None])[0][0]


def lm_exact_match(pred: str, ref: str, **kw) -> bool:
    lm_tasks()
    from lm_eval.api.metrics import exact_match_hf_evaluate

    return bool(exact_match_hf_evaluate(predictions=[pred], references=[ref], **kw)["exact_match"])


@pytest.mark.parametrize("pattern,group", [(GSM8K_STRICT, 0), (FLEXIBLE, -1), (GSM8K_COT_STRICT, 0)])
def test_extraction_equals_lm_eval_regex_filter(pattern, group):
    for text in RESPONSES:
        assert regex_extract(text, pattern, group) == lm_regex(pattern, group, text), text


def test_extraction_hand_computed():
    assert regex_extract(RESPONSES[1], GSM8K_STRICT) == "1,234"
    assert regex_extract(RESPONSES[2], GSM8K_STRICT) == "[invalid]"
    assert regex_extract(RESPONSES[2], FLEXIBLE, -1) == "$18.00."
    assert regex_extract(RESPONSES[7], FLEXIBLE, -1) == "5"  # the LAST number-like string
    assert regex_extract(RESPONSES[4], GSM8K_COT_STRICT) == "14"


@pytest.mark.parametrize("kw", [
    {"regexes_to_ignore": list(GSM8K_IGNORE), "ignore_case": True},  # gsm8k
    {"ignore_case": True, "ignore_punctuation": True},  # mgsm
    {},
])
def test_exact_match_equals_lm_eval(kw):
    preds = [regex_extract(t, p, g) for t in RESPONSES for p, g in ((GSM8K_STRICT, 0), (FLEXIBLE, -1))]
    preds += [t.strip() for t in RESPONSES]
    mine = {"ignore": tuple(kw.get("regexes_to_ignore", ())), "ignore_case": kw.get("ignore_case", False),
            "ignore_punctuation": kw.get("ignore_punctuation", False)}
    hits = 0
    for pred in preds:
        for ref in TARGETS:
            got = exact_match(pred, ref, **mine)
            assert got == lm_exact_match(pred, ref, **kw), (pred, ref)
            hits += got
    assert hits > 0  # the comparison saw matches, not only misses


def test_gsm8k_ignore_rules_hand_computed():
    ign = {"ignore": GSM8K_IGNORE, "ignore_case": True}
    assert exact_match("1,234", "She pays...\n#### 1,234", **ign)  # everything up to "#### " goes
    assert exact_match("$18.", "18", **ign)
    assert not exact_match("18.00", "18", **ign)  # no numeric equality in lm-eval's metric
    assert exact_match("[invalid]", "[INVALID]", **ign)


class Canned(Backend):
    """Answers generate requests from a table (prompt suffix -> completions); records what it was asked."""

    name = "canned"

    def __init__(self, answer):
        self.answer = answer
        self.seen: list[Request] = []

    def generate(self, reqs):
        self.seen += reqs
        return [self.answer(r) for r in reqs]


def test_gsm8k_process_metrics():
    task = get_task("gsm8k", TaskOptions(shots=0))
    doc = {"id": "x", "index": 0, "question": "How many?", "answer": "It is 3 + 4 = <<3+4=7>>7.\n#### 7"}
    for resp, strict, flex in [(" 3 + 4 = 7\n#### 7", 1.0, 1.0), (" The answer is 7.", 0.0, 1.0),
                               (" #### 7 eggs, 8", 1.0, 0.0), (" no idea", 0.0, 0.0)]:
        rec = task.process(doc, [[resp]])
        assert rec.metrics == {"exact_match,strict-match": strict, "exact_match,flexible-extract": flex}, resp
        assert rec.data["target"] == "7" and rec.data["response"] == resp


# ------------------------------------------------------------------------- prompts as lm-eval renders
def lm_task(yaml_rel: str, data_files: dict[str, str], cache: Path):
    folder = lm_tasks()
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(folder / yaml_rel, resolve_func=False)
    cfg["dataset_path"] = "json"
    cfg.pop("dataset_name", None)
    cfg["dataset_kwargs"] = {"data_files": data_files, "cache_dir": str(cache)}
    task = ConfigurableTask(config=cfg)
    task.set_fewshot_seed(1234)  # what lm-eval's evaluator does (fewshot_random_seed=1234)
    return task


@pytest.mark.slow
@pytest.mark.parametrize("name,yaml_rel,shots", [("gsm8k", "gsm8k/gsm8k.yaml", 5),
                                                 ("gsm8k_cot", "gsm8k/gsm8k-cot.yaml", 8)])
def test_gsm8k_prompts_equal_lm_eval(tmp_path, monkeypatch, name, yaml_rel, shots):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    test, train = shared_path("eval/gsm8k_test.jsonl"), shared_path("eval/gsm8k_train.jsonl")
    small = tmp_path / "test.jsonl"
    small.write_text("".join(test.read_text(encoding="utf-8").splitlines(True)[:6]), encoding="utf-8")
    ref = lm_task(yaml_rel, {"train": str(train), "test": str(small)}, tmp_path / "hf")
    mine = get_task(name, TaskOptions(limit=6, data_dir=SHARED))
    docs = mine.docs()
    assert len(docs) == 6
    for doc, lm_doc in zip(docs, ref.test_docs()):
        want = ref.fewshot_context(lm_doc, shots)
        assert mine.requests(doc)[0].context == want
        assert want.count("\n\n") == shots
    req = mine.requests(docs[0])[0]
    assert list(req.stop) == ref.config.generation_kwargs["until"]
    assert req.temperature == 0 and req.max_tokens == 256  # lm-eval's default max_gen_toks
    # the target as lm-eval scores it
    lm_target = ref.doc_to_target(next(iter(ref.test_docs())))
    rec = mine.process(docs[0], [[" #### 18" if name == "gsm8k" else " The answer is 18."]])
    assert rec.metrics[mine.main_metric] == float(lm_exact_match(
        "18", lm_target, regexes_to_ignore=list(GSM8K_IGNORE), ignore_case=True))


@pytest.mark.slow
def test_mgsm_fr_prompt_equals_lm_eval(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    lines = shared_path("eval/mgsm_fr.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(x) for x in lines[:4]]
    lm_rows = tmp_path / "test.jsonl"  # MGSM's test split: no worked answer, the number in answer_number
    lm_rows.write_text("".join(json.dumps({"question": r["question"], "answer": None,
                                           "answer_number": r["answer"], "equation_solution": None}) + "\n"
                               for r in rows), encoding="utf-8")
    ref = lm_task("mgsm/direct/mgsm_direct_fr.yaml", {"train": str(lm_rows), "test": str(lm_rows)},
                  tmp_path / "hf")
    mine = get_task("mgsm_fr", TaskOptions(limit=4, data_dir=SHARED))
    for doc, lm_doc in zip(mine.docs(), ref.test_docs()):
        req = mine.requests(doc)[0]
        assert req.context == ref.fewshot_context(lm_doc, 0)
        assert req.context.endswith("\nRéponse :")
        assert list(req.stop) == ref.config.generation_kwargs["until"]
        target = ref.doc_to_target(lm_doc)
        for resp in (f" {target}", f" {target} $", f" environ {target}.\n", " 1", "  "):
            rec = mine.process(doc, [[resp]])
            flex = lm_regex(FLEXIBLE, -1, resp)
            assert rec.metrics["exact_match,flexible-extract"] == float(lm_exact_match(
                flex, str(target), ignore_case=True, ignore_punctuation=True))
            assert rec.metrics["exact_match,remove_whitespace"] == float(lm_exact_match(
                resp.strip(), str(target), ignore_case=True, ignore_punctuation=True))
    with pytest.raises(LlmkitError):
        get_task("mgsm_fr", TaskOptions(shots=2))


# ------------------------------------------------------------------------------------------ humaneval
def humaneval_rows(k: int) -> list[dict]:
    with gzip.open(shared_path("eval/humaneval/HumanEval.jsonl.gz"), "rt", encoding="utf-8") as f:
        return [json.loads(next(f)) for _ in range(k)]


@pytest.mark.slow
def test_humaneval_canonical_passes_wrong_fails():
    import jinja2
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(lm_tasks() / "humaneval/humaneval.yaml", resolve_func=False)
    task = get_task("humaneval", TaskOptions(data_dir=SHARED))
    assert task.max_tokens == 512 and list(task.stop) == cfg["generation_kwargs"]["until"]
    for row in humaneval_rows(3):
        doc = {"id": row["task_id"], **row}
        req = task.requests(doc)[0]
        assert req.context == jinja2.Template(cfg["doc_to_text"]).render(**row) and req.temperature == 0
        # lm-eval: prediction = prompt + completion; HF code_eval runs prediction + "\n" + doc_to_target
        lm_program = row["prompt"] + row["canonical_solution"] + "\n" + \
            jinja2.Template(cfg["doc_to_target"]).render(**row)
        assert HumanEval.program(doc, row["canonical_solution"]).rstrip("\n") == lm_program
        good = task.process(doc, [[row["canonical_solution"]]])
        assert good.metrics == {"pass@1": 1.0}, good.data
        bad = task.process(doc, [["    return None\n"]])
        assert bad.metrics == {"pass@1": 0.0} and bad.data["status"] == ["failed"]
        assert "Error" in bad.data["detail"]


@pytest.mark.slow
def test_humaneval_pass_at_k_with_samples():
    task = get_task("humaneval", TaskOptions(extra={"n": "10", "temperature": "0.8", "timeout": "2"}))
    row = humaneval_rows(1)[0]
    doc = {"id": row["task_id"], **row}
    req = task.requests(doc)[0]
    assert (req.n, req.temperature) == (10, 0.8)
    comps = [row["canonical_solution"]] * 3 + ["    return None\n"] * 6 + ["    while True:\n        pass\n"]
    rec = task.process(doc, [comps])
    # 3 of 10 pass: pass@1 = 3/10, pass@10 = 1 (every 10-subset holds a pass)
    assert rec.metrics == pytest.approx({"pass@1": 0.3, "pass@10": 1.0})
    assert rec.data["status"].count("timeout") == 1 and sum(rec.data["passed"]) == 3


def test_humaneval_needs_temperature_for_samples():
    with pytest.raises(LlmkitError, match="temperature"):
        get_task("humaneval", TaskOptions(extra={"n": "5"}))
    with pytest.raises(LlmkitError, match="not a valid int"):
        get_task("humaneval", TaskOptions(extra={"n": "zero"}))


# ------------------------------------------------------------------------------------------------- qa
@pytest.mark.parametrize("response,answer,ok", [
    (" 42", 42, True),
    (" It costs $1,234.", "1,234", True),
    (" first 3 then 4.5", 4.5, True),
    (" 4.5000001", 4.5, True),  # within 1e-6
    (" 4.51", 4.5, False),
    (" 12 apples, -3 left", -3, True),
    (" nothing", 7, False),
    (" The Eiffel Tower!", "eiffel tower", True),
    (" Paris\nThe capital of France.", "Paris", True),  # the first line is the answer
    (" an apple", "Apple.", True),
    (" Lyon", "Paris", False),
    ("", "Paris", False),
])
def test_qa_matching(response, answer, ok):
    assert qa_match(response, answer)[0] is ok


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


@pytest.mark.parametrize("row,field", [
    ({"answer": 3}, "question"),
    ({"question": "q"}, "answer"),
    ({"question": "q", "answer": [1]}, "answer"),
    ({"question": 5, "answer": "x"}, "question"),
    ({"question": "  ", "answer": "x"}, "question"),
    ("{not json", "JSON"),
    ("[1, 2]", "object"),
])
def test_qa_bad_records_name_file_line_field(tmp_path, row, field):
    f = write_jsonl(tmp_path / "mine.jsonl", [{"question": "ok?", "answer": "yes"}, row])
    with pytest.raises(LlmkitError) as e:
        get_task("qa", TaskOptions(data=[str(f)])).docs()
    msg = str(e.value)
    assert "mine.jsonl, line 2" in msg and field in msg and "\n" not in msg


def test_qa_needs_data_and_valid_template(tmp_path):
    with pytest.raises(LlmkitError, match="--data"):
        get_task("qa", TaskOptions()).docs()
    f = write_jsonl(tmp_path / "q.jsonl", [{"question": "a?", "answer": 1}])
    task = get_task("qa", TaskOptions(data=[str(f)], template="Q: {question} ({unit})\nA:"))
    with pytest.raises(LlmkitError, match="unit"):
        task.requests(task.docs()[0])


QA_ROWS = [{"id": "a", "question": "2 + 2?", "answer": 4}, {"id": "b", "question": "Capital of France?",
           "answer": "Paris"}, {"id": "c", "question": "10 / 4?", "answer": "2.5"},
           {"id": "d", "question": "Colour of the sky?", "answer": "blue"}]
QA_REPLIES = {"2 + 2?": " 2 + 2 = 4", "Capital of France?": " Paris.", "10 / 4?": " 2.5\n\nQuestion:",
              "Colour of the sky?": " green"}


def test_qa_end_to_end_with_a_canned_backend(tmp_path):
    from llmkit.eval.runner import evaluate

    f = write_jsonl(tmp_path / "quiz.jsonl", QA_ROWS)
    backend = Canned(lambda r: [QA_REPLIES[r.context.split("Question: ")[-1].split("\n")[0]]])
    res = evaluate(backend, ["qa"], data=[str(f)], cache=False, progress=False)
    m = res["tasks"]["qa"]["metrics"]["exact_match"]
    # per item 1, 1, 1, 0: mean 0.75, sample sd 0.5, stderr 0.5 / sqrt(4)
    assert m["value"] == pytest.approx(0.75) and m["stderr"] == pytest.approx(0.25)
    assert [r.context for r in backend.seen][0] == "Question: 2 + 2?\nAnswer:"
    assert all(r.stop == ("\n\n", "Question:") and r.temperature == 0 for r in backend.seen)


def test_qa_few_shot_draws_exclude_the_item(tmp_path):
    f = write_jsonl(tmp_path / "quiz.jsonl", QA_ROWS)
    task = get_task("qa", TaskOptions(data=[str(f)], shots=2, seed=7))
    for doc in task.docs():
        ctx = task.requests(doc)[0].context
        blocks = ctx.split("\n\n")
        assert len(blocks) == 3 and blocks[-1] == f"Question: {doc['question']}\nAnswer:"
        assert doc["question"] not in "".join(blocks[:-1])
    again = get_task("qa", TaskOptions(data=[str(f)], shots=2, seed=7, limit=2))
    assert [again.requests(d)[0].context for d in again.docs()] == \
        [task.requests(d)[0].context for d in task.docs()[:2]]  # the same draws whatever --limit


@pytest.mark.slow
def test_gsm8k_and_humaneval_end_to_end_with_a_canned_backend():
    from llmkit.eval.runner import evaluate

    rows = {r["prompt"]: r["canonical_solution"] for r in humaneval_rows(4)}
    test = [json.loads(x) for x in shared_path("eval/gsm8k_test.jsonl").read_text().splitlines()[:4]]
    answers = {t["question"]: t["answer"].split("####")[-1].strip() for t in test}

    def answer(r: Request) -> list[str]:
        if r.context in rows:
            return [rows[r.context]]
        q = r.context.split("Question: ")[-1].split("\nAnswer:")[0]
        return [f" Worked out.\n#### {answers[q]}" if q != test[3]["question"] else " The answer is 0."]

    res = evaluate(Canned(answer), ["gsm8k", "humaneval"], limit=4, data_dir=SHARED, cache=False,
                   progress=False)
    g = res["tasks"]["gsm8k"]["metrics"]
    assert g["exact_match,strict-match"]["value"] == pytest.approx(0.75)
    assert res["tasks"]["humaneval"]["metrics"]["pass@1"]["value"] == 1.0
    assert math.isfinite(g["exact_match,flexible-extract"]["value"])

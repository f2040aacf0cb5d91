"""The evaluation runner: results files, standard errors, the resume cache, --compare, one-line CLI errors.

A fake backend and a fake task (hand-computable answers) isolate the runner from models; the tasks and
backends have their own tests against lm-eval."""

from __future__ import annotations

import json
import math
import statistics

import pytest

from llmkit.errors import LlmkitError
from llmkit.eval.backends import Backend
from llmkit.eval.base import TASKS, LogLikelihood, Record, Request, Task, mean_stderr, register
from llmkit.eval.results import compare, load_results
from llmkit.eval.runner import evaluate


@register("_toy")
class Toy(Task):
    """Item i asks 'which of 0..3 is i % 4?'; the fake backend likes choice (i * 7) % 4 best."""

    name = "_toy"
    kind = "loglikelihood"
    description = "test task"
    higher_is_better = {"acc": True}

    def docs(self):
        n = self.opts.limit or 40
        return [{"id": f"q{i}", "i": i} for i in range(n)]

    def requests(self, doc):
        return [Request("loglikelihood", f"item {doc['i']}:", f" {c}") for c in range(4)]

    def process(self, doc, answers):
        best = max(range(4), key=lambda c: answers[c].logprob)
        return Record(doc["id"], {"acc": float(best == doc["i"] % 4)}, {"chosen": best})


class Fake(Backend):
    name = "fake"

    def __init__(self, fail_after: int | None = None):
        self.calls = 0
        self.seen: list[str] = []
        self.fail_after = fail_after

    def info(self):
        return {"backend": "fake", "model": "toy"}

    def loglikelihood(self, reqs):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C in the middle
        out = []
        for r in reqs:
            i, c = int(r.context.split()[1].rstrip(":")), int(r.continuation)
            self.seen.append(r.context)
            out.append(LogLikelihood(-1.0 if c == (i * 7) % 4 else -2.0, False, 1))
        return out


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMKIT_CACHE", str(tmp_path / "cache"))


def test_results_files_and_stderr(tmp_path):
    res = evaluate(Fake(), ["_toy"], limit=40, out=tmp_path / "run", progress=False)
    # (i * 7) % 4 == i % 4  <=>  6i % 4 == 0  <=>  i even: 20 of 40 right
    hand = [float(i % 2 == 0) for i in range(40)]
    m = res["tasks"]["_toy"]["metrics"]["acc"]
    assert m["value"] == 0.5
    assert math.isclose(m["stderr"], statistics.stdev(hand) / math.sqrt(40))
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert on_disk["tasks"]["_toy"]["n"] == 40 and on_disk["model"]["model"] == "toy"
    lines = (tmp_path / "run" / "samples.jsonl").read_text().splitlines()
    assert [json.loads(x)["id"] for x in lines] == [f"q{i}" for i in range(40)]
    assert (tmp_path / "run" / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_interrupted_run_resumes_with_the_same_numbers(tmp_path):
    clean = evaluate(Fake(), ["_toy"], limit=200, cache=False, progress=False)
    first = Fake(fail_after=2)  # two chunks of 64 items done, then Ctrl-C
    with pytest.raises(KeyboardInterrupt):
        evaluate(first, ["_toy"], limit=200, progress=False)
    again = Fake()
    res = evaluate(again, ["_toy"], limit=200, progress=False)
    assert len(again.seen) == (200 - 128) * 4  # only the items not done before
    assert res["tasks"]["_toy"]["cached_items"] == 128
    assert res["tasks"]["_toy"]["metrics"] == clean["tasks"]["_toy"]["metrics"]
    # another setting (limit) is another cache entry: everything runs
    other = Fake()
    evaluate(other, ["_toy"], limit=100, progress=False)
    assert len(other.seen) == 400


def test_mean_stderr_matches_statistics():
    xs = [0.0, 1.0, 1.0, 0.5, 0.25]
    m, s = mean_stderr(xs)
    assert math.isclose(m, statistics.mean(xs)) and math.isclose(s, statistics.stdev(xs) / math.sqrt(5))
    assert mean_stderr([1.0]) == (1.0, None)


def _res(acc, stderr):
    return {"model": {"model": "m"}, "tasks": {"t": {"n": 100, "main_metric": "acc", "metrics": {
        "acc": {"value": acc, "stderr": stderr}, "acc/sub": {"value": 0.1, "stderr": None}}}}}


def test_compare_marks_significant_differences(tmp_path):
    out = compare(_res(0.40, 0.01), _res(0.50, 0.01))  # 0.10 > 2 * hypot(0.01, 0.01) = 0.028
    row = next(line for line in out.splitlines() if line.startswith("t "))
    assert "40.00" in row and "50.00" in row and "+10.00" in row and row.rstrip().endswith("*")
    out = compare(_res(0.40, 0.03), _res(0.42, 0.03))
    row = next(line for line in out.splitlines() if line.startswith("t "))
    assert not row.rstrip().endswith("*")
    assert "acc/sub" not in out
    (tmp_path / "x.json").write_text('{"a": 1}')
    with pytest.raises(LlmkitError, match="not an llmkit eval results.json"):
        load_results(tmp_path / "x.json")
    with pytest.raises(LlmkitError, match="no results at"):
        load_results(tmp_path / "missing")


def test_cli_compare_and_one_line_errors(tmp_path, capsys):
    from llmkit.cli import main

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "results.json").write_text(json.dumps(_res(0.4, 0.01)))
    (tmp_path / "b.json").write_text(json.dumps(_res(0.5, 0.01)))
    assert main(["eval", "--compare", str(tmp_path / "a"), str(tmp_path / "b.json"),
                 "--out", str(tmp_path / "cmp")]) == 0
    assert "+10.00" in capsys.readouterr().out
    assert (tmp_path / "cmp" / "compare.png").exists()
    for argv, msg in ((["eval"], "no task given"),
                      (["eval", "--task", "nope"], "unknown task 'nope'; known tasks:"),
                      (["eval", "--task", "_toy", "--task-arg", "oops"], "expected KEY=VALUE"),
                      (["eval", "--task", "_toy", "--limit", "0"], "--limit must be >= 1")):
        assert main(argv) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], (argv, err)


def test_list_shows_every_registered_task(capsys):
    from llmkit.cli import main

    assert main(["eval", "--list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in TASKS)


def test_shots_per_task_and_task_arg_checks():
    res = evaluate(Fake(), ["_toy:0", "_toy:3"], limit=8, progress=False, cache=False)
    assert list(res["tasks"]) == ["_toy:0", "_toy:3"]
    assert [r["config"]["shots"] for r in res["tasks"].values()] == [0, 3]
    with pytest.raises(LlmkitError, match="expected NAME or NAME:SHOTS"):
        evaluate(Fake(), ["_toy:x"])
    with pytest.raises(LlmkitError, match="given twice"):
        evaluate(Fake(), ["_toy", "_toy"])
    with pytest.raises(LlmkitError, match="unknown --task-arg zzz"):
        evaluate(Fake(), ["_toy"], task_args={"zzz": "1"})


@pytest.mark.slow
def test_cli_end_to_end_with_an_adapter(tiny_llama_dir, tmp_path, capsys):
    """`llmkit eval MODEL --task hellaswag --out DIR` on a real folder, then with a PEFT adapter: the files
    are written, the table printed, and the adapter (random B, so not a no-op) changes the log-likelihoods
    exactly as applying it in Python does."""
    from conftest import shared_path

    shared_path("eval/hellaswag/hellaswag_val.jsonl")
    import torch

    import llmkit
    from llmkit.cli import main
    from llmkit.eval.backends import LocalBackend
    from llmkit.eval.base import get_task
    from llmkit.lora import apply_lora, save_adapter

    llm = llmkit.load(tiny_llama_dir)
    apply_lora(llm.model, r=2, alpha=4, targets=("q_proj", "down_proj"))
    torch.manual_seed(0)
    for name, p in llm.model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    save_adapter(llm, tmp_path / "adapter")
    for out, extra in (("base", []), ("tuned", ["--adapter", str(tmp_path / "adapter")])):
        assert main(["eval", str(tiny_llama_dir), "--task", "hellaswag", "--limit", "3", "-q", "--no-cache",
                     "--out", str(tmp_path / out), *extra]) == 0
        assert "hellaswag" in capsys.readouterr().out
    rows = {out: [json.loads(x) for x in (tmp_path / out / "samples.jsonl").read_text().splitlines()]
            for out in ("base", "tuned")}
    assert [r["logprobs"] for r in rows["base"]] != [r["logprobs"] for r in rows["tuned"]]
    task = get_task("hellaswag")
    docs = task.docs()[:3]
    backend = LocalBackend(llm)  # the adapter applied in Python
    want = [task.process(d, backend.run(task.requests(d))).data["logprobs"] for d in docs]
    assert [r["logprobs"] for r in rows["tuned"]] == [pytest.approx(w, abs=1e-4) for w in want]
    res = json.loads((tmp_path / "tuned" / "results.json").read_text())
    assert res["settings"]["adapter"] == str(tmp_path / "adapter")
    assert res["tasks"]["hellaswag"]["metrics"]["acc"]["value"] == pytest.approx(
        sum(r["metrics"]["acc"] for r in rows["tuned"]) / 3)

"""The lab framework (llmkit.lab): registry, results on disk, language formatting, errors, the CLI verb."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import llmkit.lab as labmod
from llmkit.errors import LlmkitError
from llmkit.lab import LABS, LabContext, get_lab, lab, run_lab

EXPECTED = {"mlp-curves", "regularization", "vanishing-gradient", "ngram-vs-llm", "token-lengths",
            "attention", "rnn-vs-attention", "zero-shot-vs-supervised", "temperature-entropy",
            "prompt-benchmark", "tp1", "tp2", "tp3", "bpe", "embeddings", "logit-lens", "kv-cache",
            "quantization", "scaling"}


@pytest.fixture
def toy_lab():
    @lab("toy-test-lab", fr="Un labo jouet", en="A toy lab", course="")
    def toy(ctx: LabContext) -> None:
        plt = labmod.pyplot()
        xs = [1, 2, 3]
        ys = [x * x for x in xs]
        fig, ax = plt.subplots()
        ax.plot(xs, ys)
        ctx.figure(fig, "squares")
        ctx.table("squares", [{"x": x, "x²": y} for x, y in zip(xs, ys)])
        ctx.data(total=sum(ys))
        ctx.finding(f"La somme vaut {ctx.num(sum(ys) / 4)}.", f"The sum is {ctx.num(sum(ys) / 4)}.")

    yield "toy-test-lab"
    LABS.pop("toy-test-lab", None)


def test_run_lab_writes_figures_findings_and_json(toy_lab, tmp_path):
    res = run_lab(toy_lab, out=tmp_path, lang="fr", progress=False)
    folder = tmp_path / toy_lab
    assert res.out == folder and res.findings == ["La somme vaut 3,50."]
    png = folder / "squares.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    md = (folder / "findings.md").read_text()
    assert md.startswith("# Un labo jouet") and "| 3 | 9 |" in md and "![squares](squares.png)" in md
    js = json.loads((folder / "result.json").read_text())
    assert js["data"] == {"total": 14} and js["figures"] == ["squares.png"] and js["lang"] == "fr"
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]  # atomic writes leave nothing behind
    en = run_lab(toy_lab, out=tmp_path, lang="en", progress=False)
    assert en.findings == ["The sum is 3.50."] and en.title == "A toy lab"


def test_number_formatting_follows_the_language(toy_lab, tmp_path):
    fr = LabContext(get_lab(toy_lab), tmp_path, "fr", True, None, 0)
    en = LabContext(get_lab(toy_lab), tmp_path, "en", True, None, 0)
    assert fr.num(3.14159) == "3,14" and en.num(3.14159) == "3.14"
    assert fr.pct(0.615) == "61,5 %" and en.pct(0.615) == "61.5 %"
    assert fr.num(12345) == "12\u202f345" and en.num(12345) == "12,345"


def test_errors_are_one_line(tmp_path):
    with pytest.raises(LlmkitError, match="unknown lab 'atention'.*did you mean attention"):
        get_lab("atention")
    with pytest.raises(LlmkitError, match="--lang 'de'"):
        run_lab("bpe", lang="de", out=tmp_path)


def test_missing_course_data_is_reported_before_work(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMKIT_SHARED", str(tmp_path / "nowhere"))
    needing = [lb for lb in labmod.list_labs() if lb.needs_data]
    assert needing, "labs reading ../shared/data must declare it (needs_data)"
    with pytest.raises(LlmkitError, match="lab data not found: .*nowhere/data/.*LLMKIT_SHARED"):
        run_lab(needing[0].name, out=tmp_path)


def test_every_course_lab_is_registered_in_order():
    labs = labmod.list_labs()
    assert EXPECTED <= {lb.name for lb in labs}
    numbered = [int(lb.course) for lb in labs if lb.course.isdigit()]
    assert sorted(set(numbered)) == list(range(1, 11)) and numbered == sorted(numbered)
    for lb in labs:
        assert lb.title["fr"] and lb.title["en"]


def test_cli_lists_labs_and_needs_a_name():
    run = [sys.executable, "-m", "llmkit", "lab"]
    out = subprocess.run(run + ["--list", "--lang", "en"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "vanishing-gradient" in out.stdout and "[3]" in out.stdout
    bare = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert bare.returncode == 2 and "give a lab NAME" in bare.stderr
    bad = subprocess.run(run + ["nope"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "unknown lab 'nope'" in bad.stderr

"""Every lab runs with --quick and writes non-empty PNGs and findings that quote numbers from the run.

The labs the notebooks call (experiments 1-10 and TP1-TP3) run in tests/test_notebooks.py, which makes the
same checks on their output folders; the others run here, in one process (the model loads once)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from conftest import SHARED

from llmkit.lab import list_labs, run_lab

NOTEBOOK_LABS = {"mlp-curves", "regularization", "vanishing-gradient", "ngram-vs-llm", "token-lengths",
                 "attention", "rnn-vs-attention", "zero-shot-vs-supervised", "temperature-entropy",
                 "prompt-benchmark", "tp1", "tp2", "tp3"}
OTHERS = sorted(lb.name for lb in list_labs() if lb.name not in NOTEBOOK_LABS)
NUMBER = re.compile(r"\d")


def check_output(res) -> None:
    assert res.figures, f"{res.name}: no figure"
    for png in res.figures:
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000, f"{png}: empty or not a PNG"
    numbered = [f for f in res.findings if NUMBER.search(f)]
    assert len(numbered) >= 2, f"{res.name}: findings quote fewer than 2 numbers: {res.findings}"
    assert res.data, f"{res.name}: no key figures in result.json"
    assert (res.out / "findings.md").read_text().count("\n- ") >= 2


@pytest.mark.slow
@pytest.mark.parametrize("name", OTHERS)
def test_lab_quick(name, out_dir):
    from llmkit.lab import get_lab

    lb = get_lab(name)
    if lb.needs_data and not SHARED.is_dir():
        pytest.skip(f"shared data not found at {SHARED}")
    lang = "en" if name in ("kv-cache", "logit-lens") else "fr"  # both languages get exercised
    res = run_lab(name, quick=True, lang=lang, out=out_dir, progress=False)
    check_output(res)


@pytest.mark.slow
def test_cli_runs_a_lab_and_prints_findings(tmp_path):
    out = subprocess.run([sys.executable, "-m", "llmkit", "lab", "bpe", "--quick", "--lang", "en", "--out",
                          str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert sum(1 for ln in lines if ln.startswith("- ") and NUMBER.search(ln)) >= 2
    assert (tmp_path / "bpe" / "findings.md").exists() and list((tmp_path / "bpe").glob("*.png"))

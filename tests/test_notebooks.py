"""The course notebooks (notebooks/*.ipynb) match their build script and run top to bottom in a Jupyter kernel
on --quick settings, the way a student runs them (cwd = notebooks/).

Each notebook runs its lab once: these runs are the quick-run tests of experiments 1-10 and TP1-TP3
(tests/test_lab_runs.py runs the other labs). After a run: no error output, the notebook displayed the
findings (Markdown) and the figures (PNG), and the lab's folder holds non-empty PNGs, a findings.md with at
least two findings quoting a number, and a result.json with key figures.

Notable choices
- One kernel for the whole file, its namespace wiped (`%reset -f`) before each notebook: a notebook cannot
  lean on another one's variables, while the kernel start, the torch import and the model load (~6 s per
  notebook on a quiet 2-core CPU, ~20 s on a busy one) are paid once, like the one process of
  test_lab_runs.py. A failed notebook restarts the kernel, so the next one starts clean.
- The kernel is pinned to this interpreter: a kernel spec "python3" whose argv is sys.executable, first on
  JUPYTER_PATH, so a user-level "python3" kernel elsewhere cannot take over; each test checks the kernel's
  sys.executable.
- Labs that need the default model or ../shared data are `slow` and skip with the reason when it is missing.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import sys
from pathlib import Path

import nbformat
import pytest
from conftest import ROOT, shared_path
from jupyter_client import AsyncKernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from nbclient.util import run_sync

NOTEBOOKS = ROOT / "notebooks"
CELL_TIMEOUT = 600  # s per cell: a quick lab takes seconds alone, more on a shared 2-core CPU
NUMBER = re.compile(r"\d")
# the course's experiments 1-10 and practical sessions (issue 12): each has its notebook
COURSE_LABS = {"mlp-curves", "regularization", "vanishing-gradient", "ngram-vs-llm", "token-lengths",
               "attention", "rnn-vs-attention", "zero-shot-vs-supervised", "temperature-entropy",
               "prompt-benchmark", "tp1", "tp2", "tp3"}


def _load_build():
    spec = importlib.util.spec_from_file_location("notebooks_build", NOTEBOOKS / "build.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


build = _load_build()


def _registered() -> dict:
    """The labs that import cleanly now; a broken or missing one fails its own test, not collection."""
    from llmkit.lab import list_labs

    try:
        return {lb.name: lb for lb in list_labs()}
    except Exception:
        return {}


LABS = _registered()


def _params():
    for spec in build.SPECS:
        lb = LABS.get(spec.lab)
        slow = spec.needs_model or lb is None or lb.needs_model or bool(lb.needs_data)
        yield pytest.param(spec, id=spec.stem, marks=[pytest.mark.slow] if slow else [])


def test_notebooks_are_what_build_py_writes():
    """The committed notebooks are the script's output (no outputs, fixed cell ids), one per course lab."""
    on_disk = {p.stem for p in NOTEBOOKS.glob("*.ipynb")}
    assert on_disk == {s.stem for s in build.SPECS}, "notebooks/ and build.SPECS differ"
    assert {s.lab for s in build.SPECS} == COURSE_LABS
    for spec in build.SPECS:
        path = NOTEBOOKS / f"{spec.stem}.ipynb"
        assert path.read_text(encoding="utf-8") == build.text(build.build(spec)), (
            f"{path.name} is out of date: run python notebooks/build.py")
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), f"{path.name} has outputs"
        assert "LLMKIT_LAB_QUICK" in code[0].source and "parameters" in code[0].metadata.get("tags", [])
        assert sum(f'run_lab("{spec.lab}", lang="fr", quick=QUICK, out=OUT)' in c.source for c in code) == 1
        assert nb.cells[0].source.startswith("# ") and nb.cells[-1].source.startswith("## À vous")


def test_registered_course_labs_have_a_notebook():
    """A lab numbered in the course (experiment or TP) that no notebook calls would go untested."""
    from llmkit.lab import list_labs

    numbered = {lb.name for lb in list_labs() if lb.course.isdigit() or lb.course.startswith("TP")}
    assert numbered == COURSE_LABS, "the course's labs are not all registered"
    assert numbered <= {s.lab for s in build.SPECS}


OUT = ROOT / "test-output" / "notebooks"  # the labs' figures, worth a look after a run


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    """One python3 kernel (this interpreter), started in notebooks/ with LLMKIT_LAB_QUICK=1 and OUT."""
    spec = tmp_path_factory.mktemp("jupyter") / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (llmkit tests)", "language": "python"}))
    env = {"LLMKIT_LAB_QUICK": "1", "LLMKIT_LAB_OUT": str(OUT), "JUPYTER_PLATFORM_DIRS": "1"}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", str(spec.parent.parent))  # where the kernel manager finds "python3"
        km = AsyncKernelManager(kernel_name="python3")
        km.kernel_spec  # resolved (and cached) now
    # the kernel's environment and folder, kept by restart_kernel
    run_sync(km.start_kernel)(cwd=str(NOTEBOOKS), env={**os.environ, **env})
    try:
        yield km
    finally:
        run_sync(km.shutdown_kernel)(now=True)


def execute(path: Path, km: AsyncKernelManager) -> nbformat.NotebookNode:
    """Run every cell of the notebook in the kernel, after wiping its namespace; return it executed."""
    nb = nbformat.read(path, as_version=4)
    nb.cells.insert(0, nbformat.v4.new_code_cell("%reset -f"))
    nb.cells.append(nbformat.v4.new_code_cell("import sys\nprint(sys.executable)"))
    client = NotebookClient(nb, km=km, timeout=CELL_TIMEOUT, startup_timeout=120)
    try:
        client.execute()
    except Exception as e:
        run_sync(km.restart_kernel)(now=True)  # a clean kernel for the next notebook
        if isinstance(e, CellExecutionError):
            pytest.fail(f"{path.name} failed:\n{e}")
        raise
    finally:
        if client.kc is not None:
            client.kc.stop_channels()
    return nb


def check_lab_folder(folder: Path) -> None:
    pngs = sorted(folder.glob("*.png"))
    assert pngs, f"{folder}: no PNG"
    for png in pngs:
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000, f"{png}: empty or not a PNG"
    findings = [ln for ln in (folder / "findings.md").read_text(encoding="utf-8").splitlines()
                if ln.startswith("- ")]
    assert sum(bool(NUMBER.search(f)) for f in findings) >= 2, f"{folder}: fewer than 2 numbered findings"
    result = json.loads((folder / "result.json").read_text(encoding="utf-8"))
    assert result["quick"] is True and result["lang"] == "fr", "the notebook did not run quick, in French"
    assert result["data"], f"{folder}: no key figures in result.json"


@pytest.mark.parametrize("spec", list(_params()))
def test_notebook_runs(spec, request):
    from llmkit.errors import LlmkitError
    from llmkit.lab import get_lab

    try:
        lb, missing = get_lab(spec.lab), ""
    except LlmkitError as e:
        lb, missing = None, str(e)
    if lb is None:
        pytest.fail(f"{spec.stem}.ipynb calls lab {spec.lab!r}, which is not registered: {missing}")
    for rel in lb.needs_data:
        shared_path(rel)
    if spec.needs_model or lb.needs_model:
        request.getfixturevalue("smollm2_gguf")
    shutil.rmtree(OUT / lb.name, ignore_errors=True)  # no stale figure from an earlier run counts

    nb = execute(NOTEBOOKS / f"{spec.stem}.ipynb", request.getfixturevalue("kernel"))

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    shown = [o.get("data", {}) for o in outputs if o.output_type in ("display_data", "execute_result")]
    assert any("image/png" in d for d in shown), "the notebook showed no figure"
    assert any("text/markdown" in d for d in shown), "the notebook did not show the findings"
    assert nb.cells[-1].outputs[0]["text"].strip() == sys.executable, "the kernel ran another interpreter"
    check_lab_folder(OUT / lb.name)

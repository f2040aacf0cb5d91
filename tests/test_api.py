"""llmkit.load and LLM on tiny synthetic checkpoints (GGUF and HF folder); the tokenizer is stubbed here
(the real one is exercised with SmolLM2 in test_gguf_smollm2.py)."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from gguf_synth import tiny_hf_model, write_gguf

import llmkit
from llmkit.errors import LlmkitError
from llmkit.tokenizer import Tokenizer

IDS = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def stub_tokenizer(monkeypatch):
    monkeypatch.setattr(Tokenizer, "from_gguf", classmethod(lambda cls, src: ("gguf-tokenizer", src)))
    monkeypatch.setattr(Tokenizer, "load", classmethod(lambda cls, path: ("hf-tokenizer", path)))


@pytest.fixture
def tiny(tmp_path):
    model, cfg, tensors = tiny_hf_model("qwen3", tmp_path)
    write_gguf(tmp_path / "m.gguf", "qwen3", cfg, tensors, "F32")
    with torch.no_grad():
        ref = model(IDS).logits
    return tmp_path, ref


def test_load_gguf_and_hf_folder(tiny, stub_tokenizer):
    tmp, ref = tiny
    g = llmkit.load(tmp / "m.gguf", device="cpu")
    h = llmkit.load(tmp / "hf", device="cpu")
    assert g.tokenizer[0] == "gguf-tokenizer" and h.tokenizer == ("hf-tokenizer", tmp / "hf")
    for llm in (g, h):
        assert not llm.model.training and llm.dtype == torch.float32 and llm.device.type == "cpu"
        assert llm.config.model_type == "qwen3" and llm.config.qk_norm
        with torch.no_grad():
            torch.testing.assert_close(llm.model(IDS), ref, atol=1e-4, rtol=0)
    assert g.name == str(tmp / "m.gguf") and g.path == tmp / "m.gguf" and h.path == tmp / "hf"


def test_load_dtype(tiny, stub_tokenizer):
    tmp, ref = tiny
    llm = llmkit.load(tmp / "m.gguf", device="cpu", dtype="bf16")
    assert llm.dtype == torch.bfloat16 and "dtype=bfloat16" in repr(llm)
    with torch.no_grad():
        assert (llm.model(IDS).float() - ref).abs().max() < 0.1
    with pytest.raises(LlmkitError, match="bad dtype 'int3'"):
        llmkit.load(tmp / "m.gguf", device="cpu", dtype="int3")


def test_quantize_hook_calls_llmkit_quant(tiny, stub_tokenizer, monkeypatch):
    tmp, _ = tiny
    calls = []
    fake = types.ModuleType("llmkit.quant")
    fake.quantize_model = lambda model, mode: calls.append((type(model).__name__, mode, model.training))
    monkeypatch.setitem(sys.modules, "llmkit.quant", fake)
    llm = llmkit.load(tmp / "m.gguf", device="cpu", quantize="int8")
    assert calls == [("Transformer", "int8", False)] and not llm.model.training


def test_quantize_without_quant_module(tiny, stub_tokenizer, monkeypatch):
    tmp, _ = tiny
    monkeypatch.setitem(sys.modules, "llmkit.quant", None)
    with pytest.raises(LlmkitError, match="quantize='int8' needs llmkit.quant"):
        llmkit.load(tmp / "m.gguf", device="cpu", quantize="int8")

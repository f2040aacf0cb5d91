"""llmkit.load and LLM on tiny synthetic checkpoints (GGUF and HF folder); the tokenizer is stubbed here
(the real one is exercised with SmolLM2 in test_gguf_smollm2.py)."""

from __future__ import annotations

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


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantize_streams_into_quantized_modules(tiny, stub_tokenizer, mode):
    """quantize= fills quantized modules while loading (no float Linear is ever built), GGUF and HF folders;
    logits stay near the float model's (the transformers reference)."""
    from llmkit.quant import Int4Linear, Int8Embedding, Int8Linear

    tmp, ref = tiny
    for src in (tmp / "m.gguf", tmp / "hf"):
        llm = llmkit.load(src, device="cpu", quantize=mode)
        kinds = {type(m) for m in llm.model.modules()}
        assert torch.nn.Linear not in kinds and Int8Linear in kinds and Int8Embedding in kinds
        assert (Int4Linear in kinds) == (mode == "int4") and not llm.model.training
        assert llm.model.quantization["mode"] == mode
        with torch.no_grad():
            assert (llm.model(IDS) - ref).abs().max() < (0.1 if mode == "int8" else 0.35) * ref.abs().max()
    with pytest.raises(LlmkitError, match="quantize='int3': choose int8, int4 or none"):
        llmkit.load(tmp / "m.gguf", device="cpu", quantize="int3")


def test_float_gguf_stays_float_by_default(tiny, stub_tokenizer):
    tmp, _ = tiny
    llm = llmkit.load(tmp / "m.gguf", device="cpu")  # an F32 file: its own precision is float
    assert getattr(llm.model, "quantization", None) is None and llm.dtype == torch.float32

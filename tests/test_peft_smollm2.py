"""PEFT interop both ways on the real default model, SmolLM2-135M-Instruct (issue 10, Proof: "PEFT interop
both ways on a tiny random Llama and on SmolLM2 (logits <= 1e-4)"; the tiny Llama is tests/test_lora.py):

    llmkit.load(GGUF, dtype="float32").save_hf(HF)              # the default model as an HF folder
    transformers.AutoModelForCausalLM.from_pretrained(HF)        # the reference, float32
    (a) peft.get_peft_model(hf, LoraConfig(r=4, ..., init_lora_weights=False)).save_pretrained(P)
        llmkit.load(HF, adapter=P)                               # logits == peft's within 1e-4
    (b) apply_lora(llmkit model) + random B, save_adapter(L)
        peft.PeftModel.from_pretrained(hf, L)                    # logits == llmkit's within 1e-4

Every projection of all 30 blocks is adapted (q/k/v/o/gate/up/down: 210 LoRA modules), so llmkit's fused
q/k/v and gate/up paths are covered. Each side is also checked to move the logits far more than the
tolerance (an adapter that silently failed to load would give the base logits), and the two base models are
compared first so that a failure points at the adapter, not at the export.

Skips (with the reason) when the default model is not in llmkit's cache: this test never downloads. One
GGUF load, one export, one transformers load and two llmkit loads of the HF folder, on one thread.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPT = "Le petit chat dort sur le toit. The capital of France is"
TOL = 1e-4


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """(HF folder of the default model, transformers model on it (float32, eval), prompt ids (1, T),
    transformers' base logits (1, T, V))."""
    from llmkit.hub import DEFAULT_MODEL, named_model_path

    gguf = named_model_path(DEFAULT_MODEL)
    if not gguf.is_file():
        pytest.skip(f"default model {DEFAULT_MODEL} not in the cache ({gguf}); "
                    f"run `llmkit pull {DEFAULT_MODEL}` first")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("peft")
    import llmkit

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a busy 2-core machine; the forwards are 16 tokens
    hf_dir = tmp_path_factory.mktemp("smollm2_hf") / "hf"
    llm = llmkit.load(gguf, device="cpu", dtype="float32")
    llm.save_hf(hf_dir)
    ids = torch.tensor([llm.tokenizer.encode(PROMPT)])  # (1, T)
    del llm
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        base = hf(ids).logits  # (1, T, V)
    yield hf_dir, hf, ids, base
    torch.set_num_threads(threads)


def _llmkit_logits(llm, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return llm.model.eval()(ids)  # (1, T, V)


def test_exported_base_matches_transformers(smol):
    import llmkit

    hf_dir, _, ids, base = smol
    assert ids.shape[1] >= 8 and base.shape == (1, ids.shape[1], 49152)
    torch.testing.assert_close(_llmkit_logits(llmkit.load(hf_dir, device="cpu", dtype="float32"), ids), base,
                               rtol=0, atol=TOL)


def test_peft_adapter_loads_in_llmkit_and_llmkit_adapter_loads_in_peft(smol, tmp_path):
    import peft

    import llmkit
    from llmkit.lora import apply_lora, lora_modules, save_adapter

    hf_dir, hf, ids, base = smol
    n_modules = len(TARGETS) * hf.config.num_hidden_layers

    # (a) peft -> llmkit: A and B random (init_lora_weights=False), scaling alpha / r = 2
    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS,
                          init_lora_weights=False)
    ref = peft.get_peft_model(hf, cfg).eval()
    try:
        ref.save_pretrained(tmp_path / "peft")
        with torch.no_grad():
            want = ref(ids).logits  # (1, T, V)
    finally:
        ref.unload()  # the shared transformers model without LoRA layers again
    assert (want - base).abs().max() > 1.0, "peft's adapter barely moves the logits: nothing to compare"
    llm = llmkit.load(hf_dir, device="cpu", dtype="float32", adapter=tmp_path / "peft")
    assert len(lora_modules(llm.model)) == n_modules
    torch.testing.assert_close(_llmkit_logits(llm, ids), want, rtol=0, atol=TOL)
    del llm

    # (b) llmkit -> peft: B drawn at random (a fresh adapter has B = 0, the base model exactly)
    llm = llmkit.load(hf_dir, device="cpu", dtype="float32")
    apply_lora(llm.model, r=4, alpha=8, targets=TARGETS)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, m in lora_modules(llm.model):
            m.lora_B.weight.normal_(0, 0.1, generator=g)  # (out, r)
    ours = _llmkit_logits(llm, ids)
    assert len(lora_modules(llm.model)) == n_modules
    assert (ours - base).abs().max() > 1.0, "llmkit's adapter barely moves the logits: nothing to compare"
    save_adapter(llm, tmp_path / "ours", base_model=str(hf_dir))
    del llm
    back = peft.PeftModel.from_pretrained(hf, Path(tmp_path / "ours")).eval()
    try:
        with torch.no_grad():
            got = back(ids).logits
    finally:
        back.unload()
    torch.testing.assert_close(got, ours, rtol=0, atol=TOL)

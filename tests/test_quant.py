"""Quantized Linear modules against F.linear with their dequantized weights; quantization error bounds;
save/load round trip; fused projections against the unfused modules (outputs, state dicts, decoding)."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from llmkit.config import ModelConfig
from llmkit.errors import LlmkitError
from llmkit.model import Transformer
from llmkit.model.layers import FusedPart, module_tensors, project
from llmkit.quant import (
    Int4Linear,
    Int8Linear,
    fuse_projections,
    load_quantized,
    quantize_model,
    save_quantized,
)


def linear(n=96, k=128, bias=True) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(k, n, bias=bias)


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
@pytest.mark.parametrize("rows", [1, 3, 40])  # weight-only kernel (decode) and dequantized GEMM (prefill)
def test_quant_linear_matches_dequantized_reference(cls, rows):
    lin = linear()
    q = cls.from_linear(lin)
    x = torch.randn(2, rows, 128)
    ref = F.linear(x, q.dequantize(), lin.bias)  # float32 reference
    got = q(x)
    assert got.shape == ref.shape and got.dtype == x.dtype
    # the CPU kernels compute in bfloat16 (8-bit mantissa): error relative to the output scale
    assert (got - ref).abs().max() <= 2e-2 * ref.abs().max()


def test_quantization_error_bounds():
    lin = linear(bias=False)
    w = lin.weight.detach()
    q8 = Int8Linear.from_linear(lin).dequantize()
    assert ((q8 - w).abs() <= w.abs().amax(1, keepdim=True) / 254 + 1e-7).all()  # half a step per row
    q4 = Int4Linear.from_linear(lin, group_size=32).dequantize()
    g = w.view(96, 4, 32)
    step = (g.amax(-1) - g.amin(-1)) / 15  # (N, G)
    # half a step, plus the rounding of the stored bfloat16 scale and zero (8-bit mantissa: relative 2^-8)
    slack = (g.abs().amax(-1) + 16 * step) * 2**-8
    assert ((q4 - w).view(96, 4, 32).abs() <= (step / 2 + slack)[..., None]).all()
    assert ((q4 - w).view(96, 4, 32).abs() > step[..., None] / 2 + 1e-6).any()  # the slack is needed: bf16


def test_int4_group_size_must_divide():
    with pytest.raises(LlmkitError, match="not a multiple of group_size"):
        Int4Linear(100, 8, group_size=32)
    with pytest.raises(LlmkitError, match="unknown quantization"):
        quantize_model(nn.Sequential(), "int3")


def tiny_model() -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                      max_seq_len=32, pos_encoding="rope", norm="rmsnorm", mlp="swiglu", activation="silu",
                      tie_embeddings=True)
    return Transformer(cfg).eval()


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantize_model_swaps_and_round_trips(mode, tmp_path):
    model = tiny_model()
    ids = torch.randint(0, 64, (1, 10))
    with torch.inference_mode():
        ref = model(ids)
        quantize_model(model, mode)
        got = model(ids)
    kinds = {type(m).__name__ for m in model.modules()}
    assert "Linear" not in kinds and ("Int8Linear" in kinds or "Int4Linear" in kinds)
    assert (got - ref).abs().max() < 0.15 * ref.abs().max()
    save_quantized(model, None, tmp_path)
    _, loaded = load_quantized(tmp_path)
    with torch.inference_mode():
        again = loaded(ids)
    assert torch.equal(again, got)


# ---------------------------------------------------------------- fusion of projections of one input
class Projections(nn.Module):
    """Stand-in for Attention + MLP: the attribute names fuse_projections looks for."""

    def __init__(self, bias: bool):
        super().__init__()
        torch.manual_seed(0)
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(64, 64, bias), nn.Linear(64, 32, bias), \
            nn.Linear(64, 32, bias)
        self.gate_proj, self.up_proj = nn.Linear(64, 96, bias), nn.Linear(64, 96, bias)


def _swap(mod: nn.Module, kind: str) -> nn.Module:
    for name, lin in list(mod.named_children()):
        if kind != "float":
            setattr(mod, name, Int8Linear.from_linear(lin) if kind == "int8" else Int4Linear.from_linear(lin))
    return mod.eval()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [3, 40])  # decode kernels and the dequantized GEMM
@pytest.mark.parametrize("kind", ["float", "int8", "int4"])
def test_fused_projection_equals_unfused(kind, rows, bias):
    unfused = _swap(Projections(bias), kind)
    fused = copy.deepcopy(unfused)
    groups = fuse_projections(fused)
    assert len(groups) == 2 and type(fused.k_proj) is FusedPart and fused.k_proj.fused is fused.q_proj.fused
    x = torch.randn(2, rows, 64)
    with torch.no_grad():
        for names in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            want = [getattr(unfused, n)(x) for n in names]
            together = project(x, *(getattr(fused, n) for n in names))  # one matmul
            alone = [getattr(fused, n)(x) for n in names]  # each part computes the group, keeps its slice
            for w, t, a in zip(want, together, alone):
                assert t.shape == w.shape
                torch.testing.assert_close(t, w, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["float", "int4"])
def test_fused_state_dict_keeps_member_names(kind):
    unfused = _swap(Projections(True), kind)
    fused = copy.deepcopy(unfused)
    fuse_projections(fused)
    want, got = unfused.state_dict(), fused.state_dict()
    assert list(got) == list(want) and not any("fused" in k for k in got)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    # loading per-member tensors into a fused model writes its slices of the fused tensors
    other = copy.deepcopy(fused)
    with torch.no_grad():
        for t in module_tensors(other.q_proj.fused).values():
            t.zero_()
    other.load_state_dict(want)
    x = torch.randn(1, 5, 64)
    with torch.no_grad():
        for a, b in zip(project(x, other.q_proj, other.k_proj, other.v_proj),
                        project(x, unfused.q_proj, unfused.k_proj, unfused.v_proj)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="Missing key"):
        other.load_state_dict({k: v for k, v in want.items() if not k.startswith("k_proj.")})
    fused.to("meta")  # moving a part moves the module its group shares
    assert all(t.device.type == "meta" for t in module_tensors(fused.q_proj.fused).values())


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_fused_quantized_model_decodes_like_unfused(mode, monkeypatch):
    """Greedy decoding with a KV cache: a quantized model whose projections are fused gives the logits
    and tokens of the same quantized model unfused (the separate modules are the reference)."""
    import llmkit.quant as quant
    from llmkit.model import KVCache

    fused = quantize_model(tiny_model(), mode)
    monkeypatch.setattr(quant, "fuse_projections", lambda model: [])
    unfused = quantize_model(tiny_model(), mode)
    assert any(type(m) is FusedPart for m in fused.modules())
    assert not any(type(m) is FusedPart for m in unfused.modules())
    prompt = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(3))
    tokens = {}
    with torch.inference_mode():
        for name, model in (("fused", fused), ("unfused", unfused)):
            cache = KVCache(model.config, 1, 32)
            logits = model(prompt, positions=torch.arange(6)[None], cache=cache)[:, -1]  # (1, V)
            out, steps = [], []
            for t in range(6, 16):
                tok = logits.argmax(-1, keepdim=True)  # (1, 1)
                out.append(tok.item())
                logits = model(tok, positions=torch.tensor([[t]]), cache=cache)[:, -1]
                steps.append(logits)
            tokens[name] = (out, torch.cat(steps))
    assert tokens["fused"][0] == tokens["unfused"][0]
    torch.testing.assert_close(tokens["fused"][1], tokens["unfused"][1], rtol=1e-4, atol=1e-4)

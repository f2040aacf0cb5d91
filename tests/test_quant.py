"""Quantized Linear modules against F.linear with their dequantized weights; quantization error bounds;
save/load round trip."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from llmkit.config import ModelConfig
from llmkit.errors import LlmkitError
from llmkit.model import Transformer
from llmkit.quant import Int4Linear, Int8Linear, load_quantized, quantize_model, save_quantized


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
    assert ((q4 - w).view(96, 4, 32).abs() <= step[..., None] / 2 + 1e-6).all()


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

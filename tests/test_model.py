"""The Transformer on its own: parameter count of GPT-2 small, causality, KV-cache decoding == full
recompute (mixed-length rows, sliding window, MoE, cache row mapping), eager attention == SDPA, bf16,
training backward, hidden states + head == logits, position errors. Parity with transformers lives in
test_checkpoint_hf.py."""

from __future__ import annotations

import pytest
import torch

from llmkit.config import ModelConfig
from llmkit.errors import LlmkitError
from llmkit.model import KVCache, ModelOutput, Transformer, param_counts

GPT2_SMALL = {
    "model_type": "gpt2",
    "vocab_size": 50257,
    "n_embd": 768,
    "n_layer": 12,
    "n_head": 12,
    "n_positions": 1024,
}
BASE = dict(vocab_size=97, d_model=64, n_layers=2, n_heads=4, d_ff=96, max_seq_len=64)
ROPE = dict(BASE, pos_encoding="rope", norm="rmsnorm", mlp="swiglu", activation="silu", tie_embeddings=False)
CONFIGS = {
    "gpt2": ModelConfig(**BASE, attn_qkv_bias=True, attn_out_bias=True, mlp_bias=True),
    "llama_gqa": ModelConfig(**ROPE, n_kv_heads=2),
    "qwen3_headdim_qknorm": ModelConfig(**ROPE, n_kv_heads=2, head_dim=32, qk_norm=True, attn_qkv_bias=True),
    "mistral_sliding": ModelConfig(**ROPE, n_kv_heads=2, sliding_window=4),
    "qwen2_sliding_layer1": ModelConfig(**ROPE, sliding_window=3, sliding_layers=[1]),
    "moe_shared": ModelConfig(
        **ROPE,
        n_kv_heads=2,
        n_experts=4,
        n_experts_per_tok=2,
        moe_d_ff=32,
        moe_shared_expert_d_ff=48,
        moe_norm_topk=False,
    ),
}


def tiny(name: str, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(CONFIGS[name]).eval()
    with torch.no_grad():  # norms away from 1, bigger weights: differences show
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def rand_ids(b: int, t: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 97, (b, t), generator=torch.Generator().manual_seed(seed))


def test_gpt2_small_param_count():
    with torch.device("meta"):
        model = Transformer(ModelConfig.from_hf(GPT2_SMALL))
    assert sum(p.numel() for p in model.parameters()) == 124_439_808
    counts = param_counts(model)
    assert counts["total"] == 124_439_808
    assert counts["embeddings"] == 50257 * 768 + 1024 * 768 and counts["lm_head"] == 0  # tied
    assert counts["norms"] == (2 * 12 + 1) * 2 * 768


def test_param_counts_moe():
    counts = param_counts(tiny("moe_shared"))
    c = CONFIGS["moe_shared"]
    per_layer = c.n_experts * 3 * 64 * 32 + 4 * 64 + 3 * 64 * 48 + 64  # experts + router + shared + its gate
    assert counts["experts"] == c.n_layers * per_layer and counts["mlp"] == 0
    assert counts["lm_head"] == 97 * 64


@pytest.mark.parametrize("name", list(CONFIGS))
def test_causality(name):
    model = tiny(name)
    x = rand_ids(2, 12)
    y = x.clone()
    y[:, 8] = (y[:, 8] + 1) % 97
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.allclose(a[:, :8], b[:, :8], atol=1e-6)
    assert not torch.allclose(a[:, 8:], b[:, 8:], atol=1e-3)


@pytest.mark.parametrize("mapped", [False, True], ids=["rows_none", "rows_mapped"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_cached_decoding_matches_full_recompute(name, mapped):
    """Row 0 prefills 6 tokens, row 1 only 3 (right-padded); then both decode one token per step at
    their own positions. Every logit equals the full no-cache forward of that row's prefix."""
    model = tiny(name)
    seqs = rand_ids(2, 12)
    with torch.no_grad():
        full = model(seqs)  # (2, 12, V)
        cache = KVCache(model.config, 3 if mapped else 2, 32)
        if mapped:
            cache.rows = torch.tensor([2, 0])
        lens = [6, 3]
        prefill = seqs[:, :6].clone()
        prefill[1, 3:] = 0  # padding
        out = model(prefill, positions=torch.arange(6).expand(2, 6), cache=cache)
        assert (out[0] - full[0, :6]).abs().max() <= 1e-4
        assert (out[1, :3] - full[1, :3]).abs().max() <= 1e-4
        for step in range(6):
            pos = torch.tensor([[lens[0] + step], [lens[1] + step]])  # (2, 1)
            tok = seqs.gather(1, pos)
            out = model(tok, positions=pos, cache=cache)  # (2, 1, V)
            want = full.gather(1, pos[:, :, None].expand(2, 1, full.shape[-1]))
            assert (out - want).abs().max() <= 1e-4, step


@pytest.mark.parametrize("name", ["llama_gqa", "mistral_sliding"])
def test_eager_attention_matches_sdpa(name):
    model = tiny(name)
    x = rand_ids(2, 10)
    with torch.no_grad():
        fast = model(x)
        out = model(x, output_attentions=True)
    assert isinstance(out, ModelOutput)
    assert (out.logits - fast).abs().max() <= 1e-5
    assert len(out.attentions) == 2
    w = out.attentions[0]  # (B, H, T, T)
    assert w.shape == (2, 4, 10, 10)
    assert torch.allclose(w.sum(-1), torch.ones(2, 4, 10), atol=1e-5)
    assert w.triu(1).abs().max() == 0  # causal
    if model.config.sliding_window:
        assert w.tril(-model.config.sliding_window).abs().max() == 0


def test_eager_attention_with_cache():
    model = tiny("llama_gqa")
    x = rand_ids(1, 8)
    with torch.no_grad():
        full = model(x)
        cache = KVCache(model.config, 1, 16)
        model(x[:, :5], positions=torch.arange(5)[None], cache=cache)
        out = model(x[:, 5:6], positions=torch.tensor([[5]]), cache=cache, output_attentions=True)
    assert (out.logits[0, 0] - full[0, 5]).abs().max() <= 1e-4
    w = out.attentions[0]  # (1, H, 1, S)
    assert w.shape == (1, 4, 1, 16) and w[..., 6:].abs().max() == 0


def test_hidden_states_and_explicit_positions():
    model = tiny("gpt2")
    x = rand_ids(2, 7)
    with torch.no_grad():
        out = model(x, output_hidden_states=True)
        again = model(x, positions=torch.arange(7).expand(2, 7))
    assert len(out.hidden_states) == 3 and out.attentions == []
    assert (out.logits - again).abs().max() <= 1e-5


def test_bf16_cpu_forward_close_to_fp32():
    model = tiny("qwen3_headdim_qknorm")
    x = rand_ids(2, 8)
    with torch.no_grad():
        ref = model(x)
        half = model.to(torch.bfloat16)(x)
    assert half.dtype == torch.bfloat16 and torch.isfinite(half).all()
    assert (half.float() - ref).abs().max() <= 0.1 * ref.abs().max()


@pytest.mark.parametrize("name", ["gpt2", "moe_shared"])
def test_training_backward(name):
    model = tiny(name).train()
    x = rand_ids(2, 8)
    out = model(x, output_aux=True)
    logits = out.logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 97), x[:, 1:].reshape(-1))
    if out.aux_loss is not None:
        loss = loss + 0.01 * out.aux_loss
    loss.backward()
    assert model.model.embed_tokens.weight.grad is not None
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None


def test_fresh_model_init():
    model = Transformer(CONFIGS["llama_gqa"])
    w = model.model.layers[0].self_attn.q_proj.weight
    assert abs(w.std().item() - 0.02) < 0.005
    assert model.model.layers[0].self_attn.o_proj.weight.std().item() < 0.015


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["llama_gqa", "moe_shared"])
def test_cuda_bf16_forward_and_decode(name):
    model = tiny(name).to("cuda", torch.bfloat16)
    x = rand_ids(2, 12).cuda()
    with torch.no_grad():
        full = model(x)
        cache = KVCache(model.config, 2, 32, device="cuda", dtype=torch.bfloat16)
        model(x[:, :8], positions=torch.arange(8, device="cuda").expand(2, 8), cache=cache)
        step = model(x[:, 8:9], positions=torch.full((2, 1), 8, device="cuda"), cache=cache)
    assert full.dtype == torch.bfloat16 and torch.isfinite(full).all()
    assert (step[:, 0].float() - full[:, 8].float()).abs().max() <= 0.05 * full.float().abs().max()


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])  # reduce-overhead = CUDA graphs
def test_cuda_compiled_decode_step_matches_eager(mode):
    model = tiny("llama_gqa").to("cuda", torch.bfloat16)
    x = rand_ids(2, 12).cuda()
    step = torch.compile(model, mode=mode, fullgraph=True, dynamic=False)
    with torch.no_grad():
        caches = [KVCache(model.config, 2, 32, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
        for c in caches:
            model(x[:, :8], positions=torch.arange(8, device="cuda").expand(2, 8), cache=c)
        for t in range(8, 12):
            pos = torch.full((2, 1), t, device="cuda")
            a = model(x[:, t : t + 1], positions=pos, cache=caches[0])
            b = step(x[:, t : t + 1], positions=pos, cache=caches[1])
            assert (a.float() - b.float()).abs().max() <= 0.05 * a.float().abs().max()


def test_sequence_longer_than_context_is_a_clear_error():
    from llmkit.errors import LlmkitError

    model = tiny("gpt2")
    with pytest.raises(LlmkitError, match="longer than the model's context"):
        model(rand_ids(1, 65))


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])  # learned positions and RoPE
def test_positions_outside_the_table_or_cache_are_clear_errors(name):
    from llmkit.errors import LlmkitError

    model = tiny(name)
    with pytest.raises(LlmkitError, match="position 64 is beyond the model's context"):
        model(rand_ids(1, 2), positions=torch.tensor([[62, 64]]))
    with pytest.raises(LlmkitError, match="negative"):
        model(rand_ids(1, 1), positions=torch.tensor([[-1]]))
    cache = KVCache(model.config, 1, 8)
    with pytest.raises(LlmkitError, match="position 8 is beyond the KV cache's capacity"):
        model(rand_ids(1, 3), positions=torch.tensor([[6, 7, 8]]), cache=cache)
    model(rand_ids(1, 2), positions=torch.tensor([[62, 63]]))  # the last positions are fine


@pytest.mark.parametrize("name", ["gpt2", "qwen3_headdim_qknorm", "moe_shared"])
def test_return_hidden_then_head_equals_logits(name):
    model = tiny(name)
    x = rand_ids(2, 9)
    with torch.no_grad():
        logits = model(x)
        h = model(x, return_hidden=True)  # (B, T, d)
        out = model(x, return_hidden=True, output_hidden_states=True, output_aux=True)
    assert h.shape == (2, 9, 64)
    torch.testing.assert_close(model.head(h[:, -1]), logits[:, -1], rtol=0, atol=1e-6)
    # the head is the lm_head matmul: check one row by hand
    torch.testing.assert_close(h[0, 3] @ model.lm_head.weight.T, logits[0, 3], rtol=1e-5, atol=1e-5)
    assert out.logits is None and torch.equal(out.hidden, h) and torch.equal(out.hidden_states[-1], h)
    assert out.aux_loss is None  # eval mode (and dense models): no aux loss
    assert not hasattr(model, "aux_loss")


def test_aux_loss_is_returned_not_stored():
    from llmkit.model import MoE

    model = tiny("moe_shared").train()
    x = rand_ids(2, 8)
    out = model(x, output_aux=True)
    assert out.aux_loss is not None and out.aux_loss.ndim == 0 and out.aux_loss > 0
    assert torch.is_tensor(model(x))  # a plain call is still the logits tensor
    for m in model.modules():
        if isinstance(m, MoE):
            assert not any(torch.is_tensor(v) for v in vars(m).values())  # nothing left on the module
    assert tiny("gpt2").train()(x, output_aux=True).aux_loss is None  # dense


@pytest.mark.parametrize("name", ["llama_gqa", "mistral_sliding", "gpt2"])
def test_segments_pack_continuations_of_one_prefix(name):
    """A prefix and two continuations packed in one row (segments 0, 1, 2, positions restarting after the
    prefix, padding -1) give each continuation exactly the logits of prefix + continuation run alone."""
    model = tiny(name)
    prefix, a, b = rand_ids(1, 6, seed=3)[0], rand_ids(1, 4, seed=4)[0], rand_ids(1, 3, seed=5)[0]
    ids = torch.cat([prefix, a, b, torch.zeros(2, dtype=torch.long)])[None]  # (1, 15): 2 padding
    pos = torch.tensor([[*range(6), *range(6, 10), *range(6, 9), 0, 0]])
    seg = torch.tensor([[0] * 6 + [1] * 4 + [2] * 3 + [-1] * 2])
    with torch.no_grad():
        packed = model(ids, positions=pos, segments=seg)[0]  # (15, V)
        alone_a = model(torch.cat([prefix, a])[None])[0]  # (10, V)
        alone_b = model(torch.cat([prefix, b])[None])[0]  # (9, V)
    torch.testing.assert_close(packed[:10], alone_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[10:13], alone_b[6:], rtol=1e-5, atol=1e-5)
    with pytest.raises(LlmkitError, match="segments need explicit positions"):
        model(ids, segments=seg)

"""The look-inside labs (llmkit/lab/attention.py, embeddings.py, perf.py) against independent references:
attention weights recomputed by hand (RMSNorm, projections, RoPE, softmax(QKᵀ/√d + M)) and against
transformers' own `output_attentions`; the logit lens against transformers' norm + head at every layer;
cosine, PCA and neighbour statistics against hand computations; the KV-cache and no-cache greedy paths
against each other and against transformers' `generate`; weight sizes against a byte count by hand."""

from __future__ import annotations

import math

import pytest
import torch

from llmkit.config import ModelConfig
from llmkit.errors import LlmkitError
from llmkit.lab.attention import answer_by_layer, coref_scores, first_top1_layer, word_positions
from llmkit.lab.embeddings import cosine_matrix, group_stats, pca_2d, word_vectors
from llmkit.lab.inside import logit_lens, look
from llmkit.lab.perf import greedy_with_cache, greedy_without_cache, weight_megabytes
from llmkit.model.transformer import Transformer


def tiny_config(**kw) -> ModelConfig:
    base = dict(vocab_size=32, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=32, max_seq_len=64,
                pos_encoding="rope", rope_theta=10000.0, norm="rmsnorm", norm_eps=1e-5, mlp="swiglu",
                activation="silu", tie_embeddings=True)
    return ModelConfig(**{**base, **kw})


@pytest.fixture
def tiny() -> Transformer:
    """A random 2-layer llmkit Transformer, weights pushed away from their init (norms != 1, sharp scores)."""
    torch.manual_seed(0)
    model = Transformer(tiny_config()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


@torch.no_grad()
def hand_attention(model: Transformer, layer: int, x: torch.Tensor) -> torch.Tensor:
    """(H, T, T) attention weights of `layer` for its input residual stream x (T, d), computed by hand in
    float64: RMSNorm, q/k projections, RoPE (rotate_half pairs i, i + D/2 at angle pos / θ^(2i/D)), scores
    q·k/√D, causal mask, softmax written as exp / sum."""
    c = model.config
    blk = model.model.layers[layer]
    T, H, Hkv, D = x.shape[0], c.n_heads, c.n_kv_heads, c.head_dim
    x = x.double()
    h = x / torch.sqrt((x * x).mean(-1, keepdim=True) + c.norm_eps) * blk.input_layernorm.weight.double()
    q = (h @ blk.self_attn.q_proj.weight.double().T).view(T, H, D)
    k = (h @ blk.self_attn.k_proj.weight.double().T).view(T, Hkv, D)
    inv = c.rope_theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)  # (D/2,)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv  # (T, D/2)
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]

    def rope(v: torch.Tensor) -> torch.Tensor:
        a, b = v[..., : D // 2], v[..., D // 2 :]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], -1)

    q, k = rope(q), rope(k)
    out = torch.zeros(H, T, T, dtype=torch.float64)
    for hd in range(H):
        kv = hd // (H // Hkv)  # grouped-query attention: query heads share K/V heads in blocks
        for i in range(T):
            s = [float(q[i, hd] @ k[j, kv]) / math.sqrt(D) if j <= i else -math.inf for j in range(T)]
            m = max(s)
            e = [math.exp(v - m) for v in s]
            out[hd, i] = torch.tensor([v / sum(e) for v in e])
    return out


def test_attention_weights_equal_softmax_qk_by_hand(tiny):
    ids = [5, 17, 3]  # a 3-token example
    inside = look(tiny, ids)
    x0 = tiny.model.embed_tokens.weight[ids].detach()  # (3, d): layer 0's input
    want0 = hand_attention(tiny, 0, x0)
    for h in range(tiny.config.n_heads):
        got = inside.attention(0, h)
        assert got.shape == (3, 3)
        torch.testing.assert_close(got.double(), want0[h], atol=1e-6, rtol=0)
    # not a degenerate case: the weights are neither uniform nor one-hot
    assert bool(((want0[:, 2] > 0.05) & (want0[:, 2] < 0.95)).any())
    assert float((want0[:, 2] - 1 / 3).abs().max()) > 0.05
    # layer 1 from the residual stream look() reports after layer 0: the two must agree too
    want1 = hand_attention(tiny, 1, inside.hidden_states[1])
    torch.testing.assert_close(torch.stack(inside.attentions[1:]).double()[0], want1, atol=1e-6, rtol=0)
    torch.testing.assert_close(inside.attention(1), want1.mean(0).float(), atol=1e-6, rtol=0)


def test_coref_scores_sum_the_antecedent_tokens(tiny):
    inside = look(tiny, [1, 2, 3, 4, 5, 6])
    sc = coref_scores(inside, 5, [1, 2])
    A = torch.stack(inside.attentions)  # (L, H, T, T)
    assert sc.weights.shape == (2, 4)
    torch.testing.assert_close(sc.weights[1, 3], A[1, 3, 5, 1] + A[1, 3, 5, 2])
    assert sc.baseline == pytest.approx(2 / 6)
    layer, head, w = sc.best()
    assert w == float(sc.weights.max()) and sc.weights[layer, head] == sc.weights.max()


@pytest.fixture
def hf_tiny(tmp_path):
    """A tiny random transformers Llama (eager attention) and the same weights loaded by llmkit."""
    transformers = pytest.importorskip("transformers")
    from llmkit.checkpoint import load_hf_dir

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1,
                                   eos_token_id=2)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM._from_config(cfg, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(tmp_path)
    _, model = load_hf_dir(tmp_path)
    return hf, model.eval()


def test_look_matches_transformers_attentions_and_hidden_states(hf_tiny):
    hf, model = hf_tiny
    ids = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids, output_attentions=True, output_hidden_states=True)
    inside = look(model, ids[0])
    assert len(ref.attentions) == inside.n_layers == 3 and inside.n_heads == 4
    for a, b in zip(ref.attentions, inside.attentions):
        torch.testing.assert_close(b, a[0], atol=1e-5, rtol=0)
    for a, b in zip(ref.hidden_states, inside.hidden_states):  # both: the last one after the final norm
        torch.testing.assert_close(b, a[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(inside.logits, ref.logits[0], atol=1e-5, rtol=1e-5)


def test_logit_lens_matches_transformers_norm_and_head_at_every_layer(hf_tiny):
    hf, model = hf_tiny
    ids = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(ids, output_hidden_states=True)
        inside = look(model, ids[0])
        lens = logit_lens(model, inside, k=1)
        L = len(lens)
        assert L == 3 and lens[-1].layer == L
        # the last row is the model's own prediction
        assert lens[-1].ids[:, 0].tolist() == ref.logits[0].argmax(-1).tolist()
        for row in lens[:-1]:  # earlier rows: transformers' final norm + head on its hidden state
            p = torch.softmax(hf.lm_head(hf.model.norm(ref.hidden_states[row.layer][0])), -1)  # (T, V)
            assert row.ids[:, 0].tolist() == p.argmax(-1).tolist()
            torch.testing.assert_close(row.probs[:, 0], p.max(-1).values, atol=1e-5, rtol=1e-5)
        answer = int(ref.logits[0, -1].argmax())
        probs, ranks = answer_by_layer(model, inside, answer)
        assert ranks[-1] == 1
        assert probs[-1] == pytest.approx(float(torch.softmax(ref.logits[0, -1], -1)[answer]), abs=1e-6)
        p1 = torch.softmax(hf.lm_head(hf.model.norm(ref.hidden_states[1][0, -1])), -1)  # (V,)
        assert probs[0] == pytest.approx(float(p1[answer]), abs=1e-6)
        assert ranks[0] == 1 + int((p1 > p1[answer]).sum())


def test_first_top1_layer():
    assert first_top1_layer([5, 3, 7, 7], 7) == (3, 3)
    assert first_top1_layer([7, 3, 7], 7) == (1, 3)  # top-1 early, lost, then kept from layer 3
    assert first_top1_layer([7, 7], 7) == (1, 1)
    assert first_top1_layer([7, 7, 4], 7) == (1, None)
    assert first_top1_layer([1, 2], 7) == (None, None)


def test_kv_cache_and_full_recompute_choose_the_same_greedy_tokens(tiny):
    prompt = [3, 9, 27, 1, 14]
    cached, dt_cached = greedy_with_cache(tiny, prompt, 12)
    plain, dt_plain = greedy_without_cache(tiny, prompt, 12)
    assert cached == plain and len(cached) == 12
    assert len(set(cached)) > 2  # a random model that repeats one token would prove little
    assert len(dt_cached) == 10 and len(dt_plain) == 12 and min(dt_cached + dt_plain) > 0


def test_greedy_paths_match_transformers_generate(hf_tiny):
    hf, model = hf_tiny
    prompt = [5, 40, 12, 33, 7, 21]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=10, min_new_tokens=10)
    want = ref[0, len(prompt):].tolist()
    assert greedy_with_cache(model, prompt, 10)[0] == want
    assert greedy_without_cache(model, prompt, 10)[0] == want


def test_cosine_matrix_by_hand():
    X = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, -2.0], [3.0, 4.0]])
    r2 = math.sqrt(2)
    want = torch.tensor([
        [1, 1 / r2, 0, 3 / 5],
        [1 / r2, 1, -1 / r2, 7 / (5 * r2)],
        [0, -1 / r2, 1, -4 / 5],
        [3 / 5, 7 / (5 * r2), -4 / 5, 1],
    ])
    torch.testing.assert_close(cosine_matrix(X), want, atol=1e-6, rtol=0)
    st = group_stats(cosine_matrix(X), [0, 0, 1, 1])
    assert st["within"] == pytest.approx((1 / r2 - 4 / 5) / 2, abs=1e-6)
    assert st["between"] == pytest.approx((0 + 3 / 5 - 1 / r2 + 7 / (5 * r2)) / 4, abs=1e-6)
    # nearest other word: 0 -> 1 (same group), 1 -> 3, 2 -> 0, 3 -> 1 (all across groups)
    assert st["nn_in_group"] == 1


def test_pca_2d_matches_the_covariance_eigenvectors():
    X = torch.randn(12, 6, generator=torch.Generator().manual_seed(0)) * torch.tensor([5, 3, 1, 1, 0.5, 0.2])
    P, kept = pca_2d(X)
    Xc = X.double() - X.double().mean(0)
    evals, evecs = torch.linalg.eigh(Xc.T @ Xc)  # ascending
    assert kept.tolist() == pytest.approx((evals[-2:].flip(0) / evals.sum()).tolist(), abs=1e-5)
    for i in range(2):  # same axis up to its sign
        proj = Xc @ evecs[:, -1 - i]
        sign = 1.0 if float(proj @ P[:, i].double()) > 0 else -1.0
        torch.testing.assert_close(P[:, i].double(), sign * proj, atol=1e-4, rtol=0)


def test_word_vectors_average_the_tokens():
    class Tok:
        def encode(self, text):
            return {" roi": [1, 2], " chat": [3]}[text]

    E = torch.arange(20.0).view(5, 4)
    X, ids = word_vectors(E, Tok(), ["roi", "chat"])
    assert ids == [[1, 2], [3]]
    torch.testing.assert_close(X, torch.tensor([[6.0, 7.0, 8.0, 9.0], [12.0, 13.0, 14.0, 15.0]]))


def test_word_positions_on_the_real_tokenizer(smollm2_gguf):
    from llmkit.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(smollm2_gguf)
    text = "Le médecin a vu sa patiente. Il lui a parlé longtemps."
    ids = tok.encode(text)
    doc = word_positions(tok, ids, text, "médecin")
    assert tok.decode([ids[i] for i in doc]).strip() == "médecin" and doc == list(range(doc[0], doc[-1] + 1))
    (il,) = word_positions(tok, ids, text, "Il")
    assert tok.decode([ids[il]]).strip() == "Il"
    assert word_positions(tok, ids, text, "a", occurrence=1) != word_positions(tok, ids, text, "a")
    with pytest.raises(LlmkitError, match="'chirurgien' not found"):
        word_positions(tok, ids, text, "chirurgien")


def test_weight_megabytes_counts_bytes_by_hand():
    from llmkit.quant import quantize_model

    c = tiny_config()
    model = Transformer(c)
    d, V, f, L = c.d_model, c.vocab_size, c.d_ff, c.n_layers
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    linears = [(q, d), (kv, d), (kv, d), (d, q), (f, d), (f, d), (d, f)] * L  # (out, in) of each layer
    norms = (2 * L + 1) * d
    floats = V * d + norms + sum(n * k for n, k in linears)  # tied head: the table counted once
    assert weight_megabytes(model) == pytest.approx(4 * floats / 1e6)
    quantize_model(model, "int8")  # every Linear (the tied head too, as its own copy): int8 + a fp32 scale
    q8 = sum(n * k + 4 * n for n, k in [*linears, (V, d)])
    assert weight_megabytes(model) == pytest.approx((4 * (V * d + norms) + q8) / 1e6)

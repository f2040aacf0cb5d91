"""KV cache storage dtypes: the int8 round trip against its hand bound, memory per token by hand, greedy
generation with bf16 / int8 caches against an independent reference (a full recompute whose attention reads
K/V rounded the same way), fp32 cache = plain recompute, get_engine's cache key, the --kv-cache flag."""

import math

import pytest
import torch
import torch.nn.functional as F

from llmkit.cli import main
from llmkit.config import ModelConfig
from llmkit.errors import LlmkitError
from llmkit.generate.engine import Engine
from llmkit.generate.sampling import SamplingParams
from llmkit.model import KVCache, Transformer
from llmkit.model.kv_cache import dequantize_int8, quantize_int8, resolve_kv_dtype

GREEDY = SamplingParams(temperature=0, max_tokens=10)


def tiny() -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64,
                      pos_encoding="rope", norm="rmsnorm", mlp="swiglu", activation="silu")
    model = Transformer(cfg).eval()
    with torch.no_grad():  # larger weights: sharper, less tie-prone distributions
        for p in model.parameters():
            p.mul_(5.0)
    return model


def test_int8_round_trip_within_half_a_step():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 2, 64, generator=g) * torch.logspace(-6, 3, 5)[None, :, None, None]  # (B, T, H, D)
    x[0, 0, 0] = 0.0  # an all-zero vector
    q, s = quantize_int8(x)
    assert q.dtype == torch.int8 and q.shape == x.shape
    assert s.shape == (3, 5, 2, 1) and s.dtype == torch.float32
    bound = x.abs().amax(-1, keepdim=True) / 127 / 2  # half a quantization step, per vector
    err = (dequantize_int8(q, s, torch.float32) - x).abs()
    assert (err <= bound * (1 + 1e-6)).all()
    assert err.max() > 0.9 * (bound.expand_as(err)).max() / 2  # not trivially exact
    assert (dequantize_int8(q, s, torch.float32)[0, 0, 0] == 0).all()
    assert q.abs().amax(-1).eq(127).sum() == x[..., :1].numel() - 1  # each vector's absmax maps to ±127


def test_bytes_per_token_by_hand():
    cfg = tiny().config  # 2 layers, 2 KV heads, head_dim 8
    per_vec = {torch.float32: 8 * 4, torch.bfloat16: 8 * 2, torch.float16: 8 * 2, torch.int8: 8 + 4}
    for dtype, nbytes in per_vec.items():
        cache = KVCache(cfg, 2, 16, dtype=dtype)
        assert cache.bytes_per_token() == 2 * 2 * 2 * nbytes  # layers x (K, V) x heads x bytes per vector


def test_resolve_kv_dtype():
    assert resolve_kv_dtype(None, torch.bfloat16) == torch.bfloat16
    assert resolve_kv_dtype("auto", torch.float32) == torch.float32
    assert resolve_kv_dtype("bf16", torch.float32) == torch.bfloat16
    assert resolve_kv_dtype("fp16", torch.float32) == torch.float16
    assert resolve_kv_dtype("int8", torch.float32) == torch.int8
    assert resolve_kv_dtype(torch.int8, torch.float32) == torch.int8
    with pytest.raises(LlmkitError, match="bad KV cache dtype 'int4'"):
        resolve_kv_dtype("int4", torch.float32)


# ---------------------------------------------------------------- independent reference
def round_kv(x: torch.Tensor, kind: str) -> torch.Tensor:
    """x (..., D) as a cache of `kind` gives it back, written out here (not llmkit's code)."""
    if kind == "fp32":
        return x
    if kind == "bf16":
        return x.to(torch.bfloat16).float()
    step = x.abs().amax(-1, keepdim=True) / 127  # int8: round to the nearest multiple of the step
    return torch.where(step > 0, torch.round(x / step).clamp(-127, 127) * step, torch.zeros_like(x))


def reference_logits(model: Transformer, ids: list[int], kind: str) -> torch.Tensor:
    """Next-token logits (V,) of a full recompute of `ids` with explicit softmax attention over K/V
    rounded as a `kind` cache stores them (RoPE rotate_half, causal mask, grouped heads: all by hand)."""
    c = model.config
    T, H, Hkv, D = len(ids), c.n_heads, c.n_kv_heads, c.head_dim
    inv = 1.0 / (c.rope_theta ** (torch.arange(0, D, 2).float() / D))
    ang = torch.arange(T).float()[:, None] * inv[None]  # (T, D/2)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)  # (T, D)

    def rope(x):  # (T, heads, D)
        x1, x2 = x[..., : D // 2], x[..., D // 2 :]
        return x * cos[:, None] + torch.cat([-x2, x1], -1) * sin[:, None]

    x = model.model.embed_tokens.weight[ids]  # (T, d)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for layer in model.model.layers:
        a = layer.self_attn
        h = layer.input_layernorm(x)
        q = rope((h @ a.q_proj.weight.T).view(T, H, D))
        k = round_kv(rope((h @ a.k_proj.weight.T).view(T, Hkv, D)), kind)
        v = round_kv((h @ a.v_proj.weight.T).view(T, Hkv, D), kind)
        k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)  # (T, H, D)
        scores = torch.einsum("thd,shd->hts", q, k) / math.sqrt(D)
        w = scores.masked_fill(~causal, -math.inf).softmax(-1)  # (H, T, T)
        y = torch.einsum("hts,shd->thd", w, v).reshape(T, H * D)
        x = x + y @ a.o_proj.weight.T
        h = layer.post_attention_layernorm(x)
        m = layer.mlp
        x = x + (F.silu(h @ m.gate_proj.weight.T) * (h @ m.up_proj.weight.T)) @ m.down_proj.weight.T
    return model.head(model.model.norm(x[-1]))


@pytest.mark.parametrize("kind", ["fp32", "bf16", "int8"])
def test_greedy_with_cache_dtype_equals_reference(kind, one_thread):
    model = tiny()
    prompt = torch.randint(0, 97, (7,), generator=torch.Generator().manual_seed(1)).tolist()
    eng = Engine(model, max_batch=1, prefill_chunk=4, kv_dtype={"fp32": None, "bf16": "bf16",
                                                                  "int8": "int8"}[kind])
    assert eng.cache.dtype == {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}[kind]
    row = eng.add(prompt, GREEDY)
    seq, gaps, diffs = prompt[:], [], []
    with torch.inference_mode():
        while True:
            outs = eng.step()  # prefill in chunks of 4 (the second reads the first's K/V back), then decode
            if not outs:
                continue
            (out,) = outs
            want = reference_logits(model, seq, kind)
            assert out.token_id == int(want.argmax())
            exact = reference_logits(model, seq, "fp32")
            gaps.append((want - exact).abs().max().item() / want.abs().max().item())
            seq.append(out.token_id)
            if out.finished:
                break
            got = eng.request(row).logits  # the decode step's next-token logits
            want = reference_logits(model, seq, kind)
            diffs.append((got - want).abs().max().item() / want.abs().max().item())
    assert len(seq) == len(prompt) + GREEDY.max_tokens
    assert max(diffs) <= 2e-5  # relative to the largest logit (measured: 2e-6)
    if kind != "fp32":  # the rounding moves the logits 100x more than the engine's distance to the reference
        assert max(gaps) > 100 * 2e-5


def reference_greedy(model, ids: list[int], n: int, kind: str) -> list[int]:
    seq = ids[:]
    for _ in range(n):
        seq.append(int(reference_logits(model, seq, kind).argmax()))
    return seq[len(ids):]


@pytest.mark.parametrize("kind", ["bf16", "int8"])
def test_mapped_rows_and_prefix_copies_keep_scales(kind, monkeypatch, one_thread):
    """Rows 0 and 2 decode together after row 1 left (mapped rows: index_put and gathered reads), and row 2
    starts from row 0's prompt prefix copied over (int8: the scales travel with the codes)."""
    model = tiny()
    g = torch.Generator().manual_seed(2)
    a = torch.randint(0, 97, (9,), generator=g).tolist()
    b = torch.randint(0, 97, (5,), generator=g).tolist()
    c = a[:6] + torch.randint(0, 97, (3,), generator=g).tolist()
    eng = Engine(model, max_batch=3, kv_dtype=kind, native=False)  # PyTorch's cache code: decode.c takes bf16
    batches = []
    real = eng.cache.select
    monkeypatch.setattr(eng.cache, "select", lambda rows, n: (batches.append(list(rows)), real(rows, n)))
    out: dict[int, list[int]] = {}
    rows = [eng.add(a, GREEDY), eng.add(b, GREEDY.replace(max_tokens=2))]
    with torch.inference_mode():
        for _ in range(3):
            for o in eng.step():
                out.setdefault(o.row, []).append(o.token_id)
        eng.remove(rows[1])
        rows.append(eng.add(c, GREEDY))
        assert rows[2] == 2 and eng.request(2).cached_tokens == 6  # copied from row 0
        while any(eng.request(r).finish_reason is None for r in (0, 2)):
            for o in eng.step():
                out.setdefault(o.row, []).append(o.token_id)
    assert [0, 2] in batches
    assert out[0] == reference_greedy(model, a, GREEDY.max_tokens, kind)
    assert out[2] == reference_greedy(model, c, GREEDY.max_tokens, kind)


def test_get_engine_keys_on_kv_dtype():
    from llmkit.generate.api import get_engine

    class Tok:
        stop_ids = {0}

    class LLM:
        model, tokenizer = tiny(), Tok()

    llm = LLM()
    eng = get_engine(llm, 1, 8, kv_dtype="int8")
    assert eng.cache.dtype == torch.int8
    assert get_engine(llm, 2, 8) is not eng  # grows: a new engine, same storage
    eng = llm._engine
    assert eng.cache.dtype == torch.int8 and eng.max_batch == 2
    assert get_engine(llm, 1, 8) is eng and get_engine(llm, 1, 8, kv_dtype="int8") is eng
    fp = get_engine(llm, 1, 8, kv_dtype="auto")
    assert fp is not eng and fp.cache.dtype == torch.float32 and fp.max_batch == 2
    with pytest.raises(LlmkitError, match="bad KV cache dtype"):
        get_engine(llm, 1, 8, kv_dtype="int3")


@pytest.mark.parametrize("verb", [["generate", "hello"], ["chat"], ["serve"]])
def test_bad_kv_cache_flag_is_one_line_before_loading(verb, capsys, monkeypatch):
    import llmkit

    def no_load(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(llmkit, "load", no_load)
    assert main([*verb, "--kv-cache", "int3"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad KV cache dtype 'int3'" in err


def test_kv_cache_flag_accepted():
    from llmkit.cli import build_parser

    p = build_parser()
    for verb in (["generate", "hi"], ["chat"], ["serve"]):
        assert p.parse_args([*verb, "--kv-cache", "int8"]).kv_cache == "int8"
        assert p.parse_args(verb).kv_cache is None


@pytest.mark.slow
def test_generate_cli_with_int8_cache(smollm2_gguf, capsys):
    assert main(["generate", str(smollm2_gguf), "The capital of France is", "--temperature", "0",
                 "--max-tokens", "6", "--kv-cache", "int8"]) == 0
    assert "Paris" in capsys.readouterr().out

"""Gemma 2 and Gemma 3 (text) as ModelConfig fields, against transformers (the independent reference):
tiny random Gemma2ForCausalLM / Gemma3ForCausalLM saved with save_pretrained, loaded by llmkit -> the same
fp32 logits (eager attention on the HF side), over sequences longer than the sliding window; cached decoding
through the engine -> HF's full-forward logits at every step; llmkit's export -> transformers -> the same
logits; config.json keys read as transformers reads them (defaults, legacy keys); bf16 smoke forward.

The tiny configs make every Gemma field bite (a test below checks that switching any one off breaks parity):
6 layers with sliding and global ones, window 5, GQA, head_dim 24 != 64 / 4, norm weights far from HF's
zero init, query_pre_attn_scalar 16 != head_dim, small soft-caps (Gemma 2), local RoPE base 20 != global
1000 and linear RoPE scaling on the global layers (Gemma 3).
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from llmkit.checkpoint import load_hf_dir, save_hf_dir  # noqa: E402
from llmkit.config import ModelConfig  # noqa: E402
from llmkit.errors import LlmkitError  # noqa: E402
from llmkit.generate.engine import Engine  # noqa: E402
from llmkit.generate.sampling import SamplingParams  # noqa: E402
from llmkit.model import Transformer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

WINDOW = 5
COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=24,
    intermediate_size=96,
    max_position_embeddings=64,
    sliding_window=WINDOW,
    query_pre_attn_scalar=16,
)
FAMILIES = {
    # soft-caps small enough to bite on tiny random weights (HF defaults 50 / 30 would be ~linear here)
    "gemma2": lambda: transformers.Gemma2Config(
        **COMMON, attn_logit_softcapping=1.0, final_logit_softcapping=3.0
    ),
    # every 3rd layer global; local RoPE base != global; linear RoPE scaling on the global layers only
    "gemma3": lambda: transformers.Gemma3TextConfig(
        **COMMON,
        sliding_window_pattern=3,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 20.0},
        },
    ),
    # Gemma 3 with a final soft-cap, attention biases and no scaling
    "gemma3_softcap_bias": lambda: transformers.Gemma3TextConfig(
        **COMMON,
        sliding_window_pattern=2,
        attention_bias=True,
        final_logit_softcapping=2.0,
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 20.0},
        },
    ),
}


def make_hf(family: str, seed: int = 0):
    """A tiny random transformers Gemma (eager attention), norm weights moved far from their zero init."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        FAMILIES[family](), attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.5 if "norm" in name else 0.05))
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> (HF model, folder it was saved to)."""
    out = {}
    for family in FAMILIES:
        hf = make_hf(family)
        d = tmp_path_factory.mktemp(family)
        hf.save_pretrained(d)
        out[family] = hf, d
    return out


def ids(n: int = 2, t: int = 4 * WINDOW + 3) -> torch.Tensor:
    return torch.randint(0, 128, (n, t), generator=torch.Generator().manual_seed(1))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_transformers(family, saved):
    hf, d = saved[family]
    x = ids()  # 23 tokens, window 5
    with torch.no_grad():
        want = hf(x).logits  # (2, 23, V)
    config, model = load_hf_dir(d)
    assert config.model_type == ("gemma2" if family == "gemma2" else "gemma3_text")
    with torch.no_grad():
        got = model(x)
        assert max_diff(got, want) <= 1e-4
        # the same through the explicit-positions path (one mask per kind, built by llmkit)
        pos = torch.arange(x.shape[1]).expand_as(x)
        assert max_diff(model(x, positions=pos), want) <= 1e-4
        # and with output_attentions (every layer on the eager path)
        out = model(x, output_attentions=True, output_hidden_states=True)
        assert max_diff(out.logits, want) <= 1e-4
        ref = hf(x, output_attentions=True)
        for a, b in zip(out.attentions, ref.attentions, strict=True):
            assert max_diff(a, b) <= 1e-5


FIELD_OFF = {
    "norm_weight_offset": 0.0,
    "scale_embeddings": False,
    "attn_scale": None,
    "sliding_window": None,
}
FIELD_OFF_BY_FAMILY = {
    "gemma2": {"attn_logit_softcap": None, "final_logit_softcap": None},
    "gemma3": {"rope_local_theta": None, "rope_scaling": None},
    "gemma3_softcap_bias": {"final_logit_softcap": None, "rope_local_theta": None},
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_gemma_field_is_exercised(family, saved):
    """Switching any one Gemma field off breaks parity: the parity test above would catch a field ignored."""
    hf, d = saved[family]
    x = ids(1)
    with torch.no_grad():
        want = hf(x).logits
    config, model = load_hf_dir(d)
    state = model.state_dict()
    for field, off in {**FIELD_OFF, **FIELD_OFF_BY_FAMILY[family]}.items():
        other = Transformer(config.replace(**{field: off})).eval()
        other.load_state_dict(state)
        with torch.no_grad():
            assert max_diff(other(x), want) > 1e-3, field


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_cached_decode_matches_full_forward(family, saved):
    """The engine (chunked prefill, static KV cache, two rows of different lengths) gives, at every step,
    transformers' full-forward logits of the sequence so far; the greedy tokens follow; every sequence grows
    well past the sliding window."""
    hf, d = saved[family]
    _, model = load_hf_dir(d)
    params = SamplingParams(temperature=0, max_tokens=14, logprobs=0)
    eng = Engine(model, max_batch=2, prefill_chunk=4)
    prompts = [ids(1, 9)[0].tolist(), ids(1, 3)[0].tolist()[::-1]]
    rows = [eng.add(p, params) for p in prompts]
    seqs = {r: list(p) for r, p in zip(rows, prompts)}
    steps = checked = 0
    with torch.inference_mode():
        while eng.running:
            refs = {r: hf(torch.tensor([seqs[r]])).logits[0, -1] for r in eng.running}  # (V,) HF, no cache
            for r, ref in refs.items():
                got = eng.request(r).logits  # the engine's next-token logits (None before the first step)
                if got is not None:
                    assert max_diff(got, ref) <= 1e-4
                    checked += 1
            for out in eng.step():
                ref = refs[out.row]
                assert out.token_id == int(ref.argmax())
                assert abs(out.logprob.logprob - ref.log_softmax(-1)[out.token_id].item()) <= 1e-4
                seqs[out.row].append(out.token_id)
                if out.finished:
                    eng.remove(out.row)
            steps += 1
            assert steps < 40
    assert checked >= 2 * 12
    assert all(len(seqs[r]) == len(p) + 14 for r, p in zip(rows, prompts))
    assert min(map(len, seqs.values())) > 3 * WINDOW


@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_reloads_in_transformers(family, saved, tmp_path):
    hf, d = saved[family]
    x = ids()
    with torch.no_grad():
        want = hf(x).logits
    config, model = load_hf_dir(d)
    save_hf_dir(model, config, None, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager")
    assert type(back) is type(hf)
    with torch.no_grad():
        assert max_diff(back.eval()(x).logits, want) <= 1e-4
    # the written config.json reads back into the same ModelConfig
    again = ModelConfig.from_hf(json.loads((tmp_path / "out" / "config.json").read_text()))
    assert again == config


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_bf16_forward(family, saved):
    """bf16 weights: close to the fp32 reference; on the eager path (Gemma 2 always, Gemma 3 with
    output_attentions) the same roundings as transformers' eager bf16 forward (bit-equal on this CPU)."""
    hf, d = saved[family]
    hf16 = transformers.AutoModelForCausalLM.from_pretrained(
        d, attn_implementation="eager", dtype=torch.bfloat16
    ).eval()
    x = ids()
    _, model = load_hf_dir(d, dtype=torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    with torch.no_grad():
        want, want16 = hf(x).logits, hf16(x).logits
        got = model(x)
        eager = model(x, output_attentions=True).logits
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    scale = want.abs().max().item()
    assert max_diff(got, want) <= 0.05 * scale
    assert max_diff(eager, want16) <= 1e-3 * scale


# ---------------------------------------------------------------- config.json keys
def _hf_view(config) -> dict:
    """What transformers' config object means, in ModelConfig terms (the reference for from_hf)."""
    types = config.layer_types
    rp = config.rope_parameters
    full, local = (rp["full_attention"], rp["sliding_attention"]) if "full_attention" in rp else (rp, None)
    return {
        "n_layers": config.num_hidden_layers,
        "head_dim": config.head_dim,
        "sliding_layers": [i for i, t in enumerate(types) if t == "sliding_attention"],
        "sliding_window": config.sliding_window,
        "attn_scale": config.query_pre_attn_scalar**-0.5,
        "final_logit_softcap": config.final_logit_softcapping,
        "rope_theta": float(full["rope_theta"]),
        "rope_scaling_factor": full.get("factor"),
        "rope_local_theta": None if local is None else float(local["rope_theta"]),
        "tie": config.tie_word_embeddings,
        "eos": config.eos_token_id,
        "vocab": config.vocab_size,
        "max_seq_len": config.max_position_embeddings,
    }


def _ours(cfg: ModelConfig) -> dict:
    return {
        "n_layers": cfg.n_layers,
        "head_dim": cfg.head_dim,
        "sliding_layers": [i for i in range(cfg.n_layers) if cfg.is_sliding_layer(i)],
        "sliding_window": cfg.sliding_window,
        "attn_scale": cfg.attn_scale,
        "final_logit_softcap": cfg.final_logit_softcap,
        "rope_theta": cfg.rope_theta,
        "rope_scaling_factor": (cfg.rope_scaling or {}).get("factor"),
        "rope_local_theta": cfg.rope_local_theta,
        "tie": cfg.tie_embeddings,
        "eos": cfg.eos_token_id,
        "vocab": cfg.vocab_size,
        "max_seq_len": cfg.max_seq_len,
    }


# gemma-3-270m's config.json as transformers 4.5x wrote it (legacy rope keys, no rope_parameters)
GEMMA3_270M = {
    "_sliding_window_pattern": 6,
    "architectures": ["Gemma3ForCausalLM"],
    "attention_bias": False,
    "attn_logit_softcapping": None,
    "bos_token_id": 2,
    "eos_token_id": 1,
    "final_logit_softcapping": None,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 640,
    "intermediate_size": 2048,
    "layer_types": ["sliding_attention"] * 5 + ["full_attention"] + ["sliding_attention"] * 5
    + ["full_attention"] + ["sliding_attention"] * 5 + ["full_attention"],
    "max_position_embeddings": 32768,
    "model_type": "gemma3_text",
    "num_attention_heads": 4,
    "num_hidden_layers": 18,
    "num_key_value_heads": 1,
    "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06,
    "rope_local_base_freq": 10000.0,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "sliding_window": 512,
    "torch_dtype": "bfloat16",
    "vocab_size": 262144,
}
CONFIG_DICTS = {
    "gemma2_minimal": {"model_type": "gemma2", "num_hidden_layers": 5},
    "gemma2_null_softcaps": {"model_type": "gemma2", "num_hidden_layers": 4, "final_logit_softcapping": None,
                             "attn_logit_softcapping": None, "rope_theta": 5000.0},
    "gemma3_minimal": {"model_type": "gemma3_text", "num_hidden_layers": 13},
    "gemma3_pattern_4": {"model_type": "gemma3_text", "num_hidden_layers": 9, "sliding_window_pattern": 4},
    "gemma3_legacy_scaling": {"model_type": "gemma3_text", "num_hidden_layers": 6, "rope_theta": 1e6,
                              "rope_local_base_freq": 1e4, "query_pre_attn_scalar": 168,
                              "sliding_window": 1024, "rope_scaling": {"rope_type": "linear", "factor": 8.0}},
    "gemma3_270m": GEMMA3_270M,
}


@pytest.mark.parametrize("name", list(CONFIG_DICTS))
def test_config_keys_read_as_transformers_reads_them(name):
    d = CONFIG_DICTS[name]
    cls = transformers.Gemma2Config if d["model_type"] == "gemma2" else transformers.Gemma3TextConfig
    ref = _hf_view(cls.from_dict(dict(d)))
    ours = ModelConfig.from_hf(dict(d))
    got = _ours(ours)
    if d["model_type"] == "gemma2":  # one RoPE for all layers
        ref["rope_local_theta"] = None
    assert got == ref
    assert ours.activation == "gelu_tanh" and ours.norm_weight_offset == 1.0 and ours.sandwich_norm
    assert ours.qk_norm == (d["model_type"] == "gemma3_text")
    assert ours.attn_logit_softcap == (
        None if d["model_type"] == "gemma3_text" else cls.from_dict(dict(d)).attn_logit_softcapping
    )
    # and back: to_hf -> transformers -> the same meaning
    assert _hf_view(cls.from_dict(ours.to_hf())) == ref


def test_legacy_config_file_loads_like_transformers(saved, tmp_path):
    """A transformers-4 style config.json (rope_theta / rope_local_base_freq / rope_scaling,
    sliding_window_pattern, no layer_types) over the same weights: llmkit == transformers."""
    import shutil

    _, d = saved["gemma3"]
    legacy = tmp_path / "legacy"
    shutil.copytree(d, legacy)
    cfg = json.loads((legacy / "config.json").read_text())
    for key in ("rope_parameters", "layer_types", "_sliding_window_pattern"):
        cfg.pop(key, None)
    cfg.update(rope_theta=1000.0, rope_local_base_freq=20.0, sliding_window_pattern=3,
               rope_scaling={"rope_type": "linear", "factor": 4.0})
    (legacy / "config.json").write_text(json.dumps(cfg))
    hf = transformers.AutoModelForCausalLM.from_pretrained(legacy, attn_implementation="eager").eval()
    _, model = load_hf_dir(legacy)
    x = ids()
    with torch.no_grad():
        assert max_diff(model(x), hf(x).logits) <= 1e-4
        assert max_diff(model(x), saved["gemma3"][0](x).logits) <= 1e-4


def test_scaled_rope_on_every_layer_round_trips(tmp_path):
    """rope_local_theta None with rope_scaling: every layer uses the scaled global table; exported as a
    gemma3_text config whose sliding layers carry the same scaled RoPE (transformers agrees on the logits)."""
    hf_ref, d = make_hf("gemma3"), tmp_path / "src"
    hf_ref.save_pretrained(d)
    config, model = load_hf_dir(d)
    shared = config.replace(rope_local_theta=None)
    other = Transformer(shared).eval()
    other.load_state_dict(model.state_dict())
    save_hf_dir(other, shared, None, tmp_path / "out")
    assert ModelConfig.from_hf(json.loads((tmp_path / "out" / "config.json").read_text())) == shared
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager")
    x = ids()
    with torch.no_grad():
        assert max_diff(other(x), back.eval()(x).logits) <= 1e-4


def test_multimodal_gemma3_config_is_one_clear_error():
    with pytest.raises(LlmkitError, match=r"multimodal Gemma 3.*gemma3_text") as e:
        ModelConfig.from_hf({"model_type": "gemma3", "text_config": {"hidden_size": 2560}}, source="x.json")
    assert "\n" not in str(e.value) and str(e.value).startswith("x.json:")


@pytest.mark.parametrize("bad", [
    {"use_bidirectional_attention": True},
    {"layer_types": ["sliding_attention", "chunked_attention"]},
    {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}},
])
def test_config_that_llmkit_cannot_run_is_refused(bad):
    with pytest.raises(LlmkitError, match="config.json"):
        ModelConfig.from_hf({"model_type": "gemma3_text", "num_hidden_layers": 2, **bad})


def test_export_refuses_what_the_family_cannot_express(saved, tmp_path):
    config, model = load_hf_dir(saved["gemma3"][1])
    with pytest.raises(LlmkitError, match=r"cannot export as 'llama'.*attn_scale = head_dim \*\* -0.5"):
        save_hf_dir(model, config.replace(model_type="llama"), None, tmp_path / "a")
    with pytest.raises(LlmkitError, match=r"cannot export as 'qwen3'.*norm_weight_offset = 0.0"):
        save_hf_dir(model, config.replace(model_type="qwen3", attn_scale=None), None, tmp_path / "b")
    with pytest.raises(LlmkitError, match=r"cannot export as 'gemma2'.*qk_norm"):
        save_hf_dir(model, config.replace(model_type="gemma2"), None, tmp_path / "c")
    with pytest.raises(LlmkitError, match=r"'gemma3_text'.*soft-capped attention logits"):
        save_hf_dir(model, config.replace(attn_logit_softcap=5.0), None, tmp_path / "d")
    assert not any(tmp_path.iterdir())


def test_fresh_gemma_model_has_unit_norms_and_trains():
    """A from-scratch Gemma-shaped model: offset norms start at a unit scale (weight 0, as HF's init) and a
    training step runs through the soft-capped eager attention."""
    cfg = ModelConfig.from_hf({"model_type": "gemma2", "num_hidden_layers": 2, "hidden_size": 32,
                               "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
                               "intermediate_size": 48, "vocab_size": 50, "max_position_embeddings": 16,
                               "sliding_window": 4})
    model = Transformer(cfg).train()
    norms = [m for n, m in model.named_modules() if n.endswith("norm")]
    assert len(norms) == 2 * 4 + 1 and all((m.weight == 0).all() for m in norms)
    x = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())

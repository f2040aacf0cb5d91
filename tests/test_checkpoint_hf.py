"""HF checkpoints: tiny random models built by transformers (the independent reference), saved with
save_pretrained, loaded by llmkit -> same logits; exported by llmkit, reloaded by transformers -> same
logits. Plus the error paths (corrupt / truncated files, missing tensors, shape mismatches)."""

from __future__ import annotations

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from llmkit.checkpoint import load_hf_dir, save_hf_dir  # noqa: E402
from llmkit.errors import LlmkitError  # noqa: E402

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=96,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=2,
)
FAMILIES = {
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2
    ),
    "llama": lambda: transformers.LlamaConfig(**TINY),
    "llama3_rope_tied": lambda: transformers.LlamaConfig(
        **TINY,
        tie_word_embeddings=True,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    "llama_biases": lambda: transformers.LlamaConfig(**TINY, attention_bias=True, mlp_bias=True),
    "mistral": lambda: transformers.MistralConfig(**TINY, sliding_window=5),
    "qwen2": lambda: transformers.Qwen2Config(**TINY),
    "qwen2_sliding_layer1": lambda: transformers.Qwen2Config(
        **TINY, use_sliding_window=True, sliding_window=5, max_window_layers=1
    ),
    "qwen3": lambda: transformers.Qwen3Config(**TINY, head_dim=32),
    "mixtral": lambda: transformers.MixtralConfig(**TINY, num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        **TINY,
        head_dim=32,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=48,
        norm_topk_prob=False,
        mlp_only_layers=[1],
    ),
    "qwen2_moe_shared": lambda: transformers.Qwen2MoeConfig(
        **TINY,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=48,
        shared_expert_intermediate_size=80,
        norm_topk_prob=True,
    ),
}


def make_hf(family: str, seed: int = 0):
    """A tiny random transformers model with weights perturbed away from their init (norms != 1...)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(FAMILIES[family]()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def ids(n: int = 2, t: int = 16, vocab: int = 128) -> torch.Tensor:
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_load_and_export_match_transformers(family, tmp_path):
    hf = make_hf(family)
    hf.save_pretrained(tmp_path / "hf")
    x = ids()
    with torch.no_grad():
        want = hf(x).logits  # (2, 16, V)
    config, model = load_hf_dir(tmp_path / "hf")
    with torch.no_grad():
        got = model(x)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-4

    save_hf_dir(model, config, None, tmp_path / "out")
    assert {"config.json", "model.safetensors", "generation_config.json"} <= {
        p.name for p in (tmp_path / "out").iterdir()
    }
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(back) is type(hf)
    with torch.no_grad():
        again = back(x).logits
    assert (again - want).abs().max().item() <= 1e-4


def test_sharded_export_and_load(tmp_path):
    hf = make_hf("qwen3")
    config, model = load_hf_dir(_saved(hf, tmp_path))
    save_hf_dir(model, config, None, tmp_path / "sharded", max_shard_bytes=100_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    x = ids()
    with torch.no_grad():
        want = hf(x).logits
        _, again = load_hf_dir(tmp_path / "sharded")
        assert (again(x) - want).abs().max().item() <= 1e-4
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "sharded").eval()
        assert (back(x).logits - want).abs().max().item() <= 1e-4


def test_hidden_states_match_transformers(tmp_path):
    hf = make_hf("llama")
    _, model = load_hf_dir(_saved(hf, tmp_path))
    x = ids()
    with torch.no_grad():
        want = hf(x, output_hidden_states=True).hidden_states
        got = model(x, output_hidden_states=True).hidden_states
    assert len(got) == len(want) == 3
    for g, w in zip(got, want):
        assert (g - w).abs().max().item() <= 1e-4


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_moe_aux_loss_matches_transformers(family, tmp_path):
    hf = make_hf(family)
    _, model = load_hf_dir(_saved(hf, tmp_path))
    x = ids()
    hf.train()
    model.train()
    want = hf(x, output_router_logits=True).aux_loss
    got = model(x, output_aux=True).aux_loss
    assert got is not None
    assert abs(got.item() - want.item()) <= 1e-5
    model.eval()
    assert model(x, output_aux=True).aux_loss is None


def test_dtype_and_export_roundtrip_bf16(tmp_path):
    hf = make_hf("llama")
    config, model = load_hf_dir(_saved(hf, tmp_path), dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    save_hf_dir(model, config, None, tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    _, again = load_hf_dir(tmp_path / "bf16")  # dtype from config.json
    assert next(again.parameters()).dtype == torch.bfloat16


def test_export_into_existing_dir_replaces_files(tmp_path):
    hf = make_hf("llama")
    config, model = load_hf_dir(_saved(hf, tmp_path))
    out = tmp_path / "out"
    save_hf_dir(model, config, None, out, max_shard_bytes=100_000)
    save_hf_dir(model, config, None, out)  # now a single file: stale shards must go
    names = {p.name for p in out.iterdir()}
    assert "model.safetensors" in names and not any(n.startswith("model-") for n in names)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # temp folder cleaned up


# ------------------------------------------------------------------------------------------ errors
def _saved(hf, tmp_path):
    d = tmp_path / "hf"
    if not d.exists():
        hf.save_pretrained(d)
    return d


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_truncated_safetensors(tmp_path):
    d = _saved(make_hf("llama"), tmp_path)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(LlmkitError, match=r"model\.safetensors"):
        load_hf_dir(d)


def test_corrupt_header(tmp_path):
    d = _saved(make_hf("llama"), tmp_path)
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(LlmkitError, match=r"model\.safetensors.*not a valid safetensors"):
        load_hf_dir(d)


def test_missing_tensor(tmp_path):
    from safetensors.torch import save_file

    d = _saved(make_hf("llama"), tmp_path)
    t = _tensors(d / "model.safetensors")
    del t["model.layers.1.mlp.down_proj.weight"]
    save_file(t, str(d / "model.safetensors"))
    with pytest.raises(
        LlmkitError, match=r"model\.safetensors.*missing tensor model\.layers\.1\.mlp\.down_proj\.weight"
    ):
        load_hf_dir(d)


def test_shape_mismatch(tmp_path):
    from safetensors.torch import save_file

    d = _saved(make_hf("llama"), tmp_path)
    t = _tensors(d / "model.safetensors")
    t["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(8, 64)
    save_file(t, str(d / "model.safetensors"))
    with pytest.raises(
        LlmkitError, match=r"model\.safetensors.*'model\.layers\.0\.self_attn\.k_proj\.weight'.*shape"
    ):
        load_hf_dir(d)


def test_unexpected_tensor(tmp_path):
    from safetensors.torch import save_file

    d = _saved(make_hf("llama"), tmp_path)
    t = _tensors(d / "model.safetensors")
    t["model.layers.7.mlp.up_proj.weight"] = torch.zeros(96, 64)
    save_file(t, str(d / "model.safetensors"))
    with pytest.raises(LlmkitError, match=r"model\.safetensors.*unexpected tensor 'model\.layers\.7"):
        load_hf_dir(d)


def test_unsupported_model_type(tmp_path):
    d = _saved(make_hf("llama"), tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "bert"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LlmkitError, match=r"config\.json: unsupported model_type 'bert'"):
        load_hf_dir(d)


def test_missing_files(tmp_path):
    with pytest.raises(LlmkitError, match="not a directory"):
        load_hf_dir(tmp_path / "nope")
    d = _saved(make_hf("llama"), tmp_path)
    (d / "model.safetensors").unlink()
    with pytest.raises(LlmkitError, match="no model.safetensors"):
        load_hf_dir(d)


def test_truncated_message_names_tensor(tmp_path):
    d = _saved(make_hf("llama"), tmp_path)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(LlmkitError, match=r"model\.safetensors: truncated file: tensor '.*' ends at byte"):
        load_hf_dir(d)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_attention_weights_match_transformers_eager(family, tmp_path):
    d = _saved(make_hf(family), tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager").eval()
    _, model = load_hf_dir(d)
    x = ids()
    with torch.no_grad():
        want = hf(x, output_attentions=True).attentions
        got = model(x, output_attentions=True).attentions
    assert len(got) == len(want) == 2
    for g, w in zip(got, want):
        assert g.shape == w.shape == (2, 4, 16, 16)
        assert (g - w).abs().max().item() <= 1e-5


@pytest.mark.parametrize("transposed", [False, True])
def test_stacked_experts_layout(transposed, tmp_path):
    """Files that hold experts as 3-D tensors (experts.gate_up_proj / experts.down_proj) load too."""
    from safetensors.torch import save_file

    hf = make_hf("mixtral")
    d = _saved(hf, tmp_path)
    t = _tensors(d / "model.safetensors")
    for i in range(2):
        pre = f"model.layers.{i}.block_sparse_moe"
        w = {
            k: torch.stack([t.pop(f"{pre}.experts.{e}.{k}.weight") for e in range(4)])
            for k in ("w1", "w2", "w3")
        }
        gate_up = torch.cat([w["w1"], w["w3"]], dim=1)  # (E, 2F, d)
        down = w["w2"]  # (E, d, F)
        if transposed:
            gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
        t[f"model.layers.{i}.mlp.experts.gate_up_proj"] = gate_up.contiguous()
        t[f"model.layers.{i}.mlp.experts.down_proj"] = down.contiguous()
        t[f"model.layers.{i}.mlp.gate.weight"] = t.pop(f"{pre}.gate.weight")
    save_file(t, str(d / "model.safetensors"))
    _, model = load_hf_dir(d)
    x = ids()
    with torch.no_grad():
        assert (model(x) - hf(x).logits).abs().max().item() <= 1e-4


def test_original_gpt2_layout(tmp_path):
    """OpenAI-era GPT-2 files: no 'transformer.' prefix, causal-mask buffers stored as tensors."""
    from safetensors.torch import save_file

    hf = make_hf("gpt2")
    d = _saved(hf, tmp_path)
    t = {k.removeprefix("transformer."): v for k, v in _tensors(d / "model.safetensors").items()}
    for i in range(2):
        t[f"h.{i}.attn.bias"] = torch.ones(1, 1, 64, 64).tril()
        t[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(t, str(d / "model.safetensors"))
    _, model = load_hf_dir(d)
    x = ids()
    with torch.no_grad():
        assert (model(x) - hf(x).logits).abs().max().item() <= 1e-4


def test_export_refuses_what_the_family_cannot_express(tmp_path):
    from llmkit.config import ModelConfig
    from llmkit.model import Transformer

    config = ModelConfig(
        vocab_size=32,
        d_model=32,
        n_layers=1,
        n_heads=2,
        d_ff=64,
        pos_encoding="rope",
        norm="rmsnorm",
        mlp="swiglu",
        activation="silu",
        qk_norm=True,
        model_type="llama",
    )
    with pytest.raises(LlmkitError, match=r"cannot export as 'llama'.*qk_norm"):
        save_hf_dir(Transformer(config), config, None, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_streamed_loading_peak_memory(tmp_path):
    """Peak RSS while loading stays near the final weights (limit: 2x), measured in a fresh process."""
    import subprocess
    import sys

    from safetensors.torch import save_file

    from llmkit.config import ModelConfig
    from llmkit.model import Transformer

    hf = dict(
        model_type="llama",
        vocab_size=8000,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=768,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    model = Transformer(ModelConfig.from_hf(hf))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(hf))
    script = """
import sys, torch
from llmkit.config import ModelConfig
from llmkit.model import Transformer
from llmkit.checkpoint import load_hf_dir
with torch.device("meta"):
    Transformer(ModelConfig(n_layers=1))  # warm up lazy imports before the baseline
status = lambda key: int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current RSS
base = status("VmRSS")
_, m = load_hf_dir(sys.argv[1])
weights = sum(p.numel() * p.element_size() for p in m.parameters())
print((status("VmHWM") - base) / weights)
"""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux /proc/self/clear_refs to measure peak memory")
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, check=True
    )
    ratio = float(out.stdout.strip().splitlines()[-1])
    assert ratio <= 2.0, ratio


def test_export_with_tokenizer_and_chat_template(tmp_path):
    """With a tokenizer: tokenizer files + chat template that transformers' AutoTokenizer loads."""
    from conftest import shared_path

    from llmkit.tokenizer import Tokenizer

    tok = Tokenizer.load(shared_path("tokenizers/gpt2"))
    hf = transformers.LlamaConfig(**{**TINY, "vocab_size": tok.vocab_size})
    torch.manual_seed(0)
    src = transformers.AutoModelForCausalLM.from_config(hf).eval()
    config, model = load_hf_dir(_saved(src, tmp_path))
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    save_hf_dir(model, config, tok, tmp_path / "out", chat_template=template)
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= names
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert auto.encode("Hello world", add_special_tokens=False) == [15496, 995]
    chat = auto.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat == "<user>hi\n"
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    x = ids(vocab=tok.vocab_size)
    with torch.no_grad():
        assert (back(x).logits - src(x).logits).abs().max().item() <= 1e-4


def test_cli_reports_broken_checkpoint_in_one_line(tmp_path, capsys):
    """`llmkit export` on a folder with a truncated shard: exit 1, one line naming the file and tensor."""
    from llmkit.cli import main

    d = _saved(make_hf("qwen3"), tmp_path)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-64])
    capsys.readouterr()  # drop transformers' progress output
    assert main(["export", str(d), "--to", "hf", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("llmkit: error: ") and "model.safetensors" in err and "tensor '" in err


def test_bf16_logits_close_to_transformers_bf16(tmp_path):
    hf = make_hf("qwen3")
    d = _saved(hf, tmp_path)
    hf = hf.to(torch.bfloat16)
    _, model = load_hf_dir(d, dtype=torch.bfloat16)
    x = ids()
    with torch.no_grad():
        want, got = hf(x).logits.float(), model(x).float()
    assert (got - want).abs().max().item() <= 2e-2 * want.abs().max().item()  # ~1 bf16 ulp of the logits

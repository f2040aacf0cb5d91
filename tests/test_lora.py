"""LoRA wrappers against hand computation (base(x) + s * B A x) and against peft on the same transformers
model; LoRA on plain, quantized and fused projections changes the model; QLoRA backward reaches only the
adapters; merging; a model used from two threads at once."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_model import CONFIGS, rand_ids, tiny

from llmkit.errors import LlmkitError
from llmkit.lora import TARGETS, LoRALinear, adapters_disabled, apply_lora, lora_modules, merge_lora
from llmkit.model import KVCache, Transformer
from llmkit.model.layers import FusedPart, project
from llmkit.quant import Int4Linear, Int8Linear, fuse_projections, quantize_model


def _randomize_b(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)


def _by_hand(m: LoRALinear, x: torch.Tensor) -> torch.Tensor:
    a, b = m.lora_A.weight, m.lora_B.weight  # (r, K), (N, r)
    return m.base_layer(x) + (x @ a.T @ b.T) * (m.alpha / m.r)


def _model(kind: str) -> Transformer:
    model = tiny("llama_gqa")
    if kind == "float_fused":
        fuse_projections(model)
    elif kind != "float":
        quantize_model(model, kind)  # quantized and fused
    return model


@pytest.mark.parametrize("kind", ["linear", "int8", "int4", "fused_int8"])
def test_wrapper_equals_hand_computation(kind):
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    if kind == "fused_int8":
        holder = nn.Module()
        holder.q_proj, holder.k_proj, holder.v_proj = lin, nn.Linear(64, 16), nn.Linear(64, 16)
        quantize_model(holder, "int8")  # quantized, then fused: q_proj is a FusedPart
        base = holder.q_proj
        assert type(base) is FusedPart
    else:
        base = {"linear": lin, "int8": Int8Linear.from_linear(lin), "int4": Int4Linear.from_linear(lin)}[kind]
    m = LoRALinear(base, r=4, alpha=8)
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        assert torch.equal(m(x), base(x))  # B starts at zero
        m.lora_B.weight.normal_()
        assert not torch.allclose(m(x), base(x), atol=1e-3)
        torch.testing.assert_close(m(x), _by_hand(m, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["float", "float_fused", "int8", "int4"])
def test_lora_changes_the_model_and_project_matches_hand(kind):
    model = _model(kind)
    x = rand_ids(2, 9)
    with torch.no_grad():
        before = model(x)
        names = apply_lora(model, r=4, alpha=8)
        assert torch.equal(model(x), before)  # zero B: the model is unchanged
        # only q_proj of layer 0 gets an update: a fused q|k|v matmul must not bypass it
        q = model.model.layers[0].self_attn.q_proj
        q.lora_B.weight.normal_(std=0.1)
        after = model(x)
    assert len(names) == 2 * len(TARGETS) and names[0] == "model.layers.0.self_attn.q_proj"
    assert not torch.allclose(after, before, atol=1e-3)
    attn = model.model.layers[0].self_attn
    h = torch.randn(2, 9, 64)
    with torch.no_grad():
        got = project(h, attn.q_proj, attn.k_proj, attn.v_proj)
        want = [_by_hand(attn.q_proj, h), attn.k_proj.base_layer(h), attn.v_proj.base_layer(h)]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_lora_and_quantization_compose_in_either_order(mode):
    """quantize -> LoRA and LoRA -> quantize give the same modules and the same outputs."""
    first_quant = quantize_model(tiny("llama_gqa"), mode)
    apply_lora(first_quant, r=4)
    _randomize_b(first_quant)
    first_lora = tiny("llama_gqa")
    apply_lora(first_lora, r=4)
    first_lora.load_state_dict({k: v for k, v in first_quant.state_dict().items() if ".lora_" in k},
                               strict=False)
    quantize_model(first_lora, mode)
    assert type(first_lora.model.layers[1].mlp.up_proj.base_layer) is FusedPart
    assert type(first_lora.model.layers[1].mlp.up_proj.lora_B) is nn.Linear  # adapters stay float
    x = rand_ids(2, 9)
    with torch.no_grad():
        torch.testing.assert_close(first_lora(x), first_quant(x), rtol=0, atol=0)


def test_apply_lora_freezes_everything_else():
    model = tiny("moe_shared")
    names = apply_lora(model, r=2, targets=("q_proj", "down_proj"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert "model.layers.0.mlp.experts.0.down_proj" in names  # experts are projections too
    assert "model.layers.0.self_attn.q_proj.base_layer.weight" in model.state_dict()
    with pytest.raises(LlmkitError, match="no projection named"):
        apply_lora(tiny("gpt2"), targets=("nothing",))


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_qlora_backward_reaches_only_the_adapters(mode):
    model = quantize_model(tiny("llama_gqa"), mode)
    apply_lora(model, r=4, alpha=8)
    _randomize_b(model)
    model.train()
    x = rand_ids(2, 6)  # 12 rows: the quantized modules' decode-size path, which must stay differentiable
    logits = model(x)
    F.cross_entropy(logits[:, :-1].reshape(-1, 97), x[:, 1:].reshape(-1)).backward()
    for name, p in model.named_parameters():
        if ".lora_" in name:
            assert p.grad is not None and p.grad.abs().max() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    for name, b in model.named_buffers():
        assert b.grad is None, name


@pytest.mark.parametrize("fused", [False, True])
def test_merge_lora_folds_float_bases(fused):
    model = tiny("llama_gqa")
    if fused:
        fuse_projections(model)
    apply_lora(model, r=4, alpha=8)
    _randomize_b(model)
    x = rand_ids(2, 9)
    with torch.no_grad():
        want = model(x)
        merged = merge_lora(model)
        got = model(x)
    assert len(merged) == 2 * len(TARGETS) and not lora_modules(model)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_merge_lora_refuses_quantized_bases():
    model = quantize_model(tiny("llama_gqa"), "int8")
    apply_lora(model)
    with pytest.raises(LlmkitError, match="merge on a float model|load the model unquantized"):
        merge_lora(model)
    assert lora_modules(model)  # nothing merged


def test_lora_matches_peft_on_a_transformers_model(tmp_path):
    peft = pytest.importorskip("peft")
    from test_checkpoint_hf import _saved, make_hf

    from llmkit.checkpoint import load_hf_dir

    hf = make_hf("llama")
    _, model = load_hf_dir(_saved(hf, tmp_path))
    targets = list(TARGETS)
    x = rand_ids(2, 12, seed=5)
    with torch.no_grad():
        base = hf(x).logits
    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets,
                          init_lora_weights=False)  # random B: the adapter does something
    ref = peft.get_peft_model(hf, cfg).eval()
    apply_lora(model, r=4, alpha=8, targets=targets)
    theirs = {k.replace("base_model.model.", "").replace(".default", ""): v
              for k, v in ref.state_dict().items() if ".lora_" in k}
    ours = {k: v for k, v in model.state_dict().items() if ".lora_" in k}
    assert set(theirs) == set(ours) and len(ours) == 2 * 2 * len(targets)
    model.load_state_dict(theirs, strict=False)
    with torch.no_grad():
        want = ref(x).logits
        got = model(x)
        fuse_projections(model)  # the same adapters over fused q|k|v and gate|up
        got_fused = model(x)
    assert not torch.allclose(want, base, atol=1e-3)  # the adapters do something
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_fused, want, rtol=1e-4, atol=1e-4)
    with torch.no_grad(), adapters_disabled(model), ref.disable_adapter():  # the reference of DPO / KL
        off, want_off = model(x), ref(x).logits
    torch.testing.assert_close(off, want_off, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(off, base, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-4)  # back on after the block


@pytest.mark.parametrize("kind", ["float", "int8"])
def test_model_used_from_two_threads(kind):
    """One thread runs plain forwards, the other hidden states + head with a KV cache (the engine's way);
    both get the logits a single thread gets."""
    model = _model(kind)
    a, b = rand_ids(2, 10, seed=1), rand_ids(1, 7, seed=2)
    with torch.inference_mode():
        want_a = model(a)
        want_b = model(b)[:, -1]

    errors: list[str] = []

    def plain():
        with torch.inference_mode():
            for _ in range(25):
                if not torch.allclose(model(a), want_a, atol=1e-5):
                    errors.append("plain forward gave different logits")

    def headless():
        with torch.inference_mode():
            for _ in range(25):
                cache = KVCache(model.config, 1, 16)
                h = model(b, positions=torch.arange(7)[None], cache=cache, return_hidden=True)  # (1, 7, d)
                if h.shape[-1] != CONFIGS["llama_gqa"].d_model:
                    errors.append(f"return_hidden gave shape {tuple(h.shape)}")
                elif not torch.allclose(model.head(h[:, -1]), want_b, atol=1e-5):
                    errors.append("hidden states + head gave different logits")

    threads = [threading.Thread(target=plain), threading.Thread(target=headless)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]


def test_copies_are_independent():
    model = quantize_model(tiny("llama_gqa"), "int8")
    other = copy.deepcopy(model)
    p, q = model.model.layers[0].self_attn.q_proj, other.model.layers[0].self_attn.q_proj
    assert p.fused is not q.fused and q.fused is other.model.layers[0].self_attn.k_proj.fused


def test_peft_adapters_load_in_llmkit_and_back(tmp_path):
    """An adapter saved by peft loads in llmkit with peft's logits; llmkit's save_adapter writes a folder that
    peft loads onto a fresh transformers model with the same logits again."""
    peft = pytest.importorskip("peft")
    import transformers
    from test_checkpoint_hf import _saved, make_hf

    from llmkit.checkpoint import load_hf_dir
    from llmkit.lora import load_adapter, save_adapter

    hf = make_hf("llama")
    base_dir = _saved(hf, tmp_path)
    n_layers = hf.config.num_hidden_layers
    x = rand_ids(2, 12, seed=7)
    with torch.no_grad():
        base = hf(x).logits
    torch.manual_seed(1)
    cfg = peft.LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0, init_lora_weights=False, use_rslora=True,
                          target_modules=["q_proj", "v_proj", "down_proj"])
    ref = peft.get_peft_model(hf, cfg).eval()
    ref.save_pretrained(tmp_path / "peft_adapter")
    with torch.no_grad():
        want = ref(x).logits
    assert not torch.allclose(want, base, atol=1e-3)  # the adapter does something
    _, model = load_hf_dir(base_dir)
    assert len(load_adapter(model, tmp_path / "peft_adapter")) == 3 * n_layers
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-4)

    save_adapter(model, tmp_path / "ours")
    fresh = transformers.AutoModelForCausalLM.from_pretrained(base_dir).eval()
    back = peft.PeftModel.from_pretrained(fresh, tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, want, rtol=1e-4, atol=1e-4)

    with pytest.raises(LlmkitError, match="already has an adapter"):
        load_adapter(model, tmp_path / "peft_adapter")
    with pytest.raises(LlmkitError, match="no adapter_config.json"):
        load_adapter(model, tmp_path)


@pytest.mark.slow
def test_merge_verb_writes_what_peft_merges(tmp_path, capsys, tiny_llama_dir):
    """`llmkit merge BASE ADAPTER --to DIR`: transformers loads DIR with the logits of peft's own
    merge_and_unload on the same adapter."""
    peft = pytest.importorskip("peft")
    import transformers

    from llmkit.cli import main

    base_dir = tiny_llama_dir
    torch.manual_seed(2)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                          target_modules=["k_proj", "o_proj", "up_proj"])
    ref = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(base_dir), cfg).eval()
    ref.save_pretrained(tmp_path / "adapter")
    x = torch.randint(0, 49152, (2, 10), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        want = ref.merge_and_unload()(x).logits
    assert main(["merge", str(base_dir), str(tmp_path / "adapter"), "--to", str(tmp_path / "merged")]) == 0
    assert "merged" in capsys.readouterr().out
    got = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(got(x).logits, want, rtol=1e-4, atol=1e-4)
    assert main(["merge", str(base_dir), str(tmp_path), "--to", str(tmp_path / "m2")]) == 1
    assert "no adapter_config.json" in capsys.readouterr().err


@pytest.mark.slow
def test_generate_with_adapter_equals_peft_greedy(tmp_path, capsys, tiny_llama_dir):
    """`llmkit generate MODEL PROMPT --adapter DIR --temperature 0` prints what peft's model generates
    greedily with the same adapter."""
    peft = pytest.importorskip("peft")
    import transformers

    from llmkit.cli import main
    from llmkit.tokenizer import Tokenizer

    torch.manual_seed(3)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                          target_modules=["q_proj", "v_proj", "gate_proj"])
    ref = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir), cfg).eval()
    ref.save_pretrained(tmp_path / "adapter")
    tok = Tokenizer.load(tiny_llama_dir)
    prompt = "Il était une fois"
    ids = torch.tensor([tok.encode(prompt)])
    with torch.no_grad():
        out = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                           do_sample=False)
    want = tok.decode(out[0, ids.shape[1]:].tolist())
    assert main(["generate", str(tiny_llama_dir), prompt, "--adapter", str(tmp_path / "adapter"),
                 "--temperature", "0", "--max-tokens", "8"]) == 0
    got = capsys.readouterr().out
    assert want and want in got
    assert main(["generate", str(tiny_llama_dir), prompt, "--temperature", "0", "--max-tokens", "8"]) == 0
    assert want not in capsys.readouterr().out  # without the adapter: another text (the test can fail)

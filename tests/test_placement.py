"""Layer placement (llmkit.placement): unit sizes and plans computed by hand, a model placed across two
"devices" (cpu:0 and cpu, distinct torch.device objects, so every hop runs) gives the unplaced logits and
greedy tokens, device auto without CUDA changes nothing; on a GPU, a half-placed model matches the CPU one."""

import pytest
import torch

import llmkit.model.transformer as transformer
from llmkit.config import ModelConfig
from llmkit.errors import LlmkitError
from llmkit.generate.engine import Engine
from llmkit.generate.sampling import SamplingParams
from llmkit.model import Transformer
from llmkit.placement import auto_place, meta_sizes, module_sizes, parse_bytes, place, plan_layers

GREEDY = SamplingParams(temperature=0, max_tokens=10)


def config(**kw) -> ModelConfig:
    return ModelConfig(**{**dict(vocab_size=97, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=64,
                                 max_seq_len=64, pos_encoding="rope", norm="rmsnorm", mlp="swiglu",
                                 activation="silu", tie_embeddings=False), **kw})


def tiny(**kw) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(config(**kw)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(5.0)
    return model


# by hand, float32: q, o 32x32; k, v 32x16 (2 KV heads of 8); gate, up, down 32x64; two norms of 32
EMBED = 97 * 32 * 4
LAYER = (2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64 + 2 * 32) * 4  # 37120
HEAD = (32 + 97 * 32) * 4  # final norm + lm_head


def test_sizes_by_hand():
    sizes = meta_sizes(config(), torch.float32)
    assert sizes["model.embed_tokens"] == EMBED and sizes["lm_head"] + sizes["model.norm"] == HEAD
    assert all(sizes[f"model.layers.{i}"] == LAYER for i in range(4))
    assert meta_sizes(config(), torch.bfloat16)["model.layers.0"] == LAYER // 2
    tied = module_sizes(tiny(tie_embeddings=True))  # the shared tensor counts once, with the embeddings
    assert tied["model.embed_tokens"] == EMBED and tied["lm_head"] == 0
    assert module_sizes(tiny()) == sizes  # measured on real tensors as on the meta device


def test_plan_by_hand():
    cfg = config()
    budget = 2 * LAYER + LAYER // 2  # layers 0, 1 fit; layer 2 does not, so 2 and 3 go to the CPU
    plan = plan_layers(cfg, budget, dtype=torch.float32)
    assert plan == {"model.embed_tokens": "cpu",  # untied: lookups stay on the CPU
                    "model.layers.0": "cuda", "model.layers.1": "cuda", "model.layers.2": "cpu",
                    "model.layers.3": "cpu",
                    "model.norm": "cuda", "lm_head": "cuda"}  # the head fits in the half layer left
    assert plan_layers(cfg, 2 * LAYER + 100, dtype=torch.float32)["lm_head"] == "cpu"  # not any more
    everything = EMBED + 4 * LAYER + HEAD
    assert set(plan_layers(cfg, everything, dtype=torch.float32).values()) == {"cuda"}  # all, embed too
    assert set(plan_layers(cfg, everything - 1, dtype=torch.float32).values()) == {"cuda", "cpu"}
    assert set(plan_layers(cfg, 0, dtype=torch.float32).values()) == {"cpu"}
    # tied: the embeddings + norm + head are one unit, placed first
    tied = config(tie_embeddings=True)
    plan = plan_layers(tied, EMBED + (32 * 4) + LAYER, dtype=torch.float32, gpu="g", cpu="c")
    assert [plan[k] for k in ("model.embed_tokens", "model.norm", "lm_head")] == ["g"] * 3
    assert [plan[f"model.layers.{i}"] for i in range(4)] == ["g", "c", "c", "c"]


def greedy(model, ids, **kw) -> list[int]:
    eng = Engine(model, max_batch=1, prefill_chunk=4, **kw)
    return [o.token_id for o in eng.generate_ids(ids, GREEDY)]


@pytest.mark.parametrize("tied", [False, True])
def test_placed_model_equals_unplaced(tied, monkeypatch, one_thread):
    ref, model = tiny(tie_embeddings=tied), tiny(tie_embeddings=tied)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    prompt = ids[0, :7].tolist()
    with torch.no_grad():
        want, tokens = ref(ids), greedy(ref, prompt)
    budget = (EMBED if tied else 0) + HEAD + 2 * LAYER
    plan = plan_layers(model.config, budget, sizes=module_sizes(model), gpu="cpu:0", cpu="cpu")
    assert sorted(set(plan.values())) == ["cpu", "cpu:0"]
    place(model, plan)
    assert model.layer_devices == [torch.device(plan[f"model.layers.{i}"]) for i in range(4)] + [
        torch.device(plan["lm_head"])]
    hops = []

    def count(device, *a):
        hops.append(device)
        return real(device, *a)

    real = transformer._to_device
    monkeypatch.setattr(transformer, "_to_device", count)
    with torch.no_grad():
        got = model(ids)
    assert hops  # the forward did move the hidden state
    assert torch.equal(got, want)  # same tensors, same kernels: bit for bit
    assert greedy(model, prompt) == tokens
    assert greedy(model, prompt, kv_dtype="int8") == greedy(ref, prompt, kv_dtype="int8")


def test_place_checks_the_plan():
    model = tiny(tie_embeddings=True)
    plan = plan_layers(model.config, 10**9, sizes=module_sizes(model))
    with pytest.raises(LlmkitError, match="share one tensor"):
        place(model, {**plan, "lm_head": "cpu", "model.embed_tokens": "cpu:0"})
    with pytest.raises(LlmkitError, match="plan lacks model.layers.0"):
        place(model, {k: v for k, v in plan.items() if k != "model.layers.0"})
    place(model, dict.fromkeys(plan, "cpu"))  # one device: a plain move, no hops
    assert model.layer_devices is None


def test_parse_bytes():
    assert parse_bytes("2GB") == 2 * 10**9 and parse_bytes("512MiB") == 512 << 20
    assert parse_bytes("1000") == 1000 and parse_bytes("1.5 GiB") == 3 << 29
    with pytest.raises(LlmkitError, match="bad byte size"):
        parse_bytes("lots")


def test_auto_place_with_a_simulated_budget(monkeypatch):
    model = tiny()
    monkeypatch.setenv("LLMKIT_GPU_BUDGET", f"{2 * LAYER + HEAD}")
    plan = auto_place(model, gpu="cpu:0", cpu="cpu")
    assert [plan[f"model.layers.{i}"] for i in range(4)] == ["cpu:0", "cpu:0", "cpu", "cpu"]
    assert model.layer_devices is not None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_device_auto_without_cuda_is_cpu(monkeypatch):
    model = tiny()
    monkeypatch.setenv("LLMKIT_GPU_BUDGET", "1KB")
    assert auto_place(model) is None
    assert model.layer_devices is None and {p.device.type for p in model.parameters()} == {"cpu"}


@pytest.mark.gpu
@pytest.mark.parametrize("tied", [False, True])
def test_half_on_the_gpu_matches_cpu(tied):
    ref, model = tiny(tie_embeddings=tied), tiny(tie_embeddings=tied)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    prompt = ids[0, :7].tolist()
    with torch.no_grad():
        want, tokens = ref(ids), greedy(ref, prompt)
    plan = auto_place(model, budget=(EMBED if tied else 0) + HEAD + 2 * LAYER)
    assert sorted(set(plan.values())) == ["cpu", "cuda"]
    layers = model.model.layers
    assert layers[0].mlp.up_proj.weight.is_cuda and not layers[3].mlp.up_proj.weight.is_cuda
    with torch.no_grad():
        got = model(ids.to(next(model.parameters()).device))
    assert (got.cpu() - want).abs().max() <= 1e-4 * want.abs().max()
    eng = Engine(model, max_batch=1, prefill_chunk=4, kv_dtype="int8")
    assert eng.cache.k[0].is_cuda and not eng.cache.k[3].is_cuda
    assert greedy(model, prompt) == tokens


def test_model_to_after_placing_reads_the_devices_again():
    model = tiny()
    place(model, plan_layers(model.config, 2 * LAYER, sizes=module_sizes(model), gpu="cpu:0", cpu="cpu"))
    assert model.layer_devices is not None
    model.to(torch.float64)  # the weights all report device cpu: one device, no hops left
    assert model.layer_devices is None
    with torch.no_grad():
        assert model(torch.tensor([[1, 2, 3]])).dtype == torch.float64

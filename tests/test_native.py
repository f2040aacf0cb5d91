"""The native decode step (llmkit/kernels/decode.c via llmkit.generate.native) against the readable model:
the same logits and tokens as PyTorch's decode for float, int4 and int8 Llama-shaped models (GQA, biases,
sliding windows, an attention scale), rows of a batch independent of each other, the PyTorch step whenever
decode.c cannot compute the model (and why), and a new plan when modules are swapped after the engine was
built."""

import pytest
import torch
from torch import nn

from llmkit import kernels
from llmkit.config import ModelConfig
from llmkit.generate.engine import Engine
from llmkit.generate.native import why_not
from llmkit.generate.sampling import SamplingParams
from llmkit.model import Transformer

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"no kernels: {kernels.why_not()}")

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def tiny(scale: float = 4.0, **kw) -> Transformer:
    torch.manual_seed(0)
    kw = {"vocab_size": 97, "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 96,
          "max_seq_len": 128, "pos_encoding": "rope", "norm": "rmsnorm", "mlp": "swiglu",
          "activation": "silu", **kw}
    cfg = ModelConfig(**kw)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # larger weights: sharper distributions, fewer near-ties
        for p in model.parameters():
            p.mul_(scale)
    return model


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 97, (n,), generator=g).tolist() for n in (5, 17, 9)]


def decode_all(model, native: bool, ps=None, params=GREEDY, max_batch=3, **kw):
    """Tokens and each step's logits (per row) of greedy requests running together."""
    eng = Engine(model, max_batch=max_batch, native=native, **kw)
    assert (eng._native is not None) == native, why_not(model, eng.cache)
    rows = [eng.add(p, params) for p in (ps or prompts())]
    toks: dict[int, list[int]] = {r: [] for r in rows}
    logits: dict[int, list[torch.Tensor]] = {r: [] for r in rows}
    while eng.running:
        for r in eng.running:
            if eng.request(r).logits is not None:
                logits[r].append(eng.request(r).logits.clone())
        for o in eng.step():
            toks[o.row].append(o.token_id)
    return [toks[r] for r in rows], [torch.stack(logits[r]) for r in rows]


@pytest.mark.parametrize("kw", [
    {},
    {"attn_qkv_bias": True, "attn_out_bias": True, "mlp_bias": True},  # Qwen2-style biases, all of them
    {"sliding_window": 6},  # Mistral: keys older than the window are hidden
    {"attn_scale": 0.05, "n_kv_heads": 1},  # another scale; multi-query attention
    {"d_model": 48, "n_heads": 3, "n_kv_heads": 3},  # no grouping, head_dim 16
], ids=["gqa", "biases", "window", "scale-mqa", "mha"])
def test_float_native_decode_equals_pytorch(kw):
    model = tiny(**kw)
    (t_ref, l_ref), (t_nat, l_nat) = decode_all(model, False), decode_all(model, True)
    assert t_nat == t_ref
    for a, b in zip(l_ref, l_nat):
        assert a.shape == b.shape and (a - b).abs().max() <= 1e-4 * max(1.0, a.abs().max())


@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_quantized_native_decode_equals_pytorch(mode):
    """The same kernels multiply both ways (quant.c); only the code around them differs."""
    from llmkit.quant import quantize_model

    model = quantize_model(tiny(), mode)
    (t_ref, l_ref), (t_nat, l_nat) = decode_all(model, False), decode_all(model, True)
    assert t_nat == t_ref
    for a, b in zip(l_ref, l_nat):
        assert (a - b).abs().max() <= 2e-3 * a.abs().max()


@pytest.mark.parametrize("head", ["int8", "int4", "float", "softcap"])
def test_a_quantized_head_runs_in_the_step_with_the_modules_bits(head):
    """An int8 or int4 head runs inside decode.c's step (no PyTorch call between the layers and the logits):
    the logits are the module's own on the step's hidden states, to the bit, one token or three. A float
    head, or one followed by a soft-cap, stays with PyTorch."""
    from llmkit.quant import Int4Linear, Int8Linear, quantize_model

    model = quantize_model(tiny(**({"final_logit_softcap": 5.0} if head == "softcap" else {})), "int4")
    if head == "int4":
        model.lm_head = Int4Linear.from_linear(nn.Linear(64, 97, bias=False))
    elif head == "float":
        model.lm_head = nn.Linear(64, 97, bias=False)
    assert isinstance(model.lm_head, Int8Linear) == (head in ("int8", "softcap"))
    nd = Engine(model, max_batch=1)._native
    assert nd.plan.head_on == (head in ("int8", "int4"))
    for ids in ([5], [5, 7, 96]):
        at = list(range(len(ids)))
        hidden = nd(ids, [0] * len(ids), at, hidden=True)
        logits = nd(ids, [0] * len(ids), at)  # the same keys and values written again
        assert torch.equal(logits, model.head(hidden))
    (t_ref, _), (t_nat, _) = decode_all(model, False), decode_all(model, True)
    assert t_nat == t_ref


@pytest.mark.parametrize("kind", ["float", "int8", "int4"])
def test_embedding_lookup_in_c_gives_the_modules_floats(kind):
    """llmkit_embed looks up a float32 nn.Embedding, an Int8Embedding (GGUF Q8_0) or an Int4Embedding to the
    bit of the module's own forward, refuses an id out of range (the module then says what is wrong), and a
    decode with the table looked up in C gives PyTorch's tokens."""
    import ctypes

    from llmkit.quant import Int4Embedding, Int8Embedding

    model = tiny()
    if kind != "float":
        emb = (Int8Embedding if kind == "int8" else Int4Embedding)(97, 64)
        emb.set_weight(model.model.embed_tokens.weight.detach())
        model.model.embed_tokens = emb
    nd = Engine(model, max_batch=1)._native
    assert nd.plan.emb_kind == {"float": 1, "int8": 2, "int4": 3}[kind]
    ids, x = torch.tensor([0, 5, 96, 42, 5]), torch.empty(5, 64)
    assert nd.lib.llmkit_embed(ctypes.byref(nd.plan), 5, ids.data_ptr(), x.data_ptr()) == 0
    assert torch.equal(x, model.model.embed_tokens(ids).float())
    bad = torch.tensor([3, 97])
    assert nd.lib.llmkit_embed(ctypes.byref(nd.plan), 2, bad.data_ptr(), x.data_ptr()) == -1
    (t_ref, _), (t_nat, _) = decode_all(model, False), decode_all(model, True)
    assert t_nat == t_ref


@pytest.mark.parametrize("mode", ["float", "int4"])
def test_bfloat16_kv_cache_decodes_natively_as_pytorch(mode):
    """kv_dtype="bf16" (`--kv-cache bf16`): decode.c stores keys and values rounded to bfloat16 (to nearest
    even, as PyTorch's cast) and widens them as it reads; PyTorch's step does the same with its own ops."""
    from llmkit.quant import quantize_model

    model = tiny() if mode == "float" else quantize_model(tiny(), "int4")
    engines = {native: Engine(model, max_batch=3, native=native, kv_dtype="bf16") for native in (False, True)}
    assert engines[True]._native is not None and engines[True].cache.k[0].dtype == torch.bfloat16
    (t_ref, l_ref), (t_nat, l_nat) = (decode_all(model, native, kv_dtype="bf16") for native in (False, True))
    assert t_nat == t_ref
    for a, b in zip(l_ref, l_nat):
        assert (a - b).abs().max() <= 2e-3 * a.abs().max()
    _, l_f32 = decode_all(model, True)  # and the cache's precision shows: not the float32 cache's logits
    assert max((a - b).abs().max() for a, b in zip(l_f32, l_nat)) > 1e-5
    for native, eng in engines.items():  # the stored values: PyTorch's rounding of the same keys
        rows = [eng.add(p, GREEDY) for p in prompts()]
        while eng.running:
            eng.step()
        assert rows
    k_ref, k_nat = engines[False].cache.k[1].float(), engines[True].cache.k[1].float()
    assert (k_ref - k_nat).abs().max() <= 2 ** -7 * k_ref.abs().max()
    assert (k_ref == k_nat).float().mean() > 0.9  # most to the bit: the same value rounds the same way


def test_rows_do_not_depend_on_the_batch():
    """Alone or beside other rows (each at its own position), a row decodes the same (to rounding: its
    prefill and the PyTorch head see other batch shapes)."""
    model = tiny()
    ps = prompts()
    _, together = decode_all(model, True, ps)
    for p, lg in zip(ps, together):
        _, (alone,) = decode_all(model, True, [p], max_batch=1)
        assert (alone - lg).abs().max() <= 1e-5 * lg.abs().max()


class Spy:
    """Wraps an engine's native step and records (tokens, hidden) of each call."""

    def __init__(self, native):
        self.native, self.calls = native, []

    def __getattr__(self, name):
        return getattr(self.native, name)

    def __call__(self, ids_, rows, positions, hidden=False):
        self.calls.append((len(rows), hidden))
        return self.native(ids_, rows, positions, hidden=hidden)


@pytest.mark.parametrize("mode,chunk,native_calls", [
    ("float", 16, [(16, True), (16, True), (8, True)]),  # chunks of decode-step size: native
    ("float", 32, [(8, True)]),  # a longer float32 chunk: PyTorch's GEMM (decode.c's float matmul is slow)
    ("int4", 24, [(24, True), (16, True)]),  # quantized: every chunk, whatever its length
])
def test_prefill_chunks_run_natively(mode, chunk, native_calls):
    """A prompt longer than a prefill chunk goes through decode.c chunk by chunk where it should (each
    chunk's tokens see the cache the earlier chunks wrote), and its first token's logits are PyTorch's;
    with a sliding window shorter than a chunk too."""
    from llmkit.quant import quantize_model

    for kw in ({}, {"sliding_window": 6}):
        model = tiny(**kw) if mode == "float" else quantize_model(tiny(**kw), mode)
        prompt = torch.randint(0, 97, (40,), generator=torch.Generator().manual_seed(3)).tolist()
        params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        first = []
        for native in (False, True):
            eng = Engine(model, max_batch=1, native=native, prefill_chunk=chunk)
            if native:
                eng._native = spy = Spy(eng._native)
            row = eng.add(prompt, params)
            while eng.request(row).logits is None:
                eng.step()
            first.append(eng.request(row).logits.clone())
        assert [c for c in spy.calls if c[1]] == native_calls
        tol = 1e-4 * max(1.0, first[0].abs().max()) if mode == "float" else 2e-3 * first[0].abs().max()
        assert (first[0] - first[1]).abs().max() <= tol


def test_speculative_drafts_are_verified_natively():
    """Drafted tokens run through decode.c (several tokens of one row in one call, each causal): the greedy
    answer of plain PyTorch decoding, with drafts accepted."""
    model = tiny(d_model=32, d_ff=64, scale=5.0)  # test_speculative's model, which repeats itself
    ids = [3, 14, 15, 92, 65, 35, 3, 14, 15, 92, 65, 35, 3, 14]  # a prompt that repeats itself
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    (want,), _ = decode_all(model, False, [ids], params, max_batch=1)
    eng = Engine(model, max_batch=1, speculative=4)
    eng.lookup_min_n = 1  # drafts after 1-token matches: a random model repeats itself less than a real one
    eng._native = spy = Spy(eng._native)
    row = eng.add(ids, params)
    got = []
    while eng.running:
        got += [o.token_id for o in eng.step()]
    assert got == want
    assert eng.request(row).accepted > 0 and max(n for n, hidden in spy.calls if not hidden) > 1


def test_models_decode_c_cannot_run_keep_pytorch_and_say_why(monkeypatch):
    from llmkit.lora import apply_lora

    eng = Engine(tiny(qk_norm=True), max_batch=1)
    assert eng._native is None and "QK-norm" in why_not(eng.model, eng.cache)
    eng = Engine(tiny(), max_batch=1, kv_dtype="int8")
    assert eng._native is None and "KV cache" in why_not(eng.model, eng.cache)
    model = tiny()
    apply_lora(model, r=4)
    eng = Engine(model, max_batch=1)
    assert eng._native is None and "layer 0" in why_not(model, eng.cache)
    monkeypatch.setenv("LLMKIT_NATIVE", "0")
    assert Engine(tiny(), max_batch=1)._native is None


def test_modules_swapped_after_the_engine_was_built_are_seen():
    """LoRA applied to the engine's model (with non-zero B: not the base any more): the next request runs
    the PyTorch step, the same tokens as a fresh PyTorch engine on the adapted model."""
    from llmkit.lora import apply_lora, lora_modules

    model = tiny()
    eng = Engine(model, max_batch=1)
    assert eng._native is not None
    base = [o.token_id for o in eng.generate_ids(prompts()[1], GREEDY)]
    apply_lora(model, r=4)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.weight.normal_(0, 0.5)
    got = [o.token_id for o in eng.generate_ids(prompts()[1], GREEDY)]
    assert eng._native is None
    (want,), _ = decode_all(model, False, [prompts()[1]], max_batch=1)
    assert got == want != base


def test_in_place_weight_updates_are_read_at_once():
    model = tiny()
    eng = Engine(model, max_batch=1)
    first = [o.token_id for o in eng.generate_ids(prompts()[0], GREEDY)]
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(-3.0)  # an optimizer step writes in place
    (want,), _ = decode_all(model, False, [prompts()[0]], max_batch=1)
    got = [o.token_id for o in eng.generate_ids(prompts()[0], GREEDY)]
    assert eng._native is not None and got == want != first


@pytest.mark.slow
def test_smollm2_native_greedy_answer_equals_pytorch(smollm2_gguf):
    import llmkit
    from llmkit.tokenizer.chat import render_chat

    llm = llmkit.load(str(smollm2_gguf))
    ids = render_chat(llm.tokenizer, [{"role": "user", "content": "What is the capital of France?"}],
                      add_generation_prompt=True).ids
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    (t_ref,), (l_ref,) = decode_all(llm.model, False, [ids], params, max_batch=1)
    (t_nat,), (l_nat,) = decode_all(llm.model, True, [ids], params, max_batch=1)
    assert t_nat == t_ref
    assert "Paris" in llm.tokenizer.decode(t_nat)
    assert (l_ref - l_nat).abs().max() <= 2e-2  # int4 weights, activations rounded per block either way
    r = llm.generate("Hello", max_tokens=4)
    assert r.timings["decode_path"] == "native"


def test_profiled_steps_split_their_time():
    """NativeDecode.profile(): decode.c times its matmuls and attention and the class the head, one-token
    steps only; together they fit inside the steps' wall time, and profiling leaves the tokens alone."""
    import time

    from llmkit.quant import quantize_model

    model = quantize_model(tiny(), "int4")
    (want,), _ = decode_all(model, True, [prompts()[1]], max_batch=1)
    eng = Engine(model, max_batch=1)
    eng._native.profile()
    got, t = [], time.perf_counter()
    eng.add(prompts()[1], GREEDY)
    while eng.running:
        got += [o.token_id for o in eng.step()]
    wall = 1e3 * (time.perf_counter() - t)
    assert got == want
    steps = int(eng._native.prof[3])  # the one-token steps: the prefill's 17 tokens are not one of them
    ms = eng._native.split()
    assert len(got) - 1 <= steps <= len(got) and all(v > 0 for v in ms.values()), (steps, ms)
    assert sum(ms.values()) * steps < wall
    eng._native.profile(False)
    assert eng._native.plan.prof is None

"""SmolLM2-135M-Instruct (Q4_1 GGUF): llmkit against transformers reading the same file; export; inspect.

One llmkit load and one transformers load per session (module-scoped fixtures); the prompt is 32 French
tokens. transformers dequantises the GGUF with the same gguf-py code, so logits agree to float32 rounding.
"""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

pytestmark = pytest.mark.slow

PROMPT = ("Il était une fois, dans un petit village au bord de la mer, une vieille femme qui vendait des "
          "coquillages aux voyageurs. Chaque matin, elle descendait sur la plage avant le lever du soleil.")
N = 32


@pytest.fixture(scope="module")
def llm(smollm2_gguf):
    import llmkit

    return llmkit.load(smollm2_gguf, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def hf_model(smollm2_gguf):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="module")
def prompt_ids(llm) -> torch.Tensor:
    ids = llm.tokenizer.encode(PROMPT)
    assert len(ids) >= N
    return torch.tensor([ids[:N]])  # (1, 32)


def test_logits_match_transformers(llm, hf_model, prompt_ids):
    with torch.no_grad():
        ours = llm.model(prompt_ids)
        ref = hf_model(prompt_ids).logits
    assert ours.shape == ref.shape == (1, N, 49152)
    assert (ours - ref).abs().max().item() <= 1e-3


def _greedy_llmkit(model, ids: torch.Tensor, steps: int) -> list[int]:
    """Greedy decoding with llmkit's static KV cache: prefill, then one token per step."""
    from llmkit.model import KVCache

    cache = KVCache(model.config, 1, ids.shape[1] + steps, dtype=torch.float32)
    pos = torch.arange(ids.shape[1])[None]  # (1, T)
    out = []
    for _ in range(steps):
        nxt = model(ids, positions=pos, cache=cache)[0, -1].argmax().item()
        out.append(nxt)
        ids, pos = torch.tensor([[nxt]]), pos[:, -1:] + 1
    return out


def _greedy_hf(model, ids: torch.Tensor, steps: int) -> list[int]:
    """The same with transformers' own cache (past_key_values)."""
    out, past = [], None
    for _ in range(steps):
        r = model(ids, past_key_values=past, use_cache=True)
        nxt = r.logits[0, -1].argmax().item()
        out.append(nxt)
        ids, past = torch.tensor([[nxt]]), r.past_key_values
    return out


def test_greedy_32_steps_identical(llm, hf_model, prompt_ids):
    with torch.no_grad():
        ours = _greedy_llmkit(llm.model, prompt_ids, 32)
        ref = _greedy_hf(hf_model, prompt_ids, 32)
    assert ours == ref


def test_loaded_object(llm, smollm2_gguf):
    c = llm.config
    assert (c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.d_ff) == (30, 576, 9, 3, 64, 1536)
    assert c.vocab_size == 49152 and c.tie_embeddings and c.rope_theta == 100000.0 and c.max_seq_len == 8192
    assert llm.path == smollm2_gguf and not llm.model.training
    assert llm.tokenizer.chat_template and "<|im_start|>" in llm.tokenizer.chat_template
    assert "params=134,515,008" in repr(llm)


def test_export_loads_in_transformers(llm, hf_model, prompt_ids, tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("export") / "smollm2-hf"
    llm.save_hf(out)  # what `llmkit export` does after loading (the verb is tested in test_cli_model.py)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json"):
        assert (out / name).is_file(), name
    exported = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf_model(prompt_ids).logits
        got = exported(prompt_ids).logits
    assert (got - ref).abs().max().item() <= 1e-3
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.encode(PROMPT, add_special_tokens=False) == llm.tokenizer.encode(PROMPT)
    messages = [{"role": "user", "content": "Bonjour !"}]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered.startswith("<|im_start|>system\n") and rendered.endswith("<|im_start|>assistant\n")

    # and llmkit reads its own export back (HF folder path of llmkit.load)
    import llmkit

    again = llmkit.load(out, device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(again.model(prompt_ids), llm.model(prompt_ids), atol=1e-6, rtol=0)
    assert again.tokenizer.encode(PROMPT) == llm.tokenizer.encode(PROMPT)


@pytest.fixture(scope="module")
def inspect_json(smollm2_gguf) -> dict:
    from llmkit.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["inspect", str(smollm2_gguf), "--json"]) == 0
    return json.loads(buf.getvalue())


def test_inspect_json(inspect_json, hf_model):
    info = inspect_json
    c = info["config"]
    assert (c["n_layers"], c["d_model"], c["n_heads"], c["n_kv_heads"]) == (30, 576, 9, 3)
    assert info["vocab_size"] == 49152 and info["context_length"] == 8192
    assert info["parameters"]["total"] == hf_model.num_parameters() == 134_515_008
    assert info["parameters"]["lm_head"] == 0  # tied
    assert info["parameters"]["embeddings"] == 49152 * 576
    st = info["storage"]
    assert sum(d["params"] for d in st.values()) == 134_515_008
    assert (st["Q4_1"]["tensors"], st["Q8_0"]["tensors"], st["F32"]["tensors"]) == (210, 1, 61)
    # GGML block sizes: Q4_1 = 32 weights in 20 bytes, Q8_0 = 32 in 34, F32 = 4 bytes each
    assert st["Q4_1"]["bytes"] * 32 == st["Q4_1"]["params"] * 20
    assert st["Q8_0"]["bytes"] * 32 == 49152 * 576 * 34
    assert st["F32"]["bytes"] == 4 * st["F32"]["params"]
    assert "<|im_start|>" in info["chat_template"] and info["special_tokens"]["<|im_end|>"] == 2
    assert info["bos_eos_pad"]["eos"] == {"id": 2, "text": "<|im_end|>"}


def test_inspect_text(inspect_json):
    from llmkit.info import format_info

    out = format_info(inspect_json)
    for needle in ("architecture     llama", "layers           30", "d_model          576",
                   "9 query, 3 key/value (head_dim 64)", "vocab size       49152", "context length   8192",
                   "Q4_1", "Q8_0", "<|im_start|>", "tied embeddings", "134,515,008"):
        assert needle in out, needle


def test_tokenizer_from_open_file_path_or_metadata(smollm2_gguf):
    """One GGUF reader: the tokenizer built from the open GGUFFile, its metadata dict or the path is the same,
    and gives transformers' ids for the same file."""
    transformers = pytest.importorskip("transformers")
    from llmkit.checkpoint.gguf import GGUFFile
    from llmkit.tokenizer import Tokenizer

    f = GGUFFile(smollm2_gguf)
    toks = [Tokenizer.from_gguf(f), Tokenizer.from_gguf(f.metadata), Tokenizer.load(smollm2_gguf)]
    ref = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    want = ref(PROMPT, add_special_tokens=False)["input_ids"]
    assert [t.encode(PROMPT) for t in toks] == [want] * 3
    assert {t.chat_template for t in toks} == {f.get("tokenizer.chat_template")}

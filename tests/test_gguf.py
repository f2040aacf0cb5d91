"""GGUF reading on tiny synthetic files written like llama.cpp writes them (gguf.GGUFWriter).

Reference: the same weights loaded into transformers from safetensors (for quantised files, the weights as
they read back from the file, i.e. dequantised by gguf-py), so the logits comparison tests metadata ->
config, tensor names, llama.cpp's q/k permutation and dequantisation together. GPT-2 files (fused attn_qkv,
learned positions) likewise, their byte-level BPE vocabulary against the HF `tokenizers` model it came from
(and llama.cpp itself where llama-cpp-python is installed); merge lists against llama.cpp's BPE rule.
"""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from gguf_synth import llama_cpp_permute, tiny_hf_model, write_gguf
from safetensors.numpy import save_file

from llmkit.checkpoint.gguf import GGUFFile, load_gguf, unpermute_qk
from llmkit.config import ModelConfig
from llmkit.errors import LlmkitError

IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))


def _reference_logits(tmp, cfg, dense: dict[str, np.ndarray]) -> torch.Tensor:
    """transformers on the dense weights, loaded from a safetensors folder."""
    import transformers

    ref = tmp / "ref"
    ref.mkdir()
    cfg.save_pretrained(ref)
    weights = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in dense.items()}
    save_file(weights, str(ref / "model.safetensors"), metadata={"format": "pt"})
    model = transformers.AutoModelForCausalLM.from_pretrained(ref, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize(
    "family,qtype,tie",
    [
        ("llama", "F32", False),
        ("llama", "Q8_0", True),
        ("llama", "Q4_1", False),
        ("qwen2", "F16", False),
        ("qwen2", "Q4_0", True),
        ("qwen3", "BF16", False),
        ("qwen3", "Q8_0", False),
        ("qwen3_moe", "Q8_0", False),
    ],
)
def test_logits_match_transformers(tmp_path, family, qtype, tie):
    _, cfg, tensors = tiny_hf_model(family, tmp_path, tie=tie)
    dense = write_gguf(tmp_path / "m.gguf", family, cfg, tensors, qtype)
    expected = _reference_logits(tmp_path, cfg, dense)
    config, model, f = load_gguf(tmp_path / "m.gguf")
    assert config.tie_embeddings == tie and f.permuted_qk == (family == "llama")
    with torch.no_grad():
        got = model(IDS)
    assert got.shape == (2, 16, 128)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "qwen3_moe"])
def test_config_matches_hf_config_json(tmp_path, family):
    _, cfg, tensors = tiny_hf_model(family, tmp_path)
    write_gguf(tmp_path / "m.gguf", family, cfg, tensors, "F32")
    from_hf = ModelConfig.from_hf(json.loads((tmp_path / "hf" / "config.json").read_text()))
    got = GGUFFile(tmp_path / "m.gguf").config()
    assert got.replace(dtype="float32") == from_hf.replace(dtype="float32")


def test_unpermute_inverts_llama_cpp_permute():
    x = np.random.default_rng(0).standard_normal((3 * 2 * 8, 5)).astype(np.float32)  # 3 heads of dim 16
    assert np.array_equal(unpermute_qk(llama_cpp_permute(x, 6, 3), 3), x)
    assert np.array_equal(unpermute_qk(llama_cpp_permute(x[:, 0], 3, 3), 3), x[:, 0])  # biases too
    # row r of a head comes from HF row r//2 (even r) or r//2 + head_dim/2 (odd r)
    rows = llama_cpp_permute(np.arange(16), 1, None)
    assert rows.tolist() == [0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15]


def test_llama3_rope_scaling_from_rope_freqs(tmp_path):
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    _, cfg, tensors = tiny_hf_model("llama", tmp_path)
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    cfg.rope_parameters = {"rope_theta": 500000.0, **scaling}
    hd = cfg.hidden_size // cfg.num_attention_heads
    inv_freq = 1.0 / 500000.0 ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg)  # transformers' llama3 scaling
    factors = (inv_freq / scaled).numpy().astype(np.float32)  # what llama.cpp stores: the divisors
    # llama.cpp writes the scaled model as plain rope + rope_freqs (convert_hf_to_gguf.py, LlamaModel)
    plain = transformers.LlamaConfig(**{**cfg.to_dict(), "rope_parameters": {"rope_theta": 500000.0}})
    path = tmp_path / "m.gguf"
    dense = write_gguf(path, "llama", plain, tensors, "F32", extra_tensors={"rope_freqs.weight": factors})
    f = GGUFFile(path)
    assert f.config().rope_scaling == scaling
    expected = _reference_logits(tmp_path, cfg, dense)
    with torch.no_grad():
        got = load_gguf(path)[1](IDS)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_k_quants_match_transformers_gguf_loader(tmp_path):
    """Q4_K / Q5_K / Q6_K tensors (random valid blocks; gguf-py cannot quantise K types) read by llmkit and by
    transformers' own GGUF loader (its name mapping and q/k un-permutation are independent of ours)."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=512,
                                   num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                   rms_norm_eps=1e-5, max_position_embeddings=128, tie_word_embeddings=False)
    torch.manual_seed(0)
    tensors = {k: v.numpy() for k, v in transformers.LlamaForCausalLM(cfg).state_dict().items()}
    types = {"token_embd.weight": "Q6_K", "output.weight": "Q5_K", "blk.0.attn_q.weight": "Q4_K",
             "blk.0.attn_k.weight": "Q5_K", "blk.0.attn_v.weight": "Q6_K", "blk.0.attn_output.weight": "Q4_K",
             "blk.0.ffn_gate.weight": "Q4_K", "blk.0.ffn_up.weight": "Q5_K", "blk.0.ffn_down.weight": "Q6_K"}
    write_gguf(tmp_path / "m.gguf", "llama", cfg, tensors, "F32", override_type=types)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    config, model, f = load_gguf(tmp_path / "m.gguf")
    assert {t.ggml_type for t in f.tensor_infos()} == {"F32", "Q4_K", "Q5_K", "Q6_K"}
    with torch.no_grad():
        expected = ref.eval()(IDS).logits
        got = model(IDS)
    assert expected.abs().max() > 1e-3  # the random weights do produce signal
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ errors
@pytest.fixture
def llama_file(tmp_path):
    _, cfg, tensors = tiny_hf_model("llama", tmp_path)
    return tmp_path, cfg, tensors


def _error(path) -> str:
    with pytest.raises(LlmkitError) as e:
        load_gguf(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_truncated_file(llama_file):
    tmp, cfg, tensors = llama_file
    write_gguf(tmp / "m.gguf", "llama", cfg, tensors, "Q8_0")
    data = (tmp / "m.gguf").read_bytes()
    (tmp / "cut.gguf").write_bytes(data[: len(data) - 1000])
    assert "truncated" in _error(tmp / "cut.gguf")
    (tmp / "head.gguf").write_bytes(data[:200])  # cut inside the metadata
    assert "not a readable GGUF file" in _error(tmp / "head.gguf")
    (tmp / "junk.gguf").write_bytes(b"\x00" * 4096)
    assert "not a readable GGUF file" in _error(tmp / "junk.gguf")


def test_missing_tensor(llama_file):
    tmp, cfg, tensors = llama_file
    write_gguf(tmp / "m.gguf", "llama", cfg, tensors, "F32", skip=("model.layers.1.mlp.up_proj.weight",))
    assert "missing tensor blk.1.ffn_up.weight" in _error(tmp / "m.gguf")


def test_shape_mismatch(llama_file):
    tmp, cfg, tensors = llama_file
    tensors = dict(tensors)
    tensors["model.layers.0.mlp.down_proj.weight"] = tensors["model.layers.0.mlp.down_proj.weight"][:, :64]
    write_gguf(tmp / "m.gguf", "llama", cfg, tensors, "F32")
    msg = _error(tmp / "m.gguf")
    assert "blk.0.ffn_down.weight" in msg and "(64, 64)" in msg and "(64, 96)" in msg


def test_unsupported_architecture(llama_file):
    tmp, cfg, tensors = llama_file
    write_gguf(tmp / "m.gguf", "llama", cfg, tensors, "F32", arch="gemma")
    msg = _error(tmp / "m.gguf")
    assert "unsupported GGUF architecture 'gemma'" in msg


def test_unsupported_tensor_type(llama_file):
    tmp, cfg, tensors = llama_file
    write_gguf(tmp / "m.gguf", "llama", cfg, tensors, "F32", override_type={"blk.1.attn_v.weight": "IQ4_NL"})
    msg = _error(tmp / "m.gguf")
    assert "blk.1.attn_v.weight" in msg and "IQ4_NL" in msg


def test_cli_error_is_one_line(llama_file, capsys):
    from llmkit.cli import main

    tmp, cfg, tensors = llama_file
    write_gguf(tmp / "m.gguf", "llama", cfg, tensors, "F32", arch="gemma")
    assert main(["inspect", str(tmp / "m.gguf")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("llmkit: error: ") and err.count("\n") == 1 and "gemma" in err


def test_gguf_types_listed_are_dequantised_by_gguf():
    from llmkit.checkpoint.gguf import SUPPORTED_TYPES

    for name in SUPPORTED_TYPES:
        q = gguf.GGMLQuantizationType[name]
        block, size = gguf.GGML_QUANT_SIZES[q]
        raw = np.zeros((2, size), dtype=np.uint8)
        assert gguf.quants.dequantize(raw, q).shape == (2, block)


# ------------------------------------------------------------------------------------------------ GPT-2
@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """(tmp dir, transformers GPT-2, its config, its tensors, its HF `tokenizers` tokenizer)."""
    from gguf_synth import tiny_gpt2_model

    tmp = tmp_path_factory.mktemp("gpt2")
    return (tmp, *tiny_gpt2_model(tmp))


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0"])
def test_gpt2_logits_match_transformers(gpt2, tmp_path, qtype):
    """A GPT-2 written as llama.cpp's converter writes it (fused attn_qkv, position_embd, LayerNorm biases,
    output_norm.bias, tied output): llmkit's logits against transformers' on the weights as they read back."""
    import transformers
    from gguf_synth import write_gpt2_gguf

    _, model, cfg, tensors, tok = gpt2
    dense = write_gpt2_gguf(tmp_path / "m.gguf", cfg, tensors, tok, qtype)
    if qtype != "F32":
        ref = tmp_path / "ref"
        cfg.save_pretrained(ref)
        save_file({k: np.ascontiguousarray(v) for k, v in dense.items()}, str(ref / "model.safetensors"),
                  metadata={"format": "pt"})
        model = transformers.AutoModelForCausalLM.from_pretrained(ref, dtype=torch.float32).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    config, ours, f = load_gguf(tmp_path / "m.gguf")
    with torch.no_grad():
        expected, got = model(ids).logits, ours(ids)
    assert got.shape == expected.shape == (2, 40, cfg.vocab_size)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert config.max_seq_len == cfg.n_positions == 64 and config.tie_embeddings and f.arch == "gpt2"


def test_gpt2_config_and_names_are_llama_cpps(gpt2, tmp_path):
    """The same ModelConfig as from the source config.json; `gguf_name` gives, for every llmkit parameter,
    the tensor gguf-py's name map wrote (q/k/v -> the fused attn_qkv, learned positions, final norm bias)."""
    from gguf_synth import write_gpt2_gguf

    from llmkit.checkpoint.gguf import gguf_name
    from llmkit.model import Transformer

    tmp, _, cfg, tensors, tok = gpt2
    write_gpt2_gguf(tmp_path / "m.gguf", cfg, tensors, tok)
    f = GGUFFile(tmp_path / "m.gguf")
    from_json = ModelConfig.from_hf(json.loads((tmp / "hf" / "config.json").read_text()))
    assert f.config().replace(dtype="float32") == from_json.replace(dtype="float32")
    with torch.device("meta"):
        names = [n for n, _ in Transformer(f.config()).named_parameters()]
    assert {gguf_name(n, "gpt2") for n in names} == {i.name for i in f.tensor_infos()}
    assert gguf_name("model.layers.1.self_attn.k_proj.bias", "gpt2") == "blk.1.attn_qkv.bias"
    assert gguf_name("model.norm.bias") == "output_norm.bias"
    assert gguf_name("model.embed_positions.weight") == "position_embd.weight"


def test_gpt2_position_table_must_fill_the_context(gpt2, tmp_path):
    """llama.cpp sizes position_embd by context_length: a file where they differ is refused in one line."""
    from gguf_synth import write_gpt2_gguf

    _, _, cfg, tensors, tok = gpt2
    write_gpt2_gguf(tmp_path / "m.gguf", cfg, tensors, tok, context_length=128)
    msg = _error(tmp_path / "m.gguf")
    assert "position_embd.weight has shape (64, 64), the metadata implies (128, 64)" in msg


def test_gpt2_tokenizer_matches_hf_tokenizers(gpt2, tmp_path, shared_data):
    """The byte-level BPE with llama.cpp's "gpt-2" pre-tokenizer, against the HF `tokenizers` model the
    vocabulary came from; the file's token types are kept ([PADn] ids UNUSED, <|endoftext|> CONTROL)."""
    from gguf_synth import CONTROL, NORMAL, UNUSED, write_gpt2_gguf

    from llmkit.tokenizer import Tokenizer

    _, _, cfg, tensors, hf_tok = gpt2
    write_gpt2_gguf(tmp_path / "m.gguf", cfg, tensors, hf_tok)
    tok = Tokenizer.from_gguf(tmp_path / "m.gguf")
    assert "fast=True" in repr(tok)  # tiktoken's engine (the reference path gives the same ids, slower)
    novel = sorted((shared_data / "corpus" / "fr-roman19").glob("*.txt"))[1].read_text(encoding="utf-8")
    texts = [novel[5000:25000], "Bonjour à tous ! Ça va ? 1234 567.89 — «voilà»",
             "  spaces\ttabs\n\n 🚀 I'VE", "fin<|endoftext|>début"]
    for text in texts:
        assert tok.encode(text, allow_special=True) == hf_tok.encode(text).ids
        assert tok.decode(tok.encode(text)) == text
    n = hf_tok.get_vocab_size()
    types = _file_token_types(tmp_path / "m.gguf")
    assert tok.token_types == tuple(types)
    assert types[0] == CONTROL and set(types[1:n]) == {NORMAL} and set(types[n:]) == {UNUSED}
    assert tok.pieces is None and tok.scores is None  # byte-level BPE: vocab + merges
    assert (tok.eos_id, tok.special_tokens) == (0, {"<|endoftext|>": 0})


def test_gpt2_matches_llama_cpp(gpt2, tmp_path, shared_data):
    """llama.cpp itself on the same file (llama-cpp-python, a bench dependency: skipped where it is not
    installed): token ids on French text and logits."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from gguf_synth import write_gpt2_gguf

    from llmkit.tokenizer import Tokenizer

    _, _, cfg, tensors, hf_tok = gpt2
    write_gpt2_gguf(tmp_path / "m.gguf", cfg, tensors, hf_tok)
    tok = Tokenizer.from_gguf(tmp_path / "m.gguf")
    lc = llama_cpp.Llama(str(tmp_path / "m.gguf"), n_ctx=64, n_threads=1, logits_all=True, verbose=False)
    try:
        novel = sorted((shared_data / "corpus" / "fr-roman19").glob("*.txt"))[1].read_text(encoding="utf-8")
        for text in (novel[5000:9000], "  spaces\ttabs\n\n 🚀 I'VE", "fin<|endoftext|>début"):
            want = lc.tokenize(text.encode(), add_bos=False, special=True)
            assert tok.encode(text, allow_special=True) == want
        ids = tok.encode(novel[9000:9400])[:48]
        lc.eval(ids)
        theirs = np.asarray(lc.scores[: len(ids)])  # (T, vocab)
    finally:
        lc.close()
    with torch.no_grad():
        ours = load_gguf(tmp_path / "m.gguf")[1](torch.tensor([ids]))[0].numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def _file_token_types(path) -> list[int]:
    """tokenizer.ggml.token_type as gguf-py's own reader returns it."""
    return [int(t) for t in gguf.GGUFReader(path).fields["tokenizer.ggml.token_type"].contents()]


# ------------------------------------------------------------------------------------------ BPE merges
def _byte_vocab(extra: list[str], merges: list[str]) -> dict:
    """GGUF tokenizer metadata of a byte-level BPE: the 256 bytes (GPT-2's spelling), `extra` tokens, then
    <|endoftext|> (CONTROL)."""
    from llmkit.tokenizer.core import bytelevel

    tokens = [bytelevel(bytes([b])) for b in range(256)] + extra + ["<|endoftext|>"]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [1] * (len(tokens) - 1) + [3], "tokenizer.ggml.merges": merges}


def test_a_merge_that_can_never_apply_keeps_the_fast_path(shared_data):
    """A vocabulary with no real merges carries one placeholder merge (llama.cpp refuses a BPE file without
    the merges key; llmkit's GGUF export writes "<|no-merges|> <|no-merges|>"): its sides are no byte and no
    merge's result, so it never applies and the tiktoken engine stays on. Ids: the text's UTF-8 bytes."""
    from llmkit.tokenizer.loaders import from_gguf

    tok = from_gguf(_byte_vocab([], ["<|no-merges|> <|no-merges|>"]))
    assert "fast=True" in repr(tok)
    text = sorted((shared_data / "corpus" / "fr-roman19").glob("*.txt"))[0].read_text(encoding="utf-8")
    text = text[:20000] + "<|endoftext|> 🚀"
    assert tok.encode(text) == list(text.encode("utf-8"))
    assert tok.encode("a<|endoftext|>", allow_special=True) == [97, 256]


def test_a_merge_whose_result_is_no_token_still_applies():
    """Merges "a b" (ab is no token) then "b c" (bc is one): llama.cpp merges a+b first, then spells the
    non-token "ab" as its bytes, so "abc" -> a, b, c (not a, bc). The reference engine keeps that rule."""
    from llmkit.tokenizer.loaders import from_gguf

    tok = from_gguf(_byte_vocab(["bc"], ["a b", "b c"]))
    assert tok.encode("abc") == [97, 98, 99] and tok.encode("xbc") == [120, 256]
    assert "fast=False" in repr(tok)  # tiktoken cannot express a merge into a non-token

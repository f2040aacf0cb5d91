"""GGUF export (llmkit.checkpoint.gguf_write, `llmkit export --to gguf`) against independent references.

- The tensors: every tensor of a q8_0 / q4_0 / q4_1 / bf16 export, read back with gguf-py's GGUFReader, holds
  exactly the bytes `gguf.quants.quantize` makes of the source, "the source" rebuilt here the way llama.cpp's
  convert_hf_to_gguf.py builds it from the transformers model (names from gguf-py's TensorNameMap, q/k rows
  permuted with LlamaModel.permute, GPT-2's Conv1D weights transposed, Gemma norms + 1).
- The model: transformers' own GGUF loader (`from_pretrained(dir, gguf_file=...)`) and llmkit's reader both
  give the logits of the source model whose matrices went through gguf-py's quantize -> dequantize
  (<= 1e-4); f32 / f16 exports reload in llmkit within 1e-5 / 1e-3 of the source (Gemma f16: 2e-3).
- The tokenizer: ids before == after (llmkit's GGUF reader) and == transformers' GGUF tokenizer, special
  tokens and chat template kept; on the real SmolLM2 / Gemma 3 files every tokenizer key equals what
  llama.cpp's converter wrote.
- A model pretrained by llmkit's pretrain code path and a merged LoRA model round-trip; bad types and
  families fail with one line; a failed export leaves no file behind.
- Slow, real weights: SmolLM2's q4_1 export has exactly the tensors of llama.cpp's own Q4_1 file; its
  q8_0 / q4_0 exports' perplexity on French text against the f16 export's.
llama.cpp itself runs the exports in bench/gguf_export.py (not a test dependency).
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGUFReader
from gguf import GGMLQuantizationType as Q
from gguf_synth import llama_cpp_permute

from llmkit.checkpoint.gguf import load_gguf
from llmkit.checkpoint.gguf_write import pre_tokenizer_name, save_gguf, tokenizer_metadata
from llmkit.checkpoint.hf import load_hf_dir
from llmkit.cli import main
from llmkit.errors import LlmkitError
from llmkit.tokenizer import Tokenizer
from llmkit.tokenizer.chat import CHATML_TEMPLATE

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = "".join(
    f"{i}: Le petit chat dort sur le toit, il rêve d'oiseaux et de lait. The small cat sleeps on the roof; "
    f"the dog barks at {i % 7} o'clock — «Déjà vu !» dit-elle, naïve.\n"
    for i in range(60)
)
SAMPLES = [
    "Bonjour à tous ! Ça va ? 1234 567.89 — «voilà»",
    "<|im_start|>user\nQuel temps fait-il ?<|im_end|>\n<|im_start|>assistant\n",
    "  spaces\ttabs\n\nnewlines 🚀 I'VE 'told he's <|endoftext|> fin",
]
IDS = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))  # 12 > window 4
VOCAB = 320  # > the 300-token test tokenizer: the file pads with [PADn] tokens
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    rope_theta=50000.0,
    bos_token_id=0,
    eos_token_id=2,
)
GEMMA = dict(
    COMMON,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=256,
    query_pre_attn_scalar=256,
    sliding_window=4,
    rms_norm_eps=1e-6,
)
# transformers' GGUF loader fixes some sizes that the file does say (its mapping skips the keys): GPT-2's
# n_positions 1024, Qwen3's head_dim 128, Qwen3-MoE's moe_intermediate_size 768, Gemma's
# query_pre_attn_scalar 256; the tiny models use those values.
CONFIGS = {
    # untied; ffn_down rows of 80 do not fill 32-value blocks (-> F16 in quantized files)
    "llama": lambda: transformers.LlamaConfig(**{**COMMON, "intermediate_size": 80}),
    "llama_tied_bias": lambda: transformers.LlamaConfig(
        **COMMON, tie_word_embeddings=True, attention_bias=True
    ),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON),
    "qwen3": lambda: transformers.Qwen3Config(
        **{**COMMON, "num_attention_heads": 2, "num_key_value_heads": 1}, head_dim=128
    ),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        **{**COMMON, "num_attention_heads": 2, "num_key_value_heads": 1},
        head_dim=128,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=768,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    ),
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=1024, bos_token_id=0, eos_token_id=2
    ),
    # 6 layers: 5 sliding (window 4) and one global, as llama.cpp's gemma3 assumes
    "gemma3": lambda: transformers.Gemma3TextConfig(**{**GEMMA, "num_hidden_layers": 6, "rope_theta": 1e6}),
    "gemma2": lambda: transformers.Gemma2Config(**GEMMA),
}
ARCH = {
    "llama": "llama",
    "llama_tied_bias": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "qwen3_moe": "qwen3moe",
    "gpt2": "gpt2",
    "gemma3": "gemma3",
    "gemma2": "gemma2",
}


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    """A byte-level BPE trained by llmkit (gpt4 pattern), 300 ids with special tokens and a chat template."""
    from llmkit.tokenizer.train import train_bpe

    tok = train_bpe(CORPUS, 300, pattern="gpt4", special_tokens=SPECIALS, progress=False)
    tok.chat_template = CHATML_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """family -> (transformers model, llmkit model) of the same random weights (built once per module)."""
    cache: dict[str, tuple] = {}

    def get(family: str):
        if family not in cache:
            d = tmp_path_factory.mktemp(family)
            torch.manual_seed(0)
            cfg = CONFIGS[family]()
            hf = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
            with torch.no_grad():  # norms and biases away from their init values, so that mistakes show
                for name, p in hf.named_parameters():
                    if name.endswith(("norm.weight", ".bias", "ln_1.weight", "ln_2.weight", "ln_f.weight")):
                        p.add_(torch.randn_like(p) * 0.2)
            hf.save_pretrained(d)
            cache[family] = (hf, load_hf_dir(d)[1])
        return cache[family]

    return get


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return (out.logits if hasattr(out, "logits") else out).float()


# ------------------------------------------------------------------------- what llama.cpp's converters do
def expected_type(name: str, shape: tuple[int, ...], type: str, tied: bool) -> Q:
    """The GGML type convert_hf_to_gguf.py (f32/f16/bf16/q8_0) or llama-quantize (q4_0/q4_1, with Q8_0 in
    place of its Q6_K for the output matrix) gives a tensor."""
    if len(shape) < 2 or name.endswith(
        ("_norm.weight", ".bias", "ffn_gate_inp.weight", "position_embd.weight")
    ):
        return Q.F32
    q = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1}[type]
    if type.startswith("q4") and (name == "output.weight" or (tied and name == "token_embd.weight")):
        q = Q.Q8_0
    return Q.F16 if shape[-1] % GGML_QUANT_SIZES[q][0] else q


def converted(hf, family: str) -> dict[str, np.ndarray]:
    """The transformers model's tensors as convert_hf_to_gguf.py writes them: GGUF name -> float32 data."""
    cfg = hf.config
    arch = ARCH[family]
    model_arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    tmap = gguf.get_tensor_name_map(model_arch, cfg.num_hidden_layers)
    tied = cfg.tie_word_embeddings
    out = {}
    for name, t in hf.state_dict().items():
        if name.endswith((".attn.bias", ".attn.masked_bias")) or (name == "lm_head.weight" and tied):
            continue
        w = t.float().numpy()
        if arch == "gpt2" and name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
            w = w.T  # Conv1D (in, out) -> (out, in)
        if arch == "llama" and re.search(r"[qk]_proj\.(weight|bias)$", name):
            heads = cfg.num_attention_heads
            w = llama_cpp_permute(w, heads, heads if ".q_proj." in name else cfg.num_key_value_heads)
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            w = w + 1
        out[tmap.get_name(name, try_suffixes=(".weight", ".bias"))] = np.ascontiguousarray(w)
    return out


def quant_roundtrip(model, type: str):
    """A copy of an llmkit model whose matrices went through gguf-py's quantize -> dequantize with the type
    each one is stored in: the weights a reader of the file computes with. (llama.cpp's q/k row permutation,
    expert stacking and GPT-2's q/k/v fusion move whole rows, so they commute with row-wise quantization.)"""
    m = copy.deepcopy(model)
    tied = m.config.tie_embeddings
    gguf_of = {
        "model.embed_tokens.weight": "token_embd.weight",
        "lm_head.weight": "output.weight",
        "model.embed_positions.weight": "position_embd.weight",
    }
    with torch.no_grad():
        for name, p in m.named_parameters():
            kind = gguf_of.get(name, "ffn_gate_inp.weight" if name.endswith(".mlp.gate.weight") else name)
            q = expected_type(kind, tuple(p.shape), type, tied)
            w = p.numpy()
            p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w, q), q).reshape(w.shape)))
    return m


def fields(path: Path) -> dict:
    r = GGUFReader(path)
    return {k: f.contents() for k, f in r.fields.items()}


# ---------------------------------------------------------------------------------------------- tensors
@pytest.mark.parametrize("family", ["llama", "llama_tied_bias", "qwen2", "qwen3", "gpt2", "gemma3", "gemma2"])
@pytest.mark.parametrize("type", ["q8_0", "q4_0", "q4_1", "bf16"])
def test_tensors_equal_gguf_quantize_of_the_converted_source(tiny, bpe, tmp_path, family, type):
    hf, model = tiny(family)
    path = save_gguf(model, bpe, tmp_path / "m.gguf", type=type, progress=False)
    want = converted(hf, family)
    reader = GGUFReader(path)
    assert sorted(t.name for t in reader.tensors) == sorted(want)
    tied = hf.config.tie_word_embeddings
    for t in reader.tensors:
        w = want[t.name]
        q = expected_type(t.name, w.shape, type, tied)
        assert (t.tensor_type, tuple(reversed(t.shape.tolist()))) == (q, w.shape), t.name
        assert np.array_equal(
            t.data.view(np.uint8).ravel(), gguf.quants.quantize(w, q).view(np.uint8).ravel()
        ), t.name
    if family == "llama":  # ffn_down rows (80 values) fall back to F16 in every quantized type
        assert {t.tensor_type for t in reader.tensors if "ffn_down" in t.name} == {
            Q.F16 if type != "bf16" else Q.BF16
        }


# ---------------------------------------------------------------------------------------------- models
@pytest.mark.parametrize("family", list(CONFIGS))
def test_f32_and_f16_reload_in_llmkit(tiny, bpe, tmp_path, family):
    _, model = tiny(family)
    want = logits(model)
    # f16 rounding of the weights moves these logits by < 1e-3; Gemma multiplies the embeddings by
    # sqrt(d_model) = 8 (and has 6 layers here): < 2e-3. The exact check is against the f16-rounded source.
    for type, tol in (("f32", 1e-5), ("f16", 2e-3 if family.startswith("gemma") else 1e-3)):
        config, back, _ = load_gguf(
            save_gguf(model, bpe, tmp_path / f"{type}.gguf", type=type, progress=False)
        )
        ids = dict(dtype="float32", eos_token_id=None)  # EOS: the tokenizer's (256), not the config's (2)
        assert config.replace(**ids) == model.config.replace(**ids)
        assert config.bos_token_id == model.config.bos_token_id == 0  # the tokenizer has none: the config's
        torch.testing.assert_close(logits(back), want, atol=tol, rtol=0)
        torch.testing.assert_close(logits(back), logits(quant_roundtrip(model, type)), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "family,type",
    [
        ("llama", "q4_0"),
        ("llama_tied_bias", "q4_1"),
        ("qwen2", "q8_0"),
        ("qwen3", "q4_0"),
        ("qwen3_moe", "q8_0"),
        ("gpt2", "f32"),
        ("gpt2", "q8_0"),
        ("gemma3", "q4_0"),
        ("gemma2", "q4_1"),
        ("gemma3", "bf16"),
    ],
)
def test_transformers_and_llmkit_read_the_same_model(tiny, bpe, tmp_path, family, type):
    _, model = tiny(family)
    path = save_gguf(model, bpe, tmp_path / "m.gguf", type=type, progress=False)
    want = logits(quant_roundtrip(model, type))
    if family != "llama_tied_bias":  # transformers' GGUF loader drops llama attention biases
        theirs = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path, gguf_file=path.name, dtype=torch.float32
        )
        torch.testing.assert_close(logits(theirs.eval()), want, atol=1e-4, rtol=0)
    torch.testing.assert_close(logits(load_gguf(path)[1]), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "scaling",
    [
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        {"rope_type": "linear", "factor": 4.0},
    ],
)
def test_rope_scaling_round_trips(tiny, bpe, tmp_path, scaling):
    """Llama-3 scaling as llama.cpp's rope_freqs tensor, linear as rope.scaling.* keys; llmkit's reader
    (which recognises Llama-3's factors by recomputing them its own way) gets the same config back."""
    from llmkit.model import Transformer

    _, base = tiny("llama")
    model = Transformer(base.config.replace(rope_scaling=scaling))
    model.load_state_dict(base.state_dict())
    model.eval()
    path = save_gguf(model, bpe, tmp_path / "m.gguf", type="f32", progress=False)
    config, back, _ = load_gguf(path)
    assert config.rope_scaling == scaling
    torch.testing.assert_close(logits(back), logits(model), atol=1e-5, rtol=0)
    assert ("rope_freqs.weight" in {t.name for t in GGUFReader(path).tensors}) == (
        scaling["rope_type"] == "llama3"
    )


def test_metadata_says_what_llama_cpp_reads(tiny, bpe, tmp_path):
    _, model = tiny("gemma3")
    meta = fields(
        save_gguf(
            model,
            bpe,
            tmp_path / "g.gguf",
            type="q8_0",
            name="tiny gemma",
            progress=False,
            generation_defaults={"temperature": 0.7, "top_k": 40, "repetition_window": 0},
        )
    )
    assert meta["general.architecture"] == "gemma3" and meta["general.name"] == "tiny gemma"
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert meta["general.quantization_version"] == gguf.GGML_QUANT_VERSION
    assert (meta["gemma3.block_count"], meta["gemma3.embedding_length"], meta["gemma3.context_length"]) == (
        6,
        64,
        256,
    )
    assert (meta["gemma3.attention.head_count"], meta["gemma3.attention.head_count_kv"]) == (2, 1)
    assert meta["gemma3.attention.key_length"] == meta["gemma3.attention.value_length"] == 256
    assert meta["gemma3.attention.sliding_window"] == 4
    assert (
        "gemma3.attention.sliding_window_pattern" not in meta
    )  # llama.cpp's default: every 6th layer global
    assert meta["gemma3.rope.freq_base"] == 1e6 and meta["gemma3.rope.freq_base_swa"] == 10000.0
    assert meta["gemma3.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert meta["general.sampling.temp"] == pytest.approx(0.7) and meta["general.sampling.top_k"] == 40
    assert meta["general.sampling.penalty_last_n"] == -1  # llmkit 0 = llama.cpp -1: the whole context
    from llmkit.generate.defaults import from_gguf_metadata

    assert from_gguf_metadata(meta) == {"temperature": 0.7, "top_k": 40, "repetition_window": 0}
    # a layout llama.cpp does not assume is written out per layer
    _, gemma2 = tiny("gemma2")
    model2 = copy.deepcopy(gemma2)
    model2.config = model2.config.replace(sliding_layers=[1])
    meta2 = fields(save_gguf(model2, bpe, tmp_path / "g2.gguf", type="f32", progress=False))
    assert meta2["gemma2.attention.sliding_window_pattern"] == [False, True]
    assert meta2["gemma2.attn_logit_softcapping"] == 50.0 and meta2["gemma2.final_logit_softcapping"] == 30.0


# ---------------------------------------------------------------------------------------------- tokenizer
def _tokenizers():
    from llmkit.tokenizer.train import train_bpe
    from llmkit.train.data import byte_tokenizer

    gpt2 = train_bpe(CORPUS, 300, pattern="gpt2", special_tokens=SPECIALS, progress=False)
    gpt2.chat_template = "{{ messages[0]['content'] }}"
    return {"gpt2-pattern": (gpt2, "gpt-2"), "bytes": (byte_tokenizer(), "gpt-2")}


@pytest.mark.parametrize("kind", ["gpt4-pattern", "gpt2-pattern", "bytes"])
def test_tokenizer_round_trip(tiny, bpe, tmp_path, kind):
    tok, pre = (bpe, "dbrx") if kind == "gpt4-pattern" else _tokenizers()[kind]
    _, model = tiny("llama")
    path = save_gguf(model, tok, tmp_path / "m.gguf", type="f16", progress=False)
    assert fields(path)["tokenizer.ggml.pre"] == pre == pre_tokenizer_name(tok)
    back = Tokenizer.from_gguf(path)
    # tiktoken's engine on reload, even for "bytes" (whose one placeholder merge can never apply)
    assert "fast=True" in repr(back)
    for text in SAMPLES:
        for special in (False, True):
            assert back.encode(text, allow_special=special) == tok.encode(text, allow_special=special), text
    assert back.special_tokens == tok.special_tokens
    assert (back.eos_id, back.chat_template) == (tok.eos_id, tok.chat_template)
    assert back.bos_id == model.config.bos_token_id  # the tokenizer has no BOS: the model config's
    assert back.vocab_size == VOCAB and back.id_to_text(VOCAB - 1) == f"[PAD{VOCAB - 1}]"
    if tok.merges:  # transformers' GGUF tokenizer, an independent reader (needs real merges)
        theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
        for text in SAMPLES:
            assert theirs(text, add_special_tokens=False)["input_ids"] == tok.encode(text, allow_special=True)


def test_pre_tokenizer_family_is_found_by_behaviour():
    from llmkit.tokenizer.pretokenize import GPT2_PATTERN, PreTokenizer

    tok = Tokenizer.from_bpe([(b"a", b"b")], pattern="gpt2")
    tok.pre = PreTokenizer([r"\p{N}", GPT2_PATTERN])  # SmolLM2's tokenizer.json: digits, then GPT-2
    assert pre_tokenizer_name(tok) == "smollm"
    tok.pre = PreTokenizer([r"\w+|[^\w]"])
    with pytest.raises(LlmkitError, match="like no llama.cpp family"):
        pre_tokenizer_name(tok)


def _same_keys_as_source(path: Path) -> None:
    from llmkit.io import read_gguf

    src = read_gguf(path).metadata
    tok = Tokenizer.from_gguf(path)
    ours = tokenizer_metadata(tok, len(src["tokenizer.ggml.tokens"]))
    for key, value in ours.items():
        if key in src:
            assert value == src[key], key
        else:  # keys llama.cpp's converter did not write: llama.cpp's defaults
            assert (key, value) == ("tokenizer.ggml.add_eos_token", False)


@pytest.mark.slow
def test_smollm2_tokenizer_keys_equal_llama_cpp(smollm2_gguf):
    _same_keys_as_source(smollm2_gguf)


@pytest.mark.slow
def test_gemma3_tokenizer_keys_equal_llama_cpp():
    from llmkit import hub

    if "gemma-3-270m" not in hub.NAMED_MODELS or not hub.named_model_path("gemma-3-270m").is_file():
        pytest.skip("gemma-3-270m not pulled (llmkit pull gemma-3-270m)")
    _same_keys_as_source(hub.named_model_path("gemma-3-270m"))


# ---------------------------------------------------------------------------------------------- llmkit models
def test_model_pretrained_by_llmkit_round_trips(tmp_path, capsys):
    import llmkit
    from llmkit.train.data import prepare
    from llmkit.train.pretrain import pretrain
    from llmkit.train.trainer import TrainConfig

    (tmp_path / "corpus.txt").write_text(CORPUS)
    prepare(
        [tmp_path / "corpus.txt"], tmp_path / "data", tokenizer="train:300", val_fraction=0.1, progress=False
    )
    cfg = TrainConfig(
        steps=3,
        batch_size=4,
        block_size=32,
        lr=3e-3,
        warmup=1,
        eval_every=0,
        eval_tokens=64,
        progress=False,
        threads=1,
    )
    pretrain(tmp_path / "data", tmp_path / "run", cfg, preset="tiny", sample_tokens=0)
    src = llmkit.load(tmp_path / "run" / "hf", device="cpu", dtype="float32")
    out = tmp_path / "tiny.gguf"
    assert main(["export", str(tmp_path / "run" / "hf"), str(out), "--type", "f32", "-q"]) == 0
    assert f"wrote {out} (llama, f32" in capsys.readouterr().out
    back = llmkit.load(out, device="cpu", dtype="float32")
    ids = torch.tensor([src.tokenizer.encode(CORPUS[:200])])
    torch.testing.assert_close(logits(back.model, ids), logits(src.model, ids), atol=1e-5, rtol=0)
    assert back.tokenizer.encode(CORPUS[:500]) == src.tokenizer.encode(CORPUS[:500])
    assert back.tokenizer.chat_template == src.tokenizer.chat_template == CHATML_TEMPLATE
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=out.name, dtype=torch.float32
    )
    torch.testing.assert_close(logits(theirs.eval(), ids), logits(src.model, ids), atol=1e-4, rtol=0)


def test_merged_lora_round_trips_and_unmerged_is_refused(tiny, bpe, tmp_path):
    from llmkit.lora import apply_lora, merge_lora

    _, base = tiny("qwen2")
    model = copy.deepcopy(base)
    apply_lora(model, r=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    with pytest.raises(LlmkitError, match="merge them first") as e:
        save_gguf(model, bpe, tmp_path / "m.gguf", progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "m.gguf").exists()
    want = logits(model)
    merge_lora(model)
    back = load_gguf(save_gguf(model, bpe, tmp_path / "m.gguf", type="f32", progress=False))[1]
    torch.testing.assert_close(logits(back), want, atol=1e-5, rtol=0)
    assert not torch.allclose(logits(base), want, atol=1e-3)  # the adapter changed the model


# ---------------------------------------------------------------------------------------------- failures
def test_bad_type_is_one_line_before_loading(tmp_path, capsys):
    out = tmp_path / "m.gguf"
    assert main(["export", "no-such-model-anywhere", str(out), "--type", "q5_k"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "llmkit: error: unknown GGUF type 'q5_k'; choose one of f32, f16, bf16, q8_0, q4_0, q4_1"
    assert main(["export", "x", str(tmp_path / "dir"), "--to", "hf", "--type", "q8_0"]) == 1
    assert "with --to hf use --dtype" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(model_type="qwen2_moe"), "cannot export model_type 'qwen2_moe' to GGUF"),
        (dict(activation="gelu_tanh"), "llama architecture uses the silu activation, this model gelu_tanh"),
        (
            dict(
                rope_scaling={
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 64,
                }
            ),
            "qwen2 architecture has no 'llama3' RoPE scaling",
        ),
    ],
)
def test_what_llama_cpp_cannot_run_is_refused(tiny, bpe, tmp_path, change, message):
    _, base = tiny("llama" if "activation" in change else "qwen2")
    model = copy.deepcopy(base)
    model.config = model.config.replace(**change)
    with pytest.raises(LlmkitError, match=re.escape(message)) as e:
        save_gguf(model, bpe, tmp_path / "m.gguf", progress=False)
    assert "\n" not in str(e.value) and list(tmp_path.iterdir()) == []


def test_failed_export_keeps_the_old_file(tiny, bpe, tmp_path, monkeypatch):
    _, model = tiny("qwen2")
    out = tmp_path / "m.gguf"
    out.write_bytes(b"previous")
    calls = []

    def boom(data, qtype):
        calls.append(qtype)
        if len(calls) > 3:
            raise OSError(28, "No space left on device")
        return real(data, qtype)

    real = gguf.quants.quantize
    monkeypatch.setattr(gguf.quants, "quantize", boom)
    with pytest.raises(OSError):
        save_gguf(model, bpe, out, type="q8_0", progress=False)
    assert out.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


def test_tokenizer_larger_than_the_model_is_refused(bpe):
    with pytest.raises(LlmkitError, match="the tokenizer has 300 tokens, the model's embedding 256 rows"):
        tokenizer_metadata(bpe, 256)


# ---------------------------------------------------------------------------------------------- real weights
@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    """SmolLM2-135M-Instruct read once: (path, model dequantised to float32, tokenizer)."""
    _, model, f = load_gguf(smollm2_gguf)
    return smollm2_gguf, model, Tokenizer.from_gguf(f)


@pytest.mark.slow
def test_smollm2_q4_1_export_is_llama_cpps_own_file(smollm2, tmp_path):
    """The default model is a llama.cpp Q4_1 file (embeddings Q8_0). Dequantised by llmkit, un-permuted, then
    exported as q4_1: every tensor (names, types, bytes) and every llama.* key equal the original's, since
    Q4_1 / Q8_0 blocks requantize to themselves. This checks names, the q/k permutation, the tied
    embeddings' Q8_0 and gguf-py's quantizers against llama.cpp's converter + llama-quantize at once."""
    from llmkit.io import read_gguf

    src_path, model, tok = smollm2
    path = save_gguf(model, tok, tmp_path / "q4_1.gguf", type="q4_1", progress=False)
    ours, theirs = read_gguf(path), read_gguf(src_path)
    a, b = np.memmap(path, dtype=np.uint8, mode="r"), np.memmap(src_path, dtype=np.uint8, mode="r")
    want = {t.name: t for t in theirs.tensors}
    assert sorted(t.name for t in ours.tensors) == sorted(want)
    for t in ours.tensors:
        u = want[t.name]
        assert (t.ggml_type, t.dims) == (u.ggml_type, u.dims), t.name
        block, size = GGML_QUANT_SIZES[Q(t.ggml_type)]
        n = math.prod(t.dims) // block * size
        assert np.array_equal(a[t.offset : t.offset + n], b[u.offset : u.offset + n]), t.name
    for k, v in theirs.metadata.items():
        if k.startswith(("llama.", "tokenizer.")) and k != "tokenizer.ggml.add_space_prefix":
            assert ours.metadata[k] == v, k
    assert ours.metadata["general.file_type"] == theirs.metadata["general.file_type"] == 3  # MOSTLY_Q4_1


@pytest.mark.slow
def test_smollm2_quantized_exports_perplexity(smollm2, tmp_path):
    """q8_0 stays within 2 % of the f16 export. SmolLM2's only weights are its Q4_1 file, and q4_0 puts that
    grid onto Q4_0's symmetric one: +34 % on this text with gguf-py's quantizer (= ggml's reference, what
    llama-quantize does without an imatrix; bench/gguf_export.py shows llama-quantize writes the same bytes),
    so the issue's 10 % cannot hold for this model; the bound here only says the file is a sound one (a
    wrong layout or scale gives perplexities in the thousands)."""
    from conftest import shared_path

    _, model, tok = smollm2
    text = sorted(shared_path("corpus/fr-roman19").glob("*.txt"))[0].read_text(encoding="utf-8")
    ids = torch.tensor([tok.encode(text[20_000:26_000])[:384]])
    ppl = {}
    for type in ("f16", "q8_0", "q4_0"):
        path = save_gguf(model, tok, tmp_path / f"{type}.gguf", type=type, progress=False)
        with torch.no_grad():
            lp = torch.log_softmax(load_gguf(path)[1](ids)[0, :-1].float(), -1)
        ppl[type] = math.exp(-lp.gather(1, ids[0, 1:, None]).mean().item())
        path.unlink()
    assert ppl["f16"] < 100, ppl  # French on a 135M English-centric model
    assert abs(ppl["q8_0"] / ppl["f16"] - 1) < 0.02, ppl
    assert 1.0 < ppl["q4_0"] / ppl["f16"] < 1.5, ppl

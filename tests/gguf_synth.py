"""Tiny GGUF files written the way llama.cpp's convert_hf_to_gguf.py writes them (for the GGUF tests).

`tiny_hf_model(family)` builds a small random transformers model and returns it with its tensors as read
back from the saved safetensors file (per-expert keys, as on disk). `write_gguf` writes those tensors under
llama.cpp names with llama.cpp's q/k row permutation for the `llama` architecture, quantised to the
requested GGML type, and returns the weights as they read back (dequantised): the dense reference.
`tiny_gemma_model` / `write_gemma_gguf` do the same for Gemma 2 / Gemma 3 (llama.cpp's Gemma2Model /
Gemma3Model: gguf-py's tensor-name map, norms stored + 1, a Gemma-style SentencePiece vocabulary from
`tiny_spm_vocab`). `tiny_gpt2_model` / `write_gpt2_gguf`: GPT-2 as llama.cpp's GPT2Model writes it (fused
attn_qkv, learned positions, a byte-level BPE vocabulary trained by HF `tokenizers`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

ARCH = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3_moe": "qwen3moe"}

# HF name suffix -> llama.cpp name (the table in gguf-py's tensor_mapping.py)
_BLOCK = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
}
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}


def llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """Verbatim from llama.cpp convert_hf_to_gguf.py (LlamaModel.permute)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def tiny_hf_model(family: str, tmp: Path, *, tie: bool = False, seed: int = 0):
    """A small random transformers model of `family`, saved to tmp; returns (model, hf_config, tensors)."""
    import transformers
    from safetensors.numpy import load_file

    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5, rope_theta=50000.0, tie_word_embeddings=tie, bos_token_id=1,
                  eos_token_id=2)
    if family == "llama":
        cfg = transformers.LlamaConfig(**common)
        cls = transformers.LlamaForCausalLM
    elif family == "qwen2":
        cfg = transformers.Qwen2Config(**common)
        cls = transformers.Qwen2ForCausalLM
    elif family == "qwen3":
        cfg = transformers.Qwen3Config(**common, head_dim=32)
        cls = transformers.Qwen3ForCausalLM
    elif family == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(**common, head_dim=32, num_experts=4, num_experts_per_tok=2,
                                          moe_intermediate_size=64, norm_topk_prob=True,
                                          decoder_sparse_step=1, mlp_only_layers=[])
        cls = transformers.Qwen3MoeForCausalLM
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model = cls(cfg).float().eval()
    with torch.no_grad():  # norms and biases away from their init values so that mistakes show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(tmp / "hf")
    tensors = load_file(str(tmp / "hf" / "model.safetensors"))
    return model, cfg, tensors


def gguf_name(hf_name: str) -> tuple[str, int | None, str | None]:
    """(llama.cpp name, expert index, projection) for an HF tensor name."""
    if hf_name in _GLOBAL:
        return _GLOBAL[hf_name], None, None
    parts = hf_name.split(".")
    layer, rest = parts[2], ".".join(parts[3:])
    if rest.startswith("mlp.experts."):
        e, proj = int(parts[5]), parts[6]
        return f"blk.{layer}.ffn_{proj.split('_')[0]}_exps.weight", e, proj
    return f"blk.{layer}.{_BLOCK[rest]}", None, None


def write_gguf(path: Path, family: str, cfg, tensors: dict[str, np.ndarray], qtype: str = "F32",
               extra_kv: dict | None = None, skip: tuple[str, ...] = (), arch: str | None = None,
               override_type: dict[str, str] | None = None,
               extra_tensors: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Write `tensors` (HF names) as a llama.cpp-style GGUF; 2-D weights in `qtype`, 1-D in F32.

    Returns the HF-named float32 weights as they read back from the file (the dense reference).
    `override_type` stores the named GGUF tensors as random bytes of another GGML type (error tests).
    """
    import gguf

    arch = arch or ARCH[family]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    if family == "qwen3_moe":
        w.add_expert_count(cfg.num_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    for k, v in (extra_kv or {}).items():
        if isinstance(v, str):
            w.add_string(k, v)
        elif isinstance(v, float):
            w.add_float32(k, v)
        else:
            w.add_uint32(k, v)

    # group per-expert tensors into llama.cpp's stacked (n_expert, out, in) tensors
    out: dict[str, list] = {}
    for hf_name, t in tensors.items():
        if hf_name in skip:
            continue
        name, e, _ = gguf_name(hf_name)
        t = np.asarray(t, dtype=np.float32)
        if family == "llama" and name.endswith(("attn_q.weight", "attn_q.bias")):
            t = llama_cpp_permute(t, cfg.num_attention_heads, cfg.num_attention_heads)
        if family == "llama" and name.endswith(("attn_k.weight", "attn_k.bias")):
            t = llama_cpp_permute(t, cfg.num_attention_heads, cfg.num_key_value_heads)
        out.setdefault(name, []).append((e, hf_name, t))

    dense: dict[str, np.ndarray] = {}
    for name, items in out.items():
        items.sort(key=lambda x: -1 if x[0] is None else x[0])
        data = items[0][2] if items[0][0] is None else np.stack([t for _, _, t in items])
        q = gguf.GGMLQuantizationType[qtype if data.ndim >= 2 else "F32"]
        if name in (override_type or {}):
            q = gguf.GGMLQuantizationType[override_type[name]]
            w.add_tensor(name, random_blocks(q.name, data.shape), raw_dtype=q)
            continue
        back = add_tensor(w, name, data, q)
        if family == "llama" and ".attn_q." in name:  # the reference is in HF row order
            back = _unpermute_ref(back, cfg.num_attention_heads)
        if family == "llama" and ".attn_k." in name:
            back = _unpermute_ref(back, cfg.num_key_value_heads)
        for e, hf_name, _ in items:
            dense[hf_name] = back if e is None else back[e]
    for name, data in (extra_tensors or {}).items():
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dense


def add_tensor(w, name: str, data: np.ndarray, q) -> np.ndarray:
    """Write `data` as GGML type `q` (F32 or a quantized type) and return what a reader gets back."""
    import gguf

    if q == gguf.GGMLQuantizationType.F32:
        w.add_tensor(name, data)
        return data
    raw = gguf.quants.quantize(data, q)
    w.add_tensor(name, raw, raw_dtype=q)
    return gguf.quants.dequantize(raw, q)


def _unpermute_ref(w: np.ndarray, n_head: int) -> np.ndarray:
    """Invert llama_cpp_permute by permutation indices (independent of llmkit's reshape-based inverse)."""
    idx = llama_cpp_permute(np.arange(w.shape[0]), n_head, None)  # row r of the file holds HF row idx[r]
    out = np.empty_like(w)
    out[idx] = w
    return out


# byte offsets of the float16 super-block scales (d, dmin) in llama.cpp's K-quant block structs
_FP16_FIELDS = {"Q2_K": (-4, -2), "Q3_K": (-2,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (-2,)}


def random_blocks(qtype: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Random GGML blocks of `qtype` for a tensor of `shape`; K-quant scales set to small finite float16s."""
    import gguf

    q = gguf.GGMLQuantizationType[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, gguf.quants.quant_shape_to_byte_shape(shape, q), dtype=np.uint8)
    block = gguf.GGML_QUANT_SIZES[q][1]
    blocks = raw.reshape(-1, block)
    for off in _FP16_FIELDS.get(qtype, ()):
        scale = rng.uniform(1e-4, 3e-4, blocks.shape[0]).astype(np.float16)  # (n_blocks,)
        start = off % block
        blocks[:, start:start + 2] = scale.view(np.uint8).reshape(-1, 2)
    return raw


# ------------------------------------------------------------------------------------------ Gemma 2 / Gemma 3
GEMMA_ARCH = {"gemma2": "gemma2", "gemma3_text": "gemma3"}  # HF model_type -> GGUF architecture
# token types as llama.cpp's gguf-py writes them
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_GEMMA_SPECIALS = [("<pad>", CONTROL), ("<eos>", CONTROL), ("<bos>", CONTROL), ("<unk>", CONTROL),
                   ("<mask>", CONTROL), ("[multimodal]", USER_DEFINED), ("<start_of_turn>", CONTROL),
                   ("<end_of_turn>", CONTROL), ("\n", USER_DEFINED), ("\n\n", USER_DEFINED),
                   ("\n\n\n", USER_DEFINED), ("  ", USER_DEFINED), ("   ", USER_DEFINED),
                   ("\t", USER_DEFINED), ("<b>", USER_DEFINED), ("</b>", USER_DEFINED),
                   ("<unused0>", CONTROL)]
_SPM_TRAIN_TEXT = ("Bonjour le monde. Le monde est grand, la mer est belle. Bonjour la mer ! "
                   "L'été, les enfants jouent dans le jardin ; le soir, ils rentrent à la maison. ") * 3


def tiny_spm_vocab(n_merges: int = 60) -> tuple[list[str], list[float], list[int]]:
    """A Gemma-style SentencePiece vocabulary: (tokens, scores, types) in the order llama.cpp writes them.

    Gemma's layout: control / user-defined tokens first (score -1000, runs of spaces and newlines as
    user-defined tokens spelled with real spaces), the 256 <0xNN> byte tokens (score 0), then the pieces in
    BPE merge order (score -rank), single characters last. The pieces come from a few rounds of plain BPE
    on a French sentence (most frequent adjacent pair first), plus '>▁</' (Gemma has that piece: the one
    place where '▁' sits inside a piece).
    """
    from collections import Counter

    words = [list(w) for w in _SPM_TRAIN_TEXT.replace(" ", " ▁").split(" ") if w]
    merged: list[str] = []
    for _ in range(n_merges):
        pairs = Counter((a, b) for w in words for a, b in zip(w, w[1:]))
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        merged.append(a + b)
        for w in words:
            i = 0
            while i < len(w) - 1:
                if (w[i], w[i + 1]) == (a, b):
                    w[i:i + 2] = [a + b]
                i += 1
    chars = sorted(set(_SPM_TRAIN_TEXT.replace(" ", "▁")) - set(merged))
    pieces = [*merged, ">▁</", ">▁", "</", *chars, "<", ">", "/"]
    pieces = list(dict.fromkeys(p for p in pieces))
    tokens = [t for t, _ in _GEMMA_SPECIALS] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    scores = [-1000.0] * len(_GEMMA_SPECIALS) + [0.0] * 256 + [-float(i) for i in range(len(pieces))]
    types = [ty for _, ty in _GEMMA_SPECIALS] + [BYTE] * 256 + [NORMAL] * len(pieces)
    assert len(set(tokens)) == len(tokens)
    return tokens, scores, types


def tiny_gemma_model(family: str, tmp: Path, *, seed: int = 0, **overrides):
    """A small random Gemma 2 ("gemma2") or Gemma 3 ("gemma3_text") transformers model with the vocabulary
    size of `tiny_spm_vocab`, saved to tmp/hf; returns (model, hf_config, tensors).

    What llama.cpp's converter cannot carry is set to llama.cpp's own constants: query_pre_attn_scalar =
    head_dim, Gemma 3's local RoPE base 10000 and pattern 6, Gemma 2's RoPE base 10000.
    """
    import transformers
    from safetensors.numpy import load_file

    common = dict(vocab_size=len(tiny_spm_vocab()[0]), hidden_size=64, intermediate_size=96,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32,
                  sliding_window=8, max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=2,
                  eos_token_id=1, pad_token_id=0)
    if family == "gemma3_text":
        cfg = transformers.Gemma3TextConfig(**{**common, "num_hidden_layers": 7, "rope_theta": 1e6,
                                               "rope_local_base_freq": 10000.0, **overrides})
        cls = transformers.Gemma3ForCausalLM
    elif family == "gemma2":
        cfg = transformers.Gemma2Config(**{**common, "num_hidden_layers": 3, "attn_logit_softcapping": 2.0,
                                           "final_logit_softcapping": 4.0, **overrides})
        cls = transformers.Gemma2ForCausalLM
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model = cls(cfg).float().eval()
    with torch.no_grad():  # Gemma norms start at 0 (scale 1 + w): move them so that a missing -1 shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.3)
            elif name.endswith(("q_proj.weight", "k_proj.weight", "embed_tokens.weight")):
                p.mul_(8.0)  # larger attention scores and logits, so that Gemma 2's soft-capping matters
    model.save_pretrained(tmp / "hf")
    tensors = load_file(str(tmp / "hf" / "model.safetensors"))
    return model, cfg, tensors


def write_gemma_gguf(path: Path, cfg, tensors: dict[str, np.ndarray], qtype: str = "F32", *,
                     vocab: tuple[list[str], list[float], list[int]] | None = None,
                     omit: tuple[str, ...] = (), n_layers: int | None = None,
                     sliding_window_pattern: int | list[bool] | None = None,
                     rope_freq_base_swa: float | None = None) -> dict[str, np.ndarray]:
    """Write an HF Gemma 2/3 model as llama.cpp's convert_hf_to_gguf.py does (Gemma2Model / Gemma3Model):
    names from gguf-py's own tensor map, every *norm.weight stored + 1, no lm_head (tied), the embedding cut
    to the tokenizer's size, the SentencePiece vocabulary with add_space_prefix false, Gemma 3's RoPE base of
    the global layers; 2-D weights in `qtype`, 1-D in F32. `omit`: metadata keys left out (llama.cpp's
    defaults then apply); `n_layers` overrides the block count (metadata-only tests);
    `sliding_window_pattern` (a period or one flag per layer) and `rope_freq_base_swa` add those keys, which
    llama.cpp reads but its converter does not write for Gemma 2/3 (other writers do).

    Returns the HF-named float32 weights as they read back (dequantised, norms - 1): the dense reference.
    """
    import gguf

    family = cfg.model_type
    arch = GEMMA_ARCH[family]
    tokens, scores, types = vocab or tiny_spm_vocab()
    w = gguf.GGUFWriter(str(path), arch)

    def put(key: str, fn, *args):
        if key not in omit:
            fn(*args)

    w.add_block_count(n_layers or cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    if family == "gemma2":  # Gemma2Model.set_gguf_parameters: no rope base (llama.cpp's default 10000)
        put("attn_logit_softcapping", w.add_attn_logit_softcapping, cfg.attn_logit_softcapping)
        put("final_logit_softcapping", w.add_final_logit_softcapping, cfg.final_logit_softcapping)
        put("sliding_window", w.add_sliding_window, cfg.sliding_window)
    else:  # Gemma3Model.set_gguf_parameters
        w.add_rope_freq_base(cfg.rope_parameters["full_attention"]["rope_theta"])
        if cfg.final_logit_softcapping:
            w.add_final_logit_softcapping(cfg.final_logit_softcapping)
        put("sliding_window", w.add_sliding_window, cfg.sliding_window)
    if sliding_window_pattern is not None:
        w.add_sliding_window_pattern(sliding_window_pattern)  # int: uint32; list: bool array
    if rope_freq_base_swa is not None:
        w.add_rope_freq_base_swa(rope_freq_base_swa)
    w.add_tokenizer_model("llama")  # _set_vocab_sentencepiece
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.num_hidden_layers)
    dense: dict[str, np.ndarray] = {}
    for hf_name, t in tensors.items():
        if hf_name == "lm_head.weight":
            continue  # "lm_head is not used in llama.cpp": skipped by the converter
        t = np.asarray(t, dtype=np.float32)
        if hf_name == "model.embed_tokens.weight":
            t = t[: len(tokens)]
        shift = 1.0 if hf_name.endswith("norm.weight") else 0.0
        t = t + shift
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert name is not None, hf_name
        q = gguf.GGMLQuantizationType[qtype if t.ndim >= 2 else "F32"]
        back = add_tensor(w, name, t, q)
        dense[hf_name] = back - shift
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dense


# ------------------------------------------------------------------------------------------------------ GPT-2
_GPT2_TRAIN_TEXT = (
    "Le petit chat dort sur le toit ; il rêve d'oiseaux et de lait. The small cat sleeps on the roof, "
    "the dog barks at 7 o'clock — «Déjà vu !» dit-elle, naïve. I'VE been told he's there, 1234 567.89\n"
    "\tdef f(x):\n        return x ** 2  # commentaire\n\n") * 4
GPT2_EOT = "<|endoftext|>"


def tiny_gpt2_tokenizer(vocab_size: int = 300):
    """A byte-level BPE trained by HF `tokenizers` (GPT-2's ByteLevel pre-tokenizer and regex, <|endoftext|>
    special, id 0): the reference a GPT-2 GGUF vocabulary is checked against."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[GPT2_EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_GPT2_TRAIN_TEXT], trainer)
    return tok


def tiny_gpt2_model(tmp: Path, *, seed: int = 0, n_extra: int = 4):
    """A small random transformers GPT2LMHeadModel (tied lm_head, gelu_new) whose vocabulary is
    `tiny_gpt2_tokenizer`'s plus `n_extra` ids the tokenizer lacks (written as [PADn] UNUSED tokens, as
    llama.cpp's converter pads), saved to tmp/hf; returns (model, config, tensors, tokenizer)."""
    import transformers
    from safetensors.numpy import load_file

    tok = tiny_gpt2_tokenizer()
    eot = tok.token_to_id(GPT2_EOT)
    cfg = transformers.GPT2Config(vocab_size=tok.get_vocab_size() + n_extra, n_embd=64, n_layer=2, n_head=4,
                                  n_positions=64, layer_norm_epsilon=1e-5, bos_token_id=eot,
                                  eos_token_id=eot)
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(cfg).float().eval()
    with torch.no_grad():  # LayerNorm weights and biases away from 1 and 0, so that mistakes show
        for name, p in model.named_parameters():
            if name.endswith(".bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(tmp / "hf")
    return model, cfg, load_file(str(tmp / "hf" / "model.safetensors")), tok


def gpt2_vocab(tok, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) as convert_hf_to_gguf.py's _set_vocab_gpt2 writes them: byte-level
    spelling, [PADn] UNUSED for ids the tokenizer lacks, CONTROL for special added tokens, "a b" merges."""
    import json

    reverse = {i: t for t, i in tok.get_vocab().items()}
    added = {a.content: a.special for a in tok.get_added_tokens_decoder().values()}
    tokens, types = [], []
    for i in range(vocab_size):
        t = reverse.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        else:
            tokens.append(t)
            types.append((CONTROL if added[t] else USER_DEFINED) if t in added else NORMAL)
    merges = json.loads(tok.to_str())["model"]["merges"]
    return tokens, types, [m if isinstance(m, str) else " ".join(m) for m in merges]


def write_gpt2_gguf(path: Path, cfg, tensors: dict[str, np.ndarray], tok, qtype: str = "F32",
                    context_length: int | None = None) -> dict[str, np.ndarray]:
    """Write an HF GPT-2 model as llama.cpp's convert_hf_to_gguf.py does (GPT2Model): gguf-py's tensor-name
    map, Conv1D weights transposed to (out, in), no output tensor (tied), position_embd kept F32, the
    hyperparameters it writes (context_length = n_ctx, which real GPT-2 config.json files have and equals
    n_positions; feed_forward_length = 4 n_embd), the byte-level BPE vocabulary with pre "gpt-2".

    Returns the HF-named weights in HF layout as they read back (dequantised): the dense reference.
    """
    import gguf

    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(cfg.n_layer)
    w.add_context_length(context_length or cfg.n_positions)
    w.add_embedding_length(cfg.n_embd)
    w.add_feed_forward_length(4 * cfg.n_embd)
    w.add_head_count(cfg.n_head)
    w.add_layer_norm_eps(cfg.layer_norm_epsilon)
    tokens, types, merges = gpt2_vocab(tok, cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(cfg.bos_token_id)  # gguf.SpecialVocab: from config.json
    w.add_eos_token_id(cfg.eos_token_id)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2, cfg.n_layer)
    dense: dict[str, np.ndarray] = {}
    for hf_name, t in tensors.items():
        if hf_name.endswith((".attn.bias", ".attn.masked_bias")) or hf_name == "lm_head.weight":
            continue
        conv1d = hf_name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight"))
        t = np.asarray(t, dtype=np.float32)
        t = np.ascontiguousarray(t.T) if conv1d else t  # Conv1D (in, out) -> (out, in)
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert name is not None, hf_name
        q = gguf.GGMLQuantizationType[qtype if t.ndim >= 2 and name != "position_embd.weight" else "F32"]
        back = add_tensor(w, name, t, q)
        dense[hf_name] = np.ascontiguousarray(back.T) if conv1d else back
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dense


def synthetic_q4_0(path: Path, d: int, layers: int, ff: int, vocab: int, heads: int, kv_heads: int) -> None:
    """A Llama-architecture GGUF of random Q4_0 blocks (scales set to small float16s) and a byte-fallback
    SentencePiece vocabulary: the shape of a big model without its weights, for llmkit's and llama.cpp's
    memory at scale (tests/test_quant_stream.py, bench/bigmodel.py). gguf's writer holds the blocks until it
    writes them."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_context_length(2048)
    w.add_embedding_length(d)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    # a byte-fallback SentencePiece vocabulary: <unk> <s> </s>, the 256 bytes, then filler pieces
    pieces = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
    pieces += [f"\u2581w{i}" for i in range(vocab - len(pieces))]
    w.add_tokenizer_model("llama")
    w.add_token_list(pieces)
    w.add_token_scores([0.0] * vocab)
    w.add_token_types([2, 3, 3, *[6] * 256, *[1] * (vocab - 259)])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    q = gguf.GGMLQuantizationType.Q4_0
    rng = np.random.default_rng(0)

    def q4(n: int, k: int) -> np.ndarray:
        raw = rng.integers(0, 256, (n, k // 32, 18), dtype=np.uint8)
        raw[..., 0:2] = np.full((n, k // 32), 0.002, dtype=np.float16).view(np.uint8).reshape(n, k // 32, 2)
        return raw.reshape(n, -1)

    hd = d // heads
    w.add_tensor("token_embd.weight", q4(vocab, d), raw_dtype=q)
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(d, dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(d, dtype=np.float32))
        for name, (n, k) in {"attn_q": (d, d), "attn_k": (kv_heads * hd, d), "attn_v": (kv_heads * hd, d),
                             "attn_output": (d, d), "ffn_gate": (ff, d), "ffn_up": (ff, d),
                             "ffn_down": (d, ff)}.items():
            w.add_tensor(f"blk.{i}.{name}.weight", q4(n, k), raw_dtype=q)
    w.add_tensor("output_norm.weight", np.ones(d, dtype=np.float32))
    w.add_tensor("output.weight", q4(vocab, d), raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

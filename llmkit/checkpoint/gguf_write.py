"""GGUF export: an llmkit model and its tokenizer written as one llama.cpp file (f32, f16, bf16, q8_0, q4_0,
q4_1) that llama.cpp, Ollama, LM Studio and llmkit itself load.

    from llmkit.checkpoint.gguf_write import save_gguf
    llm = llmkit.load("smollm2-135m-instruct", device="cpu", dtype="float32")
    save_gguf(llm.model, llm.tokenizer, "smollm2-q8_0.gguf", type="q8_0",
              generation_defaults=llm.generation_defaults)

Families: llama (SmolLM2; Mistral is written as llama.cpp's `llama`, as convert_hf_to_gguf.py does), qwen2,
qwen3, qwen3_moe (`qwen3moe`), gpt2, gemma2, gemma3_text (`gemma3`). Anything else (Mixtral: no reader here
to check it against), and any model llama.cpp's graph for that architecture would compute differently, is
refused with one line.

Notable choices (each one what llama.cpp's convert_hf_to_gguf.py, or llama-quantize, does):
- Tensor names come from llmkit.checkpoint.gguf (`gguf_name`, the mapping the reader inverts, Gemma's
  sandwich norms and GPT-2's names included); done here: GPT-2's fused attention (attn_qkv = q, k, v rows
  concatenated) and MoE experts stacked as (n_expert, rows, cols).
- The `llama` architecture stores q/k rows permuted for llama.cpp's interleaved rotary kernel
  (`llama_cpp_permute`, LlamaModel.permute verbatim); the other families are written as they are. Gemma's
  RMSNorm weights are written as 1 + weight (llama.cpp multiplies by the stored weight). Llama-3 RoPE scaling
  becomes a `rope_freqs` tensor of per-frequency factors.
- Types: norms, biases and 1-D tensors stay F32, as do MoE routers (ffn_gate_inp) and GPT-2's position
  embeddings; every other matrix takes the chosen type. llama-quantize would store the output matrix (or the
  tied token embeddings) of a q4_0/q4_1 file as Q6_K, which gguf-py cannot write: they are Q8_0 here (the
  type llama-quantize itself falls back to for Q6_K). A matrix whose rows do not fill whole blocks (32
  values) is written as F16, as both converters do. Quantisation is gguf-py's (`gguf.quants.quantize`, the
  numpy port of ggml's reference quantizers).
- Tokenizer metadata as llama.cpp expects it: byte-level BPE as tokenizer.ggml.model "gpt2" (tokens in
  GPT-2's byte alphabet, token types, merges "a b") with the `tokenizer.ggml.pre` family whose regexes split
  text as this tokenizer does (the tokenizer's own llama.cpp name when it came from a GGUF, else found by
  splitting a probe text with each family: "gpt-2" for llmkit's gpt2 pattern, "dbrx" for gpt4 = Llama-3's
  regex without ignore_merges); SentencePiece vocabularies as "llama" (pieces, scores, token types with
  <0xNN> byte tokens). Vocabularies shorter than the embedding are padded with "[PADn]" UNUSED tokens; a
  BPE without merges (llmkit's byte tokenizer) gets one merge that can never apply, since llama.cpp
  refuses a BPE file without the merges key. BOS/EOS/UNK/PAD ids, add_bos/add_eos, the chat template
  and the generation defaults (general.sampling.*) are written too.
- Hyperparameters under llama.cpp's keys; what its graph for the architecture fixes is checked instead
  (activation, biases, Gemma's attention scale): a model it would compute differently is refused. A sliding
  window on llama / qwen models is dropped with a warning (llama.cpp has none there; convert_hf_to_gguf.py
  drops it too); Gemma's sliding layers are written as a per-layer pattern only when they differ from what
  llama.cpp assumes. BOS/EOS ids the tokenizer lacks come from the model config, as convert_hf_to_gguf.py
  falls back to config.json.
- Written through a temporary file that replaces `path` only when complete; tensors are converted and
  written one at a time (peak memory: the model plus one tensor), with a progress bar.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType, TokenType

from llmkit.checkpoint.gguf import gguf_name
from llmkit.config import ModelConfig
from llmkit.errors import LlmkitError
from llmkit.io import atomic_path
from llmkit.model.layers import empty_weights

log = logging.getLogger("llmkit")

Q = GGMLQuantizationType
# --type -> (GGML type of the matrices, general.file_type)
GGUF_TYPES: dict[str, tuple[GGMLQuantizationType, LlamaFileType]] = {
    "f32": (Q.F32, LlamaFileType.ALL_F32),
    "f16": (Q.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (Q.Q4_0, LlamaFileType.MOSTLY_Q4_0),
    "q4_1": (Q.Q4_1, LlamaFileType.MOSTLY_Q4_1),
}
# HF model_type -> llama.cpp architecture
ARCHITECTURES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "qwen3_moe": "qwen3moe",
    "gpt2": "gpt2",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
}
_ACTIVATION = {"gpt2": "gelu_tanh", "gemma2": "gelu_tanh", "gemma3": "gelu_tanh"}  # others: silu
_ALWAYS_F32 = ("ffn_gate_inp.weight", "position_embd.weight")  # never quantized by either converter
NO_MERGE = "<|no-merges|>"  # operand of the one merge written for a BPE without merges: never a symbol
SPLIT_PROBE = (  # text on which a llama.cpp pre-tokenizer family must split exactly like the tokenizer
    "The quick brown fox jumps over the lazy dog; it's 1,234.56 USD (about €1.1k) in 2024!\n"
    "Le cœur a ses raisons que la raison ne connaît point. Déjà-vu, naïveté, où ça ? «Voilà» — fin.\n"
    "I'VE been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL\n"
    "3 33 333 3333 33333 333333 3.3 3..3 ١٢٣ Привет, как дела? 日本語のテキストと中文文本。\n"
    "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n\t\tindented\r\n"
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ ✅ 🦙🦙\n"
    "------======= ''''''```````\"\"\"\"......!!!!!!??????"
    "    spaces     and\ttabs   \n\n\n emoji 🤗👍🏽🇫🇷 https://example.com/a?b=c&d=e#f <tag attr=\"v\"/> "
)
# llama.cpp names tried for a tokenizer without one, in this order (common families first)
_PRE_PREFERENCE = ("gpt-2", "llama-bpe", "qwen2", "smollm", "dbrx", "starcoder", "default")


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (convert_hf_to_gguf.py LlamaModel.permute, with n_head already the
    kv head count for k): HF's rotate_half layout -> the interleaved pairs of llama.cpp's rope kernel."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass
class PlannedTensor:
    """One tensor of the file: GGUF name, numpy-order shape, GGML type and how to compute its float32 data."""

    name: str
    shape: tuple[int, ...]
    qtype: GGMLQuantizationType
    data: Callable[[], np.ndarray]

    @property
    def n_bytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.qtype]
        return math.prod(self.shape) // block * size


# ---------------------------------------------------------------------------------------------- checks
def check_type(type: str) -> None:
    """LlmkitError (one line) unless `type` is a GGUF type this module writes."""
    if type not in GGUF_TYPES:
        raise LlmkitError(f"unknown GGUF type {type!r}; choose one of {', '.join(GGUF_TYPES)}")


def gguf_architecture(config: ModelConfig) -> str:
    """The llama.cpp architecture this config is written as; LlmkitError when llama.cpp cannot run it."""
    mt = config.model_type
    arch = ARCHITECTURES.get(mt)
    if arch is None:
        raise LlmkitError(
            f"cannot export model_type {mt!r} to GGUF; llmkit writes {', '.join(sorted(ARCHITECTURES))}"
        )
    config.to_hf()  # the model must be what its family says (raises a one-line LlmkitError otherwise)

    def refuse(what: str) -> LlmkitError:
        return LlmkitError(f"cannot export to GGUF: llama.cpp's {arch} architecture {what}")

    act = _ACTIVATION.get(arch, "silu")
    if config.activation != act:
        raise refuse(f"uses the {act} activation, this model {config.activation}")
    if config.attn_out_bias and arch not in ("llama", "gpt2"):
        raise refuse("has no attention output bias")
    if config.mlp_bias and arch not in ("llama", "gpt2"):
        raise refuse("has no MLP biases")
    kind = (config.rope_scaling or {}).get("rope_type", (config.rope_scaling or {}).get("type"))
    if kind not in (None, "default", "linear", "llama3") or (kind == "llama3" and arch != "llama"):
        raise refuse(f"has no {kind!r} RoPE scaling")
    if config.n_experts:
        if arch != "qwen3moe":
            raise refuse("has no mixture of experts")
        if not config.moe_norm_topk or config.moe_layer_step != 1 or config.moe_dense_layers:
            raise refuse("renormalises the top-k expert weights and has experts in every layer")
    if arch in ("gemma2", "gemma3"):
        # llama.cpp fixes the softmax scale: 1/√(d_model/n_heads) for the 27B models, else 1/√head_dim
        big = config.n_layers == (46 if arch == "gemma2" else 62)
        want = (config.d_model / config.n_heads if big else config.head_dim) ** -0.5
        got = config.attn_scale if config.attn_scale is not None else config.head_dim**-0.5
        if abs(got / want - 1) > 1e-6:
            raise refuse(f"fixes the attention scale to {want:.6g} for this size; this model uses {got:.6g}")
        if arch == "gemma2" and not config.tie_embeddings:
            raise refuse("ties the output layer to the token embeddings")
    if config.sliding_window is not None and arch not in ("gemma2", "gemma3"):
        log.warning(
            "llama.cpp's %s architecture has no sliding-window attention: the window of %d tokens is "
            "dropped (as convert_hf_to_gguf.py does); outputs differ beyond that many tokens",
            arch, config.sliding_window,
        )
    return arch


def _swa_pattern(config: ModelConfig) -> list[bool]:
    return [config.is_sliding_layer(i) for i in range(config.n_layers)]


def _default_swa_pattern(arch: str, n_layers: int) -> list[bool]:
    """What llama.cpp assumes without attention.sliding_window_pattern: Gemma 2 slides on even layers,
    Gemma 3 on all but every 6th (set_swa_pattern(n) with dense_first = false)."""
    n = 2 if arch == "gemma2" else 6
    return [i % n < n - 1 for i in range(n_layers)]


# ---------------------------------------------------------------------------------------------- tensors
def _weights(model: torch.nn.Module, config: ModelConfig) -> dict[str, torch.Tensor]:
    """The model's weights under llmkit's canonical names (fused projections split back)."""
    from llmkit.model import Transformer

    with empty_weights():
        expected = [n for n, _ in Transformer(config).named_parameters()]
    state = model.state_dict()
    if any(".lora_A." in k for k in state):
        raise LlmkitError(
            "cannot export a model with LoRA adapters applied; merge them first (llmkit merge, or "
            "llmkit.lora.merge_lora(model)), then export"
        )
    missing = [n for n in expected if n not in state]
    if missing:
        raise LlmkitError(
            f"cannot export to GGUF: the model has no plain weight {missing[0]!r} (quantized by llmkit "
            "quantize?); load it unquantized, then export"
        )
    return {n: state[n] for n in expected}


def tensor_name(hf_name: str, config: ModelConfig, arch: str) -> str:
    """The GGUF tensor an llmkit weight goes into (experts share their stacked tensor, GPT-2's q/k/v their
    fused attn_qkv)."""
    name = gguf_name(hf_name, arch)
    if name == hf_name:
        raise LlmkitError(f"cannot export tensor {hf_name!r} to GGUF: it has no llama.cpp name")
    return name


def tensor_type(name: str, shape: tuple[int, ...], type: str, tied: bool) -> GGMLQuantizationType:
    """The GGML type of one tensor of a `type` export (see the module docstring)."""
    base = GGUF_TYPES[type][0]
    if len(shape) <= 1 or not name.endswith(".weight") or name.endswith("_norm.weight"):
        return Q.F32
    if name.endswith(_ALWAYS_F32):
        return Q.F32
    if type in ("q4_0", "q4_1") and (name == "output.weight" or (tied and name == "token_embd.weight")):
        base = Q.Q8_0
    if shape[-1] % GGML_QUANT_SIZES[base][0]:
        return Q.F16
    return base


def plan_tensors(model: torch.nn.Module, config: ModelConfig, type: str, arch: str) -> list[PlannedTensor]:
    """Every tensor of the file, in the model's order, with its GGML type and a function making its data."""
    weights = _weights(model, config)
    groups: dict[str, list[str]] = {}  # GGUF name -> llmkit names (several: stacked experts, GPT-2 qkv)
    for hf_name in weights:
        if hf_name == "lm_head.weight" and config.tie_embeddings:
            continue
        groups.setdefault(tensor_name(hf_name, config, arch), []).append(hf_name)
    offset = float(config.norm_weight_offset)
    permute = arch == "llama"

    def make(name: str, members: list[str]) -> Callable[[], np.ndarray]:
        def data() -> np.ndarray:
            parts = [weights[m].detach().to(device="cpu", dtype=torch.float32).numpy() for m in members]
            if ".attn_qkv." in name:
                w = np.concatenate(parts, axis=0)  # (q + k + v rows, d_model) or (q + k + v,)
            elif "_exps." in name:
                w = np.stack(parts)  # (n_expert, rows, cols)
            else:
                (w,) = parts
            if offset and name.endswith("norm.weight"):
                w = w + np.float32(offset)  # llama.cpp stores Gemma's (1 + weight)
            if permute and re.fullmatch(r"blk\.\d+\.attn_[qk]\.(weight|bias)", name):
                w = llama_cpp_permute(w, config.n_heads if ".attn_q." in name else config.n_kv_heads)
            return np.ascontiguousarray(w, dtype=np.float32)

        return data

    plan = []
    if (config.rope_scaling or {}).get("rope_type") == "llama3":
        factors = llama3_rope_factors(config)
        plan.append(PlannedTensor("rope_freqs.weight", factors.shape, Q.F32, lambda: factors))
    for name, members in groups.items():
        first = tuple(weights[members[0]].shape)
        if "_exps." in name:
            shape = (len(members), *first)
        elif ".attn_qkv." in name:
            shape = (sum(weights[m].shape[0] for m in members), *first[1:])
        else:
            shape = first
        plan.append(PlannedTensor(name, shape, tensor_type(name, shape, type, config.tie_embeddings),
                                  make(name, members)))
    return plan


def llama3_rope_factors(config: ModelConfig) -> np.ndarray:
    """Llama-3 RoPE scaling as llama.cpp's rope_freqs tensor (head_dim/2,): the factor each frequency is
    divided by (convert_hf_to_gguf.py LlamaModel.generate_extra_tensors)."""
    s = config.rope_scaling or {}
    dim = config.head_dim
    freqs = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = float(s.get("factor", 8.0)), float(s.get("low_freq_factor", 1.0)), float(
        s.get("high_freq_factor", 4.0))
    old = float(s.get("original_max_position_embeddings", 8192))
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


# ---------------------------------------------------------------------------------------------- metadata
def _arch_metadata(w: gguf.GGUFWriter, config: ModelConfig, arch: str) -> None:
    """The architecture's hyperparameters, under llama.cpp's keys."""
    w.add_context_length(config.max_seq_len)
    w.add_embedding_length(config.d_model)
    w.add_block_count(config.n_layers)
    w.add_feed_forward_length(config.d_ff)
    w.add_head_count(config.n_heads)
    if arch == "gpt2":
        w.add_layer_norm_eps(config.norm_eps)
        return
    w.add_head_count_kv(config.n_kv_heads)
    w.add_layer_norm_rms_eps(config.norm_eps)
    w.add_vocab_size(config.vocab_size)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_rope_freq_base(config.rope_theta)
    if arch == "llama":
        w.add_rope_dimension_count(config.head_dim)
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type", scaling.get("type")) == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(scaling["factor"]))
    if config.n_experts:
        w.add_expert_count(config.n_experts)
        w.add_expert_used_count(config.n_experts_per_tok)
        if arch == "qwen3moe":
            w.add_expert_feed_forward_length(config.moe_d_ff)
    if arch in ("gemma2", "gemma3"):
        swa = _swa_pattern(config)
        if any(swa):
            w.add_sliding_window(config.sliding_window)
        if swa != _default_swa_pattern(arch, config.n_layers) and (arch == "gemma2" or any(swa)):
            w.add_sliding_window_pattern(swa)
        # the RoPE base of the sliding layers (llama.cpp's default: Gemma 3 10000, Gemma 2 the global base)
        w.add_rope_freq_base_swa(config.rope_local_theta or config.rope_theta)
        if config.attn_logit_softcap is not None:
            w.add_attn_logit_softcapping(config.attn_logit_softcap)
        if config.final_logit_softcap is not None:
            w.add_final_logit_softcapping(config.final_logit_softcap)


def _generation_metadata(w: gguf.GGUFWriter, defaults: Mapping[str, Any]) -> None:
    """SamplingParams defaults as llama.cpp's general.sampling.* keys (inverse of
    llmkit.generate.defaults.from_gguf_metadata)."""
    if "temperature" in defaults:
        w.add_sampling_temp(float(defaults["temperature"]))
    if "top_p" in defaults:
        w.add_sampling_top_p(float(defaults["top_p"]))
    if "top_k" in defaults:
        w.add_sampling_top_k(int(defaults["top_k"]))
    if "min_p" in defaults:
        w.add_sampling_min_p(float(defaults["min_p"]))
    if "repetition_penalty" in defaults:
        w.add_sampling_penalty_repeat(float(defaults["repetition_penalty"]))
    if "repetition_window" in defaults:  # llmkit 0 = the whole context = llama.cpp -1
        w.add_sampling_penalty_last_n(int(defaults["repetition_window"]) or -1)


def pre_tokenizer_name(tok: Any) -> str:
    """The llama.cpp `tokenizer.ggml.pre` family that splits text as this byte-level BPE tokenizer does."""
    from llmkit.tokenizer.pretokenize import FAMILIES, IGNORE_MERGES, UNSUPPORTED, PreTokenizer

    if not tok.merges:
        return "gpt-2"  # no merges: every split gives the same ids (one per byte)
    own = tok.pre_name
    candidates = ([own] if own in FAMILIES else []) + [n for n in _PRE_PREFERENCE if n != own]
    candidates += [n for n in FAMILIES if n not in candidates]
    want = tok.pre.split(SPLIT_PROBE)
    for name in candidates:
        if name in UNSUPPORTED or (name in IGNORE_MERGES) != bool(tok.ignore_merges):
            continue
        if FAMILIES[name] == tok.pre.patterns or PreTokenizer(FAMILIES[name]).split(SPLIT_PROBE) == want:
            return name
    raise LlmkitError(
        f"cannot export the tokenizer to GGUF: its pre-tokenizer ({tok.pre.patterns[0][:60]!r}...) splits "
        "text like no llama.cpp family; train it with --pattern gpt2 or gpt4"
    )


def tokenizer_metadata(tok: Any, vocab_size: int, config: ModelConfig | None = None) -> dict[str, Any]:
    """The `tokenizer.*` GGUF keys for `tok`, padded to the model's `vocab_size` tokens. BOS/EOS ids the
    tokenizer lacks come from `config` (as convert_hf_to_gguf.py falls back to config.json)."""
    n = tok.vocab_size
    if n > vocab_size:
        raise LlmkitError(
            f"cannot export to GGUF: the tokenizer has {n} tokens, the model's embedding {vocab_size} rows"
        )
    text_of = {i: t for t, i in {**tok.added_tokens, **tok.special_tokens}.items()}
    control = set(tok.special_tokens.values())
    out: dict[str, Any] = {}
    tokens: list[str] = []
    types: list[int] = []
    if tok.model == "bpe":
        from llmkit.tokenizer.core import bytelevel

        for i in range(vocab_size):
            if i in text_of:
                tokens.append(text_of[i])
                types.append(TokenType.CONTROL if i in control else TokenType.USER_DEFINED)
            elif i < n and tok.vocab[i]:
                tokens.append(bytelevel(tok.vocab[i]))
                types.append(TokenType.NORMAL)
            else:
                tokens.append(f"[PAD{i}]")
                types.append(TokenType.UNUSED)
        merges = [f"{bytelevel(a)} {bytelevel(b)}" for a, b in tok.merges] or [f"{NO_MERGE} {NO_MERGE}"]
        out.update({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre_tokenizer_name(tok),
                    "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
                    "tokenizer.ggml.merges": merges})
    else:
        pieces, piece_scores, piece_types = tok.pieces, tok.scores, tok.token_types
        known = [s for s in piece_scores if s is not None]
        floor = min(known, default=0.0) - 1.0  # pieces no merge makes (HF tokenizer.json): merged last
        scores: list[float] = []
        for i in range(vocab_size):
            score = piece_scores[i] if i < n else None
            if i >= n:
                tokens.append(f"[PAD{i}]")
                types.append(TokenType.UNUSED)
            else:  # the piece as the vocabulary spells it ('▁le', '<0x0A>', '<start_of_turn>'), its type
                tokens.append(pieces[i])
                types.append(int(piece_types[i]))
            scores.append(float(score) if score is not None else (floor if i < n else -1000.0))
        out.update({"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
                    "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
                    "tokenizer.ggml.token_type": types,
                    "tokenizer.ggml.add_space_prefix": bool(tok.add_space_prefix)})
    bos, eos = tok.bos_id, tok.eos_id
    if config is not None:
        bos = bos if bos is not None else config.bos_token_id
        model_eos = config.eos_token_id
        eos = eos if eos is not None else (model_eos[0] if isinstance(model_eos, list) else model_eos)
    for key, i in (("bos_token_id", bos), ("eos_token_id", eos),
                   ("unknown_token_id", tok.unk_id), ("padding_token_id", tok.pad_id)):
        if i is not None and 0 <= i < vocab_size:
            out[f"tokenizer.ggml.{key}"] = int(i)
    out["tokenizer.ggml.add_bos_token"] = bool(tok.add_bos)
    out["tokenizer.ggml.add_eos_token"] = bool(tok.add_eos)
    if tok.chat_template:
        out["tokenizer.chat_template"] = tok.chat_template
    return out


def _add_tokenizer(w: gguf.GGUFWriter, meta: Mapping[str, Any]) -> None:
    for key, value in meta.items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        elif key == "tokenizer.ggml.token_type":
            w.add_token_types(value)
        elif key == "tokenizer.ggml.scores":
            w.add_token_scores(value)
        else:
            w.add_array(key, value)


# ---------------------------------------------------------------------------------------------- write
def save_gguf(
    model: torch.nn.Module,
    tokenizer: Any,
    path: str | os.PathLike,
    type: str = "f16",
    *,
    name: str | None = None,
    generation_defaults: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> Path:
    """Write `model` (an llmkit Transformer) and `tokenizer` as a GGUF file of `type` (f32, f16, bf16,
    q8_0, q4_0, q4_1); returns the path. `name` goes to general.name (default: the file's stem),
    `generation_defaults` (LLM.generation_defaults) to general.sampling.*. Everything is checked before
    the file is opened; the file appears complete or not at all."""
    check_type(type)
    config: ModelConfig = model.config
    arch = gguf_architecture(config)
    plan = plan_tensors(model, config, type, arch)
    tok_meta = tokenizer_metadata(tokenizer, config.vocab_size, config)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        w = gguf.GGUFWriter(tmp, arch)
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(name or path.stem)
        for t in plan:
            w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.n_bytes, raw_dtype=t.qtype)
        total, shared, experts, n_experts = w.get_total_parameter_count()
        w.add_size_label(gguf.size_label(total, shared, experts, n_experts))
        _generation_metadata(w, generation_defaults or {})
        _arch_metadata(w, config, arch)
        w.add_file_type(GGUF_TYPES[type][1])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_tokenizer(w, tok_meta)
        try:
            w.write_header_to_file(path=tmp)
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            _write_tensors(w, plan, type, progress)
        finally:
            w.close()
    return path


def _write_tensors(w: gguf.GGUFWriter, plan: list[PlannedTensor], type: str, progress: bool) -> None:
    from tqdm import tqdm

    with tqdm(total=len(plan), desc=f"GGUF {type}", unit="tensor", disable=not progress) as bar:
        for t in plan:
            data = t.data()
            if data.shape != t.shape:
                raise LlmkitError(f"tensor {t.name}: shape {data.shape}, planned {t.shape} (internal error)")
            w.write_tensor_data(gguf.quants.quantize(data, t.qtype))
            bar.update()

"""GGUF checkpoints (llama.cpp's one-file format) read into llmkit: config, HF-named tensors, the model.

A GGUF file holds key/value metadata (architecture sizes, tokenizer, chat template) and a list of tensors,
each stored as one GGML type (F32, F16, BF16 or a block quantization such as Q4_1, Q8_0, Q4_K).

Notable choices:
- The metadata is translated into a Hugging Face config.json dict (`hf_config`) and then read by the one
  `ModelConfig.from_hf`, so a GGUF model and the same model's HF folder give the same ModelConfig.
- The header (metadata and tensor table) is parsed by the one GGUF reader, `llmkit.io.read_gguf`, which the
  tokenizer uses too. Tensors are renamed to HF names (token_embd -> model.embed_tokens, blk.N.attn_q ->
  ...q_proj, ...) and dequantised to float32 one at a time with `gguf.quants.dequantize` (numpy) from a
  memory map of the file, then handed to `build_model` as a generator: peak RAM is the final weights plus
  one dequantised tensor, and reading metadata (`llmkit inspect`) never touches the weights.
- llama.cpp's converter permutes the rows of the q and k projections of `llama`-architecture models (its
  rotary kernel pairs neighbouring dimensions, HF's `rotate_half` pairs dimension i with i + head_dim/2).
  `unpermute_qk` undoes it. qwen2 / qwen3 / qwen3moe files are written unpermuted (their rope is "neox").
- Llama-3 RoPE scaling is stored by llama.cpp as a `rope_freqs` tensor of per-frequency factors; we
  recognise the standard Llama-3 parameters from it (comparing with the factors that llmkit.model.rope's
  own llama3 scaling implies) and write them back as HF `rope_scaling`.
- MoE experts are stacked in GGUF (`ffn_gate_exps`: (n_expert, d_ff, d_model)); they are split into the
  per-expert HF names.
- Gemma 2 / Gemma 3 (`gemma2`, `gemma3`): llama.cpp's converter stores every RMSNorm weight as HF's weight + 1
  (Gemma's norm scales by 1 + weight; llama.cpp's by weight), so 1 is subtracted on load; q/k are not
  permuted. Four norms per block: attn_norm, post_attention_norm (on the attention output), ffn_norm
  (before the MLP: HF pre_feedforward_layernorm) and post_ffw_norm. What the file does not store is filled
  with llama.cpp's own constants (src/models/gemma2.cpp, gemma3.cpp, load_arch_hparams): gemma3 slides on 5
  layers of each 6 (layer i is global when i % 6 == 5) with RoPE base 10000 and no scaling there, only when
  the file has a sliding window; gemma2 alternates (even layers slide) with the global RoPE base, window
  4096, soft-caps 50 (attention) and 30 (logits); both scale queries by head_dim ** -0.5, except the 27B
  models (gemma2 46 layers, gemma3 62): (d_model / n_head) ** -0.5. What the file does store wins, read as
  llama.cpp reads it: `{arch}.rope.freq_base_swa` (the sliding layers' RoPE base) and
  `{arch}.attention.sliding_window_pattern`, one flag per layer (a bool array, as gguf-py writes a list) or
  an int period n (layer i slides when i % n < n - 1; 0: all) (llama_model_base::load_swa_pattern).
- GPT-2 (`gpt2`, llama.cpp's names: position_embd, attn_qkv, output_norm.bias, ...): the fused q|k|v
  weight and bias are split into llmkit's q/k/v projections (the layout of llmkit.checkpoint.hf's GPT-2
  transform), LayerNorm weights and biases map to input_layernorm / post_attention_layernorm / model.norm.
  llama.cpp fixes the rest: GELU with the tanh approximation, softmax scale 1/sqrt(head_dim).

Example:
    >>> f = GGUFFile("gemma-3-270m-q4_k_m.gguf")           # doctest: +SKIP
    >>> f.hf_config()["layer_types"][:6]                   # doctest: +SKIP
    ['sliding_attention', ..., 'full_attention']
    >>> config, model, f = load_gguf("gemma-3-270m-q4_k_m.gguf")  # doctest: +SKIP
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import Q4_K, dequantize

from llmkit.config import ModelConfig
from llmkit.errors import LlmkitError
from llmkit.io import read_gguf
from llmkit.model.layers import empty_weights
from llmkit.model.rope import rope_inv_freq

# GGUF general.architecture -> (HF model_type, q/k rows permuted by llama.cpp)
ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "llama": ("llama", True),  # also SmolLM2, Mistral-7B (converted as llama)
    "qwen2": ("qwen2", False),
    "qwen3": ("qwen3", False),
    "qwen3moe": ("qwen3_moe", False),
    "gemma2": ("gemma2", False),
    "gemma3": ("gemma3_text", False),
    "gpt2": ("gpt2", False),  # learned positions, LayerNorm with biases, fused attn_qkv
}
_GEMMA = ("gemma2", "gemma3")
# llama.cpp's LLM_TYPE_27B test (by n_layer): the one size whose queries scale by (d_model / n_head) ** -0.5
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}

# What gguf-py dequantises that llmkit accepts: the float types, the legacy block quants and the K-quants.
# (i-quants and ternary types also dequantise in gguf-py, but slowly and untested here: refused.)
SUPPORTED_TYPES = (
    "F32",
    "F16",
    "BF16",
    "Q8_0",
    "Q4_0",
    "Q4_1",
    "Q5_0",
    "Q5_1",
    "Q2_K",
    "Q3_K",
    "Q4_K",
    "Q5_K",
    "Q6_K",
)

# GGUF tensor name (without the block prefix) -> HF name suffix
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "position_embd.weight": "model.embed_positions.weight",  # GPT-2's learned positions
    "output_norm.weight": "model.norm.weight",
    "output_norm.bias": "model.norm.bias",  # GPT-2's final LayerNorm
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
# Gemma 2/3's sandwich norms: ffn_norm is the norm before the MLP, not the second of two pre-norms
_GEMMA_BLOCK_NAMES = {
    **_BLOCK_NAMES,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_EXPERT_NAMES = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}
_GLOBAL_INV = {v: k for k, v in _GLOBAL_NAMES.items()}
_BLOCK_INV = {v: k for k, v in _BLOCK_NAMES.items()}
_GEMMA_BLOCK_INV = {v: k for k, v in _GEMMA_BLOCK_NAMES.items()}
_EXPERT_INV = {v: k for k, v in _EXPERT_NAMES.items()}
_QKV = ("q_proj", "k_proj", "v_proj")  # GPT-2's attn_qkv: these row blocks, in this order
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_CONSUMED = {"rope_freqs.weight"}  # folded into the config (Llama-3 rope scaling)


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as stored in the file: its GGUF name, HF name(s), GGML type, numpy-order shape, bytes."""

    name: str
    hf_names: tuple[str, ...]  # several for stacked experts / fused q|k|v, empty when folded into the config
    ggml_type: str
    shape: tuple[int, ...]  # numpy order (rows first), i.e. the HF/PyTorch shape
    n_bytes: int
    fused: bool = False  # hf_names are consecutive row blocks (GPT-2's attn_qkv), not stacked experts


@dataclass(frozen=True)
class _Stored:
    """Where a tensor's data lies in the file and how it is encoded."""

    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order
    offset: int
    n_bytes: int


@dataclass
class GGUFBlocks:
    """One weight matrix still in its GGML blocks (rows of `raw` bytes, as read from the file), so the
    quantized modules can take it as it is: `int4(group_size)` for Q4_0 / Q4_1 / Q4_K (4-bit affine groups
    of 32, repacked exactly), `int8(group_size)` for Q8_0, `dequantize()` (float32) / `rows(a, b)` else."""

    qtype: GGMLQuantizationType
    raw: np.ndarray | None  # (rows, bytes per row) uint8; None: read rows from the file when asked
    shape: tuple[int, int]  # (rows, cols), PyTorch order
    read: Any = None  # (a, b) -> rows a..b of raw, for a tensor taken as stored (no row reordering)

    def _raw(self) -> np.ndarray:
        return self.raw if self.raw is not None else self.read(0, self.shape[0])

    def dequantize(self) -> torch.Tensor:
        w = dequantize(self._raw(), self.qtype).reshape(self.shape)
        return torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))

    def _blocks(self) -> np.ndarray:
        block, size = GGML_QUANT_SIZES[self.qtype]
        return np.asarray(self._raw()).reshape(self.shape[0], self.shape[1] // block, size)  # (N, blocks, B)

    def int4(self, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(nibbles (N, K) uint8 in 0..15, scale (N, K/32), value at nibble 0 (N, K/32)) float32, or None."""
        name = self.qtype.name
        if group_size != 32 or name not in ("Q4_0", "Q4_1", "Q4_K"):
            return None
        n, k = self.shape
        b = self._blocks()
        f16 = lambda a: np.ascontiguousarray(a).view(np.float16)[..., 0].astype(np.float32)  # noqa: E731
        if name == "Q4_K":  # 256 values: d, dmin, 12 bytes of 6-bit scales/mins, 128 bytes of nibbles
            d, dmin = f16(b[..., 0:2])[..., None], f16(b[..., 2:4])[..., None]  # (N, B, 1)
            sc, mn = Q4_K.get_scale_min(np.ascontiguousarray(b[..., 4:16]).reshape(-1, 12))
            scale = (d * sc.reshape(n, -1, 8)).reshape(n, -1)  # (N, K/32)
            low = (-dmin * mn.reshape(n, -1, 8)).reshape(n, -1)
            qs = b[..., 16:].reshape(n, -1, 4, 1, 32)  # chunks of 64 values: low nibbles, then high
        else:  # Q4_0: d, 16 bytes (w = d (q - 8)); Q4_1: d, m, 16 bytes (w = d q + m)
            off = 2 if name == "Q4_0" else 4
            scale = f16(b[..., 0:2])  # (N, K/32)
            low = -8 * scale if name == "Q4_0" else f16(b[..., 2:4])
            qs = b[..., off:].reshape(n, -1, 1, 16)  # values 0..15 in the low nibbles, 16..31 in the high
        q = np.concatenate([qs & 15, qs >> 4], axis=-2).reshape(n, k)
        return torch.from_numpy(q), torch.from_numpy(scale), torch.from_numpy(low)

    def int8(self, group_size: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Q8_0 as (values (N, K) int8, scales (N, K/32) float16), or None."""
        if group_size != 32 or self.qtype.name != "Q8_0":
            return None
        b = self._blocks()
        d = np.ascontiguousarray(b[..., 0:2]).view(np.float16)[..., 0]
        q = np.ascontiguousarray(b[..., 2:]).view(np.int8).reshape(self.shape)
        return torch.from_numpy(q), torch.from_numpy(np.ascontiguousarray(d))

    def rows(self, a: int, b: int) -> GGUFBlocks:
        """Rows a..b (the blocks of a row never straddle rows), read from the file alone if not in memory."""
        raw = self.raw[a:b] if self.raw is not None else self.read(a, b)
        return GGUFBlocks(self.qtype, raw, (b - a, self.shape[1]))

    def is_floating_point(self) -> bool:
        return False


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's `permute(w, n_head)` on q/k rows (weights (n_head*head_dim, d) or biases).

    llama.cpp: w.reshape(n_head, 2, head_dim // 2, ...).swapaxes(1, 2) — within each head, row 2j holds
    HF row j and row 2j+1 holds HF row j + head_dim/2. The inverse reads the rows back the other way.
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"{rows} rows do not split into {n_head} heads of even size")
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFFile:
    """A GGUF file opened for reading: `metadata` (dict), tensor table, config, tensors (memory-mapped)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise LlmkitError(f"{self.path}: no such GGUF file")
        index = read_gguf(self.path)
        self.metadata: dict[str, Any] = index.metadata
        size = self.path.stat().st_size
        self._tensors: dict[str, _Stored] = {}
        for t in index.tensors:
            self._tensors[t.name] = self._stored(t.name, t.ggml_type, t.dims, t.offset, size)
        if len(self._tensors) != len(index.tensors):
            raise LlmkitError(f"{self.path}: the tensor table names a tensor twice; the file is corrupt")
        self.arch = str(self.get("general.architecture", ""))
        if self.arch not in ARCHITECTURES:
            raise LlmkitError(
                f"{self.path}: unsupported GGUF architecture {self.arch!r}; llmkit reads "
                f"{', '.join(ARCHITECTURES)}"
            )
        self.model_type, self.permuted_qk = ARCHITECTURES[self.arch]
        self._block_names = _GEMMA_BLOCK_NAMES if self.arch in _GEMMA else _BLOCK_NAMES
        # Gemma: llama.cpp stores every RMSNorm weight as HF's weight + 1
        self.norm_shift = 1.0 if self.arch in _GEMMA else 0.0

    def _stored(self, name: str, ggml_type: int, dims: tuple[int, ...], offset: int, size: int) -> _Stored:
        try:
            qtype = GGMLQuantizationType(ggml_type)
        except ValueError:
            raise LlmkitError(
                f"{self.path}: tensor {name} has unknown GGML type {ggml_type}; convert the file with "
                "llama-quantize"
            ) from None
        block, type_size = GGML_QUANT_SIZES[qtype]
        if dims and dims[0] % block:
            raise LlmkitError(f"{self.path}: tensor {name} rows of {dims[0]} do not fill {qtype.name} blocks")
        n_bytes = math.prod(dims) // block * type_size
        if offset + n_bytes > size:
            raise LlmkitError(
                f"{self.path}: tensor {name} ends at byte {offset + n_bytes} but the file has {size} bytes "
                "(truncated download?); fetch the file again"
            )
        return _Stored(qtype, tuple(reversed(dims)), offset, n_bytes)

    def _read_rows(self, t: _Stored, a: int, b: int) -> np.ndarray:
        """Rows a..b of a 2-D tensor's bytes, (b - a, bytes per row)."""
        row = t.n_bytes // t.shape[0]
        return self._read(t, a * row, (b - a) * row).reshape(b - a, row)

    def _read(self, t: _Stored, start: int = 0, n: int | None = None) -> np.ndarray:
        """A tensor's bytes, read into memory of our own (not a memory map: mapped pages stay in the process's
        resident set after use, so a map would add the whole file to the loader's peak)."""
        n = t.n_bytes if n is None else n
        out = np.empty(n, dtype=np.uint8)
        with open(self.path, "rb") as fh:
            fh.seek(t.offset + start)
            if fh.readinto(memoryview(out)) != n:
                raise LlmkitError(f"{self.path}: short read at byte {t.offset}; the file changed while "
                                  "loading")
        return out

    # ------------------------------------------------------------------ metadata
    def get(self, key: str, default: Any = None) -> Any:
        """A metadata value (`{arch}.` in the key is replaced by the architecture)."""
        return self.metadata.get(key.replace("{arch}", getattr(self, "arch", "")), default)

    def _arch_int(self, key: str, default: Any = None) -> Any:
        v = self.get("{arch}." + key, default)
        if isinstance(v, list):  # per-layer values (hybrid models): llmkit needs one value
            if len(set(v)) != 1:
                raise LlmkitError(f"{self.path}: per-layer {self.arch}.{key} values are not supported")
            v = v[0]
        return v

    def has_tensor(self, name: str) -> bool:
        return name in self._tensors

    def hf_config(self) -> dict[str, Any]:
        """The metadata as a Hugging Face config.json dict for `model_type`."""
        emb = self._tensors.get("token_embd.weight")
        if emb is None:
            raise LlmkitError(f"{self.path}: missing tensor token_embd.weight")
        if self.arch == "gpt2":
            return self._gpt2_config(emb.shape[0])
        d_model = int(self._arch_int("embedding_length"))
        n_heads = int(self._arch_int("attention.head_count"))
        head_dim = int(self._arch_int("attention.key_length", d_model // n_heads))
        rot = self._arch_int("rope.dimension_count", head_dim)
        if int(rot) != head_dim:
            raise LlmkitError(f"{self.path}: partial rotary ({rot} of {head_dim} dims) is unsupported")
        tok_bos, tok_eos = self.get("tokenizer.ggml.bos_token_id"), self.get("tokenizer.ggml.eos_token_id")
        hf: dict[str, Any] = {
            "model_type": self.model_type,
            "vocab_size": emb.shape[0],  # (vocab, d_model)
            "hidden_size": d_model,
            "num_hidden_layers": int(self._arch_int("block_count")),
            "num_attention_heads": n_heads,
            "num_key_value_heads": int(self._arch_int("attention.head_count_kv", n_heads)),
            "head_dim": head_dim,
            "intermediate_size": int(self._arch_int("feed_forward_length", 0) or 0),
            "max_position_embeddings": int(self._arch_int("context_length", 2048)),
            "rope_theta": _f32(self._arch_int("rope.freq_base", 10000.0)),
            "rope_scaling": self._rope_scaling(head_dim),
            "rms_norm_eps": _f32(self._arch_int("attention.layer_norm_rms_epsilon", 1e-6)),
            "hidden_act": "silu",
            "attention_bias": self.has_tensor("blk.0.attn_q.bias"),
            "mlp_bias": self.has_tensor("blk.0.ffn_up.bias"),
            "tie_word_embeddings": not self.has_tensor("output.weight"),
            "bos_token_id": int(tok_bos) if tok_bos is not None else None,
            "eos_token_id": int(tok_eos) if tok_eos is not None else None,
            "torch_dtype": "float32",  # what we dequantise to
        }
        window = self._arch_int("attention.sliding_window")
        if window:
            hf["sliding_window"] = int(window)
            hf["use_sliding_window"] = True
        if self.arch in _GEMMA:
            self._gemma_config(hf)
        if self.model_type == "qwen3_moe":
            hf.update(
                num_experts=int(self._arch_int("expert_count")),
                num_experts_per_tok=int(self._arch_int("expert_used_count")),
                moe_intermediate_size=int(self._arch_int("expert_feed_forward_length")),
                norm_topk_prob=True,  # llama.cpp's qwen3moe graph always renormalises the top-k weights
                decoder_sparse_step=1,
                mlp_only_layers=[],
                router_aux_loss_coef=0.001,  # not stored in GGUF; Qwen3MoeConfig's default (training only)
            )
        return hf

    def _gpt2_config(self, vocab_size: int) -> dict[str, Any]:
        """HF GPT2Config keys. llama.cpp's gpt2 graph fixes what the file does not say: GELU with the tanh
        approximation (HF "gelu_new"), LayerNorm with biases, softmax scale 1/sqrt(head_dim); the learned
        position table has context_length rows."""
        d_model = int(self._arch_int("embedding_length"))
        tok_bos, tok_eos = self.get("tokenizer.ggml.bos_token_id"), self.get("tokenizer.ggml.eos_token_id")
        n_heads = int(self._arch_int("attention.head_count"))
        n_kv = int(self._arch_int("attention.head_count_kv", n_heads))
        if n_kv != n_heads:
            raise LlmkitError(f"{self.path}: gpt2 with {n_kv} kv heads for {n_heads} heads is unsupported")
        return {
            "model_type": "gpt2",
            "vocab_size": vocab_size,
            "n_embd": d_model,
            "n_layer": int(self._arch_int("block_count")),
            "n_head": n_heads,
            "n_inner": int(self._arch_int("feed_forward_length", 4 * d_model)),
            "n_positions": int(self._arch_int("context_length")),
            "layer_norm_epsilon": _f32(self._arch_int("attention.layer_norm_epsilon", 1e-5)),
            "activation_function": "gelu_new",  # llama.cpp's LLM_FFN_GELU: ggml_gelu, the tanh approximation
            "tie_word_embeddings": not self.has_tensor("output.weight"),
            "bos_token_id": _opt_int(tok_bos),
            "eos_token_id": _opt_int(tok_eos),
            "torch_dtype": "float32",
        }

    def _gemma_config(self, hf: dict[str, Any]) -> None:
        """Gemma 2/3 keys of HF's Gemma2Config / Gemma3TextConfig, with llama.cpp's defaults where the file
        has no value (see the module docstring)."""
        n_layers, head_dim = hf["num_hidden_layers"], hf["head_dim"]
        big = n_layers == _GEMMA_27B_LAYERS[self.arch]
        window = self._arch_int("attention.sliding_window")
        final_cap = self._arch_int("final_logit_softcapping")
        for k in ("hidden_act", "mlp_bias", "use_sliding_window"):
            hf.pop(k, None)
        hf.update(
            hidden_activation="gelu_pytorch_tanh",  # llama.cpp's Gemma graphs: GELU (tanh approximation)
            query_pre_attn_scalar=hf["hidden_size"] // hf["num_attention_heads"] if big else head_dim,
            pad_token_id=_opt_int(self.get("tokenizer.ggml.padding_token_id")),
        )
        local_base = self.get("{arch}.rope.freq_base_swa")
        if self.arch == "gemma2":
            sliding = self._sliding_layers(n_layers, 2)
            hf.update(
                sliding_window=int(window or 4096),
                attn_logit_softcapping=_f32(self._arch_int("attn_logit_softcapping", 50.0)),
                final_logit_softcapping=_f32(final_cap if final_cap is not None else 30.0),
            )
            # llama.cpp: the sliding layers' base defaults to the global one (and share its scaling)
            if local_base is not None and _f32(local_base) != hf["rope_theta"]:
                if hf["rope_scaling"]:
                    raise LlmkitError(
                        f"{self.path}: RoPE scaling with a separate base for the sliding layers "
                        f"({self.arch}.rope.freq_base_swa) is unsupported"
                    )
                hf["rope_local_base_freq"] = _f32(local_base)  # no Gemma2Config key: config() applies it
        else:
            # no window in the file: every layer global (llama.cpp: SWA off, pattern and local base unread)
            sliding = self._sliding_layers(n_layers, 6) if window else [False] * n_layers
            hf.update(
                sliding_window=int(window) if window else None,
                # llama.cpp: rope_freq_base_train_swa (default 10000), scale 1 (no scaling) on sliding layers
                rope_local_base_freq=_f32(local_base if local_base is not None else 10000.0),
                attn_logit_softcapping=None,
                final_logit_softcapping=_f32(final_cap) if final_cap else None,
                use_bidirectional_attention=False,
            )
        hf["layer_types"] = ["sliding_attention" if s else "full_attention" for s in sliding]

    def _sliding_layers(self, n_layers: int, period: int) -> list[bool]:
        """Which layers slide: `{arch}.attention.sliding_window_pattern` as llama.cpp reads it
        (llama_model_base::load_swa_pattern): an array of one flag per layer, or an int period n (layer i
        slides when i % n < n - 1; n = 0: every layer), else the architecture's period."""
        key = f"{self.arch}.attention.sliding_window_pattern"
        value = self.get(key, period)
        if isinstance(value, list):
            if len(value) != n_layers:
                raise LlmkitError(
                    f"{self.path}: {key} lists {len(value)} layers but the model has {n_layers}; "
                    "the file is inconsistent"
                )
            return [bool(v) for v in value]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise LlmkitError(f"{self.path}: {key} = {value!r}; expected a period or one flag per layer")
        return [value == 0 or i % value < value - 1 for i in range(n_layers)]

    def config(self) -> ModelConfig:
        hf = self.hf_config()
        config = ModelConfig.from_hf(hf, source=str(self.path))
        if self.arch == "gemma2" and hf.get("rope_local_base_freq") is not None:  # HF Gemma 2 has no such key
            config = config.replace(rope_local_theta=hf["rope_local_base_freq"])
        return config

    def _rope_scaling(self, head_dim: int) -> dict[str, Any] | None:
        kind = self.get("{arch}.rope.scaling.type")
        factor = self.get("{arch}.rope.scaling.factor")
        if kind in ("linear", "yarn") and factor and float(factor) != 1.0:
            out: dict[str, Any] = {"rope_type": kind, "factor": _f32(factor)}
            orig = self.get("{arch}.rope.scaling.original_context_length")
            if orig:
                out["original_max_position_embeddings"] = int(orig)
            return out
        if kind not in (None, "none", "linear", "yarn"):
            raise LlmkitError(f"{self.path}: unsupported rope scaling type {kind!r}")
        if "rope_freqs.weight" in self._tensors:
            return self._llama3_scaling(head_dim)
        return None

    def _llama3_scaling(self, head_dim: int) -> dict[str, Any]:
        """Recover HF's llama3 rope_scaling from llama.cpp's per-frequency factors (rope_freqs): llama.cpp
        divides each frequency by its factor, so the factors are inv_freq / (llama3-scaled inv_freq)."""
        got = torch.from_numpy(self.dequantize("rope_freqs.weight"))  # (head_dim/2,)
        base = float(self._arch_int("rope.freq_base", 10000.0))
        factor = _f32(float(got.max()))
        plain = rope_inv_freq(head_dim, base)
        for low, high, orig in ((1.0, 4.0, 8192), (1.0, 4.0, 4096), (1.0, 4.0, 2048)):
            scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                       "high_freq_factor": high, "original_max_position_embeddings": orig}
            if torch.allclose(got, plain / rope_inv_freq(head_dim, base, scaling), rtol=1e-4, atol=1e-4):
                return scaling
        raise LlmkitError(f"{self.path}: rope_freqs does not match Llama-3 rope scaling; not supported")

    # ------------------------------------------------------------------ tensors
    def tensor_infos(self) -> list[TensorInfo]:
        """Every tensor in file order with its HF name(s); raises on names llmkit does not know."""
        n_experts = int(self._arch_int("expert_count", 0) or 0)
        return [
            TensorInfo(name, self._hf_names(name, n_experts), t.qtype.name, t.shape, t.n_bytes,
                       fused=".attn_qkv." in name)
            for name, t in self._tensors.items()
        ]

    def _hf_names(self, name: str, n_experts: int) -> tuple[str, ...]:
        if name in _GLOBAL_NAMES:
            return (_GLOBAL_NAMES[name],)
        if name in _CONSUMED:
            return ()
        m = _BLOCK_RE.fullmatch(name)
        if m:
            layer, kind, suffix = m.groups()
            prefix = f"model.layers.{layer}."
            if kind in self._block_names:
                return (f"{prefix}{self._block_names[kind]}.{suffix}",)
            if kind == "attn_qkv" and self.arch == "gpt2":
                return tuple(f"{prefix}self_attn.{proj}.{suffix}" for proj in _QKV)
            if kind in _EXPERT_NAMES:
                proj = _EXPERT_NAMES[kind]
                return tuple(f"{prefix}mlp.experts.{e}.{proj}.{suffix}" for e in range(n_experts))
        raise LlmkitError(f"{self.path}: tensor {name} has no llmkit equivalent (architecture {self.arch})")

    def weight_types(self) -> dict[str, str]:
        """HF weight name -> GGML type name (what `quantize="auto"` maps to llmkit's int4 / int8)."""
        return {n: info.ggml_type for info in self.tensor_infos() for n in info.hf_names}

    def dequantize(self, name: str) -> np.ndarray:
        """One tensor as float32 numpy in PyTorch order (rows first); raises on unsupported GGML types."""
        t = self._tensors[name]
        qtype, shape = t.qtype, t.shape
        if qtype.name not in SUPPORTED_TYPES:
            raise LlmkitError(_type_error(self.path, name, qtype.name))
        raw = self._read(t)  # (n_bytes,) uint8
        try:
            w = dequantize(raw.reshape(*shape[:-1], -1), qtype).reshape(shape)
        except Exception as e:
            raise LlmkitError(f"{self.path}: tensor {name} ({qtype.name}, {shape}) is corrupt: {e}") from e
        w = np.asarray(w, dtype=np.float32)
        return w if w.flags.writeable else w.copy()

    def check(self, config: ModelConfig) -> None:
        """Names and shapes of the tensor table against `config`, before any data is read.

        Errors use the GGUF names (what `gguf-dump` shows); `build_model` re-checks in HF names.
        """
        from llmkit.model import Transformer

        with empty_weights():
            expected = {n: tuple(p.shape) for n, p in Transformer(config).named_parameters()}
        provided = set()
        for info in self.tensor_infos():
            if info.ggml_type not in SUPPORTED_TYPES:
                raise LlmkitError(_type_error(self.path, info.name, info.ggml_type))
            if not info.hf_names:
                continue
            for hf_name in info.hf_names:
                if hf_name not in expected:
                    raise LlmkitError(
                        f"{self.path}: unexpected tensor {info.name} for a {self.arch} model with "
                        f"{config.n_layers} layers (metadata and tensors disagree)"
                    )
            if info.fused:  # q|k|v rows: (q + k + v rows, ...) against the three parts
                parts = [expected[n] for n in info.hf_names]
                got, want = info.shape, (sum(s[0] for s in parts), *parts[0][1:])
            elif len(info.hf_names) > 1:  # stacked experts: (n_expert, rows, cols)
                got, want = info.shape[1:], expected[info.hf_names[0]]
            else:
                got, want = info.shape, expected[info.hf_names[0]]
            if got != want:
                raise LlmkitError(
                    f"{self.path}: tensor {info.name} has shape {got}, the metadata implies {want}"
                )
            provided.update(info.hf_names)
        missing = list(dict.fromkeys(gguf_name(n, self.arch) for n in expected if n not in provided))
        if missing:
            more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
            raise LlmkitError(f"{self.path}: missing tensor {', '.join(missing[:3])}{more}; file incomplete")

    def iter_tensors(self, origin: dict[str, str] | None = None, blocks: bool = False
                     ) -> Iterator[tuple[str, torch.Tensor | GGUFBlocks]]:
        """(HF name, float32 tensor) pairs, one dequantised tensor at a time, q/k rows unpermuted, Gemma's
        norm weights shifted back by -1.

        `blocks=True`: block-quantized matrices come as GGUFBlocks (their bytes, rows reordered and split like
        the floats) for the quantized modules to take without a float32 copy. `origin`, when given, is filled
        with HF name -> "file (tensor GGUF-name)" for error messages.
        """
        if self.permuted_qk:
            cfg = self.hf_config()
            n_heads, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        for info in self.tensor_infos():
            if not info.hf_names:
                continue
            t = self._tensors[info.name]
            raw = blocks and len(t.shape) >= 2 and t.qtype.name not in ("F32", "F16", "BF16")
            permuted = self.permuted_qk and re.fullmatch(r"blk\.\d+\.attn_[qk]\.(weight|bias)", info.name)
            if raw and len(info.hf_names) == 1 and len(t.shape) == 2 and not permuted:
                if t.qtype.name not in SUPPORTED_TYPES:
                    raise LlmkitError(_type_error(self.path, info.name, t.qtype.name))
                if origin is not None:
                    origin[info.hf_names[0]] = f"{self.path} (tensor {info.name!r})"
                # as stored: the modules read it a few rows at a time (an embedding table or a head is the
                # biggest tensor of a model, never in memory whole)
                yield info.hf_names[0], GGUFBlocks(t.qtype, None, t.shape, partial(self._read_rows, t))
                continue
            if raw:
                if t.qtype.name not in SUPPORTED_TYPES:
                    raise LlmkitError(_type_error(self.path, info.name, t.qtype.name))
                w = self._read(t).reshape(*t.shape[:-1], -1)  # rows of bytes
            else:
                w = self.dequantize(info.name)
            if self.permuted_qk and re.fullmatch(r"blk\.\d+\.attn_[qk]\.(weight|bias)", info.name):
                heads = n_heads if ".attn_q." in info.name else n_kv
                try:
                    w = unpermute_qk(w, heads)
                except ValueError as e:
                    raise LlmkitError(f"{self.path}: tensor {info.name} shape {info.shape}: {e}") from e
            if self.norm_shift and info.name.endswith("norm.weight"):
                w -= self.norm_shift  # (d,) float32, our own copy
            if origin is not None:
                origin.update(dict.fromkeys(info.hf_names, f"{self.path} (tensor {info.name!r})"))

            def out(a: np.ndarray) -> torch.Tensor | GGUFBlocks:
                if raw:
                    return GGUFBlocks(t.qtype, a, (a.shape[0], t.shape[-1]))
                return torch.from_numpy(np.ascontiguousarray(a))

            if len(info.hf_names) == 1:
                yield info.hf_names[0], out(w)
                continue
            if info.fused:  # GPT-2's attn_qkv: (3 d_model, d_model) or (3 d_model,) -> q, k, v rows
                for hf_name, part in zip(info.hf_names, np.split(w, 3, axis=0)):
                    yield hf_name, out(part)
                continue
            if w.shape[0] != len(info.hf_names):
                raise LlmkitError(
                    f"{self.path}: tensor {info.name} has shape {info.shape}, "
                    f"expected {len(info.hf_names)} experts"
                )
            for e, hf_name in enumerate(info.hf_names):  # stacked experts -> one tensor per expert
                yield hf_name, out(w[e])


def _f32(v: Any) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(v)))


def _opt_int(v: Any) -> int | None:
    return None if v is None else int(v)


def _type_error(path: Path, name: str, ggml_type: str) -> str:
    return (
        f"{path}: tensor {name} has GGML type {ggml_type}, which llmkit does not dequantise "
        f"(supported: {', '.join(SUPPORTED_TYPES)}); convert the file with llama-quantize"
    )


def gguf_name(hf_name: str, arch: str = "llama") -> str:
    """The GGUF name of an HF parameter name in a file of `arch` (the stacked tensor for per-expert names,
    GPT-2's fused attn_qkv for its q/k/v projections)."""
    if hf_name in _GLOBAL_INV:
        return _GLOBAL_INV[hf_name]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(?:mlp\.experts\.\d+\.)?(.+)\.(weight|bias)", hf_name)
    if m:
        layer, kind, suffix = m.groups()
        if arch == "gpt2" and kind.removeprefix("self_attn.") in _QKV:
            return f"blk.{layer}.attn_qkv.{suffix}"
        block_inv = _GEMMA_BLOCK_INV if arch in _GEMMA else _BLOCK_INV
        gname = _EXPERT_INV.get(kind) if ".experts." in hf_name else block_inv.get(kind)
        if gname:
            return f"blk.{layer}.{gname}.{suffix}"
    return hf_name


def load_gguf(
    path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
    quantize: str | None = None, before: Any = None,
) -> tuple[ModelConfig, torch.nn.Module, GGUFFile]:
    """Read a GGUF file into a Transformer, streamed tensor by tensor. Returns (config, model, file).

    quantize None: every weight dequantised to `dtype`. "int4" / "int8": llmkit's quantized modules, filled
    from the blocks (Q4_0 / Q4_1 / Q4_K repacked into int4, Q8_0 copied into the int8 embedding; other types
    converted one tensor at a time). "auto": each matrix at its own file's precision class (see
    llmkit.quant.swap_quantized). `before(config, precision)` runs before any weight is read."""
    from llmkit.checkpoint.hf import build_model

    f = GGUFFile(path)
    config = f.config()
    f.check(config)
    origin: dict[str, str] = {}
    record = None
    if quantize:
        from llmkit.quant import auto_precision

        types = f.weight_types()
        if quantize != "auto" or auto_precision(types):
            record = {"mode": quantize, "group_size": 32, "types": types}
    if before is not None:  # e.g. the memory check, once the config and precision are known
        before(config, (auto_precision(types) if quantize == "auto" else quantize) if record else dtype)
    from llmkit.checkpoint.cache import cached_load

    def build() -> torch.nn.Module:
        tensors = f.iter_tensors(origin, blocks=record is not None)
        return build_model(config, tensors, device=device, dtype=dtype, source=str(f.path), files=origin,
                           quantize=record)

    key = {**record, "dtype": str(dtype)} if record else None
    model = cached_load(f.path, config, key, torch.device(device or "cpu"), build)
    return config, model, f

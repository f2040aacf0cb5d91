"""Tiny GGUF files written the way llama.cpp's convert_hf_to_gguf.py writes them (for the GGUF tests).

`tiny_hf_model(family)` builds a small random transformers model and returns it with its tensors as read
back from the saved safetensors file (per-expert keys, as on disk). `write_gguf` writes those tensors under
llama.cpp names with llama.cpp's q/k row permutation for the `llama` architecture, quantised to the
requested GGML type, and returns the weights as they read back (dequantised): the dense reference.
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
        if q == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, data)
            back = data
        else:
            raw = gguf.quants.quantize(data, q)
            w.add_tensor(name, raw, raw_dtype=q)
            back = gguf.quants.dequantize(raw, q)
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

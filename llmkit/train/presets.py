"""Model presets for `llmkit pretrain --preset NAME`: ModelConfig fields (the vocabulary comes from the data).

GPT-2 style = learned positions, LayerNorm, GELU MLP with biases, tied embeddings; Llama style = RoPE,
RMSNorm, SwiGLU, no biases. Sizes run from `tiny` (CPU, minutes) to `gpt2-small` (124M, GPU), plus
a small mixture-of-experts. Any field can still be overridden on the command line.
"""

from __future__ import annotations

from typing import Any

from llmkit.errors import LlmkitError

GPT2 = dict(
    model_type="gpt2",
    pos_encoding="learned",
    norm="layernorm",
    mlp="gelu",
    activation="gelu_tanh",
    attn_qkv_bias=True,
    attn_out_bias=True,
    mlp_bias=True,
    tie_embeddings=True,
)
LLAMA = dict(
    model_type="llama",
    pos_encoding="rope",
    norm="rmsnorm",
    norm_eps=1e-5,
    mlp="swiglu",
    activation="silu",
    attn_qkv_bias=False,
    attn_out_bias=False,
    mlp_bias=False,
    tie_embeddings=True,
)

PRESETS: dict[str, dict[str, Any]] = {
    # ~0.1M non-embedding params: tests and smoke runs
    "tiny": {**LLAMA, "n_layers": 2, "d_model": 64, "n_heads": 4, "d_ff": 192, "max_seq_len": 256},
    "tiny-gpt2": {**GPT2, "n_layers": 2, "d_model": 64, "n_heads": 4, "d_ff": 256, "max_seq_len": 256},
    # nanoGPT's Shakespeare-char CPU recipe size
    "mini": {**LLAMA, "n_layers": 4, "d_model": 128, "n_heads": 4, "d_ff": 384, "max_seq_len": 256},
    "mini-gpt2": {**GPT2, "n_layers": 4, "d_model": 128, "n_heads": 4, "d_ff": 512, "max_seq_len": 256},
    # ~4M params: a CPU model that reads like its corpus after ~30 minutes (the French recipe)
    "compact": {**LLAMA, "n_layers": 4, "d_model": 256, "n_heads": 8, "d_ff": 704, "max_seq_len": 512},
    # ~10M params: the bench config (6 x 384), fine on a CPU in tens of minutes
    "small": {**LLAMA, "n_layers": 6, "d_model": 384, "n_heads": 6, "d_ff": 1024, "max_seq_len": 512},
    "small-gpt2": {**GPT2, "n_layers": 6, "d_model": 384, "n_heads": 6, "d_ff": 1536, "max_seq_len": 512},
    # GPU sizes
    "gpt2-small": {**GPT2, "n_layers": 12, "d_model": 768, "n_heads": 12, "d_ff": 3072, "max_seq_len": 1024},
    "llama-small": {
        **LLAMA,
        "n_layers": 12,
        "d_model": 768,
        "n_heads": 12,
        "n_kv_heads": 4,
        "d_ff": 2048,
        "max_seq_len": 1024,
    },
    # mixture of experts: 4 experts, top-2, with the load-balancing loss
    "moe-tiny": {
        **LLAMA,
        "model_type": "mixtral",
        "tie_embeddings": False,
        "n_layers": 2,
        "d_model": 64,
        "n_heads": 4,
        "d_ff": 128,
        "max_seq_len": 256,
        "n_experts": 4,
        "n_experts_per_tok": 2,
        "router_aux_loss_coef": 0.01,
    },
}


def preset(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise LlmkitError(f"--preset {name}: unknown preset; choose one of {', '.join(PRESETS)}")
    return dict(PRESETS[name])

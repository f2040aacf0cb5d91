"""ModelConfig: one set of fields that describes every decoder-only family llmkit runs.

Family differences are fields (positions, norm, MLP kind, biases, QK-norm, GQA, MoE...), never class
names. `from_hf` reads a Hugging Face config.json dict; `to_hf` writes one back for export. The
`model_type` field only says which HF family to write on export; the model never branches on it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from llmkit.errors import LlmkitError

# HF model_type -> the family defaults that its config.json leaves implicit.
_HF_FAMILIES = {"gpt2", "llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe", "qwen2_moe"}
_QWEN = ("qwen2", "qwen3", "qwen3_moe", "qwen2_moe")
_MOE = ("mixtral", "qwen3_moe", "qwen2_moe")


@dataclass
class ModelConfig:
    # sizes
    vocab_size: int = 50257
    d_model: int = 768  # HF hidden_size / n_embd
    n_layers: int = 12
    n_heads: int = 12
    n_kv_heads: int | None = None  # grouped-query attention; None = n_heads
    head_dim: int | None = None  # None = d_model // n_heads (Qwen3 sets it explicitly)
    d_ff: int = 3072  # MLP hidden size (dense layers)
    max_seq_len: int = 1024  # context length (max_position_embeddings / n_positions)

    # positions
    pos_encoding: str = "learned"  # "learned" (GPT-2) | "rope"
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # e.g. Llama-3: {"rope_type": "llama3", "factor": 8, ...}

    # blocks
    norm: str = "layernorm"  # "layernorm" | "rmsnorm"
    norm_eps: float = 1e-5
    mlp: str = "gelu"  # "gelu" (fc -> act -> proj) | "swiglu" (gate, up, down)
    activation: str = "gelu_tanh"  # "gelu_tanh" | "gelu" | "silu" | "relu"
    attn_qkv_bias: bool = False  # Qwen2 (and GPT-2) biases on q/k/v
    attn_out_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm on each head's q and k
    sliding_window: int | None = None  # Mistral: each token sees at most this many previous tokens
    sliding_layers: list[int] | None = None  # layers that use sliding_window; None = all (Qwen2: some)
    tie_embeddings: bool = True
    dropout: float = 0.0

    # mixture of experts (n_experts == 0: dense MLP everywhere)
    n_experts: int = 0
    n_experts_per_tok: int = 2
    moe_d_ff: int | None = None  # expert hidden size; None = d_ff
    moe_norm_topk: bool = (
        True  # renormalise the top-k router probabilities (Mixtral: yes; Qwen3-MoE: norm_topk_prob)
    )
    moe_shared_expert_d_ff: int = 0  # optional always-on shared expert (0 = none)
    moe_layer_step: int = 1  # every k-th layer is MoE (Qwen3-MoE decoder_sparse_step)
    moe_dense_layers: list[int] = field(default_factory=list)  # layers that stay dense (mlp_only_layers)
    router_aux_loss_coef: float = 0.0  # load-balancing loss weight for training

    # bookkeeping for export and generation
    model_type: str = "llama"  # which HF family `to_hf` writes
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    dtype: str = "float32"  # dtype the weights were saved in (torch_dtype)

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            self.head_dim = self.d_model // self.n_heads
        if self.moe_d_ff is None:
            self.moe_d_ff = self.d_ff
        if self.n_heads % self.n_kv_heads:
            raise LlmkitError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")

    def is_moe_layer(self, i: int) -> bool:
        return self.n_experts > 0 and i not in self.moe_dense_layers and (i + 1) % self.moe_layer_step == 0

    def is_sliding_layer(self, i: int) -> bool:
        return self.sliding_window is not None and (self.sliding_layers is None or i in self.sliding_layers)

    def replace(self, **kw: Any) -> ModelConfig:
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise LlmkitError(f"unknown ModelConfig fields: {', '.join(sorted(unknown))}")
        return cls(**d)

    # ------------------------------------------------------------------ Hugging Face config.json
    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
        mt = hf.get("model_type")
        if mt not in _HF_FAMILIES:
            raise LlmkitError(
                f"{source}: unsupported model_type {mt!r}; llmkit loads {', '.join(sorted(_HF_FAMILIES))}"
            )
        if mt == "gpt2":
            if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
                raise LlmkitError(
                    f"{source}: GPT-2 attention variants (scale_attn_by_inverse_layer_idx, "
                    "reorder_and_upcast_attn) are not supported"
                )
            return cls(
                model_type=mt,
                vocab_size=hf["vocab_size"],
                d_model=hf["n_embd"],
                n_layers=hf["n_layer"],
                n_heads=hf["n_head"],
                d_ff=hf.get("n_inner") or 4 * hf["n_embd"],
                max_seq_len=hf["n_positions"],
                pos_encoding="learned",
                norm="layernorm",
                norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                mlp="gelu",
                activation=_hf_act(hf.get("activation_function", "gelu_new")),
                attn_qkv_bias=True,
                attn_out_bias=True,
                mlp_bias=True,
                tie_embeddings=hf.get("tie_word_embeddings", True),
                bos_token_id=hf.get("bos_token_id"),
                eos_token_id=hf.get("eos_token_id"),
                dtype=_hf_dtype(hf),
            )
        n_heads = hf["num_attention_heads"]
        moe = mt in _MOE
        sliding = hf.get("sliding_window")
        sliding_layers = None
        if mt in _QWEN:  # Qwen: sliding only on some layers, if enabled at all
            if not hf.get("use_sliding_window", False):
                sliding = None
            if sliding is not None:
                n = hf["num_hidden_layers"]
                types = hf.get("layer_types") or [
                    "sliding_attention" if i >= hf.get("max_window_layers", 28) else "full_attention"
                    for i in range(n)
                ]
                sliding_layers = [i for i, t in enumerate(types) if t == "sliding_attention"]
                if not sliding_layers:
                    sliding = sliding_layers = None
                elif len(sliding_layers) == n:
                    sliding_layers = None
        rope_scaling = hf.get("rope_scaling")
        rope_theta = hf.get("rope_theta")
        rp = hf.get("rope_parameters")  # transformers >= 5 nests rope settings here
        if isinstance(rp, dict):
            rope_theta = rp.get("rope_theta", rope_theta)
            if rp.get("rope_type", "default") != "default":
                rope_scaling = {k: v for k, v in rp.items() if k != "rope_theta"}
        if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) in (None, "default"):
            rope_scaling = None
        if (rope_scaling or {}).get("partial_rotary_factor", 1.0) != 1.0:
            raise LlmkitError(
                f"{source}: partial rotary embeddings (partial_rotary_factor) are not supported"
            )
        qwen_moe = mt in ("qwen3_moe", "qwen2_moe")
        return cls(
            model_type=mt,
            vocab_size=hf["vocab_size"],
            d_model=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
            d_ff=hf.get("intermediate_size", 4 * hf["hidden_size"]),
            max_seq_len=hf.get("max_position_embeddings", 2048),
            pos_encoding="rope",
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            rope_scaling=rope_scaling,
            norm="rmsnorm",
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            mlp="swiglu",
            activation=_hf_act(hf.get("hidden_act", "silu")),
            attn_qkv_bias=bool(hf.get("qkv_bias", True))
            if mt in ("qwen2", "qwen2_moe")
            else bool(hf.get("attention_bias", False)),
            attn_out_bias=bool(hf.get("attention_bias", False)) and mt not in ("qwen2", "qwen2_moe"),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            qk_norm=mt in ("qwen3", "qwen3_moe"),
            sliding_window=sliding,
            sliding_layers=sliding_layers,
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            n_experts=(hf.get("num_local_experts") or hf.get("num_experts") or 0) if moe else 0,
            n_experts_per_tok=hf.get("num_experts_per_tok", 2),
            moe_d_ff=hf.get("moe_intermediate_size") or hf.get("intermediate_size"),
            moe_norm_topk=bool(hf.get("norm_topk_prob", False)) if qwen_moe else True,
            moe_shared_expert_d_ff=int(hf.get("shared_expert_intermediate_size") or 0)
            if mt == "qwen2_moe"
            else 0,
            moe_layer_step=hf.get("decoder_sparse_step", 1) if qwen_moe else 1,
            moe_dense_layers=list(hf.get("mlp_only_layers", []) or []) if qwen_moe else [],
            router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.0) or 0.0),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            dtype=_hf_dtype(hf),
        )

    def to_hf(self) -> dict[str, Any]:
        """config.json for the family in `model_type` (transformers loads it)."""
        mt = self.model_type
        self._check_exportable()
        common = {
            "model_type": mt,
            "vocab_size": self.vocab_size,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "tie_word_embeddings": self.tie_embeddings,
            "torch_dtype": self.dtype,
        }
        if mt == "gpt2":
            return {
                "architectures": ["GPT2LMHeadModel"],
                **common,
                "n_embd": self.d_model,
                "n_layer": self.n_layers,
                "n_head": self.n_heads,
                "n_inner": self.d_ff,
                "n_positions": self.max_seq_len,
                "n_ctx": self.max_seq_len,
                "layer_norm_epsilon": self.norm_eps,
                "activation_function": _ACT_TO_HF_GPT2[self.activation],
                "resid_pdrop": self.dropout,
                "embd_pdrop": self.dropout,
                "attn_pdrop": self.dropout,
            }
        arch = {
            "llama": "LlamaForCausalLM",
            "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM",
            "mixtral": "MixtralForCausalLM",
            "qwen3_moe": "Qwen3MoeForCausalLM",
            "qwen2_moe": "Qwen2MoeForCausalLM",
        }[mt]
        out: dict[str, Any] = {
            "architectures": [arch],
            **common,
            "hidden_size": self.d_model,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.d_ff,
            "max_position_embeddings": self.max_seq_len,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "rope_parameters": {
                "rope_type": "default",
                **(self.rope_scaling or {}),
                "rope_theta": self.rope_theta,
            },
            "rms_norm_eps": self.norm_eps,
            "hidden_act": _ACT_TO_HF[self.activation],
            "attention_dropout": self.dropout,
        }
        if mt in ("llama", "mistral", "mixtral", "qwen3", "qwen3_moe"):
            out["attention_bias"] = self.attn_qkv_bias
        if mt == "llama":
            out["mlp_bias"] = self.mlp_bias
        if mt in ("qwen2", "qwen2_moe"):
            out["qkv_bias"] = self.attn_qkv_bias
        if mt != "llama":
            out["sliding_window"] = self.sliding_window
        if mt in ("mistral", "mixtral") and self.sliding_layers is not None:
            raise LlmkitError(f"model_type {mt!r} cannot express sliding attention on only some layers")
        if mt in _QWEN:
            sliding = [self.is_sliding_layer(i) for i in range(self.n_layers)]
            out["use_sliding_window"] = self.sliding_window is not None
            out["max_window_layers"] = sliding.index(True) if any(sliding) else self.n_layers
            out["layer_types"] = ["sliding_attention" if s else "full_attention" for s in sliding]
        if mt == "mixtral":
            out["num_local_experts"] = self.n_experts
            out["num_experts_per_tok"] = self.n_experts_per_tok
            out["router_aux_loss_coef"] = self.router_aux_loss_coef
        if mt in ("qwen3_moe", "qwen2_moe"):
            out["num_experts"] = self.n_experts
            out["num_experts_per_tok"] = self.n_experts_per_tok
            out["moe_intermediate_size"] = self.moe_d_ff
            out["norm_topk_prob"] = self.moe_norm_topk
            out["decoder_sparse_step"] = self.moe_layer_step
            out["mlp_only_layers"] = list(self.moe_dense_layers)
            out["router_aux_loss_coef"] = self.router_aux_loss_coef
        if mt == "qwen2_moe":
            out["shared_expert_intermediate_size"] = self.moe_shared_expert_d_ff
        return out

    def _check_exportable(self) -> None:
        """Refuse to write a config.json whose family cannot express this model (HF would silently
        build a different network)."""
        mt = self.model_type
        if mt not in _HF_FAMILIES:
            raise LlmkitError(
                f"cannot export model_type {mt!r}; choose one of {', '.join(sorted(_HF_FAMILIES))}"
            )
        gpt2 = mt == "gpt2"
        want = {
            "pos_encoding": "learned" if gpt2 else "rope",
            "norm": "layernorm" if gpt2 else "rmsnorm",
            "mlp": "gelu" if gpt2 else "swiglu",
            "qk_norm": mt in ("qwen3", "qwen3_moe"),
            "moe (n_experts > 0)": mt in _MOE,
            "shared expert": mt == "qwen2_moe",
        }
        have = {
            "pos_encoding": self.pos_encoding,
            "norm": self.norm,
            "mlp": self.mlp,
            "qk_norm": self.qk_norm,
            "moe (n_experts > 0)": self.n_experts > 0,
            "shared expert": self.moe_shared_expert_d_ff > 0,
        }
        if gpt2:
            want["biases (qkv, out, mlp)"] = (True, True, True)
        elif mt in ("qwen2", "qwen2_moe"):
            want["out bias"] = False
        else:
            want["qkv bias == out bias"] = True
        if mt != "llama" and not gpt2:
            want["mlp_bias"] = False
        have["biases (qkv, out, mlp)"] = (self.attn_qkv_bias, self.attn_out_bias, self.mlp_bias)
        have["out bias"] = self.attn_out_bias
        have["qkv bias == out bias"] = self.attn_qkv_bias == self.attn_out_bias
        have["mlp_bias"] = self.mlp_bias
        for key, value in want.items():
            if have[key] != value:
                raise LlmkitError(
                    f"cannot export as {mt!r}: that family needs {key} = {value}, this model has {have[key]}"
                )


_HF_ACTS = {
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu": "gelu",
    "silu": "silu",
    "swish": "silu",
    "relu": "relu",
}
_ACT_TO_HF = {"gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu", "silu": "silu", "relu": "relu"}
_ACT_TO_HF_GPT2 = {"gelu_tanh": "gelu_new", "gelu": "gelu", "silu": "silu", "relu": "relu"}


def _hf_act(name: str) -> str:
    if name not in _HF_ACTS:
        raise LlmkitError(f"config.json: unsupported activation {name!r}")
    return _HF_ACTS[name]


def _hf_dtype(hf: dict[str, Any]) -> str:
    d = hf.get("torch_dtype") or hf.get("dtype") or "float32"
    return str(d).replace("torch.", "")

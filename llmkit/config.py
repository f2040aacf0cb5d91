"""ModelConfig: one set of fields that describes every decoder-only family llmkit runs.

Family differences are fields (positions, norm, MLP kind, biases, QK-norm, GQA, MoE...), never class
names. `from_hf` reads a Hugging Face config.json dict; `to_hf` writes one back for export. The
`model_type` field only says which HF family to write on export; the model never branches on it.

    cfg = ModelConfig.from_hf(json.load(open("gemma-3-270m/config.json")))
    cfg.rope_local_theta, cfg.sliding_layers[:5], cfg.attn_scale  # 10000.0, [0, 1, 2, 3, 4], 0.0625

Gemma 2 / Gemma 3 (text) are seven fields on top of Llama's:
- `norm_weight_offset` (1.0): every RMSNorm (QK-norm included) scales by (offset + weight), computed in
  float32 then cast, as HF Gemma; the weights are kept as HF files store them (~0 for a unit scale).
- `sandwich_norm`: four norms per block, HF Gemma names: input_layernorm (before attention),
  post_attention_layernorm (on the attention output, before the residual add), pre_feedforward_layernorm
  (before the MLP), post_feedforward_layernorm (on the MLP output). Without it post_attention_layernorm is
  the Llama pre-MLP norm.
- `scale_embeddings`: embeddings x sqrt(d_model), the factor rounded to the embeddings' dtype (as HF).
- `attn_scale`: the softmax scale (Gemma: query_pre_attn_scalar ** -0.5); None = head_dim ** -0.5.
- `attn_logit_softcap` (Gemma 2: 50): scores -> cap * tanh(scores / cap) before the mask.
- `final_logit_softcap` (Gemma 2: 30): logits -> cap * tanh(logits / cap).
- `rope_local_theta` (Gemma 3: rope_local_base_freq, 10000): the RoPE base of the sliding-window layers,
  which then get their own unscaled table; `rope_theta` and `rope_scaling` apply to the other layers.
  None: every layer uses the `rope_theta` / `rope_scaling` table.
Gemma's GeGLU is mlp="swiglu" with activation="gelu_tanh"; which layers slide is `sliding_layers`
(HF `layer_types`, or the older `sliding_window_pattern`: every 6th layer global in Gemma 3, every 2nd in
Gemma 2). Gemma 3 ignores `attn_logit_softcapping` (as transformers does). The multimodal `gemma3`
config (vision + text) is refused with one line: llmkit runs the text-only checkpoints.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from llmkit.errors import LlmkitError

# HF model_type -> the family defaults that its config.json leaves implicit.
_HF_FAMILIES = {
    "gpt2", "llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe", "qwen2_moe",
    "gemma2", "gemma3_text",
}
_QWEN = ("qwen2", "qwen3", "qwen3_moe", "qwen2_moe")
_MOE = ("mixtral", "qwen3_moe", "qwen2_moe")
_GEMMA = ("gemma2", "gemma3_text")
_LAYER_TYPES = ("sliding_attention", "full_attention")


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
    rope_local_theta: float | None = None  # RoPE base of sliding layers (Gemma 3: 10000); None = rope_theta

    # blocks
    norm: str = "layernorm"  # "layernorm" | "rmsnorm"
    norm_eps: float = 1e-5
    norm_weight_offset: float = 0.0  # RMSNorm scales by (offset + weight); Gemma: 1.0 (HF stores weight ~ 0)
    sandwich_norm: bool = False  # Gemma 2/3: norms on the attention and MLP outputs too (4 per block)
    mlp: str = "gelu"  # "gelu" (fc -> act -> proj) | "swiglu" (gate, up, down)
    activation: str = "gelu_tanh"  # "gelu_tanh" | "gelu" | "silu" | "relu"
    attn_qkv_bias: bool = False  # Qwen2 (and GPT-2) biases on q/k/v
    attn_out_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm on each head's q and k
    attn_scale: float | None = None  # softmax scale; None: 1/√head_dim (Gemma: 1/√query_pre_attn_scalar)
    attn_logit_softcap: float | None = None  # Gemma 2: 50; scores -> cap * tanh(scores / cap)
    final_logit_softcap: float | None = None  # Gemma 2: 30; logits -> cap * tanh(logits / cap)
    sliding_window: int | None = None  # Mistral: each token sees at most this many previous tokens
    sliding_layers: list[int] | None = None  # layers that use sliding_window; None = all (Qwen2: some)
    tie_embeddings: bool = True
    scale_embeddings: bool = False  # Gemma: embeddings x sqrt(d_model) (in the embeddings' dtype)
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
        for name in ("attn_scale", "attn_logit_softcap", "final_logit_softcap", "rope_local_theta"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise LlmkitError(f"ModelConfig.{name} = {value}; it must be positive (or None)")

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
        if mt == "gemma3":
            raise LlmkitError(
                f"{source}: model_type 'gemma3' is the multimodal Gemma 3 (vision + text); llmkit runs the "
                "text-only checkpoints (model_type 'gemma3_text', e.g. gemma-3-270m, gemma-3-1b) and Gemma 3 "
                "GGUF files: use one of those"
            )
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
        if mt in _GEMMA:
            return _gemma_from_hf(cls, hf, source)
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
        rope_theta, rope_scaling = _hf_rope(hf, source)
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
            rope_theta=rope_theta,
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
        if mt in _GEMMA:
            return self._gemma_to_hf(common)
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

    def _gemma_to_hf(self, common: dict[str, Any]) -> dict[str, Any]:
        """config.json of Gemma2ForCausalLM / Gemma3ForCausalLM (transformers 5 keys, plus the rope keys
        transformers 4 reads)."""
        g3 = self.model_type == "gemma3_text"
        scalar = self.attn_scale ** -2 if self.attn_scale is not None else self.head_dim
        full = {"rope_type": "default", **(self.rope_scaling or {}), "rope_theta": self.rope_theta}
        sliding = [self.is_sliding_layer(i) for i in range(self.n_layers)]
        out: dict[str, Any] = {
            "architectures": ["Gemma3ForCausalLM" if g3 else "Gemma2ForCausalLM"],
            **common,
            "hidden_size": self.d_model,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.d_ff,
            "max_position_embeddings": self.max_seq_len,
            "rms_norm_eps": self.norm_eps,
            "hidden_activation": _ACT_TO_HF[self.activation],
            "attention_bias": self.attn_qkv_bias,
            "attention_dropout": self.dropout,
            # an int when it is one (HF's field is typed int; Gemma 2 27B: 144 = (1/12) ** -2)
            "query_pre_attn_scalar": round(scalar) if abs(scalar - round(scalar)) < 1e-6 else scalar,
            "sliding_window": self.sliding_window,
            "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
            "final_logit_softcapping": self.final_logit_softcap,
            "attn_logit_softcapping": self.attn_logit_softcap,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
        }
        if not g3:
            out["rope_parameters"] = full
            return out
        local = dict(full) if self.rope_local_theta is None else {
            "rope_type": "default", "rope_theta": self.rope_local_theta
        }
        out["rope_parameters"] = {"full_attention": full, "sliding_attention": local}
        if self.rope_local_theta is not None:
            out["rope_local_base_freq"] = self.rope_local_theta
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
        gemma = mt in _GEMMA
        if not gemma and self.attn_scale is not None and abs(self.attn_scale * self.head_dim**0.5 - 1) > 1e-6:
            raise LlmkitError(
                f"cannot export as {mt!r}: that family needs attn_scale = head_dim ** -0.5, this model has "
                f"{self.attn_scale}"
            )
        want = {
            "pos_encoding": "learned" if gpt2 else "rope",
            "norm": "layernorm" if gpt2 else "rmsnorm",
            "mlp": "gelu" if gpt2 else "swiglu",
            "qk_norm": mt in ("qwen3", "qwen3_moe", "gemma3_text"),
            "moe (n_experts > 0)": mt in _MOE,
            "shared expert": mt == "qwen2_moe",
            "norm_weight_offset": 1.0 if gemma else 0.0,
            "sandwich_norm": gemma,
            "scale_embeddings": gemma,
            "soft-capped attention logits": mt == "gemma2" and self.attn_logit_softcap is not None,
            "soft-capped final logits": gemma and self.final_logit_softcap is not None,
            "rope_local_theta set": mt == "gemma3_text" and self.rope_local_theta is not None,
        }
        have = {
            "pos_encoding": self.pos_encoding,
            "norm": self.norm,
            "mlp": self.mlp,
            "qk_norm": self.qk_norm,
            "moe (n_experts > 0)": self.n_experts > 0,
            "shared expert": self.moe_shared_expert_d_ff > 0,
            "norm_weight_offset": self.norm_weight_offset,
            "sandwich_norm": self.sandwich_norm,
            "scale_embeddings": self.scale_embeddings,
            "soft-capped attention logits": self.attn_logit_softcap is not None,
            "soft-capped final logits": self.final_logit_softcap is not None,
            "rope_local_theta set": self.rope_local_theta is not None,
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


def _hf_rope(
    hf: dict[str, Any], source: str, default_theta: float = 10000.0
) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling or None) from rope_theta / rope_scaling (transformers 4) or a flat
    rope_parameters dict (transformers 5)."""
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
        raise LlmkitError(f"{source}: partial rotary embeddings (partial_rotary_factor) are not supported")
    return float(rope_theta if rope_theta is not None else default_theta), rope_scaling


def _gemma_from_hf(cls: type[ModelConfig], hf: dict[str, Any], source: str) -> ModelConfig:
    """Gemma 2 / Gemma 3 text config.json -> ModelConfig. Keys the file lacks take transformers 5's
    Gemma2Config / Gemma3TextConfig defaults."""
    mt = hf["model_type"]
    g3 = mt == "gemma3_text"
    if hf.get("use_bidirectional_attention"):
        raise LlmkitError(
            f"{source}: use_bidirectional_attention is set (an encoder-style Gemma); llmkit runs causal "
            "decoders only"
        )
    n = hf.get("num_hidden_layers", 26)
    types = hf.get("layer_types")
    if types is None:  # every `step`-th layer global, the others sliding
        step = (hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or 6) if g3 else 2
        types = ["sliding_attention" if (i + 1) % step else "full_attention" for i in range(n)]
    if len(types) != n or any(t not in _LAYER_TYPES for t in types):
        raise LlmkitError(
            f"{source}: layer_types must list {n} entries, each one of {', '.join(_LAYER_TYPES)}"
        )
    window = hf.get("sliding_window", 4096)
    sliding_layers: list[int] | None = [i for i, t in enumerate(types) if t == "sliding_attention"]
    if window is None and sliding_layers:
        raise LlmkitError(f"{source}: layer_types has sliding layers but sliding_window is null")
    if not sliding_layers:
        window = sliding_layers = None
    elif len(sliding_layers) == n:
        sliding_layers = None
    local_theta = None
    if g3:  # rope per layer type: nested rope_parameters (transformers 5) or rope_theta,
        # rope_local_base_freq, rope_scaling (transformers 4); rope_scaling applies to global layers only
        rp = hf.get("rope_parameters")
        nested = isinstance(rp, dict) and any(k in rp for k in _LAYER_TYPES)
        full = dict((rp or {}).get("full_attention") or {}) if nested else {}
        local = dict((rp or {}).get("sliding_attention") or {}) if nested else {}
        full.update(hf.get("rope_scaling") or {})
        full.setdefault("rope_theta", hf.get("rope_theta", 1_000_000.0))
        local.setdefault("rope_theta", hf.get("rope_local_base_freq", 10_000.0))
        rope_theta, rope_scaling = _hf_rope({"rope_parameters": full}, source)
        local_theta, local_scaling = _hf_rope({"rope_parameters": local}, source)
        if local_scaling and (local_theta, local_scaling) == (rope_theta, rope_scaling):
            local_theta = None  # the sliding layers share the global (scaled) table
        elif local_scaling:
            raise LlmkitError(
                f"{source}: RoPE scaling on the sliding-window layers ({local_scaling}) differs from the "
                "global layers'; llmkit scales the global layers only"
            )
    else:
        rope_theta, rope_scaling = _hf_rope(hf, source)
    n_heads = hf.get("num_attention_heads", 8)
    bias = bool(hf.get("attention_bias", False))
    return cls(
        model_type=mt,
        vocab_size=hf.get("vocab_size", 262_208 if g3 else 256_000),
        d_model=hf.get("hidden_size", 2304),
        n_layers=n,
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads", 4),
        head_dim=hf.get("head_dim", 256),
        d_ff=hf.get("intermediate_size", 9216),
        max_seq_len=hf.get("max_position_embeddings", 131_072 if g3 else 8192),
        pos_encoding="rope",
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        rope_local_theta=local_theta,
        norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        norm_weight_offset=1.0,
        sandwich_norm=True,
        mlp="swiglu",
        activation=_hf_act(hf.get("hidden_activation") or "gelu_pytorch_tanh"),
        attn_qkv_bias=bias,
        attn_out_bias=bias,
        qk_norm=g3,
        attn_scale=float(hf.get("query_pre_attn_scalar", 256)) ** -0.5,
        # transformers' Gemma 3 keeps attn_logit_softcapping in its config but never applies it
        attn_logit_softcap=None if g3 else _positive(hf.get("attn_logit_softcapping", 50.0)),
        final_logit_softcap=_positive(hf.get("final_logit_softcapping", None if g3 else 30.0)),
        sliding_window=window,
        sliding_layers=sliding_layers,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        scale_embeddings=True,
        bos_token_id=hf.get("bos_token_id", 2),
        eos_token_id=hf.get("eos_token_id", 1),
        dtype=_hf_dtype(hf),
    )


def _positive(x: float | None) -> float | None:
    """A soft-capping value, None = off; 0 counts as off too (capping at 0 would divide by zero)."""
    return float(x) if x else None


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

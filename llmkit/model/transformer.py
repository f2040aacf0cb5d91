"""The Transformer: one decoder-only model class for every family llmkit runs (GPT-2, Llama, Mistral,
Qwen2/3, Mixtral, Qwen3-MoE, Gemma 2/3), configured by ModelConfig fields, never by family names.

    ids -> embed_tokens (x √d) (+ embed_positions) -> N x Block -> norm -> lm_head (softcap) -> logits
    Block: x + Attention(norm(x)), then h + MLP-or-MoE(norm(h))        (pre-norm residual stream)
           sandwich_norm: x + norm(Attention(norm(x))), then h + norm(MLP(norm(h)))       (Gemma 2/3)
    Attention: softmax(softcap(Q Kᵀ · scale) + M) V, M = causal (+ sliding window) mask, RoPE on Q and K

    model = Transformer(ModelConfig(model_type="gemma3_text", ...))  # or llmkit.checkpoint.load_hf_dir
    logits = model(ids)  # (B, T, V)

Notable choices:
- Parameter names are Hugging Face Llama names (`model.layers.N.self_attn.q_proj` ...), so HF safetensors
  load with no renaming (only GPT-2 files need a transform, done in llmkit/checkpoint/hf.py).
- Attention and the gated MLP compute their input projections with `project(x, q_proj, k_proj, v_proj)`
  (llmkit/model/layers.py) and never look at which modules sit there: nn.Linear, quantized, fused or
  LoRA-wrapped projections all work, and nothing is swapped or cached on a module during a forward.
- One forward, outputs chosen by argument: logits (default); `return_hidden=True` gives the final normed
  hidden states and `head(h)` the logits of just the rows a caller wants (the engine's last positions);
  `output_hidden_states` / `output_attentions` / `output_aux` give a ModelOutput.
- Attention runs through F.scaled_dot_product_attention (flash / memory-efficient kernels, grouped-query
  attention without repeating K/V). `output_attentions=True` switches to an eager path that computes
  softmax(QKᵀ/√d + M) explicitly and returns the weights.
- Positions are explicit (B, T): the causal mask is "key position <= query position", so rows at different
  lengths share a batch and a static KVCache can be written at any position. Without a cache and with
  default positions the mask is implicit (is_causal) and the fast kernels apply; otherwise one additive
  mask per forward (per kind: full / sliding) spans the cache's `max_seq_len` slots. Additive, not
  boolean: SDPA with a boolean mask and grouped-query attention drops to its math path (2.4x slower
  per call on an H100).
- RoPE cos/sin tables are float32 buffers precomputed on the device; each forward gathers them by position
  once for all layers. The decode step has no data-dependent Python branch and, under torch.compile, no
  host sync, so torch.compile(fullgraph=True) captures it (dense models; MoE routing syncs once per MoE
  layer).
- RMSNorm computes in float32 and casts back before the weight multiply, exactly as HF does, so fp32 logits
  match transformers to ~1e-6 and bf16 logits round the same way. With `norm_weight_offset` (Gemma: 1.0)
  it is OffsetRMSNorm, HF Gemma's order instead: normalise, multiply by (offset + weight) in float32, then
  cast; the weights stay as HF stores them (~0). QK-norm uses the same norm class.
- Gemma fields (see llmkit/config.py), each a plain attribute read at construction, so other families pay
  nothing per token: `sandwich_norm` adds pre_/post_feedforward_layernorm and moves post_attention_layernorm
  onto the attention output (HF Gemma names); `scale_embeddings` multiplies the embeddings by √d_model
  rounded to their dtype (HF's normalizer); `attn_scale` is SDPA's `scale`; `final_logit_softcap` is
  applied in `head()`, so every caller of `head` (engine, scoring, training) gets capped logits;
  `rope_local_theta` gives sliding layers a second cos/sin table (unscaled), gathered once per forward
  like the first.
- Attention-logit soft-capping (Gemma 2) cannot go through SDPA (no score hook), so layers with
  `attn_logit_softcap` run the eager path: scores = QKᵀ · scale, cap · tanh(scores / cap), + mask,
  float32 softmax, exactly HF's eager_attention_forward. It materialises (B, H, T, S) scores, as HF does.
- MoE routes with softmax over all experts, top-k, optional renormalisation (Mixtral: always; Qwen3-MoE:
  norm_topk_prob), and groups tokens by expert with one argsort + bincount (one host sync per MoE layer);
  an optional shared expert with a sigmoid gate is added (Qwen2-MoE). In training mode,
  `model(ids, output_aux=True).aux_loss` is the Switch / Mixtral load-balancing loss (transformers'
  load_balancing_loss_func) over router logits collected through the forward call (a list passed down the
  blocks, never stored on a module); the trainer adds `config.router_aux_loss_coef * aux_loss`.
- Layers may sit on different devices (llmkit.placement, accelerate's device_map="auto"): `layer_devices`
  lists each layer's device and the final norm + head's, and the forward moves the hidden state (and the
  positions, RoPE tables and masks) when the next layer sits elsewhere. None (one device) costs one
  `is not None` per layer; a later `model.to(...)` re-reads the devices from the weights.
- Explicit positions are checked against the RoPE / learned-position table and the cache (one min/max
  read per forward, skipped under torch.compile): an out-of-range position is a LlmkitError, not a
  silent wrap-around or a device-side assert.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmkit.config import ModelConfig
from llmkit.errors import LlmkitError
from llmkit.model.kv_cache import KVCache
from llmkit.model.layers import joint_output, project
from llmkit.model.rope import apply_rope, rope_for_positions, rope_tables

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu_tanh": partial(F.gelu, approximate="tanh"),
    "gelu": F.gelu,
    "silu": F.silu,
    "relu": F.relu,
}


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # (B, T, V); None with return_hidden=True (then see `hidden`)
    hidden_states: list[torch.Tensor] = field(default_factory=list)  # n_layers + 1 x (B, T, d); last normed
    attentions: list[torch.Tensor] = field(default_factory=list)  # n_layers x (B, H, T, S)
    aux_loss: torch.Tensor | None = None  # () MoE load-balancing loss; training mode and output_aux only
    hidden: torch.Tensor | None = None  # (B, T, d) final normed hidden states, with return_hidden=True


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.rms_norm is one fused kernel (5 eager kernels written out), same float32 math as HF's
        # x * rsqrt(mean(x²) + eps). In float32 the weight multiply goes inside too; in lower precision
        # HF normalises in float32, casts back, then multiplies by the weight, and so do we.
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


class OffsetRMSNorm(RMSNorm):
    """RMSNorm scaling by (offset + weight), HF Gemma's order: x normalised in float32, times
    (offset + weight) in float32, then cast to x's dtype. Initialised to a unit scale: weight = 1 - offset."""

    def __init__(self, dim: int, eps: float, offset: float):
        super().__init__(dim, eps)
        self.offset = offset
        self.weight = nn.Parameter(torch.full((dim,), 1.0 - offset))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.rms_norm(x.float(), self.weight.shape, eps=self.eps)  # (..., dim) float32
        return (y * (self.offset + self.weight.float())).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, offset={self.offset}"


def rms_norm(config: ModelConfig, dim: int) -> RMSNorm:
    """The RMSNorm of this config (OffsetRMSNorm when norm_weight_offset is set): blocks and QK-norm."""
    if config.norm_weight_offset:
        return OffsetRMSNorm(dim, config.norm_eps, config.norm_weight_offset)
    return RMSNorm(dim, config.norm_eps)


def make_norm(config: ModelConfig, dim: int) -> nn.Module:
    if config.norm == "rmsnorm":
        return rms_norm(config, dim)
    if config.norm == "layernorm":
        if config.norm_weight_offset:
            raise LlmkitError("norm_weight_offset applies to norm='rmsnorm' only")
        return nn.LayerNorm(dim, eps=config.norm_eps)
    raise LlmkitError(f"unknown norm {config.norm!r} (expected 'rmsnorm' or 'layernorm')")


class MLP(nn.Module):
    """GELU MLP (up -> act -> down) or gated SwiGLU (down(act(gate(x)) * up(x)))."""

    def __init__(self, config: ModelConfig, d_ff: int, bias: bool):
        super().__init__()
        if config.mlp not in ("gelu", "swiglu"):
            raise LlmkitError(f"unknown mlp {config.mlp!r} (expected 'gelu' or 'swiglu')")
        if config.activation not in ACTIVATIONS:
            raise LlmkitError(f"unknown activation {config.activation!r}")
        self.gated = config.mlp == "swiglu"
        if self.gated:
            self.gate_proj = nn.Linear(config.d_model, d_ff, bias=bias)
        self.up_proj = nn.Linear(config.d_model, d_ff, bias=bias)
        self.down_proj = nn.Linear(d_ff, config.d_model, bias=bias)
        self.act = ACTIVATIONS[config.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            g, u = project(x, self.gate_proj, self.up_proj)  # (..., d_ff) each
            return self.down_proj(self.act(g) * u)  # (..., d)
        return self.down_proj(self.act(self.up_proj(x)))  # (..., d)


class MoE(nn.Module):
    """Top-k routed experts (+ optional sigmoid-gated shared expert)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k, self.norm_topk = (
            config.n_experts,
            config.n_experts_per_tok,
            config.moe_norm_topk,
        )
        self.gate = nn.Linear(config.d_model, config.n_experts, bias=False)  # the router
        self.experts = nn.ModuleList(
            MLP(config, config.moe_d_ff, bias=False) for _ in range(config.n_experts)
        )
        if config.moe_shared_expert_d_ff:
            self.shared_expert = MLP(config, config.moe_shared_expert_d_ff, bias=False)
            self.shared_expert_gate = nn.Linear(config.d_model, 1, bias=False)

    def forward(self, x: torch.Tensor, router_logits: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Routed mixture of x (..., d); the router logits (N, E) are appended to `router_logits` if given."""
        shape = x.shape
        h = x.reshape(-1, shape[-1])  # (N, d)
        logits = self.gate(h)  # (N, E)
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)  # (N, E)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)  # (N, k) each
        if self.norm_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        flat = chosen.flatten()  # (N*k,)
        order = flat.argsort(stable=True)  # slots grouped by expert
        counts = torch.bincount(flat, minlength=self.n_experts).tolist()  # the one host sync
        out = torch.zeros_like(h)
        start = 0
        for e, n in enumerate(counts):
            if n:
                slots = order[start : start + n]  # (n,)
                tok = slots // self.top_k  # (n,) token index of each slot
                y = self.experts[e](h[tok]) * weights.view(-1)[slots, None]  # (n, d) float32
                out.index_add_(0, tok, y.to(out.dtype))
                start += n
        if hasattr(self, "shared_expert"):
            out = out + torch.sigmoid(self.shared_expert_gate(h)) * self.shared_expert(h)
        if router_logits is not None:
            router_logits.append(logits)
        return out.view(shape)


def load_balancing_loss(router_logits: list[torch.Tensor], n_experts: int, top_k: int) -> torch.Tensor:
    """Switch-Transformer auxiliary loss over all MoE layers, as transformers' load_balancing_loss_func:
    E * sum_e (fraction of top-k assignments to e) * (mean router probability of e)."""
    counts = probs_sum = 0.0
    rows = 0
    for logits in router_logits:  # (N, E) per layer
        probs = F.softmax(logits.float(), dim=-1)
        chosen = torch.topk(probs, top_k, dim=-1).indices  # (N, k)
        counts = counts + F.one_hot(chosen, n_experts).sum(dim=(0, 1)).float()  # (E,)
        probs_sum = probs_sum + probs.sum(dim=0)  # (E,)
        rows += probs.shape[0]
    return (counts / rows * probs_sum / rows).sum() * n_experts


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        d, hd = config.d_model, config.head_dim
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=config.attn_qkv_bias)
        self.k_proj = nn.Linear(d, self.n_kv_heads * hd, bias=config.attn_qkv_bias)
        self.v_proj = nn.Linear(d, self.n_kv_heads * hd, bias=config.attn_qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=config.attn_out_bias)
        self.qk_norm = config.qk_norm  # a plain flag: hasattr on a Module costs an exception when False
        if config.qk_norm:
            self.q_norm = rms_norm(config, hd)
            self.k_norm = rms_norm(config, hd)
        self.dropout = config.dropout
        self.scale = config.attn_scale  # None: SDPA's default 1/√head_dim
        self.softcap = config.attn_logit_softcap
        self.eager = config.attn_logit_softcap is not None  # SDPA cannot soft-cap scores

    def _qkv(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (B, T, H, D), k and v (B, T, Hkv, D), q and k normed (qk_norm) and rotated (RoPE)."""
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        y = joint_output(x, self.q_proj, self.k_proj, self.v_proj) if rope is not None and not self.qk_norm \
            else None
        if y is not None:  # q|k|v from one matmul: rotate q and k in one go (half the small kernels)
            qk, v = y.view(B, T, H + 2 * Hkv, D).split_with_sizes([H + Hkv, Hkv], dim=2)
            q, k = apply_rope(qk, *rope).split_with_sizes([H, Hkv], dim=2)
            return q, k, v
        q, k, v = project(x, self.q_proj, self.k_proj, self.v_proj)  # (B, T, H*D | Hkv*D)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:  # elementwise, so applied in (B, T, H, D) layout: no transposes before it
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return q, k, v

    def forward(
        self,
        x: torch.Tensor,  # (B, T, d)
        rope: tuple[torch.Tensor, torch.Tensor] | None,  # cos, signed sin (B, T, 1, D)
        mask: torch.Tensor | None,  # (B, 1, T, S) additive (0 visible, -inf hidden); None = plain causal
        cache: KVCache | None,
        positions: torch.Tensor,  # (B, T)
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T, _ = x.shape
        q, k, v = self._qkv(x, rope)  # (B, T, H|Hkv, D)
        if cache is not None:  # the cache takes (B, T, Hkv, D) and returns (B, Hkv, S, D)
            k, v = cache.update(self.layer_idx, k, v, positions)
        else:
            k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, Hkv, T, D)
        q = q.transpose(1, 2)  # (B, H, T, D)
        dropout = self.dropout if self.training else 0.0
        weights = None
        if output_attentions or self.eager:
            y, weights = self._eager(q, k, v, mask, dropout)
            if not output_attentions:
                weights = None
        else:
            y = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                is_causal=mask is None,
                dropout_p=dropout,
                scale=self.scale,
                enable_gqa=self.n_kv_heads != self.n_heads,
            )  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H*D)
        return self.o_proj(y), weights

    def _eager(self, q, k, v, mask, dropout) -> tuple[torch.Tensor, torch.Tensor]:
        """softmax(softcap(QKᵀ · scale) + M) V written out (HF's eager_attention_forward), returning the
        weights (B, H, T, S)."""
        rep = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, H, S, D)
        scale = self.scale if self.scale is not None else self.head_dim**-0.5
        scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, T, S)
        if self.softcap is not None:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        if mask is None:
            T, S = scores.shape[-2:]
            scores = scores.masked_fill(
                torch.ones(T, S, dtype=torch.bool, device=q.device).triu(S - T + 1), -math.inf
            )
        else:
            scores = scores + mask
        weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return F.dropout(weights, dropout, training=dropout > 0) @ v, weights  # (B, H, T, D)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = make_norm(config, config.d_model)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = make_norm(config, config.d_model)
        self.mlp = (
            MoE(config) if config.is_moe_layer(layer_idx) else MLP(config, config.d_ff, config.mlp_bias)
        )
        self.sandwich = config.sandwich_norm  # Gemma: post_attention_layernorm is on the attention output
        if self.sandwich:
            self.pre_feedforward_layernorm = make_norm(config, config.d_model)
            self.post_feedforward_layernorm = make_norm(config, config.d_model)
        self.sliding = config.is_sliding_layer(layer_idx)
        self.moe = config.is_moe_layer(layer_idx)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, ropes, masks, cache, positions, output_attentions=False, router_logits=None):
        """x (B, T, d); ropes and masks: {sliding: table / mask} (this layer picks its kind)."""
        a, weights = self.self_attn(
            self.input_layernorm(x), ropes[self.sliding], masks[self.sliding], cache, positions,
            output_attentions,
        )
        drop = self.training and self.dropout.p > 0  # an identity dropout call still costs a module call
        if self.sandwich:
            a = self.post_attention_layernorm(a)
            x = x + (self.dropout(a) if drop else a)
            h = self.pre_feedforward_layernorm(x)
        else:
            x = x + (self.dropout(a) if drop else a)
            h = self.post_attention_layernorm(x)
        m = self.mlp(h, router_logits) if self.moe else self.mlp(h)
        if self.sandwich:
            m = self.post_feedforward_layernorm(m)
        x = x + (self.dropout(m) if drop else m)
        return x, weights


class Decoder(nn.Module):
    """The body, named `model` inside Transformer as in HF checkpoints."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        if config.pos_encoding == "learned":
            self.embed_positions = nn.Embedding(config.max_seq_len, config.d_model)
        elif config.pos_encoding != "rope":
            raise LlmkitError(f"unknown pos_encoding {config.pos_encoding!r} (expected 'learned' or 'rope')")
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = make_norm(config, config.d_model)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.dropout = nn.Dropout(config.dropout)
        # plain attributes, read per forward without touching the config or any hasattr
        self.final_softcap = config.final_logit_softcap
        # llmkit.placement: each layer's device, then the final norm + head's; None = one device for all
        self.layer_devices: list[torch.device] | None = None
        self.local_rope = config.pos_encoding == "rope" and config.rope_local_theta is not None
        # √d_model rounded to each dtype, as HF multiplies by a tensor in the embeddings' dtype; None = off
        self.embed_scales = {
            dt: torch.tensor(config.d_model**0.5, dtype=dt, device="cpu").item()
            for dt in (torch.float32, torch.bfloat16, torch.float16, torch.float64)
        } if config.scale_embeddings else None
        self.tie_weights()
        self.reset_buffers()
        self.init_weights()

    # ------------------------------------------------------------------ setup
    def _apply(self, fn, recurse=True):
        # model.to(...) / .half() on a placed model: re-read where the layers now are (None: one device)
        module = super()._apply(fn, recurse)
        if self.layer_devices is not None:
            devs = [layer.input_layernorm.weight.device for layer in self.model.layers]
            devs.append(self.model.norm.weight.device)
            one = set(devs) == {self.model.embed_tokens.weight.device}
            self.layer_devices = None if one else devs
        return module

    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the RoPE tables on `device` (default: where the embeddings live)."""
        if self.config.pos_encoding != "rope":
            return
        if device is None:
            device = self.model.embed_tokens.weight.device
        c = self.config
        cos, sin = rope_tables(c.head_dim, c.max_seq_len, c.rope_theta, c.rope_scaling, device=device)
        self.register_buffer("rope_cos", cos, persistent=False)  # (max_seq_len, head_dim/2) float32
        self.register_buffer("rope_sin", sin, persistent=False)
        if self.local_rope:  # sliding layers' own base, no scaling (HF Gemma 3)
            cos, sin = rope_tables(c.head_dim, c.max_seq_len, c.rope_local_theta, None, device=device)
            self.register_buffer("rope_local_cos", cos, persistent=False)  # (max_seq_len, head_dim/2)
            self.register_buffer("rope_local_sin", sin, persistent=False)

    def init_weights(self) -> None:
        """GPT-2 style init for training from scratch: N(0, 0.02), zero biases, unit norms, and the
        residual projections (o_proj, down_proj) scaled by 1/sqrt(2 n_layers). A no-op on the meta device."""
        if self.lm_head.weight.device.type == "meta":
            return
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * self.config.n_layers))

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        ids: torch.Tensor,  # (B, T) long
        *,
        positions: torch.Tensor | None = None,  # (B, T) long; default 0..T-1
        cache: KVCache | None = None,
        segments: torch.Tensor | None = None,  # (B, T) long: shared-prefix packing (see _masks)
        return_hidden: bool = False,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        output_aux: bool = False,
    ) -> torch.Tensor | ModelOutput:
        """Logits (B, T, V); with return_hidden=True the final normed hidden states (B, T, d) instead (then
        `head(h)` on the rows you need). With any output_* flag: a ModelOutput (its `hidden` holds the
        hidden states when return_hidden=True, its `logits` is then None).
        `segments` packs several sequences that share a prefix into one row (no cache, explicit positions):
        segment 0 is the shared prefix, segments 1, 2... each continue it from the same position on and see
        only the prefix and themselves; -1 marks padding (scoring, DPO and GRPO use it: the prompt runs
        once for all its continuations)."""
        B, T = ids.shape
        explicit = positions is not None
        if positions is None:
            if T > self.config.max_seq_len:
                raise LlmkitError(
                    f"sequence of {T} tokens is longer than the model's context ({self.config.max_seq_len})"
                )
            positions = torch.arange(T, device=ids.device).expand(B, T)  # (B, T)
        elif positions.is_cpu and not torch.compiler.is_compiling():  # on an accelerator a check would
            self._check_positions(positions, cache)  # cost a host sync per step: callers own their positions
        x = self.model.embed_tokens(ids)  # (B, T, d)
        if self.embed_scales is not None:
            x = x * self.embed_scales[x.dtype]
        if hasattr(self.model, "embed_positions"):
            x = x + self.model.embed_positions(positions)
        if self.training and self.dropout.p > 0:
            x = self.dropout(x)
        rope = None
        if self.config.pos_encoding == "rope":
            rope = rope_for_positions(self.rope_cos, self.rope_sin, positions, x.dtype)  # 2 x (B, T, 1, D)
        ropes = {False: rope, True: rope}  # {sliding: tables}
        if self.local_rope:
            ropes[True] = rope_for_positions(self.rope_local_cos, self.rope_local_sin, positions, x.dtype)
        if segments is not None and (cache is not None or not explicit):
            raise LlmkitError("segments need explicit positions and no KV cache")
        masks = self._masks(positions, cache, explicit, x.dtype, segments)
        hidden: list[torch.Tensor] = [x] if output_hidden_states else []
        attentions: list[torch.Tensor] = []
        collect = output_aux and self.training and self.config.n_experts > 0
        routed: list[torch.Tensor] | None = [] if collect else None  # router logits (N, E) per MoE layer
        hops = self.layer_devices
        for i, layer in enumerate(self.model.layers):
            if hops is not None and hops[i] != x.device:  # placed model: follow the layer to its device
                x, ropes, masks, positions = _to_device(hops[i], x, ropes, masks, positions)
            x, w = layer(x, ropes, masks, cache, positions, output_attentions, routed)
            if output_hidden_states:
                hidden.append(x)
            if w is not None:
                attentions.append(w)
        if hops is not None:
            x = x.to(hops[-1])
        x = self.model.norm(x)  # (B, T, d)
        if output_hidden_states:
            hidden[-1] = x
        if not (output_hidden_states or output_attentions or output_aux):
            return x if return_hidden else self.head(x)
        c = self.config
        aux = load_balancing_loss(routed, c.n_experts, c.n_experts_per_tok) if routed else None  # ()
        if return_hidden:
            return ModelOutput(None, hidden, attentions, aux, hidden=x)
        return ModelOutput(self.head(x), hidden, attentions, aux)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits (..., V) of final normed hidden states h (..., d): the lm_head, then the final soft-cap
        cap * tanh(logits / cap) when the config has one (Gemma 2)."""
        logits = self.lm_head(h)  # (..., V)
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits

    def _check_positions(self, positions: torch.Tensor, cache: KVCache | None) -> None:
        """LlmkitError for a position outside the position table (RoPE / learned) or the cache."""
        if positions.numel() == 0:
            return
        lo, hi = (int(v) for v in torch.aminmax(positions))  # one small read (a sync on an accelerator)
        if lo < 0:
            raise LlmkitError(f"position {lo} is negative; positions count from 0")
        if hi >= self.config.max_seq_len:
            raise LlmkitError(
                f"position {hi} is beyond the model's context ({self.config.max_seq_len} positions, 0.."
                f"{self.config.max_seq_len - 1}); shorten the input or the generation"
            )
        if cache is not None and hi >= cache.max_seq_len:
            raise LlmkitError(
                f"position {hi} is beyond the KV cache's capacity ({cache.max_seq_len} slots); "
                "allocate a larger cache or shorten the input"
            )

    def _masks(
        self, positions: torch.Tensor, cache: KVCache | None, explicit: bool, dtype: torch.dtype,
        segments: torch.Tensor | None = None,
    ) -> dict[bool, torch.Tensor | None]:
        """{sliding: mask}: mask (B, 1, T, S) additive in `dtype` (0 = visible, -inf = hidden), built once
        per forward, or None for plain causal attention. Additive rather than boolean masks keep SDPA on
        its fused kernels (a boolean mask with grouped-query attention falls back to the math path).
        With segments (B, T): a key is visible when it is causal by position and belongs to the shared
        prefix (segment 0) or to the query's own segment; padding (-1) sees the prefix only."""
        window = self.config.sliding_window
        if cache is None and not explicit and window is None:
            return {False: None, True: None}
        if cache is None:
            kpos = positions[:, None, :]  # (B, 1, T) key positions = the batch's own positions
        else:
            kpos = torch.arange(cache.max_seq_len, device=positions.device)[None, None, :]  # (1, 1, S)
        qpos = positions[:, :, None]  # (B, T, 1)
        full = kpos <= qpos  # (B, T, S)
        if segments is not None:
            sk, sq = segments[:, None, :], segments[:, :, None]  # (B, 1, T), (B, T, 1)
            full = full & ((sk == 0) | (sk == sq))  # (B, T, T)
        zero = torch.zeros((), dtype=dtype, device=positions.device)
        hidden = torch.full((), -math.inf, dtype=dtype, device=positions.device)
        masks = {False: torch.where(full, zero, hidden)[:, None], True: None}
        if window is not None:
            masks[True] = torch.where(full & (qpos - kpos < window), zero, hidden)[:, None]
        return masks


def _to_device(device: torch.device, x: torch.Tensor, ropes: dict, masks: dict, positions: torch.Tensor):
    """x, ropes, masks and positions moved to `device` (a placed model's next layer)."""
    def move(t):
        return None if t is None else t.to(device)

    ropes = {k: None if r is None else (r[0].to(device), r[1].to(device)) for k, r in ropes.items()}
    return x.to(device), ropes, {k: move(m) for k, m in masks.items()}, positions.to(device)


def param_counts(model: Transformer) -> dict[str, int]:
    """Parameter counts by component (shared tensors counted once); keys: embeddings, attention, mlp,
    experts (routers and shared experts included), norms, lm_head (0 when tied), total."""
    counts = dict.fromkeys(("embeddings", "attention", "mlp", "experts", "norms", "lm_head"), 0)
    for name, p in model.named_parameters():  # named_parameters() yields a tied weight once
        if name.startswith("lm_head"):
            key = "lm_head"
        elif ".embed_" in name:
            key = "embeddings"
        elif name.endswith(("norm.weight", "norm.bias")):
            key = "norms"
        elif ".self_attn." in name:
            key = "attention"
        elif isinstance(model.get_submodule(name.split(".mlp.")[0] + ".mlp"), MoE):
            key = "experts"
        else:
            key = "mlp"
        counts[key] += p.numel()
    counts["total"] = sum(counts.values())
    return counts

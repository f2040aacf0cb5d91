"""The native step: the engine's decode steps (a token per row, and its drafts) and prefill chunks, run by
llmkit/kernels/decode.c.

    nd = NativeDecode.build(model, cache)     # None when decode.c cannot compute this model (why: `why_not`)
    logits = nd(ids, rows, positions)         # ids (N,) long; each token's cache row and position (lists)
    hidden = nd(ids, rows, positions, hidden=True)   # the final normed hidden states (N, d): a prefill chunk

The readable model (llmkit/model/transformer.py) stays the reference: decode.c computes the same maths for
the models it accepts, reading the model's own tensors in place (no copy), and tests compare the two.
Python keeps a float or soft-capped head and the lookup of embedding classes decode.c does not know, so
the layers (where eager PyTorch spends ~1,500 operator calls a token), a quantized head and the lookup
(~0.1 ms of PyTorch ops a token for a quantized table) move to C.

Notable choices
- Which models: Llama-shaped ones (RMSNorm, RoPE, SwiGLU, grouped-query attention, optional biases and
  sliding windows: Llama, Mistral, Qwen2, SmolLM2...), float32 compute on the CPU, a float32 or bfloat16 KV
  cache, and every projection an nn.Linear (float32), an Int4Linear or an Int8Linear, or the parts of one
  fused group of them, in order. Anything else (LoRA wrappers, QK-norm, MoE, Gemma's norms, GPT-2, bfloat16
  weights, an int8 cache, a model placed over several devices) keeps the PyTorch step, and `why_not` says
  why.
- The structs hold raw pointers, so the plan keeps a reference to every tensor it points to and a
  signature of the modules and storages it was built from; the engine checks `stale()` before each request
  (`Engine._reserve`) and rebuilds the plan when weights were swapped (LoRA applied, a module replaced, a
  `.to()`); in-place updates (an optimizer step) keep the pointers valid and are seen at once.
- Forward hooks (a lab looking inside, a test injecting a fault) need the PyTorch modules to run: a model
  with a hook on itself (checked every step) or on any submodule (part of the signature) decodes in PyTorch.
- Prefill chunks run here too when every matmul is quantized: the int4 kernel's batch rows then do the
  work of a GEMM with the decode kernel's exact sums, and C replaces ~100 PyTorch operators per layer. A
  float32 model's long chunks stay with PyTorch, whose GEMM (MKL / oneDNN) outruns decode.c's plain one.
- One rearrangement, in place: an int4 module's (s, z) pairs go to blocks of 4 rows (`block_scales_`), so
  decode reads a row's pairs from one stretch of memory instead of one cache line per group, N * 4 bytes
  apart (SmolLM2's matmuls ~10 % faster on a 2-core EPYC). The module's own forward, its state dict, moves
  and dequantize all read that layout too.
- LLMKIT_NATIVE=0 (or `Engine(native=False)`) turns it off.
"""

from __future__ import annotations

import ctypes
import math
import os
import time
from typing import Any

import torch
import torch.nn as nn

from llmkit import kernels

_p, _i64 = ctypes.c_void_p, ctypes.c_int64
NATIVE_TOKENS = 16  # most tokens per row of a decode step (with drafts) the native step takes


class _Linear(ctypes.Structure):
    _fields_ = [("kind", _i64), ("n", _i64), ("k", _i64), ("gshift", _i64), ("rb", _i64), ("w", _p),
                ("s", _p), ("bias", _p)]


class _Layer(ctypes.Structure):
    _fields_ = [("norm1", _p), ("norm2", _p), ("qkv", _Linear * 3), ("n_qkv", _i64), ("o", _Linear),
                ("gu", _Linear * 2), ("n_gu", _i64), ("down", _Linear), ("kc", _p), ("vc", _p),
                ("window", _i64)]


class _Model(ctypes.Structure):
    _fields_ = [("n_layers", _i64), ("d", _i64), ("n_heads", _i64), ("n_kv_heads", _i64), ("head_dim", _i64),
                ("d_ff", _i64), ("slots", _i64), ("fine", _i64), ("eps", ctypes.c_double),
                ("scale", ctypes.c_double), ("cos", _p), ("sin", _p), ("norm", _p),
                ("layers", ctypes.POINTER(_Layer)), ("kv_bf16", _i64), ("prof", _p), ("emb_kind", _i64),
                ("emb_rows", _i64), ("emb_gs", _i64), ("emb_w", _p), ("emb_s", _p), ("head", _Linear),
                ("head_on", _i64)]


def enabled() -> bool:
    return os.environ.get("LLMKIT_NATIVE", "1") not in ("0", "false", "no")


def why_not(model: nn.Module, cache: Any) -> str | None:
    """Why decode.c cannot run this model with this cache (None when it can)."""
    if not enabled():
        return "LLMKIT_NATIVE=0"
    c = model.config
    checks = [
        (next(model.parameters()).device.type == "cpu", "the model is not on the CPU"),
        (getattr(model, "layer_devices", None) is None, "the model is placed over several devices"),
        (c.pos_encoding == "rope" and c.rope_local_theta is None, "not plain RoPE positions"),
        (c.norm == "rmsnorm" and not c.norm_weight_offset and not c.sandwich_norm, "not Llama's RMSNorm"),
        (c.mlp == "swiglu" and c.activation == "silu", "not a SwiGLU MLP"),
        (not c.n_experts and not c.qk_norm and c.attn_logit_softcap is None, "MoE, QK-norm or soft-capping"),
        (not c.scale_embeddings, "scaled embeddings"),
        (c.head_dim % 2 == 0 and c.n_heads % c.n_kv_heads == 0, "odd head_dim or head grouping"),
        (cache.dtype in (torch.float32, torch.bfloat16) and not cache.quantized,
         f"a {cache.dtype} KV cache (float32 or bfloat16 only)"),
        (model.model.norm.weight.dtype == torch.float32, "not a float32 model"),
    ]
    for ok, why in checks:
        if not ok:
            return why
    if _hooks(model):
        return "forward hooks are registered"
    if not kernels.available():  # last: a model decode.c cannot run never loads (or builds) the library
        return f"no kernels ({kernels.why_not()})"
    for i, layer in enumerate(model.model.layers):
        a, m = layer.self_attn, layer.mlp
        for name, mods in (("q/k/v", (a.q_proj, a.k_proj, a.v_proj)), ("o", (a.o_proj,)),
                           ("gate/up", (m.gate_proj, m.up_proj)), ("down", (m.down_proj,))):
            if _group(mods) is None:
                return f"layer {i}: the {name} projection is a {type(mods[0]).__name__}"
        if layer.input_layernorm.weight.dtype != torch.float32:
            return "not a float32 model"
    return None


def _group(mods: tuple[nn.Module, ...]) -> list[nn.Module] | None:
    """The modules decode.c multiplies for mods (their outputs side by side): the fused module of a whole
    group in order, or each module; None when one is a kind decode.c does not run."""
    from llmkit.model.layers import FusedPart, _one_group

    if type(mods[0]) is FusedPart:
        return [mods[0].fused] if _one_group(mods) and _linear_kind(mods[0].fused) else None
    return list(mods) if all(_linear_kind(m) for m in mods) else None


def _linear_kind(m: nn.Module) -> int:
    """1 int4, 2 int8, 3 float32 nn.Linear (decode.c's kind + 1 for int4/int8; 0 = not runnable)."""
    from llmkit.quant import Int4Linear, Int8Linear, _packable, _use_kernels

    t = type(m)
    if t is nn.Linear:
        ok = m.weight.dtype == torch.float32 and (m.bias is None or m.bias.dtype == torch.float32)
        return 3 if ok else 0
    if t is Int4Linear:
        return 1 if _use_kernels() and _packable(m.out_features, m.in_features, m.group_size) else 0
    if t is Int8Linear:
        return 2 if m.in_features % 32 == 0 and m.scales.dtype == torch.float32 else 0
    return 0


class NativeDecode:
    """A decode.c plan over one model and one KV cache (see the module notes)."""

    def __init__(self, model: nn.Module, cache: Any):
        self.model, self.cache = model, cache
        self.lib = kernels._load()
        self.keep: list[torch.Tensor] = []  # every tensor a pointer below refers to
        self.floats = False  # a float32 matmul among the layers (then prefill is PyTorch's: MKL's GEMM)
        c = model.config
        self.layers = (_Layer * c.n_layers)()
        for i, layer in enumerate(model.model.layers):
            a, m, L = layer.self_attn, layer.mlp, self.layers[i]
            L.norm1 = self._ptr(layer.input_layernorm.weight)
            L.norm2 = self._ptr(layer.post_attention_layernorm.weight)
            qkv = _group((a.q_proj, a.k_proj, a.v_proj))
            gu = _group((m.gate_proj, m.up_proj))
            L.n_qkv, L.n_gu = len(qkv), len(gu)
            for j, mod in enumerate(qkv):
                self._fill(L.qkv[j], mod)
            for j, mod in enumerate(gu):
                self._fill(L.gu[j], mod)
            self._fill(L.o, a.o_proj)
            self._fill(L.down, m.down_proj)
            L.kc, L.vc = self._ptr(cache.k[i]), self._ptr(cache.v[i])
            L.window = c.sliding_window or 0 if c.is_sliding_layer(i) else 0
        self.plan = _Model(
            n_layers=c.n_layers, d=c.d_model, n_heads=c.n_heads, n_kv_heads=c.n_kv_heads, head_dim=c.head_dim,
            d_ff=c.d_ff, slots=cache.capacity, fine=int(kernels.ACTIVATIONS == "int16"), eps=c.norm_eps,
            scale=c.attn_scale if c.attn_scale is not None else 1 / math.sqrt(c.head_dim),
            cos=self._ptr(model.rope_cos), sin=self._ptr(model.rope_sin),
            norm=self._ptr(model.model.norm.weight), layers=self.layers,
            kv_bf16=int(cache.dtype == torch.bfloat16))
        self._embedding(model.model.embed_tokens)
        self._head(model)
        self.signature = _signature(model, cache)
        self.prof: torch.Tensor | None = None  # see profile()

    @classmethod
    def build(cls, model: nn.Module, cache: Any) -> NativeDecode | None:
        return None if why_not(model, cache) else cls(model, cache)

    def stale(self) -> bool:
        """True when the model's modules or storages are no longer the ones this plan points to."""
        return _signature(self.model, self.cache) != self.signature

    def _ptr(self, t: torch.Tensor) -> int:
        if not t.is_contiguous():
            raise ValueError("decode.c needs contiguous tensors")
        self.keep.append(t)
        return t.data_ptr()

    def _fill(self, s: _Linear, m: nn.Module) -> None:
        from llmkit.kernels import GSHIFT
        from llmkit.quant import LOW

        kind = _linear_kind(m)
        s.n, s.k = m.out_features, m.in_features
        if m.bias is not None:
            s.bias = self._ptr(m.bias.detach().float())
        if kind == 3:
            s.kind, s.w = 0, self._ptr(m.weight.detach())
            self.floats = True
        elif kind == 1:
            m.pack_()
            m.block_scales_()  # a row's (s, z) pairs side by side, where decode reads them
            sz = m.scales_and_zeros if m.scales_and_zeros.dtype == LOW else m.scales_and_zeros.to(LOW)
            s.kind, s.gshift, s.rb = 1, GSHIFT[m.group_size], m.sz_rows
            s.w, s.s = self._ptr(m.qweight), self._ptr(sz)
        else:
            s.kind, s.w, s.s = 2, self._ptr(m.qweight), self._ptr(m.scales)

    def _embedding(self, emb: nn.Module) -> None:
        """Point the plan at the embedding table when decode.c can look it up as the module does (a float32
        nn.Embedding, an Int8Embedding or Int4Embedding with float32 outputs); else Python looks up."""
        from llmkit.quant import LOW, Int4Embedding, Int8Embedding

        P = self.plan
        t = type(emb)
        if t is nn.Embedding and emb.weight.dtype == torch.float32 and emb.weight.is_contiguous():
            P.emb_kind, P.emb_w = 1, self._ptr(emb.weight)
        elif t in (Int8Embedding, Int4Embedding) and emb.out_dtype == torch.float32:
            scales = emb.scales if t is Int8Embedding else emb.scales_and_zeros
            if scales.dtype != (torch.float16 if t is Int8Embedding else LOW) or not (
                    emb.qweight.is_contiguous() and scales.is_contiguous()):
                return
            P.emb_kind, P.emb_gs = (2 if t is Int8Embedding else 3), emb.group_size
            P.emb_w, P.emb_s = self._ptr(emb.qweight), self._ptr(scales)
        else:
            return
        P.emb_rows = emb.num_embeddings

    def _head(self, model: nn.Module) -> None:
        """Point the plan at the vocabulary head when it is quantized (int4 / int8) and nothing follows it
        (no soft-cap): decode.c then writes the logits in the same call, with the module's own kernel (the
        same bits). A float head stays with PyTorch's GEMM."""
        head = model.lm_head
        if model.final_softcap is None and _linear_kind(head) in (1, 2):
            self._fill(self.plan.head, head)
            self.plan.head_on = 1

    def takes(self, tokens: int, hidden: bool) -> bool:
        """Whether a step of `tokens` tokens per row runs here: decode steps (with drafts, up to
        NATIVE_TOKENS) always; prefill chunks (hidden) of any length when every matmul is quantized
        (decode.c's plain float32 matmul is no match for PyTorch's GEMM on long prompts)."""
        return tokens <= NATIVE_TOKENS or (hidden and not self.floats)

    def hooked(self) -> bool:
        """A forward hook on the model itself (or a global one): this step must run the modules."""
        m = self.model
        return bool(m._forward_pre_hooks or m._forward_hooks or nn.modules.module._global_forward_hooks
                    or nn.modules.module._global_forward_pre_hooks)

    def profile(self, on: bool = True) -> None:
        """Start (or stop) timing one-token steps phase by phase (`split`): decode.c times its matmuls,
        attention and the head (this class a head PyTorch runs)."""
        self.prof = torch.zeros(5, dtype=torch.float64) if on else None  # decode.c's 4, then the head
        self.plan.prof = self.prof.data_ptr() if on else None

    def split(self) -> dict[str, float]:
        """ms per one-token step since `profile()` in the layers' matmuls, the head and attention."""
        p = self.prof.tolist()
        n = max(p[3], 1.0)
        return {"matmuls": 1e3 * p[0] / n, "head": 1e3 * p[4] / n, "attention": 1e3 * p[1] / n}

    @torch.no_grad()
    def __call__(self, ids: list[int], rows: list[int], positions: list[int], hidden: bool = False
                 ) -> torch.Tensor:
        """Logits (N, V) of tokens ids (N,) at `positions` of cache `rows`, their K/V written to the cache
        (a row's tokens at consecutive positions: a prefill chunk, or its speculative drafts after its last
        token); hidden: the final normed hidden states (N, d) instead."""
        model, n, plan = self.model, len(rows), ctypes.byref(self.plan)
        x = torch.empty(n, self.plan.d)
        where = (ctypes.c_int64 * (3 * n))(*ids, *rows, *positions)  # token ids, cache rows, positions
        logits = None if hidden or not self.plan.head_on else torch.empty(n, self.plan.head.n)
        at, out = ctypes.addressof(where), None if logits is None else logits.data_ptr()
        rc = self.lib.llmkit_decode(plan, n, x.data_ptr(), at + 8 * n, at + 16 * n, out, where)  # C looks up
        if rc == -2:  # no table in the plan, or a bad id (the module says which)
            x = model.model.embed_tokens(torch.tensor(ids)).float().contiguous()  # (N, d)
            rc = self.lib.llmkit_decode(plan, n, x.data_ptr(), at + 8 * n, at + 16 * n, out, None)
        if rc:
            raise MemoryError("llmkit native decode: out of memory")
        if hidden:
            return x  # (N, d)
        if logits is not None:
            return logits
        timed = self.prof is not None and len(rows) == 1
        t = time.perf_counter() if timed else 0.0
        logits = model.head(x)  # (N, V)
        if timed:
            self.prof[4] += time.perf_counter() - t
        return logits


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def _signature(model: nn.Module, cache: Any) -> tuple:
    """Identity of every module and storage a plan points to, and the number of forward hooks."""
    emb, head = model.model.embed_tokens, model.lm_head
    out: list[int] = [_hooks(model), *(id(t) for t in cache.k + cache.v), id(emb), id(head)]
    for m in (emb, head):
        out += [t.data_ptr() for t in (*m._parameters.values(), *m._buffers.values()) if t is not None]
    for layer in model.model.layers:
        for m in (layer.input_layernorm, layer.post_attention_layernorm, layer.self_attn.q_proj,
                  layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj, layer.mlp.gate_proj,
                  layer.mlp.up_proj, layer.mlp.down_proj):
            out.append(id(m))
            m = getattr(m, "fused", m)
            out += [t.data_ptr() for t in m._parameters.values() if t is not None]
            out += [t.data_ptr() for t in m._buffers.values() if t is not None]
    return tuple(out)

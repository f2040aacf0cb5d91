"""The model: one Transformer class for every supported family, its KV cache and RoPE helpers."""

from llmkit.model.kv_cache import KVCache
from llmkit.model.transformer import ModelOutput, MoE, Transformer, load_balancing_loss, param_counts

__all__ = ["KVCache", "ModelOutput", "MoE", "Transformer", "load_balancing_loss", "param_counts"]

"""The model: one Transformer class for every supported family, its KV cache, RoPE and projection helpers."""

from llmkit.model.kv_cache import KVCache
from llmkit.model.layers import FusedPart, project
from llmkit.model.transformer import ModelOutput, MoE, Transformer, load_balancing_loss, param_counts

__all__ = ["FusedPart", "KVCache", "ModelOutput", "MoE", "Transformer", "load_balancing_loss", "param_counts",
           "project"]

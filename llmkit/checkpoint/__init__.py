"""Checkpoints in and out: HF folders (config.json + safetensors) here; GGUF in llmkit/checkpoint/gguf.py."""

from llmkit.checkpoint.hf import build_model, load_hf_dir, save_hf_dir
from llmkit.model.transformer import param_counts

__all__ = ["build_model", "load_hf_dir", "param_counts", "save_hf_dir"]

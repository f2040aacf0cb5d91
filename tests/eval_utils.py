"""Shared by the evaluation tests: a tiny random transformers Llama with SmolLM2's real tokenizer, saved as an
HF folder that llmkit.load, transformers and lm-eval's `hf` model all open (the same weights for each)."""

from __future__ import annotations

from pathlib import Path

import pytest


def tiny_hf_llama(folder: Path, gguf: Path, *, seed: int = 0, max_len: int = 1024) -> Path:
    """Write a 2-layer random Llama (vocabulary = the default model's, 49,152 tokens) into `folder`."""
    transformers = pytest.importorskip("transformers")
    import torch

    from llmkit.tokenizer import Tokenizer

    if (folder / "config.json").exists():
        return folder
    tok = Tokenizer.from_gguf(gguf)
    cfg = transformers.LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_len,
        tie_word_embeddings=True, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, initializer_range=0.3,
        rms_norm_eps=1e-5,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).float().eval()
    model.save_pretrained(folder)
    tok.save(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_gguf) -> Path:
    return tiny_hf_llama(tmp_path_factory.mktemp("tiny_llama"), smollm2_gguf)

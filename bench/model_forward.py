"""Model forward speed: llmkit's Transformer vs transformers on the same weights, same run, A B A B.

A SmolLM2-135M-shaped Llama (30 layers, d_model 576, 9 heads / 3 KV heads, vocab 49152) with random
weights, built by transformers and loaded by llmkit from the same folder. Measures prefill (B=1, T tokens)
and one decode step (B=1, after T cached tokens): llmkit eager, llmkit torch.compile'd decode step (CUDA
only), transformers eager with its DynamicCache. Prints medians and llmkit/transformers ratios.

    .venv/bin/python bench/model_forward.py [--device cuda] [--tokens 512] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import transformers

from llmkit.checkpoint import load_hf_dir
from llmkit.model import KVCache

SMOLLM2 = dict(
    vocab_size=49152,
    hidden_size=576,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    intermediate_size=1536,
    max_position_embeddings=2048,
    rope_theta=100000.0,
    tie_word_embeddings=True,
)


def timed(fn, device: str, reps: int) -> float:
    """Median seconds of fn() over reps calls (after one warm-up)."""
    fn()
    out = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    dev, T = a.device, a.tokens
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**SMOLLM2))
    with tempfile.TemporaryDirectory() as d, torch.inference_mode():
        hf.save_pretrained(d)
        _, ours = load_hf_dir(d, device=dev, dtype=dtype)
        hf = hf.to(dev, dtype).eval()
        ids = torch.randint(0, 49152, (1, T + 1), device=dev)
        pos = torch.arange(T, device=dev)[None]
        cache = KVCache(ours.config, 1, T + 1, device=dev, dtype=dtype)
        ours(ids[:, :T], positions=pos, cache=cache)
        step_pos = torch.tensor([[T]], device=dev)
        compiled = torch.compile(ours, fullgraph=True) if dev == "cuda" else None
        hf_cache = hf(ids[:, :T], use_cache=True).past_key_values

        def hf_step():
            hf(ids[:, T:], past_key_values=hf_cache, use_cache=True)
            hf_cache.crop(-1)  # back to T cached tokens

        cases = {
            "prefill llmkit": lambda: ours(ids[:, :T]),
            "prefill transformers": lambda: hf(ids[:, :T]),
            "decode llmkit": lambda: ours(ids[:, T:], positions=step_pos, cache=cache),
            "decode transformers": hf_step,
        }
        if compiled is not None:
            cases["decode llmkit compiled"] = lambda: compiled(ids[:, T:], positions=step_pos, cache=cache)
        reps = 20 if dev == "cuda" else 3
        results: dict[str, list[float]] = {k: [] for k in cases}
        for _ in range(a.rounds):  # A B A B
            for name, fn in cases.items():
                results[name].append(timed(fn, dev, reps))
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"device={dev} dtype={dtype} context={T} (medians of {a.rounds} rounds)")
    for k, v in med.items():
        print(f"  {k:28s} {v * 1e3:8.2f} ms")
    print(
        f"  prefill llmkit/transformers time ratio: {med['prefill llmkit'] / med['prefill transformers']:.2f}"
    )
    print(
        f"  decode  llmkit/transformers time ratio: {med['decode llmkit'] / med['decode transformers']:.2f}"
    )
    if compiled is not None:
        r = med["decode llmkit compiled"] / med["decode transformers"]
        print(f"  decode  llmkit compiled/transformers time ratio: {r:.2f}")


if __name__ == "__main__":
    main()

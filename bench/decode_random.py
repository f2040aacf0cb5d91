"""Decode/prefill speed on random weights of SmolLM2-135M's shape: for machines without the GGUF file
(a GPU box), where only speed matters. CPU: llmkit fp32/int8/int4 vs HF transformers, rounds alternating;
CUDA: llmkit bf16 decode, eager vs torch.compile (CUDA graphs).

    python bench/decode_random.py --device cpu --threads 2
    python bench/decode_random.py --device cuda
"""

import argparse
import copy

import torch
from decode import hf_system  # bench/decode.py, next to this script

from llmkit.config import ModelConfig
from llmkit.generate.timing import engine_system, measure, time_decode
from llmkit.model import Transformer
from llmkit.quant import quantize_model

SMOLLM2_135M = ModelConfig(vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, d_ff=1536,
                           max_seq_len=8192, pos_encoding="rope", rope_theta=100000.0, norm="rmsnorm",
                           mlp="swiglu", activation="silu", tie_embeddings=True, norm_eps=1e-5)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    base = Transformer(SMOLLM2_135M).eval()
    prompt = torch.randint(0, 49152, (13,)).tolist()
    long = torch.randint(0, 49152, (512,)).tolist()
    if a.device == "cpu":
        systems = [engine_system("llmkit fp32", base, prompt, long, a.new_tokens),
                   *[engine_system(f"llmkit {m}", quantize_model(copy.deepcopy(base), m), prompt, long,
                                   a.new_tokens) for m in ("int8", "int4")],
                   hf_system(base, SMOLLM2_135M, prompt, long, a.new_tokens)]
    else:
        from llmkit.generate.engine import Engine

        gpu = copy.deepcopy(base).to(a.device, torch.bfloat16)
        gpu.reset_buffers(a.device)
        systems = [engine_system("llmkit bf16 eager", gpu, prompt, long, a.new_tokens)]
        comp = engine_system("llmkit bf16 compiled", gpu, prompt, long, a.new_tokens)
        eng = Engine(gpu, max_batch=1, max_seq_len=1024, compile=True)
        systems.append(_with_engine(comp, eng, prompt, a.new_tokens))
    for s in systems:
        if isinstance(s, str):
            print(s)
    systems = [s for s in systems if not isinstance(s, str)]
    measure(systems, a.rounds)
    ref = {s.name: max(s.results["decode"]) for s in systems}
    hf = next((v for k, v in ref.items() if k.startswith("HF")), None)
    for s in systems:
        d, p = max(s.results["decode"]), max(s.results["prefill"] or [float("nan")])
        x_hf = d / hf if hf else float("nan")
        print(f"{s.name:24} decode {d:8.1f} tok/s  x HF {x_hf:5.2f}  prefill {p:8.1f} tok/s")


def _with_engine(system, eng, prompt, n_new):
    """Point `system.decode` at a given (compiled) engine."""
    from llmkit.generate.sampling import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=n_new, ignore_eos=True)

    def decode() -> float:
        return time_decode(eng, prompt, params, warmup_tokens=4)  # warm-up also compiles

    system.decode, system.prefill = decode, None
    return system


if __name__ == "__main__":
    main()

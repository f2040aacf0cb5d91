"""Decode / prefill / perplexity benchmark of the engine against llama.cpp and HF transformers, same run.

    python bench/decode.py        or        llmkit bench decode [--threads 2 --new-tokens 128 ...]

Notable choices:
- The machine's memory bandwidth is measured first (a large tensor copy, bytes read + written) and every
  decode figure is also shown as a % of its roofline: bandwidth / bytes of weights read per token.
- Peers run in the same process on the same weights: llama.cpp (llama-cpp-python) on the GGUF file itself,
  HF transformers on our dequantised weights loaded into LlamaForCausalLM (same numbers as its GGUF loader,
  without the slow conversion). Systems alternate round by round (A B C A B C) so a noisy, shared machine
  hits them alike; each figure is the best round, and ratios compare figures of the same run.
- Perplexity: `--ppl-windows` windows of 512 tokens of a French novella, the same token ids for every system.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

PROMPT = "Il était une fois, dans un petit village de Bretagne,"


def memory_bandwidth_gbs(mb: int = 256, repeats: int = 5) -> float:
    """Copy bandwidth in GB/s, counting bytes read and written (best of `repeats`)."""
    src = torch.ones(mb * 2**20 // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * 4 / best / 1e9


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: every matmul's weights (quantized: what the kernel reads;
    fused projections counted once), norms, and one row of the embedding table."""
    from llmkit.quant import QuantLinear

    members = {id(m) for g in getattr(model, "_fused_groups", []) for m in g.members}
    total, seen = 0, set()
    for mod in model.modules():
        if id(mod) in members:
            continue
        if isinstance(mod, QuantLinear):
            total += mod.kernel_bytes()
            continue
        for p in mod.parameters(recurse=False):
            if isinstance(mod, torch.nn.Embedding):
                total += p[0].numel() * p.element_size()  # a lookup reads one row
            elif p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                total += p.numel() * p.element_size()
    return total


@dataclass
class System:
    name: str
    decode: Callable[[], float]  # -> tok/s
    prefill: Callable[[], float] | None = None  # -> tok/s
    bytes_per_token: int = 0
    results: dict[str, list[float]] = field(default_factory=lambda: {"decode": [], "prefill": []})


def time_decode(eng, prompt_ids: list[int], params, warmup_tokens: int = 2) -> float:
    """tok/s of one greedy decode of `params.max_tokens` tokens in row 0, after a short warm-up."""
    list(eng.generate_ids(prompt_ids, params.replace(max_tokens=warmup_tokens)))
    eng.ids[0] = []  # no prefix reuse between rounds
    row = eng.add(prompt_ids, params)
    t = time.perf_counter()
    n = 0
    while eng.running:
        n += len(eng.step())
    dt = time.perf_counter() - t
    eng.remove(row)
    return n / dt


def _ours(name: str, model, prompt_ids: list[int], long_ids: list[int], n_new: int) -> System:
    from llmkit.generate.engine import Engine
    from llmkit.generate.sampling import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=n_new, ignore_eos=True)
    eng = Engine(model, max_batch=1, max_seq_len=max(1024, len(long_ids) + 8))

    def decode() -> float:
        return time_decode(eng, prompt_ids, params)

    def prefill() -> float:
        eng.ids[0] = []
        t = time.perf_counter()
        row = eng.add(long_ids, params)
        dt = time.perf_counter() - t
        eng.remove(row)
        return len(long_ids) / dt

    return System(name, decode, prefill, weight_bytes_per_token(model))


def _hf(model, config, prompt_ids, long_ids, n_new) -> System | str:
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as e:
        return f"peer unavailable ({e})"
    hf_cfg = config.to_hf()
    cfg = AutoConfig.for_model(**hf_cfg)
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    hf.load_state_dict(model.state_dict(), strict=False)
    hf.tie_weights()
    ids = torch.tensor([prompt_ids])
    long = torch.tensor([long_ids])

    @torch.inference_mode()
    def decode() -> float:
        t = time.perf_counter()
        out = hf.generate(ids, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
        return (out.shape[1] - ids.shape[1]) / (time.perf_counter() - t)

    @torch.inference_mode()
    def prefill() -> float:
        t = time.perf_counter()
        hf(long, use_cache=False)
        return long.shape[1] / (time.perf_counter() - t)

    return System("HF transformers fp32", decode, prefill, weight_bytes_per_token(model))


def _llamacpp(gguf: Path, threads: int, prompt_ids, long_ids, n_new) -> System | str:
    try:
        from llama_cpp import Llama
    except ImportError:
        return "peer unavailable (llama_cpp not importable)"
    llm = Llama(model_path=str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=1024, n_batch=512,
                verbose=False, seed=0)

    def decode() -> float:
        llm.reset()
        llm.eval(prompt_ids)
        t = time.perf_counter()
        for _ in range(n_new):
            tok = llm.sample(top_k=1, temp=0.0)
            llm.eval([tok])
        return n_new / (time.perf_counter() - t)

    def prefill() -> float:
        llm.reset()
        t = time.perf_counter()
        llm.eval(long_ids)
        return len(long_ids) / (time.perf_counter() - t)

    return System("llama.cpp (GGUF Q4_1)", decode, prefill, _gguf_tensor_bytes(gguf))


def _gguf_tensor_bytes(path: Path) -> int:
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(str(path)).tensors)


def perplexity_windows(tokenizer, n_windows: int, size: int = 512) -> list[list[int]]:
    from llmkit.errors import LlmkitError

    root = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "corpus" / "fr-nouvelles19"
    files = sorted(root.glob("*.txt"))
    if not files:
        raise LlmkitError(f"no novella found under {root}")
    ids = tokenizer.encode(files[0].read_text(encoding="utf-8"))
    if len(ids) < n_windows * size:
        raise LlmkitError(f"{files[0]} has {len(ids)} tokens, fewer than {n_windows} x {size}")
    return [ids[i * size : (i + 1) * size] for i in range(n_windows)]


@torch.inference_mode()
def model_perplexity(model, windows: list[list[int]]) -> float:
    nll, n = 0.0, 0
    for w in windows:
        x = torch.tensor([w])
        logits = model(x)[0].float()  # (T, V)
        nll += torch.nn.functional.cross_entropy(logits[:-1], x[0, 1:], reduction="sum").item()
        n += len(w) - 1
    return float(torch.tensor(nll / n).exp())


def llamacpp_perplexity(gguf: Path, windows: list[list[int]], threads: int) -> float | str:
    try:
        import numpy as np
        from llama_cpp import Llama
    except ImportError:
        return "peer unavailable"
    llm = Llama(model_path=str(gguf), n_threads=threads, n_ctx=len(windows[0]), n_batch=len(windows[0]),
                logits_all=True, verbose=False)
    nll, n = 0.0, 0
    for w in windows:
        llm.reset()
        llm.eval(w)
        logits = np.asarray(llm.scores[: len(w)], dtype=np.float64)  # (T, V)
        lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        nll += float((lse[:-1] - logits[np.arange(len(w) - 1), w[1:]]).sum())
        n += len(w) - 1
    return float(np.exp(nll / n))


def run(model_path: str | None = None, *, threads: int = 2, new_tokens: int = 128, prefill_tokens: int = 512,
        rounds: int = 3, modes: tuple[str, ...] = ("fp32", "bf16", "int8", "int4"), peers: bool = True,
        ppl_windows: int = 8, out: str | None = None) -> dict:
    import llmkit
    from llmkit.hub import DEFAULT_MODEL
    from llmkit.quant import quantize_model

    torch.set_num_threads(threads)
    bw = memory_bandwidth_gbs()
    print(f"threads {threads} | memory bandwidth (copy, read+write) {bw:.1f} GB/s", flush=True)
    llm = llmkit.load(model_path or DEFAULT_MODEL, device="cpu", dtype="float32")
    prompt_ids = llm.tokenizer.encode(PROMPT, add_special_tokens=True)
    windows = perplexity_windows(llm.tokenizer, max(ppl_windows, 1))
    long_ids = windows[0][:prefill_tokens]

    variants: dict[str, torch.nn.Module] = {}
    for mode in modes:
        if mode == "fp32":
            variants[mode] = llm.model
        elif mode == "bf16":
            variants[mode] = copy.deepcopy(llm.model).to(torch.bfloat16)
        else:
            variants[mode] = quantize_model(copy.deepcopy(llm.model), mode)
    systems = [_ours(f"llmkit {m}", v, prompt_ids, long_ids, new_tokens) for m, v in variants.items()]
    notes = []
    if peers:
        for peer in (_llamacpp(llm.path, threads, prompt_ids, long_ids, new_tokens),
                     _hf(llm.model, llm.config, prompt_ids, long_ids, new_tokens)):
            (systems.append if isinstance(peer, System) else notes.append)(peer)
    for note in notes:
        print(note, flush=True)

    for r in range(rounds):  # A B C ... A B C: noise hits every system alike
        for s in systems:
            s.results["decode"].append(s.decode())
            if s.prefill:
                s.results["prefill"].append(s.prefill())
        line = ", ".join(f"{s.name} {s.results['decode'][-1]:.1f}" for s in systems)
        print(f"round {r + 1}/{rounds}: {line}", flush=True)

    report: dict = {"threads": threads, "bandwidth_gbs": bw, "new_tokens": new_tokens,
                    "prefill_tokens": len(long_ids), "systems": {}}
    ref = {s.name: max(s.results["decode"]) for s in systems}
    llama = next((v for k, v in ref.items() if k.startswith("llama.cpp")), None)
    hf = next((v for k, v in ref.items() if k.startswith("HF")), None)
    print(f"\n{'system':24} {'decode tok/s':>12} {'% roofline':>10} {'x llama.cpp':>11} {'x HF':>6} "
          f"{'prefill tok/s':>13}")
    for s in systems:
        d = max(s.results["decode"])
        p = max(s.results["prefill"]) if s.results["prefill"] else float("nan")
        roof = bw * 1e9 / s.bytes_per_token if s.bytes_per_token else float("nan")
        row = {"decode_tok_s": d, "decode_rounds": s.results["decode"], "prefill_tok_s": p,
               "bytes_per_token": s.bytes_per_token, "roofline_tok_s": roof, "pct_roofline": 100 * d / roof,
               "x_llamacpp": d / llama if llama else None, "x_hf": d / hf if hf else None}
        report["systems"][s.name] = row
        print(f"{s.name:24} {d:12.1f} {row['pct_roofline']:9.0f}% "
              f"{(f'{d / llama:.2f}' if llama else '-'):>11} {(f'{d / hf:.2f}' if hf else '-'):>6} {p:13.1f}")

    if ppl_windows:
        ppl = {f"llmkit {m}": model_perplexity(v, windows) for m, v in variants.items() if m != "bf16"}
        ppl["llama.cpp (GGUF Q4_1)"] = llamacpp_perplexity(llm.path, windows, threads) if peers else "skipped"
        report["perplexity"] = ppl
        print(f"\nFrench perplexity, {ppl_windows} windows x 512 tokens:")
        for k, v in ppl.items():
            print(f"  {k:24} {v if isinstance(v, str) else f'{v:.2f}'}")
    report["decode_median"] = {s.name: statistics.median(s.results["decode"]) for s in systems}
    if out:
        Path(out).write_text(json.dumps(report, indent=2) + "\n")
    return report

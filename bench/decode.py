"""Decode/prefill/perplexity benchmark: llmkit (fp32, bf16, int8, int4) vs llama.cpp and HF transformers,
in the same run.

    python bench/decode.py [MODEL] [--threads 2 --new-tokens 128 --text FILE --no-peers ...]

llmkit's part is `llmkit bench decode` (llmkit.generate.timing: memory roofline, rounds alternating A B C,
best round per system); this script adds the peers on the same weights, each in a process of its own
(started once, then driven round by round through a pipe, so the rounds still alternate): in one process
llama.cpp's OpenMP runtime (another libgomp than PyTorch's), its threads and HF's model cost llmkit ~25 %
of its decode speed here (47.7 vs 61.1 tok/s on 2026-12-01), which measures the mix, not llmkit.
`--same-process` keeps the old way.
- llama.cpp (llama-cpp-python) on the GGUF file itself; its perplexity from its own logits;
- HF transformers on our dequantised weights loaded into its model class (same numbers as its GGUF loader,
  without the slow conversion), in float32 and in bfloat16 (the prefill reference: on a CPU with AVX-512 BF16
  its matmuls run natively in bfloat16).
Perplexity: the same token ids for every system, by default from the first French novella under
../shared/data/corpus/fr-nouvelles19 (or --text FILE).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time
from pathlib import Path

import torch

from llmkit.checkpoint.gguf import GGUFFile
from llmkit.cli.bench import add_decode_arguments, batch_sizes
from llmkit.errors import LlmkitError
from llmkit.generate.timing import System, run, weight_bytes_per_token

# llama.cpp's CPU build for an AVX-512 machine whose AMX tiles a VM does not enable (-march=native would
# use them: SIGILL on `tilezero`)
NO_AMX = ("-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON "
          "-DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON "
          "-DGGML_AVX_VNNI=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF")
NOVELLAS = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpus" / "fr-nouvelles19"


def hf_system(model, config, prompt_ids: list[int], long_ids: list[int], n_new: int, bf16: bool = False
              ) -> System | str:
    """HF transformers fp32 (or bf16) with `model`'s weights: greedy generate of n_new tokens, one prefill
    forward."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as e:
        return f"peer unavailable ({e})"
    cfg = AutoConfig.for_model(**config.to_hf())
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    hf.load_state_dict(model.state_dict(), strict=False)
    hf.tie_weights()
    if bf16:
        hf = hf.to(torch.bfloat16)
    ids, long = torch.tensor([prompt_ids]), torch.tensor([long_ids])

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

    if bf16:
        nbytes = weight_bytes_per_token(model) // 2
        return System("HF transformers bf16", decode, prefill, nbytes, ref="HF bf16")
    return System("HF transformers fp32", decode, prefill, weight_bytes_per_token(model), ref="HF")


def llamacpp_system(gguf: Path, threads: int, prompt_ids: list[int], long_ids: list[int], n_new: int
                    ) -> System | str:
    """llama.cpp on the GGUF file: greedy decode of n_new tokens, prefill, perplexity on 512-token windows."""
    try:
        import numpy as np
        from llama_cpp import Llama
    except ImportError:
        return "peer unavailable (llama_cpp not importable)"
    if Path(gguf).suffix != ".gguf":
        return f"llama.cpp peer skipped: {gguf} is not a GGUF file"
    llm = Llama(model_path=str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=1024, n_batch=512,
                verbose=False, seed=0)

    def decode() -> float:
        llm.reset()
        llm.eval(prompt_ids)
        t = time.perf_counter()
        for _ in range(n_new):
            llm.eval([llm.sample(top_k=1, temp=0.0)])
        return n_new / (time.perf_counter() - t)

    def prefill() -> float:
        llm.reset()
        t = time.perf_counter()
        llm.eval(long_ids)
        return len(long_ids) / (time.perf_counter() - t)

    def perplexity(ids: list[int], size: int = 512) -> float:
        scorer = Llama(model_path=str(gguf), n_threads=threads, n_ctx=size, n_batch=size, logits_all=True,
                       verbose=False)
        nll, n = 0.0, 0
        for i in range(0, len(ids) - size + 1, size):  # disjoint windows, as llmkit.score.perplexity
            w = ids[i : i + size]
            scorer.reset()
            scorer.eval(w)
            logits = np.asarray(scorer.scores[:size], dtype=np.float64)  # (T, V)
            lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
            nll += float((lse[:-1] - logits[np.arange(size - 1), w[1:]]).sum())
            n += size - 1
        return float(np.exp(nll / n))

    nbytes = sum(t.n_bytes for t in GGUFFile(gguf).tensor_infos())
    return System("llama.cpp (GGUF Q4_1)", decode, prefill, nbytes, perplexity, ref="llama.cpp")


def peers(llm, prompt_ids: list[int], long_ids: list[int], n_new: int, threads: int) -> list[System | str]:
    return [llamacpp_system(llm.path, threads, prompt_ids, long_ids, n_new),
            hf_system(llm.model, llm.config, prompt_ids, long_ids, n_new),
            hf_system(llm.model, llm.config, prompt_ids, long_ids, n_new, bf16=True)]


def _make_peer(kind: str, path: str, threads: int, prompt_ids, long_ids, n_new: int) -> System | str:
    if kind == "llama.cpp":
        return llamacpp_system(Path(path), threads, prompt_ids, long_ids, n_new)
    import llmkit

    torch.set_num_threads(threads)
    llm = llmkit.load(path, device="cpu", dtype="float32")
    return hf_system(llm.model, llm.config, prompt_ids, long_ids, n_new, bf16=kind == "hf-bf16")


def _serve_peer(conn, kind: str, *args) -> None:
    """Child process: build one peer, then run what the parent asks ("decode", "prefill", "perplexity")."""
    peer = _make_peer(kind, *args)
    if isinstance(peer, str):
        conn.send(peer)
        return
    conn.send(("ready", peer.name, peer.bytes_per_token, peer.ref, peer.perplexity is not None))
    while True:
        try:
            what, arg = conn.recv()
        except EOFError:  # the parent is done
            return
        fn = getattr(peer, what)
        conn.send(fn(arg) if arg is not None else fn())


def isolated_peers(llm, prompt_ids: list[int], long_ids: list[int], n_new: int, threads: int
                   ) -> list[System | str]:
    """The peers, each in a spawned process of its own; System objects whose calls go through a pipe."""
    out: list[System | str] = []
    ctx = mp.get_context("spawn")
    for kind in ("llama.cpp", "hf", "hf-bf16"):
        here, there = ctx.Pipe()
        args = (there, kind, str(llm.path), threads, prompt_ids, long_ids, n_new)
        proc = ctx.Process(target=_serve_peer, args=args, daemon=True)
        proc.start()
        msg = here.recv()
        if isinstance(msg, str):
            out.append(msg)
            continue
        _, name, nbytes, ref, has_ppl = msg

        def call(what, arg=None, here=here, proc=proc, name=name):
            here.send((what, arg))
            try:
                return here.recv()
            except EOFError:
                proc.join(5)
                hint = "" if proc.exitcode != -4 else (
                    " (SIGILL: instructions this CPU or VM refuses, e.g. AMX tiles under a hypervisor; "
                    f"rebuild llama-cpp-python with CMAKE_ARGS='{NO_AMX}')")
                raise LlmkitError(f"{name}: its process died, exit code {proc.exitcode}{hint}") from None

        out.append(System(f"{name} (own process)", lambda call=call: call("decode"),
                          lambda call=call: call("prefill"), nbytes,
                          (lambda ids, call=call: call("perplexity", ids)) if has_ppl else None, ref=ref))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_decode_arguments(ap)
    ap.add_argument("--no-peers", action="store_true", help="skip llama.cpp and HF transformers")
    ap.add_argument("--same-process", action="store_true",
                    help="run the peers in this process (default: each in its own)")
    a = ap.parse_args()
    text = a.text or next(iter(sorted(NOVELLAS.glob("*.txt"))), None)
    if text is None and a.ppl_windows:
        print(f"no novella under {NOVELLAS}: perplexity skipped (pass --text FILE)")
    run(a.model, threads=a.threads, new_tokens=a.new_tokens, prefill_tokens=a.prefill_tokens, rounds=a.rounds,
        modes=tuple(a.modes.split(",")), text=text, ppl_windows=a.ppl_windows,
        peers=None if a.no_peers else peers if a.same_process else isolated_peers, out=a.out,
        batches=batch_sizes(a.batches))


if __name__ == "__main__":
    main()

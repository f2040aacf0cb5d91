"""Gemma 3 270M (Q4_K_M GGUF): llmkit against llama.cpp (llama-cpp-python) on the same file, and against
SmolLM2-135M on French.

    python bench/gemma3.py [--quick] [--threads 2] [--out gemma3.json]

Runs only where `llama_cpp` is importable (a bench dependency, not a test one). Measured, in one run:
1. tokenizer: ids of llmkit == llama.cpp's (add_bos off, specials not parsed) on 300 KB of French novels;
2. greedy decoding, 32 tokens on three prompts (one French), each system with its own KV cache:
   a. on the Q4_K_M file itself. llama.cpp's CPU kernels quantize the activations too (to 8 bits, for the
      Q4_K/Q5_0/Q6_K dot products) and keep its KV cache in float16, while llmkit (like transformers, which
      it matches bit for bit on this file) computes in float32 on the dequantised weights: logits differ by
      ~0.13 on average, so a near-tie can flip. The first difference is reported with both systems' margin
      between the two tokens;
   b. on the same dequantised weights: the file rewritten with float32 tensors (gguf-py's dequantize, same
      metadata) and llama.cpp's KV cache in float32: the tokens must be equal;
3. perplexity on the same ids: 8 windows of 512 tokens (<bos> + 511 text tokens), every text token scored;
   llama.cpp's from its logits (logits_all=True, log-softmax computed here in float64), llmkit's from
   `llmkit.score.perplexity`; they must agree within 1 %;
4. French bits per byte, Gemma 3 vs SmolLM2-135M-Instruct (llmkit, both), on the same text: each model's
   summed NLL over all tokens of the text / ln 2 / its UTF-8 bytes (windows of <bos> + 511 tokens);
5. decode speed (greedy, one sequence) llmkit fp32 vs llama.cpp, rounds alternating A B A B, best round.
A table is printed and the figures written as JSON (--out). --quick: 30 KB, one prompt, 2 windows, short
decode (a smoke run; its figures are not the ones to quote).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "corpus"
PROMPTS = [
    "Il était une fois, dans un petit village au bord de la mer, une vieille femme qui",
    "The three most important inventions of the nineteenth century were",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
]
WINDOW = 512


def french_text(folder: Path, n_bytes: int) -> str:
    """The first `n_bytes` of the concatenated novels (cut at a character boundary)."""
    parts, size = [], 0
    for f in sorted(folder.glob("*.txt")):
        parts.append(f.read_text(encoding="utf-8"))
        size += len(parts[-1].encode())
        if size >= n_bytes:
            break
    return "".join(parts).encode()[:n_bytes].decode("utf-8", errors="ignore")


def first_diff(a: list[int], b: list[int]) -> int | None:
    """Index of the first difference (None when equal)."""
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


# ------------------------------------------------------------------------------------------ llama.cpp side
class LlamaCpp:
    def __init__(self, path: Path, threads: int, n_ctx: int, f32_cache: bool = False):
        from llama_cpp import Llama

        self.path, self.threads = path, threads
        cache = {"type_k": 0, "type_v": 0} if f32_cache else {}  # GGML_TYPE_F32 (default: F16)
        self.llm = Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                         n_batch=WINDOW, verbose=False, seed=0, **cache)
        self._scorer = None

    def last_logits(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return np.ctypeslib.as_array(self.llm._ctx.get_logits_ith(-1), shape=(self.llm.n_vocab(),)).copy()

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def greedy(self, ids: list[int], n: int) -> tuple[list[int], float]:
        """n greedy tokens (argmax of llama.cpp's own logits) and the decode tok/s."""
        llm, n_vocab = self.llm, self.llm.n_vocab()
        llm.reset()
        llm.eval(ids)
        out, t = [], time.perf_counter()
        for _ in range(n):  # the last position's logits (llama_get_logits_ith(-1)): no sampler involved
            logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))  # (V,)
            out.append(int(np.argmax(logits)))
            llm.eval([out[-1]])
        return out, n / (time.perf_counter() - t)

    def nll(self, windows: list[list[int]]) -> tuple[float, int]:
        """Summed NLL (nats) of tokens 1.. of each window, from llama.cpp's logits, and their count."""
        from llama_cpp import Llama

        if self._scorer is None:
            self._scorer = Llama(model_path=str(self.path), n_threads=self.threads,
                                 n_threads_batch=self.threads, n_ctx=WINDOW, n_batch=WINDOW, logits_all=True,
                                 verbose=False)
        s, total, count = self._scorer, 0.0, 0
        for w in windows:
            s.reset()
            s.eval(w)
            logits = np.asarray(s.scores[: len(w)], dtype=np.float64)  # (T, V)
            m = logits.max(-1, keepdims=True)
            lse = (np.log(np.exp(logits - m).sum(-1, keepdims=True)) + m)[:, 0]  # (T,)
            total += float((lse[:-1] - logits[np.arange(len(w) - 1), w[1:]]).sum())
            count += len(w) - 1
        return total, count


# ---------------------------------------------------------------------------------------------- llmkit side
def llmkit_greedy(llm, ids: list[int], n: int) -> tuple[list[int], float]:
    r = llm.generate(ids, max_tokens=n, temperature=0.0, ignore_eos=True)
    return r.token_ids, r.timings.get("decode_tokens_per_s", float("nan"))


def llmkit_nll(model, windows: list[list[int]]) -> tuple[float, int]:
    from llmkit.score import perplexity

    got = [perplexity(model, w, window=len(w)) for w in windows]
    return sum(p.nll for p in got), sum(p.tokens for p in got)


def dense_copy(src: Path, dst: Path) -> None:
    """`src` rewritten with every tensor dequantised to float32 (gguf-py), metadata unchanged."""
    import gguf

    from llmkit.io import read_gguf

    index = read_gguf(src)
    V = gguf.GGUFValueType
    w = gguf.GGUFWriter(str(dst), index.metadata["general.architecture"])
    arrays = {"tokenizer.ggml.token_type": V.INT32, "tokenizer.ggml.scores": V.FLOAT32}  # llama.cpp wants
    scalar = {bool: V.BOOL, int: V.UINT32, float: V.FLOAT32, str: V.STRING}
    for k, v in index.metadata.items():
        if k in ("general.architecture", "general.file_type"):
            continue
        if isinstance(v, list):
            w.add_key_value(k, v, V.ARRAY, sub_type=arrays.get(k, scalar[type(v[0])]))
        else:
            w.add_key_value(k, v, scalar[type(v)])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    raw = np.memmap(src, dtype=np.uint8, mode="r")
    for t in index.tensors:
        q = gguf.GGMLQuantizationType(t.ggml_type)
        block, size = gguf.GGML_QUANT_SIZES[q]
        shape = tuple(reversed(t.dims))  # numpy order
        data = np.asarray(raw[t.offset: t.offset + math.prod(shape) // block * size])
        w.add_tensor(t.name, gguf.quants.dequantize(data.reshape(*shape[:-1], -1), q).reshape(shape)
                     .astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def compare_greedy(llm, lc: LlamaCpp, prompt: str, steps: int) -> dict:
    tok = llm.tokenizer
    ids = tok.encode(prompt, add_special_tokens=True)
    ours, _ = llmkit_greedy(llm, ids, steps)
    theirs, _ = lc.greedy(ids, steps)
    k = first_diff(ours, theirs)
    out = {"prompt": prompt, "steps": steps, "equal": k is None, "first_diff": k, "llmkit": tok.decode(ours),
           "llama_cpp": tok.decode(theirs)}
    if k is not None:  # the two tokens' logit gap in each system, on the common prefix
        prefix = ids + ours[:k]
        with torch.inference_mode():
            la = llm.model(torch.tensor([prefix]))[0, -1].double().numpy()  # (V,)
        lb = lc.last_logits(prefix).astype(np.float64)
        a, b = ours[k], theirs[k]
        out["margin_llmkit"], out["margin_llama_cpp"] = float(la[a] - la[b]), float(lb[b] - lb[a])
        out["logits_mean_abs_diff"] = float(np.abs(la - lb).mean())
    return out


def windows_of(ids: list[int], bos: int, n: int | None = None) -> list[list[int]]:
    """<bos> + 511 text ids per window (the last may be shorter); the first `n` windows if given."""
    step = WINDOW - 1
    out = [[bos, *ids[i: i + step]] for i in range(0, len(ids), step)]
    return out[:n] if n else out


def bits_per_byte(model, tok, text: str) -> dict:
    ids = tok.encode(text)
    nll, count = llmkit_nll(model, windows_of(ids, tok.bos_id))
    assert count == len(ids)
    n_bytes = len(text.encode("utf-8"))
    return {"tokens": len(ids), "bytes": n_bytes, "bits_per_byte": nll / math.log(2) / n_bytes,
            "ppl_token": math.exp(nll / count)}


# -------------------------------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="the Gemma 3 GGUF (default: the cached gemma-3-270m)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 30 KB, one prompt, 2 windows")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    a = ap.parse_args()
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("bench/gemma3.py needs llama-cpp-python (pip install llama-cpp-python): skipped")
        return 0
    import llmkit
    from llmkit import hub

    torch.set_num_threads(a.threads)
    gemma = Path(a.model) if a.model else hub.pull("gemma-3-270m")
    n_bytes, prompts, steps, n_windows = (30_000, PROMPTS[:1], 8, 2) if a.quick else (300_000, PROMPTS, 32, 8)
    n_decode, rounds = (16, 1) if a.quick else (128, 3)
    report: dict = {"model": str(gemma), "threads": a.threads, "quick": a.quick}

    t = time.perf_counter()
    llm = llmkit.load(gemma, device="cpu", dtype="float32")
    report["llmkit_load_s"] = time.perf_counter() - t
    tok = llm.tokenizer
    lc = LlamaCpp(gemma, a.threads, n_ctx=1024)

    # 1. tokenizer
    text = french_text(DATA / "fr-roman19", n_bytes)
    t = time.perf_counter()
    ours = tok.encode(text)
    t_ours = time.perf_counter() - t
    t = time.perf_counter()
    theirs = lc.tokenize(text)
    t_theirs = time.perf_counter() - t
    report["tokenizer"] = {"bytes": len(text.encode()), "tokens": len(ours), "equal": ours == theirs,
                           "first_diff": first_diff(ours, theirs), "llmkit_s": t_ours,
                           "llama_cpp_s": t_theirs}

    # 2. greedy decoding: a. the Q4_K_M file; b. the same weights dequantised, float32 everywhere
    report["greedy_q4_k_m"] = [compare_greedy(llm, lc, p, steps) for p in prompts]
    with tempfile.TemporaryDirectory(dir=gemma.parent) as tmp:
        dense_copy(gemma, Path(tmp) / "f32.gguf")
        lc32 = LlamaCpp(Path(tmp) / "f32.gguf", a.threads, n_ctx=1024, f32_cache=True)
        report["greedy_f32"] = [compare_greedy(llm, lc32, p, steps) for p in prompts]
        del lc32

    # 3. perplexity on the same ids
    novella = french_text(DATA / "fr-nouvelles19", 40_000)
    wins = windows_of(tok.encode(novella), tok.bos_id, n_windows)
    assert len(wins) == n_windows and all(len(w) == WINDOW for w in wins), "text too short for the windows"
    nll_ours, n_ours = llmkit_nll(llm.model, wins)
    nll_theirs, n_theirs = lc.nll(wins)
    ppl_ours, ppl_theirs = math.exp(nll_ours / n_ours), math.exp(nll_theirs / n_theirs)
    ratio = ppl_ours / ppl_theirs
    report["perplexity"] = {"windows": n_windows, "tokens": n_ours, "llmkit": ppl_ours,
                            "llama_cpp": ppl_theirs, "ratio": ratio, "within_1pct": abs(ratio - 1) < 0.01}

    # 4. bits per byte on the same text: Gemma 3 vs SmolLM2
    bpb_text = tok.decode_bytes([i for w in wins for i in w[1:]]).decode("utf-8", "ignore")  # the same text
    report["bits_per_byte"] = {"text_bytes": len(bpb_text.encode()),
                               "gemma-3-270m": bits_per_byte(llm.model, tok, bpb_text)}
    smol_path = hub.named_model_path(hub.DEFAULT_MODEL)
    if smol_path.is_file():
        smol = llmkit.load(smol_path, device="cpu", dtype="float32")
        report["bits_per_byte"][hub.DEFAULT_MODEL] = bits_per_byte(smol.model, smol.tokenizer, bpb_text)
        del smol
    else:
        print(f"{smol_path} not cached: SmolLM2 bits per byte skipped (llmkit pull {hub.DEFAULT_MODEL})")

    # 5. decode speed, alternating rounds
    ids = tok.encode(PROMPTS[0], add_special_tokens=True)
    systems = {"llmkit fp32": lambda: llmkit_greedy(llm, ids, n_decode)[1],
               "llama.cpp Q4_K_M": lambda: lc.greedy(ids, n_decode)[1]}
    try:
        llm8 = llmkit.load(gemma, device="cpu", dtype="float32", quantize="int8")
        systems["llmkit int8"] = lambda: llmkit_greedy(llm8, ids, n_decode)[1]
    except Exception as e:  # a bench reports what it could not measure
        report["llmkit_int8_error"] = f"{type(e).__name__}: {e}"
    speeds: dict[str, list[float]] = {k: [] for k in systems}
    for _ in range(rounds):
        for k, fn in systems.items():
            speeds[k].append(fn())
    report["decode_tok_s"] = {k: max(v) for k, v in speeds.items()}
    report["decode_tok_s"]["ratio_llmkit_over_llama_cpp"] = (report["decode_tok_s"]["llmkit fp32"]
                                                             / report["decode_tok_s"]["llama.cpp Q4_K_M"])
    print_table(report)
    if a.out:
        from llmkit.io import atomic_write_json

        atomic_write_json(a.out, report)
        print(f"wrote {a.out}")
    ok = (report["tokenizer"]["equal"] and all(g["equal"] for g in report["greedy_f32"])
          and report["perplexity"]["within_1pct"])
    return 0 if ok else 1


def print_table(r: dict) -> None:
    tk, pp, dec = r["tokenizer"], r["perplexity"], r["decode_tok_s"]
    rows = [
        ("tokenizer ids == llama.cpp",
         f"{tk['equal']} ({tk['bytes']:,} bytes, {tk['tokens']:,} tokens; llmkit {tk['llmkit_s']:.2f} s, "
         f"llama.cpp {tk['llama_cpp_s']:.2f} s)"),
        *((f"greedy x{g['steps']} == llama.cpp, {kind} [{g['prompt'][:20]!r}]",
           f"{g['equal']}" + ("" if g["equal"] else
                              f" (first difference at step {g['first_diff']}: margin llmkit "
                              f"{g['margin_llmkit']:.3f}, llama.cpp {g['margin_llama_cpp']:.3f}; mean |logit "
                              f"diff| {g['logits_mean_abs_diff']:.3f})"))
          for kind, key in (("Q4_K_M", "greedy_q4_k_m"), ("dequantised F32", "greedy_f32")) for g in r[key]),
        (f"perplexity, {pp['windows']} x {WINDOW} tokens", f"llmkit {pp['llmkit']:.4f}, llama.cpp "
                                                          f"{pp['llama_cpp']:.4f} (ratio {pp['ratio']:.5f})"),
        *((f"French bits/byte, {name}", f"{v['bits_per_byte']:.4f} ({v['tokens']:,} tokens)")
          for name, v in r["bits_per_byte"].items() if isinstance(v, dict)),
        ("decode tok/s (1 sequence)",
         ", ".join(f"{k} {v:.1f}" for k, v in dec.items() if not k.startswith("ratio"))
         + f" (llmkit fp32 / llama.cpp x{dec['ratio_llmkit_over_llama_cpp']:.2f})"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"Gemma 3 270M Q4_K_M, {r['threads']} threads{' (quick)' if r['quick'] else ''}")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


if __name__ == "__main__":
    sys.exit(main())

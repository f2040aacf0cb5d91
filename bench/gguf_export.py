"""GGUF export against llama.cpp (llama-cpp-python): every exported type of SmolLM2-135M-Instruct and of tiny
models pretrained here (llama and gpt2 presets), and f16 / q8_0 / q4_0 of Gemma 3 270M when it is pulled,
runs in llama.cpp with the greedy tokens llmkit computes on the same (dequantised) weights.

    python bench/gguf_export.py [--quick] [--threads 2] [--out gguf_export.json]

Runs only where `llama_cpp` is importable (a bench dependency, not a test one). For each model and type
(f32, f16, bf16, q8_0, q4_0, q4_1):
1. export with llmkit.checkpoint.gguf_write.save_gguf; llama.cpp loads the file;
2. tokenizer: llama.cpp's ids == llmkit's for the prompts (one French, one chat-templated with specials);
3. greedy: 32 tokens, argmax of llama.cpp's logits vs llmkit on the weights the file holds (llmkit reads the
   file back; for gpt2, which llmkit does not read, the source model with each matrix passed through
   gguf-py's quantize -> dequantize). "same" = the 32 tokens are equal. llama.cpp keeps its KV cache in
   f16 and rounds activations inside its matmuls (to f16 / bf16, or 8 bits for q8_0 / q4_*), so a near-tie
   can flip: along
   llmkit's tokens (teacher-forced), every position where llama.cpp's argmax differs must be one where
   llmkit's two best logits are closer than the largest logit difference between the two engines there
   ("ties only");
4. llama-quantize: llama.cpp's own quantizer (llama_model_quantize, output matrix set to Q8_0) on the f32
   export gives the same tensor bytes as the q8_0 / q4_0 / q4_1 exports;
5. perplexity on one French window (llama.cpp from its logits, llmkit from the file), as a ratio to f16.
A table is printed and the figures written as JSON (--out). --quick: SmolLM2 q8_0 and q4_0 and the tiny
llama, 8 greedy steps (a smoke run).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
NOVELS = ROOT.parent / "shared" / "data" / "corpus" / "fr-roman19"
TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1")
PROMPT = "Il était une fois, dans un petit village au bord de la mer, une vieille femme qui"
CHAT = [{"role": "user", "content": "Quelle est la capitale de la France ?"}]
FTYPE = {"q8_0": 7, "q4_0": 2, "q4_1": 3}  # llama_ftype of llama_model_quantize
GGML_Q8_0 = 8


def french_text(n_bytes: int, skip: int = 0) -> str:
    parts, size = [], 0
    for f in sorted(NOVELS.glob("*.txt")):
        parts.append(f.read_text(encoding="utf-8"))
        size += len(parts[-1].encode())
        if size >= n_bytes + skip:
            break
    return "".join(parts).encode()[skip : skip + n_bytes].decode("utf-8", errors="ignore")


# ------------------------------------------------------------------------------------------ the models
def pretrained(tmp: Path, preset: str, steps: int, threads: int):
    """A tiny model pretrained by llmkit's pretrain code path on French novels (BPE of 512 ids)."""
    import llmkit
    from llmkit.train.data import prepare
    from llmkit.train.pretrain import pretrain
    from llmkit.train.trainer import TrainConfig

    corpus = tmp / "corpus.txt"
    if not corpus.exists():
        corpus.write_text(french_text(300_000), encoding="utf-8")
        prepare([corpus], tmp / "data", tokenizer="train:512", val_fraction=0.05, progress=False)
    cfg = TrainConfig(
        steps=steps,
        batch_size=16,
        block_size=64,
        lr=3e-3,
        warmup=10,
        eval_every=0,
        eval_tokens=256,
        progress=False,
        threads=threads,
    )
    pretrain(tmp / "data", tmp / preset, cfg, preset=preset, sample_tokens=0)
    return llmkit.load(tmp / preset / "hf", device="cpu", dtype="float32")


def on_file_weights(model, path: Path, type: str):
    """A model computing with the weights the GGUF file holds: llmkit's reader when it reads the
    architecture, else the source with each matrix through gguf-py's quantize -> dequantize (row-wise, so
    llama.cpp's q/k permutation and GPT-2's q/k/v fusion, which move whole rows, do not matter)."""
    import gguf

    from llmkit.checkpoint import gguf as gguf_read
    from llmkit.checkpoint.gguf_write import gguf_architecture, tensor_name, tensor_type

    arch = gguf_architecture(model.config)
    if arch in gguf_read.ARCHITECTURES:
        return gguf_read.load_gguf(path)[1]
    model = copy.deepcopy(model)
    tied = model.config.tie_embeddings
    with torch.no_grad():
        for name, p in model.named_parameters():
            q = tensor_type(tensor_name(name, model.config, arch), tuple(p.shape), type, tied)
            w = p.numpy()
            p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w, q), q).reshape(w.shape)))
    return model


# ------------------------------------------------------------------------------------------ the checks
class LlamaCpp:
    def __init__(self, path: Path, threads: int, n_ctx: int = 1024):
        from llama_cpp import Llama

        self.llm = Llama(
            model_path=str(path),
            n_threads=threads,
            n_threads_batch=threads,
            n_ctx=n_ctx,
            n_batch=512,
            logits_all=True,
            verbose=False,
            seed=0,
        )

    def tokenize(self, text: str, special: bool) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)

    def logits(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return np.asarray(self.llm.scores[: len(ids)], dtype=np.float64)  # (T, V)

    def greedy(self, ids: list[int], n: int) -> list[int]:
        llm = self.llm
        llm.reset()
        llm.eval(ids)
        out = []
        for _ in range(n):
            out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([out[-1]])
        return out


def llmkit_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].double().numpy()  # (T, V)


def nll(logits: np.ndarray, ids: list[int]) -> tuple[float, int]:
    m = logits.max(-1, keepdims=True)
    lse = (np.log(np.exp(logits - m).sum(-1, keepdims=True)) + m)[:, 0]
    return float((lse[:-1] - logits[np.arange(len(ids) - 1), ids[1:]]).sum()), len(ids) - 1


def greedy_check(model, tok, lc: LlamaCpp, prompt_ids: list[int], steps: int) -> dict:
    from llmkit.generate.engine import Engine
    from llmkit.generate.sampling import SamplingParams

    engine = Engine(model, max_batch=1, max_seq_len=len(prompt_ids) + steps)
    params = SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True)
    ours = [out.token_id for out in engine.generate_ids(prompt_ids, params)]
    theirs = lc.greedy(prompt_ids, steps)
    seq = prompt_ids + ours
    a = llmkit_logits(model, seq)[len(prompt_ids) - 1 : -1]  # (steps, V) the logits of each new token
    b = lc.logits(seq)[len(prompt_ids) - 1 : -1]
    gap = float(np.abs(a - b).max())
    top2 = np.sort(a, -1)[:, -2:]
    flips = [i for i in range(len(ours)) if int(b[i].argmax()) != ours[i]]
    first = next((i for i, (x, y) in enumerate(zip(ours, theirs)) if x != y), None)
    return {
        "same": ours == theirs,
        "first_diff": first,
        "teacher_forced_flips": flips,
        "ties_only": all(top2[i, 1] - top2[i, 0] < gap for i in flips),
        "max_logit_diff": gap,
        "margins_at_flips": [float(top2[i, 1] - top2[i, 0]) for i in flips],
        "llmkit": _text(tok, ours),
        "llama_cpp": _text(tok, theirs),
    }


def _text(tok, ids: list[int]) -> str:
    return tok.decode([i for i in ids if i < tok.vocab_size])  # a model may pad its vocabulary


def quantize_check(f32: Path, ours: Path, type: str, threads: int) -> dict:
    """llama.cpp's quantizer on our f32 export vs our own export of `type`: equal tensor bytes?"""
    import llama_cpp
    from gguf import GGUFReader

    out = ours.with_name(ours.stem + ".llama-quantize.gguf")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread, params.output_tensor_type = FTYPE[type], threads, GGML_Q8_0
    rc = llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), params)
    if rc != 0:
        return {"error": f"llama_model_quantize returned {rc}"}
    a = {t.name: t for t in GGUFReader(ours).tensors}
    b = {t.name: t for t in GGUFReader(out).tensors}
    differ = [
        n
        for n in a
        if n not in b
        or a[n].tensor_type != b[n].tensor_type
        or not np.array_equal(np.asarray(a[n].data).view(np.uint8), np.asarray(b[n].data).view(np.uint8))
    ]
    out.unlink()
    return {
        "tensors": len(a),
        "differ": differ[:5],
        "n_differ": len(differ),
        "equal": not differ and a.keys() == b.keys(),
    }


def run_model(
    label: str, llm, types: tuple[str, ...], steps: int, threads: int, tmp: Path, window_ids: list[int]
) -> list[dict]:
    from llmkit.checkpoint.gguf_write import save_gguf

    rows: list[dict] = []
    tok = llm.tokenizer
    prompts = [tok.encode(PROMPT)]
    files: dict[str, Path] = {}
    for type in ("f32", *[t for t in types if t != "f32"]):
        path = files[type] = save_gguf(
            llm.model, tok, tmp / f"{label}-{type}.gguf", type=type, progress=False
        )
        if type not in types:
            continue
        t = time.perf_counter()
        lc = LlamaCpp(path, threads)
        ref = on_file_weights(llm.model, path, type)
        row: dict = {"model": label, "type": type, "MiB": path.stat().st_size / 2**20}
        row["tokenizer_equal"] = lc.tokenize(PROMPT, False) == prompts[0]
        if tok.chat_template:  # the chat-templated prompt, specials and all
            from llmkit.tokenizer.chat import render_chat

            text = render_chat(tok, CHAT, add_generation_prompt=True).text
            row["chat_tokenizer_equal"] = lc.tokenize(text, True) == tok.encode(text, allow_special=True)
        row["greedy"] = greedy_check(ref, tok, lc, prompts[0], steps)
        if window_ids:
            n1, c = nll(llmkit_logits(ref, window_ids), window_ids)
            n2, _ = nll(lc.logits(window_ids), window_ids)
            row["ppl_llmkit"], row["ppl_llama_cpp"] = math.exp(n1 / c), math.exp(n2 / c)
        if type in FTYPE:
            row["llama_quantize"] = quantize_check(files["f32"], path, type, threads)
        row["seconds"] = time.perf_counter() - t
        rows.append(row)
        lc.llm.close()  # now, not in __del__ at interpreter exit (llama-cpp-python then prints a traceback)
        del lc, ref
    for p in files.values():
        p.unlink(missing_ok=True)
    return rows


# -------------------------------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="SmolLM2 q8_0 + q4_0 and the tiny llama, 8 steps")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=None, help="greedy steps (default 32; --quick 8)")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    a = ap.parse_args()
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("bench/gguf_export.py needs llama-cpp-python (pip install llama-cpp-python): skipped")
        return 0
    import llmkit
    from llmkit import hub

    torch.set_num_threads(a.threads)
    steps = a.steps or (8 if a.quick else 32)
    smol_types = ("q8_0", "q4_0") if a.quick else TYPES
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="gguf-export-") as d:
        tmp = Path(d)
        smol = llmkit.load(hub.DEFAULT_MODEL, device="cpu", dtype="float32")
        window = smol.tokenizer.encode(french_text(4000, skip=20_000))[:512]
        rows += run_model("SmolLM2-135M", smol, smol_types, steps, a.threads, tmp, window)
        del smol
        gemma = hub.named_model_path("gemma-3-270m") if "gemma-3-270m" in hub.NAMED_MODELS else None
        if not a.quick and gemma is not None and gemma.is_file():
            g = llmkit.load(gemma, device="cpu", dtype="float32")
            window = [g.tokenizer.bos_id, *g.tokenizer.encode(french_text(4000, skip=20_000))[:511]]
            rows += run_model("Gemma-3-270M", g, ("f16", "q8_0", "q4_0"), steps, a.threads, tmp, window)
            del g
        for preset in ("tiny",) if a.quick else ("tiny", "tiny-gpt2"):
            tiny = pretrained(tmp, preset, 60 if a.quick else 300, a.threads)
            window = tiny.tokenizer.encode(french_text(3000, skip=400_000))[:200]
            rows += run_model(f"pretrained {preset}", tiny, TYPES, steps, a.threads, tmp, window)

    f16 = {r["model"]: r.get("ppl_llama_cpp") for r in rows if r["type"] == "f16"}
    print(
        f"{'model':<20} {'type':<5} {'MiB':>7} {'tok':>4} {'greedy':>7} {'1st diff':>8} {'ties only':>9} "
        f"{'max dlogit':>10} {'ppl llmkit':>10} {'ppl l.cpp':>9} {'vs f16':>7} {'l-quantize':>10}"
    )
    for r in rows:
        g = r["greedy"]
        base = f16.get(r["model"])
        vs = f"{r['ppl_llama_cpp'] / base - 1:+.1%}" if base and "ppl_llama_cpp" in r else ""
        lq = r.get("llama_quantize", {})
        lq_s = "" if not lq else ("equal" if lq.get("equal") else f"{lq.get('n_differ', '?')} differ")
        tok_ok = r["tokenizer_equal"] and r.get("chat_tokenizer_equal", True)
        print(
            f"{r['model']:<20} {r['type']:<5} {r['MiB']:>7.1f} {'ok' if tok_ok else 'DIFF':>4} "
            f"{'same' if g['same'] else 'diff':>7} {'' if g['first_diff'] is None else g['first_diff']:>8} "
            f"{'yes' if g['ties_only'] else 'NO':>9} {g['max_logit_diff']:>10.3g} "
            f"{r.get('ppl_llmkit', float('nan')):>10.3f} {r.get('ppl_llama_cpp', float('nan')):>9.3f} "
            f"{vs:>7} {lq_s:>10}"
        )
    report = {"steps": steps, "threads": a.threads, "quick": a.quick, "rows": rows}
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        print(f"wrote {a.out}")
    ok = all(
        r["tokenizer_equal"]
        and r.get("chat_tokenizer_equal", True)
        and r["greedy"]["ties_only"]
        and r.get("llama_quantize", {}).get("equal", True)
        for r in rows
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""What inference costs: the KV cache (`kv-cache`: time per generated token with and without it as the
context grows) and weight quantization (`quantization`: size, decode speed and perplexity for fp32, bf16,
int8, int4).

    llmkit lab kv-cache --quick
    llmkit lab quantization --lang en

Notable choices
- With the cache is the engine's own decode (llmkit.generate.engine: prefill once, then one position per
  step); without it, each new token re-runs the full forward over the whole sequence. Both decode greedily
  from the same prompt, so they must choose the same tokens (the test proves it on a tiny model, the lab
  counts agreements on the real one). The no-cache path applies the head to the last position only, so
  the gap measured is the cache's, not the cost of 49k-way logits at every position.
- Per-token times: with the cache, the time between consecutive tokens (one decode forward each; the first
  token, which carries the prefill, is not counted); without it, the time of each full forward. Each figure
  is the fastest of its tokens: on a shared machine noise only ever adds time, so the minimum is the most
  faithful estimate. Findings state this run's numbers, never a claim fixed in advance.
- Quantization reuses the load path (`ctx.llm(dtype=...)` / `ctx.llm(quantize=...)`, each loaded once per
  process), the engine's timing helper (llmkit.generate.timing.time_decode: warm-up, then tokens after the
  first) and the one perplexity scorer (llmkit.score.perplexity) on a short text in the lab's language.
  Variants alternate round by round (A B C D A B C D) so machine noise hits them alike; each speed is the
  best round.
- Size is what the loaded model holds: every parameter and persistent buffer (quantized weights, scales,
  zeros), a tensor shared by two modules counted once.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
import torch.nn as nn

from llmkit.lab import LabContext, lab, pyplot

# Our own short texts (a few sentences in each language): the perplexity text and the source of prompts.
TEXT = {
    "fr": "Le petit port s'éveille avant le jour. Les pêcheurs vérifient leurs filets, les mouettes tournent "
          "au-dessus des bateaux et l'odeur du café sort de la boulangerie. Au marché, une vieille dame "
          "choisit des pommes avec soin, tandis qu'un enfant court vers la plage avec son cerf-volant. Le "
          "vent se lève doucement ; on annonce de la pluie pour l'après-midi. Chacun se dépêche de finir son "
          "travail avant l'averse, puis la ville retrouve son calme, et l'on n'entend plus que la mer.",
    "en": "The small harbour wakes up before dawn. Fishermen check their nets, gulls circle above the boats "
          "and the smell of coffee drifts out of the bakery. At the market, an old woman chooses apples with "
          "care, while a child runs towards the beach with his kite. The wind rises gently; rain is expected "
          "in the afternoon. Everyone hurries to finish their work before the shower, then the town grows "
          "quiet again, and only the sea can be heard.",
}

VARIANTS = (("fp32", {}), ("bf16", {"dtype": "bfloat16"}), ("int8", {"quantize": "int8"}),
            ("int4", {"quantize": "int4"}))


# ------------------------------------------------------------------------------------------------- KV cache


def greedy_with_cache(model: nn.Module, prompt_ids: Sequence[int], n: int) -> tuple[list[int], list[float]]:
    """n greedy tokens through the engine (KV cache); the seconds between consecutive tokens, each one
    decode forward (n - 2 of them: the first token carries the prefill, the last needs no forward)."""
    from llmkit.generate.engine import Engine
    from llmkit.generate.sampling import SamplingParams

    eng = Engine(model, max_batch=1, max_seq_len=len(prompt_ids) + n + 1)
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    tokens, stamps = [], []
    for out in eng.generate_ids(list(prompt_ids), params):
        tokens.append(int(out.token_id))
        stamps.append(time.perf_counter())
    return tokens, [b - a for a, b in zip(stamps[:-2], stamps[1:-1])]


@torch.inference_mode()
def greedy_without_cache(model: nn.Module, prompt_ids: Sequence[int], n: int
                         ) -> tuple[list[int], list[float]]:
    """n greedy tokens, each from a full forward over the whole sequence so far (no cache); the seconds each
    token took."""
    device = next(model.parameters()).device
    x = torch.tensor([list(prompt_ids)], device=device)  # (1, T)
    tokens, times = [], []
    for _ in range(n):
        t = time.perf_counter()
        h = model(x, return_hidden=True)  # (1, T, d)
        nxt = model.head(h[:, -1]).argmax(-1, keepdim=True)  # (1, 1)
        times.append(time.perf_counter() - t)
        tokens.append(int(nxt))
        x = torch.cat([x, nxt], dim=1)
    return tokens, times


def tiled_ids(tokenizer, text: str, n: int) -> list[int]:
    """The text's tokens repeated to exactly n ids."""
    ids = tokenizer.encode(text)
    return (ids * (n // len(ids) + 1))[:n]


@lab("kv-cache", fr="Cache KV : temps par jeton selon la longueur du contexte",
     en="KV cache: time per token as the context grows", needs_model=True)
def kv_cache(ctx: LabContext) -> None:
    llm = ctx.llm()
    tok, model = llm.tokenizer, llm.model
    lengths = [32, 96, 256] if ctx.quick else [64, 128, 256, 512, 1024, 2048]
    lengths = [n for n in lengths if n + 24 < model.config.max_seq_len]
    n_plain, n_cached = (3, 8) if ctx.quick else (4, 24)
    greedy_without_cache(model, tiled_ids(tok, TEXT[ctx.lang], 16), 1)  # warm-up (allocator, kernels)
    rows = []
    for n in ctx.bar(lengths, desc="kv-cache"):
        ids = tiled_ids(tok, TEXT[ctx.lang], n)
        cached, dt_cached = greedy_with_cache(model, ids, n_cached)
        plain, dt_plain = greedy_without_cache(model, ids, n_plain)
        rows.append({"context": n, "ms_per_token_cache": round(1000 * min(dt_cached), 2),
                     "ms_per_token_no_cache": round(1000 * min(dt_plain), 2),
                     "same_tokens": cached[:n_plain] == plain})
        rows[-1]["ratio"] = round(rows[-1]["ms_per_token_no_cache"] / rows[-1]["ms_per_token_cache"], 2)
    ctx.table("timings", rows)

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [r["context"] for r in rows]
    ax.plot(xs, [r["ms_per_token_cache"] for r in rows], marker="o", label=ctx.t("avec cache KV",
                                                                                 "with KV cache"))
    ax.plot(xs, [r["ms_per_token_no_cache"] for r in rows], marker="s",
            label=ctx.t("sans cache (tout recalculer)", "without cache (recompute everything)"))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.xaxis.set_minor_locator(plt.NullLocator())
    ax.set_xlabel(ctx.t("longueur du contexte (jetons)", "context length (tokens)"))
    ax.set_ylabel(ctx.t("ms par jeton généré", "ms per generated token"))
    ax.set_title(ctx.t(f"{llm.name} : coût d'un nouveau jeton", f"{llm.name}: cost of one new token"),
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    ctx.figure(fig, "ms_per_token")

    first, last = rows[0], rows[-1]
    same = sum(r["same_tokens"] for r in rows)
    grow_c = last["ms_per_token_cache"] / first["ms_per_token_cache"]
    grow_p = last["ms_per_token_no_cache"] / first["ms_per_token_no_cache"]
    ctx.data(lengths=xs, ms_cache=[r["ms_per_token_cache"] for r in rows],
             ms_no_cache=[r["ms_per_token_no_cache"] for r in rows], ratio_longest=last["ratio"],
             growth_cache=grow_c, growth_no_cache=grow_p, same_tokens=same, n_lengths=len(rows))
    c_ms, p_ms = ctx.num(last["ms_per_token_cache"], 1), ctx.num(last["ms_per_token_no_cache"], 1)
    ctx.finding(
        f"Avec {last['context']} jetons de contexte, un nouveau jeton coûte {c_ms} ms avec le cache KV "
        f"contre {p_ms} ms sans : {ctx.num(last['ratio'], 1)} fois plus rapide.",
        f"With {last['context']} tokens of context, a new token costs {c_ms} ms with the KV cache against "
        f"{p_ms} ms without: {ctx.num(last['ratio'], 1)} times faster.")
    k = last["context"] / first["context"]
    ctx.finding(
        f"Quand le contexte passe de {first['context']} à {last['context']} jetons (×{ctx.num(k, 0)}), le "
        f"temps par jeton est multiplié par {ctx.num(grow_c, 1)} avec le cache (une seule position calculée, "
        f"l'attention relit les clés) et par {ctx.num(grow_p, 1)} sans (toute la séquence est recalculée).",
        f"When the context grows from {first['context']} to {last['context']} tokens (×{ctx.num(k, 0)}), the "
        f"time per token is multiplied by {ctx.num(grow_c, 1)} with the cache (one position computed, "
        f"attention re-reads the keys) and by {ctx.num(grow_p, 1)} without (the whole sequence is "
        f"recomputed).")
    ctx.finding(
        f"Les deux chemins choisissent les mêmes {n_plain} jetons gloutons pour {same} longueurs de "
        f"contexte sur {len(rows)} : le cache change le coût, pas le calcul.",
        f"Both paths choose the same {n_plain} greedy tokens for {same} of {len(rows)} context lengths: the "
        f"cache changes the cost, not the computation.")


# --------------------------------------------------------------------------------------------- quantization


def weight_megabytes(model: nn.Module) -> float:
    """MB (10^6 bytes) of the weights a model holds: parameters and persistent buffers (quantized weights,
    scales, zeros) of every module, each tensor once."""
    from llmkit.model.layers import module_tensors

    seen, total = set(), 0
    for m in model.modules():
        for t in module_tensors(m).values():
            key = (t.data_ptr(), t.nbytes)
            if key not in seen:
                seen.add(key)
                total += t.nbytes
    return total / 1e6


@lab("quantization", fr="Quantification : taille, vitesse et perplexité (fp32, bf16, int8, int4)",
     en="Quantization: size, speed and perplexity (fp32, bf16, int8, int4)", needs_model=True)
def quantization(ctx: LabContext) -> None:
    from llmkit.generate.engine import Engine
    from llmkit.generate.sampling import SamplingParams
    from llmkit.generate.timing import time_decode
    from llmkit.score import perplexity

    llms = {name: ctx.llm(**kw) for name, kw in VARIANTS}
    tok = llms["fp32"].tokenizer
    text_ids = tok.encode(TEXT[ctx.lang])
    prompt = text_ids[:16]
    new, rounds = (12, 1) if ctx.quick else (48, 3)
    params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    engines = {name: Engine(llm.model, max_batch=1, max_seq_len=len(prompt) + new + 8)
               for name, llm in llms.items()}
    speed: dict[str, list[float]] = {name: [] for name in llms}
    for _ in ctx.bar(range(rounds), desc="quantization"):
        for name, eng in engines.items():  # A B C D, round after round
            speed[name].append(time_decode(eng, prompt, params))
    rows = []
    for name, llm in llms.items():
        rows.append({"variant": name, "MB": round(weight_megabytes(llm.model), 1),
                     "tok_per_s": round(max(speed[name]), 2),
                     "perplexity": round(perplexity(llm.model, text_ids).ppl, 3)})
    ctx.table("variants", rows)
    by = {r["variant"]: r for r in rows}

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    names = [r["variant"] for r in rows]
    for ax, key, label in zip(axes, ("MB", "tok_per_s", "perplexity"),
                              (ctx.t("taille des poids (Mo)", "weight size (MB)"),
                               ctx.t("décodage (jetons/s)", "decode (tokens/s)"),
                               ctx.t("perplexité (plus bas = mieux)", "perplexity (lower = better)"))):
        vals = [r[key] for r in rows]
        bars = ax.bar(names, vals, color=["C0", "C1", "C2", "C3"])
        ax.bar_label(bars, [ctx.num(v, 1) for v in vals], fontsize=8)
        ax.set_title(label, fontsize=10)
        if key == "perplexity":
            lo, hi = min(vals), max(vals)
            ax.set_ylim(max(0, lo - 2 * (hi - lo) - 1), hi + (hi - lo) + 1)
    fig.suptitle(ctx.t(f"{llms['fp32'].name} sur ce CPU ({torch.get_num_threads()} fils)",
                       f"{llms['fp32'].name} on this CPU ({torch.get_num_threads()} threads)"), fontsize=10)
    fig.tight_layout()
    ctx.figure(fig, "quantization")

    ctx.data(**{f"{r['variant']}_{k}": r[k] for r in rows for k in ("MB", "tok_per_s", "perplexity")},
             text_tokens=len(text_ids), decode_tokens=new, rounds=rounds)
    f32, i8, i4, b16 = by["fp32"], by["int8"], by["int4"], by["bf16"]
    ctx.finding(
        f"Taille des poids : {ctx.num(f32['MB'], 0)} Mo en fp32, {ctx.num(b16['MB'], 0)} en bf16, "
        f"{ctx.num(i8['MB'], 0)} en int8 et {ctx.num(i4['MB'], 0)} en int4, soit "
        f"{ctx.num(f32['MB'] / i4['MB'], 1)} fois moins qu'en fp32.",
        f"Weight size: {ctx.num(f32['MB'], 0)} MB in fp32, {ctx.num(b16['MB'], 0)} in bf16, "
        f"{ctx.num(i8['MB'], 0)} in int8 and {ctx.num(i4['MB'], 0)} in int4, "
        f"{ctx.num(f32['MB'] / i4['MB'], 1)} times less than fp32.")
    fastest = max(rows, key=lambda r: r["tok_per_s"])
    tps = {r["variant"]: ctx.num(r["tok_per_s"], 1) for r in rows}
    gain = ctx.num(fastest["tok_per_s"] / f32["tok_per_s"], 1)
    if fastest is f32:
        best_fr, best_en = "fp32 reste le plus rapide sur ce CPU", "fp32 stays the fastest on this CPU"
    else:
        best_fr = f"le plus rapide, {fastest['variant']}, va {gain} fois plus vite que fp32"
        best_en = f"the fastest, {fastest['variant']}, runs {gain} times faster than fp32"
    ctx.finding(
        f"Décodage : {tps['fp32']} jetons/s en fp32, {tps['bf16']} en bf16, {tps['int8']} en int8, "
        f"{tps['int4']} en int4 ; {best_fr} (décoder un jeton relit tous les poids : moins d'octets à lire, "
        f"mais des calculs de conversion en plus).",
        f"Decoding: {tps['fp32']} tokens/s in fp32, {tps['bf16']} in bf16, {tps['int8']} in int8, "
        f"{tps['int4']} in int4; {best_en} (decoding a token re-reads every weight: fewer bytes to read, but "
        f"extra conversion work).")
    src = llms["fp32"].path
    note_fr = (f" Les poids fp32 viennent ici du fichier {src.name} : ce sont déjà des valeurs quantifiées, "
               f"élargies." if src.is_file() and src.suffix == ".gguf" else "")
    note_en = (f" The fp32 weights here come from the file {src.name}: they are already quantized values, "
               f"widened." if src.is_file() and src.suffix == ".gguf" else "")
    def delta(r: dict) -> str:
        d = round(100 * (r["perplexity"] / f32["perplexity"] - 1), 1) + 0.0  # + 0.0: no "-0.0"
        return f"{'+' if d >= 0 else ''}{ctx.num(d, 1)} %"

    ctx.finding(
        f"Perplexité sur un texte de {len(text_ids)} jetons : {ctx.num(f32['perplexity'])} en fp32, "
        f"{ctx.num(b16['perplexity'])} en bf16 ({delta(b16)}), {ctx.num(i8['perplexity'])} en int8 "
        f"({delta(i8)}), {ctx.num(i4['perplexity'])} en int4 ({delta(i4)}).{note_fr}",
        f"Perplexity on a {len(text_ids)}-token text: {ctx.num(f32['perplexity'])} in fp32, "
        f"{ctx.num(b16['perplexity'])} in bf16 ({delta(b16)}), {ctx.num(i8['perplexity'])} in int8 "
        f"({delta(i8)}), {ctx.num(i4['perplexity'])} in int4 ({delta(i4)}).{note_en}")

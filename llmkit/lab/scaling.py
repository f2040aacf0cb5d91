"""The scaling-law slide, measured: a sweep of tiny Transformers trained on the same number of tokens of the
French corpus (`scaling`); loss against parameters and against compute, with power laws fitted in log-log.

    a, alpha = power_law_fit(n_params, losses)   # loss ≈ a · N^(-alpha), least squares on the logs
    nonembedding_params(cfg_dict, total)         # N as Kaplan et al. count it

Notable choices
- Nothing new is trained here by hand: the corpus goes through `llmkit.train.data.prepare` (as `llmkit
  prepare` does: document-level train/val split, token shards) and every model through `llmkit.train.pretrain`
  (the one Trainer, AdamW + warmup + cosine), into a temporary folder. Sizes differ only by depth and width
  (Llama-style `tiny` preset, d_ff = 3·d_model, heads of 16 dimensions); every model sees the same tokens in
  the same order (same seed, batch and block), so D is fixed and only N moves. Tokens are bytes (the `char`
  tokenizer, 257 ids): models this small learn bytes in a few hundred steps, and losses are nats per byte.
  Models up to d_model 64 train on one thread (the fastest for them, above all on a shared machine); the
  process' thread count is restored afterwards.
- N counts the non-embedding parameters (Kaplan et al. 2020): the token embedding, tied with the output
  head, is left out; it is what makes the small-model points fall on a line. Compute C = 6·N·D FLOPs
  (forward 2·N·D + backward 4·N·D, attention ignored).
- Loss vs N uses each model's final validation loss (every val byte, nats per byte). Loss vs C uses the
  training curves (train loss smoothed by an exponential moving average, against C = 6·N·tokens seen so
  far): at each compute the best of the models is the compute-efficient frontier, and the power law is
  fitted on that frontier, as in the scaling-law papers. With a fixed token budget the bigger models are
  undertrained, so the fitted exponents are those of this tiny regime, not Kaplan's 0.076 / 0.050.
- The fit is ordinary least squares of log L on log N (a straight line in log-log): loss = a · N^(-alpha).
  No irreducible-loss term: with 4-6 points it would not be identifiable.
- Quick: the 6 smallest novellas, 5 models from 3k to 0.1M parameters, 100 steps of 16 x 64 bytes each
  (seconds per model). Full: the whole corpus, 7 models up to 0.8M parameters, 400 steps of 16 x 128.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from llmkit.lab import LabContext, lab, pyplot

CORPUS = "corpus/fr-nouvelles19"
# (layers, d_model) per model
QUICK_SIZES = ((1, 16), (1, 32), (2, 32), (2, 48), (2, 64))
FULL_SIZES = ((1, 16), (1, 32), (2, 32), (2, 48), (2, 64), (3, 96), (4, 128))


def power_law_fit(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """(a, alpha) with y ≈ a · x^(-alpha): least squares of log y on log x."""
    lx, ly = np.log(np.asarray(x, dtype=float)), np.log(np.asarray(y, dtype=float))
    slope, intercept = np.polyfit(lx, ly, 1)
    return float(math.exp(intercept)), float(-slope)


def nonembedding_params(model_config: dict, total: int) -> int:
    """Parameters without the token embedding (and without the head when it is tied to it)."""
    emb = model_config["vocab_size"] * model_config["d_model"]
    return total - emb * (1 if model_config.get("tie_embeddings", True) else 2)


def ema(xs: Sequence[float], beta: float) -> list[float]:
    """Bias-corrected exponential moving average (as training curves are usually smoothed)."""
    out, m = [], 0.0
    for i, x in enumerate(xs, 1):
        m = beta * m + (1 - beta) * x
        out.append(m / (1 - beta**i))
    return out


def frontier(curves: Sequence[tuple[np.ndarray, np.ndarray]], n_points: int = 24
             ) -> tuple[np.ndarray, np.ndarray]:
    """The lower envelope of several (compute, loss) curves on a log grid of compute: the best loss any model
    reached with that much compute (each curve read by linear interpolation in log compute). Grid points
    where no curve is defined (a gap between two curves) are left out."""
    lo = min(c[0] for c, _ in curves)
    hi = max(c[-1] for c, _ in curves)
    grid = np.geomspace(lo, hi, n_points)
    best = np.full(n_points, np.inf)
    for c, loss in curves:
        inside = (grid >= c[0]) & (grid <= c[-1])
        best[inside] = np.minimum(best[inside], np.interp(np.log(grid[inside]), np.log(c), loss))
    keep = np.isfinite(best)
    return grid[keep], best[keep]


def sci(ctx: LabContext, x: float) -> str:
    """1.2e9 (decimal comma in French: 1,2e9)."""
    m, e = f"{x:.1e}".split("e")
    return f"{ctx.num(float(m), 1)}e{int(e)}"


def train_one(data: Path, run: Path, layers: int, d_model: int, steps: int, batch: int, block: int,
              seed: int, lr: float, threads: int | None = None) -> dict:
    """Pretrain one size with the project's trainer; returns N, the training curve and the final val loss."""
    from llmkit.train.pretrain import pretrain
    from llmkit.train.trainer import TrainConfig

    cfg = TrainConfig(steps=steps, batch_size=batch, block_size=block, lr=lr, warmup=max(1, steps // 10),
                      eval_every=0, progress=False, seed=seed, threads=threads)
    overrides = {"n_layers": layers, "d_model": d_model, "n_heads": max(1, d_model // 16),
                 "d_ff": 3 * d_model}
    with contextlib.redirect_stdout(io.StringIO()):  # the trainer's own eval line; the lab has its bar
        hist = pretrain(data, run, cfg, preset="tiny", model_overrides=overrides, sample_tokens=0,
                        export=False)
    info = json.loads((run / "run.json").read_text())
    n = nonembedding_params(info["model_config"], info["parameters"])
    steps_ = [h for h in hist if "loss" in h]
    final = [h for h in hist if "val_loss" in h][-1]
    return {"layers": layers, "d_model": d_model, "params": n, "total_params": info["parameters"],
            "tokens": [h["tokens"] for h in steps_], "train_loss": [h["loss"] for h in steps_],
            "val_loss": final["val_loss"], "seconds": steps_[-1]["time"]}


@lab("scaling", fr="Lois d'échelle : perte contre paramètres et calcul",
     en="Scaling laws: loss vs parameters and compute", course="", needs_data=(CORPUS,))
def scaling(ctx: LabContext) -> None:
    from llmkit.io import corpus_files
    from llmkit.train.data import prepare

    files = corpus_files([ctx.data_file(CORPUS)])
    if ctx.quick:
        files = sorted(files, key=lambda f: f.stat().st_size)[:6]
        sizes, steps, batch, block = QUICK_SIZES, 100, 16, 64
    else:
        sizes, steps, batch, block = FULL_SIZES, 400, 16, 128
    runs = []
    threads = torch.get_num_threads()
    try:
        with tempfile.TemporaryDirectory(prefix="llmkit-scaling-") as tmp:
            data = Path(tmp) / "data"
            manifest = prepare(files, data, tokenizer="char", seed=ctx.seed, progress=False)
            for layers, d in ctx.bar(sizes, desc="scaling"):
                runs.append(train_one(data, Path(tmp) / f"run-{layers}x{d}", layers, d, steps, batch, block,
                                      ctx.seed, lr=3e-3, threads=1 if d <= 64 else None))
    finally:
        torch.set_num_threads(threads)  # pretrain sets the process' thread count
    D = steps * batch * block
    N = np.array([r["params"] for r in runs], dtype=float)
    L = np.array([r["val_loss"] for r in runs])
    a_n, alpha_n = power_law_fit(N, L)
    curves = []
    for r in runs:
        c = 6 * r["params"] * np.asarray(r["tokens"], dtype=float)
        curves.append((c, np.asarray(ema(r["train_loss"], 0.9))))
    skip = steps // 3  # leave out each model's first third: warmup and the fall from ln(vocab)
    grid, best = frontier([(c[skip:], lo[skip:]) for c, lo in curves])
    a_c, alpha_c = power_law_fit(grid, best)
    C = 6 * N * D

    plt = pyplot()
    from matplotlib.ticker import FuncFormatter

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ax = axes[0]
    ax.loglog(N, L, "o", color="C0", label=ctx.t("modèles", "models"))
    xs = np.geomspace(N.min() / 1.5, N.max() * 1.5, 50)
    ax.loglog(xs, a_n * xs ** -alpha_n, "--", color="C3",
              label=f"L = {ctx.num(a_n)} · N^-{ctx.num(alpha_n, 3)}")
    for r in runs:
        ax.annotate(f"{r['layers']}×{r['d_model']}", (r["params"], r["val_loss"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    ax.set_xlabel(ctx.t("paramètres N (hors embeddings)", "parameters N (non-embedding)"))
    ax.set_ylabel(ctx.t("perte de validation (nats/octet)", "validation loss (nats/byte)"))
    ax.set_title(ctx.t(f"D = {ctx.num(D)} tokens pour chaque modèle",
                       f"D = {ctx.num(D)} tokens for each model"))
    ax.legend()
    ax = axes[1]
    cmap = plt.get_cmap("viridis")
    for i, (r, (c, lo)) in enumerate(zip(runs, curves)):
        ax.loglog(c[skip:], lo[skip:], color=cmap(i / max(1, len(runs) - 1)), lw=1.2,
                  label=f"N = {ctx.num(r['params'])}")
    ax.loglog(grid, best, "o", color="black", ms=4, alpha=0.5, label=ctx.t("frontière", "frontier"))
    ax.loglog(grid, a_c * grid ** -alpha_c, "--", color="C3", lw=1.5,
              label=f"L ∝ C^-{ctx.num(alpha_c, 3)}")
    ax.set_xlabel(ctx.t("calcul C = 6·N·D (FLOP)", "compute C = 6·N·D (FLOPs)"))
    ax.set_ylabel(ctx.t("perte d'entraînement (lissée)", "training loss (smoothed)"))
    ax.legend(fontsize=7)
    for ax in axes:  # plain loss values on the log axis, in the reader's decimal style
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: ctx.num(v, 1)))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ctx.num(v, 1)))
    fig.tight_layout()
    ctx.figure(fig, "scaling")

    ctx.table("models", [{"layers": r["layers"], "d_model": r["d_model"], "N": r["params"],
                          "N_total": r["total_params"], "C (FLOP)": float(f"{6 * r['params'] * D:.3g}"),
                          "val_loss": round(r["val_loss"], 4), "seconds": r["seconds"]} for r in runs])
    ctx.data(params=N.tolist(), val_loss=L.tolist(), compute=C.tolist(), tokens=D, alpha_params=alpha_n,
             a_params=a_n, alpha_compute=alpha_c, a_compute=a_c,
             vocab_size=manifest["tokenizer"]["vocab_size"],
             train_tokens=manifest["splits"]["train"]["tokens"])
    ratio = N.max() / N.min()
    l_small, l_big = L[np.argmin(N)], L[np.argmax(N)]
    n_small, n_big = ctx.num(int(N.min())), ctx.num(int(N.max()))
    ctx.finding(
        f"Avec D = {ctx.num(D)} tokens (des octets) chacun, passer de {n_small} à {n_big} paramètres "
        f"(×{ctx.num(ratio, 0)}) fait baisser la perte de validation de {ctx.num(l_small)} à "
        f"{ctx.num(l_big)} nats par octet ({ctx.num(l_small - l_big)} de moins).",
        f"With D = {ctx.num(D)} tokens (bytes) each, going from {n_small} to {n_big} parameters "
        f"(×{ctx.num(ratio, 0)}) lowers the validation loss from {ctx.num(l_small)} to "
        f"{ctx.num(l_big)} nats per byte ({ctx.num(l_small - l_big)} less).")
    per10 = 1 - 10 ** -alpha_n
    fit = f"L ≈ {ctx.num(a_n)} · N^-{ctx.num(alpha_n, 3)}"
    kaplan_n = ctx.num(0.076, 3)
    ctx.finding(
        f"Ajustement log-log : {fit} ; chaque ×10 de paramètres divise la perte par "
        f"{ctx.num(10 ** alpha_n, 3)} (−{ctx.pct(per10)}). Kaplan et al. trouvent un exposant de {kaplan_n} "
        "pour des modèles entraînés jusqu'à convergence.",
        f"Log-log fit: {fit}; every ×10 in parameters divides the loss by {ctx.num(10 ** alpha_n, 3)} "
        f"(−{ctx.pct(per10)}). Kaplan et al. find an exponent of {kaplan_n} for models trained to "
        "convergence.")
    span = (sci(ctx, grid[0]), sci(ctx, grid[-1]))
    ctx.finding(
        f"Sur la frontière efficace en calcul (la meilleure perte atteinte à chaque budget), "
        f"L ∝ C^-{ctx.num(alpha_c, 3)} entre {span[0]} et {span[1]} FLOP (Kaplan : {ctx.num(0.050, 3)}).",
        f"On the compute-efficient frontier (the best loss reached at each budget), "
        f"L ∝ C^-{ctx.num(alpha_c, 3)} between {span[0]} and {span[1]} FLOPs (Kaplan: {ctx.num(0.050, 3)}).")

"""Experiments 1 and 2 of the course: a small MLP on the two-moons data — learning curves as the training set
grows (`mlp-curves`), then L2 and dropout against overfitting (`regularization`).

    X, y = two_moons(500, noise=0.3, seed=0)                       # (500, 2) float32, (500,) 0/1
    net = mlp(hidden=(64, 64), dropout=0.5)                        # 2 -> 64 -> 64 -> 1 logit
    hist = fit(net, (X, y), (Xv, yv), steps=500, lr=1e-2, l2=1e-4) # History: loss and accuracy per epoch
    xx, yy, p = decision_grid(net, (-1.5, 2.5, -1.0, 1.5))         # P(class 1) on a grid, for contour plots

Notable choices
- Two moons written here with torch (no scikit-learn): like `sklearn.datasets.make_moons`, n // 2 points at
  evenly spaced angles on the upper half circle (class 0), the rest on the lower one shifted by (1, -0.5)
  (class 1), then Gaussian noise and a shuffle; with noise 0 and no shuffle the points are sklearn's.
- One logit and `binary_cross_entropy_with_logits` (the two-class softmax, written with one output).
- `fit` trains full-batch by default, so one step is one epoch (one pass over the training set) and the
  three training sizes get the same number of updates; `batch_size` switches to minibatches drawn with
  replacement (the RNN lab uses it). Train and validation loss/accuracy are both measured in eval mode (no
  dropout), so the gap between them is overfitting, not dropout noise.
- L2 is the course's penalty added to the loss, λ Σ‖W‖² over weight matrices (not biases), not AdamW's
  decoupled decay; optimizer Adam. `target_acc` stops training once validation accuracy reaches it.
- Curves are recorded every `eval_every` steps; the findings compare the last point (what the course's
  figure shows) and report the best validation loss, so a rising validation curve is visible in numbers.
- Both labs: noise 0.25 (the moons overlap enough that 100 points can be learnt by heart, noise included),
  a 2-128-128-1 MLP, Adam 1e-2 for 300 epochs (quick) or 500 epochs recorded every 5 on 5,000 validation
  points (full); every variant starts from the same initial weights (same seed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmkit.lab import LabContext, lab, pyplot

Split = tuple[torch.Tensor, torch.Tensor]  # inputs (N, ...) float, labels (N,) float 0/1


def two_moons(n: int, noise: float = 0.2, seed: int = 0, shuffle: bool = True) -> Split:
    """n points on two interleaved half circles, labels 0 (upper) and 1 (lower); noise is the standard
    deviation of the Gaussian added to each coordinate."""
    g = torch.Generator().manual_seed(seed)
    n_out = n // 2
    n_in = n - n_out
    a_out = torch.linspace(0, math.pi, n_out, dtype=torch.float64)
    a_in = torch.linspace(0, math.pi, n_in, dtype=torch.float64)
    X = torch.cat([torch.stack([a_out.cos(), a_out.sin()], 1),
                   torch.stack([1 - a_in.cos(), 1 - a_in.sin() - 0.5], 1)])  # (n, 2)
    y = torch.cat([torch.zeros(n_out), torch.ones(n_in)])  # (n,)
    if noise > 0:
        X = X + noise * torch.randn(X.shape, generator=g, dtype=torch.float64)
    if shuffle:
        perm = torch.randperm(n, generator=g)
        X, y = X[perm], y[perm]
    return X.float(), y


def mlp(hidden: Sequence[int] = (64, 64), dropout: float = 0.0, n_in: int = 2) -> nn.Sequential:
    """n_in -> hidden... -> 1 logit, ReLU between layers, dropout after each hidden activation when > 0."""
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(n_in, h), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        n_in = h
    layers.append(nn.Linear(n_in, 1))
    return nn.Sequential(*layers)


def logits_of(model: nn.Module, X: torch.Tensor) -> torch.Tensor:
    """The model's logits as a vector (N,), whether it returns (N,) or (N, 1)."""
    return model(X).reshape(len(X))


def l2_penalty(model: nn.Module) -> torch.Tensor:
    """Σ‖W‖² over the weight matrices (parameters with 2 or more dimensions): biases are not penalised."""
    return sum((p.pow(2).sum() for p in model.parameters() if p.dim() >= 2), torch.zeros(()))


@torch.no_grad()
def evaluate(model: nn.Module, data: Split) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) in eval mode; the model's train/eval mode is restored."""
    was = model.training
    model.eval()
    X, y = data
    z = logits_of(model, X)  # (N,)
    loss = F.binary_cross_entropy_with_logits(z, y).item()
    acc = ((z > 0).float() == y).float().mean().item()
    model.train(was)
    return loss, acc


@dataclass
class History:
    steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)  # empty when fit(eval_train=False)
    train_acc: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_acc: list[float] = field(default_factory=list)

    @property
    def best_val_loss(self) -> tuple[float, int]:
        """(lowest validation loss, the step it was reached at)."""
        i = min(range(len(self.val_loss)), key=self.val_loss.__getitem__)
        return self.val_loss[i], self.steps[i]

    def gap(self) -> tuple[float, float]:
        """(train - val accuracy, val - train loss) at the last recorded step: the overfitting gap."""
        return self.train_acc[-1] - self.val_acc[-1], self.val_loss[-1] - self.train_loss[-1]


def fit(model: nn.Module, train: Split, val: Split, *, steps: int, lr: float = 1e-2,
        batch_size: int | None = None, l2: float = 0.0, eval_every: int = 10, eval_train: bool = True,
        target_acc: float | None = None, clip: float | None = None, seed: int = 0) -> History:
    """Adam on the binary cross-entropy (+ l2 · Σ‖W‖²); full batch unless batch_size. Records loss and
    accuracy every eval_every steps and at the end; stops early once val accuracy >= target_acc."""
    X, y = train
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    hist = History()

    def record(step: int) -> bool:
        hist.steps.append(step)
        if eval_train:
            loss, acc = evaluate(model, train)
            hist.train_loss.append(loss)
            hist.train_acc.append(acc)
        loss, acc = evaluate(model, val)
        hist.val_loss.append(loss)
        hist.val_acc.append(acc)
        return target_acc is not None and acc >= target_acc

    if record(0):
        return hist
    model.train()
    for step in range(1, steps + 1):
        if batch_size is None:
            xb, yb = X, y
        else:
            idx = torch.randint(0, len(X), (batch_size,), generator=g)
            xb, yb = X[idx], y[idx]
        loss = F.binary_cross_entropy_with_logits(logits_of(model, xb), yb)
        if l2 > 0:
            loss = loss + l2 * l2_penalty(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        if (step % eval_every == 0 or step == steps) and record(step):
            break
    model.eval()
    return hist


@torch.no_grad()
def decision_grid(model: nn.Module, box: tuple[float, float, float, float], n: int = 150
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """P(class 1) on an n x n grid over box = (xmin, xmax, ymin, ymax): (xx, yy, p), each (n, n)."""
    was = model.training
    model.eval()
    xs = torch.linspace(box[0], box[1], n)
    ys = torch.linspace(box[2], box[3], n)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")  # (n, n)
    p = torch.sigmoid(logits_of(model, torch.stack([xx.reshape(-1), yy.reshape(-1)], 1))).reshape(n, n)
    model.train(was)
    return xx, yy, p


def moons_box(X: torch.Tensor, margin: float = 0.4) -> tuple[float, float, float, float]:
    lo, hi = X.min(0).values - margin, X.max(0).values + margin
    return lo[0].item(), hi[0].item(), lo[1].item(), hi[1].item()


def plot_points(ax, X: torch.Tensor, y: torch.Tensor, size: float = 10) -> None:
    for cls, color in ((0, "tab:blue"), (1, "tab:orange")):
        m = y == cls
        ax.scatter(X[m, 0], X[m, 1], s=size, c=color, edgecolors="k", linewidths=0.3)


# ------------------------------------------------------------------------------------------------------
# the labs

NOISE = 0.25


def settings(ctx: LabContext) -> tuple[int, int, int]:
    """(epochs, eval_every, validation size): the full run records finer curves on a larger validation set
    (its numbers are more precise), over the same training budget as the course's figure."""
    return (300, 10, 1000) if ctx.quick else (500, 5, 5000)


@lab("mlp-curves", fr="Courbes d'apprentissage d'un MLP selon la taille des données",
     en="MLP learning curves as the training set grows", course="1")
def mlp_curves(ctx: LabContext) -> None:
    sizes = (100, 500, 1000)
    steps, eval_every, n_val = settings(ctx)
    hidden = (128, 128)
    pool = two_moons(max(sizes), NOISE, seed=ctx.seed)
    val = two_moons(n_val, NOISE, seed=ctx.seed + 1)
    hists: dict[int, History] = {}
    for n in ctx.bar(sizes, desc="mlp-curves"):
        torch.manual_seed(ctx.seed)  # the same initial network for every size
        hists[n] = fit(mlp(hidden), (pool[0][:n], pool[1][:n]), val, steps=steps, eval_every=eval_every)

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    colors = dict(zip(sizes, ("tab:red", "tab:green", "tab:blue")))
    for n, h in hists.items():
        for ax, tr, va in ((axes[0], h.train_loss, h.val_loss), (axes[1], h.train_acc, h.val_acc)):
            ax.plot(h.steps, tr, "--", color=colors[n], label=f"N = {n} " + ctx.t("entraînement", "train"))
            ax.plot(h.steps, va, "-", color=colors[n], label=f"N = {n} validation")
    axes[0].axhline(math.log(2), color="gray", lw=0.8, ls=":")
    axes[0].text(steps, math.log(2), ctx.t("ln 2 : le hasard", "ln 2: chance"), ha="right", va="bottom",
                 fontsize=8, color="gray")
    axes[0].set_ylabel(ctx.t("perte (entropie croisée)", "loss (cross-entropy)"))
    axes[0].set_ylim(0, max(1.0, min(2.0, max(max(h.val_loss) for h in hists.values()) * 1.05)))
    axes[1].set_ylabel(ctx.t("précision", "accuracy"))
    for ax in axes:
        ax.set_xlabel(ctx.t("époque (passe complète sur les données)", "epoch (full pass over the data)"))
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, ncol=1, loc="lower right")
    nv = ctx.num(n_val)
    fig.suptitle(ctx.t(f"Deux lunes (bruit {ctx.num(NOISE)}), MLP 2-128-128-1, validation sur {nv} points",
                       f"Two moons (noise {ctx.num(NOISE)}), MLP 2-128-128-1, validated on {nv} points"))
    ctx.figure(fig, "curves")

    rows = []
    for n, h in hists.items():
        acc_gap, loss_gap = h.gap()
        best, at = h.best_val_loss
        rows.append({"N": n, "train_loss": h.train_loss[-1], "val_loss": h.val_loss[-1],
                     "best_val_loss": best, "best_at_epoch": at, "train_acc": h.train_acc[-1],
                     "val_acc": h.val_acc[-1], "acc_gap": acc_gap, "loss_gap": loss_gap})
    ctx.table("final", rows)
    ctx.data(sizes=list(sizes), epochs=steps, noise=NOISE, final={r["N"]: r for r in rows},
             curves={n: {"epoch": h.steps, "train_loss": h.train_loss, "val_loss": h.val_loss,
                         "train_acc": h.train_acc, "val_acc": h.val_acc} for n, h in hists.items()})

    small, large = rows[0], rows[-1]
    pts = lambda x: ctx.num(100 * x, 1)  # noqa: E731 (accuracy gaps in percentage points)
    trend = ctx.t("se réduit" if large["acc_gap"] < small["acc_gap"] else "ne se réduit pas",
                  "shrinks" if large["acc_gap"] < small["acc_gap"] else "does not shrink")
    ctx.finding(
        f"L'écart précision entraînement − validation {trend} quand les données augmentent : "
        + ", ".join(f"{pts(r['acc_gap'])} points avec N = {r['N']} ({ctx.pct(r['train_acc'])} contre "
                    f"{ctx.pct(r['val_acc'])})" for r in rows) + ".",
        f"The train − validation accuracy gap {trend} as the data grows: "
        + ", ".join(f"{pts(r['acc_gap'])} points with N = {r['N']} ({ctx.pct(r['train_acc'])} vs "
                    f"{ctx.pct(r['val_acc'])})" for r in rows) + ".")
    rise = small["val_loss"] - small["best_val_loss"]
    best = ctx.num(small["best_val_loss"])
    ctx.finding(
        f"Avec N = {small['N']}, la perte de validation atteint son minimum {best} à "
        f"l'époque {small['best_at_epoch']} puis "
        + (f"remonte à {ctx.num(small['val_loss'])} (+{ctx.num(rise)}) : le réseau apprend le bruit par cœur"
           if rise > 0.01 else f"reste à {ctx.num(small['val_loss'])}")
        + f" (perte d'entraînement finale {ctx.num(small['train_loss'], 3)}) ; avec N = {large['N']}, "
        f"{ctx.num(large['val_loss'])} à la fin pour un minimum de {ctx.num(large['best_val_loss'])}.",
        f"With N = {small['N']}, the validation loss reaches its minimum {best} at "
        f"epoch {small['best_at_epoch']} then "
        + (f"climbs back to {ctx.num(small['val_loss'])} (+{ctx.num(rise)}): the network memorises the noise"
           if rise > 0.01 else f"stays at {ctx.num(small['val_loss'])}")
        + f" (final training loss {ctx.num(small['train_loss'], 3)}); with N = {large['N']}, "
        f"{ctx.num(large['val_loss'])} at the end for a minimum of {ctx.num(large['best_val_loss'])}.")
    best_val = max(rows, key=lambda r: r["val_acc"])
    ctx.finding(
        f"Meilleure précision de validation finale : {ctx.pct(best_val['val_acc'])} avec N = {best_val['N']} "
        f"(contre {ctx.pct(small['val_acc'])} avec N = {small['N']}).",
        f"Best final validation accuracy: {ctx.pct(best_val['val_acc'])} with N = {best_val['N']} "
        f"(vs {ctx.pct(small['val_acc'])} with N = {small['N']}).")


REGULARIZERS = (("none", 0.0, 0.0), ("l2", 1e-4, 0.0), ("dropout", 0.0, 0.5))  # (name, λ, dropout p)


@lab("regularization", fr="Régularisation : L2 et dropout contre le sur-apprentissage",
     en="Regularization: L2 and dropout against overfitting", course="2")
def regularization(ctx: LabContext) -> None:
    n_train = 100
    steps, eval_every, n_val = settings(ctx)
    hidden = (128, 128)
    train = two_moons(n_train, NOISE, seed=ctx.seed)
    val = two_moons(n_val, NOISE, seed=ctx.seed + 1)
    names = {"none": ctx.t("sans régularisation", "no regularization"), "l2": "L2 λ = 1e-4",
             "dropout": ctx.t("dropout p = 0,5", "dropout p = 0.5")}
    hists: dict[str, History] = {}
    nets: dict[str, nn.Module] = {}
    doubt: dict[str, float] = {}  # share of the plotted plane where 0.1 < P(class 1) < 0.9
    for name, lam, p in ctx.bar(REGULARIZERS, desc="regularization"):
        torch.manual_seed(ctx.seed)  # the same initial weights for every variant
        nets[name] = mlp(hidden, dropout=p)
        hists[name] = fit(nets[name], train, val, steps=steps, eval_every=eval_every, l2=lam, seed=ctx.seed)

    plt = pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(13, 8), layout="constrained")
    box = moons_box(torch.cat([train[0], val[0]]))
    top = max(max(h.val_loss) for h in hists.values())
    for j, (name, h) in enumerate(hists.items()):
        ax = axes[0, j]
        ax.plot(h.steps, h.train_loss, "--", color="tab:gray", label=ctx.t("entraînement", "train"))
        ax.plot(h.steps, h.val_loss, "-", color="tab:red", label="validation")
        ax.set_ylim(0, min(2.0, top * 1.05))
        ax.set_title(names[name])
        ax.set_xlabel(ctx.t("époque", "epoch"))
        ax.grid(alpha=0.3)
        if j == 0:
            ax.set_ylabel(ctx.t("perte (entropie croisée)", "loss (cross-entropy)"))
            ax.legend(fontsize=8)
        ax = axes[1, j]
        xx, yy, prob = decision_grid(nets[name], box)
        ax.contourf(xx, yy, prob, levels=20, cmap="RdBu_r", alpha=0.6, vmin=0, vmax=1)
        ax.contour(xx, yy, prob, levels=[0.5], colors="k", linewidths=1.2)
        doubt[name] = ((prob > 0.1) & (prob < 0.9)).float().mean().item()
        plot_points(ax, *train, size=14)
        ax.set_title(ctx.t("entraînement", "train") + f" {ctx.pct(h.train_acc[-1])} · validation "
                     f"{ctx.pct(h.val_acc[-1])}", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(ctx.t(f"Deux lunes, {n_train} points d'entraînement (bruit {ctx.num(NOISE)}), "
                       "MLP 2-128-128-1 : courbes de perte et frontière de décision",
                       f"Two moons, {n_train} training points (noise {ctx.num(NOISE)}), MLP 2-128-128-1: "
                       "loss curves and decision boundary"))
    ctx.figure(fig, "regularization")

    rows = []
    for name, h in hists.items():
        acc_gap, loss_gap = h.gap()
        best, at = h.best_val_loss
        w2 = l2_penalty(nets[name]).item()
        rows.append({"variant": name, "train_loss": h.train_loss[-1], "val_loss": h.val_loss[-1],
                     "best_val_loss": best, "loss_gap": loss_gap, "train_acc": h.train_acc[-1],
                     "val_acc": h.val_acc[-1], "acc_gap": acc_gap, "sum_w2": w2,
                     "doubt_share": doubt[name]})
    ctx.table("final", rows)
    by = {r["variant"]: r for r in rows}
    ctx.data(n_train=n_train, epochs=steps, noise=NOISE, final=by,
             curves={n: {"epoch": h.steps, "train_loss": h.train_loss, "val_loss": h.val_loss}
                     for n, h in hists.items()})

    ctx.finding(
        "Perte de validation à la fin : " + ", ".join(
            f"{names[r['variant']]} {ctx.num(r['val_loss'])} (écart validation − entraînement "
            f"{ctx.num(r['loss_gap'])})" for r in rows) + ".",
        "Validation loss at the end: " + ", ".join(
            f"{names[r['variant']]} {ctx.num(r['val_loss'])} (validation − train gap "
            f"{ctx.num(r['loss_gap'])})" for r in rows) + ".")
    least = min(rows, key=lambda r: r["loss_gap"])
    none = by["none"]
    ctx.finding(
        f"Le plus petit écart de perte est celui de « {names[least['variant']]} » "
        f"({ctx.num(least['loss_gap'])}, contre {ctx.num(none['loss_gap'])} sans régularisation) ; écart de "
        "précision entraînement − validation : "
        + ", ".join(f"{names[r['variant']]} {ctx.num(100 * r['acc_gap'], 1)} points" for r in rows) + ".",
        f"The smallest loss gap is \"{names[least['variant']]}\"'s ({ctx.num(least['loss_gap'])}, vs "
        f"{ctx.num(none['loss_gap'])} without regularization); train − validation accuracy gap: "
        + ", ".join(f"{names[r['variant']]} {ctx.num(100 * r['acc_gap'], 1)} points" for r in rows) + ".")
    l2 = by["l2"]
    fr_dir, en_dir = ("ramène", "brings") if l2["sum_w2"] < none["sum_w2"] else ("fait passer", "takes")
    ctx.finding(
        f"La pénalité L2 {fr_dir} la somme des poids au carré de {ctx.num(none['sum_w2'], 0)} à "
        f"{ctx.num(l2['sum_w2'], 0)} (dropout : {ctx.num(by['dropout']['sum_w2'], 0)}) ; part du plan où le "
        "réseau hésite (0,1 < p < 0,9) : "
        + ", ".join(f"{names[r['variant']]} {ctx.pct(r['doubt_share'])}" for r in rows) + ".",
        f"The L2 penalty {en_dir} the sum of squared weights from {ctx.num(none['sum_w2'], 0)} to "
        f"{ctx.num(l2['sum_w2'], 0)} (dropout: {ctx.num(by['dropout']['sum_w2'], 0)}); share of the plane "
        "where the network hesitates (0.1 < p < 0.9): "
        + ", ".join(f"{names[r['variant']]} {ctx.pct(r['doubt_share'])}" for r in rows) + ".")

"""Experiments 3 and 7 of the course: the vanishing gradient in a recurrent network (`vanishing-gradient`),
and what a forward pass costs as the sequence grows, RNN against self-attention (`rnn-vs-attention`).

    x, y = bit_sequences(256, T=50, seed=0)         # x (256, 50, 2): bit ±1 and start flag; y = first bit
    net = SequenceClassifier("lstm", hidden=16)      # reads the whole sequence, one logit at the end
    g = input_gradient_norms(net, x, y)              # (50,): mean ‖∂ℓ/∂x_t‖ over the batch, t = 1..T
    t = forward_times({"rnn": rnn_block(64), "attention": attention_block(64)}, [256, 512, 1024])
    slope, _ = loglog_slope([256, 512, 1024], t["attention"])   # CPU seconds per forward ∝ T^slope

The toy task ("predict the last bit" in the course's words): a sequence of T random bits, and the label is
the FIRST bit, to be given after reading the LAST one. Each step's input has two channels, the bit as ±1 and
a start flag (1 on the first step only), so finding which bit to keep is easy and the only difficulty left is
the distance: the error signal must travel back T steps to reach the bit that decides the label.

Notable choices
- The gradient measured is ‖∂ℓ/∂x_1‖, the per-example loss gradient with respect to the first input,
  averaged over 256 sequences, on the freshly initialised network (PyTorch's default init): what the first
  bit can change in the loss, i.e. the learning signal that reaches it. By the chain rule it is
  ∂ℓ/∂h_T · Π_t ∂h_t/∂h_{t-1} · ∂h_1/∂x_1, a product of T - 1 Jacobians. The weights do not depend on T,
  so one network per cell is measured at every T.
- LSTM and GRU start "remembering by default", as chrono initialisation does (Tallec & Ollivier 2018): the
  LSTM's forget gate gets a bias of +4 and its input gate -4 (σ(4) ≈ 0.98: keep the cell, write little),
  the GRU's update gate +4 (its h_t = (1 - z) n + z h_{t-1}). With PyTorch's default biases (near 0: a
  forget gate of 0.5 per step) the gated cells also failed from T ≈ 50 within this budget when we tried.
  A plain RNN has no gate to set: that difference is the lesson. Training: Adam 3e-3, batch 32, gradient
  clipping at 1, a fixed training set of 2,048 sequences per T, stopping at 99 % validation accuracy; the
  full run trains 3 seeds per point and reports the mean and the number of runs that reach 90 %: an RNN
  sometimes escapes at moderate T by growing its recurrent weights into a latch that holds the first bit
  (more often with Adam at 1e-2, which is why the rate is 3e-3), so one run per point would be luck.
- Timing (`rnn-vs-attention`): an nn.RNN layer (tanh, d → d) against llmkit's own causal self-attention
  layer (llmkit.model.transformer.Attention: the SDPA kernel the models run), same width d = 64, one
  sequence. Time is the CPU time of the calling thread with torch on one thread, the minimum over repeats
  after a warm-up, the two blocks taking turns: other processes on a shared machine then cost little
  (wall-clock time would count their time slices), and the minimum is the least-disturbed run. Slopes are
  least-squares fits of log(time) on log(T) over the three largest and the three smallest T.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmkit.lab import LabContext, lab, pyplot
from llmkit.lab.mlp import History, Split, fit, logits_of

CELLS = ("rnn", "lstm", "gru")
GATE_BIAS = 4.0
COLORS = {"rnn": "tab:red", "lstm": "tab:blue", "gru": "tab:green", "attention": "tab:purple"}


# ------------------------------------------------------------------------------------------------------
# vanishing gradient


def bit_sequences(n: int, T: int, seed: int = 0) -> Split:
    """n sequences of T random bits: x (n, T, 2) = (bit as ±1, start flag), y (n,) = the first bit."""
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(0, 2, (n, T), generator=g).float()  # (n, T)
    flag = torch.zeros(n, T)
    flag[:, 0] = 1.0
    return torch.stack([2 * bits - 1, flag], dim=-1), bits[:, 0]


class SequenceClassifier(nn.Module):
    """A recurrent layer (rnn / lstm / gru) over the sequence, then a linear read-out of its last hidden
    state: one logit per sequence."""

    def __init__(self, cell: str, hidden: int = 16, n_in: int = 2, gate_bias: float = GATE_BIAS):
        super().__init__()
        kinds = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}
        self.rnn = kinds[cell](n_in, hidden, batch_first=True)
        if cell != "rnn":  # remember by default: LSTM gates (i, f, g, o), GRU gates (r, z, n)
            b = {"lstm": (-gate_bias, gate_bias, 0.0, 0.0), "gru": (0.0, gate_bias, 0.0)}[cell]
            with torch.no_grad():
                self.rnn.bias_ih_l0.copy_(torch.tensor(b).repeat_interleave(hidden))
                self.rnn.bias_hh_l0.zero_()
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, T, n_in)
        out, _ = self.rnn(x)  # (B, T, hidden)
        return self.head(out[:, -1]).squeeze(-1)  # (B,)


def input_gradient_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(T,): the mean over the batch of ‖∂ℓ_i/∂x_{i,t}‖, ℓ_i the binary cross-entropy of sequence i.
    `model(x)` must give one logit per sequence and treat the sequences independently."""
    x = x.detach().clone().requires_grad_(True)
    loss = F.binary_cross_entropy_with_logits(logits_of(model, x), y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x)  # (B, T, n_in): row i is ∂ℓ_i/∂x_i
    return grad.norm(dim=-1).mean(0)


def train_on_bits(cell: str, T: int, *, hidden: int = 16, steps: int = 400, n_train: int = 2048,
                  seed: int = 0) -> tuple[SequenceClassifier, History]:
    """Train a fresh SequenceClassifier on the toy task at length T (stops at 99 % validation accuracy)."""
    torch.manual_seed(seed)
    model = SequenceClassifier(cell, hidden)
    train = bit_sequences(n_train, T, seed=seed + 1)
    val = bit_sequences(256, T, seed=seed + 2)
    hist = fit(model, train, val, steps=steps, lr=3e-3, batch_size=32, eval_every=25, eval_train=False,
               target_acc=0.99, clip=1.0, seed=seed)
    return model, hist


# ------------------------------------------------------------------------------------------------------
# cost of a forward pass


class RNNBlock(nn.Module):
    """One tanh RNN layer d -> d: h_t = tanh(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh), all h_t returned."""

    def __init__(self, d: int):
        super().__init__()
        self.rnn = nn.RNN(d, d, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d) -> (B, T, d)
        return self.rnn(x)[0]


class AttentionBlock(nn.Module):
    """llmkit's causal self-attention layer (q/k/v/o projections, SDPA), without positions."""

    def __init__(self, d: int, n_heads: int):
        super().__init__()
        from llmkit.config import ModelConfig
        from llmkit.model.transformer import Attention

        self.attn = Attention(ModelConfig(d_model=d, n_heads=n_heads, n_layers=1), layer_idx=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d) -> (B, T, d)
        B, T, _ = x.shape
        positions = torch.arange(T).expand(B, T)
        return self.attn(x, None, None, None, positions)[0]


def rnn_block(d: int = 64) -> RNNBlock:
    return RNNBlock(d).eval()


def attention_block(d: int = 64, n_heads: int = 4) -> AttentionBlock:
    return AttentionBlock(d, n_heads).eval()


@contextmanager
def one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@torch.inference_mode()
def forward_times(blocks: dict[str, nn.Module], Ts: Sequence[int], d: int = 64, repeats: int = 5,
                  batch: int = 1, seed: int = 0) -> dict[str, list[float]]:
    """CPU seconds of one forward of each block on a (batch, T, d) input, for each T: torch on one thread,
    the least thread CPU time over `repeats` rounds after a warm-up, the blocks taking turns in each round
    (A B A B) so that a disturbance on the machine hits both."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, list[float]] = {name: [] for name in blocks}
    with one_thread():
        for T in Ts:
            x = torch.randn(batch, T, d, generator=g)
            best = dict.fromkeys(blocks, math.inf)
            for block in blocks.values():
                block(x)
            for _ in range(repeats):
                for name, block in blocks.items():
                    t0 = time.thread_time()
                    block(x)
                    best[name] = min(best[name], time.thread_time() - t0)
            for name in blocks:
                out[name].append(best[name])
    return out


def loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares line through (log x, log y): (slope, intercept), so y ≈ e^intercept · x^slope."""
    lx = torch.tensor(xs, dtype=torch.float64).log()
    ly = torch.tensor(ys, dtype=torch.float64).log()
    slope = ((lx - lx.mean()) * (ly - ly.mean())).sum() / ((lx - lx.mean()) ** 2).sum()
    return slope.item(), (ly.mean() - slope * lx.mean()).item()


def crossover(Ts: Sequence[float], a: Sequence[float], b: Sequence[float]) -> float | None:
    """The first T where curve a rises above curve b, interpolated in log-log between the measured points
    around it (exact for power laws); None if a stays below b, Ts[0] if a starts above."""
    if a[0] > b[0]:
        return float(Ts[0])
    for i in range(1, len(Ts)):
        if a[i] > b[i]:
            d0 = math.log(a[i - 1] / b[i - 1])  # <= 0
            d1 = math.log(a[i] / b[i])  # > 0
            f = d0 / (d0 - d1)
            return math.exp(math.log(Ts[i - 1]) + f * (math.log(Ts[i]) - math.log(Ts[i - 1])))
    return None


def sci(ctx: LabContext, x: float, digits: int = 1) -> str:
    """x as m × 10^e in the lab's language (1,8 × 10⁻²⁹ in French)."""
    if x == 0 or not math.isfinite(x):
        return ctx.num(x, digits)
    e = math.floor(math.log10(abs(x)))
    m = x / 10**e
    if round(abs(m), digits) >= 10:
        m, e = m / 10, e + 1
    if -2 <= e <= 2:
        return ctx.num(x, max(0, digits - e))
    sup = str(e).translate(str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹"))
    return f"{ctx.num(m, digits)} × 10{sup}"


# ------------------------------------------------------------------------------------------------------
# the labs


@lab("vanishing-gradient", fr="Le gradient qui s'évanouit : RNN, LSTM et GRU selon la longueur T",
     en="The vanishing gradient: RNN, LSTM and GRU as the length T grows", course="3")
def vanishing_gradient(ctx: LabContext) -> None:
    hidden = 16
    Ts_grad = list(range(10, 101, 10))
    Ts_train = [10, 50] if ctx.quick else [10, 20, 30, 40, 60, 80, 100]
    steps, n_seeds = (200, 1) if ctx.quick else (400, 3)

    def batch(T: int) -> Split:  # float64: the RNN's gradient at T = 100 is below float32's smallest number
        x, y = bit_sequences(256, T, seed=ctx.seed + 3)
        return x.double(), y.double()

    grads: dict[str, list[float]] = {}
    profile: dict[str, list[float]] = {}
    for cell in CELLS:
        torch.manual_seed(ctx.seed)
        net = SequenceClassifier(cell, hidden).double()
        profile[cell] = input_gradient_norms(net, *batch(max(Ts_grad))).tolist()  # t = 1 .. T_max
        # ‖∂ℓ/∂x_1‖ at each length T: the same network, fresh sequences of length T
        grads[cell] = [input_gradient_norms(net, *batch(T))[0].item() for T in Ts_grad]

    seeds = [ctx.seed + k for k in range(n_seeds)]
    runs: dict[str, list[list[float]]] = {c: [[] for _ in Ts_train] for c in CELLS}  # [T index][seed]
    jobs = [(c, i, T, sd) for c in CELLS for i, T in enumerate(Ts_train) for sd in seeds]
    for cell, i, T, sd in ctx.bar(jobs, desc="vanishing-gradient"):
        _, hist = train_on_bits(cell, T, hidden=hidden, steps=steps, seed=sd)
        runs[cell][i].append(hist.val_acc[-1])
    acc = {c: [sum(r) / len(r) for r in runs[c]] for c in CELLS}  # mean over seeds, per T

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), layout="constrained")
    names = {"rnn": ctx.t("RNN simple", "simple RNN"), "lstm": "LSTM", "gru": "GRU"}
    for cell in CELLS:
        axes[0].semilogy(Ts_grad, grads[cell], "o-", color=COLORS[cell], label=names[cell])
        axes[1].semilogy(range(1, len(profile[cell]) + 1), profile[cell], "-", color=COLORS[cell],
                         label=names[cell])
        axes[2].plot(Ts_train, acc[cell], "o-", color=COLORS[cell], label=names[cell])
        if n_seeds > 1:
            for T, r in zip(Ts_train, runs[cell]):
                axes[2].scatter([T] * len(r), r, s=10, color=COLORS[cell], alpha=0.35)
    axes[0].set_xlabel(ctx.t("longueur T", "length T"))
    axes[0].set_ylabel("‖∂ℓ/∂x₁‖")
    axes[0].set_title(ctx.t("Gradient reçu par le premier bit (init.)",
                            "Gradient reaching the first bit (init)"))
    axes[1].set_xlabel(ctx.t(f"pas t (T = {max(Ts_grad)})", f"step t (T = {max(Ts_grad)})"))
    axes[1].set_ylabel("‖∂ℓ/∂xₜ‖")
    axes[1].set_title(ctx.t("Gradient le long de la séquence (init.)", "Gradient along the sequence (init)"))
    axes[2].axhline(0.5, color="gray", ls=":", lw=1, label=ctx.t("hasard", "chance"))
    axes[2].set_ylim(0.4, 1.03)
    axes[2].set_xlabel(ctx.t("longueur T", "length T"))
    axes[2].set_ylabel(ctx.t("précision (validation)", "accuracy (validation)")
                       + (ctx.t(f", moyenne de {n_seeds} essais", f", mean of {n_seeds} runs")
                          if n_seeds > 1 else ""))
    axes[2].set_title(ctx.t(f"Après au plus {steps} pas d'entraînement",
                            f"After at most {steps} training steps"))
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    ctx.figure(fig, "vanishing-gradient")

    # per-step decay factor of the gradient between the shortest and longest T
    span = Ts_grad[-1] - Ts_grad[0]
    factor = {c: (grads[c][-1] / grads[c][0]) ** (1 / span) for c in CELLS}
    wins = {c: [sum(a >= 0.9 for a in r) for r in runs[c]] for c in CELLS}  # runs reaching 90 %, per T
    rnn_last = max((T for T, w in zip(Ts_train, wins["rnn"]) if w), default=None)
    rnn_chance = next((T for i, T in enumerate(Ts_train) if all(max(r) < 0.6 for r in runs["rnn"][i:])),
                      None)  # from this T on, every RNN run stays at chance
    ctx.table("gradient", [{"T": T, **{c: grads[c][i] for c in CELLS}} for i, T in enumerate(Ts_grad)])
    ctx.table("accuracy", [{"T": T, **{c: acc[c][i] for c in CELLS},
                            **{f"{c}_runs_90": wins[c][i] for c in CELLS}} for i, T in enumerate(Ts_train)])
    ctx.data(hidden=hidden, gate_bias=GATE_BIAS, steps=steps, seeds=n_seeds, T_grad=Ts_grad, grad_first=grads,
             grad_profile_T=max(Ts_grad), grad_profile=profile, per_step_factor=factor, T_train=Ts_train,
             accuracy=acc, accuracy_runs=runs, runs_reaching_90=wins, rnn_last_T_learned=rnn_last,
             rnn_chance_from_T=rnn_chance)

    g10, g100 = grads["rnn"][0], grads["rnn"][-1]
    T0, T1 = Ts_grad[0], Ts_grad[-1]
    ctx.finding(
        f"RNN simple : le gradient qui atteint le premier bit vaut {sci(ctx, g10)} à T = {T0} et "
        f"{sci(ctx, g100)} à T = {T1}, {sci(ctx, g10 / g100)} fois moins : chaque pas de plus le multiplie "
        f"par {ctx.num(factor['rnn'])}.",
        f"Simple RNN: the gradient reaching the first bit is {sci(ctx, g10)} at T = {T0} and "
        f"{sci(ctx, g100)} at T = {T1}, {sci(ctx, g10 / g100)} times smaller: each extra step multiplies it "
        f"by {ctx.num(factor['rnn'])}.")
    ctx.finding(
        f"Avec leurs portes réglées pour retenir (biais ±{ctx.num(GATE_BIAS, 0)}), le facteur par pas est "
        f"{ctx.num(factor['lstm'])} pour le LSTM et {ctx.num(factor['gru'])} pour le GRU : à T = {T1}, "
        f"{sci(ctx, grads['lstm'][-1])} et {sci(ctx, grads['gru'][-1])} contre {sci(ctx, g100)} pour le RNN.",
        f"With their gates set to remember (bias ±{ctx.num(GATE_BIAS, 0)}), the factor per step is "
        f"{ctx.num(factor['lstm'])} for the LSTM and {ctx.num(factor['gru'])} for the GRU: at T = {T1}, "
        f"{sci(ctx, grads['lstm'][-1])} and {sci(ctx, grads['gru'][-1])} against {sci(ctx, g100)} for the "
        "RNN.")

    n_runs = len(Ts_train) * n_seeds
    total = {c: sum(wins[c]) for c in CELLS}
    Tm = Ts_train[-1]
    last = {c: ctx.pct(acc[c][-1]) for c in CELLS}
    won = {c: f"{total[c]}/{n_runs}" for c in CELLS}
    ctx.finding(
        f"Précision de validation à T = {Tm} (moyenne de {n_seeds} entraînement(s)) : RNN {last['rnn']}, "
        f"LSTM {last['lstm']}, GRU {last['gru']} (hasard : 50 %) ; entraînements atteignant 90 % sur "
        f"T = {Ts_train[0]}…{Tm} : RNN {won['rnn']}, LSTM {won['lstm']}, GRU {won['gru']}.",
        f"Validation accuracy at T = {Tm} (mean of {n_seeds} training run(s)): RNN {last['rnn']}, "
        f"LSTM {last['lstm']}, GRU {last['gru']} (chance: 50 %); runs reaching 90 % over "
        f"T = {Ts_train[0]}…{Tm}: RNN {won['rnn']}, LSTM {won['lstm']}, GRU {won['gru']}.")
    fr = f"le RNN apprend encore à T = {rnn_last}" if rnn_last else "le RNN n'apprend à aucune longueur"
    en = f"the RNN still learns at T = {rnn_last}" if rnn_last else "the RNN learns at no length"
    if rnn_chance is not None:
        fr += f", puis reste au niveau du hasard (< 60 %) dans tous les essais à partir de T = {rnn_chance}"
        en += f", then stays at chance level (< 60 %) in every run from T = {rnn_chance} on"
    ctx.finding(f"Sur ces {steps} pas au plus, {fr}.", f"Within these {steps} steps at most, {en}.")


@lab("rnn-vs-attention", fr="RNN contre attention : le temps d'un passage avant selon la longueur",
     en="RNN vs attention: time per forward pass as the sequence grows", course="7")
def rnn_vs_attention(ctx: LabContext) -> None:
    d, heads = 64, 4
    Ts = [32 * 2**i for i in range(8 if ctx.quick else 9)]  # 32 ... 4096 (quick) / 8192
    repeats = 5 if ctx.quick else 9
    torch.manual_seed(ctx.seed)
    blocks = {"rnn": rnn_block(d), "attention": attention_block(d, heads)}
    times = forward_times(blocks, Ts, d, repeats, seed=ctx.seed)
    big = {name: loglog_slope(Ts[-3:], t[-3:]) for name, t in times.items()}
    small = {name: loglog_slope(Ts[:3], t[:3])[0] for name, t in times.items()}
    cross = crossover(Ts, times["attention"], times["rnn"])

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), layout="constrained")
    names = {"rnn": "RNN", "attention": ctx.t("auto-attention", "self-attention")}
    for name, t in times.items():
        ms = [1e3 * s for s in t]
        slope, icpt = big[name]
        axes[0].loglog(Ts, ms, "o", color=COLORS[name],
                       label=f"{names[name]} ({ctx.t('pente', 'slope')} {ctx.num(slope)})")
        fit_T = Ts[-3:]
        axes[0].loglog(fit_T, [1e3 * math.exp(icpt) * T**slope for T in fit_T], "-", color=COLORS[name], lw=2)
        axes[0].loglog(Ts, ms, ":", color=COLORS[name], lw=0.8)
        axes[1].semilogx(Ts, [1e6 * s / T for s, T in zip(t, Ts)], "o-", color=COLORS[name],
                         label=names[name])
    for ax in axes:
        if cross is not None:
            ax.axvline(cross, color="gray", ls="--", lw=1,
                       label=ctx.t("croisement", "crossover") + f" T ≈ {ctx.num(round(cross))}")
        ax.set_xlabel(ctx.t("longueur T (tokens)", "length T (tokens)"))
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=9)
    axes[0].set_ylabel(ctx.t("temps d'un passage avant (ms)", "time per forward (ms)"))
    axes[0].set_title(ctx.t("log-log ; droites ajustées sur les 3 plus grands T",
                            "log-log; lines fitted on the 3 largest T"))
    axes[1].set_ylabel(ctx.t("temps par token (µs)", "time per token (µs)"))
    axes[1].set_title(ctx.t("coût par token", "cost per token"))
    fig.suptitle(ctx.t(f"Une couche de largeur d = {d}, une séquence, un cœur (temps CPU)",
                       f"One layer of width d = {d}, one sequence, one core (CPU time)"))
    ctx.figure(fig, "rnn-vs-attention")

    ctx.table("times_ms", [{"T": T, "rnn": 1e3 * times["rnn"][i], "attention": 1e3 * times["attention"][i]}
                           for i, T in enumerate(Ts)])
    ctx.data(d=d, heads=heads, T=Ts, seconds=times, slope_large_T={n: s for n, (s, _) in big.items()},
             slope_small_T=small, fit_T=Ts[-3:], crossover_T=cross)

    sr, sa = big["rnn"][0], big["attention"][0]
    fixed = max(small.values()) < 0.9  # sub-linear at small T: a fixed cost per call still weighs
    ctx.finding(
        f"Pentes log-log entre T = {Ts[-3]} et {Ts[-1]} : RNN {ctx.num(sr)} ({Ts[-1]} pas successifs : "
        f"on attend 1), attention {ctx.num(sa)} (matrice T × T : on attend 2 quand elle domine) ; "
        f"aux petits T ({Ts[0]}–{Ts[2]}), RNN {ctx.num(small['rnn'])} et attention "
        f"{ctx.num(small['attention'])}" + (", le coût fixe de chaque appel pèse encore." if fixed else "."),
        f"Log-log slopes between T = {Ts[-3]} and {Ts[-1]}: RNN {ctx.num(sr)} ({Ts[-1]} sequential "
        f"steps: 1 expected), attention {ctx.num(sa)} (T × T matrix: 2 expected once it dominates); "
        f"at small T ({Ts[0]}–{Ts[2]}), RNN {ctx.num(small['rnn'])} and attention "
        f"{ctx.num(small['attention'])}" + (", the fixed cost of each call still weighs." if fixed else "."))
    ratio = times["attention"][-1] / times["rnn"][-1]
    if cross is None:
        fr = f"l'attention reste plus rapide que le RNN jusqu'à T = {Ts[-1]}"
        en = f"attention stays faster than the RNN up to T = {Ts[-1]}"
    elif cross == Ts[0]:
        fr = f"l'attention est plus lente que le RNN dès T = {Ts[0]}"
        en = f"attention is slower than the RNN from T = {Ts[0]} on"
    else:
        fr = f"l'attention devient plus lente que le RNN vers T ≈ {ctx.num(round(cross))}"
        en = f"attention becomes slower than the RNN around T ≈ {ctx.num(round(cross))}"
    t0r, t0a = times["rnn"][0], times["attention"][0]
    ctx.finding(
        f"Croisement : {fr} ; à T = {Ts[0]}, attention {ctx.num(1e3 * t0a, 3)} ms contre RNN "
        f"{ctx.num(1e3 * t0r, 3)} ms, à T = {Ts[-1]}, {ctx.num(1e3 * times['attention'][-1], 1)} ms contre "
        f"{ctx.num(1e3 * times['rnn'][-1], 1)} ms (× {ctx.num(ratio)}).",
        f"Crossover: {en}; at T = {Ts[0]}, attention {ctx.num(1e3 * t0a, 3)} ms vs RNN "
        f"{ctx.num(1e3 * t0r, 3)} ms, at T = {Ts[-1]}, {ctx.num(1e3 * times['attention'][-1], 1)} ms vs "
        f"{ctx.num(1e3 * times['rnn'][-1], 1)} ms (× {ctx.num(ratio)}).")
    per_tok = {n: [1e6 * s / T for s, T in zip(t, Ts)] for n, t in times.items()}
    pr, pa = per_tok["rnn"], per_tok["attention"]
    ctx.finding(
        f"Par token : RNN {ctx.num(pr[0], 1)} µs à T = {Ts[0]} et {ctx.num(pr[-1], 1)} µs à T = {Ts[-1]} "
        f"(× {ctx.num(pr[-1] / pr[0])}), attention {ctx.num(pa[0], 1)} puis {ctx.num(pa[-1], 1)} µs "
        f"(× {ctx.num(pa[-1] / pa[0])}) : chaque token de l'attention regarde tous les précédents.",
        f"Per token: RNN {ctx.num(pr[0], 1)} µs at T = {Ts[0]} and {ctx.num(pr[-1], 1)} µs at T = {Ts[-1]} "
        f"(× {ctx.num(pr[-1] / pr[0])}), attention {ctx.num(pa[0], 1)} then {ctx.num(pa[-1], 1)} µs "
        f"(× {ctx.num(pa[-1] / pa[0])}): each attention token looks at all the earlier ones.")

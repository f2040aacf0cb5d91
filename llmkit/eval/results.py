"""What an evaluation leaves behind and how to read it: results.json, samples.jsonl, a bar chart, a terminal
table, and `compare` for two runs side by side (before / after fine-tuning).

results.json:
    {"llmkit": version, "date": ISO time, "model": backend info (name, path, fingerprint or api_base),
     "settings": {...}, "tasks": {task: {"config", "n", "main_metric", "higher_is_better",
                                         "metrics": {name: {"value", "stderr"}}, "wall_s", "items_per_s"}}}
samples.jsonl: one line per item: {"task", "id", "metrics", ...what the task shows (target, prediction...)}.

Notable choices
- `model_fingerprint` hashes the parameters' shapes, dtypes and leading bytes: cheap (no pass over 500 MB),
  and it changes when a model is fine-tuned, quantized or loaded with another dtype, which is what the resume
  cache and `--compare` need to know. It is not a cryptographic identity of the weights.
- `compare` marks a difference as significant when it exceeds twice the combined standard error (a ~95 %
  two-sided test for independent samples; paired items make it conservative).
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

from llmkit.errors import LlmkitError
from llmkit.io import atomic_path, read_json


def model_fingerprint(llm) -> str:
    h = hashlib.sha256()
    for name, p in llm.model.state_dict().items():
        t = p.detach()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        flat = t.reshape(-1)[:1024].cpu().contiguous()  # (<= 1024,)
        h.update((flat.float() if flat.dtype.is_floating_point else flat).numpy().tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------- formatting
def fmt(value: float | None, stderr: float | None = None, *, percent: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    scale = 100.0 if percent else 1.0
    s = f"{value * scale:.2f}" if percent or abs(value) < 1e4 else f"{value:.4g}"
    if stderr is not None:
        s += f" ± {stderr * scale:.2f}"
    return s


def is_fraction(metric: str) -> bool:
    """Metrics shown as percentages (accuracies, exact match, pass@k)."""
    base = metric.split("/")[0]
    return base.startswith(("acc", "exact_match", "pass@", "mc1", "mc2", "oov"))


def table(results: dict[str, Any], *, per_subject: bool = False) -> str:
    """A plain-text table: task, metric, value ± stderr, items, items/s."""
    rows = [("task", "metric", "value", "n", "items/s")]
    for task, r in results["tasks"].items():
        for m, v in r["metrics"].items():
            if "/" in m and not per_subject:
                continue
            rows.append((task, m + (" (%)" if is_fraction(m) else ""),
                         fmt(v["value"], v["stderr"], percent=is_fraction(m)), str(r["n"]),
                         f"{r['items_per_s']:.1f}" if r.get("items_per_s") else "-"))
    return _grid(rows)


def _grid(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- plots
def _main_bars(results: dict[str, Any]) -> list[tuple[str, float, float | None]]:
    out = []
    for task, r in results["tasks"].items():
        m = r["main_metric"]
        if m in r["metrics"]:
            v = r["metrics"][m]
            scale = 100.0 if is_fraction(m) else 1.0
            out.append((f"{task}\n{m}" + (" (%)" if scale == 100 else ""), v["value"] * scale,
                        None if v["stderr"] is None else v["stderr"] * scale))
    return out


def plot(results: dict[str, Any], path: Path, other: dict[str, Any] | None = None,
         labels: tuple[str, str] = ("A", "B")) -> Path | None:
    """A bar chart of each task's main metric (error bars = 1.96 stderr); two runs side by side with
    `other`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = _main_bars(results)
    if not a:
        return None
    b = dict((k, (v, s)) for k, v, s in _main_bars(other)) if other else {}
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(a) * (2 if other else 1)), 3.8))
    x = range(len(a))
    width = 0.4 if other else 0.6
    err = [1.96 * s if s is not None else 0 for _, _, s in a]
    ax.bar([i - (width / 2 if other else 0) for i in x], [v for _, v, _ in a], width, yerr=err, capsize=4,
           label=labels[0], color="#4c72b0")
    if other:
        vals = [b.get(k, (math.nan, None)) for k, _, _ in a]
        ax.bar([i + width / 2 for i in x], [v for v, _ in vals], width,
               yerr=[1.96 * s if s is not None else 0 for _, s in vals], capsize=4, label=labels[1],
               color="#dd8452")
        ax.legend()
    ax.set_xticks(list(x))
    ax.set_xticklabels([k for k, _, _ in a], fontsize=8)
    ax.set_title(f"{results['model'].get('model') or results['model'].get('api_base', '')}: main metrics "
                 "(bars: 95 % interval)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------- compare
def load_results(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    r = read_json(p, missing=f"no results at {p}: give a results.json or the --out folder of a run")
    if not isinstance(r, dict) or "tasks" not in r:
        raise LlmkitError(f"{p} is not an llmkit eval results.json (no 'tasks')")
    return r


def compare(a: dict[str, Any], b: dict[str, Any], labels: tuple[str, str] = ("A", "B")) -> str:
    """Two runs side by side: every metric both have, the difference B - A, and '*' when it exceeds twice the
    combined standard error."""
    rows = [("task", "metric", labels[0], labels[1], "B - A", "")]
    for task, ra in a["tasks"].items():
        rb = b["tasks"].get(task)
        if rb is None:
            continue
        for m, va in ra["metrics"].items():
            if "/" in m or m not in rb["metrics"]:
                continue
            vb = rb["metrics"][m]
            pct = is_fraction(m)
            d = vb["value"] - va["value"]
            sig = ""
            if va["stderr"] is not None and vb["stderr"] is not None:
                se = math.hypot(va["stderr"], vb["stderr"])
                sig = "*" if se > 0 and abs(d) > 2 * se else ""
            rows.append((task, m + (" (%)" if pct else ""), fmt(va["value"], percent=pct),
                         fmt(vb["value"], percent=pct), ("+" if d >= 0 else "") + fmt(d, percent=pct), sig))
    if len(rows) == 1:
        raise LlmkitError("the two runs share no task: nothing to compare")
    return _grid(rows) + "\n(* = the difference exceeds twice the combined standard error)"

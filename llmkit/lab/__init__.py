"""The course, runnable: each experiment and practical session (TP) of an LLM course as one function that
returns its data, its figures (PNG) and its findings — sentences computed from this run's numbers, in French
or English, never canned text.

    from llmkit.lab import run_lab, list_labs
    result = run_lab("temperature-entropy", lang="fr", quick=True)   # -> LabResult
    result.findings      # ["À T = 0,1 l'entropie vaut 0,02 bit ...", ...]
    result.figures       # [Path(".../temperature-entropy/entropy.png"), ...]
    result.tables        # {"samples": [{"T": 0.1, "text": ...}, ...]}

    llmkit lab --list
    llmkit lab attention --lang en --quick --out runs/lab

Notable choices
- A lab is a plain function `fn(ctx: LabContext) -> None` registered with `@lab(...)`; it records what it
  found through its context (`ctx.finding`, `ctx.table`, `ctx.figure`, `ctx.data`), and `run_lab` turns
  that into a LabResult and writes `findings.md`, `result.json` and the PNGs under `out/NAME/`. Notebooks
  and the web page call the same functions: no logic lives in the CLI.
- `quick=True` shrinks every sweep so a lab finishes in well under a minute on a 2-core laptop CPU (CI runs
  every lab this way); the full run takes minutes and gives the figures a course would show.
- Language: `ctx.t(fr, en)` picks the sentence; numbers are formatted by `ctx.num` (decimal comma in
  French). Figures keep their text short and take the same language.
- The model (labs that need one) is loaded once per process in float32 on the CPU by default (`ctx.llm()`),
  so attention weights and hidden states are the model's exact values; `model=` picks another one.
- Figures use matplotlib's Agg backend (no display needed) and are written atomically.
"""

from __future__ import annotations

import difflib
import importlib
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmkit.errors import LlmkitError

LANGS = ("fr", "en")
# modules holding the labs; each registers its labs with @lab when imported
LAB_MODULES = ("mlp", "rnn", "text", "bpe", "sampling", "attention", "embeddings", "classify", "prompts",
               "perf", "scaling")


@dataclass(frozen=True)
class Lab:
    name: str
    fn: Callable[[LabContext], None]
    title: dict[str, str]  # {"fr": ..., "en": ...}
    course: str = ""  # the course's experiment number or session ("1" ... "10", "TP1" ...), "" if none
    needs_model: bool = False
    needs_data: tuple[str, ...] = ()  # paths under ../shared/data this lab reads


LABS: dict[str, Lab] = {}


def lab(name: str, *, fr: str, en: str, course: str = "", needs_model: bool = False,
        needs_data: tuple[str, ...] = ()) -> Callable:
    """Register `fn(ctx)` as the lab NAME, with its title in both languages."""

    def register(fn: Callable[[LabContext], None]) -> Callable[[LabContext], None]:
        if name in LABS and LABS[name].fn is not fn:
            raise ValueError(f"lab {name!r} registered twice")
        LABS[name] = Lab(name, fn, {"fr": fr, "en": en}, course, needs_model, needs_data)
        return fn

    return register


def _load_all() -> None:
    for mod in LAB_MODULES:
        try:
            importlib.import_module(f"llmkit.lab.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"llmkit.lab.{mod}":
                raise


def list_labs() -> list[Lab]:
    """Every registered lab, in the course's order (numbered experiments, then TPs, then the others)."""
    _load_all()

    def key(lb: Lab) -> tuple:
        c = lb.course
        if c.isdigit():
            return (0, int(c), lb.name)
        if c.startswith("TP"):
            return (1, c, lb.name)
        return (2, 0, lb.name)

    return sorted(LABS.values(), key=key)


def get_lab(name: str) -> Lab:
    _load_all()
    if name not in LABS:
        close = difflib.get_close_matches(name, list(LABS), n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise LlmkitError(f"unknown lab {name!r}{hint}; `llmkit lab --list` shows them all")
    return LABS[name]


# ----------------------------------------------------------------------------------------------------
# where things come from


def shared_data_dir() -> Path:
    """../shared/data beside the project (LLMKIT_SHARED overrides the folder holding data/)."""
    env = os.environ.get("LLMKIT_SHARED")
    if env:
        return Path(env) / "data"
    here = Path(__file__).resolve().parents[2]
    for base in (here.parent / "shared", Path.cwd().parent / "shared", Path.cwd() / "shared"):
        if (base / "data").is_dir():
            return base / "data"
    return here.parent / "shared" / "data"


def data_file(rel: str) -> Path:
    """A file under ../shared/data, or a one-line error saying where it was looked for."""
    p = shared_data_dir() / rel
    if not p.exists():
        raise LlmkitError(f"lab data not found: {p} (set LLMKIT_SHARED to the folder holding data/)")
    return p


_MODELS: dict[tuple, Any] = {}


def load_model(name: str | None = None, dtype: str = "float32", quantize: str | None = None):
    """An llmkit.LLM, loaded once per process per (name, dtype, quantize)."""
    from llmkit.api import load
    from llmkit.hub import DEFAULT_MODEL

    key = (name or DEFAULT_MODEL, dtype, quantize)
    if key not in _MODELS:
        _MODELS[key] = load(key[0], device="cpu", dtype=None if quantize else dtype, quantize=quantize)
    return _MODELS[key]


# ----------------------------------------------------------------------------------------------------
# what a lab records


@dataclass
class LabResult:
    name: str
    title: str
    lang: str
    quick: bool
    out: Path
    findings: list[str] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)
    tables: dict[str, list[dict]] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    model: str | None = None

    def markdown(self, figures: bool = True) -> str:
        """findings.md: title, findings, tables and (with `figures`) links to the PNGs beside it."""
        lines = [f"# {self.title}", ""]
        lines += [f"- {f}" for f in self.findings]
        for name, rows in self.tables.items():
            lines += ["", f"## {name}", "", *markdown_table(rows)]
        if figures and self.figures:
            lines += [""] + [f"![{p.stem}]({p.name})" for p in self.figures]
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict:
        return {"name": self.name, "title": self.title, "lang": self.lang, "quick": self.quick,
                "model": self.model, "seconds": round(self.seconds, 2), "findings": self.findings,
                "figures": [p.name for p in self.figures], "tables": self.tables, "data": self.data}

    def _repr_markdown_(self) -> str:  # notebooks show findings and tables; they display the PNGs themselves
        return self.markdown(figures=False)


def markdown_table(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    cols = list(rows[0])
    out = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(_cell(r.get(c, "")) for c in cols) + " |")
    return out


def _cell(v: Any) -> str:
    if isinstance(v, float):
        v = f"{v:.4g}"
    return str(v).replace("|", "\\|").replace("\n", " ")


class LabContext:
    """What a lab gets: its options, and the places to put what it finds."""

    def __init__(self, lab: Lab, out: Path, lang: str, quick: bool, model: str | None, seed: int,
                 progress: bool = True):
        self.lab = lab
        self.out = out
        self.lang = lang
        self.quick = quick
        self.model_name = model
        self.seed = seed
        self.progress = progress
        self.result = LabResult(lab.name, lab.title[lang], lang, quick, out, model=model)

    # language ---------------------------------------------------------------------------
    def t(self, fr: str, en: str) -> str:
        return fr if self.lang == "fr" else en

    def num(self, x: float, digits: int = 2) -> str:
        """A number as a reader of this language writes it: 3,14 in French, 3.14 in English."""
        if isinstance(x, int) or (isinstance(x, float) and x.is_integer() and abs(x) >= 100):
            s = f"{int(x):,}".replace(",", "\u202f" if self.lang == "fr" else ",")
        else:
            s = f"{x:.{digits}f}"
            if self.lang == "fr":
                s = s.replace(".", ",")
        return s

    def pct(self, x: float, digits: int = 1) -> str:
        """A fraction 0..1 as a percentage: 61,5 % (fr) / 61.5 % (en)."""
        return f"{self.num(100 * x, digits)} %"

    # recording ---------------------------------------------------------------------------
    def finding(self, fr: str, en: str) -> None:
        self.result.findings.append(self.t(fr, en))

    def table(self, name: str, rows: list[dict]) -> None:
        self.result.tables[name] = rows

    def data(self, **kw: Any) -> None:
        self.result.data.update(kw)

    def figure(self, fig, name: str) -> Path:
        """Save a matplotlib figure as out/NAME.png (atomically) and close it."""
        import matplotlib.pyplot as plt

        from llmkit.io import atomic_path

        path = self.out / f"{_slug(name)}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        self.result.figures.append(path)
        return path

    # resources ---------------------------------------------------------------------------
    def llm(self, dtype: str = "float32", quantize: str | None = None):
        """The lab's model (the default model unless --model), loaded once per process."""
        llm = load_model(self.model_name, dtype=dtype, quantize=quantize)
        self.result.model = llm.name
        return llm

    def data_file(self, rel: str) -> Path:
        return data_file(rel)

    def bar(self, iterable=None, total: int | None = None, desc: str = ""):
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc or self.lab.name, disable=not self.progress, leave=False)


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", s).strip("-") or "figure"


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def run_lab(name: str, *, model: str | None = None, out: str | os.PathLike | None = None, lang: str = "fr",
            quick: bool = False, seed: int = 0, progress: bool = True) -> LabResult:
    """Run the lab NAME; figures and findings go to OUT/NAME/ (default runs/lab/NAME/)."""
    if lang not in LANGS:
        raise LlmkitError(f"--lang {lang!r}: choose fr or en")
    lb = get_lab(name)
    for rel in lb.needs_data:
        data_file(rel)  # one clear line before any work when the course data is missing
    folder = Path(out if out is not None else Path("runs") / "lab") / lb.name
    folder.mkdir(parents=True, exist_ok=True)
    pyplot()
    import torch

    torch.manual_seed(seed)
    ctx = LabContext(lb, folder, lang, quick, model, seed, progress)
    t0 = time.perf_counter()
    lb.fn(ctx)
    res = ctx.result
    res.seconds = time.perf_counter() - t0
    from llmkit.io import atomic_write_json, atomic_write_text

    atomic_write_text(folder / "findings.md", res.markdown())
    atomic_write_json(folder / "result.json", json.loads(json.dumps(res.to_json(), default=_jsonable)))
    return res


def _jsonable(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)

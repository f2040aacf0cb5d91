"""`evaluate`: run tasks on a backend, item chunk by item chunk, with a progress bar, a resume cache, and the
files of llmkit.eval.results at the end.

    from llmkit.eval import evaluate
    res = evaluate("smollm2-135m-instruct", ["hellaswag", "mmlu"], limit=100, out="runs/eval")
    res["tasks"]["hellaswag"]["metrics"]["acc_norm"]       # {"value": 0.43, "stderr": 0.005}

Notable choices
- Documents go to the backend in chunks (64 for log-likelihood tasks, 16 for generation) so the scorer can
  batch and share contexts within a chunk, and every finished chunk is appended to the cache at once.
- The resume cache is one JSONL file per (model fingerprint, task settings) under ~/.cache/llmkit/eval
  ($LLMKIT_CACHE overrides the root): an interrupted run, started again with the same arguments, skips the
  items already done. `cache=False` turns it off. Records are independent of the chunking, so a resumed run
  gives the same numbers as an uninterrupted one.
- Task metrics are computed from every item's record (cached or new) by the task's `aggregate`.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from llmkit.errors import LlmkitError
from llmkit.eval.backends import Backend, LocalBackend
from llmkit.eval.base import Record, Task, TaskOptions, get_task
from llmkit.eval.results import plot, table
from llmkit.io import atomic_path, atomic_write_json

CHUNK = {"loglikelihood": 64, "generate": 16, "rolling": 4}


def cache_root() -> Path:
    return Path(os.environ.get("LLMKIT_CACHE", Path.home() / ".cache" / "llmkit")) / "eval"


def make_backend(model: Any = None, *, api_base: str | None = None, api_key: str | None = None,
                 batch_size: int = 32, device: str | None = None, dtype: str | None = None,
                 quantize: str | None = None, adapter: str | None = None) -> Backend:
    """A backend from what the user gave: a Backend, an LLM, a name/path to load, or a server URL."""
    if isinstance(model, Backend):
        return model
    if api_base:
        from llmkit.eval.http import HTTPBackend

        if adapter:
            raise LlmkitError("--adapter applies to a model loaded here; with --api-base, give the "
                              "adapter's model id on the server as MODEL")
        name = model if isinstance(model, str) else None
        return HTTPBackend(api_base, api_key, name, batch_size=batch_size)
    if model is None or isinstance(model, str | os.PathLike):
        import llmkit
        from llmkit.hub import DEFAULT_MODEL

        return LocalBackend(llmkit.load(model or DEFAULT_MODEL, device=device, dtype=dtype, quantize=quantize,
                                        adapter=adapter), batch_size=batch_size)
    if adapter:
        from llmkit.lora import load_adapter

        load_adapter(model, adapter)
    return LocalBackend(model, batch_size=batch_size)


def _cache_file(backend_info: dict[str, Any], task: Task) -> Path:
    key = json.dumps({"model": backend_info, "task": task.config()}, sort_keys=True, default=str)
    return cache_root() / f"{task.name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.jsonl"


def _read_cache(path: Path) -> dict[str, Record]:
    done: dict[str, Record] = {}
    if not path.exists():
        return done
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                d = json.loads(line)
                done[d["id"]] = Record(d["id"], d["metrics"], d.get("data", {}))
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line cut by a crash: that item runs again
    return done


def run_task(task: Task, backend: Backend, *, cache: bool = True, progress: bool = True
             ) -> tuple[list[Record], dict[str, Any]]:
    """Every document of `task` through `backend` -> (records in document order, run statistics)."""
    from tqdm import tqdm

    docs = task.docs()
    ids = [str(d["id"]) for d in docs]
    if len(set(ids)) != len(ids):
        raise LlmkitError(f"{task.name}: document ids are not unique")
    path = _cache_file(backend.info(), task) if cache else None
    done = _read_cache(path) if path else {}
    todo = [d for d in docs if str(d["id"]) not in done]
    t0 = time.perf_counter()
    bar = tqdm(total=len(docs), initial=len(docs) - len(todo), desc=task.name, unit="item",
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    chunk = CHUNK.get(task.kind, 16)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        for i in range(0, len(todo), chunk):
            part = todo[i:i + chunk]
            reqs = [task.requests(d) for d in part]
            flat = [r for rs in reqs for r in rs]
            answers = backend.run(flat)
            new, k = [], 0
            for d, rs in zip(part, reqs):
                rec = task.process(d, answers[k:k + len(rs)])
                k += len(rs)
                done[str(d["id"])] = rec
                new.append(rec)
            if path:
                with open(path, "a", encoding="utf-8") as f:
                    for rec in new:
                        f.write(json.dumps({"id": rec.id, "metrics": rec.metrics, "data": rec.data},
                                           ensure_ascii=False) + "\n")
            bar.update(len(part))
    finally:
        bar.close()
    wall = time.perf_counter() - t0
    stats = {"wall_s": round(wall, 3), "new_items": len(todo), "cached_items": len(docs) - len(todo),
             "items_per_s": round(len(todo) / wall, 3) if todo and wall > 0 else None,
             "cache": str(path) if path else None}
    return [done[i] for i in ids], stats


def evaluate(model: Any = None, tasks: Sequence[str] | str = ("hellaswag",), *, limit: int | None = None,
             shots: int | None = None, seed: int = 1234, batch_size: int = 32, api_base: str | None = None,
             api_key: str | None = None, adapter: str | None = None, out: str | os.PathLike | None = None,
             data: Sequence[str] = (), data_dir: str | os.PathLike | None = None, template: str | None = None,
             task_args: dict[str, str] | None = None, device: str | None = None, dtype: str | None = None,
             quantize: str | None = None, cache: bool = True, progress: bool = True,
             print_table: bool = False) -> dict[str, Any]:
    """Run `tasks` on a model (an LLM, a name or path, a Backend, or a server via `api_base`) and return the
    results dict (the content of results.json). With `out`, write results.json, samples.jsonl and
    results.png there (atomically)."""
    from llmkit import __version__

    names = [tasks] if isinstance(tasks, str) else list(tasks)
    if not names:
        raise LlmkitError("no task given: pass --task NAME (llmkit eval --list shows them)")
    opts = TaskOptions(shots=shots, limit=limit, seed=seed, data=[str(d) for d in data],
                       data_dir=Path(data_dir) if data_dir else None, template=template,
                       extra=dict(task_args or {}))
    built = [get_task(n, opts) if ":" not in n else _with_shots(n, opts) for n in names]  # before any model
    labels = [n if ":" in n else t.name for n, t in zip(names, built)]
    if len(set(labels)) != len(labels):
        raise LlmkitError(f"a task is given twice: {', '.join(names)}")
    unknown = sorted(k for k in opts.extra if not any(k in t.task_args for t in built))
    if unknown:
        takes = "; ".join(f"{t.name}: {', '.join(t.task_args) or 'none'}" for t in built)
        raise LlmkitError(f"unknown --task-arg {', '.join(unknown)} (the tasks take {takes})")
    backend = make_backend(model, api_base=api_base, api_key=api_key, batch_size=batch_size, device=device,
                           dtype=dtype, quantize=quantize, adapter=adapter)
    res: dict[str, Any] = {
        "llmkit": __version__, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": backend.info(),
        "settings": {"tasks": names, "limit": limit, "shots": shots, "seed": seed, "batch_size": batch_size,
                     "adapter": adapter, "quantize": quantize, "data": list(opts.data), "template": template,
                     "task_args": dict(opts.extra)},
        "tasks": {},
    }
    samples: list[dict[str, Any]] = []
    for label, task in zip(labels, built):
        records, stats = run_task(task, backend, cache=cache, progress=progress)
        metrics = task.aggregate(records)
        res["tasks"][label] = {
            "config": task.config(), "n": len(records), "main_metric": task.main_metric,
            "higher_is_better": task.higher_is_better,
            "metrics": {m: {"value": v, "stderr": s} for m, (v, s) in metrics.items()}, **stats,
        }
        samples += [{"task": label, "id": r.id, "metrics": r.metrics, **r.data} for r in records]
    if out is not None:
        write(res, samples, Path(out))
    if print_table:
        print(table(res))
    return res


def _with_shots(spec: str, opts: TaskOptions) -> Task:
    """`NAME:K`: the task NAME with K shots whatever --shots says (mmlu:5 beside hellaswag:0)."""
    from dataclasses import replace

    name, _, k = spec.partition(":")
    if not k.isdigit():
        raise LlmkitError(f"--task {spec!r}: expected NAME or NAME:SHOTS (e.g. mmlu:5)")
    return get_task(name, replace(opts, shots=int(k)))


def write(res: dict[str, Any], samples: list[dict[str, Any]], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", res)
    with atomic_path(out / "samples.jsonl") as tmp, open(tmp, "w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps(s, ensure_ascii=False, default=str) + "\n")
    plot(res, out / "results.png")

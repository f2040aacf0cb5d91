"""Evaluation: benchmarks by log-likelihood or generation, and perplexity, in this process or over HTTP.

    from llmkit.eval import evaluate
    res = evaluate("smollm2-135m-instruct", ["hellaswag", "mmlu"], limit=100, out="runs/eval")

- base.py: requests, answers, the Task base class and the task registry
- backends.py: LocalBackend (a loaded model); http.py: HTTPBackend (any OpenAI-compatible server)
- tasks/: the built-in tasks (mc.py, gen.py, text.py); ngram.py: the trigram baseline;
  sandbox.py: running generated code
- runner.py: `evaluate` (chunks, progress bar, resume cache); results.py: files, table, plot, compare
"""

from __future__ import annotations

from typing import Any


def evaluate(*args: Any, **kw: Any) -> dict[str, Any]:
    from llmkit.eval.runner import evaluate as _evaluate

    return _evaluate(*args, **kw)


evaluate.__doc__ = "See llmkit.eval.runner.evaluate."

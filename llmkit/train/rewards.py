"""Verifiable rewards for RL on maths word problems, the problems themselves, and the accuracy interval.

    problems = load_problems("/work/shared/data/eval/svamp.jsonl")     # [{"question", "answer", "id"}]
    problems = arithmetic_problems(500, seed=0)                       # easy generated ones (integer answers)
    prompt = problem_prompt(problems[0])                              # messages asking for "Answer: N"
    reward = combine({"correct": 1.0, "format": 0.2})                 # the contract signature below
    reward([prompt], ["3 + 4 = 7\\nAnswer: 7"], [problems[0]])        # -> [1.2] when the answer is 7

Every reward has the signature `reward(prompts, completions, docs) -> list[float]` (prompts: the message
lists, completions: the generated texts, docs: the data records, here with a numeric "answer"), as TRL's
reward functions receive `prompts`, `completions` and the dataset's columns.

Notable choices
- `extract_answer` reads the number the completion commits to, in this order: the last "#### N" (GSM8K),
  the last "Answer: N" (the format we ask for), the last \\boxed{N}, the last "The answer is N", else the
  last number in the text. Thousands separators, "$" and a trailing ".0" or full stop are ignored; the
  comparison with the reference is numeric (|a - b| <= 1e-6), so "1,000.0" matches 1000.
- The format we ask for is a final line "Answer: N" (plain words a 135M instruct model already writes);
  `format_reward` is 1 when the last non-empty line is exactly that, whether or not N is right. The prompt
  (`problem_prompt`) asks for it in the user turn (no system message: the model's template keeps its own).
- Combined rewards are a weighted sum of named rewards, TRL's `reward_weights` with
  multi_objective_aggregation="sum_then_normalize" (the group normalisation happens in the GRPO stage).
- `arithmetic_problems` draws one-step word problems (+, -, x on small numbers) from a seeded generator, so a
  135M model starts with a non-zero accuracy: RL needs some reward signal in each group to learn from.
"""

from __future__ import annotations

import math
import os
import random
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from llmkit.errors import LlmkitError

Messages = list[dict[str, str]]
Reward = Callable[[list[Messages], list[str], list[dict[str, Any]]], list[float]]

INSTRUCTION = 'Solve the problem. Finish with a last line of the form "Answer: <number>".'
_NUM = r"-?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+"  # 1,234.5 | 12 | -3.5 | .5 | $12
_PATTERNS = (  # (pattern, group): the first kind that matches wins, and its LAST match counts
    re.compile(rf"####\s*({_NUM})"),
    re.compile(rf"answer\s*(?:is)?\s*[:=]\s*\**\s*({_NUM})", re.IGNORECASE),
    re.compile(rf"\\boxed\{{\s*({_NUM})\s*\}}"),
    re.compile(rf"the (?:final )?answer is:?\s*\**\s*({_NUM})", re.IGNORECASE),
)
_ANY_NUMBER = re.compile(_NUM)
_ANSWER_LINE = re.compile(rf"answer:\s*({_NUM})\s*\.?", re.IGNORECASE)


# ---------------------------------------------------------------------------------------------- answers
def parse_number(text: str) -> float | None:
    """A number written as text ("1,234", "$12", "-3.50", "7.") as a float, or None."""
    s = text.strip().rstrip(".").replace(",", "").replace("$", "").replace(" ", "")
    try:
        v = float(s)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def extract_answer(text: str) -> float | None:
    """The number a completion gives as its answer (see the module notes for the order), or None."""
    for pattern in _PATTERNS:
        found = pattern.findall(text)
        if found:
            return parse_number(found[-1])
    found = _ANY_NUMBER.findall(text)
    return parse_number(found[-1]) if found else None


def answer_value(answer: Any, where: str = "answer") -> float:
    """A record's reference answer as a float: a number, a numeric string, or GSM8K's worked answer ending
    in "#### N". A one-line LlmkitError naming `where` otherwise."""
    if isinstance(answer, bool):
        raise LlmkitError(f"{where}: field 'answer' must be a number, got a boolean")
    if isinstance(answer, (int, float)):
        if not math.isfinite(answer):
            raise LlmkitError(f"{where}: field 'answer' must be a finite number")
        return float(answer)
    if isinstance(answer, str):
        tail = answer.rsplit("####", 1)[-1] if "####" in answer else answer
        v = parse_number(tail)
        if v is not None:
            return v
        raise LlmkitError(f"{where}: field 'answer' {answer[-40:]!r} is not a number (nor a worked answer "
                          "ending in '#### N')")
    raise LlmkitError(f"{where}: field 'answer' must be a number or a string, got {type(answer).__name__}")


def is_correct(completion: str, answer: Any) -> bool:
    got = extract_answer(completion)
    return got is not None and abs(got - answer_value(answer)) <= 1e-6


# ---------------------------------------------------------------------------------------------- rewards
def correct_reward(prompts: list[Messages], completions: list[str], docs: list[dict[str, Any]]
                   ) -> list[float]:
    """1.0 when the extracted answer equals doc["answer"] numerically, else 0.0."""
    return [float(is_correct(c, d["answer"])) for c, d in zip(completions, docs)]


def format_reward(prompts: list[Messages], completions: list[str], docs: list[dict[str, Any]]
                  ) -> list[float]:
    """1.0 when the completion's last non-empty line is "Answer: N" (N a number), else 0.0."""
    out = []
    for c in completions:
        lines = [line.strip() for line in c.strip().splitlines() if line.strip()]
        out.append(float(bool(lines) and _ANSWER_LINE.fullmatch(lines[-1].strip("*").strip()) is not None))
    return out


REWARDS: dict[str, Reward] = {"correct": correct_reward, "format": format_reward}


def named_rewards(spec: str | Mapping[str, float] | Sequence[tuple[str | Reward, float]] | None
                  ) -> list[tuple[str, Reward, float]]:
    """(name, function, weight) triples from "correct=1,format=0.2", {"correct": 1.0}, or pairs of a name
    or a reward callable and its weight. A name without a weight weighs 1."""
    if spec is None:
        spec = {"correct": 1.0}
    if isinstance(spec, str):
        pairs: list[tuple[str | Reward, float]] = []
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, _, w = part.partition("=")
            try:
                pairs.append((name.strip(), float(w) if w else 1.0))
            except ValueError:
                raise LlmkitError(f"--reward {part!r}: the weight must be a number (e.g. format=0.2)"
                                  ) from None
    elif isinstance(spec, Mapping):
        pairs = list(spec.items())
    else:
        pairs = list(spec)
    out = []
    for fn, w in pairs:
        if isinstance(fn, str):
            if fn not in REWARDS:
                raise LlmkitError(f"--reward {fn!r}: unknown reward; choose from {', '.join(REWARDS)}")
            out.append((fn, REWARDS[fn], float(w)))
        elif callable(fn):
            out.append((getattr(fn, "__name__", "reward"), fn, float(w)))
        else:
            raise LlmkitError(f"a reward must be a name or a callable, got {type(fn).__name__}")
    if not out:
        raise LlmkitError("--reward: name at least one reward (e.g. correct=1,format=0.2)")
    return out


def combine(spec: str | Mapping[str, float] | Sequence[tuple[str | Reward, float]]) -> Reward:
    """One reward: the weighted sum of the named rewards (TRL's reward_weights)."""
    parts = named_rewards(spec)

    def reward(prompts: list[Messages], completions: list[str], docs: list[dict[str, Any]]) -> list[float]:
        cols = [fn(prompts, completions, docs) for _, fn, _ in parts]
        return [sum(w * c[i] for (_, _, w), c in zip(parts, cols)) for i in range(len(completions))]

    return reward


# ---------------------------------------------------------------------------------------------- problems
def problem_prompt(doc: Mapping[str, Any], instruction: str = INSTRUCTION) -> Messages:
    """The one-turn conversation asking `doc["question"]` with the answer format."""
    return [{"role": "user", "content": f"{doc['question'].strip()}\n{instruction}"}]


def load_problems(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[dict[str, Any]]:
    """Problems from JSONL files, one {"question": str, "answer": number | numeric string | GSM8K worked
    answer ending in "#### N"} a line (other fields kept; "id" defaults to file:line). Returns records with
    "answer" as a float and the worked answer, if any, under "rationale"."""
    from llmkit.eval.base import read_jsonl

    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[dict[str, Any]] = []
    for path in map(Path, paths):
        if not path.is_file():
            raise LlmkitError(f"--data {path}: no such file")
        for no, rec in read_jsonl(path, "--data"):
            where = f"{path}:{no}"
            q = rec.get("question")
            if not isinstance(q, str) or not q.strip():
                raise LlmkitError(f"{where}: field 'question' must be a non-empty string")
            if "answer" not in rec:
                raise LlmkitError(f"{where}: field 'answer' is missing")
            doc = {**rec, "id": str(rec.get("id", where)), "answer": answer_value(rec["answer"], where)}
            if isinstance(rec["answer"], str) and "####" in rec["answer"]:
                doc["rationale"] = rec["answer"]
            out.append(doc)
    if not out:
        raise LlmkitError(f"--data {', '.join(map(str, paths))}: no problems found")
    return out


_NAMES = ("Tom", "Anna", "Leo", "Mia", "Sam", "Lucy", "Ben", "Zoe", "Max", "Emma", "Noah", "Lily")
_ITEMS = ("apples", "books", "marbles", "pencils", "cookies", "stickers", "cards", "balloons", "shells",
          "toys")
_TEMPLATES: dict[str, tuple[str, ...]] = {
    "+": ("{n} has {a} {i}. {n} gets {b} more {i}. How many {i} does {n} have now?",
          "There are {a} {i} in a box and {b} {i} on the table. How many {i} are there in all?",
          "{n} found {a} {i} on Monday and {b} {i} on Tuesday. How many {i} did {n} find?"),
    "-": ("{n} has {a} {i} and gives {b} of them to a friend. How many {i} does {n} have left?",
          "There were {a} {i} in a jar. {n} took {b} {i} out. How many {i} are in the jar now?"),
    "*": ("{n} has {a} bags with {b} {i} in each bag. How many {i} does {n} have?",
          "Each of {a} children has {b} {i}. How many {i} do the children have together?"),
}


def arithmetic_problems(n: int, seed: int = 0, *, max_value: int = 20, ops: str | Sequence[str] = "+-",
                        max_factor: int = 9) -> list[dict[str, Any]]:
    """`n` distinct one-step word problems with integer answers (a + b, a - b >= 0, a x b with factors up
    to `max_factor`), operands in [1, max_value], drawn from a seeded generator."""
    ops = list(ops)
    if not ops or any(o not in _TEMPLATES for o in ops):
        raise LlmkitError(f"arithmetic ops {''.join(ops)!r}: use some of + - *")
    if n < 1 or max_value < 2:
        raise LlmkitError(f"arithmetic problems: n ({n}) must be >= 1 and max_value ({max_value}) >= 2")
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[dict[str, Any]] = []
    for _ in range(50 * n):
        if len(out) == n:
            break
        op = rng.choice(ops)
        hi = max_factor if op == "*" else max_value
        a, b = rng.randint(2 if op == "*" else 1, hi), rng.randint(2 if op == "*" else 1, hi)
        if op == "-" and a < b:
            a, b = b, a
        q = rng.choice(_TEMPLATES[op]).format(n=rng.choice(_NAMES), i=rng.choice(_ITEMS), a=a, b=b)
        if q in seen:
            continue
        seen.add(q)
        ans = a + b if op == "+" else a - b if op == "-" else a * b
        out.append({"id": f"arith-{seed}-{len(out)}", "question": q, "answer": float(ans),
                    "equation": f"{a} {op} {b} = {ans}"})
    if len(out) < n:
        raise LlmkitError(f"arithmetic problems: only {len(out)} distinct problems with "
                          f"max_value={max_value}; raise max_value or ask for fewer")
    return out


def split_problems(problems: Sequence[dict[str, Any]], val: int | float, seed: int = 0
                   ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, val): a seeded shuffle, then `val` problems (a count, or a fraction when < 1) held out.
    Problems with the same question never straddle the split."""
    by_q: dict[str, list[dict[str, Any]]] = {}
    for p in problems:
        by_q.setdefault(p["question"].strip(), []).append(p)
    keys = sorted(by_q)
    random.Random(seed).shuffle(keys)
    want = int(round(val * len(problems))) if 0 < val < 1 else int(val)
    if want < 0 or (want >= len(problems) and len(problems) > 0):
        raise LlmkitError(f"--val {val}: must hold out fewer than the {len(problems)} problems")
    held: list[dict[str, Any]] = []
    train: list[dict[str, Any]] = []
    for k in keys:
        (held if len(held) < want else train).extend(by_q[k])
    return train, held

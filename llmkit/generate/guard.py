"""Guardrails: a pluggable moderation hook for inputs and outputs, used by `llm.chat/generate/stream` and
by the server's chat, responses and completions routes.

    guard = RuleGuard.default(max_input_chars=20_000)         # the shipped example rule set
    guard = RuleGuard([Rule("secret", keyword="project x")])  # your own keywords / regexes
    guard = CallableGuard(lambda text: "toxic" if clf(text) > 0.9 else None)  # a classifier, anything else
    llm.chat(messages, guard=guard)

A guard has `check_input(messages) -> Verdict | None` and `check_output(text) -> Verdict | None`; a Verdict
(reason, rule) means "refuse". What happens then (`screen_input`, llmkit.generate.request.Completion):
- a refused input is an LlmkitError 400 with code "content_filter" (param "messages" / "prompt"), raised
  before anything is queued or generated; an input longer than `max_input_chars` is a 400 "input_too_long";
- a refused output ends that sequence at once with finish_reason "content_filter" (OpenAI's value) and the
  answer withheld (empty text). The text is checked as it grows, so a stream stops at the first match;
  pieces already streamed before the match cannot be recalled (the piece that completed the match is not
  sent).

Notable choices:
- The shipped rules (`RuleGuard.default()`) are a small EXAMPLE of clearly harmful requests in English and
  French (weapons of mass harm, malware, child sexual content). They are not a safety guarantee: keyword
  rules are easy to evade and can over-block; use a classifier through CallableGuard for real moderation.
- Keywords match case-insensitively on word boundaries ("kill" does not match "skill"); regexes are compiled
  case-insensitive and searched as given.
- Output checks run on the whole text so far, each time it grows: cost grows with the square of the output
  length, fine for chat-sized answers (a rule set of a few regexes over a few thousand characters).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from llmkit.errors import LlmkitError


@dataclass(frozen=True)
class Verdict:
    """Why a text was refused: a human-readable reason and the rule (name) that fired."""

    reason: str
    rule: str = ""


@runtime_checkable
class Guard(Protocol):
    def check_input(self, messages: Sequence[dict[str, Any]]) -> Verdict | None: ...

    def check_output(self, text: str) -> Verdict | None: ...


def message_text(messages: Sequence[dict[str, Any]]) -> str:
    """All the text a conversation carries (content strings or text parts, tool-call arguments), one
    message per line."""
    parts: list[str] = []
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts += [p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
        for call in (m.get("tool_calls") or []) if isinstance(m, dict) else []:
            args = call.get("function", {}).get("arguments") if isinstance(call, dict) else None
            if isinstance(args, str):
                parts.append(args)
    return "\n".join(parts)


@dataclass(frozen=True)
class Rule:
    """One rule: a keyword/phrase (case-insensitive, whole words) or a regex (case-insensitive)."""

    name: str
    keyword: str | None = None
    regex: str | None = None
    reason: str = "the text matches a moderation rule"

    def __post_init__(self) -> None:
        if (self.keyword is None) == (self.regex is None):
            raise LlmkitError(f"guard rule {self.name!r}: give exactly one of keyword and regex")

    def pattern(self) -> re.Pattern[str]:
        if self.keyword is not None:
            words = r"\s+".join(re.escape(w) for w in self.keyword.split())
            return re.compile(rf"(?<!\w){words}(?!\w)", re.IGNORECASE)
        try:
            return re.compile(self.regex or "", re.IGNORECASE)
        except re.error as e:
            raise LlmkitError(f"guard rule {self.name!r}: bad regex: {e}") from None


class BaseGuard:
    """What every shipped guard shares: an optional input size limit (characters of all message text)."""

    def __init__(self, max_input_chars: int | None = None):
        self.max_input_chars = max_input_chars

    def check_input(self, messages: Sequence[dict[str, Any]]) -> Verdict | None:
        return None

    def check_output(self, text: str) -> Verdict | None:
        return None


class RuleGuard(BaseGuard):
    """Refuse inputs and outputs that match any rule (`check` says which: "input", "output" or "both")."""

    def __init__(self, rules: Iterable[Rule], *, check: str = "both", max_input_chars: int | None = None):
        super().__init__(max_input_chars)
        if check not in ("input", "output", "both"):
            raise LlmkitError(f"RuleGuard check must be 'input', 'output' or 'both', not {check!r}")
        self.rules = list(rules)
        self.check = check
        self._compiled = [(r, r.pattern()) for r in self.rules]

    def match(self, text: str) -> Verdict | None:
        for rule, pat in self._compiled:
            if pat.search(text):
                return Verdict(rule.reason, rule.name)
        return None

    def check_input(self, messages: Sequence[dict[str, Any]]) -> Verdict | None:
        return self.match(message_text(messages)) if self.check in ("input", "both") else None

    def check_output(self, text: str) -> Verdict | None:
        return self.match(text) if self.check in ("output", "both") else None

    @classmethod
    def default(cls, **kw: Any) -> RuleGuard:
        """The shipped EXAMPLE rule set (English and French): requests for mass-harm weapons, malware and
        sexual content involving minors. Small on purpose; a demonstration of the hook, not moderation."""
        return cls(DEFAULT_RULES, **kw)


_HOW = r"(how\s+(to|do\s+i|can\s+i)|steps\s+to|instructions\s+(for|to)|comment|[ée]tapes\s+pour)"
DEFAULT_RULES: tuple[Rule, ...] = (
    Rule("weapons.en", regex=_HOW + r"\W+(\w+\W+){0,4}(build|make|assemble|synthesi[sz]e)\W+(\w+\W+){0,3}"
         r"(a\s+)?(bomb|explosive|nerve\s+agent|sarin|bioweapon|chemical\s+weapon)s?\b",
         reason="request for instructions to make a weapon"),
    Rule("weapons.fr", regex=r"(fabriquer|construire|synth[ée]tiser)\W+(\w+\W+){0,3}(une?\s+)?"
         r"(bombe|explosif|gaz\s+sarin|agent\s+neurotoxique|arme\s+(chimique|biologique))s?\b",
         reason="demande d'instructions pour fabriquer une arme"),
    Rule("malware.en", regex=r"\b(write|create|code|build)\W+(\w+\W+){0,3}(ransomware|keylogger|"
         r"credential\s+stealer)\b", reason="request to write malware"),
    Rule("malware.fr", regex=r"\b([ée]cri(re|s)|cr[ée]er|coder)\W+(\w+\W+){0,3}(un\s+)?(ran[çc]ongiciel|"
         r"ransomware|enregistreur\s+de\s+frappe|keylogger)\b",
         reason="demande d'écrire un logiciel malveillant"),
    Rule("csam.en", keyword="child sexual abuse material", reason="sexual content involving minors"),
    Rule("csam.fr", keyword="pédopornographie", reason="contenu sexuel impliquant des mineurs"),
)


class CallableGuard(BaseGuard):
    """Any function as a guard: `fn(text) -> Verdict | str | None` (a string is the reason; None passes).
    Inputs are checked as the conversation's text (message_text); `check` as in RuleGuard."""

    def __init__(self, fn: Callable[[str], Verdict | str | None], *, check: str = "both",
                 max_input_chars: int | None = None, name: str = "callable"):
        super().__init__(max_input_chars)
        if check not in ("input", "output", "both"):
            raise LlmkitError(f"CallableGuard check must be 'input', 'output' or 'both', not {check!r}")
        self.fn, self.check, self.name = fn, check, name

    def _call(self, text: str) -> Verdict | None:
        v = self.fn(text)
        if v is None or v is False:
            return None
        if isinstance(v, Verdict):
            return v
        return Verdict(v if isinstance(v, str) else "refused by the moderation function", self.name)

    def check_input(self, messages: Sequence[dict[str, Any]]) -> Verdict | None:
        return self._call(message_text(messages)) if self.check in ("input", "both") else None

    def check_output(self, text: str) -> Verdict | None:
        return self._call(text) if self.check in ("output", "both") else None


def get_guard(spec: str | Guard | None, **kw: Any) -> Guard | None:
    """A guard from a CLI-style name ("rules", "none") or a Guard (returned as is)."""
    if spec is None or spec == "none":
        return None
    if spec == "rules":
        return RuleGuard.default(**kw)
    if isinstance(spec, str):
        raise LlmkitError(f"unknown guard {spec!r}: use 'rules' or 'none'", param="guard")
    return spec


def screen_input(guard: Guard | None, messages: Sequence[dict[str, Any]], param: str = "messages") -> None:
    """Raise a 400 when the guard refuses the input or it is longer than the guard's max_input_chars."""
    if guard is None:
        return
    limit = getattr(guard, "max_input_chars", None)
    if limit is not None:
        n = len(message_text(messages))
        if n > limit:
            raise LlmkitError(f"{param}: the input has {n} characters, more than the limit of {limit}",
                              code="input_too_long", param=param)
    v = guard.check_input(messages)
    if v is not None:
        raise LlmkitError(f"the input was refused by the content filter: {v.reason}", code="content_filter",
                          param=param)


def screen_prompt(guard: Guard | None, prompt: str, param: str = "prompt") -> None:
    """screen_input for a raw prompt (treated as one user message)."""
    screen_input(guard, [{"role": "user", "content": prompt}], param)


# ---------------------------------------------------------------------- request logs
CONTENT_KEYS = frozenset({"content", "prompt", "input", "messages", "text", "instructions", "arguments",
                          "logprobs", "tokens", "user", "metadata", "stop", "output"})
SECRET_WORDS = ("key", "token", "secret", "password", "authorization")
NOT_SECRET = frozenset({"max_tokens", "top_logprobs", "max_completion_tokens", "max_output_tokens", "tokens",
                        "prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens", "input_tokens",
                        "output_tokens", "reasoning_tokens", "input_tokens_details", "output_tokens_details",
                        "prompt_tokens_details", "completion_tokens_details"})
STRUCTURE_KEYS = frozenset({"role", "type"})  # kept even under a content field: they say nothing said


def secret_key(name: str) -> bool:
    """Whether a JSON field name looks like it holds a secret (api_key, token, password, authorization)."""
    return name not in NOT_SECRET and any(s in name.lower() for s in SECRET_WORDS)


def redact_body(obj: Any, mode: str = "full", *, _inside: bool = False) -> Any:
    """A JSON body fit for a log. Both modes mask the value of every secret-looking field as "***"; mode
    "redact" also replaces every string under a content field (content, prompt, input, messages, text,
    instructions, arguments, logprobs, tokens, user, metadata, stop, output) with "<N chars>" and every
    list of token ids there with "<N ids>" (message roles and part types stay), so neither keys nor what was
    said reach the log. The input is not modified."""
    if mode not in ("full", "redact"):
        raise LlmkitError(f"log mode must be 'full' or 'redact', not {mode!r}")
    hide = mode == "redact"
    if isinstance(obj, dict):
        return {k: "***" if isinstance(k, str) and secret_key(k)
                else v if _inside and k in STRUCTURE_KEYS and isinstance(v, str)
                else redact_body(v, mode, _inside=_inside or (hide and k in CONTENT_KEYS))
                for k, v in obj.items()}
    if isinstance(obj, list):
        if _inside and obj and all(isinstance(v, int) and not isinstance(v, bool) for v in obj):
            return f"<{len(obj)} ids>"
        return [redact_body(v, mode, _inside=_inside) for v in obj]
    if _inside and isinstance(obj, str):
        return f"<{len(obj)} chars>"
    return obj

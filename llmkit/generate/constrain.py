"""JSON-schema constrained decoding: an incremental JSON prefix validator and a per-row logits processor.

`JsonPrefix` is a small pushdown automaton over characters whose states are immutable tuples, so
trying a candidate token is "feed its characters to a copy" and costs nothing to undo. It knows
objects (declared properties, `required`), arrays (`items`, `minItems`/`maxItems`), strings
(`minLength`/`maxLength`), numbers and integers, booleans, null, `enum`/`const`, type lists, local
`$ref` into `$defs`/`definitions`, and `anyOf`/`oneOf` whose branches start with different
characters. With no schema (`json_object`) any JSON object is accepted.

Notable choices (all keep the output valid for the schema while keeping generation finite):
- an object with `properties` emits only those properties, each at most once (additional properties
  are allowed by JSON Schema but never needed; strict OpenAI schemas forbid them anyway);
- a whitespace run between tokens is at most 8 characters with at most one newline, a number at most
  24 characters;
- a token whose bytes are not complete UTF-8 on their own, or a special token, is never allowed
  inside constrained output; the end-of-sequence ids are allowed exactly when the value is complete;
- the logits processor checks the 64 most likely tokens first and scans the rest of the vocabulary
  (in order of likelihood) only when none of them fits: the tail beyond them is cut, like top-k 64;
- a schema is checked whole before any token is sampled (`check_schema`, a 400 naming the request field):
  every `$ref` the automaton may follow must resolve locally ("#", "#/$defs/NAME", "#/definitions/NAME",
  JSON-pointer escapes ~0 ~1) without a cycle of bare references, and the keywords it reads must have their
  JSON-Schema shapes (`type` names, `properties` an object of schemas, `required` a list of strings, ...).
  Keywords it does not read (allOf, pattern, format, ...) are neither checked nor enforced.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch

from llmkit.errors import LlmkitError

_WS = " \t\n\r"
_MAX_WS = 8
_MAX_NUM = 24
_HEX = set("0123456789abcdefABCDEF")

State = tuple  # (stack: tuple[frame, ...], ws_run: int)

_TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}
_REF_SECTIONS = ("$defs", "definitions")
_COUNTS = ("minLength", "maxLength", "minItems", "maxItems")


def _ref_target(root: dict[str, Any], ref: Any) -> Any:
    """The schema a local `$ref` names ("#", "#/$defs/NAME", "#/definitions/NAME"), or None. NAME is looked up
    in the section the ref names, then in the other one (a forced tool call's schema gathers both under
    $defs, llmkit.generate.tools.forced_call_schema)."""
    if ref == "#":
        return root
    if not isinstance(ref, str):
        return None
    for section in _REF_SECTIONS:
        prefix = f"#/{section}/"
        name = ref[len(prefix):]
        if ref.startswith(prefix) and "/" not in name:
            name = name.replace("~1", "/").replace("~0", "~")
            for defs in (root.get(section), *(root.get(o) for o in _REF_SECTIONS if o != section)):
                if isinstance(defs, dict) and name in defs:
                    return defs[name]
    return None


def schema_problem(schema: Any) -> str | None:
    """What makes `schema` one JsonPrefix cannot follow (an unresolvable or circular $ref, a malformed keyword
    it reads), or None when it is fine. None and {} mean "any JSON object". Iterative: any depth is safe."""
    if schema is None:
        return None
    if not isinstance(schema, dict):
        return "the schema must be a JSON object"
    stack: list[tuple[str, Any]] = [("", schema)]
    while stack:
        path, s = stack.pop()
        where = path or "the root"
        if isinstance(s, bool):
            continue
        if not isinstance(s, dict):
            return f"{where}: a schema must be an object or a boolean"
        if "$ref" in s:
            seen, t = {id(s)}, s
            while isinstance(t, dict) and "$ref" in t:
                ref = t["$ref"]
                t = _ref_target(schema, ref)
                if t is None:
                    return (f"$ref {ref!r} at {where} does not resolve (only local '#', '#/$defs/NAME' and "
                            "'#/definitions/NAME' references are followed)")
                if id(t) in seen:
                    return f"$ref {s['$ref']!r} at {where} is circular"
                seen.add(id(t))
        t = s.get("type")
        if t is not None and not (t in _TYPES if isinstance(t, str) else
                                  isinstance(t, list) and all(isinstance(x, str) and x in _TYPES for x in t)):
            return f"{where}: type {t!r} is not one of {sorted(_TYPES)} (or a list of them)"
        for k in _COUNTS:
            v = s.get(k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                return f"{where}: {k} must be a non-negative integer"
        for k in ("enum", "required"):
            if k in s and not isinstance(s[k], list):
                return f"{where}: {k} must be a list"
        if not all(isinstance(x, str) for x in s.get("required", [])):
            return f"{where}: required must be a list of strings"
        kids: list[tuple[str, Any]] = []
        for k in ("properties", *_REF_SECTIONS):
            if k in s:
                if not isinstance(s[k], dict):
                    return f"{where}: {k} must be an object of schemas"
                kids += [(f"{path}.{k}.{name}".lstrip("."), v) for name, v in s[k].items()]
        for k in ("anyOf", "oneOf"):
            if k in s:
                if not isinstance(s[k], list) or not s[k]:
                    return f"{where}: {k} must be a non-empty list of schemas"
                kids += [(f"{path}.{k}.{i}".lstrip("."), v) for i, v in enumerate(s[k])]
        for k in ("items", "additionalProperties"):
            if k in s:
                kids.append((f"{path}.{k}".lstrip("."), s[k]))
        stack.extend(reversed(kids))
    return None


def check_schema(schema: Any, param: str | None = None, label: str | None = None) -> None:
    """LlmkitError (400, code "invalid_schema", `param` the request field) when JsonPrefix cannot follow
    `schema` (see `schema_problem`); `label` starts the message (default: `param`)."""
    problem = schema_problem(schema)
    if problem is not None:
        raise LlmkitError(f"{label or param or 'schema'}: {problem}", code="invalid_schema", param=param)


class JsonPrefix:
    """Prefix validator for one JSON value under one schema."""

    def __init__(self, schema: dict[str, Any] | None = None):
        check_schema(schema)
        self.root = schema if schema else {"type": "object"}

    # ------------------------------------------------------------------ states
    def initial(self) -> State:
        return ((("v", self.root),), 0)

    def feed(self, state: State | None, text: str) -> State | None:
        """The state after `text`, or None when `text` cannot continue a valid document."""
        for ch in text:
            if state is None:
                return None
            state = self._char(state, ch)
        return state

    def complete(self, state: State) -> bool:
        """True when the text so far is a whole valid document."""
        stack = state[0]
        if not stack:
            return True
        if len(stack) == 1:
            f = stack[0]
            return (f[0] == "n" and f[2] in ("zero", "int", "frac", "exp")) or (f[0] == "l" and f[2] in f[1])
        return False

    def done(self, state: State) -> bool:
        return not state[0]

    # ------------------------------------------------------------------ schema helpers
    def _resolve(self, s: dict[str, Any] | bool | None) -> dict[str, Any]:
        while isinstance(s, dict) and "$ref" in s:  # check_schema ruled out dangling and circular refs
            s = _ref_target(self.root, s["$ref"])
        if s is True or s is None:
            return {}
        if s is False:
            return {"not": {}}
        return s

    @staticmethod
    def _types(s: dict[str, Any]) -> set[str]:
        t = s.get("type")
        if t is None:
            if "properties" in s:
                return {"object"}
            if "items" in s:
                return {"array"}
            return {"object", "array", "string", "number", "integer", "boolean", "null"}
        return set(t) if isinstance(t, list) else {t}

    def _start(self, s: dict[str, Any], ch: str) -> tuple | None:
        """The frame that begins a value of schema `s` with character `ch` (None if impossible)."""
        s = self._resolve(s)
        if "not" in s and not s["not"]:
            return None
        branches = s.get("anyOf") or s.get("oneOf")
        if branches:
            for b in branches:
                f = self._start(b, ch)
                if f is not None:
                    return f
            return None
        if "const" in s or "enum" in s:
            vals = [s["const"]] if "const" in s else s["enum"]
            cands = tuple(json.dumps(v, separators=(",", ":"), ensure_ascii=False) for v in vals)
            return ("l", cands, ch) if any(c.startswith(ch) for c in cands) else None
        types = self._types(s)
        if ch == "{" and "object" in types:
            return ("o", s, 0, frozenset(), None)
        if ch == "[" and "array" in types:
            return ("a", s, 0, 0)
        if ch == '"' and "string" in types:
            return ("s", s.get("minLength", 0), s.get("maxLength"), 0, 0)
        if (ch == "-" or ch.isdigit()) and ch.isascii() and types & {"number", "integer"}:
            integer = "number" not in types
            return ("n", integer, "sign" if ch == "-" else ("zero" if ch == "0" else "int"), 1)
        if ch in "tf" and "boolean" in types:
            return ("l", ("true", "false"), ch)
        if ch == "n" and "null" in types:
            return ("l", ("null",), ch)
        return None

    def _keys(self, s: dict[str, Any]) -> tuple[str, ...] | None:
        props = s.get("properties")
        if props is None:
            return None
        return tuple(json.dumps(k, ensure_ascii=False)[1:-1] for k in props)

    def _prop_schema(self, s: dict[str, Any], key: str) -> dict[str, Any]:
        props = s.get("properties")
        if props is not None:
            for k, v in props.items():
                if json.dumps(k, ensure_ascii=False)[1:-1] == key:
                    return v
        extra = s.get("additionalProperties")
        return extra if isinstance(extra, dict) else {}

    def _can_close_obj(self, s: dict[str, Any], seen: frozenset) -> bool:
        return all(json.dumps(k, ensure_ascii=False)[1:-1] in seen for k in s.get("required", ()))

    def _keys_left(self, s: dict[str, Any], seen: frozenset) -> bool:
        keys = self._keys(s)
        return keys is None or any(k not in seen for k in keys)

    # ------------------------------------------------------------------ the automaton
    def _char(self, state: State, ch: str) -> State | None:
        stack, ws = state
        if not stack:
            return _ws(stack, ws, ch)
        f = stack[-1]
        kind = f[0]
        rest = stack[:-1]

        if kind in ("s", "k"):  # inside a string (value or key)
            return self._string_char(stack, f, ch)

        if kind == "n":
            nxt = _number_step(f[1], f[2], ch)
            if nxt is not None and f[3] < _MAX_NUM:
                return (rest + (("n", f[1], nxt, f[3] + 1),), 0)
            if f[2] in ("zero", "int", "frac", "exp"):
                return self._char((rest, 0), ch)  # the number ended: the parent reads `ch`
            return None

        if kind == "l":
            buf = f[2] + ch
            if any(c.startswith(buf) for c in f[1]):
                return (rest + (("l", f[1], buf),), 0)
            if f[2] in f[1]:
                return self._char((rest, 0), ch)
            return None

        if ch in _WS:  # between tokens of a value, object or array
            return _ws(stack, ws, ch)

        if kind == "v":
            g = self._start(f[1], ch)
            return None if g is None else (rest + (g,), 0)

        if kind == "o":
            _, s, phase, seen, key = f
            if phase in (0, 1) and ch == '"':
                if not self._keys_left(s, seen):
                    return None
                keys = self._keys(s)
                cands = None if keys is None else tuple(k for k in keys if k not in seen)
                return (stack + (("k", cands, "", 0),), 0)
            if ch == "}" and phase in (0, 3) and self._can_close_obj(s, seen):
                return (rest, 0)
            if phase == 2 and ch == ":":
                return (rest + (("o", s, 3, seen, key), ("v", self._prop_schema(s, key))), 0)
            if phase == 3 and ch == "," and self._keys_left(s, seen):
                return (rest + (("o", s, 1, seen, None),), 0)
            return None

        if kind == "a":
            _, s, phase, count = f
            lo, hi = s.get("minItems", 0), s.get("maxItems")
            if ch == "]" and ((phase == 0 and lo == 0) or (phase == 3 and count >= lo)):
                return (rest, 0)
            if phase == 3:
                return (rest + (("a", s, 1, count),), 0) if ch == "," and (hi is None or count < hi) else None
            if hi is not None and count >= hi:
                return None
            g = self._start(s.get("items", {}), ch)
            return None if g is None else (rest + (("a", s, 3, count + 1), g), 0)
        return None

    def _string_char(self, stack: tuple, f: tuple, ch: str) -> State | None:
        rest = stack[:-1]
        if f[0] == "k":
            _, cands, buf, esc = f
        else:
            _, lo, hi, n, esc = f
        if esc == 1:  # after a backslash
            if ch == "u":
                esc = 2
            elif ch in '"\\/bfnrt':
                esc = 0
            else:
                return None
        elif esc >= 2:  # inside \uXXXX
            if ch not in _HEX:
                return None
            esc = esc + 1 if esc < 5 else 0
        elif ch == "\\":
            esc = 1
        elif ch == '"':
            if f[0] == "k":
                if cands is not None and buf not in cands:
                    return None
                parent = rest[-1]
                return (rest[:-1] + (("o", parent[1], 2, parent[3] | {buf}, buf),), 0)
            return (rest, 0) if n >= lo else None
        elif ord(ch) < 0x20:
            return None
        if f[0] == "k":
            buf += ch
            if cands is not None and not any(c.startswith(buf) for c in cands):
                return None
            return (rest + (("k", cands, buf, esc),), 0)
        if hi is not None and ((esc == 0 and n + 1 > hi) or (esc == 1 and n >= hi)):
            return None
        return (rest + (("s", lo, hi, n + (1 if esc == 0 else 0), esc),), 0)


def _ws(stack: tuple, ws: int, ch: str) -> State | None:
    """One more whitespace character; `ws` counts the run's characters plus 100 per newline."""
    if ch not in _WS:
        return None
    ws += 101 if ch == "\n" else 1
    return (stack, ws) if ws % 100 <= _MAX_WS and ws < 200 else None


def _number_step(integer: bool, st: str, ch: str) -> str | None:
    d = ch.isdigit() and ch.isascii()
    if st == "sign":
        return "zero" if ch == "0" else ("int" if d else None)
    if st == "zero":
        return None if integer or ch not in ".eE" else ("dot" if ch == "." else "e")
    if st == "int":
        if d:
            return "int"
        return None if integer or ch not in ".eE" else ("dot" if ch == "." else "e")
    if st in ("dot", "frac"):
        if d:
            return "frac"
        return "e" if st == "frac" and ch in "eE" else None
    if st == "e":
        return "esign" if ch in "+-" else ("exp" if d else None)
    if st in ("esign", "exp"):
        return "exp" if d else None
    return None


# ---------------------------------------------------------------------- token level
_TEXT_CACHE: dict[int, tuple[Any, list[str | None]]] = {}  # id(tokenizer) -> (tokenizer, texts)


def token_texts(tokenizer) -> list[str | None]:
    """Each token's text, or None for special tokens and tokens that are not whole UTF-8 on their own.

    Cached per tokenizer object (the cache holds the tokenizer, so its id cannot be reused meanwhile)."""
    key = id(tokenizer)
    if key not in _TEXT_CACHE:
        special = set(tokenizer.special_tokens.values())
        texts: list[str | None] = []
        for i in range(tokenizer.vocab_size):
            if i in special:
                texts.append(None)
                continue
            try:
                t = tokenizer.id_to_bytes(i).decode("utf-8")
            except (UnicodeDecodeError, KeyError, IndexError):
                t = None
            texts.append(t or None)
        while len(_TEXT_CACHE) >= 4:
            _TEXT_CACHE.pop(next(iter(_TEXT_CACHE)))
        _TEXT_CACHE[key] = (tokenizer, texts)
    return _TEXT_CACHE[key][1]


class _Vocab:
    """Token texts grouped by first character, so a step tests each distinct first character once."""

    def __init__(self, texts: Sequence[str | None]):
        self.texts = texts
        self.chars = sorted({t[0] for t in texts if t})
        index = {c: i for i, c in enumerate(self.chars)}
        none = len(self.chars)  # special / partial-UTF-8 tokens: never a candidate
        self.first = torch.tensor([index[t[0]] if t else none for t in texts], dtype=torch.long)  # (V,)


_VOCABS: dict[int, _Vocab] = {}  # id(texts) -> _Vocab (which holds the texts, so the id stays theirs)


class JsonLogitsProcessor:
    """Masks, at each step of one row, every token that would make the output an invalid JSON prefix.

    Called as `processor(generated_ids, logits)` with the row's generated ids so far and its next-token
    logits (V,); returns the masked logits. The validator state advances over the ids generated since
    the previous call, so one instance serves exactly one row. Each step first keeps the tokens whose
    first character fits (one test per distinct first character), then checks whole tokens in order of
    likelihood: the `first` most likely that fit are allowed (scanning further only if none does).
    """

    def __init__(self, schema: dict[str, Any] | None, texts: Sequence[str | None], eos_ids: set[int],
                 first: int = 64):
        self.v = JsonPrefix(schema)
        if id(texts) not in _VOCABS:
            while len(_VOCABS) >= 4:
                _VOCABS.pop(next(iter(_VOCABS)))
            _VOCABS[id(texts)] = _Vocab(texts)
        self.vocab = _VOCABS[id(texts)]
        self.texts, self.eos_ids, self.first = texts, eos_ids, first
        self.state: State | None = self.v.initial()
        self.seen = 0

    def advance(self, generated: Sequence[int]) -> None:
        for t in generated[self.seen:]:
            if t in self.eos_ids or self.state is None:
                continue
            text = self.texts[t] if t < len(self.texts) else None
            self.state = self.v.feed(self.state, text) if text else None
        self.seen = len(generated)

    def allowed(self, token_id: int) -> bool:
        if self.state is None:
            return token_id in self.eos_ids
        if token_id in self.eos_ids:
            return self.v.complete(self.state)
        if self.v.done(self.state):
            return False
        text = self.texts[token_id] if token_id < len(self.texts) else None
        return bool(text) and self.v.feed(self.state, text) is not None

    def __call__(self, generated: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        self.advance(generated)
        V = len(self.texts)
        ok: list[int] = []
        if self.state is not None and not self.v.done(self.state):
            fits = torch.tensor([self.v.feed(self.state, c) is not None for c in self.vocab.chars] + [False])
            cand = fits[self.vocab.first].to(logits.device)  # (V,) first character fits
            masked = logits[:V].masked_fill(~cand, float("-inf"))
            n = int(cand.sum())
            order = masked.topk(min(self.first, n)).indices.tolist() if n else []
            ok = [t for t in order if self.allowed(t)]
            if not ok and n > len(order):
                rest = cand.nonzero().squeeze(1)
                rest = rest[torch.argsort(logits[rest], descending=True)].tolist()
                ok = next(([t] for t in rest if self.allowed(t)), [])
        ok += [t for t in sorted(self.eos_ids) if self.allowed(t)]
        if not ok:  # a dead end (cannot happen for a satisfiable schema): end the sequence
            ok = sorted(self.eos_ids)[:1]
        out = torch.full_like(logits, float("-inf"))
        idx = torch.tensor(ok, dtype=torch.long, device=logits.device)
        out[idx] = logits[idx]
        return out

"""Render a conversation with the model's own chat template: one function for SFT, the CLI and the server.

`render_chat(tokenizer, messages)` -> `ChatRender(text, ids, loss_mask)`.

Notable choices:
- The Jinja2 environment is built exactly like transformers' `_compile_jinja_template` (sandboxed,
  trim_blocks + lstrip_blocks, loop controls, the `{% generation %}` tag, `raise_exception`,
  `strftime_now`, a `tojson` with ensure_ascii=False and indent, a restricted `dict` and `namespace`),
  and the inputs are prepared like `apply_chat_template` (None-valued keys dropped, reasoning aliases,
  special-token strings such as `eos_token` passed to the template), so `text` is the string
  transformers renders. Tokenizers without a template get the ChatML fallback `CHATML_TEMPLATE` when their
  vocabulary has ChatML's <|im_start|> / <|im_end|> tokens (e.g. a BPE trained by llmkit); without those
  (a base model such as Gemma 3 270M) rendering a chat is a one-line LlmkitError: ChatML spelled out in
  text would only make the model continue a document that looks like markup.
- Control tokens vs text: the template's own special tokens become control ids, while special-token
  text inside messages/tools stays plain text. As transformers' `sanitize_control_tokens=True` does, we
  wrap special-token strings in the inputs with private-use markers before rendering; the rendered
  string is then cut at the markers, marked pieces are encoded with specials off, the rest with specials
  on (each piece after the first encoded behind a "\\n" that is dropped again, so SentencePiece adds no
  prefix space mid-chat). Without special-token text in the inputs, `ids` == encode(text) with specials.
- Loss mask (SFT): 1 on the tokens of each assistant turn from just after its header (e.g.
  "<|im_start|>assistant\\n") up to and including its end-of-turn token (a stop id the template wrote),
  0 elsewhere. The header is found by rendering a probe conversation with sentinel contents; templates
  with `{% generation %}` blocks use those spans instead (as transformers' assistant mask does).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from datetime import datetime
from functools import lru_cache, partial
from typing import TYPE_CHECKING, Any

from llmkit.errors import LlmkitError

if TYPE_CHECKING:
    from llmkit.tokenizer.core import Tokenizer

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_MARK_START, _MARK_END = "\U000f0000", "\U000f0001"  # same private-use markers as transformers
_SENTINELS = ("\U000f0010", "\U000f0011", "\U000f0012", "\U000f0013")  # probe contents for the header
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


@dataclasses.dataclass
class ChatRender:
    """A rendered conversation: the template's text, its token ids, the SFT loss mask (1 = train on it)."""

    text: str
    ids: list[int]
    loss_mask: list[int]


# ------------------------------------------------------------------------------ Jinja2 environment


@lru_cache(maxsize=32)
def compile_template(template: str):
    """Compile a chat template in the same sandboxed environment transformers uses."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTracker(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}`: records the character spans of assistant output."""

        tags = {"generation"}

        def __init__(self, environment):
            super().__init__(environment)
            environment.extend(track_generation=self.track)
            self._blocks: list[str] | None = None
            self._spans: list[tuple[int, int]] | None = None

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_support"), [], [], body).set_lineno(lineno)

        def _support(self, caller):
            rv = caller()
            if self._blocks is not None:
                start = len("".join(self._blocks))
                self._spans.append((start, start + len(rv)))
            return rv

        @contextmanager
        def track(self, blocks: list[str], spans: list[tuple[int, int]]):
            self._blocks, self._spans = blocks, spans
            try:
                yield
            finally:
                self._blocks = self._spans = None

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    class TemplateDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set namespace attr {name!r}")

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTracker, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, dict=TemplateDict(),
                       namespace=TemplateNamespace)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise LlmkitError(f"chat template has a syntax error at line {e.lineno}: {e.message}") from None


def _plain(value: Any) -> Any:
    """Rebuild template inputs from plain JSON types (what transformers' `_plain_template_data` does)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    for base in (bool, str, int, float):
        if isinstance(value, base):
            return base(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _prepare_messages(messages: list[Any]) -> list[dict]:
    out = []
    for m in messages:
        m = _plain(m)
        if not isinstance(m, dict):
            raise LlmkitError(f"chat messages must be dicts with 'role' and 'content' ({type(m).__name__})")
        m = {k: v for k, v in m.items() if v is not None}
        reasoning = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


def _render(compiled, messages, tools, add_generation_prompt, kwargs, track: bool) -> tuple[str, list]:
    import jinja2

    variables = dict(messages=messages, tools=tools, documents=kwargs.pop("documents", None),
                     add_generation_prompt=add_generation_prompt, **kwargs)
    try:
        if not track:
            return compiled.render(**variables), []
        blocks: list[str] = []
        spans: list[tuple[int, int]] = []
        with compiled.environment.track_generation(blocks, spans):
            for block in compiled.generate(**variables):
                blocks.append(block)
        return "".join(blocks), spans
    except jinja2.exceptions.TemplateError as e:
        raise LlmkitError(f"chat template error: {e}") from None


# ------------------------------------------------------------------------------------ control tokens


@lru_cache(maxsize=32)
def _control_patterns(specials: tuple[str, ...]) -> tuple[re.Pattern, re.Pattern]:
    """A regex for any special-token string (longest first), and one for marked tokens or lone markers."""
    alt = "|".join(map(re.escape, sorted(specials, key=len, reverse=True))) or "(?!)"
    return re.compile(alt), re.compile(f"{_MARK_START}({alt}){_MARK_END}|[{_MARK_START}{_MARK_END}]")


def _mark(obj: Any, control_re: re.Pattern) -> Any:
    """Wrap special-token strings inside user-supplied strings with the private-use markers."""
    if isinstance(obj, str):
        obj = obj.replace(_MARK_START, "").replace(_MARK_END, "")
        return control_re.sub(f"{_MARK_START}\\g<0>{_MARK_END}", obj)
    if isinstance(obj, dict):
        return {k: _mark(v, control_re) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_mark(v, control_re) for v in obj]
    return obj


@lru_cache(maxsize=32)
def _template_literals(template: str) -> str:
    """The template's literal strings joined by NULs (to find the added tokens it writes itself)."""
    import jinja2.nodes

    ast = compile_template(template).environment.parse(template)
    literals = {n.data for n in ast.find_all(jinja2.nodes.TemplateData)}
    literals |= {n.value for n in ast.find_all(jinja2.nodes.Const) if isinstance(n.value, str)}
    return "\0".join(literals)


def _control_tokens(tokenizer: Tokenizer, template: str) -> tuple[str, ...]:
    """Special tokens, plus added tokens the template itself writes (Qwen's <think>, <tool_call>)."""
    literals = _template_literals(template)
    added = getattr(tokenizer, "added_tokens", {})
    return (*tokenizer.special_tokens, *(t for t in added if t in literals and not t.isspace()))


def _encode_as_text(tokenizer: Tokenizer, text: str) -> list[int]:
    """Encode with no special *or added* token matched (user text that spells a control token)."""
    return tokenizer.encode_ordinary(text)


def _encode_pieces(tokenizer: Tokenizer, marked: str, markers_re: re.Pattern
                   ) -> tuple[list[int], list[tuple[int, int]]]:
    """Encode a rendered chat that still holds markers: (ids, character span of each id in `marked`)."""
    newline = tokenizer.encode("\n")
    ids: list[int] = []
    spans: list[tuple[int, int]] = []
    pos, first = 0, True
    pieces: list[tuple[str, int, bool]] = []  # (text, offset in `marked`, is user text)
    for m in markers_re.finditer(marked):
        pieces.append((marked[pos:m.start()], pos, False))
        if m.group(1) is not None:
            pieces.append((m.group(1), m.start(1), True))
        pos = m.end()
    pieces.append((marked[pos:], pos, False))
    for text, offset, as_text in pieces:
        if not text:
            continue
        encode: Callable[[str], list[int]] = (
            partial(_encode_as_text, tokenizer) if as_text else partial(tokenizer.encode, allow_special=True)
        )
        piece_ids = encode(text) if first else encode("\n" + text)
        if not first:
            piece_ids = piece_ids[len(newline):] if piece_ids[: len(newline)] == newline else encode(text)
        first = False
        ids += piece_ids
        spans += _token_spans(tokenizer, piece_ids, text, offset)
    return ids, spans


def _token_spans(tokenizer: Tokenizer, ids: list[int], text: str, offset: int) -> list[tuple[int, int]]:
    """The character span [start, end) of each token in `text` (+ offset), from the tokens' byte lengths.

    A token holding part of a character spans that whole character."""
    raw = text.encode("utf-8")
    lengths = [len(tokenizer.id_to_bytes(i)) for i in ids]
    shift = sum(lengths) - len(raw)  # SentencePiece prefix space: tokens hold one byte the text lacks
    char_of_byte = [0] * (len(raw) + 1)
    b = 0
    for ci, ch in enumerate(text):
        n = len(ch.encode("utf-8"))
        char_of_byte[b:b + n] = [ci] * n
        b += n
    char_of_byte[len(raw)] = len(text)
    out, b = [], -shift
    for n in lengths:
        start = char_of_byte[min(max(b, 0), len(raw))]
        end = char_of_byte[min(max(b + n - 1, 0), len(raw))] + 1 if n else start
        out.append((offset + start, offset + min(end, len(text))))
        b += n
    return out


# -------------------------------------------------------------------------------------------- mask


_HEADER_CACHE: dict[str, str | None] = {}


def _assistant_header(template: str, kwargs: dict, end_texts: list[str]) -> str | None:
    """The text a template writes before an assistant turn's content, e.g. '<|im_start|>assistant\\n'."""
    key = json.dumps([template, kwargs, end_texts], sort_keys=True, default=str)
    if key not in _HEADER_CACHE:
        if len(_HEADER_CACHE) > 64:
            _HEADER_CACHE.clear()
        _HEADER_CACHE[key] = _probe_assistant_header(compile_template(template), kwargs, end_texts)
    return _HEADER_CACHE[key]


def _probe_assistant_header(compiled, kwargs: dict, end_texts: list[str]) -> str | None:
    u1, a1, u2, a2 = _SENTINELS
    probe = [{"role": "user", "content": u1}, {"role": "assistant", "content": a1},
             {"role": "user", "content": u2}, {"role": "assistant", "content": a2}]
    try:
        text, _ = _render(compiled, probe, None, False, dict(kwargs), track=False)
    except LlmkitError:
        return None
    i, j = text.find(u1), text.find(a1)
    if i < 0 or j < i:
        return None
    region = text[i + len(u1):j]
    for end in end_texts:  # drop the user turn's own end-of-turn token
        k = region.rfind(end)
        if k >= 0:
            region = region[k + len(end):]
    return region.lstrip() or None


def _assistant_spans(marked: str, header: str, end_texts: list[str], final_open: bool
                     ) -> list[tuple[int, int]]:
    """Character spans [after header, end-of-turn token inclusive) of every assistant turn in `marked`."""
    def template_written(pos: int) -> bool:
        return not (pos > 0 and marked[pos - 1] == _MARK_START)

    ends = sorted((m.start(), m.end()) for e in end_texts for m in re.finditer(re.escape(e), marked)
                  if template_written(m.start()))
    spans = []
    for m in re.finditer(re.escape(header), marked):
        if not template_written(m.start()):
            continue
        start = m.end()
        end = next((e for s, e in ends if s >= start), None)
        if end is None:
            if not final_open:
                continue  # a generation prompt: nothing to learn yet
            end = len(marked)
        spans.append((start, end))
    return spans


# ---------------------------------------------------------------------------------------- render_chat


def render_chat(
    tokenizer: Tokenizer,
    messages: list[dict],
    *,
    add_generation_prompt: bool = False,
    tools: list[dict] | None = None,
    template: str | None = None,
    continue_final_message: bool = False,
    **kwargs: Any,
) -> ChatRender:
    """Render `messages` with the tokenizer's chat template (or `template`, or the ChatML fallback).

    `kwargs` go to the template (e.g. enable_thinking=False for Qwen3, documents=[...]).
    `continue_final_message=True` leaves the last message open so the model continues it (no end-of-turn).
    """
    if not messages:
        raise LlmkitError("cannot render an empty conversation; give at least one message")
    if continue_final_message and add_generation_prompt:
        raise LlmkitError("continue_final_message and add_generation_prompt cannot be used together")
    source = template or getattr(tokenizer, "chat_template", None) or _chatml_fallback(tokenizer)
    compiled = compile_template(source)
    tool_schemas = None
    if tools is not None:
        tool_schemas = []
        for t in tools:
            if not isinstance(t, Mapping):
                raise LlmkitError(f"tools must be JSON-schema dicts, got {type(t).__name__}")
            tool_schemas.append(_plain(t))
    id_to_special = {i: t for t, i in tokenizer.special_tokens.items()}
    token_vars = {f"{name}_token": id_to_special[i] for name in ("bos", "eos", "unk", "pad")
                  if (i := getattr(tokenizer, f"{name}_id", None)) in id_to_special}
    user_kwargs = _plain(kwargs)
    template_kwargs = {**token_vars, **user_kwargs}

    chat = _prepare_messages(messages)
    final_text = None
    if continue_final_message:
        final_text = chat[-1].get("content")
        if not isinstance(final_text, str):
            raise LlmkitError("continue_final_message needs a final message with text content")
        chat[-1]["content"] = final_text + _CONTINUE_TAG

    # render with special-token text in the inputs marked; render again unmarked only if anything was marked
    control_re, markers_re = _control_patterns(_control_tokens(tokenizer, source))
    track = bool(re.search(r"\{%-?\s*generation\s*-?%\}", source))
    marked_inputs = (_mark(chat, control_re), _mark(tool_schemas, control_re), _mark(user_kwargs, control_re))
    marked, gen_spans = _render(compiled, marked_inputs[0], marked_inputs[1], add_generation_prompt,
                                {**token_vars, **marked_inputs[2]}, track=track)
    text = marked
    if marked_inputs != (chat, tool_schemas, user_kwargs):
        text, _ = _render(compiled, chat, tool_schemas, add_generation_prompt, dict(template_kwargs),
                          track=False)
    if continue_final_message:
        text, marked = _cut_at_tag(text, final_text), _cut_at_tag(marked)

    ids, token_spans = _encode_pieces(tokenizer, marked, markers_re)
    if track:
        spans = gen_spans
    else:
        end_texts = [id_to_special[i] for i in sorted(tokenizer.stop_ids) if i in id_to_special]
        has_assistant = any(m.get("role") == "assistant" for m in chat)
        header = _assistant_header(source, template_kwargs, end_texts) if has_assistant else None
        spans = _assistant_spans(marked, header, end_texts, continue_final_message) if header else []
    # a token is trained on when it overlaps an assistant span (transformers' char_to_token rule)
    loss_mask = [int(any(ts < e and s < te for s, e in spans)) for ts, te in token_spans]
    return ChatRender(text=text, ids=ids, loss_mask=loss_mask)


def _chatml_fallback(tokenizer: Tokenizer) -> str:
    """ChatML for a tokenizer without a template if its vocabulary has ChatML's tokens; else an error."""
    known = {**getattr(tokenizer, "added_tokens", {}), **tokenizer.special_tokens}
    if "<|im_start|>" in known and "<|im_end|>" in known:
        return CHATML_TEMPLATE
    raise LlmkitError(
        "this model has no chat template and its vocabulary no ChatML tokens (<|im_start|>, <|im_end|>): "
        "a base model; use `llmkit generate` for plain completion, or give a chat template (template=...)"
    )


def _cut_at_tag(rendered: str, final_text: str | None = None) -> str:
    """Cut the rendering right after the final message's text (transformers' continue_final_message rule)."""
    tag = _CONTINUE_TAG.strip()
    if (final_text is not None and final_text.strip() not in rendered) or tag not in rendered:
        raise LlmkitError("continue_final_message: the chat template dropped part of the final message")
    loc = rendered.rindex(tag)
    keeps_spacing = rendered[loc:loc + len(_CONTINUE_TAG)] == _CONTINUE_TAG
    return rendered[:loc] if keeps_spacing else rendered[:loc].rstrip()

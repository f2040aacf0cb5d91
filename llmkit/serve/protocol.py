"""OpenAI request schemas (pydantic), fields in the order of the OpenAI API reference.

Bounds live on the fields (`Field(ge=..., le=...)`), so a bad parameter is a 400 naming the field
before any work is queued. Unknown fields are accepted (clients send vendor extensions) and logged
once per request at WARNING. The vLLM-style extras `top_k`, `min_p`, `repetition_penalty` and
`ignore_eos`, and llmkit's own `repetition_window` (the repetition penalty counts only the last N tokens of
prompt + answer, llama.cpp's repeat_last_n; 0 = every token, as in vLLM and transformers), sit at the end of
each chat / completions request. `to_sampling_params(max_tokens, defaults)` maps a request onto the engine's
`SamplingParams`; the routes never touch sampling fields themselves. `error_body` gives any exception the
OpenAI error shape {"error": {"message", "type", "param", "code"}}.

Unset is visible: temperature, top_p, top_k, min_p, repetition_penalty and repetition_window default to
None, and `to_sampling_params` fills them from the model's generation defaults (`defaults`,
llmkit.generate.defaults) as vLLM does with a model's generation_config.json, then from OpenAI's defaults
(temperature 1, top_p 1, no penalty). So a model without defaults keeps OpenAI's semantics, and the
interactive loop guard (repetition penalty over the last 64 tokens, answer length) is never applied here:
the web page asks for it explicitly (`model_card` hands it the values). A model's max_new_tokens caps chat
and Responses answers whose request sets no limit. Seeds are 64-bit signed ints.

Hostile input is a 400, never a 500:
- Integers, booleans and numbers are strict (`Int`, `Bool`, `Float`): `true` is not 1, `"5"` is not 5, `1.0`
  is not an integer (an integer is a number). So `tokens: [false]` or `seed: false` name their field.
- Text holding a lone UTF-16 surrogate (JSON `"\\ud800"`, which json.loads accepts but UTF-8 cannot encode) is
  rejected anywhere in a request, keys included, with `param` the path of the string (`messages.0.content`):
  clearer than replacing it with U+FFFD behind the caller's back.
- Content parts other than text (`image_url`, ...) are one LlmkitError from `content_text`, whichever route.
- Raw prompts (/v1/completions text, /tokenize `prompt`) parse special-token text such as "<|im_end|>" into
  its id, as vLLM and HF tokenizers do; `parse_special: false` (llama.cpp's /tokenize name; vLLM has no
  switch) keeps it plain text. Chat content never parses special tokens (the chat renderer's injection
  defence), so `parse_special` does not apply to `messages`.

Response schemas (`ErrorResponse`, `ModelList`, `CompletionResponse`, `ChatCompletionResponse`,
`ResponseObject`, ...) document what the routes return in /openapi.json; they are never used to build or
check a reply at run time. Rules the validators enforce that JSON Schema can say (exactly one of prompt /
messages, `top_logprobs` needs `logprobs`, non-empty prompt lists) are added to the request schemas with
`json_schema_extra`, schema only.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, Strict, model_validator
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmkit.errors import LlmkitError
from llmkit.generate.request import lone_surrogate

log = logging.getLogger("llmkit.serve")

MAX_N = 16
MAX_LOGPROBS = 20
# None -> the model's default
DEFAULTED = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "repetition_window")
Int = Annotated[int, Strict()]  # no booleans, strings or floats
Bool = Annotated[bool, Strict()]  # true / false only
Float = Annotated[float, Strict()]  # a JSON number (integers too); no booleans or strings
Seed = Annotated[int, Strict(), Field(ge=-(2**63), lt=2**63)]  # what torch.Generator.manual_seed takes


class _Lenient(BaseModel):
    """Unknown fields are kept in `model_extra` and logged, never rejected."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="after")
    def _log_unknown(self):
        if self.model_extra:
            log.warning("%s: ignoring unknown fields %s", type(self).__name__, sorted(self.model_extra))
        return self


class _Request(_Lenient):
    """A whole request body: any string in it (keys included) with a lone surrogate is a 400 naming it."""

    @model_validator(mode="before")
    @classmethod
    def _valid_text(cls, data: Any) -> Any:
        if isinstance(data, dict) and (found := lone_surrogate(data)) is not None:
            path, char = found
            raise PydanticCustomError(
                "invalid_text", "contains a lone surrogate ({char}): not valid Unicode text; send UTF-8",
                {"param": path or None, "char": char, "code": "invalid_text"})
        return data


class StreamOptions(_Lenient):
    include_usage: Bool = False


class _Sampling(_Request):
    """Fields shared by completions and chat completions (defaults as in the OpenAI reference)."""

    frequency_penalty: Float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, Float] | None = None
    n: Int = Field(1, ge=1, le=MAX_N)
    presence_penalty: Float = Field(0.0, ge=-2.0, le=2.0)
    seed: Seed | None = None
    stop: str | list[str] | None = None
    stream: Bool = False
    stream_options: StreamOptions | None = None
    temperature: Float | None = Field(None, ge=0.0, le=2.0)  # None: the model's default, else 1
    top_p: Float | None = Field(None, gt=0.0, le=1.0)  # None: the model's default, else 1
    user: str | None = None
    # extensions (vLLM names); None: the model's default, else off
    top_k: Int | None = Field(None, ge=-1)  # -1 = off, as 0
    min_p: Float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: Float | None = Field(None, ge=0.01, le=2.0)
    repetition_window: Int | None = Field(None, ge=0)  # llmkit: penalise the last N tokens only; 0 = all
    ignore_eos: Bool = False  # benchmarks: always generate max_tokens

    @model_validator(mode="after")
    def _check_stop(self):
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > 16 or any(not s for s in stops):
            raise ValueError("stop: at most 16 non-empty strings")
        return self

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def sampling_kwargs(self) -> dict[str, Any]:
        """The request's sampling fields; None = unset (see `make_sampling_params`)."""
        top_k = None if self.top_k is None else max(self.top_k, 0)
        return dict(
            temperature=self.temperature, top_k=top_k, top_p=self.top_p, min_p=self.min_p,
            repetition_penalty=self.repetition_penalty, repetition_window=self.repetition_window,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, stop=self.stop_list(), seed=self.seed,
            ignore_eos=self.ignore_eos,
        )


def make_sampling_params(defaults: dict[str, Any] | None = None, **kw: Any):
    """The engine's SamplingParams from keyword fields, validated (bad values raise LlmkitError); the
    DEFAULTED fields left None come from the model's `defaults`, then from SamplingParams' own."""
    from llmkit.generate.defaults import with_defaults
    from llmkit.generate.sampling import SamplingParams

    model = {k: v for k, v in (defaults or {}).items() if k in DEFAULTED}
    return SamplingParams(**with_defaults(model, kw)).validate()


def answer_limit(max_tokens: int, asked: int | None, defaults: dict[str, Any] | None) -> int:
    """`max_tokens` (the service's budget), capped by the model's default answer length when the request
    set no limit (`asked` None)."""
    default = (defaults or {}).get("max_tokens")
    return min(max_tokens, default) if asked is None and default else max_tokens


def model_card(model_id: str, created: int, max_model_len: int, defaults: dict[str, Any] | None, *,
               root: str | None = None, parent: str | None = None) -> dict:
    """A /v1/models entry; `root` / `parent` as vLLM fills them (base: root = the model as given, parent
    None; a LoRA adapter: root = its path, parent = the base id); llmkit adds `generation_defaults` (the
    model's, used for unset request fields) and `chat_defaults` (those plus the interactive loop guard: what
    the web page sends)."""
    from llmkit.generate.defaults import interactive_defaults

    return {"id": model_id, "object": "model", "created": created, "owned_by": "llmkit",
            "root": root, "parent": parent,
            "max_model_len": max_model_len, "generation_defaults": dict(defaults or {}),
            "chat_defaults": interactive_defaults(defaults or {})}


# Schema-only constraints (`json_schema_extra`): rules the validators enforce, stated in the OpenAPI schema
# too where JSON Schema can say them; run-time validation and its messages are unchanged. Token-id ranges
# depend on the tokenizer, so the app adds them (llmkit.serve.app).
def _non_empty_lists(schema: dict[str, Any]) -> None:
    for alt in schema.get("anyOf", []):
        if alt.get("type") == "array":
            alt["minItems"] = 1
            if alt["items"].get("type") == "array":
                alt["items"]["minItems"] = 1


def _top_logprobs_needs_logprobs(schema: dict[str, Any]) -> None:
    schema["if"] = {"required": ["top_logprobs"],
                    "properties": {"top_logprobs": {"type": "integer", "minimum": 1}}}
    schema["then"] = {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}}


def _prompt_xor_messages(schema: dict[str, Any]) -> None:
    schema["oneOf"] = [
        {"required": ["prompt"], "properties": {"prompt": {"type": "string"}, "messages": {"type": "null"}}},
        {"required": ["messages"], "properties": {"messages": {"type": "array"}, "prompt": {"type": "null"}}}]


# --------------------------------------------------------------------------- /v1/completions
class CompletionRequest(_Sampling):
    model: str | None = None
    prompt: str | list[str] | list[Int] | list[list[Int]] = Field(json_schema_extra=_non_empty_lists)
    best_of: Int | None = Field(None, ge=1, le=MAX_N)
    echo: Bool = False
    logprobs: Int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    max_tokens: Int | None = Field(16, ge=0)
    suffix: str | None = None
    # extensions: BOS/EOS as the model wants (vLLM, default on); "<|im_end|>" -> its id (llama.cpp's name)
    add_special_tokens: Bool = True
    parse_special: Bool = True

    @model_validator(mode="after")
    def _check(self):
        if self.suffix:
            raise ValueError("suffix: not supported (no fill-in-the-middle model)")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of: only best_of == n is supported")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt: must not be empty")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of items, each a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]

    def to_sampling_params(self, max_tokens: int, defaults: dict[str, Any] | None = None):
        return make_sampling_params(defaults, **self.sampling_kwargs(), max_tokens=max_tokens,
                                    logprobs=self.logprobs, echo=self.echo)


# --------------------------------------------------------------------------- /v1/chat/completions
class ContentPart(_Lenient):
    type: str
    text: str | None = None


class FunctionCall(_Lenient):
    name: str
    arguments: str = "{}"


class ToolCall(_Lenient):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


TEXT_PARTS = ("text", "input_text", "output_text")


def content_text(content: str | list[ContentPart] | None, param: str) -> str:
    """A message's content as text (text parts joined); any other part is a 400 naming `param`."""
    if content is None or isinstance(content, str):
        return content or ""
    bad = [p.type for p in content if p.type not in TEXT_PARTS]
    if bad:
        raise LlmkitError(f"{param}: content part type {bad[0]!r} is not supported (text only)",
                          code="invalid_content", param=param)
    return "".join(p.text or "" for p in content)


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def text(self, param: str = "messages") -> str:
        return content_text(self.content, param)


class FunctionDef(_Lenient):
    name: str = Field(..., min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: Bool | None = None


class Tool(_Lenient):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedToolChoice(_Lenient):
    type: Literal["function"] = "function"
    function: dict[str, str]


class JsonSchemaFormat(_Lenient):
    name: str = "response"
    description: str | None = None
    schma: dict[str, Any] | None = Field(None, alias="schema")
    strict: Bool | None = None


class ResponseFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format.json_schema is required when type is 'json_schema'")
        return self


class ChatCompletionRequest(_Sampling):
    model_config = ConfigDict(json_schema_extra=_top_logprobs_needs_logprobs)

    messages: list[ChatMessage] = Field(..., min_length=1)
    model: str | None = None
    logprobs: Bool = False
    max_completion_tokens: Int | None = Field(None, ge=1)
    max_tokens: Int | None = Field(None, ge=1)
    parallel_tool_calls: Bool = True
    response_format: ResponseFormat | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    tools: list[Tool] | None = None
    top_logprobs: Int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _check(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs: requires logprobs=true")
        if isinstance(self.tool_choice, NamedToolChoice) or self.tool_choice == "required":
            names = {t.function.name for t in self.tools or []}
            if not names:
                raise ValueError("tool_choice: requires tools")
            named = isinstance(self.tool_choice, NamedToolChoice)
            name = self.tool_choice.function.get("name") if named else None
            if name is not None and name not in names:
                raise ValueError(f"tool_choice: no tool named {name!r}")
        return self

    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def to_sampling_params(self, max_tokens: int, defaults: dict[str, Any] | None = None):
        lp = (self.top_logprobs or 0) if self.logprobs else None
        return make_sampling_params(defaults, **self.sampling_kwargs(), logprobs=lp,
                                    max_tokens=answer_limit(max_tokens, self.limit(), defaults))


# --------------------------------------------------------------------------- /v1/responses
class ResponseTextFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    schma: dict[str, Any] | None = Field(None, alias="schema")
    strict: Bool | None = None


class ResponseText(_Lenient):
    format: ResponseTextFormat | None = None


class InputItem(_Lenient):
    type: str = "message"
    role: Literal["system", "developer", "user", "assistant"] | None = None
    content: str | list[ContentPart] | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | None = None


class ResponsesRequest(_Request):
    model: str | None = None
    input: str | list[InputItem]
    include: list[str] | None = None
    instructions: str | None = None
    max_output_tokens: Int | None = Field(None, ge=1)
    metadata: dict[str, str] | None = None
    parallel_tool_calls: Bool = True
    previous_response_id: str | None = None
    store: Bool = True
    stream: Bool = False
    temperature: Float | None = Field(None, ge=0.0, le=2.0)  # None: the model's default, else 1
    text: ResponseText | None = None
    tool_choice: Any = None
    tools: list[dict[str, Any]] | None = None
    top_p: Float | None = Field(None, gt=0.0, le=1.0)  # None: the model's default, else 1
    user: str | None = None
    seed: Seed | None = None  # extension

    def messages(self) -> list[dict[str, Any]]:
        """The new input as chat messages (instructions not included); a bad item is a 400 naming `input`."""
        if isinstance(self.input, str):
            return [{"role": "user", "content": self.input}]
        out: list[dict[str, Any]] = []
        for it in self.input:
            if it.type == "message":
                if it.role is None:
                    raise LlmkitError("input: message items need a role", code="invalid_input", param="input")
                out.append({"role": it.role, "content": content_text(it.content, "input")})
            elif it.type == "function_call":
                out.append({"role": "assistant", "content": "", "tool_calls": [
                    {"id": it.call_id, "type": "function",
                     "function": {"name": it.name, "arguments": it.arguments or "{}"}}]})
            elif it.type == "function_call_output":
                out.append({"role": "tool", "tool_call_id": it.call_id, "content": it.output or ""})
            else:
                raise LlmkitError(f"input: item type {it.type!r} is not supported", code="invalid_input",
                                  param="input")
        return out

    def to_sampling_params(self, max_tokens: int, defaults: dict[str, Any] | None = None):
        return make_sampling_params(defaults, temperature=self.temperature, top_p=self.top_p, seed=self.seed,
                                    max_tokens=answer_limit(max_tokens, self.max_output_tokens, defaults))


# --------------------------------------------------------------------------- tokenizer routes
class TokenizeRequest(_Request):
    model_config = ConfigDict(json_schema_extra=_prompt_xor_messages)

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: Bool = False
    add_generation_prompt: Bool = True
    parse_special: Bool = True  # prompt only: "<|im_end|>" -> its id (llama.cpp's name); messages never do

    @model_validator(mode="after")
    def _check(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[Int]


# --------------------------------------------------------------------------- errors
ApiError = LlmkitError  # errors name the request field at fault with `param=` (OpenAI `param`)


_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 408: "timeout_error", 413: "invalid_request_error", 429: "rate_limit_error",
          503: "service_unavailable"}


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _loc_param(loc: Sequence[Any]) -> str | None:
    """The dotted field path of a pydantic error location, cut at the first union-member tag
    ("messages.0.content.str" -> "messages.0.content", "prompt.list[int].0" -> "prompt")."""
    parts: list[str] = []
    for x in loc:
        x = str(x)
        if x == "body" and not parts:
            continue
        if x in _TYPE_TAGS or x[:1].isupper() or any(c in x for c in "[]-'\""):
            break
        parts.append(x)
    return ".".join(parts) or None


def error_body(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """(HTTP status, OpenAI error JSON) for any exception."""
    param = None
    if isinstance(exc, LlmkitError):
        status, msg, code = exc.status, str(exc), exc.code
        param = getattr(exc, "param", None)
    elif isinstance(exc, RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        ctx = first.get("ctx") or {}
        param = ctx["param"] if "param" in ctx else _loc_param(first.get("loc", ()))
        status, code = 400, ctx.get("code", "invalid_value")
        detail = first.get("msg", "invalid value")
        msg = f"{param}: {detail}" if param else str(detail)
        if first.get("type") == "json_invalid":
            msg, code = "the request body is not valid JSON", "invalid_json"
    elif isinstance(exc, StarletteHTTPException):
        status, msg, code = exc.status_code, str(exc.detail), None
    else:
        status, msg, code = 500, "internal server error", None
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return status, {"error": {"message": msg, "type": kind, "param": param, "code": code}}

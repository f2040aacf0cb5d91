"""What /openapi.json promises about each route's replies: pydantic models used for documentation only.

The routes build plain dicts (service / chat / completions / responses / tokens) and return them as they are
(`response_model=None`); these models describe them, and tests/test_openapi.py checks real replies against
the document. Extra keys are allowed, as OpenAI clients must tolerate them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Out(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorDetail(_Out):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(_Out):
    """The OpenAI error body of every 4xx / 5xx reply (and the last SSE event of a failed stream)."""

    error: ErrorDetail


class ModelCard(_Out):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str | None = Field(None, description="the base: the model as given; a LoRA adapter: its path")
    parent: str | None = Field(None, description="a LoRA adapter: the id of its base model; else null")
    max_model_len: int = Field(ge=1)
    generation_defaults: dict[str, Any]
    chat_defaults: dict[str, Any]


class ModelList(_Out):
    object: Literal["list"]
    data: list[ModelCard]


class PromptTokensDetails(_Out):
    cached_tokens: int = Field(ge=0)


class Usage(_Out):
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    total_tokens: int = Field(ge=0)
    prompt_tokens_details: PromptTokensDetails


class CompletionLogprobs(_Out):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(_Out):
    text: str
    index: int = Field(ge=0)
    logprobs: CompletionLogprobs | None
    finish_reason: str | None


class CompletionResponse(_Out):
    """/v1/completions (a streamed chunk has the same shape, `usage` only on the last one)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class TopLogprob(_Out):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatChoiceLogprobs(_Out):
    content: list[ChatTokenLogprob]


class FunctionCallOut(_Out):
    name: str
    arguments: str


class ToolCallOut(_Out):
    id: str
    type: Literal["function"]
    function: FunctionCallOut


class ChatResponseMessage(_Out):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(_Out):
    index: int = Field(ge=0)
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None
    finish_reason: str


class ChatCompletionResponse(_Out):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class OutputText(_Out):
    type: Literal["output_text"]
    text: str
    annotations: list[Any]
    logprobs: list[Any]


class OutputMessage(_Out):
    id: str
    type: Literal["message"]
    status: str
    role: Literal["assistant"]
    content: list[OutputText]


class FunctionCallItem(_Out):
    type: Literal["function_call"]
    id: str
    call_id: str
    name: str
    arguments: str
    status: str


class ResponseUsage(_Out):
    input_tokens: int = Field(ge=0)
    input_tokens_details: dict[str, int]
    output_tokens: int = Field(ge=0)
    output_tokens_details: dict[str, int]
    total_tokens: int = Field(ge=0)


class ResponseObject(_Out):
    """/v1/responses (create and get)."""

    id: str
    object: Literal["response"]
    created_at: int
    status: Literal["completed", "incomplete", "in_progress"]
    error: ErrorDetail | None
    incomplete_details: dict[str, Any] | None
    instructions: str | None
    max_output_tokens: int | None
    model: str
    output: list[Annotated[OutputMessage | FunctionCallItem, Field(discriminator="type")]]
    parallel_tool_calls: bool
    previous_response_id: str | None
    store: bool
    temperature: float | None
    text: dict[str, Any]
    tool_choice: Any
    tools: list[dict[str, Any]]
    top_p: float | None
    usage: ResponseUsage | None
    metadata: dict[str, str]
    user: str | None


class ResponseDeleted(_Out):
    id: str
    object: Literal["response.deleted"]
    deleted: bool


class TokenizeResponse(_Out):
    count: int = Field(ge=0)
    max_model_len: int = Field(ge=1)
    tokens: list[int]


class DetokenizeResponse(_Out):
    prompt: str


class TokenizerInfo(_Out):
    tokenizer_class: str
    vocab_size: int = Field(ge=1)
    model_max_length: int = Field(ge=1)
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    stop_token_ids: list[int]
    add_bos_token: bool
    chat_template: str | None
    special_tokens: dict[str, int]


class Health(_Out):
    status: Literal["ok"]
    model: str
    running: int = Field(ge=0)
    waiting: int = Field(ge=0)


class HealthError(_Out):
    """/health's 503: the engine thread is not running."""

    status: Literal["error"]
    reason: str

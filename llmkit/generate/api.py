"""generate / chat / stream: text in, text out, over one Engine kept on the LLM.

    llm.generate("Once upon a time", max_tokens=32, temperature=0)   -> GenerationResult (str() is the text)
    llm.generate(["a", "b", "c"], temperature=0)                     -> list[GenerationResult], one batch
    llm.chat([{"role": "user", "content": "Hi"}])                     -> GenerationResult
    for delta in llm.stream("Once upon a time"): print(delta, end="") # UTF-8-safe text pieces

Notable choices:
- `generate` returns a GenerationResult whose str() is the text, so `print(llm.generate(...))` shows text
  while `.token_ids`, `.logprobs`, `.finish_reason`, `.usage` are at hand; with n > 1 (or a list of
  prompts) it returns a list (prompt-major: all samples of prompt 0, then prompt 1, ...).
- One Engine per LLM (made on first use, rebuilt only to grow its batch or context, or for another
  `kv_dtype=`: "bf16" / "fp16" / "int8" KV cache storage, sticky once chosen), so a chat that continues a
  conversation reuses the cached keys/values of everything said so far (`usage["cached_tokens"]`).
- Prompts longer than the engine's batch are queued: rows are refilled as sequences finish.
- Raw prompts are encoded as /v1/completions encodes them (`encode_prompt`): BOS where the model wants one,
  and special-token text parsed ("<|im_end|>" -> its id, as vLLM and HF tokenizers do); chats are rendered
  with the model's own template (`render_chat`, add_generation_prompt=True), whose message content never
  parses special tokens.
- Text never shows stop strings, stop ids or other control tokens; token_ids keep every sampled id.
- The per-request state, tools and JSON constraints come from llmkit.generate.request, which the server uses
  too: `llm.chat(msgs, response_format={"type": "json_object"})` and tools behave as over HTTP.
- Sampling keywords left unset take the model's generation defaults (`llm.generation_defaults`, e.g.
  SmolLM2-135M-Instruct's temperature 0.2, top-p 0.9); an explicit value or SamplingParams object wins.
- `guard=` (llmkit.generate.guard) screens the input before the engine is touched (LlmkitError 400,
  code "content_filter" or "input_too_long") and each output as it grows (finish_reason "content_filter",
  text withheld; a stream stops at the match, pieces already yielded stay yielded).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from llmkit.errors import LlmkitError
from llmkit.generate.defaults import resolve_params
from llmkit.generate.engine import Engine, Request
from llmkit.generate.guard import Guard, screen_input, screen_prompt
from llmkit.generate.request import (
    NOT_CONSTRAINED,
    ChatPrompt,
    Completion,
    Processor,
    chat_prompt,
    check_text,
    make_processors,
    usage,
)
from llmkit.generate.sampling import SamplingParams, TokenLogprob
from llmkit.model.kv_cache import resolve_kv_dtype


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (stop string or id) | "length" (max_tokens, context full) | "content_filter"
    usage: dict[str, int]  # prompt_tokens, completion_tokens, total_tokens, cached_tokens
    prompt_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None  # one per generated token (params.logprobs set)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # params.echo; the first token has none
    timings: dict[str, float] = field(default_factory=dict)  # prefill_s, decode_s, decode_tokens_per_s
    tool_calls: list[dict] = field(default_factory=list)  # OpenAI-shaped calls parsed from a chat answer

    def __str__(self) -> str:
        return self.text


MIN_CAPACITY = 256  # KV slots per row an engine starts with when the caller says how many it needs (the
# default model: 11 MB in float32; grown by doubling, a remake drops the prefix cache once per doubling)


def get_engine(llm, max_batch: int = 1, tokens: int | None = None,
               kv_dtype: str | torch.dtype | None = None, speculative: int | None = None) -> Engine:
    """The LLM's engine, (re)made with at least `max_batch` rows and room for `tokens` tokens per row
    (None: the model's whole context). The KV cache is sized to the need, rounded up to a power of two
    (at least MIN_CAPACITY), not to the context: Gemma 3's 32768 positions would cost 1.2 GB per row in
    float32. A longer request later remakes the engine (its prefix cache is dropped once).
    `kv_dtype`: the cache's storage ("auto", "bf16", "fp16", "int8"; see Engine); None keeps the current
    engine's ("auto" for a first engine), so a choice made once (the CLI's --kv-cache) sticks, and a
    different one remakes the engine. `speculative`: draft tokens per step by prompt lookup (0 = off; None
    keeps the engine's), which changes no cached state, so the engine stays; they come from a draft model
    instead when `llm.draft_model` is set (a model with the same tokenizer; `Engine.set_draft_model`)."""
    ctx = llm.model.config.max_seq_len
    want = ctx if tokens is None else min(ctx, max(MIN_CAPACITY, 1 << max(tokens - 1, 1).bit_length()))
    eng = getattr(llm, "_engine", None)
    same = eng is not None and eng.model is llm.model
    if same and kv_dtype is None:
        kv_dtype = eng.cache.dtype
    if same and speculative is None:
        speculative = eng.speculative  # kept when the engine is remade
    if (not same or eng.max_batch < max_batch or eng.capacity < want
            or resolve_kv_dtype(kv_dtype, eng.dtype) != eng.cache.dtype):
        if same:
            max_batch, want = max(max_batch, eng.max_batch), max(want, eng.capacity)
        eng = llm._engine = None  # free the old cache before allocating the new one
        eng = Engine(llm.model, max_batch=max_batch, max_seq_len=want,
                     stop_ids=sorted(llm.tokenizer.stop_ids), kv_dtype=kv_dtype,
                     vocab_size=getattr(llm.tokenizer, "vocab_size", None))
        llm._engine = eng
    if speculative is not None:
        if speculative < 0:
            raise LlmkitError(f"speculative must be >= 0 draft tokens, got {speculative}")
        eng.speculative = speculative
    draft = getattr(llm, "draft_model", None)  # drafts from another model (llm.draft_model = ...)
    if (eng.draft.model if eng.draft is not None else None) is not draft:
        eng.set_draft_model(draft)
    return eng


@dataclass
class _Live:
    index: int  # which prompt
    out: Completion
    prompt_ids: list[int]
    cached: int
    t0: float
    t1: float | None = None  # first token
    req: Request | None = None  # the engine's record (speculative decoding counts)


def run(engine: Engine, tokenizer, prompts: Sequence[Sequence[int]], params: SamplingParams, *,
        truncate: bool = False, processors: Sequence[Sequence[Processor]] | None = None,
        prompt: ChatPrompt | None = None, guard: Guard | None = None
        ) -> Iterator[tuple[int, str, GenerationResult | None]]:
    """Drive the engine over every (prompt, sample); yield (prompt index, text delta, result when done).
    `processors`: one list of logits processors per sample (n of them); `prompt` gives the tool handling;
    `guard` checks each output as it grows."""
    jobs = deque((i, s) for i in range(len(prompts)) for s in range(params.n))
    live: dict[int, _Live] = {}
    skip = sorted(engine.stop_ids | set(params.stop_ids))
    try:
        while jobs or live:
            while jobs and engine.free_rows:
                i, s = jobs.popleft()
                t0 = time.perf_counter()
                row = engine.add(prompts[i], params, sample_index=s, truncate=truncate,
                                 processors=processors[s] if processors else ())
                req = engine.request(row)
                out = Completion(tokenizer, params.stop, skip_ids=skip,
                                 hold_tools=bool(prompt and prompt.hold_tools),
                                 forced_tool=prompt.forced_tool if prompt else None, guard=guard)
                live[row] = _Live(i, out, req.prompt_ids, req.cached_tokens, t0, req=req)
            for step in engine.step():
                if step.error is not None:  # this row's request failed (its processor, say): the rows are
                    raise step.error  # freed below
                st = live[step.row]
                if st.t1 is None:
                    st.t1 = time.perf_counter()
                if step.prompt_logprobs is not None:
                    st.out.prompt_logprobs = step.prompt_logprobs
                delta, _ = st.out.push(step.token_id, step.logprob, step.finish_reason)
                if not st.out.finished:
                    if delta:
                        yield st.index, delta, None
                    continue
                engine.remove(step.row)
                del live[step.row]
                yield st.index, delta, _result(st, params, engine.decode_path)
    finally:
        for row in live:  # the caller stopped early (or an error): free the rows
            engine.remove(row)


def _result(st: _Live, params: SamplingParams, decode_path: str = "") -> GenerationResult:
    now = time.perf_counter()
    out = st.out
    n = len(out.token_ids)
    t1 = st.t1 if st.t1 is not None else now
    decode_s = now - t1
    timings = {"prefill_s": t1 - st.t0, "decode_s": decode_s,
               "decode_tokens_per_s": (n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0,
               "decode_path": decode_path}
    if st.req is not None and st.req.drafted:  # speculative decoding: drafts proposed, and taken
        timings.update(draft_tokens=st.req.drafted, accepted_draft_tokens=st.req.accepted)
    content, calls, reason = out.final()
    return GenerationResult(out.text if content is None else content, out.token_ids, reason,
                            usage(len(st.prompt_ids), n, st.cached), st.prompt_ids,
                            out.logprobs if params.logprobs is not None else None, out.prompt_logprobs,
                            timings, calls)


def encode_prompt(tokenizer, prompt: str | Sequence[int], *, add_special_tokens: bool = True,
                  parse_special: bool = True) -> list[int]:
    """Token ids of a raw prompt, or token ids checked against the vocabulary. Text gets BOS/EOS where the
    model wants them (`add_special_tokens`) and, with `parse_special` (the default, as vLLM), special-token
    text such as "<|im_end|>" becomes that token's id; off, it is encoded as plain text. A raw prompt belongs
    to the caller: chat content, which may come from anyone, never parses special tokens (render_chat)."""
    if isinstance(prompt, str):
        check_text(prompt, "prompt")
        ids = tokenizer.encode(prompt, add_special_tokens=add_special_tokens, allow_special=parse_special)
    else:
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
            raise LlmkitError("a prompt is a string or a list of token ids", param="prompt")
        ids = list(prompt)
        if any(not 0 <= i < tokenizer.vocab_size for i in ids):
            raise LlmkitError(f"prompt: token ids must be in [0, {tokenizer.vocab_size})",
                              code="invalid_prompt", param="prompt")
    if not ids:
        raise LlmkitError("prompt: empty after tokenization", code="invalid_prompt", param="prompt")
    return ids


def _prompts(llm, prompt, chat_kw: dict) -> tuple[list[list[int]], bool, ChatPrompt | None]:
    """(token-id prompts, whether one prompt was given, the chat prompt's tool/constraint handling)."""
    if isinstance(prompt, str) or (isinstance(prompt, Sequence) and prompt and isinstance(prompt[0], int)):
        return [encode_prompt(llm.tokenizer, prompt)], True, None
    if isinstance(prompt, Sequence) and prompt and isinstance(prompt[0], dict):
        cp = chat_prompt(llm.tokenizer, list(prompt), **chat_kw)
        return [cp.ids], True, cp
    if isinstance(prompt, Sequence) and prompt:
        return [encode_prompt(llm.tokenizer, p) for p in prompt], False, None
    raise LlmkitError("empty prompt: give a string, a list of token ids, a list of strings or chat messages")


def _screen(llm, prompt, guard: Guard | None) -> None:
    """The guard's input check (400 on refusal), before anything is encoded or queued."""
    if guard is None:
        return
    if isinstance(prompt, Sequence) and prompt and isinstance(prompt[0], dict):
        screen_input(guard, list(prompt))
        return
    one = isinstance(prompt, str) or (isinstance(prompt, Sequence) and prompt and isinstance(prompt[0], int))
    for p in [prompt] if one else list(prompt or []):
        if not isinstance(p, str):
            vocab = llm.tokenizer.vocab_size
            p = llm.tokenizer.decode([i for i in p if isinstance(i, int) and 0 <= i < vocab])
        screen_prompt(guard, p)


def _start(llm, prompt, params, kw, *, tools=None, tool_choice=None, response_format=None, logit_bias=None,
           guard=None):
    _screen(llm, prompt, guard)
    params = resolve_params(getattr(llm, "generation_defaults", None) or {}, params, **kw)
    chat_kw = {"tools": tools, "tool_choice": tool_choice, "response_format": response_format}
    is_chat = isinstance(prompt, Sequence) and prompt and isinstance(prompt[0], dict)
    if not is_chat and any(chat_kw.values()):
        raise LlmkitError("tools, tool_choice and response_format apply to chat messages; use llm.chat")
    prompts, single, cp = _prompts(llm, prompt, chat_kw)
    schema = cp.schema if cp is not None else NOT_CONSTRAINED
    procs = make_processors(llm.tokenizer, params.n, schema, logit_bias)
    return params, prompts, single, cp, procs


def generate(llm, prompt, params: SamplingParams | None = None, *, truncate: bool = False, tools=None,
             guard=None, tool_choice=None, response_format=None, logit_bias=None, kv_dtype=None,
             speculative=None, **kw) -> GenerationResult | list[GenerationResult]:
    """Complete a prompt (str, token ids, chat messages) or a list of prompts (one batch).

    Sampling keywords left unset take the model's generation defaults (`llm.generation_defaults`). For chat
    messages, `tools` / `tool_choice` / `response_format` work as in the OpenAI API; `logit_bias` maps token
    ids to biases in [-100, 100]; `guard` (llmkit.generate.guard) moderates the input and the outputs;
    `kv_dtype` the KV cache's storage ("auto", "bf16", "fp16", "int8"; None: as the LLM's engine has it);
    `speculative` k: up to k draft tokens per step by prompt lookup, verified in one forward (same output;
    faster when the answer copies its prompt: summaries, rewrites, extraction; None: as the engine has it)."""
    params, prompts, single, cp, procs = _start(llm, prompt, params, kw, tools=tools, tool_choice=tool_choice,
                                                response_format=response_format, logit_bias=logit_bias,
                                                guard=guard)
    if procs is not None and len(prompts) > 1:
        procs = None if logit_bias is None else procs  # only logit_bias applies to a batch of raw prompts
    eng = get_engine(llm, min(len(prompts) * params.n, 8), max(map(len, prompts)) + params.max_tokens,
                     kv_dtype, speculative)
    results: dict[int, list[GenerationResult]] = {}
    for i, _, res in run(eng, llm.tokenizer, prompts, params, truncate=truncate, processors=procs, prompt=cp,
                         guard=guard):
        if res is not None:
            results.setdefault(i, []).append(res)
    flat = [r for i in range(len(prompts)) for r in results[i]]
    return flat[0] if single and params.n == 1 else flat


def chat(llm, messages: list[dict], params: SamplingParams | None = None, **kw) -> GenerationResult:
    """Answer a conversation [{"role": ..., "content": ...}, ...] with the model's chat template
    (keywords as `generate`, including tools, tool_choice and response_format)."""
    if not messages or not all(isinstance(m, dict) for m in messages):
        raise LlmkitError("chat expects a non-empty list of {'role': ..., 'content': ...} messages")
    return generate(llm, messages, params, **kw)


class Stream:
    """Iterate to get text deltas; `.result` holds the GenerationResult once the iteration ended."""

    def __init__(self, events: Iterator[tuple[int, str, GenerationResult | None]]):
        self._events = events
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[str]:
        for _, delta, res in self._events:
            if res is not None:
                self.result = res
            if delta:
                yield delta

    def close(self) -> None:
        self._events.close()


def stream(llm, prompt, params: SamplingParams | None = None, *, truncate: bool = False, tools=None,
           guard=None, tool_choice=None, response_format=None, logit_bias=None, kv_dtype=None,
           speculative=None, **kw) -> Stream:
    """Text deltas of one completion (prompt: str, token ids or chat messages); keywords as `generate`."""
    params, prompts, single, cp, procs = _start(llm, prompt, params, kw, tools=tools, tool_choice=tool_choice,
                                                response_format=response_format, logit_bias=logit_bias,
                                                guard=guard)
    if params.n != 1:
        raise LlmkitError("stream produces one sequence; use generate for n > 1")
    if not single:
        raise LlmkitError("stream takes one prompt; use generate for a batch")
    eng = get_engine(llm, 1, len(prompts[0]) + params.max_tokens, kv_dtype, speculative)
    return Stream(run(eng, llm.tokenizer, prompts, params, truncate=truncate, processors=procs,
                      prompt=cp, guard=guard))

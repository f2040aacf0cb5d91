"""generate / chat / stream: text in, text out, over one Engine kept on the LLM.

    llm.generate("Once upon a time", max_tokens=32, temperature=0)   -> GenerationResult (str() is the text)
    llm.generate(["a", "b", "c"], temperature=0)                     -> list[GenerationResult], one batch
    llm.chat([{"role": "user", "content": "Hi"}])                     -> GenerationResult
    for delta in llm.stream("Once upon a time"): print(delta, end="") # UTF-8-safe text pieces

Notable choices:
- `generate` returns a GenerationResult whose str() is the text, so `print(llm.generate(...))` shows text
  while `.token_ids`, `.logprobs`, `.finish_reason`, `.usage` are at hand; with n > 1 (or a list of
  prompts) it returns a list (prompt-major: all samples of prompt 0, then prompt 1, ...).
- One Engine per LLM (made on first use, rebuilt only to grow its batch), so a chat that continues a
  conversation reuses the cached keys/values of everything said so far (`usage["cached_tokens"]`).
- Prompts longer than the engine's batch are queued: rows are refilled as sequences finish.
- Raw prompts are encoded with the tokenizer's special tokens (BOS where the model wants one); chats are
  rendered with the model's own template (`render_chat`, add_generation_prompt=True).
- Text never shows stop strings, stop ids or other control tokens; token_ids keep every sampled id.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from llmkit.errors import LlmkitError
from llmkit.generate.engine import Engine
from llmkit.generate.sampling import SamplingParams, TokenLogprob
from llmkit.generate.stop import TextStream


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (stop string or stop id) | "length" (max_tokens or context full)
    usage: dict[str, int]  # prompt_tokens, completion_tokens, total_tokens, cached_tokens
    prompt_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None  # one per generated token (params.logprobs set)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # params.echo; the first token has none
    timings: dict[str, float] = field(default_factory=dict)  # prefill_s, decode_s, decode_tokens_per_s

    def __str__(self) -> str:
        return self.text


def get_engine(llm, max_batch: int = 1) -> Engine:
    """The LLM's engine, (re)made with at least `max_batch` rows."""
    eng = getattr(llm, "_engine", None)
    if eng is None or eng.max_batch < max_batch or eng.model is not llm.model:
        eng = Engine(llm.model, max_batch=max_batch, stop_ids=sorted(llm.tokenizer.stop_ids))
        llm._engine = eng
    return eng


def sampling_params(params: SamplingParams | None = None, **kw) -> SamplingParams:
    if params is not None:
        return params.replace(**kw).validate() if kw else params.validate()
    return SamplingParams.from_kwargs(**kw)


@dataclass
class _Live:
    index: int  # which prompt
    text: TextStream
    prompt_ids: list[int]
    cached: int
    t0: float
    t1: float
    ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)


def run(engine: Engine, tokenizer, prompts: Sequence[Sequence[int]], params: SamplingParams, *,
        truncate: bool = False) -> Iterator[tuple[int, str, GenerationResult | None]]:
    """Drive the engine over every (prompt, sample); yield (prompt index, text delta, result when done)."""
    jobs = deque((i, s) for i in range(len(prompts)) for s in range(params.n))
    live: dict[int, _Live] = {}
    stops = sorted(engine.stop_ids | set(params.stop_ids))
    try:
        while jobs or live:
            while jobs and engine.free_rows:
                i, s = jobs.popleft()
                t0 = time.perf_counter()
                row = engine.add(prompts[i], params, sample_index=s, truncate=truncate)
                seq = engine.seq(row)
                live[row] = _Live(i, TextStream(tokenizer, params.stop, stops), seq.prompt_ids,
                                  seq.cached_tokens, t0, time.perf_counter())
            for out in engine.step():
                st = live[out.row]
                st.ids.append(out.token_id)
                if out.logprob is not None:
                    st.logprobs.append(out.logprob)
                delta, stopped = st.text.push(out.token_id)
                if not (stopped or out.finished):
                    if delta:
                        yield st.index, delta, None
                    continue
                if not stopped:
                    delta += st.text.finish()
                reason = "stop" if stopped or st.text.matcher.stopped else out.finish_reason
                result = _result(engine.seq(out.row), st, reason)
                engine.remove(out.row)
                del live[out.row]
                yield st.index, delta, result
    finally:
        for row in live:  # the caller stopped early (or an error): free the rows
            engine.remove(row)


def _result(seq, st: _Live, reason: str) -> GenerationResult:
    now = time.perf_counter()
    n = len(st.ids)
    usage = {"prompt_tokens": len(st.prompt_ids), "completion_tokens": n,
             "total_tokens": len(st.prompt_ids) + n, "cached_tokens": st.cached}
    decode_s = now - st.t1
    timings = {"prefill_s": st.t1 - st.t0, "decode_s": decode_s,
               "decode_tokens_per_s": (n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0}
    return GenerationResult(st.text.text, st.ids, reason, usage, st.prompt_ids,
                            st.logprobs if seq.params.logprobs is not None else None,
                            seq.prompt_logprobs, timings)


def encode_prompt(tokenizer, prompt: str | Sequence[int]) -> list[int]:
    if isinstance(prompt, str):
        return tokenizer.encode(prompt, add_special_tokens=True)
    if not all(isinstance(i, int) for i in prompt):
        raise LlmkitError("a prompt is a string or a list of token ids")
    return list(prompt)


def chat_ids(tokenizer, messages: list[dict], **template_kw) -> list[int]:
    from llmkit.tokenizer import render_chat

    return render_chat(tokenizer, messages, add_generation_prompt=True, **template_kw).ids


def _prompts(llm, prompt) -> tuple[list[list[int]], bool]:
    """(token-id prompts, whether one prompt was given)."""
    if isinstance(prompt, str) or (isinstance(prompt, Sequence) and prompt and isinstance(prompt[0], int)):
        return [encode_prompt(llm.tokenizer, prompt)], True
    if isinstance(prompt, Sequence) and prompt and isinstance(prompt[0], dict):
        return [chat_ids(llm.tokenizer, list(prompt))], True
    if isinstance(prompt, Sequence) and prompt:
        return [encode_prompt(llm.tokenizer, p) for p in prompt], False
    raise LlmkitError("empty prompt: give a string, a list of token ids, a list of strings or chat messages")


def generate(llm, prompt, params: SamplingParams | None = None, *, truncate: bool = False, **kw
             ) -> GenerationResult | list[GenerationResult]:
    """Complete a prompt (str, token ids, chat messages) or a list of prompts (one batch)."""
    params = sampling_params(params, **kw)
    prompts, single = _prompts(llm, prompt)
    eng = get_engine(llm, min(len(prompts) * params.n, 8))
    results: dict[int, list[GenerationResult]] = {}
    for i, _, res in run(eng, llm.tokenizer, prompts, params, truncate=truncate):
        if res is not None:
            results.setdefault(i, []).append(res)
    flat = [r for i in range(len(prompts)) for r in results[i]]
    return flat[0] if single and params.n == 1 else flat


def chat(llm, messages: list[dict], params: SamplingParams | None = None, **kw) -> GenerationResult:
    """Answer a conversation [{"role": ..., "content": ...}, ...] with the model's chat template."""
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


def stream(llm, prompt, params: SamplingParams | None = None, *, truncate: bool = False, **kw) -> Stream:
    """Text deltas of one completion (prompt: str, token ids or chat messages)."""
    params = sampling_params(params, **kw)
    if params.n != 1:
        raise LlmkitError("stream produces one sequence; use generate for n > 1")
    prompts, single = _prompts(llm, prompt)
    if not single:
        raise LlmkitError("stream takes one prompt; use generate for a batch")
    return Stream(run(get_engine(llm), llm.tokenizer, prompts, params, truncate=truncate))

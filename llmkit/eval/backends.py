"""Who answers an evaluation's requests: a model in this process (`LocalBackend`), or any OpenAI-compatible
server (`llmkit.eval.http.HTTPBackend`). Both take a list of `Request`s and return the answers in order.

Notable choices (in-process)
- Log-likelihoods go through the one scorer, `llmkit.score.score`: requests sharing a context (the endings of
  a multiple-choice item) run that context once per batch.
- Text becomes ids as lm-eval's HF model does it, so the numbers match lm-eval's on the same weights: no
  BOS/EOS added; trailing spaces of the context move to the continuation; the continuation's ids are
  ids(context + continuation) after the context's ids; an empty context becomes the prefix token (BOS, else
  EOS); a request longer than the model's context keeps its last tokens (the context is cut on the left).
- Generation uses the engine (batched rows, greedy unless a temperature is given) with the prompt encoded as
  `/v1/completions` encodes text, so in-process and over llmkit's server give the same completions.
- `rolling` (perplexity) prefixes the text with the prefix token so every token of the text is scored, then
  runs `llmkit.score.perplexity` with lm-eval's rolling windows (each window feeds the model its whole
  context, every token scored once, the last window right-aligned with a full context); a request's own
  window/stride use HF's sliding-window recipe instead.
"""

from __future__ import annotations

from collections.abc import Sequence

from llmkit.errors import LlmkitError
from llmkit.eval.base import Answer, LogLikelihood, Request, Rolling


class Backend:
    """Answers requests. Subclasses implement the three kinds; `run` keeps the order of a mixed list."""

    name: str = "backend"

    def loglikelihood(self, reqs: Sequence[Request]) -> list[LogLikelihood]:
        raise NotImplementedError

    def generate(self, reqs: Sequence[Request]) -> list[list[str]]:
        raise NotImplementedError

    def rolling(self, reqs: Sequence[Request]) -> list[Rolling]:
        raise NotImplementedError

    def run(self, reqs: Sequence[Request]) -> list[Answer]:
        out: list[Answer | None] = [None] * len(reqs)
        for kind, fn in (("loglikelihood", self.loglikelihood), ("generate", self.generate),
                         ("rolling", self.rolling)):
            idx = [i for i, r in enumerate(reqs) if r.kind == kind]
            if idx:
                for i, a in zip(idx, fn([reqs[i] for i in idx])):
                    out[i] = a
        return out  # type: ignore[return-value]

    def info(self) -> dict:
        """What identifies the model (results.json, the resume cache key)."""
        return {"backend": self.name}


def split_pair(context: str, continuation: str) -> tuple[str, str]:
    """lm-eval's rule: trailing whitespace of the context belongs to the continuation."""
    n = len(context) - len(context.rstrip())
    if n:
        return context[:-n], context[-n:] + continuation
    return context, continuation


def prefix_token(tokenizer) -> int:
    tid = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    if tid is None:
        raise LlmkitError("this tokenizer has neither BOS nor EOS: an empty context cannot be scored")
    return tid


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) exactly as lm-eval's HF model encodes a log-likelihood request."""

    def enc(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False, allow_special=True)

    context, continuation = split_pair(context, continuation)
    if not context:
        return [prefix_token(tokenizer)], enc(continuation)
    whole, ctx = enc(context + continuation), enc(context)
    return ctx, whole[len(ctx):]


def fit(ctx: list[int], cont: list[int], limit: int) -> tuple[list[int], list[int]]:
    """Keep the last limit + 1 tokens of context + continuation (lm-eval's left truncation)."""
    keep = limit + 1
    if len(ctx) + len(cont) <= keep:
        return ctx, cont
    if len(cont) >= keep:
        return cont[-keep:-keep + 1] or cont[:1], cont[-keep + 1:]
    return ctx[len(ctx) + len(cont) - keep:], cont


class LocalBackend(Backend):
    """A loaded `llmkit.LLM` answering in this process."""

    name = "local"

    def __init__(self, llm, *, batch_size: int = 32, gen_batch: int = 8):
        if batch_size < 1:
            raise LlmkitError(f"--batch-size must be >= 1, got {batch_size}")
        self.llm = llm
        self.batch_size = batch_size
        self.gen_batch = max(1, gen_batch)
        llm.model.eval()

    def info(self) -> dict:
        from llmkit.eval.results import model_fingerprint

        return {"backend": self.name, "model": self.llm.name, "path": str(self.llm.path),
                "dtype": str(self.llm.dtype).removeprefix("torch."), "device": str(self.llm.device),
                "fingerprint": model_fingerprint(self.llm)}

    def loglikelihood(self, reqs: Sequence[Request]) -> list[LogLikelihood]:
        from llmkit.score import score

        tok, limit = self.llm.tokenizer, self.llm.model.config.max_seq_len
        pairs = []
        for r in reqs:
            c, k = encode_pair(tok, r.context, r.continuation)
            if not k:
                raise LlmkitError(f"empty continuation after tokenization: {r.continuation!r}")
            pairs.append(fit(c, k, limit))
        scores = score(self.llm.model, pairs, batch_size=self.batch_size)
        return [LogLikelihood(s.logprob, s.is_greedy, s.n_tokens) for s in scores]

    def generate(self, reqs: Sequence[Request]) -> list[list[str]]:
        from llmkit.generate.api import encode_prompt, get_engine, run
        from llmkit.generate.sampling import SamplingParams

        out: list[list[str]] = []
        # one engine run per group of identical settings (usually all of them), prompts batched over rows
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(reqs):
            groups.setdefault((r.max_tokens, r.stop, r.temperature, r.n, r.seed), []).append(i)
        texts: dict[int, list[str]] = {}
        for (max_tokens, stop, temperature, n, seed), idx in groups.items():
            params = SamplingParams(max_tokens=max_tokens, stop=list(stop), temperature=temperature, n=n,
                                    seed=seed, top_p=1.0, top_k=0)
            prompts = [encode_prompt(self.llm.tokenizer, reqs[i].context) for i in idx]
            eng = get_engine(self.llm, max_batch=self.gen_batch)
            got: dict[int, list[str]] = {}
            for j, _delta, res in run(eng, self.llm.tokenizer, prompts, params, truncate=True):
                if res is not None:
                    got.setdefault(j, []).append(res.text)
            for j, i in enumerate(idx):
                texts[i] = got.get(j, [])
        for i in range(len(reqs)):
            out.append(texts[i])
        return out

    def rolling(self, reqs: Sequence[Request]) -> list[Rolling]:
        from llmkit.score import perplexity

        tok, limit = self.llm.tokenizer, self.llm.model.config.max_seq_len
        out = []
        for r in reqs:
            ids = [prefix_token(tok), *tok.encode(r.context, add_special_tokens=False, allow_special=False)]
            if len(ids) < 2:
                out.append(Rolling(0.0, 0))
                continue
            bs = max(1, self.batch_size // 4)
            if r.window is None and r.stride is None:  # lm-eval's rolling windows over the whole context
                p = perplexity(self.llm.model, ids, rolling=True, batch_size=bs)
            else:
                window = min(r.window or limit, limit)
                stride = r.stride or window - 1
                p = perplexity(self.llm.model, ids, window=window, stride=stride, batch_size=bs)
            out.append(Rolling(p.nll, p.tokens))
        return out

"""/v1/completions: raw prompts (text or token ids, one or many), echo and prompt logprobs (what lm-eval's
`local-completions` model asks for), streamed or not.

`max_tokens: 0` with `echo` scores the prompt only (its logprobs), as vLLM does for evaluation. Prompt text
parses special-token text ("<|im_end|>" -> its id) and gets BOS where the model wants one, as in vLLM;
`parse_special: false` / `add_special_tokens: false` turn either off (llmkit.generate.api.encode_prompt).
The guard (`svc.guard`) screens each prompt's text (400 "content_filter") and each output as it grows
(finish_reason "content_filter", text withheld).
"""

from __future__ import annotations

import time
from typing import Any

from llmkit.generate.api import encode_prompt
from llmkit.generate.guard import screen_prompt
from llmkit.generate.request import Completion, make_processors
from llmkit.generate.sampling import TokenLogprob
from llmkit.serve import protocol as P
from llmkit.serve.scheduler import TokenOut
from llmkit.serve.service import Service, new_id, sse


async def completions(svc: Service, req: P.CompletionRequest):
    svc.check_model(req.model)
    special = {"add_special_tokens": req.add_special_tokens, "parse_special": req.parse_special}
    prompts = await svc.offload(lambda: [encode_prompt(svc.tokenizer, p, **special) for p in req.prompts()])
    guard = getattr(svc, "guard", None)
    if guard is not None:
        for ids in prompts:
            screen_prompt(guard, svc.tokenizer.decode(ids))
    n, max_tokens = req.n, req.max_tokens
    batch = []
    for ids in prompts:  # every prompt is checked before any is queued
        budget = svc.budget(len(ids), max_tokens)
        params = svc.sampling(req, budget, n, req.seed)
        if budget == 0:  # prompt scoring only
            params = [p.replace(echo=True) for p in params]
        batch.append((ids, params, make_processors(svc.tokenizer, n, logit_bias=req.logit_bias)))
    jobs, queue = svc.scheduler.submit_many(batch)  # all or nothing (429: nothing stays queued)
    stops = req.stop_list()
    outs = {j.index: Completion(svc.tokenizer, stops, guard=guard) for j in jobs}
    rid, created = new_id("cmpl"), int(time.time())
    k_lp = req.logprobs

    def prompt_of(idx: int) -> list[int]:
        return prompts[idx // n]

    def logprobs_obj(idx: int, toks: list[TokenLogprob], offset: int, with_prompt: bool) -> dict | None:
        if k_lp is None:
            return None
        tokens, lps, tops, offs = [], [], [], []
        pos = offset
        entries: list[tuple[int, TokenLogprob | None]] = []
        if with_prompt:
            entries += list(zip(prompt_of(idx), outs[idx].prompt_logprobs or []))
        entries += [(o.token_id, o) for o in toks]
        for t, info in entries:
            s = svc.token_str(t)
            tokens.append(s)
            offs.append(pos)
            pos += len(s)
            lps.append(None if info is None else info.logprob)
            tops.append(None if info is None else {svc.token_str(a): lp for a, lp in info.top})
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs}

    def prompt_text(idx: int) -> str:
        return svc.tokenizer.decode(prompt_of(idx)) if req.echo else ""

    def usage() -> dict[str, Any]:
        return svc.usage(sum(map(len, prompts)), sum(len(c.token_ids) for c in outs.values()),
                         sum(c.cached_tokens for i, c in outs.items() if i % n == 0))

    if not req.stream:
        await svc.run(jobs, queue, outs)
        choices = [{"text": prompt_text(idx) + c.text, "index": idx,
                    "logprobs": logprobs_obj(idx, c.shown, 0, req.echo),
                    "finish_reason": c.finish_reason or "length"} for idx, c in sorted(outs.items())]
        return {"id": rid, "object": "text_completion", "created": created, "model": svc.model_name,
                "choices": choices, "usage": usage()}

    async def stream():
        pending: list[str] = []
        offsets = dict.fromkeys(outs, 0)
        started: set[int] = set()

        def chunk(idx: int, text: str, lp: dict | None, finish: str | None) -> str:
            choice = {"text": text, "index": idx, "logprobs": lp, "finish_reason": finish}
            return sse({"id": rid, "object": "text_completion", "created": created, "model": svc.model_name,
                        "choices": [choice]})

        def on_token(idx: int, item: TokenOut, delta: str, shown: list[TokenLogprob]) -> None:
            c = outs[idx]
            if req.echo and idx not in started:  # the prompt goes out first, with its logprobs
                pt = prompt_text(idx)
                pending.append(chunk(idx, pt, logprobs_obj(idx, [], 0, True), None))
                offsets[idx] = len(pt)
            started.add(idx)
            lp = None if item.token_id is None else logprobs_obj(idx, shown, offsets[idx], False)
            offsets[idx] += len(delta)
            if delta or shown or c.finish_reason:
                pending.append(chunk(idx, delta, lp, c.finish_reason))

        async for piece in svc.pump(jobs, queue, outs, on_token, pending):
            yield piece
        if req.stream_options and req.stream_options.include_usage:
            yield sse({"id": rid, "object": "text_completion", "created": created, "model": svc.model_name,
                       "choices": [], "usage": usage()})
        yield "data: [DONE]\n\n"

    return stream()

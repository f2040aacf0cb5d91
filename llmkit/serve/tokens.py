"""/tokenize, /detokenize, /tokenizer_info (vLLM's tokenizer routes). A chat is rendered exactly as chat
completions render it (llmkit.generate.request.render_messages), so `count` is the prompt's true length; a
`prompt` is encoded as /v1/completions encodes text, special-token text such as "<|im_end|>" parsed into its
id unless `parse_special` is false (BOS/EOS only with `add_special_tokens`, off by default here)."""

from __future__ import annotations

from typing import Any

from llmkit.errors import LlmkitError
from llmkit.generate.request import render_messages
from llmkit.serve import protocol as P
from llmkit.serve.chat import chat_messages
from llmkit.serve.service import Service


async def tokenize(svc: Service, req: P.TokenizeRequest) -> dict[str, Any]:
    svc.check_model(req.model)
    if req.messages is not None:
        msgs = chat_messages(req)
        ids = await svc.offload(render_messages, svc.tokenizer, msgs,
                                add_generation_prompt=req.add_generation_prompt)
    else:
        ids = await svc.offload(svc.tokenizer.encode, req.prompt, add_special_tokens=req.add_special_tokens,
                                allow_special=req.parse_special)
    return {"count": len(ids), "max_model_len": svc.context, "tokens": ids}


async def detokenize(svc: Service, req: P.DetokenizeRequest) -> dict[str, Any]:
    svc.check_model(req.model)
    V = svc.tokenizer.vocab_size
    if any(not 0 <= i < V for i in req.tokens):
        raise LlmkitError(f"tokens: ids must be in [0, {V})", code="invalid_tokens", param="tokens")
    return {"prompt": await svc.offload(svc.tokenizer.decode, req.tokens)}


def tokenizer_info(svc: Service) -> dict[str, Any]:
    tok = svc.tokenizer

    def text(i: int | None) -> str | None:
        return None if i is None else tok.id_to_text(i)

    return {"tokenizer_class": type(tok).__name__, "vocab_size": tok.vocab_size,
            "model_max_length": svc.context, "bos_token": text(tok.bos_id), "eos_token": text(tok.eos_id),
            "pad_token": text(tok.pad_id), "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id,
            "pad_token_id": tok.pad_id, "stop_token_ids": sorted(tok.stop_ids),
            "add_bos_token": bool(getattr(tok, "add_bos", False)), "chat_template": tok.chat_template,
            "special_tokens": tok.special_tokens}

"""Verbs `generate`, `chat` and `quantize`: thin wrappers over llmkit.generate and llmkit.quant.

`llmkit generate [MODEL] PROMPT`: with two positionals the first is the model, with one it is the prompt and
the default model is used; PROMPT "-" reads the prompt from stdin.

Sampling flags default to None ("unset"): an explicit flag wins, then the model's generation defaults
(`llm.generation_defaults`), then, for `chat` only, the loop guard of llmkit.generate.defaults
(`interactive_defaults`: repetition penalty 1.1 over the last 64 tokens, 512 tokens at most, as llama.cpp
and Ollama), then this module's fallbacks (temperature 0.7; 256 tokens for generate).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from llmkit.cli.common import (
    add_draft_model_arg,
    add_kv_cache_arg,
    add_speculative_arg,
    attach_draft_model,
    kv_cache_arg,
    speculative_arg,
)
from llmkit.errors import LlmkitError

FALLBACK = {"temperature": 0.7, "max_tokens": 256}  # when neither a flag nor the model says


def _sampling_args(p: argparse.ArgumentParser, interactive: bool) -> None:
    # the "else" values: FALLBACK here, llmkit.generate.defaults.INTERACTIVE for chat
    def unset(otherwise: str) -> str:
        return f"default: the model's; else {otherwise}"

    most = "512" if interactive else str(FALLBACK["max_tokens"])
    p.add_argument("--max-tokens", type=int, default=None, help=f"new tokens at most ({unset(most)})")
    p.add_argument("--temperature", type=float, default=None,
                   help=f"0 = greedy ({unset(str(FALLBACK['temperature']))})")
    p.add_argument("--top-k", type=int, default=None,
                   help=f"keep the k most likely tokens ({unset('0 = off')})")
    p.add_argument("--top-p", type=float, default=None, help=f"nucleus sampling mass ({unset('1 = off')})")
    p.add_argument("--min-p", type=float, default=None, help=f"min-p sampling ({unset('0 = off')})")
    guard = "1.1 over the last 64 tokens, against loops as in llama.cpp" if interactive else "1 = off"
    p.add_argument("--repetition-penalty", type=float, default=None,
                   help=f"penalise tokens seen in the prompt or the answer, CTRL's ({unset(guard)})")
    p.add_argument("--repetition-window", type=int, default=None, metavar="N",
                   help="the repetition penalty counts only the last N tokens of prompt + answer "
                        f"(llama.cpp's repeat_last_n; {unset('64' if interactive else '0 = every token')})")
    p.add_argument("--frequency-penalty", type=float, default=None,
                   help="subtract this times a token's count in the answer (default: 0 = off)")
    p.add_argument("--presence-penalty", type=float, default=None,
                   help="subtract this from tokens already in the answer (default: 0 = off)")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable); never printed")
    p.add_argument("--seed", type=int, default=None, help="sampling seed: same seed, same text")
    p.add_argument("--quantize", choices=("int8", "int4", "none"), default=None,
                   help="weight-only quantization at load (default: a quantized GGUF runs at its own "
                        "precision on CPU, e.g. Q4_1 -> int4; none: floats)")
    p.add_argument("--device", default=None, help="cpu | cuda | auto (default: cuda when available; auto "
                   "also splits layers between GPU and CPU when the GPU is too small)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: float32 on CPU; giving it "
                   "loads a quantized GGUF as floats)")
    p.add_argument("--context", type=int, default=None, metavar="N",
                   help="longest conversation, in tokens, for the memory check at load (default: 4096)")
    p.add_argument("--adapter", default=None, metavar="DIR", help="apply a LoRA adapter (PEFT folder)")
    add_kv_cache_arg(p)
    add_speculative_arg(p)
    add_draft_model_arg(p)


def _explicit(args) -> dict[str, Any]:
    """The sampling flags as given (None = unset), checked before any model is loaded."""
    from llmkit.generate.sampling import SamplingParams

    kw = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
              min_p=args.min_p, repetition_penalty=args.repetition_penalty,
              repetition_window=args.repetition_window, frequency_penalty=args.frequency_penalty,
              presence_penalty=args.presence_penalty, stop=args.stop, seed=args.seed)
    SamplingParams.from_kwargs(**kw)
    return kw


def _params(llm, explicit: dict[str, Any], interactive: bool):
    from llmkit.generate.defaults import interactive_defaults, resolve_params

    model = llm.generation_defaults
    return resolve_params({**FALLBACK, **(interactive_defaults(model) if interactive else model)}, **explicit)


def _load(model: str | None, args):
    import llmkit
    from llmkit.hub import DEFAULT_MODEL

    return llmkit.load(model or DEFAULT_MODEL, device=args.device, dtype=args.dtype, quantize=args.quantize,
                       adapter=getattr(args, "adapter", None), context=args.context)


def cmd_generate(args) -> int:
    if len(args.words) > 2:
        raise LlmkitError("generate takes [MODEL] PROMPT; quote the prompt")
    model, prompt = (args.words if len(args.words) == 2 else (None, args.words[0]))
    if prompt == "-":
        prompt = sys.stdin.read()
    explicit = _explicit(args)
    kv, spec = kv_cache_arg(args), speculative_arg(args)
    llm = _load(model, args)
    attach_draft_model(llm, args)
    s = llm.stream(prompt, params=_params(llm, explicit, interactive=False), kv_dtype=kv, speculative=spec)
    for delta in s:
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if args.stats:
        r = s.result
        t = r.timings
        drafts = (f", drafts taken {t['accepted_draft_tokens']} of {t['draft_tokens']}"
                  if t.get("draft_tokens") else "")
        print(f"[{r.usage['completion_tokens']} tokens, {t['decode_tokens_per_s']:.1f} tok/s "
              f"({t['decode_path']} decode){drafts}, finish: {r.finish_reason}]", file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    from llmkit.generate.api import get_engine
    from llmkit.generate.repl import run_chat

    explicit = _explicit(args)
    kv, spec = kv_cache_arg(args), speculative_arg(args)
    llm = _load(args.model, args)
    attach_draft_model(llm, args)
    if kv is not None or spec is not None:  # the engine every answer then uses (both settings stick)
        get_engine(llm, kv_dtype=kv, tokens=1, speculative=spec)
    return run_chat(llm, _params(llm, explicit, interactive=True), system=args.system)


def cmd_quantize(args) -> int:
    import llmkit
    from llmkit.quant import quantize_model, save_quantized

    llm = llmkit.load(args.model, device="cpu", dtype="float32")
    quantize_model(llm.model, args.mode, group_size=args.group_size)
    out = save_quantized(llm.model, llm.tokenizer, args.to)
    print(f"wrote {args.mode} model to {out} (load it with llmkit.load({str(out)!r}))")
    return 0


def register(sub) -> None:
    p = sub.add_parser("generate", help="complete a prompt",
                       description="Complete a prompt, streaming the text.")
    p.add_argument("words", nargs="+", metavar="[MODEL] PROMPT",
                   help="optional model name/path, then the prompt")
    _sampling_args(p, interactive=False)
    p.add_argument("--stats", action="store_true", help="print tokens and tok/s to stderr")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="terminal chatbot", description="Chat with a model in the terminal "
                       "(/help lists the commands: /reset, /system TEXT, /temp X, /save FILE).")
    p.add_argument("model", nargs="?", default=None, help="model name or path (default: the default model)")
    p.add_argument("--system", default=None, help="system prompt")
    _sampling_args(p, interactive=True)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("quantize", help="save a weight-only quantized copy of a model",
                       description="Quantize every Linear layer (int8 per channel or int4 per group) "
                                   "and save "
                                   "a folder that llmkit.load reads.")
    p.add_argument("model", help="model name or path")
    p.add_argument("--to", required=True, help="output folder")
    p.add_argument("--mode", choices=("int8", "int4"), default="int4")
    p.add_argument("--group-size", type=int, default=32, help="int4 group size (default 32)")
    p.set_defaults(func=cmd_quantize)

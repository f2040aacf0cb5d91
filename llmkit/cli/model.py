"""Model verbs: `llmkit pull`, `inspect`, `export`, `merge` (thin wrappers over hub, info, api and lora)."""

from __future__ import annotations

import argparse
import json
import sys

from llmkit.hub import DEFAULT_MODEL, NAMED_MODELS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pull", help="put a model in the local cache (known name, HF repo id or path)",
                       description="Fetch a model: a known name (see --list), an HF repo id org/name (or "
                                   "org/name/file.gguf; needs huggingface_hub and network), or a local path "
                                   "(used in place). Prints where the model is.")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"default: {DEFAULT_MODEL}")
    p.add_argument("--list", action="store_true", help="list the known model names")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("inspect", help="what a model file holds: config, parameters, dtypes, tokenizer",
                       description="Describe a model without loading its weights: architecture and config, "
                                   "parameter counts by component, bytes per stored dtype, vocabulary, "
                                   "special tokens, chat template, context length, generation defaults "
                                   "(the sampling settings used when a request leaves them unset).")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"name, repo id or path (default: {DEFAULT_MODEL})")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--template-lines", type=int, default=8, help="chat template lines to show (default 8)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("export", help="write a model as an HF folder (config.json, safetensors, tokenizer)",
                       description="Load MODEL (GGUF weights are dequantised) and write an HF folder that "
                                   "transformers.AutoModelForCausalLM and AutoTokenizer load.")
    p.add_argument("model", help="name, repo id or path")
    p.add_argument("--to", choices=["hf"], default="hf", help="output format (hf)")
    p.add_argument("out", metavar="DIR", help="output folder")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("merge", help="fold a LoRA adapter (PEFT folder) into a model; write an HF folder",
                       description="Load MODEL in float32, apply ADAPTER (adapter_config.json + "
                                   "adapter_model.safetensors, as peft writes them), fold W += (alpha / r) B "
                                   "A into each wrapped weight, and write an HF folder transformers loads.")
    p.add_argument("model", help="the base model: name, repo id or path")
    p.add_argument("adapter", help="the adapter folder")
    p.add_argument("--to", dest="out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    p.set_defaults(func=cmd_merge)


def cmd_pull(args: argparse.Namespace) -> int:
    from llmkit.hub import pull

    if args.list:
        for m in NAMED_MODELS.values():
            print(f"{m.name:<28} {m.description}")
        return 0
    print(pull(args.model, quiet=args.quiet))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from llmkit.hub import named_model_at, resolve
    from llmkit.info import format_info, model_info

    path = resolve(args.model)
    info = model_info(path, known=named_model_at(path))
    if args.json:
        json.dump(info, sys.stdout, indent=2)
        print()
    else:
        print(format_info(info, template_lines=args.template_lines))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from llmkit.api import load

    llm = load(args.model, device="cpu", dtype=args.dtype)
    out = llm.save_hf(args.out)
    print(f"wrote {out} ({llm.config.model_type}, {sum(p.numel() for p in llm.model.parameters()):,} params)")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    import torch

    from llmkit.api import load
    from llmkit.lora import merge_lora

    llm = load(args.model, device="cpu", dtype="float32", adapter=args.adapter)
    merged = merge_lora(llm.model)
    if args.dtype != "float32":
        from llmkit.device import resolve_dtype

        llm.model.to(resolve_dtype(args.dtype, torch.device("cpu")))
    out = llm.save_hf(args.out)
    print(f"merged {len(merged)} adapted projections; wrote {out}")
    return 0

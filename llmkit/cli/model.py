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
                                   "(the sampling settings used when a request leaves them unset), and the "
                                   "memory a load needs at float32, bfloat16, int8 and int4 (weights, KV "
                                   "cache, runtime) against what this machine has.")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"name, repo id or path (default: {DEFAULT_MODEL})")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--template-lines", type=int, default=8, help="chat template lines to show (default 8)")
    p.add_argument("--context", type=int, default=None, metavar="N",
                   help="tokens the memory estimate is sized for (default 4096, capped by the model's)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser(
        "export", help="write a model as an HF folder or a GGUF file (llama.cpp, Ollama)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Load MODEL (GGUF weights are dequantised) and write it out.\n"
                    "  --to hf    an HF folder (config.json, safetensors, tokenizer) for transformers\n"
                    "  --to gguf  one GGUF file of --type, with tokenizer, special tokens, chat\n"
                    "             template and generation defaults, that llama.cpp, Ollama and LM\n"
                    "             Studio run (llama, SmolLM2, Mistral, qwen2, qwen3, qwen3_moe, gpt2,\n"
                    "             gemma2, gemma3; norms and biases stay f32)\n"
                    "--to defaults to gguf when OUT ends in .gguf, else hf.",
        epilog="examples:\n"
               "  llmkit export smollm2-135m-instruct smollm2-q8_0.gguf --type q8_0\n"
               "  llmkit export runs/tiny/hf tiny.gguf               # f16\n"
               "  llmkit export model.gguf --to hf model-hf/",
    )
    p.add_argument("model", metavar="MODEL", help="name, repo id or path")
    p.add_argument("--to", choices=["hf", "gguf"], default=None,
                   help="output format (default: gguf if OUT ends in .gguf, else hf)")
    p.add_argument("out", metavar="OUT", help="output folder (hf) or file (gguf)")
    p.add_argument("--dtype", default=None, help="hf: float32 (default), bfloat16 or float16")
    p.add_argument("--type", default=None,
                   help="gguf: f16 (default), bf16, f32, q8_0, q4_0 or q4_1 (q4 files keep the output "
                        "matrix in q8_0)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
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
    info = model_info(path, known=named_model_at(path), context=args.context)
    if args.json:
        json.dump(info, sys.stdout, indent=2)
        print()
    else:
        print(format_info(info, template_lines=args.template_lines))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from llmkit.api import load
    from llmkit.errors import LlmkitError

    to = args.to or ("gguf" if str(args.out).endswith(".gguf") else "hf")
    if to == "hf" and args.type is not None:
        raise LlmkitError("--type sets a GGUF type; with --to hf use --dtype (float32, bfloat16, float16)")
    if to == "gguf" and args.dtype is not None:
        raise LlmkitError("--dtype sets an HF folder's dtype; with --to gguf use --type (f16, q8_0, ...)")
    if to == "hf":
        llm = load(args.model, device="cpu", dtype=args.dtype or "float32")
        out = llm.save_hf(args.out)
        n = sum(p.numel() for p in llm.model.parameters())
        print(f"wrote {out} ({llm.config.model_type}, {n:,} params)")
        return 0
    from llmkit.checkpoint.gguf_write import check_type, save_gguf

    check_type(args.type or "f16")  # before the model loads
    llm = load(args.model, device="cpu", dtype="float32")
    out = save_gguf(llm.model, llm.tokenizer, args.out, type=args.type or "f16",
                    generation_defaults=llm.generation_defaults, progress=not args.quiet)
    n = sum(p.numel() for p in llm.model.parameters())
    print(f"wrote {out} ({llm.config.model_type}, {args.type or 'f16'}, {n:,} params, "
          f"{Path(out).stat().st_size / 2**20:.1f} MiB)")
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

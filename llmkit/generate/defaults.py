"""Generation defaults: the sampling settings a model comes with, and how they meet a request's own values.

    llm.generation_defaults                                   # {"temperature": 0.2, "top_p": 0.9}
    with_defaults(llm.generation_defaults, {"temperature": 0.7, "top_p": None})
                                                              # {"temperature": 0.7, "top_p": 0.9}
    resolve_params(llm.generation_defaults, None, max_tokens=32)   # SamplingParams(temperature=0.2, ...)

Where a model's defaults come from (`model_defaults`), the file's own values first:
- an HF folder: `generation_config.json`, transformers' names mapped onto SamplingParams' (`HF_NAMES`:
  temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens -> max_tokens). An explicit
  `"do_sample": false` means greedy in transformers, so it becomes temperature 0. transformers has no
  repetition window (its penalty covers every token): none is read, and `to_generation_config` drops one;
- a GGUF file: llama.cpp's `general.sampling.*` metadata (`GGUF_KEYS`: temp, top_k, top_p, min_p,
  penalty_repeat, penalty_last_n -> repetition_window; llama.cpp's penalty_last_n -1 (the whole context)
  becomes 0 (every token), its 0 turns the penalties off, so it becomes repetition_penalty 1);
- then, for what the file leaves out, the known-name registry entry the caller passes (`llmkit.hub`'s
  `NamedModel.generation_defaults`): SmolLM2-135M-Instruct's authors recommend temperature 0.2 and top-p 0.9
  on its model card, but neither its generation_config.json nor its GGUF file says so.
A value a file gets wrong (a string, top_p 0, ...) is dropped with a warning: the model still loads.

Notable choices:
- One precedence everywhere: an explicit value (CLI flag, keyword, request field) > the model's default >
  the surface's own fallback (SamplingParams' defaults, e.g. temperature 1.0 as in OpenAI). None = unset.
- `interactive_defaults` is for the interactive surfaces only (`llmkit chat`, the web page): what llama.cpp
  and Ollama do by default, repetition_penalty 1.1 (CTRL's / transformers') over the last 64 tokens of prompt
  + answer (`repetition_window`, llama.cpp's repeat_last_n), and 512 tokens at most, wherever the model's
  defaults say nothing (a model's own repetition_penalty thus gets the 64-token window, as in llama.cpp).
  With the window, the question's own words leave the penalty once the answer is 64 tokens long.
  Measured on SmolLM2-135M-Instruct (system "Réponds en français.", "Qu'est-ce qu'un cache KV ?",
  temperature 0.2, top-p 0.9, 4 samples, seed 7): no guard: 3/4 ran to 512 tokens looping ("La carte de la
  carte..."); frequency_penalty 0.3 (the previous guard): 0/4 reached 512 (14-267 tokens) but phrases came
  back ("une création de l'Aurora de la Ville" x3); repetition_penalty 1.1 over the last 64 tokens: 0/4
  reached 512 (79-236 tokens), no phrase repeated. The OpenAI-style API keeps OpenAI's semantics: no
  penalty unless asked (or the model's defaults say so).
- A `SamplingParams` object passed by a caller counts as explicit in full: its fields cannot say which were
  left unset, so defaults only fill keyword arguments (`resolve_params`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llmkit.errors import LlmkitError
from llmkit.generate.sampling import SamplingParams

log = logging.getLogger("llmkit")

# generation_config.json name -> SamplingParams field
HF_NAMES = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
            "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}
# GGUF metadata key (llama.cpp's gguf-py Keys.General.SAMPLING_*) -> SamplingParams field
GGUF_KEYS = {"general.sampling.temp": "temperature", "general.sampling.top_p": "top_p",
             "general.sampling.top_k": "top_k", "general.sampling.min_p": "min_p",
             "general.sampling.penalty_repeat": "repetition_penalty",
             "general.sampling.penalty_last_n": "repetition_window"}
# the knobs a default can set, in the order `describe` prints them
FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "repetition_window",
          "frequency_penalty", "max_tokens")
# the interactive guard (llmkit chat, the web page), llama.cpp's and Ollama's defaults: a penalty on the
# tokens of the last 64 (repeat_penalty 1.1, repeat_last_n 64) and a bounded answer
INTERACTIVE = {"repetition_penalty": 1.1, "repetition_window": 64, "max_tokens": 512}


def with_defaults(defaults: Mapping[str, Any], explicit: Mapping[str, Any]) -> dict[str, Any]:
    """`defaults` overridden by every non-None value of `explicit` (an explicit value always wins)."""
    return {**defaults, **{k: v for k, v in explicit.items() if v is not None}}


def resolve_params(defaults: Mapping[str, Any], params: SamplingParams | None = None,
                   **explicit: Any) -> SamplingParams:
    """Validated SamplingParams: `params` (explicit in full) with keyword overrides, or the keywords
    (None = unset) over `defaults`, over SamplingParams' own defaults."""
    if params is not None:
        return params.replace(**with_defaults({}, explicit)).validate()
    return SamplingParams.from_kwargs(**with_defaults(defaults, explicit))


def interactive_defaults(defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The model's defaults plus the loop guard of the interactive surfaces where the model says nothing."""
    return {**INTERACTIVE, **defaults}


def model_defaults(path: str | os.PathLike[str], *, known: Any = None,
                   gguf_metadata: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], str]:
    """(defaults, where they came from) for the GGUF file or HF folder at `path`.

    `known`: the hub's NamedModel for this file, if it is one (its `generation_defaults` fill the gaps);
    `gguf_metadata`: the file's metadata when the caller has already read it.
    """
    p = Path(path)
    if p.is_dir():
        own, where = from_generation_config(p / "generation_config.json"), "generation_config.json"
    else:
        if gguf_metadata is None:
            from llmkit.io import read_gguf

            gguf_metadata = read_gguf(p).metadata
        own, where = from_gguf_metadata(gguf_metadata, source=str(p)), "GGUF general.sampling.*"
    sources = [where] if own else []
    registry = dict(getattr(known, "generation_defaults", None) or {})
    if set(registry) - set(own):
        sources.append(f"llmkit's known model {known.name}")
    return {**registry, **own}, " + ".join(sources)


def from_generation_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """SamplingParams defaults from a transformers generation_config.json ({} when there is no file)."""
    from llmkit.io import read_json

    if not Path(path).is_file():
        return {}
    cfg = read_json(path)
    if not isinstance(cfg, dict):
        raise LlmkitError(f"{path}: not a JSON object; fix or delete the file")
    out = {ours: cfg[hf] for hf, ours in HF_NAMES.items() if cfg.get(hf) is not None}
    if cfg.get("do_sample") is False:  # transformers decodes greedily whatever the sampling knobs say
        out["temperature"] = 0.0
    return _checked(out, str(path))


def from_gguf_metadata(metadata: Mapping[str, Any], source: str = "GGUF") -> dict[str, Any]:
    """SamplingParams defaults from llama.cpp's `general.sampling.*` GGUF keys ({} when absent)."""
    out = {}
    for key, ours in GGUF_KEYS.items():
        v = metadata.get(key)
        if isinstance(v, float):  # stored as float32: 0.2, not 0.20000000298
            v = float(f"{v:.6g}")
        if v is not None:
            out[ours] = v
    if out.get("repetition_window") == -1:  # llama.cpp: the whole context
        out["repetition_window"] = 0
    elif out.get("repetition_window") == 0:  # llama.cpp: penalties off
        del out["repetition_window"]
        out["repetition_penalty"] = 1.0
    return _checked(out, source)


def to_generation_config(defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The transformers generation_config.json fields that say `defaults` (the inverse of
    `from_generation_config`): do_sample plus the HF names."""
    hf = {h: defaults[ours] for h, ours in HF_NAMES.items() if ours in defaults}
    if "temperature" in defaults:
        greedy = defaults["temperature"] == 0
        hf["do_sample"] = not greedy
        if greedy:
            del hf["temperature"]  # transformers rejects temperature 0; do_sample false says it
    return hf


def describe(values: Mapping[str, Any]) -> str:
    """One line: "temperature 0.2, top_p 0.9" in FIELDS order (what `llmkit inspect` and chat print)."""
    return ", ".join(f"{k} {values[k]:g}" for k in FIELDS if k in values)


def _checked(values: dict[str, Any], source: str) -> dict[str, Any]:
    """Drop (with a warning) the values SamplingParams rejects, so a bad file never breaks loading."""
    out = {}
    for k, v in values.items():
        try:
            SamplingParams(**{k: v}).validate()
        except (LlmkitError, TypeError) as e:
            log.warning("%s: ignoring generation default %s=%r (%s)", source, k, v, e)
        else:
            out[k] = v
    return out

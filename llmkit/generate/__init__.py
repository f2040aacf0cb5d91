"""Generation: sampling parameters and samplers, stop strings, the batched engine, and generate/chat/stream.

- sampling.py  SamplingParams (+ validate), logits processors, the batched sampler, logprobs
- stop.py      stop strings across token boundaries, UTF-8-safe text deltas (TextStream)
- engine.py    Engine: static KV cache, batched prefill + decode, rows joining/leaving, prefix reuse
- request.py   one request's prompt, logits processors and per-sequence state (Completion): shared by the
               Python API and the server
- constrain.py JSON-schema constrained decoding (a prefix validator + a per-row logits processor)
- tools.py     function calling through the chat template (<tool_call> parsing, forced-call schema)
- guard.py     input / output moderation (keyword / regex rules, a callable), redacted request logs
- defaults.py  a model's generation defaults (generation_config.json, GGUF, known names), the chat loop guard
- timing.py    decode / prefill tok/s of the engine and the memory roofline (`llmkit bench decode`)
- api.py       generate / chat / stream over an Engine; GenerationResult
"""

from llmkit.generate.sampling import Sampler, SamplingParams, TokenLogprob
from llmkit.generate.stop import StopMatcher, TextStream

__all__ = ["SamplingParams", "Sampler", "StopMatcher", "TextStream", "TokenLogprob"]

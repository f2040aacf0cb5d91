"""Generation: sampling parameters and samplers, stop strings, the batched engine, and generate/chat/stream.

- sampling.py  SamplingParams (+ validate), logits processors, the per-sequence sampler, logprobs
- stop.py      stop strings across token boundaries, UTF-8-safe text deltas (TextStream)
- engine.py    Engine: static KV cache, batched prefill + decode, rows joining/leaving, prefix reuse
- api.py       generate / chat / stream over an Engine; GenerationResult
"""

from llmkit.generate.sampling import SamplingParams, SequenceSampler, TokenLogprob
from llmkit.generate.stop import StopMatcher, TextStream

__all__ = ["SamplingParams", "SequenceSampler", "StopMatcher", "TextStream", "TokenLogprob"]

"""Decode/prefill/perplexity benchmark: llmkit (fp32, bf16, int8, int4) vs llama.cpp and HF transformers.

Same as `llmkit bench decode`; see llmkit/generate/bench.py. Example: python bench/decode.py --threads 2
"""

import sys

from llmkit.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "decode", *sys.argv[1:]]))

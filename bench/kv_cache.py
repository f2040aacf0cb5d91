"""KV cache dtypes: French perplexity of the default model through the engine, per cache dtype.

    python bench/kv_cache.py [CONTEXT=1024] [WINDOWS=4]

Every window goes through the engine's prefill in chunks of 128 tokens with echo logprobs, so each chunk's
attention reads the cached K/V of the earlier chunks in the dtype under test (auto = the model's float32,
bf16, fp16, int8 with a scale per token and head). The model is the float32 default model; windows are taken
from the middle of French novels in ../shared/data/corpus/fr-roman19. Prints perplexity, its change against
the float32 cache, bytes per token and the wall time.
"""

import math
import sys
import time
from pathlib import Path

import torch

import llmkit
from llmkit.generate.engine import Engine
from llmkit.generate.sampling import SamplingParams

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    torch.set_num_threads(1)
    ctx = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    llm = llmkit.load(device="cpu", dtype="float32")
    files = sorted((ROOT.parent / "shared" / "data" / "corpus" / "fr-roman19").glob("*.txt"))[::9][:n]
    if not files:
        raise SystemExit("no French novels under ../shared/data/corpus/fr-roman19")
    windows = []
    for f in files:
        text = f.read_text(encoding="utf-8")
        mid = len(text) // 2
        windows.append(llm.tokenizer.encode(text[mid: mid + 20000], add_special_tokens=False)[:ctx])
    params = SamplingParams(echo=True, max_tokens=0, logprobs=0, temperature=0)
    res = {}
    for kv in ["auto", "bf16", "fp16", "int8"]:
        eng = Engine(llm.model, max_batch=1, max_seq_len=ctx + 1, prefill_chunk=128, kv_dtype=kv)
        t0 = time.time()
        nll, count = 0.0, 0
        for ids in windows:
            (out,) = list(eng.generate_ids(ids, params))
            lps = [t.logprob for t in out.prompt_logprobs if t is not None]
            nll, count = nll - sum(lps), count + len(lps)
        res[kv] = math.exp(nll / count)
        print(f"{kv:5s} ppl {res[kv]:.4f} ({100 * (res[kv] / res['auto'] - 1):+.3f} %)  tokens {count}  "
              f"bytes/token {eng.cache.bytes_per_token()}  {time.time() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Encode MB/s on the French corpus with the GPT-2 vocabulary: llmkit vs tiktoken, same run, A/B alternated.

    .venv/bin/python bench/tokenizer_encode.py [--mb 4] [--rounds 5] [--reference] [--hf]

Both sides build their vocabulary from the same local files (../shared/data/tokenizers/gpt2); the input is
the first MB of ../shared/data/corpus/fr-roman19. Prints MB/s for each side (best round; medians too) and the
ratio ours/tiktoken (goal >= 1.0). `--reference` also times the pure-Python reference BPE on a slice;
`--hf` adds Qwen3's tokenizer.json, llmkit vs HF `tokenizers` (single thread, same A/B protocol).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=4.0, help="MB of French text to encode per round")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--reference", action="store_true", help="also time the pure-Python reference BPE")
    ap.add_argument("--hf", action="store_true", help="also Qwen3 tokenizer.json vs HF `tokenizers`")
    args = ap.parse_args()

    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    from llmkit.io import corpus_files, read_text
    from llmkit.tokenizer import Tokenizer

    gpt2 = SHARED / "tokenizers" / "gpt2"
    corpus = SHARED / "corpus" / "fr-roman19"
    if not gpt2.is_dir() or not corpus.is_dir():
        print(f"shared data missing under {SHARED}", file=sys.stderr)
        return 1
    need = int(args.mb * 1e6)
    text = ""
    for f in corpus_files([corpus]):
        text += read_text(f)
        if len(text.encode()) >= need:
            break
    text = text.encode()[:need].decode("utf-8", errors="ignore")
    mb = len(text.encode()) / 1e6

    ours = Tokenizer.load(gpt2)
    ranks = data_gym_to_mergeable_bpe_ranks(str(gpt2 / "vocab.bpe"), str(gpt2 / "encoder.json"))
    ref = tiktoken.Encoding(
        "gpt2-local",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": 50256},
        explicit_n_vocab=50257,
    )
    assert ours.encode(text[:100_000]) == ref.encode_ordinary(text[:100_000])

    speed = ab({"llmkit": ours.encode, "tiktoken": ref.encode_ordinary}, text, args.rounds)
    print(f"encode {mb:.2f} MB of French, GPT-2 vocab, best of {args.rounds} rounds")
    for k, v in speed.items():
        print(f"  {k:9s} {v:7.2f} MB/s")
    print(f"  ratio llmkit/tiktoken = {speed['llmkit'] / speed['tiktoken']:.3f}  (goal >= 1.0)")
    if args.hf:
        import os

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from tokenizers import Tokenizer as HFTokenizer

        qwen = SHARED / "tokenizers" / "qwen3" / "tokenizer.json"
        ours_q, hf_q = Tokenizer.load(qwen), HFTokenizer.from_file(str(qwen))
        paras = [p for p in text.split("\n") if p]  # HF is slow on one huge string: compare line by line

        def each(f):
            return lambda _text: [f(p) for p in paras]

        hf_encode = each(lambda t: hf_q.encode(t, add_special_tokens=False))
        speed = ab({"llmkit": each(ours_q.encode), "hf": hf_encode}, text, args.rounds)
        print(f"  Qwen3 tokenizer.json, line by line: llmkit {speed['llmkit']:.2f} MB/s, "
              f"HF tokenizers {speed['hf']:.2f} MB/s, ratio {speed['llmkit'] / speed['hf']:.2f}")
    if args.reference:
        sl = text[:200_000]
        ours_py = Tokenizer.load(gpt2)
        t0 = time.perf_counter()
        ours_py.encode_reference(sl)
        dt = time.perf_counter() - t0
        print(
            f"  python reference BPE {len(sl.encode()) / 1e6 / dt:7.2f} MB/s "
            f"on {len(sl.encode()) / 1e6:.1f} MB"
        )
    return 0


def ab(sides: dict, text: str, rounds: int) -> dict[str, float]:
    """MB/s per side from the fastest round (interference only ever slows a round down), alternating the
    order A B, B A, ... so both sides see the same machine conditions."""
    mb = len(text.encode()) / 1e6
    times: dict[str, list[float]] = {k: [] for k in sides}
    for f in sides.values():
        f(text[:10_000])  # warm up
    for r in range(rounds):
        for name in list(sides) if r % 2 == 0 else list(sides)[::-1]:
            t0 = time.perf_counter()
            sides[name](text)
            times[name].append(time.perf_counter() - t0)
    medians = {k: mb / statistics.median(v) for k, v in times.items()}
    print("  (median MB/s: " + ", ".join(f"{k} {v:.2f}" for k, v in medians.items()) + ")")
    return {k: mb / min(v) for k, v in times.items()}


if __name__ == "__main__":
    sys.exit(main())

"""Bench: train byte-level BPE on N MB of French novels to a V-token vocabulary, ours vs HF `tokenizers`.

Ours = `llmkit.tokenizer.train.train_bpe` (fast path: HF BpeTrainer under our API + conversion into our
Tokenizer, which also builds its tiktoken encoder). Peer = HF `tokenizers` BpeTrainer alone with the same
pre-tokenizer (our GPT-4 regex as Split + ByteLevel). Runs alternate (peer, ours, peer, ours, ...) so load
on the machine hits both; prints each time, the medians and ratio ours / peer (goal <= 1.5).

    .venv/bin/python bench/tokenizer_train.py                  # 20 MB -> 32k, 2 rounds
    .venv/bin/python bench/tokenizer_train.py --mb 2 --vocab 8000
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from llmkit.io import corpus_files, read_text

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpus" / "fr-roman19"


def load_text(mb: float) -> list[str]:
    budget, texts = int(mb * 1e6), []
    for f in corpus_files([CORPUS]):
        texts.append(read_text(f)[:budget])
        budget -= len(texts[-1].encode("utf-8"))
        if budget <= 0:
            break
    return texts


def hf_train(texts: list[str], vocab: int, pattern: str) -> int:
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok.get_vocab_size()


def ours_train(texts: list[str], vocab: int) -> int:
    from llmkit.tokenizer.train import train_bpe

    return train_bpe(texts, vocab, pattern="gpt4", progress=False).vocab_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=20.0)
    ap.add_argument("--vocab", type=int, default=32_000)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    if not CORPUS.is_dir():
        raise SystemExit(f"corpus not found: {CORPUS}")
    from llmkit.tokenizer.pretokenize import NAMED_PATTERNS

    texts = load_text(args.mb)
    size = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    print(f"corpus: {size:.1f} MB of {CORPUS.name} ({len(texts)} files) -> vocab {args.vocab}")
    times: dict[str, list[float]] = {"hf": [], "ours": []}
    for r in range(args.rounds):
        for name, fn in (("hf", lambda: hf_train(texts, args.vocab, NAMED_PATTERNS["gpt4"])),
                         ("ours", lambda: ours_train(texts, args.vocab))):
            t0 = time.perf_counter()
            n = fn()
            times[name].append(time.perf_counter() - t0)
            print(f"round {r}: {name:>4} {times[name][-1]:7.2f} s (vocab {n})")
    hf, ours = statistics.median(times["hf"]), statistics.median(times["ours"])
    print(f"median: hf {hf:.2f} s, ours {ours:.2f} s, ratio ours/hf = {ours / hf:.2f} (goal <= 1.5)")


if __name__ == "__main__":
    main()

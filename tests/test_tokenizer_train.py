"""BPE training: the course's worked example, reference loop == HF BpeTrainer, HF loads our output, errors."""

from __future__ import annotations

from collections import Counter

import pytest
from conftest import shared_path

from llmkit.cli import main
from llmkit.errors import LlmkitError
from llmkit.tokenizer.pretokenize import NAMED_PATTERNS
from llmkit.tokenizer.train import (
    bpe_merges_fast,
    bpe_merges_reference,
    chunk_counts,
    load_corpus,
    replay_trace,
    split_holdout,
    train_bpe,
)

ADVERSARIAL = ["Hello world", "l'été dernier, à Paris… 1234567 fois", "😀👍🏽 emoji", "日本語のテキスト",
               "e\u0301 combining", "   many    spaces\n\n\n\ttabs  ", "x" * 300, "<|endoftext|> as text"]


@pytest.fixture(scope="module")
def french() -> str:
    d = shared_path("corpus/fr-nouvelles19")
    return next(iter(sorted(d.glob("*.txt")))).read_text(encoding="utf-8")[:30_000]


def test_worked_example_by_hand():
    # "aaabdaaabac": (a,a) occurs 4 times (overlaps count); then (a,b) and (aa,a) tie at 2 -> (a,b) is first
    # in HF order (a byte token before a merged one); then [aa, ab] occurs twice.
    merges, steps = bpe_merges_reference(Counter({b"aaabdaaabac": 1}), 3, trace=3)
    assert merges == [(b"a", b"a"), (b"a", b"b"), (b"aa", b"ab")]
    assert [(s.count, s.new_id) for s in steps] == [(4, 256), (2, 257), (2, 258)]
    assert bpe_merges_fast(["aaabdaaabac"], NAMED_PATTERNS["gpt4"], 3) == merges


@pytest.mark.parametrize("pattern", ["gpt4", "gpt2"])
def test_reference_loop_equals_hf_trainer(french, pattern):
    # 200 merges on real French text include many ties: both paths must pick the same pair every time
    counts = chunk_counts([french], NAMED_PATTERNS[pattern])
    ref, steps = bpe_merges_reference(counts, 200, trace=10)
    assert ref == bpe_merges_fast([french], NAMED_PATTERNS[pattern], 200)
    assert replay_trace(counts, ref, 10) == steps


def test_trained_tokenizer_loads_in_hf_with_identical_ids(french, tmp_path):
    from tokenizers import Tokenizer as HFTokenizer

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = train_bpe([french], 700, special_tokens=specials, trace=3, progress=False)
    assert tok.vocab_size == 700
    assert [tok.special_tokens[s] for s in specials] == [697, 698, 699]
    assert len(tok.train_trace) == 3 and tok.train_trace[0].count > tok.train_trace[2].count > 0
    tok.save(tmp_path)
    hf = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in [french[:5000], *ADVERSARIAL[:-1]]:
        ids = tok.encode(text)
        assert hf.encode(text, add_special_tokens=False).ids == ids
        assert tok.decode(ids) == text
    assert [hf.token_to_id(s) for s in specials] == [697, 698, 699]
    assert tok.decode(tok.encode(ADVERSARIAL[-1])) == ADVERSARIAL[-1]
    assert 697 not in tok.encode(ADVERSARIAL[-1])  # special text in plain text stays text


def test_errors(tmp_path):
    with pytest.raises(LlmkitError, match="too small"):
        train_bpe(["abc"], 257, special_tokens=["<a>", "<b>"])
    with pytest.raises(LlmkitError, match=r"only \d+ merges were possible"):
        train_bpe(["abab abab"], 300, progress=False)
    with pytest.raises(LlmkitError, match="empty"):
        train_bpe([""], 300)
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01\x02binary")
    with pytest.raises(LlmkitError, match="binary"):
        train_bpe(tmp_path / "bin.txt", 300)
    (tmp_path / "latin1.txt").write_bytes("été".encode("latin-1"))
    with pytest.raises(LlmkitError, match="not UTF-8"):
        train_bpe(tmp_path / "latin1.txt", 300)
    with pytest.raises(LlmkitError, match="not found"):
        train_bpe(tmp_path / "missing.txt", 300)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(LlmkitError, match="no \\*.txt"):
        train_bpe(tmp_path / "empty_dir", 300)
    with pytest.raises(LlmkitError, match="pattern"):
        train_bpe(["abc"], 300, pattern="(unclosed")


def test_corpus_dir_and_holdout(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.txt").write_text("one\ntwo\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("three\n" * 10, encoding="utf-8")
    (tmp_path / "skip.bin").write_bytes(b"\x00")
    texts = load_corpus(tmp_path)
    assert texts == ["one\ntwo\n", "three\n" * 10]
    train, held = split_holdout(texts, 0.2)
    assert "".join(train) + held == "".join(texts)
    assert held.startswith("three") and 0 < len(held) <= 0.2 * 68 + 6


def test_cli_tokenizer_train(french, tmp_path, capsys):
    from tokenizers import Tokenizer as HFTokenizer

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "fr.txt").write_text(french, encoding="utf-8")
    out = tmp_path / "tok"
    rc = main(["tokenizer-train", str(corpus), "--vocab-size", "400", "--out", str(out), "--trace", "3",
               "--special", "<|endoftext|>", "--reference"])
    printed = capsys.readouterr().out
    assert rc == 0
    assert printed.count("merge ") == 3 and "held-out compression" in printed
    assert HFTokenizer.from_file(str(out / "tokenizer.json")).get_vocab_size() == 400
    assert (out / "tokenizer_config.json").is_file()
    assert main(["tokenizer-train", str(tmp_path / "nope"), "--vocab-size", "600", "--out", str(out)]) == 1
    assert "llmkit: error: corpus path not found" in capsys.readouterr().err


def test_docstring_examples():
    import doctest

    import llmkit.tokenizer.train as train

    assert doctest.testmod(train).failed == 0

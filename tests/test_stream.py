"""StreamDecoder: only whole UTF-8 characters per push; pushes + flush == decode (GPT-2, SPM, SmolLM2)."""

from __future__ import annotations

import random

import pytest
from conftest import shared_path

from llmkit.tokenizer import StreamDecoder, Tokenizer

TEXTS = ["Hello 😀👍🏽 world", "日本語のテキスト、l'été à Paris", "e\u0301\u0301 combining",
         "  spaces\n\n\ttab"]


@pytest.fixture(scope="module")
def gpt2() -> Tokenizer:
    return Tokenizer.load(shared_path("tokenizers/gpt2"))


def stream(tok: Tokenizer, ids: list[int], **kw) -> list[str]:
    dec = StreamDecoder(tok, **kw)
    return [dec.push(i) for i in ids] + [dec.flush()]


def test_emoji_split_across_tokens_is_held_back(gpt2):
    ids = gpt2.encode("😀")
    assert len(ids) > 1  # GPT-2 spells this emoji with several byte tokens
    parts = stream(gpt2, ids)
    assert parts[:-2] == [""] * (len(ids) - 1) and parts[-2] == "😀" and parts[-1] == ""


@pytest.mark.parametrize("text", TEXTS)
def test_pushes_equal_decode_gpt2(gpt2, text):
    ids = gpt2.encode(text)
    parts = stream(gpt2, ids)
    assert "".join(parts) == gpt2.decode(ids) == text
    assert all("\ufffd" not in p for p in parts)


def test_invalid_bytes_match_decode(gpt2):
    # random ids make invalid UTF-8 (stray continuation bytes, cut characters): same U+FFFD as decode
    rng = random.Random(0)
    byte_ids = [gpt2.encode(chr(c))[0] for c in (0xE9, 0x1F600)]  # multi-byte pieces
    for _ in range(200):
        ids = [rng.randrange(gpt2.vocab_size - 1) for _ in range(rng.randrange(1, 12))]
        ids.insert(rng.randrange(len(ids) + 1), rng.choice(byte_ids))
        assert "".join(stream(gpt2, ids)) == gpt2.decode(ids)
    cut = gpt2.encode("😀")[:-1]
    assert stream(gpt2, cut)[-1] == "\ufffd" == gpt2.decode(cut)


def test_skip_special_tokens(gpt2):
    eot = gpt2.special_tokens["<|endoftext|>"]
    ids = [*gpt2.encode("a"), eot, *gpt2.encode("b")]
    assert "".join(stream(gpt2, ids)) == gpt2.decode(ids) == "a<|endoftext|>b"
    assert "".join(stream(gpt2, ids, skip_special_tokens=True)) == gpt2.decode(ids, skip_special_tokens=True)


def test_sentencepiece_leading_space_like_decode():
    tok = Tokenizer.load(shared_path("tokenizers/llama.cpp-vocab/ggml-vocab-llama-spm.gguf"))
    for text in TEXTS + [" leading space", "Bonjour"]:
        ids = tok.encode(text)
        assert "".join(stream(tok, ids)) == tok.decode(ids)
        if tok.bos_id is not None:
            with_bos = [tok.bos_id, *ids]
            assert "".join(stream(tok, with_bos)) == tok.decode(with_bos)


@pytest.mark.slow
def test_smollm2_gguf_stream(smollm2_gguf):
    tok = Tokenizer.load(smollm2_gguf)
    text = shared_path("corpus/fr-nouvelles19").glob("*.txt").__next__().read_text(encoding="utf-8")[:3000]
    for t in [text + " 😀👍🏽 日本語", *TEXTS]:
        ids = tok.encode(t)
        parts = stream(tok, ids)
        assert "".join(parts) == tok.decode(ids) == t
        assert all("\ufffd" not in p for p in parts)

"""Exact ids on real vocabularies against independent references (slow: real data from ../shared).

- llama.cpp's own reference tokenizations (.inp/.out next to the vocab-only GGUF files)
- GPT-2 encoder.json + vocab.bpe == tiktoken built from the same files, on >= 1 MB of French
- Qwen3 tokenizer.json == HF `tokenizers`, on the same French text
- SmolLM2 GGUF == transformers loading that GGUF, on French paragraphs
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import shared_path
from test_tokenizer_core import ADVERSARIAL

from llmkit.tokenizer import Tokenizer

pytestmark = pytest.mark.slow
VOCABS = ["gpt-2", "llama-bpe", "qwen2", "llama-spm"]


def llamacpp_cases(name: str) -> list[tuple[str, list[int]]]:
    """.inp: strings separated by '\\n__ggml_vocab_test__\\n' (the file ends with one, so the last split is
    empty); .out: one line of ids per string. Read without newline translation ('\\r' cases matter)."""
    d = shared_path("tokenizers/llama.cpp-vocab")
    inp = (d / f"ggml-vocab-{name}.gguf.inp").read_bytes().decode("utf-8").split("\n__ggml_vocab_test__\n")
    out = (d / f"ggml-vocab-{name}.gguf.out").read_bytes().decode("utf-8").split("\n")
    assert inp[-1] == "" and out[-1] == "" and len(inp) == len(out)
    return [(s, [int(x) for x in line.split()]) for s, line in zip(inp[:-1], out[:-1])]


def french_text(n_bytes: int) -> str:
    d = shared_path("corpus/fr-roman19")
    parts, size = [], 0
    for f in sorted(d.glob("*.txt")):
        t = f.read_text(encoding="utf-8")
        parts.append(t)
        size += len(t.encode())
        if size >= n_bytes:
            break
    text = "".join(parts)
    return text[: len(text.encode()[:n_bytes].decode("utf-8", errors="ignore"))]


def chunks(text: str, n: int = 4000) -> list[str]:
    """Split on paragraph-ish boundaries so every piece is a realistic input (long, with newlines)."""
    lines, out, cur = text.split("\n"), [], []
    for ln in lines:
        cur.append(ln)
        if sum(map(len, cur)) > n:
            out.append("\n".join(cur))
            cur = []
    out.append("\n".join(cur))
    return out


@pytest.fixture(scope="module")
def vocab():
    """name -> Tokenizer, loaded once per module and released after it (150k-token vocabularies are big)."""
    loaded: dict[str, Tokenizer] = {}

    def get(name: str) -> Tokenizer:
        if name not in loaded:
            loaded[name] = Tokenizer.load(shared_path(f"tokenizers/llama.cpp-vocab/ggml-vocab-{name}.gguf"))
        return loaded[name]

    yield get
    loaded.clear()


@pytest.mark.parametrize("name", VOCABS)
def test_llamacpp_reference_cases(name, vocab):
    tok = vocab(name)
    cases = llamacpp_cases(name)
    assert len(cases) >= 40
    for text, expected in cases:
        assert tok.encode(text) == expected, repr(text)
        assert tok.encode_reference(text) == expected, repr(text)  # the readable Python path as well


@pytest.mark.parametrize("name", VOCABS)
def test_llamacpp_vocab_round_trip(name, vocab):
    tok = vocab(name)
    for text, _ in llamacpp_cases(name):
        assert tok.decode(tok.encode(text)) == text, repr(text)
    for text in ADVERSARIAL:
        assert tok.decode(tok.encode(text)) == text, repr(text)


@pytest.mark.parametrize("name", ["llama-spm", "qwen2"])
def test_saved_gguf_vocab_loads_in_hf_with_identical_ids(name, tmp_path, vocab):
    """save() of GGUF vocabularies: SentencePiece (scores -> HF BPE with byte fallback) and byte-level BPE."""
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import AutoTokenizer

    tok = vocab(name)
    tok.save(tmp_path)
    hf = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text, expected in llamacpp_cases(name):
        assert hf.encode(text, add_special_tokens=False).ids == expected, repr(text)
    auto = AutoTokenizer.from_pretrained(str(tmp_path))
    assert auto.encode("Hello world") == tok.encode("Hello world", add_special_tokens=True)
    again = Tokenizer.load(tmp_path)  # and our own tokenizer.json reader gives the llama.cpp ids back
    for text, expected in llamacpp_cases(name):
        assert again.encode(text) == expected, repr(text)


def test_gpt2_files_equal_tiktoken_on_french():
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    d = shared_path("tokenizers/gpt2")
    ranks = data_gym_to_mergeable_bpe_ranks(str(d / "vocab.bpe"), str(d / "encoder.json"))
    ref = tiktoken.Encoding(
        "gpt2-local",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": 50256},
        explicit_n_vocab=50257,
    )
    tok = Tokenizer.load(d)
    text = french_text(1_100_000)
    assert len(text.encode()) >= 1_000_000
    assert tok.encode(text) == ref.encode_ordinary(text)
    sample = text[:60_000]  # the pure-Python reference BPE agrees too (cached per word, so this stays quick)
    assert tok.encode_reference(sample) == ref.encode_ordinary(sample)


def test_qwen3_tokenizer_json_equals_hf_tokenizers():
    from tokenizers import Tokenizer as HFTokenizer

    path = shared_path("tokenizers/qwen3/tokenizer.json")
    hf = HFTokenizer.from_file(str(path))
    tok = Tokenizer.load(path)
    assert tok.vocab_size == hf.get_vocab_size()
    text = french_text(1_000_000)
    for piece in chunks(text, 20_000):
        assert tok.encode(piece) == hf.encode(piece, add_special_tokens=False).ids
    for t in ADVERSARIAL:
        t = t.replace("<|endoftext|>", "").replace("<|im_start|>", "")  # HF always parses its specials
        assert tok.encode(t) == hf.encode(t, add_special_tokens=False).ids, repr(t)
    # Qwen's non-special added tokens (<think>) are matched like HF does; control tokens only when allowed
    assert tok.encode("<think>") == hf.encode("<think>", add_special_tokens=False).ids
    assert tok.encode("<|im_start|>", allow_special=True) == hf.encode("<|im_start|>").ids
    assert len(tok.encode("<|im_start|>")) > 1
    assert tok.token_to_id("<|im_end|>") in tok.stop_ids
    assert tok.chat_template and "<|im_start|>" in tok.chat_template


def test_smollm2_gguf_equals_transformers(smollm2_gguf: Path):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    tok = Tokenizer.load(smollm2_gguf)
    assert tok.vocab_size == len(hf)
    paragraphs = [p for p in chunks(french_text(300_000), 1500) if p.strip()]
    assert len(paragraphs) > 100
    assert tok.pre.single_pattern is not None  # digits-then-GPT-2 runs as one regex inside tiktoken
    for p in paragraphs:
        assert tok.encode(p) == hf.encode(p, add_special_tokens=False), p[:80]
    assert tok.encode_reference(paragraphs[0]) == tok.encode(paragraphs[0])
    text = "Salut <|im_start|>user\n<|endoftext|> 2024"  # specials not parsed: plain text for both
    assert tok.encode(text) == hf(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert tok.token_to_id("<|im_end|>") in tok.stop_ids and tok.eos_id == 2
    assert tok.chat_template and "<|im_start|>" in tok.chat_template


def test_load_by_model_name_and_directory(smollm2_gguf: Path):
    a = Tokenizer.load(smollm2_gguf)
    b = Tokenizer.load(smollm2_gguf.parent)
    assert a.encode("Bonjour le monde") == b.encode("Bonjour le monde")

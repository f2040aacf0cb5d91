"""Tokenizer core: reference BPE, from_bpe, special tokens, round trips, save -> HF, pre-tokenizers, errors.

Fast tests on small inputs; references are hand-computed examples, tiktoken and HF `tokenizers`.
"""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
from conftest import ROOT, shared_path

from llmkit.errors import LlmkitError
from llmkit.tokenizer import Tokenizer
from llmkit.tokenizer.core import bpe_merge, bytelevel, unbytelevel, unbytelevel_many
from llmkit.tokenizer.pretokenize import (
    FAMILIES,
    FAST_EQUIVALENT,
    GPT2_PATTERN,
    SINGLE_EQUIVALENT,
    PreTokenizer,
)

ADVERSARIAL = [
    "",
    " ",
    "  ",
    "\n",
    "\n\n\n",
    "\t\t x",
    "Hello world",
    " Hello  world ",
    "héllo wörld",
    "naïve café",
    "e\u0301e\u0301 (combining marks) a\u0308\u0323",
    "日本語のテキスト、中文文本。한국어",
    "🤗🤗 emoji 👩‍👩‍👧‍👦 flags 🇫🇷",
    " " * 300 + "x",
    "\n" * 50 + "  \t\n  end",
    "it's we'Ve THEY'LL don't",
    "1234567890 3.14159 1,000,000",
    "<|endoftext|> <|im_start|>user\n[INST] hi [/INST]",
    "\u00a0nbsp\u2028line\u2029para\u200bzw",
    "\x00\x01\x1f\x7f",
    "a" * 2000,
    "🤗" * 200,
    "x\r\ny\rz",
    "'''\"\"\"```",
    "ǅungla ǈ ǋ ŉ",
    "\ufeffBOM",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟙𝟚𝟛",
]


def random_text(rng: random.Random, n: int) -> str:
    """Seeded random strings mixing ASCII, Latin-1, CJK, emoji, combining marks and whitespace."""
    pools = [
        "abcdefghij XYZ",
        "àéîõüçÀÉ",
        "日本語中文한국",
        "🤗👍🏽🇫🇷",
        "\u0301\u0308\u0323",
        " \t\n\r\u00a0\u3000",
        "0123456789",
        "!?.,;:'\"()[]{}<>|/\\-_",
    ]
    return "".join(rng.choice(rng.choice(pools)) for _ in range(n))


@pytest.fixture(scope="module")
def gpt2() -> Tokenizer:
    return Tokenizer.load(shared_path("tokenizers/gpt2"))


@pytest.fixture(scope="module")
def gpt2_tiktoken():
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    d = shared_path("tokenizers/gpt2")
    ranks = data_gym_to_mergeable_bpe_ranks(str(d / "vocab.bpe"), str(d / "encoder.json"))
    return tiktoken.Encoding(
        "gpt2-local",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": 50256},
        explicit_n_vocab=50257,
    )


# ---------------------------------------------------------------------------------------------- reference BPE
def test_bpe_merge_hand_example():
    ranks = {(b"a", b"a"): 0, (b"aa", b"b"): 1, (b"a", b"b"): 2}
    assert bpe_merge(b"aaab", ranks) == [b"aa", b"ab"]  # (a,a) leftmost first, then (a,b): 'aa' 'ab'
    assert bpe_merge(b"aaaa", ranks) == [b"aa", b"aa"]
    assert bpe_merge(b"", ranks) == []
    assert bpe_merge(b"xyz", ranks) == [b"x", b"y", b"z"]


def test_bytelevel_spelling_round_trip():
    assert bytelevel(b" hello\n") == "Ġhelloĉ".replace("ĉ", "Ċ")
    assert all(unbytelevel(bytelevel(bytes([b]))) == bytes([b]) for b in range(256))
    tokens = [bytelevel(bytes([b])) for b in range(256)] + ["ĠĊ", "a b", "<|x|>", ""]
    assert unbytelevel_many(tokens) == [unbytelevel(t) for t in tokens]
    assert unbytelevel_many(tokens)[256:] == [b" \n", None, b"<|x|>", b""]


def test_from_bpe_ids_and_specials():
    merges = [(b"h", b"e"), (b"l", b"l"), (b"he", b"ll"), (b"hell", b"o")]
    tok = Tokenizer.from_bpe(merges, pattern="gpt2", special_tokens={"<|endoftext|>": 260})
    assert tok.vocab_size == 261
    assert tok.encode("hello") == [259]
    assert tok.encode("hellx") == [258, ord("x")]
    assert tok.encode(" hello") == [ord(" "), 259]  # no merge with the space
    assert tok.encode("<|endoftext|>") == list(b"<|endoftext|>")
    assert tok.encode("a<|endoftext|>", allow_special=True) == [ord("a"), 260]
    assert tok.id_to_bytes(258) == b"hell" and tok.id_to_bytes(260) == b"<|endoftext|>"
    assert 260 in tok.stop_ids and tok.eos_id == 260
    with pytest.raises(LlmkitError):
        Tokenizer.from_bpe(merges, pattern="gpt2", special_tokens={"<x>": 5})


def test_fast_path_refused_when_tiktoken_rule_differs():
    # (b,c) merges first, so 'ab'+'c' never meet under the merge-list rule; tiktoken would merge a+bc -> abc
    merges = [(b"b", b"c"), (b"a", b"b"), (b"ab", b"c")]
    tok = Tokenizer.from_bpe(merges, pattern="gpt2")
    assert tok._tiktoken is None  # the self-check turned the fast path off
    assert tok.encode("abc") == [97, 256] == tok.encode_reference("abc")


def test_special_tokens_stay_text_by_default(gpt2):
    text = "<|endoftext|> and <|im_start|>user [INST]"
    ids = gpt2.encode(text)
    assert 50256 not in ids and gpt2.decode(ids) == text
    assert gpt2.encode("<|endoftext|>", allow_special=True) == [50256]
    assert gpt2.decode([50256, 15496], skip_special_tokens=True) == "Hello"
    assert gpt2.encode_ordinary(text) == ids


def test_gpt2_matches_tiktoken_on_adversarial(gpt2, gpt2_tiktoken):
    rng = random.Random(0)
    texts = ADVERSARIAL + [random_text(rng, rng.randint(1, 200)) for _ in range(300)]
    for t in texts:
        assert gpt2.encode(t) == gpt2_tiktoken.encode_ordinary(t), repr(t)


def test_reference_path_equals_fast_path(gpt2):
    rng = random.Random(1)
    for t in ADVERSARIAL + [random_text(rng, rng.randint(1, 100)) for _ in range(200)]:
        assert gpt2.encode_reference(t) == gpt2.encode(t), repr(t)


def test_lone_surrogates_become_replacement_char(gpt2):
    split_in_python = Tokenizer.from_bpe([(b"a", b"b")], pattern=r"\p{L}+|[^\p{L}]+")
    for tok in (gpt2, split_in_python):
        assert tok.encode("a\ud800b") == tok.encode("a\ufffdb")


def test_round_trip_and_invalid_utf8(gpt2):
    rng = random.Random(2)
    for t in ADVERSARIAL + [random_text(rng, rng.randint(0, 300)) for _ in range(300)]:
        assert gpt2.decode(gpt2.encode(t)) == t
    # single tokens that are partial UTF-8 sequences decode to U+FFFD, and their bytes are exact
    byte_id = {gpt2.id_to_bytes(i): i for i in range(256)}
    ids = [
        byte_id[b"\xe6"],
        byte_id[b"\x97"],
        byte_id[b"x"],
        byte_id[b"\xff"],
    ]  # truncated '日', then 'x', 0xff
    assert gpt2.decode_bytes(ids) == b"\xe6\x97x\xff"
    assert gpt2.decode(ids) == "\ufffdx\ufffd"
    assert [gpt2.id_to_piece(i) for i in gpt2.encode(" 🤗")] == [" <0xF0><0x9F>", "<0xA4>", "<0x97>"]
    assert gpt2.decode_bytes(gpt2.encode("日")) == "日".encode()
    with pytest.raises(LlmkitError):
        gpt2.decode([10**9])


def test_out_of_range_ids_are_clear_errors(gpt2):
    """A negative id must not pick a token from the end of the vocabulary (Python's vocab[-1])."""
    hello = gpt2.encode("Hello")
    for bad in ([-1], [*hello, -50257], [*hello, 50257], (i for i in [*hello, -1])):
        with pytest.raises(LlmkitError, match=r"id -?\d+ is outside the vocabulary \(0\.\.50256\)") as e:
            gpt2.decode_bytes(bad)
        assert "\n" not in str(e.value)
    with pytest.raises(LlmkitError, match="token id -1 is outside"):
        gpt2.decode([*hello, -1])
    with pytest.raises(LlmkitError, match="token id -1 is outside"):
        gpt2.id_to_bytes(-1)
    with pytest.raises(LlmkitError, match="token id 'x' is outside"):
        gpt2.decode_bytes([*hello, "x"])
    import numpy as np

    assert gpt2.decode(np.array(hello)) == "Hello"  # numpy integers are ids too


def test_id_to_text(gpt2):
    ids = gpt2.encode(" hello 🤗")  # ' hello', ' \xf0\x9f', '\xa4', '\x97' (see the pieces above)
    assert [gpt2.id_to_text(i) for i in ids] == [" hello", " \ufffd", "\ufffd", "\ufffd"]
    assert gpt2.id_to_text(50256) == "<|endoftext|>"


def test_tokenizer_never_imports_the_layers_above():
    """The tokenizer package resolves paths only: no llmkit.hub (model names), api, cli, serve, ..."""
    import ast
    import pathlib

    import llmkit.tokenizer

    above = ("llmkit.hub", "llmkit.api", "llmkit.cli", "llmkit.serve", "llmkit.generate", "llmkit.train",
             "llmkit.checkpoint", "llmkit.model")
    for f in pathlib.Path(llmkit.tokenizer.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            assert not [n for n in names if n.startswith(above)], (f.name, names)
    with pytest.raises(LlmkitError, match=r"llmkit\.load\(name\)\.tokenizer"):
        Tokenizer.load("smollm2-135m-instruct")


def test_cli_resolves_a_model_name(smollm2_gguf):
    """`llmkit tokenize --tokenizer NAME` still works: the CLI resolves the name through llmkit.hub."""
    r = _cli("--tokenizer", "smollm2-135m-instruct", "--format", "ids", "strawberry")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(i) for i in Tokenizer.load(smollm2_gguf).encode("strawberry")]


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4"])
def test_save_loads_in_hf_with_identical_ids(tmp_path, pattern):
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    rng = random.Random(3)
    corpus = " ".join(random_text(rng, 40) for _ in range(50)) + " hello hello world worlds it's 2024"
    # merges learnt greedily on a toy corpus so the vocabulary is realistic (pairs built from earlier tokens)
    merges = _toy_merges(corpus.encode(), 120)
    tok = Tokenizer.from_bpe(
        merges,
        pattern=pattern,
        special_tokens={"<|endoftext|>": 256 + len(merges)},
        chat_template="{{ messages[0]['content'] }}",
    )
    tok.save(tmp_path)
    hf = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    fast = PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    auto = AutoTokenizer.from_pretrained(str(tmp_path))
    for t in ADVERSARIAL[:20] + [corpus[:500], random_text(rng, 300)]:
        t = t.replace("<|endoftext|>", "")  # HF always parses specials; ours only with allow_special
        ids = tok.encode(t)
        assert hf.encode(t, add_special_tokens=False).ids == ids, repr(t)
        assert fast.encode(t, add_special_tokens=False) == ids
        assert auto.encode(t, add_special_tokens=False) == ids
        assert hf.decode(ids) == tok.decode(ids)
    assert auto.chat_template == "{{ messages[0]['content'] }}"
    assert auto.eos_token == "<|endoftext|>"


def _toy_merges(data: bytes, n: int) -> list[tuple[bytes, bytes]]:
    words = [[bytes([b]) for b in w] for w in data.split(b" ") if w]
    merges = []
    for _ in range(n):
        counts: dict[tuple[bytes, bytes], int] = {}
        for w in words:
            for p in zip(w, w[1:]):
                counts[p] = counts.get(p, 0) + 1
        if not counts:
            break
        best = max(counts, key=lambda p: (counts[p], p))
        merges.append(best)
        words = [_merge(w, best) for w in words]
    return merges


def _merge(w: list[bytes], pair: tuple[bytes, bytes]) -> list[bytes]:
    out, i = [], 0
    while i < len(w):
        if i + 1 < len(w) and (w[i], w[i + 1]) == pair:
            out.append(w[i] + w[i + 1])
            i += 2
        else:
            out.append(w[i])
            i += 1
    return out


def test_gpt2_save_round_trips_through_hf(gpt2, tmp_path):
    from tokenizers import Tokenizer as HFTokenizer

    gpt2.save(tmp_path)
    hf = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for t in ADVERSARIAL:
        t = t.replace("<|endoftext|>", "")
        assert hf.encode(t, add_special_tokens=False).ids == gpt2.encode(t), repr(t)
    again = Tokenizer.load(tmp_path)
    assert again.encode("Bonjour, le monde ! 123") == gpt2.encode("Bonjour, le monde ! 123")


# --------------------------------------------------------------------------------------------- pre-tokenizers
def test_every_family_compiles_and_keeps_all_text():
    rng = random.Random(4)
    texts = ADVERSARIAL + [random_text(rng, 80) for _ in range(20)]
    for name, patterns in FAMILIES.items():
        pre = PreTokenizer(patterns)
        for t in texts:
            pieces = pre.split(t)
            assert "".join(pieces) == t, (name, t)
            assert all(pieces), name


def test_fast_single_regexes_split_like_the_originals():
    import regex

    rng = random.Random(5)
    texts = ADVERSARIAL + [random_text(rng, rng.randint(1, 120)) for _ in range(400)]
    texts += ["a  1", "x \n 22 y", "  3", "4  ", "'s 5's", "a\t\t7b", "½ Ⅻ x", "it'ſ I'LL we'Ve", "x\n  "]
    pairs = [((p,), fast) for p, fast in FAST_EQUIVALENT.items()] + list(SINGLE_EQUIVALENT.items())
    for patterns, fast in pairs:
        rx = regex.compile(fast)
        for t in texts:
            assert rx.findall(t) == PreTokenizer(patterns).split(t), (fast, t)


def test_family_patterns_run_in_tiktoken():
    import tiktoken

    for name, patterns in FAMILIES.items():
        for p in patterns:  # fancy-regex (tiktoken) must accept every regex we ship
            tiktoken.Encoding(
                f"t-{name}", pat_str=p, mergeable_ranks={bytes([b]): b for b in range(256)}, special_tokens={}
            )


def test_gpt2_pattern_splits_like_the_paper():
    assert PreTokenizer(GPT2_PATTERN).split("Hello world's  3 cats!!") == [
        "Hello",
        " world",
        "'s",
        " ",
        " 3",
        " cats",
        "!!",
    ]


def test_unknown_family_is_a_clear_error():
    with pytest.raises(LlmkitError, match="not supported"):
        PreTokenizer.for_family("no-such-family")


# ----------------------------------------------------------------------------------------------------- errors
def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llmkit", "tokenize", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


@pytest.mark.parametrize("kind", ["missing", "unknown", "json", "gguf", "notjson"])
def test_bad_input_is_one_line_error(tmp_path, kind):
    path = (
        tmp_path
        / {
            "missing": "nope.json",
            "unknown": "vocab.bin",
            "json": "tokenizer.json",
            "gguf": "model.gguf",
            "notjson": "other.json",
        }[kind]
    )
    if kind == "unknown":
        path.write_bytes(b"\x00\x01binary")
    elif kind == "json":
        path.write_text('{"model": {"vocab": ')
    elif kind == "gguf":
        path.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 10)
    elif kind == "notjson":
        path.write_text('{"hello": 1}')
    r = _cli("--tokenizer", str(path), "hello")
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmkit: error: "), r.stderr
    with pytest.raises(LlmkitError):
        Tokenizer.load(path)


def test_cli_ids_and_pieces(tmp_path):
    d = shared_path("tokenizers/gpt2")
    r = _cli("--tokenizer", str(d), "--format", "ids", "Hello world", "<|endoftext|>")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["15496 995", "27 91 437 1659 5239 91 29"]
    r = _cli("--tokenizer", str(d), "--format", "ids", "--allow-special", "<|endoftext|>")
    assert r.stdout.split() == ["50256"]
    f = tmp_path / "in.txt"
    f.write_text("Hello world\nHello\n")
    r = _cli("--tokenizer", str(d), "--file", str(f))
    assert r.returncode == 0 and r.stdout.splitlines()[0].startswith("Hello:15496  world:995")
    assert "\x1b[" not in r.stdout  # plain when not a TTY


def test_hf_slow_gpt2_files_and_model_dir(gpt2, tmp_path):
    import shutil

    d = shared_path("tokenizers/gpt2")
    shutil.copy(d / "encoder.json", tmp_path / "vocab.json")
    shutil.copy(d / "vocab.bpe", tmp_path / "merges.txt")
    assert Tokenizer.load(tmp_path).encode("Hello world, ça va ?") == gpt2.encode("Hello world, ça va ?")

"""Pre-tokenizers: the regexes that cut text into words before BPE, one entry per llama.cpp family.

A pre-tokenizer is a *list* of regexes applied one after the other, as llama.cpp's `unicode_regex_split`
does: each regex cuts every piece produced so far into its matches AND the unmatched text between them
(nothing is dropped), and a lookahead never sees past the end of the piece it works on. A single regex
that matches everything (ends in `\\s+(?!\\S)|\\s+`) is the classic GPT-2 / tiktoken case and can run inside
tiktoken's Rust regex engine; longer lists run here with the `regex` module.

`FAMILIES` maps every `tokenizer.ggml.pre` name that llama.cpp knows (src/llama-vocab.cpp) to its regex
list, written in a syntax both the `regex` module and tiktoken's fancy-regex accept. The case-insensitive
contractions `(?i:'s|...)` of the HF originals are spelled `'[sS]|...` as llama.cpp does.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property

import regex

from llmkit.errors import LlmkitError

# GPT-2 (OpenAI encoder.py, tiktoken "gpt2"/"r50k_base")
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# GPT-4 (tiktoken "cl100k_base"), with the case-insensitive group spelled out
GPT4_PATTERN = (
    r"""(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
LLAMA3_PATTERN = GPT4_PATTERN
QWEN2_PATTERN = GPT4_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")
NAMED_PATTERNS = {"gpt2": GPT2_PATTERN, "gpt4": GPT4_PATTERN}

# The same splits written for speed in tiktoken's engine, as OpenAI writes them: possessive quantifiers where
# no backtracking can change the match, contractions factored as `'(?:[sdmt]|ll|ve|re)`, `\s++$` for trailing
# space, and a final `\s` (when `\s+(?!\S)` fails the run is one character long, so `\s+` and `\s` match the
# same). tests/test_tokenizer_core.py checks each equivalence on adversarial and random text.
_FAST_TAIL = r"|\s++$|\s+(?!\S)|\s"
_GPT4_FAST_HEAD = (
    r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+"
    r"| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s*[\r\n]"
)
# the HF tokenizer.json originals keep `(?i:...)` contractions (which also match e.g. "'ſ")
HF_LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                     r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
HF_QWEN2_PATTERN = HF_LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")
_HF_FAST_HEAD = _GPT4_FAST_HEAD.replace("'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])", "'(?i:[sdmt]|ll|ve|re)")
FAST_EQUIVALENT = {
    GPT2_PATTERN: r"'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++" + _FAST_TAIL,
    GPT4_PATTERN: _GPT4_FAST_HEAD + _FAST_TAIL,
    QWEN2_PATTERN: _GPT4_FAST_HEAD.replace(r"\p{N}{1,3}+", r"\p{N}") + _FAST_TAIL,
    HF_LLAMA3_PATTERN: _HF_FAST_HEAD + _FAST_TAIL,
    HF_QWEN2_PATTERN: _HF_FAST_HEAD.replace(r"\p{N}{1,3}+", r"\p{N}") + _FAST_TAIL,
}

_CONTR = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
# llama.cpp's GPT-2 regex has no trailing `|\s+`; the gaps it leaves are single whitespace characters,
# which `|\s+` would match one by one as well, so the two are equivalent.
_GPT2_LLAMACPP = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_UPPER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]"
_LOWER = r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_TEKKEN = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*|\p{{N}}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTR}?|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTR}?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DEEPSEEK_LLM_LETTERS = (
    "A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-\u1f7dᾀ-ᾴᾶ-ᾼ\u1fbeῂ-ῄῆ-ῌῐ-\u1fd3"
    "ῖ-\u1fdbῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤ\u2126ℨ\u212a-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃"
)
_DEEPSEEK3 = (
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PORO = r" ?[^(\s|.,!?…。，、।۔،)]+"

FAMILIES: dict[str, tuple[str, ...]] = {}


def _family(names: str, *patterns: str) -> None:
    for name in names.split():
        FAMILIES[name] = patterns


_family("default", r"[\p{P}\$\+<=>\^~\|]+", _GPT2_LLAMACPP, r"\p{N}+", "[0-9][0-9][0-9]")
_family(
    "gpt-2 gpt2 phi-2 jina-es jina-de gigachat jina-v2-es jina-v2-de a.x-4.0 mellum modern-bert jina-v1-en "
    "jina-v2-code roberta-bpe mpt olmo jais exaone4 trillion granite-docling",
    GPT2_PATTERN,
)
_family(
    "llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano dbrx smaug-bpe "
    "glm4 chatglm-bpe",
    LLAMA3_PATTERN,
)
_family(
    "jais-2",
    LLAMA3_PATTERN.replace(
        r"\s+(?!\S)|\s+",
        "|".join(
            [rf"\s{{{n}}}(?!\S)" for n in (512, 256, 128, 64, 32, 16, 8, 4)] + [r"\s{1,2}(?!\S)", r"\s{1}"]
        ),
    ),
)
_family(
    "deepseek-llm",
    r"[\r\n]",
    rf"\s?[{_DEEPSEEK_LLM_LETTERS}]+",
    r"\s?[!-/:-~！-／：-～‘-‟　-。]+",
    r"\s+$",
    r"[一-龥ࠀ-一가-퟿]+",
    r"\p{N}+",
)
_family("deepseek-coder", r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", r"[一-龥ࠀ-一가-퟿]+", r"\p{N}")
_family("deepseek-v3 hunyuan-dense joyai-llm hy_v4", r"\p{N}{1,3}", r"[一-龥぀-ゟ゠-ヿ]+", _DEEPSEEK3)
_family(
    "spark2_5",
    r"\p{N}{1,3}",
    r"[一-龥぀-ゟ゠-ヿ]+",
    _DEEPSEEK3.replace(r"[\r\n]*|\s*[\r\n]+", r"|[\r\n]"),
    r"\p{N}",
)
_family("falcon", r"[\p{P}\$\+<=>\^~\|`]+", _GPT2_LLAMACPP, "[0-9][0-9][0-9]")
_family("starcoder refact command-r smollm codeshell exaone minerva-7b mellum2", r"\p{N}", _GPT2_LLAMACPP)
_family("qwen2 deepseek-r1-qwen kormo f2llmv2 stablelm2 hunyuan solar-open megrez", QWEN2_PATTERN)
_family(
    "qwen35",
    rf"{_CONTR}|[^\r\n\p{{L}}\p{{N}}]?[\p{{L}}\p{{M}}]+|\p{{N}}| ?[^\s\p{{L}}\p{{M}}\p{{N}}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+",
)
_family("poro-chat bloom gpt3-finnish", _PORO)
_family("viking", _PORO, r"\p{N}")
_family("tekken", _TEKKEN)
_family(
    "chameleon",
    r"<sentinel:[0-9]+>",
    r"(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z",
    r"([\t\n]|    |  )",
    r"\p{N}",
    r"[\p{P}!-/:-@\[-`{-~]",
    _GPT2_LLAMACPP,
)
_family("gpt-4o llama4 kanana2 talkie minimax-m2", _GPT4O)
_family("tiny_aya cohere2moe", r"\d{1,3}(?=(?:\d{3})*\b)", _GPT4O)
_family("superbpe", r"\p{N}+", r"(?=(\d{3})+(?!\d))")
_family(
    "bailingmoe bailingmoe2 llada-moe",
    r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+",
)
_family(
    "seed-coder",
    rf"{_CONTR}|[^\r\n\p{{L}}\p{{N}}]?\p{{L}}+|\p{{N}}{{1}}| ?[^\s\p{{L}}\p{{N}}\r\n]+|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+",
)
_family("ufakzeka", QWEN2_PATTERN.replace(_CONTR + "|", ""))
_family("grok-2", QWEN2_PATTERN)
_family("laguna", r"[^\n]+|[\n]+", QWEN2_PATTERN)
_family(
    "exaone-moe",
    rf"{_CONTR}|[^\r\n\p{{L}}\p{{N}}]?(?:\p{{L}}\p{{M}}*(?: \p{{L}}\p{{M}}*)*)+|\p{{N}}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n/]?|\s*[\r\n]|\s+(?!\S)|\s+",
)
_family("minicpm5", r"\p{N}{1,3}", LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}+"))

# One regex equal to a list (so tiktoken can run it): digits isolated first, then GPT-2 on the gaps
# (starcoder, smollm, ...). A whitespace run that ends at a digit ended its gap, so it is kept whole there.
SINGLE_EQUIVALENT: dict[tuple[str, ...], str] = {
    (r"\p{N}", _GPT2_LLAMACPP): r"\p{N}|'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?[^\s\p{L}\p{N}]++|\s++$"
    r"|\s+(?:(?!\S)|(?=\p{N}))|\s",
}

# llama.cpp families whose tokenizer.ggml.pre also changes merging (whole word looked up first)
IGNORE_MERGES = set(
    "llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano tekken "
    "minicpm5 youtu granite-embed-multi-97m".split()
)
# families llama.cpp implements with custom C++ code or raw-UTF-8 (non byte-level) BPE: not supported here
UNSUPPORTED = set(
    "kimi-k2 afmoe gemma4 granite-embed-multi-311m sarvam-moe whitespace youtu "
    "granite-embed-multi-97m".split()
)


class PreTokenizer:
    """Splits text into pieces with a list of regexes applied in sequence (matches and gaps both kept)."""

    def __init__(self, patterns: Sequence[str] | str):
        self.patterns: tuple[str, ...] = (patterns,) if isinstance(patterns, str) else tuple(patterns)
        try:
            self._compiled = [regex.compile(p) for p in self.patterns]
        except regex.error as e:
            raise LlmkitError(f"invalid pre-tokenizer regex: {e}; check the pattern") from None

    @classmethod
    def for_family(cls, name: str) -> PreTokenizer:
        """The pre-tokenizer of a llama.cpp `tokenizer.ggml.pre` family (empty name -> 'default')."""
        name = name or "default"
        if name in UNSUPPORTED or name not in FAMILIES:
            known = ", ".join(sorted(FAMILIES))
            raise LlmkitError(f"pre-tokenizer family {name!r} is not supported; supported: {known}")
        return cls(FAMILIES[name])

    @cached_property
    def single_pattern(self) -> str | None:
        """The one regex when it alone covers all text (tiktoken drops unmatched text)."""
        if len(self.patterns) == 1 and self.patterns[0].endswith(r"\s+(?!\S)|\s+"):
            return FAST_EQUIVALENT.get(self.patterns[0], self.patterns[0])
        return SINGLE_EQUIVALENT.get(self.patterns)

    def split(self, text: str) -> list[str]:
        pieces = [text] if text else []
        for rx in self._compiled:
            out: list[str] = []
            for piece in pieces:
                pos = 0
                for m in rx.finditer(piece):
                    start, end = m.span()
                    if start > pos:
                        out.append(piece[pos:start])  # the gap before the match
                    if end > start:
                        out.append(piece[start:end])
                    pos = max(pos, end)
                if pos < len(piece):
                    out.append(piece[pos:])
            pieces = out
        return pieces

"""Read and write vocabularies: GPT-2 files, HF tokenizer.json, GGUF `tokenizer.ggml.*` metadata.

`load_tokenizer(path)` picks the format: a tokenizer.json file, a GPT-2 directory (encoder.json + vocab.bpe),
a .gguf file (recognised by its magic bytes), or a model directory holding one of those. Paths only: model
names are resolved by the layers above (llmkit.load, the CLI) through llmkit.hub, which the tokenizer never
imports. Every failure is an LlmkitError that names the file and what to do.
Byte-level vocabularies are stored as raw bytes (GPT-2's printable spelling undone); `to_hf_json` spells
them again for tokenizer.json, which is what HF `tokenizers` and transformers read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llmkit.errors import LlmkitError
from llmkit.io import read_gguf, read_json, read_text
from llmkit.tokenizer.core import (  # noqa: F401  (the GGUF token types, re-exported)
    BYTE,
    CONTROL,
    NORMAL,
    UNKNOWN,
    UNUSED,
    USER_DEFINED,
    Tokenizer,
    bytelevel,
    unbytelevel,
    unbytelevel_many,
)
from llmkit.tokenizer.pretokenize import GPT2_PATTERN, IGNORE_MERGES, PreTokenizer


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    p = Path(path).expanduser()
    if not p.exists():
        raise LlmkitError(
            f"tokenizer not found: {p} (give a tokenizer.json, a GPT-2 vocab directory, a .gguf "
            "file or a model directory; for a model name use llmkit.load(name).tokenizer)"
        )
    if p.is_dir():
        if (p / "tokenizer.json").is_file():
            return from_hf_json(p / "tokenizer.json")
        for vocab, merges in (("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt")):  # OpenAI, HF slow
            if (p / vocab).is_file() and (p / merges).is_file():
                return from_gpt2_files(p, vocab, merges)
        ggufs = sorted(p.glob("*.gguf"))
        if ggufs:
            return from_gguf(ggufs[0])
        raise LlmkitError(
            f"no tokenizer in directory {p}: expected tokenizer.json, encoder.json + vocab.bpe, "
            "or a .gguf file"
        )
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF" or p.suffix == ".gguf":
        return from_gguf(p)  # read_gguf reports a bad magic or a cut header
    if p.suffix == ".json" or magic[:1] == b"{":
        return from_hf_json(p)
    raise LlmkitError(
        f"unknown tokenizer format: {p} (expected tokenizer.json, a .gguf file or a GPT-2 vocab directory)"
    )


def _bytes_of(token: str) -> bytes:
    b = unbytelevel(token)
    return b if b is not None else token.encode("utf-8")


def _bytes_of_many(tokens: list[str]) -> list[bytes]:
    return [b if b is not None else t.encode("utf-8") for t, b in zip(tokens, unbytelevel_many(tokens))]


def _dense(vocab: dict[int, bytes], where: Path) -> list[bytes]:
    n = max(vocab) + 1 if vocab else 0
    if n == 0:
        raise LlmkitError(f"empty vocabulary in {where}")
    return [vocab.get(i, b"") for i in range(n)]


# ---------------------------------------------------------------------------------------------------- GPT-2
def from_gpt2_files(directory: str | os.PathLike, vocab_file: str = "encoder.json",
                    merges_file: str = "vocab.bpe") -> Tokenizer:
    """OpenAI's encoder.json (token -> id) + vocab.bpe (merges, one 'a b' per line after a #version line);
    HF's vocab.json + merges.txt are the same files under other names."""
    d = Path(directory)
    enc = read_json(d / vocab_file)
    if not isinstance(enc, dict):
        raise LlmkitError(f"{d / vocab_file} is not a token -> id mapping")
    lines = read_text(d / merges_file).split("\n")
    merges = _parse_merges([ln for ln in lines if ln and not ln.startswith("#version")], d / merges_file)
    vocab = _dense(dict(zip(enc.values(), _bytes_of_many(list(enc)))), d / vocab_file)
    specials = {t: i for t, i in enc.items() if t == "<|endoftext|>"}
    eot = specials.get("<|endoftext|>")
    return Tokenizer(
        model="bpe",
        vocab=vocab,
        merges=merges,
        pre=PreTokenizer(GPT2_PATTERN),
        pre_name="gpt2",
        special_tokens=specials,
        bos_id=eot,
        eos_id=eot,
    )


def _parse_merges(items: list[Any], where: Path) -> list[tuple[bytes, bytes]]:
    """'a b' strings (or [a, b] lists) in GPT-2's byte spelling -> pairs of raw bytes."""
    flat: list[str] = []
    for m in items:
        parts = m.split(" ", 1) if isinstance(m, str) else m
        if len(parts) != 2:
            raise LlmkitError(f"bad merge {m!r} in {where}: expected two tokens")
        flat += parts
    b = _bytes_of_many(flat)
    return list(zip(b[0::2], b[1::2]))


# --------------------------------------------------------------------------------------------- tokenizer.json
def _token_text(v: Any) -> str | None:
    return v.get("content") if isinstance(v, dict) else v


def _hf_pre(pre: dict | None, where: Path) -> list[str]:
    """HF pre_tokenizer -> list of regexes (Split 'isolated' semantics == ours)."""
    if pre is None:
        return []
    t = pre.get("type")
    if t == "Sequence":
        return [p for sub in pre["pretokenizers"] for p in _hf_pre(sub, where)]
    if t == "ByteLevel":
        if pre.get("add_prefix_space"):
            raise LlmkitError(f"{where}: ByteLevel add_prefix_space=true is not supported")
        return [GPT2_PATTERN] if pre.get("use_regex", True) else []
    if t == "Split" and pre.get("behavior", "").lower() == "isolated" and not pre.get("invert"):
        import regex

        pat = pre["pattern"]
        return [pat["Regex"] if "Regex" in pat else regex.escape(pat["String"])]
    if t == "Digits":
        return [r"\p{N}" if pre.get("individual_digits") else r"\p{N}+"]
    raise LlmkitError(f"{where}: pre-tokenizer {json.dumps(pre)[:80]} is not supported")


def _hf_template_adds(post: dict | None, ids: dict[str, int]) -> tuple[int | None, int | None]:
    """(id added first, id added last) by a TemplateProcessing post-processor, e.g. Llama's BOS."""
    single = (post or {}).get("single") or []
    if (post or {}).get("type") == "Sequence":
        return next(
            (r for r in map(lambda p: _hf_template_adds(p, ids), post["processors"]) if any(r)), (None, None)
        )
    texts = [x["SpecialToken"]["id"] if "SpecialToken" in x else None for x in single]
    first = ids.get(texts[0]) if texts and texts[0] else None
    last = ids.get(texts[-1]) if len(texts) > 1 and texts[-1] else None
    return first, last


def _hf_spm_prefix(j: dict, where: Path) -> bool:
    """SentencePiece-style tokenizer.json (Llama-2, Mistral): does it add the leading '▁'?"""
    norm, pre = j.get("normalizer") or {}, j.get("pre_tokenizer") or {}
    steps = norm.get("normalizers", [norm]) if norm else []
    kinds = [n.get("type") for n in steps]
    if pre.get("type") == "Metaspace" and not steps:
        if pre.get("split"):
            raise LlmkitError(f"{where}: Metaspace with split=true is not supported")
        return pre.get("prepend_scheme", "always") != "never" and pre.get("add_prefix_space", True)
    if pre or not set(kinds) <= {"Prepend", "Replace"}:
        raise LlmkitError(
            f"{where}: this byte-fallback tokenizer.json layout is not supported; load the GGUF"
        )
    return "Prepend" in kinds


def from_hf_json(path: str | os.PathLike) -> Tokenizer:
    """HF tokenizer.json, plus tokenizer_config.json beside it (chat template, BOS/EOS).

    Byte-level BPE (GPT-2, Qwen, Llama-3, SmolLM) or SentencePiece-style BPE with byte fallback (Llama-2,
    Mistral): the latter becomes our SPM model with score = -(index of the first merge producing the piece).
    """
    path = Path(path)
    j = read_json(path)
    model = j.get("model") if isinstance(j, dict) else None
    if not isinstance(model, dict) or "vocab" not in model:
        raise LlmkitError(f"{path} is not a HF tokenizer.json (no model.vocab)")
    if model.get("type", "BPE") != "BPE":
        raise LlmkitError(
            f"{path}: tokenizer model {model.get('type')} is not supported (only BPE); load the GGUF instead"
        )
    spm = bool(model.get("byte_fallback"))
    norm = j.get("normalizer")
    if not spm and norm is not None and norm.get("type") != "NFC":
        raise LlmkitError(f"{path}: normalizer {norm.get('type')} is not supported (only NFC)")
    specials, added = {}, {}
    for a in j.get("added_tokens", []):
        (specials if a.get("special") else added)[a["content"]] = a["id"]
    cfg_path = path.with_name("tokenizer_config.json")
    cfg = read_json(cfg_path) if cfg_path.is_file() else {}
    ids = {**model["vocab"], **specials, **added}
    bos, eos, pad, unk = (
        ids.get(_token_text(cfg.get(k))) for k in ("bos_token", "eos_token", "pad_token", "unk_token")
    )
    tmpl = cfg.get("chat_template")
    if isinstance(tmpl, list):  # [{"name": "default", "template": ...}, ...]
        tmpl = next((t["template"] for t in tmpl if t.get("name") == "default"), None)
    if tmpl is None and path.with_name("chat_template.jinja").is_file():  # newer transformers save it apart
        tmpl = path.with_name("chat_template.jinja").read_text(encoding="utf-8")
    first, last = _hf_template_adds(j.get("post_processor"), ids)
    bos = bos if bos is not None else first
    common = dict(
        special_tokens=specials,
        added_tokens=added,
        bos_id=bos,
        eos_id=eos,
        pad_id=pad,
        unk_id=unk,
        add_bos=bool(cfg.get("add_bos_token", first is not None and first == bos)),
        add_eos=bool(cfg.get("add_eos_token", last is not None and last == eos)),
        chat_template=tmpl,
    )
    if spm:
        n = max(ids.values()) + 1
        pieces = [""] * n
        for t, i in ids.items():
            pieces[i] = t
        score = {}
        for r, (a, b) in enumerate(
            m.split(" ", 1) if isinstance(m, str) else m for m in model.get("merges", [])
        ):
            score.setdefault(a + b, -float(r))
        byte_tokens = {
            int(t[3:5], 16): i
            for t, i in model["vocab"].items()
            if len(t) == 6 and t.startswith("<0x") and t.endswith(">")
        }
        vocab = [
            bytes([int(t[3:5], 16)])
            if i in byte_tokens.values()
            else (t.encode("utf-8") if t in specials or t in added else t.replace("▁", " ").encode("utf-8"))
            for i, t in enumerate(pieces)
        ]
        return Tokenizer(
            model="spm",
            vocab=vocab,
            pieces=pieces,
            scores=[score.get(t) for t in pieces],
            byte_tokens=byte_tokens,
            add_space_prefix=_hf_spm_prefix(j, path),
            pre_name="hf-spm",
            **common,
        )
    vocab = dict(zip(model["vocab"].values(), _bytes_of_many(list(model["vocab"]))))
    for t, i in {**specials, **added}.items():
        vocab[i] = t.encode("utf-8")
    return Tokenizer(
        model="bpe",
        vocab=_dense(vocab, path),
        merges=_parse_merges(model.get("merges", []), path),
        pre=PreTokenizer(_hf_pre(j.get("pre_tokenizer"), path)),
        normalizer=norm and "NFC",
        ignore_merges=bool(model.get("ignore_merges")),
        pre_name="hf",
        **common,
    )


# ---------------------------------------------------------------------------------------------------- GGUF
def from_gguf(source: str | os.PathLike | Mapping[str, Any] | Any) -> Tokenizer:
    """A tokenizer from GGUF metadata: tokenizer.ggml.model 'gpt2' (byte-level BPE) or 'llama' (SPM).

    `source`: a path (its header read with llmkit.io.read_gguf), an object with `.metadata` and `.path`
    (llmkit.checkpoint.gguf.GGUFFile, already open), or the metadata dict itself.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise LlmkitError(f"GGUF file not found: {path}")
        meta = read_gguf(path).metadata
    elif isinstance(source, Mapping):
        path, meta = Path("<GGUF metadata>"), source
    else:
        path, meta = Path(getattr(source, "path", "<GGUF file>")), source.metadata

    def _gguf_value(key: str, default: Any = None) -> Any:
        return meta.get(key, default)

    kind = _gguf_value("tokenizer.ggml.model")
    tokens = _gguf_value("tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        raise LlmkitError(f"{path} has no tokenizer (tokenizer.ggml.model / tokens missing)")
    n = len(tokens)
    file_types = _gguf_value("tokenizer.ggml.token_type")  # kept as they are (Tokenizer.token_types)
    types = file_types or [NORMAL] * n
    if len(types) != n:
        raise LlmkitError(f"{path}: {len(types)} token types for {n} tokens; the file is inconsistent")

    def tid(key: str) -> int | None:
        v = _gguf_value(f"tokenizer.ggml.{key}")
        return int(v) if v is not None and 0 <= int(v) < n else None

    pre_name = _gguf_value("tokenizer.ggml.pre") or "default"
    common = dict(
        special_tokens={t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (CONTROL, UNKNOWN)},
        added_tokens={t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == USER_DEFINED},
        bos_id=tid("bos_token_id"),
        eos_id=tid("eos_token_id"),
        pad_id=tid("padding_token_id"),
        unk_id=tid("unknown_token_id"),
        chat_template=_gguf_value("tokenizer.chat_template"),
        extra_stop_ids=[i for i in (tid("eot_token_id"), tid("eom_token_id")) if i is not None],
        special_split="longest_first",  # llama.cpp's order of cutting out added/special tokens
        token_types=file_types,
    )
    if kind == "gpt2":
        merges = _parse_merges(_gguf_value("tokenizer.ggml.merges") or [], path)
        raw = _bytes_of_many(tokens)
        vocab = [b if ty == NORMAL else t.encode("utf-8") for t, ty, b in zip(tokens, types, raw)]
        add_bos = _gguf_value("tokenizer.ggml.add_bos_token", pre_name in IGNORE_MERGES)
        return Tokenizer(
            model="bpe",
            vocab=vocab,
            merges=merges,
            pre=PreTokenizer.for_family(pre_name),
            pre_name=pre_name,
            ignore_merges=pre_name in IGNORE_MERGES,
            add_bos=bool(add_bos),
            add_eos=bool(_gguf_value("tokenizer.ggml.add_eos_token", False)),
            **common,
        )
    if kind == "llama":
        scores = _gguf_value("tokenizer.ggml.scores") or [0.0] * n
        vocab, byte_tokens = [], {}
        for i, (t, ty) in enumerate(zip(tokens, types)):
            if ty == BYTE and len(t) == 6 and t.startswith("<0x"):
                byte_tokens[int(t[3:5], 16)] = i
                vocab.append(bytes([int(t[3:5], 16)]))
            else:
                vocab.append((t.replace("▁", " ") if ty == NORMAL else t).encode("utf-8"))
        return Tokenizer(
            model="spm",
            vocab=vocab,
            pieces=tokens,
            scores=[float(s) for s in scores],
            byte_tokens=byte_tokens,
            pre_name="spm",
            add_space_prefix=bool(_gguf_value("tokenizer.ggml.add_space_prefix", True)),
            add_bos=bool(_gguf_value("tokenizer.ggml.add_bos_token", True)),
            add_eos=bool(_gguf_value("tokenizer.ggml.add_eos_token", False)),
            **common,
        )
    raise LlmkitError(f"{path}: tokenizer model {kind!r} is not supported (supported: gpt2, llama)")


# ---------------------------------------------------------------------------------------------------- saving
def to_hf_json(tok: Tokenizer) -> tuple[dict, dict]:
    """(tokenizer.json, tokenizer_config.json) dicts for a byte-level BPE or SPM Tokenizer."""
    control = set(tok.special_tokens.values())
    added = [
        {
            "id": i,
            "content": t,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": i in control,
        }
        for t, i in sorted({**tok.added_tokens, **tok.special_tokens}.items(), key=lambda kv: kv[1])
    ]
    added_ids = {a["id"] for a in added}
    if tok.model == "bpe":
        vocab: dict[str, int] = {}
        for i, b in enumerate(tok.vocab):
            s = added[[a["id"] for a in added].index(i)]["content"] if i in added_ids else bytelevel(b)
            if s in vocab:
                raise LlmkitError(f"cannot save: tokens {vocab[s]} and {i} have the same text {s!r}")
            vocab[s] = i
        model = {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": tok.ignore_merges,
            "vocab": vocab,
            "merges": [[bytelevel(a), bytelevel(b)] for a, b in tok.merges],
        }
        splits = [
            {"type": "Split", "pattern": {"Regex": p}, "behavior": "Isolated", "invert": False}
            for p in tok.pre.patterns
        ]
        pre = {
            "type": "Sequence",
            "pretokenizers": [
                *splits,
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ],
        }
        normalizer = {"type": tok.normalizer} if tok.normalizer else None
        decoder = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    else:
        model, pre, normalizer, decoder = _spm_hf_parts(tok)
    post = None
    if tok.add_bos and tok.bos_id is not None:
        bos = tok.vocab[tok.bos_id].decode("utf-8")
        post = {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                {"SpecialToken": {"id": bos, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": bos, "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {bos: {"id": bos, "ids": [tok.bos_id], "tokens": [bos]}},
        }
    tok_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre,
        "post_processor": post,
        "decoder": decoder,
        "model": model,
    }

    def text(i: int | None) -> str | None:
        return None if i is None else tok.id_to_text(i)

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": text(tok.bos_id),
        "eos_token": text(tok.eos_id),
        "pad_token": text(tok.pad_id),
        "unk_token": text(tok.unk_id),
        "add_bos_token": tok.add_bos,
        "add_eos_token": tok.add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1 << 30,
        "chat_template": tok.chat_template,
    }
    return tok_json, {k: v for k, v in config.items() if v is not None or k == "chat_template"}


def _spm_hf_parts(tok: Tokenizer) -> tuple[dict, None, dict, dict]:
    """SentencePiece as HF's Llama tokenizer.json: BPE with byte fallback, merges ordered by piece score."""
    pieces: dict[str, int] = {}
    for i, p in enumerate(tok.pieces or ()):
        pieces.setdefault(p, i)
    scores = tok.scores or ()
    control = set(tok.special_tokens.values())
    merges = []
    for p, i in pieces.items():
        if len(p) < 2 or i in control or scores[i] is None:  # None: no merge makes the piece
            continue
        for k in range(1, len(p)):
            if p[:k] in pieces and p[k:] in pieces:
                merges.append((-scores[i], pieces[p[:k]], pieces[p[k:]], p[:k], p[k:]))
    merges.sort()
    model = {
        "type": "BPE",
        "dropout": None,
        "unk_token": tok.vocab[tok.unk_id].decode() if tok.unk_id is not None else None,
        "continuing_subword_prefix": None,
        "end_of_word_suffix": None,
        "fuse_unk": True,
        "byte_fallback": True,
        "ignore_merges": False,
        "vocab": pieces,
        "merges": [[a, b] for *_, a, b in merges],
    }
    normalizer = {
        "type": "Sequence",
        "normalizers": [
            *([{"type": "Prepend", "prepend": "▁"}] if tok.add_space_prefix else []),
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        ],
    }
    decoder = {
        "type": "Sequence",
        "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            *([{"type": "Strip", "content": " ", "start": 1, "stop": 0}] if tok.add_space_prefix else []),
        ],
    }
    return model, None, normalizer, decoder

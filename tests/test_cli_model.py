"""`llmkit inspect` / `llmkit export` on tiny synthetic checkpoints; parameter counts checked against
transformers' own count, stored bytes against the files' own tables."""

from __future__ import annotations

import json

import gguf
import pytest
from gguf_synth import tiny_hf_model, write_gguf
from safetensors import safe_open

from llmkit.cli import main


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("moe")
    model, cfg, tensors = tiny_hf_model("qwen3_moe", tmp)
    write_gguf(tmp / "m.gguf", "qwen3_moe", cfg, tensors, "Q8_0")
    return tmp, model


def _inspect_json(path, capsys) -> dict:
    assert main(["inspect", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_inspect_gguf_moe(moe, capsys):
    tmp, model = moe
    info = _inspect_json(tmp / "m.gguf", capsys)
    assert (info["format"], info["architecture"], info["model_type"]) == ("gguf", "qwen3moe", "qwen3_moe")
    p = info["parameters"]
    assert p["total"] == model.num_parameters()
    n_experts = 2 * 4 * 3 * 64 * 64 + 2 * 4 * 64  # layers x experts x (gate, up, down) + routers
    assert p["experts"] == n_experts and p["mlp"] == 0
    assert p["norms"] == 2 * (2 * 64 + 2 * 32) + 64  # per layer: 2 block norms + q/k norms; final norm
    reader = gguf.GGUFReader(tmp / "m.gguf")
    assert {k: v["bytes"] for k, v in info["storage"].items()} == {
        t: sum(int(x.n_bytes) for x in reader.tensors if x.tensor_type.name == t) for t in ("Q8_0", "F32")
    }
    assert info["storage"]["Q8_0"]["params"] * 34 == info["storage"]["Q8_0"]["bytes"] * 32  # 8.5 bits/param
    assert "tokenizer_error" in info  # this file has no tokenizer metadata: reported, not fatal


def test_inspect_text_hf_folder(moe, capsys):
    tmp, model = moe
    assert main(["inspect", str(tmp / "hf")]) == 0
    out = capsys.readouterr().out
    assert "HF" in out and "experts          4 (2 per token, d_ff 64)" in out
    assert f"parameters       {model.num_parameters():,}" in out
    assert "F32" in out
    info = _inspect_json(tmp / "hf", capsys)
    with safe_open(str(tmp / "hf" / "model.safetensors"), "np") as f:
        n_tensors = len(list(f.keys()))
    n = model.num_parameters()
    assert info["storage"] == {"F32": {"tensors": n_tensors, "params": n, "bytes": 4 * n}}


def test_inspect_missing_model_exits_1(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope.gguf")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("llmkit: error: ") and err.count("\n") == 1


class _StubTokenizer:
    """Enough of a tokenizer for save_hf_dir (the synthetic GGUF has no vocabulary)."""

    chat_template = None
    bos_id, eos_id, pad_id = 1, 2, None

    def save(self, folder):
        pass


def test_export_to_hf_folder(moe, tmp_path, capsys, monkeypatch):
    import torch
    import transformers

    from llmkit.checkpoint.gguf import load_gguf
    from llmkit.tokenizer import Tokenizer

    src, _ = moe
    monkeypatch.setattr(Tokenizer, "from_gguf", classmethod(lambda cls, r: _StubTokenizer()))
    out = tmp_path / "exported"
    assert main(["export", str(src / "m.gguf"), "--to", "hf", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    hf = json.loads((out / "config.json").read_text())
    assert hf["model_type"] == "qwen3_moe" and hf["num_experts"] == 4
    exported = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, load_gguf(src / "m.gguf")[1](ids), atol=1e-4, rtol=0)

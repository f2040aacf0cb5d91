"""`llmkit bench decode` (llmkit.generate.timing) on a tiny transformers model: the verb runs every variant,
reports positive speeds (never asserted against a time) and the perplexity of --text, which must equal the
one computed by hand from transformers' logits on the same token ids; errors are one line."""

from __future__ import annotations

import json
import math
import types

import pytest
import torch

transformers = pytest.importorskip("transformers")

import llmkit  # noqa: E402
from llmkit.checkpoint import load_hf_dir  # noqa: E402
from llmkit.cli import main  # noqa: E402

V = 128


class ByteTokenizer:
    """Enough of a tokenizer for the bench: one id per UTF-8 byte, folded into the vocabulary."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [3 + b % (V - 3) for b in text.encode()]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=96, max_position_embeddings=1024)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    hf.save_pretrained(tmp / "hf")
    text = "Il était une fois, dans un petit village de Bretagne, une chèvre qui rêvait de la mer. " * 8
    (tmp / "text.txt").write_text(text, encoding="utf-8")
    return tmp, hf


@pytest.fixture
def stub_load(tiny, monkeypatch):
    tmp, _ = tiny

    def load(name, device=None, dtype=None):
        config, model = load_hf_dir(tmp / "hf")
        return types.SimpleNamespace(model=model.eval(), config=config, tokenizer=ByteTokenizer(),
                                     path=tmp / "hf")

    monkeypatch.setattr(llmkit, "load", load)


def test_bench_decode_reports_speeds_and_perplexity_of_the_text(tiny, stub_load, tmp_path, capsys):
    tmp, hf = tiny
    out = tmp_path / "report.json"
    rc = main(["bench", "decode", "tiny", "--threads", "1", "--modes", "fp32,bf16,int8,int8+compile",
               "--rounds", "1", "--new-tokens", "4", "--prefill-tokens", "40",
               "--text", str(tmp / "text.txt"), "--ppl-windows", "1", "--out", str(out), "--batches", "3"])
    assert rc == 0
    report = json.loads(out.read_text())
    assert set(report["systems"]) == {"llmkit fp32", "llmkit bf16", "llmkit int8", "llmkit int8+compile"}
    for name, row in report["systems"].items():
        assert row["decode_tok_s"] > 0 and row["prefill_tok_s"] > 0 and row["bytes_per_token"] > 0
        assert len(row["decode_rounds"]) == 1 and row["x"] == {}
        ms = row["ms_per_token"]  # the step split (native: timed inside it), the rest by difference
        assert ms["matmuls"] > 0 and ms["head"] > 0
        assert sum(ms.values()) == pytest.approx(row["split_total_ms"])  # the parts add up
        if "attention" not in ms:  # timed alone: against the best round
            assert row["split_total_ms"] == pytest.approx(1e3 / row["decode_tok_s"])
        assert ("attention" in ms) == (name in ("llmkit fp32", "llmkit int8"))  # the native steps
        assert row["batch_decode_tok_s"]["3"] > 0
    assert report["prefill_tokens"] == 40
    runs = report["bandwidth_runs"]  # measured at the start and after the round; the roofline is the best
    assert len(runs) == 2 and min(runs) > 0 and report["bandwidth_gbs"] == max(runs)
    for row in report["systems"].values():
        roof = report["bandwidth_gbs"] * 1e9 / row["bytes_per_token"]
        assert row["pct_roofline"] == pytest.approx(100 * row["decode_tok_s"] / roof)
    fp32 = report["systems"]["llmkit fp32"]["bytes_per_token"]
    assert report["systems"]["llmkit int8"]["bytes_per_token"] < fp32 / 2

    ids = torch.tensor([ByteTokenizer().encode((tmp / "text.txt").read_text(encoding="utf-8"))[:512]])
    with torch.no_grad():
        logp = hf(ids).logits[0, :-1].log_softmax(-1)  # (511, V)
    want = math.exp(-float(logp.gather(1, ids[0, 1:, None]).mean()))
    ppl = report["perplexity"]
    assert set(ppl) == {"llmkit fp32", "llmkit int8"}  # bf16 and the compiled twin skipped
    assert ppl["llmkit fp32"] == pytest.approx(want, rel=1e-5)
    assert ppl["llmkit int8"] == pytest.approx(want, rel=0.05)
    printed = capsys.readouterr().out
    assert "% roofline" in printed and "perplexity of text.txt" in printed
    assert "ms per decode token" in printed


def test_the_split_times_each_matmul_of_a_step_once(tiny):
    """A float model runs 7 projections per layer; quantized, q/k/v and gate/up are fused: 4 calls."""
    from llmkit.generate.timing import _linears
    from llmkit.quant import quantize_model

    tmp, _ = tiny
    config, model = load_hf_dir(tmp / "hf")
    mats, head = _linears(model)
    assert len(mats) == 7 * config.n_layers and head is model.lm_head
    mats, head = _linears(quantize_model(model, "int8"))
    assert len(mats) == 4 * config.n_layers and head is model.lm_head


def test_bench_decode_errors_in_one_line(tiny, stub_load, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("trop court", encoding="utf-8")
    args = ["bench", "decode", "--threads", "1", "--rounds", "1", "--new-tokens", "2",
            "--prefill-tokens", "8"]
    assert main([*args, "--modes", "fp32", "--text", str(short)]) == 1
    assert "fewer than 8 x 512 for perplexity" in capsys.readouterr().err
    assert main([*args, "--modes", "fp16"]) == 1
    assert "unknown mode 'fp16'" in capsys.readouterr().err
    assert main([*args, "--modes", "fp32", "--batches", "4,x"]) == 1
    assert "--batches '4,x'" in capsys.readouterr().err

"""The trainer learns (overfit), resumes bit for bit, matches under DDP, exports to HF, fails cleanly."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from llmkit.cli import main
from llmkit.errors import LlmkitError
from llmkit.train.data import TokenBatches, prepare
from llmkit.train.losses import lm_loss
from llmkit.train.pretrain import build_config, pretrain
from llmkit.train.trainer import CHECKPOINT, METRICS, TrainConfig, Trainer

ROOT = Path(__file__).resolve().parent.parent
TEXT = "".join(
    f"{i}: Le petit chat dort sur le toit. The small cat sleeps on the roof; the dog barks at {i % 7}.\n"
    for i in range(120)
)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest (and reproducibly) on one thread, above all on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("train")
    corpus = d / "corpus.txt"
    corpus.write_text(TEXT)
    prepare([corpus], d / "data", tokenizer="char", val_fraction=0.1, progress=False)
    return d / "data"


def cfg(**kw) -> TrainConfig:
    base = dict(
        steps=8,
        batch_size=4,
        block_size=32,
        lr=3e-3,
        warmup=2,
        eval_every=4,
        eval_tokens=256,
        progress=False,
        threads=1,
    )
    base.update(kw)
    return TrainConfig(**base)


def losses(run: Path, key: str = "loss") -> list[float]:
    return [r[key] for r in map(json.loads, (run / METRICS).read_text().splitlines()) if key in r]


def val_losses(run: Path) -> list[float]:
    return losses(run, "val_loss")


def test_overfit_one_batch(tmp_path):
    torch.manual_seed(0)
    from llmkit.model import Transformer

    shard = np.random.default_rng(0).integers(0, 64, size=4 * 32 + 1).astype(np.uint16)
    batches = TokenBatches([shard], block_size=32, batch_size=4, shuffle=False)  # 4 windows: the same batch
    model = Transformer(build_config(64, 32, "tiny"))
    c = cfg(steps=150, lr=1e-2, warmup=10, min_lr=1e-3, weight_decay=0.0, eval_every=0)
    hist = Trainer(model, lm_loss, batches, c, tmp_path).fit()
    assert hist[0]["loss"] > 3.5  # ~ln 64 at init
    assert hist[-1]["loss"] < 0.05


def test_resume_is_bitwise_exact(data_dir, tmp_path):
    c = dict(save_every=4, steps=10)
    over = {"dropout": 0.1}  # dropout draws from the torch RNG, so the RNG state must be restored too
    pretrain(data_dir, tmp_path / "full", cfg(**c), model_overrides=over, export=False)
    pretrain(data_dir, tmp_path / "cut", cfg(**c), model_overrides=over, export=False, stop_after=5)
    assert json.loads((tmp_path / "cut" / METRICS).read_text().splitlines()[-1])["step"] == 5
    pretrain(data_dir, tmp_path / "cut", cfg(**c), model_overrides=over, export=False, resume=True)
    a, b = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert len(a) == len(b) == 10
    assert a == b  # bitwise: same floats
    sa = torch.load(tmp_path / "full" / CHECKPOINT, weights_only=True)["model"]
    sb = torch.load(tmp_path / "cut" / CHECKPOINT, weights_only=True)["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    evals = [
        r for r in map(json.loads, (tmp_path / "cut" / METRICS).read_text().splitlines()) if "val_loss" in r
    ]
    assert [r["step"] for r in evals] == [4, 8, 10]


def _cli(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "llmkit", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def test_sigkill_then_resume_matches_uninterrupted(data_dir, tmp_path):
    args = [
        "pretrain",
        "--data",
        str(data_dir),
        "--steps",
        "24",
        "--batch-size",
        "4",
        "--block-size",
        "32",
        "--save-every",
        "2",
        "--eval-every",
        "0",
        "--sample-tokens",
        "0",
        "--threads",
        "1",
        "--no-progress",
        "--lr",
        "3e-3",
        "--warmup",
        "2",
    ]
    ref = tmp_path / "ref"
    subprocess.run(_cli([*args, "--out", str(ref)]), env=_env(), check=True, capture_output=True)
    run = tmp_path / "killed"
    p = subprocess.Popen(
        _cli([*args, "--out", str(run)]), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    t_end = time.time() + 120
    while not (run / CHECKPOINT).exists() and p.poll() is None and time.time() < t_end:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    step = torch.load(run / CHECKPOINT, weights_only=True)["step"]
    subprocess.run(_cli([*args, "--out", str(run), "--resume"]), env=_env(), check=True, capture_output=True)
    assert losses(run) == losses(ref), f"resumed from step {step}"
    assert (run / "hf" / "model.safetensors").exists()


def test_ddp_two_gloo_processes_match_one(data_dir, tmp_path):
    common = [
        "--data",
        str(data_dir),
        "--steps",
        "6",
        "--batch-size",
        "4",
        "--block-size",
        "32",
        "--eval-every",
        "3",
        "--eval-tokens",
        "256",
        "--sample-tokens",
        "0",
        "--threads",
        "1",
        "--no-progress",
        "--lr",
        "3e-3",
        "--warmup",
        "2",
        "--grad-accum",
        "2",
    ]
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(
        _cli(["pretrain", *common, "--out", str(one)]), env=_env(), check=True, capture_output=True
    )
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29517",
            "-m",
            "llmkit",
            "pretrain",
            *common,
            "--out",
            str(two),
        ],
        env=_env(),
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    la, lb = losses(one), losses(two)
    assert len(la) == len(lb) == 6
    np.testing.assert_allclose(la, lb, rtol=1e-4)
    np.testing.assert_allclose(val_losses(one), val_losses(two), rtol=1e-4)
    assert json.loads((two / "run.json").read_text())["world_size"] == 2


@pytest.mark.parametrize("preset", ["tiny", "tiny-gpt2", "moe-tiny"])
def test_export_loads_in_transformers_with_same_logits(data_dir, tmp_path, preset):
    transformers = pytest.importorskip("transformers")
    from llmkit.checkpoint.hf import load_hf_dir

    hist = pretrain(data_dir, tmp_path / "run", cfg(steps=3, eval_every=0), preset=preset)
    assert hist[-1]["val_bpb"] > 0
    hf_dir = tmp_path / "run" / "hf"
    ours = torch.load(tmp_path / "run" / CHECKPOINT, weights_only=True)["model"]
    config, model = load_hf_dir(hf_dir)
    model.load_state_dict(ours)  # the same weights the trainer ended with
    ref = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    from llmkit.tokenizer import Tokenizer

    text = "Le petit chat dort."
    ids = Tokenizer.load(hf_dir).encode(text)
    assert tok(text, add_special_tokens=False)["input_ids"] == ids
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), ref(x).logits, rtol=1e-4, atol=1e-4)


def test_moe_aux_loss_is_added(data_dir):
    from llmkit.model import Transformer

    model = Transformer(build_config(300, 32, "moe-tiny"))
    x = torch.randint(0, 300, (2, 32))
    with_aux = lm_loss(model.train(), (x, x))
    assert model.aux_loss is not None and model.aux_loss > 0
    from llmkit.train.losses import cross_entropy

    torch.testing.assert_close(with_aux, cross_entropy(model(x), x) + 0.01 * model.aux_loss)


# ---------------------------------------------------------------------------------------------- failures
def test_unwritable_run_dir(data_dir, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["pretrain", "--data", str(data_dir), "--out", str(blocker / "run"), "--steps", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("llmkit: error: ") and "not writable" in err and "\n" not in err


def test_full_disk_keeps_previous_checkpoint(data_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    pretrain(data_dir, run, cfg(steps=4, save_every=2), export=False, stop_after=2)
    good = (run / CHECKPOINT).read_bytes()
    real_save = torch.save

    def full_disk(obj, f, *a, **kw):
        real_save(obj, f, *a, **kw)
        Path(f).write_bytes(b"partial")  # half-written, then the disk fills up
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(LlmkitError, match="No space left on device.*previous checkpoint is kept"):
        pretrain(data_dir, run, cfg(steps=4, save_every=2), export=False, resume=True)
    assert (run / CHECKPOINT).read_bytes() == good
    assert [p.name for p in run.iterdir() if ".tmp" in p.name] == []


def test_corrupt_checkpoint_and_missing_data(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / CHECKPOINT).write_bytes(b"not a checkpoint")
    base = ["pretrain", "--data", str(data_dir), "--out", str(run), "--steps", "2", "--no-progress"]
    assert main([*base, "--resume"]) == 1
    assert "unreadable checkpoint" in capsys.readouterr().err
    assert main(["pretrain", "--data", str(tmp_path / "nope"), "--out", str(run)]) == 1
    assert "llmkit prepare" in capsys.readouterr().err


def test_time_budget_stops_and_exports(data_dir, tmp_path):
    hist = pretrain(
        data_dir, tmp_path / "run", cfg(steps=10**6, time_budget=1.5, eval_every=0), sample_tokens=0
    )
    steps = [r for r in hist if "loss" in r]
    assert 0 < len(steps) < 10**6 and steps[-1]["time"] < 3.0
    assert steps[-1]["lr"] < 3e-3  # the cosine ran over the budget
    assert "val_bpb" in hist[-1] and (tmp_path / "run" / "hf" / "model.safetensors").exists()


@pytest.mark.gpu
def test_cuda_bf16_training_learns(data_dir, tmp_path):
    hist = pretrain(data_dir, tmp_path / "run", cfg(steps=30, device="cuda", dtype="auto", eval_every=0))
    steps = [r for r in hist if "loss" in r]
    assert steps[-1]["loss"] < steps[0]["loss"] - 1.0

"""The trainer learns (overfit), resumes bit for bit, matches under DDP, exports to HF, fails cleanly."""

from __future__ import annotations

import copy
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
import torch.nn.functional as F

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


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on one thread


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


# CLI flags shared by the subprocess runs: a small, quick, single-threaded run without samples
_QUICK = ["--batch-size", "4", "--block-size", "32", "--sample-tokens", "0", "--threads", "1",
          "--no-progress", "--lr", "3e-3", "--warmup", "2"]


def test_sigkill_then_resume_matches_uninterrupted(data_dir, tmp_path):
    args = ["pretrain", "--data", str(data_dir), "--steps", "24", "--save-every", "2", "--eval-every", "0",
            *_QUICK]
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
    common = ["--data", str(data_dir), "--steps", "6", "--eval-every", "3", "--eval-tokens", "256",
              "--grad-accum", "2", *_QUICK]
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
    total, count = lm_loss(model.train(), (x, x))
    out = model(x, output_aux=True)
    assert out.aux_loss is not None and out.aux_loss > 0
    from llmkit.train.losses import cross_entropy

    assert int(count) == x.numel()
    torch.testing.assert_close(total / count, cross_entropy(out.logits, x) + 0.01 * out.aux_loss)


# ------------------------------------------------------------------------------ loss normalisation
class ListBatches:
    """Fixed micro-batches served in order (the trainer's batches protocol)."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]):
        self.batches, self.position = batches, 0

    def next(self, device=None):
        x, y = self.batches[self.position % len(self.batches)]
        self.position += 1
        return x.to(device), y.to(device)

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, st: dict) -> None:
        self.position = st["position"]


def masked_targets(x: torch.Tensor, trained_per_row: int) -> torch.Tensor:
    """Next-token targets of x with only the first `trained_per_row` positions of each row trained."""
    y = torch.roll(x, -1, dims=1)
    y[:, trained_per_row:] = -100
    return y


def test_masked_loss_is_normalised_by_the_trained_tokens_of_the_step(tmp_path):
    from llmkit.model import Transformer

    torch.manual_seed(0)
    base = Transformer(build_config(64, 16, "tiny"))
    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.randint(0, 64, (1, 16), generator=g), torch.randint(0, 64, (2, 16), generator=g)
    y1, y2 = masked_targets(x1, 3), masked_targets(x2, 15)  # 3 and 2 x 15 = 30 trained tokens
    x, y = torch.cat([x1, x2]), torch.cat([y1, y2])  # one batch holding all 33

    def grads_and_loss(batches: list, accum: int, run: str) -> tuple[dict, float]:
        t = Trainer(copy.deepcopy(base), lm_loss, ListBatches(batches), cfg(grad_accum=accum), tmp_path / run)
        stats = t.accumulate()
        assert int(stats[1]) == 33
        return {n: q.grad for n, q in t.raw_model.named_parameters()}, float(stats[0] / stats[1])

    split, split_loss = grads_and_loss([(x1, y1), (x2, y2)], 2, "split")
    whole, whole_loss = grads_and_loss([(x, y)], 1, "whole")
    ref_model = copy.deepcopy(base)
    ref = (
        F.cross_entropy(ref_model(x).reshape(-1, 64), y.reshape(-1), ignore_index=-100, reduction="sum") / 33
    )
    ref.backward()
    for n, q in ref_model.named_parameters():
        torch.testing.assert_close(split[n], q.grad, msg=n)
        torch.testing.assert_close(whole[n], q.grad, msg=n)
    torch.testing.assert_close(split_loss, ref.item())
    torch.testing.assert_close(whole_loss, ref.item())
    # the old rule (mean of the micro-batch means) weighs 3 tokens like 30: another gradient
    old_model = copy.deepcopy(base)
    means = [
        F.cross_entropy(old_model(a).reshape(-1, 64), b.reshape(-1), ignore_index=-100)
        for a, b in ((x1, y1), (x2, y2))
    ]
    (sum(means) / 2).backward()
    w = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(old_model.get_parameter(w).grad, split[w], rtol=0.05, atol=0)


# ------------------------------------------------------------------------------ frozen parameters
TRAINED = ("model.norm.weight", "model.layers.1.self_attn.o_proj.weight")


def frozen_model(vocab: int):
    from llmkit.model import Transformer

    torch.manual_seed(0)  # the same "base weights" every time, as a LoRA run would load them
    model = Transformer(build_config(vocab, 32, "tiny", dropout=0.1))
    for n, q in model.named_parameters():
        q.requires_grad_(n in TRAINED)
    return model


def test_frozen_base_checkpoints_only_trainable_and_resumes_bitwise(data_dir, tmp_path):
    from llmkit.train.data import TokenData

    td = TokenData(data_dir)

    def trainer(run: str, model=None) -> Trainer:
        batches = TokenBatches(td.shards("train"), 32, 4, seed=0)
        c = cfg(steps=6, save_every=3, eval_every=0)
        return Trainer(model or frozen_model(td.vocab_size), lm_loss, batches, c, tmp_path / run)

    full = trainer("full")
    assert {id(q) for g in full.opt.param_groups for q in g["params"]} == {
        id(q) for n, q in full.raw_model.named_parameters() if n in TRAINED
    }
    full.fit()
    cut = trainer("cut")
    cut.fit(stop_after=3)
    path = tmp_path / "cut" / CHECKPOINT
    ck = torch.load(path, weights_only=True)
    assert ck["step"] == 3 and ck["trainable_only"] is True
    assert set(ck["model"]) == set(TRAINED)
    assert len(ck["optimizer"]["state"]) == len(TRAINED)
    full_bytes = sum(q.numel() * q.element_size() for q in cut.raw_model.parameters())
    assert path.stat().st_size < full_bytes / 4  # the full model alone would be 4x this

    resumed = trainer("cut")  # a freshly built base model
    resumed.resume()
    resumed.fit()
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")  # bitwise: same floats
    base = frozen_model(td.vocab_size).state_dict()
    for n, q in resumed.raw_model.state_dict().items():
        assert torch.equal(q, full.raw_model.state_dict()[n]), n
        assert torch.equal(q, base[n]) == (n not in TRAINED), n  # frozen stay, trained moved

    other = frozen_model(td.vocab_size)
    other.lm_head.weight.requires_grad_(True)  # tied with embed_tokens: a third trainable tensor
    with pytest.raises(LlmkitError, match="trainable parameters differ.*missing: model.embed_tokens.weight"):
        trainer("cut", other).resume()
    everything = frozen_model(td.vocab_size).requires_grad_(True)
    trainer("all", everything).fit(stop_after=3)
    assert set(torch.load(tmp_path / "all" / CHECKPOINT, weights_only=True)["model"]) == set(
        everything.state_dict()
    )  # every parameter trains: the full model, as before
    with pytest.raises(LlmkitError, match="trained every parameter but this model freezes some"):
        trainer("all").resume()
    with pytest.raises(LlmkitError, match="nothing to train"):
        trainer("none", frozen_model(td.vocab_size).requires_grad_(False))


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


def test_time_budget_stops_and_exports(data_dir, tmp_path, monkeypatch):
    """The budget is read on a simulated clock (every perf_counter call advances it 10 ms), so the test
    checks the stopping logic, not this machine's speed."""
    import itertools

    ticks = itertools.count()
    monkeypatch.setattr(time, "perf_counter", lambda: next(ticks) * 0.01)
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


# ------------------------------------------------------------------------------ reference model
def test_frozen_reference_model_rides_along(tmp_path):
    from llmkit.model import Transformer

    torch.manual_seed(0)
    model = Transformer(build_config(64, 16, "tiny"))
    ref = copy.deepcopy(model)
    before = {n: q.clone() for n, q in ref.state_dict().items()}
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 64, (4, 16), generator=g)
    seen = []

    def kl_penalised(m, batch, ref_model):
        """Cross-entropy + KL(model || reference) per token: the shape of a DPO / RLHF loss."""
        seen.append((ref_model.training, any(q.requires_grad for q in ref_model.parameters())))
        xb, yb = batch
        logp = F.log_softmax(m(xb).float(), -1)  # (B, T, V)
        with torch.no_grad():
            ref_logp = F.log_softmax(ref_model(xb).float(), -1)  # (B, T, V)
        kl = (logp.exp() * (logp - ref_logp)).sum(-1)  # (B, T)
        ce = F.nll_loss(logp.reshape(-1, 64), yb.reshape(-1), reduction="sum")
        return ce + 0.1 * kl.sum(), yb.numel()

    c = cfg(steps=4, eval_every=0, lr=1e-2, warmup=1)
    t = Trainer(model, kl_penalised, ListBatches([(x, torch.roll(x, -1, 1))]), c, tmp_path, ref_model=ref)
    assert t.ref_model is ref
    assert all(
        id(q) not in {id(r) for r in ref.parameters()} for g_ in t.opt.param_groups for q in g_["params"]
    )
    hist = t.fit()
    assert len(seen) == 4 and set(seen) == {(False, False)}  # eval mode, frozen, every step
    assert hist[-1]["loss"] < hist[0]["loss"]
    for n, q in ref.state_dict().items():
        assert torch.equal(q, before[n]), n  # the reference never moved ...
    assert any(not torch.equal(q, before[n]) for n, q in model.state_dict().items())  # ... the model did
    ck = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert set(ck["model"]) == set(model.state_dict())  # ... and only the model is saved
    assert set(ck) == {
        "step",
        "tokens_seen",
        "model",
        "trainable_only",
        "optimizer",
        "scheduler",
        "rng",
        "data",
        "train_config",
        "model_config",
    }
    with pytest.raises(LlmkitError, match="shares parameters"):
        Trainer(model, kl_penalised, ListBatches([(x, x)]), c, tmp_path / "same", ref_model=model)

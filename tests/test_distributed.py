"""Two gloo processes on CPU (torchrun) train exactly what one process trains.

SFT with LoRA and full fine-tuning under DDP and FSDP2 gives the per-step losses (<= 1e-4), held-out losses
and final trainable weights (<= 1e-5) of the 1-process run, and the same exported adapter / HF weights;
checkpoints move between modes and world sizes (1 process -> DDP / FSDP, FSDP -> FSDP, FSDP -> 1 process);
`llmkit sft --parallel ddp` under torchrun prints once. DPO, GRPO and the reward model run under both
modes, and `llmkit pretrain --parallel fsdp`, with the losses and weights of one process.

The reference is the 1-process run of the same stage (the Trainer's single-process path, itself tested
against hand-computed losses in test_train / test_sft / the stages' tests). ONE torchrun launch of this file
(`__main__` below is the worker) runs every 2-process job in turn, since process start dominates.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
QA = [("Quelle est la capitale de la France ?", "Paris."), ("Bonjour !", "Bonjour, comment puis-je aider ?"),
      ("Combien font deux et deux ?", "Quatre."), ("De quelle couleur est le ciel ?", "Bleu.")]
STEPS = 4
MODES = ("ddp", "fsdp")
SFT_CASES = {  # sft keyword arguments; grad_accum 2 exercises DDP no_sync / FSDP's deferred gradient sync
    "lora": {"lora_r": 4, "grad_accum": 2},
    "full": {},
}
STAGES = {  # each stage once per mode, LoRA under one and full fine-tuning under the other
    "ddp": ("dpo-lora", "grpo-full", "reward-full"),
    "fsdp": ("dpo-full", "grpo-lora", "reward-lora"),
}
PRETRAIN_ARGS = ["--steps", str(STEPS), "--batch-size", "4", "--block-size", "32", "--grad-accum", "2",
                 "--eval-every", "2", "--eval-tokens", "256", "--save-every", "2", "--sample-tokens", "4",
                 "--lr", "3e-3", "--warmup", "1", "--threads", "1", "--no-progress"]
CLI_ARGS = ["--lora-r", "4", "--lora-dropout", "0", "--grad-accum", "2", "--steps", str(STEPS),
            "--batch-size", "4", "--block-size", "48", "--lr", "1e-2", "--warmup", "1", "--eval-every", "2",
            "--save-every", "2", "--seed", "3", "--threads", "1", "--no-progress"]  # = SFT_CASES["lora"]

pytestmark = [
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                       reason="needs torch.distributed with the gloo backend"),
    pytest.mark.usefixtures("one_thread"),
]


# ------------------------------------------------------------------------------------------ the runs
def config(**kw):
    from llmkit.train.trainer import TrainConfig

    base = dict(steps=STEPS, batch_size=4, block_size=48, lr=1e-2, warmup=1, eval_every=2, save_every=2,
                progress=False, threads=1, seed=3)
    return TrainConfig(**{**base, **kw})


def vowel_share(prompts, completions, docs) -> list[float]:
    """A toy GRPO reward: the share of vowels among a completion's characters."""
    return [sum(ch in "aeiou" for ch in c) / max(1, len(c)) for c in completions]


def run_sft(fx: Path, out: Path, case: str, parallel: str = "auto", **kw) -> None:
    """SFT of `case`, the same in 1 and 2 processes; kw: stop_after, resume."""
    from llmkit.train.sft import sft

    opts = dict(SFT_CASES[case])
    cfg = config(grad_accum=opts.pop("grad_accum", 1), parallel=parallel)
    sft(fx / "model", fx / "chats.jsonl", out, cfg, sample_prompts=["Bonjour !"], sample_tokens=3,
        **opts, **kw)


def run_stage(fx: Path, out: Path, job: str, parallel: str = "auto") -> None:
    """A DPO, GRPO or reward-model run ("dpo-lora", "grpo-full", ...), the same in 1 and 2 processes."""
    stage, case = job.split("-")
    lora = 4 if case == "lora" else None
    if stage == "dpo":
        from llmkit.train.preference import dpo

        dpo(fx / "model", fx / "pairs.jsonl", out, config(block_size=64, weight_decay=0.0, parallel=parallel,
                                                          lr=1e-2 if lora else 1e-3),
            val=fx / "pairs_val.jsonl", lora_r=lora, max_length=64)
    elif stage == "grpo":
        from llmkit.train.grpo import grpo

        problems = json.loads((fx / "problems.json").read_text())
        grpo(fx / "model", problems, out, val=2, group_size=4, prompts_per_step=2, max_tokens=6,
             lr=2e-2 if lora else 1e-3, warmup=1, progress=False, threads=1, lora_r=lora, grad_accum=2,
             rewards=[(vowel_share, 1.0)], steps=STEPS, save_every=2, eval_every=2, seed=3, parallel=parallel)
    else:
        from llmkit.train.reward import reward_train

        reward_train(fx / "model", fx / "pairs.jsonl", out,
                     config(parallel=parallel, lr=1e-2 if lora else 1e-3),
                     val=fx / "pairs_val.jsonl", lora_r=lora, max_length=64)


def worker(fx: Path, root: Path) -> None:
    """The 2-process side (under torchrun): every job in turn. A failing job leaves OUT.rankR.error and ends
    the launch (its ranks are out of step), so the jobs after it report that they did not run."""
    from llmkit.cli import main
    from llmkit.train.trainer import init_distributed

    init_distributed(timeout=60)  # a mismatched collective fails within the test's time, not in 30 min
    for mode in MODES:
        for case in SFT_CASES:
            run_sft(fx, root / f"{mode}-sft-{case}", case, parallel=mode)
    for mode, case in (("ddp", "lora"), ("fsdp", "full")):  # resume a 1-process checkpoint (step 2)
        run_sft(fx, root / f"{mode}-sft-{case}-from1p", case, parallel=mode, resume=True)
    # written under FSDP: resumed under FSDP (lora) and, by the test, in 1 process (full)
    for case in SFT_CASES:
        run_sft(fx, root / f"fsdp-sft-{case}-cut", case, parallel="fsdp", stop_after=2)
    run_sft(fx, root / "fsdp-sft-lora-cut", "lora", parallel="fsdp", resume=True)
    assert main(["sft", str(fx / "model"), "--data", str(fx / "chats.jsonl"), *CLI_ARGS, "--parallel", "ddp",
                 "--out", str(root / "ddp-cli-lora")]) == 0
    jobs = [(f"{mode}-{job}", lambda m=mode, j=job: run_stage(fx, root / f"{m}-{j}", j, parallel=m))
            for mode, stage_jobs in STAGES.items() for job in stage_jobs]
    jobs.append(("fsdp-pretrain", lambda: main(["pretrain", "--data", str(fx / "tokens"), *PRETRAIN_ARGS,
                                                "--parallel", "fsdp", "--out", str(root / "fsdp-pretrain")])))
    for name, job in sorted(jobs, key=lambda nj: (nj[0].startswith("fsdp"), "grpo" in nj[0])):
        print(f"rank {dist.get_rank()} starts {name}", file=sys.stderr, flush=True)
        try:
            job()
            dist.barrier()  # a job that left the ranks out of step fails here, under its own name
        except Exception:  # the ranks are out of step now: record it and end the launch
            (root / f"{name}.rank{dist.get_rank()}.error").write_text(traceback.format_exc())
            os._exit(1)
    dist.destroy_process_group()


def launch(fx: Path, root: Path) -> None:
    """torchrun this file as the worker on 2 CPU processes; root/torchrun.{out,err,rc} keep what it said
    (a crash fails test_launch_exits_cleanly and the tests of the runs it did not finish, not the others)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           __file__, str(fx), str(root)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, cwd=ROOT)
    for ext, text in (("out", res.stdout), ("err", res.stderr), ("rc", str(res.returncode))):
        (root / f"torchrun.{ext}").write_text(text)


# -------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> Path:
    """model/: a 2-layer Llama (d_model 32, tied embeddings) with a 300-token BPE and ChatML; chats.jsonl;
    pairs.jsonl / pairs_val.jsonl (right answer chosen, "Non." rejected); problems.json (arithmetic)."""
    from llmkit.checkpoint.hf import save_hf_dir
    from llmkit.config import ModelConfig
    from llmkit.model import Transformer
    from llmkit.tokenizer.chat import CHATML_TEMPLATE
    from llmkit.tokenizer.train import train_bpe
    from llmkit.train.data import prepare
    from llmkit.train.rewards import arithmetic_problems

    d = tmp_path_factory.mktemp("dist_fixtures")
    text = " ".join(f"{q} {a} Tu es utile. user assistant system Non." for q, a in QA) * 20
    tok = train_bpe([text], 300, special_tokens=["<|im_start|>", "<|im_end|>"], progress=False)
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                      max_seq_len=256, pos_encoding="rope", norm="rmsnorm", mlp="swiglu", activation="silu",
                      tie_embeddings=True, eos_token_id=tok.special_tokens["<|im_end|>"],
                      bos_token_id=tok.special_tokens["<|im_start|>"])
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():  # larger weights than the init: a frozen base whose logits adapters can move
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    save_hf_dir(model, cfg, tok, d / "model", chat_template=CHATML_TEMPLATE)

    def jsonl(name: str, rows: list[dict]) -> None:
        (d / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))

    jsonl("chats.jsonl", [{"id": f"t{i}", "tree": i % 5, "messages": [
        {"role": "user", "content": f"{q} ({i})"}, {"role": "assistant", "content": a}]}
        for i, (q, a) in enumerate(QA * 5)])
    pairs = [{"prompt": f"{q} ({i})", "chosen": a, "rejected": "Non."} for i, (q, a) in enumerate(QA * 3)]
    jsonl("pairs.jsonl", pairs[:8])
    jsonl("pairs_val.jsonl", pairs[8:])
    (d / "problems.json").write_text(json.dumps(arithmetic_problems(12, seed=0)))
    (d / "corpus").mkdir()
    for i in range(3):  # pretraining text: documents of the chat answers, byte tokenizer
        (d / "corpus" / f"{i}.txt").write_text(" ".join(a for _, a in QA[i:] + QA[:i]) * 40)
    prepare([d / "corpus"], d / "tokens", tokenizer="char", val_fraction=0.34, progress=False)
    return d


@pytest.fixture(scope="module")
def runs(fx, tmp_path_factory) -> Path:
    """The 1-process references (and step-2 checkpoints to resume elsewhere), then the torchrun launch."""
    from llmkit.cli import main

    root = tmp_path_factory.mktemp("dist_runs")
    for case in SFT_CASES:
        run_sft(fx, root / f"1p-sft-{case}", case)
        run_sft(fx, root / f"1p-sft-{case}-cut", case, stop_after=2)
    for mode, case in (("ddp", "lora"), ("fsdp", "full")):
        shutil.copytree(root / f"1p-sft-{case}-cut", root / f"{mode}-sft-{case}-from1p")
    for job in sorted({j for jobs in STAGES.values() for j in jobs}):
        run_stage(fx, root / f"1p-{job}", job)
    assert main(["pretrain", "--data", str(fx / "tokens"), *PRETRAIN_ARGS, "--out", str(root / "1p-pretrain")
                 ]) == 0
    launch(fx, root)
    return root


# ------------------------------------------------------------------------------------------ comparisons
COMPARED = ("loss", "val_loss", "reward", "kl", "train_margin", "val_accuracy", "val_bpb")  # if the ref logs


def series(run: Path, key: str) -> list[float]:
    return [r[key] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if key in r]


def weights_atol(job: str) -> float:
    """1e-5 for LoRA; 1e-4 for full fine-tuning, where Adam magnifies float noise in the few entries of
    near-zero gradient (m / sqrt(v) of noise is O(1)): 1 entry in 1000 then moves by ~ lr * 1e-2."""
    return 1e-5 if "lora" in job else 1e-4


def launch_log(root: Path) -> str:
    err = (root / "torchrun.err").read_text()
    jobs = [line for line in err.splitlines() if line.startswith("rank ") and " starts " in line]
    return f"last jobs started: {jobs[-2:]}\n" + err[-4000:]


def test_launch_exits_cleanly(runs):
    assert (runs / "torchrun.rc").read_text() == "0", launch_log(runs)


def assert_same_run(run: Path, ref: Path) -> None:
    """Per-step losses and the logged stage metrics within 1e-4; the final checkpoint's weights (every
    trainable tensor) within `weights_atol`."""
    errors = sorted(run.parent.glob(f"{run.name}.rank*.error"))
    assert not errors, "\n".join(f"{e.name}: {e.read_text()[-2500:]}" for e in errors)
    assert (run / "checkpoint.pt").exists(), f"{run.name} did not finish: " + launch_log(run.parent)
    assert len(series(ref, "loss")) == STEPS
    for key in COMPARED:
        want = series(ref, key)
        if want:
            torch.testing.assert_close(torch.tensor(series(run, key)), torch.tensor(want), rtol=0, atol=1e-4,
                                       msg=lambda m, key=key: f"{run.name} {key}: {m}")
    w = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    r = torch.load(ref / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert w["step"] == r["step"] == STEPS and w["model"].keys() == r["model"].keys()
    for name in r["model"]:
        torch.testing.assert_close(w["model"][name], r["model"][name], rtol=0, atol=weights_atol(run.name),
                                   msg=lambda m, name=name: f"{run.name} {name}: {m}")


def assert_same_files(a: Path, b: Path, atol: float) -> None:
    """Two safetensors files hold the same tensors within atol."""
    from safetensors.torch import load_file

    x, y = load_file(a), load_file(b)
    assert x.keys() == y.keys() and x
    for name in y:
        torch.testing.assert_close(x[name], y[name], rtol=0, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(SFT_CASES))
def test_sft_on_two_processes_trains_like_one(runs, mode, case):
    assert_same_run(runs / f"{mode}-sft-{case}", runs / f"1p-sft-{case}")
    loss = series(runs / f"1p-sft-{case}", "loss")
    assert loss[-1] < loss[0]  # it trains, so equal trajectories mean something
    export = "adapter/adapter_model.safetensors" if case == "lora" else "hf/model.safetensors"
    assert_same_files(runs / f"{mode}-sft-{case}" / export, runs / f"1p-sft-{case}" / export,
                      weights_atol(case))


@pytest.mark.parametrize("mode, case", [("ddp", "lora"), ("fsdp", "full")])
def test_one_process_checkpoint_resumes_on_two(runs, mode, case):
    assert_same_run(runs / f"{mode}-sft-{case}-from1p", runs / f"1p-sft-{case}")


def test_fsdp_checkpoint_resumes_under_fsdp(runs):
    assert_same_run(runs / "fsdp-sft-lora-cut", runs / "1p-sft-lora")


def test_fsdp_checkpoint_is_the_one_process_format_and_resumes_there(runs, fx):
    ck = torch.load(runs / "fsdp-sft-full-cut" / "checkpoint.pt", weights_only=True)
    ref = torch.load(runs / "1p-sft-full-cut" / "checkpoint.pt", weights_only=True)
    assert ck["model"].keys() == ref["model"].keys()  # whole tensors under the same names
    assert ck["optimizer"]["state"].keys() == ref["optimizer"]["state"].keys()
    for i, st in ref["optimizer"]["state"].items():
        assert ck["optimizer"]["state"][i]["exp_avg"].shape == st["exp_avg"].shape
        torch.testing.assert_close(ck["optimizer"]["state"][i]["exp_avg"], st["exp_avg"], rtol=0, atol=1e-6)
    run_sft(fx, runs / "fsdp-sft-full-cut", "full", resume=True)
    assert_same_run(runs / "fsdp-sft-full-cut", runs / "1p-sft-full")


def test_torchrun_cli_prints_once_and_trains_like_one_process(runs):
    out = (runs / "torchrun.out").read_text()
    assert out.count("run in ") == 1, out  # the CLI's final line, from rank 0 only
    assert_same_run(runs / "ddp-cli-lora", runs / "1p-sft-lora")
    for f in ("adapter/adapter_config.json", "run.json", "loss.png"):
        assert (runs / "ddp-cli-lora" / f).is_file(), f


@pytest.mark.parametrize("mode, job", [(m, j) for m, jobs in STAGES.items() for j in jobs])
def test_stage_on_two_processes_trains_like_one(runs, mode, job):
    assert_same_run(runs / f"{mode}-{job}", runs / f"1p-{job}")
    export = ("reward/model.safetensors" if job.startswith("reward") else
              "adapter/adapter_model.safetensors" if "lora" in job else "hf/model.safetensors")
    assert (runs / f"{mode}-{job}" / export).is_file(), f"{mode}-{job}: no {export}"
    assert_same_files(runs / f"{mode}-{job}" / export, runs / f"1p-{job}" / export, weights_atol(job))


def test_pretrain_cli_under_fsdp_trains_like_one_process(runs):
    assert_same_run(runs / "fsdp-pretrain", runs / "1p-pretrain")
    assert_same_files(runs / "fsdp-pretrain/hf/model.safetensors", runs / "1p-pretrain/hf/model.safetensors",
                      weights_atol("full"))
    assert (runs / "torchrun.out").read_text().count("final: val loss") == 1  # rank 0 only


if __name__ == "__main__":  # the torchrun worker: FIXTURES ROOT
    torch.set_num_threads(1)
    worker(Path(sys.argv[1]), Path(sys.argv[2]))

"""Kill -9 during any post-training stage, then `--resume`: the same per-step metrics as an uninterrupted
run (issue 10, Proof), for every verb: `llmkit sft` (LoRA, dropout on), `dpo` (LoRA, adapters-off
reference), `reward-train` (full), `grpo` (full, frozen-copy reference) and `rlhf` (LoRA, a reward-model
folder). The approach of tests/test_train.py::test_sigkill_then_resume_matches_uninterrupted:

    python -m llmkit STAGE TINY ... --save-every 1 --out RUN    # a subprocess, SIGKILLed mid-run
    llmkit STAGE TINY ... --save-every 1 --out RUN --resume     # finishes the run
    llmkit STAGE TINY ... --save-every 1 --out REF              # the uninterrupted run

compared on CPU with one thread (--threads 1; OMP_NUM_THREADS=1 in the child): every deterministic field of
metrics.jsonl (loss, lr, grad_norm, val_*, train_*, reward, kl, samples, ...; not time / tok_s / mfu) equal
bit for bit, record by record, and so are rollouts.jsonl (RL stages) and the exported folder (adapter / hf /
reward), byte for byte. The child is killed at the worst moment for resume: after it has written records of
a step past its last checkpoint (a metrics line is written before that step's eval and checkpoint, a step's
rollouts before its forward), so resume must drop them. Each test checks that the kill interrupted the run
(killed by the signal, checkpoint step < last step on disk, no export), that every step is logged exactly
once, and that the losses are not constant. `test_resume_survives_a_line_torn_by_the_kill`: a kill in the
middle of a write leaves a torn last line, which resume drops.

Notable choices
- Only the killed run is a subprocess (it must be: SIGKILL). The reference and the resume call the same CLI
  entry point in-process (`llmkit.cli.main`, what `python -m llmkit` runs): a fresh interpreter costs ~5 s
  of imports on this machine, and 10 more of them would double the file's CPU time. The first steps of the
  resumed trajectory come from the killed child, the rest from this process: equality also shows that
  nothing outside the checkpoint carries state between processes.
- The kill moment: the child is polled every 5 ms; when its logs show a step past a checkpoint it is
  stopped (SIGSTOP), the checkpoint and logs are read on the frozen process, and it is killed there
  (SIGKILL) or continued (SIGCONT) if the checkpoint had caught up. So the dirty state is certain, not luck.
- One tiny model for every stage: a 2-layer Llama (d_model 32, default init: near-uniform outputs) with a
  300-token BPE on the toy text and ChatML; its embeddings favour the token "7" so that GRPO on "a + b = 7"
  problems gets groups of mixed rewards (all-zero rewards would make the GRPO loss 0 at every step). The
  rlhf reward model is `RewardModel.from_llm` on it with a random N(0, 1) head.
- sft, dpo and reward-train evaluate after every step: DPO's train_* statistics cover the training batches
  since the previous eval and are not checkpointed (preference.py: "a resumed run restarts that window"),
  so with a window of one step they are comparable too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llmkit.cli import main
from llmkit.train.trainer import CHECKPOINT, METRICS

ROOT = Path(__file__).resolve().parent.parent
SPECIALS = ["<|im_start|>", "<|im_end|>"]
WALL_CLOCK = {"time", "tok_s", "mfu"}  # metrics fields that measure time, not the trajectory
STEPS = 5  # every stage; the kill lands after the first checkpoint (step >= 1), so >= 3 steps remain

QA = [("Quelle est la capitale de la France ?", "Paris."), ("Bonjour !", "Bonjour, comment puis-je aider ?"),
      ("Combien font deux et deux ?", "Quatre."), ("De quelle couleur est le ciel ?", "Bleu.")]
SUBJECTS = ["le ciel", "la mer", "le chat", "la ville", "le pain", "la lune", "le train", "la route",
            "le vent", "la neige", "le jardin", "la porte"]


def pair(s: str) -> dict:
    return {"prompt": f"Parle-moi de {s}.", "chosen": f"Avec plaisir, {s} est beau.", "rejected": "Non."}


pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """The tiny policy (HF folder), a reward model made from it, and the data files of every stage."""
    from llmkit.checkpoint.hf import save_hf_dir
    from llmkit.config import ModelConfig
    from llmkit.model import Transformer
    from llmkit.tokenizer.chat import CHATML_TEMPLATE
    from llmkit.tokenizer.train import train_bpe
    from llmkit.train.reward import RewardModel

    d = tmp_path_factory.mktemp("posttrain_resume")
    problems = [{"question": f"What is {a} + {7 - a}?", "answer": 7} for a in range(8)]
    text = (" ".join(f"{q} {a}" for q, a in QA) + " " + " ".join(" ".join(pair(s).values()) for s in SUBJECTS)
            + " " + " ".join(f"{p['question']} Answer: {p['answer']}" for p in problems)
            + " user assistant system") * 5
    tok = train_bpe([text], 300, special_tokens=SPECIALS, progress=False)
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                      max_seq_len=256, pos_encoding="rope", norm="rmsnorm", mlp="swiglu", activation="silu",
                      eos_token_id=tok.special_tokens["<|im_end|>"],
                      bos_token_id=tok.special_tokens["<|im_start|>"])
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():  # tied (V, d) embeddings: a constant first feature in every row gives the residual
        emb = model.model.embed_tokens.weight  # stream a steady direction (normed: h[0] ~ sqrt(d) = 5.7), and
        emb[:, 0] = 3.0  # the larger one of "7" a logit offset ~0.85 x 5.7 = 4.8 over the 299 others: sampled
        emb[tok.encode("7")[0], 0] = 3.85  # ~1 token in 3, so GRPO's problems (answer 7) get mixed rewards
    save_hf_dir(model, cfg, tok, d / "model", chat_template=CHATML_TEMPLATE)
    rm = RewardModel.from_llm(d / "model", seed=1)
    with torch.no_grad():  # a visible head: rewards that differ between completions
        rm.score.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(3))
    rm.save(d / "rm")

    def jsonl(name: str, rows: list[dict]) -> Path:
        (d / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        return d / name

    chats = [{"tree": i % 4, "messages": [{"role": "user", "content": q},
                                          {"role": "assistant", "content": a}]}
             for i, (q, a) in enumerate(QA * 3)]
    return {"model": d / "model", "rm": d / "rm", "chats": jsonl("chats.jsonl", chats),
            "pairs": jsonl("pairs.jsonl", [pair(s) for s in SUBJECTS[:8]]),
            "pairs_val": jsonl("pairs_val.jsonl", [pair(s) for s in SUBJECTS[8:]]),
            "problems": jsonl("problems.jsonl", problems)}


# Per stage: the verb's arguments after MODEL (paths by fixture key), and the folder its export lands in.
# Few steps, one thread, small held-out sets: sft, dpo and reward-train evaluate after every step, grpo and
# rlhf before the first step and after the last (with greedy samples), so held-out figures are compared too.
_COMMON = ["--steps", str(STEPS), "--threads", "1", "--no-progress", "--seed", "7"]
STAGES = {
    "sft": (["--data", "{chats}", "--lora-r", "4", "--lora-dropout", "0.1", "--batch-size", "2",
             "--block-size", "48", "--lr", "1e-2", "--warmup", "1", "--eval-every", "1",
             "--sample-tokens", "0", "--val-fraction", "0.25"], "adapter"),
    "dpo": (["--data", "{pairs}", "--val", "{pairs_val}", "--lora-r", "4", "--batch-size", "2",
             "--max-length", "48", "--lr", "1e-2", "--warmup", "1", "--eval-every", "1", "--beta", "0.5"],
            "adapter"),
    "reward-train": (["--data", "{pairs}", "--val", "{pairs_val}", "--batch-size", "2", "--grad-accum", "1",
                      "--max-length", "48", "--lr", "1e-2", "--warmup", "1", "--eval-every", "1"], "reward"),
    "grpo": (["--data", "{problems}", "--val", "2", "--group-size", "3", "--prompts-per-step", "2",
              "--max-tokens", "6", "--lr", "2e-2", "--warmup", "1", "--temperature", "1.0",
              "--reward", "correct=1,format=0.5"], "hf"),
    "rlhf": (["--reward-model", "{rm}", "--data", "{pairs}", "--val", "2", "--group-size", "3",
              "--prompts-per-step", "2", "--max-tokens", "6", "--lr", "2e-2", "--warmup", "1",
              "--lora-r", "4", "--beta", "0.1", "--temperature", "1.0"], "adapter"),
}


def _args(stage: str, tiny: dict[str, Path], out: Path, *extra: str) -> list[str]:
    """The verb's command line after `llmkit` (--save-every 1 in every run: the only difference between the
    runs compared is the kill and --resume)."""
    args = [a.format(**{k: str(v) for k, v in tiny.items()}) for a in STAGES[stage][0]]
    return [stage, str(tiny["model"]), *args, *_COMMON, "--save-every", "1", "--out", str(out), *extra]


def _cli(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "llmkit", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def records(run: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock fields."""
    return [{k: v for k, v in r.items() if k not in WALL_CLOCK}
            for r in map(json.loads, (run / METRICS).read_text().splitlines())]


def steps(run: Path) -> list[int]:
    """The step of every training record, in file order (a step logged twice would show)."""
    return [r["step"] for r in records(run) if "loss" in r]


def last_logged(run: Path) -> int:
    """The last step with a training record in metrics.jsonl or a rollout in rollouts.jsonl (0: none yet).
    A line still being written does not parse and is skipped."""
    last = 0
    for name in (METRICS, "rollouts.jsonl"):
        path = run / name
        for line in path.read_text().splitlines() if path.exists() else []:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if name != METRICS or "loss" in r:
                last = max(last, r["step"])
    return last


def kill_past_checkpoint(p: subprocess.Popen, run: Path, stderr: Path) -> tuple[int, int]:
    """SIGKILL the child once it has written records of a step past its checkpoint (the metrics line of step
    k is written before its eval and its checkpoint; the rollouts of step k before its forward), so that
    resume has to drop them. Each candidate moment is checked on the stopped child (SIGSTOP, then read the
    checkpoint and the logs), which is killed there or continued. Returns (checkpoint step, last step
    logged) at the kill."""
    deadline = time.time() + 120
    while p.poll() is None and time.time() < deadline:
        if (run / CHECKPOINT).exists() and last_logged(run) >= 2:
            p.send_signal(signal.SIGSTOP)
            _, status = os.waitpid(p.pid, os.WUNTRACED)
            if not os.WIFSTOPPED(status):
                break  # it ended meanwhile
            ck, logged = torch.load(run / CHECKPOINT, weights_only=True)["step"], last_logged(run)
            if logged > ck:
                p.send_signal(signal.SIGKILL)
                p.wait()
                return ck, logged
            p.send_signal(signal.SIGCONT)
        time.sleep(0.005)
    p.kill()
    p.wait()
    pytest.fail(f"never caught the run past its checkpoint (rc {p.returncode}): {stderr.read_text()[-2000:]}")


def same_files(a: Path, b: Path) -> bool:
    fa = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    fb = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return fa == fb and all((a / f).read_bytes() == (b / f).read_bytes() for f in fa)


@pytest.mark.parametrize("stage", list(STAGES))
def test_sigkill_then_resume_matches_uninterrupted(tiny, tmp_path, stage, capsys):
    export = STAGES[stage][1]
    ref, run = tmp_path / "ref", tmp_path / "killed"
    assert main(_args(stage, tiny, ref)) == 0, capsys.readouterr().err
    want = records(ref)
    assert steps(ref) == list(range(1, STEPS + 1))
    assert len({r["loss"] for r in want if "loss" in r}) > 1, "constant losses: a vacuous comparison"

    with open(tmp_path / "killed.err", "w") as err:
        p = subprocess.Popen(_cli(_args(stage, tiny, run)), env=_env(), stdout=subprocess.DEVNULL, stderr=err)
        killed_at, logged = kill_past_checkpoint(p, run, tmp_path / "killed.err")
    at = f"killed with checkpoint {killed_at}, records up to step {logged}"
    assert p.returncode == -signal.SIGKILL and 1 <= killed_at < logged <= STEPS and killed_at < STEPS, at
    assert not (run / export).exists(), at

    assert main(_args(stage, tiny, run, "--resume")) == 0, capsys.readouterr().err
    got = records(run)
    assert steps(run) == list(range(1, STEPS + 1)), at
    assert got == want, at
    if stage in ("grpo", "rlhf"):
        assert (run / "rollouts.jsonl").read_text() == (ref / "rollouts.jsonl").read_text(), at
    assert (run / export).is_dir() and same_files(run / export, ref / export), at


def test_resume_survives_a_line_torn_by_the_kill(tiny, tmp_path):
    """A kill during a write leaves a torn last line: the Trainer's log() writes a record in one call, but a
    large one (an eval with samples) can be cut short, and the rollouts of a step (a whole group, often more
    than the 8 KiB write buffer) are flushed in pieces. Resume must drop the fragment with the other records
    past the checkpoint (library call: stop_after=2 stands for the kill, then torn lines are appended)."""
    from llmkit.train.grpo import grpo

    kw = dict(val=None, group_size=3, prompts_per_step=2, max_tokens=6, lr=2e-2, warmup=1, steps=3,
              save_every=1, progress=False, threads=1, seed=7)
    run = tmp_path / "run"
    grpo(tiny["model"], tiny["problems"], run, stop_after=2, **kw)
    for name in (METRICS, "rollouts.jsonl"):
        with open(run / name, "a") as f:
            f.write('{"step": 3, "lo')  # cut mid-record, no newline
    grpo(tiny["model"], tiny["problems"], run, resume=True, **kw)
    assert steps(run) == [1, 2, 3]
    rollouts = [json.loads(line) for line in (run / "rollouts.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in rollouts}) == [1, 2, 3]

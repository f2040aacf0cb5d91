"""RLOO (RLHF against a reward model) against independent references: the leave-one-out baseline by hand; the
KL-penalised rewards and advantages by TRL 1.16's code (reproduced with a citation); the loss and its
gradients equal TRL's RLOOTrainer._compute_loss run on the same model and rollouts (clipping exercised);
KL = 0 at the first step; a short run on a toy reward model raises the reward; exact resume; the CLI end to
end with a reward model written by reward-train's RewardModel; prompt formats and one-line errors."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_grpo import tiny_policy_dir, vowel_share

from llmkit.cli import main
from llmkit.errors import LlmkitError
from llmkit.train.grpo import GroupBatches, StepStats
from llmkit.train.rloo import RLOO, leave_one_out, load_prompts, rlhf
from llmkit.train.rollout import completion_logprobs, render_prompts, sample_groups
from llmkit.train.trainer import METRICS

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on one thread

PROMPTS = ["Tom has 3 apples.", "Say hello.", "Count to three.", "Name a toy.", "Anna has 4 books.",
           "What is 2 + 2?", "Pick a colour.", "Leo found 5 shells."]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return tiny_policy_dir(tmp_path_factory.mktemp("tiny_policy"))


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    recs = [{"prompt": p} if i % 3 == 0 else {"prompt": [{"role": "user", "content": p}]} if i % 3 == 1
            else {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": "ok"}]}
            for i, p in enumerate(PROMPTS * 3)]
    f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return f


def rows(run: Path, key: str) -> list[float]:
    return [r[key] for r in map(json.loads, (run / METRICS).read_text().splitlines()) if key in r]


# ----------------------------------------------------------------------------------------------- formulas
def test_leave_one_out_by_hand():
    # k = 3, rewards 1, 2, 3: baselines (2 + 3)/2 = 2.5, (1 + 3)/2 = 2, (1 + 2)/2 = 1.5
    assert leave_one_out(torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 6.0]), 3).tolist() == [-1.5, 0.0, 1.5,
                                                                                       -3.0, -3.0, 6.0]
    with pytest.raises(LlmkitError, match="at least 2"):
        leave_one_out(torch.tensor([1.0]), 1)


def trl_rloo_advantages(rewards, old_lp, ref_lp, mask, beta, k, normalize):
    """trl/trainer/rloo_trainer.py, RLOOTrainer._generate_and_score_completions (TRL 1.16, lines 1664-1698:
    sequence KL penalty, leave-one-out baseline, optional normalisation), reproduced with trl's nanstd."""
    from trl.trainer.utils import nanstd

    per_token_kl = old_lp - ref_lp
    kl = (per_token_kl * mask).sum(-1)
    rewards = rewards - beta * kl
    grouped_rewards = rewards.view(-1, k)
    scorable_counts = (~torch.isnan(grouped_rewards)).sum(dim=1, keepdim=True)
    grouped_sum = torch.nansum(grouped_rewards, dim=1, keepdim=True)
    baselines = ((grouped_sum - grouped_rewards) / (scorable_counts - 1)).view(-1)
    advantages = rewards - baselines
    if normalize:
        advantages = (advantages - torch.nanmean(advantages)) / (nanstd(advantages) + 1e-4)
    return advantages


def _rollouts(tiny_dir, k=4, T=0.8, seed=3):
    import llmkit

    llm = llmkit.load(tiny_dir, dtype="float32")
    prompt = render_prompts(llm.tokenizer, [[{"role": "user", "content": "Say hello."}]])[0]
    ro = sample_groups(llm.model, llm.tokenizer, [prompt] * 2, k, temperature=T, max_tokens=8, seed=seed)
    return llm, prompt, ro


@pytest.mark.parametrize("normalize", [False, True])
def test_penalised_advantages_equal_trl(tiny_dir, normalize):
    """A reference that differs from the policy (a perturbed copy) so the KL penalty is not zero."""
    import copy

    llm, _, ro = _rollouts(tiny_dir)
    ref = copy.deepcopy(llm.model).eval().requires_grad_(False)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    scores = torch.randn(len(ro.texts))
    algo = RLOO(beta=0.1, normalize_advantages=normalize, temperature=0.8, stats=StepStats())
    ours = algo.prepare(llm.model, ref, ro, scores)["adv"]
    with torch.no_grad():
        old = completion_logprobs(llm.model, ro.ids, ro.mask, 0.8)
        ref_lp = completion_logprobs(ref, ro.ids, ro.mask, 0.8)
    assert ((old - ref_lp) * ro.mask).sum(-1).abs().min() > 1e-3
    torch.testing.assert_close(ours, trl_rloo_advantages(scores, old, ref_lp, ro.mask, 0.1, 4, normalize))
    st = algo.stats.flush()
    assert st["kl"] == pytest.approx(float(((old - ref_lp) * ro.mask).sum() / ro.mask.sum()), abs=1e-6)


def test_loss_and_gradients_equal_trl(tiny_dir):
    """Our RLOO loss (LossSum total / count) and gradients against TRL's RLOOTrainer._compute_loss on the
    same model; old log-probs perturbed so that the clipped branch is taken for some sequences."""
    pytest.importorskip("trl")
    from trl.trainer.rloo_trainer import RLOOTrainer
    from trl.trainer.utils import entropy_from_logits, selective_log_softmax

    llm, prompt, ro = _rollouts(tiny_dir, T=0.7)
    model = llm.model.train()
    L, N = len(prompt), len(ro.texts)
    torch.manual_seed(0)
    adv = torch.randn(N)
    with torch.no_grad():
        old_seq = (completion_logprobs(model, ro.ids, ro.mask, 0.7) * ro.mask).sum(1) + 0.3 * torch.randn(N)
    algo = RLOO(epsilon=0.2, epsilon_high=0.28, temperature=0.7)
    total, count = algo(model, {"ids": ro.ids, "mask": ro.mask, "adv": adv, "old_seq_logps": old_seq,
                                "plen": torch.tensor(ro.prompt_lens)})
    ours = total / count
    model.zero_grad()
    ours.backward()
    g_ours = {n: p.grad.clone() for n, p in model.named_parameters()}

    def logps_and_entropies(model_, input_ids, attention_mask, logits_to_keep, **kw):
        logits = model_(input_ids)[:, -logits_to_keep - 1:-1] / 0.7  # (N, Tc, V)
        return (selective_log_softmax(logits, input_ids[:, -logits_to_keep:]),
                entropy_from_logits(logits.detach()), None)

    acc = SimpleNamespace(gather=lambda x: x, reduce=lambda x, reduction="sum": x,
                          gather_for_metrics=lambda x: x)
    fake = SimpleNamespace(epsilon_low=0.2, epsilon_high=0.28, aux_loss_enabled=False, accelerator=acc,
                           model=SimpleNamespace(training=True),
                           _metrics=defaultdict(lambda: defaultdict(list)),
                           _get_per_token_logps_and_entropies=logps_and_entropies)
    inputs = {"prompt_ids": ro.ids[:, :L], "prompt_mask": torch.ones(N, L, dtype=torch.long),
              "completion_ids": ro.ids[:, L:], "completion_mask": ro.mask[:, L:].long(), "old_logps": old_seq,
              "advantages": adv}
    theirs = RLOOTrainer._compute_loss(fake, model, inputs)
    model.zero_grad()
    theirs.backward()
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(g_ours[n], p.grad, atol=1e-6, rtol=1e-4, msg=n)
    assert fake._metrics["train"]["clip_ratio/region_mean"][0] > 0


def test_first_step_kl_is_zero_with_lora(tiny_dir):
    import llmkit
    from llmkit.lora import apply_lora

    llm = llmkit.load(tiny_dir, dtype="float32")
    apply_lora(llm.model, r=4)
    stats = StepStats()
    algo = RLOO(beta=0.1, stats=stats)
    docs = [{"id": str(i), "prompt": [{"role": "user", "content": p}]} for i, p in enumerate(PROMPTS)]
    src = GroupBatches(llm.model.train(), llm.tokenizer, docs, lambda d: d["prompt"],
                       [("rm", vowel_share, 1.0)], algo, prompts_per_step=2, group_size=3, max_tokens=6,
                       stats=stats)
    b = src.next(torch.device("cpu"))
    st = stats.flush()
    assert abs(st["kl"]) < 1e-6 and st["penalised_reward"] == pytest.approx(st["reward"], abs=1e-6)
    torch.testing.assert_close(b["adv"].view(2, 3).sum(1), torch.zeros(2), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------- runs
def test_short_run_raises_toy_reward(tiny_dir, prompt_file, tmp_path):
    out = rlhf(tiny_dir, vowel_share, prompt_file, tmp_path / "run", val=None, group_size=8,
               prompts_per_step=2,
               max_tokens=8, steps=12, lr=5e-2, warmup=1, beta=0.01, progress=False, threads=1)
    reward = rows(out, "reward")  # the reward model's score, here the share of vowels: about 0.1 at first
    assert len(reward) == 12
    assert sum(reward[-3:]) / 3 > sum(reward[:3]) / 3 + 0.15, reward


def test_resume_equals_uninterrupted(tiny_dir, prompt_file, tmp_path):
    kw = dict(val=4, group_size=3, prompts_per_step=2, max_tokens=6, lr=2e-2, warmup=1, beta=0.1,
              progress=False, threads=1)
    full = rlhf(tiny_dir, vowel_share, prompt_file, tmp_path / "full", steps=4, **kw)
    rlhf(tiny_dir, vowel_share, prompt_file, tmp_path / "cut", steps=4, save_every=2, stop_after=2, **kw)
    cut = rlhf(tiny_dir, vowel_share, prompt_file, tmp_path / "cut", steps=4, resume=True, **kw)
    assert rows(full, "loss") == rows(cut, "loss") and len(rows(full, "loss")) == 4
    assert rows(full, "kl") == rows(cut, "kl") and rows(full, "kl")[-1] != 0.0
    assert rows(full, "val_rm_score") == rows(cut, "val_rm_score")
    assert (full / "rollouts.jsonl").read_text() == (cut / "rollouts.jsonl").read_text()
    assert (cut / "hf" / "config.json").exists()


def test_cli_with_reward_model_folder(tiny_dir, prompt_file, tmp_path, capsys):
    from llmkit.train.reward import RewardModel, load_reward_model, reward_fn

    rm_dir = RewardModel.from_llm(str(tiny_dir), seed=1).save(tmp_path / "rm")
    out = tmp_path / "cli"
    rc = main(["rlhf", str(tiny_dir), "--reward-model", str(rm_dir), "--data", str(prompt_file), "--val", "4",
               "--group-size", "2", "--prompts-per-step", "2", "--max-tokens", "6", "--steps", "2",
               "--lr", "1e-3", "--lora-r", "4", "--threads", "1", "--no-progress", "--out", str(out)])
    assert rc == 0 and "adapter in adapter/" in capsys.readouterr().out
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    roll = [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]
    assert len(roll) == 2 * 2 * 2
    rm = load_reward_model(rm_dir)  # the logged reward is the reward model's score of (prompt, completion)
    prompt = [{"role": "user", "content": roll[0]["prompt"]}]
    want = reward_fn(rm, rm.tokenizer)([prompt], [roll[0]["completion"]])
    assert roll[0]["rewards"]["rm"] == pytest.approx(want[0], abs=1e-5)
    ev = [r for r in map(json.loads, (out / METRICS).read_text().splitlines()) if "val_rm_score" in r]
    assert [r["step"] for r in ev] == [0, 2] and len(ev[-1]["samples"]) == 2
    assert main(["rlhf", str(tiny_dir), "--reward-model", str(tmp_path / "nope"), "--data", str(prompt_file),
                 "--out", str(tmp_path / "x")]) == 1
    assert "config.json" in capsys.readouterr().err


def test_prompt_formats_and_errors(prompt_file, tmp_path):
    got = load_prompts(prompt_file)
    assert len(got) == 24 and all(d["prompt"] == [{"role": "user", "content": PROMPTS[i % 8]}]
                                  for i, d in enumerate(got))  # a trailing assistant turn is dropped
    bad = tmp_path / "bad.jsonl"
    for line, msg in [('{"text": "hi"}', "field 'prompt'"), ('{"prompt": []}', "field 'prompt'"),
                      ('{"messages": [{"role": "bot", "content": "x"}]}', r"field 'messages\[0\]'"),
                      ('{"prompt": [{"role": "assistant", "content": "x"}]}',
                       "field 'prompt' must end with a user turn")]:
        bad.write_text('{"prompt": "ok"}\n' + line + "\n")
        with pytest.raises(LlmkitError, match=rf"bad.jsonl:2: {msg}"):
            load_prompts(bad)

"""GRPO against independent references: answer extraction on hand cases; advantages by TRL 1.16's code
(reproduced with trl's own nanstd) and by hand; the loss and its gradients equal TRL's
GRPOTrainer._compute_loss run on the same model and rollouts (every loss_type, clipping exercised); KL = 0 and
ratio = 1 at the first step; the engine's sampled log-probs equal a fresh forward, and our completion
log-probs equal transformers' Llama on the same ids; a short run on a toy reward raises the reward; exact
resume; the CLI end to end; one-line data errors."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from llmkit.cli import main
from llmkit.errors import LlmkitError
from llmkit.train.grpo import GRPO, GroupBatches, StepStats, aggregate, group_advantages, grpo, per_token_loss
from llmkit.train.reward import wilson_interval
from llmkit.train.rewards import (
    arithmetic_problems,
    combine,
    correct_reward,
    extract_answer,
    format_reward,
    load_problems,
    named_rewards,
    problem_prompt,
    split_problems,
)
from llmkit.train.rollout import completion_logprobs, render_prompts, sample_groups
from llmkit.train.trainer import METRICS

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on one thread

SPECIALS = ["<|im_start|>", "<|im_end|>"]


def tiny_policy_dir(folder: Path, seed: int = 0) -> Path:
    """A 2-layer Llama (d_model 32, GPT-2-style init: near-uniform outputs, so groups differ) with a 300-token
    BPE trained on arithmetic problems and a ChatML template, saved as an HF folder."""
    from llmkit.checkpoint.hf import save_hf_dir
    from llmkit.config import ModelConfig
    from llmkit.model import Transformer
    from llmkit.tokenizer.chat import CHATML_TEMPLATE
    from llmkit.tokenizer.train import train_bpe

    text = " ".join(p["question"] + " Answer: " + str(int(p["answer"])) for p in arithmetic_problems(40)) * 3
    tok = train_bpe([text + " user assistant system"], 300, special_tokens=SPECIALS, progress=False)
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                      max_seq_len=256, pos_encoding="rope", norm="rmsnorm", mlp="swiglu", activation="silu",
                      eos_token_id=tok.special_tokens["<|im_end|>"],
                      bos_token_id=tok.special_tokens["<|im_start|>"])
    torch.manual_seed(seed)
    save_hf_dir(Transformer(cfg), cfg, tok, folder, chat_template=CHATML_TEMPLATE)
    return folder


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return tiny_policy_dir(tmp_path_factory.mktemp("tiny_policy"))


@pytest.fixture(scope="module")
def problems() -> list[dict]:
    return arithmetic_problems(40, seed=0)


def vowel_share(prompts, completions, docs) -> list[float]:
    """A toy reward a random model can climb: the share of vowels among the completion's characters."""
    return [sum(ch in "aeiou" for ch in c) / max(1, len(c)) for c in completions]


def rows(run: Path, key: str) -> list[float]:
    return [r[key] for r in map(json.loads, (run / METRICS).read_text().splitlines()) if key in r]


# ----------------------------------------------------------------------------------------------- rewards
@pytest.mark.parametrize("text, want", [
    ("She has 3 + 4 = 7 apples.\n#### 7", 7.0),
    ("so 1,234 in total. #### 1,234", 1234.0),
    ("12 - 5 = 7\nAnswer: 7", 7.0),
    ("answer: 7.0", 7.0),
    ("First 2, then 3. The answer is 5.", 5.0),
    ("We get \\boxed{42} and not 41", 42.0),
    ("3 then 8 then 12.", 12.0),  # no marker: the last number
    ("#### -3.50", -3.5),
    ("It costs $1,000.00 in all", 1000.0),
    ("Answer: 9\n... wait, #### 10", 10.0),  # "#### N" wins over "Answer: N"
    ("no number here", None),
])
def test_extract_answer(text, want):
    assert extract_answer(text) == want


def test_correct_format_and_combined_rewards():
    docs = [{"answer": 7.0}] * 4
    comps = ["3 + 4 = 7\nAnswer: 7", "Answer: 8", "it is 7", "Answer: 7.\n"]
    assert correct_reward([], comps, docs) == [1.0, 0.0, 1.0, 1.0]
    assert format_reward([], comps, docs) == [1.0, 1.0, 0.0, 1.0]
    assert combine("correct=1,format=0.5")([], comps, docs) == [1.5, 0.5, 1.0, 1.5]
    assert [(n, w) for n, _, w in named_rewards({"format": 2})] == [("format", 2.0)]
    with pytest.raises(LlmkitError, match="unknown reward"):
        named_rewards("correct,speed")
    assert wilson_interval(5, 10) == pytest.approx((0.236593, 0.763407), abs=1e-5)  # by hand: (p + z²/2n ...)


def test_problems_generated_loaded_and_split(tmp_path, shared_data):
    probs = arithmetic_problems(200, seed=3, ops="+-*")
    assert len({p["question"] for p in probs}) == 200
    for p in probs:  # the stated answer is the equation's value
        a, op, b = p["equation"].split(" = ")[0].split()
        assert p["answer"] == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op] >= 0
    assert probs == arithmetic_problems(200, seed=3, ops="+-*")
    train, val = split_problems(probs, 20, seed=0)
    assert len(val) == 20 and not {p["question"] for p in val} & {p["question"] for p in train}
    gsm = load_problems(shared_data / "eval" / "gsm8k_test.jsonl")
    assert gsm[0]["answer"] == 18.0 and "rationale" in gsm[0]
    assert load_problems(shared_data / "eval" / "svamp.jsonl")[0]["answer"] == 51.0
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1+1?", "answer": 2}\n{"question": "x?", "answer": "many"}\n')
    with pytest.raises(LlmkitError, match=r"bad.jsonl:2: field 'answer'"):
        load_problems(bad)
    bad.write_text('{"answer": 2}\n')
    with pytest.raises(LlmkitError, match=r"bad.jsonl:1: field 'question'"):
        load_problems(bad)


# ----------------------------------------------------------------------------------------------- formulas
def trl_advantages(rewards: torch.Tensor, G: int, scale: str) -> torch.Tensor:
    """trl/trainer/grpo_trainer.py, GRPOTrainer._generate_and_score_completions (TRL 1.16, lines 2762-2788,
    sum_then_normalize with one reward function), reproduced with trl's own nanstd."""
    from trl.trainer.utils import nanstd

    mean_grouped_rewards = torch.nanmean(rewards.view(-1, G), dim=1).repeat_interleave(G, dim=0)
    if scale in ["group", "none"]:
        std_rewards = nanstd(rewards.view(-1, G), dim=1).repeat_interleave(G, dim=0)
    else:
        std_rewards = nanstd(rewards).expand_as(rewards)
    advantages = rewards - mean_grouped_rewards
    if scale != "none":
        advantages = advantages / (std_rewards + 1e-4)
    return advantages


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_equal_trl(scale):
    r = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.2, 0.2, 0.2, 0.2, 3.0, -1.0, 0.0, 1.0])
    torch.testing.assert_close(group_advantages(r, 4, scale)[0], trl_advantages(r, 4, scale))


def test_advantages_by_hand():
    # two samples, rewards 1 and 0: mean 1/2, Bessel std sqrt(((1/2)² + (1/2)²) / 1) = 0.70711
    adv, std = group_advantages(torch.tensor([1.0, 0.0]), 2, "group")
    assert std.tolist() == pytest.approx([0.707107, 0.707107], abs=1e-6)
    assert adv.tolist() == pytest.approx([0.5 / 0.707207, -0.5 / 0.707207], abs=1e-6)
    # per token: ratio 1, A = 0.7071, ref = logp - 0.1 -> KL = e^-0.1 + 0.1 - 1 = 0.0048374; beta 0.5
    lp = torch.tensor([[0.0, -1.0, -2.0]])
    loss, kl, ratio = per_token_loss(lp, lp, adv[:1], lp - 0.1, 0.5, 0.2, 0.2)
    assert kl[0, 1:].tolist() == pytest.approx([0.0048374] * 2, abs=1e-6)
    assert loss[0, 1:].tolist() == pytest.approx([-0.707007 + 0.5 * 0.0048374] * 2, abs=1e-5)
    # clipping: ratio e^0.5 = 1.65 > 1.2 with A > 0 -> the clipped 1.2 A counts; A < 0 -> the unclipped
    loss, _, _ = per_token_loss(lp + 0.5, lp, torch.tensor([1.0]), None, 0.0, 0.2, 0.2)
    assert loss[0].tolist() == pytest.approx([-1.2] * 3)
    loss, _, _ = per_token_loss(lp + 0.5, lp, torch.tensor([-1.0]), None, 0.0, 0.2, 0.2)
    assert loss[0].tolist() == pytest.approx([1.648721] * 3, abs=1e-6)
    # aggregation: two rows of 1 and 3 trained tokens, per-token losses 1..4
    per, m = torch.tensor([[1.0, 0, 0], [2.0, 3, 4]]), torch.tensor([[1.0, 0, 0], [1, 1, 1]])
    assert [float(x) for x in aggregate(per, m, "dapo", 8)] == [10.0, 4.0]  # 10 / 4 tokens
    assert [float(x) for x in aggregate(per, m, "grpo", 8)] == [4.0, 2.0]  # (1 + 9/3) / 2 rows
    assert [float(x) for x in aggregate(per, m, "dr_grpo", 8)] == [1.25, 2.0]  # 10 / (2 x 8)


def _trl_self(loss_type: str, beta: float, eps: float, eps_high: float, max_tokens: int) -> SimpleNamespace:
    """The attributes GRPOTrainer._compute_loss reads (TRL 1.16), for one process and no accumulation."""
    acc = SimpleNamespace(num_processes=1, gather=lambda x: x, reduce=lambda x, reduction="sum": x,
                          gather_for_metrics=lambda x: x, sync_gradients=True)
    return SimpleNamespace(
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
        beta=beta,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        loss_type=loss_type, epsilon_low=eps, epsilon_high=eps_high, use_vllm=False,
        vllm_importance_sampling_correction=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=max_tokens, accelerator=acc,
        _entropy_bonus_enabled=False, aux_loss_enabled=False, _metrics=defaultdict(lambda: defaultdict(list)),
    )


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo", "bnpo"])
def test_loss_and_gradients_equal_trl(tiny_dir, loss_type):
    """Our GRPO loss (LossSum total / count) and its gradients against TRL's own _compute_loss run on the
    same model: TRL's inputs are prompt ids + right-padded completion ids, its log-probs come from the full
    logits / temperature through trl's selective_log_softmax (the pre-fused-head recipe)."""
    pytest.importorskip("trl")
    from trl.trainer.grpo_trainer import GRPOTrainer
    from trl.trainer.utils import entropy_from_logits, selective_log_softmax

    import llmkit

    llm = llmkit.load(tiny_dir, dtype="float32")
    model, tok = llm.model.train(), llm.tokenizer
    T_, G, max_tokens, beta, eps, eps_high = 0.7, 4, 10, 0.3, 0.2, 0.28
    prompt = render_prompts(tok, [[{"role": "user", "content": "Tom has 3 apples."}]])[0]
    ro = sample_groups(model, tok, [prompt], G, temperature=T_, max_tokens=max_tokens, seed=5)
    assert len(set(ro.texts)) > 1
    L = len(prompt)
    torch.manual_seed(0)
    adv = torch.randn(G)
    comp_mask = ro.mask[:, L:]  # (G, Tc)
    with torch.no_grad():  # a reference and an old policy that differ from the model: KL and clipping act
        ref_lp = completion_logprobs(model, ro.ids, ro.mask, T_) + 0.3 * torch.randn(ro.ids.shape) * ro.mask
        old_lp = completion_logprobs(model, ro.ids, ro.mask, T_) + 0.4 * torch.randn(ro.ids.shape) * ro.mask

    algo = GRPO(beta=beta, epsilon=eps, epsilon_high=eps_high, loss_type=loss_type, temperature=T_,
                max_tokens=max_tokens)
    total, count = algo(model, {"ids": ro.ids, "mask": ro.mask, "adv": adv, "ref_logps": ref_lp,
                                "old_logps": old_lp, "plen": torch.tensor(ro.prompt_lens)})  # packed rows
    ours = total / count
    model.zero_grad()
    ours.backward()
    g_ours = {n: p.grad.clone() for n, p in model.named_parameters()}

    def logps_and_entropies(model_, input_ids, attention_mask, logits_to_keep, **kw):
        logits = model_(input_ids)[:, -logits_to_keep - 1:-1] / T_  # (G, Tc, V)
        return (selective_log_softmax(logits, input_ids[:, -logits_to_keep:]),
                entropy_from_logits(logits.detach()), None)

    fake = _trl_self(loss_type, beta, eps, eps_high, max_tokens)
    fake._get_per_token_logps_and_entropies = logps_and_entropies
    inputs = {"prompt_ids": ro.ids[:, :L], "prompt_mask": torch.ones(G, L, dtype=torch.long),
              "completion_ids": ro.ids[:, L:], "completion_mask": comp_mask.long(), "advantages": adv,
              "ref_per_token_logps": ref_lp[:, L:], "old_per_token_logps": old_lp[:, L:],
              "num_items_in_batch": comp_mask.sum()}
    theirs = GRPOTrainer._compute_loss(fake, model, inputs)
    model.zero_grad()
    theirs.backward()
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(g_ours[n], p.grad, atol=1e-6, rtol=1e-4, msg=n)
    assert fake._metrics["train"]["clip_ratio/region_mean"][0] > 0  # the clipped branch was exercised


@pytest.mark.parametrize("lora_r", [None, 4])
def test_first_step_kl_zero_ratio_one(tiny_dir, problems, lora_r):
    """At the first step the policy is the reference (LoRA: B = 0; full: the frozen copy) and the sampling
    policy: KL = 0 and ratio = 1 at every completion token."""
    import copy

    import llmkit
    from llmkit.lora import apply_lora

    llm = llmkit.load(tiny_dir, dtype="float32")
    model = llm.model.train()
    ref = None
    if lora_r:
        apply_lora(model, r=lora_r)
    else:
        ref = copy.deepcopy(model).eval().requires_grad_(False)
    stats = StepStats()
    algo = GRPO(beta=0.04, temperature=0.9, stats=stats)
    src = GroupBatches(model, llm.tokenizer, problems, problem_prompt, named_rewards("correct"), algo,
                       prompts_per_step=2, group_size=4, micro_batches=2, max_tokens=6, temperature=0.9,
                       ref=ref, stats=stats)
    for _ in range(2):  # both micro-batches of the step
        b = src.next(torch.device("cpu"))
        logps = completion_logprobs(model, b["ids"], b["mask"], 0.9)
        _, kl, ratio = per_token_loss(logps, logps.detach(), b["adv"], b["ref_logps"], 0.04, 0.2, 0.2)
        m = b["mask"].bool()
        assert m.any()
        assert kl[m].abs().max() < 1e-6
        assert torch.equal(ratio[m], torch.ones(int(m.sum())))
        algo(model, b)
    st = stats.flush()
    assert st["kl"] < 1e-6 and st["clip_ratio"] == 0.0


# ----------------------------------------------------------------------------------------------- rollouts
def test_rollout_logprobs_equal_fresh_forward_and_transformers(tiny_llama_dir):
    """The engine's log-probs of the sampled tokens (KV-cached decode) equal one fresh forward over the ids;
    our completion log-probs at temperature 0.8, plain and packed (a prompt's completions in one row, one
    completion masked out as mask_truncated does), equal transformers' Llama logits / 0.8 on the same ids."""
    transformers = pytest.importorskip("transformers")
    import llmkit

    llm = llmkit.load(tiny_llama_dir, dtype="float32")
    prompts = render_prompts(llm.tokenizer, [[{"role": "user", "content": "What is 2 + 3?"}],
                                             [{"role": "user", "content": "Name a colour, please."}]])
    ro = sample_groups(llm.model, llm.tokenizer, prompts, 3, temperature=1.0, max_tokens=12, seed=1,
                       record_logprobs=True)
    assert ro.ids.shape[0] == 6 and ro.mask.sum() > 12
    for n, (k, c) in enumerate(zip(ro.prompt_lens, ro.completion_lens)):
        assert ro.ids[n, :k].tolist() == prompts[n // 3]  # row b*G + g holds prompt b
        assert ro.mask[n, k:k + c].all() and ro.mask[n].sum() == c
    with torch.no_grad():
        fresh = completion_logprobs(llm.model, ro.ids, ro.mask, 1.0)
    torch.testing.assert_close(fresh, ro.sampling_logps, atol=2e-4, rtol=0)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    mask = ro.mask.clone()
    mask[4] = 0  # a completion that does not train
    with torch.no_grad():
        ours = completion_logprobs(llm.model, ro.ids, mask, 0.8)
        packed = completion_logprobs(llm.model, ro.ids, mask, 0.8, ro.prompt_lens)
        logits = hf(ro.ids).logits[:, :-1].float() / 0.8  # (N, T-1, V)
        ref = torch.log_softmax(logits, -1).gather(-1, ro.ids[:, 1:, None])[..., 0]
    m = mask[:, 1:].bool()
    torch.testing.assert_close(ours[:, 1:][m], ref[m], atol=1e-4, rtol=0)
    torch.testing.assert_close(packed[:, 1:][m], ref[m], atol=1e-4, rtol=0)
    assert not packed[~mask.bool()].any() and not ours[~mask.bool()].any()


def test_same_seed_same_rollouts_other_seed_differs(tiny_dir):
    import llmkit

    llm = llmkit.load(tiny_dir, dtype="float32")
    p = render_prompts(llm.tokenizer, [[{"role": "user", "content": "Anna has 4 books."}]])
    a, b, c = (sample_groups(llm.model, llm.tokenizer, p, 4, max_tokens=8, seed=s) for s in (7, 7, 8))
    assert torch.equal(a.ids, b.ids) and a.texts == b.texts
    assert not torch.equal(a.ids, c.ids)


# ----------------------------------------------------------------------------------------------- runs
def test_short_run_raises_toy_reward(tiny_dir, problems, tmp_path):
    out = grpo(tiny_dir, problems, tmp_path / "run", val=None, group_size=8, prompts_per_step=2, max_tokens=8,
               steps=12, lr=5e-2, warmup=1, rewards=[(vowel_share, 1.0)], progress=False, threads=1)
    reward = rows(out, "reward")  # about 0.1 at first; 0.3 to 0.6 after 12 steps (run seeds 1, 2, 3, 1337)
    assert len(reward) == 12
    assert sum(reward[-3:]) / 3 > sum(reward[:3]) / 3 + 0.15, reward
    roll = [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]
    assert len(roll) == 12 * 16 and {"step", "prompt", "completion", "rewards", "advantage"} <= set(roll[0])
    first = [r for r in roll if r["step"] == 1 and r["id"] == roll[0]["id"]]  # one group: advantages sum to 0
    assert abs(sum(r["advantage"] for r in first)) < 1e-4
    assert (out / "hf" / "config.json").exists() and (out / "loss.png").exists()


@pytest.mark.parametrize("lora_r", [None, 4])
def test_resume_equals_uninterrupted(tiny_dir, problems, tmp_path, lora_r):
    kw = dict(val=4, group_size=4, prompts_per_step=2, max_tokens=6, lr=2e-2, warmup=1, progress=False,
              threads=1, lora_r=lora_r, grad_accum=2, rewards=[(vowel_share, 1.0)])
    full = grpo(tiny_dir, problems, tmp_path / "full", steps=4, **kw)
    grpo(tiny_dir, problems, tmp_path / "cut", steps=4, save_every=2, stop_after=2, **kw)
    assert len(rows(tmp_path / "cut", "loss")) == 2
    cut = grpo(tiny_dir, problems, tmp_path / "cut", steps=4, resume=True, **kw)
    assert rows(full, "loss") == rows(cut, "loss")
    assert rows(full, "reward") == rows(cut, "reward")
    assert rows(full, "val_accuracy") == rows(cut, "val_accuracy")
    assert (full / "rollouts.jsonl").read_text() == (cut / "rollouts.jsonl").read_text()
    assert (cut / ("adapter" if lora_r else "hf")).is_dir()


def test_cli_end_to_end(tiny_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(["grpo", str(tiny_dir), "--arithmetic", "30", "--val", "6", "--group-size", "4",
               "--prompts-per-step", "2", "--max-tokens", "6", "--steps", "2", "--lr", "1e-3",
               "--lora-r", "4",
               "--reward", "correct=1,format=0.5", "--loss-type", "grpo", "--threads", "1", "--no-progress",
               "--out", str(out)])
    assert rc == 0
    assert "adapter in adapter/" in capsys.readouterr().out
    assert (out / "adapter" / "adapter_config.json").exists()
    run = json.loads((out / "run.json").read_text())
    assert run["rewards"] == {"correct": 1.0, "format": 0.5} and run["algorithm"]["loss_type"] == "grpo"
    ev = [r for r in map(json.loads, (out / METRICS).read_text().splitlines()) if "val_accuracy" in r]
    assert [r["step"] for r in ev] == [0, 2] and ev[0]["val_n"] == 6
    assert ev[0]["val_acc_low"] <= ev[0]["val_accuracy"] <= ev[0]["val_acc_high"]
    assert len(ev[-1]["samples"]) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "2+2?"}\n')
    assert main(["grpo", str(tiny_dir), "--data", str(bad), "--out", str(tmp_path / "x")]) == 1
    assert "bad.jsonl:1: field 'answer' is missing" in capsys.readouterr().err

"""Reward model against independent references: rewards equal transformers'
AutoModelForSequenceClassification on the exported folder (right-padded batch, pad id inside the texts); the
Bradley-Terry loss and its gradients equal TRL 1.16's RewardTrainer.compute_loss run on the transformers model
(and hand-computed values); truncation keeps the end; held-out accuracy rises above chance on a toy task;
exact resume; the CLI end to end; one-line errors."""

from __future__ import annotations

import ast
import importlib.util
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from llmkit.cli import main
from llmkit.errors import LlmkitError
from llmkit.tokenizer.chat import CHATML_TEMPLATE
from llmkit.train.preference import Pair, encode_response
from llmkit.train.reward import (
    RewardBatches,
    RewardModel,
    accuracy_stats,
    bradley_terry,
    encode_reward_pairs,
    load_reward_model,
    loss_fn,
    reward_accuracy,
    reward_fn,
    reward_train,
    wilson_interval,
)
from llmkit.train.trainer import CHECKPOINT, METRICS, TrainConfig

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on one thread

PROMPTS = [[{"role": "user", "content": "Hi there"}],
           [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}],
           [{"role": "user", "content": "Name a colour."}]]
COMPLETIONS = ["Hello! How can I help you today?", "6", "Blue, like the sky on a clear summer day."]

# toy task: the chosen answer repeats the prompt's words and thanks ("merci"), the rejected one does not
WORDS = ["rouge", "bleu", "vert", "jaune", "chat", "chien", "lune", "pomme", "livre", "porte", "mer", "vent"]


def toy_records() -> list[dict]:
    recs = []
    for i, a in enumerate(WORDS):
        for j, b in enumerate(WORDS):
            if i != j:
                recs.append({"id": f"{a}-{b}", "prompt": f"Dis {a} {b}", "chosen": f"{a} {b} merci",
                             "rejected": f"{b} {a} non"})
    return recs


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama (d_model 32) with a BPE trained on the toy text and a ChatML template."""
    from llmkit.checkpoint.hf import save_hf_dir
    from llmkit.config import ModelConfig
    from llmkit.model import Transformer
    from llmkit.tokenizer.train import train_bpe

    text = " ".join(f"Dis {w} merci non user assistant system" for w in WORDS) * 10
    tok = train_bpe([text], 300, special_tokens=["<|im_start|>", "<|im_end|>"], progress=False)
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                      max_seq_len=128, pos_encoding="rope", norm="rmsnorm", mlp="swiglu", activation="silu",
                      eos_token_id=tok.special_tokens["<|im_end|>"],
                      bos_token_id=tok.special_tokens["<|im_start|>"])
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("toy_rm")
    save_hf_dir(Transformer(cfg), cfg, tok, d, chat_template=CHATML_TEMPLATE)
    return d


@pytest.fixture(scope="module")
def toy_files(tmp_path_factory) -> tuple[Path, Path]:
    """(train, held-out) JSONL: held-out prompts use word pairs never seen in training."""
    recs = toy_records()
    val = [r for k, r in enumerate(recs) if k % 6 == 0]
    train = [r for k, r in enumerate(recs) if k % 6 != 0]
    d = tmp_path_factory.mktemp("toy_data")
    for name, rows in (("train.jsonl", train), ("val.jsonl", val)):
        (d / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d / "train.jsonl", d / "val.jsonl"


def cfg(**kw) -> TrainConfig:
    base = dict(steps=6, batch_size=4, lr=1e-2, warmup=1, eval_every=3, progress=False, threads=1)
    return TrainConfig(**{**base, **kw})


def metric(run: Path, key: str) -> list[float]:
    return [r[key] for r in map(json.loads, (run / METRICS).read_text().splitlines()) if key in r]


@pytest.fixture(scope="module")
def tiny_rm(toy_dir, tmp_path_factory) -> tuple[RewardModel, Path]:
    """A reward model on the toy Llama (pad id = <|im_end|>, which ends every turn), with N(0, 0.2²) matrices
    and an N(0, 1) head so that rewards differ visibly, saved as an HF folder."""
    rm = RewardModel.from_llm(toy_dir, seed=1)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in rm.parameters():
            if p.dim() == 2:
                p.normal_(0, 1.0 if p is rm.score.weight else 0.2, generator=g)
    return rm, rm.save(tmp_path_factory.mktemp("tiny_rm") / "reward")


# ------------------------------------------------------------------------------------------ HF parity
def test_rewards_equal_transformers_sequence_classification(tiny_rm):
    rm, folder = tiny_rm
    hf_cfg = json.loads((folder / "config.json").read_text())
    assert hf_cfg["architectures"] == ["LlamaForSequenceClassification"]
    assert hf_cfg["id2label"] == {"0": "LABEL_0"}
    auto = transformers.AutoModelForSequenceClassification
    hf, info = auto.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]  # model.* + score.weight, nothing else
    hf.eval()
    assert hf.config.num_labels == 1 and hf.config.pad_token_id == rm.pad_id == rm.tokenizer.eos_id
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    chats = [p + [{"role": "assistant", "content": c}] for p, c in zip(PROMPTS, COMPLETIONS)]
    rows = [list(hf_tok.apply_chat_template(chat, tokenize=True)["input_ids"]) for chat in chats]
    T = max(map(len, rows))
    pad = hf.config.pad_token_id
    ids = torch.tensor([r + [pad] * (T - len(r)) for r in rows])  # (3, T) right-padded
    mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows])  # (3, T)
    assert len(set(map(len, rows))) == 3 and all(pad in r[:-1] for r in rows)  # pad id inside every text
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits.squeeze(-1)  # (3,)
        ours = rm(ids, attention_mask=mask)
        one_early = rm(ids, lengths=mask.sum(1) - 1)  # read one token too early (the <|im_end|>)
    assert (one_early - ref).abs().min() > 1e-2  # so reading the wrong token would show
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    # the RLHF scorer renders as transformers' chat template does; the reloaded folder scores the same
    torch.testing.assert_close(torch.tensor(reward_fn(rm, rm.tokenizer, batch_size=2)(PROMPTS, COMPLETIONS)),
                               ref, atol=1e-4, rtol=0)
    again = load_reward_model(folder)
    assert again.pad_id == rm.pad_id
    torch.testing.assert_close(torch.tensor(reward_fn(again, None)(PROMPTS, COMPLETIONS, [{}] * 3)), ref,
                               atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------ TRL parity
def trl_compute_loss():
    """TRL 1.16's RewardTrainer.compute_loss, its source read from the installed trl and executed as is
    (importing trl.trainer pulls accelerate/datasets in: ~15 s); its trainer `self` is a stub."""
    spec = importlib.util.find_spec("trl")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("trl is not installed (test-only reference)")
    src = (Path(spec.submodule_search_locations[0]) / "trainer" / "reward_trainer.py").read_text()
    cls = next(n for n in ast.parse(src).body if isinstance(n, ast.ClassDef) and n.name == "RewardTrainer")
    fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "compute_loss")
    ns: dict = {"torch": torch, "nn": nn}
    exec(compile(ast.Module([fn], type_ignores=[]), "trl/trainer/reward_trainer.py", "exec"), ns)
    return ns["compute_loss"]


@pytest.mark.parametrize("margin,coef", [(False, None), (True, 0.01)])
def test_loss_and_grads_equal_trl_reward_trainer(tiny_rm, margin, coef):
    rm, folder = tiny_rm
    tok = rm.tokenizer
    pairs = [Pair(p, c, r, str(i)) for i, (p, c, r) in
             enumerate(zip(PROMPTS, COMPLETIONS, ["No.", COMPLETIONS[0], "I will not say."]))]
    enc, _ = encode_reward_pairs(tok, pairs)
    batch = RewardBatches(enc, batch_size=3, seed=0, pad_id=rm.pad_id).next("cpu")  # packed: prompt once
    assert batch["ids"].shape[0] == 3 and int(batch["segments"].max()) == 2
    order = batch["index"].tolist()
    margins = torch.tensor([0.5, -1.0, 2.0])[order]
    if margin:
        batch["margin"] = margins
    rm.zero_grad()
    total, count = loss_fn(rm, batch, center_rewards_coefficient=coef)
    ours = total / count
    ours.backward()

    hf = transformers.AutoModelForSequenceClassification.from_pretrained(folder)
    hf.train()  # dropout is 0: train mode changes nothing but the metric names
    examples = [{"chosen_ids": enc[i].prompt + enc[i].chosen, "rejected_ids": enc[i].prompt + enc[i].rejected}
                for i in order]
    T = max(len(x) for e in examples for x in e.values())
    rows = [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
    inputs = {"input_ids": torch.tensor([r + [rm.pad_id] * (T - len(r)) for r in rows]),  # TRL's collator
              "attention_mask": torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows])}
    if margin:
        inputs["margin"] = margins
    gather = SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x)
    names = ("num_tokens", "min_reward", "mean_reward", "max_reward", "accuracy", "margin")
    stub = SimpleNamespace(model=hf, args=SimpleNamespace(center_rewards_coefficient=coef),
                           accelerator=gather, _total_train_tokens=0, _tp_size=1,
                           _metrics={"train": {k: [] for k in names}})
    ref = trl_compute_loss()(stub, hf, inputs)
    ref.backward()
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)
    assert stub._metrics["train"]["accuracy"]  # TRL's code really ran
    ref_grads = dict(hf.named_parameters())
    checked = 0
    for name, p in rm.named_parameters():
        hf_name = name.removeprefix("transformer.")
        if hf_name == "lm_head.weight":
            continue
        g, g_ref = p.grad.clone(), ref_grads[hf_name].grad.clone()
        if hf_name == "model.embed_tokens.weight":
            # transformers builds Embedding(padding_idx=pad_token_id): the pad id's row (<|im_end|>, in every
            # text) gets no gradient there; llmkit trains it like any token. Compared apart from that row.
            assert g_ref[rm.pad_id].abs().max() == 0 < g[rm.pad_id].abs().max()
            g[rm.pad_id] = g_ref[rm.pad_id] = 0
        scale = float(g_ref.abs().max())  # fp32 sums in another order: error relative to the largest entry
        torch.testing.assert_close(g, g_ref, atol=1e-6 * max(1.0, scale), rtol=1e-4, msg=hf_name)
        checked += 1
    assert checked == len(ref_grads)
    assert rm.score.weight.grad.abs().sum() > 0


def test_bradley_terry_hand_values():
    rc, rr = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    # -log sigmoid(1) = log(1 + e^-1); -log sigmoid(-2) = log(1 + e^2)
    hand = [math.log1p(math.exp(-1)), math.log1p(math.exp(2))]
    torch.testing.assert_close(bradley_terry(rc, rr), torch.tensor(hand))
    # margin 0.5 on the first pair: log(1 + e^-(1 - 0.5)); centering 0.1 * (r_c + r_r)^2
    torch.testing.assert_close(bradley_terry(rc, rr, torch.tensor([0.5, 0.0]), 0.1),
                               torch.tensor([math.log1p(math.exp(-0.5)) + 0.1, hand[1] + 0.1 * 4]))


def test_accuracy_ties_and_wilson_interval():
    low, high = wilson_interval(8, 10)  # textbook: 8/10 -> [0.490, 0.943]
    assert (round(low, 3), round(high, 3)) == (0.490, 0.943)
    st = accuracy_stats([1.0, 0.0, 2.0, 5.0], [0.0, 0.0, 3.0, 1.0])  # win, tie, loss, win
    assert st["accuracy"] == 2.5 / 4 and st["margin"] == (1 + 0 - 1 + 4) / 4 and st["pairs"] == 4
    assert st["accuracy_low"] < 0.5 < st["accuracy_high"]


def test_too_long_sequences_keep_their_end(tiny_rm):
    rm, _ = tiny_rm
    tok = rm.tokenizer
    pair = Pair(PROMPTS[1], COMPLETIONS[2], "No.", "p")
    full_c = encode_response(tok, pair.prompt, pair.chosen)[0]
    full_r = encode_response(tok, pair.prompt, pair.rejected)[0]
    (e,), cut = encode_reward_pairs(tok, [pair], max_length=len(full_c) - 5)
    assert cut == 1 and e.prompt + e.chosen == full_c[5:]  # the longer sequence keeps its last tokens
    assert e.prompt + e.rejected == full_r[5:] and e.rejected == full_r[len(full_r) - len(e.rejected):]
    (e,), _ = encode_reward_pairs(tok, [pair], max_length=3)  # an answer longer than max_length alone
    assert e.prompt == [] and e.chosen == full_c[-3:] and e.rejected == full_r[-3:]
    # reward_fn: the last max_length tokens of prompt + completion, read where the full text is read
    short = reward_fn(rm, tok, max_length=len(full_c) - 5)([pair.prompt], [pair.chosen])
    with torch.no_grad():
        ref = rm(torch.tensor([full_c[5:]]))
    torch.testing.assert_close(torch.tensor(short), ref, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------- training
def test_heldout_accuracy_rises_above_chance(toy_dir, toy_files, tmp_path):
    train_file, val_file = toy_files
    out = reward_train(toy_dir, train_file, tmp_path / "run", cfg(steps=16, eval_every=8, lr=2e-2),
                       val=val_file, lora_r=8, lora_alpha=16, center_rewards_coefficient=0.01)
    acc, low = metric(out, "val_accuracy"), metric(out, "val_accuracy_low")
    assert metric(out, "loss")[0] == pytest.approx(math.log(2), abs=0.05)  # small head: rewards start near 0
    assert len(acc) == 2 and low[-1] > 0.5 and acc[-1] >= 0.9  # 22 held-out pairs, Wilson interval above 1/2
    info = json.loads((out / "run.json").read_text())
    assert info["mode"] == "lora" and info["pairs"] == {"train": 110, "val": 22, "val_source": "given"}
    assert (out / "loss.png").is_file() and (out / CHECKPOINT).is_file()
    # the exported folder (LoRA merged) reproduces the logged final accuracy
    rm = load_reward_model(out / "reward")
    from llmkit.train.preference import load_pairs

    res = reward_accuracy(rm, rm.tokenizer, load_pairs(val_file), batch_size=4)
    assert res["accuracy"] == acc[-1]
    assert res["margin"] == pytest.approx(metric(out, "val_margin")[-1], abs=1e-4)


def test_head_only_trains_only_the_head(toy_dir, toy_files, tmp_path):
    from safetensors.torch import load_file

    train_file, val_file = toy_files
    c = cfg(steps=3, eval_every=0)
    out = reward_train(toy_dir, train_file, tmp_path / "run", c, val=val_file, head_only=True)
    ck = torch.load(out / CHECKPOINT, map_location="cpu", weights_only=True)
    assert set(ck["model"]) == {"score.weight"}  # the Trainer saw one trainable tensor
    base = load_file(str(toy_dir / "model.safetensors"))
    done = load_file(str(out / "reward" / "model.safetensors"))
    assert set(done) == {*base, "score.weight"} - {"lm_head.weight"}
    assert all(torch.equal(base[k], done[k]) for k in done if k != "score.weight")  # the body is untouched
    fresh = RewardModel.from_llm(toy_dir, seed=c.seed).score.weight.detach()
    assert not torch.equal(done["score.weight"], fresh)  # the head moved from its init
    with pytest.raises(LlmkitError, match="exclude each other"):
        reward_train(toy_dir, train_file, tmp_path / "x", c, head_only=True, lora_r=4)


@pytest.mark.parametrize("lora_r", [None, 4])
def test_resume_equals_uninterrupted(toy_dir, toy_files, tmp_path, lora_r):
    train_file, _ = toy_files
    kw = dict(lora_r=lora_r, lora_dropout=0.1 if lora_r else 0.0, val_fraction=0.2)
    reward_train(toy_dir, train_file, tmp_path / "ref", cfg(), **kw)
    reward_train(toy_dir, train_file, tmp_path / "cut", cfg(save_every=3), stop_after=3, **kw)
    assert not (tmp_path / "cut" / "reward").exists()  # interrupted: no export
    reward_train(toy_dir, train_file, tmp_path / "cut", cfg(), resume=True, **kw)
    for key in ("loss", "val_accuracy", "val_margin"):
        assert metric(tmp_path / "cut", key) == metric(tmp_path / "ref", key)
    from safetensors.torch import load_file

    a, b = (load_file(str(tmp_path / r / "reward" / "model.safetensors")) for r in ("ref", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------ CLI, errors
def test_cli_writes_reward_folder_and_one_line_errors(toy_dir, toy_files, tmp_path, capsys):
    train_file, val_file = toy_files
    out = tmp_path / "run"
    rc = main(["reward-train", str(toy_dir), "--data", str(train_file), "--val", str(val_file),
               "--lora-r", "4", "--lora-targets", "q_proj,v_proj", "--steps", "2", "--batch-size", "2",
               "--eval-every", "0", "--out", str(out), "--no-progress", "--threads", "1"])
    assert rc == 0 and "reward/" in capsys.readouterr().out
    assert metric(out, "val_accuracy") and json.loads((out / "run.json").read_text())["lora"]["targets"] == [
        "q_proj", "v_proj"]
    rm = load_reward_model(out / "reward")
    assert len(reward_fn(rm)([PROMPTS[0]], ["Bonjour"])) == 1

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "chosen": "y"}) + "\n")
    cases = [
        (["--data", str(tmp_path / "missing.jsonl")], "missing.jsonl: no such file"),
        (["--data", str(bad)], f"{bad}:1: field 'rejected' is missing"),
        (["--data", str(train_file), "--center-rewards-coefficient", "-1"], "must be >= 0"),
        (["--data", str(train_file), "--lora-r", "2", "--lora-targets", ","], "--lora-targets is empty"),
    ]
    for args, msg in cases:
        assert main(["reward-train", str(toy_dir), *args, "--out", str(tmp_path / "e"), "--no-progress"]) == 1
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, err
    with pytest.raises(LlmkitError, match="not a ...ForSequenceClassification") as e:
        load_reward_model(toy_dir)  # a causal LM folder
    assert "\n" not in str(e.value)
    with pytest.raises(LlmkitError, match="2 prompts but 1 completions"):
        reward_fn(rm)(PROMPTS[:2], ["x"])

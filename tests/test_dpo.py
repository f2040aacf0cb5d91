"""DPO against independent references: TRL 1.16's own DPOTrainer loss code (loss, rewards, log-probs and
gradients on the same tiny transformers Llama and batch), hand-computed losses, transformers' chat template
for the answer mask; plus the reference by disabled adapters == a frozen copy, preference data formats and
their one-line errors, batching/sharding/truncation, a toy run whose held-out reward accuracy rises, exact
resume and the CLI."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

import llmkit
from llmkit.cli import main
from llmkit.errors import LlmkitError
from llmkit.lora import apply_lora, load_adapter, lora_modules
from llmkit.tokenizer.chat import CHATML_TEMPLATE, render_chat
from llmkit.train.preference import (
    DPOLoss,
    EncodedPair,
    Pair,
    PairBatches,
    collate,
    dpo,
    dpo_loss,
    encode_pair,
    encode_pairs,
    encode_response,
    load_pairs,
    pack_pairs,
    pair_logprobs,
    pair_scores,
    preference_accuracy,
    reference_logprobs,
    split_pairs,
    truncate_pair,
)
from llmkit.train.trainer import METRICS, TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on one thread

MULTI = [{"role": "user", "content": "How do I boil an egg?"},
         {"role": "assistant", "content": "Put it in boiling water."},
         {"role": "user", "content": "For how long?"}]
PAIRS = [
    Pair(MULTI, "About nine minutes for a hard egg.", "Forever.", "a"),
    Pair([{"role": "user", "content": "Say hi."}], "Hi!", "I will not, and you cannot make me.", "b"),
    Pair([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}], "4.", "5", "c"),
]

# toy task: answers in the polite style are preferred, whatever the subject; held-out subjects differ
SUBJECTS = ["le ciel", "la mer", "le chat", "la ville", "le pain", "la lune", "le train", "la route",
            "le vent", "la neige", "le jardin", "la porte", "le livre", "la table", "le fromage", "la pluie"]


def toy_record(s: str) -> dict:
    return {"prompt": f"Parle-moi de {s}.", "chosen": f"Avec plaisir, {s} est beau.", "rejected": "Non."}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama (d_model 32) with a 300-token BPE trained on the toy text, ChatML template."""
    from llmkit.checkpoint.hf import save_hf_dir
    from llmkit.config import ModelConfig
    from llmkit.model import Transformer
    from llmkit.tokenizer.train import train_bpe

    text = " ".join(" ".join(toy_record(s).values()) + " user assistant system" for s in SUBJECTS) * 10
    tok = train_bpe([text], 300, special_tokens=["<|im_start|>", "<|im_end|>"], progress=False)
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                      max_seq_len=128, pos_encoding="rope", norm="rmsnorm", mlp="swiglu", activation="silu",
                      eos_token_id=tok.special_tokens["<|im_end|>"],
                      bos_token_id=tok.special_tokens["<|im_start|>"])
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny_chat")
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    save_hf_dir(model, cfg, tok, d, chat_template=CHATML_TEMPLATE)
    return d


@pytest.fixture(scope="module")
def toy_files(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("toy_pairs")
    train, val = d / "train.jsonl", d / "val.jsonl"
    train.write_text("".join(json.dumps(toy_record(s), ensure_ascii=False) + "\n" for s in SUBJECTS[:10]))
    val.write_text("".join(json.dumps(toy_record(s), ensure_ascii=False) + "\n" for s in SUBJECTS[10:]))
    return train, val


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_llama_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(tiny_llama_dir)


def perturb(models: list[torch.nn.Module], scale: float = 0.3, seed: int = 1) -> None:
    """Add the same seeded noise to the parameters of equal names (llmkit uses transformers' names)."""
    g = torch.Generator().manual_seed(seed)
    params = [dict(m.named_parameters()) for m in models]
    assert all(set(p) == set(params[0]) for p in params)
    with torch.no_grad():
        for name in sorted(params[0]):
            ref = params[0][name]
            noise = scale * ref.std() * torch.randn(ref.shape, generator=g)
            for p in params:
                p[name].add_(noise)


def metric(run: Path, key: str) -> list:
    return [r[key] for r in map(json.loads, (run / METRICS).read_text().splitlines()) if key in r]


def cfg(**kw) -> TrainConfig:
    base = dict(steps=6, batch_size=4, block_size=64, lr=1e-2, warmup=1, eval_every=3, progress=False,
                threads=1, weight_decay=0.0)
    return TrainConfig(**{**base, **kw})


# ----------------------------------------------------------------------------------------------- loss
def test_dpo_loss_by_hand():
    pc, pr = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0])
    rc, rr = torch.tensor([-3.5, -4.0]), torch.tensor([-3.0, -3.0])
    beta = 0.5
    losses, cr, rj = dpo_loss(pc, pr, rc, rr, beta)
    for i in range(2):
        d = beta * ((pc[i] - rc[i]) - (pr[i] - rr[i])).item()
        assert math.isclose(losses[i].item(), math.log(1 + math.exp(-d)), rel_tol=1e-6)
        assert math.isclose(cr[i].item(), beta * (pc[i] - rc[i]).item(), rel_tol=1e-6)
        assert math.isclose(rj[i].item(), beta * (pr[i] - rr[i]).item(), rel_tol=1e-6)
    eps = 0.1  # conservative DPO: (1 - eps) * -log s(d) + eps * -log s(-d)
    ls, _, _ = dpo_loss(pc, pr, rc, rr, beta, label_smoothing=eps)
    for i in range(2):
        d = beta * ((pc[i] - rc[i]) - (pr[i] - rr[i])).item()
        want = (1 - eps) * math.log(1 + math.exp(-d)) + eps * math.log(1 + math.exp(d))
        assert math.isclose(ls[i].item(), want, rel_tol=1e-6)
    n_c, n_r = torch.tensor([2.0, 4.0]), torch.tensor([5.0, 1.0])
    ipo, cr2, _ = dpo_loss(pc, pr, rc, rr, beta, "ipo", chosen_lengths=n_c, rejected_lengths=n_r)
    for i in range(2):
        h = (pc[i] - rc[i]).item() / n_c[i].item() - (pr[i] - rr[i]).item() / n_r[i].item()
        assert math.isclose(ipo[i].item(), (h - 1 / (2 * beta)) ** 2, rel_tol=1e-6)
    torch.testing.assert_close(cr2, cr)  # IPO's rewards: summed log-ratios too (TRL)
    with pytest.raises(LlmkitError, match="needs chosen_lengths"):
        dpo_loss(pc, pr, rc, rr, beta, "ipo")
    with pytest.raises(LlmkitError, match="--loss 'hinge'"):
        dpo_loss(pc, pr, rc, rr, beta, "hinge")


def test_loss_is_log2_when_policy_equals_reference(tiny_dir, toy_files):
    llm = llmkit.load(tiny_dir)
    enc = encode_pairs(llm.tokenizer, load_pairs(toy_files[0])[:4])
    batch = collate(enc, llm.tokenizer.eos_id)
    frozen = copy.deepcopy(llm.model)
    apply_lora(llm.model, r=4, alpha=8)  # B = 0: the policy is its reference
    for ref_model in (None, frozen):  # adapters disabled / a frozen copy
        total, n = DPOLoss(beta=0.1)(llm.model, batch, ref_model=ref_model)
        assert int(n) == 4
        torch.testing.assert_close(total / n, torch.tensor(math.log(2)), rtol=0, atol=1e-6)
        llm.model.zero_grad()
        (total / n).backward()
        grads = [p.grad for n_, p in llm.model.named_parameters() if ".lora_B." in n_]
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    ipo, _ = DPOLoss(beta=0.5, loss_type="ipo")(llm.model, batch)
    torch.testing.assert_close(ipo / 4, torch.tensor(1.0), rtol=0, atol=1e-5)  # (1 / (2 beta))^2
    acc = preference_accuracy(llm, llm.tokenizer, load_pairs(toy_files[1]), beta=0.1)
    assert acc["reward_acc"] == 0.5 and acc["margin"] == 0.0 and math.isclose(acc["dpo_loss"], math.log(2),
                                                                                 rel_tol=1e-6)


def test_loss_rewards_logps_and_gradients_equal_trl(tiny_llama_dir, hf_tokenizer, tmp_path):
    """TRL 1.16's DPOTrainer._compute_loss (its concatenated forward, loss branches and logged rewards) on the
    transformers model vs DPOLoss on llmkit.load of the same folder; same weights (the policy = the reference
    + the same seeded noise in both), token ids and answer masks."""
    transformers = pytest.importorskip("transformers")
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    hf_ref = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    hf_pol = copy.deepcopy(hf_ref)
    ref = llmkit.load(tiny_llama_dir)
    pol = copy.copy(ref)
    pol.model = copy.deepcopy(ref.model)
    perturb([hf_pol, pol.model])
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False,
                         max_length=None, beta=0.1)
    tr = trl.DPOTrainer(model=hf_pol, ref_model=hf_ref, args=args, processing_class=hf_tokenizer,
                        train_dataset=datasets.Dataset.from_list([{"prompt": "a", "chosen": "b",
                                                                   "rejected": "c"}]))
    pad = pol.tokenizer.eos_id
    enc = encode_pairs(pol.tokenizer, PAIRS)
    # TRL scores every completion token: give it exactly our scored tokens (the answer through <|im_end|>)
    examples = [{"prompt_ids": e.prompt, "chosen_ids": e.chosen[:sum(e.chosen_mask)],
                 "rejected_ids": e.rejected[:sum(e.rejected_mask)]} for e in enc]
    collator = DataCollatorForPreference(pad_token_id=pad)
    cases = [("sigmoid", 0.1, 0.0, "sigmoid", slice(None)), ("ipo", 0.5, 0.0, "ipo", slice(None)),
             # TRL 1.16's "sigmoid" ignores label smoothing; its "aot_unpaired" on ONE pair is cDPO exactly
             ("sigmoid", 0.1, 0.2, "aot_unpaired", slice(0, 1))]
    for loss_type, beta, eps, trl_type, rows in cases:
        tr.loss_types, tr.beta, tr.label_smoothing = [trl_type], beta, eps
        tr._metrics["train"].clear()
        tr.model.train()
        hf_pol.zero_grad()
        want = tr._compute_loss(tr.model, collator(examples[rows]), False)
        want.backward()
        logged = {k: v[-1] for k, v in tr._metrics["train"].items()}
        theirs = {k: p.grad for k, p in hf_pol.named_parameters()}
        # chosen + rejected rows (TRL's layout), then one row per pair with the prompt shared
        for layout in (collate, pack_pairs):
            pol.model.zero_grad()
            batch = layout(enc[rows], pad)
            total, n = DPOLoss(beta, loss_type, eps)(pol.model, batch, ref_model=ref.model)
            (total / n).backward()
            torch.testing.assert_close(total.detach() / n, want.detach(), rtol=1e-5, atol=1e-6)
            with torch.no_grad():
                chosen, rejected = pair_logprobs(pol.model, batch)
                _, rc, rr = dpo_loss(chosen, rejected, *reference_logprobs(pol.model, batch, ref.model), beta)
            for key, ours in [("logps/chosen", chosen), ("logps/rejected", rejected), ("rewards/chosen", rc),
                              ("rewards/rejected", rr), ("rewards/margins", rc - rr),
                              ("rewards/accuracies", (rc > rr).float())]:
                assert math.isclose(ours.mean().item(), logged[key], rel_tol=1e-4, abs_tol=1e-5), key
            mine = {k: p.grad for k, p in pol.model.named_parameters()}
            assert set(theirs) == set(mine)
            for k in theirs:
                torch.testing.assert_close(mine[k], theirs[k], rtol=1e-4, atol=1e-5,
                                           msg=lambda m, k=k: f"{k}: {m}")


# ----------------------------------------------------------------------------------------------- data
def test_mask_covers_only_the_final_answer(tiny_llama_dir, hf_tokenizer):
    from llmkit.tokenizer import Tokenizer

    tok, hf = Tokenizer.load(tiny_llama_dir), hf_tokenizer
    answer = "About nine minutes."
    ids, mask = encode_response(tok, MULTI, answer)
    full = list(hf.apply_chat_template([*MULTI, {"role": "assistant", "content": answer}], tokenize=True,
                                       return_dict=True)["input_ids"])
    prompt = list(hf.apply_chat_template(MULTI, add_generation_prompt=True, tokenize=True,
                                         return_dict=True)["input_ids"])
    assert ids == full and full[:len(prompt)] == prompt
    # TRL's completion is full[len(prompt):] = answer + <|im_end|> + "\n"; we score all of it but the "\n"
    completion = [0] * len(prompt) + [1] * (len(full) - len(prompt))
    assert hf.decode(full[len(prompt):]) == answer + "<|im_end|>\n"
    assert mask == completion[:-1] + [0]
    assert tok.decode([t for t, m in zip(ids, mask) if m]) == answer + "<|im_end|>"
    # the earlier assistant turn is context: render_chat marks it, encode_response does not
    assert sum(render_chat(tok, [*MULTI, {"role": "assistant", "content": answer}]).loss_mask) > sum(mask)
    e = encode_pair(tok, PAIRS[0])
    assert e.prompt == prompt and tok.decode(e.rejected[:sum(e.rejected_mask)]) == "Forever.<|im_end|>"


def test_load_pairs_formats_and_one_line_errors(tmp_path):
    f = tmp_path / "p.jsonl"
    recs = [{"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away.", "id": 7},
            {"prompt": MULTI, "chosen": "Nine minutes.", "rejected": "No idea."},
            {"prompt": MULTI[:1], "chosen": [*MULTI[1:], {"role": "assistant", "content": "Nine."}],
             "rejected": [*MULTI[1:], {"role": "assistant", "content": "Ten hours."}]}]
    f.write_text("".join(json.dumps(r) + "\n" for r in recs[:2]) + "\n" + json.dumps(recs[2]) + "\n")
    js = tmp_path / "p.json"
    js.write_text(json.dumps(recs[:1]))
    pairs = load_pairs([f, js])
    assert pairs[0] == Pair([{"role": "user", "content": "Hi?"}], "Hello.", "Go away.", "7")
    assert pairs[1] == Pair(MULTI, "Nine minutes.", "No idea.", f"{f}:2")
    assert pairs[2] == Pair(MULTI, "Nine.", "Ten hours.", f"{f}:4")  # TRL's conversational format
    assert pairs[3] == pairs[0]

    bad = tmp_path / "bad.jsonl"
    ok = json.dumps(recs[0])
    cases = [
        ({"prompt": "x", "rejected": "y"}, r"bad.jsonl:2: field 'chosen' is missing"),
        ({"prompt": "x", "chosen": "", "rejected": "y"}, r"bad.jsonl:2: field 'chosen' is empty"),
        ({"chosen": "x", "rejected": "y"}, r"bad.jsonl:2: field 'prompt' is missing"),
        ({"prompt": [{"role": "bot", "content": "x"}], "chosen": "a", "rejected": "b"},
         r"bad.jsonl:2: field 'prompt\[0\].role'"),
        ({"prompt": "x", "chosen": "a", "rejected": [{"role": "user", "content": "b"}]},
         r"bad.jsonl:2: field 'rejected' must end with a non-empty assistant turn"),
        ({"prompt": "x", "chosen": "a", "rejected": 3}, r"bad.jsonl:2: field 'rejected'"),
        ({"prompt": MULTI[:2], "chosen": "a", "rejected": "b"}, r"bad.jsonl:2: field 'prompt' ends with"),
        ([1, 2], r"bad.jsonl:2: a record must be a JSON object"),
    ]
    for rec, pattern in cases:
        bad.write_text(ok + "\n" + json.dumps(rec) + "\n")
        with pytest.raises(LlmkitError, match=pattern) as e:
            load_pairs(bad)
        assert "\n" not in str(e.value)
    bad.write_text(ok + "\n{oops\n")
    with pytest.raises(LlmkitError, match=r"bad.jsonl:2: invalid JSON"):
        load_pairs(bad)
    js.write_text(json.dumps([recs[0], {"prompt": "x", "chosen": "y"}]))
    with pytest.raises(LlmkitError, match=r"p.json: record 1: field 'rejected' is missing"):
        load_pairs(js)
    with pytest.raises(LlmkitError, match="no such file"):
        load_pairs(tmp_path / "missing.jsonl")


def test_real_preference_files_load_and_split(shared_data):
    d = shared_data / "preference"
    names = ("hh_rlhf_short_train.jsonl", "hh_rlhf_short_heldout.jsonl", "oasst_fr_pairs.jsonl")
    files = [d / n for n in names]
    if not all(f.is_file() for f in files):
        pytest.skip("preference files missing")
    pairs = load_pairs(files)
    assert len(pairs) == 4000 + 300 + 515 and all(p.prompt[-1]["role"] == "user" for p in pairs)
    train, val = split_pairs(pairs, 0.1, seed=0)
    assert len(train) + len(val) == len(pairs) and len(val) >= 0.1 * len(pairs)
    key = lambda p: json.dumps(p.prompt)  # noqa: E731
    assert not {key(p) for p in train} & {key(p) for p in val}


def test_split_pairs_keeps_a_prompt_on_one_side():
    pairs = [Pair([{"role": "user", "content": f"q{i % 6}"}], "a", "b", str(i)) for i in range(30)]
    for seed in range(4):
        train, val = split_pairs(pairs, 0.2, seed)
        assert len(val) >= 6 and train
        assert not {p.prompt[0]["content"] for p in train} & {p.prompt[0]["content"] for p in val}
    assert split_pairs(pairs, 0.0)[1] == []


def test_truncation_keeps_the_prompt_end_then_cuts_answers():
    e = EncodedPair(list(range(10)), list(range(20, 28)), [1] * 8, [30, 31, 32, 33], [1] * 4, "x")
    assert truncate_pair(e, 18) == (e, False)
    cut, was = truncate_pair(e, 12)  # prompt down to max(12 - 8, 12 // 2) = 6 tokens, answers to 6
    assert was and cut.prompt == [4, 5, 6, 7, 8, 9] and cut.chosen == [20, 21, 22, 23, 24, 25]
    assert cut.rejected == [30, 31, 32, 33] and cut.chosen_mask == [1] * 6
    cut, _ = truncate_pair(EncodedPair(list(range(10)), [20, 21], [1, 1], [30], [1], "y"), 11)
    assert cut.prompt == list(range(1, 10)) and cut.chosen == [20, 21]  # only as much as needed
    cut, _ = truncate_pair(e, 12, max_prompt_length=2)
    assert cut.prompt == [6, 7, 8, 9] and len(cut.chosen) == 8


def test_pair_batches_global_batch_shards_and_state(monkeypatch):
    import llmkit.train.trainer as trainer_mod

    enc = [EncodedPair([1, 2], [3] * (i % 3 + 1), [1] * (i % 3 + 1), [4], [1], str(i)) for i in range(7)]
    one = PairBatches(enc, 4, seed=3, pad_id=0)
    seen = [one.next("cpu")["index"].tolist() for _ in range(5)]
    assert sorted(seen[0] + seen[1][:3]) == list(range(7))  # a permutation per epoch
    ranks = []
    for rank in (0, 1):
        monkeypatch.setattr(trainer_mod, "distributed", lambda rank=rank: (rank, 2))
        b = PairBatches(enc, 4, seed=3, pad_id=0)
        ranks.append([b.next("cpu")["index"].tolist() for _ in range(5)])
    for step in range(5):
        assert ranks[0][step] == seen[step][0::2] and ranks[1][step] == seen[step][1::2]
    monkeypatch.setattr(trainer_mod, "distributed", lambda: (0, 1))
    b = PairBatches(enc, 4, seed=3, pad_id=0)
    b.next("cpu")
    st = b.state_dict()
    c = PairBatches(enc, 4, seed=3, pad_id=0)
    c.load_state_dict(st)
    x, y = b.next("cpu"), c.next("cpu")
    assert all(torch.equal(x[k], y[k]) for k in x)
    assert x["chosen_ids"].shape == x["rejected_ids"].shape == x["chosen_mask"].shape  # one common T


# ------------------------------------------------------------------------------------------- reference
def test_adapters_disabled_reference_equals_frozen_copy(tiny_dir, toy_files):
    llm = llmkit.load(tiny_dir)
    batch = collate(encode_pairs(llm.tokenizer, load_pairs(toy_files[0])[:4]), llm.tokenizer.eos_id)
    frozen = copy.deepcopy(llm.model).requires_grad_(False)
    apply_lora(llm.model, r=4, alpha=8)
    with torch.no_grad():
        for _, m in lora_modules(llm.model):
            m.lora_B.weight.normal_(0, 0.5)  # a trained adapter: policy != reference
    a = reference_logprobs(llm.model, batch)
    b = reference_logprobs(llm.model, batch, frozen)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5)
    policy = pair_logprobs(llm.model, batch)
    assert (policy[0] - a[0]).abs().min() > 1e-3  # the adapters matter
    # the packed layout (one row per pair, prompt shared) and the evaluation scorer (llmkit.score.score)
    # == the concatenated training forward
    enc = encode_pairs(llm.tokenizer, load_pairs(toy_files[0])[:4])
    packed = pack_pairs(enc, llm.tokenizer.eos_id)
    torch.testing.assert_close(pair_logprobs(llm.model, packed), policy, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(reference_logprobs(llm.model, packed), a, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(pair_scores(llm.model, enc), torch.stack(policy, 1).detach(), rtol=1e-5,
                               atol=1e-4)
    for ref_model in (None, frozen):
        torch.testing.assert_close(pair_scores(llm.model, enc, reference=True, ref_model=ref_model),
                                   torch.stack(a, 1), rtol=1e-5, atol=1e-4)
    losses = []
    for ref_model in (None, frozen):
        llm.model.zero_grad()
        total, _ = DPOLoss(0.1)(llm.model, batch, ref_model=ref_model)
        total.backward()
        losses.append((total.detach(), [p.grad.clone() for p in llm.model.parameters() if p.requires_grad]))
    torch.testing.assert_close(losses[0][0], losses[1][0], rtol=1e-6, atol=1e-6)
    for g1, g2 in zip(losses[0][1], losses[1][1]):
        torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------- runs
def test_dpo_run_raises_held_out_reward_accuracy(tiny_dir, toy_files, tmp_path):
    train, val = toy_files
    run = dpo(tiny_dir, train, tmp_path / "run", cfg(steps=12, eval_every=4), val=val, lora_r=8, beta=0.5,
              max_length=64)
    acc = metric(run, "val_reward_acc")
    assert acc[-1] >= 0.9 and metric(run, "val_reward_acc_lo")[-1] > 0.5, acc
    assert metric(run, "val_margin")[-1] > 0 and metric(run, "val_loss")[-1] < math.log(2)
    assert metric(run, "train_reward_acc") and (run / "adapter" / "adapter_config.json").is_file()
    info = json.loads((run / "run.json").read_text())
    assert info["dpo"]["reference"] == "adapters" and info["pairs"] == {"train": 10, "val": 6}
    # the library figure on the exported adapter equals the logged one
    llm = llmkit.load(tiny_dir)
    load_adapter(llm, run / "adapter")
    got = preference_accuracy(llm, llm.tokenizer, load_pairs(val), beta=0.5, max_length=64)
    assert math.isclose(got["reward_acc"], acc[-1])
    assert math.isclose(got["dpo_loss"], metric(run, "val_loss")[-1], rel_tol=1e-4)


@pytest.mark.parametrize("mode", ["adapters", "copy", "precomputed"])
def test_resume_equals_uninterrupted(tiny_dir, toy_files, tmp_path, mode):
    kw = dict(val=toy_files[1], lora_r=4 if mode != "copy" else None, export=False, max_length=64,
              precompute_ref=mode == "precomputed")
    c = dict(steps=6, eval_every=3, lr=1e-3 if mode == "copy" else 1e-2)
    dpo(tiny_dir, toy_files[0], tmp_path / "ref", cfg(**c), **kw)
    dpo(tiny_dir, toy_files[0], tmp_path / "cut", cfg(**c, save_every=3), stop_after=3, **kw)
    dpo(tiny_dir, toy_files[0], tmp_path / "cut", cfg(**c), resume=True, **kw)
    assert len(metric(tmp_path / "ref", "loss")) == 6
    assert metric(tmp_path / "cut", "loss") == metric(tmp_path / "ref", "loss")
    assert metric(tmp_path / "cut", "val_loss") == metric(tmp_path / "ref", "val_loss")


def test_cli_runs_end_to_end_and_writes_adapter(tiny_dir, toy_files, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["dpo", str(tiny_dir), "--data", str(toy_files[0]), "--val", str(toy_files[1]), "--lora-r", "4",
               "--lora-targets", "q_proj,v_proj", "--steps", "3", "--batch-size", "2", "--max-length", "64",
               "--eval-every", "2", "--lr", "1e-2", "--out", str(out), "--no-progress", "--threads", "1"])
    assert rc == 0 and "adapter in adapter/" in capsys.readouterr().out
    assert (out / METRICS).is_file() and (out / "loss.png").is_file() and (out / "run.json").is_file()
    assert len(metric(out, "val_reward_acc")) == 2 and len(metric(out, "loss")) == 3
    cfg_json = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg_json["r"] == 4 and cfg_json["target_modules"] == ["q_proj", "v_proj"]
    assert len(load_adapter(llmkit.load(tiny_dir), out / "adapter")) == 4
    assert main(["dpo", str(tiny_dir), "--data", str(tmp_path / "missing.jsonl"), "--out", str(out)]) == 1
    assert "missing.jsonl: no such file" in capsys.readouterr().err
    assert main(["dpo", str(tiny_dir), "--data", str(toy_files[0]), "--lora-r", "0", "--ref", "adapters",
                 "--out", str(out)]) == 1
    assert "--ref adapters needs a LoRA policy" in capsys.readouterr().err


def test_start_adapter_is_merged_and_is_the_reference(tiny_dir, toy_files, tmp_path):
    from llmkit.lora import merge_lora, save_adapter

    sft = llmkit.load(tiny_dir)  # an "SFT" adapter with a non-zero update
    apply_lora(sft.model, r=4, alpha=8)
    with torch.no_grad():
        for _, m in lora_modules(sft.model):
            m.lora_B.weight.normal_(0, 0.3)
    save_adapter(sft, tmp_path / "sft")
    train, val = toy_files
    run = dpo(tiny_dir, train, tmp_path / "run", cfg(steps=3, eval_every=0), val=val,
              adapter=tmp_path / "sft", lora_r=4, beta=0.5, max_length=64)
    assert json.loads((run / "run.json").read_text())["adapter"] == str(tmp_path / "sft")
    llm = llmkit.load(tiny_dir)  # base + SFT merged, then the DPO adapter: the reference is base + SFT
    load_adapter(llm, tmp_path / "sft")
    merge_lora(llm.model)
    load_adapter(llm, run / "adapter")
    got = preference_accuracy(llm, llm.tokenizer, load_pairs(val), beta=0.5, max_length=64)
    assert math.isclose(got["dpo_loss"], metric(run, "val_loss")[-1], rel_tol=1e-4)
    assert math.isclose(got["chosen_reward"], metric(run, "val_chosen_reward")[-1], rel_tol=1e-3,
                        abs_tol=1e-5)
    base = llmkit.load(tiny_dir)  # with the bare base as reference the figures differ
    load_adapter(base, run / "adapter")
    other = preference_accuracy(base, base.tokenizer, load_pairs(val), beta=0.5, max_length=64)
    assert abs(other["chosen_reward"] - got["chosen_reward"]) > 1e-3

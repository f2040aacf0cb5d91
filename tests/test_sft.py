"""SFT against independent references: the loss mask equals transformers' assistant mask, the masked loss
equals F.cross_entropy(ignore_index) by hand, LoRA B = 0 keeps the logits, QLoRA trains only the adapters
and learns, group splits, data formats and their one-line errors, the CLI run, and exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import llmkit
from llmkit.cli import main
from llmkit.errors import LlmkitError
from llmkit.lora import apply_lora, load_adapter, lora_modules
from llmkit.tokenizer.chat import CHATML_TEMPLATE
from llmkit.train.losses import IGNORE_INDEX, lm_loss
from llmkit.train.sft import encode_conversation, load_conversations, pack, sft, split_by_key
from llmkit.train.trainer import CHECKPOINT, METRICS, TrainConfig

SPECIALS = ["<|im_start|>", "<|im_end|>"]
GEN_CHATML = (  # CHATML_TEMPLATE's text, with the assistant turns in generation blocks (transformers' mask)
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}{% if m['role'] == 'assistant' %}"
    "{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ m['content'] + '<|im_end|>' + '\n' }}{% endif %}{% endfor %}"
)
QA = [("Quelle est la capitale de la France ?", "Paris."), ("Bonjour !", "Bonjour, comment puis-je aider ?"),
      ("Combien font deux et deux ?", "Quatre."), ("De quelle couleur est le ciel ?", "Bleu.")]
CONV = [{"role": "system", "content": "Tu es utile."}, {"role": "user", "content": QA[0][0]},
        {"role": "assistant", "content": QA[0][1]}, {"role": "user", "content": QA[1][0]},
        {"role": "assistant", "content": QA[1][1]}]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on one thread


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama (d_model 32) with a 300-token BPE trained on the chat text, saved as an HF folder."""
    from llmkit.checkpoint.hf import save_hf_dir
    from llmkit.config import ModelConfig
    from llmkit.model import Transformer
    from llmkit.tokenizer.train import train_bpe

    text = " ".join(f"{q} {a} Tu es utile. user assistant system" for q, a in QA) * 20
    tok = train_bpe([text], 300, special_tokens=SPECIALS, progress=False)
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                      max_seq_len=256, pos_encoding="rope", norm="rmsnorm", mlp="swiglu", activation="silu",
                      eos_token_id=tok.special_tokens["<|im_end|>"],
                      bos_token_id=tok.special_tokens["<|im_start|>"])
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny_chat")
    model = Transformer(cfg)
    with torch.no_grad():  # larger weights than the init: a frozen base whose logits adapters can move
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    save_hf_dir(model, cfg, tok, d, chat_template=CHATML_TEMPLATE)
    return d


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("sft_data") / "chats.jsonl"
    rows = [{"id": f"t{i}", "tree": i % 4, "messages": [{"role": "user", "content": q},
                                                         {"role": "assistant", "content": a}]}
            for i, (q, a) in enumerate(QA * 4)]
    f.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return f


def metric(run: Path, key: str) -> list[float]:
    return [r[key] for r in map(json.loads, (run / METRICS).read_text().splitlines()) if key in r]


def cfg(**kw) -> TrainConfig:
    base = dict(steps=6, batch_size=2, block_size=48, lr=1e-2, warmup=1, eval_every=3, progress=False,
                threads=1)
    return TrainConfig(**{**base, **kw})


# ----------------------------------------------------------------------------------------------- mask
def test_loss_mask_equals_transformers_assistant_mask(tiny_dir):
    transformers = pytest.importorskip("transformers")
    llm = llmkit.load(tiny_dir)
    ids, mask = encode_conversation(llm.tokenizer, CONV)  # plain ChatML: the header heuristic
    hf = transformers.AutoTokenizer.from_pretrained(str(tiny_dir))
    ref = hf.apply_chat_template(CONV, chat_template=GEN_CHATML, tokenize=True, return_dict=True,
                                 return_assistant_tokens_mask=True)
    assert ids == list(ref["input_ids"])
    assert mask == list(ref["assistant_masks"])
    # by hand: only each assistant content and its end token are trained
    trained = llm.tokenizer.decode([t for t, m in zip(ids, mask) if m])
    assert trained == QA[0][1] + "<|im_end|>" + QA[1][1] + "<|im_end|>"


def test_masked_loss_equals_hand_cross_entropy(tiny_dir):
    llm = llmkit.load(tiny_dir)
    ex = [encode_conversation(llm.tokenizer, CONV), encode_conversation(llm.tokenizer, CONV[1:3])]
    block = max(len(ids) for ids, _ in ex)  # no truncation, and the stream spans several rows
    rows = pack(ex, block)
    assert rows.truncated == 0 and rows.x.shape[0] > 1
    total, count = lm_loss(llm.model, (rows.x, rows.y))
    with torch.no_grad():
        logits = llm.model(rows.x)  # (N, block, V)
        want = F.cross_entropy(logits.reshape(-1, logits.size(-1)), rows.y.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")
    # every assistant token is a target exactly once (the stream's first token is a header: never trained)
    assert int(count) == sum(sum(m) for _, m in ex) == rows.trained_tokens
    torch.testing.assert_close(total.detach(), want, rtol=1e-6, atol=1e-5)
    assert rows.y[rows.y != IGNORE_INDEX].numel() == int(count)


def test_pack_layouts_and_truncation():
    ex = [([1, 2, 3, 4, 5], [0, 0, 1, 1, 1]), ([6, 7, 8], [0, 1, 1]), (list(range(10, 30)), [1] * 20)]
    p = pack(ex, 4)
    assert p.truncated == 1  # the 20-token example is cut to block_size + 1
    assert p.x[0].tolist() == [1, 2, 3, 4] and p.y[0].tolist() == [IGNORE_INDEX, 3, 4, 5]
    assert p.x[1].tolist() == [5, 6, 7, 8] and p.y[1].tolist() == [IGNORE_INDEX, 7, 8, 10]
    assert p.trained_tokens == 3 + 2 + 5 - 0  # 10 is trained from row 1; 11..14 from row 2
    q = pack(ex, 4, packed=False, pad_id=0)
    assert q.x.tolist()[1] == [6, 7, 0, 0] and q.y.tolist()[1] == [7, 8, IGNORE_INDEX, IGNORE_INDEX]
    assert q.trained_tokens == 3 + 2 + 4


# ----------------------------------------------------------------------------------------------- LoRA
def test_lora_b_zero_leaves_logits_unchanged(tiny_dir):
    llm = llmkit.load(tiny_dir)
    x = torch.tensor([encode_conversation(llm.tokenizer, CONV)[0]])
    with torch.no_grad():
        before = llm.model(x)
        apply_lora(llm.model, r=4, alpha=8)
        after = llm.model(x)
    assert lora_modules(llm.model) and torch.equal(before, after)


def test_qlora_grads_reach_only_adapters_and_loss_falls(tiny_dir, data_file, tmp_path):
    from llmkit.quant import quantize_model

    llm = llmkit.load(tiny_dir)
    quantize_model(llm.model, "int4")
    apply_lora(llm.model, r=4, alpha=8)
    ids, mask = encode_conversation(llm.tokenizer, CONV)
    rows = pack([(ids, mask)], len(ids))
    total, _ = lm_loss(llm.model, (rows.x, rows.y))
    total.backward()
    assert all(p.grad is None for n, p in llm.model.named_parameters() if ".lora_" not in n)
    got = {n for n, p in llm.model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert got and all(".lora_A." in n or ".lora_B." in n for n in got)
    assert any(".lora_B." in n for n in got)

    run = sft(tiny_dir, data_file, tmp_path / "q", cfg(steps=15, lr=3e-2, eval_every=0), lora_r=8,
              qlora="int4", val_fraction=0.0)
    loss = metric(run, "loss")
    assert sum(loss[-3:]) / 3 < sum(loss[:3]) / 3 - 0.3, loss
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


# ----------------------------------------------------------------------------------------------- data
def test_split_by_key_never_splits_a_group():
    items = [{"tree": i % 7, "i": i} for i in range(70)] + [{"i": 100 + i} for i in range(5)]
    for seed in range(5):
        train, val = split_by_key(items, "tree", 0.2, seed=seed)
        assert len(train) + len(val) == len(items) and train and val
        trees = [{it["tree"] for it in side if "tree" in it} for side in (train, val)]
        assert not trees[0] & trees[1]
        assert len(val) >= 0.2 * len(items)
    assert split_by_key(items, "tree", 0.0)[1] == []


def test_formats_and_one_line_errors(tmp_path):
    msgs = tmp_path / "m.jsonl"
    msgs.write_text(json.dumps({"messages": CONV}) + "\n\n")
    alpaca = tmp_path / "a.json"
    alpaca.write_text(json.dumps([{"instruction": "Traduis", "input": "cat", "output": "chat"},
                                  {"instruction": "Dis bonjour", "input": "", "output": "Bonjour"}]))
    convs = load_conversations([msgs, alpaca])
    assert convs[0]["messages"] == CONV
    assert convs[1]["messages"] == [{"role": "user", "content": "Traduis\n\ncat"},
                                    {"role": "assistant", "content": "chat"}]
    assert convs[2]["messages"][0]["content"] == "Dis bonjour"
    oasst = Path(__file__).resolve().parents[2] / "shared/data/instruct/oasst_fr_threads.jsonl"
    if oasst.is_file():
        threads = load_conversations(oasst, fmt="oasst")
        assert len(threads) > 1000 and all("tree" in t and "id" in t for t in threads)
        train, val = split_by_key(threads, "tree", 0.1)
        assert not {t["tree"] for t in train} & {t["tree"] for t in val}

    bad = tmp_path / "bad.jsonl"
    cases = [
        ({"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]},
         "auto", r"bad.jsonl:2: field 'messages\[1\].role'"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": 3}]},
         "auto", r"bad.jsonl:2: field 'messages\[1\].content'"),
        ({"messages": [{"role": "user", "content": "a"}]}, "auto", r"bad.jsonl:2: .*no assistant turn"),
        ({"instruction": "x", "output": ""}, "auto", r"bad.jsonl:2: field 'output'"),
        ({"prompt": "x"}, "auto", r"bad.jsonl:2: field 'messages' or 'instruction'"),
        ({"messages": CONV}, "oasst", r"bad.jsonl:2: field 'id'"),
    ]
    for rec, fmt, pattern in cases:
        bad.write_text(json.dumps({"messages": CONV, "id": 0, "tree": 0}) + "\n" + json.dumps(rec) + "\n")
        with pytest.raises(LlmkitError, match=pattern) as e:
            load_conversations(bad, fmt=fmt)
        assert "\n" not in str(e.value)
    bad.write_text("{not json\n")
    with pytest.raises(LlmkitError, match=r"bad.jsonl:1: invalid JSON"):
        load_conversations(bad)
    alpaca.write_text(json.dumps([{"instruction": "ok", "output": "ok"}, {"instruction": 5, "output": "x"}]))
    with pytest.raises(LlmkitError, match=r"a.json: record 1: field 'instruction'"):
        load_conversations(alpaca)


# ----------------------------------------------------------------------------------------------- runs
def test_cli_lora_run_writes_metrics_plot_and_peft_adapter(tiny_dir, data_file, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["sft", str(tiny_dir), "--data", str(data_file), "--lora-r", "4",
               "--lora-targets", "q_proj,v_proj",
               "--steps", "3", "--batch-size", "2", "--block-size", "48", "--eval-every", "2",
               "--sample-prompt", QA[0][0], "--sample-tokens", "4", "--out", str(out), "--no-progress",
               "--threads", "1"])
    assert rc == 0
    assert (out / METRICS).is_file() and (out / "loss.png").is_file() and (out / CHECKPOINT).is_file()
    assert metric(out, "val_loss") and metric(out, "sample")
    cfg_json = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg_json["r"] == 4 and cfg_json["target_modules"] == ["q_proj", "v_proj"]
    fresh = llmkit.load(tiny_dir)
    wrapped = load_adapter(fresh, out / "adapter")
    assert len(wrapped) == 4  # 2 layers x q_proj, v_proj
    assert main(["sft", str(tiny_dir), "--data", str(tmp_path / "missing.jsonl"), "--out", str(out)]) == 1
    assert "missing.jsonl: no such file" in capsys.readouterr().err


@pytest.mark.parametrize("lora_r", [None, 4])
def test_resume_equals_uninterrupted(tiny_dir, data_file, tmp_path, lora_r):
    kw = dict(lora_r=lora_r, lora_dropout=0.1 if lora_r else 0.0, export=False)
    c = dict(steps=6, eval_every=3)
    sft(tiny_dir, data_file, tmp_path / "ref", cfg(**c), **kw)
    sft(tiny_dir, data_file, tmp_path / "cut", cfg(**c, save_every=3), stop_after=3, **kw)
    sft(tiny_dir, data_file, tmp_path / "cut", cfg(**c), resume=True, **kw)
    assert metric(tmp_path / "cut", "loss") == metric(tmp_path / "ref", "loss")
    assert metric(tmp_path / "cut", "val_loss") == metric(tmp_path / "ref", "val_loss")

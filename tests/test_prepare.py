"""`llmkit prepare`: corpus -> tokenizer -> shards + manifest, the split, the batch sampler, and bad input."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from llmkit.cli import main
from llmkit.errors import LlmkitError
from llmkit.train.data import TokenBatches, TokenData, eval_windows, prepare

DOCS = {
    "a.txt": "Il était une fois une marquise qui sortit à cinq heures.\nLe ciel était gris; l'été passait.\n",
    "b.txt": "Emma Bovary rêvait de Paris, des bals et des robes de soie. — Ô douleur ! 🙂\n",
    "c.txt": "The quick brown fox jumps over the lazy dog.\n\nA paragraph, with numbers 1234 and tabs\t.\n",
    "d.txt": "Les misérables : Jean Valjean portait Cosette à travers la nuit. Fin.\n",
}


@pytest.fixture
def corpus(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    for name, text in DOCS.items():
        (d / name).write_text(text, encoding="utf-8")
    return d


def split_texts(data: TokenData, split: str) -> list[str]:
    """Decode a split and cut it at the separators: the documents' texts."""
    tok = data.tokenizer()
    sep = data.manifest["tokenizer"]["separator_id"]
    ids = np.concatenate(data.shards(split)).tolist() if data.shards(split) else []
    docs, cur = [], []
    for i in ids:
        if i == sep:
            docs.append(tok.decode(cur))
            cur = []
        else:
            cur.append(i)
    assert not cur, "every document ends with the separator"
    return docs


@pytest.mark.parametrize("spec", ["char", "train:300"])
def test_prepare_round_trip_and_manifest(corpus, tmp_path, spec):
    out = tmp_path / "data"
    m = prepare([corpus], out, tokenizer=spec, val_fraction=0.25, progress=False)
    data = TokenData(out)
    train, val = split_texts(data, "train"), split_texts(data, "val")
    # document-level split: every document lands whole in exactly one split, and decodes back exactly
    assert sorted(train + val) == sorted(DOCS.values())
    assert len(val) >= 1 and len(train) >= 1
    for name, texts in (("train", train), ("val", val)):
        s = m["splits"][name]
        assert s["documents"] == len(texts)
        assert s["bytes"] == sum(len(t.encode()) for t in texts)
        assert s["tokens"] == sum(sh["tokens"] for sh in s["shards"])
    assert m["dtype"] == "uint16"
    tok_json = (out / "tokenizer" / "tokenizer.json").read_bytes()
    assert m["tokenizer"]["sha256"] == hashlib.sha256(tok_json).hexdigest()
    assert json.loads((out / "manifest.json").read_text()) == m


def test_single_document_val_is_the_tail(tmp_path):
    text = "".join(f"line {i}: to be or not to be\n" for i in range(200))
    f = tmp_path / "one.txt"
    f.write_text(text)
    prepare([f], tmp_path / "d", tokenizer="char", val_fraction=0.1, progress=False)
    data = TokenData(tmp_path / "d")
    cut = int(len(text) * 0.9)
    assert split_texts(data, "val") == [text[cut:]]  # exactly the last 10 % of the characters
    assert split_texts(data, "train") == [text[:cut]]


def test_shards_split_long_documents(corpus, tmp_path):
    prepare([corpus], tmp_path / "d", tokenizer="char", val_fraction=0.0, shard_tokens=50, progress=False)
    data = TokenData(tmp_path / "d")
    assert len(data.shards("train")) > 3 and all(len(s) <= 50 for s in data.shards("train"))
    assert sorted(split_texts(data, "train")) == sorted(DOCS.values())


def test_batches_resume_rank_slices_and_epochs():
    shard = np.arange(1000, dtype=np.uint16)
    one = TokenBatches([shard], block_size=10, batch_size=4, seed=3)
    ref = [one.next()[0] for _ in range(30)]  # crosses epochs (99 windows per epoch)
    # every window is T+1 consecutive tokens and y is x shifted by one
    x, y = TokenBatches([shard], 10, 4, seed=3).next()
    assert (y[:, :-1] == x[:, 1:]).all() and ((x[:, 1:] - x[:, :-1]) == 1).all()
    # an epoch visits each window once
    b = TokenBatches([shard], 10, 9, seed=3)
    starts = np.concatenate([b.next()[0][:, 0].numpy() for _ in range(11)])
    assert len(set(starts.tolist())) == 99
    # exact resume from the position alone
    a = TokenBatches([shard], 10, 4, seed=3)
    for _ in range(7):
        a.next()
    r = TokenBatches([shard], 10, 4, seed=3)
    r.load_state_dict(a.state_dict())
    assert all((r.next()[0] == ref[i]).all() for i in range(7, 30))
    # two ranks' rows together are the single-process batch
    r0 = TokenBatches([shard], 10, 4, seed=3, rank=0, world_size=2)
    r1 = TokenBatches([shard], 10, 4, seed=3, rank=1, world_size=2)
    for i in range(30):
        assert (np.concatenate([r0.next()[0], r1.next()[0]]) == ref[i].numpy()).all()


def test_eval_windows_cover_every_token_once():
    shard = np.arange(105, dtype=np.uint16)
    wins = eval_windows([shard], 10)
    predicted = np.concatenate([w[1:] for w in wins])
    assert (predicted == np.arange(1, 105)).all()


# ---------------------------------------------------------------------------------------------- bad input
def cli_error(capsys, argv) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("llmkit: error: ") and "\n" not in err, err
    return err


def test_empty_corpus_file(tmp_path, capsys):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "empty.txt").write_text("  \n")
    err = cli_error(
        capsys, ["prepare", str(tmp_path / "c"), "--tokenizer", "char", "--out", str(tmp_path / "d")]
    )
    assert "empty.txt" in err and "empty" in err
    assert not (tmp_path / "d").exists()


def test_empty_directory(tmp_path, capsys):
    (tmp_path / "c").mkdir()
    assert "no .txt files" in cli_error(
        capsys, ["prepare", str(tmp_path / "c"), "--out", str(tmp_path / "d")]
    )


def test_binary_corpus(tmp_path, capsys):
    f = tmp_path / "blob.txt"
    f.write_bytes(bytes(range(256)) * 10)
    assert "binary" in cli_error(
        capsys, ["prepare", str(f), "--tokenizer", "char", "--out", str(tmp_path / "d")]
    )
    g = tmp_path / "latin1.txt"
    g.write_bytes("élève".encode("latin-1"))
    assert "UTF-8" in cli_error(
        capsys, ["prepare", str(g), "--tokenizer", "char", "--out", str(tmp_path / "d")]
    )


def test_vocab_larger_than_possible(corpus, tmp_path, capsys):
    err = cli_error(
        capsys, ["prepare", str(corpus), "--tokenizer", "train:100000", "--out", str(tmp_path / "d")]
    )
    assert "vocab" in err
    assert not (tmp_path / "d").exists()
    assert "at least" in cli_error(
        capsys, ["prepare", str(corpus), "--tokenizer", "train:10", "--out", str(tmp_path / "d")]
    )


def test_unwritable_output(corpus, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    err = cli_error(capsys, ["prepare", str(corpus), "--tokenizer", "char", "--out", str(blocker / "data")])
    assert "data" in err


def test_failed_prepare_keeps_previous_dataset(corpus, tmp_path):
    out = tmp_path / "d"
    prepare([corpus], out, tokenizer="char", progress=False)
    before = (out / "manifest.json").read_text()
    (corpus / "z.txt").write_bytes(b"\x00\x01binary")
    with pytest.raises(LlmkitError):
        prepare([corpus], out, tokenizer="char", progress=False)
    assert (out / "manifest.json").read_text() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp leftovers

"""Text tasks (llmkit.eval.tasks.text) and the n-gram baseline (llmkit.eval.ngram).

References: trigram probabilities and perplexities computed by hand from count tables (the course's worked
example style); the perplexity task against lm-eval (HFLM.loglikelihood_rolling + lm_eval.api.metrics) on
the same tiny random Llama; the data split against character counts of files written here.
"""

from __future__ import annotations

import math
import random
import re
from pathlib import Path

import pytest
from conftest import SHARED, shared_path

from llmkit.errors import LlmkitError
from llmkit.eval.base import Rolling, TaskOptions, get_task
from llmkit.eval.ngram import EOS, UNK, NGramModel, tokenize
from llmkit.eval.tasks.text import split_chunks

# the toy corpus: three sentences, one per line
TOY = "le chat dort\nle chien dort\nle chat mange\n"
K = 0.5
V = 7  # le chat dort chien mange </s> <unk>


def fixed(a: float, b: float) -> float:
    """ln((count + k) / (context count + k|V|)), the add-k formula with the toy's |V|."""
    return math.log((a + K) / (b + K * V))


# ---------------------------------------------------------------------------------------- n-gram model
def test_tokenize_lowercases_and_splits_punctuation():
    assert tokenize("L'homme, dit-il.\tOui !") == ["l", "'", "homme", ",", "dit", "-", "il", ".", "oui", "!"]


def test_trigram_counts_and_probabilities_by_hand():
    m = NGramModel.fit(TOY, n=3, k=K)
    assert m.vocab == {"le", "chat", "dort", "chien", "mange", EOS, UNK}
    # count table, by hand: c(u, v, w) and the context counts c(u, v)
    assert m.counts == {("<s>", "<s>", "le"): 3, ("<s>", "le", "chat"): 2, ("<s>", "le", "chien"): 1,
                        ("le", "chat", "dort"): 1, ("le", "chat", "mange"): 1, ("le", "chien", "dort"): 1,
                        ("chat", "dort", EOS): 1, ("chien", "dort", EOS): 1, ("chat", "mange", EOS): 1}
    assert m.context_counts[("<s>", "le")] == 3 and m.context_counts[("le", "chat")] == 2
    # P(w | u, v) = (c(u, v, w) + k) / (c(u, v) + k |V|)
    assert m.logprob([], "le") == pytest.approx(math.log(3.5 / 6.5), abs=1e-12)
    assert m.logprob(["le"], "chat") == pytest.approx(math.log(2.5 / 6.5), abs=1e-12)
    assert m.logprob(["le", "chat"], "dort") == pytest.approx(math.log(1.5 / 5.5), abs=1e-12)
    assert m.logprob(["le", "chat"], "chien") == pytest.approx(math.log(0.5 / 5.5), abs=1e-12)
    assert m.logprob(["un", "le", "chat"], "dort") == pytest.approx(math.log(1.5 / 5.5), abs=1e-12)  # 2 last
    assert m.logprob(["chat", "dort"], EOS) == pytest.approx(math.log(1.5 / 4.5), abs=1e-12)
    assert m.logprob(["le", "chat"], "saute") == pytest.approx(math.log(0.5 / 5.5), abs=1e-12)  # <unk>
    assert m.logprob(["dort", "le"], "chat") == pytest.approx(math.log(1 / 7), abs=1e-12)  # unseen context
    with pytest.raises(LlmkitError):
        m.logprob([], "<s>")


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_probabilities_of_a_context_sum_to_one(n):
    m = NGramModel.fit(TOY + "le chien mange le chat\n", n=n, k=0.1)
    for ctx in ([], ["le"], ["le", "chat"], ["chat", "le", "chien"], ["zèbre", "le"], ["dort", "dort"]):
        total = sum(math.exp(m.logprob(ctx, w)) for w in m.vocab)
        assert total == pytest.approx(1.0, abs=1e-12)


def test_perplexity_by_hand_with_an_unknown_word():
    m = NGramModel.fit(TOY, k=K)
    test = "Le chat dort\n\nle chien saute\n"  # case folded; the blank line is no sentence; saute -> <unk>
    s = m.score(test)
    logp = [fixed(3, 3), fixed(2, 3), fixed(1, 2), fixed(1, 1),  # le chat dort </s>
            fixed(3, 3), fixed(1, 3), fixed(0, 1), fixed(0, 0)]  # le chien <unk> </s> (unseen context)
    assert (s.tokens, s.words, s.oov) == (8, 6, 1)
    assert s.nll == pytest.approx(-sum(logp), abs=1e-12)
    assert m.perplexity(test) == pytest.approx(math.exp(-sum(logp) / 8), abs=1e-9)


def test_uniform_model_has_perplexity_vocabulary_size():
    # a huge k drowns the counts: P(w | u, v) -> 1/|V| for every w, so the perplexity of any text is |V|
    m = NGramModel.fit(TOY, k=1e9)
    for text in ("le chat dort", "mange mange mange\nzèbre le", "dort"):
        assert m.perplexity(text) == pytest.approx(V, rel=1e-7)


def test_min_count_maps_rare_training_words_to_unk():
    m = NGramModel.fit(TOY, n=2, k=1.0, min_count=2)
    assert m.vocab == {"le", "chat", "dort", EOS, UNK}
    assert m.counts[("le", UNK)] == 1 and m.counts[(UNK, EOS)] == 1  # chien, mange
    assert m.score("le chien dort").oov == 1


def test_k_is_tuned_on_the_last_training_lines():
    rng = random.Random(0)
    words = "le la un une chat chien souris maison jardin dort mange court voit".split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) for _ in range(200)]
    grid = (0.01, 0.1, 1.0)
    m = NGramModel.fit("\n".join(lines), k_grid=grid)
    # each k of the grid, counted on the first 90 % of the lines, scored on the last 10 %
    want = {k: NGramModel.fit(lines[:180], k=k).perplexity("\n".join(lines[180:])) for k in grid}
    assert m.k_scores == pytest.approx(want, rel=1e-9)
    assert m.k == min(want, key=want.get)
    assert m.counts == NGramModel.fit("\n".join(lines), k=m.k).counts  # then counted on every line


def test_ngram_model_errors():
    for bad in (dict(texts=""), dict(texts=TOY, k=0.0), dict(texts=TOY, n=0), dict(texts="un seul\n")):
        with pytest.raises(LlmkitError):
            NGramModel.fit(**bad)


# ---------------------------------------------------------------------------------------- documents
def test_split_chunks_cuts_on_paragraphs_and_keeps_the_text():
    text = "Un deux trois.\n\nQuatre cinq.\nSix sept huit neuf.\n \nDix.\n" + "x" * 30
    pieces = split_chunks(text, 20)
    assert "".join(pieces) == text
    assert pieces[:4] == ["Un deux trois.\n\n", "Quatre cinq.\n", "Six sept huit neuf.\n", " \nDix.\n"]
    assert pieces[4:] == ["x" * 20, "x" * 10] and all(len(p) <= 20 for p in pieces)
    assert split_chunks("abc def", 5) == ["abc ", "def"]


def write(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def test_perplexity_documents_requests_and_corpus_level_metrics(tmp_path):
    files = {"b.txt": "Été, déjà.\n\nDeux mots\n", "a.txt": "un deux trois", "e.txt": " \n"}
    d = write(tmp_path / "c", files)
    task = get_task("perplexity", TaskOptions(data=[str(d)], extra={"window": "64", "stride": "32"}))
    docs = task.docs()
    assert [x["id"] for x in docs] == ["a.txt", "b.txt"]  # sorted, the blank file skipped
    (req,) = task.requests(docs[1])
    assert (req.kind, req.context, req.window, req.stride) == ("rolling", "Été, déjà.\n\nDeux mots\n", 64, 32)
    # fake answers: the aggregate divides sums (lm-eval's weighted_perplexity, bits_per_byte)
    recs = [task.process(docs[0], [Rolling(6.0, 3)]), task.process(docs[1], [Rolling(20.0, 9)])]
    words, nbytes = 3 + 5, 13 + 26  # len(re.split(r"\s+", t)): "...mots\n" ends with "" -> 5 in b.txt
    got = task.aggregate(recs)
    assert got["word_perplexity"] == (pytest.approx(math.exp(26 / words)), None)
    assert got["byte_perplexity"] == (pytest.approx(math.exp(26 / nbytes)), None)
    assert got["bits_per_byte"] == (pytest.approx(26 / nbytes / math.log(2)), None)
    assert got["token_perplexity"] == (pytest.approx(math.exp(26 / 12)), None)
    assert task.main_metric == "bits_per_byte" and not task.higher_is_better["bits_per_byte"]

    chunked = get_task("perplexity", TaskOptions(data=[str(d / "b.txt")], limit=1,
                                                 extra={"chunk_chars": "15"}))
    assert chunked.docs() == [{"id": "b.txt#0", "text": "Été, déjà.\n\n"}]
    assert "the first 1 chunks of <= 15 characters" in chunked.description


def test_perplexity_task_errors(tmp_path):
    d = write(tmp_path / "c", {"a.txt": "\n\n"})
    for extra in ({"window": "1"}, {"stride": "x"}, {"chunk_chars": "0"}):
        with pytest.raises(LlmkitError, match="must be an integer"):
            get_task("perplexity", TaskOptions(extra=extra))
    for extra in ({"k": "0"}, {"k": "x"}, {"n": "0"}):
        with pytest.raises(LlmkitError, match="k=|n="):
            get_task("ngram", TaskOptions(extra=extra))
    from llmkit.eval.runner import evaluate

    with pytest.raises(LlmkitError, match=r"unknown --task-arg k \(the tasks take perplexity: chunk_chars"):
        evaluate(object(), ["perplexity"], task_args={"k": "1"})  # refused before any model is touched
    with pytest.raises(LlmkitError, match="no text"):
        get_task("perplexity", TaskOptions(data=[str(d)])).docs()
    with pytest.raises(LlmkitError, match="not found"):
        get_task("perplexity", TaskOptions(data=[str(tmp_path / "missing")])).docs()


def test_ngram_task_by_hand(tmp_path):
    write(tmp_path, {"train.txt": TOY, "test.txt": "Le chat dort\nle chien saute\n"})
    extra = {"train": str(tmp_path / "train.txt"), "k": "0.5"}
    opts = TaskOptions(data=[str(tmp_path / "test.txt")], extra=extra)
    task = get_task("ngram", opts)
    (doc,) = task.docs()
    rec = task.process(doc, [Rolling(20.0, 10)])  # the LLM's answer for the whole test text
    got = task.aggregate([rec])
    logp = [fixed(3, 3), fixed(2, 3), fixed(1, 2), fixed(1, 1),
            fixed(3, 3), fixed(1, 3), fixed(0, 1), fixed(0, 0)]  # as in test_perplexity_by_hand_...
    W = 8  # le chat dort </s> le chien saute </s>: the same count for both models
    assert got["trigram_word_perplexity"] == (pytest.approx(math.exp(-sum(logp) / W)), None)
    assert got["llm_word_perplexity"] == (pytest.approx(math.exp(20.0 / W)), None)
    assert got["llm_bits_per_byte"] == (pytest.approx(20.0 / (28 * math.log(2))), None)
    assert got["oov_rate"] == (pytest.approx(1 / 6), None)  # saute, out of 6 words
    assert got["k"] == (0.5, None)


def test_ngram_task_holds_out_the_last_tenth(tmp_path):
    lines = [f"ligne {i:03d}\n" for i in range(20)]  # 10 characters each: 200 in all
    write(tmp_path, {"a.txt": "".join(lines[:12]), "b.txt": "".join(lines[12:])})
    task = get_task("ngram", TaskOptions(data=[str(tmp_path)], extra={"k": "1"}))
    train, test = task.split()
    assert train == ["".join(lines[:12]), "".join(lines[12:18])]  # the cut: character 180, a line start
    assert test == [("b.txt@60", "".join(lines[18:]))]
    (doc,) = task.docs()
    assert (doc["words"], doc["oov"]) == (6, 2)  # ligne 018 </s> ligne 019 </s>; 018 and 019 unseen
    write(tmp_path / "one", {"a.txt": "une seule ligne sans fin"})
    with pytest.raises(LlmkitError, match="too short"):
        get_task("ngram", TaskOptions(data=[str(tmp_path / "one")])).split()


@pytest.mark.slow
def test_default_corpus_documents():
    corpus = shared_path("corpus/fr-nouvelles19")
    files = sorted(p.name for p in corpus.glob("*.txt"))
    task = get_task("perplexity", TaskOptions(limit=3, data_dir=SHARED))
    assert [d["id"] for d in task.docs()] == files[:3]
    assert "fr-nouvelles19: the first 3 files" in task.description
    ngram = get_task("ngram", TaskOptions(data_dir=SHARED))
    docs = ngram.docs()
    total = sum(len(p.read_text(encoding="utf-8")) for p in corpus.glob("*.txt"))
    held = sum(len(d["text"]) for d in docs)
    assert 0.09 * total < held <= 0.1 * total  # from the first line start after 90 %
    assert docs[-1]["id"] == files[-1] and ngram.model.k in ngram.model.k_scores
    assert 0 < sum(d["oov"] for d in docs) < 0.1 * sum(d["word_tokens"] for d in docs)


# ---------------------------------------------------------------------------------------- against lm-eval
def pseudo_text(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    words = ("le la les un une des été forêt château rivière garçon fille mangé dormi voilà où, et. mais "
             "donc ; ! ? « » – l'homme aujourd'hui").split()
    out = []
    for i in range(n_words):
        out.append(rng.choice(words))
        if i % 37 == 36:
            out.append("\n\n" if i % 3 else "\n")
    return " ".join(out)


@pytest.mark.slow
def test_perplexity_matches_lm_eval(tiny_llama_dir, tmp_path):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.api.metrics import bits_per_byte, weighted_perplexity
    from lm_eval.models.huggingface import HFLM

    import llmkit
    from llmkit.eval.backends import LocalBackend

    texts = {"a_short.txt": "Bonjour, le monde !", "b_mid.txt": pseudo_text(120, 1),
             "c_long.txt": pseudo_text(1500, 2)}
    write(tmp_path, texts)
    llm = llmkit.load(tiny_llama_dir, device="cpu")
    assert llm.model.config.max_seq_len == 1024
    assert len(llm.tokenizer.encode(texts["c_long.txt"], add_special_tokens=False)) > 2048  # 3 windows

    task = get_task("perplexity", TaskOptions(data=[str(tmp_path)]))
    docs = task.docs()
    answers = LocalBackend(llm, batch_size=4).run([r for d in docs for r in task.requests(d)])
    recs = [task.process(d, [a]) for d, a in zip(docs, answers)]
    got = task.aggregate(recs)

    lm = HFLM(pretrained=str(tiny_llama_dir), device="cpu", dtype="float32", batch_size=4)
    assert lm.max_length == 1024
    ref = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (d["text"],), i)
                                    for i, d in enumerate(docs)], disable_tqdm=True)
    for rec, ll, d in zip(recs, ref, docs):
        assert rec.metrics["nll"] == pytest.approx(-ll, rel=1e-4), d["id"]
        assert rec.metrics["tokens"] == len(lm.tok_encode(d["text"]))
    # lm-eval's wikitext process_results + aggregations
    words = [(ll, len(re.split(r"\s+", d["text"]))) for ll, d in zip(ref, docs)]
    nbytes = [(ll, len(d["text"].encode("utf-8"))) for ll, d in zip(ref, docs)]
    assert got["word_perplexity"][0] == pytest.approx(weighted_perplexity(words), rel=1e-4)
    assert got["byte_perplexity"][0] == pytest.approx(weighted_perplexity(nbytes), rel=1e-4)
    assert got["bits_per_byte"][0] == pytest.approx(bits_per_byte(nbytes), rel=1e-4)
    assert got["word_perplexity"][1] is None and got["bits_per_byte"][1] is None

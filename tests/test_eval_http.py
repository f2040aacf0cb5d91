"""HTTPBackend (llmkit.eval.http) against llmkit's own server on a tiny fp32 Llama.

- Over HTTP and in this process (LocalBackend) give the same per-item answers: log-likelihoods (empty context,
  trailing spaces, several tokens, accented French, special-token text, a greedy continuation), greedy
  generations with stop strings (more than OpenAI's 4), and rolling log-likelihoods.
- lm-eval's own `local-completions` model, pointed at the same server, runs a multiple-choice, a generative
  and a perplexity task to the end through `simple_evaluate`, and its per-sample answers equal LocalBackend's:
  the server's echo/logprobs replies are what lm-eval reads.
- A server without /tokenize (text offsets), one that refuses `max_tokens: 0` and is busy once (retried).
- One-line errors: no server, no API key, a wrong key, an unknown model.
"""

from __future__ import annotations

import json
import logging
import math

import pytest
from serve_utils import LiveServer, free_port, serve

import llmkit
from llmkit.errors import LlmkitError
from llmkit.eval.backends import LocalBackend
from llmkit.eval.base import Request
from llmkit.eval.http import HTTPBackend, cut_at_stops, paragraphs
from llmkit.serve.app import create_app

FR = "Le petit chat dort sur le canapé. L'été arrive, et déjà les élèves rêvent de vacances à la mer."


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return llmkit.load(tiny_llama_dir)


@pytest.fixture(scope="module")
def local(llm) -> LocalBackend:
    return LocalBackend(llm)


@pytest.fixture(scope="module")
def server(llm, tmp_path_factory):
    with serve(llm, tmp_path_factory.mktemp("eval_http") / "r.sqlite") as s:
        yield s


@pytest.fixture(scope="module")
def ll_requests(local) -> list[Request]:
    # the model's own greedy continuation (the first that re-tokenizes into the tokens it generated)
    for ctx in ("The capital of France is", "Once upon a time", "Bonjour", "Hello"):
        greedy = local.generate([Request("generate", ctx, max_tokens=2)])[0][0]
        if local.loglikelihood([Request("loglikelihood", ctx, greedy)])[0].is_greedy:
            break
    return [
        Request("loglikelihood", "", "Hello world"),  # empty context: scored after the BOS/EOS token
        Request("loglikelihood", "Question: is the sky blue?\nAnswer: ", "yes"),  # trailing space moves
        Request("loglikelihood", "Question: is the sky blue?\nAnswer:  ", " no"),
        Request("loglikelihood", "Le chat est", " très élégant, déjà là-bas à côté du château"),
        Request("loglikelihood", "<|im_start|>user\nBonjour !<|im_end|>\n<|im_start|>assistant\n", "Salut"),
        Request("loglikelihood", ctx, greedy),
        Request("loglikelihood", ctx, " Paris"),
    ]


def assert_same_ll(got, want, tol: float = 1e-4) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.n_tokens == w.n_tokens
        assert g.logprob == pytest.approx(w.logprob, abs=tol)
        assert g.is_greedy == w.is_greedy


# ------------------------------------------------------------------------------------------- vs in-process
def test_loglikelihood_same_as_in_process(server, local, llm, ll_requests):
    hb = HTTPBackend(server.url + "/v1/", batch_size=3, concurrency=2)  # 3 calls of <= 3 prompts, 2 threads
    assert hb.info() == {"backend": "http", "api_base": server.url + "/v1", "model": llm.name}
    want = local.run(ll_requests)
    assert want[5].is_greedy and not want[6].is_greedy  # both answers of is_greedy are compared
    assert [w.n_tokens > 1 for w in want[3:5]] == [True, True]
    assert_same_ll(hb.run(ll_requests), want)
    assert HTTPBackend(server.url).api_base == server.url + "/v1"  # /v1 is added to a bare host


def test_generate_same_as_in_process(server, local):
    hb = HTTPBackend(server.url + "/v1", batch_size=2)
    prompts = ["Once upon a time", "Il était une fois, dans un château,", "def add(a, b):"]
    free = local.generate([Request("generate", p, max_tokens=16) for p in prompts])
    words = [out[0].split()[len(out[0].split()) // 2] for out in free]  # a word from the middle of each
    reqs = [Request("generate", p, max_tokens=16) for p in prompts]
    # the 5th stop string is not sent (OpenAI takes 4): HTTPBackend cuts there itself
    reqs += [Request("generate", p, max_tokens=16, stop=("\n\n", "§1", "§2", "§3", w))
             for p, w in zip(prompts, words)]
    reqs += [Request("generate", p, max_tokens=16, stop=(w, "§4")) for p, w in zip(prompts, words)]
    want = local.run(reqs)
    for i, out in enumerate(free):
        cut = out[0][:out[0].index(words[i])]
        assert want[3 + i] == [cut] and want[6 + i] == [cut] and len(cut) < len(out[0])
    assert hb.run(reqs) == want
    sampled = [Request("generate", p, max_tokens=8, temperature=0.9, n=2, seed=11) for p in prompts[:2]]
    got = hb.run(sampled)  # seeded sampling: the same draws too (sample i of n uses seed + i in both)
    assert got == local.run(sampled) and all(len(set(g)) == 2 for g in got)


def test_rolling_same_as_in_process(server, local):
    hb = HTTPBackend(server.url + "/v1")
    long = " ".join([FR] * 3)
    reqs = [Request("rolling", FR), Request("rolling", "Hello"), Request("rolling", ""),
            Request("rolling", long, window=16, stride=8), Request("rolling", long, window=24)]
    want, got = local.run(reqs), hb.run(reqs)
    assert want[3].tokens == want[4].tokens > 16  # several windows
    for g, w in zip(got, want):
        assert g.tokens == w.tokens
        assert g.nll == pytest.approx(w.nll, rel=1e-3, abs=1e-4)
    assert got[2].tokens == 0 and got[0].tokens > 10


# ------------------------------------------------------------------------------------------- lm-eval's client
TASKS = {
    "mc": ("multiple_choice", {"doc_to_text": "Question: {{question}}\nAnswer:",
                               "doc_to_target": "{{answer}}", "doc_to_choice": "{{choices}}",
                               "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]},
           [{"question": "Quelle est la capitale de la France ?", "choices": ["Paris", "Lyon", "Marseille"],
             "answer": 0},
            {"question": "What is 2 + 2?", "choices": ["3", "4", "five"], "answer": 1}]),
    "qa": ("generate_until", {"doc_to_text": "Q: {{question}}\nA:", "doc_to_target": "{{answer}}",
                              "generation_kwargs": {"until": ["\n", "Q:"], "max_gen_toks": 8,
                                                    "do_sample": False},
                              "metric_list": [{"metric": "exact_match"}]},
           [{"question": "What is 2 + 2?", "answer": "4"},
            {"question": "Où est le château ?", "answer": "ici"}]),
    "ppl": ("loglikelihood_rolling", {"doc_to_text": "", "doc_to_target": "{{text}}",
                                      "metric_list": [{"metric": "word_perplexity"},
                                                      {"metric": "bits_per_byte"}]},
            [{"text": FR}]),
}


def write_tasks(folder) -> list[str]:
    """Three tiny lm-eval tasks on local JSONL files (no download), written as YAML configs (JSON is YAML)."""
    names = []
    for key, (output_type, cfg, rows) in TASKS.items():
        data = folder / f"{key}.jsonl"
        data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        name = f"llmkit_http_{key}"
        spec = {"task": name, "dataset_path": "json", "output_type": output_type, "test_split": "test",
                "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(folder / "hf")}, **cfg}
        (folder / f"{name}.yaml").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
        names.append(name)
    return names


@pytest.mark.parametrize("tokenizer", ["huggingface", "auto"])
def test_lm_eval_local_completions_against_llmkit_serve(server, local, llm, tiny_llama_dir, tmp_path,
                                                         tokenizer, monkeypatch):
    pytest.importorskip("tenacity", reason="lm-eval's API models need lm-eval[api] (tenacity)")
    from lm_eval import simple_evaluate
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    names = write_tasks(tmp_path)
    extra = {"tokenizer": str(tiny_llama_dir)} if tokenizer == "huggingface" else {}
    lm = LocalCompletionsAPI(model=llm.name, base_url=f"{server.url}/v1/completions",
                             tokenizer_backend=tokenizer, max_length=1024, batch_size=2, **extra)
    # "auto" finds the server's /tokenizer_info and /tokenize: lm-eval then tokenizes through llmkit serve
    assert lm.tokenizer_backend == ("huggingface" if tokenizer == "huggingface" else "remote")
    res = simple_evaluate(model=lm, tasks=names, task_manager=TaskManager(include_path=str(tmp_path),
                                                                          include_defaults=False),
                          log_samples=True)
    metrics = {"mc": ["acc,none", "acc_norm,none"], "qa": ["exact_match,none"],
               "ppl": ["word_perplexity,none", "bits_per_byte,none"]}
    for key, names_ in metrics.items():
        r = res["results"][f"llmkit_http_{key}"]
        assert all(math.isfinite(r[m]) for m in names_), r
        samples = res["samples"][f"llmkit_http_{key}"]
        assert len(samples) == len(TASKS[key][2])
        for s in samples:
            assert s["resps"] and all(x is not None for x in s["filtered_resps"])
            args = [tuple(a) for a in s["arguments"]]
            got = [x[0] for x in s["resps"]]
            if key == "mc":
                want = local.run([Request("loglikelihood", c, k) for c, k in args])
                for (lp, greedy), w in zip(got, want):
                    assert lp == pytest.approx(w.logprob, abs=1e-4) and greedy == w.is_greedy
            elif key == "qa":
                (ctx, kw), = args
                gen = Request("generate", ctx, max_tokens=kw["max_gen_toks"], stop=tuple(kw["until"]))
                want = local.run([gen])
                assert got == want[0]
            else:
                (text,), = args
                want = local.run([Request("rolling", text)])[0]
                assert got[0] == pytest.approx(-want.nll, rel=1e-4)


def test_lm_eval_is_greedy_on_the_models_own_continuation(server, local, llm, tiny_llama_dir, ll_requests):
    pytest.importorskip("tenacity", reason="lm-eval's API models need lm-eval[api] (tenacity)")
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    lm = LocalCompletionsAPI(model=llm.name, base_url=f"{server.url}/v1/completions",
                             tokenizer_backend="huggingface", tokenizer=str(tiny_llama_dir), max_length=1024)
    r = ll_requests[5]
    want = local.run([r])[0]
    assert want.is_greedy
    (lp, greedy), = lm.loglikelihood([Instance("loglikelihood", {}, (r.context, r.continuation), 0)],
                                     disable_tqdm=True)
    assert lp == pytest.approx(want.logprob, abs=1e-4)
    assert greedy


# ------------------------------------------------------------------------------------------- other servers
class Picky:
    """ASGI wrapper around llmkit's app: /v1/completions answers 503 once (Retry-After: 0), then refuses
    `max_tokens: 0` with a 400 as some servers do; everything else passes through."""

    def __init__(self, app):
        self.app, self.seen = app, []

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/v1/completions":
            return await self.app(scope, receive, send)
        from fastapi.responses import JSONResponse

        body, more = b"", True
        while more:
            msg = await receive()
            body, more = body + msg.get("body", b""), msg.get("more_body", False)
        status = 503 if not self.seen else 400 if json.loads(body).get("max_tokens") == 0 else 200
        self.seen.append(status)
        if status != 200:
            err = {"message": "busy" if status == 503 else "max_tokens must be at least 1", "type": "invalid"}
            return await JSONResponse({"error": err}, status, {"Retry-After": "0"})(scope, receive, send)
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)


@pytest.mark.parametrize("tokenize", [True, False], ids=["token-ids", "text-offsets"])
def test_fallbacks_give_the_same_answers(llm, local, ll_requests, tmp_path, caplog, tokenize):
    app = create_app(llm, store_path=tmp_path / "r.sqlite", model_name=llm.name)
    if not tokenize:  # a server without vLLM's /tokenize route: continuations are found by text_offset
        app.router.routes = [r for r in app.router.routes if getattr(r, "path", None) != "/tokenize"]
    picky = Picky(app)
    reqs = [*ll_requests, Request("rolling", FR)]
    with LiveServer(picky) as s, caplog.at_level(logging.WARNING, logger="llmkit.eval"):
        got = HTTPBackend(s.url + "/v1", batch_size=4).run(reqs)
    # busy: retried; max_tokens 0 refused once, then every call scored with max_tokens 1
    assert picky.seen[:3] == [503, 400, 200] and picky.seen.count(400) == picky.seen.count(503) == 1
    want = local.run(reqs)
    assert_same_ll(got[:-1], want[:-1])
    assert got[-1].tokens == want[-1].tokens and got[-1].nll == pytest.approx(want[-1].nll, rel=1e-3)
    assert ("is not available" in caplog.text) == (not tokenize)


def test_helpers():
    assert cut_at_stops("abc STOP def END", ["END", "STOP"]) == "abc "
    assert cut_at_stops("xabcd", ["abcd", "bc"]) == "xa"  # "bc" completes first, as a server would stop
    assert cut_at_stops("nothing", ["zz"]) == "nothing"
    text = "Premier paragraphe.\n\nDeuxième, un peu plus long.\n \nTroisième " + "mot " * 30
    pieces = paragraphs(text, 40)
    assert "".join(pieces) == text and all(len(p) <= 40 for p in pieces)
    assert pieces[0] == "Premier paragraphe.\n\n"


# ------------------------------------------------------------------------------------------- errors
def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_errors_are_one_line(llm, server, tmp_path):
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(LlmkitError) as e:
        HTTPBackend(url)
    msg = one_line(e)
    assert msg.startswith(f"cannot reach {url}/models: ") and msg.endswith("; is the server running?")

    with serve(llm, tmp_path / "k.sqlite", api_keys=["sk-eval"]) as s:
        with pytest.raises(LlmkitError) as e:
            HTTPBackend(s.url + "/v1")
        assert one_line(e) == f"{s.url}/v1/models: the server wants an API key: pass --api-key"
        with pytest.raises(LlmkitError) as e:
            HTTPBackend(s.url + "/v1", "sk-wrong")
        assert "refused the API key" in one_line(e) and "check --api-key" in str(e.value)
        hb = HTTPBackend(s.url + "/v1", "sk-eval")  # the key also opens the tokenizer routes
        assert hb.run([Request("loglikelihood", "Bonjour", " à tous")])[0].n_tokens >= 2

    with pytest.raises(LlmkitError) as e:
        HTTPBackend(server.url + "/v1", model="no-such-model").run([Request("generate", "Hi", max_tokens=2)])
    msg = one_line(e)
    assert "HTTP 404" in msg and "no-such-model" in msg  # the server's own message is quoted
    with pytest.raises(LlmkitError, match="--batch-size must be >= 1"):
        HTTPBackend(server.url, batch_size=0)
    with pytest.raises(LlmkitError, match="http"):
        HTTPBackend("127.0.0.1:8000")

"""`llmkit serve MODEL --adapter NAME=PATH`: each LoRA adapter served as its own model id beside the base.

The server is built by the CLI verb itself (uvicorn.run intercepted, the app then served by a LiveServer) on
a tiny random transformers Llama with two adapters (llmkit's apply_lora + save_adapter, random B; one on
q_proj / v_proj, one on every projection). References: the
official `openai` client against `llmkit.load(MODEL, adapter=PATH)` (and the plain base) run greedily in
this process; storage identity (`data_ptr`) for the shared base weights.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import openai
import pytest
import requests
import torch
import torch.nn as nn
from serve_utils import LiveServer

import llmkit
from llmkit.cli import main
from llmkit.lora import TARGETS, apply_lora, lora_modules, save_adapter

pytestmark = pytest.mark.usefixtures("one_thread")

MSG = [{"role": "user", "content": "Tell me a story."}]
PROMPT = "Once upon a time"
N = 8  # greedy tokens per answer


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir, tmp_path_factory) -> dict[str, Path]:
    """Two PEFT adapter folders written by llmkit (apply_lora + save_adapter; PEFT interop is test_lora's):
    "qv" on q_proj / v_proj only, "all" on every projection; random B (a fresh adapter is the identity)."""
    root = tmp_path_factory.mktemp("adapters")
    base = llmkit.load(tiny_llama_dir, device="cpu").model
    out = {}
    for seed, (name, targets) in enumerate((("qv", ("q_proj", "v_proj")), ("all", TARGETS))):
        model = copy.deepcopy(base)
        torch.manual_seed(seed)
        apply_lora(model, r=2 + 2 * seed, alpha=4, targets=targets)
        for _, m in lora_modules(model):
            nn.init.normal_(m.lora_B.weight, std=0.5)
        out[name] = save_adapter(model, root / name)
    return out


@pytest.fixture(scope="module")
def refs(tiny_llama_dir, adapters) -> dict[str, llmkit.LLM]:
    """Each served model id -> the same model loaded the plain way (`llmkit.load(..., adapter=PATH)`)."""
    out = {str(tiny_llama_dir): llmkit.load(tiny_llama_dir, device="cpu")}
    out.update({name: llmkit.load(tiny_llama_dir, device="cpu", adapter=p) for name, p in adapters.items()})
    return out


def cli_app(argv: list[str]):
    """The app `llmkit serve ARGV` would run (uvicorn.run intercepted), or None when it never got there;
    returns (exit code, app, whether llmkit.load was called)."""
    import uvicorn

    seen: dict = {}
    load = llmkit.load

    def spy_load(*a, **kw):
        seen["load"] = True
        return load(*a, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("LLMKIT_API_KEY", raising=False)
        mp.setattr(uvicorn, "run", lambda app, **kw: seen.setdefault("app", app))
        mp.setattr(llmkit, "load", spy_load)
        rc = main(["serve", *argv, "--device", "cpu"])
    return rc, seen.get("app"), seen.get("load", False)


@pytest.fixture(scope="module")
def server(tiny_llama_dir, adapters, tmp_path_factory):
    store = tmp_path_factory.mktemp("store") / "r.sqlite"
    rc, app, _ = cli_app([str(tiny_llama_dir), "--adapter", f"qv={adapters['qv']}", "--adapter",
                          f"all={adapters['all']}", "--max-batch", "2", "--max-seq-len", "256",
                          "--store", str(store)])
    assert rc == 0 and app is not None
    with LiveServer(app) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


def test_models_lists_the_base_and_each_adapter(server, client, tiny_llama_dir, adapters):
    base = str(tiny_llama_dir)
    assert [m.id for m in client.models.list().data] == [base, "qv", "all"]
    cards = {c["id"]: c for c in requests.get(server.url + "/v1/models", timeout=30).json()["data"]}
    assert (cards[base]["root"], cards[base]["parent"]) == (base, None)  # vLLM's shape for LoRA modules
    for name, path in adapters.items():
        assert (cards[name]["root"], cards[name]["parent"]) == (str(path), base)
        assert cards[name]["max_model_len"] == 256
    assert client.models.retrieve("all").id == "all"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_each_model_id_is_its_own_model(client, refs):
    """chat, completions (also streamed) and responses, greedy, for the base and each adapter id, equal the
    model loaded the plain way; and the three models answer differently (so routing is really tested)."""
    chats = {}
    for model, ref in refs.items():
        want_chat = ref.chat(MSG, max_tokens=N, temperature=0).text
        want_text = ref.generate(PROMPT, max_tokens=N, temperature=0).text
        r = client.chat.completions.create(model=model, messages=MSG, max_tokens=N, temperature=0)
        assert (r.model, r.choices[0].message.content) == (model, want_chat)
        c = client.completions.create(model=model, prompt=PROMPT, max_tokens=N, temperature=0)
        assert (c.model, c.choices[0].text) == (model, want_text)
        resp = client.responses.create(model=model, input=MSG[0]["content"], max_output_tokens=N,
                                       temperature=0)
        assert (resp.model, resp.output_text) == (model, want_chat)
        chats[model] = want_chat
    assert len(set(chats.values())) == len(chats), chats
    stream = client.chat.completions.create(model="all", messages=MSG, max_tokens=N, temperature=0,
                                            stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == chats["all"]


def test_lanes_run_at_the_same_time(client, refs):
    """One request per model id at once (each lane's engine thread steps its own batch over the shared base
    weights): every answer is still its model's."""
    from concurrent.futures import ThreadPoolExecutor

    def ask(model: str) -> str:
        r = client.chat.completions.create(model=model, messages=MSG, max_tokens=2 * N, temperature=0)
        return r.choices[0].message.content

    with ThreadPoolExecutor(len(refs)) as pool:
        got = dict(zip(refs, pool.map(ask, refs)))
    assert got == {m: ref.chat(MSG, max_tokens=2 * N, temperature=0).text for m, ref in refs.items()}


def test_a_request_without_model_is_the_base(server, refs, tiny_llama_dir):
    base = str(tiny_llama_dir)
    r = requests.post(server.url + "/v1/chat/completions", timeout=60,
                      json={"messages": MSG, "max_tokens": N, "temperature": 0}).json()
    assert r["model"] == base
    assert r["choices"][0]["message"]["content"] == refs[base].chat(MSG, max_tokens=N, temperature=0).text


def test_unknown_model_is_404_model_not_found(server, client):
    calls = (lambda: client.chat.completions.create(model="gpt-9", messages=MSG, max_tokens=1),
             lambda: client.completions.create(model="gpt-9", prompt="x", max_tokens=1),
             lambda: client.responses.create(model="gpt-9", input="x", max_output_tokens=1))
    for call in calls:
        with pytest.raises(openai.NotFoundError) as e:
            call()
        assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
        assert "`all`" in e.value.body["message"]  # the message names what is served
    r = requests.post(server.url + "/tokenize", json={"model": "gpt-9", "prompt": "x"}, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = requests.post(server.url + "/tokenize", json={"model": "all", "prompt": "x"}, timeout=30)
    assert r.status_code == 200 and r.json()["tokens"]


def test_base_weights_are_shared_and_each_id_has_its_own_engine(server):
    router = server.app.state.router
    engines = {name: svc.scheduler.backend.engine for name, svc in router.services.items()}
    base = engines[router.base.model_name].model
    assert not lora_modules(base)  # the base model itself never gets a wrapper
    base_ptrs = {p.data_ptr() for p in base.parameters()}
    for name in ("qv", "all"):
        model = engines[name].model
        wrappers = lora_modules(model)
        assert wrappers and model is not base
        for qual, w in wrappers:
            assert w.base_layer is base.get_submodule(qual)  # the SAME base module, wrapped
        lora_ids = {id(p) for _, w in wrappers for p in (w.lora_A.weight, w.lora_B.weight)}
        shared = {p.data_ptr() for p in model.parameters() if id(p) not in lora_ids}
        assert shared == base_ptrs  # every base weight: the same storage, nothing copied
        assert {id(b) for b in model.buffers()} == {id(b) for b in base.buffers()}
    assert len(lora_modules(engines["qv"].model)) == 4 and len(lora_modules(engines["all"].model)) == 14
    caches = {e.cache.k[0].data_ptr() for e in engines.values()}
    assert len(caches) == len(engines) == len({id(e) for e in engines.values()})  # a KV cache per model id
    lanes = router.schedulers
    assert len({id(s) for s in lanes}) == 3 and all(s.healthy() for s in lanes)


def test_plain_adapter_dir_still_applies_to_the_base(tiny_llama_dir, adapters, refs):
    rc, app, _ = cli_app([str(tiny_llama_dir), "--adapter", str(adapters["all"]), "--max-batch", "1",
                          "--max-seq-len", "128"])
    assert rc == 0
    base = str(tiny_llama_dir)
    assert list(app.state.router.services) == [base]
    with LiveServer(app) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=60)
        r = c.chat.completions.create(model=base, messages=MSG, max_tokens=N, temperature=0)
    assert r.choices[0].message.content == refs["all"].chat(MSG, max_tokens=N, temperature=0).text


def _bad_args(tmp: Path, adapter: Path) -> list[tuple[list[str], str]]:
    empty = tmp / "empty"
    empty.mkdir(exist_ok=True)
    return [
        ([f"fr={adapter}", "fr="], "expected NAME=PATH"),
        ([f"={adapter}"], "expected NAME=PATH"),
        ([f"fr={adapter}", f"fr={adapter}"], "already given to"),
        ([f"base={adapter}"], "is the base model's id"),
        ([f"my adapter={adapter}"], "a model id is letters"),
        ([f"fr={tmp / 'missing'}"], "no such folder"),
        ([f"fr={empty}"], "no adapter_config.json"),
        ([str(adapter), f"fr={adapter}"], "cannot be mixed"),
        ([str(tmp / "missing")], "no such folder"),
    ]


def test_cli_rejects_bad_adapters_in_one_line_before_loading(tmp_path, adapters, capsys):
    for values, phrase in _bad_args(tmp_path, adapters["all"]):
        argv = ["base"] + [a for v in values for a in ("--adapter", v)]
        rc, app, loaded = cli_app(argv)
        err = capsys.readouterr().err
        assert rc == 1 and app is None and not loaded, (values, err)
        assert err.startswith("llmkit: error: ") and err.count("\n") == 1 and phrase in err, (values, err)


def test_library_rejects_bad_adapters(tiny_llama_dir, adapters, refs, tmp_path):
    from llmkit.errors import LlmkitError
    from llmkit.serve.app import create_app

    llm = refs[str(tiny_llama_dir)]
    with pytest.raises(LlmkitError, match="is the base model's id"):
        create_app(llm, model_name="m", adapters={"m": adapters["all"]})
    bad = tmp_path / "bad"
    shutil.copytree(adapters["all"], bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "r": cfg["r"] + 1}))
    with pytest.raises(LlmkitError, match=r"^adapter 'bad': .*do not match r=5"):  # named, one line
        create_app(llm, adapters={"ok": adapters["qv"], "bad": bad})
    assert not lora_modules(llm.model)  # the base is untouched


def test_chat_page_picks_a_model(server):
    """The web page shows a picker when /v1/models has more than one model; the chosen id is what it
    sends, and the answer is labelled with it."""
    chromium = Path("/usr/bin/chromium")
    exe = chromium if chromium.exists() else shutil.which("chromium")
    if not exe:
        pytest.skip("chromium is not installed")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (test extras)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(exe), headless=True,
                                    args=["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"])
        try:
            page = browser.new_page()
            page.goto(server.url + "/")
            page.wait_for_selector("#model_pick option >> nth=2", state="attached")
            assert page.locator("#model_pick").is_visible()
            page.select_option("#model_pick", "all")
            assert page.locator("#model").inner_text() == "all"
            page.fill("#max_tokens", "3")
            page.fill("#msg", "Hello")
            with page.expect_request("**/v1/chat/completions") as req:
                page.click("#send")
            assert json.loads(req.value.post_data)["model"] == "all"
            page.wait_for_function("!document.getElementById('send').disabled", timeout=60_000)
            assert page.locator(".msg.assistant .who").inner_text() == "assistant · all"
        finally:
            browser.close()


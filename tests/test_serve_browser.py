"""The chat page in a real headless Chromium (Debian `chromium` driven by Playwright).

Nothing is installed here: `make setup` installs chromium (as root, when missing) and playwright (test
extras). The test skips with the reason when either is absent; Playwright never downloads a browser.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from serve_utils import serve, tiny_llm

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists() and not shutil.which("chromium"):
        pytest.skip("chromium is not installed (make setup installs the Debian package when run as root)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (test extras)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=str(CHROMIUM if CHROMIUM.exists() else shutil.which("chromium")),
            headless=True,
            args=ARGS,
        )
        yield b
        b.close()


def test_chat_page_streams_and_inspects(browser, tmp_path, out_dir):
    with serve(tiny_llm(), tmp_path / "r.sqlite") as server:
        page = browser.new_page(viewport={"width": 1200, "height": 800})
        page.goto(server.url + "/")
        page.wait_for_function("document.getElementById('model').textContent === 'tiny'")
        page.fill("#system", "You are a pirate.")
        page.fill("#max_tokens", "12")
        page.fill("#msg", "Hello there!")
        page.click("#send")
        # streaming: the stop button is live while tokens arrive, then the answer is complete
        page.wait_for_selector(".msg.assistant .tok", timeout=30_000)
        page.wait_for_function("!document.getElementById('send').disabled", timeout=60_000)
        tokens = page.locator(".msg.assistant .tok")
        assert tokens.count() >= 1
        assert page.locator(".msg.user .body").inner_text() == "Hello there!"
        assert "tokens" in page.locator(".msg.assistant .stats").inner_text()
        assert not page.locator(".tok .alts").first.is_visible()
        page.check("#inspect")
        alts = page.locator(".tok .alts").first
        assert alts.is_visible() and alts.locator("div").count() == 5
        assert "%" in alts.inner_text()
        page.screenshot(path=str(out_dir / "chat_inspect.png"), full_page=True)
        # a second turn keeps the history; "new chat" clears it
        page.fill("#msg", "Again")
        page.click("#send")
        page.wait_for_function(
            "document.querySelectorAll('.msg.assistant').length === 2 && "
            "!document.getElementById('send').disabled",
            timeout=60_000,
        )
        page.click("#new")
        assert page.locator(".msg").count() == 0
        page.close()


def test_inside_panel_shows_heatmap_lens_and_live_entropy(browser, tmp_path, out_dir):
    """The "look inside" panel on a real answer: a heatmap drawn on its canvas (cells with weight), one row of
    predictions per layer, head / layer selectors that reload it, and the temperature slider moving the
    entropy without a request."""
    llm = tiny_llm()
    with serve(llm, tmp_path / "r.sqlite") as server:
        page = browser.new_page(viewport={"width": 1200, "height": 1000})
        page.goto(server.url + "/")
        page.wait_for_function("document.getElementById('model').textContent === 'tiny'")
        page.fill("#max_tokens", "8")
        page.fill("#msg", "Who are you?")
        page.click("#send")
        page.wait_for_selector(".msg.assistant .stats button.inside", timeout=60_000)
        page.click(".msg.assistant .stats button.inside")
        page.wait_for_function("+document.getElementById('in_heat').dataset.cells > 0", timeout=60_000)
        # the canvas really has coloured pixels (not only the white background and the frame)
        coloured = page.evaluate("""() => {
            const c = document.getElementById('in_heat');
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let n = 0;
            for (let i = 0; i < d.length; i += 4) if (d[i + 2] > d[i] + 40) n++;  // bluish
            return n; }""")
        assert coloured > 100
        lens_rows = page.locator("#in_lens tbody tr")
        assert lens_rows.count() == llm.config.n_layers
        assert lens_rows.last.locator("th").inner_text() == f"layer {llm.config.n_layers} (output)"
        n_answer = page.locator("#in_lens thead th.tok").count()
        assert n_answer >= 1 and lens_rows.first.locator("td").count() == n_answer
        assert "%" in lens_rows.first.locator("td").first.inner_text()
        assert page.locator("#in_layer option").count() == llm.config.n_layers
        assert page.locator("#in_head option").count() == llm.config.n_heads + 1  # each head + the mean
        # the slider: entropy and bars change live (no request: the reply carries log Z and H per step)
        requests_seen: list[str] = []
        page.on("request", lambda r: requests_seen.append(r.url))
        slider = page.locator("#in_temp")
        slider.focus()
        page.keyboard.press("Home")  # T = 0: greedy, entropy 0
        assert page.locator("#in_entropy").inner_text().startswith("Entropy 0.00 bits")
        assert page.locator("#in_temp_v").inner_text() == "0.00"
        page.keyboard.press("End")  # T = 2
        hot = page.locator("#in_entropy").inner_text()
        assert page.locator("#in_temp_v").inner_text() == "2.00" and not hot.startswith("Entropy 0.00")
        assert page.locator("#in_bars .bar").count() >= 21  # the top 20 and "all other tokens"
        assert not [u for u in requests_seen if "/v1/inside" in u]
        page.keyboard.press("ArrowLeft")
        assert page.locator("#in_entropy").inner_text() != hot
        # another head, then the first layer: the panel reloads with the server's numbers for them
        page.select_option("#in_head", value="1")
        page.wait_for_function("document.getElementById('in_status').textContent.includes('answer tokens')")
        page.select_option("#in_layer", value="0")
        page.wait_for_function("document.getElementById('in_status').textContent.includes('answer tokens')")
        assert page.locator("#in_head").input_value() == "1"
        assert [u for u in requests_seen if "/v1/inside" in u]
        page.locator("#in_lens thead th.tok").last.click()  # the last answer token's distribution
        page.wait_for_function("document.querySelector('#in_lens thead th.tok:last-child.sel') !== null")
        assert "%" in page.locator("#in_bars").inner_text()
        page.set_viewport_size({"width": 1200, "height": 1600})  # the page scrolls inside: show it all
        page.screenshot(path=str(out_dir / "chat_inside.png"), full_page=True)
        page.close()

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

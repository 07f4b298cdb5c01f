"""The demo as a person uses it: a real headless Chromium types a question and reads the page.

Uses Debian's chromium (`apt-get install chromium`) through the Python `playwright` package,
with no browser download. Skips, saying why, only where no such browser is installed.
`INFERCEPT_SAVE_SCREENSHOT=1` also copies the screenshot to docs/demo_screenshot.png.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from demo_helpers import (  # skips this module without gradio
    ANSWER,
    GRADIO_WARNINGS,
    QUESTION,
    ROOT,
    chat_model,
    one_torch_thread,
    running_app,
)

pytestmark = GRADIO_WARNINGS
sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs `pip install playwright`")

CHROMIUM = os.environ.get("INFERCEPT_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 60_000
# The memory panel says the engine is idle and has finished a request (pauses are counted at the finish).
FINISHED = ("(t => t && t.includes('0 running, 0 paused at a tool, 0 waiting') && !t.includes('none yet'))"
            "(document.querySelector('#figures')?.innerText)")


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: install Debian's `chromium` (apt-get install chromium), "
                    "or point INFERCEPT_CHROMIUM at a Chromium binary")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


def test_a_person_asks_an_arithmetic_question(browser, tmp_path):
    chat = chat_model()
    with one_torch_thread(), running_app(chat) as url:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url)
        page.locator("#message textarea").fill(QUESTION)
        page.locator("#send").click()

        chat_box = page.locator("#chat")
        chat_box.get_by_text("tool call · calculator").first.wait_for()
        chat_box.get_by_text("answer spliced in").first.wait_for()
        page.wait_for_function(FINISHED)  # nothing more will appear
        page.wait_for_timeout(1000)  # two memory-chart ticks, so the screenshot shows the request's blocks

        text = chat_box.inner_text()
        assert ANSWER in text, f"the answer {ANSWER} is not on the page:\n{text}"
        assert "pause handled by" in text and "waste if" in text  # the panel is open: strategy and figures
        assert any(s in text for s in ("preserve", "swap", "discard"))
        shot = tmp_path / "demo.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
        if os.environ.get("INFERCEPT_SAVE_SCREENSHOT") == "1":
            shutil.copy(shot, ROOT / "docs" / "demo_screenshot.png")

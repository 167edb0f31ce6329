"""`stitch demo` in a real browser: Chromium (Debian's package) driven headless by Playwright.

The demo runs as its own process (`python -m stitch demo CKPT`), as a user starts it; answers are compared with
`stitch generate` (the first turn, through the CLI) and `stitch.generate_batch` (the second, a two-turn chat).
Set `STITCH_DEMO_SCREENSHOT=PATH` to also write the screenshot there (how docs/images/demo.png is made).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

import stitch
from stitch.infer.generate import generate_batch

pytest.importorskip("gradio")
sync_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = os.environ.get("STITCH_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="no Chromium (apt-get install chromium; .ci/run does)")]

NEW_TOKENS = 10
MAX_PIXELS = 1_000_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def demo_url(ckpt, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("demo") / "demo.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "stitch", "demo", str(ckpt), "--port", str(port), "--dtype", "float32",
             "--plain-text", "--max-new-tokens", str(NEW_TOKENS), "--max-image-pixels", str(MAX_PIXELS)],
            stdout=out, stderr=subprocess.STDOUT, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 180
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"stitch demo exited ({proc.returncode}):\n{log.read_text()}")
                try:
                    urllib.request.urlopen(url, timeout=2)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        pytest.fail(f"stitch demo did not answer in 180 s:\n{log.read_text()}")
                    time.sleep(0.5)
            yield url
        finally:
            proc.terminate()
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pictures")
    Image.new("RGB", (64, 64), (200, 30, 30)).save(folder / "red.png")
    Image.new("RGB", (1100, 1000), (10, 200, 10)).save(folder / "huge.png")  # small file, too many pixels
    (folder / "notes.png").write_text("not a picture, whatever the name says")
    return folder


def _generate_cli(ckpt: Path, image: Path, prompt: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "stitch", "generate", str(ckpt), "--image", str(image), "--prompt", prompt,
         "--max-new-tokens", str(NEW_TOKENS), "--dtype", "float32"],
        capture_output=True, text=True, check=True)
    return out.stdout.removesuffix("\n")


def _send(page, text: str, files: list[Path] = ()) -> None:
    box = page.locator("#stitch-input")
    if files:
        box.locator("input[type=file]").set_input_files([str(f) for f in files])
        page.wait_for_function(  # the upload has finished when its thumbnail is shown
            "n => document.querySelectorAll('#stitch-input .thumbnail-item, #stitch-input img').length >= n",
            arg=len(files), timeout=30_000)
    box.locator("textarea").fill(text)
    box.locator("textarea").press("Enter")


def _wait_answer(page, count: int) -> str:
    """The text of bot message `count` once its turn has finished (the stats line loses its hourglass)."""
    page.wait_for_function(
        """n => document.querySelectorAll('#stitch-chat [data-testid="bot"]').length >= n &&
               /tokens\\/s/.test(document.querySelector('#stitch-stats').innerText) &&
               !document.querySelector('#stitch-stats').innerText.includes('⏳')""",
        arg=count, timeout=120_000)
    return page.locator('#stitch-chat [data-testid="bot"]').nth(count - 1).inner_text()


def _wait_status(page, fragment: str) -> str:
    page.wait_for_function("f => document.querySelector('#stitch-status').innerText.includes(f)", arg=fragment,
                           timeout=30_000)
    return page.locator("#stitch-status").inner_text()


def test_demo_chats_like_generate_and_survives_bad_input(demo_url, ckpt, pictures, tmp_path):
    first_prompt, second_prompt = "What colour is the square?", "Describe it in one word."
    want_first = _generate_cli(ckpt, pictures / "red.png", first_prompt)
    model, processor = stitch.load(ckpt)
    conversation = [{"role": "user", "content": "<image>\n" + first_prompt},
                    {"role": "assistant", "content": want_first},
                    {"role": "user", "content": second_prompt}]
    image = Image.open(pictures / "red.png").convert("RGB")
    want_second = generate_batch(model, processor, [conversation], [[image]], max_new_tokens=NEW_TOKENS)[0]
    assert want_first.strip() and want_second.strip()  # a page shows text without its edge whitespace

    errors: list[str] = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(demo_url, wait_until="load")
            page.wait_for_selector("#stitch-input textarea", timeout=60_000)

            _send(page, first_prompt, [pictures / "red.png"])
            assert _wait_answer(page, 1) == want_first.strip()

            # Bad input: a message in the page, the chat as it was.
            _send(page, "What is this?", [pictures / "notes.png"])
            assert "not an image" in _wait_status(page, "not an image")
            _send(page, "What is this?", [pictures / "huge.png"])
            assert f"at most {MAX_PIXELS}" in _wait_status(page, "pixels")
            _send(page, "   ")
            assert "prompt is empty" in _wait_status(page, "prompt is empty")
            assert page.locator('#stitch-chat [data-testid="bot"]').count() == 1

            # The demo keeps working: a second turn answers from the whole (unchanged) chat.
            _send(page, second_prompt)
            assert _wait_answer(page, 2) == want_second.strip()
            assert page.locator("#stitch-status").inner_text().strip() == ""
            shot = tmp_path / "demo.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            if target := os.environ.get("STITCH_DEMO_SCREENSHOT"):
                shutil.copyfile(shot, target)
        finally:
            browser.close()
    assert errors == []

"""The dashboard as a real process for the browser tests: app.py on a free localhost port with its
own TUNEQUANT_HOME, waited for until it answers, terminated (then killed) afterwards."""
from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parent.parent
# what the developer's shell may set that must not leak into the app under test
DROPPED = ("SPACE_ID", "TUNEQUANT_DB", "TUNEQUANT_STAGES", "TUNEQUANT_CALIBRATION")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_app(home: Path, env: dict | None = None, start_s: float = 120):
    """Yields {"url", "home", "proc", "env"}; `env` adds to (or overrides) the app's environment."""
    e = {**os.environ, "TUNEQUANT_HOME": str(home), "GRADIO_ANALYTICS_ENABLED": "False",
         "TUNEQUANT_PUBLIC_DEMO": "0", "PYTHONUNBUFFERED": "1"}
    for k in DROPPED:
        e.pop(k, None)
    e.update(env or {})
    port = free_port()
    log = open(home / "app.log", "w")
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=ROOT, env=e, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + start_s
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("app did not start:\n" + (home / "app.log").read_text()[-3000:])
                time.sleep(0.5)
        yield {"url": url, "home": home, "proc": proc, "env": e}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def launch_chromium(playwright):
    """Debian's chromium, headless and off the network (no `playwright install`)."""
    return playwright.chromium.launch(executable_path=CHROMIUM, args=[
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])


def open_page(browser, url: str, errors: list, viewport: dict | None = None, **kw):
    """A page on `url` (1500x1000 unless `viewport`) that appends the page's uncaught errors to `errors`."""
    page = browser.new_page(viewport=viewport or {"width": 1500, "height": 1000}, **kw)
    page.set_default_timeout(30_000)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    return page


def pick(page, elem_id: str, value: str) -> None:
    """Choose a value in a Gradio dropdown by typing it and clicking the option."""
    box = page.locator(f"#{elem_id} input").first
    box.click()
    box.fill(value)
    page.get_by_role("option", name=value, exact=True).first.click()
    page.wait_for_timeout(300)


def wait_text(page, selector: str, pattern: str, timeout_s: float = 60) -> str:
    """Wait until the element's text matches the regex; return the text (or fail with the last text)."""
    loc = page.locator(selector).first
    deadline, text = time.monotonic() + timeout_s, ""
    while time.monotonic() < deadline:
        text = loc.inner_text() if loc.count() else ""
        if re.search(pattern, text):
            return text
        page.wait_for_timeout(250)
    raise AssertionError(f"{selector} never matched {pattern!r}; last text: {text[:600]!r}")


@contextlib.contextmanager
def planned_page(url: str, **kw):
    """A chromium page on the app at `url`, once its first plan is on screen (the summary filled);
    at the end, no uncaught page error may have happened."""
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = launch_chromium(p)
        errors: list = []
        page = open_page(browser, url, errors, **kw)
        page.wait_for_function("() => { const e = document.querySelector('#summary'); "
                               "return e && e.innerText.trim().length > 0; }", timeout=60_000)
        yield page
        assert not errors, errors
        browser.close()

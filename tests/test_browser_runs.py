"""The Runs tab as a new user lives it (issue 17, runs), in a real browser at 1280 px against the real
app and real worker processes; only the stage bodies are this file's own (``STAGES``, loaded by the
workers through the ``TUNEQUANT_STAGES`` hook), so a stage can stay silent, stop or fail on cue:
the elapsed counter moves while no event arrives, a stopped stage is not shown (or logged) as done, a
finished run keeps its last loss and speed and its log tail is scrolled to the end, and a long reason
in the history never makes the page wider than the window.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from browser_app import CHROMIUM, pick, planned_page, serve_app, wait_text

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs /usr/bin/chromium (dev.sh installs it)")]
WIDTH = 1280
STAGES_HOOK = f"{Path(__file__).resolve().parent / 'browser_stages.py'}:STAGES"     # loaded by the workers


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    with serve_app(tmp_path_factory.mktemp("home"), {"TUNEQUANT_STAGES": STAGES_HOOK}) as a:
        yield a


@pytest.fixture(scope="module")
def page(app):
    with planned_page(app["url"], viewport={"width": WIDTH, "height": 900}) as pg:
        pg.get_by_role("tab", name="4 · Runs").click()
        yield pg


def store(app):
    from engine.runs.store import RunStore
    return RunStore(app["home"] / "runs.sqlite")


def fill(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input, #{elem_id} textarea").first
    box.fill(str(value))
    box.press("Tab")


def launch(page, name: str, strategy: str, steps: int = 0) -> str:
    pick(page, "run_preset", "—")
    pick(page, "run_strategy", strategy)
    fill(page, "run_name", name)
    fill(page, "run_model", "llama-3.2-1b")
    pick(page, "run_demo", "tickets")
    page.locator("#run_device label", has_text="cpu").first.click()
    if steps:
        fill(page, "run_steps", steps)
    wait_text(page, "#run_preview", rf"name: {re.escape(name)}")
    before = set(re.findall(r"r-\d{8}-\d{6}-[0-9a-f]+", page.locator("#launch_msg").inner_text()))
    page.locator("#launch").click()
    deadline, msg, ids = time.monotonic() + 60, "", set()
    while time.monotonic() < deadline:                   # a new run id (the old message stays until then)
        msg = page.locator("#launch_msg").inner_text()
        ids = set(re.findall(r"r-\d{8}-\d{6}-[0-9a-f]+", msg)) - before
        if ids or "⚠" in msg:
            break
        page.wait_for_timeout(200)
    assert ids and "launched run" in msg, msg
    run_id = ids.pop()
    wait_text(page, "#run_status", re.escape(run_id))
    return run_id


# what makes the Runs tab too wide: the elements whose hiding narrows the page
CULPRIT_JS = """() => { const out = [];
  for (const e of document.querySelectorAll('#tab-runs [id]')) {
    const before = document.documentElement.scrollWidth, d = e.style.display;
    e.style.display = 'none';
    const after = document.documentElement.scrollWidth;
    e.style.display = d;
    if (after < before) out.push(`${e.id} ${before}->${after}`);
  } return out; }"""
def elapsed(page) -> str:
    return page.locator("#run_status .tq-elapsed").inner_text()


def test_elapsed_moves_without_events_and_a_stopped_stage_is_not_done(page, app):
    run_id = launch(page, "quiet one", "ptq-nf4")
    wait_text(page, "#run_status", r"quantize \(1/2\)", 90)
    s = store(app)
    n_events, first = len(s.events(run_id)), elapsed(page)
    deadline = time.monotonic() + 15
    while elapsed(page) == first and time.monotonic() < deadline:
        page.wait_for_timeout(250)
    assert elapsed(page) != first, first                  # the counter moved ...
    assert len(s.events(run_id)) == n_events             # ... while the run said nothing
    page.locator("#stop").click()
    wait_text(page, "#run_status", r"stopped", 60)
    status = wait_text(page, "#run_status", r"quantize — stopped after", 30)
    assert "✓ quantize" not in status, status
    log = page.locator("#run_log textarea").input_value()
    assert "stage quantize done" not in log and "stage quantize stopped after" in log, log[-600:]
    t = elapsed(page)
    page.wait_for_timeout(2500)
    assert elapsed(page) == t                            # an ended run's time stands still


def test_a_finished_run_keeps_its_last_loss_and_the_log_shows_its_end(page):
    launch(page, "trained", "qlora", 30)
    status = wait_text(page, "#run_status", r"finished", 90)
    wait_text(page, "#run_log textarea", r"", 5)
    page.wait_for_timeout(1500)                          # a client tick after the last lines
    assert re.search(r"loss \(last\)\s*\n?\s*\d\.\d{4}", status), status
    assert re.search(r"tokens/s \(last\)\s*\n?\s*8\d\d", status), status
    gap = page.evaluate("() => { const t = document.querySelector('#run_log textarea');"
                        " return t.scrollHeight - t.clientHeight - t.scrollTop; }")
    assert gap <= 4, gap
    assert page.evaluate("() => document.querySelector('#run_log textarea').scrollHeight"
                         " > document.querySelector('#run_log textarea').clientHeight")


def test_a_long_reason_never_makes_the_page_wider_than_the_window(page, app):
    run_id = launch(page, "fail long", "ptq-nf4")
    wait_text(page, "#run_status", r"failed", 60)
    page.get_by_role("button", name="Refresh").first.click()
    wait_text(page, "#run_history", re.escape(run_id), 30)
    from browser_stages import LONG
    assert LONG[:60] in store(app).get_run(run_id)["reason"]
    for label in ("4 · Runs", "1 · Scenario", "2 · Decision matrix", "3 · Trade-offs", "5 · Compare",
                  "6 · Calibration"):
        page.get_by_role("tab", name=label).click()
        page.wait_for_timeout(800)
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= WIDTH, (label, width, page.evaluate(CULPRIT_JS) if label == "4 · Runs" else "")
    page.get_by_role("tab", name="4 · Runs").click()
    for elem_id in ("stop", "launch"):
        box = page.locator(f"#{elem_id}").bounding_box()
        assert box and box["x"] + box["width"] <= WIDTH, (elem_id, box)

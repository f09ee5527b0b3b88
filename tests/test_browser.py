"""The dashboard in a real browser (Debian chromium driven by playwright), against the real app.

One app process on a free localhost port with its own TUNEQUANT_HOME; one page walks it like a
person would: the wizard on an example scenario, the matrix and a chart, a CPU demo run
launched and watched live, a reload that re-attaches, a stop, and two finished runs compared.
Runs use the project's smallest demo model (demo:micro-llama: built in seconds) and a few
steps. With TUNEQUANT_SCREENSHOTS=<dir> set, each screen is also saved as a PNG there
(docs/screenshots/ is made that way).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from browser_app import CHROMIUM, ROOT, launch_chromium, open_page, pick, serve_app, wait_text

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs /usr/bin/chromium (dev.sh installs it)")]
SHOTS = os.environ.get("TUNEQUANT_SCREENSHOTS")
MODEL = "demo:micro-llama"


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    with serve_app(tmp_path_factory.mktemp("home")) as a:
        yield a
    # leave no worker behind: stop any run still active (the app process owned them)
    subprocess.run([sys.executable, "-c", "from engine.runs import api\n"
                    "for r in api.list_runs():\n"
                    "    if r['status'] in ('queued','running'): api.stop(r['id'], grace_s=2, term_s=2)"],
                   cwd=ROOT, env=a["env"], timeout=60)


@pytest.fixture(scope="module")
def page(app):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = launch_chromium(p)
        errors = []
        pg = open_page(browser, app["url"], errors)
        pg.wait_for_selector("#tab-wizard, #example", state="attached")
        pg.errors = errors
        yield pg
        browser.close()


STATE: dict = {}


# ---- helpers ----------------------------------------------------------------------------------------------
def shot(page, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.wait_for_timeout(800)
        page.screenshot(path=str(Path(SHOTS) / f"{name}.png"), full_page=True)


def tab(page, label: str) -> None:
    page.get_by_role("tab", name=label).click()
    page.wait_for_timeout(300)


def fill(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input, #{elem_id} textarea").first
    box.fill(str(value))
    box.press("Tab")


def launch(page, name: str, strategy: str, steps: int) -> str:
    tab(page, "4 · Runs")
    pick(page, "run_strategy", strategy)
    fill(page, "run_name", name)
    fill(page, "run_model", MODEL)
    pick(page, "run_demo", "tickets")
    fill(page, "run_data_path", "")
    page.locator("#run_device label", has_text="cpu").first.click()
    trains = page.locator("#run_steps").is_visible()          # the form shows what the strategy's stages read
    assert trains == (not strategy.startswith("ptq-")), strategy
    for elem_id, v in (("run_steps", steps), ("run_batch", 4), ("run_seq", 64), ("run_eval", 8)):
        if page.locator(f"#{elem_id}").is_visible():
            fill(page, elem_id, v)
    # the preview is the exact config Launch sends
    want = rf"(?=[\s\S]*model: {re.escape(MODEL)})(?=[\s\S]*seq_len: 64)" + (rf"(?=[\s\S]*steps: {steps}\b)"
                                                                               if trains else "")
    preview = wait_text(page, "#run_preview", want)
    assert f"strategy: {strategy}" in preview and f"name: {name}" in preview
    before = set(re.findall(r"r-\d{8}-\d{6}-[0-9a-f]+", page.locator("#launch_msg").inner_text()))
    page.locator("#launch").click()
    deadline, msg, ids = time.monotonic() + 60, "", set()
    while time.monotonic() < deadline:
        msg = page.locator("#launch_msg").inner_text()
        ids = set(re.findall(r"r-\d{8}-\d{6}-[0-9a-f]+", msg)) - before
        if ids or "⚠" in msg:
            break
        page.wait_for_timeout(200)
    assert ids and "launched run" in msg, msg
    run_id = ids.pop()
    wait_text(page, "#run_status", re.escape(run_id))
    return run_id


# ---- the walk ------------------------------------------------------------------------------------------------
def test_wizard_on_an_example_scenario(page):
    pick(page, "example", "ticket-routing")
    wait_text(page, "#example_note, .tq-ok", r"ticket-routing")
    wait_text(page, "#model_msg", r"qwen2.5-7b")                 # the model step shows the resolved model
    shot(page, "1-wizard")
    from playwright.sync_api import expect
    page.get_by_role("button", name="Next: data →").click()
    expect(page.locator("#task input").first).to_have_value("classification")
    expect(page.locator("#examples input").first).to_have_value("600")
    page.get_by_role("button", name="Next: hardware →").click()
    wait_text(page, "#hw_msg", r"T4")
    shot(page, "1-wizard-serving")                                # serving target, device and runtimes
    page.get_by_role("button", name="Next: goals →").click()
    expect(page.locator("#priority input[value='cost']")).to_be_checked()
    yaml_text = wait_text(page, "#scenario_yaml", r"task: classification")
    assert "deploy: {target: gpu-server, gpu: t4-16gb}" in yaml_text and "examples: 600" in yaml_text
    wait_text(page, "#summary", r"Recommended|No strategy is feasible")
    # bad input shows next to its field, never a traceback
    fill(page, "min_retention", 3)
    err = wait_text(page, "#goals_msg", r"min_accuracy_retention")
    assert "Traceback" not in page.content() and "⚠" in err
    fill(page, "min_retention", 0.97)
    wait_text(page, "#goals_msg", r"^$", 20)
    page.locator("#to_matrix").click()


def test_matrix_and_charts(page):
    from engine import strategies
    banner = wait_text(page, "#matrix_banner", r"\d+ strategies, \d+ feasible")
    assert f"{len(strategies.ids())} strategies" in banner
    table = page.locator("#matrix_table")
    text = table.inner_text()
    assert sum(sid in text for sid in strategies.ids()) >= 5      # the visible rows (the grid scrolls)
    reco = re.search(r"Recommended \(highlighted\): (\S+)\.", banner).group(1)
    if reco != "None":
        assert reco in text
    wait_text(page, "#matrix_change", r"What would change the answer")
    wait_text(page, "#matrix_detail", r"Why")                       # the recommendation's details
    shot(page, "2-matrix")
    # a row click opens that strategy's details with the reasons
    table.get_by_text("qlora", exact=True).first.click()
    wait_text(page, "#matrix_detail", r"QLoRA[\s\S]*Why")
    tab(page, "3 · Trade-offs")
    page.wait_for_selector("#plot_mem .js-plotly-plot", state="attached", timeout=30_000)
    page.wait_for_selector("#plot_cost .js-plotly-plot", state="attached", timeout=30_000)
    title = page.locator("#plot_mem .gtitle").first.text_content()
    assert "vs accuracy" in title.lower()
    shot(page, "3-tradeoffs")
    # zoom the latency chart, make every chart redraw, and the zoom stays (uirevision)
    zoom = "[document.querySelector('#plot_lat .js-plotly-plot')].map(g => g.layout.xaxis.range.map(x => +x.toFixed(3)))[0]"
    page.evaluate("Plotly.relayout(document.querySelector('#plot_lat .js-plotly-plot'), {'xaxis.range': [1, 2]})")
    assert page.evaluate(zoom) == [1, 2]
    bars = "document.querySelector('#plot_breakdown .js-plotly-plot').data[0].y.join(',')"
    assert "bf16-baseline" not in page.evaluate(bars)
    pick(page, "breakdown_pick", "bf16-baseline")                     # redraws all four charts
    page.keyboard.press("Escape")
    deadline = time.monotonic() + 30
    while "bf16-baseline" not in page.evaluate(bars) and time.monotonic() < deadline:
        page.wait_for_timeout(200)
    assert "bf16-baseline" in page.evaluate(bars)
    assert page.evaluate(zoom) == [1, 2]


def test_launch_a_cpu_demo_run_and_watch_it(page):
    # a PTQ run first (compared at the end; it runs beside the others), then the run we watch
    STATE["second"] = launch(page, "browser nf4", "ptq-nf4", 1)
    run_id = launch(page, "browser lora", "lora", 12)
    STATE["first"] = run_id
    assert f"run={run_id}" in page.url                               # the URL names the run
    # progress arrives: the stage and then the step counter move without any click
    wait_text(page, "#run_status", r"train \(1/2\)|evaluate \(2/2\)|finished", 180)
    steps_seen = set()
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        t = page.locator("#run_status").inner_text()
        m = re.search(r"step\s+(\d+)/12", t)
        if m:
            steps_seen.add(int(m.group(1)))
        if "finished" in t or len(steps_seen) >= 2:
            break
        page.wait_for_timeout(200)
    log = page.locator("#run_log textarea").input_value()
    assert "stage 1/2: train" in log or len(steps_seen) >= 2, (steps_seen, log[-500:])
    shot(page, "4-runs")


def test_reload_reattaches(page):
    run_id = STATE["first"]
    page.reload()
    page.wait_for_selector("#run_status", state="attached")
    text = wait_text(page, "#run_status", re.escape(run_id), 60)
    assert "lora" in text
    assert page.get_by_role("tab", name="4 · Runs").get_attribute("aria-selected") == "true"
    # and it keeps following the run to its end
    wait_text(page, "#run_status", r"finished", 240)
    wait_text(page, "#run_metrics", r"perplexity", 30)
    hist = wait_text(page, "#run_history", re.escape(run_id), 30)
    assert "finished" in hist
    shot(page, "4-runs-finished")


def test_stop_a_run(page):
    run_id = launch(page, "browser stop me", "lora", 5000)
    wait_text(page, "#run_status", r"step\s+\d+/5000", 180)
    page.locator("#stop").click()
    wait_text(page, "#stop_msg", r"stop requested")
    wait_text(page, "#run_status", r"stopped", 60)
    assert page.locator(f"#run_status [data-status='stopped']").count() == 1
    STATE["stopped"] = run_id


def test_compare_two_finished_runs(page, app):
    first, second = STATE["first"], STATE["second"]
    from engine.runs.store import RunStore
    store = RunStore(app["home"] / "runs.sqlite")
    deadline = time.monotonic() + 240
    while store.get_run(second)["status"] in ("queued", "running") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert store.get_run(second)["status"] == "finished", store.get_run(second)["reason"]
    # the demo model was built (fresh home) as its own step before a stage started, never inside one
    built = []
    for rid in (first, second):
        types = [e["type"] + (":done" if e.get("done") else "") for e in store.events(rid)]
        if "prepare:done" in types:
            assert types.index("prepare:done") < types.index("stage_started"), types
            built.append(rid)
    assert built, "no run reported building the demo model"
    tab(page, "5 · Compare")
    page.get_by_role("button", name="Refresh").last.click()
    page.wait_for_timeout(500)
    for rid in (first, second):
        box = page.locator("#compare_pick input").first
        box.click()
        box.fill(rid)
        page.get_by_role("option").filter(has_text=rid).first.click()
        page.wait_for_timeout(300)
    page.keyboard.press("Escape")
    table = wait_text(page, "#compare_table", re.escape(second), 60)
    assert first in table and "perplexity" in table and "ptq-nf4" in table
    wait_text(page, "#compare_est", r"Measured vs estimated", 30)
    assert page.evaluate("document.documentElement.scrollWidth") <= 1500      # nothing pushes the page wider
    page.wait_for_selector("#plot_cmp_quality .js-plotly-plot", state="attached")
    assert page.locator("#export_csv a, #export_csv [download]").count() >= 1
    shot(page, "5-compare")
    assert not [e for e in page.errors if "Traceback" in e]

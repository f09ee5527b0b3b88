"""Serving in the dashboard, in a real browser against the real app (issues 11 and 13): the wizard's
runtime picker offers the runtimes of the serving device and its choice reaches the scenario and the
matrix; the trade-offs tab compares the shown strategy across runtimes with the latency goal drawn and
the source on hover; a finished run's artifacts are listed with their runtime and size, download (a
folder as a zip) and, offline, "push to the Hub" fails clearly without ever showing the token.

The run uses this directory's stand-in stage bodies (browser_artifact_stages.py, through the
``TUNEQUANT_STAGES`` hook) in real worker processes: the export writes small files where the real one
writes a GGUF and a vLLM checkpoint."""
from __future__ import annotations

import re
import time
import zipfile
from pathlib import Path

import pytest

from browser_app import CHROMIUM, pick, planned_page, serve_app, wait_text

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs /usr/bin/chromium (dev.sh installs it)")]
STAGES_HOOK = f"{Path(__file__).resolve().parent / 'browser_artifact_stages.py'}:STAGES"
TOKEN = "hf_browserSecretToken0123456789"


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    with serve_app(tmp_path_factory.mktemp("home"), {"TUNEQUANT_STAGES": STAGES_HOOK, "HF_HUB_OFFLINE": "1",
                                                      "HF_TOKEN": ""}) as a:
        yield a


@pytest.fixture(scope="module")
def page(app):
    with planned_page(app["url"], viewport={"width": 1440, "height": 1000}, accept_downloads=True) as pg:
        yield pg


def options(page, elem_id: str) -> list[str]:
    page.locator(f"#{elem_id} input").first.click()
    page.wait_for_timeout(300)
    got = [o.inner_text().replace("✓", "").strip() for o in page.get_by_role("option").all()]
    page.locator(f"#{elem_id} input").first.evaluate("e => e.blur()")
    page.wait_for_timeout(200)
    return got


def choose(page, elem_id: str, text: str) -> None:
    """Pick the dropdown option whose label starts with ``text`` (the ✓ of the selected one aside)."""
    box = page.locator(f"#{elem_id} input").first
    box.evaluate("e => e.blur()")
    box.click()
    page.wait_for_timeout(300)
    page.get_by_role("option").filter(has_text=re.compile(r"^\W*" + re.escape(text))).first.click()
    page.wait_for_timeout(300)


def fill(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input, #{elem_id} textarea").first
    box.fill(str(value))
    box.press("Tab")


def test_runtime_picker_and_runtime_chart(page):
    page.get_by_role("tab", name="1 · Scenario").click()
    page.get_by_role("button", name="Next: data →").click()
    page.get_by_role("button", name="Next: hardware →").click()
    page.locator("#target").wait_for(state="visible")
    page.wait_for_timeout(500)
    page.locator("#target label", has_text="gpu-server").first.click()
    wait_text(page, "#scenario_yaml", r"target: gpu-server")
    choose(page, "deploy_device", "NVIDIA L4 (l4-24gb)")
    wait_text(page, "#scenario_yaml", r"gpu: l4-24gb")
    got = options(page, "runtime")
    assert {re.sub(r" \(.*", "", o) for o in got} == {"transformers", "vllm", "llama.cpp", "tensorrt-llm"}
    assert "vllm (the default here)" in got
    assert "default here: vllm" in page.locator("#runtime").inner_text()     # none picked: the advisor searches
    choose(page, "runtime", "llama.cpp")
    wait_text(page, "#scenario_yaml", r"runtime: llama\.cpp")
    page.get_by_role("tab", name="2 · Decision matrix").click()
    cells = wait_text(page, "#matrix_table", r"· llama\.cpp")
    assert "· vllm" not in cells and "· transformers" not in cells     # every latency is llama.cpp's now
    # the trade-offs tab: the shown strategy in every runtime on the L4, llama.cpp outlined
    page.get_by_role("tab", name="3 · Trade-offs").click()
    page.wait_for_function("() => { const g = document.querySelector('#plot_runtimes .js-plotly-plot');"
                           " return g && g.data && g.data.length > 0; }", timeout=30_000)
    fig = page.evaluate("() => { const g = document.querySelector('#plot_runtimes .js-plotly-plot');"
                        " return {data: g.data.map(t => ({y: t.y, x: t.x, xaxis: t.xaxis, cd: t.customdata,"
                        " w: t.marker.line.width, h: t.hovertext})), shapes: (g.layout.shapes || []).map(s => [s.xref, s.x0]),"
                        " title: g.layout.title.text}; }")
    lat = [t for t in fig["data"] if t["xaxis"] == "x"]
    runtimes = {cd for t in lat for cd in t["cd"]}
    assert runtimes == {"transformers", "vllm", "llama.cpp", "tensorrt-llm"}
    outlined = {cd for t in lat for cd, w in zip(t["cd"], t["w"]) if w > 1}
    assert outlined == {"llama.cpp"}
    assert ["x", 50] in fig["shapes"]                                    # the goal (the default form's 50 ms)
    assert all("python -m engine estimate infer" in h and "evidence:" in h for t in lat for h in t["h"])
    # a real hover shows the source
    bar = page.locator("#plot_runtimes .js-plotly-plot .bars path").first
    bar.scroll_into_view_if_needed()
    box = bar.bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] / 2)
    page.wait_for_timeout(200)
    page.mouse.move(box["x"] + box["width"] * 0.5, box["y"] + box["height"] / 2)
    page.wait_for_function("() => (document.querySelector('#plot_runtimes .hoverlayer') || {}).textContent"
                           "?.includes('estimate infer')", timeout=10_000)
    hover = page.evaluate("() => document.querySelector('#plot_runtimes .hoverlayer').textContent")
    assert "ms/token" in hover and "evidence:" in hover
    # another strategy picked for the chart
    pick(page, "runtime_pick", "ptq-gguf-q8_0")
    page.wait_for_function("() => document.querySelector('#plot_runtimes .js-plotly-plot').layout.title.text"
                           ".includes('ptq-gguf-q8_0')", timeout=20_000)
    # a list: llama.cpp then vLLM, searched in that order (deploy.runtime as a list), in the YAML and the matrix
    page.get_by_role("tab", name="1 · Scenario").click()
    choose(page, "runtime", "vllm")
    wait_text(page, "#scenario_yaml", r"runtime: \[llama\.cpp, vllm\]")
    page.get_by_role("tab", name="2 · Decision matrix").click()
    cells = wait_text(page, "#matrix_table", r"· vllm")
    assert "· llama.cpp" in cells and "· transformers" not in cells and "· tensorrt-llm" not in cells
    page.get_by_role("tab", name="1 · Scenario").click()
    # a phone: vLLM does not run there and leaves the list, llama.cpp does and stays; the phone's runtimes offered
    page.locator("#target label", has_text="phone").first.click()
    wait_text(page, "#scenario_yaml", r"target: phone")
    wait_text(page, "#scenario_yaml", r"runtime: llama\.cpp\}")
    got = options(page, "runtime")
    assert "executorch" in " ".join(got) and "vllm" not in " ".join(got)
    # none picked again: the advisor searches every runtime of the phone (deploy.runtime left out)
    page.locator("#runtime .token-remove, #runtime [aria-label^='Remove']").first.click()
    page.wait_for_function("() => !document.querySelector('#scenario_yaml').innerText.includes('runtime:')",
                           timeout=30_000)


def test_a_runs_artifacts_download_and_an_offline_push(page, app, tmp_path):
    page.get_by_role("tab", name="4 · Runs").click()
    pick(page, "run_preset", "—")
    pick(page, "run_strategy", "lora-merge-gguf-q4_k_m")
    fill(page, "run_name", "artifacts")
    fill(page, "run_model", "llama-3.2-1b")
    pick(page, "run_demo", "tickets")
    page.locator("#run_device label", has_text="cpu").first.click()
    wait_text(page, "#run_preview", r"name: artifacts")
    page.locator("#launch").click()
    wait_text(page, "#launch_msg", r"launched run")
    wait_text(page, "#run_status", r"finished", 120)
    table = wait_text(page, "#run_artifacts", r"model-q4_k_m\.gguf", 30)
    assert "llama.cpp" in table and "gguf-q4_k_m" in table and "10 KiB" in table and "perplexity 10.250" in table
    assert "export-vllm/" in table and "vllm" in table
    assert "runs artifacts r-" in page.locator("#art_msg").inner_text()
    # the GGUF file as it is
    page.locator("#art_get").click()
    wait_text(page, "#art_get_msg", r"ready")
    with page.expect_download() as dl:
        page.locator("#art_download").click()
    got = tmp_path / "got.gguf"
    dl.value.save_as(got)
    assert got.read_bytes() == b"GGUF" + bytes(range(256)) * 40
    # the checkpoint folder as a zip
    choose(page, "art_pick", "export-vllm")
    page.locator("#art_get").click()
    wait_text(page, "#art_get_msg", r"zip")
    with page.expect_download() as dl:
        page.locator("#art_download").click()
    z = tmp_path / "got.zip"
    dl.value.save_as(z)
    assert sorted(zipfile.ZipFile(z).namelist()) == ["config.json", "vllm_manifest.json"]
    # push offline: a clear message, nothing uploaded, the token nowhere on the page and the box emptied
    fill(page, "art_repo", "me/tuned")
    fill(page, "art_token", TOKEN)
    page.locator("#art_push").click()
    msg = wait_text(page, "#art_push_msg", r"nothing was uploaded")
    assert "HF_HUB_OFFLINE" in msg
    assert TOKEN not in page.content() and page.locator("#art_token input").input_value() == ""
    assert TOKEN not in (app["home"] / "app.log").read_text()

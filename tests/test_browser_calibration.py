"""The Calibration tab in a real browser (chromium + playwright) against the real app on an empty
TUNEQUANT_HOME: a bad file is refused inline, the project's recorded measurements
(bench/measurements/calibration-cpu-2026-11-23.json, 29 CPU demo runs) are imported through the upload,
Refit refits, the tables show calibrate()'s rows, and the export downloads and parses with the same
record count. With TUNEQUANT_SCREENSHOTS=<dir>, the tab is saved as <dir>/calibration.png.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from browser_app import CHROMIUM, ROOT, launch_chromium, open_page, serve_app

RECORDED = ROOT / "bench" / "measurements" / "calibration-cpu-2026-11-23.json"
pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs /usr/bin/chromium (dev.sh installs it)")]
SHOTS = os.environ.get("TUNEQUANT_SCREENSHOTS")


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    with serve_app(tmp_path_factory.mktemp("home")) as a:      # the app's own default: home/calibration.json
        yield a


def wait_text(page, selector: str, text: str, timeout_ms: int = 60_000) -> str:
    page.wait_for_function("([s, t]) => { const e = document.querySelector(s); return e && e.innerText.includes(t); }",
                           arg=[selector, text], timeout=timeout_ms)
    return page.locator(selector).inner_text()


def upload(page, path: Path) -> None:
    page.locator("#cal_import input[type=file]").set_input_files(str(path))


def test_import_refit_and_export_in_the_browser(app, tmp_path):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = launch_chromium(p)
        errors = []
        page = open_page(browser, app["url"], errors, accept_downloads=True)
        page.wait_for_selector("#example", state="attached")
        # the page's load events have run (the scenario's summary is drawn): the page is live
        page.wait_for_function("() => { const e = document.querySelector('#summary'); "
                               "return e && e.innerText.trim().length > 0; }", timeout=60_000)
        page.get_by_role("tab", name="6 · Calibration").click()
        wait_text(page, "#cal_status", "No fitted calibration yet")
        assert not page.locator("#cal_export").is_visible()         # nothing to export yet

        # a bad file: an inline message, nothing written
        bad = tmp_path / "not-records.json"
        bad.write_text(json.dumps({"hello": "world"}))
        upload(page, bad)
        msg = wait_text(page, "#cal_msg", "nothing was imported")
        assert "neither a calibration export" in msg and "not-records.json" in msg
        assert not (app["home"] / "calibration_records.jsonl").exists()
        assert not (app["home"] / "calibration.json").exists()

        # the recorded measurements, through the upload (emptied after each import): merged and refitted
        page.locator("#cal_import input[type=file]").wait_for(state="attached")
        upload(page, RECORDED)
        wait_text(page, "#cal_msg", "Imported 95 new record(s) of 95")
        wait_text(page, "#cal_status", "95 record(s) of 29 run(s)")

        page.locator("#cal_refit").click()
        wait_text(page, "#cal_msg", "Refitted: 95 record(s) from 29 run(s)")
        fitted = json.loads((app["home"] / "calibration.json").read_text())
        # every error row of the fit is on screen, with its figures as the CLI prints them
        errs = page.locator("#cal_errors").inner_text()
        for e in fitted["evaluation"]:
            assert e["term"] in errs
            assert f"{e['held_back'] * 100:.1f}%" in errs and f"{e['before'] * 100:.1f}%" in errs
        assert "92.5%" in errs and "×36.8" in errs                   # decode tokens/s held back, before (docs)
        rows = page.locator("#cal_factors [role=grid]").get_attribute("aria-rowcount")   # header + rows (virtualised)
        assert rows == str(len(fitted["factors"]) + 1), (rows, len(fitted["factors"]))
        assert "×0.0111" in page.locator("#cal_factors").inner_text()
        counts = page.locator("#cal_counts").inner_text()
        assert "infer.weights_bytes" in counts and "cpu-x86-pytorch" in counts
        assert "New estimates of this app use it" in page.locator("#cal_status").inner_text()

        # the export: a download of every record, parsing with the same count
        button = page.locator("#cal_export")
        button.wait_for(state="visible")
        assert "95 records" in button.inner_text()
        with page.expect_download(timeout=30_000) as dl:
            button.click()
        path = tmp_path / dl.value.suggested_filename
        dl.value.save_as(path)
        doc = json.loads(path.read_text())
        assert doc["kind"] == "tunequant-calibration-records" and len(doc["records"]) == 95
        assert len({r["run_id"] for r in doc["records"]}) == 29
        assert not errors, errors
        if SHOTS:
            Path(SHOTS).mkdir(parents=True, exist_ok=True)
            page.wait_for_timeout(800)
            page.screenshot(path=str(Path(SHOTS) / "calibration.png"), full_page=True)
        browser.close()

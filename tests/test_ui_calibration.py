"""The calibration screen (ui/calibration.py) on a temp TUNEQUANT_HOME seeded by importing the project's
recorded measurements (29 CPU demo runs, bench/measurements/calibration-cpu-2026-11-23.json): its tables
hold exactly the numbers `calibrate()` computes (the CLI's), export -> import into another home gives the
same fit, a run of the store counts next to the imported ones, and a bad upload is refused inline and
changes nothing."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine import calibration as C
from ui import calibration as U

ROOT = Path(__file__).resolve().parent.parent
RECORDED = ROOT / "bench" / "measurements" / "calibration-cpu-2026-11-23.json"
N_RECORDS, N_RUNS = 95, 29


@pytest.fixture
def home(tmp_path, monkeypatch):
    h = tmp_path / "home"
    h.mkdir()
    monkeypatch.setenv("TUNEQUANT_HOME", str(h))
    monkeypatch.delenv("TUNEQUANT_DB", raising=False)
    monkeypatch.setenv("TUNEQUANT_CALIBRATION", "off")          # the file is written to the home all the same
    monkeypatch.setenv("TUNEQUANT_PUBLIC_DEMO", "0")
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))        # files under tmp_path count as the app's uploads
    return h


def uploaded(src: Path) -> str:
    """``src`` as Gradio hands an upload to a handler: a copy in its upload folder."""
    import os
    import shutil
    dest = Path(os.environ["GRADIO_TEMP_DIR"]) / "seed-upload" / src.name
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    return str(dest)


def seed(home: Path) -> dict:
    view, msg = U.import_upload(uploaded(RECORDED))
    assert f"Imported {N_RECORDS} new record(s) of {N_RECORDS}" in msg, msg
    assert (home / "calibration.json").exists() and (home / "calibration_records.jsonl").exists()
    return view


def test_empty_home_says_there_is_no_fit(home):
    view = U.render()
    assert "No fitted calibration yet" in view["status"] and view["export"] is None and view["records"] == 0
    assert view["errors"].empty and view["factors"].empty and view["counts"].empty
    view, msg = U.refit()
    assert "Refitted: 0 record(s) from 0 run(s); 0 factor(s) apply" in msg
    assert json.loads((home / "calibration.json").read_text())["records"] == 0


def test_tables_hold_calibrates_numbers(home):
    seed(home)
    view, msg = U.refit()
    res = C.calibrate(U.store_runs())                    # what `python -m engine calibrate --json` prints
    assert f"{res['records']} record(s) from {res['runs']} run(s)" in msg and res["records"] == N_RECORDS
    fit = U.fitted()
    # factors: every one, same figures
    keys = ("device", "versions", "term", "variant", "factor", "runs", "spread")
    assert [{k: f[k] for k in keys} | {"applied": f["applied"]} for f in U.factor_rows(fit)] == \
        [{k: f[k] for k in keys} | {"applied": f["applies"]} for f in res["factors"]]
    # errors before / after per term: calibrate's evaluation, and the documented table (docs/calibration.md)
    assert U.error_rows(fit) == res["evaluation"]
    errs = view["errors"].set_index("term")
    assert errs.loc["infer.decode_tokens_per_s", ["runs", "before", "in-sample", "held back"]].tolist() == \
        [28, "97.3%", "86.4%", "92.5%"]
    assert errs.loc["infer.weights_bytes", ["before", "held back", "× off before", "× off held back"]].tolist() == \
        ["58.8%", "9.7%", "×1.59", "×1.1"]
    assert errs.loc["train.tokens_per_s", "in-sample"] == "83.4%"              # not calibrated: scatter
    # the displayed factor table: the same set, applied ones first, formatted to 3 figures
    df = view["factors"]
    n_applied = sum(f["applies"] for f in res["factors"])
    assert len(df) == len(res["factors"]) and df["applied"].tolist() == ["yes"] * n_applied + ["no"] * (len(df) - n_applied)
    nf4 = next(f for f in res["factors"] if f["versions"] == "*" and f["term"] == "infer.decode_tokens_per_s"
               and f["variant"] == "nf4")
    row = df[(df.versions == "*") & (df.term == "infer.decode_tokens_per_s") & (df.variant == "nf4")].iloc[0]
    assert (row["factor"], row["spread"], row["runs"], row["applied"]) == \
        (f"×{nf4['factor']:.3g}", f"×{nf4['spread']:.3g}", nf4["runs"], "yes")
    assert row["factor"] == "×0.0111"                                          # the figure docs/calibration.md shows
    # counts per device/term: records and runs, all imported, all in the fit
    counts = view["counts"].set_index("term")
    assert counts["records"].sum() == N_RECORDS and set(counts["device"]) == {"cpu-x86-pytorch"}
    assert counts.loc["infer.prefill_s", ["records", "runs", "from the run store", "imported", "in the fit"]].tolist() \
        == [28, 28, 0, 28, 28]
    assert "95 record(s) of 29 run(s)" in view["status"] and "Not current" not in view["status"]
    assert "TUNEQUANT_CALIBRATION=off" in view["status"]


def test_export_import_round_trip_into_another_home(home, tmp_path, monkeypatch):
    view = seed(home)
    first = U.fitted()
    path = Path(view["export"])
    doc = json.loads(path.read_text())
    assert doc["kind"] == "tunequant-calibration-records" and doc["schema"] == C.SCHEMA
    assert len(doc["records"]) == N_RECORDS and len({r["run_id"] for r in doc["records"]}) == N_RUNS
    assert U.export_file() == str(path)                  # same records, same file (no litter per refresh)

    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.setenv("TUNEQUANT_HOME", str(other))
    assert U.render()["records"] == 0
    view2, msg = U.import_upload(uploaded(path))          # downloaded, then uploaded into the other app
    assert f"Imported {N_RECORDS} new record(s)" in msg and str(other / "calibration.json") in msg
    second = U.fitted()
    assert U.factor_rows(second) == U.factor_rows(first) and U.error_rows(second) == U.error_rows(first)
    assert view2["errors"].equals(view["errors"])
    # importing it again adds nothing
    _, msg = U.import_upload(uploaded(path))
    assert "Imported 0 new record(s) of 95" in msg and "95 already there" in msg


def test_a_store_run_counts_next_to_the_imported_ones(home):
    from engine.runs import api
    from test_report import RUN_ID, record_run
    seed(home)
    ex = api.use_store(home / "runs.sqlite")
    try:
        record_run(ex.store, RUN_ID)
    finally:
        api.use_store(None)
    own = C.records_from_runs(U.store_runs())
    assert own, "the recorded CPU run has comparable records"
    view = U.render()
    assert view["records"] == N_RECORDS + len(own)
    assert f"Not current:</b> {N_RECORDS + len(own)} record(s) now" in view["status"]
    counts = view["counts"]
    assert counts["from the run store"].sum() == len(own) and counts["imported"].sum() == N_RECORDS
    view, msg = U.refit()
    assert f"{N_RECORDS + len(own)} record(s) from {N_RUNS + 1} run(s)" in msg and "Not current" not in view["status"]
    assert (view["counts"]["in the fit"] == view["counts"]["records"]).all()


@pytest.mark.parametrize("name, content, expect", [
    ("notes.json", "this is not json", "is not JSON"),
    ("old.json", json.dumps({"schema": 99, "records": []}), "has schema 99; this version reads schema 1"),
    ("partial.json", json.dumps({"schema": 1, "records": [{"run_id": "r1", "term": "infer.prefill_s",
                                                            "device": "cpu-x86-pytorch", "versions": "v"}]}),
     "record 0 lacks estimated, measured"),
    ("weird.json", json.dumps({"hello": 1}), "neither a calibration export"),
    ("records.csv", "run_id,term\n", "must be a .json file"),
    ("cpu-bench.json", json.dumps({"gpu": "cpu", "device": "cpu", "results": []}), "holds no records"),
])
def test_bad_upload_is_refused_inline_and_changes_nothing(home, tmp_path, name, content, expect):
    seed(home)
    files = (home / "calibration.json", home / "calibration_records.jsonl")
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files}
    bad = tmp_path / "upload" / name
    bad.parent.mkdir()
    bad.write_text(content)
    view, msg = U.import_upload(str(bad))
    assert 'class="tq-error"' in msg and expect in msg and "nothing was imported" in msg, msg
    assert str(bad.parent) not in msg                    # the file's name, not the server's temp path
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files} == before     # not even rewritten
    assert view["records"] == N_RECORDS


def test_public_demo_refuses_imports(home, monkeypatch):
    monkeypatch.setenv("TUNEQUANT_PUBLIC_DEMO", "1")
    view, msg = U.import_upload(uploaded(RECORDED))
    assert "off in the public demo" in msg and "nothing was imported" in msg
    assert not (home / "calibration_records.jsonl").exists() and view["records"] == 0


def test_an_unreadable_records_file_is_said_not_raised(home):
    (home / "calibration_records.jsonl").write_text("{not json\n")
    view = U.render()
    assert 'class="tq-error"' in view["status"] and "calibration_records.jsonl" in view["status"]
    assert view["records"] == 0 and view["export"] is None


def test_screen_builds_in_the_app():
    import app
    demo = app.build()
    ids = {getattr(b, "elem_id", None) for b in demo.blocks.values()}
    assert {"tab-calibration", "cal_refit", "cal_export", "cal_import", "cal_errors", "cal_factors",
            "cal_counts", "cal_msg", "cal_status"} <= ids

"""Decision matrix handlers over the real advisor: every strategy a row, figures carried over
exactly, the recommendation highlighted, reasons and 'what would change' shown, bad input inline."""
import html
import time

import pytest

from engine import charts, strategies
from engine.advisor import recommend
from ui import layout, matrix, wizard


@pytest.fixture(scope="module")
def result():
    return recommend(wizard.scenario_from_form(wizard.DEFAULT_FORM))


def test_every_strategy_is_a_row_in_rank_order(result):
    rs = charts.rows(result)
    assert sorted(r["strategy"] for r in rs) == sorted(strategies.ids())
    assert [r["rank"] for r in rs] == list(range(1, len(rs) + 1))
    feas = [r["feasible"] for r in rs]
    assert feas == sorted(feas, reverse=True)            # feasible rows first, as the advisor ranks


def test_row_carries_the_advisors_figures_exactly(result):
    for entry, r in zip(result["ranked"], charts.rows(result)):
        est = entry["estimates"]
        assert r["strategy"] == entry["strategy"] and r["score"] == entry["score"]
        assert r["feasible"] == entry["feasible"] and r["rules"] == entry.get("rules", [])
        assert r["why"] == [str(w) for w in entry["why"]]
        assert r["why_not"] == [b["text"] for b in entry["blocked"]]
        assert r["ms_per_token"] == est["latency_ms_per_token"]
        assert r["runtime"] == next((s.get("runtime") for s in est["stages"] if s["stage"] == "serve"), None)
        assert r["retention"] == est["accuracy"].get("retention")
        assert r["ret_low"] == est["accuracy"].get("low") and r["ret_high"] == est["accuracy"].get("high")
        assert r["train_usd"] == est["cost"]["train_usd"]
        assert r["serve_usd_mtok"] == est["cost"]["serve_usd_per_million_tokens"]
        by = {s["stage"]: s for s in est["stages"]}
        assert r["train_bytes"] == by.get("train", {}).get("device_bytes")
        assert r["serve_bytes"] == by.get("serve", {}).get("device_bytes")
        assert len(r["stages"]) == len(est["stages"])


def test_latency_cells_name_the_serving_runtime(result):
    rs = charts.rows(result)
    df = matrix.table(rs, show_infeasible=True).data      # rows grouped by family: match by strategy
    cells = dict(zip(df["strategy"], df["ms/token"]))
    assert len(cells) == len(rs)
    for r in rs:
        if r["ms_per_token"] is not None:
            assert cells[r["strategy"]] == f"{r['ms_per_token']:.1f} · {r['runtime']}"
    assert {r["runtime"] for r in rs if r["ms_per_token"]} >= {"llama.cpp", "transformers"}   # consumer-gpu default


def test_rows_say_where_accuracy_and_memory_figures_come_from(result):
    for entry, r in zip(result["ranked"], charts.rows(result)):
        cell = r["acc_from"]                                                 # the details view shows it
        acc = entry["estimates"]["accuracy"]
        assert r["acc_run"] is None                                          # no runs in these tests
        if acc.get("interval") == "exact":                                   # 16-bit: its own reference
            assert r["acc_kind"] == "definition" and cell == "by definition (16-bit reference)"
        else:
            assert r["acc_kind"] == "estimated"
            assert cell == r["acc_from"] == f"estimated ({acc['evidence']['published']} published)"
        assert r["calibration"] in ("—", "not calibrated") or r["calibration"].startswith(("calibrated from", "train:"))
    d = matrix.detail_html(result, matrix.recommended(result) or result["ranked"][0]["strategy"])
    assert "<b>estimated</b> from" in d and "?run=" not in d


def test_table_highlights_the_recommendation(result):
    rs = charts.rows(result)
    styler = matrix.table(rs, show_infeasible=True)
    df = styler.data
    assert list(df.columns) == matrix.COLUMNS and len(df) == len(rs) and len(matrix.WIDTHS) == len(matrix.COLUMNS)
    ctx = styler._compute().ctx                          # the CSS pandas will render per cell
    reco = matrix.recommended(result)
    by = {r["strategy"]: r for r in rs}
    for i, sid in enumerate(df["strategy"]):
        css = " ".join(v for (row, _), props in ctx.items() if row == i for p in props for v in p)
        if sid == reco:
            assert "#e0e7ff" in css
        elif not by[sid]["feasible"]:
            assert "#6b7280" in css
    assert (df["fits"] == "✓").sum() == sum(r["feasible"] for r in rs)


def test_table_groups_families_and_collapses_the_infeasible(result):
    rs = charts.rows(result)
    df = matrix.table(rs).data
    feas = [r for r in rs if r["feasible"]]
    assert sorted(df["strategy"]) == sorted(r["strategy"] for r in feas)      # infeasible ones collapsed
    fams = list(df["family"])
    assert all(fams.index(f) + fams.count(f) - 1 == len(fams) - 1 - fams[::-1].index(f) for f in set(fams))
    assert df["strategy"].iloc[0] == matrix.recommended(result)             # the best family first
    bad = [r for r in rs if not r["feasible"]]
    note = matrix.infeasible_html(result, rs)
    assert f"{len(bad)} infeasible" in note and all(r["strategy"] in note for r in bad[:3])
    # memory as a bar against the device, from the tightest stage
    r0 = feas[0]
    s = matrix.binding_stage(r0)
    assert f"{100 * s['bytes'] / s['limit']:.0f}% {s['stage']}" in df["peak memory / limit"].iloc[0]
    cards = matrix.top_html(result, rs)
    assert cards.count("data-strategy=") == min(3, len(feas)) and "recommended" in cards


def test_nothing_feasible_never_says_none():
    res = recommend(wizard.scenario_from_form(wizard.load_example("llama-70b-too-big")))
    rs = charts.rows(res)
    banner = matrix.banner_html(res, rs)
    assert "None" not in banner
    if not any(r["feasible"] for r in rs):
        assert "No strategy is feasible" in banner and "No strategy is feasible" in matrix.top_html(res, rs)


def test_summary_change_and_detail_views(result):
    rs = charts.rows(result)
    reco = matrix.recommended(result)
    summary = matrix.summary_html(result, rs)
    if reco:
        name = next(r["name"] for r in rs if r["strategy"] == reco)
        assert "Recommended" in summary and name.split(" (")[0] in summary
    else:
        assert "No strategy is feasible" in summary
    w = result["what_would_change"]
    change = matrix.change_html(result)
    assert "What would change the answer" in change
    assert w["summary"].split(";")[0].split(":")[0] in change
    items = change.split("<li>")[1:]
    assert len(items) == len(set(items))                      # nothing said twice
    if w.get("runner_up"):
        assert change.count(html.escape(charts.reason_text(w["runner_up"]))) == 1
    for sid in (reco or rs[0]["strategy"], rs[-1]["strategy"]):
        d = matrix.detail_html(result, sid)
        entry = next(e for e in result["ranked"] if e["strategy"] == sid)
        assert strategies.get(sid)["name"] in d.replace("&amp;", "&")
        if entry["blocked"]:
            assert "Why not" in d
    assert "not in this matrix" in matrix.detail_html(result, "no-such")


def recompute(form) -> dict:
    out = layout._recompute(form)
    assert len(out) == len(layout.PLAN_KEYS)
    return dict(zip(layout.PLAN_KEYS, out))


def test_recompute_fills_every_output_and_is_fast():
    form = {**wizard.DEFAULT_FORM}
    recompute(form)                                       # warm caches (presets, fits)
    t0 = time.perf_counter()
    out = recompute(form)
    ms = (time.perf_counter() - t0) * 1000
    print(f"\nrecompute (advisor + matrix + 4 charts): {ms:.0f} ms server time")
    scn, res = out["scenario"], out["result"]
    assert scn["model"] == "llama-3.1-8b" and res["recommended"] == matrix.recommended(res)
    assert "model: llama-3.1-8b" in out["scenario_yaml"]
    assert "tq-ok" in out["model_msg"] and "llama-3.1-8b" in out["model_msg"]   # next to the field
    n_ok = sum(e["feasible"] for e in res["ranked"])
    assert len(out["table"].data) == n_ok and f"{len(strategies.ids()) - n_ok} infeasible" in out["infeasible"]
    assert len(layout._recompute(form, show_all=True)[layout.PLAN_KEYS.index("table")].data) == len(strategies.ids())
    assert "server time" in out["timing"]
    reco = matrix.recommended(res)
    if reco:
        assert out["pick"]["value"] == reco and f"({reco}," in out["detail"]
    for k in ("mem", "lat", "breakdown", "cost"):
        assert out[k]["layout"]["uirevision"]             # every chart keeps zoom across redraws


def test_recompute_puts_bad_input_next_to_its_field():
    out = recompute({**wizard.DEFAULT_FORM, "gpu_count": -1})
    assert out["result"] is None
    assert out["model_msg"] == "" and "tq-error" in out["hw_msg"] and "hardware.count" in out["hw_msg"]
    assert "tq-error" in out["banner"]                    # and above the matrix
    assert len(out["table"]) == 0
    out = recompute({**wizard.DEFAULT_FORM, "source": wizard.SRC_HUB, "hub_id": "not a model"})
    assert "tq-error" in out["model_msg"] and "Traceback" not in out["model_msg"]


def test_every_example_scenario_gets_a_matrix():
    for name in wizard.example_scenarios():
        out = recompute(wizard.load_example(name))
        res = out["result"]
        assert res is not None, (name, out["summary"])
        assert len(charts.rows(res)) == len(strategies.ids())


def test_recompute_keeps_the_chosen_chart_view():
    out = dict(zip(layout.PLAN_KEYS, layout._recompute(dict(wizard.DEFAULT_FORM), charts.MEMORY_VIEWS[1],
                                                        ["qlora", "full-finetune"])))
    assert out["mem"]["layout"]["title"]["text"].startswith("Pipeline peak memory")
    labels = {y for t in out["breakdown"]["data"] for y in t["y"]}
    assert labels and all(lbl.split(" · ")[0] in ("qlora", "full-finetune") for lbl in labels)


def test_matrix_table_has_one_width_per_column():
    """Gradio lays widths out by position: a column added without a width shifts every later one."""
    from ui import layout
    app = layout.build_app()
    df = next(c for c in app.blocks.values() if getattr(c, "elem_id", None) == "matrix_table")
    assert len(df.column_widths) == len(matrix.COLUMNS)
    assert sum(float(w.rstrip("%")) for w in df.column_widths) == 100


def test_a_multi_gpu_row_shows_its_launch_plan():
    res = recommend({"model": "llama-2-13b", "examples": 150000, "task": "chat",
                     "hardware": {"gpu": "a100-80gb", "count": 8},
                     "deploy": {"target": "gpu-server", "gpu": "a100-80gb"}}, what_if=False)
    full = matrix.detail_html(res, "full-finetune")
    per = charts.rows(res)
    r = next(x for x in per if x["strategy"] == "full-finetune")
    assert r["launch"]["processes"] == 8
    assert "launch: 8 processes, FSDP full shard (ZeRO-3)" in full and "local: torchrun" in full and "ray:" in full
    assert "local: torchrun" in matrix.detail_html(res, "qlora")          # QLoRA runs under FSDP2 now
    assert "no executor of this engine (QAT + LoRA merges its adapters" in matrix.detail_html(res, "qat-lora")


def test_the_wizards_runtime_recomputes_the_matrix_and_the_runtime_chart_follows_it():
    """deploy.runtime picked in the wizard: every row's latency is for that runtime (a format it cannot
    load is infeasible), and the runtime chart of the shown strategy outlines it, its bar the row's figure."""
    base = {**wizard.DEFAULT_FORM, "target": "gpu-server", "deploy_device": "l4-24gb", "max_latency": 30}
    auto, fixed = recompute(base), recompute({**base, "runtime": "llama.cpp"})
    assert fixed["scenario"]["deploy"]["runtime"] == "llama.cpp" and "runtime: llama.cpp" in fixed["scenario_yaml"]
    rows = {r["strategy"]: r for r in charts.rows(fixed["result"])}
    assert {r["runtime"] for r in rows.values() if r["ms_per_token"] is not None} == {"llama.cpp"}
    assert "format" in rows["ptq-awq-4bit"]["blocked_by"]                 # llama.cpp does not load AWQ
    assert {r["runtime"] for r in charts.rows(auto["result"]) if r["ms_per_token"] is not None} != {"llama.cpp"}
    sid = fixed["rt_pick"]["value"]
    assert sid in fixed["rt_pick"]["choices"] and rows[sid]["ms_per_token"] is not None
    fig = fixed["runtimes"]
    lat = [t for t in fig["data"] if t["xaxis"] == "x"]
    bars = {rid: (x, w) for t in lat for rid, x, w in zip(t["customdata"], t["x"], t["marker"]["line"]["width"])}
    assert bars["llama.cpp"][0] == pytest.approx(rows[sid]["ms_per_token"]) and bars["llama.cpp"][1] > 1
    assert sid in fig["layout"]["title"]["text"] and "NVIDIA L4" in fig["layout"]["title"]["text"]
    # a strategy picked for the chart; a hosted row has nothing to compare
    other = layout._runtime_chart(charts.rows(fixed["result"]), fixed["scenario"], "ptq-gguf-q8_0")
    assert "ptq-gguf-q8_0" in other["layout"]["title"]["text"]
    hosted = layout._runtime_chart(charts.rows(fixed["result"]), fixed["scenario"], "hosted-api")
    assert not hosted["data"] and "no serving estimate" in hosted["layout"]["annotations"][0]["text"]
    # a device change keeps a runtime that runs there and drops one that does not
    f, upd = layout._runtime_for_device({**base, "runtime": "vllm", "deploy_device": "iphone-15-pro-8gb",
                                         "target": "phone"})
    assert f["runtime"] == [] and "vllm" not in [k for _, k in upd["choices"]]
    f, upd = layout._runtime_for_device({**base, "runtime": "llama.cpp"})
    assert f["runtime"] == ["llama.cpp"] and upd["value"] == ["llama.cpp"]
    f, upd = layout._runtime_for_device({**base, "runtime": ["vllm", "llama.cpp"], "deploy_device": "iphone-15-pro-8gb",
                                         "target": "phone"})
    assert f["runtime"] == ["llama.cpp"] == upd["value"]                     # the list, less what the phone lacks

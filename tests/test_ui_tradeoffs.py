"""Trade-off charts: Pareto front by hand, limits drawn where the devices' memory is, intervals as
error bars, evidence in the hover text, stacked breakdowns that sum, zoom kept across redraws."""
import json

import pytest

from engine import charts as tradeoffs   # the trade-off screen draws engine.charts' figures
from engine.charts import Fig
from ui.common import GB


def row(sid, family, feasible, serve_gib, ret, low, high, ms=None, rank=1, stages=None, train_usd=None,
        serve_usd=None):
    stages = stages or [{"stage": "serve", "bytes": serve_gib * GB, "breakdown": {}, "source": f"infer {sid}"}]
    pipeline = [s["bytes"] for s in stages if s["stage"] != "serve"]
    return {"strategy": sid, "family": family, "feasible": feasible, "rank": rank, "blocked_by": [] if feasible
            else ["memory"], "serve_bytes": serve_gib * GB, "peak_bytes": max(pipeline) if pipeline else None,
            "retention": ret, "ret_low": low, "ret_high": high, "acc_source": f"fit on 12 results for {sid}",
            "serve_source": f"python -m engine estimate infer ... {sid}", "ms_per_token": ms, "stages": stages,
            "train_usd": train_usd, "serve_usd_mtok": serve_usd, "cost_source": f"train_cost {sid}"}


ROWS = [row("bf16", "no-change", True, 16.0, 1.0, 1.0, 1.0, ms=30, rank=4),
        row("int8", "ptq-only", True, 9.0, 0.995, 0.99, 0.999, ms=45, rank=2),
        row("nf4", "ptq-only", True, 5.5, 0.97, 0.95, 0.98, ms=20, rank=1),
        row("gptq-3", "ptq-only", True, 4.5, 0.90, 0.85, 0.94, ms=18, rank=5),
        row("awq", "ptq-only", True, 6.0, 0.96, 0.94, 0.975, ms=19, rank=3),     # dominated by nf4
        row("full", "finetune-only", False, 16.0, 1.0, 0.99, 1.0, ms=30, rank=6)]


def test_pareto_by_hand():
    pts = [(16, 1.0, "bf16"), (9, 0.995, "int8"), (5.5, 0.97, "nf4"), (4.5, 0.90, "gptq-3"), (6, 0.96, "awq")]
    assert [p[2] for p in tradeoffs.pareto(pts)] == ["gptq-3", "nf4", "int8", "bf16"]
    assert tradeoffs.pareto([]) == []
    assert [p[2] for p in tradeoffs.pareto([(1, 0.5, "a"), (1, 0.9, "b")])] == ["b"]   # same x: the better one


def test_memory_vs_accuracy_serving_view():
    fig = tradeoffs.memory_vs_accuracy(ROWS, tradeoffs.MEMORY_VIEWS[0], serve_bytes=15.5 * GB, serve_name="T4")
    assert isinstance(fig, Fig)
    json.loads(fig.to_json())                                       # valid Plotly JSON
    assert fig.layout["uirevision"] == "mem-vs-acc-serve_bytes"     # zoom kept while inputs change
    pts = {t: (x, y) for tr in fig.traces if tr.get("customdata")
           for t, x, y in zip(tr["customdata"], tr["x"], tr["y"])}
    assert pts["nf4"] == (pytest.approx(5.5), 0.97) and pts["full"] == (pytest.approx(16.0), 1.0)
    front = next(tr for tr in fig.traces if tr["name"].startswith("Pareto"))
    assert front["x"] == pytest.approx([4.5, 5.5, 9.0, 16.0])      # the infeasible 'full' is not on it
    assert fig.layout["shapes"][0]["x0"] == pytest.approx(15.5)     # the device's memory line
    assert "T4: 15.5 GB" in fig.layout["annotations"][0]["text"]
    ptq = next(tr for tr in fig.traces if tr["name"] == "ptq-only")
    i = ptq["customdata"].index("nf4")
    assert ptq["error_y"]["array"][i] == pytest.approx(0.01) and ptq["error_y"]["arrayminus"][i] == pytest.approx(0.02)
    assert "fit on 12 results for nf4" in ptq["hovertext"][i] and "estimate infer" in ptq["hovertext"][i]
    nc = next(tr for tr in fig.traces if tr["name"] == "finetune-only")
    assert nc["marker"]["symbol"] == ["x-thin-open"] and "not feasible: memory" in nc["hovertext"][0]


def test_pipeline_view_and_latency_goal():
    stages = [{"stage": "train", "bytes": 20 * GB, "breakdown": {}, "source": "train qlora"},
              {"stage": "serve", "bytes": 6 * GB, "breakdown": {}, "source": "infer nf4"}]
    rs = ROWS + [row("qlora", "quantize-then-finetune", True, 6.0, 0.985, 0.97, 0.99, ms=21, rank=7, stages=stages)]
    fig = tradeoffs.memory_vs_accuracy(rs, tradeoffs.MEMORY_VIEWS[1], gpu_bytes=24 * GB, gpu_name="RTX 4090")
    xs = [x for tr in fig.traces if tr.get("customdata") for x in tr["x"]]
    assert xs == [pytest.approx(20.0)]                             # only strategies with a train/calibrate stage
    assert fig.layout["shapes"][0]["x0"] == pytest.approx(24.0)
    lat = tradeoffs.latency_vs_accuracy(ROWS, goal_ms=25, device_name="T4")
    assert lat.layout["shapes"][0]["x0"] == 25 and lat.layout["uirevision"] == "lat-vs-acc"
    front = next(tr for tr in lat.traces if tr["name"].startswith("Pareto"))
    # by latency: gptq-3 18 ms 0.90, awq 19 ms 0.96, nf4 20 ms 0.97, bf16 30 ms 1.0; int8 (45 ms) is dominated
    assert front["x"] == [18, 19, 20, 30]


def test_breakdown_stacks_sum_to_the_stage_memory():
    stages = [{"stage": "train", "bytes": 10 * GB, "source": "train",
               "breakdown": {"weights": 4 * GB, "activations": 3 * GB, "optimizer": 2.5 * GB}},
              {"stage": "serve", "bytes": 5 * GB, "source": "infer",
               "breakdown": {"weights": 4 * GB, "kv_cache": 1 * GB}}]
    rs = [row("lora", "finetune-only", True, 5.0, 1.0, 1.0, 1.0, rank=1, stages=stages)]
    fig = tradeoffs.memory_breakdown(rs, gpu_bytes=24 * GB)
    labels = fig.traces[0]["y"]
    assert labels == ["lora · train", "lora · serve"]
    totals = [sum(tr["x"][i] for tr in fig.traces) for i in range(2)]
    assert totals == [pytest.approx(10.0), pytest.approx(5.0)]      # the unnamed 0.5 GB shows as its own part
    names = [tr["name"] for tr in fig.traces]
    assert "context + allocator slack" in names and fig.layout["barmode"] == "stack"
    assert fig.layout["uirevision"] == "mem-breakdown"


def test_cost_chart_and_empty_states():
    rs = [row("a", "ptq-only", True, 1, 1, 1, 1, train_usd=None, serve_usd=0.12),
          row("b", "finetune-only", True, 1, 1, 1, 1, train_usd=42.0, serve_usd=0.30),
          row("c", "finetune-only", False, 1, 1, 1, 1, train_usd=99.0, serve_usd=0.50)]   # infeasible: left out
    fig = tradeoffs.cost_chart(rs)
    train, serve = fig.traces
    assert train["x"] == ["b"] and train["y"] == [42.0] and train["xaxis"] == "x"
    assert serve["x"] == ["a", "b"] and serve["y"] == [0.12, 0.30] and serve["xaxis"] == "x2"
    none = tradeoffs.cost_chart([row("c", "ptq-only", True, 1, 1, 1, 1)])
    assert none["data"] == [] and "no cost estimates" in none.layout["annotations"][0]["text"]
    assert tradeoffs.memory_vs_accuracy([]).traces == []


def test_points_that_matter_are_named_the_recommendation_marked_and_the_view_on_the_feasible():
    """One far outlier (a 2-bit model at 0.70) must not squeeze the feasible strategies into a sliver."""
    rs = ROWS + [row("gptq-2", "ptq-only", False, 3.0, 0.70, 0.60, 0.78, ms=15, rank=8)]
    fig = tradeoffs.latency_vs_accuracy(rs, goal_ms=50, device_name="T4")
    ptq = next(tr for tr in fig.traces if tr["name"] == "ptq-only")
    labels = {c: t for c, t in zip(ptq["customdata"], ptq["text"])}
    assert labels["nf4"] == "nf4" and labels["int8"] == "int8" and labels["awq"] == "awq"    # the 3 best ranked
    assert labels["gptq-3"] == "gptq-3"                            # on the Pareto front
    assert labels["gptq-2"] == ""                                  # infeasible, not in the top: no label
    star = next(tr for tr in fig.traces if tr["name"].startswith("recommended"))
    assert star["name"] == "recommended: nf4" and star["marker"]["symbol"] == "star"
    assert (star["x"], star["y"]) == ([20], [0.97])
    lo, hi = fig.layout["yaxis"]["range"]
    # the bulk of the feasible ones (within 0.05 of their median 0.97: 0.96 .. 1.0), padded
    assert 0.93 < lo < 0.96 and hi >= 1.0
    assert fig.layout["xaxis"]["range"][1] >= 50                   # the goal line stays in view
    assert any("2 other point(s) outside" in a["text"] for a in fig.layout["annotations"])   # gptq-3, gptq-2
    # a feasible outlier (no retention goal) does not set the axis either; the best ranked is always in view
    rs2 = [dict(r, feasible=True, blocked_by=[]) if r["strategy"] == "gptq-2" else r for r in rs]
    lo2, _ = tradeoffs.latency_vs_accuracy(rs2, goal_ms=50).layout["yaxis"]["range"]
    assert lo2 > 0.9
    rs3 = [dict(r, retention=0.8, ret_low=0.7, ret_high=0.9) if r["strategy"] == "nf4" else r for r in rs]
    lo3, _ = tradeoffs.latency_vs_accuracy(rs3, goal_ms=50).layout["yaxis"]["range"]
    assert lo3 < 0.8
    assert any(tr["name"].startswith("× does not fit") for tr in fig.traces)   # the symbol explained
    assert fig.layout["hoverlabel"]["font"]["size"] == 11


def test_runtime_comparison_chart():
    """One bar per runtime on the device in each panel, the latency goal and the device's memory as
    dashed lines, the interval as error bars, the chosen runtime outlined, the formula, the evidence
    and the planner command in the hover."""
    from engine.estimate import compare_runtimes
    c = compare_runtimes("llama-3.1-8b", "awq-4bit", "l4-24gb", target="gpu-server", max_ms_per_token=30)
    fig = tradeoffs.runtime_comparison(c, 30, "NVIDIA L4", "ptq-awq-4bit", chosen="vllm")
    json.loads(fig.to_json())
    lat = [t for t in fig.traces if t["xaxis"] == "x"]
    mem = [t for t in fig.traces if t["xaxis"] == "x2"]
    ys = [y for t in lat for y in t["y"]]
    assert sorted(ys) == sorted(f"{e['runtime']} · {e['weights']}" for e in c["runtimes"])
    assert [y for t in mem for y in t["y"]] == ys
    by = {e["runtime"]: e for e in c["runtimes"]}
    for t in lat:
        for rid, x, hi, text, w in zip(t["customdata"], t["x"], t["error_x"]["array"], t["hovertext"],
                                       t["marker"]["line"]["width"]):
            assert x == by[rid]["ms_per_token"] and x + hi == pytest.approx(by[rid]["ms_per_token_high"])
            assert by[rid]["source"][:60] in text.replace("<br>", " ") and "evidence:" in text
            assert (w > 1) == (rid == "vllm")
    loads = next(t for t in lat if t["legendgroup"] == "loads")
    assert set(loads["customdata"]) == {"transformers", "vllm", "tensorrt-llm"}      # what loads awq-4bit on an L4
    nearest = next(t for t in lat if t["legendgroup"] == "nearest")
    assert nearest["customdata"] == ["llama.cpp"] and nearest["marker"]["color"] != loads["marker"]["color"]
    for t in mem:
        assert [v * GB for v in t["x"]] == pytest.approx([by[r]["device_bytes"] for r in t["customdata"]])
    shapes = fig.layout["shapes"]
    assert [(s["xref"], s["x0"]) for s in shapes] == [("x", 30.0), ("x2", pytest.approx(by["vllm"]["limit_bytes"] / GB))]
    assert any("goal 30 ms/token" in a["text"] for a in fig.layout["annotations"])
    # nothing to compare: a message, never an empty axis
    empty = tradeoffs.runtime_comparison({"weights": "bf16", "runtimes": []}, 30, "x")
    assert not empty.traces and "no runtime runs on this device" in empty.layout["annotations"][0]["text"]

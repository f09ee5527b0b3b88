"""Compare screen over real finished runs (worker processes; this file's own stage bodies):
measurements side by side, measured vs estimated only where comparable, charts, CSV/JSON export."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from ui import compare

HOOK = f"{Path(__file__).resolve()}:STAGES"


def _train(ctx):
    n = ctx.spec.train.steps or 3
    for i in range(n):
        ctx.emit("step", step=i + 1, total=n, loss=2.0 - 0.1 * i, tokens_per_s=100.0 * (i + 1), mem_bytes=10)
    return {}


def _quantize(ctx):
    return {"bits": ctx.stage.get("bits")}


def _evaluate(ctx):
    bits = ctx.spec.quantize.bits or 16
    ctx.emit("eval", name="before", metrics={"perplexity": 10.0, "accuracy": 0.9})
    ctx.emit("eval", name="after", metrics={"perplexity": 10.0 + (8 - min(bits, 8)) * 0.5, "accuracy": 0.85,
                                            "decode_tokens_per_s": 40.0,
                                            "harness": {"run": {"acc": 0.8 - 0.01 * (16 - bits), "acc_stderr": 0.1,
                                                                "n": 5, "task": "tunequant_classification",
                                                                "kind": "run", "source": "lm-eval 0.4.13"},
                                                        "arc_easy": {"error": "offline"}}})
    ctx.emit("metric", name="after.harness.run.acc", value=0.8 - 0.01 * (16 - bits), unit="lm-eval")
    ctx.emit("metric", name="size_on_disk", value=1000 * bits, unit="bytes")
    return {}


STAGES = {"train": _train, "quantize": _quantize, "evaluate": _evaluate, "merge": _quantize, "convert": _quantize}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    from engine.runs import api
    ws = tmp_path_factory.mktemp("ws")
    mp = pytest.MonkeyPatch()
    mp.setenv("TUNEQUANT_HOME", str(ws))
    mp.setenv("TUNEQUANT_STAGES", HOOK)
    api.use_store(ws / "runs.sqlite")
    a = api.launch({"name": "gptq 4", "model": "qwen2.5-0.5b", "strategy": "ptq-gptq-4bit", "device": "cpu",
                    "quantize": {"bits": 4}})
    b = api.launch({"name": "lora", "model": "qwen2.5-0.5b", "strategy": "lora", "device": "cpu",
                    "train": {"steps": 3}})
    runs = [api.wait(a, timeout=120), api.wait(b, timeout=120)]
    assert [r["status"] for r in runs] == ["finished", "finished"], [r.get("reason") for r in runs]
    yield api, a, b
    api.use_store(None)
    mp.undo()


def test_measured_from_events(finished):
    api, a, b = finished
    m = compare.measured(api.get_run(b), api.events(b))
    assert [s["stage"] for s in m["stages"]] == ["train", "evaluate"]
    assert all(s["mem_source"] == "cpu_peak_rss" and s["peak_mem_bytes"] > 0 for s in m["stages"])
    assert m["evals"]["after"]["perplexity"] == 10.0 and m["train_tokens_per_s"] == 300.0   # 16-bit: no loss
    assert m["metrics"]["size_on_disk"] == (16000, "bytes")
    assert m["wall_s"] > 0 and m["peak_mem_bytes"] == max(s["peak_mem_bytes"] for s in m["stages"])


def test_side_by_side_and_choices(finished):
    api, a, b = finished
    assert {rid for _, rid in compare.run_choices()} >= {a, b}
    items, problems = compare.collect([a, b])
    assert problems == []
    df = compare.side_by_side(items)
    assert list(df.columns) == ["quantity", a, b]
    row = df.set_index("quantity")
    assert row.loc["after: perplexity", a] == "12" and row.loc["after: perplexity", b] == "10"
    assert row.loc["strategy", a] == "ptq-gptq-4bit" and row.loc["quantize: time (s)", b] == "—"
    assert row.loc["size_on_disk (bytes)", a] == "4,000"
    assert row.loc["cost (USD)", a] == "—"                     # CPU run: no GPU price (said in the export)
    assert any(r["quantity"] == "cost" and r["source"] == "CPU run: no GPU price" for r in compare.long_rows(items))
    # lm-eval scores: one row per score (not again from its metric event), with the harness as source
    assert row.loc["after: lm-eval run acc", a] == "0.68" and row.loc["after: lm-eval run acc", b] == "0.8"
    lm = [r for r in compare.long_rows(items) if "harness" in r["quantity"] or "lm-eval" in r["quantity"]]
    assert {r["quantity"] for r in lm} == {"after: lm-eval run acc"}
    assert lm[0]["source"].endswith("(lm-eval 0.4.13, 5 documents)")


def test_measured_vs_estimated_only_where_comparable(finished):
    api, a, b = finished
    items, _ = compare.collect([a, b])
    df = compare.vs_estimate(items)
    assert set(df["run"]) == {a, b}
    ppl = df[(df["run"] == a) & (df["quantity"] == "perplexity ratio after/before")]
    est = api.get_run(a)["estimate"]
    if (est.get("accuracy") or {}).get("ppl_ratio") is not None:
        # a PTQ-only run: measured 12/10 against the planner's ratio, with the error in percent
        r = ppl.iloc[0]
        assert r["measured"] == "1.2"
        want = (1.2 - est["accuracy"]["ppl_ratio"]) / est["accuracy"]["ppl_ratio"] * 100
        assert r["error"] == f"{want:+.1f}%"
    train = df[(df["run"] == b) & (df["quantity"] == "train: peak memory (GB)")]
    if len(train):                                   # estimate_train exists: CPU RSS is not a GPU allocation
        assert train.iloc[0]["error"] == "—" and "not comparable" in train.iloc[0]["note"]


def test_render_charts_and_exports(finished):
    api, a, b = finished
    out = compare.render([a, b])
    msg, table, vs, quality, speed, csv_path, json_path = out
    assert "2 run(s)" in msg and len(table) > 5
    assert "Measured vs estimated" in vs and a in vs and b in vs
    ppl = [t for t in quality["data"] if "perplexity" in t["name"]]
    assert {t["name"] for t in ppl} == {"before perplexity", "after perplexity"}
    after = next(t for t in ppl if t["name"] == "after perplexity")
    assert after["x"] == [f"gptq 4<br>{a[-6:]}", f"lora<br>{b[-6:]}"] and after["y"] == [12.0, 10.0]
    lm = next(t for t in quality["data"] if t["name"] == "after lm-eval run acc")
    assert lm["y"] == [pytest.approx(0.68), pytest.approx(0.8)] and lm["yaxis"] == "y2"
    assert {t["name"] for t in speed["data"]} >= {"train", "evaluate", "quantize"}
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["run"] for r in rows} == {a, b}
    assert any(r["quantity"] == "after: perplexity" and r["value"] == "12.0" and r["source"] == f"run:{a}"
               for r in rows)
    doc = json.loads(Path(json_path).read_text())
    assert [r["id"] for r in doc["runs"]] == [a, b]
    assert doc["runs"][0]["measured"]["evals"]["after"]["perplexity"] == 12.0
    assert "vs_estimate" in doc
    empty = compare.render([])
    assert "Pick two or more runs" in empty[0]
    bad = compare.render(["no-such-run"])
    assert "tq-error" in bad[0]

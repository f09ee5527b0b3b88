"""The practitioners' comparison for the HR chatbot preset: baseline, quantize only, fine-tune only,
fine-tune then quantize, QLoRA — size, latency, quality with its interval, serving cost per
user-month at the stated load and one-off cost, each the advisor's own figure with its source."""
from __future__ import annotations

import pytest

from engine import report
from engine.advisor import recommend
from engine.advisor.compare import comparison
from engine.advisor.rules import settings
from engine.estimate.cost import serving_cost


@pytest.fixture(scope="module")
def hr():
    return recommend("hr-chatbot-13b-l4", what_if=False, runs=[])


def test_one_row_per_approach_with_the_matrix_figures(hr):
    c = comparison(hr)
    fams = [r["family"] for r in c["rows"]]
    assert fams == ["no-change", "ptq-only", "finetune-only", "finetune-then-quantize", "quantize-then-finetune"]
    per_user = settings()["comparison"]["load"]["tokens_per_user_month"]
    assert str(f"{per_user:,}") in c["load"]["text"]
    for row in c["rows"]:
        m = next(r for r in hr["ranked"] if r["strategy"] == row["strategy"])
        # the best-ranked strategy of its family
        assert m["rank"] == min(r["rank"] for r in hr["ranked"] if r["family"] == row["family"]
                                and not set(r["blocked_by"]) & {"format", "deploy"})
        e = m["estimates"]
        serve = next(s for s in e["stages"] if s["stage"] == "serve")
        assert row["serve_device_bytes"] == e["serve_device_bytes"] and row["ms_per_token"] == e["latency_ms_per_token"]
        assert (row["retention"], row["retention_low"], row["retention_high"]) == (
            e["accuracy"]["retention"], e["accuracy"]["low"], e["accuracy"]["high"])
        # serving cost per user-month = USD per million generated tokens (the planner's serving cost) x load
        sc = serving_cost(decode_tokens_per_s_per_sequence=serve["decode_tokens_per_s"], batch_size=1,
                          gpu="l4-24gb", max_latency_ms_per_token=60)
        # the serve stage's cost (its runtime's capacity at the latency goal, batched where the runtime
        # batches) x the load; never dearer than one conversation at a time
        usd_m = e["cost"]["serve_usd_per_million_tokens"]
        assert row["serve_usd_per_user_month"] == pytest.approx(usd_m * per_user / 1e6)
        assert usd_m <= sc["usd_per_million_tokens"] * (1 + 1e-9)
        assert row["train_usd"] == pytest.approx(e["cost"]["train_usd"] or 0.0)
        assert row["sources"]["size"].startswith("estimate infer --model llama-2-13b")
        assert row["sources"]["quality"].startswith("estimate accuracy")
        assert any(w in row["sources"]["serving_cost"] for w in ("usd_per_million_tokens", "USD per million tokens"))
        assert "None" not in row["sources"]["serving_cost"]
        if row["family"] not in ("no-change",):
            assert row["sources"]["training_cost"]
    qlora = c["rows"][-1]
    assert qlora["feasible"] and qlora["strategy"] == hr["recommended"]
    base = c["rows"][0]
    assert base["serve_usd_per_user_month"] > qlora["serve_usd_per_user_month"]   # 16-bit decodes slower


def test_the_report_has_the_table(hr):
    md = report.build(hr, fmt="md")
    i = md.index("## Baseline, quantize, fine-tune: the comparison")
    sec = md[i:md.index("\n## ", i + 5)]
    for label in ("baseline (16-bit, as is)", "quantize only", "fine-tune only", "fine-tune then quantize",
                  "QLoRA (quantize, then fine-tune adapters)"):
        assert f"| {label} |" in sec
    assert "52,500 generated tokens per user-month" in sec and "Where each figure comes from" in sec
    assert "serving USD per user-month" in sec and "[80% interval]" in sec

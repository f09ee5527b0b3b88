"""The advisor always answers: when no strategy meets every hard goal it recommends the closest one,
flagged, with the distance per missed goal, and "what would change" leads with the smallest
relaxation that makes something feasible (checked by ranking the relaxed scenario)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from engine import report
from engine.advisor import recommend
from engine.advisor.rank import miss_distance

ROOT = Path(__file__).resolve().parents[1]
# an 8B classifier on an L4 at 10 ms/token: no weights format decodes that fast there
UNMEETABLE = {"name": "8B classifier, 10 ms/token on an L4", "model": "llama-3.1-8b", "task": "classification",
              "examples": 2000, "hardware": {"gpu": "l4-24gb"}, "deploy": {"target": "gpu-server", "gpu": "l4-24gb"},
              "goals": {"max_latency_ms_per_token": 10}, "measured": "none"}


@pytest.fixture(scope="module")
def out():
    return recommend(UNMEETABLE, runs=[])


def test_an_unmeetable_latency_goal_gets_a_flagged_near_miss(out):
    assert not any(r["feasible"] for r in out["ranked"])
    assert out["recommended"] is not None and out["meets_goals"] is False
    near = out["near_miss"]
    top = out["ranked"][0]
    assert near["strategy"] == out["recommended"] == top["strategy"] and top["rank"] == 1
    # the distance per missed goal is the planner's figure against the goal
    lat = next(m for m in near["misses"] if m["constraint"] == "latency")
    assert lat["value"] == pytest.approx(top["estimates"]["latency_ms_per_token"]) and lat["limit"] == 10
    assert lat["distance"] == pytest.approx(lat["value"] / 10 - 1, abs=1e-4)
    assert top["why"][0].startswith("does NOT meet every goal") and "latency misses by" in top["why"][0]
    # it is the closest: no other strategy's summed distance is smaller
    for r in out["ranked"][1:]:
        assert sum(miss_distance(b) for b in r["blocked"]) >= near["distance"] - 1e-4


def test_what_would_change_leads_with_the_smallest_relaxation(out):
    w = out["what_would_change"]
    relax = w["relaxation"]
    assert relax and "goals.max_latency_ms_per_token" in relax["change"]
    assert w["summary"].startswith("nothing meets every goal; the closest is " + out["recommended"])
    assert "the smallest relaxation that makes something feasible" in w["summary"]
    # checked: with the relaxed goal something is feasible and recommended for real
    after = recommend({**UNMEETABLE, "goals": {"max_latency_ms_per_token": relax["change"]["goals.max_latency_ms_per_token"]}},
                      what_if=False, runs=[])
    assert after["meets_goals"] and after["recommended"] == relax["recommended_after"]
    assert next(r for r in after["ranked"] if r["strategy"] == relax["strategy"])["feasible"]


def test_cli_json_and_report_text_flag_it(tmp_path):
    f = tmp_path / "sc.yaml"
    f.write_text(yaml.safe_dump(UNMEETABLE))
    p = subprocess.run([sys.executable, "-m", "engine", "recommend", "--scenario", str(f), "--json",
                        "--measured", "none"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    cli = json.loads(p.stdout)
    assert cli["recommended"] and cli["meets_goals"] is False and cli["near_miss"]["strategy"] == cli["recommended"]
    p = subprocess.run([sys.executable, "-m", "engine", "recommend", "--scenario", str(f), "--measured", "none"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and f"recommended: {cli['recommended']} (does NOT meet every goal" in p.stdout
    md = report.build(cli, fmt="md")
    assert "No strategy meets every goal. Closest:" in md and "does NOT meet every goal" in md
    assert "the smallest relaxation that makes something feasible" in md


def test_a_feasible_answer_is_unchanged():
    ok = recommend("ticket-routing", what_if=False, runs=[])
    assert ok["meets_goals"] is True and ok["near_miss"] is None and ok["ranked"][0]["feasible"]

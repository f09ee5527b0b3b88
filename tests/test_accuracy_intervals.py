"""Honest accuracy intervals: they widen with the distance from the evidence (method, bits, family,
size) and with a research method's maturity, are never tighter than the spread of the rows they
rest on, and say what they are extrapolated from; a research recipe no longer wins on accuracy it
has no evidence for."""
from __future__ import annotations

import math

import pytest

from engine.advisor import recommend
from engine.estimate import accuracy as A
from engine.estimate import estimate_accuracy


def _acc(**kw):
    base = dict(family="llama-2", params_b=7.0, method="gptq", w_bits=4, group_size=128)
    return estimate_accuracy(**{**base, **kw})


def test_interval_widens_with_distance_from_the_evidence():
    near = _acc()
    far_size = _acc(params_b=0.3)
    far_family = _acc(family="qwen3")
    far_bits = _acc(w_bits=2)
    s = lambda e: e["evidence"]["spread_ln_damage"]
    assert s(far_size) > s(near) and s(far_family) > s(near)
    assert far_size["evidence"]["basis"]["nearest_distance"] > near["evidence"]["basis"]["nearest_distance"]
    assert far_size["evidence"]["basis"]["extrapolated"] and "extrapolated from" in far_size["evidence"]["basis"]["text"]
    assert far_bits["high"] - far_bits["low"] > near["high"] - near["low"]


def test_a_research_method_without_rows_is_wider_than_its_established_neighbour():
    qa = _acc(method="qa-lora", group_size=32, finetune="qlora")
    b = qa["evidence"]["basis"]
    assert b["research"] and qa["evidence"]["same_method"] == 0
    cfg = A.spec()["fit"]["interval"]
    # at least the method's own and the maturity's extra spread
    assert qa["evidence"]["spread_ln_damage"] >= math.hypot(cfg["extrapolate_method"], cfg["research_method"]) - 1e-6
    assert qa["evidence"]["spread_ln_damage"] > _acc(group_size=32, finetune="qlora")["evidence"]["spread_ln_damage"]
    assert b["text"].startswith(f"extrapolated from {b['rows']} row")


@pytest.mark.parametrize("kw", [{}, {"params_b": 70}, {"method": "awq"}, {"method": "nf4", "group_size": 64},
                                {"method": "rtn", "w_bits": 3}, {"family": "mistral", "params_b": 7.2}])
def test_never_tighter_than_the_spread_of_the_rows_it_rests_on(kw):
    e = _acc(**kw)
    model = A.default_fit()
    req = e["inputs"]
    p = A.Point(req["method"], req["w_bits"], req["a_bits"], req["group"], req["params_b"], req["family"],
                A.effective_finetune(req["method"], req["finetune"]))
    n = A.spec()["fit"]["interval"]["evidence_floor_rows"]
    rest = sorted((A._distance2(p, model.points[i]), i) for _, i in A._neighbours(model, p)[:n])
    res = [model.y[i] - model.yhat[i] for _, i in rest]
    mean = sum(res) / len(res)
    sd = math.sqrt(sum((r - mean) ** 2 for r in res) / (len(res) - 1))
    assert e["evidence"]["spread_ln_damage"] >= sd - 1e-4
    assert e["evidence"]["basis"]["floor_ln_damage"] == pytest.approx(sd, abs=1e-4)


def test_qa_lora_no_longer_ranks_first_without_evidence_on_an_edge_classifier():
    """A 0.8B classifier on an edge box, accuracy first: QA-LoRA used to lead on a retention of
    1.000 that no published row supports."""
    out = recommend({"model": {"params_b": 0.8, "family": "qwen3"}, "task": "classification", "examples": 2000,
                     "hardware": {"gpu": "rtx-4090-24gb"}, "deploy": {"target": "edge"},
                     "goals": {"priority": "accuracy"}, "measured": "none"}, what_if=False, runs=[])
    assert out["recommended"] != "qa-lora"
    qa = next(r for r in out["ranked"] if r["strategy"] == "qa-lora")
    assert any("extrapolated from" in w and "rows of" in w for w in qa["why"])
    # what put it behind: the pessimistic end of its interval (accuracy priority counts it in full)
    top = out["ranked"][0]
    assert qa["estimates"]["accuracy"]["low"] < top["estimates"]["accuracy"]["low"]
    assert qa["estimates"]["accuracy"]["retention"] >= top["estimates"]["accuracy"]["retention"]

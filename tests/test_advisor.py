"""Advisor: the rule language, the rules as data, and the decision matrix on real planner estimates."""
import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine import advisor
from engine.errors import InputError

ROOT = Path(__file__).resolve().parent.parent


# ---- the condition language and the rules as data ---------------------------------------------

def test_condition_language():
    f = {"params_b": 13.0, "examples": 5000, "task": "chat", "symptoms": ["too-slow", "wrong-tone"],
         "target_weight_bits": None}
    m = advisor.matches
    assert m({}, f)
    assert m({"params_b": {"gt": 10}}, f) and not m({"params_b": {"gt": 13}}, f)
    assert m({"params_b": {"gte": 13, "lt": 14}}, f)
    assert m({"examples": {"gte": 1000, "lte": 10000}}, f) and not m({"examples": {"lt": 1000}}, f)
    assert m({"task": "chat"}, f) and m({"task": ["generation", "chat"]}, f) and not m({"task": "retrieval"}, f)
    assert m({"task": {"in": ["chat"]}}, f)
    assert m({"symptoms": "too-slow"}, f) and m({"symptoms": ["too-big", "wrong-tone"]}, f)
    assert m({"symptoms": {"has_any": ["too-big", "too-slow"]}}, f)
    assert not m({"symptoms": {"has_all": ["too-big", "too-slow"]}}, f)
    assert m({"target_weight_bits": {"present": False}}, f) and not m({"target_weight_bits": {"lt": 4}}, f)
    assert m({"all_of": [{"task": "chat"}, {"params_b": {"gt": 10}}]}, f)
    assert m({"any_of": [{"task": "retrieval"}, {"params_b": {"gt": 10}}]}, f)
    assert m({"not": {"task": "retrieval"}}, f) and not m({"task": "chat", "examples": 0}, f)


def test_shipped_rules_are_complete_data():
    rules = advisor.load_rules()
    topics = {r["topic"] for r in rules}
    assert {"scale", "data", "task", "hardware", "bits", "symptoms", "deploy"} <= topics
    for r in rules:
        assert len(r["rationale"]) > 60 and len(r["source"]) > 10, r["id"]
        assert r["effects"] and all(e["delta"] for e in r["effects"]), r["id"]


@pytest.mark.parametrize("rule, words", [
    ({"id": "x", "topic": "t", "when": {"colour": "red"}, "effects": [{"match": {}, "delta": 0.1}],
      "rationale": "r", "source": "s"}, "unknown key 'colour'"),
    ({"id": "x", "topic": "t", "when": {"examples": {"about": 3}}, "effects": [{"match": {}, "delta": 0.1}],
      "rationale": "r", "source": "s"}, "unknown operator"),
    ({"id": "x", "topic": "t", "when": {}, "effects": [{"match": {"flavour": 1}, "delta": 0.1}],
      "rationale": "r", "source": "s"}, "unknown key 'flavour'"),
    ({"id": "x", "topic": "t", "when": {"examples": 1}, "effects": [{"match": {}}],
      "rationale": "r", "source": "s"}, "numeric delta"),
    ({"id": "x", "topic": "t", "when": {"examples": 1}, "effects": [{"match": {}, "delta": 1}],
      "rationale": "r"}, "source is required"),
])
def test_bad_rules_are_rejected(rule, words):
    with pytest.raises(InputError, match=words):
        advisor.check_rules([rule])


def test_facts_of_a_scenario():
    f = advisor.facts("llama-13b-rtx4090")
    assert f["gpu"] == "rtx-4090-24gb" and f["gpu_count"] == 1 and f["gpu_memory_gb"] == 24
    assert 13.0 < f["params_b"] < 13.1 and f["examples"] == 8000 and f["task"] == "generation"
    assert f["deploy_target"] == "consumer-gpu" and f["deploy_memory_gb"] == 24
    assert f["target_weight_bits"] is None and f["symptoms"] == []

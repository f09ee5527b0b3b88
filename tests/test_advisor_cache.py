"""The advisor's per-strategy search caches (engine/advisor/assess.py ``_memo``): a warm recompute
gives exactly what a cold one gives, and an input the searches do not read does not re-run them."""
from __future__ import annotations

import json

from engine import advisor
from engine.advisor import assess
from engine.estimate import formats

SC = {"model": "llama-2-13b", "task": "chat", "examples": 3000, "hardware": {"gpu": "l4-24gb"},
      "deploy": {"target": "gpu-server", "gpu": "l4-24gb"}, "goals": {"max_latency_ms_per_token": 60}}


def _clear():
    assess._SEARCHES.clear()
    assess._call.cache_clear()
    formats._breakdown_cached.cache_clear()


def _rows(out):
    return json.dumps(out["ranked"], sort_keys=True, default=str)


def test_a_warm_answer_equals_a_cold_one():
    changed = {**SC, "examples": 9000, "goals": {**SC["goals"], "priority": "cost"}}
    advisor.recommend(SC, what_if=False)                    # fills the caches
    warm = advisor.recommend(changed, what_if=False)
    _clear()
    cold = advisor.recommend(changed, what_if=False)
    assert _rows(warm) == _rows(cold)
    # examples moved the training time and cost, not the configuration the search chose
    q = lambda out: next(s for s in next(r for r in out["ranked"] if r["strategy"] == "qlora")["estimates"]["stages"]
                         if s["stage"] == "train")
    base = advisor.recommend(SC, what_if=False)
    assert q(warm)["config"] == q(base)["config"] and q(warm)["tokens"] == 3 * q(base)["tokens"]
    assert q(warm)["time_s"] == 3 * q(base)["time_s"]


def test_inputs_the_searches_do_not_read_do_not_rerun_them(monkeypatch):
    calls = {"train": 0, "serve": 0}
    train, serve = assess._train_search, assess._serve_search

    def count(kind, fn):
        def wrapped(*a, **k):
            calls[kind] += 1
            return fn(*a, **k)
        return wrapped
    monkeypatch.setattr(assess, "_train_search", count("train", train))
    monkeypatch.setattr(assess, "_serve_search", count("serve", serve))
    _clear()
    advisor.recommend(SC, what_if=False)
    first = dict(calls)
    assert first["train"] >= 10 and first["serve"] >= 20           # every training and serving strategy
    advisor.recommend({**SC, "examples": 4000, "symptoms": ["wrong-tone"],
                       "goals": {**SC["goals"], "min_accuracy_retention": 0.9}}, what_if=False)
    assert calls == first                                           # nothing re-searched
    advisor.recommend({**SC, "goals": {"max_latency_ms_per_token": 45}}, what_if=False)
    assert calls["train"] == first["train"] and calls["serve"] > first["serve"]   # a new goal: serving only
    advisor.recommend({**SC, "hardware": {"gpu": "a10g-24gb"}}, what_if=False)
    assert calls["train"] > first["train"]                          # another training GPU: training again

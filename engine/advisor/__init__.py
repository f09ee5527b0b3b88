"""Advisor: the decision matrix. Every catalog strategy, assessed for one scenario.

For each strategy of presets/strategies.yaml:

1. **estimates** per stage from the planner (engine.estimate): train, quantize/calibrate,
   merge, serve, plus accuracy retention and cost (``assess``);
2. **feasibility**: every stage fits the training GPUs (``hardware.count`` > 1: FSDP full
   sharding, see presets/rules/advisor.yaml), the served model fits the serving device and its
   runtime runs the format, the latency, accuracy and bits goals hold, and there are examples
   to train on (``assess``);
3. **score**: the goal-weighted parts (accuracy with its interval, latency, memory headroom,
   cost, data fit) plus the deltas of the practitioners' rules that fired (``rules``, ``score``);
4. **reasons**: which estimate decided (number vs limit) and which rule fired (id + rationale).

A strategy measured on the user's own data (a finished run of that strategy on the scenario's
model, handed in by the caller) takes the run's measured retention in place of the accuracy
prior, with the narrow interval of its evaluation; the reasons name the run (``measured``).

Feasible strategies rank above infeasible ones, then by score, then catalog order (``rank``).
``what_would_change`` names the binding constraint and the nearest alternative, checked by
re-running the advisor on the changed scenario (``whatif``). Pure Python: never imports torch
and reads no run store (the planner does not either).

Public API::

    recommend(scenario: dict | Scenario, rules=None, what_if=True, runs=None) -> dict   # the CLI's JSON
    measured_runs(scenario, runs) -> list[dict]   # the runs of ``runs`` that count as measured evidence
    facts(scenario) -> dict            # what rule conditions read
    matches(condition, values) -> bool # the condition language of presets/rules
    load_rules() -> list[dict]
"""
from __future__ import annotations

import time

from engine.advisor.measured import evidence, measured_from_runs, measured_runs  # noqa: F401
from engine.advisor.assess import pinned
from engine.advisor.rank import _rank
from engine.advisor.rules import (check_rules, facts, load_rules, matches, scenario_of,  # noqa: F401
                                  settings)
from engine.advisor.whatif import _what_would_change
from engine.spec.scenario import Scenario


def recommend(scenario, rules: list[dict] | None = None, what_if: bool = True, runs=None) -> dict:
    """The decision matrix for a scenario (a dict, a Scenario, or a path/preset id of a YAML file).

    Returns the JSON of ``python -m engine recommend --json``: ``recommended`` (a strategy id: the
    best feasible one, or when nothing meets every hard goal the closest one, ``meets_goals``
    false and ``near_miss`` naming each goal it misses and by how much; None only when every
    strategy is blocked by a format or deployment mismatch), ``ranked`` (every strategy: strategy, family, feasible,
    score, why, estimates, ...), ``rules_fired``, ``what_would_change``, ``assumptions``,
    ``measured_runs`` (the runs that counted as measured accuracy evidence).

    ``runs``: the measured evidence: finished run records (as engine.runs.api.get_run returns
    them); those of the scenario's model count. None or [] for none: the advisor reads no run
    store, its caller does (engine.runs.evidence.recommend resolves the scenario's ``measured``
    field: the store's finished runs by default, none, or run ids).
    """
    with pinned():                      # one read of the calibration in force per answer
        return _recommend(scenario, rules, what_if, runs)


def _recommend(scenario, rules, what_if, runs) -> dict:
    t0 = time.perf_counter()
    sc = scenario_of(scenario)
    rules = load_rules() if rules is None else check_rules(rules)
    measured = evidence(measured_runs(sc, runs))
    res = _rank(sc, rules, measured)
    rows = res["rows"]
    out = {
        "scenario": sc.to_dict(),
        "model": sc.arch().to_dict(),
        "facts": res["facts"],
        "recommended": res["recommended"],
        "meets_goals": res["meets_goals"],
        "near_miss": res["near_miss"],
        "ranked": [{k: v for k, v in r.items() if k not in ("traits", "priority")} for r in rows],
        "rules_fired": [{"id": r["id"], "topic": r["topic"], "rationale": r["rationale"], "source": r["source"]}
                        for r in res["fired"]],
        "assumptions": _assumptions(sc),
        "measured_runs": measured["summary"],
    }
    out["what_would_change"] = _what_would_change(sc, rules, res) if what_if else None
    out["timing_ms"] = round(1000 * (time.perf_counter() - t0), 1)
    return out


def _assumptions(sc: Scenario) -> list[str]:
    cfg = settings()
    w = cfg["workload"]
    ranks = (f"LoRA rank {sc.lora_rank.max}..{sc.lora_rank.min} (largest that fits)" if sc.lora_rank
             else f"LoRA rank {w['train']['lora_rank']}")
    out = [f"training: {w['train']['precision']}, sequence length {sc.seq_len}, effective batch "
           f"{w['train']['batch_size']} per GPU, {sc.epochs:g} epoch(s) over {sc.examples} examples; per strategy the "
           f"fastest configuration that fits of micro-batch x accumulation, gradient checkpointing on/off, "
           f"AdamW / 8-bit / paged 8-bit, {ranks} (default: batch {w['train']['batch_size']}, checkpointing "
           f"{'on' if w['train']['grad_ckpt'] else 'off'}, AdamW)",
           f"serving: batch {w['serve']['batch_size']}, prompt {w['serve']['prompt_len']} tokens, "
           f"{w['serve']['new_tokens']} new tokens, greedy",
           f"GPTQ/AWQ calibration: {cfg['data']['calibration_samples']} texts of {w['calibration']['seq_len']} tokens "
           f"on one {sc.hardware.gpu}"]
    if sc.hardware.count > 1:
        mg = cfg["multi_gpu"]
        out.append(f"{sc.hardware.count} GPUs: {mg['scheme']} for every training method (model states divided by "
                   f"{sc.hardware.count}, activations per GPU, {mg['gathered_layers']} gathered layers); "
                   f"throughput x{sc.hardware.count} x {mg['scaling_efficiency']} ({mg['source']})")
    if sc.deploy.target == "hosted-api":
        out.append("hosted API: the provider's hardware and quantization; no serving memory or latency estimate")
    return out

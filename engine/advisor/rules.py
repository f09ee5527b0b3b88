"""The advisor's rules and the facts they read: presets/rules/rules.yaml (the practitioners'
priors), presets/rules/advisor.yaml (how estimates become a ranking), the condition language
(``matches``) and the facts of a scenario (``facts``)."""
from __future__ import annotations

import functools
from pathlib import Path

from engine.errors import InputError
from engine.presets import load_yaml
from engine.spec.scenario import Scenario, load_scenario, parse_scenario

FACT_KEYS = ("params_b", "examples", "task", "gpu", "gpu_count", "gpu_memory_gb", "deploy_target",
             "deploy_device", "deploy_memory_gb", "max_latency_ms_per_token", "min_accuracy_retention",
             "priority", "target_weight_bits", "symptoms")
TRAIT_KEYS = ("id", "family", "train", "lora", "quantized", "w_bits", "a_bits", "scheme", "deploy",
              "calibration", "gpu_only", "fp8", "merge", "maturity", "runtimes")
OPS = ("gt", "gte", "lt", "lte", "in", "has_any", "has_all", "present")
CONSTRAINTS = ("memory", "latency", "accuracy", "bits", "data", "format", "deploy")


# ---- data -----------------------------------------------------------------------------------

def settings() -> dict:
    return load_yaml("rules/advisor.yaml")


def load_rules() -> list[dict]:
    """The practitioners' rules (presets/rules/rules.yaml), checked."""
    return check_rules(load_yaml("rules/rules.yaml"))


def check_rules(rules: list[dict]) -> list[dict]:
    """Every rule has id, topic, when, effects, rationale, source; conditions use known keys."""
    seen = set()
    for r in rules:
        rid = r.get("id")
        if not rid or rid in seen:
            raise InputError(f"rule id {rid!r} is missing or repeated", field="rules")
        seen.add(rid)
        for key in ("topic", "when", "effects", "rationale", "source"):
            if r.get(key) is None or (key != "when" and not r[key]):
                raise InputError(f"rule {rid}: {key} is required", field="rules")
        _check_condition(r["when"], FACT_KEYS, rid)
        for e in r["effects"]:
            _check_condition(e.get("match") or {}, TRAIT_KEYS, rid)
            if not isinstance(e.get("delta"), (int, float)):
                raise InputError(f"rule {rid}: every effect needs a numeric delta", field="rules")
    return rules


def _check_condition(cond: dict, keys, rid: str) -> None:
    for key, want in cond.items():
        if key in ("all_of", "any_of"):
            for c in want:
                _check_condition(c, keys, rid)
        elif key == "not":
            _check_condition(want, keys, rid)
        elif key not in keys:
            raise InputError(f"rule {rid}: unknown key {key!r}; known: {', '.join(keys)}", field="rules")
        elif isinstance(want, dict) and set(want) - set(OPS):
            raise InputError(f"rule {rid}: unknown operator(s) {sorted(set(want) - set(OPS))} on {key}; "
                             f"known: {', '.join(OPS)}", field="rules")


# ---- the condition language -----------------------------------------------------------------

def _test(have, want) -> bool:
    if isinstance(want, dict):
        for op, v in want.items():
            if op == "present":
                ok = (have is not None and have != []) == bool(v)
            elif have is None:
                return False
            elif op in ("gt", "gte", "lt", "lte"):
                ok = {"gt": have > v, "gte": have >= v, "lt": have < v, "lte": have <= v}[op]
            elif op == "in":
                ok = bool(set(have) & set(v)) if isinstance(have, list) else have in v
            elif op == "has_any":
                ok = bool(set(have) & set(v))
            else:  # has_all
                ok = set(v) <= set(have)
            if not ok:
                return False
        return True
    if isinstance(want, list):
        return bool(set(have) & set(want)) if isinstance(have, list) else have in want
    if isinstance(have, list):
        return want in have
    return have == want


def matches(cond: dict, values: dict) -> bool:
    """True when every key of ``cond`` holds for ``values`` (see presets/rules/rules.yaml)."""
    for key, want in cond.items():
        if key == "all_of":
            ok = all(matches(c, values) for c in want)
        elif key == "any_of":
            ok = any(matches(c, values) for c in want)
        elif key == "not":
            ok = not matches(want, values)
        else:
            ok = _test(values.get(key), want)
        if not ok:
            return False
    return True


# ---- scenario facts -------------------------------------------------------------------------

def scenario_of(scenario) -> Scenario:
    """A Scenario from a Scenario, a dict, or a path / preset id of a scenario file."""
    return load_scenario(scenario) if isinstance(scenario, (str, Path)) else parse_scenario(scenario)


@functools.lru_cache(maxsize=None)
def _marketed_gb() -> dict[str, float]:
    """Marketed memory size per device id (24 for a 24 GB card), what rules speak in."""
    out = {g["id"]: float(g["memory_gb"]) for g in load_yaml("hardware/gpus.yaml")}
    out.update({t["id"]: float(t["memory_gb"]) for t in load_yaml("hardware/targets.yaml")})
    return out


def facts(scenario) -> dict:
    """The facts of a scenario that rule conditions read (FACT_KEYS)."""
    sc = scenario_of(scenario)
    arch, sdev, g = sc.arch(), sc.serve_device(), sc.goals
    return {
        "params_b": round(arch.total_params / 1e9, 3),
        "examples": sc.examples,
        "task": sc.task,
        "gpu": sc.hardware.gpu,
        "gpu_count": sc.hardware.count,
        "gpu_memory_gb": _marketed_gb()[sc.hardware.gpu],
        "deploy_target": sc.deploy.target,
        "deploy_device": sdev.id if sdev else None,
        "deploy_memory_gb": _marketed_gb()[sdev.id] if sdev else None,
        "max_latency_ms_per_token": g.max_latency_ms_per_token,
        "min_accuracy_retention": g.min_accuracy_retention,
        "priority": g.priority,
        "target_weight_bits": g.target_weight_bits,
        "symptoms": list(sc.symptoms),
    }


"""The score of every assessed strategy (goal-weighted parts, relative across the rows, plus the
deltas of the rules that fired) and the reasons as text, most decisive first."""
from __future__ import annotations

import math

from engine.advisor.rules import matches
from engine.spec.scenario import Scenario

# ---- score ----------------------------------------------------------------------------------

def _clamp(x, lo=0.0, hi=1.0):
    return max(lo, min(hi, x))


def _score(rows: list[dict], sc: Scenario, rules: list[dict], fired: list[dict], cfg: dict) -> None:
    """Fill score, score_parts and the rule reasons of every row (parts are relative across rows)."""
    prio = sc.goals.priority
    weights = cfg["weights"][prio]
    k = cfg["interval_weight"][prio]
    lat = [r["estimates"]["latency_ms_per_token"] for r in rows if r["estimates"]["latency_ms_per_token"]]
    fastest = min(lat) if lat else None
    serve_usd = [r["estimates"]["cost"]["serve_usd_per_million_tokens"] for r in rows
                 if r["estimates"]["cost"]["serve_usd_per_million_tokens"]]
    cheapest = min(serve_usd) if serve_usd else None
    d = cfg["data"]
    for row in rows:
        e, t = row["estimates"], row["traits"]
        # accuracy: retention pulled toward the low end of its interval by the priority
        acc = e["accuracy"]
        if acc.get("retention") is not None:
            rr = acc["retention"] - k * (acc["retention"] - acc.get("low", acc["retention"]))
            p_acc = _clamp(1 - (1 - rr) / cfg["accuracy_scale"])
        else:
            p_acc = 0.5
        # latency: the fastest strategy scores 1
        ms = e["latency_ms_per_token"]
        p_lat = (fastest / ms if ms else 0.5) if fastest else 1.0
        # memory: mean headroom over the stages that have a limit
        rooms = [_clamp(1 - st["device_bytes"] / st["limit_bytes"]) for st in e["stages"]
                 if st.get("device_bytes") and st.get("limit_bytes") and st["stage"] != "merge"]
        p_mem = sum(rooms) / len(rooms) if rooms else (0.0 if row["blocked_by"] else 1.0)
        # cost: training dollars (absolute scale) and serving dollars (relative)
        tu = e["cost"]["train_usd"]
        p_train_cost = 1.0 / (1.0 + (tu or 0.0) / cfg["train_reference_usd"])
        su = e["cost"]["serve_usd_per_million_tokens"]
        p_serve_cost = (cheapest / su if su else 0.5) if cheapest else 1.0
        p_cost = 0.5 * p_train_cost + 0.5 * p_serve_cost
        # data fit
        n = sc.examples
        if t["train"] != "none":
            method = t["train"]
            p_data = 0.0 if n <= 0 else _clamp(math.log10(max(n, 1)) / math.log10(d["comfortable"][method]))
        else:
            p_data = 1.0     # needs no labelled data; whether unused data is a loss is the data rules' call
        parts = {"accuracy": p_acc, "latency": p_lat, "memory": p_mem, "cost": p_cost, "data": p_data}
        base = sum(weights[kk] * v for kk, v in parts.items())
        # rules
        rule_total, applied = 0.0, []
        for rule in fired:
            delta = sum(eff["delta"] for eff in rule["effects"] if matches(eff.get("match") or {}, t))
            if delta:
                rule_total += delta
                applied.append(rule["id"])
                row["reasons"].append({"kind": "rule", "ok": delta > 0, "rule": rule["id"], "topic": rule["topic"],
                                       "delta": round(delta, 3), "rationale": rule["rationale"],
                                       "source": rule["source"],
                                       "text": f"rule {rule['id']} ({delta:+.2f}): {rule['rationale']} "
                                               f"[{rule['source']}]"})
        row["rules"] = applied
        row["score_parts"] = {kk: round(v, 3) for kk, v in parts.items()}
        row["score_parts"]["rules"] = round(rule_total, 3)
        row["score_weights"] = dict(weights)
        row["score"] = round(base + rule_total, 4)


def _why(row: dict) -> list[str]:
    """Reasons as text, most decisive first: what blocks, then rules, then the estimates."""
    blocked = [r["text"] for r in row["reasons"] if r["kind"] == "constraint"]
    blocked += [r["text"] for r in row["reasons"] if r["kind"] == "measured"]
    rules = [r["text"] for r in sorted((r for r in row["reasons"] if r["kind"] == "rule"),
                                       key=lambda r: -abs(r["delta"]))]
    est = [("ok: " if r["ok"] else "") + r["text"] for r in row["reasons"] if r["kind"] == "estimate"]
    parts = ", ".join(f"{k} {v:.2f}" for k, v in row["score_parts"].items())
    return [("" if b.startswith("measured") else "not feasible: ") + b for b in blocked] + rules + est + [f"score {row['score']:.3f} = goal-weighted parts "
                                                                   f"({parts}); priority {row['priority']}"]


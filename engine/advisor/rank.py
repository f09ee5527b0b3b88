"""The matrix: every catalog strategy assessed, scored and ranked (feasible first, then by score,
then catalog order)."""
from __future__ import annotations

import math

from engine import strategies
from engine.advisor.assess import assess, search_key, workload
from engine.advisor.rules import facts, matches, settings
from engine.advisor.score import _score, _why
from engine.spec.scenario import Scenario

# ---- the matrix -----------------------------------------------------------------------------

def _rank(sc: Scenario, rules: list[dict], measured: dict | None = None) -> dict:
    cfg = settings()
    f = facts(sc)
    fired = [r for r in rules if matches(r["when"], f)]
    tdev, sdev = sc.train_device(), sc.serve_device()
    ctx = {"arch": sc.arch(), "train_device": tdev, "serve_device": sdev, "settings": cfg,
           "workload": workload(sc, cfg, tdev, sdev), "measured": measured or {}}
    ctx["key"] = search_key(sc, ctx)
    rows = [assess(s, sc, ctx) for s in strategies.catalog()]
    _score(rows, sc, rules, fired, cfg)
    order = {s: i for i, s in enumerate(strategies.ids())}
    rows.sort(key=lambda r: (not r["feasible"], -r["score"], order[r["strategy"]]))
    near = None
    if rows and not rows[0]["feasible"]:
        near = near_miss(rows)
        if near is not None:                    # nothing meets every goal: the closest one leads, flagged
            rows.sort(key=lambda r: r["strategy"] != near["strategy"])
    for i, r in enumerate(rows, 1):
        r["rank"] = i
        r["priority"] = sc.goals.priority
        r["why"] = _why(r)
    rec = rows[0]["strategy"] if rows and (rows[0]["feasible"] or near) else None
    if near:
        rows[0]["why"].insert(0, near["text"])
    return {"facts": f, "fired": fired, "rows": rows, "recommended": rec, "measured": measured or {},
            "meets_goals": bool(rows and rows[0]["feasible"]), "near_miss": near}


# ---- the closest strategy when nothing meets every goal ------------------------------------------

# constraints a scenario cannot relax by a number (the runtime cannot load the format; a provider serves)
STRUCTURAL = ("format", "deploy")


def miss_distance(b: dict) -> float:
    """How far a blocked constraint is from holding, as the fraction by which its budget would have
    to grow: memory and latency value / limit - 1; accuracy the allowed loss (1 - retention) over
    the goal's (1 - min_accuracy_retention), minus 1; bits |log2(served / goal)|; no examples to
    train on 1; a format or deployment mismatch (or a figure that was not estimated) infinite."""
    c, v, lim = b["constraint"], b.get("value"), b.get("limit")
    if c in STRUCTURAL or v is None or not lim:
        return math.inf
    if c in ("memory", "latency"):
        return max(0.0, v / lim - 1)
    if c == "accuracy":
        return max(0.0, (1 - v) / max(1e-9, 1 - lim) - 1)
    if c == "bits":
        return abs(math.log2(v / lim))
    if c == "data":
        return 1.0
    return math.inf


def near_miss(rows: list[dict]) -> dict | None:
    """The strategy closest to meeting every hard goal (the smallest summed distance over what
    blocks it, ties by score); None when every strategy has a structural block."""
    best = None
    for r in rows:
        misses = [{"constraint": b["constraint"], "stage": b.get("stage"), "value": b.get("value"),
                   "limit": b.get("limit"), "distance": miss_distance(b), "text": b["text"]} for b in r["blocked"]]
        total = sum(m["distance"] for m in misses)
        if math.isinf(total):
            continue
        if best is None or (total, -r["score"]) < (best["distance"], -best["score"]):
            best = {"strategy": r["strategy"], "distance": total, "score": r["score"], "misses": misses}
    if best is None:
        return None
    best["distance"] = round(best["distance"], 4)
    for m in best["misses"]:
        m["distance"] = round(m["distance"], 4)
    best["text"] = ("does NOT meet every goal (nothing does; this is the closest): "
                    + "; ".join(f"{m['constraint']} misses by {100 * m['distance']:.0f}%"
                                + (f" ({_short(m['text'])})" if m["text"] else "") for m in best["misses"]))
    return best


def _short(text: str) -> str:
    return str(text).split(" (estimate ")[0].split(" (python -m engine")[0]

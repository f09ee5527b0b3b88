"""The matrix: every catalog strategy assessed, scored and ranked (feasible first, then by score,
then catalog order)."""
from __future__ import annotations

from engine import strategies
from engine.advisor.assess import assess, workload
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
    rows = [assess(s, sc, ctx) for s in strategies.catalog()]
    _score(rows, sc, rules, fired, cfg)
    order = {s: i for i, s in enumerate(strategies.ids())}
    rows.sort(key=lambda r: (not r["feasible"], -r["score"], order[r["strategy"]]))
    for i, r in enumerate(rows, 1):
        r["rank"] = i
        r["priority"] = sc.goals.priority
        r["why"] = _why(r)
    rec = rows[0]["strategy"] if rows and rows[0]["feasible"] else None
    return {"facts": f, "fired": fired, "rows": rows, "recommended": rec, "measured": measured or {}}

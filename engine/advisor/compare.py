"""The comparison practitioners draw (baseline, quantize only, fine-tune only, fine-tune then
quantize, QLoRA), read off the advisor's answer: per approach the best-ranked strategy of its
catalog family with its served size, decode latency on the serving device, retention with its
interval, serving cost per user-month at a stated load (presets/rules/advisor.yaml ``comparison``)
and one-off training cost, each with the planner request it comes from. Pure: no new estimates."""
from __future__ import annotations

from engine.advisor.rules import settings

STRUCTURAL = ("format", "deploy")


def _pick(rows: list[dict], family: str) -> dict | None:
    fam = [r for r in rows if r.get("family") == family]
    fam.sort(key=lambda r: (bool(set(r.get("blocked_by") or []) & set(STRUCTURAL)), r.get("rank", 0)))
    return fam[0] if fam else None


def comparison(result: dict) -> dict:
    """{'load': {...}, 'rows': [...]} for an answer of engine.advisor.recommend."""
    cfg = settings()["comparison"]
    load = dict(cfg["load"])
    per_user = float(load["tokens_per_user_month"])
    ranked = result.get("ranked") or []
    out = []
    for spec in cfg["rows"]:
        r = _pick(ranked, spec["family"])
        if r is None:
            out.append({"approach": spec["label"], "family": spec["family"], "strategy": None})
            continue
        e = r.get("estimates") or {}
        stages = {s["stage"]: s for s in e.get("stages") or []}
        serve, train = stages.get("serve") or {}, stages.get("train") or {}
        acc = e.get("accuracy") or {}
        usd_m = (e.get("cost") or {}).get("serve_usd_per_million_tokens")
        sc = serve.get("cost") or {}
        sources = {
            "size": serve.get("source"),
            "latency": serve.get("source"),
            "quality": acc.get("source"),
            "serving_cost": ("; ".join(str(x) for x in (sc.get("formula"), sc.get("price_source")) if x)
                             + f"; x {per_user:,.0f} tokens per user-month" if sc.get("formula") else None),
            "training_cost": "; ".join(x for x in (train.get("source"), (train.get("cost") or {}).get("formula"),
                                                   (stages.get("quantize") or {}).get("source"),
                                                   ((stages.get("quantize") or {}).get("cost") or {}).get("formula"))
                                       if x) or None,
        }
        out.append({
            "approach": spec["label"], "family": spec["family"], "strategy": r["strategy"], "rank": r.get("rank"),
            "feasible": r.get("feasible"), "blocked_by": r.get("blocked_by") or [],
            "serve_device": serve.get("device"),
            "weights_bytes": serve.get("weights_bytes"), "serve_device_bytes": serve.get("device_bytes"),
            "ms_per_token": serve.get("decode_ms_per_token"),
            "ms_low": serve.get("decode_ms_per_token_low"), "ms_high": serve.get("decode_ms_per_token_high"),
            "retention": acc.get("retention"), "retention_low": acc.get("low"), "retention_high": acc.get("high"),
            "quality_basis": ((acc.get("evidence") or {}).get("basis") or {}).get("text")
                             or ("measured" if acc.get("measured") else None),
            "serve_usd_per_million_tokens": usd_m,
            "serve_usd_per_user_month": usd_m * per_user / 1e6 if usd_m is not None else None,
            "train_usd": (e.get("cost") or {}).get("train_usd") if train or stages.get("quantize") else 0.0,
            "train_config": (train.get("config") or {}).get("text"),
            "sources": sources,
        })
    return {"load": load, "rows": out}

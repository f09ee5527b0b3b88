"""What would change the answer: the best-scoring strategies that are not feasible, the smallest
scenario change that lifts what blocks each (a bigger GPU, more GPUs, a looser goal, more data),
checked by ranking the changed scenario again; the runner-up and the tightest limit."""
from __future__ import annotations

import math

from engine import hardware
from engine.advisor.assess import _estimate, _shard
from engine.fmt import gb
from engine.advisor.rank import _rank
from engine.advisor.rules import settings
from engine.errors import InputError
from engine.spec.scenario import TARGET_KINDS, Scenario, parse_scenario

# ---- what would change the answer -------------------------------------------------------------

def _smallest(devices, need_bytes):
    fit = [d for d in devices if d.memory_bytes >= need_bytes]
    return min(fit, key=lambda d: (d.memory_bytes, d.price_per_hour or 0)) if fit else None


def _change_for(row: dict, sc: Scenario, res: dict) -> tuple[dict, list[str]] | None:
    """The smallest scenario change that lifts every constraint blocking ``row`` (None if none can)."""
    change, text = {}, []
    devs = hardware.devices()
    for b in row["blocked"]:
        c, stage = b["constraint"], b.get("stage")
        if c == "memory" and stage in ("train", "quantize") and b.get("value"):
            per_gpu = b["value"]
            d = _smallest([x for x in devs.values() if x.kind == "gpu"], per_gpu)
            if d is not None:
                if d.memory_bytes > devs[change.get("hardware.gpu", sc.hardware.gpu)].memory_bytes:
                    change["hardware.gpu"] = d.id
                    text.append(f"a training GPU with >= {gb(per_gpu)} ({d.id})")
                continue
            n = _gpus_needed(row, sc) if stage == "train" else None
            if n is None:
                return None
            change["hardware.count"] = n
            text.append(f"{n}x {sc.hardware.gpu} (FSDP sharding)")
        elif c == "memory" and stage == "serve" and b.get("value"):
            kinds = TARGET_KINDS[sc.deploy.target]
            d = _smallest([x for x in devs.values() if x.kind in kinds], b["value"])
            if d is None:
                return None
            change["deploy.gpu"] = d.id
            text.append(f"a serving device with >= {gb(b['value'])} ({d.id})")
        elif c == "latency":
            goal = math.ceil(b["value"])
            change["goals.max_latency_ms_per_token"] = goal
            text.append(f"a latency goal of {goal} ms/token")
        elif c == "accuracy":
            goal = math.floor(b["value"] * 1000) / 1000
            change["goals.min_accuracy_retention"] = goal
            text.append(f"min_accuracy_retention {goal:g}")
        elif c == "bits":
            change["goals.target_weight_bits"] = int(b["value"])
            text.append(f"target_weight_bits {int(b['value'])}")
        elif c == "data":
            n = settings()["data"]["comfortable"][row["traits"]["train"]]
            change["examples"] = n
            text.append(f"{n:,} labelled examples")
        else:
            return None   # a format or deployment mismatch: not a knob of this scenario
    return change, text


def _gpus_needed(row: dict, sc: Scenario, most: int = 64) -> int | None:
    """The smallest power-of-two GPU count whose sharded training step fits one GPU."""
    st = next((x for x in row["estimates"]["stages"] if x["stage"] == "train" and "request" in x), None)
    if st is None:
        return None
    arch, limit = sc.arch(), sc.train_device().memory_bytes
    est = _estimate("estimate_train", model=arch, **st["request"])
    if "error" in est:
        return None
    n = 2
    while n <= most:
        if n > sc.hardware.count and _shard(est, n, arch)["device_bytes"] <= limit:
            return n
        n *= 2
    return None


def _apply(sc: Scenario, change: dict) -> Scenario:
    data = sc.to_dict()
    for path, val in change.items():
        node = data
        *head, last = path.split(".")
        for h in head:
            node = node[h]
        node[last] = val
    return parse_scenario(data)


def _tightest(row: dict) -> dict | None:
    """The constraint with the least slack for a feasible strategy (used fraction of its limit)."""
    best = None
    for r in row["reasons"]:
        if r["kind"] != "estimate" or not r.get("limit") or r.get("value") is None or r.get("stage") == "merge":
            continue                     # a merge that does not fit the GPU runs on the CPU: not a limit
        if r["constraint"] == "accuracy":
            used = (1 - r["value"]) / max(1e-9, 1 - r["limit"]) if r["limit"] < 1 else 1.0
        else:
            used = r["value"] / r["limit"]
        if best is None or used > best["used"]:
            best = {"constraint": r["constraint"], "stage": r.get("stage"), "used": round(used, 3), "text": r["text"]}
    return best


def _relaxation(sc: Scenario, rules: list[dict], res: dict, tries: int = 4) -> dict | None:
    """When nothing meets every goal: the smallest relaxation that makes some strategy feasible.
    Candidates in order of their distance to the goals (rank.miss_distance); for each, the change
    that lifts what blocks it, checked by ranking the changed scenario; the first that holds."""
    from engine.advisor.rank import miss_distance
    cands = []
    for r in res["rows"]:
        d = sum(miss_distance(b) for b in r["blocked"])
        if not math.isinf(d):
            cands.append((d, -r["score"], r))
    cands.sort(key=lambda x: x[:2])
    for d, _, row in cands[:tries]:
        found = _change_for(row, sc, res)
        if not found:
            continue
        change, text = found
        try:
            after = _rank(_apply(sc, change), rules, res["measured"])
        except InputError:
            continue
        new = next(r for r in after["rows"] if r["strategy"] == row["strategy"])
        if not new["feasible"]:
            continue
        return {"strategy": row["strategy"], "change": change, "distance": round(d, 4),
                "recommended_after": after["recommended"], "rank_after": new["rank"],
                "text": f"the smallest relaxation that makes something feasible: {' and '.join(text)} "
                        f"({row['strategy']} feasible then; recommended then: {after['recommended']})"}
    return None


def _what_would_change(sc: Scenario, rules: list[dict], res: dict) -> dict:
    rows, rec = res["rows"], res["recommended"]
    rec_row = next((r for r in rows if r["strategy"] == rec), None)
    bar = rec_row["score"] if rec_row else -math.inf
    relax = _relaxation(sc, rules, res) if not res.get("meets_goals", True) else None
    better = [r for r in rows if not r["feasible"] and r["score"] > bar]
    better.sort(key=lambda r: -r["score"])
    alternatives = []
    for row in better:
        if len(alternatives) >= settings()["what_if"]["max_alternatives"]:
            break
        found = _change_for(row, sc, res)
        if not found:
            continue
        change, text = found
        try:
            after = _rank(_apply(sc, change), rules, res["measured"])
        except InputError:
            continue
        new = next(r for r in after["rows"] if r["strategy"] == row["strategy"])
        alternatives.append({
            "strategy": row["strategy"], "family": row["family"], "score": row["score"],
            "blocked_by": row["blocked_by"], "change": change,
            "feasible_after": new["feasible"], "rank_after": new["rank"],
            "recommended_after": after["recommended"],
            "text": (f"with {' and '.join(text)}, {row['strategy']} would "
                     + ("rank first" if new["rank"] == 1 and new["feasible"] else
                        f"be {'feasible' if new['feasible'] else 'still infeasible'} and rank {new['rank']}")
                     + f" (recommended then: {after['recommended']})"),
        })
    runner = next((r for r in rows if r["feasible"] and r["strategy"] != rec), None)
    runner_up = None
    if runner and rec_row:
        diffs = {k: round(rec_row["score_parts"][k] * (rec_row["score_weights"].get(k, 1.0))
                          - runner["score_parts"][k] * (runner["score_weights"].get(k, 1.0)), 3)
                 for k in rec_row["score_parts"]}
        top = max(diffs, key=lambda k: abs(diffs[k]))
        runner_up = {"strategy": runner["strategy"], "family": runner["family"], "score": runner["score"],
                     "gap": round(rec_row["score"] - runner["score"], 4), "differs_most_in": top,
                     "contributions": diffs,
                     "text": f"runner-up {runner['strategy']} scores {runner['score']:.3f} "
                             f"({rec_row['score'] - runner['score']:.3f} behind; differs most in {top})"}
    if alternatives:
        binding = alternatives[0]["blocked_by"][0] if len(alternatives[0]["blocked_by"]) == 1 else \
            "+".join(alternatives[0]["blocked_by"])
        summary = f"{binding} binds: {alternatives[0]['text']}"
    elif better:
        binding = better[0]["blocked_by"][0]
        summary = (f"{binding} binds: {better[0]['strategy']} would score {better[0]['score']:.3f}, but "
                   f"{better[0]['blocked'][0]['text']} (no goal, GPU or data change in the scenario lifts that)")
    else:
        binding = None
        summary = ("no constraint keeps a better-scoring strategy out"
                   + (f"; {runner_up['text']}" if runner_up else ""))
    tight = _tightest(rec_row) if rec_row else None
    if tight and not alternatives and not better:
        summary += f"; the tightest limit of {rec} is {tight['constraint']}: {tight['text']}"
    if not res.get("meets_goals", True):
        near = res.get("near_miss")
        lead = ("nothing meets every goal"
                + (f"; the closest is {near['strategy']} ("
                   + ", ".join(f"{m['constraint']} misses by {100 * m['distance']:.0f}%" for m in near["misses"])
                   + ")" if near else "")
                + (f"; {relax['text']}" if relax else "; no change of a goal, GPU or data count makes any "
                                                      "strategy feasible"))
        summary = f"{lead}. {summary}"
    return {"binding": binding, "summary": summary, "alternatives": alternatives, "runner_up": runner_up,
            "tightest": tight, "relaxation": relax}


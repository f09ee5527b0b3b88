"""Advisor: the decision matrix. Every catalog strategy, assessed for one scenario.

For each strategy of presets/strategies.yaml:

1. **estimates** per stage from the planner (engine.estimate): train, quantize/calibrate,
   merge, serve, plus accuracy retention and cost;
2. **feasibility**: every stage fits the training GPUs (``hardware.count`` > 1: FSDP full
   sharding, see presets/rules/advisor.yaml), the served model fits the serving device and its
   runtime runs the format, the latency, accuracy and bits goals hold, and there are examples
   to train on;
3. **score**: the goal-weighted parts (accuracy with its interval, latency, memory headroom,
   cost, data fit) plus the deltas of the practitioners' rules that fired (presets/rules/rules.yaml);
4. **reasons**: which estimate decided (number vs limit) and which rule fired (id + rationale).

A strategy measured on the user's own data (a finished run of that strategy on the scenario's
model, from the run store by default) takes the run's measured retention in place of the
accuracy prior, with the narrow interval of its evaluation; the reasons name the run.

Feasible strategies rank above infeasible ones, then by score. ``what_would_change`` names the
binding constraint and the nearest alternative, checked by re-running the advisor on the
changed scenario. Pure Python: never imports torch (the planner does not either).

Public API::

    recommend(scenario: dict | Scenario, rules=None, what_if=True, runs=None) -> dict   # the CLI's JSON
    measured_runs(scenario, runs=None) -> list[dict]   # the finished runs that count as measured evidence
    facts(scenario) -> dict            # what rule conditions read
    matches(condition, values) -> bool # the condition language of presets/rules
    load_rules() -> list[dict]
"""
from __future__ import annotations

import functools
import json
import math
import os
import time
from pathlib import Path

from engine import hardware, strategies
from engine.errors import InputError
from engine.presets import load_yaml
from engine.spec.scenario import TARGET_KINDS, Scenario, load_scenario, parse_scenario

GB = 1e9
FACT_KEYS = ("params_b", "examples", "task", "gpu", "gpu_count", "gpu_memory_gb", "deploy_target",
             "deploy_device", "deploy_memory_gb", "max_latency_ms_per_token", "min_accuracy_retention",
             "priority", "target_weight_bits", "symptoms")
TRAIT_KEYS = ("id", "family", "train", "lora", "quantized", "w_bits", "a_bits", "scheme", "deploy",
              "calibration", "gpu_only", "fp8", "merge", "maturity")
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

def _scenario(scenario) -> Scenario:
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
    sc = _scenario(scenario)
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


# ---- planner calls (cached: estimates are pure functions of their inputs) ---------------------

@functools.lru_cache(maxsize=8192)
def _call(fn: str, kwargs: tuple):
    """One planner request; an InputError is a result too (the planner refused: say why)."""
    import importlib
    f = None
    for mod in ("engine.estimate", "engine.estimate.cost"):
        try:
            f = f or getattr(importlib.import_module(mod), fn, None)
        except ImportError:
            pass
    if f is None:
        return json.dumps({"error": f"the planner has no {fn} yet"})
    kw = dict(kwargs)
    if isinstance(kw.get("measured"), str):          # measured rows travel as JSON text (hashable)
        kw["measured"] = json.loads(kw["measured"])
    try:
        return json.dumps(f(**kw), default=str)
    except InputError as e:
        return json.dumps({"error": str(e)})


def _estimate(fn: str, **kw) -> dict:
    """A planner result the caller owns: decoded afresh from the cached JSON text, so no caller
    can change what the cache holds (and faster than a deep copy)."""
    return json.loads(_call(fn, tuple(sorted(kw.items(), key=lambda kv: kv[0]))))


def _cli(kind: str, model_name: str, kw: dict) -> str:
    """The CLI request equivalent to a planner call: where a number comes from."""
    flags = []
    for k, v in kw.items():
        if k == "model" or v is None:
            continue
        flag = "--" + k.replace("_", "-")
        flags.append(flag if v is True else f"--no-{flag[2:]}" if v is False else f"{flag} {v}")
    return f"estimate {kind} --model {model_name} " + " ".join(flags)


# ---- one strategy ---------------------------------------------------------------------------

def _gb(b) -> str:
    return "?" if b is None else f"{b / GB:.1f} GB"


def _fits_text(st: dict) -> str:
    """'12.8 GB [11.8, 15.3] of 25.4 GB (51%)', and a warning when the interval's high end does not fit."""
    lo, hi = st.get("device_low"), st.get("device_high")
    txt = (f"{_gb(st['device_bytes'])}" + (f" [{lo / GB:.1f}, {hi / GB:.1f}]" if lo and hi else "")
           + f" of {_gb(st['limit_bytes'])} ({100 * st['device_bytes'] / st['limit_bytes']:.0f}%)")
    if hi and hi > st["limit_bytes"]:
        txt += "; the high end of the interval does not fit"
    return txt


def _shard(est: dict, count: int, arch) -> dict:
    """Per-GPU memory of a training step on ``count`` GPUs under FSDP full sharding.

    The planner's breakdown names each part; model states (settings multi_gpu.sharded_parts)
    are divided by the GPU count, every other part (activations, logits and loss, the layer
    being recomputed, workspaces) stays whole on each GPU, and FSDP's
    gathered layers (16-bit weights of ``gathered_layers`` blocks) are added."""
    peak, device = est["peak_allocated_bytes"], est["device_bytes"]
    lo, hi = est.get("device_low", device), est.get("device_high", device)
    if count == 1:
        return {"peak_allocated_bytes": peak, "device_bytes": device, "device_low": lo, "device_high": hi,
                "breakdown": est.get("breakdown", {}), "sharding": "single GPU"}
    mg = settings()["multi_gpu"]
    parts = {name: (b / count if name in mg["sharded_parts"] else b)
             for name, b in (est.get("breakdown") or {}).items()}
    gathered = mg["gathered_layers"] * arch.linear_params_per_layer * 2
    parts["fsdp_gathered_layers"] = gathered
    per_peak = sum(parts.values())
    per_device = per_peak + (device - peak)
    scale = per_device / device          # the planner's interval, scaled with the sharded total
    return {"peak_allocated_bytes": per_peak, "device_bytes": per_device, "device_low": lo * scale,
            "device_high": hi * scale, "breakdown": parts,
            "sharding": f"{mg['scheme']} over {count} GPUs: model states / {count}, activations per GPU, "
                        f"+{_gb(gathered)} for {mg['gathered_layers']} gathered 16-bit layers"}


def _stage_train(s, sc, arch, ctx) -> dict:
    w = ctx["settings"]["workload"]["train"]
    method = s.get("train_estimate", s["train"])
    tdev, count = ctx["train_device"], sc.hardware.count
    kw = dict(model=arch, method=method, precision=w["precision"], seq_len=sc.seq_len,
              batch_size=w["batch_size"], grad_ckpt=w["grad_ckpt"], lora_rank=w["lora_rank"], gpu=tdev.id,
              loss=w.get("loss", "reference"))
    est = _estimate("estimate_train", **kw)
    src = _cli("train", arch.name, kw)
    out = {"stage": "train", "method": method, "source": src, "device": tdev.id, "count": count,
           "request": {k: v for k, v in kw.items() if k != "model"}}
    if s.get("estimate_note"):
        out["note"] = s["estimate_note"]
    if "error" in est:
        return {**out, "error": est["error"], "fits": False}
    per = _shard(est, count, arch)
    if kw["loss"] != "reference":         # the engine beats DESIGN.md's recipe: say by how much
        ref = _estimate("estimate_train", **{**kw, "loss": "reference"})
        if "error" not in ref:
            ref_dev = _shard(ref, count, arch)["device_bytes"]
            out["reference_device_bytes"] = ref_dev
            if ref_dev > per["device_bytes"]:
                said = (f"with the engine's chunked loss; the reference recipe (full fp32 logits) needs "
                        f"{_gb(ref_dev)}" + ("" if ref_dev <= tdev.memory_bytes else ", which does not fit"))
                out["note"] = f"{out['note'].rstrip('.')}; {said}" if out.get("note") else said
    tokens = sc.examples * sc.seq_len * sc.epochs
    eff = ctx["settings"]["multi_gpu"]["scaling_efficiency"] if count > 1 else 1.0
    tps = est.get("tokens_per_s") or 0.0
    total_tps = tps * count * eff
    if est.get("calibration") is not None:
        out["calibration"] = est["calibration"]
    out.update(per, limit_bytes=tdev.memory_bytes, fits=per["device_bytes"] <= tdev.memory_bytes,
               tokens=tokens, tokens_per_s=total_tps, time_s=tokens / total_tps if total_tps else None,
               low_bytes=est.get("low"), high_bytes=est.get("high"))
    if tokens and tps:
        c = _estimate("train_cost", tokens=tokens, tokens_per_s=total_tps, gpu=tdev.id, gpu_count=count)
        out["cost"] = c
    return out


def _stage_quantize(st, s, sc, arch, ctx) -> dict | None:
    """GPTQ/AWQ calibration runs layer by layer on one training GPU; bitsandbytes and torchao
    quantize while loading or in place (their memory is the served model's, checked at serve)."""
    if st.get("method") not in ("gptq", "awq"):
        return None
    tdev = ctx["train_device"]
    kw = dict(model=arch, method=st["method"], bits=st.get("bits", 4), group_size=st.get("group_size", 128),
              calibration_samples=st.get("calibration_samples", 128),
              seq_len=ctx["settings"]["workload"]["calibration"]["seq_len"], gpu=tdev.id)
    est = _estimate("estimate_quantize", **kw)
    out = {"stage": "quantize", "method": st["method"], "bits": kw["bits"], "device": tdev.id,
           "source": _cli("quantize", arch.name, kw)}
    if "error" in est:
        return {**out, "error": est["error"], "fits": None}
    out.update(peak_allocated_bytes=est.get("peak_allocated_bytes"), device_bytes=est.get("device_bytes"),
               device_low=est.get("device_low"), device_high=est.get("device_high"),
               breakdown=est.get("breakdown", {}), time_s=est.get("time_s"), limit_bytes=tdev.memory_bytes,
               fits=est.get("device_bytes", 0) <= tdev.memory_bytes)
    if est.get("time_s"):
        out["cost"] = _estimate("calibration_cost", seconds=est["time_s"], gpu=tdev.id)
    return out


def _stage_merge(s, sc, arch, ctx) -> dict:
    tdev = ctx["train_device"]
    est = _estimate("estimate_merge", model=arch, base="bf16")
    out = {"stage": "merge", "device": tdev.id, "source": f"estimate merge --model {arch.name} --base bf16"}
    if "error" in est:
        return {**out, "error": est["error"], "fits": None}
    fits = est.get("device_bytes", 0) <= tdev.memory_bytes
    out.update(peak_allocated_bytes=est.get("peak_allocated_bytes"), device_bytes=est.get("device_bytes"),
               breakdown=est.get("breakdown", {}), limit_bytes=tdev.memory_bytes, fits=fits, time_s=est.get("time_s"))
    if not fits:
        out["note"] = "does not fit the GPU: merge on the CPU instead (needs the 16-bit model in RAM); not blocking"
    return out


def _stage_serve(s, sc, arch, ctx) -> dict:
    sdev = ctx["serve_device"]
    w = ctx["settings"]["workload"]["serve"]
    kw = dict(model=arch, weights=s["deploy"], batch_size=w["batch_size"], prompt_len=w["prompt_len"],
              new_tokens=w["new_tokens"], gpu=sdev.id)
    est = _estimate("estimate_infer", **kw)
    out = {"stage": "serve", "weights": s["deploy"], "device": sdev.id,
           "source": _cli("infer", arch.name, kw)}
    if "error" in est:
        return {**out, "error": est["error"], "fits": False}
    tps = est.get("decode_tokens_per_s")
    slow, fast = est.get("decode_tokens_per_s_low"), est.get("decode_tokens_per_s_high")
    if est.get("calibration") is not None:
        out["calibration"] = est["calibration"]
    out.update(weights_bytes=est.get("weights_bytes"), peak_allocated_bytes=est.get("peak_allocated_bytes"),
               device_bytes=est.get("device_bytes"), device_low=est.get("device_low"),
               device_high=est.get("device_high"), breakdown=est.get("breakdown", {}),
               limit_bytes=sdev.memory_bytes, fits=est.get("device_bytes", 0) <= sdev.memory_bytes,
               prefill_s=est.get("prefill_s"), decode_tokens_per_s=tps,
               decode_ms_per_token=1000.0 / tps if tps else None,
               decode_ms_per_token_low=1000.0 / fast if fast else None,
               decode_ms_per_token_high=1000.0 / slow if slow else None)
    if tps and sdev.price_per_hour:
        out["cost"] = _estimate("serving_cost", decode_tokens_per_s_per_sequence=tps,
                                batch_size=w["batch_size"], gpu=sdev.id,
                                max_latency_ms_per_token=sc.goals.max_latency_ms_per_token)
    return out


def _accuracy(s, sc, arch, ctx=None) -> dict:
    """The accuracy prior of a strategy (the accuracy model, pulled by measured runs of other
    strategies of the same method on this model), replaced by the newest run of this very
    strategy on this model when there is one (``measured``; the prior stays under ``prior``)."""
    from engine.estimate.accuracy import measured_accuracy
    a = s["accuracy"]
    kw = dict(family=arch.family, params_b=round(arch.total_params / 1e9, 3), method=a["method"],
              w_bits=float(a["w_bits"]), a_bits=float(a.get("a_bits", 16)), group_size=a.get("group_size"),
              per_channel=bool(a.get("per_channel", False)), finetune=a.get("finetune", "none"))
    src = (f"estimate accuracy --family {kw['family']} --params-b {kw['params_b']} --method {kw['method']} "
           f"--w-bits {kw['w_bits']:g} --a-bits {kw['a_bits']:g}"
           + (f" --group-size {kw['group_size']}" if kw["group_size"] else "")
           + (" --per-channel" if kw["per_channel"] else "") + f" --finetune {kw['finetune']}")
    m = (ctx or {}).get("measured") or {}
    own = (m.get("by_strategy") or {}).get(s["id"])
    pull = [r for sid, e in (m.get("by_strategy") or {}).items() if sid != s["id"] for r in e["rows"]
            if r["comparable"] and r["method"] == a["method"] and a["method"] != "none"]
    if pull and not own:
        est = _estimate("estimate_accuracy", **kw, measured=json.dumps(pull, sort_keys=True))
        ids = est.get("evidence", {}).get("measured_runs") or []
        if ids:
            src += f" (+ {len(ids)} measured run(s) of other {a['method']} strategies: {', '.join(ids)})"
    else:
        est = _estimate("estimate_accuracy", **kw)
    est = {**est, "source": src}
    if not own or est.get("retention") is None:
        return est
    meas = measured_accuracy(own["rows"])          # at the run's own model size
    if meas is None:
        return est
    meas["runs"] = own["runs"]
    prior = {k: est.get(k) for k in ("retention", "low", "high", "ppl_ratio", "ppl_low", "ppl_high", "source",
                                     "interval")}
    ev = dict(est.get("evidence") or {})
    ev["measured_runs"] = sorted(set(ev.get("measured_runs") or []) | {meas["run_id"]})
    ev["measured"] = len(ev["measured_runs"])
    ev["count"] = (ev.get("published") or 0) + ev["measured"]
    ppl = meas.get("ppl_ratio")
    return {**est, "retention": meas["retention"], "low": meas["low"], "high": meas["high"],
            "ppl_ratio": ppl if ppl is not None else est.get("ppl_ratio"),
            "ppl_low": ppl if ppl is not None else est.get("ppl_low"),
            "ppl_high": ppl if ppl is not None else est.get("ppl_high"),
            "interval": "central 80% of the measurement", "measured": meas, "prior": prior, "evidence": ev,
            "source": f"measured: run {meas['run_id']} ({meas['basis']}); prior: {src}"}


def assess(s: dict, sc: Scenario, ctx: dict) -> dict:
    """Estimates and hard constraints of one strategy (the score comes later: it is relative)."""
    arch, t = ctx["arch"], strategies.traits(s)
    g, sdev = sc.goals, ctx["serve_device"]
    stages, blocked, reasons = [], [], []

    def block(constraint, text, **extra):
        blocked.append({"constraint": constraint, "text": text, **extra})
        reasons.append({"kind": "constraint", "ok": False, "constraint": constraint, "text": text, **extra})

    def ok(constraint, text, **extra):
        reasons.append({"kind": "estimate", "ok": True, "constraint": constraint, "text": text, **extra})

    # data: training needs labelled examples
    if t["train"] != "none" and sc.examples == 0:
        block("data", "no labelled examples to train on (examples: 0)", value=0, limit=1)

    # stages in pipeline order
    for st in s["stages"]:
        if st["stage"] == "train":
            est = _stage_train(s, sc, arch, ctx)
        elif st["stage"] == "quantize":
            est = _stage_quantize(st, s, sc, arch, ctx)
        elif st["stage"] == "merge":
            est = _stage_merge(s, sc, arch, ctx)
        else:
            est = None
        if est is None:
            continue
        stages.append(est)
        where = f"{est['stage']} on {sc.hardware.count}x {est['device']}" if est["stage"] == "train" \
            else f"{est['stage']} on {est['device']}"
        if est.get("error"):
            if est["stage"] == "train":
                block("memory", f"{where}: not estimated ({est['error']})", stage=est["stage"])
            else:
                reasons.append({"kind": "estimate", "ok": None, "constraint": "memory", "stage": est["stage"],
                                "text": f"{where}: not estimated ({est['error']})"})
        elif est["fits"] is False and est["stage"] != "merge":
            block("memory", f"{where}: needs {_gb(est['device_bytes'])} per GPU > {_gb(est['limit_bytes'])} "
                            f"({est['source']})", stage=est["stage"], value=est["device_bytes"],
                  limit=est["limit_bytes"])
        else:
            ok("memory", f"{where}: {_fits_text(est)}" + (f"; {est['note']}" if est.get("note") else ""),
               stage=est["stage"], value=est["device_bytes"], limit=est["limit_bytes"])

    # time and money (informative: the cost part of the score uses them)
    tr = next((x for x in stages if x["stage"] == "train" and x.get("time_s")), None)
    if tr:
        usd = (tr.get("cost") or {}).get("usd")
        reasons.append({"kind": "estimate", "ok": True, "constraint": "cost",
                        "text": f"training: {tr['tokens']:,.0f} tokens at {tr['tokens_per_s']:,.0f} tokens/s = "
                                f"{tr['time_s'] / 3600:.1f} h on {sc.hardware.count}x {tr['device']}"
                                + (f", {usd:,.2f} USD" if usd is not None else "")})

    # calibration data
    if t["calibration"]:
        need = ctx["settings"]["data"]["calibration_samples"]
        if sc.examples < need:
            reasons.append({"kind": "estimate", "ok": True, "constraint": "data",
                            "text": f"calibration: {sc.examples} task examples < {need}: calibrates on generic "
                                    f"text (C4/WikiText); task quality may suffer a little more"})

    # serving: where it runs, whether the runtime has the format, memory, latency
    serve = None
    if s["deploy"] == "hosted":
        if sc.deploy.target != "hosted-api":
            block("deploy", f"serves through a provider; the scenario deploys to {sc.deploy.target} "
                            f"(set deploy.target: hosted-api to consider it)")
    elif sc.deploy.target == "hosted-api":
        if t["quantized"]:
            block("deploy", "a hosted API serves (and quantizes) the model itself: your own quantized "
                            f"{s['deploy']} weights cannot be deployed there")
    else:
        support = ctx["settings"]["serving"][sdev.kind]
        if support["formats"] != "all" and s["deploy"] not in support["formats"]:
            block("format", f"{sdev.name} ({sdev.kind}) cannot run {s['deploy']} weights: {support['runtime']}")
        if t["fp8"] and not sdev.has_fp8:
            block("format", f"FP8 needs FP8 tensor cores (Ada, Hopper, Blackwell); {sdev.id} has none")
        if t["gpu_only"] and sdev.kind not in ("gpu", "edge"):
            block("format", f"{s['deploy']} kernels need a CUDA GPU; {sdev.id} is a {sdev.kind}")
        serve = _stage_serve(s, sc, arch, ctx)
        stages.append(serve)
        if serve.get("error"):
            block("memory", f"serve on {sdev.id}: not estimated ({serve['error']})", stage="serve")
        elif not serve["fits"]:
            block("memory", f"serve on {sdev.id}: needs {_gb(serve['device_bytes'])} > {_gb(serve['limit_bytes'])} "
                            f"({serve['source']})", stage="serve", value=serve["device_bytes"],
                  limit=serve["limit_bytes"])
        else:
            ok("memory", f"serve on {sdev.id}: {_fits_text(serve)}", stage="serve",
               value=serve["device_bytes"], limit=serve["limit_bytes"])
        ms, goal = serve.get("decode_ms_per_token"), g.max_latency_ms_per_token
        if ms is not None:
            lo, hi = serve.get("decode_ms_per_token_low"), serve.get("decode_ms_per_token_high")
            txt = f"decode {ms:.1f} ms/token" + (f" [{lo:.1f}, {hi:.1f}]" if lo and hi else "") + f" on {sdev.id}"
            if goal is None:
                ok("latency", f"{txt} (no latency goal)", value=ms)
            elif ms > goal:
                block("latency", f"{txt} > goal {goal:g} ms ({serve['source']})", value=ms, limit=goal)
            else:
                ok("latency", f"{txt} <= goal {goal:g} ms"
                   + ("; the slow end of the interval misses it" if hi and hi > goal else ""), value=ms, limit=goal)
        usd_m = (serve.get("cost") or {}).get("usd_per_million_tokens")
        if usd_m is not None:
            reasons.append({"kind": "estimate", "ok": True, "constraint": "cost",
                            "text": f"serving: {usd_m:,.2f} USD per million tokens on {sdev.id} "
                                    f"(batch {serve['cost'].get('batch_size')})"})

    # bits goal
    if g.target_weight_bits is not None and t["w_bits"] != g.target_weight_bits:
        block("bits", f"serves {t['w_bits']:g}-bit weights; the goal is {g.target_weight_bits}-bit weights "
                      f"(target_weight_bits)", value=t["w_bits"], limit=g.target_weight_bits)

    # accuracy goal
    acc = _accuracy(s, sc, arch, ctx)
    r = acc.get("retention")
    meas = acc.get("measured")
    if meas:
        p = acc["prior"]
        reasons.append({"kind": "measured", "ok": True, "constraint": "accuracy", "run_id": meas["run_id"],
                        "dataset": meas["dataset"],
                        "text": f"measured on your data: run {meas['run_id']}: retention {r:.3f} "
                                f"[{acc['low']:.3f}, {acc['high']:.3f}] from {meas['basis']}; replaces the prior "
                                f"{p['retention']:.3f} "
                                f"[{p['low']:.3f}, {p['high']:.3f}]"
                                + (f" ({len(meas['runs'])} runs of {s['id']}; the newest counts)"
                                   if len(meas["runs"]) > 1 else "")
                                + (f"; against the {meas['reference']}" if not meas["comparable"] else "")})
    if r is None:
        reasons.append({"kind": "estimate", "ok": None, "constraint": "accuracy",
                        "text": f"accuracy not estimated ({acc.get('error', 'no retention')})"})
    else:
        lo, hi = acc.get("low", r), acc.get("high", r)
        txt = f"retention {r:.3f} [{lo:.3f}, {hi:.3f}]" + (f" measured (run {meas['run_id']})" if meas else "")
        if g.min_accuracy_retention is not None:
            if r < g.min_accuracy_retention:
                block("accuracy", f"{txt} < goal {g.min_accuracy_retention:g} ({acc['source']})",
                      value=r, limit=g.min_accuracy_retention)
            elif lo < g.min_accuracy_retention:
                ok("accuracy", f"{txt} meets goal {g.min_accuracy_retention:g}, but the interval reaches below it",
                   value=r, limit=g.min_accuracy_retention)
            else:
                ok("accuracy", f"{txt} >= goal {g.min_accuracy_retention:g}", value=r, limit=g.min_accuracy_retention)
        else:
            ok("accuracy", f"{txt} (no accuracy goal)", value=r)

    train = next((x for x in stages if x["stage"] == "train"), None)
    return {
        "strategy": s["id"], "name": s["name"], "family": s["family"], "scheme": t["scheme"],
        "summary": s.get("summary", ""), "traits": t,
        "feasible": not blocked, "blocked_by": sorted({b["constraint"] for b in blocked}), "blocked": blocked,
        "reasons": reasons,
        "estimates": {
            "stages": stages,
            "accuracy": acc,
            "train_device_bytes": train.get("device_bytes") if train else None,
            "serve_device_bytes": serve.get("device_bytes") if serve else None,
            "latency_ms_per_token": serve.get("decode_ms_per_token") if serve else None,
            "train_time_s": train.get("time_s") if train else None,
            "cost": _cost_summary(stages),
        },
    }


def _cost_summary(stages) -> dict:
    usd, hours, serve = 0.0, 0.0, None
    priced = True
    for st in stages:
        c = st.get("cost")
        if not c or "error" in c:
            continue
        if st["stage"] == "serve":
            serve = c.get("usd_per_million_tokens")
        else:
            if c.get("usd") is None:
                priced = False
            usd += c.get("usd") or 0.0
            hours += c.get("gpu_hours") or 0.0
    return {"train_usd": usd if priced else None, "train_gpu_hours": hours,
            "serve_usd_per_million_tokens": serve}


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


# ---- the matrix -----------------------------------------------------------------------------

def _rank(sc: Scenario, rules: list[dict], measured: dict | None = None) -> dict:
    cfg = settings()
    f = facts(sc)
    fired = [r for r in rules if matches(r["when"], f)]
    ctx = {"arch": sc.arch(), "train_device": sc.train_device(), "serve_device": sc.serve_device(), "settings": cfg,
           "measured": measured or {}}
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


def recommend(scenario, rules: list[dict] | None = None, what_if: bool = True, runs=None) -> dict:
    """The decision matrix for a scenario (a dict, a Scenario, or a path/preset id of a YAML file).

    Returns the JSON of ``python -m engine recommend --json``: ``recommended`` (a strategy id,
    or None when nothing is feasible), ``ranked`` (every strategy: strategy, family, feasible,
    score, why, estimates, ...), ``rules_fired``, ``what_would_change``, ``assumptions``,
    ``measured_runs`` (the runs that counted as measured accuracy evidence).

    ``runs``: the measured evidence, overriding the scenario's ``measured`` field: run dicts
    (as engine.runs.api.get_run returns them) or run ids; [] for none. Left out, the scenario
    decides (default: the run store's finished runs of the scenario's model).
    """
    t0 = time.perf_counter()
    sc = _scenario(scenario)
    rules = load_rules() if rules is None else check_rules(rules)
    measured = _measured_evidence(sc, measured_runs(sc, runs))
    res = _rank(sc, rules, measured)
    rows = res["rows"]
    out = {
        "scenario": sc.to_dict(),
        "model": sc.arch().to_dict(),
        "facts": res["facts"],
        "recommended": res["recommended"],
        "ranked": [{k: v for k, v in r.items() if k not in ("traits", "priority")} for r in rows],
        "rules_fired": [{"id": r["id"], "topic": r["topic"], "rationale": r["rationale"], "source": r["source"]}
                        for r in res["fired"]],
        "assumptions": _assumptions(sc),
        "measured_runs": measured["summary"],
    }
    out["what_would_change"] = _what_would_change(sc, rules, res) if what_if else None
    out["timing_ms"] = round(1000 * (time.perf_counter() - t0), 1)
    return out


# ---- measured runs: the user's own evidence ----------------------------------------------------

_store_cache: dict = {}


def _store_runs() -> list[dict]:
    """Finished runs of the run store (engine.runs.api's store if this process opened one, else
    the default file; none when it does not exist or TUNEQUANT_MEASURED=off). Read again only
    when the file changed: the dashboard calls the advisor on every input change."""
    if os.environ.get("TUNEQUANT_MEASURED", "").strip().lower() in ("off", "none", "0", "false"):
        return []
    from engine.runs import api, store as run_store      # sqlite only: imports no torch
    ex = api._executor
    path = ex.store.path if ex is not None else run_store.default_db_path()
    if not path.is_file():
        return []
    stamp = tuple((p.stat().st_mtime_ns, p.stat().st_size) if p.is_file() else None
                  for p in (path, path.with_name(path.name + "-wal")))
    hit = _store_cache.get(str(path))
    if hit and hit[0] == stamp:
        return hit[1]
    st = ex.store if ex is not None else run_store.RunStore(path)
    runs = st.list_runs(status="finished")
    _store_cache[str(path)] = (stamp, runs)
    return runs


def measured_runs(scenario, runs=None) -> list[dict]:
    """The finished runs that count as measured evidence for a scenario, newest first.

    ``runs`` (run dicts or ids; [] for none) overrides the scenario's ``measured`` field:
    ``store`` (default) reads the run store, ``none`` uses none, a list names run ids (each
    read with engine.runs.api.get_run; an unknown id is an InputError). Only runs of the
    scenario's model count (the run's model reference or its resolved name)."""
    sc = _scenario(scenario)
    src = sc.measured if runs is None else list(runs)
    if src == "none":
        return []
    if src == "store":
        found = _store_runs()
    else:
        from engine.runs import api
        found = []
        for i, r in enumerate(src):
            if isinstance(r, dict):
                found.append(r)
                continue
            try:
                found.append(api.get_run(str(r)))
            except (InputError, KeyError) as e:
                raise InputError(f"measured[{i}]: no run {r!r} in the run store ({e})", field="measured")
    from engine.estimate.accuracy import run_models
    names = {sc.arch().name.strip().lower()} | ({sc.model.strip().lower()} if isinstance(sc.model, str) else set())
    out = [r for r in found if r.get("status", "finished") == "finished" and run_models(r) & names]
    return sorted(out, key=lambda r: -(r.get("created") or 0))


def _measured_evidence(sc: Scenario, runs: list[dict]) -> dict:
    """Measured rows of the runs, the newest run per strategy, and a summary for the output."""
    from engine.estimate.accuracy import measured_from_runs
    rows = measured_from_runs(runs)
    by_strategy: dict[str, dict] = {}
    for r in rows:                                         # runs are newest first
        e = by_strategy.setdefault(r["strategy"], {"run_id": r["run_id"], "rows": [], "runs": []})
        if r["run_id"] not in e["runs"]:
            e["runs"].append(r["run_id"])
        if r["run_id"] == e["run_id"]:
            e["rows"].append(r)
    summary = [{"run_id": r.get("id"), "strategy": r.get("strategy"), "model": r.get("model"),
                "used_for": next((sid for sid, e in by_strategy.items() if e["run_id"] == r.get("id")), None)}
               for r in runs]
    return {"rows": rows, "by_strategy": by_strategy, "summary": summary}


def _assumptions(sc: Scenario) -> list[str]:
    cfg = settings()
    w = cfg["workload"]
    out = [f"training: {w['train']['precision']}, sequence length {sc.seq_len}, batch {w['train']['batch_size']} per GPU, "
           f"gradient checkpointing {'on' if w['train']['grad_ckpt'] else 'off'}, LoRA rank {w['train']['lora_rank']}, "
           f"{sc.epochs:g} epoch(s) over {sc.examples} examples",
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
                    text.append(f"a training GPU with >= {_gb(per_gpu)} ({d.id})")
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
            text.append(f"a serving device with >= {_gb(b['value'])} ({d.id})")
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


def _what_would_change(sc: Scenario, rules: list[dict], res: dict) -> dict:
    rows, rec = res["rows"], res["recommended"]
    rec_row = next((r for r in rows if r["strategy"] == rec), None)
    bar = rec_row["score"] if rec_row else -math.inf
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
    return {"binding": binding, "summary": summary, "alternatives": alternatives, "runner_up": runner_up,
            "tightest": tight}


# ---- CLI --------------------------------------------------------------------------------------

def _run_cli(args) -> int:
    from engine.cli import emit
    scenario = args.scenario
    if args.measured:
        m = args.measured.strip()
        m = m.lower() if m.lower() in ("store", "none") else [x.strip() for x in m.split(",") if x.strip()]
        scenario = parse_scenario({**_scenario(args.scenario).to_dict(), "measured": m})
    out = recommend(scenario, what_if=not args.no_what_if)
    if args.json:
        emit(out)
    else:
        print(format_table(out))
    return 0


def format_table(out: dict) -> str:
    """A plain-text view of the matrix for people at a terminal."""
    lines = [f"recommended: {out['recommended']}", f"what would change: {out['what_would_change']['summary']}"
             if out.get("what_would_change") else "", ""]
    lines.append(f"{'#':>2} {'strategy':<22} {'family':<23} {'ok':<3} {'score':>6}  blocked by / top reason")
    for r in out["ranked"]:
        first = ", ".join(r["blocked_by"]) if r["blocked_by"] else (r["why"][0][:70] if r["why"] else "")
        lines.append(f"{r['rank']:>2} {r['strategy']:<22} {r['family']:<23} {'yes' if r['feasible'] else 'no':<3} "
                     f"{r['score']:>6.3f}  {first}")
    lines.append("")
    lines.append("rules fired: " + ", ".join(x["id"] for x in out["rules_fired"]))
    return "\n".join(lines)


def register_cli(sub) -> None:
    p = sub.add_parser("recommend", help="rank every strategy for a scenario (decision matrix)")
    p.add_argument("--scenario", required=True,
                   help="scenario YAML/JSON file, or a preset id of presets/scenarios/")
    p.add_argument("--no-what-if", action="store_true", help="skip 'what would change the answer' (faster)")
    p.add_argument("--measured", default=None,
                   help="measured accuracy evidence: store (finished runs of the run store, the default), none, "
                        "or run ids separated by commas; overrides the scenario's measured field")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_run_cli)

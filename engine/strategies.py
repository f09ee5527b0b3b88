"""The strategy catalog of DESIGN.md, as data (presets/strategies.yaml) plus small functions.

Each entry is a pipeline of ``stages`` (what a run executes, read by engine/runs) and the
requests the planner answers for it: ``train`` (estimate train --method), ``deploy`` (estimate
infer --weights) and ``accuracy`` (estimate accuracy). ``traits(s)`` flattens an entry into the
facts the advisor's rules match on (family, training method, deployed bits, scheme ...).
"""
from __future__ import annotations

import functools

from engine.errors import InputError, choices
from engine.presets import load_yaml

FAMILIES = ("ptq-only", "finetune-then-quantize", "quantize-then-finetune", "joint-qat",
            "finetune-only", "no-change")
STAGES = ("train", "merge", "quantize", "convert", "evaluate")
TRAIN_METHODS = ("full", "lora", "qlora", "qat")
MATURITY = ("established", "research")
# deploy formats whose weights are not quantized (16-bit) or not ours to serve (hosted)
UNQUANTIZED = ("bf16", "fp16", "hosted")


def catalog() -> list[dict]:
    """Every strategy, in catalog order."""
    return list(load_yaml("strategies.yaml"))


def ids() -> list[str]:
    return [s["id"] for s in catalog()]


def get(strategy_id: str) -> dict:
    for s in catalog():
        if s["id"] == strategy_id:
            return s
    raise choices("strategy", strategy_id, ids())


def by_family() -> dict[str, list[str]]:
    """Family -> strategy ids, in catalog order."""
    out = {f: [] for f in FAMILIES}
    for s in catalog():
        out[s["family"]].append(s["id"])
    return out


def scheme(s: dict) -> str:
    """Mixed-precision scheme of the served model: W4A16, W8A8, FP8, W16A16 ..."""
    acc = s.get("accuracy", {})
    w, a = acc.get("w_bits", 16), acc.get("a_bits", 16)
    if acc.get("method") == "fp8":
        return "FP8"
    return f"W{w:g}A{a:g}"


def traits(s: dict) -> dict:
    """The facts about a strategy that rules match on (see presets/rules/rules.yaml)."""
    acc = s.get("accuracy", {})
    req = s.get("requires", {}) or {}
    stages = [st["stage"] for st in s["stages"]]
    return {
        "id": s["id"],
        "family": s["family"],
        "train": s.get("train", "none"),
        "lora": s.get("train") in ("lora", "qlora") or any(st.get("lora") for st in s["stages"]),
        "quantized": s["deploy"] not in UNQUANTIZED,
        "w_bits": acc.get("w_bits", 16),
        "a_bits": acc.get("a_bits", 16),
        "scheme": scheme(s),
        "deploy": s["deploy"],
        "calibration": bool(req.get("calibration")),
        "gpu_only": bool(req.get("gpu_only")),
        "fp8": bool(req.get("fp8")),
        "merge": "merge" in stages,
        "maturity": s.get("maturity", "established"),
    }


@functools.lru_cache(maxsize=1)
def all_traits() -> dict[str, dict]:
    return {s["id"]: traits(s) for s in catalog()}


def check_catalog(entries: list[dict] | None = None) -> list[dict]:
    """Validate the catalog's shape; an InputError names the entry and the field."""
    entries = catalog() if entries is None else entries
    seen = set()
    for s in entries:
        sid = s.get("id")
        if not sid or sid in seen:
            raise InputError(f"strategy id {sid!r} is missing or repeated", field="id")
        seen.add(sid)
        for key in ("family", "name", "stages", "deploy", "accuracy", "summary"):
            if key not in s:
                raise InputError(f"strategy {sid}: {key} is required", field=key)
        if s["family"] not in FAMILIES:
            raise choices(f"family of {sid}", s["family"], FAMILIES)
        for st in s["stages"]:
            if st.get("stage") not in STAGES:
                raise choices(f"stage of {sid}", st.get("stage"), STAGES)
        has_train = any(st["stage"] == "train" for st in s["stages"])
        if has_train != ("train" in s):
            raise InputError(f"strategy {sid}: a train stage needs a `train:` method and vice versa", field="train")
        if has_train and s["train"] not in TRAIN_METHODS:
            raise choices(f"train method of {sid}", s["train"], TRAIN_METHODS)
        if s.get("train_estimate", s.get("train", "full")) not in TRAIN_METHODS:
            raise choices(f"train_estimate of {sid}", s.get("train_estimate"), TRAIN_METHODS)
        if s["stages"][-1]["stage"] != "evaluate":
            raise InputError(f"strategy {sid}: the last stage must be evaluate", field="stages")
        if s.get("maturity", "established") not in MATURITY:
            raise choices(f"maturity of {sid}", s.get("maturity"), MATURITY)
        if "w_bits" not in s["accuracy"] or "method" not in s["accuracy"]:
            raise InputError(f"strategy {sid}: accuracy needs method and w_bits", field="accuracy")
    return entries

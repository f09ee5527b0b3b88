"""The strategy catalog of DESIGN.md, as data (presets/strategies.yaml) plus small functions."""
from __future__ import annotations

from engine.errors import choices
from engine.presets import load_yaml

FAMILIES = ("ptq-only", "finetune-then-quantize", "quantize-then-finetune", "joint-qat",
            "finetune-only", "no-change")


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

"""StageContext: what the worker hands each stage (the contract between the worker and the stages).

A stage is a plain function ``stage(ctx: StageContext) -> dict | None`` registered in
``engine.runs.stages.STAGES`` under its catalog name ("train", "merge", "quantize", "convert",
"evaluate"). The worker calls the stages of ``strategy["stages"]`` in order with one context
each; ``ctx.state`` is the same dict for every stage of the run, so a stage leaves what the
next one needs there (e.g. ``state["model_dir"]``). The dict a stage returns is stored as that
stage's result (metrics, artifact paths) in the run's result JSON.

Events: ``ctx.emit(type, **payload)`` appends one typed, sequence-numbered event to the run
store (and the run's events.jsonl). Types and their payload keys:

    "step"      step, total, loss, lr, tokens_per_s, mem_bytes, eta_s  (any may be omitted)
    "eval"      name (e.g. "before"/"after"), metrics: dict
    "log"       message
    "artifact"  path, kind (e.g. "adapter", "model", "quantized-model")
    "metric"    name, value, unit
    "warning"   message

The worker itself emits queued/started/stage_started/stage_finished/error/finished.

Stop: stages poll ``ctx.should_stop()`` every step (and between expensive phases) and return
early, saving what they can; the worker then ends the run ``stopped``.

This module imports no torch: the UI and the CLI import it freely.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from engine.spec.run import RunSpec


class StageStopped(Exception):
    """Raised from deep inside a long library call (a GPTQ layer, the demo model's build) when a
    stop was asked: the worker records the stage as stopped and ends the run ``stopped``."""


class NonFiniteLoss(RuntimeError):
    """A training step's loss became NaN/inf: nothing is learnt from there on, the run fails."""

    @classmethod
    def at(cls, step, loss) -> "NonFiniteLoss":
        return cls(f"loss became {'NaN' if loss != loss else loss} at step {step}; lower the learning rate "
                   f"(or check the data) and run again")


@dataclass
class StageContext:
    run_id: str
    spec: RunSpec                       # engine/spec/run.py
    strategy: dict                      # the catalog entry, engine.strategies.get(spec.strategy)
    stage: dict                         # this stage's catalog entry; quantize/export merged with spec.quantize/export overrides
    index: int                          # position of this stage in strategy["stages"]
    workdir: Path                       # the run's own artifact folder (exists)
    state: dict = field(default_factory=dict)      # handed from stage to stage: "model_dir", "adapter_dir",
                                                   # "base_dir", "tokenizer_dir", "dataset", "eval_before", ...
    device: str = "cpu"                 # "cuda" | "cpu" (resolved from spec.device)
    emit: Callable[..., None] = lambda type, **payload: None   # emit(type, **payload), see module docstring
    should_stop: Callable[[], bool] = lambda: False            # True once a stop was requested

    @property
    def name(self) -> str:
        """The stage's name ("train", "quantize", ...)."""
        return self.stage["stage"]

    def log(self, message: str) -> None:
        self.emit("log", message=message)

    def warn(self, message: str) -> None:
        self.emit("warning", message=message)


def stage_entry(strategy: dict, index: int, spec: RunSpec) -> dict:
    """The stage entry a stage sees: the catalog's entry, with ``spec.quantize`` / ``spec.export``
    overrides (those not None) for the quantize / export stage."""
    entry = dict(strategy["stages"][index])
    overrides = {"quantize": spec.quantize, "export": spec.export}.get(entry.get("stage"))
    if overrides is not None:
        for key, val in overrides.model_dump().items():
            if val is not None:
                entry[key] = val
    return entry

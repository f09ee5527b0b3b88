"""The run stages, with the real libraries: train, merge, quantize, convert, export, evaluate.

``STAGES[name](ctx)`` runs one stage of a run (``ctx``: engine.runs.context.StageContext) and
returns a dict of what it measured and saved; stages hand the model on through ``ctx.state``
(see stages/common.py). ``prepare(spec)`` refuses a run that cannot work before it starts:
unknown model, bad dataset, settings the model or the device cannot take.

Importing this package imports no torch (the UI calls ``prepare``); the stage functions import
torch, transformers, peft, bitsandbytes, torchao and gptqmodel when they run. docs/stages.md
says what each stage does with which library, on the CPU and on a GPU.
"""
from __future__ import annotations

from engine.errors import InputError
from engine.runs.stages.convert import convert
from engine.runs.stages.evaluate import evaluate
from engine.runs.stages.export import export
from engine.runs.stages.merge import merge
from engine.runs.stages.quantize import quantize
from engine.runs.stages.train import train
from engine.vocab import QAT_SCHEMES, TRAIN_METHODS

STAGES = {"train": train, "merge": merge, "quantize": quantize, "convert": convert, "export": export,
          "evaluate": evaluate}


def _device(spec) -> str:
    if spec.device in ("cpu", "cuda"):
        return spec.device
    from engine.runs.executor import gpu_slots
    return "cuda" if gpu_slots() else "cpu"


def _arch(spec):
    """The model's architecture, without loading weights (InputError for an unknown model)."""
    from engine import demo_presets, models
    if demo_presets.is_demo(spec.model):
        name = demo_presets.model_name(spec.model)
        return models.arch_from_config(demo_presets.hf_config(name), name=name, source=f"demo:{name}")
    return models.resolve(spec.model)


def prepare(spec) -> dict:
    """Check a run before it starts; returns what was checked (dataset report, model, device).
    Raises InputError naming the problem: unknown model, missing/ill-formed dataset, settings
    the model or the device cannot take (group size, GPU-only method on the CPU, ...)."""
    from engine import strategies
    from engine.runs import data
    from engine.runs.stages.quantize import check as check_quantize
    from engine.runs.stages.train import check_group
    strategy = strategies.get(spec.strategy)
    device = _device(spec)
    arch = _arch(spec)
    report = data.check(spec.dataset)
    stages = [st["stage"] for st in strategy["stages"]]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise InputError(f"strategy {spec.strategy} has stage(s) {', '.join(unknown)} this engine does not run",
                         field="strategy")
    if strategy.get("pending_stages"):           # the catalog says this engine cannot run them yet
        raise InputError(f"strategy {spec.strategy}: the engine cannot run its {', '.join(strategy['pending_stages'])} "
                         "stage yet (presets/strategies.yaml pending_stages); it is estimated and ranked, not launchable",
                         field="strategy")
    from engine.runs.context import stage_entry
    for i, name in enumerate(stages):
        entry = stage_entry(strategy, i, spec)
        if name == "quantize":
            check_quantize(entry, arch, device)
        elif name == "export":
            from engine.runs.stages.export import check as check_export
            check_export(entry, device)
        elif name == "train":
            method = entry.get("method", "lora")
            if method not in TRAIN_METHODS:
                raise InputError(f"unknown training method {method!r}; known: {', '.join(TRAIN_METHODS)}",
                                 field="strategy")
            if method == "qat":
                scheme = entry.get("scheme", "int8-dyn-act-int4-weight")
                if scheme not in QAT_SCHEMES:
                    raise InputError(f"unknown QAT scheme {scheme!r}; known: {', '.join(QAT_SCHEMES)}",
                                     field="strategy")
                check_group(arch, int(entry.get("group_size", 32)), "QAT")
            if method in ("lora", "qlora") or entry.get("lora"):
                have = {lin.lora_target for lin in arch.linears} | {lin.name.rsplit(".", 1)[-1] for lin in arch.linears}
                if not set(spec.train.lora_targets) & have:
                    raise InputError(f"none of the LoRA targets {', '.join(spec.train.lora_targets)} is a layer of "
                                     f"{arch.name}; its layers: {', '.join(l.name for l in arch.linears)}",
                                     field="train.lora_targets")
    if spec.world_size > 1:
        trains = [stage_entry(strategy, i, spec) for i, n in enumerate(stages) if n == "train"]
        if not trains:
            raise InputError(f"resources ask for {spec.world_size} processes, but strategy {spec.strategy} does not "
                             "train; only the train stage runs in several processes", field="resources")
        for entry in trains:
            why = strategies.multi_process_problem(entry)
            if why:
                raise InputError(f"resources ask for {spec.world_size} processes, but strategy {spec.strategy} cannot "
                                 f"train that way: {why}; run it in one process (drop resources)"
                                 + ("" if entry.get("method") != "qat" else ", or use full QAT (qat-int8, "
                                    "qat-int4-weight) with resources"), field="resources")
    if spec.train.resume_from_checkpoint or spec.train.save_steps:
        trains = [stage_entry(strategy, i, spec) for i, n in enumerate(stages) if n == "train"]
        if not trains:
            raise InputError(f"train.save_steps / resume_from_checkpoint: strategy {spec.strategy} has no train stage",
                             field="train.resume_from_checkpoint" if spec.train.resume_from_checkpoint else "train.save_steps")
        if spec.train.resume_from_checkpoint:
            from engine.runs.stages import checkpoint
            where = checkpoint.find(spec.train.resume_from_checkpoint)
            checkpoint.check_resume(checkpoint.read_state(where), spec, trains[0].get("method", "lora"),
                                    spec.world_size, spec.train.steps)
    if spec.train.seq_len > arch.max_positions:
        raise InputError(f"train.seq_len {spec.train.seq_len} is longer than {arch.name} supports "
                         f"({arch.max_positions} positions)", field="train.seq_len")
    return {"device": device, "model": arch.name, "dataset": {k: report[k] for k in ("format", "task", "rows",
                                                                                         "valid_rows")},
            "warnings": [p["message"] for p in report["problems"] if p["severity"] == "warning"]}


def run_inline(spec, workdir, emit=None, device: str | None = None, should_stop=None) -> dict:
    """Run every stage of a RunSpec in this process, without the run store or a worker: for
    tests, notebooks and benchmarks. ``emit(type, **payload)`` receives the stage events
    (default: dropped). Returns {"stages": {name#index: result}, "state": ctx.state, "events": [...]}."""
    from pathlib import Path

    from engine import strategies
    from engine.runs.context import StageContext, stage_entry
    from engine.spec.run import RunSpec
    spec = spec if isinstance(spec, RunSpec) else RunSpec.parse(spec)
    strategy = strategies.get(spec.strategy)
    device = device or _device(spec)
    prepare(spec)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    events: list[dict] = []

    def _emit(type, **payload):
        events.append({"type": type, **payload})
        if emit is not None:
            emit(type, **payload)

    state: dict = {}
    results = {}
    for i, st in enumerate(strategy["stages"]):
        ctx = StageContext(run_id="inline", spec=spec, strategy=strategy, stage=stage_entry(strategy, i, spec),
                           index=i, workdir=workdir, state=state, device=device, emit=_emit,
                           should_stop=should_stop or (lambda: False))
        results[f"{st['stage']}#{i}"] = STAGES[st["stage"]](ctx)
    return {"stages": results, "state": state, "events": events}

"""Scenario: what the advisor reads (DESIGN.md "Scenario file"), typed and validated.

A scenario names the model, the task, how many labelled examples exist, the hardware that
trains, where the model will be served, the goals, and optionally the symptoms that made the
team look at fine-tuning or quantization at all::

    model: llama-3.1-8b          # preset, local dir, config.json, hub id, or {params_b: 13, family: llama-2}
    task: generation              # classification | retrieval | generation | structured-output | chat
    examples: 5000                # labelled examples available for fine-tuning
    hardware: {gpu: rtx-4090-24gb, count: 1}
    deploy: {target: consumer-gpu, gpu: rtx-4090-24gb}   # gpu-server | consumer-gpu | edge | phone | hosted-api
    goals: {max_latency_ms_per_token: 50, min_accuracy_retention: 0.97, priority: balanced,
            target_weight_bits: 4}
    symptoms: [too-slow, wrong-tone]

Optional extras: ``name``, ``description``, ``seq_len`` (training sequence length, default
512) and ``epochs`` (passes over the examples, default 1) for the time and cost estimates, and
``lora_rank: {min, max}``: the LoRA ranks the advisor may choose from when it searches a
training configuration that fits (default: the workload's rank alone), and
``measured``: which finished runs count as measured accuracy evidence (``store``, the default:
the run store's finished runs of this model; ``none``; or a list of run ids), docs/advisor.md.
``deploy.gpu`` is the serving device: a GPU id, or for edge/phone a device of
presets/hardware/targets.yaml (``deploy.device`` is accepted as a synonym). Left out, it is
the training GPU (gpu-server, consumer-gpu) or the first device of that kind (edge, phone).
``deploy.runtime`` (optional) says which serving runtimes of presets/runtimes.yaml (vllm, llama.cpp,
executorch, mlx, tensorrt-llm, transformers) the advisor may serve with: one name fixes it (every
strategy is judged on it; a format it cannot load is infeasible); a list lets it search among those;
left out or ``any``, it searches every runtime that runs on the serving device and loads the
strategy's format (docs/advisor.md "Serving configuration search"). Normalised: ``any`` -> None, a
list of one -> that name, a list -> the runtime ids in the given order without repeats.

Every error is an ``InputError`` naming the field and what would be valid.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from engine import hardware, models
from engine.errors import InputError
from engine.safeload import load_yaml_file
from engine.presets import PRESETS_DIR

TASKS = ("classification", "retrieval", "generation", "structured-output", "chat")
TARGETS = ("gpu-server", "consumer-gpu", "edge", "phone", "hosted-api")
PRIORITIES = ("accuracy", "balanced", "cost")
SYMPTOMS = ("too-slow", "too-big", "too-expensive", "wrong-domain", "wrong-tone", "wrong-format")
WEIGHT_BITS = (2, 3, 4, 8, 16)
MEASURED = ("store", "none")       # or a list of run ids
# which device kinds (engine.hardware.Device.kind) may serve each deploy target
TARGET_KINDS = {"gpu-server": ("gpu",), "consumer-gpu": ("gpu",), "edge": ("edge", "laptop", "cpu"),
                "phone": ("phone",), "hosted-api": ()}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Hardware(_Strict):
    """What trains (and calibrates): one GPU type, ``count`` of them."""
    gpu: str
    count: int = Field(1, ge=1, le=4096)


class Deploy(_Strict):
    """Where the model is served: the target class, the device and (optionally) the runtime."""
    target: Literal[TARGETS] = "gpu-server"
    gpu: str | None = None
    runtime: str | list[str] | None = None   # presets/runtimes.yaml: one name fixes it; a list: search
                                             # among those; None / "any": search every runtime on the device


class Goals(_Strict):
    """Every goal is optional; a missing one does not constrain."""
    max_latency_ms_per_token: float | None = Field(None, gt=0)
    min_accuracy_retention: float | None = Field(None, gt=0, le=1)
    priority: Literal[PRIORITIES] = "balanced"
    target_weight_bits: Literal[WEIGHT_BITS] | None = None


class LoraRank(_Strict):
    """The LoRA ranks the advisor may pick from when it searches a training configuration that fits
    (``lora_rank: {min: 8, max: 32}``): the largest power of two within the bounds that fits wins."""
    min: int = Field(16, ge=1, le=4096)
    max: int = Field(16, ge=1, le=4096)


class Scenario(_Strict):
    name: str = ""
    description: str = ""
    model: Union[str, dict]
    task: Literal[TASKS]
    examples: int = Field(0, ge=0)
    seq_len: int = Field(512, gt=0, le=1_048_576)
    epochs: float = Field(1.0, gt=0, le=1000)
    hardware: Hardware
    deploy: Deploy = Field(default_factory=Deploy)
    goals: Goals = Field(default_factory=Goals)
    symptoms: list[Literal[SYMPTOMS]] = Field(default_factory=list)
    measured: Union[str, list[str]] = "store"
    lora_rank: LoraRank | None = None            # None: the workload's rank (presets/rules/advisor.yaml)

    # ---- resolved views (cached per instance; the scenario is not mutated after parsing) -----
    def arch(self) -> models.ModelArch:
        return _resolve_model(_model_key(self.model))

    def train_device(self) -> hardware.Device:
        return hardware.get(self.hardware.gpu, gpu_only=True)

    def serve_device(self) -> hardware.Device | None:
        """The serving device; None for a hosted API (the provider's hardware)."""
        return None if self.deploy.target == "hosted-api" else hardware.get(self.deploy.gpu)

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")


def _model_key(ref):
    """A hashable form of the model reference, for the resolution cache."""
    if isinstance(ref, dict):
        return ("dict", yaml.safe_dump(ref, sort_keys=True))
    return ("str", ref)


@functools.lru_cache(maxsize=256)
def _resolve_model(key) -> models.ModelArch:
    kind, val = key
    return models.resolve(yaml.safe_load(val) if kind == "dict" else val)


# ---- parsing ---------------------------------------------------------------------------------

_ALLOWED = {
    "": list(Scenario.model_fields),
    "hardware": list(Hardware.model_fields),
    "deploy": list(Deploy.model_fields) + ["device"],
    "goals": list(Goals.model_fields),
    "lora_rank": list(LoraRank.model_fields),
}
_VALUES = {"task": TASKS, "deploy.target": TARGETS, "goals.priority": PRIORITIES,
           "goals.target_weight_bits": WEIGHT_BITS, "symptoms": SYMPTOMS}


def _message(err: dict) -> tuple[str, str]:
    """One pydantic error -> (field path, a message a person can act on)."""
    loc = [str(x) for x in err["loc"]]
    typ = err["type"]
    if typ == "extra_forbidden":
        parent = ".".join(loc[:-1])
        allowed = _ALLOWED.get(parent, [])
        where = f" in {parent}" if parent else ""
        return ".".join(loc), (f"unknown field {loc[-1]!r}{where}; allowed: {', '.join(allowed)}")
    path = ".".join(x for x in loc if not x.isdigit())
    if typ == "missing":
        hints = {"model": "a preset id (e.g. llama-3.1-8b), a local dir, a config.json path, a hub id, "
                          "or {params_b: 13, family: llama-2}",
                 "task": "one of " + ", ".join(TASKS),
                 "hardware": "{gpu: <GPU id>, count: <n>}; GPUs: " + ", ".join(hardware.gpu_ids()),
                 "hardware.gpu": "a GPU id: " + ", ".join(hardware.gpu_ids())}
        return path, f"{path} is required: {hints.get(path, 'give a value')}"
    bounds = {"greater_than_equal": (">=", "ge"), "greater_than": (">", "gt"),
              "less_than_equal": ("<=", "le"), "less_than": ("<", "lt")}
    if typ in bounds:
        op, key = bounds[typ]
        return path, f"{path} must be {op} {err.get('ctx', {}).get(key)}, got {err.get('input')!r}"
    if path in _VALUES and typ in ("literal_error", "enum"):
        return path, (f"{path}: unknown value {err.get('input')!r}; allowed: "
                      + ", ".join(map(str, _VALUES[path])))
    return path, f"{path}: {err['msg']} (got {err.get('input')!r})"


def parse_scenario(data) -> Scenario:
    """Validate a scenario mapping (or pass a Scenario through); resolves model and devices."""
    if isinstance(data, Scenario):
        return data
    if not isinstance(data, dict):
        raise InputError("a scenario must be a mapping (YAML/JSON object) with model, task, examples, "
                         "hardware, deploy, goals", field="scenario")
    dep = data.get("deploy")
    if isinstance(dep, dict) and "device" in dep:     # deploy.device: a synonym of deploy.gpu
        dep = dict(dep)
        dev = dep.pop("device")
        if dep.get("gpu") not in (None, dev):
            raise InputError(f"deploy.gpu {dep['gpu']!r} and deploy.device {dev!r} disagree; give one of them",
                             field="deploy.gpu")
        data = {**data, "deploy": {**dep, "gpu": dev}}
    try:
        sc = Scenario.model_validate(data)
    except ValidationError as e:
        # an unknown field is the most useful thing to report first; then the rest in order
        errs = sorted(e.errors(), key=lambda x: x["type"] != "extra_forbidden")
        field, first = _message(errs[0])
        rest = [_message(x)[1] for x in errs[1:]]
        raise InputError("bad scenario: " + "; ".join([first] + rest), field=field or None)

    if sc.lora_rank is not None and sc.lora_rank.min > sc.lora_rank.max:
        raise InputError(f"lora_rank: min {sc.lora_rank.min} > max {sc.lora_rank.max}", field="lora_rank.min")
    if isinstance(sc.measured, str) and sc.measured.strip().lower() not in MEASURED:
        raise InputError(f"measured: unknown value {sc.measured!r}; allowed: {', '.join(MEASURED)}, "
                         "or a list of run ids", field="measured")
    if isinstance(sc.measured, str):
        sc.measured = sc.measured.strip().lower()
    elif not all(str(x).strip() for x in sc.measured):
        raise InputError("measured: run ids must not be empty", field="measured")

    # the model must resolve (unknown preset, missing dir, size without family ...)
    if isinstance(sc.model, str) and not sc.model.strip():
        raise InputError("model is required: a preset id (e.g. llama-3.1-8b), a local dir, a config.json "
                         "path, a hub id, or {params_b: 13, family: llama-2}", field="model")
    try:
        sc.arch()
    except InputError as e:
        raise InputError(f"model: {e}", field="model")

    # the training GPU must be a GPU preset
    try:
        sc.train_device()
    except InputError:
        raise InputError(f"hardware.gpu: unknown GPU {sc.hardware.gpu!r}; known: {', '.join(hardware.gpu_ids())}",
                         field="hardware.gpu")

    # the serving device: default it, then check it exists and suits the target
    kinds = TARGET_KINDS[sc.deploy.target]
    if sc.deploy.target == "hosted-api":
        if sc.deploy.gpu is not None:
            raise InputError("deploy.gpu: a hosted API runs on the provider's hardware; leave deploy.gpu out "
                             "or choose another deploy.target (" + ", ".join(TARGETS[:4]) + ")",
                             field="deploy.gpu")
        return sc
    suitable = sorted(k for k, d in hardware.devices().items() if d.kind in kinds)
    if sc.deploy.gpu is None:
        sc.deploy.gpu = sc.hardware.gpu if "gpu" in kinds else suitable[0]
    dev = hardware.devices().get(str(sc.deploy.gpu).strip().lower())
    if dev is None or dev.kind not in kinds:
        what = "unknown device" if dev is None else f"{dev.kind} device"
        raise InputError(f"deploy.gpu: {what} {sc.deploy.gpu!r} for target {sc.deploy.target}; "
                         f"known: {', '.join(suitable)}", field="deploy.gpu")
    sc.deploy.gpu = dev.id
    sc.hardware.gpu = sc.train_device().id
    sc.deploy.runtime = _runtimes_of(sc.deploy.runtime, dev)
    return sc


def _runtimes_of(value, dev) -> str | list[str] | None:
    """``deploy.runtime`` checked and normalised: None (search every runtime; ``any`` too), one runtime
    id (fixed), or a list of ids to search among (in the given order, no repeats). Each must be a
    runtime of presets/runtimes.yaml that runs on the serving device."""
    from engine.estimate import runtimes
    if value is None or (isinstance(value, str) and value.strip().lower() == "any"):
        return None
    names = [value] if isinstance(value, str) else list(value)
    if not names:
        raise InputError("deploy.runtime: an empty list; name one runtime, a list of runtimes to search among, "
                         f"or any (known: {', '.join(runtimes.ids())})", field="deploy.runtime")
    out = []
    for name in names:
        try:
            rt = runtimes.get(name)
        except InputError as e:
            raise InputError(f"deploy.runtime: {e}", field="deploy.runtime")
        if not rt.runs_on(dev):
            ok = [r for r in runtimes.ids() if runtimes.get(r).runs_on(dev)]
            raise InputError(f"deploy.runtime: {rt.id} does not run on {dev.id} ({dev.kind}); runtimes there: "
                             f"{', '.join(ok)}", field="deploy.runtime")
        if rt.id not in out:
            out.append(rt.id)
    return out[0] if len(out) == 1 else out


def preset_ids() -> list[str]:
    """The worked examples in presets/scenarios/ (file stems)."""
    return sorted(p.stem for p in (PRESETS_DIR / "scenarios").glob("*.yaml"))


def load_scenario(path: str | Path) -> Scenario:
    """Read a scenario YAML/JSON file, or a preset of presets/scenarios/ by id.

    A relative model path inside the file is taken relative to the file."""
    p = Path(path)
    if not p.is_file():
        if str(path) in preset_ids():
            p = PRESETS_DIR / "scenarios" / f"{path}.yaml"
        else:
            raise InputError(f"scenario file {str(path)!r} not found (presets: {', '.join(preset_ids())})",
                             field="scenario")
    data = load_yaml_file(p, "scenario file", field="scenario")
    if isinstance(data, dict) and isinstance(data.get("model"), str):
        ref = data["model"].strip()
        if ref.lower() not in models.presets() and not Path(ref).expanduser().is_absolute() \
                and (p.parent / ref).exists():
            data = {**data, "model": str((p.parent / ref).resolve())}
    return parse_scenario(data)

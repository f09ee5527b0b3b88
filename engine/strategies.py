"""The strategy catalog of DESIGN.md, as data (presets/strategies.yaml) plus small functions.

Each entry is a pipeline of ``stages`` (what a run executes, read by engine/runs) and the
requests the planner answers for it: ``train`` (estimate train --method), ``deploy`` (estimate
infer --weights) and ``accuracy`` (estimate accuracy; for a strategy whose weights come from a
quantize stage alone it follows from the method registry, ``accuracy_request``). ``traits(s)``
flattens an entry into the facts the advisor's rules match on (family, training method, deployed
bits, scheme, needs calibration, GPU-only ...); what a quantization method or a weights format
implies is read from their registries (engine/quant.py, engine/estimate/formats.py), never
repeated here.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from engine import quant
from engine.errors import InputError, choices
from engine.estimate import formats
from engine.presets import load_yaml
from engine.vocab import (DEFAULT_QAT_SCHEME, LORA_TARGETS, PRECISIONS, QAT_SCHEMES, STAGES,
                          STRATEGY_FAMILIES as FAMILIES, TRAIN_METHODS)

MATURITY = ("established", "research")
HOSTED = "hosted"          # deploy: a provider serves the model (no weights on your hardware)


_REGISTERED: list[dict] = []


def catalog() -> list[dict]:
    """Every strategy, in catalog order (presets/strategies.yaml, then the ones ``register`` added)."""
    return list(load_yaml("strategies.yaml")) + _REGISTERED


def register(entry: dict) -> dict:
    """Add a strategy at run time (an entry shaped as in strategies.yaml, checked); returns it."""
    check_catalog(catalog() + [entry])
    _REGISTERED.append(entry)
    all_traits.cache_clear()
    return entry


def unregister(strategy_id: str) -> None:
    _REGISTERED[:] = [s for s in _REGISTERED if s["id"] != strategy_id]
    all_traits.cache_clear()


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


def multi_process_problem(train_stage: dict) -> str | None:
    """Why a train stage cannot run in several processes (torchrun + FSDP2), or None when it can.
    One rule for the runs layer (which refuses such a launch) and the advisor (whose multi-GPU rows
    say which executor can run them)."""
    from engine.vocab import MULTI_PROCESS_METHODS
    method = train_stage.get("method", "lora")
    if method not in MULTI_PROCESS_METHODS:
        return f"multi-process (FSDP) training runs {', '.join(MULTI_PROCESS_METHODS)} fine-tunes, not {method}"
    if method == "qat" and train_stage.get("lora"):
        return ("QAT + LoRA merges its adapters into the fake-quantized base at the end of training (peft "
                "merge_and_unload on the whole model in one process), which FSDP keeps sharded over the ranks")
    return None


def quantize_methods(s: dict) -> list:
    """The registry entries (engine/quant.py) of the strategy's quantize stages, in pipeline order."""
    return [quant.get(st.get("method")) for st in s["stages"] if st["stage"] == "quantize"]


def accuracy_request(s: dict) -> dict:
    """The accuracy model's request for the served weights: the entry's ``accuracy`` when it has
    one, else what the method registry says for its (last) quantize stage, else 16-bit."""
    if s.get("accuracy"):
        return dict(s["accuracy"])
    st = [st for st in s["stages"] if st["stage"] == "quantize"]
    if st:
        return quant.get(st[-1].get("method")).accuracy_request(st[-1])
    return {"method": "none", "w_bits": 16}


def scheme(s: dict) -> str:
    """Mixed-precision scheme of the served model: W4A16, W8A8, FP8, W16A16 ..."""
    acc = accuracy_request(s)
    w, a = acc.get("w_bits", 16), acc.get("a_bits", 16)
    if s["deploy"] != HOSTED and formats.get(s["deploy"]).tensor_cores == "fp8":
        return "FP8"
    return f"W{w:g}A{a:g}"


def traits(s: dict) -> dict:
    """The facts about a strategy that rules match on (see presets/rules/rules.yaml). Needs
    calibration and GPU-only come from the method registry (its quantize stages), quantized and
    FP8 from the format registry (its deployed format)."""
    acc = accuracy_request(s)
    methods = quantize_methods(s)
    fmt = None if s["deploy"] == HOSTED else formats.get(s["deploy"])
    stages = [st["stage"] for st in s["stages"]]
    return {
        "id": s["id"],
        "family": s["family"],
        "train": s.get("train", "none"),
        "lora": s.get("train") in ("lora", "qlora") or any(st.get("lora") for st in s["stages"]),
        "quantized": bool(fmt and fmt.quantized),
        "w_bits": acc.get("w_bits", 16),
        "a_bits": acc.get("a_bits", 16),
        "scheme": scheme(s),
        "deploy": s["deploy"],
        "calibration": any(m.calibration for m in methods),
        "gpu_only": any(m.gpu_only for m in methods),
        "fp8": bool(fmt and fmt.requires_fp8),
        "merge": "merge" in stages,
        "maturity": s.get("maturity", "established"),
        "pending_stages": list(s.get("pending_stages", [])),
        "runtimes": list(fmt.runtimes) if fmt else [],
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
        for key in ("family", "name", "stages", "deploy", "summary"):
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
        for p in s.get("pending_stages", []):
            if p not in [st["stage"] for st in s["stages"]]:
                raise InputError(f"strategy {sid}: pending stage {p!r} is not one of its stages", field="pending_stages")
        if s["stages"][-1]["stage"] != "evaluate":
            raise InputError(f"strategy {sid}: the last stage must be evaluate", field="stages")
        if s.get("maturity", "established") not in MATURITY:
            raise choices(f"maturity of {sid}", s.get("maturity"), MATURITY)
        for st in s["stages"]:
            if st["stage"] == "quantize":
                quant.get(st.get("method"))                      # an unknown method lists the known
        if s["deploy"] != HOSTED:
            formats.get(s["deploy"])
        ms = quantize_methods(s)
        if s["family"] == "ptq-only" and ms:
            st = [x for x in s["stages"] if x["stage"] == "quantize"][-1]
            made = ms[-1].format_for(quant.settings(st)["bits"])
            if made != s["deploy"]:
                raise InputError(f"strategy {sid}: its quantize stage ({ms[-1].id}) produces {made}, but it deploys "
                                 f"{s['deploy']}", field="deploy")
        if s.get("accuracy") and ("w_bits" not in s["accuracy"] or "method" not in s["accuracy"]):
            raise InputError(f"strategy {sid}: accuracy needs method and w_bits", field="accuracy")
        if not s.get("accuracy") and s["family"] != "ptq-only":
            raise InputError(f"strategy {sid}: accuracy is required (only a PTQ strategy's follows from its "
                             f"quantize method)", field="accuracy")
    return entries


# ---- strategy -> planner requests: the one translator ------------------------------------------------

@dataclass(frozen=True)
class Workload:
    """What a strategy is estimated for besides itself: the training step, the calibration, the
    serving. The advisor builds one from presets/rules/advisor.yaml and the scenario; a run from its
    RunSpec (``from_spec``), so the worker's recorded estimate and the OOM suggestions ask the planner
    for exactly what runs."""
    precision: str = "bf16"
    seq_len: int = 512
    batch_size: int = 4
    grad_ckpt: bool = True
    lora_rank: int = 16
    lora_targets: tuple[str, ...] | None = None     # None: every target the architecture takes
    loss: str = "reference"
    optimizer: str = "adamw"
    grad_accum: int = 1
    train_gpu: str | None = None
    calibration_seq_len: int = 2048
    quantize: tuple = ()                             # a run's quantize overrides, as (key, value) pairs
    serve_batch_size: int = 1
    prompt_len: int = 512
    new_tokens: int = 128
    serve_gpu: str | None = None
    serve_runtime: str | None = None                 # None: the target's / device's default (presets/runtimes.yaml)
    serve_target: str | None = None                  # the scenario's deploy target (decides that default)
    max_ms_per_token: float | None = None            # the latency goal the serving capacity is sized for

    @classmethod
    def from_spec(cls, spec, gpu: str | None) -> "Workload":
        """A run's workload (engine.spec.run.RunSpec) on the device preset ``gpu``: its train
        parameters (an fp32 run is estimated as fp32-amp, the recipe's fp32-weights mode), its
        quantize overrides, its evaluation's prompt and new tokens, calibration on train.seq_len."""
        tp, ev = spec.train, spec.evaluate
        targets = tuple(tp.lora_targets)
        return cls(precision=tp.precision if tp.precision in PRECISIONS else "fp32-amp", seq_len=tp.seq_len,
                   batch_size=tp.batch_size, grad_ckpt=tp.grad_ckpt, lora_rank=tp.lora_rank,
                   lora_targets=None if set(targets) == set(LORA_TARGETS) else targets, loss=tp.loss,
                   optimizer=tp.optimizer, grad_accum=tp.grad_accum, train_gpu=gpu, calibration_seq_len=tp.seq_len,
                   quantize=tuple((k, v) for k, v in spec.quantize.model_dump().items() if v is not None),
                   prompt_len=ev.prompt_len, new_tokens=ev.new_tokens, serve_gpu=gpu,
                   serve_runtime=cls._run_runtime(spec.strategy))

    @staticmethod
    def _run_runtime(strategy_id: str) -> str | None:
        """The runtime a run's evaluation measures: HF generate for the formats transformers loads;
        an exported format (GGUF, .pte) in its own runtime (None: the device's default for it)."""
        try:
            deploy = get(strategy_id)["deploy"]
        except InputError:
            return "transformers"
        if deploy == HOSTED or "transformers" in formats.get(deploy).runtimes:
            return "transformers"
        return None


    def run_train(self) -> dict:
        """The ``train:`` section of a run config that trains exactly as this workload is estimated
        (the inverse of ``from_spec`` for the training step): micro-batch, accumulation, checkpointing,
        optimizer, loss, LoRA rank (and targets), sequence length, precision. ``packing: true``:
        the estimate assumes full-length sequences with no padding, which is what packing gives a
        run whose examples are shorter than ``seq_len``."""
        out = {"seq_len": self.seq_len, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
               "grad_ckpt": self.grad_ckpt, "optimizer": self.optimizer, "loss": self.loss,
               "lora_rank": self.lora_rank, "precision": self.precision, "packing": True}
        if self.lora_targets is not None:
            out["lora_targets"] = list(self.lora_targets)
        return out


def run_config(s: dict, model_ref, w: Workload) -> dict:
    """The run config (engine.spec.run.RunSpec as a dict) of a strategy under a workload: what the
    dashboard's run preview shows and Launch sends for a row of the decision matrix, so the run
    trains with the configuration the advisor estimated (``Workload.from_spec`` of it gives back
    the same planner requests)."""
    out = {"name": f"{s['id']} on {model_ref}", "model": model_ref, "strategy": s["id"]}
    if s.get("train"):
        out["train"] = w.run_train()
    return out


def _stages(s: dict, name: str) -> list[dict]:
    return [st for st in s["stages"] if st["stage"] == name]


def planner_requests(s: dict, model, w: Workload) -> dict[str, dict]:
    """The planner's requests for a strategy under a workload, keyword arguments of
    engine.estimate.estimate_train / estimate_quantize / estimate_merge / estimate_infer /
    estimate_accuracy under the keys train, quantize, merge, infer, accuracy (a key is absent when
    the strategy has no such stage, or serves through a provider; accuracy is always there, method
    "none" for 16-bit weights). ``model`` is a ModelArch or
    anything engine.models.resolve takes. Every parameter the pipeline sets travels: the training
    method the memory follows (``train_estimate``), its QAT scheme, the loss, the optimizer and
    gradient accumulation, the LoRA rank and targets, the quantize stage's bits, group size and samples (a run's overrides on top), the group
    size of the served format."""
    from engine import models
    arch = models.resolve(model)
    out: dict[str, dict] = {}
    if s.get("train"):
        method = s.get("train_estimate", s["train"])
        st = (_stages(s, "train") or [{}])[0]
        kw = dict(model=arch, method=method, precision=w.precision, seq_len=w.seq_len, batch_size=w.batch_size,
                  grad_ckpt=w.grad_ckpt, lora_rank=w.lora_rank, gpu=w.train_gpu, loss=w.loss)
        if method == "qat":
            kw["qat_scheme"] = st.get("scheme", DEFAULT_QAT_SCHEME)
        if method in ("lora", "qlora") and w.lora_targets is not None:
            kw["lora_targets"] = list(w.lora_targets)
        if w.optimizer != "adamw":
            kw["optimizer"] = w.optimizer
        if w.grad_accum != 1:
            kw["grad_accum"] = w.grad_accum
        out["train"] = kw
    made = None                                      # the quantize settings that made the served weights
    for st in _stages(s, "quantize"):
        qs = quant.settings({**st, **dict(w.quantize)})
        made = qs
        if quant.get(qs["method"]).calibration and "quantize" not in out:
            out["quantize"] = dict(model=arch, method=qs["method"], bits=qs["bits"], group_size=qs["group_size"],
                                   calibration_samples=qs["calibration_samples"], seq_len=w.calibration_seq_len,
                                   gpu=w.train_gpu)
    if _stages(s, "merge"):
        out["merge"] = dict(model=arch, base="bf16", gpu=w.train_gpu)
    if s["deploy"] != HOSTED:
        kw = dict(model=arch, weights=s["deploy"], batch_size=w.serve_batch_size, prompt_len=w.prompt_len,
                  new_tokens=w.new_tokens, gpu=w.serve_gpu)
        for key, val in (("runtime", w.serve_runtime), ("target", w.serve_target),
                         ("max_ms_per_token", w.max_ms_per_token)):
            if val is not None:
                kw[key] = val
        fmt = formats.get(s["deploy"])
        train = (_stages(s, "train") or [{}])[0]
        group = (made or {}).get("group_size")
        if train.get("method") == "qat":             # convert turns the QAT model into the served format
            group = train.get("group_size") or QAT_SCHEMES[train.get("scheme", DEFAULT_QAT_SCHEME)]["group_size"]
        if fmt.grouped and group and group != fmt.group_size:
            kw["group_size"] = group
        out["infer"] = kw
    acc = accuracy_request(s)
    out["accuracy"] = dict(family=arch.family, params_b=round(arch.total_params / 1e9, 3), method=acc["method"],
                           w_bits=float(acc["w_bits"]), a_bits=float(acc.get("a_bits", 16)),
                           group_size=acc.get("group_size"), per_channel=bool(acc.get("per_channel", False)),
                           finetune=acc.get("finetune", "none"),
                           **({"act_granularity": acc["act_granularity"]} if acc.get("act_granularity") else {}))
    return out

"""One strategy assessed for one scenario: the planner's estimate of every stage (train, quantize,
merge, serve), accuracy (the prior, or the user's own measurement), cost, and the hard
constraints that hold or block (memory, latency, accuracy, bits, data, format, deploy)."""
from __future__ import annotations

import collections
import contextlib
import contextvars
import dataclasses
import functools
import json
import math

from engine import estimate, strategies
from engine.advisor.rules import settings
from engine.estimate import correction, cost, formats, memory
from engine.errors import InputError
from engine.fmt import GB, gb
from engine.vocab import OPTIMIZER_NAMES
from engine.spec.scenario import Scenario

# ---- planner calls (cached: estimates are pure functions of their inputs) ---------------------

PLANNER = {"estimate_train": estimate.estimate_train, "estimate_infer": estimate.estimate_infer,
           "estimate_quantize": estimate.estimate_quantize, "estimate_merge": estimate.estimate_merge,
           "estimate_accuracy": estimate.estimate_accuracy, "train_cost": cost.train_cost,
           "calibration_cost": cost.calibration_cost, "serving_cost": cost.serving_cost}


@functools.lru_cache(maxsize=8192)
def _call(fn: str, kwargs: tuple, calibration_state: tuple):
    """One planner request; an InputError is a result too (the planner refused: say why).
    ``calibration_state`` (the fitted file in force and its mtime) is part of the key: a refit
    or TUNEQUANT_CALIBRATION changing must not leave figures of the old fit in the cache."""
    kw = dict(kwargs)
    if isinstance(kw.get("measured"), str):          # measured rows travel as JSON text (hashable)
        kw["measured"] = json.loads(kw["measured"])
    try:
        return json.dumps(PLANNER[fn](**kw), default=str)
    except InputError as e:
        return json.dumps({"error": str(e)})


_PINNED: contextvars.ContextVar = contextvars.ContextVar("calibration_state", default=None)


def calibration_state() -> tuple:
    """The calibration in force (correction.state(): the fitted file and its mtime), read once per
    recommend() while ``pinned`` holds it (a stat and a path resolution per planner call cost more
    than the cached call itself)."""
    s = _PINNED.get()
    return s if s is not None else correction.state()


@contextlib.contextmanager
def pinned():
    """Hold the calibration state for the duration of one answer (recommend and its what-if re-ranks)."""
    token = _PINNED.set(correction.state())
    try:
        yield
    finally:
        _PINNED.reset(token)


def _estimate(fn: str, **kw) -> dict:
    """A planner result the caller owns: decoded afresh from the cached JSON text, so no caller
    can change what the cache holds (and faster than a deep copy)."""
    key = tuple(sorted(((k, tuple(v) if isinstance(v, list) else v) for k, v in kw.items()), key=lambda kv: kv[0]))
    return json.loads(_call(fn, key, calibration_state()))


class Frozen:
    """A hashable input of a search cache with its hash computed once (a ModelArch hashes slowly:
    dozens of fields, hashed again on every lookup of a key that holds it)."""
    __slots__ = ("value", "_hash")

    def __init__(self, value):
        self.value, self._hash = value, hash(value)

    def __hash__(self):
        return self._hash

    def __eq__(self, other):
        return isinstance(other, Frozen) and (self.value is other.value or self.value == other.value)


_SEARCHES: collections.OrderedDict = collections.OrderedDict()
SEARCH_CACHE_SIZE = 4096


def _memo(key: tuple, compute):
    """The per-strategy searches (training configuration, serving configuration) cached by their
    frozen inputs: the strategy (as JSON), the model, the workload, the devices, the settings, the
    scenario fields the search reads and the calibration state. A warm recompute after an input the
    search does not read (examples, symptoms, an accuracy goal) decodes one result per strategy
    instead of re-running 18 training and up to 3 serving estimates. Least recently used dropped."""
    hit = _SEARCHES.get(key)
    if hit is not None:
        _SEARCHES.move_to_end(key)
        return hit
    val = compute()
    _SEARCHES[key] = val
    if len(_SEARCHES) > SEARCH_CACHE_SIZE:
        _SEARCHES.popitem(last=False)
    return val


SERVE_FIELDS = ("serve_batch_size", "prompt_len", "new_tokens", "serve_gpu", "serve_runtime", "serve_target",
                "max_ms_per_token")


def search_key(sc: Scenario, ctx: dict) -> tuple:
    """What every search of one ranking shares (set once per _rank as ctx['key']): the model, the
    settings, the calibration in force."""
    return (Frozen(ctx["arch"]), json.dumps(ctx["settings"], sort_keys=True, default=str), calibration_state())


def _train_workload(w: strategies.Workload) -> strategies.Workload:
    """The workload without its serving fields: what the training search reads (a new latency goal
    must not re-run it)."""
    return dataclasses.replace(w, **{f: strategies.Workload.__dataclass_fields__[f].default for f in SERVE_FIELDS})


def _strategy_key(s: dict) -> str:
    return json.dumps(s, sort_keys=True, default=str)


def _cli(kind: str, model_name: str, kw: dict) -> str:
    """The CLI request equivalent to a planner call: where a number comes from."""
    flags = []
    for k, v in kw.items():
        if k == "model" or v is None:
            continue
        flag = "--" + k.replace("_", "-")
        v = ",".join(v) if isinstance(v, (list, tuple)) else v
        flags.append(flag if v is True else f"--no-{flag[2:]}" if v is False else f"{flag} {v}")
    return f"estimate {kind} --model {model_name} " + " ".join(flags)


# ---- one strategy ---------------------------------------------------------------------------

def _fits_text(st: dict) -> str:
    """'12.8 GB [11.8, 15.3] of 25.4 GB (51%)', and a warning when the interval's high end does not fit."""
    lo, hi = st.get("device_low"), st.get("device_high")
    txt = (f"{gb(st['device_bytes'])}" + (f" [{lo / GB:.1f}, {hi / GB:.1f}]" if lo and hi else "")
           + f" of {gb(st['limit_bytes'])} ({100 * st['device_bytes'] / st['limit_bytes']:.0f}%)")
    if hi and hi > st["limit_bytes"]:
        txt += "; the high end of the interval does not fit"
    return txt


def replicated_base_bytes(est: dict, arch) -> int:
    """Bytes of the frozen base that FSDP leaves whole on every rank: a 4-bit base (QLoRA's
    bitsandbytes ``Params4bit``, ignored by FSDP2 in engine/runs/stages/fsdp.py because sharding
    loses their quantization state): its packed block linears and their quantization constants,
    as the planner counted them in the ``weights`` part. 0 for a 16-bit base (FSDP shards it)."""
    inp = est.get("inputs") or {}
    try:
        rc = memory.recipe(inp.get("method", "lora"), inp.get("precision", "bf16"))
    except InputError:
        return 0
    if not rc.base_4bit:
        return 0
    wb = formats.weights_breakdown(arch, "nf4", dense_bytes=rc.dense)      # as memory.train_memory counts it
    return wb["block_linears"] + wb["quant_scales"]


def _shard(est: dict, count: int, arch) -> dict:
    """Per-GPU memory of a training step on ``count`` GPUs under FSDP full sharding.

    The one rule for the advisor's multi-GPU rows and a multi-process run's recorded per-rank
    estimate (engine/runs/worker.py). The planner's breakdown names each part; model states
    (settings multi_gpu.sharded_parts) are divided by the GPU count, except a 4-bit base's packed
    linears (``replicated_base_bytes``: whole on every rank, as the engine runs QLoRA); every
    other part (activations, logits and loss, the layer being recomputed, workspaces) stays whole
    on each GPU, and FSDP's gathered layers (the sharded parameters of ``gathered_layers``
    blocks: their 16-bit weights, or a 4-bit base's adapters) are added."""
    peak, device = est["peak_allocated_bytes"], est["device_bytes"]
    lo, hi = est.get("device_low", device), est.get("device_high", device)
    if count == 1:
        return {"peak_allocated_bytes": peak, "device_bytes": device, "device_low": lo, "device_high": hi,
                "breakdown": est.get("breakdown", {}), "sharding": "single GPU"}
    mg = settings()["multi_gpu"]
    breakdown = dict(est.get("breakdown") or {})
    whole = replicated_base_bytes(est, arch) if "weights" in breakdown else 0
    if whole:
        breakdown["weights"] -= whole
    parts = {name: (b / count if name in mg["sharded_parts"] else b) for name, b in breakdown.items()}
    if whole:
        parts["replicated_4bit_base"] = whole
        gathered = mg["gathered_layers"] * breakdown.get("adapters", 0) / max(arch.num_layers, 1)
        what = "layers' adapters"
    else:
        gathered = mg["gathered_layers"] * arch.linear_params_per_layer * 2
        what = "16-bit layers"
    parts["fsdp_gathered_layers"] = gathered
    per_peak = sum(parts.values())
    # the CUDA context stays whole on each GPU; the allocator slack is a fraction of each GPU's peak
    ctx = est.get("cuda_context_bytes", 0)
    frac = est.get("allocator_slack_bytes", device - peak - ctx) / peak if peak else 0.0
    per_device = per_peak * (1 + frac) + ctx
    scale = per_device / device          # the planner's interval, scaled with the sharded total
    return {"peak_allocated_bytes": per_peak, "device_bytes": per_device, "device_low": lo * scale,
            "device_high": hi * scale, "breakdown": parts,
            "sharding": f"{mg['scheme']} over {count} GPUs: model states / {count}"
                        + (f" except the 4-bit base ({gb(whole)}, whole on every GPU)" if whole else "")
                        + f", activations per GPU, +{gb(gathered)} for {mg['gathered_layers']} gathered {what}"}


def launch_plan(train_stage: dict, count: int, per_gpu_bytes: float, device_id: str) -> dict:
    """How a multi-GPU training row would run: processes, sharding, per-GPU memory, the
    interconnect assumed, and which executor can run it (or why none can)."""
    mg = settings()["multi_gpu"]
    why = strategies.multi_process_problem(train_stage)
    plan = {"processes": count, "sharding": mg["scheme"], "per_gpu_bytes": per_gpu_bytes, "gpu": device_id,
            "interconnect": mg["interconnect"], "resources": {"gpus": count}, "executors": []}
    if why:
        plan["not_runnable"] = f"{why}: over {count} GPUs this is an estimate only, no executor of this engine runs it"
    elif count > mg["gpus_per_node"]:
        plan["not_runnable"] = (f"{count} GPUs is more than one machine holds ({mg['gpus_per_node']}); the engine "
                                "shards within one machine (torchrun --standalone)")
    else:
        plan["executors"] = [f"local: torchrun on a machine with {count} GPUs (run spec resources: {{gpus: {count}}})",
                              f"ray: the same run as a job on a Ray cluster node with {count} GPUs "
                              "(--executor ray --address ADDR)"]
    return plan


def workload(sc: Scenario, cfg: dict, train_device, serve_device) -> strategies.Workload:
    """What the advisor estimates every strategy for: presets/rules/advisor.yaml's workload with the
    scenario's sequence length, on its training and serving devices."""
    w = cfg["workload"]
    return strategies.Workload(
        precision=w["train"]["precision"], seq_len=sc.seq_len, batch_size=w["train"]["batch_size"],
        grad_ckpt=w["train"]["grad_ckpt"], lora_rank=w["train"]["lora_rank"], loss=w["train"].get("loss", "reference"),
        train_gpu=train_device.id, calibration_seq_len=w["calibration"]["seq_len"],
        serve_batch_size=w["serve"]["batch_size"], prompt_len=w["serve"]["prompt_len"],
        new_tokens=w["serve"]["new_tokens"], serve_gpu=serve_device.id if serve_device else None,
        serve_runtime=sc.deploy.runtime if isinstance(sc.deploy.runtime, str) else None, serve_target=sc.deploy.target if serve_device else None,
        max_ms_per_token=sc.goals.max_latency_ms_per_token)


def requests(s: dict, ctx: dict) -> dict[str, dict]:
    """The planner requests of one strategy (engine.strategies.planner_requests: the one translator,
    which the worker's recorded estimate and the OOM suggestions use too)."""
    return strategies.planner_requests(s, ctx["arch"], ctx["workload"])


def _train_candidates(s: dict, sc: Scenario, ctx: dict) -> list[list[strategies.Workload]]:
    """The training configurations to try, in groups by LoRA rank (largest first), each group in
    the order that breaks ties: micro-batch (largest first) with the accumulation that keeps the
    effective batch, gradient checkpointing, optimizer (presets/rules/advisor.yaml ``search``)."""
    w = ctx["workload"]
    search = ctx["settings"]["workload"].get("search") or {}
    eff = w.batch_size * w.grad_accum
    micro = [b for b in range(eff, 0, -1) if eff % b == 0]
    ckpts = search.get("grad_ckpt") or [w.grad_ckpt]
    opts = search.get("optimizers") or [w.optimizer]
    method = s.get("train_estimate", s.get("train"))
    if method in ("lora", "qlora") and sc.lora_rank is not None:
        lo, hi = sc.lora_rank.min, sc.lora_rank.max
        ranks = sorted({lo, hi} | {2 ** k for k in range(13) if lo <= 2 ** k <= hi}, reverse=True)
    else:
        ranks = [w.lora_rank]
    return [[dataclasses.replace(w, batch_size=b, grad_accum=eff // b, grad_ckpt=ck, optimizer=o, lora_rank=r)
             for b in micro for ck in ckpts for o in opts] for r in ranks]


def config_text(w: strategies.Workload, method: str) -> str:
    """'micro-batch 1 x 4 accumulation, gradient checkpointing, paged 8-bit AdamW, LoRA rank 16'."""
    parts = [f"micro-batch {w.batch_size} x {w.grad_accum} accumulation" if w.grad_accum > 1
             else f"batch {w.batch_size}",
             "gradient checkpointing" if w.grad_ckpt else "no gradient checkpointing",
             OPTIMIZER_NAMES.get(w.optimizer, w.optimizer)]
    if method in ("lora", "qlora"):
        parts.append(f"LoRA rank {w.lora_rank}")
    return ", ".join(parts)


def _stage_train(s, sc, arch, ctx, kw) -> dict:
    """The training step, at the fastest configuration that fits (``_train_search``, cached by its
    inputs), with the time and cost of the scenario's examples on it."""
    bounds = (sc.lora_rank.min, sc.lora_rank.max) if sc.lora_rank is not None else None
    key = ("train", _strategy_key(s), ctx.get("key") or search_key(sc, ctx), _train_workload(ctx["workload"]),
           ctx["train_device"].id, sc.hardware.count, bounds)
    text, w = _memo(key, lambda: _train_search(s, sc, arch, ctx, kw))
    out = json.loads(text)
    if w is not None:                   # the chosen training knobs with this scenario's serving fields
        out["workload"] = dataclasses.replace(w, **{f: getattr(ctx["workload"], f) for f in SERVE_FIELDS})
    if out.get("error"):
        return out
    tokens = sc.examples * sc.seq_len * sc.epochs
    total_tps = out["tokens_per_s"]
    out.update(tokens=tokens, time_s=tokens / total_tps if total_tps else None)
    if tokens and total_tps:
        out["cost"] = _estimate("train_cost", tokens=tokens, tokens_per_s=total_tps, gpu=out["device"],
                                gpu_count=sc.hardware.count)
    return out


def _train_search(s, sc, arch, ctx, kw) -> tuple[str, strategies.Workload | None]:
    """The training configurations tried (``_train_candidates``; the translator's request of the
    scenario's workload is the default it is compared with) and the fastest that fits: the stage
    as JSON text (pure in the inputs of ``_stage_train``'s key) and the chosen Workload."""
    method = kw["method"]
    tdev, count = ctx["train_device"], sc.hardware.count
    limit = tdev.memory_bytes
    base = _estimate("estimate_train", **kw)
    out = {"stage": "train", "method": method, "device": tdev.id, "count": count}
    if s.get("estimate_note"):
        out["note"] = s["estimate_note"]
    if "error" in base:
        return json.dumps({**out, "source": _cli("train", arch.name, kw),
                           "request": {k: v for k, v in kw.items() if k != "model"},
                           "error": base["error"], "fits": False}), None
    base_tps = base.get("tokens_per_s") or 0.0
    tried, chosen = [], None
    for group in _train_candidates(s, sc, ctx):
        fits = []
        for w in group:
            req = strategies.planner_requests(s, arch, w)["train"]
            est = _estimate("estimate_train", **req)
            if "error" in est:
                continue
            item = {"w": w, "req": req, "est": est, "per": _shard(est, count, arch),
                    "tps": est.get("tokens_per_s") or 0.0}
            tried.append(item)
            if item["per"]["device_bytes"] <= limit:
                fits.append(item)
        if fits:
            best = max(x["tps"] for x in fits)            # within 2% counts as equal: the earlier in the order
            chosen = next(x for x in fits if x["tps"] >= 0.98 * best)
            break
    if not tried:
        return json.dumps({**out, "source": _cli("train", arch.name, kw),
                           "request": {k: v for k, v in kw.items() if k != "model"},
                           "error": "no training configuration could be estimated", "fits": False}), None
    fits = chosen is not None
    if not fits:
        chosen = min(reversed(tried), key=lambda x: x["per"]["device_bytes"])   # equals: the most frugal
    w, kw, est, per = chosen["w"], chosen["req"], chosen["est"], chosen["per"]
    src = _cli("train", arch.name, kw)
    desc = config_text(w, method)
    default = ctx["workload"]
    ratio = base_tps / chosen["tps"] if chosen["tps"] else None
    same = (w == default)
    if same:
        speed = "the default configuration fits and is the fastest that does"
    elif ratio is None:
        speed = ""
    elif ratio >= 1.005:
        speed = f"{ratio:.1f}x slower than {config_text(default, method).split(',')[0]}" if ratio >= 1.05 \
            else f"as fast as {config_text(default, method).split(',')[0]}"
    else:
        speed = f"{1 / ratio:.1f}x faster than the default ({config_text(default, method)})"
    out.update(source=src, request={k: v for k, v in kw.items() if k != "model"},
               config={"batch_size": w.batch_size, "grad_accum": w.grad_accum,
                       "effective_batch": w.batch_size * w.grad_accum, "grad_ckpt": w.grad_ckpt,
                       "optimizer": w.optimizer, "loss": w.loss, "lora_rank": w.lora_rank,
                       "text": desc, "default": same, "tried": len(tried), "speed": speed,
                       "speed_vs_default": round(ratio, 3) if ratio else None,
                       "default_device_bytes": _shard(base, count, arch)["device_bytes"],
                       "default_tokens_per_s": base_tps * count * (
                           ctx["settings"]["multi_gpu"]["scaling_efficiency"] if count > 1 else 1.0)},
               run_train=w.run_train())
    if kw["loss"] != "reference":         # the engine beats DESIGN.md's recipe: say by how much
        ref = _estimate("estimate_train", **{**kw, "loss": "reference"})
        if "error" not in ref:
            ref_dev = _shard(ref, count, arch)["device_bytes"]
            out["reference_device_bytes"] = ref_dev
            if ref_dev > per["device_bytes"]:
                said = (f"with the engine's chunked loss; the reference recipe (full fp32 logits) needs "
                        f"{gb(ref_dev)}" + ("" if ref_dev <= tdev.memory_bytes else ", which does not fit"))
                out["note"] = f"{out['note'].rstrip('.')}; {said}" if out.get("note") else said
    eff = ctx["settings"]["multi_gpu"]["scaling_efficiency"] if count > 1 else 1.0
    tps = est.get("tokens_per_s") or 0.0
    total_tps = tps * count * eff
    if est.get("calibration") is not None:
        out["calibration"] = est["calibration"]
    if count > 1:
        entry = next((st for st in s["stages"] if st.get("stage") == "train"), {})
        out["launch"] = launch_plan({"method": method, **entry}, count, per["device_bytes"], tdev.id)
    if est.get("paging"):
        out["paging"] = est["paging"]
    out.update(per, limit_bytes=limit, fits=fits, tokens_per_s=total_tps,
               low_bytes=est.get("low"), high_bytes=est.get("high"))
    return json.dumps(out, default=str), w


def _stage_quantize(s, sc, arch, ctx, kw) -> dict:
    """A method that calibrates (GPTQ/AWQ: the registry's ``calibration``) runs layer by layer on one
    training GPU; the data-free ones (bitsandbytes, torchao) quantize while loading or in place
    (their memory is the served model's, checked at serve: the translator asks for no estimate)."""
    tdev = ctx["train_device"]
    est = _estimate("estimate_quantize", **kw)
    out = {"stage": "quantize", "method": kw["method"], "bits": kw["bits"], "device": tdev.id,
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


def _stage_merge(s, sc, arch, ctx, kw) -> dict:
    tdev = ctx["train_device"]
    est = _estimate("estimate_merge", **kw)
    out = {"stage": "merge", "device": tdev.id, "source": _cli("merge", arch.name, kw)}
    if "error" in est:
        return {**out, "error": est["error"], "fits": None}
    fits = est.get("device_bytes", 0) <= tdev.memory_bytes
    out.update(peak_allocated_bytes=est.get("peak_allocated_bytes"), device_bytes=est.get("device_bytes"),
               breakdown=est.get("breakdown", {}), limit_bytes=tdev.memory_bytes, fits=fits, time_s=est.get("time_s"))
    if not fits:
        out["note"] = "does not fit the GPU: merge on the CPU instead (needs the 16-bit model in RAM); not blocking"
    return out


def serve_candidates(s: dict, sc: Scenario, sdev) -> list[str]:
    """The runtimes the serving search tries for a strategy (docs/advisor.md "Serving configuration
    search"): the scenario's one named runtime alone; else those of its list (in its order), or,
    left open, every runtime of presets/runtimes.yaml, the target's default first (it wins ties),
    then in the format's ``runtimes`` order; only those that run on the serving device and load the
    strategy's format."""
    from engine.estimate import runtimes
    f = formats.get(s["deploy"])
    spec = sc.deploy.runtime
    if isinstance(spec, str):
        return [spec] if spec in f.runtimes else []
    if spec:                                            # a list: in its order (the first wins ties)
        order = list(spec)
    else:
        default, _ = runtimes.default_runtime(sdev, sc.deploy.target)
        order = [default] + list(f.runtimes)
    out = []
    for rid in order:
        if rid in f.runtimes and rid in runtimes.runtimes() and runtimes.get(rid).runs_on(sdev) and rid not in out:
            out.append(rid)
    return out


def _serve_option(s, sc, arch, ctx, rid: str) -> dict:
    """One serving configuration: the strategy's format in runtime ``rid`` at the workload's batch
    (1), with the runtime's capacity at the latency goal (the largest batch meeting it) and its price."""
    sdev = ctx["serve_device"]
    w = ctx["settings"]["workload"]["serve"]
    kw = strategies.planner_requests(s, arch, dataclasses.replace(ctx["workload"], serve_runtime=rid))["infer"]
    est = _estimate("estimate_infer", **kw)
    out = {"stage": "serve", "weights": s["deploy"], "device": sdev.id, "runtime": rid,
           "source": _cli("infer", arch.name, kw)}
    if "error" in est:
        return {**out, "error": est["error"], "fits": False}
    tps = est.get("decode_tokens_per_s")
    slow, fast = est.get("decode_tokens_per_s_low"), est.get("decode_tokens_per_s_high")
    if est.get("calibration") is not None:
        out["calibration"] = est["calibration"]
    # a runtime that reserves memory (vLLM) holds more than the model needs: the strategy is judged
    # (and compared) on what it needs; the reservation stays in reserved_bytes
    need = est.get("required_bytes", est.get("device_bytes"))
    out.update(weights_bytes=est.get("weights_bytes"), peak_allocated_bytes=est.get("peak_allocated_bytes"),
               device_bytes=need, reserved_bytes=est.get("device_bytes"),
               device_low=est.get("device_low") if "required_bytes" not in est else need,
               device_high=est.get("device_high") if "required_bytes" not in est else need,
               breakdown=est.get("breakdown", {}),
               limit_bytes=sdev.memory_bytes, fits=bool(est.get("fits")) if "required_bytes" in est
               else est.get("device_bytes", 0) <= sdev.memory_bytes,
               prefill_s=est.get("prefill_s"), decode_tokens_per_s=tps,
               decode_ms_per_token=1000.0 / tps if tps else None,
               decode_ms_per_token_low=1000.0 / fast if fast else None,
               decode_ms_per_token_high=1000.0 / slow if slow else None,
               batch_size=kw["batch_size"])
    cap = est.get("serving") or {}
    out["capacity"] = {k: cap.get(k) for k in ("batch", "tokens_per_s", "usd_per_million_tokens", "why")}
    if cap.get("usd_per_million_tokens") is not None:
        # the runtime's serving capacity: the largest batch meeting the latency goal, priced
        out["cost"] = {"usd_per_million_tokens": cap["usd_per_million_tokens"], "batch_size": cap["batch"],
                       "tokens_per_s": cap["tokens_per_s"], "gpu": sdev.id, "formula": cap.get("why", "")}
    elif tps and sdev.price_per_hour:
        out["cost"] = _estimate("serving_cost", decode_tokens_per_s_per_sequence=tps,
                                batch_size=w["batch_size"], gpu=sdev.id,
                                max_latency_ms_per_token=sc.goals.max_latency_ms_per_token)
    return out


def _pessimistic(o: dict, by: str) -> float:
    """What the search compares: the slow end of the decode interval (by latency), or the serving
    price at that end (by cost: the price scales with 1 / tokens/s). A runtime whose speed terms are
    priors on this device kind has the wider interval, so it must be faster by more to win."""
    ms, hi = o.get("decode_ms_per_token"), o.get("decode_ms_per_token_high")
    if by == "cost":
        usd = (o.get("cost") or {}).get("usd_per_million_tokens")
        if usd is None:
            return math.inf
        return usd * (hi / ms if ms and hi else 1.0)
    return hi or ms or math.inf


def _stage_serve(s, sc, arch, ctx, cands: list[str]) -> dict:
    """The serving search (``_serve_search``), cached by its inputs."""
    rt = sc.deploy.runtime
    key = ("serve", _strategy_key(s), repr(formats.get(s["deploy"])), ctx.get("key") or search_key(sc, ctx),
           ctx["workload"], ctx["serve_device"].id, tuple(cands),
           tuple(rt) if isinstance(rt, list) else rt, sc.goals.priority, sc.goals.max_latency_ms_per_token)
    return json.loads(_memo(key, lambda: json.dumps(_serve_search(s, sc, arch, ctx, cands), default=str)))


def _serve_search(s, sc, arch, ctx, cands: list[str]) -> dict:
    """The serving configuration: every candidate runtime (``serve_candidates``) estimated; of those
    that fit the device and meet the latency goal, the best by the priority (cost: the cheapest per
    million tokens; accuracy, balanced: the fastest per token), compared at the pessimistic end of
    their intervals, within 2% counting as equal (the earlier candidate wins: the target's default).
    None meets the goals: the fastest that fits (latency blocks), else the smallest (memory blocks)."""
    sdev, goal = ctx["serve_device"], sc.goals.max_latency_ms_per_token
    opts = [_serve_option(s, sc, arch, ctx, rid) for rid in cands]
    ok = [o for o in opts if not o.get("error")]
    if not ok:
        return opts[0]
    fit = [o for o in ok if o["fits"]]
    meet = [o for o in fit if goal is None or (o["decode_ms_per_token"] is not None and o["decode_ms_per_token"] <= goal)]
    by = "cost" if sc.goals.priority == "cost" and any((o.get("cost") or {}).get("usd_per_million_tokens")
                                                         for o in meet) else "latency"
    if meet:
        best = min(_pessimistic(o, by) for o in meet)
        chosen = next(o for o in meet if _pessimistic(o, by) <= 1.02 * best)
        outcome = "meets"
    elif fit:
        chosen = min(fit, key=lambda o: o["decode_ms_per_token"] or math.inf)
        outcome = "fastest"
    else:
        chosen = min(ok, key=lambda o: o["device_bytes"] or math.inf)
        outcome = "smallest"
    out = dict(chosen)
    fixed = isinstance(sc.deploy.runtime, str)
    tried = [{"runtime": o["runtime"], "fits": o["fits"], "device_bytes": o.get("device_bytes"),
              "ms_per_token": o.get("decode_ms_per_token"), "ms_per_token_high": o.get("decode_ms_per_token_high"),
              "meets_latency": goal is None or (o.get("decode_ms_per_token") or math.inf) <= goal,
              "max_batch_within_goal": (o.get("capacity") or {}).get("batch"),
              "usd_per_million_tokens": (o.get("cost") or {}).get("usd_per_million_tokens"),
              **({"error": o["error"]} if o.get("error") else {})} for o in opts]
    ms = out.get("decode_ms_per_token")
    cap = out.get("capacity") or {}
    usd = (out.get("cost") or {}).get("usd_per_million_tokens")
    n_cap = cap.get("batch")
    text = (f"served with {out['runtime']} {s['deploy']} at batch {out['batch_size']}: "
            + (f"{ms:.1f} ms/token" if ms is not None else "not estimated")
            + (f" of {goal:g}" if goal is not None else "")
            + (f"; up to {n_cap} concurrent sequence{'s' if n_cap != 1 else ''}"
               + (" within the goal" if goal is not None else "") if n_cap else "")
            + (f" ({usd:,.2f} USD per million tokens)" if usd is not None else ""))
    if fixed:
        why = short = "given"
    elif len(opts) == 1:
        why = short = f"the only runtime that loads {s['deploy']} on {sdev.id}" + (
            f" of deploy.runtime: {', '.join(sc.deploy.runtime)}" if sc.deploy.runtime else "")
    else:
        unit = "USD per million tokens" if by == "cost" else "ms/token"

        def fig(o):
            if o.get("error"):
                return f"{o['runtime']}: {o['error']}"
            c, p = ((o.get("cost") or {}).get("usd_per_million_tokens"), _pessimistic(o, "cost")) if by == "cost" \
                else (o["decode_ms_per_token"], _pessimistic(o, "latency"))
            f = "{:.3f}" if by == "cost" else "{:.1f}"
            return (f"{o['runtime']} " + (f.format(c) if c is not None else "unpriced")
                    + (f" [{f.format(p)}]" if c is not None and p != c and math.isfinite(p) else "")
                    + ("" if o["fits"] else ", does not fit")
                    + ("" if goal is None or not o["fits"] or (o["decode_ms_per_token"] or math.inf) <= goal
                       else ", misses the goal"))
        crit = {"meets": ("the cheapest" if by == "cost" else "the fastest")
                         + " at the pessimistic end of its interval [in brackets] that meets the goals",
                "fastest": "the fastest that fits (none meets the latency goal)",
                "smallest": "the smallest (none fits)"}[outcome]
        short = f"{crit.split(' [')[0].split(' (')[0]} of {len(opts)} runtimes tried"
        why = f"{crit}, of {len(opts)} runtimes tried ({unit}: " + "; ".join(fig(o) for o in opts) + ")"
    out.update(runtime_why=short, config={"runtime": out["runtime"], "weights": s["deploy"],
                                        "batch_size": out.get("batch_size"), "ms_per_token": ms,
                                        "goal_ms_per_token": goal, "max_batch_within_goal": cap.get("batch"),
                                        "usd_per_million_tokens": usd, "searched": not fixed,
                                        "chosen_by": by if outcome == "meets" else outcome, "tried": tried,
                                        "text": text, "why": why})
    return out


def _accuracy(s, sc, arch, ctx, kw) -> dict:
    """The accuracy prior of a strategy (the accuracy model, pulled by measured runs of other
    strategies of the same method on this model), replaced by the newest run of this very
    strategy on this model when there is one (``measured``; the prior stays under ``prior``)."""
    from engine.estimate.accuracy import measured_accuracy    # the accuracy model loads on first use
    a = strategies.accuracy_request(s)
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

    # stages this engine cannot run yet: advice stands, a run has to wait for them
    if s.get("pending_stages"):
        reasons.append({"kind": "estimate", "ok": None, "constraint": "runs",
                        "text": f"the engine cannot run its {', '.join(s['pending_stages'])} stage yet: "
                                "estimated and ranked, but not launchable here"})

    # data: training needs labelled examples
    if t["train"] != "none" and sc.examples == 0:
        block("data", "no labelled examples to train on (examples: 0)", value=0, limit=1)

    # stages in pipeline order, each with its planner request (engine.strategies.planner_requests)
    reqs = requests(s, ctx)
    asked = set()
    for st in s["stages"]:
        kind = {"train": "train", "quantize": "quantize", "merge": "merge"}.get(st["stage"])
        est = None
        if kind in reqs and kind not in asked:
            asked.add(kind)
            est = {"train": _stage_train, "quantize": _stage_quantize, "merge": _stage_merge}[kind](
                s, sc, arch, ctx, reqs[kind])
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
        elif est["fits"] is False and est["stage"] == "train" and est.get("config"):
            c = est["config"]
            block("memory", f"{where}: needs {gb(est['device_bytes'])} per GPU > {gb(est['limit_bytes'])} even at "
                            f"the smallest of {c['tried']} configurations tried ({c['text']}) ({est['source']})",
                  stage=est["stage"], value=est["device_bytes"], limit=est["limit_bytes"])
        elif est["fits"] is False and est["stage"] != "merge":
            block("memory", f"{where}: needs {gb(est['device_bytes'])} per GPU > {gb(est['limit_bytes'])} "
                            f"({est['source']})", stage=est["stage"], value=est["device_bytes"],
                  limit=est["limit_bytes"])
        elif est["stage"] == "train" and est.get("config"):
            c = est["config"]
            ok("memory", f"{where}: fits at {c['text']}: {_fits_text(est)}" + (f", {c['speed']}" if c["speed"] else "")
               + (f" (the default needs {gb(c['default_device_bytes'])})" if not c["default"] else "")
               + (f"; {est['note']}" if est.get("note") else ""),
               stage=est["stage"], value=est["device_bytes"], limit=est["limit_bytes"])
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
        if sdev.kind not in formats.get(s["deploy"]).serve_on:
            block("format", f"{sdev.name} ({sdev.kind}) cannot run {s['deploy']} weights: {support['runtime']}")
        cands = serve_candidates(s, sc, sdev)
        rt_block = None if cands else _runtime_block(s["deploy"], sdev, sc)
        if rt_block:
            block("format", rt_block)
        loadable = bool(cands)
        if t["fp8"] and not sdev.has_fp8:
            block("format", f"FP8 needs FP8 tensor cores (Ada, Hopper, Blackwell); {sdev.id} has none")
        if t["gpu_only"] and sdev.kind not in ("gpu", "edge"):
            block("format", f"{s['deploy']} kernels need a CUDA GPU; {sdev.id} is a {sdev.kind}")
        serve = _stage_serve(s, sc, arch, ctx, cands) if loadable else \
            {"stage": "serve", "weights": s["deploy"], "device": sdev.id, "fits": None, "skipped": rt_block}
        stages.append(serve)
        if serve.get("skipped"):
            pass
        elif serve.get("error"):
            block("memory", f"serve on {sdev.id}: not estimated ({serve['error']})", stage="serve")
        elif not serve["fits"]:
            n = len(serve["config"]["tried"])
            block("memory", f"serve on {sdev.id}: needs {gb(serve['device_bytes'])} > {gb(serve['limit_bytes'])}"
                            + (f" even at the smallest of {n} configurations tried ({serve['runtime']} at batch "
                               f"{serve['batch_size']})" if n > 1 else f" with {serve['runtime']}")
                            + f" ({serve['source']})", stage="serve", value=serve["device_bytes"],
                  limit=serve["limit_bytes"])
        else:
            ok("memory", f"serve on {sdev.id}" + (f" with {serve['runtime']} ({serve['runtime_why']})"
                                                   if serve.get("runtime") else "") + f": {_fits_text(serve)}",
               stage="serve", value=serve["device_bytes"], limit=serve["limit_bytes"])
        ms, goal = serve.get("decode_ms_per_token"), g.max_latency_ms_per_token
        if ms is not None:
            lo, hi = serve.get("decode_ms_per_token_low"), serve.get("decode_ms_per_token_high")
            txt = f"decode {ms:.1f} ms/token" + (f" [{lo:.1f}, {hi:.1f}]" if lo and hi else "") + f" on {sdev.id}" \
                + (f" with {serve['runtime']}" if serve.get("runtime") else "")
            n = len(serve["config"]["tried"])
            if goal is None:
                ok("latency", f"{txt} (no latency goal); {serve['config']['text']}; {serve['config']['why']}",
                   value=ms)
            elif ms > goal:
                block("latency", f"{txt} > goal {goal:g} ms"
                      + ((f" even with the fastest that fits of {n} runtimes tried"
                          if serve["config"]["chosen_by"] != "smallest" else
                          f" with the smallest of {n} configurations tried (none fits)") if n > 1 else "")
                      + f" ({serve['source']})", value=ms, limit=goal)
            else:
                ok("latency", f"{txt} <= goal {goal:g} ms"
                   + ("; the slow end of the interval misses it" if hi and hi > goal else "")
                   + f"; {serve['config']['text']}; {serve['config']['why']}", value=ms, limit=goal)
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
    acc = _accuracy(s, sc, arch, ctx, reqs["accuracy"])
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
        basis = ((acc.get("evidence") or {}).get("basis") or {}).get("text")
        txt = f"retention {r:.3f} [{lo:.3f}, {hi:.3f}]" + (f" measured (run {meas['run_id']})" if meas else
                                                           f", {basis}" if basis else "")
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
    chosen_w = train.pop("workload", None) if train else None
    model_ref = sc.model if isinstance(sc.model, str) else arch.name
    return {
        "run_config": strategies.run_config(s, model_ref, chosen_w or ctx["workload"]),
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
            "serving": serve.get("config") if serve else None,
            "train_time_s": train.get("time_s") if train else None,
            "cost": _cost_summary(stages),
        },
    }


def _runtime_block(fmt_id: str, sdev, sc: Scenario) -> str | None:
    """Why the scenario's runtime cannot serve this format on the device (None when one can): the
    named deploy.runtime must load it; left out, some runtime that runs on the device must."""
    from engine.estimate import runtimes
    f = formats.get(fmt_id)
    if isinstance(sc.deploy.runtime, list):
        if any(r in f.runtimes for r in sc.deploy.runtime):
            return None
        return (f"none of the runtimes of deploy.runtime ({', '.join(sc.deploy.runtime)}) loads {f.id} weights; "
                f"{f.id} loads in {', '.join(f.runtimes)}")
    if sc.deploy.runtime:
        rt = runtimes.get(sc.deploy.runtime)
        if rt.id in f.runtimes:
            return None
        near = runtimes.nearest_format(rt, f)
        return (f"{rt.id} does not load {f.id} weights" + (f": {near} is its {formats.get(near).bits:g}-bit format"
                                                             if near else "")
                + f" (deploy.runtime: {rt.id})")
    if any(runtimes.get(r).runs_on(sdev) for r in f.runtimes if r in runtimes.runtimes()):
        return None
    return f"no runtime on {sdev.id} ({sdev.kind}) loads {f.id} weights; {f.id} loads in {', '.join(f.runtimes)}"


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


"""Estimates: memory, speed, accuracy, cost. Pure Python; never imports torch.

Public API (what the CLI, the advisor and the UI call):
    estimate_train(model, method, precision="bf16", seq_len=512, batch_size=4,
                   grad_ckpt=True, lora_rank=16, gpu=None, calibration=True,
                   loss="reference") -> dict      # loss="chunked": the engine's chunked cross-entropy
    estimate_infer(model, weights="bf16", batch_size=1, prompt_len=512,
                   new_tokens=128, gpu=None, calibration=True, runtime=None,
                   target=None, max_ms_per_token=None) -> dict   # runtime None: the device's default
    estimate_accuracy(family, params_b, method, w_bits, a_bits=16, group_size=None,
                      per_channel=False, finetune="none") -> dict
    estimate_quantize(model, method, bits=4, group_size=128, calibration_samples=128,
                      seq_len=2048, gpu=None) -> dict
    estimate_merge(model, base="bf16", lora_rank=16, gpu=None) -> dict
    compare_runtimes(model, weights, gpu, target=None, nearest=True, **infer) -> dict
                     # the same request in every runtime on the device (the dashboard's runtime chart)
    weights_formats() -> list[str]

``model`` is anything engine.models.resolve accepts; ``gpu`` is a device id of
presets/hardware (None: the reference GPU, h100-80gb; training also takes the CPU entry
cpu-x86-pytorch, what CPU runs are estimated for). Train and infer estimates carry a
``calibration`` key (engine/estimate/correction.py, fitted by engine/calibration.py): applied or not, from how many measured runs. Every result carries its inputs, the
formula and interval of each number (``terms``), ``low``/``high`` and ``notes``. Memory follows
the reference recipe of DESIGN.md (engine/estimate/memory.py); speed is in
engine/estimate/latency.py; weight formats in engine/estimate/formats.py.
"""
from __future__ import annotations

from engine import models as _models
from engine.errors import InputError
from engine.vocab import DEFAULT_QAT_SCHEME
from engine.estimate import correction as _correction
from engine.estimate import formats as _formats
from engine.estimate import latency as _latency
from engine.estimate import memory as _memory
from engine.estimate import runtimes as _runtimes


def _arch(model):
    return _models.resolve(model)


def _gpu_only(dev, what: str):
    if dev.kind != "gpu":
        raise InputError(f"{what} estimates need a GPU id ({', '.join(_memory.hardware.gpu_ids())}); "
                         f"{dev.id} is a {dev.kind} serving target", field="gpu")


def _calibrated(out: dict, kind: str, enabled: bool, dev, **mem) -> dict:
    """The ``calibration`` key: headline figures corrected by measured runs (the fitted factors of
    engine/calibration.py, applied by engine/estimate/correction.py)."""
    return _correction.apply(out, kind, enabled=enabled,
                             device_bytes=lambda p, lo, hi: _memory.device_bytes(p, lo, hi, dev, kind, **mem))


def estimate_train(model, method, precision="bf16", seq_len=512, batch_size=4, grad_ckpt=True, lora_rank=16,
                   gpu=None, qat_scheme=DEFAULT_QAT_SCHEME, calibration=True, loss="reference",
                   optimizer="adamw", grad_accum=1, lora_targets=None) -> dict:
    """Peak GPU memory and speed of one training step of the reference recipe (``calibration``:
    correct the headline figures by measured runs where a fit matches; see docs/calibration.md;
    ``loss="chunked"``: the engine's chunked cross-entropy instead of the recipe's full logits;
    ``optimizer``: adamw | adamw-8bit | paged-adamw-8bit | paged-adamw; ``grad_accum``:
    micro-batches of ``batch_size`` per optimizer step: memory is one micro-batch's, the
    optimizer's time is shared by them; ``lora_targets``: the LoRA targets adapted, a list or
    "q_proj,v_proj"; default all seven)."""
    if isinstance(lora_targets, str):
        lora_targets = [t.strip() for t in lora_targets.split(",") if t.strip()]
    if lora_targets is not None and not lora_targets:
        raise InputError("lora_targets is empty: name the modules to adapt (q_proj,v_proj ...)", field="lora_targets")
    seq_len = _memory.positive_int("seq_len", seq_len)
    grad_accum = _memory.positive_int("grad_accum", grad_accum)
    batch_size = _memory.positive_int("batch_size", batch_size)
    lora_rank = _memory.positive_int("lora_rank", lora_rank)
    if not isinstance(grad_ckpt, bool):
        raise InputError(f"grad_ckpt must be true or false, got {grad_ckpt!r}", field="grad_ckpt")
    arch = _arch(model)
    dev = _memory.device(gpu)
    if dev.kind not in ("gpu", "cpu"):
        raise InputError(f"training estimates need a GPU id ({', '.join(_memory.hardware.gpu_ids())}) or a CPU "
                         f"entry; {dev.id} is a {dev.kind} serving target", field="gpu")
    m = _memory.train_memory(arch, method, precision, seq_len, batch_size, grad_ckpt, lora_rank, dev,
                             qat_scheme=qat_scheme, loss=loss, optimizer=optimizer, lora_targets=lora_targets)
    s = _latency.train_speed(arch, method, precision, seq_len, batch_size, grad_ckpt, lora_rank, dev,
                             grad_accum=grad_accum, optimizer="adamw" if optimizer == "adamw" else "8bit")
    d = _memory.device_bytes(m["peak_allocated_bytes"], m["low"], m["high"], dev, "train", method=method,
                             persistent=m["persistent_bytes"])
    paging = None
    if optimizer.startswith("paged"):
        # the states stay on the GPU when there is room; when the step needs it they page to the host
        # and back once per optimizer step over the host link
        resident = max(v + (m["optimizer_states_bytes"] if k != "optimizer_step" else 0)
                       for k, v in m["phases"].items())
        rd = _memory.device_bytes(resident, resident, resident, dev, "train", method=method,
                                  persistent=m["persistent_bytes"] + m["optimizer_states_bytes"])["device_bytes"]
        pages = rd > dev.memory_bytes
        link = _latency.train_constants()["host_link_gbs"]
        extra = 2 * m["optimizer_states_bytes"] / (link * 1e9) / grad_accum if pages else 0.0
        paging = {"pages": pages, "resident_device_bytes": rd, "seconds_per_micro_batch": extra,
                  "note": (f"paged optimizer: states do not fit beside the activations ({rd / 1e9:.1f} GB resident "
                           f"> {dev.memory_bytes / 1e9:.1f} GB), so they page out and back each optimizer step "
                           f"over the {link:g} GB/s host link: +{extra * 1e3:.1f} ms per micro-batch") if pages else
                          "paged optimizer: its states fit beside the activations; nothing pages"}
        if extra:
            s = dict(s)
            s["step_time_s"] += extra
            bt = seq_len * batch_size
            f = bt / s["step_time_s"] / s["tokens_per_s"]
            for k in ("tokens_per_s", "tokens_per_s_low", "tokens_per_s_high"):
                s[k] *= f
    return _calibrated({
        "kind": "train",
        "inputs": {"model": arch.name, "method": method, "precision": precision, "seq_len": seq_len,
                   "batch_size": batch_size, "grad_ckpt": grad_ckpt, "lora_rank": lora_rank, "gpu": dev.id,
                   **({"qat_scheme": qat_scheme} if method == "qat" else {}),
                   **({"loss": loss} if loss != "reference" else {}),
                   **({"optimizer": optimizer} if optimizer != "adamw" else {}),
                   **({"grad_accum": grad_accum} if grad_accum != 1 else {}),
                   **({"lora_targets": list(lora_targets)} if lora_targets is not None else {})},
        "model": arch.to_dict(),
        "gpu": dev.id,
        "peak_allocated_bytes": m["peak_allocated_bytes"], "low": m["low"], "high": m["high"],
        "peak_phase": m["peak_phase"], "breakdown": m["breakdown"], "terms": m["terms"], "phases": m["phases"],
        **d,
        "tokens_per_s": s["tokens_per_s"], "tokens_per_s_low": s["tokens_per_s_low"],
        "tokens_per_s_high": s["tokens_per_s_high"], "step_time_s": s["step_time_s"],
        "flops_per_token": s["flops_per_token"], "mfu": s["mfu"], "step_time_parts": s["step_time_parts"],
        "speed_formula": s["formula"],
        "trainable_params": m["trainable_params"], "attention_kernel": m["attention_kernel"],
        "activations_per_layer_per_token": m["activations_per_layer_per_token"],
        "optimizer_alternatives": m["optimizer_alternatives"],
        "optimizer": optimizer, "optimizer_states_bytes": m["optimizer_states_bytes"],
        **({"paging": paging} if paging else {}),
        "approximate": m["approximate"] or arch.approximate,
        "notes": m["notes"] + list(arch.notes),
        "source": "formula: engine/estimate/memory.py + latency.py (reference recipe of DESIGN.md); "
                  "constants presets/estimate/*.yaml",
    }, "train", calibration, dev, method=method, persistent=m["persistent_bytes"])


def estimate_infer(model, weights="bf16", batch_size=1, prompt_len=512, new_tokens=128, gpu=None,
                   group_size=None, calibration=True, runtime=None, target=None, max_ms_per_token=None) -> dict:
    """Memory and speed of serving the weights in a format with a runtime (presets/runtimes.yaml).

    ``runtime``: transformers | vllm | llama.cpp | tensorrt-llm | executorch | mlx; None picks the
    default of ``target`` (a scenario's deploy target) or of the device, falling back to the first
    runtime that loads the format there, and says which under ``runtime`` (engine/estimate/runtimes.py
    choose). A runtime that cannot load the format or does not run on the device is an InputError
    naming what it loads. ``max_ms_per_token``: the latency goal of the serving capacity (the largest
    batch meeting it, tokens/s there, cost per million tokens). ``calibration`` as in estimate_train
    (measured runs correct the transformers path only)."""
    batch_size = _memory.positive_int("batch_size", batch_size)
    prompt_len = _memory.positive_int("prompt_len", prompt_len)
    new_tokens = _memory.positive_int("new_tokens", new_tokens)
    if max_ms_per_token is not None:
        try:
            max_ms_per_token = float(max_ms_per_token)
        except (TypeError, ValueError):
            max_ms_per_token = -1.0
        if not max_ms_per_token > 0:
            raise InputError("max_ms_per_token must be a positive number of milliseconds", field="max_ms_per_token")
    arch = _arch(model)
    dev = _memory.device(gpu)
    fmt = _formats.get(weights).with_group_size(group_size)
    rt, why = _runtimes.choose(dev, fmt, runtime, target)
    rt_info = {"id": rt.id, "name": rt.name, "why": why, "model": rt.model, "batching": dict(rt.batching),
               "memory": rt.memory.get("kind")}
    if rt.model == "hf-generate":
        out = _infer_hf(arch, dev, fmt, batch_size, prompt_len, new_tokens, calibration)
    else:
        out = _infer_runtime(arch, dev, fmt, rt, batch_size, prompt_len, new_tokens)
    out["runtime"] = rt_info
    out["inputs"]["runtime"] = rt.id
    if max_ms_per_token is not None:
        out["inputs"]["max_ms_per_token"] = max_ms_per_token
    out["serving"] = _serving(arch, dev, fmt, rt, prompt_len, new_tokens, max_ms_per_token, out)
    return out


def _serving(arch, dev, fmt, rt, prompt_len, new_tokens, goal, est) -> dict:
    """Serving capacity: the largest batch meeting the latency goal, its tokens/s and price."""
    ctx = prompt_len + (new_tokens - 1) / 2
    if rt.model == "hf-generate":
        def step(b):
            return _latency.infer_speed(arch, fmt, b, prompt_len, new_tokens, dev)["hf"]["decode_s_per_token"]
        kv_seq = (prompt_len + new_tokens) * arch.kv_cache_bytes_per_token(2)
        room = dev.memory_bytes - est["device_bytes"]
        mem_limit = est["inputs"]["batch_size"] + (int(room // kv_seq) if kv_seq and room > 0 else 0) \
            if est.get("fits", True) else 0
    else:
        def step(b):
            return _runtimes.decode_step(arch, fmt, dev, rt, b, ctx)["step_s"]
        mem_limit = est["runtime_memory"]["max_sequences"]
    if mem_limit <= 0:
        return {"batch": 0, "tokens_per_s": 0.0, "usd_per_million_tokens": None, "max_ms_per_token": goal,
                "why": f"not one sequence of {prompt_len + new_tokens} tokens fits beside the weights on {dev.id}"}
    return _runtimes.capacity(step, rt.max_batch, goal, dev.price_per_hour, mem_limit)


def _infer_runtime(arch, dev, fmt, rt, batch_size, prompt_len, new_tokens) -> dict:
    """A roofline runtime's answer (engine/estimate/runtimes.py), in estimate_infer's keys."""
    ctx = prompt_len + (new_tokens - 1) / 2
    st = _runtimes.decode_step(arch, fmt, dev, rt, batch_size, ctx)
    pf = _runtimes.prefill(arch, fmt, dev, rt, batch_size, prompt_len)
    mem = _runtimes.memory(arch, fmt, dev, rt, batch_size, prompt_len, new_tokens)
    lo, hi = _runtimes.interval(rt, dev, fmt)
    tps = 1 / st["step_s"]
    rel = _memory._unc("counted")
    notes = []
    if fmt.requires_fp8 and not dev.has_fp8:
        notes.append(f"{dev.id} has no FP8 tensor cores: fp8 weights would run through a slower fallback")
    if not mem["fits"]:
        notes.append(f"does not fit: {rt.id} needs {mem['required_bytes'] / 1e9:.2f} GB on {dev.id} "
                     f"({mem['limit_bytes'] / 1e9:.2f} GB usable)")
    peak = mem["peak_allocated_bytes"]
    return {
        "kind": "infer",
        "inputs": {"model": arch.name, "weights": fmt.id, "batch_size": batch_size, "prompt_len": prompt_len,
                   "new_tokens": new_tokens, "gpu": dev.id, **({"group_size": fmt.group_size} if fmt.grouped else {})},
        "model": arch.to_dict(),
        "gpu": dev.id,
        "weights_format": {"id": fmt.id, "name": fmt.name, "library": fmt.library, "evidence": fmt.evidence},
        "weights_bytes": mem["weights_bytes"], "weights_breakdown": _formats.weights_breakdown(arch, fmt, 1),
        "peak_allocated_bytes": peak, "low": int(peak * (1 - rel)), "high": int(peak * (1 + rel)),
        "peak_phase": "decode", "breakdown": mem["breakdown"], "terms": [], "phases": {},
        "kv_cache_bytes": mem["kv_cache_bytes"],
        "device_bytes": mem["device_bytes"], "device_low": mem["device_bytes"], "device_high": mem["device_bytes"],
        "required_bytes": mem["required_bytes"], "cuda_context_bytes": mem["cuda_context_bytes"],
        "usable_bytes": dev.memory_bytes, "fits": mem["fits"], "fits_high": mem["fits"],
        "runtime_memory": mem,
        "prefill_s": pf["prefill_s"], "prefill_s_low": pf["prefill_s"] / hi, "prefill_s_high": pf["prefill_s"] / lo,
        "decode_tokens_per_s": tps, "decode_tokens_per_s_low": tps * lo, "decode_tokens_per_s_high": tps * hi,
        "decode_tokens_per_s_total": batch_size * tps,
        "ms_per_token": 1000 * st["step_s"],
        "decode": {k: st[k] for k in ("step_s", "memory_s", "compute_s", "dequant_s", "host_s", "bound", "formula")},
        "decode_interval": {"kind": _runtimes.interval_kind(rt, dev, fmt), "factors": [lo, hi],
                            "evidence_rows": len(_runtimes.evidence_rows(rt, dev.kind, fmt))},
        "prefill_formula": pf["formula"],
        "calibration": {"applied": False, "runs": 0, "device": dev.id, "terms": {},
                        "note": f"not calibrated: measured runs are Hugging Face generate; {rt.id}'s terms rest on "
                                f"presets/evidence/runtime_speed.csv"},
        "approximate": arch.approximate,
        "notes": notes + list(arch.notes),
        "source": f"formula: engine/estimate/runtimes.py ({rt.id}); constants presets/runtimes.yaml; "
                  f"evidence presets/evidence/runtime_speed.csv",
    }


def _infer_hf(arch, dev, fmt, batch_size, prompt_len, new_tokens, calibration) -> dict:
    """The Hugging Face generate path (runtime transformers)."""
    notes = []
    if fmt.requires_fp8 and not dev.has_fp8:
        notes.append(f"{dev.id} has no FP8 tensor cores: fp8 weights would run through a slower fallback")
    m = _memory.infer_memory(arch, fmt, batch_size, prompt_len, new_tokens, dev,
                             include_workspace=dev.kind in ("gpu", "edge"))
    s = _latency.infer_speed(arch, fmt, batch_size, prompt_len, new_tokens, dev)
    libs = (fmt.library,) if fmt.library else ()
    d = _memory.device_bytes(m["peak_allocated_bytes"], m["low"], m["high"], dev, "infer", libraries=libs)
    hf = s["hf"]
    return _calibrated({
        "kind": "infer",
        "inputs": {"model": arch.name, "weights": fmt.id, "batch_size": batch_size, "prompt_len": prompt_len,
                   "new_tokens": new_tokens, "gpu": dev.id,
                   **({"group_size": fmt.group_size} if fmt.grouped else {})},
        "model": arch.to_dict(),
        "gpu": dev.id,
        "weights_format": {"id": fmt.id, "name": fmt.name, "library": fmt.library, "evidence": fmt.evidence},
        "weights_bytes": m["weights_bytes"], "weights_breakdown": m["weights_breakdown"],
        "peak_allocated_bytes": m["peak_allocated_bytes"], "low": m["low"], "high": m["high"],
        "peak_phase": m["peak_phase"], "breakdown": m["breakdown"], "terms": m["terms"], "phases": m["phases"],
        "kv_cache_bytes": m["kv_cache_bytes_end"],
        **d,
        "prefill_s": hf["prefill_s"], "prefill_s_low": hf["prefill_s_low"], "prefill_s_high": hf["prefill_s_high"],
        "decode_tokens_per_s": hf["decode_tokens_per_s"],
        "decode_tokens_per_s_low": hf["decode_tokens_per_s_low"],
        "decode_tokens_per_s_high": hf["decode_tokens_per_s_high"],
        "decode_tokens_per_s_total": hf["decode_tokens_per_s_total"],
        "ms_per_token": 1000 * hf["decode_s_per_token"],
        "hf_generate": hf, "roofline": s["roofline"],
        "approximate": m["approximate"] or arch.approximate,
        "notes": notes + m["notes"] + list(arch.notes),
        "source": "formula: engine/estimate/memory.py + latency.py; formats presets/estimate/formats.yaml "
                  "(layouts checked against bitsandbytes/gptqmodel/torchao); speed constants presets/estimate/speed.yaml",
    }, "infer", calibration, dev, libraries=libs)


def compare_runtimes(model, weights, gpu, target=None, nearest=True, **infer) -> dict:
    """One serving request (``estimate_infer``'s keywords, ``runtime`` aside) in every runtime of
    presets/runtimes.yaml that runs on the device: those that load ``weights`` serve it as it is
    (``loads``: True); with ``nearest``, each other runtime there serves its nearest format in bits
    (runtimes.nearest_format: what the same strategy exported for that runtime would be; ``loads``:
    False). Per runtime: decode ms/token with its interval, what it needs on the device (vLLM's
    reservation apart), whether that fits, the decode formula, the runtime's evidence and the CLI
    command that gives the same figures. ``default``: the runtime the target / device serves the
    format with when none is named (runtimes.choose). Entries: those loading the format first, then
    by ms/token; a runtime whose estimate fails keeps its entry with ``error``."""
    dev = _memory.device(gpu)
    fmt = _formats.get(weights)
    arch = _arch(model)
    infer = {k: v for k, v in infer.items() if k not in ("runtime", "model", "weights", "gpu", "target")}
    try:
        default = _runtimes.choose(dev, fmt, None, target)[0].id
    except InputError:
        default = None
    out = []
    for rt in _runtimes.runtimes().values():
        if not rt.runs_on(dev):
            continue
        loads = rt.id in fmt.runtimes
        use = fmt.id if loads else (_runtimes.nearest_format(rt, fmt) if nearest else None)
        if use is None:
            continue
        kw = dict(infer) if loads else {k: v for k, v in infer.items() if k != "group_size"}
        cli = (f"python -m engine estimate infer --model {arch.name} --weights {use} --runtime {rt.id} --gpu {dev.id} "
               + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in kw.items() if v is not None and k != "calibration"))
        entry = {"runtime": rt.id, "name": rt.name, "weights": use, "loads": loads, "default": rt.id == default,
                 "evidence": rt.evidence, "source": cli.strip(),
                 "why": (f"loads {fmt.id}" if loads else
                         f"does not load {fmt.id}: {use} is its nearest format ({_formats.get(use).bits:g} bits)")}
        try:
            e = estimate_infer(arch, weights=use, gpu=dev.id, runtime=rt.id, **kw)
        except InputError as err:
            out.append({**entry, "error": str(err)})
            continue
        tps, lo, hi = e["decode_tokens_per_s"], e.get("decode_tokens_per_s_low"), e.get("decode_tokens_per_s_high")
        dec = e.get("decode") or e.get("hf_generate") or {}
        cap = e.get("serving") or {}
        entry.update(
            ms_per_token=1000.0 / tps if tps else None,
            ms_per_token_low=1000.0 / hi if hi else None, ms_per_token_high=1000.0 / lo if lo else None,
            decode_tokens_per_s=tps, prefill_s=e.get("prefill_s"),
            weights_bytes=e.get("weights_bytes"), device_bytes=e.get("required_bytes", e.get("device_bytes")),
            reserved_bytes=e.get("device_bytes"), limit_bytes=dev.memory_bytes,
            fits=bool(e.get("fits", e.get("device_bytes", 0) <= dev.memory_bytes)),
            formula=dec.get("formula", ""), memory_formula=(e.get("runtime_memory") or {}).get("formula", ""),
            bound=dec.get("bound"), calibration=(e.get("calibration") or {}).get("applied", False),
            capacity={k: cap.get(k) for k in ("batch", "tokens_per_s", "usd_per_million_tokens", "why")} if cap else {})
        out.append(entry)
    out.sort(key=lambda x: (not x["loads"], x.get("ms_per_token") is None, x.get("ms_per_token") or 0))
    return {"weights": fmt.id, "device": dev.id, "device_kind": dev.kind, "default": default,
            "inputs": {"model": arch.name, **infer},
            "runtimes": out}


def estimate_quantize(model, method, bits=4, group_size=128, calibration_samples=128, seq_len=2048,
                      gpu=None) -> dict:
    """Peak GPU memory and time of a quantize stage (GPTQ/AWQ calibration, or quantize-on-load)."""
    arch = _arch(model)
    dev = _memory.device(gpu)
    _gpu_only(dev, "quantize-stage")
    m = _memory.quantize_memory(arch, method, bits, group_size, calibration_samples, seq_len, dev)
    t = _latency.quantize_time(arch, method, _memory.positive_int("calibration_samples", calibration_samples),
                               _memory.positive_int("seq_len", seq_len), dev)
    d = _memory.device_bytes(m["peak_allocated_bytes"], m["low"], m["high"], dev, "quantize")
    return {"kind": "quantize",
            "inputs": {"model": arch.name, "method": method, "bits": bits, "group_size": group_size,
                       "calibration_samples": calibration_samples, "seq_len": seq_len, "gpu": dev.id},
            "gpu": dev.id, **m, **d, **t, "source": "formula: engine/estimate/memory.py quantize_memory"}


def estimate_merge(model, base="bf16", lora_rank=16, gpu=None) -> dict:
    """Peak GPU memory and time of merging LoRA adapters into a 16-bit model."""
    arch = _arch(model)
    dev = _memory.device(gpu)
    _gpu_only(dev, "merge-stage")
    m = _memory.merge_memory(arch, base, lora_rank, dev)
    d = _memory.device_bytes(m["peak_allocated_bytes"], m["low"], m["high"], dev, "quantize")
    w16 = _formats.weights_bytes(arch, "bf16", 1)
    compute = 3 * w16 / (dev.bandwidth_gbs * 1e9 * 0.5)
    save = w16 / (_latency.sp()["stages"]["save_gbps"] * 1e9)
    return {"kind": "merge", "inputs": {"model": arch.name, "base": _formats.get(base).id, "lora_rank": lora_rank,
                                        "gpu": dev.id},
            "gpu": dev.id, **m, **d, "time_s": compute + save, "time_s_low": 0.5 * (compute + save),
            "time_s_high": 2 * (compute + save), "save_s": save,
            "source": "formula: engine/estimate/memory.py merge_memory"}


def estimate_accuracy(**kw) -> dict:
    """Accuracy retention (engine/estimate/accuracy.py, another module; imported when first used)."""
    from engine.estimate.accuracy import estimate_accuracy as f
    return f(**kw)


def weights_formats() -> list[str]:
    """Every weights format ``estimate_infer`` accepts."""
    return _formats.ids()


def stage_memory(stage: str, model, gpu=None, **params) -> dict:
    """Per-stage estimate for the advisor: stage in train | quantize | merge | serve."""
    if stage == "train":
        return estimate_train(model, gpu=gpu, **params)
    if stage == "quantize":
        return estimate_quantize(model, gpu=gpu, **params)
    if stage == "merge":
        return estimate_merge(model, gpu=gpu, **params)
    if stage in ("serve", "evaluate", "infer"):
        return estimate_infer(model, gpu=gpu, **params)
    raise InputError(f"stage must be train, quantize, merge or serve, got {stage!r}", field="stage")

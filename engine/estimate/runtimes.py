"""Serving runtimes: the registry (presets/runtimes.yaml) and how fast and how big a model is in each.

``get(id)`` is a runtime's entry; what it loads is derived from the weights formats
(presets/quant/formats.yaml ``runtimes``), so a format names its runtimes in one place.
``choose(dev, fmt, runtime, target)`` picks the runtime an estimate is for (the one asked for, checked;
else the target's or device's default, or the first runtime that loads the format there) and says why.

The speed of a ``roofline`` runtime, per decode step of a batch of B sequences at context c:

    step = max((weights read + B x c x KV bytes/token) / (bandwidth x bw_efficiency),
               B x FLOPs/token / (matmul peak x flops_efficiency),
               dequant instructions/token / (GPU alu_tops x alu_efficiency)) + host_s_per_token

(the third term: llama.cpp's GGUF vec-dot kernels on a GPU, instructions per weight from the block
layout, presets/quant/gguf.yaml dot_ops_per_weight)

with bw_efficiency per runtime x device kind x format class and host time per device kind (their
evidence in runtime_speed.csv). Prefill: max(FLOPs / (peak x prefill efficiency), weights /
(bandwidth x bw_efficiency)) + host. Memory follows the runtime's allocation: vLLM reserves
gpu_memory_utilization of the device and fills what weights, the profiling activations and CUDA
graphs leave with KV blocks; llama.cpp / ExecuTorch / MLX allocate the context's KV up front.
``transformers`` is the Hugging Face path of latency.py and memory.py (model: hf-generate).
Pure Python, no torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from engine import hardware
from engine.errors import InputError, choices
from engine.estimate import formats as F
from engine.models import ModelArch
from engine.presets import load_yaml

MODELS = ("hf-generate", "roofline")
MEMORY_KINDS = ("hf", "reserve", "reserve-free", "context")
BATCHING = ("static", "continuous", "slots", "single")


@dataclass(frozen=True)
class Runtime:
    id: str
    name: str
    model: str
    devices: tuple[str, ...]
    vendors: tuple[str, ...] = ()
    decode: dict = field(default_factory=dict, compare=False)
    prefill: dict = field(default_factory=dict, compare=False)
    batching: dict = field(default_factory=dict, compare=False)
    memory: dict = field(default_factory=dict, compare=False)
    preferred: tuple[str, ...] = ()
    evidence: str = ""

    @property
    def max_batch(self) -> int:
        return int(self.batching.get("max_batch", 1))

    def loads(self) -> list[str]:
        """The weights formats this runtime loads (formats.yaml ``runtimes``)."""
        return [fid for fid, f in F.formats().items() if self.id in f.runtimes]

    def runs_on(self, dev: hardware.Device) -> bool:
        if dev.kind not in self.devices:
            return False
        return not (self.vendors and dev.kind == "gpu" and dev.vendor and dev.vendor not in self.vendors)

    def to_dict(self) -> dict:
        return {"id": self.id, "name": self.name, "model": self.model, "devices": list(self.devices),
                "vendors": list(self.vendors), "batching": dict(self.batching), "memory": dict(self.memory),
                "loads": self.loads(), "evidence": self.evidence}


_CACHE: dict = {}


def _data() -> dict:
    if not _CACHE:
        d = load_yaml("runtimes.yaml")
        rts = {}
        for r in d["runtimes"]:
            rid = r.get("id")
            for key in ("name", "model", "devices", "batching", "memory"):
                if key not in r:
                    raise InputError(f"runtime {rid!r}: {key} is required (presets/runtimes.yaml)", field=key)
            if r["model"] not in MODELS:
                raise choices(f"model of runtime {rid}", r["model"], MODELS)
            if r["memory"].get("kind") not in MEMORY_KINDS:
                raise choices(f"memory kind of runtime {rid}", r["memory"].get("kind"), MEMORY_KINDS)
            if r["batching"].get("kind") not in BATCHING:
                raise choices(f"batching of runtime {rid}", r["batching"].get("kind"), BATCHING)
            rts[rid] = Runtime(id=rid, name=r["name"], model=r["model"], devices=tuple(r["devices"]),
                               vendors=tuple(r.get("vendors", ())), decode=r.get("decode", {}),
                               prefill=r.get("prefill", {}), batching=r["batching"], memory=r["memory"],
                               preferred=tuple(r.get("preferred", ())), evidence=r.get("evidence", ""))
        _CACHE.update(runtimes=rts, defaults=d["defaults"], interval=d["interval"])
    return _CACHE


def runtimes() -> dict[str, Runtime]:
    return _data()["runtimes"]


def ids() -> list[str]:
    return list(runtimes())


def get(rid) -> Runtime:
    if isinstance(rid, Runtime):
        return rid
    key = str(rid).strip().lower()
    if key not in runtimes():
        raise choices("runtime", rid, ids())
    return runtimes()[key]


def defaults() -> dict:
    return _data()["defaults"]


def default_runtime(dev: hardware.Device, target: str | None = None) -> tuple[str, str]:
    """The runtime a device serves with unless one is named: (id, why)."""
    d = defaults()
    if target and target in d["by_target"]:
        rid = d["by_target"][target]
        if target == "edge" and dev.kind == "laptop":        # Apple silicon: MLX
            rid = d["by_device_kind"]["laptop"]
        return rid, f"the default for deploy target {target}" + (f" on a {dev.kind}" if target == "edge" else "")
    if dev.kind == "gpu" and dev.id in d.get("consumer_gpus", ()):
        return d["consumer_gpu_runtime"], f"the default on a consumer GPU ({dev.id})"
    rid = d["by_device_kind"][dev.kind]
    return rid, f"the default on a {'data-centre GPU' if dev.kind == 'gpu' else dev.kind} ({dev.id})"


def format_class(fmt) -> str:
    """dense (16-bit and wider), int8 (8-bit), low (below 8 bits), bnb (bitsandbytes: dequantizing
    kernels in any runtime): what the efficiency terms key on."""
    f = F.get(fmt)
    if f.library == "bitsandbytes":
        return "bnb"
    if not f.quantized or (f.kind == "gguf" and F.mixture(f)["base"] in ("f16", "bf16", "f32")):
        return "dense"
    return "int8" if f.bits >= 8 else "low"


def nearest_format(rt: Runtime, fmt) -> str | None:
    """The format ``rt`` loads that is closest in bits to ``fmt`` (ties: the runtime's preferred order)."""
    f = F.get(fmt)
    loads = rt.loads()
    if not loads:
        return None
    order = {fid: i for i, fid in enumerate(rt.preferred)}
    return min(loads, key=lambda x: (abs(F.get(x).bits - f.bits), order.get(x, len(order)), x))


def check(rt: Runtime, fmt, dev: hardware.Device) -> None:
    """Refuse a runtime that cannot load the format or does not run on the device (exit 2)."""
    f = F.get(fmt)
    if not rt.runs_on(dev):
        where = [d for d in hardware.devices().values() if rt.runs_on(d)]
        kinds = ", ".join(rt.devices) + (f" ({', '.join(rt.vendors)} GPUs)" if rt.vendors else "")
        raise InputError(f"{rt.id} does not run on {dev.id} ({dev.kind}{', ' + dev.vendor if dev.vendor else ''}); "
                         f"it runs on {kinds}: e.g. {', '.join(d.id for d in where[:4])}", field="runtime")
    if rt.id not in f.runtimes:
        near = nearest_format(rt, f)
        raise InputError(f"{rt.id} does not load {f.id} weights"
                         + (f": {near} is its {F.get(near).bits:g}-bit format" if near else "")
                         + f"; it loads {', '.join(rt.loads())}", field="runtime")


def choose(dev: hardware.Device, fmt, runtime=None, target: str | None = None) -> tuple[Runtime, str]:
    """The runtime an estimate is for and why: the one asked for (checked), else the default of the
    target / device when it loads the format, else the first runtime that loads it on the device."""
    f = F.get(fmt)
    if runtime not in (None, "", "auto"):
        rt = get(runtime)
        check(rt, f, dev)
        return rt, "given"
    rid, why = default_runtime(dev, target)
    rt = get(rid)
    if rt.runs_on(dev) and rt.id in f.runtimes:
        return rt, f"assumed: {why}"
    for other in f.runtimes:
        o = runtimes().get(other)
        if o and o.runs_on(dev):
            return o, (f"assumed: {o.id}, the first runtime that loads {f.id} on {dev.id} "
                       f"({why.replace('the default', rt.id + ' is the default')}, but it does not load {f.id})")
    raise InputError(f"no runtime loads {f.id} weights on {dev.id} ({dev.kind}); {f.id} loads in "
                     f"{', '.join(f.runtimes)}", field="weights")


# ---- speed ---------------------------------------------------------------------------------------------

def platform_key(table: dict, dev: hardware.Device) -> str:
    """The key of a per-device-kind table that applies to ``dev``: ``<kind>-<os>`` (phone-ios,
    phone-android) where the table has one for the device's platform, else the device kind."""
    k = f"{dev.kind}-{dev.os}" if dev.os else ""
    return k if k and k in table else dev.kind


def _per_kind(table: dict, dev: hardware.Device, what: str, rt: Runtime):
    key = platform_key(table, dev)
    if key not in table:
        raise ValueError(f"runtime {rt.id}: {what} has no value for {dev.kind}")   # data error in runtimes.yaml
    return table[key]


def class_layer_s(rt: Runtime, cls: str, dev: hardware.Device) -> float:
    """The fixed time per decoder layer a format class adds in this runtime (``class_host_s_per_layer``):
    a number, or per GPU architecture ({default: x, ampere: y, ...})."""
    v = (rt.decode.get("class_host_s_per_layer") or {}).get(cls, 0.0)
    if isinstance(v, dict):
        v = v.get(dev.arch, v.get("default", 0.0))
    return float(v)


def constants(rt: Runtime, fmt, dev: hardware.Device, override: dict | None = None) -> dict:
    """The efficiency terms of a roofline runtime for a format on a device (``override``: the bench's
    fitted values, {"bw_efficiency": x, "host_s_per_token": y})."""
    d = rt.decode
    cls = format_class(fmt)
    bw = _per_kind(d["bw_efficiency"], dev, "bw_efficiency", rt)
    eff = bw.get(cls, bw.get("default"))
    c = {"bw_efficiency": eff, "format_class": cls,
         "host_s_per_token": _per_kind(d["host_s_per_token"], dev, "host_s_per_token", rt),
         "host_s_per_layer": (d.get("host_s_per_layer") or {}).get(platform_key(d.get("host_s_per_layer") or {}, dev), 0.0)
                             + class_layer_s(rt, cls, dev),
         "flops_efficiency": d["flops_efficiency"],
         "alu_efficiency": (d.get("alu_efficiency") or {}).get(dev.kind),
         "prefill_efficiency": _per_kind(rt.prefill["efficiency"], dev, "prefill efficiency", rt)}
    c.update(override or {})
    return c


def _peak(dev: hardware.Device, fmt) -> float:
    f = F.get(fmt)
    peak = dev.matmul_tflops * 1e12
    if f.tensor_cores == "int8" and dev.int8_tops:
        peak = dev.int8_tops * 1e12
    if f.tensor_cores == "fp8" and dev.fp8_tflops:
        peak = dev.fp8_tflops * 1e12
    return peak


def decode_step(arch: ModelArch, fmt, dev: hardware.Device, rt: Runtime, batch: int, context: float,
                override: dict | None = None) -> dict:
    """Seconds of one decode step serving ``batch`` sequences at average ``context`` tokens."""
    from engine.estimate.latency import attention_flops_per_token, matmul_params
    c = constants(rt, fmt, dev, override)
    wread = F.bytes_read_per_token(arch, fmt)
    kv = arch.kv_cache_bytes_per_token(2) * batch * context
    bw = dev.bandwidth_gbs * 1e9
    blocks, head = matmul_params(arch)
    flops = batch * (2 * (blocks + head) + 2 * attention_flops_per_token(arch, context))
    peak = _peak(dev, fmt)
    mem_s = (wread + kv) / (bw * c["bw_efficiency"])
    comp_s = flops / (peak * c["flops_efficiency"]) if peak else 0.0
    # the kernels' own work to unpack and dot the quantized weights (llama.cpp's dp4a vec-dots): per
    # step, the batch's columns share one unpacking; it binds where a GPU issues few instructions per
    # byte of bandwidth (Pascal) and for small-sub-block k-quants (q2_k, q3_k)
    ops = F.dot_ops_per_token(arch, fmt) if c["alu_efficiency"] and dev.alu_tops else None
    alu_s = ops / (dev.alu_tops * 1e12 * c["alu_efficiency"]) if ops else 0.0
    host = c["host_s_per_token"] + arch.num_layers * c["host_s_per_layer"]
    step = max(mem_s, comp_s, alu_s) + host
    bound = "memory" if mem_s >= max(comp_s, alu_s) else "compute" if comp_s >= alu_s else "dequantization"
    return {"step_s": step, "memory_s": mem_s, "compute_s": comp_s, "dequant_s": alu_s, "host_s": host,
            "weights_read": wread, "kv_read": kv, "bound": bound,
            "constants": c,
            "formula": (f"max(({wread / 1e9:.3f} GB weights + {kv / 1e9:.3f} GB KV) / ({dev.bandwidth_gbs:g} GB/s x "
                        f"{c['bw_efficiency']:.2f}) = {mem_s * 1e3:.2f} ms, {flops / 1e9:.1f} GFLOP / "
                        f"({peak / 1e12:.0f} TFLOP/s x {c['flops_efficiency']:.2f}) = {comp_s * 1e3:.2f} ms"
                        + (f", {ops / 1e9:.1f} G dequant instr / ({dev.alu_tops:g} T/s x {c['alu_efficiency']:.2f}) = "
                           f"{alu_s * 1e3:.2f} ms" if ops else "")
                        + ") + host "
                        f"{c['host_s_per_token'] * 1e3:.2f} ms/token"
                        + (f" + {arch.num_layers} layers x {c['host_s_per_layer'] * 1e3:.2f} ms" if c["host_s_per_layer"] else "")
                        + f" = {step * 1e3:.2f} ms/step "
                        f"({rt.id}, {dev.kind}{'/' + dev.os if dev.os else ''}, {c['format_class']} weights)")}


def prefill(arch: ModelArch, fmt, dev: hardware.Device, rt: Runtime, batch: int, prompt_len: int,
            override: dict | None = None) -> dict:
    from engine.estimate.latency import attention_flops_per_token, matmul_params
    c = constants(rt, fmt, dev, override)
    blocks, head = matmul_params(arch)
    flops = batch * (2 * blocks * prompt_len + attention_flops_per_token(arch, prompt_len) * prompt_len / 2
                     + 2 * head)
    peak = _peak(dev, fmt)
    comp = flops / (peak * c["prefill_efficiency"]) if peak else 0.0
    mem = F.bytes_read_per_token(arch, fmt) / (dev.bandwidth_gbs * 1e9 * c["bw_efficiency"])
    s = max(comp, mem) + c["host_s_per_token"] + arch.num_layers * c["host_s_per_layer"]
    return {"prefill_s": s, "formula": f"max({flops / 1e12:.2f} TFLOP / ({peak / 1e12:.0f} TFLOP/s x "
                                       f"{c['prefill_efficiency']:.2f}), weights once) + host = {s * 1e3:.1f} ms"}


# ---- memory --------------------------------------------------------------------------------------------

def _kv_tokens(rt: Runtime, tokens: int) -> int:
    blk = int(rt.memory.get("kv_block_tokens", 1))
    return -(-tokens // blk) * blk


def memory(arch: ModelArch, fmt, dev: hardware.Device, rt: Runtime, batch: int, prompt_len: int,
           new_tokens: int) -> dict:
    """Device memory as the runtime holds it: weights, KV, activations/compute buffers, CUDA graphs,
    context; ``required_bytes`` is what the request needs, ``device_bytes`` what the runtime takes
    (vLLM: its whole reservation), ``fits`` whether the request fits in what the runtime can have, and
    ``max_sequences`` how many sequences of prompt + new tokens the KV memory holds."""
    from engine.estimate import memory as M
    m = rt.memory
    weights = F.weights_bytes(arch, fmt, 1)
    kv_tok = arch.kv_cache_bytes_per_token(2)
    seq_tokens = prompt_len + new_tokens
    kv_need = batch * _kv_tokens(rt, seq_tokens) * kv_tok
    ctx = M.context_bytes(dev, "infer", ())[0] if dev.kind in ("gpu", "edge") else 0
    h, V = arch.hidden_size, arch.vocab_size
    I = arch.intermediate_size * (arch.experts_per_token if arch.num_experts else 1)
    usable = dev.memory_bytes
    parts = {"weights": weights}
    if m["kind"] in ("reserve", "reserve-free"):
        act = int(m["activation_tokens"] * 2 * (2 * I + 4 * h) + rt.max_batch * V * 4)
        graphs = int(m.get("graph_bytes", 0))
        parts.update(activations=act, cuda_graphs=graphs)
        fixed = weights + act + graphs + ctx
        if m["kind"] == "reserve":
            util = m["gpu_memory_utilization"]
            reserved = int(util * usable)
            why = f"vLLM reserves gpu_memory_utilization {util:g} x {usable / 1e9:.1f} GB"
        else:
            util = m["kv_cache_free_gpu_mem_fraction"]
            reserved = int(fixed + util * max(usable - fixed, 0))
            why = f"TRT-LLM gives kv_cache_free_gpu_mem_fraction {util:g} of what the weights leave to KV blocks"
        pool = max(reserved - fixed, 0)
        parts["kv_cache"] = pool
        required = fixed + kv_need
        fits = required <= reserved
        device = reserved if fits else int(math.ceil(required / util)) if m["kind"] == "reserve" else required
        max_seq = int(pool // (_kv_tokens(rt, seq_tokens) * kv_tok)) if kv_tok else 0
        note = (f"{why}: weights {weights / 1e9:.2f} GB + profiling activations {act / 1e9:.2f} GB + CUDA graphs "
                f"{graphs / 1e9:.2f} GB + context {ctx / 1e9:.2f} GB; the rest, {pool / 1e9:.2f} GB, is KV blocks "
                f"({max_seq} sequences of {seq_tokens} tokens)")
        peak = reserved - ctx
    else:
        ub = int(m.get("ubatch", 512))
        compute = int(min(ub, max(prompt_len, 1) * batch) * (V * 4 + 4 * (2 * I + 4 * h)))
        over = int(m.get("overhead_bytes", 0))
        parts.update(kv_cache=int(kv_need), compute_buffer=compute, runtime_overhead=over)
        peak = int(weights + kv_need + compute + over)
        required = peak + ctx
        device = required
        fits = required <= usable
        free = usable - (weights + compute + over + ctx)
        max_seq = int(max(free, 0) // (seq_tokens * kv_tok)) if kv_tok else 0
        note = (f"{rt.id} allocates the context's KV up front: {batch} x {seq_tokens} tokens x {kv_tok:,.0f} B = "
                f"{kv_need / 1e9:.2f} GB f16, + compute buffer {compute / 1e9:.2f} GB (ubatch {ub} x vocab logits)"
                + (f" + runtime {over / 1e6:.0f} MB" if over else "")
                + (f" + CUDA context {ctx / 1e9:.2f} GB" if ctx else ""))
    return {"weights_bytes": weights, "peak_allocated_bytes": int(peak), "device_bytes": int(device),
            "required_bytes": int(required), "fits": bool(fits), "limit_bytes": usable, "breakdown": parts,
            "cuda_context_bytes": ctx, "max_sequences": max_seq, "kv_cache_bytes": int(kv_need), "formula": note}


# ---- serving capacity ----------------------------------------------------------------------------------

def capacity(step_s, max_batch: int, goal_ms: float | None, price_per_hour: float | None,
             memory_limit: int | None = None) -> dict:
    """The largest batch B <= max_batch (and <= what memory holds) whose decode step meets
    ``goal_ms`` per token, the tokens/s there (B / step) and the price of a million tokens.
    ``step_s(B)`` is the seconds per decode step at batch B (increasing in B)."""
    cap = max(1, min(max_batch, memory_limit if memory_limit is not None else max_batch))
    ok = (lambda b: True) if goal_ms is None else (lambda b: step_s(b) * 1e3 <= goal_ms)
    if not ok(1):
        b = 0
    else:
        lo, hi = 1, cap
        while lo < hi:                      # largest b in [1, cap] with ok(b); ok is monotone
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
        b = lo
    out = {"max_batch_considered": cap, "max_ms_per_token": goal_ms, "batch": b}
    if b == 0:
        ms = step_s(1) * 1e3
        out.update(tokens_per_s=0.0, ms_per_token=ms, usd_per_million_tokens=None,
                   why=f"no batch meets {goal_ms:g} ms/token: batch 1 takes {ms:.2f} ms")
        return out
    s = step_s(b)
    tps = b / s
    usd = price_per_hour / (tps * 3600) * 1e6 if price_per_hour else None
    limit = ("its batching limit" if cap == max_batch else "what the KV memory holds")
    out.update(tokens_per_s=tps, ms_per_token=s * 1e3, usd_per_million_tokens=usd,
               why=(f"largest batch <= {cap} ({limit})" + (f" with <= {goal_ms:g} ms/token" if goal_ms else "")
                    + f": {b} sequences x {1 / s:.1f} tokens/s = {tps:,.0f} tokens/s"
                    + (f"; {price_per_hour:g} USD/h / ({tps:,.0f} x 3600) x 1e6 = {usd:.3f} USD per million tokens"
                       if usd is not None else "; no price for this device")))
    return out


def efficiency_group(rt: Runtime, kind: str, fmt) -> str:
    """What one bw_efficiency of the runtime covers on a device kind: the format's class where the
    runtime lists it for that kind, else ``default`` (the classes pooled)."""
    cls = format_class(fmt)
    return cls if cls in (rt.decode.get("bw_efficiency") or {}).get(kind, {}) else "default"


_EVIDENCE: dict = {}


def evidence_rows(rt: Runtime, kind: str, fmt) -> list[dict]:
    """The decode / request-latency rows of presets/evidence/runtime_speed.csv that speak for this
    runtime's efficiency on this device kind and format (the same class group, or the pooled one)."""
    if not _EVIDENCE:
        import csv
        from engine.presets import PRESETS_DIR
        with open(PRESETS_DIR / "evidence" / "runtime_speed.csv", encoding="utf-8") as fh:
            _EVIDENCE["rows"] = [r for r in csv.DictReader(fh)
                                 if r["metric"] in ("decode_tokens_per_s", "request_latency_s")]
    g = efficiency_group(rt, kind, fmt)
    return [r for r in _EVIDENCE["rows"] if r["runtime"] == rt.id and r["device_kind"] == kind
            and r["format"] in F.formats() and efficiency_group(rt, kind, r["format"]) == g]


def interval_kind(rt: Runtime, dev: hardware.Device, fmt=None) -> str:
    """fitted: the runtime's terms for this device kind were fitted on evidence rows of this format's
    class; prior: rows exist (an out-of-sample check) but the terms are priors; unmeasured: no row of
    this runtime x device kind x class at all."""
    fitted = dev.kind in (rt.decode.get("fitted_on") or [])
    if fmt is None:
        return "fitted" if fitted else "prior"
    rows = evidence_rows(rt, dev.kind, fmt)
    return ("fitted" if fitted else "prior") if rows else "unmeasured"


def interval(rt: Runtime, dev: hardware.Device, fmt=None) -> tuple[float, float]:
    """The tokens/s interval factors by how much evidence stands behind the terms (``interval_kind``)."""
    iv = _data()["interval"]
    return tuple(iv[interval_kind(rt, dev, fmt)])

"""Speed: training tokens/s and inference prefill / decode, as a roofline and as the Hugging Face
path the engine runs. Pure Python; constants with their evidence in presets/estimate/speed.yaml.

Training: step time = FLOPs per step / (bf16 peak x MFU) + per-layer host overhead + the
optimizer's memory traffic. FLOPs per token: 2 per active matmul parameter forward; backward
2x that for trained weights (grad input + grad weight) and 1x for frozen ones (grad input
only; LoRA/QLoRA); gradient checkpointing recomputes the layers' forward once more; causal
attention adds 2*T*q_dim per layer forward and twice that backward.

Inference: prefill is compute-bound (2 x active params x tokens + attention) or bound by
reading the weights once; decode is bandwidth-bound: each step streams the active weights in
their format plus the KV cache of every sequence; batch B shares the weight read.
"""
from __future__ import annotations

from engine import hardware, quant
from engine.estimate import formats as F
from engine.models import ModelArch
from engine.presets import load_yaml


def sp() -> dict:
    return load_yaml("estimate/speed.yaml")


def matmul_params(arch: ModelArch) -> tuple[int, int]:
    """(active block-linear params per token, lm_head matmul params): what costs 2 FLOPs each."""
    per_layer = sum(l.params // l.count * l.active for l in arch.linears)
    return arch.num_layers * per_layer, arch.vocab_size * arch.hidden_size


def attention_flops_per_token(arch: ModelArch, context: int) -> float:
    """Causal QK^T and AV: 2 x 2 x context x q_dim, halved by the causal mask, per layer."""
    return arch.num_layers * 2 * context * arch.num_heads * arch.head_dim


def train_flops_per_token(arch: ModelArch, method: str, seq_len: int, grad_ckpt: bool, lora_rank: int = 16) -> dict:
    blocks, head = matmul_params(arch)
    attn = attention_flops_per_token(arch, seq_len)
    fwd = 2 * (blocks + head) + attn
    frozen = method in ("lora", "qlora")
    bwd = (2 * (blocks + head) if frozen else 4 * (blocks + head)) + 2 * attn
    lora = 6 * arch.lora_params(lora_rank) if frozen else 0
    rec = (2 * blocks + attn) if grad_ckpt else 0
    total = fwd + bwd + lora + rec
    return {"forward": fwd, "backward": bwd, "lora": lora, "recompute": rec, "total": total,
            "formula": f"forward 2x{blocks + head:,} + attention {attn:,.0f}; backward "
                       f"{'2x (frozen base: grad input only)' if frozen else '4x (grad input + grad weight)'}"
                       f" + 2x attention{'; LoRA 6 x adapters' if frozen else ''}"
                       f"{'; checkpointing recomputes the layer forward' if grad_ckpt else ''}"}


def train_constants() -> dict:
    return sp()["train"]


def step_quantities(arch: ModelArch, method: str, precision: str, seq_len: int, batch_size: int, grad_ckpt: bool,
                    lora_rank: int, dev: hardware.Device, optimizer: str = "adamw") -> dict:
    """The physical work of one training step (micro-batch), before any fitted constant:
    tensor-core FLOPs, elementwise bytes, NF4 dequantization bytes, materialised attention
    scores, optimizer bytes, and how many decoder-layer passes the host drives."""
    from engine.estimate import memory as M
    T, B = seq_len, batch_size
    BT = T * B
    L, h, I = arch.num_layers, arch.hidden_size, arch.intermediate_size * (arch.experts_per_token or 1)
    rc = M.recipe(method, precision)
    ck = 1 if grad_ckpt else 0
    fl = train_flops_per_token(arch, method, T, grad_ckpt, lora_rank)
    fwd_passes = 1 + ck                     # forward, and the recomputed forward under checkpointing
    passes = fwd_passes + 2                 # backward moves about twice a forward's bytes
    resid = 4 if rc.residual == 4 else 2    # qlora (fp32 hidden states after kbit prep) and fp32-amp
    # elementwise traffic per token per layer and pass: norms, rope, residual adds, the gated
    # MLP's activation and product, the casts around each linear (counted in the residual dtype)
    per_tok = (3 * I + 6 * h) * resid
    if rc.adapters:                         # peft's fp32 adapters: cast in, A, B, scale, add back
        per_tok += sum((l.in_features + l.out_features * l.active) * 4 for l in arch.linears if l.lora_target)
    elem = passes * L * BT * per_tok
    lin_params = sum(l.params // l.count * l.active for l in arch.linears) * L
    if rc.autocast:                         # bf16 copies of the fp32 weights in every forward
        elem += fwd_passes * lin_params * 6
    if method == "qat":                     # fake-quantize every weight each forward (read + write bf16)
        elem += fwd_passes * lin_params * 4
    kern = M.attention_kernel(arch, 2 if rc.autocast else max(rc.residual, 2))
    scores = L * B * arch.num_heads * T * T * passes if kern in ("math", "eager") else 0
    # bitsandbytes 4-bit: every frozen base linear is dequantized to bf16 in each forward, each
    # backward (grad input) and each recompute
    deq = (fwd_passes + 1) * lin_params if rc.base_4bit else 0
    n_train = M.lora_param_count(arch, lora_rank) if rc.adapters else arch.total_params
    pbytes = 4 if (precision == "fp32-amp" or rc.adapters) else 2
    # AdamW reads param, grad, both states and writes param and states: ~6 x the dtype; an 8-bit
    # optimizer streams 1-byte states instead (+ the fp32 absmax)
    opt_bytes = n_train * (6 * pbytes if optimizer == "adamw" else 3 * pbytes + 4)
    return {"gemm_flops": fl["total"] * BT, "flops_per_token": fl["total"], "flops_formula": fl["formula"],
            "tokens": BT, "elementwise_bytes": elem, "attention_scores": scores, "attention_kernel": kern,
            "dequant_params": deq, "optimizer_bytes": opt_bytes, "host_forward_layers": L * fwd_passes,
            "host_backward_layers": L, "layers": L, "amp": rc.autocast}


def gemm_efficiency(dev: hardware.Device, arch: ModelArch, tokens: int, c: dict | None = None) -> float:
    """Achieved fraction of the 16-bit tensor peak in the step's matmuls: the large-GEMM
    efficiency of the GPU's architecture, lowered for narrow layers (h/(h + h_half)) and for few
    tokens per step (tokens/(tokens + tokens_half)): small GEMMs leave SMs idle."""
    c = c or train_constants()
    e = c["gemm_efficiency"] * c["arch_factor"].get(dev.arch, 1.0)
    return e * arch.hidden_size / (arch.hidden_size + c["h_half"]) * tokens / (tokens + c["tokens_half"])


def combine(gpu_s: float, host_s: float, k: float) -> float:
    """Host launches and GPU work overlap (eager PyTorch queues kernels asynchronously): the
    step takes the larger of the two, softened where both matter: (gpu^k + host^k)^(1/k)."""
    if gpu_s <= 0 or host_s <= 0:
        return gpu_s + host_s
    return (gpu_s ** k + host_s ** k) ** (1 / k)


def step_time(q: dict, arch: ModelArch, method: str, dev: hardware.Device, c: dict, grad_accum: int = 1) -> dict:
    """Seconds of one micro-batch step from its quantities (step_quantities) and the constants."""
    peak = dev.matmul_tflops * 1e12
    bw = dev.bandwidth_gbs * 1e9
    u = gemm_efficiency(dev, arch, q["tokens"], c)
    gemm = q["gemm_flops"] / (peak * u) if peak else float("inf")
    elem = c["elementwise_traffic"] * q["elementwise_bytes"] / bw
    attn = c["math_attention_bytes_per_score"] * q["attention_scores"] / bw
    deq = c["nf4_dequant_bytes_per_param"] * q["dequant_params"] / bw
    opt = q["optimizer_bytes"] / (bw * c["optimizer_bw_efficiency"]) / grad_accum
    host_c = c["host_s_per_layer"][method]
    host = q["host_forward_layers"] * host_c["forward"] + q["host_backward_layers"] * host_c["backward"]
    gpu = gemm + elem + attn + deq
    k = c["overlap_exponent"] if dev.kind == "gpu" else 1.0      # a CPU computes and dispatches on the same cores
    return {"gemm_s": gemm, "elementwise_s": elem, "attention_scores_s": attn, "nf4_dequant_s": deq,
            "optimizer_s": opt, "host_s": host, "gpu_s": gpu, "step_s": combine(gpu, host, k) + opt,
            "gemm_efficiency": u, "k": k}


def train_speed(arch: ModelArch, method: str, precision: str, seq_len: int, batch_size: int, grad_ckpt: bool,
                lora_rank: int, dev: hardware.Device, grad_accum: int = 1, optimizer: str = "adamw",
                constants: dict | None = None) -> dict:
    """Tokens/s and step time of the reference recipe: GPU time (matmuls at the fitted GEMM
    efficiency, elementwise traffic, NF4 dequantization, materialised attention scores,
    optimizer traffic) and host time (per decoder-layer pass) combined as overlapping work.
    ``grad_accum`` micro-batches share one optimizer step. ``constants``: presets' train
    section unless given (the bench fits them)."""
    c = constants or train_constants()
    q = step_quantities(arch, method, precision, seq_len, batch_size, grad_ckpt, lora_rank, dev, optimizer)
    t = step_time(q, arch, method, dev, c, grad_accum)
    BT, u, k, host_c = q["tokens"], t["gemm_efficiency"], t["k"], c["host_s_per_layer"][method]
    gemm, elem, attn, deq, opt, host, gpu, step = (t[x] for x in ("gemm_s", "elementwise_s", "attention_scores_s",
                                                                 "nf4_dequant_s", "optimizer_s", "host_s", "gpu_s",
                                                                 "step_s"))
    peak = dev.matmul_tflops * 1e12
    ref = c.get("reference", {})
    on_ref = dev.id == ref.get("gpu")
    lo, hi = c["interval_reference"] if on_ref else c["interval"]
    tps = BT / step
    mfu = q["gemm_flops"] / (peak * step) if peak else 0.0
    return {"tokens_per_s": tps, "tokens_per_s_low": tps * lo, "tokens_per_s_high": tps * hi,
            "step_time_s": step, "flops_per_token": q["flops_per_token"], "mfu": mfu, "gemm_efficiency": u,
            "step_time_parts": {k2: t[k2] for k2 in ("gemm_s", "elementwise_s", "attention_scores_s", "nf4_dequant_s",
                                                    "gpu_s", "host_s", "optimizer_s")},
            "bound": "host" if host > gpu else "gpu",
            "calibrated_on": (f"fitted on {ref.get('rows')} measured steps of {ref.get('gpu')} "
                              f"({ref.get('evidence')})" + ("" if on_ref else
                              f"; transferred to {dev.id} by its peak FLOP/s and bandwidth, host times as measured"))
            if ref else "",
            "formula": f"{q['flops_formula']}; GPU: matmuls at {u:.2f} of {dev.matmul_tflops:g} TFLOP/s ({dev.arch or dev.kind}, "
                       f"h={arch.hidden_size}, {BT} tokens/step) {gemm * 1e3:.1f} ms + elementwise {elem * 1e3:.1f} ms"
                       + (f" + attention scores ({q['attention_kernel']} kernel) {attn * 1e3:.1f} ms" if attn else "")
                       + (f" + NF4 dequantization {deq * 1e3:.1f} ms" if deq else "")
                       + f"; host {q['host_forward_layers']} forward + {q['host_backward_layers']} backward layer passes x "
                         f"{host_c['forward'] * 1e3:.2f}/{host_c['backward'] * 1e3:.2f} ms = {host * 1e3:.1f} ms; "
                         f"overlapped as (gpu^{k:g} + host^{k:g})^(1/{k:g}) + optimizer {opt * 1e3:.2f} ms"
                       + (f" (one step per {grad_accum} micro-batches)" if grad_accum > 1 else "")}


def dataset_time(tokens: float, tokens_per_s: float, epochs: float = 1.0) -> dict:
    """Wall time to train on ``tokens`` tokens for ``epochs`` epochs at a throughput."""
    s = tokens * epochs / tokens_per_s
    return {"seconds": s, "hours": s / 3600}


def infer_quantities(arch: ModelArch, fmt, batch_size: int, prompt_len: int, new_tokens: int, dev: hardware.Device,
                     plain_forward: bool = False) -> dict:
    """What one prefill and one decode step move and compute, before any fitted constant.
    ``plain_forward``: the prefill is a bare forward with logits at every position (as the
    H100 reference measured it) instead of generate's last-position logits."""
    fmt = F.get(fmt)
    B, P, N = batch_size, prompt_len, new_tokens
    blocks, head = matmul_params(arch)
    peak = dev.matmul_tflops * 1e12
    if fmt.tensor_cores == "int8" and dev.int8_tops:          # the format's matmuls run in int8 / fp8
        peak = dev.int8_tops * 1e12
    if fmt.tensor_cores == "fp8" and dev.fp8_tflops:
        peak = dev.fp8_tflops * 1e12
    wread = F.bytes_read_per_token(arch, fmt)
    kv_tok = arch.kv_cache_bytes_per_token(2)
    head_pos = P if plain_forward else 1
    pf_flops = B * (2 * blocks * P + attention_flops_per_token(arch, P) * P / 2) + B * 2 * head * head_pos
    ctx = P + (N - 1) / 2                   # average context over the generated tokens
    step_bytes = wread + B * ctx * kv_tok
    step_flops = B * (2 * (blocks + head) + attention_flops_per_token(arch, ctx) * 2)
    # bitsandbytes 4-bit: its fused gemv serves one token; more rows dequantize every weight to bf16
    lin_params = sum(l.params // l.count * l.active for l in arch.linears) * arch.num_layers
    bnb4 = fmt.kind == "bnb-4bit"
    return {"fmt": fmt, "peak": peak, "weights_read": wread, "prefill_flops": pf_flops, "prefill_tokens": B * P,
            "step_bytes": step_bytes, "step_flops": step_flops, "kv_bytes_per_token": kv_tok,
            "prefill_dequant_params": lin_params if bnb4 else 0, "step_dequant_params": lin_params if bnb4 and B > 1 else 0,
            "layers": arch.num_layers, "plain_forward": plain_forward}


def format_constants(fmt_id: str, c: dict | None = None) -> dict:
    """A weights format's HF generate constants: the ``speed`` of its presets/quant/formats.yaml
    entry (``step_overhead_s`` defaulting to the infer section's), or an override in ``c["formats"]``
    (the bench fits them that way)."""
    c = c or sp()["infer"]
    over = (c.get("formats") or {}).get(fmt_id)
    base = F.get(fmt_id).speed or F.get("bf16").speed
    return {"step_overhead_s": c["step_overhead_s"], **base, **(over or {})}


def infer_times(q: dict, arch: ModelArch, dev: hardware.Device, c: dict | None = None, tc: dict | None = None) -> dict:
    """Prefill seconds and decode seconds per step on the Hugging Face path (GPU) or a
    bandwidth-bound runtime (other devices), from infer_quantities and the constants (``c``:
    the infer section; ``tc``: the train section, whose GEMM efficiency, NF4 dequantization
    bytes and overlap exponent are the same physics)."""
    c = c or sp()["infer"]
    tc = tc or sp()["train"]
    bw = dev.bandwidth_gbs * 1e9
    peak = q["peak"]
    fmt = q["fmt"]
    L = q["layers"]
    if dev.kind == "gpu":
        fs = format_constants(fmt.id, c)
        eff_bw, lay, stp, pf_eff = fs["decode_bw_efficiency"], fs["layer_overhead_s"], fs["step_overhead_s"], \
            fs["prefill_efficiency"]
        u = gemm_efficiency(dev, arch, q["prefill_tokens"], tc) * pf_eff
        k = tc["overlap_exponent"]
        deq_b = tc["nf4_dequant_bytes_per_param"]
        dec_mfu = c["decode_flops_efficiency"]
    else:
        g = c["non_gpu"]
        eff_bw, lay, stp, u, k, deq_b, dec_mfu = g["decode_bw_efficiency"], g["layer_overhead_s"], 0.0, \
            g["prefill_mfu"], 1.0, 0.0, g["prefill_mfu"]
    pf_gpu = max(q["prefill_flops"] / (peak * u), q["weights_read"] / (bw * eff_bw)) + deq_b * q["prefill_dequant_params"] / bw
    pf_host = L * lay + (0.0 if q["plain_forward"] else stp)
    st_gpu = max(q["step_bytes"] / (bw * eff_bw), q["step_flops"] / (peak * dec_mfu)) + deq_b * q["step_dequant_params"] / bw
    st_host = L * lay + stp
    return {"prefill_s": combine(pf_gpu, pf_host, k), "decode_s_per_token": combine(st_gpu, st_host, k),
            "decode_s_without_step_overhead": combine(st_gpu, L * lay, k),
            "prefill_gpu_s": pf_gpu, "prefill_host_s": pf_host, "decode_gpu_s": st_gpu, "decode_host_s": st_host,
            "eff_bw": eff_bw, "layer_overhead_s": lay, "step_overhead_s": stp, "k": k}


def infer_speed(arch: ModelArch, fmt, batch_size: int, prompt_len: int, new_tokens: int,
                dev: hardware.Device, plain_forward: bool = False, constants: dict | None = None) -> dict:
    """Prefill seconds and decode tokens/s per sequence: roofline bound and the HF generate path."""
    c = constants or sp()["infer"]
    q = infer_quantities(arch, fmt, batch_size, prompt_len, new_tokens, dev, plain_forward)
    fmt = q["fmt"]
    B = batch_size
    bw = dev.bandwidth_gbs * 1e9
    peak = q["peak"]
    roof_prefill = max(q["prefill_flops"] / peak, q["weights_read"] / bw)
    roof_step = max(q["step_bytes"] / bw, q["step_flops"] / peak)
    out = {"roofline": {"prefill_s": roof_prefill, "decode_s_per_token": roof_step,
                        "decode_tokens_per_s": 1 / roof_step, "decode_tokens_per_s_total": B / roof_step,
                        "bytes_per_step": q["step_bytes"],
                        "formula": "prefill max(FLOPs/peak, weights/bandwidth); decode (weights + KV read)/bandwidth"}}
    t = infer_times(q, arch, dev, c)
    measured = dev.kind == "gpu" and fmt.id in c.get("measured_formats", ())
    ref = sp()["train"].get("reference", {})
    if dev.kind == "gpu":
        note = (f"HF generate, {fmt.id} kernels: GPU {t['decode_gpu_s'] * 1e3:.1f} ms/step at {t['eff_bw']:.0%} of "
                f"bandwidth; host {t['layer_overhead_s'] * 1e3:.2f} ms per layer + {t['step_overhead_s'] * 1e3:.1f} ms per "
                f"generate step = {t['decode_host_s'] * 1e3:.1f} ms; overlapped (gpu^{t['k']:g} + host^{t['k']:g})^(1/{t['k']:g})"
                + (f"; {fmt.id} terms fitted on the {ref.get('gpu')} reference measurements" if measured else
                   f"; {fmt.id} terms are priors (not measured on the reference), host terms scaled to the reference host"))
    else:
        note = f"{dev.kind} runtime (llama.cpp/ExecuTorch class): bandwidth-bound decode at {t['eff_bw']:.0%}"
    lo, hi = c["interval_measured"] if measured else c["interval"]
    step, pf = t["decode_s_per_token"], t["prefill_s"]
    # the fast end also covers a host that does not pay the per-step generate overhead measured
    # on the reference (it dominates bf16 at batch 1 there)
    fast = max(hi / step, 1 / t["decode_s_without_step_overhead"]) if t["step_overhead_s"] else hi / step
    out["hf"] = {"prefill_s": pf, "prefill_s_low": pf / hi, "prefill_s_high": pf / lo,
                 "decode_s_per_token": step, "decode_tokens_per_s": 1 / step,
                 "decode_tokens_per_s_low": lo / step, "decode_tokens_per_s_high": fast,
                 "decode_tokens_per_s_total": B / step, "formula": note,
                 "parts": {k2: t[k2] for k2 in ("prefill_gpu_s", "prefill_host_s", "decode_gpu_s", "decode_host_s")},
                 "bound": "host" if t["decode_host_s"] > t["decode_gpu_s"] else "gpu"}
    return out


def quantize_time(arch: ModelArch, method: str, calibration_samples: int, seq_len: int, dev: hardware.Device) -> dict:
    """Time of a quantize stage: calibration forwards and the per-linear solve (GPTQ) or scale search
    (AWQ) for methods that calibrate (engine/quant.py), else loading the 16-bit checkpoint."""
    st = sp()["stages"]
    total_bytes = F.weights_bytes(arch, "bf16", 1)
    cal = quant.get(method).calibration
    if cal:
        blocks, _ = matmul_params(arch)
        tokens = calibration_samples * seq_len
        fwd = 2 * 2 * blocks * tokens / (dev.matmul_tflops * 1e12 * 0.3)          # capture + replay forwards
        solve = sum(l.count * (l.in_features ** 3 / 3 + 2 * l.out_features * l.in_features ** 2)
                    for l in arch.linears) * arch.num_layers / (dev.matmul_tflops * 1e12 * st["gptq_quant_flops_efficiency"])
        if cal == "scale-search":
            solve = st["awq_grid"] * 2 * blocks * min(tokens, 64 * 512) / (dev.matmul_tflops * 1e12 * 0.3)
        load = total_bytes / (st["bnb_load_gbps"] * 1e9)
        s = fwd + solve + load
        formula = f"calibration forwards {fwd:.0f} s + per-linear solve {solve:.0f} s + loading {load:.0f} s"
    else:
        s = total_bytes / (st["bnb_load_gbps"] * 1e9)
        formula = "quantized while loading: bound by reading the 16-bit checkpoint"
    return {"time_s": s, "time_s_low": s * 0.5, "time_s_high": s * 2.0, "formula": formula,
            "save_s": total_bytes / (st["save_gbps"] * 1e9)}

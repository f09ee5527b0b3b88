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


def mfu(method: str, dev: hardware.Device, arch: ModelArch, tokens: int) -> float:
    t = sp()["train"]
    base = t["mfu"][method] * t["arch_factor"].get(dev.arch, 0.8)
    return base * arch.hidden_size / (arch.hidden_size + t["h_half"]) * tokens / (tokens + t["tokens_half"])


def train_speed(arch: ModelArch, method: str, precision: str, seq_len: int, batch_size: int, grad_ckpt: bool,
                lora_rank: int, dev: hardware.Device) -> dict:
    t = sp()["train"]
    BT = seq_len * batch_size
    fl = train_flops_per_token(arch, method, seq_len, grad_ckpt, lora_rank)
    peak = dev.matmul_tflops * 1e12
    if precision == "fp32-amp":
        peak *= 0.9                      # autocast casts of fp32 weights every step
    u = mfu(method, dev, arch, BT)
    compute = fl["total"] * BT / (peak * u) if peak else float("inf")
    overhead = arch.num_layers * t["overhead_per_layer_s"][method] * (1.3 if grad_ckpt else 1.0)
    trainable = arch.lora_params(lora_rank) if method in ("lora", "qlora") else arch.total_params
    pbytes = 4 if (precision == "fp32-amp" or method in ("lora", "qlora")) else 2
    opt = 6 * trainable * pbytes / (dev.bandwidth_gbs * 1e9 * t["optimizer_bw_efficiency"])
    step = compute + overhead + opt
    lo, hi = t["interval"]
    tps = BT / step
    return {"tokens_per_s": tps, "tokens_per_s_low": tps * lo, "tokens_per_s_high": tps * hi,
            "step_time_s": step, "flops_per_token": fl["total"], "mfu": u,
            "step_time_parts": {"compute_s": compute, "host_overhead_s": overhead, "optimizer_s": opt},
            "formula": f"{fl['formula']}; MFU {u:.2f} of {dev.matmul_tflops:g} TFLOP/s ({method}, {dev.arch or dev.kind}, "
                       f"h={arch.hidden_size}, {BT} tokens/step) + {arch.num_layers} layers x "
                       f"{t['overhead_per_layer_s'][method] * 1e3:.2f} ms host overhead + AdamW traffic"}


def dataset_time(tokens: float, tokens_per_s: float, epochs: float = 1.0) -> dict:
    """Wall time to train on ``tokens`` tokens for ``epochs`` epochs at a throughput."""
    s = tokens * epochs / tokens_per_s
    return {"seconds": s, "hours": s / 3600}


def infer_speed(arch: ModelArch, fmt, batch_size: int, prompt_len: int, new_tokens: int,
                dev: hardware.Device) -> dict:
    """Prefill seconds and decode tokens/s per sequence: roofline bound and the HF generate path."""
    fmt = F.get(fmt)
    s = sp()["infer"]
    B, P, N = batch_size, prompt_len, new_tokens
    blocks, head = matmul_params(arch)
    bw = dev.bandwidth_gbs * 1e9
    peak = dev.matmul_tflops * 1e12
    if fmt.tensor_cores == "int8" and dev.int8_tops:          # the format's matmuls run in int8 / fp8
        peak = dev.int8_tops * 1e12
    if fmt.tensor_cores == "fp8" and dev.fp8_tflops:
        peak = dev.fp8_tflops * 1e12
    wread = F.bytes_read_per_token(arch, fmt)
    kv_tok = arch.kv_cache_bytes_per_token(2)
    # prefill: all prompt tokens through every layer, logits of the last position only
    pf_flops = B * (2 * blocks * P + attention_flops_per_token(arch, P) * P / 2) + B * 2 * head
    roof_prefill = max(pf_flops / peak, wread / bw)
    # decode: average context over the generated tokens
    ctx = P + (N - 1) / 2
    step_bytes = wread + B * ctx * kv_tok
    step_flops = B * (2 * (blocks + head) + attention_flops_per_token(arch, ctx) * 2)
    roof_step = max(step_bytes / bw, step_flops / peak)
    out = {"roofline": {"prefill_s": roof_prefill, "decode_s_per_token": roof_step,
                        "decode_tokens_per_s": 1 / roof_step, "decode_tokens_per_s_total": B / roof_step,
                        "bytes_per_step": step_bytes,
                        "formula": "prefill max(FLOPs/peak, weights/bandwidth); decode (weights + KV read)/bandwidth"}}
    if dev.kind == "gpu":
        fs = fmt.speed or F.get("bf16").speed
        eff_bw, ovh, pf_eff, mfu_p = fs["decode_bw_efficiency"], fs["layer_overhead_s"], fs["prefill_efficiency"], s["prefill_mfu"]
        step_ovh = s["step_overhead_s"]
        note = f"HF generate, {fmt.id} kernels: {eff_bw:.0%} of bandwidth, {ovh * 1e3:.2f} ms host time per layer per step"
    else:
        g = s["non_gpu"]
        eff_bw, ovh, pf_eff, mfu_p, step_ovh = g["decode_bw_efficiency"], g["layer_overhead_s"], 1.0, g["prefill_mfu"], 0.0
        note = f"{dev.kind} runtime (llama.cpp/ExecuTorch class): bandwidth-bound decode at {eff_bw:.0%}"
    hf_prefill = max(pf_flops / (peak * mfu_p * pf_eff), wread / (bw * eff_bw)) + arch.num_layers * ovh + step_ovh
    # batch > 1 on bitsandbytes 4-bit: the gemv kernel is batch-1 only; larger batches dequantize per matmul
    deq = 0.0
    if fmt.kind == "bnb-4bit" and B > 1:
        deq = 2 * F.weights_breakdown(arch, "bf16", 1)["block_linears"] / bw
    hf_step = max(step_bytes / (bw * eff_bw), step_flops / (peak * mfu_p)) + deq + arch.num_layers * ovh + step_ovh
    lo, hi = s["interval"]
    out["hf"] = {"prefill_s": hf_prefill, "prefill_s_low": hf_prefill / hi, "prefill_s_high": hf_prefill / lo,
                 "decode_s_per_token": hf_step, "decode_tokens_per_s": 1 / hf_step,
                 "decode_tokens_per_s_low": lo / hf_step, "decode_tokens_per_s_high": hi / hf_step,
                 "decode_tokens_per_s_total": B / hf_step, "formula": note}
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

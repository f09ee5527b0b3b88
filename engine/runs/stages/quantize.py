"""The quantize stage: post-training quantization of the current model, saved in a format
``from_pretrained`` loads back (the quantization config goes into config.json).

    int8                 bitsandbytes LLM.int8 (outlier threshold 6.0)          CPU and GPU
    nf4 / fp4            bitsandbytes 4-bit, blocksize 64, double quant          CPU and GPU
    gptq                 gptqmodel GPTQ, 2/3/4/8-bit, group size, calibration    CPU and GPU
                         samples from the run's training split
    awq                  gptqmodel AWQ (GEMM format; on the CPU through its      CPU and GPU
                         torch kernel), calibration as GPTQ
    torchao-int8         torchao Int8WeightOnlyConfig (per channel)               CPU and GPU
    torchao-int4         torchao Int4WeightOnlyConfig (GPU, tinygemm layout);     GPU (CPU: Intx stand-in,
                         IntxWeightOnlyConfig(int4) on the CPU                    with a warning)
    dynamic-int8         torchao Int8DynamicActivationInt8WeightConfig (W8A8)    CPU and GPU
    fp8                  torchao Float8DynamicActivationFloat8WeightConfig        GPU with FP8 (sm_89+)

The model is loaded in its saved 16-bit dtype (so what stays unquantized - embeddings,
lm_head, norms - is stored 16-bit, as it would be served).
"""
from __future__ import annotations

import time
from pathlib import Path

from engine.errors import InputError
from engine.runs.stages import common

METHODS = ("int8", "nf4", "fp4", "gptq", "awq", "torchao-int8", "torchao-int4", "dynamic-int8", "fp8")
GPU_ONLY = ("fp8",)
CALIBRATION = ("gptq", "awq")


def settings(stage: dict) -> dict:
    """The quantize stage's parameters with their defaults."""
    m = stage.get("method")
    if m not in METHODS:
        raise InputError(f"unknown quantization method {m!r}; known: {', '.join(METHODS)}", field="strategy")
    out = {"method": m}
    if m in ("gptq", "awq"):
        out.update(bits=int(stage.get("bits") or 4), group_size=int(stage.get("group_size") or 128),
                   calibration_samples=int(stage.get("calibration_samples") or 128))
    elif m in ("nf4", "fp4"):
        dq = stage.get("double_quant")
        out.update(bits=4, double_quant=True if dq is None else bool(dq), blocksize=64)
    elif m == "torchao-int4":
        out.update(bits=4, group_size=int(stage.get("group_size") or 128))
    else:
        out.update(bits=8)
    return out


def check(stage: dict, model, device: str) -> dict:
    """Refuse settings that cannot work; ``model`` (a dir, config dict or ModelArch, or None)
    is used to check the group size against the layer widths."""
    s = settings(stage)
    m = s["method"]
    if m in GPU_ONLY and device != "cuda":
        raise InputError(f"quantization method {m} needs a GPU with FP8 support (Ada/Hopper/Blackwell); this run "
                         "is on the CPU. Use int8, dynamic-int8 or torchao-int8 instead", field="strategy")
    if m in ("gptq", "awq") and s["bits"] not in (2, 3, 4, 8):
        raise InputError(f"{m} bits must be 2, 3, 4 or 8, got {s['bits']}", field="quantize.bits")
    if m == "awq" and s["bits"] != 4:
        raise InputError(f"awq quantizes to 4 bits (its kernels are 4-bit); got bits {s['bits']}. "
                         "Use gptq for other widths", field="quantize.bits")
    gs = s.get("group_size")
    if gs is not None and gs != -1 and (gs <= 0 or gs & (gs - 1)):
        raise InputError(f"group size must be a power of two (32, 64, 128 ...) or -1 (per channel), got {gs}",
                         field="quantize.group_size")
    if gs and gs > 0 and model is not None:
        bad = {n: k for n, k in common.linear_in_features(model).items() if k % gs}
        if bad:
            raise InputError(f"group size {gs} does not divide the input size of "
                             + ", ".join(f"{n} ({k})" for n, k in bad.items())
                             + "; pick a smaller power of two that divides them", field="quantize.group_size")
    return s


def _calibration(ctx, tok, n: int) -> list[dict]:
    """The first ``n`` training examples (prompt + answer), as token ids."""
    ds = common.dataset(ctx)
    seq = ctx.spec.train.seq_len
    rows = []
    for ex in ds.train[:n]:
        ids = tok(ex.prompt + ex.completion, add_special_tokens=True)["input_ids"][:seq]
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
    if len(rows) < n:
        ctx.log(f"calibration: {len(rows)} samples (the training split has only {len(ds.train)} rows; "
                f"{n} were asked for)")
    return rows


def _gptqmodel(ctx, s: dict, src: str, out: Path) -> dict:
    common.setup_gptqmodel()
    from gptqmodel import GPTQModel, QuantizeConfig
    from gptqmodel.quantization.config import AWQConfig
    from gptqmodel.utils.backend import BACKEND
    tok = common.load_tokenizer(ctx.state.get("tokenizer_dir") or src)
    calib = _calibration(ctx, tok, s["calibration_samples"])
    if s["method"] == "awq":
        qc = AWQConfig(bits=s["bits"], group_size=s["group_size"])
        # gptqmodel picks its CUDA GEMM kernel by default; on the CPU its torch kernel does the work
        backend = BACKEND.AUTO if ctx.device == "cuda" else BACKEND.AWQ_TORCH
    else:
        qc = QuantizeConfig(bits=s["bits"], group_size=s["group_size"])
        backend = BACKEND.AUTO
    ctx.log(f"{s['method']}: {s['bits']}-bit, group {s['group_size']}, {len(calib)} calibration samples "
            f"(gptqmodel, device {ctx.device})")
    model = GPTQModel.load(src, qc, device="cuda:0" if ctx.device == "cuda" else "cpu")
    model.quantize(calib, batch_size=min(8, max(1, len(calib))), backend=backend, tokenizer=tok)
    model.save(str(out))
    common.save_tokenizer(ctx, out)
    return {"library": "gptqmodel", "calibration_samples_used": len(calib),
            "format": "awq-gemm" if s["method"] == "awq" else "gptq"}


def _bitsandbytes(ctx, s: dict, src: str, out: Path) -> dict:
    from transformers import BitsAndBytesConfig
    m = s["method"]
    if m == "int8":
        cfg = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0)
    else:
        cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=m, bnb_4bit_use_double_quant=s["double_quant"],
                                 bnb_4bit_compute_dtype=common.compute_dtype(ctx))
    model = common.load_model(ctx, src, dtype=common.base_dtype(ctx), quantization_config=cfg)
    model.save_pretrained(out)
    common.save_tokenizer(ctx, out)
    return {"library": "bitsandbytes"}


def torchao_ptq_config(ctx, s: dict):
    """(torchao config, what it is) for the torchao methods, by device."""
    import torch
    from torchao.quantization import (Int4WeightOnlyConfig, Int8DynamicActivationInt8WeightConfig,
                                      Int8WeightOnlyConfig, IntxWeightOnlyConfig, PerGroup)
    m = s["method"]
    if m == "torchao-int8":
        return Int8WeightOnlyConfig(), "torchao Int8WeightOnlyConfig (per-channel int8 weights)"
    if m == "dynamic-int8":
        return Int8DynamicActivationInt8WeightConfig(), "torchao Int8DynamicActivationInt8WeightConfig (W8A8)"
    if m == "torchao-int4":
        gs = s["group_size"]
        if ctx.device == "cuda":
            from torchao.quantization.quantize_.workflows import Int4PackingFormat
            return (Int4WeightOnlyConfig(group_size=gs, int4_packing_format=Int4PackingFormat.TILE_PACKED_TO_4D),
                    f"torchao Int4WeightOnlyConfig(group {gs}, tinygemm tile-packed)")
        ctx.warn(f"torchao int4 weight-only needs a GPU (its kernels are CUDA): on the CPU "
                 f"IntxWeightOnlyConfig(int4, group {gs}) stands in - the same grouped int4 weights, "
                 "served by torchao's portable kernel")
        return (IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(gs)),
                f"torchao IntxWeightOnlyConfig(int4, group {gs})")
    if m == "fp8":
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow
        major, minor = torch.cuda.get_device_capability()
        if (major, minor) < (8, 9):
            raise InputError(f"fp8 needs a GPU with FP8 tensor cores (compute capability 8.9+: Ada, Hopper, "
                             f"Blackwell); this one is {major}.{minor}. Use int8 or dynamic-int8", field="strategy")
        return (Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
                "torchao Float8DynamicActivationFloat8WeightConfig (E4M3, per-row scales)")
    raise InputError(f"{m} is not a torchao method", field="strategy")


def _torchao(ctx, s: dict, src: str, out: Path) -> dict:
    from transformers import TorchAoConfig
    cfg, what = torchao_ptq_config(ctx, s)
    ctx.log(f"{s['method']}: {what}")
    model = common.load_model(ctx, src, dtype=common.base_dtype(ctx), quantization_config=TorchAoConfig(quant_type=cfg))
    model.save_pretrained(out)
    common.save_tokenizer(ctx, out)
    return {"library": "torchao", "config": what}


def quantize(ctx) -> dict:
    common.quiet_libraries()
    src = common.current_model(ctx)
    if ctx.state.get("quant"):
        raise InputError(f"the model is already quantized ({ctx.state['quant']['method']}); quantize a 16-bit model",
                         field="strategy")
    if ctx.state.get("adapter_dir"):
        raise InputError("there are unmerged LoRA adapters: add a merge stage before quantize", field="strategy")
    s = check(ctx.stage, src if (Path(src) / "config.json").is_file() else None, ctx.device)
    if ctx.should_stop():
        return {"stopped": True}
    if s["method"] in CALIBRATION:
        common.dataset(ctx)
    name = f"quantized-{s['method']}" + (f"-{s['bits']}bit" if s["method"] in CALIBRATION else "")
    out = Path(ctx.workdir) / name
    t0 = time.perf_counter()
    if s["method"] in CALIBRATION:
        info = _gptqmodel(ctx, s, src, out)
    elif s["method"] in ("int8", "nf4", "fp4"):
        info = _bitsandbytes(ctx, s, src, out)
    else:
        info = _torchao(ctx, s, src, out)
    took = round(time.perf_counter() - t0, 3)
    quant = {**s, **info}
    ctx.state.update(model_dir=str(out), quant=quant)
    size = common.weights_bytes_on_disk(str(out))
    src_size = common.weights_bytes_on_disk(src) if Path(src).is_dir() else None
    ctx.emit("metric", name="quantize.size_on_disk_bytes", value=size, unit="bytes")
    ctx.emit("metric", name="quantize.seconds", value=took, unit="s")
    ctx.log(f"quantized with {s['method']} in {took}s: {size / 2**20:.2f} MiB of weights on disk"
            + (f" (16-bit source: {src_size / 2**20:.2f} MiB)" if src_size else ""))
    return {"model_dir": common.artifact(ctx, out, "quantized-model"), "quant": quant, "quantize_s": took,
            "size_on_disk_bytes": size, "source_size_on_disk_bytes": src_size}

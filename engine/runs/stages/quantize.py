"""The quantize stage: post-training quantization of the current model, saved in a format
``from_pretrained`` loads back (the quantization config goes into config.json).

Which methods there are, their parameters, defaults, widths, what each produces and whether it
runs on a CPU is the method registry (presets/quant/methods.yaml, engine/quant.py): this stage
reads it and runs the method through the handler of its library, chosen from ``HANDLERS``:

    gptqmodel     GPTQ and AWQ (GEMM format; on the CPU through its torch kernel), calibration
                  samples from the run's training split
    bitsandbytes  LLM.int8, NF4 / FP4 (blocksize 64, double quant): quantized while loading
    torchao       int8 weight-only, int4 weight-only (tinygemm on a GPU; IntxWeightOnlyConfig(int4)
                  stands in on the CPU, with a warning), W8A8 dynamic, FP8 (sm_89+): quantized while
                  loading through transformers' TorchAoConfig

A handler is ``handler(ctx, settings, src_dir, out_dir) -> dict`` (what it used: library, config);
a new library is one function here and an entry in HANDLERS, a new method of a known library is
data alone. The model is loaded in its saved 16-bit dtype (so what stays unquantized - embeddings,
lm_head, norms - is stored 16-bit, as it would be served).
"""
from __future__ import annotations

import time
from pathlib import Path

from engine import quant
from engine.errors import InputError
from engine.runs.stages import common
from engine.runs.stages.hooks import stop_between_layers


def settings(stage: dict) -> dict:
    """The quantize stage's parameters with their defaults (engine.quant.settings)."""
    try:
        return quant.settings(stage)
    except InputError as e:
        raise InputError(str(e), field="strategy") from None


def check(stage: dict, model, device: str) -> dict:
    """Refuse settings that cannot work; ``model`` (a dir, config dict or ModelArch, or None)
    is used to check the group size against the layer widths."""
    s = settings(stage)
    m = quant.get(s["method"])
    if m.cpu == "refuse" and device != "cuda":
        from engine.estimate import formats
        need = ("a GPU with FP8 support (Ada/Hopper/Blackwell)" if formats.get(m.format_for()).requires_fp8
                else "a GPU")
        runs_on_cpu = ", ".join(x.id for x in quant.methods().values() if not x.gpu_only)
        raise InputError(f"quantization method {m.id} needs {need}; this run is on the CPU. Use one that runs "
                         f"there instead ({runs_on_cpu})", field="strategy")
    if s["bits"] not in m.bits:
        if len(m.bits) == 1:
            raise InputError(f"{m.id} quantizes to {m.bits[0]} bits (its kernels are {m.bits[0]}-bit); got bits "
                             f"{s['bits']}" + (f". {m.bits_note}" if m.bits_note else ""), field="quantize.bits")
        raise InputError(f"{m.id} bits must be {', '.join(map(str, m.bits[:-1]))} or {m.bits[-1]}, got {s['bits']}",
                         field="quantize.bits")
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
    if quant.get(s["method"]).config["algorithm"] == "awq":
        qc = AWQConfig(bits=s["bits"], group_size=s["group_size"])
        # gptqmodel picks its CUDA GEMM kernel by default; on the CPU its torch kernel does the work
        backend = BACKEND.AUTO if ctx.device == "cuda" else BACKEND.AWQ_TORCH
    else:
        qc = QuantizeConfig(bits=s["bits"], group_size=s["group_size"])
        backend = BACKEND.AUTO
    ctx.log(f"{s['method']}: {s['bits']}-bit, group {s['group_size']}, {len(calib)} calibration samples "
            f"(gptqmodel, device {ctx.device})")
    model = GPTQModel.load(src, qc, device="cuda:0" if ctx.device == "cuda" else "cpu")
    with stop_between_layers(ctx.should_stop, model):      # a stop leaves at the next decoder layer
        model.quantize(calib, batch_size=min(8, max(1, len(calib))), backend=backend, tokenizer=tok)
    model.save(str(out))
    common.save_tokenizer(ctx, out)
    return {"library": "gptqmodel", "calibration_samples_used": len(calib),
            "format": "awq-gemm" if quant.get(s["method"]).config["algorithm"] == "awq" else "gptq"}


def _bitsandbytes(ctx, s: dict, src: str, out: Path) -> dict:
    from transformers import BitsAndBytesConfig
    c = dict(quant.get(s["method"]).config)                 # BitsAndBytesConfig keywords of the method
    if c.get("load_in_4bit"):
        c.update(bnb_4bit_use_double_quant=s["double_quant"], bnb_4bit_compute_dtype=common.compute_dtype(ctx))
    cfg = BitsAndBytesConfig(**c)
    model = common.load_model(ctx, src, dtype=common.base_dtype(ctx), quantization_config=cfg)
    model.save_pretrained(out)
    common.save_tokenizer(ctx, out)
    return {"library": "bitsandbytes"}


def _int8_weight_only(ctx, s):
    from torchao.quantization import Int8WeightOnlyConfig
    return Int8WeightOnlyConfig(), "torchao Int8WeightOnlyConfig (per-channel int8 weights)"


def _int8_dynamic(ctx, s):
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig
    return Int8DynamicActivationInt8WeightConfig(), "torchao Int8DynamicActivationInt8WeightConfig (W8A8)"


def _int4_weight_only(ctx, s):
    import torch
    from torchao.quantization import Int4WeightOnlyConfig, IntxWeightOnlyConfig, PerGroup
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


def _float8_dynamic(ctx, s):
    import torch
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        raise InputError(f"fp8 needs a GPU with FP8 tensor cores (compute capability 8.9+: Ada, Hopper, "
                         f"Blackwell); this one is {major}.{minor}. Use int8 or w8a8", field="strategy")
    return (Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
            "torchao Float8DynamicActivationFloat8WeightConfig (E4M3, per-row scales)")


# a torchao method's `config: {torchao: NAME}` -> (ctx, settings) -> (torchao config, what it is)
TORCHAO_CONFIGS = {"int8-weight-only": _int8_weight_only, "int8-dynamic-activation-int8-weight": _int8_dynamic,
                   "int4-weight-only": _int4_weight_only,
                   "float8-dynamic-activation-float8-weight": _float8_dynamic}


def torchao_ptq_config(ctx, s: dict):
    """(torchao config, what it is) for a torchao method, by device."""
    name = quant.get(s["method"]).config.get("torchao")
    if name not in TORCHAO_CONFIGS:
        raise InputError(f"{s['method']} is not a torchao method this engine builds (config {name!r}; known: "
                         f"{', '.join(TORCHAO_CONFIGS)})", field="strategy")
    return TORCHAO_CONFIGS[name](ctx, s)


def _torchao(ctx, s: dict, src: str, out: Path) -> dict:
    from transformers import TorchAoConfig
    cfg, what = torchao_ptq_config(ctx, s)
    ctx.log(f"{s['method']}: {what}")
    model = common.load_model(ctx, src, dtype=common.base_dtype(ctx), quantization_config=TorchAoConfig(quant_type=cfg))
    model.save_pretrained(out)
    common.save_tokenizer(ctx, out)
    return {"library": "torchao", "config": what}


# one handler per library: (ctx, settings, source model dir, output dir) -> what it used
HANDLERS = {"gptqmodel": _gptqmodel, "bitsandbytes": _bitsandbytes, "torchao": _torchao}


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
    m = quant.get(s["method"])
    if m.library not in HANDLERS:
        raise InputError(f"quantization method {m.id}: no quantize-stage handler for its library {m.library!r} "
                         f"(known: {', '.join(HANDLERS)})", field="strategy")
    if m.calibration:
        common.dataset(ctx)
    name = f"quantized-{m.id}" + (f"-{s['bits']}bit" if m.calibration else "")
    out = Path(ctx.workdir) / name
    t0 = time.perf_counter()
    info = HANDLERS[m.library](ctx, s, src, out)
    took = round(time.perf_counter() - t0, 3)
    done = {**s, **info}
    ctx.state.update(model_dir=str(out), quant=done)
    size = common.weights_bytes_on_disk(str(out))
    src_size = common.weights_bytes_on_disk(src) if Path(src).is_dir() else None
    ctx.emit("metric", name="quantize.size_on_disk_bytes", value=size, unit="bytes")
    ctx.emit("metric", name="quantize.seconds", value=took, unit="s")
    ctx.log(f"quantized with {s['method']} in {took}s: {size / 2**20:.2f} MiB of weights on disk"
            + (f" (16-bit source: {src_size / 2**20:.2f} MiB)" if src_size else ""))
    return {"model_dir": common.artifact(ctx, out, "quantized-model"), "quant": done, "quantize_s": took,
            "size_on_disk_bytes": size, "source_size_on_disk_bytes": src_size}

"""The convert stage: the end of QAT. torchao's ``QATConfig(base, step="convert")`` swaps each
fake-quantized linear back to a plain one and quantizes its trained weights with the base
config (the same numbers the fake quantizer simulated); the model is saved through the
transformers torchao integration, so ``from_pretrained(dir)`` loads the quantized model."""
from __future__ import annotations

from pathlib import Path

from engine.errors import InputError
from engine.runs.stages import common
from engine.runs.stages.train import qat_prepare, torchao_config


def convert(ctx) -> dict:
    from torchao.quantization import quantize_
    from transformers import TorchAoConfig
    from transformers.quantizers import AutoHfQuantizer
    common.quiet_libraries()
    q = ctx.state.get("qat")
    if not q:
        raise InputError("convert needs a QAT train stage before it (method: qat)", field="strategy")
    model = q.pop("model", None)
    if model is None:        # not in memory (e.g. a resumed run): reload the trained weights, prepare again
        model = common.load_model(ctx, q["trained_dir"])
        qat_prepare(model, q["scheme"], q["group_size"], ctx.device)
    _, convert_cfg, what, _ = torchao_config(q["scheme"], q["group_size"], ctx.device)
    model.to(common.base_dtype(ctx))                  # served in the checkpoint's 16-bit dtype
    quantize_(model, convert_cfg)                      # touches only the fake-quantized linears
    left = [n for n, m in model.named_modules() if type(m).__name__.startswith("FakeQuantized")]
    if left:
        raise RuntimeError(f"QAT convert left fake-quantized modules: {', '.join(left[:5])}")
    # save through the transformers torchao integration (flattened tensor subclasses in safetensors)
    hf_cfg = TorchAoConfig(quant_type=convert_cfg.base_config)
    model.config.quantization_config = hf_cfg
    model.hf_quantizer = AutoHfQuantizer.from_config(hf_cfg, pre_quantized=False)
    out = Path(ctx.workdir) / "model-qat-converted"
    model.save_pretrained(out)
    common.save_tokenizer(ctx, out)
    quant = {"library": "torchao", "method": f"qat-{q['scheme']}", "bits": 4, "group_size": q["group_size"],
             "config": what}
    ctx.state.update(model_dir=str(out), quant=quant)
    ctx.state.pop("qat", None)
    size = common.weights_bytes_on_disk(str(out))
    ctx.emit("metric", name="convert.size_on_disk_bytes", value=size, unit="bytes")
    ctx.log(f"QAT convert: {what}; saved {out} ({size / 2**20:.2f} MiB of weights)")
    return {"model_dir": common.artifact(ctx, out, "quantized-model"), "quant": quant, "size_on_disk_bytes": size}

"""The merge stage: fold LoRA adapters into their 16-bit base (peft ``merge_and_unload``) and
save a plain model, the start of the fine-tune-then-quantize path (LoRA -> merge -> PTQ)."""
from __future__ import annotations

from pathlib import Path

from engine.errors import InputError
from engine.runs.stages import common


def merge(ctx) -> dict:
    import torch
    from peft import PeftModel
    adapter = ctx.state.get("adapter_dir")
    base = ctx.state.get("adapter_base") or {}
    if not adapter:
        raise InputError("merge needs LoRA adapters from a train stage before it", field="strategy")
    if base.get("quant"):
        raise InputError(f"merge folds adapters into a 16-bit base; these adapters sit on a "
                         f"{base['quant'].get('method')} model (serve them as base + adapter instead)",
                         field="strategy")
    common.quiet_libraries()
    saved = common.base_dtype(ctx)
    # merge in fp32 on the CPU (exact), in the saved 16-bit dtype on a GPU
    model = common.load_model(ctx, base["dir"], dtype=None if ctx.device == "cuda" else torch.float32)
    model = PeftModel.from_pretrained(model, adapter)
    model = model.merge_and_unload()
    model.to(saved)
    out = Path(ctx.workdir) / "model-merged"
    model.save_pretrained(out)
    common.save_tokenizer(ctx, out)
    ctx.state.update(model_dir=str(out), quant=None, adapter_dir=None, merged_from=adapter)
    ctx.log(f"merged the adapters of {adapter} into {base['dir']} -> {out}")
    return {"model_dir": common.artifact(ctx, out, "model"), "size_on_disk_bytes": common.weights_bytes_on_disk(str(out)),
            "dtype": str(saved).replace("torch.", "")}

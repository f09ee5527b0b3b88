"""The export stage: the run's model as the artifact a runtime serves.

One handler per target, chosen from ``TARGETS`` by the stage's ``target`` (the same pattern as the
quantize stage's HANDLERS):

    gguf        the project's GGUF writer (engine/runs/gguf_file.py: gguf's writer and tensor-name
                map, tokenizer and chat template) at f16/f32/bf16, then llama.cpp's own quantizer
                (llama_model_quantize) for the k-quant and legacy types (gguf-q4_k_m, gguf-q8_0 ...);
                the f16 file the quantizer started from is kept as the ``source`` artifact
    vllm        a GPTQ/AWQ checkpoint of the quantize stage (gptqmodel's format, the one vLLM loads)
                with ``vllm_manifest.json``: the vLLM quantization method and kernel that will serve it
                and what that kernel needs
    compressed-tensors  the 16-bit model as a compressed-tensors checkpoint vLLM loads (W8A8 int8, FP8 dynamic,
                W4A16; stages/ct_checkpoint.py: written by the compressed-tensors library, read back through
                transformers against the source's logits) with ``vllm_manifest.json``
    executorch  an 8da4w ``.pte`` (torchao int8 dynamic activations + int4 group weights, XNNPACK) through
                torch.export and executorch's ``to_edge_transform_and_lower`` (stages/executorch_pte.py);
                where executorch is not installed, refused at launch saying what is missing

A target is ``handler(ctx, settings, src_dir, out_dir) -> dict`` returning at least ``exports``: a list
of {"format", "runtime", "path", "role": deploy|source, "size_on_disk_bytes", ...}; they go into
``ctx.state["exports"]`` for the evaluate stage, which measures each in its runtime
(engine/runs/stages/runtime.py) when the runtime is on the machine.

Stage entry (presets/strategies.yaml): ``{stage: export, target: gguf, format: gguf-q4_k_m}``; a run
config's ``export: {format: ...}`` overrides the format.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from engine.errors import InputError
from engine.runs.stages import common

# target -> the runtime that loads what it writes, and the formats it writes (gguf: any llama.cpp type)
RUNTIME_OF = {"gguf": "llama.cpp", "vllm": "vllm", "compressed-tensors": "vllm", "executorch": "executorch"}
DEFAULT_FORMAT = {"gguf": "gguf-q4_k_m", "vllm": None, "compressed-tensors": "ct-w8a8-int8",
                  "executorch": "executorch-8da4w"}


def settings(stage: dict) -> dict:
    target = stage.get("target")
    if target not in TARGETS:
        raise InputError(f"unknown export target {target!r}; known: {', '.join(TARGETS)}", field="strategy")
    fmt = stage.get("format") or DEFAULT_FORMAT[target]
    if target == "gguf":
        if not str(fmt).startswith("gguf-"):
            raise InputError(f"a gguf export writes a gguf-<type> format (gguf-f16, gguf-q8_0, gguf-q6_k, gguf-q5_k_m, "
                             f"gguf-q4_k_m, ...), not {fmt!r}", field="export.format")
        from engine.runs import gguf_file
        qtype = fmt[len("gguf-"):]
        if qtype not in gguf_file.OUTTYPES:
            try:
                import gguf  # noqa: F401
            except ImportError:
                pass                      # checked again when the stage runs (the message names the extra)
            else:
                gguf_file.ftype_of(qtype)     # unknown types list llama.cpp's
    if target == "compressed-tensors":
        from engine.runs.stages.ct_checkpoint import format_entry
        format_entry(fmt)
    return {"target": target, "format": fmt, "threads": stage.get("threads")}


def check(stage: dict, device: str) -> dict:
    """Refuse an export that cannot work before the run starts."""
    s = settings(stage)
    if s["target"] == "executorch":
        why = executorch_status()
        if why:
            raise InputError(why, field="strategy")
    if s["target"] == "compressed-tensors":
        from engine.runs.stages.ct_checkpoint import status
        why = status()
        if why:
            raise InputError(why, field="strategy")
    return s


# ---- gguf -------------------------------------------------------------------------------------
def _gguf(ctx, s: dict, src: str, out: Path) -> dict:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise InputError("the GGUF export needs the `gguf` package: install the project's export extra "
                         "(pip install -e '.[export]')", field="strategy") from None
    from engine.runs import gguf_file
    if ctx.state.get("quant"):
        q = ctx.state["quant"]
        raise InputError(f"the model is already quantized ({q.get('method')}, {q.get('library')}); a GGUF export starts "
                         "from the 16-bit model and quantizes with llama.cpp's own types (drop the quantize stage, or "
                         "export the merged model)", field="strategy")
    qtype = s["format"][len("gguf-"):]
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(src).name
    exports, info = [], {}
    base_type = qtype if qtype in gguf_file.OUTTYPES else "f16"
    t0 = time.perf_counter()
    written = gguf_file.write(src, out / f"{stem}-{base_type}.gguf", outtype=base_type, name=ctx.spec.name or stem)
    info["writer"] = {k: v for k, v in written.items() if k != "path"}
    ctx.log(f"GGUF {base_type}: {written['tensors']} tensors ({written['tensor_types']}), tokenizer "
            f"{written['tokenizer']['model']}/{written['tokenizer']['pre']}, {written['size_on_disk_bytes'] / 2**20:.2f} MiB "
            f"in {written['seconds']}s")
    if not written["tokenizer"]["pre_recognised"]:
        ctx.warn("the tokenizer's pre-tokenizer is not one llama.cpp names (gpt-2, smollm, llama-bpe, qwen2): written as "
                 "'default'; llama.cpp may split text differently (the runtime evaluation measures the agreement)")
    exports.append({"format": f"gguf-{base_type}", "runtime": "llama.cpp", "path": written["path"],
                    "role": "deploy" if base_type == qtype else "source",
                    "size_on_disk_bytes": written["size_on_disk_bytes"], "tensor_types": written["tensor_types"]})
    if qtype != base_type:
        why = gguf_file.llama_cpp_available()
        if why:
            raise InputError(f"{s['format']} is made by llama.cpp's quantizer: {why}", field="strategy")
        threads = s.get("threads") or max(1, min(4, os.cpu_count() or 1))
        q = gguf_file.quantize(written["path"], out / f"{stem}-{qtype}.gguf", qtype, threads=threads)
        back = gguf_file.read(q["path"])
        info["quantizer"] = {**{k: v for k, v in q.items() if k != "path"}, "tensor_types": back["tensor_types"]}
        fallback = _fallbacks(back, qtype)
        if fallback:
            info["quantizer"]["fallback_tensors"] = fallback
            ctx.log(f"llama.cpp kept {len(fallback)} tensor(s) off {qtype}'s main types (rows not a multiple of its "
                    f"256-value super-block, or its mixture's choice): " +
                    ", ".join(f"{n}={t}" for n, t in list(fallback.items())[:6]) + (" ..." if len(fallback) > 6 else ""))
        ctx.log(f"GGUF {qtype} (llama.cpp's quantizer, {q['threads']} threads): {q['size_on_disk_bytes'] / 2**20:.2f} MiB "
                f"in {q['seconds']}s; tensor types {back['tensor_types']}")
        exports.append({"format": s["format"], "runtime": "llama.cpp", "path": q["path"], "role": "deploy",
                        "size_on_disk_bytes": q["size_on_disk_bytes"], "tensor_types": back["tensor_types"]})
    info["seconds"] = round(time.perf_counter() - t0, 3)
    return {"exports": exports, **info}


def _fallbacks(back: dict, qtype: str) -> dict:
    """Tensors of a k-quant file stored in a type that is not a k-quant (nor f32 1-D): llama.cpp
    falls back per tensor when its rows do not split into 256-value super-blocks."""
    if "_k" not in qtype:
        return {}
    return {n: t for n, t in back["per_tensor"].items() if not t.endswith("_K") and t not in ("F32",)}


# ---- vllm ---------------------------------------------------------------------------------------
# vLLM's kernels for the checkpoints gptqmodel writes (vLLM docs, "Quantization" / supported hardware;
# Marlin: Frantar et al. 2024): what each needs of the checkpoint and the GPU
VLLM_KERNELS = {
    "gptq": [
        {"method": "gptq_marlin", "kernel": "Marlin (mixed-precision int4/int8 x fp16/bf16 GEMM)",
         "bits": [4, 8], "group_sizes": [-1, 32, 64, 128], "sym": True, "min_compute_capability": 8.0},
        {"method": "gptq", "kernel": "ExLlamaV2 / GPTQ CUDA kernels", "bits": [2, 3, 4, 8],
         "group_sizes": None, "sym": None, "min_compute_capability": 6.0},
    ],
    "awq": [
        {"method": "awq_marlin", "kernel": "Marlin (AWQ layout)", "bits": [4], "group_sizes": [-1, 32, 64, 128],
         "sym": None, "min_compute_capability": 8.0},
        {"method": "awq", "kernel": "AWQ GEMM CUDA kernel", "bits": [4], "group_sizes": None, "sym": None,
         "min_compute_capability": 7.5},
    ],
}


def vllm_manifest(model_dir) -> dict:
    """Which vLLM quantization method and kernel serve a gptqmodel checkpoint, read from the
    quantization_config its config.json carries (InputError for a checkpoint vLLM would not take)."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    qc = cfg.get("quantization_config") or {}
    method = str(qc.get("quant_method") or "").lower()
    if method not in VLLM_KERNELS:
        raise InputError(f"the vLLM export takes a GPTQ or AWQ checkpoint (gptqmodel); {Path(model_dir).name} has "
                         f"quant_method {method or 'none'!r}", field="strategy")
    fmt = str(qc.get("checkpoint_format") or qc.get("format") or "gptq").lower()
    if method == "gptq" and fmt not in ("gptq", ""):
        raise InputError(f"vLLM loads gptqmodel's `gptq` checkpoint format; this one is {fmt!r}", field="strategy")
    bits, gs, sym = qc.get("bits"), qc.get("group_size"), qc.get("sym", True)
    options = []
    for k in VLLM_KERNELS[method]:
        ok = bits in k["bits"] and (k["group_sizes"] is None or gs in k["group_sizes"]) and \
            (k["sym"] is None or bool(sym) == k["sym"])
        options.append({**k, "fits_checkpoint": ok})
    chosen = next((o for o in options if o["fits_checkpoint"]), None)
    if chosen is None:
        raise InputError(f"no vLLM kernel serves {method} {bits}-bit group {gs} (sym={sym})", field="strategy")
    return {"quantization": chosen["method"], "kernel": chosen["kernel"],
            "min_compute_capability": chosen["min_compute_capability"],
            "checkpoint": {"quant_method": method, "checkpoint_format": fmt, "bits": bits, "group_size": gs,
                           "sym": sym, "desc_act": qc.get("desc_act")},
            "kernels": options,
            "serve": f"vllm serve {Path(model_dir).name} --quantization {chosen['method']}",
            "python": f"vllm.LLM(model=..., quantization={chosen['method']!r})",
            "verified_in_vllm": False,
            "note": "the kernel vLLM picks on a GPU at or above min_compute_capability; older GPUs fall to the next "
                    "kernel that fits (kernels). Not loaded in vLLM by this run (vLLM needs a CUDA GPU)"}


def _vllm(ctx, s: dict, src: str, out: Path) -> dict:
    q = ctx.state.get("quant") or {}
    if q.get("library") != "gptqmodel":
        raise InputError("the vLLM export takes the GPTQ/AWQ checkpoint of a quantize stage (gptqmodel); this run's model "
                         f"is {q.get('method') or '16-bit'}: add a quantize stage with method gptq or awq before it",
                         field="strategy")
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(src, out, copy_function=_link_or_copy)
    manifest = vllm_manifest(out)
    (out / "vllm_manifest.json").write_text(json.dumps(manifest, indent=2))
    ctx.log(f"vLLM checkpoint: {manifest['checkpoint']['quant_method']} {manifest['checkpoint']['bits']}-bit -> "
            f"--quantization {manifest['quantization']} ({manifest['kernel']}, compute capability >= "
            f"{manifest['min_compute_capability']})")
    size = common.weights_bytes_on_disk(str(out))
    fmt = f"{q.get('method')}-{q.get('bits')}bit" if q.get("bits") else q.get("method")
    return {"exports": [{"format": fmt, "runtime": "vllm", "path": str(out), "role": "deploy",
                         "size_on_disk_bytes": size, "vllm": {k: manifest[k] for k in ("quantization", "kernel")}}],
            "manifest": manifest}


def _link_or_copy(a, b):
    try:
        os.link(a, b)
    except OSError:
        shutil.copy2(a, b)


def _compressed_tensors(ctx, s: dict, src: str, out: Path) -> dict:
    from engine.runs.stages.ct_checkpoint import write
    return write(ctx, s, src, out)


# ---- executorch -----------------------------------------------------------------------------------
def executorch_status() -> str | None:
    """None when executorch's exporter and runtime import; else what is missing (the stage's message)."""
    from engine.runs.stages.executorch_pte import status
    return status()


def _executorch(ctx, s: dict, src: str, out: Path) -> dict:
    from engine.runs.stages.executorch_pte import export_8da4w
    return export_8da4w(ctx, s, src, out)


# one handler per target: (ctx, settings, source model dir, output dir) -> {"exports": [...], ...}
TARGETS = {"gguf": _gguf, "vllm": _vllm, "compressed-tensors": _compressed_tensors, "executorch": _executorch}


def export(ctx) -> dict:
    common.quiet_libraries()
    src = common.current_model(ctx)
    if ctx.state.get("adapter_dir"):
        raise InputError("there are unmerged LoRA adapters: add a merge stage before export", field="strategy")
    s = settings(ctx.stage)
    if not Path(src).is_dir():
        raise InputError(f"export needs a local model dir; the model is {src!r} (a hub id: download it first)",
                         field="model")
    if ctx.should_stop():
        return {"stopped": True}
    out = Path(ctx.workdir) / f"export-{s['target']}"
    res = TARGETS[s["target"]](ctx, s, src, out)
    for e in res["exports"]:
        common.artifact(ctx, Path(e["path"]), f"export:{e['format']}")
        ctx.emit("metric", name=f"export.{e['format']}.size_on_disk_bytes", value=e["size_on_disk_bytes"],
                 unit="bytes")
    ctx.state.setdefault("exports", []).extend(res["exports"])
    return {"target": s["target"], "format": s["format"], **res}

"""compressed-tensors: the run's 16-bit model as a checkpoint in the layout vLLM loads
(``config.json`` ``quantization_config.quant_method: compressed-tensors``), written with the
compressed-tensors library itself, then read back through transformers to check it.

    write(ctx, settings, src, out)   the export stage's ``compressed-tensors`` target
    status()                         None when compressed-tensors is installed, else what is missing

The format entry (presets/quant/formats.yaml) says what to write: ``export: {target: compressed-tensors,
scheme, compression}`` (a compressed-tensors preset scheme: W8A8 = int8 per-channel weights with int8
dynamic per-token activations, FP8_DYNAMIC = FP8 E4M3 per-channel weights with FP8 dynamic per-token
activations, W4A16 = int4 symmetric weights in groups of 128; and the on-disk compression format) and
``vllm: {scheme, kernel, min_compute_capability, ...}`` (the scheme class vLLM builds from that config and
its kernel, for the manifest).

How the weights are quantized: data-free round-to-nearest. Every Linear but ``lm_head`` gets the preset
scheme (``apply_quantization_config``); its weight's min/max per output channel (per group of 128 for
W4A16) go through compressed-tensors' own ``calculate_qparams`` (the scale an llm-compressor min-max
observer gives), and ``ModelCompressor`` packs and saves them. Activations of the W8A8 schemes are quantized
per token at run time (``dynamic: true``), so nothing needs calibration data. llm-compressor (which adds
SmoothQuant / GPTQ on top) does not install beside the pins; this is its plain RTN recipe.

Read back (the source's logits are taken before it is quantized in place, so one copy of the model is in memory at a
time): the written directory is loaded with ``AutoModelForCausalLM.from_pretrained`` (transformers'
compressed-tensors quantizer decompresses it and runs the scheme's quantized forward) and its logits on held-out
token ids are compared with the 16-bit source's (``readback`` in the manifest and the result). vLLM itself
needs a CUDA GPU: ``verified_in_vllm: false`` until a GPU run loads it.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

from engine.errors import InputError
from engine.runs.stages import common

SKIP_FILES = {"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json"}


def status() -> str | None:
    """None when compressed-tensors imports; else what is missing (imports no torch)."""
    import importlib.metadata
    import importlib.util
    try:
        importlib.metadata.version("compressed-tensors")
        if importlib.util.find_spec("compressed_tensors") is None:
            raise ImportError("compressed_tensors")
    except Exception as e:                                   # noqa: BLE001 - said to the user
        return (f"compressed-tensors is not installed ({type(e).__name__}); it writes the vLLM compressed-tensors "
                "checkpoint: pip install -e '.[export]' (compressed-tensors 0.20.1 keeps every pin; ./dev.sh setup "
                "installs it)")
    return None


def format_entry(fmt: str) -> dict:
    """The format's registry entry with its ``export`` and ``vllm`` blocks (InputError if it has none)."""
    from engine.estimate import formats
    f = formats.get(fmt)
    spec = f.raw.get("export") or {}
    if spec.get("target") != "compressed-tensors":
        known = [i for i, x in formats.formats().items() if (x.raw.get("export") or {}).get("target") == "compressed-tensors"]
        raise InputError(f"the compressed-tensors target writes {', '.join(known)}; {fmt!r} is not one",
                         field="export.format")
    return f.raw


def _observe(w, args):
    """min and max of a weight in the shape of its scale: per output channel, per group, or whole tensor."""
    from compressed_tensors.quantization import QuantizationStrategy
    w = w.detach().float()
    if args.strategy == QuantizationStrategy.CHANNEL:
        return w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
    if args.strategy == QuantizationStrategy.GROUP:
        if w.shape[1] % args.group_size:
            raise InputError(f"{args.group_size} does not divide a linear's input width {w.shape[1]}", field="group_size")
        g = w.reshape(w.shape[0], -1, args.group_size)
        return g.amin(dim=2), g.amax(dim=2)
    if args.strategy == QuantizationStrategy.TENSOR:
        return w.amin().reshape(1), w.amax().reshape(1)
    raise InputError(f"weight strategy {args.strategy} is not written here", field="export.format")


def quantize(model, scheme_name: str) -> int:
    """Give every Linear but lm_head the preset scheme and its round-to-nearest weight scales; returns how many."""
    import torch
    from compressed_tensors.quantization import (QuantizationConfig, QuantizationStatus, apply_quantization_config,
                                                 preset_name_to_scheme)
    from compressed_tensors.quantization.utils import calculate_qparams
    cfg = QuantizationConfig(config_groups={"group_0": preset_name_to_scheme(scheme_name, ["Linear"])},
                             ignore=["lm_head"])
    apply_quantization_config(model, cfg, show_progress=False)
    n = 0
    with torch.no_grad():
        for mod in model.modules():
            sch = getattr(mod, "quantization_scheme", None)
            if sch is None or sch.weights is None:
                continue
            scale, zp = calculate_qparams(*_observe(mod.weight, sch.weights), sch.weights)
            mod.weight_scale.data.copy_(scale.reshape(mod.weight_scale.shape))
            if hasattr(mod, "weight_zero_point"):
                mod.weight_zero_point.data.copy_(zp.reshape(mod.weight_zero_point.shape))
            mod.quantization_status = QuantizationStatus.FROZEN
            n += 1
    return n


def held_out_ids(ctx, src: str, rows: int = 2) -> list[list[int]]:
    """Token ids of the first held-out rows (what the read-back check scores)."""
    from engine.runs import data
    tok = common.load_tokenizer(src)
    ds = data.load(ctx.spec.dataset)
    return [ids for ids, _ in common.encode_all(tok, ds.eval[:rows], min(ctx.spec.train.seq_len, 128)) if len(ids) > 1]


def logits_of(model, seqs: list[list[int]]) -> list:
    import torch
    with torch.no_grad():
        return [model(input_ids=torch.tensor([ids])).logits[0].float() for ids in seqs]


def compare(ref: list, got: list, seqs: list[list[int]]) -> dict:
    """Logits ``got`` against ``ref`` (per sequence, as ``logits_of`` gives them): largest difference (and the
    largest |logit|), next-token argmax agreement, and the ratio of their perplexities of the sequences themselves."""
    import torch
    diff, top, same, n, nll_r, nll_m = 0.0, 0.0, 0, 0, 0.0, 0.0
    for ids, a, b in zip(seqs, ref, got):
        diff, top = max(diff, float((a - b).abs().max())), max(top, float(a.abs().max()))
        same += int((a.argmax(-1) == b.argmax(-1)).sum())
        n += len(ids)
        y = torch.tensor(ids[1:])
        nll_r -= float(torch.log_softmax(a[:-1].double(), -1).gather(1, y[:, None]).sum())
        nll_m -= float(torch.log_softmax(b[:-1].double(), -1).gather(1, y[:, None]).sum())
    scored = sum(len(s) - 1 for s in seqs)
    return {"tokens": n, "max_abs_logit_diff": round(diff, 5), "max_abs_logit": round(top, 4),
            "argmax_agreement": round(same / n, 4) if n else None,
            "perplexity_ratio": round(math.exp((nll_m - nll_r) / scored), 5) if scored else None}


def write(ctx, s: dict, src: str, out: Path) -> dict:
    why = status()
    if why:
        raise InputError(why, field="strategy")
    entry = format_entry(s["format"])
    if ctx.state.get("quant"):
        q = ctx.state["quant"]
        raise InputError(f"the model is already quantized ({q.get('method')}, {q.get('library')}); the compressed-tensors "
                         "export starts from the 16-bit model (drop the quantize stage, or export the merged model)",
                         field="strategy")
    import compressed_tensors
    import torch
    import transformers
    from compressed_tensors.compressors import ModelCompressor
    from transformers import AutoModelForCausalLM
    spec, vk = entry["export"], entry.get("vllm") or {}
    t0 = time.perf_counter()
    dtype = common.saved_dtype(src)
    if dtype not in (torch.bfloat16, torch.float16):
        dtype = torch.bfloat16                         # vLLM serves in 16-bit; the scales are stored in this dtype
    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, device_map="cpu").eval()
    seqs = held_out_ids(ctx, src)
    ref = logits_of(model, seqs)                     # the 16-bit source's, before it is quantized in place
    n = quantize(model, spec["scheme"])
    comp = ModelCompressor.from_pretrained_model(model, quantization_format=spec["compression"])
    comp.compress_model(model)
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out)
    comp.update_config(str(out))
    for f in Path(src).iterdir():                      # tokenizer, chat template, generation config
        if f.is_file() and f.name not in SKIP_FILES and f.suffix not in common.WEIGHT_SUFFIXES and not (out / f.name).exists():
            shutil.copy2(f, out / f.name)
    del model
    write_s = round(time.perf_counter() - t0, 3)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    # read back the way a consumer does: transformers' compressed-tensors quantizer
    back = AutoModelForCausalLM.from_pretrained(out, device_map="cpu").eval()
    readback = {"loaded_by": f"transformers {transformers.__version__} from_pretrained (compressed-tensors "
                             f"{compressed_tensors.__version__})", **compare(ref, logits_of(back, seqs), seqs)}
    del back
    size = common.weights_bytes_on_disk(str(out))
    manifest = {"quantization": "compressed-tensors", "scheme": vk.get("scheme"), "kernel": vk.get("kernel"),
                "min_compute_capability": vk.get("min_compute_capability"), "kernels": vk.get("kernels", []),
                "checkpoint": {"quant_method": qc.get("quant_method"), "format": qc.get("format"),
                               "scheme": spec["scheme"], "ignore": qc.get("ignore"),
                               "weights": qc["config_groups"]["group_0"].get("weights"),
                               "input_activations": qc["config_groups"]["group_0"].get("input_activations"),
                               "quantized_linears": n, "compressed_tensors": compressed_tensors.__version__,
                               "quantized_by": "round-to-nearest: min-max scales through compressed_tensors "
                                               "calculate_qparams, no calibration data"},
                "readback": readback,
                "serve": f"vllm serve {out.name}   (vLLM reads quant_method compressed-tensors from config.json)",
                "python": "vllm.LLM(model=...)",
                "verified_in_vllm": False,
                "note": vk.get("note", "") + " Not loaded in vLLM by this run (vLLM needs a CUDA GPU)."}
    (out / "vllm_manifest.json").write_text(json.dumps(manifest, indent=2))
    ctx.log(f"compressed-tensors {spec['scheme']} ({spec['compression']}): {n} linears, {size / 2**20:.2f} MiB in "
            f"{write_s}s; vLLM {vk.get('scheme')} ({vk.get('kernel')}, compute capability >= "
            f"{vk.get('min_compute_capability')}); read back by transformers: max |logit diff| "
            f"{readback['max_abs_logit_diff']} of {readback['max_abs_logit']}, argmax agreement "
            f"{readback['argmax_agreement']}, perplexity x{readback['perplexity_ratio']} on {readback['tokens']} tokens")
    return {"exports": [{"format": s["format"], "runtime": "vllm", "path": str(out), "role": "deploy",
                         "size_on_disk_bytes": size, "vllm": {"quantization": "compressed-tensors",
                                                              "scheme": vk.get("scheme"), "kernel": vk.get("kernel")},
                         "readback": readback}],
            "manifest": manifest, "seconds": round(time.perf_counter() - t0, 3), "write_s": write_s}

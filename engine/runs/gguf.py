"""GGUF files as the starting model of a run: loaded through transformers once, saved as a local
Hugging Face model dir, cached.

transformers reads a GGUF file itself (``from_pretrained(dir, gguf_file=NAME)``, with the ``gguf``
package): it dequantizes the weights to fp32 and builds the tokenizer (and chat template) from the
file's metadata. Every stage then works on the saved dir (peft, bitsandbytes, gptqmodel and torchao
all load a model dir), so the conversion happens once per file, not once per stage:

    $TUNEQUANT_HOME/cache/gguf/<file stem>-<fingerprint>/    config.json, model.safetensors (bf16),
                                                             tokenizer files, gguf_info.json
The fingerprint is the file's resolved path, size and modification time. The weights are saved
in bf16, like hub checkpoints (what the planner's 16-bit baseline assumes); a GGUF's weights were
already rounded to its own format by whoever made it (``gguf_info.json`` says which types it holds),
so this "16-bit" model is that quantized model, widened.

Importing this module is cheap (no torch); ``convert`` imports torch and transformers.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from engine.errors import InputError
from engine.workspace import FileLock, home


def gguf_file(ref: str) -> Path | None:
    """The GGUF file a RunSpec ``model`` names: a ``.gguf`` path, or a dir without config.json
    holding exactly one ``.gguf``; None for anything else."""
    path = Path(os.path.expanduser(str(ref)))
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise InputError(f"GGUF file {str(path)!r} not found", field="model")
        return path.resolve()
    if path.is_dir() and not (path / "config.json").is_file():
        found = sorted(path.glob("*.gguf"))
        if len(found) == 1:
            return found[0].resolve()
    return None


def cache_dir_for(path: Path) -> Path:
    st = path.stat()
    key = json.dumps([str(path.resolve()), st.st_size, int(st.st_mtime)]).encode()
    return home() / "cache" / "gguf" / f"{path.stem}-{hashlib.sha1(key).hexdigest()[:10]}"


def is_converted(out: Path) -> bool:
    return (out / "gguf_info.json").is_file()


def convert(path: Path, out: Path, log=None, extra_info: dict | None = None) -> dict:
    """Load ``path`` through transformers (dequantized to fp32), save it into ``out`` as a bf16
    model dir with its tokenizer; returns what ``gguf_info.json`` records. ``log`` gets progress
    lines (each step with its time)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from transformers.utils import logging as hf_logging

    from engine import models
    log = log or (lambda msg: None)
    hf_logging.disable_progress_bar()          # the log lines below say what happens, with times
    path = Path(path)
    t0 = time.perf_counter()
    cfg = models.gguf_config(path)                       # refuses a truncated or foreign file by name
    meta = cfg.pop("_gguf")
    stored = ", ".join(f"{n} {k}" for k, n in meta["tensor_types"].items())
    log(f"GGUF {path.name}: {meta['architecture']}, {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, "
        f"vocab {cfg['vocab_size']}; tensors {stored} ({meta['file_bytes'] / 1e6:.0f} MB)")
    log("GGUF: loading through transformers (dequantizing every tensor to fp32) ...")
    t = time.perf_counter()
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except (ValueError, KeyError, RuntimeError, OSError) as e:
        raise InputError(f"transformers could not load {path.name}: {type(e).__name__}: {str(e)[:300]}",
                         field="model") from None
    n_params = sum(p.numel() for p in model.parameters())
    log(f"GGUF: loaded {n_params / 1e6:.1f}M parameters in {time.perf_counter() - t:.1f}s; saving as a bf16 model dir ...")
    t = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    # transformers marks a GGUF-loaded model as "quantized with gguf" and refuses to save it, although
    # its weights are plain dequantized tensors by now: drop the mark, keep the weights
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.to(torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)
    info = {"gguf_file": str(path), "gguf_bytes": meta["file_bytes"], "architecture": meta["architecture"],
            "gguf_name": meta["name"], "gguf_tensor_types": meta["tensor_types"], "params": n_params,
            "saved_dtype": "bfloat16", "chat_template": bool(getattr(tok, "chat_template", None)),
            "note": f"weights as stored in the GGUF ({stored}), dequantized and saved in bf16: a 16-bit "
                    "checkpoint of an already quantized model",
            "convert_s": round(time.perf_counter() - t0, 1), "torch": torch.__version__,
            "built": time.strftime("%Y-%m-%d %H:%M:%S"), **(extra_info or {})}
    (out / "gguf_info.json").write_text(json.dumps(info, indent=1))
    log(f"GGUF: saved in {time.perf_counter() - t:.1f}s ({info['convert_s']}s in all) to {out}")
    return info


def ensure_converted(path: Path, log=None, out: Path | None = None, extra_info: dict | None = None) -> Path:
    """The cached model dir of a GGUF file, converted first if needed (once; concurrent callers
    wait on a file lock; a killed conversion is cleaned up by the next)."""
    out = out or cache_dir_for(path)
    if is_converted(out):
        return out
    with FileLock(out.parent / f"{out.name}.lock"):
        if is_converted(out):
            return out
        for old in out.parent.glob(f"{out.name}.building-*"):
            shutil.rmtree(old, ignore_errors=True)
        tmp = out.parent / f"{out.name}.building-{os.getpid()}"
        convert(path, tmp, log=log, extra_info=extra_info)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    return out

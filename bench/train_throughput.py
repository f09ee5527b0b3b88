"""The engine's training step against the plain reference recipe of DESIGN.md: same device,
same model, same shapes, printed side by side (tokens/s, peak allocated memory, and the
estimate's peak for each).

    python bench/train_throughput.py                          # CUDA: llama-3.2-1b random init, 4 x 512, lora qlora full
    python bench/train_throughput.py --model qwen2.5-0.5b --batch-size 8 --seq-len 1024
    python bench/train_throughput.py --device cpu --tiny      # smoke: shrunken model, seconds

Rows per method (lora, qlora, full):
  reference        DESIGN.md's recipe as bench/estimates_vs_measured.py runs it:
                   loss = model(input_ids=ids, labels=ids).loss; backward; clip 1.0; AdamW(foreach) step
  engine           the engine's own model construction (engine/runs/stages/train.py: _lora_model,
                   _qlora_model, _full_model with the RunSpec's settings) and its loop ``fit`` with
                   the recipe's loss (train.loss: reference)
  engine+chunked   the same with the chunked linear cross-entropy (train.loss: chunked, the default)

Each row: a fresh model; peak memory over a run of two steps (optimizer states exist in the
second), then ``--steps`` optimizer steps timed after ``--warmup`` steps (tokens/s = batch x
seq_len x steps / seconds): CUDA max_memory_allocated, or on the CPU the live-storage tracker
of bench/estimates_vs_measured.py (tensor bytes as autograd keeps them). The model is random
init from the preset's config (no download), saved once as a bf16 checkpoint so QLoRA
quantizes it through from_pretrained. On the CPU both sides compute in the engine's CPU dtype
(fp32 without fast bf16), so the comparison stays like for like.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import importlib.util
import itertools
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from engine import hardware, models  # noqa: E402
from engine.estimate import memory  # noqa: E402

METHODS = ("lora", "qlora", "full")
VARIANTS = ("reference", "engine", "engine+chunked")


def _bench():
    spec = importlib.util.spec_from_file_location("estimates_vs_measured", ROOT / "bench" / "estimates_vs_measured.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


EVM = _bench()


# ---- the two recipes -------------------------------------------------------------------------

def engine_ctx(ckpt: str, method: str, args, dev: str):
    from engine.runs.context import StageContext
    from engine.spec.run import RunSpec
    strategy = {"lora": "lora", "qlora": "qlora", "full": "full-then-int8"}[method]
    spec = RunSpec.parse({"model": ckpt, "strategy": strategy, "device": dev,
                          "train": {"batch_size": args.batch_size, "seq_len": args.seq_len, "grad_ckpt": args.grad_ckpt,
                                    "lora_rank": 16, "learning_rate": 1e-5, "loss": "reference"}})
    return StageContext(run_id="bench", spec=spec, strategy={"id": strategy, "stages": ["train"]},
                        stage={"stage": "train", "method": method}, index=0, workdir=Path("."),
                        state={"base_dir": ckpt, "model_dir": ckpt, "quant": None, "tokenizer_dir": ckpt},
                        device=dev)


def engine_model(ckpt: str, method: str, args, dev: str):
    import importlib
    from engine.runs.stages import common
    train = importlib.import_module("engine.runs.stages.train")      # the module (the package exports the function)
    ctx = engine_ctx(ckpt, method, args, dev)
    if method == "full":
        model, _ = train._full_model(ctx)
        if args.grad_ckpt:
            common.checkpointing(model)
    elif method == "lora":
        model = train._lora_model(ctx)
    else:
        model = train._qlora_model(ctx)
    model.config.use_cache = False
    model.train()
    return model, common.compute_dtype(ctx, warn=False)


def reference_model(hf_cfg, ckpt: str, method: str, args, dev: str, dtype):
    """DESIGN.md's recipe, as bench/estimates_vs_measured.train_case builds it."""
    import peft
    import torch
    import transformers
    if method == "qlora":
        qc = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            ckpt, dtype=dtype, quantization_config=qc, device_map={"": 0} if dev == "cuda" else {"": "cpu"})
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.grad_ckpt,
                                                     gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            ckpt, dtype=dtype, device_map={"": 0} if dev == "cuda" else {"": "cpu"})
        if args.grad_ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if method in ("lora", "qlora"):
        arch = models.arch_from_config(hf_cfg.to_dict())
        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                           target_modules=models.lora_modules(arch),
                                                           task_type="CAUSAL_LM"))
    model.config.use_cache = False
    model.train()
    del torch
    return model


def reference_steps(model, ids, steps: int, on_step=None):
    import torch
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, foreach=True)
    for s in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        del loss
        if on_step:
            on_step(s + 1)
    del opt


def engine_steps(model, ids, steps: int, chunked: bool, on_step=None, chunk=None):
    import torch
    from engine.runs.stages.loss import make_loss
    from engine.runs.stages.train import fit
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    loss_fn, mode, why = make_loss(model, "chunked" if chunked else "reference", chunk)
    if chunked and mode != "chunked":
        print(f"  (chunked loss not applicable: {why})")
    fit(model, itertools.repeat(batch), steps=steps, lr=1e-5, loss_fn=loss_fn,
        device="cuda" if ids.is_cuda else "cpu", on_step=(lambda s: on_step(s["step"])) if on_step else None)


# ---- measuring ---------------------------------------------------------------------------------

def sync(dev):
    if dev == "cuda":
        import torch
        torch.cuda.synchronize()


def free(dev):
    gc.collect()
    if dev == "cuda":
        import torch
        torch.cuda.empty_cache()


def measure(variant: str, method: str, hf_cfg, ckpt: str, args, dev: str) -> dict:
    """Peak memory of a 2-step run, then tokens/s over the timed steps, on a fresh model."""
    import torch
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(3, hf_cfg.vocab_size, (args.batch_size, args.seq_len), generator=g).to(dev)
    dtype = None

    def build():
        nonlocal dtype
        if variant == "reference":
            if dtype is None:             # the engine's compute dtype on this device (CPU: fp32 without fast bf16)
                from engine.runs.stages import common
                dtype = common.compute_dtype(engine_ctx(ckpt, method, args, dev), warn=False)
            return reference_model(hf_cfg, ckpt, method, args, dev, dtype)
        m, dtype = engine_model(ckpt, method, args, dev)
        return m

    def run(model, steps, on_step=None):
        if variant == "reference":
            reference_steps(model, ids, steps, on_step)
        else:
            engine_steps(model, ids, steps, variant == "engine+chunked", on_step, args.loss_chunk)

    out = {"variant": variant, "method": method}
    try:
        # memory: two steps on a fresh model
        free(dev)
        before = torch.cuda.memory_allocated() if dev == "cuda" else 0
        model = build()
        if dev == "cuda":
            sync(dev)
            torch.cuda.reset_peak_memory_stats()
            run(model, 2)
            sync(dev)
            out["peak_allocated_bytes"] = torch.cuda.max_memory_allocated() - before
            out["reserved_bytes"] = torch.cuda.max_memory_reserved()
        else:
            base = EVM.storage_bytes(model, ids)
            with EVM.LiveStorage() as live:
                run(model, 2)
            out["peak_allocated_bytes"] = base + live.peak
        # speed: warmup + timed steps (a new optimizer: its states are made again in the warmup)
        marks = {}

        def on_step(s):
            if s in (args.warmup, args.warmup + args.steps):
                sync(dev)
                marks[s] = time.perf_counter()
        t0 = time.perf_counter()
        run(model, args.warmup + args.steps, on_step)
        t_start = marks.get(args.warmup, t0) if args.warmup else t0
        dt = marks[args.warmup + args.steps] - t_start
        out["step_time_s"] = dt / args.steps
        out["tokens_per_s"] = args.batch_size * args.seq_len * args.steps / dt
        del model
    except torch.OutOfMemoryError as e:
        out.update(oom=True, error=str(e).splitlines()[0][:200])
    out["dtype"] = str(dtype).replace("torch.", "")
    free(dev)
    return out


def predicted(arch, method: str, loss: str, args, gpu_id: str, dev: str, dtype: str) -> int | None:
    if dtype != "bfloat16":
        return None                   # the estimate models bf16 compute (the CPU here computes in fp32)
    kw = dict(attn_kernel="flash", round_to=1, include_workspace=False) if dev == "cpu" else {}
    return memory.train_memory(arch, method, "bf16", args.seq_len, args.batch_size, args.grad_ckpt, 16,
                               hardware.get(gpu_id), loss=loss, loss_chunk=args.loss_chunk, **kw)["peak_allocated_bytes"]


# ---- main --------------------------------------------------------------------------------------

def _size(x):
    if x is None:
        return "-"
    return f"{x / 2 ** 30:7.2f} GiB" if x >= 2 ** 28 else f"{x / 2 ** 20:7.2f} MiB"


def print_table(rows: list[dict]) -> None:
    print(f"\n{'method':6s} {'variant':15s} {'tokens/s':>10s} {'vs ref':>7s} {'peak alloc':>12s} {'vs ref':>7s} "
          f"{'estimate':>12s}")
    ref = {r["method"]: r for r in rows if r["variant"] == "reference"}
    for r in rows:
        if r.get("oom"):
            print(f"{r['method']:6s} {r['variant']:15s} OOM ({r['error'][:60]})")
            continue
        b = ref.get(r["method"], {})
        sp = r["tokens_per_s"] / b["tokens_per_s"] if b.get("tokens_per_s") else None
        mp = r["peak_allocated_bytes"] / b["peak_allocated_bytes"] if b.get("peak_allocated_bytes") else None
        print(f"{r['method']:6s} {r['variant']:15s} {r['tokens_per_s']:10,.0f} {sp or 0:7.2f} "
              f"{_size(r['peak_allocated_bytes']):>12s} {mp or 0:7.2f} {_size(r.get('predicted_peak_bytes')):>12s}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if available")
    ap.add_argument("--model", default="llama-3.2-1b", help="model preset (random init from its config)")
    ap.add_argument("--tiny", action="store_true", help="shrink the model (2 layers, width 64; vocab 8192) for a smoke")
    ap.add_argument("--vocab", type=int, default=None, help="override the vocabulary size (--tiny: 8192)")
    ap.add_argument("--loss-chunk", type=int, default=None,
                    help="tokens per chunk of the chunked loss (default: the engine's, 128 MiB of fp32 logits; --tiny: 16)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--batch-size", type=int, default=None, help="default 4 (2 with --tiny)")
    ap.add_argument("--seq-len", type=int, default=None, help="default 512 (64 with --tiny)")
    ap.add_argument("--no-grad-ckpt", dest="grad_ckpt", action="store_false", default=True)
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 10; 3 with --tiny)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2; 1 with --tiny)")
    ap.add_argument("--out", default=None, help="JSON output (default bench/measurements/train-throughput-<gpu>-<time>.json)")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    import torch
    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: use --device cpu", file=sys.stderr)
        return 2
    args.batch_size = args.batch_size or (2 if args.tiny else 4)
    args.seq_len = args.seq_len or (32 if args.tiny else 512)
    args.steps = args.steps or (3 if args.tiny else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 2)
    if args.tiny:
        args.vocab = args.vocab or 8192          # large enough that the logits are a visible part of the peak
        args.loss_chunk = args.loss_chunk or 16
    hf_cfg = EVM.hf_config(args.model, args.tiny)
    if args.vocab:
        hf_cfg.vocab_size = args.vocab
    arch = models.arch_from_config(hf_cfg.to_dict())
    gpu_id = EVM.detect_gpu(dev, None)
    methods = [m for m in args.methods.split(",") if m]
    variants = [v for v in args.variants.split(",") if v]
    ckpt = EVM.saved_checkpoint(hf_cfg, {}, dev)
    doc = {"kind": "train_throughput", "device": dev, "gpu": gpu_id,
           "gpu_name": torch.cuda.get_device_name(0) if dev == "cuda" else None,
           "model": args.model, "tiny": args.tiny, "vocab": hf_cfg.vocab_size, "batch_size": args.batch_size,
           "seq_len": args.seq_len, "grad_ckpt": args.grad_ckpt, "steps": args.steps, "warmup": args.warmup,
           "loss_chunk": args.loss_chunk,
           "versions": {"torch": torch.__version__, **_versions()},
           "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "rows": []}
    print(f"{args.model}{' (tiny)' if args.tiny else ''} on {dev} ({gpu_id}): batch {args.batch_size} x "
          f"{args.seq_len} tokens, vocab {hf_cfg.vocab_size}, grad ckpt {args.grad_ckpt}, {args.steps} timed steps")
    for m in methods:
        if m == "qlora":
            try:
                import bitsandbytes  # noqa: F401
            except ImportError:
                print("qlora skipped: bitsandbytes is not installed")
                continue
        for v in variants:
            t0 = time.perf_counter()
            r = measure(v, m, hf_cfg, ckpt, args, dev)
            r["predicted_peak_bytes"] = predicted(arch, m, "chunked" if v == "engine+chunked" else "reference", args,
                                                  gpu_id, dev, r.get("dtype"))
            r["wall_s"] = round(time.perf_counter() - t0, 1)
            doc["rows"].append(r)
            print(f"  {m:6s} {v:15s} done in {r['wall_s']:.1f} s", flush=True)
    print_table(doc["rows"])
    if not args.no_save:
        out = Path(args.out) if args.out else (ROOT / "bench" / "measurements" /
                                               f"train-throughput-{gpu_id}-{_dt.datetime.now():%Y%m%d-%H%M}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1))
        print(f"wrote {out}")
    return 0


def _versions() -> dict:
    out = {}
    for name in ("transformers", "peft", "bitsandbytes"):
        try:
            out[name] = __import__(name).__version__
        except Exception:          # noqa: BLE001 - not installed
            out[name] = None
    return out


if __name__ == "__main__":
    raise SystemExit(main())

"""Estimates vs measurements: run the reference recipe and compare with engine.estimate.

On a CUDA GPU (the real check; needs only torch, transformers, peft, accelerate, bitsandbytes):

    python bench/estimates_vs_measured.py                       # default grid, ~8 min on an H100
    python bench/estimates_vs_measured.py --models llama-3.1-8b --only infer

builds random-init models of real architectures from the presets (no download), trains them
with the reference recipe of DESIGN.md (lora, qlora, full; checkpointing on/off; several
sequence lengths and batch sizes) and runs greedy generate (bf16, int8, nf4; batch 1 and 8),
measuring torch.cuda.max_memory_allocated / memory_allocated / memory_reserved and time.
It writes every measurement with its estimate to bench/measurements/<gpu>-<date>.json
(after each case, so a cut-off run keeps what it measured) and prints predicted vs measured
with the error, the median and the worst.

On the CPU (smoke test, seconds; no GPU needed):

    python bench/estimates_vs_measured.py --device cpu --tiny          # --quick: 5 cases, as in tests/

runs the same code on shrunken models and measures peak memory with a live-storage tracker
(a TorchDispatchMode that adds each new tensor storage when an op creates it and subtracts
it when the storage is freed): tensor bytes as autograd keeps them, the quantity the estimate
models. CPU kernels differ from CUDA ones (SDPA's CPU flash kernel takes fp32 too, no cuBLAS
workspace, no 512-byte rounding), so on the CPU the estimate is asked for those kernels.

The reference training step (what the estimates model):
    loss = model(input_ids=ids, labels=ids).loss    # outputs (logits) dropped at once
    loss.backward(); clip_grad_norm_(1.0); opt.step(); opt.zero_grad(set_to_none=True); del loss
with torch.optim.AdamW(foreach=True) (the CUDA default), measured on step 3 (states exist).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import weakref
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from engine import hardware, models  # noqa: E402  (pure Python)
from engine.estimate import latency, memory  # noqa: E402

GPU_MODELS = ["qwen2.5-0.5b", "llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b"]
TINY_MODELS = ["llama-3.2-1b", "qwen2.5-0.5b"]
GPU_NAMES = {"H100": "h100-80gb", "H200": "h200-141gb", "A100-SXM4-80GB": "a100-80gb", "A100 80GB": "a100-80gb",
             "A100-SXM4-40GB": "a100-40gb", "A100-PCIE-40GB": "a100-40gb", "L4": "l4-24gb", "A10G": "a10g-24gb",
             "RTX 4090": "rtx-4090-24gb", "RTX 3090": "rtx-3090-24gb", "L40S": "l40s-48gb", "T4": "t4-16gb",
             "B200": "b200-192gb", "RTX 5090": "rtx-5090-32gb"}


# ---- grids ---------------------------------------------------------------------------------

def train_grid(model_id: str, tiny: bool, quick: bool) -> list[dict]:
    """(method, ckpt, seq_len, batch) cases for one model; 8B skips what cannot fit an 80 GB GPU."""
    if tiny:
        cases = [(m, c) for m in ("lora", "qlora", "full") for c in (True, False)]
        if quick:
            cases = [("lora", False), ("qlora", True), ("full", True)]
        out = [dict(method=m, grad_ckpt=c, seq_len=32, batch_size=2) for m, c in cases]
        if not quick:                            # the engine's chunked loss (chunks of 16 of the 64 tokens)
            out += [dict(method=m, grad_ckpt=True, seq_len=32, batch_size=2, loss="chunked", loss_chunk=16)
                    for m in ("lora", "qlora")]
        return out
    big = model_id == "llama-3.1-8b"
    out = []
    for m in ("lora", "qlora", "full"):
        if big and m == "full":
            out.append(dict(method=m, grad_ckpt=True, seq_len=512, batch_size=1))   # 10 bytes/param: the edge of 80 GB
            continue
        for c in (True, False):
            for T, B in ((512, 4), (1024, 2)) if not quick else ((512, 4),):
                if big and not c and m == "full":
                    continue
                out.append(dict(method=m, grad_ckpt=c, seq_len=T, batch_size=B))
        if not quick and not big:
            out.append(dict(method=m, grad_ckpt=True, seq_len=2048, batch_size=8))
        # the engine's chunked loss at the shape where the reference loss is the peak
        out.append(dict(method=m, grad_ckpt=True, seq_len=512, batch_size=4,
                        loss="chunked"))
    return out


def infer_grid(tiny: bool, quick: bool = False) -> list[dict]:
    if tiny:
        # no int8 on the CPU: bitsandbytes' CPU int8 matmul upcasts to fp32, unlike the CUDA kernel
        cases = [("bf16", 1), ("nf4", 4)] if quick else [(w, b) for w in ("bf16", "nf4") for b in (1, 4)]
        return [dict(weights=w, batch_size=b, prompt_len=16, new_tokens=4) for w, b in cases]
    return [dict(weights=w, batch_size=b, prompt_len=512, new_tokens=64) for w in ("bf16", "int8", "nf4") for b in (1, 8)]


# ---- models --------------------------------------------------------------------------------

def hf_config(model_id: str, tiny: bool):
    import transformers
    cfg = dict(models.presets()[model_id]["config"])
    if tiny:
        # 2 layers of width 64 with the original GQA and MLP ratios and a 256-token vocabulary
        # (bf16 matmuls are slow on CPUs without AVX512-BF16: the smoke test must take seconds)
        heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
        ratio = max(1, heads // kv)
        mlp = max(64, round(cfg["intermediate_size"] / cfg["hidden_size"] * 64 / 32) * 32)
        cfg.update(num_hidden_layers=2, vocab_size=256, hidden_size=64, head_dim=16,
                   num_key_value_heads=2, num_attention_heads=2 * ratio, intermediate_size=mlp)
    cfg.update(pad_token_id=0, bos_token_id=1, eos_token_id=2, use_cache=False)
    mt = cfg.pop("model_type")
    cfg.pop("architectures", None)
    return transformers.AutoConfig.for_model(mt, **cfg)


def build_random(hf_cfg, dev: str, dtype):
    import torch
    import transformers
    torch.manual_seed(0)
    with torch.device(dev):
        m = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype)
    return m


def saved_checkpoint(hf_cfg, cache: dict, dev: str = "cpu") -> str:
    """A random-init bf16 checkpoint on disk, so bitsandbytes quantizes through from_pretrained."""
    key = id(hf_cfg)
    if key not in cache:
        import torch
        m = build_random(hf_cfg, dev, torch.bfloat16)          # random init is fast on the GPU
        d = tempfile.mkdtemp(prefix="tq-bench-")
        m.save_pretrained(d)
        del m
        free_cuda()
        cache[key] = d
    return cache[key]


# ---- measuring -----------------------------------------------------------------------------

class LiveStorage:
    """Live tensor-storage bytes on the CPU: + when an op creates a storage, - when it is freed."""

    def __init__(self, trace: bool = False):
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                key = _composite_key(func)
                if key is not None:
                    # a library's composite custom op (bitsandbytes gemm_4bit, int8 matmul):
                    # run its kernel with the mode on, so the temporaries inside are counted
                    with self:
                        out = func._op_dk(key, *args, **kwargs)
                else:
                    out = func(*args, **kwargs)
                tracker._func = func
                tracker._seen(out, args, kwargs)
                return out

        self.mode = Mode()
        self.live: dict[int, int] = {}
        self.cur = 0
        self.peak = 0
        self.trace = trace
        self.info: dict[int, str] = {}
        self.at_peak: list[tuple[int, str]] = []    # (bytes, "op shape dtype") alive at the peak

    def _free(self, key):
        self.cur -= self.live.pop(key, 0)

    def _seen(self, out, args, kwargs):
        import torch
        from torch.utils._pytree import tree_flatten
        ins = {a.untyped_storage().data_ptr() for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            k, n = st.data_ptr(), st.nbytes()
            if n == 0 or k in ins or k in self.live:
                continue
            self.live[k] = n
            self.cur += n
            if self.trace:
                self.info[k] = f"{getattr(self, '_func', '')} {tuple(t.shape)} {str(t.dtype).replace('torch.', '')}"
            if self.cur > self.peak:
                self.peak = self.cur
                if self.trace:
                    self.at_peak = [(v, self.info.get(key, "?")) for key, v in self.live.items()]
            weakref.finalize(st, self._free, k)

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *a):
        self.mode.__exit__(*a)


def _composite_key(func):
    """CompositeExplicitAutograd key of a non-aten op that has no CPU kernel of its own."""
    import torch
    if func.namespace in ("aten", "prim", "prims"):
        return None
    name = func.name()
    dk = torch._C.DispatchKey
    if torch._C._dispatch_has_kernel_for_dispatch_key(name, dk.CPU):
        return None
    if torch._C._dispatch_has_kernel_for_dispatch_key(name, dk.CompositeExplicitAutograd):
        return dk.CompositeExplicitAutograd
    return None


def storage_bytes(*objs) -> int:
    """Bytes of the distinct storages reachable from modules, optimizers and tensors (CPU)."""
    import torch
    seen: dict[int, int] = {}

    def add(t):
        if isinstance(t, torch.Tensor):
            if hasattr(t, "__tensor_flatten__"):
                for n in t.__tensor_flatten__()[0]:
                    add(getattr(t, n))
                return
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()

    for o in objs:
        if isinstance(o, torch.nn.Module):
            for p in o.parameters():
                add(p)
                add(p.grad)
                for k in ("SCB", "CB"):
                    add(getattr(p, k, None))
                qs = getattr(p, "quant_state", None)
                if qs is not None:
                    for k in ("absmax", "code", "offset"):
                        add(getattr(qs, k, None))
                    if getattr(qs, "state2", None) is not None:
                        add(qs.state2.absmax)
                        add(qs.state2.code)
            for b in o.buffers():
                add(b)
        elif isinstance(o, torch.optim.Optimizer):
            for st in o.state.values():
                for v in st.values():
                    add(v)
        else:
            add(o)
    return sum(seen.values())


class Meter:
    """Peak / current allocated bytes on CUDA (torch.cuda stats) or CPU (LiveStorage)."""

    def __init__(self, dev: str):
        self.dev = dev

    def allocated(self, *objs) -> int:
        import torch
        if self.dev == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated()
        return storage_bytes(*objs)

    def run(self, fn, *objs) -> dict:
        """Run fn and return {'peak': bytes, 'reserved': bytes|None, 'seconds': s}."""
        import torch
        if self.dev == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            return {"peak": torch.cuda.max_memory_allocated(), "reserved": torch.cuda.max_memory_reserved(),
                    "seconds": time.perf_counter() - t0}
        base = storage_bytes(*objs)
        t0 = time.perf_counter()
        with LiveStorage() as live:
            fn()
        return {"peak": base + live.peak, "reserved": None, "seconds": time.perf_counter() - t0}


def free_cuda():
    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- training ------------------------------------------------------------------------------

def train_case(hf_cfg, case: dict, dev: str, ckpt_cache: dict, steps: int | None = None) -> dict:
    import torch
    import transformers
    import peft
    method, T, B = case["method"], case["seq_len"], case["batch_size"]
    amp = case.get("precision", "bf16") == "fp32-amp"
    free_cuda()
    before = torch.cuda.memory_allocated() if dev == "cuda" else 0     # leftovers of earlier cases
    if method == "qlora":
        qc = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            saved_checkpoint(hf_cfg, ckpt_cache, dev), dtype=torch.bfloat16, quantization_config=qc,
            device_map={"": 0} if dev == "cuda" else {"": "cpu"})
        model = peft.prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=case["grad_ckpt"],
            gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model = build_random(hf_cfg, dev, torch.float32 if amp else torch.bfloat16)
        if case["grad_ckpt"]:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if method in ("lora", "qlora"):
        # every projection of the block: the seven llama names, or the fused ones (phi3 qkv_proj,
        # gate_up_proj; opt out_proj/fc1/fc2; bloom query_key_value...), as ModelArch lists them
        arch = models.arch_from_config(hf_cfg.to_dict())
        targets = models.lora_modules(arch, case.get("lora_targets") or models.LORA_TARGETS)   # what the train
        # stage adapts and the estimate counts (a case may name a subset, e.g. q_proj and v_proj)
        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                           target_modules=targets, task_type="CAUSAL_LM"))
    model.config.use_cache = False
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, foreach=True)
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(3, hf_cfg.vocab_size, (B, T), generator=g).to(dev)
    meter = Meter(dev)

    chunked = case.get("loss", "reference") == "chunked"
    if chunked:                                  # the engine's loss (engine/runs/stages/loss.py)
        from engine.runs.stages.loss import chunked_loss
        batch = {"input_ids": ids, "labels": ids}

    def step():
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=amp):
            loss = chunked_loss(model, batch, case.get("loss_chunk")) if chunked else model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        del loss

    out = {"oom": False}
    steps = steps or (3 if dev == "cuda" else 2)        # the measured step is the last: states exist
    try:
        for _ in range(steps - 1):
            step()
        r = meter.run(step, model, opt, ids)
        if dev == "cuda":
            t0 = time.perf_counter()
            for _ in range(2):
                step()
            torch.cuda.synchronize()
            dt = (time.perf_counter() - t0) / 2
        else:
            dt = r["seconds"]
        out.update(peak_allocated_bytes=r["peak"] - before, reserved_bytes=r["reserved"], step_time_s=dt,
                   tokens_per_s=B * T / dt)
    except torch.OutOfMemoryError as e:
        out.update(oom=True, error=str(e).splitlines()[0][:200])
    del model, opt, params, ids
    free_cuda()
    return out


# ---- inference -----------------------------------------------------------------------------

def infer_case(hf_cfg, case: dict, dev: str, ckpt_cache: dict) -> dict:
    import torch
    import transformers
    w, B, P, N = case["weights"], case["batch_size"], case["prompt_len"], case["new_tokens"]
    qc = None
    if w == "nf4":
        qc = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    elif w == "int8":
        qc = transformers.BitsAndBytesConfig(load_in_8bit=True)
    meter = Meter(dev)
    path = saved_checkpoint(hf_cfg, ckpt_cache, dev)
    free_cuda()
    before = meter.allocated() if dev == "cuda" else 0
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16, quantization_config=qc, device_map={"": 0} if dev == "cuda" else {"": "cpu"})
    model.eval()
    weights = meter.allocated(model) - before
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(3, hf_cfg.vocab_size, (B, P), generator=g).to(dev)
    mask = torch.ones_like(ids)
    kw = dict(attention_mask=mask, do_sample=False, pad_token_id=0, use_cache=True)
    out = {"weights_bytes": weights, "oom": False}
    try:
        with torch.no_grad():
            model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kw)          # warm-up
            r = meter.run(lambda: model.generate(ids, max_new_tokens=N, min_new_tokens=N, **kw), model, ids, mask)
            t1 = _timed(lambda: model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw), dev)
            tn = _timed(lambda: model.generate(ids, max_new_tokens=N, min_new_tokens=N, **kw), dev)
        out.update(peak_allocated_bytes=r["peak"] - before, reserved_bytes=r["reserved"], prefill_s=t1,
                   decode_tokens_per_s=(N - 1) / max(tn - t1, 1e-9))
    except torch.OutOfMemoryError as e:
        out.update(oom=True, error=str(e).splitlines()[0][:200])
    del model
    free_cuda()
    return out


def cuda_context_bytes() -> int:
    """Device memory in use that the caching allocator does not hold: the CUDA context (after a matmul)."""
    import torch
    x = torch.ones(256, 256, device="cuda")
    (x @ x).sum().item()
    free, total = torch.cuda.mem_get_info()
    return int(total - free - torch.cuda.memory_reserved())


def _timed(fn, dev):
    import torch
    if dev == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if dev == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


# ---- predictions ---------------------------------------------------------------------------

def predict_train(arch, case, gpu_id: str, dev: str) -> dict:
    d = hardware.get(gpu_id)
    kw = dict(attn_kernel="flash", round_to=1, include_workspace=False) if dev == "cpu" else {}
    prec = case.get("precision", "bf16")
    m = memory.train_memory(arch, case["method"], prec, case["seq_len"], case["batch_size"], case["grad_ckpt"],
                            16, d, loss=case.get("loss", "reference"), loss_chunk=case.get("loss_chunk"), **kw)
    s = latency.train_speed(arch, case["method"], prec, case["seq_len"], case["batch_size"], case["grad_ckpt"],
                            16, d)
    dv = memory.device_bytes(m["peak_allocated_bytes"], m["low"], m["high"], d, "train")
    return {"peak_allocated_bytes": m["peak_allocated_bytes"], "low": m["low"], "high": m["high"],
            "peak_phase": m["peak_phase"], "fits": dv["fits"], "tokens_per_s": s["tokens_per_s"],
            "attention_kernel": m["attention_kernel"]}


def predict_infer(arch, case, gpu_id: str, dev: str) -> dict:
    d = hardware.get(gpu_id)
    kw = dict(round_to=1, include_workspace=False) if dev == "cpu" else {}
    m = memory.infer_memory(arch, case["weights"], case["batch_size"], case["prompt_len"], case["new_tokens"], d, **kw)
    s = latency.infer_speed(arch, case["weights"], case["batch_size"], case["prompt_len"], case["new_tokens"], d)
    return {"weights_bytes": m["weights_bytes"], "peak_allocated_bytes": m["peak_allocated_bytes"],
            "low": m["low"], "high": m["high"], "prefill_s": s["hf"]["prefill_s"],
            "decode_tokens_per_s": s["hf"]["decode_tokens_per_s"]}


def err(pred, meas):
    if pred is None or meas in (None, 0):
        return None
    return (pred - meas) / meas


# ---- main ----------------------------------------------------------------------------------

def detect_gpu(dev: str, override: str | None) -> str:
    if override:
        return hardware.get(override).id
    if dev == "cpu":
        return "cpu-server-64gb"
    import torch
    name = torch.cuda.get_device_name(0)
    for key, gid in GPU_NAMES.items():
        if key in name:
            return gid
    return memory.REFERENCE_GPU


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default=None)
    ap.add_argument("--tiny", action="store_true", help="shrunken 2-layer models (smoke test)")
    ap.add_argument("--models", default=None, help="comma-separated preset ids")
    ap.add_argument("--only", choices=("train", "infer"), default=None)
    ap.add_argument("--quick", action="store_true", help="fewer shapes per model (with --tiny: the test suite's smoke run)")
    ap.add_argument("--gpu", default=None, help="preset id of this GPU (default: detected)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "measurements"))
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--budget-s", type=float, default=480.0,
                    help="start no new case after this many seconds (a device call is limited to 10 minutes)")
    args = ap.parse_args(argv)
    import warnings
    warnings.filterwarnings("ignore")
    import torch
    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev == "cuda" and not torch.cuda.is_available():
        print("no CUDA device; use --device cpu --tiny", file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1))) if dev == "cpu" else None
    gpu_id = detect_gpu(dev, args.gpu)
    model_ids = args.models.split(",") if args.models else (TINY_MODELS if args.tiny else GPU_MODELS)
    import transformers
    import peft
    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    try:
        import bitsandbytes
        versions["bitsandbytes"] = bitsandbytes.__version__
    except Exception as e:  # noqa: BLE001 - report and continue without bnb cases
        versions["bitsandbytes"] = f"unavailable: {e}"
    stamp = _dt.datetime.now().strftime("%Y-%m-%dT%H%M%S")
    out_path = Path(args.out) / f"{gpu_id}{'-tiny' if args.tiny else ''}-{stamp}.json"
    doc = {"gpu": gpu_id, "device": dev, "device_name": torch.cuda.get_device_name(0) if dev == "cuda" else platform.processor(),
           "tiny": args.tiny, "versions": versions, "started": stamp, "results": []}
    if dev == "cuda":
        doc["cuda_context_bytes"] = cuda_context_bytes()
    ckpt_cache: dict = {}
    t_start = time.perf_counter()
    skipped = []
    for mid in model_ids:
        hf_cfg = hf_config(mid, args.tiny)
        arch = models.arch_from_config(hf_cfg.to_dict(), name=mid + ("-tiny" if args.tiny else ""))
        cases = []
        if args.only in (None, "train"):
            cases += [("train", c) for c in train_grid(mid, args.tiny, args.quick)]
        if args.only in (None, "infer"):
            cases += [("infer", c) for c in infer_grid(args.tiny, args.quick)]
        for kind, case in cases:
            if time.perf_counter() - t_start > args.budget_s:
                skipped.append(f"{mid} {kind} {case}")
                continue
            t0 = time.perf_counter()
            try:
                meas = (train_case if kind == "train" else infer_case)(hf_cfg, case, dev, ckpt_cache)
            except Exception as e:  # noqa: BLE001 - one failing case must not lose the others
                meas = {"oom": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
                free_cuda()
            pred = (predict_train if kind == "train" else predict_infer)(arch, case, gpu_id, dev)
            doc["results"].append({"kind": kind, "model": mid, **case, "measured": meas, "predicted": pred,
                                   "wall_s": round(time.perf_counter() - t0, 2)})
            _save(doc, out_path, args.no_save)
            _print_row(doc["results"][-1], show_speed=dev == "cuda")
    if skipped:
        doc["skipped_for_budget"] = skipped
        print(f"{len(skipped)} cases skipped (--budget-s {args.budget_s:.0f}); run them with --models/--only")
    summary = summarize(doc["results"], speed=dev == "cuda")
    doc["summary"] = summary
    _save(doc, out_path, args.no_save)
    print_summary(summary)
    if not args.no_save:
        print(f"wrote {out_path}")
    return 0


def _save(doc, path: Path, skip: bool):
    if skip:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(path)


def _label(r) -> str:
    if r["kind"] == "train":
        return (f"{r['model']} {r['method']} {'ckpt' if r['grad_ckpt'] else 'nockpt'} T{r['seq_len']} B{r['batch_size']}"
                + (" chunked" if r.get("loss") == "chunked" else ""))
    return f"{r['model']} {r['weights']} B{r['batch_size']} P{r['prompt_len']}+{r['new_tokens']}"


def _gib(x):
    """Bytes as GiB, or MiB for the tiny CPU models."""
    if x is None:
        return "-"
    return f"{x / 2 ** 30:8.3f} GiB" if x >= 2 ** 28 else f"{x / 2 ** 20:8.3f} MiB"


def _print_row(r, show_speed: bool = True):
    m, p = r["measured"], r["predicted"]
    if m.get("error") and not m.get("oom"):
        print(f"{_label(r):48s} ERROR {m['error']}", flush=True)
        return
    if m.get("oom"):
        print(f"{_label(r):55s} OOM measured; predicted {_gib(p['peak_allocated_bytes'])} fits={p.get('fits')}",
              flush=True)
        return
    e = err(p["peak_allocated_bytes"], m.get("peak_allocated_bytes"))
    extra = ""
    if r["kind"] == "infer":
        ew = err(p["weights_bytes"], m["weights_bytes"])
        extra = f"  weights {_gib(p['weights_bytes'])}/{_gib(m['weights_bytes'])} ({ew:+.1%})"
    speed = ""
    if not show_speed:
        pass
    elif r["kind"] == "train" and m.get("tokens_per_s"):
        speed = f"  tok/s pred {p['tokens_per_s']:,.0f} meas {m['tokens_per_s']:,.0f}"
    elif r["kind"] == "infer" and m.get("decode_tokens_per_s"):
        speed = f"  decode tok/s pred {p['decode_tokens_per_s']:,.1f} meas {m['decode_tokens_per_s']:,.1f}"
    print(f"{_label(r):48s} peak pred {_gib(p['peak_allocated_bytes'])} meas {_gib(m['peak_allocated_bytes'])} "
          f"({e:+.1%}){extra}{speed}", flush=True)


def summarize(results: list[dict], speed: bool = True) -> dict:
    """Median and worst |error| per quantity (speed only on the GPU: CPU times say nothing of it)."""
    out = {}
    keys = [("train", "peak_allocated_bytes"), ("infer", "peak_allocated_bytes"), ("infer", "weights_bytes")]
    if speed:
        keys += [("train", "tokens_per_s"), ("infer", "decode_tokens_per_s"), ("infer", "prefill_s")]
    for kind, key in keys:
        errs = [abs(err(r["predicted"].get(key), r["measured"].get(key))) for r in results
                if r["kind"] == kind and not r["measured"].get("oom") and r["measured"].get(key)]
        if errs:
            out[f"{kind}.{key}"] = {"n": len(errs), "median_abs_err": statistics.median(errs), "worst_abs_err": max(errs)}
    for kind in ("train", "infer"):    # allocator slack: reserved / allocated at the peak (presets/estimate/runtime.yaml)
        ratios = [r["measured"]["reserved_bytes"] / r["measured"]["peak_allocated_bytes"] for r in results
                  if r["kind"] == kind and r["measured"].get("reserved_bytes") and r["measured"].get("peak_allocated_bytes")]
        if ratios:
            out[f"{kind}.reserved_over_peak"] = {"n": len(ratios), "median": statistics.median(ratios), "max": max(ratios)}
    ooms = [r for r in results if r["measured"].get("oom")]
    out["oom_cases"] = [{"case": _label(r), "predicted_fits": r["predicted"].get("fits")} for r in ooms]
    out["errors"] = [{"case": _label(r), "error": r["measured"]["error"]} for r in results
                     if r["measured"].get("error") and not r["measured"].get("oom")]
    return out


def print_summary(s: dict):
    print("\nsummary (|predicted - measured| / measured)")
    for k, v in s.items():
        if k == "oom_cases":
            for o in v:
                print(f"  OOM: {o['case']} (estimate said fits={o['predicted_fits']})")
            continue
        if k == "errors":
            for o in v:
                print(f"  ERROR: {o['case']}: {o['error']}")
            continue
        if k.endswith("reserved_over_peak"):
            print(f"  {k:34s} n={v['n']:3d}  median {v['median']:.3f}  max {v['max']:.3f}")
            continue
        print(f"  {k:34s} n={v['n']:3d}  median {v['median_abs_err']:6.1%}  worst {v['worst_abs_err']:6.1%}")


if __name__ == "__main__":
    raise SystemExit(main())

"""What went wrong in a run, said so a person can act on it.

``classify(exc, stage)``: an exception raised by a stage -> kind + one-line reason.
    - torch.OutOfMemoryError (CUDA OOM, also the older RuntimeError "CUDA out of memory")
      -> "out of GPU memory in stage X"
    - MemoryError / torch's "DefaultCPUAllocator: can't allocate memory" -> "out of CPU memory in stage X"
    - InputError (a bad dataset or field found late) -> its message
    - anything else -> "<ExceptionType> in stage X: <first line of the message>"
``suggestions(...)``: for an OOM, what would fit instead (a smaller batch, gradient
    checkpointing, 4-bit / QLoRA), checked against the planner's estimates where it can
    make them, else the generic list.
``exit_reason(returncode)``: a worker that died without finishing -> "worker process died (signal 9, SIGKILL)".

Imports no torch: it recognises torch's exception types by name.
"""
from __future__ import annotations

import signal

from engine.fmt import gib

GPU_OOM_TEXT = ("CUDA out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "HIP out of memory", "MPS backend out of memory")
CPU_OOM_TEXT = ("DefaultCPUAllocator: can't allocate memory", "std::bad_alloc")


class RankFailed(Exception):
    """A rank of a multi-process stage failed (engine/runs/distributed.py): which rank of how
    many, its kind (oom-gpu, oom-cpu, input, exception, rank-died, launcher) and the reason."""

    def __init__(self, rank: int | None, world: int, kind: str, reason: str, message: str = ""):
        super().__init__(reason)
        self.rank, self.world, self.kind, self.reason, self.message = rank, world, kind, reason, message


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0].strip() if text else ""


def classify(exc: BaseException, stage: str) -> dict:
    """``{"kind": oom-gpu|oom-cpu|input|exception, "reason": str, "message": str}``."""
    from engine.errors import InputError
    if isinstance(exc, RankFailed):
        return {"kind": exc.kind, "reason": exc.reason, "message": exc.message or exc.reason, "rank": exc.rank,
                "processes": exc.world}
    names = {c.__name__ for c in type(exc).__mro__}
    text = str(exc)
    msg = _first_line(exc)
    if "OutOfMemoryError" in names or any(t in text for t in GPU_OOM_TEXT):
        return {"kind": "oom-gpu", "reason": f"out of GPU memory in stage {stage}", "message": msg}
    if isinstance(exc, MemoryError) or any(t in text for t in CPU_OOM_TEXT):
        return {"kind": "oom-cpu", "reason": f"out of CPU memory in stage {stage}", "message": msg}
    if isinstance(exc, InputError):
        return {"kind": "input", "reason": f"bad input in stage {stage}: {msg}", "message": msg}
    what = type(exc).__name__
    return {"kind": "exception", "reason": f"{what} in stage {stage}" + (f": {msg}" if msg else ""),
            "message": msg}


def exit_reason(returncode: int | None) -> str:
    """Why a worker that never wrote its ``finished`` event is gone."""
    if returncode is None:
        return "worker process died (exit status unknown: it was not started by this process)"
    if returncode < 0:
        sig = -returncode
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = "unknown"
        hint = " (the kernel's OOM killer sends this when the machine runs out of memory)" if sig == 9 else ""
        return f"worker process died (signal {sig}, {name}){hint}"
    return f"worker process exited with code {returncode} without finishing the run"


# -- what would fit instead ---------------------------------------------------
def planner_model(model: str):
    """The model as the planner can resolve it: the project's demo models (``demo:NAME``) by
    their config.json dict (no build needed), anything else as given."""
    from engine import demo_presets
    try:
        if demo_presets.is_demo(model):
            return {**demo_presets.hf_config(demo_presets.model_name(model)), "_name_or_path": model}
    except Exception:
        pass
    return model


def _train_estimate(**kw) -> dict | None:
    try:
        from engine.estimate import estimate_train
    except ImportError:
        return None
    try:
        return estimate_train(**kw)
    except Exception:
        return None


def _need(est: dict | None) -> int | None:
    """Bytes the device must have, from a training estimate."""
    if not est:
        return None
    return est.get("device_bytes") or est.get("peak_allocated_bytes")


def _combined_fit(base: dict, tp, capacity_bytes: int) -> str | None:
    """When no single change fits: apply them one after another (checkpointing, halving the
    batch, LoRA, 4-bit base, halving the sequence) until the estimate fits; None if nothing does."""
    kw, said = dict(base), {}
    changes = [("train.grad_ckpt: true", {"grad_ckpt": True})]
    b = tp.batch_size
    while b > 1:
        b //= 2
        changes.append((f"train.batch_size: {b} (grad_accum {tp.grad_accum * (tp.batch_size // b)})", {"batch_size": b}))
    if base["method"] == "full":
        changes.append(("strategy lora", {"method": "lora"}))
    if base["method"] in ("full", "lora"):
        changes.append(("strategy qlora", {"method": "qlora"}))
    s = tp.seq_len
    while s > 128:
        s //= 2
        changes.append((f"train.seq_len: {s}", {"seq_len": s}))
    for text, change in changes:
        if all(kw.get(k) == v for k, v in change.items()):
            continue
        kw.update(change)
        said.pop(tuple(change), None)          # a later change of the same setting replaces the earlier
        said[tuple(change)] = text
        need = _need(_train_estimate(**kw))
        if need is None:
            return None
        if need <= capacity_bytes:
            return (f"together: {', '.join(said.values())}: estimated {gib(need)}, fits in {gib(capacity_bytes)}")
    return None


def suggestions(spec, strategy: dict, stage: str, gpu: str | None = None,
                capacity_bytes: int | None = None) -> list[str]:
    """What would fit instead after an OOM in ``stage``. Training variants are checked
    against ``estimate_train`` when it can estimate this model on this GPU (``gpu`` preset id,
    ``capacity_bytes`` what the device has): those estimated to fit, else the generic advice;
    then the estimate of the run that failed, when there is one."""
    tp = spec.train
    if stage == "train" and strategy.get("train"):
        from engine import strategies           # the one translator: what the worker recorded and the advisor asks
        try:
            base = strategies.planner_requests(strategy, planner_model(spec.model),
                                               strategies.Workload.from_spec(spec, gpu))["train"]
        except Exception:                        # noqa: BLE001 - a model the planner cannot resolve: generic advice
            base = {}
        method = base["method"] if base else strategy["train"]
        variants = []
        b = tp.batch_size
        while b > 1:
            b //= 2
            variants.append((f"train.batch_size: {b} with train.grad_accum: {tp.grad_accum * (tp.batch_size // b)} "
                             f"(same effective batch)", dict(base, batch_size=b)))
        if not tp.grad_ckpt:
            variants.append(("train.grad_ckpt: true (gradient checkpointing)", dict(base, grad_ckpt=True)))
        if method in ("full", "lora"):
            variants.append(("strategy qlora (4-bit NF4 base + LoRA adapters)", dict(base, method="qlora")))
        if method == "full":
            variants.append(("strategy lora (16-bit base + adapters)", dict(base, method="lora")))
        if tp.seq_len > 256:
            variants.append((f"train.seq_len: {tp.seq_len // 2}", dict(base, seq_len=tp.seq_len // 2)))
        fits, note = [], None
        for text, kw in variants if base else []:
            need = _need(_train_estimate(**kw))
            if need is not None and capacity_bytes and need <= capacity_bytes:
                fits.append(f"{text}: estimated {gib(need)}, fits in {gib(capacity_bytes)}")
        if not fits and capacity_bytes and base:
            combined = _combined_fit(base, tp, capacity_bytes)
            if combined:
                fits.append(combined)
        need_now = _need(_train_estimate(**base)) if base else None
        if need_now is not None and capacity_bytes:
            note = (f"(the planner estimated this run at {gib(need_now)}; the GPU has {gib(capacity_bytes)})")
        generic = [f"a smaller train.batch_size (now {tp.batch_size}) with a larger train.grad_accum",
                   "train.grad_ckpt: true" if not tp.grad_ckpt else None,
                   "4-bit: the qlora strategy (NF4 base + LoRA)" if method in ("full", "lora") else None,
                   f"a shorter train.seq_len (now {tp.seq_len})"]
        out = fits or [g for g in generic if g]
        return out + ([note] if note else [])
    elif stage == "quantize":
        generic = ["fewer quantize.calibration_samples (calibration activations are held in memory)",
                   "shorter calibration sequences (train.seq_len)",
                   "a data-free method (nf4, int8) that quantizes layer by layer while loading"]
    elif stage == "evaluate":
        generic = ["a smaller evaluate.max_examples / evaluate.prompt_len / evaluate.new_tokens",
                   "a 4-bit deployment (nf4, gptq-4bit) to shrink the weights"]
    else:
        generic = ["a smaller batch, gradient checkpointing, or a 4-bit base (qlora)"]
    return generic

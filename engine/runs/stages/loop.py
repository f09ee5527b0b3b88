"""The training loop every trainer shares: the train stage (full, LoRA, QLoRA, QAT) and the demo
model's pretraining (engine/runs/demo.py). Plain torch: AdamW, gradient accumulation, clipping,
linear warmup then linear decay; no stage context, so the demo builder can use it too."""
from __future__ import annotations

import contextlib
import time

from engine.errors import InputError
from engine.vocab import OPTIMIZERS


def seed_everything(seed: int) -> None:
    import random

    import torch
    random.seed(seed)
    torch.manual_seed(seed)


def lr_at(step: int, total: int, lr: float, warmup: int) -> float:
    """Linear warmup over ``warmup`` steps, then linear decay towards 0 at ``total`` (step counts from 0)."""
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    return lr * max(0.0, (total - step) / max(1, total - warmup))




def make_optimizer(name: str, params, lr: float, weight_decay: float = 0.0):
    """torch AdamW (the reference recipe) or a bitsandbytes AdamW: 8-bit blockwise states
    (AdamW8bit), paged states in unified memory that page to the host under pressure
    (PagedAdamW8bit / PagedAdamW, the QLoRA paper's paged optimizers)."""
    import torch
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name not in OPTIMIZERS:
        raise InputError(f"train.optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}",
                         field="train.optimizer")
    import bitsandbytes as bnb
    cls = {"adamw-8bit": bnb.optim.AdamW8bit, "paged-adamw-8bit": bnb.optim.PagedAdamW8bit,
           "paged-adamw": bnb.optim.PagedAdamW}[name]
    return cls(params, lr=lr, weight_decay=weight_decay)


def fit(model, batch_iter, steps: int, lr: float, warmup: int = 0, accum: int = 1, max_grad_norm: float = 1.0,
        params=None, on_step=None, should_stop=None, weight_decay: float = 0.0, autocast_dtype=None,
        device: str = "cpu", mem_fn=None, loss_fn=None, optimizer: str = "adamw", sync=None,
        checkpoint=None) -> dict:
    """Train ``model`` for ``steps`` optimizer steps of ``accum`` micro-batches each (their mean
    loss, so the update is the full batch's); returns losses, tokens/s and whether it stopped.

    ``loss_fn(model, batch)``: the loss (stages/loss.py); default the model's own (reference).
    ``optimizer``: one of OPTIMIZERS (make_optimizer). Batch keys starting with ``_`` are
    bookkeeping (``_tokens``: real tokens of a packed batch), not model inputs.

    ``sync(loss, tokens, positions, mem) -> (loss, tokens, positions, extra)``: several processes
    training one model (FSDP, stages/fsdp.py): called once per step on every rank, it returns the
    mean loss and the summed tokens/positions over the ranks, and ``extra`` for the step event
    (each rank's memory).

    ``checkpoint`` (stages/checkpoint.py ``Checkpointer``): with a resume checkpoint, the weights and
    the optimizer state are loaded from it and the loop continues at its step (the caller has
    skipped the micro-batches it consumed; ``losses`` then holds the earlier steps' too); a
    checkpoint is saved every ``checkpoint.every`` steps and when the loop stops early."""
    import torch
    from engine.runs.stages.loss import reference_loss
    loss_fn = loss_fn or reference_loss
    params = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    if not params:
        raise InputError("nothing to train: the model has no trainable parameters", field="train")
    opt = make_optimizer(optimizer, params, lr, weight_decay)
    losses, start = [], 0
    if checkpoint is not None and checkpoint.resume is not None:
        back = checkpoint.load(model, opt)
        start, losses = int(back["step"]), list(back.get("losses") or [])
    tokens, positions, t0 = 0, 0, time.perf_counter()
    stopped = False
    done = start
    last_saved = start
    for step in range(start, steps):
        if should_stop is not None and should_stop():
            stopped = True
            break
        cur_lr = lr_at(step, steps, lr, warmup)
        for g in opt.param_groups:
            g["lr"] = cur_lr
        step_loss, step_tokens, step_positions = 0.0, 0, 0
        for _ in range(accum):
            batch = dict(next(batch_iter))
            meta = {k: batch.pop(k) for k in [k for k in batch if k.startswith("_")]}
            with (torch.autocast(device_type="cuda" if device == "cuda" else "cpu", dtype=autocast_dtype)
                  if autocast_dtype is not None else contextlib.nullcontext()):
                loss = loss_fn(model, batch) / accum
            loss.backward()
            step_loss += loss.item()
            m = batch.get("attention_mask")
            step_tokens += (int(meta["_tokens"]) if "_tokens" in meta else
                            int(m.sum()) if m is not None else batch["input_ids"].numel())
            step_positions += batch["input_ids"].numel()   # padded B x T: what the compute (and the estimate) sees
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        done = step + 1
        mem = mem_fn() if mem_fn else None
        extra = {}
        if sync is not None:
            step_loss, step_tokens, step_positions, extra = sync(step_loss, step_tokens, step_positions, mem)
        losses.append(step_loss)
        tokens += step_tokens
        positions += step_positions
        if on_step is not None:
            el = time.perf_counter() - t0
            on_step({"step": done, "total": steps, "loss": step_loss, "lr": cur_lr,
                     "tokens_per_s": tokens / el if el > 0 else None,
                     "eta_s": el / (done - start) * (steps - done), "mem_bytes": mem, **extra})
        if checkpoint is not None and checkpoint.due(done):
            checkpoint.save(done, model, opt, {"total_steps": steps, "losses": losses}, "every")
            last_saved = done
    if checkpoint is not None and checkpoint.every and stopped and done > last_saved:
        checkpoint.save(done, model, opt, {"total_steps": steps, "losses": losses}, "stopped")
    wall = time.perf_counter() - t0
    del opt
    return {"steps": done, "total": steps, "losses": losses, "tokens": tokens, "wall_s": round(wall, 3),
            "start_step": start,
            "tokens_per_s": round(tokens / wall, 1) if wall > 0 and done > start else None, "stopped": stopped,
            "positions": positions,
            "positions_per_s": round(positions / wall, 1) if wall > 0 and done > start else None}

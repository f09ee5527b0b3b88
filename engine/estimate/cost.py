"""Cost: plain arithmetic the advisor composes with the speed estimates (docs/cost.md).

Money comes from the hardware presets (`price_per_hour` in presets/hardware/gpus.yaml and
targets.yaml: USD per device-hour, on-demand). A target without a price (a phone, an edge
board you own) gets `usd: None` and the reason. Every result carries the formula with its
inputs filled in, so the UI can show where the number comes from.

    train_cost(tokens, tokens_per_s, gpu, gpu_count=1)            -> {gpu_hours, usd, formula, ...}
    time_cost(seconds, gpu, gpu_count=1, what="job")              -> {gpu_hours, usd, formula, ...}
    calibration_cost(seconds, gpu, gpu_count=1)                   (time_cost of a calibration pass)
    eval_cost(seconds, gpu, gpu_count=1)                          (time_cost of an evaluation)
    serving_cost(decode_tokens_per_s_per_sequence, batch_size, gpu, max_latency_ms_per_token=None)
        -> {usd_per_million_tokens, tokens_per_s, batch_size, feasible_at_latency, formula, ...}
"""
from __future__ import annotations

import math

from engine.errors import InputError


def _device(gpu):
    """A hardware preset (id or Device) -> Device; unknown ids list the known ones."""
    from engine import hardware
    if isinstance(gpu, hardware.Device):
        return gpu
    if gpu is None or str(gpu).strip() == "":
        raise InputError(f"gpu is required; known: {', '.join(sorted(hardware.devices()))}", field="gpu")
    return hardware.get(gpu)


def price(gpu) -> tuple[float | None, str]:
    """(USD per device-hour, where it comes from) or (None, why there is none)."""
    d = _device(gpu)
    if d.price_per_hour is None:
        return None, (f"{d.id} ({d.kind}) has no hourly price in presets/hardware: a device you own costs "
                      "its purchase and power, not an hourly rate")
    return float(d.price_per_hour), f"{d.id}: {d.price_per_hour} USD/h (presets/hardware, on-demand list price)"


def _positive(name: str, value, allow_zero: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number, got {value!r}", field=name)
    if isinstance(value, bool) or not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise InputError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}", field=name)
    return v


def _count(name: str, value) -> int:
    if isinstance(value, str) and value.strip().isdigit():     # JSON object keys arrive as strings
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < 1:
        raise InputError(f"{name} must be a whole number >= 1, got {value!r}", field=name)
    return int(value)


def time_cost(seconds, gpu, gpu_count=1, what: str = "job") -> dict:
    """A job of `seconds` wall-clock on `gpu_count` devices: gpu_hours = s / 3600 * n, usd = gpu_hours * price."""
    s = _positive("seconds", seconds, allow_zero=True)
    n = _count("gpu_count", gpu_count)
    d = _device(gpu)
    usd_h, why = price(d)
    gpu_hours = s / 3600.0 * n
    out = {"what": what, "seconds": s, "gpu": d.id, "gpu_count": n, "gpu_hours": gpu_hours,
           "usd": None if usd_h is None else gpu_hours * usd_h, "usd_per_hour": usd_h, "price_source": why,
           "formula": f"gpu_hours = {s:g} s / 3600 * {n} = {gpu_hours:.4g}"
                      + ("" if usd_h is None else f"; usd = gpu_hours * {usd_h:g} USD/h = {gpu_hours * usd_h:.4g}")}
    if usd_h is None:
        out["reason"] = why
    return out


def calibration_cost(seconds, gpu, gpu_count=1) -> dict:
    """Cost of a calibration pass (GPTQ/AWQ/SmoothQuant statistics) that takes `seconds`."""
    return time_cost(seconds, gpu, gpu_count, what="calibration")


def eval_cost(seconds, gpu, gpu_count=1) -> dict:
    """Cost of an evaluation that takes `seconds`."""
    return time_cost(seconds, gpu, gpu_count, what="evaluation")


def train_cost(tokens, tokens_per_s, gpu, gpu_count=1) -> dict:
    """Training `tokens` (all epochs) at `tokens_per_s` (the whole job's throughput, all GPUs
    together): seconds = tokens / tokens_per_s; then time_cost."""
    t = _positive("tokens", tokens, allow_zero=True)
    rate = _positive("tokens_per_s", tokens_per_s)
    seconds = t / rate
    out = time_cost(seconds, gpu, gpu_count, what="training")
    out.update(tokens=t, tokens_per_s=rate,
               formula=f"seconds = {t:g} tokens / {rate:g} tokens/s = {seconds:.4g}; " + out["formula"])
    return out


def serving_cost(decode_tokens_per_s_per_sequence, batch_size, gpu, max_latency_ms_per_token=None) -> dict:
    """Price of a million generated tokens when one device serves `batch_size` sequences at once.

    `decode_tokens_per_s_per_sequence` is either one number (the speed of each sequence at
    `batch_size`) or a mapping {batch: speed per sequence} from a sweep of the speed estimate.
    The largest batch (up to `batch_size`) whose time per token, 1000 / speed ms, still meets
    `max_latency_ms_per_token` sets the throughput, batch * speed tokens/s, that the hourly price
    buys: usd_per_million_tokens = price / (tokens_per_s * 3600) * 1e6. When no batch meets the
    goal the smallest is reported with feasible_at_latency False.
    """
    max_batch = _count("batch_size", batch_size)
    if isinstance(decode_tokens_per_s_per_sequence, dict):
        if not decode_tokens_per_s_per_sequence:
            raise InputError("decode_tokens_per_s_per_sequence: give at least one {batch: tokens/s}",
                             field="decode_tokens_per_s_per_sequence")
        speeds = {_count("batch_size", b): _positive("decode_tokens_per_s_per_sequence", v)
                  for b, v in decode_tokens_per_s_per_sequence.items()}
    else:
        speeds = {max_batch: _positive("decode_tokens_per_s_per_sequence", decode_tokens_per_s_per_sequence)}
    goal = None if max_latency_ms_per_token is None else _positive("max_latency_ms_per_token", max_latency_ms_per_token)
    candidates = sorted(b for b in speeds if b <= max_batch)
    if not candidates:
        raise InputError(f"no speed given for a batch <= batch_size {max_batch}; batches given: "
                         f"{', '.join(map(str, sorted(speeds)))}", field="batch_size")
    ok = [b for b in candidates if goal is None or 1000.0 / speeds[b] <= goal]
    chosen = ok[-1] if ok else candidates[0]
    per_seq = speeds[chosen]
    tokens_per_s = chosen * per_seq
    d = _device(gpu)
    usd_h, why = price(d)
    usd_m = None if usd_h is None else usd_h / (tokens_per_s * 3600.0) * 1e6
    latency = 1000.0 / per_seq
    out = {"gpu": d.id, "batch_size": chosen, "tokens_per_s": tokens_per_s, "tokens_per_s_per_sequence": per_seq,
           "latency_ms_per_token": latency, "feasible_at_latency": None if goal is None else bool(ok),
           "max_latency_ms_per_token": goal, "usd_per_hour": usd_h, "usd_per_million_tokens": usd_m,
           "price_source": why,
           "formula": f"tokens_per_s = batch {chosen} * {per_seq:g} tokens/s = {tokens_per_s:.4g}"
                      + ("" if usd_h is None else
                         f"; usd_per_million_tokens = {usd_h:g} USD/h / ({tokens_per_s:.4g} * 3600) * 1e6 = {usd_m:.4g}")}
    if goal is not None:
        out["why_batch"] = (f"largest batch <= {max_batch} with {1000.0 / speeds[chosen]:.3g} ms/token <= {goal:g} ms"
                            if ok else f"no batch meets {goal:g} ms/token (batch {chosen}: {latency:.3g} ms)")
    if usd_h is None:
        out["reason"] = why
    return out

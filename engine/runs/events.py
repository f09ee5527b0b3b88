"""Run events: their types, the check every emitted event goes through, and how they read.

An event is ``{"seq", "ts", "type", **payload}``; ``seq`` counts 1, 2, ... per run with no
gaps, so a reader that saw seq N asks for the events after N and misses nothing. Types:

    queued          strategy, model, device                    (executor, at launch)
    started         pid, device                                (worker)
    prepare         what, step, total, done, duration_s        (worker: what a run needs before its
                                                               first stage, e.g. building a demo model;
                                                               never part of a stage's time)
    stage_started   stage, index, total                        (worker)
    step            step, total, loss, lr, tokens_per_s, mem_bytes, eta_s   (stages)
    eval            name, metrics                              (stages)
    log             message                                    (stages, worker)
    artifact        path, kind                                 (stages)
    metric          name, value, unit                          (stages)
    warning         message                                    (stages, worker)
    error           message, stage, kind, traceback, suggestions   (worker, watcher)
    stage_finished  stage, index, duration_s, peak_mem_bytes, mem_source, result
    finished        status, reason                             (whoever ends the run, once)
"""
from __future__ import annotations

import math
import time

from engine.fmt import iec
from engine.record import fold

TYPES = ("queued", "started", "prepare", "stage_started", "step", "eval", "log", "artifact", "metric",
         "warning", "error", "stage_finished", "finished")
STAGE_TYPES = ("step", "eval", "log", "artifact", "metric", "warning")   # what a stage may emit
RESERVED = ("seq", "ts", "type", "run_id")


def check(type: str, payload: dict, allowed=TYPES) -> dict:
    """Validate an event before it is stored; returns the payload with non-finite floats as None."""
    if type not in allowed:
        raise ValueError(f"unknown event type {type!r}; known: {', '.join(allowed)}")
    bad = [k for k in payload if k in RESERVED]
    if bad:
        raise ValueError(f"event payload may not use the keys {', '.join(bad)}")
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in payload.items()}


def fmt_duration(s) -> str:
    if s is None:
        return "?"
    s = float(s)
    if s < 60:
        return f"{s:.1f}s"
    m, s = divmod(int(round(s)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def line(ev: dict) -> str:
    """One human line for a progress stream (the CLI's stderr, a log tail)."""
    t, clock = ev["type"], time.strftime("%H:%M:%S", time.localtime(ev.get("ts", time.time())))
    if t == "step":
        parts = [f"step {ev.get('step')}" + (f"/{ev['total']}" if ev.get("total") else "")]
        if ev.get("loss") is not None:
            parts.append(f"loss {ev['loss']:.4f}")
        if ev.get("lr") is not None:
            parts.append(f"lr {ev['lr']:.2e}")
        if ev.get("tokens_per_s") is not None:
            parts.append(f"{ev['tokens_per_s']:.0f} tok/s")
        if ev.get("mem_bytes") is not None:
            parts.append(f"mem {iec(ev['mem_bytes'])}")
        if ev.get("eta_s") is not None:
            parts.append(f"eta {fmt_duration(ev['eta_s'])}")
        text = "  ".join(parts)
    elif t == "stage_started":
        text = f"stage {ev.get('index', 0) + 1}/{ev.get('total', '?')}: {ev.get('stage')}"
    elif t == "stage_finished":
        ended = "failed after" if ev.get("failed") else "stopped after" if ev.get("stopped") else "done in"
        text = (f"stage {ev.get('stage')} {ended} {fmt_duration(ev.get('duration_s'))}, "
                f"peak memory {iec(ev.get('peak_mem_bytes'))} ({ev.get('mem_source')})")
    elif t == "prepare":
        if ev.get("done"):
            text = f"prepared: {ev.get('what')} in {fmt_duration(ev.get('duration_s'))} (not part of any stage)"
        else:
            text = f"preparing: {ev.get('what')}" + (f" ({ev.get('step')}/{ev['total']})" if ev.get("total") else "")
    elif t == "eval":
        metrics = ev.get("metrics") or {}
        shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else f"{k} {v}"
                          for k, v in metrics.items())
        text = f"eval {ev.get('name', '')}: {shown}"
    elif t == "metric":
        text = f"metric {ev.get('name')} = {ev.get('value')} {ev.get('unit') or ''}".rstrip()
    elif t == "artifact":
        text = f"artifact ({ev.get('kind')}): {ev.get('path')}"
    elif t in ("log", "warning"):
        text = ("warning: " if t == "warning" else "") + str(ev.get("message", ""))
    elif t == "error":
        text = f"error in stage {ev.get('stage')}: {ev.get('message')}"
    elif t == "finished":
        text = f"run {ev.get('status')}" + (f": {ev['reason']}" if ev.get("reason") else "")
    elif t == "started":
        text = f"worker started (pid {ev.get('pid')}, device {ev.get('device')})"
    elif t == "queued":
        text = f"queued: {ev.get('strategy')} on {ev.get('model')} ({ev.get('device')})"
    else:
        text = t
    return f"[{clock}] {text}"


def summary(events: list[dict], tail: int = 10) -> dict:
    """What a run's events say at a glance (``runs show``): counts by type, the last step, stages,
    the last logs; the fold of engine.record."""
    f = fold(events)
    return {"count": f.count, "last_seq": f.seq, "by_type": f.by_type, "last_step": f.last_step_event,
            "stages": f.stages_done, "warnings": f.warnings, "errors": f.errors, "log_tail": f.logs[-tail:]}

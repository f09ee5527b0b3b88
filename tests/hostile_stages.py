"""Small stages for the hostile-input and fault tests (loaded by real workers through the
``stages="<this file>:STAGES"`` hook). The run's name says what the train stage does:
    leak       prints $HF_TOKEN to stdout, logs it in an event, then fails with it in the message
    chatty     emits 4000 log events of 200 bytes (grows the store: the disk-full test)
    slow       0.1 s per step, polls the stop flag
    nan        the loss becomes NaN at step 3
    naneval    reports an evaluation with NaN / inf figures (nested in the payload)
"""
from __future__ import annotations

import os
import sys
import time


def _train(ctx):
    mode = ctx.spec.name.split()
    n = ctx.spec.train.steps or 5
    if "leak" in mode:
        tok = os.environ.get("HF_TOKEN", "")
        print(f"loading with token {tok}", flush=True)
        sys.stderr.write(f"stderr says {tok}\n")
        ctx.emit("log", message=f"using {tok}")
        raise RuntimeError(f"hub refused token {tok}")
    if "chatty" in mode:
        for i in range(4000):
            ctx.emit("log", message=f"line {i} " + "x" * 200)
    if "naneval" in mode:
        ctx.emit("eval", name="after", metrics={"perplexity": float("nan"), "accuracy": float("inf")})
        ctx.emit("metric", name="speed", value=float("-inf"), unit="tokens/s")
    loss = 4.0
    for i in range(n):
        if ctx.should_stop():
            return {"steps": i, "stopped": True}
        if "slow" in mode:
            time.sleep(0.1)
        loss = float("nan") if ("nan" in mode and i >= 2) else loss * 0.9
        ctx.emit("step", step=i + 1, total=n, loss=loss, lr=ctx.spec.train.learning_rate, tokens_per_s=1000.0,
                 mem_bytes=1, eta_s=0.0)
    return {"steps": n, "final_loss": loss}


def _noop(ctx):
    return {}


STAGES = {"train": _train, "quantize": _noop, "evaluate": _noop, "merge": _noop, "convert": _noop}

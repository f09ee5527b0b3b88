"""Stage bodies for tests/test_browser_runs.py, loaded by the app's worker processes through the
``TUNEQUANT_STAGES`` hook (this file imports nothing of the test harness): a stage that stays silent
until stopped, one that fails with a long reason, a quick training loop and an evaluation that logs
more lines than the log tail shows."""
from __future__ import annotations

import time

LONG = ("the stage could not go on because " + "a-very-long-unbroken-identifier-" * 12 + " and then "
        + "some words that keep going " * 12)


# -- stages run inside the worker process ---------------------------------------------------------
def _quantize(ctx):
    if "quiet" in ctx.spec.name:                    # silent until stopped: no event at all
        deadline = time.monotonic() + 120
        while not ctx.should_stop() and time.monotonic() < deadline:
            time.sleep(0.1)
        return {"stopped": True}
    if "fail" in ctx.spec.name:
        raise RuntimeError(LONG)
    return {}


def _train(ctx):
    n = ctx.spec.train.steps or 20
    for i in range(n):
        ctx.emit("step", step=i + 1, total=n, loss=3.0 * 0.97 ** i, lr=1e-4, tokens_per_s=800.0 + i,
                 mem_bytes=2**28, eta_s=0.0)
    return {"steps": n}


def _evaluate(ctx):
    for i in range(60):                              # more log lines than the tail box shows
        ctx.emit("log", message=f"evaluating row {i}")
    ctx.emit("eval", name="after", metrics={"perplexity": 9.5})
    return {}


STAGES = {"quantize": _quantize, "train": _train, "evaluate": _evaluate,
          "merge": lambda ctx: {}, "convert": lambda ctx: {}}

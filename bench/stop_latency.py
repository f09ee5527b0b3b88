"""How long a stop takes while a run is inside a long library call: the demo model's build
(pretraining) and GPTQ quantization (gptqmodel, layer by layer). Real workers, real libraries.

    python bench/stop_latency.py                    # both cases, in fresh temporary homes
    python bench/stop_latency.py --json out.json

Case "build": a fresh home, demo:tiny-llama (not built yet), stop once its pretraining has
logged a step. Case "gptq": demo:micro-llama (built first, outside the timing), strategy
ptq-gptq-4bit, stop as soon as the quantize stage logs its gptqmodel line. For each: seconds from
the stop request to the run's end, its status and reason, and whether the executor had to send
SIGTERM (the stage not seeing the flag; grace 15 s). Prints figures; never pass/fail.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def wait_log(api, run_id: str, needle: str, timeout: float = 900) -> float:
    t0 = time.monotonic()
    seen = 0
    while time.monotonic() - t0 < timeout:
        for ev in api.events(run_id, after_seq=seen):
            seen = ev["seq"]
            if needle in str(ev.get("message", "")):
                return time.monotonic() - t0
        if api.get_run(run_id)["status"] not in ("queued", "running"):
            raise SystemExit(f"run ended before '{needle}': {api.get_run(run_id)['reason']}")
        time.sleep(0.05)
    raise SystemExit(f"no '{needle}' within {timeout} s")


def case(name: str, spec: dict, needle: str, prebuild: str | None = None) -> dict:
    home = Path(tempfile.mkdtemp(prefix=f"tq-stop-{name}-"))
    os.environ["TUNEQUANT_HOME"] = str(home)
    from engine.runs import api, demo
    if prebuild:
        demo.ensure_model(prebuild)
    api.use_store(home / "runs.sqlite")
    rid = api.launch(spec)
    reached = wait_log(api, rid, needle)
    t0 = time.monotonic()
    run = api.stop(rid, wait=True)
    took = time.monotonic() - t0
    logs = [ev.get("message", "") for ev in api.events(rid) if ev["type"] == "log"]
    out = {"case": name, "reached_s": round(reached, 1), "stop_s": round(took, 2), "status": run["status"],
           "reason": run["reason"], "sigterm": any("sent SIGTERM" in m or "sent SIGKILL" in m for m in logs)}
    print(f"{name}: stop asked {out['reached_s']} s in ({needle!r}); run ended after {out['stop_s']} s: "
          f"{out['status']} ({out['reason']}); SIGTERM needed: {out['sigterm']}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    data = {"demo": "tickets", "max_examples": 64}
    res = [case("build", {"name": "stop during build", "model": "demo:tiny-llama", "strategy": "ptq-gptq-4bit",
                          "dataset": data, "device": "cpu", "train": {"seq_len": 128}},
                "demo pretrain step"),
           case("gptq", {"name": "stop during gptq", "model": "demo:micro-llama", "strategy": "ptq-gptq-4bit",
                         "dataset": data, "device": "cpu", "train": {"seq_len": 128},
                         "quantize": {"calibration_samples": 64, "group_size": 64},
                         "evaluate": {"before_and_after": False}},
                "gptqmodel, device", prebuild="micro-llama")]
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

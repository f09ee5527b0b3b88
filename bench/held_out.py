"""What the runtime benches (gguf_export.py, executorch_kv.py) share: the held-out rows they score,
given on the command line the same way, and the evaluation-only run spec that reads them."""
from __future__ import annotations


def add_args(ap, *, dataset: str, rows: int, seq_len: int) -> None:
    """The held-out data options, with each bench's defaults."""
    ap.add_argument("--dataset", default=dataset, help="a demo dataset name or a JSONL path")
    ap.add_argument("--rows", type=int, default=rows, help="held-out rows scored")
    ap.add_argument("--seq-len", type=int, default=seq_len)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)


def spec(a, task_accuracy: bool = True):
    """The run spec of an evaluation of ``a.model`` on those rows (no training: bf16-baseline)."""
    from engine.spec.run import RunSpec
    ds = {"demo": a.dataset} if not a.dataset.endswith((".jsonl", ".json", ".csv")) else {"path": a.dataset}
    return RunSpec.parse({"model": a.model, "strategy": "bf16-baseline", "dataset": ds, "device": "cpu",
                          "train": {"seq_len": a.seq_len},
                          "evaluate": {"max_examples": a.rows, "prompt_len": a.prompt_len,
                                       "new_tokens": a.new_tokens, "task_accuracy": task_accuracy}})


def write(a, prefix: str, rows: int, body: dict, versions: dict, t0: float, root) -> None:
    """The bench's JSON under bench/measurements/<prefix>-<model>.json (or --out): the model, its held-out
    rows, ``body``, the machine, the package versions, the command line and the wall time since ``t0``."""
    import json
    import os
    import platform
    import sys
    import time
    from pathlib import Path
    out = Path(a.out or Path(root) / "bench" / "measurements"
               / f"{prefix}-{a.model.replace(':', '-').replace('/', '_')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": a.model, "dataset": a.dataset, "rows": rows, "seq_len": a.seq_len, **body,
                               "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                                           "python": platform.python_version()},
                               "versions": versions,
                               "command": f"python bench/{Path(sys.argv[0]).name} " + " ".join(sys.argv[1:]),
                               "wall_s": round(time.perf_counter() - t0, 1)}, indent=1, default=str))
    print(f"\nwritten {out} ({time.perf_counter() - t0:.0f} s)")

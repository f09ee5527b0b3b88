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

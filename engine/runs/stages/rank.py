"""One rank of a multi-process train stage: ``python -m engine.runs.stages.rank JOB.json``,
started by torchrun (engine/runs/distributed.py builds the command and supervises it).

The rank joins the process group (gloo on the CPU, NCCL on GPUs) and runs the train stage with
``ctx.state["_dist"]`` set (FSDP2: engine/runs/stages/fsdp.py). What it reports goes to
``<dir>/rank-<K>.jsonl``, one JSON object per line: ``started`` (pid), ``event`` (rank 0 only:
the stage's events), ``memory`` (its peak), ``result`` (rank 0: the stage's result and the state
it leaves for the next stages), ``error`` (what it raised, classified as the worker would).
It stops with the others when rank 0 sees ``<dir>/stop``, and dies with torchrun.
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

from engine.runs.distributed import STATE_KEYS


class RankLog:
    """Appends JSON lines to this rank's report file (flushed at once: the worker tails it)."""

    def __init__(self, folder: Path, rank: int):
        self.path = Path(folder) / f"rank-{rank}.jsonl"
        self.rank = rank

    def write(self, type: str, **payload) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"type": type, "rank": self.rank, "ts": time.time(), **payload}, default=str) + "\n")


def _die_with_parent() -> None:
    """Linux: SIGKILL this rank when torchrun (its parent) dies, however it dies."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)     # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    job = json.loads(Path(argv[0]).read_text())
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    _die_with_parent()
    out = RankLog(Path(job["dir"]), rank)
    out.write("started", pid=os.getpid(), world=world, local_rank=local)
    stop_file = Path(job["dir"]) / "stop"
    try:
        import torch
        import torch.distributed as dist

        from engine import strategies
        from engine.runs.context import StageContext
        from engine.runs.stages import common
        from engine.runs.stages.train import train
        from engine.spec.run import RunSpec
        device = job["device"]
        backend = "nccl" if device == "cuda" else "gloo"
        if device == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group(backend)
        spec = RunSpec.parse(job["spec"])

        def emit(type, **payload):
            if rank == 0:
                out.write("event", event=type, payload=payload)

        def should_stop() -> bool:           # a collective: every rank asks once per step
            flag = torch.tensor([1.0 if rank == 0 and stop_file.exists() else 0.0])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            return bool(flag.item())

        state = dict(job["state"])
        state["_dist"] = {"rank": rank, "world": world, "local_rank": local, "backend": backend}
        ctx = StageContext(run_id=job["run_id"], spec=spec, strategy=strategies.get(spec.strategy), stage=job["stage"],
                           index=job["index"], workdir=Path(job["workdir"]), state=state, device=device, emit=emit,
                           should_stop=should_stop)
        mem = common.PeakMemory(device)
        mem.__enter__()
        res = train(ctx)
        mem.__exit__(None, None, None)
        rec = {"peak_mem_bytes": mem.peak, "mem_source": mem.source, "cpu_peak_rss_bytes": common.rss_peak()}
        if device == "cuda":
            rec["cuda_max_reserved_bytes"] = int(torch.cuda.max_memory_reserved())
        out.write("memory", **rec)
        if rank == 0:
            out.write("result", result=res, state={k: state[k] for k in STATE_KEYS if k in state})
        dist.barrier()
        dist.destroy_process_group()
        return 0
    except BaseException as e:                 # noqa: BLE001 - said in the report file, then the rank ends
        from engine.runs import faults
        c = faults.classify(e, "train")
        out.write("error", kind=c["kind"], reason=c["reason"], message=c["message"], traceback=traceback.format_exc())
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    raise SystemExit(main())

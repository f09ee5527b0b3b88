"""The run on a cluster node: ``python -m engine.runs.remote run.json RUN_ID [STAGES]``, the
entrypoint of the Ray job that engine/runs/ray_backend.py submits (the job's working directory
holds the project's ``engine/`` and ``presets/``, the run spec and its dataset file).

It runs the run there exactly as a local run runs (the same executor, worker process, stages
and run store, under ``$TUNEQUANT_HOME`` of the node, default ``~/.cache/tunequant-ray``) and
prints what happens on stdout, which Ray keeps as the job's log:

    TQRUN {"status", "reason", "device", "versions", "machine", "estimate", "result"}   when it changes
    TQEVENT {"seq", "ts", "type", ...payload}                                        every event, in order
    TQLOG <line>                                           the run's worker.log there (library output, tracebacks)

The machine that submitted the job reads that log back into its own run store. SIGTERM (Ray's
stop) stops the run at once (the worker's SIGTERM path: the run ends ``stopped``) and the
runner prints the last events before it exits. The worker dies with the runner
(TUNEQUANT_PDEATHSIG), so a job killed outright leaves nothing running. Imports no torch.
"""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

from engine.runs.ray_backend import EVENT, LOG, ROW

ROW_KEYS = ("status", "reason", "device", "versions", "machine", "estimate", "result")


def home() -> Path:
    return Path(os.path.expanduser(os.environ.get("TUNEQUANT_HOME") or "~/.cache/tunequant-ray")).resolve()


def _print(prefix: str, obj: dict) -> None:
    sys.stdout.write(prefix + json.dumps(obj, default=str, allow_nan=False) + "\n")
    sys.stdout.flush()


def main(argv=None) -> int:
    from engine.runs.executor import Executor
    from engine.runs.store import FINAL, RunStore
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) not in (2, 3):
        sys.stderr.write("usage: python -m engine.runs.remote RUN.json RUN_ID [STAGES]\n")
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    run_id, hook = argv[1], (argv[2] if len(argv) == 3 else None)
    os.environ["TUNEQUANT_HOME"] = str(home())
    os.environ["TUNEQUANT_PDEATHSIG"] = "1"          # the worker dies with this runner
    store = RunStore(home() / "runs.sqlite", home() / "runs")
    ex = Executor(store, recover=False)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    ex.launch(spec, stages=hook, run_id=run_id)
    seq, last, stopping, pos = 0, None, False, 0
    log = store.workdir(run_id) / "worker.log"

    def log_lines():
        nonlocal pos
        try:
            with open(log, "rb") as f:
                f.seek(pos)
                data = f.read()
        except OSError:
            return
        cut = data.rfind(b"\n") + 1                   # whole lines only; the rest at the next poll
        pos += cut
        for ln in data[:cut].decode("utf-8", errors="replace").splitlines():
            sys.stdout.write(LOG + ln + "\n")
        sys.stdout.flush()
    while True:
        if stop and not stopping:
            stopping = True
            ex.stop(run_id, wait=False, grace_s=0, term_s=2)
        run = ex.wait(run_id, timeout=0.5, poll_s=0.1)
        row = {k: run.get(k) for k in ROW_KEYS}
        if row != last:
            _print(ROW, row)
            last = row
        log_lines()
        evs = store.events(run_id, after_seq=seq)
        for ev in evs:
            _print(EVENT, ev)
            seq = ev["seq"]
        if run["status"] in FINAL and not evs:
            return 0 if run["status"] == "finished" else 1


if __name__ == "__main__":
    raise SystemExit(main())

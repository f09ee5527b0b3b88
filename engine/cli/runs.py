"""``python -m engine run|runs``: real runs from the command line (DESIGN.md "Runs").

    python -m engine run --config FILE.yaml [--json]   launch, stream progress to stderr, print the ended run
        [--executor ray --address ADDR]                 ... as a job on that Ray cluster (events stream back here)
    python -m engine runs list [--status S] [--limit N] --json
    python -m engine runs show ID --json               the run and a summary of its events
    python -m engine runs stop ID                      stop flag -> SIGTERM -> SIGKILL until the worker is gone
    python -m engine runs artifacts ID --json          its artifacts, with runtime, size and what was measured
    python -m engine runs push ID --repo OWNER/NAME    exported artifacts + model card to the Hub (HF_TOKEN)

``run`` exits 0 when the run finished, 1 when it failed, was stopped or interrupted (the
printed run says why), 2 for a bad config (``{"error"}`` naming the field). Ctrl-C during
``run`` stops the run and prints it. Imports no torch: the run happens in a worker process.
"""
from __future__ import annotations

import argparse
import signal
import sys
import time

from engine.cli.output import emit
from engine.record import RunRecord
from engine.runs.events import line as event_line

ROW_KEYS = ("id", "name", "strategy", "model", "device", "status", "reason", "created", "started", "ended")


def run_report(run: dict) -> dict:
    """What ``run`` prints: id, status, per-stage measured peak memory and duration, metrics, artifacts."""
    rec = RunRecord.of(run)
    stages = [{k: getattr(s, k) for k in ("stage", "duration_s", "peak_mem_bytes", "mem_source", "cpu_peak_rss_bytes",
                                          "cuda_max_reserved_bytes", "stopped", "failed") if getattr(s, k) is not None}
              for s in rec.stages]
    return {**{k: run.get(k) for k in ROW_KEYS},
            "stages": stages, "eval": rec.evals, "metrics": rec.metrics,
            "artifacts": list(rec.artifacts), "error": rec.error,
            "estimate": run.get("estimate"), "workdir": run.get("workdir"),
            "log": f"{run.get('workdir')}/worker.log"}


def _follow(api, run_id: str, quiet: bool) -> dict:
    """Print events as they come (stderr) until the run has ended; returns the run."""
    seq = 0
    while True:
        run = api.executor().wait(run_id, timeout=0.3, poll_s=0.1)
        for ev in api.events(run_id, after_seq=seq):
            seq = ev["seq"]
            if not quiet:
                sys.stderr.write(event_line(ev) + "\n")
        if not quiet:
            sys.stderr.flush()
        if run["status"] not in ("queued", "running"):
            return api.get_run(run_id)


def _cmd_run(args) -> int:
    from engine.runs import api
    # a Ctrl-C while the worker is being spawned must still stop the run: hold it until the id is known
    held = []
    prev = signal.signal(signal.SIGINT, lambda *_: held.append(True))
    try:
        run_id = api.launch(args.config, stages=args.stages, executor_kind=args.executor, address=args.address)
    finally:
        signal.signal(signal.SIGINT, prev)
    if not args.json:
        sys.stderr.write(f"run {run_id} (worker log: {api.get_run(run_id)['workdir']}/worker.log)\n")
    try:
        if held:
            raise KeyboardInterrupt
        run = _follow(api, run_id, quiet=args.json)
    except KeyboardInterrupt:
        sys.stderr.write(f"\nstopping run {run_id} ...\n")
        run = api.stop(run_id, wait=True)
        emit(run_report(run), as_json=args.json)
        return 130
    emit(run_report(run), as_json=args.json)
    return 0 if run["status"] == "finished" else 1


def _cmd_list(args) -> int:
    from engine.errors import InputError
    from engine.runs import api
    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit must be 1 or more (leave it out for every run), got {args.limit}", field="limit")
    runs = api.list_runs(status=args.status, limit=args.limit)
    emit({"runs": [{k: r.get(k) for k in ROW_KEYS} for r in runs]}, as_json=args.json)
    return 0


def _cmd_show(args) -> int:
    from engine.runs import api
    emit(api.summary(args.run_id), as_json=args.json)
    return 0


def _cmd_stop(args) -> int:
    from engine.runs import api
    t0 = time.monotonic()
    run = api.stop(args.run_id, wait=True, grace_s=args.grace)
    emit({**{k: run.get(k) for k in ROW_KEYS}, "stop_s": round(time.monotonic() - t0, 2)}, as_json=args.json)
    return 0


def _cmd_artifacts(args) -> int:
    from engine.runs import api, artifacts
    emit({"id": args.run_id, "artifacts": artifacts.artifacts(api.get_run(args.run_id))}, as_json=args.json)
    return 0


def _cmd_push(args) -> int:
    from engine.runs import api, artifacts
    emit(artifacts.push_to_hub(api.get_run(args.run_id), args.repo, private=not args.public), as_json=args.json)
    return 0


def _cmd_rebuild(args) -> int:
    from engine.runs import store
    res = store.rebuild(args.store)
    emit(res, as_json=args.json)
    return 0


def register(sub) -> None:
    from engine.runs.store import STATUSES
    p = sub.add_parser("run", help="run a strategy for real (RunSpec YAML/JSON) and print the ended run")
    p.add_argument("--config", required=True, help="run config file (presets/runs/*.yaml)")
    p.add_argument("--json", action="store_true", help="print one JSON object; no progress lines")
    p.add_argument("--executor", choices=("local", "ray"), default=None,
                   help="local: a worker process here (the default without --address); ray: a job on the Ray cluster at --address")
    p.add_argument("--address", default=None,
                   help="the Ray cluster: its dashboard URL (http://HEAD:8265) or ray://HEAD:10001 (--executor ray)")
    p.add_argument("--stages", default=None, help=argparse.SUPPRESS)  # module:NAME, another stage table (tests)
    p.set_defaults(func=_cmd_run)

    r = sub.add_parser("runs", help="list, show and stop runs")
    rsub = r.add_subparsers(dest="runs_command", required=True, parser_class=type(r))
    lp = rsub.add_parser("list", help="every run, newest first")
    lp.add_argument("--status", choices=STATUSES)
    lp.add_argument("--limit", type=int)
    lp.add_argument("--json", action="store_true")
    lp.set_defaults(func=_cmd_list)
    sp = rsub.add_parser("show", help="one run with a summary of its events")
    sp.add_argument("run_id")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=_cmd_show)
    tp = rsub.add_parser("stop", help="stop a run (graceful, then SIGTERM, then SIGKILL)")
    tp.add_argument("run_id")
    tp.add_argument("--grace", type=float, default=None, help="seconds the stages get to stop on their own")
    tp.add_argument("--json", action="store_true")
    tp.set_defaults(func=_cmd_stop)
    ap = rsub.add_parser("artifacts", help="a run's artifacts with their runtime and measurements")
    ap.add_argument("run_id")
    ap.add_argument("--json", action="store_true")
    ap.set_defaults(func=_cmd_artifacts)
    pp = rsub.add_parser("push", help="push a run's exported artifacts and a model card to the Hugging Face Hub "
                                      "(token from HF_TOKEN; offline: an error, nothing uploaded)")
    pp.add_argument("run_id")
    pp.add_argument("--repo", required=True, help="owner/name of the model repo (created private unless --public)")
    pp.add_argument("--public", action="store_true")
    pp.add_argument("--json", action="store_true")
    pp.set_defaults(func=_cmd_push)
    bp = rsub.add_parser("rebuild", help="rebuild the run store from the runs' events.jsonl logs (the old file is kept)")
    bp.add_argument("--store", default=None, help="the store file (default $TUNEQUANT_DB or $TUNEQUANT_HOME/runs.sqlite)")
    bp.add_argument("--json", action="store_true")
    bp.set_defaults(func=_cmd_rebuild)


"""Runs on an existing Ray cluster, through the Ray Jobs API (``ray.job_submission``).

    submit(ex, run_id, spec, address, hook)   ship the project and the run as a Ray job
    sync(store, run_id) -> bool               read the job's log back into the run store (True: ended)
    follow(ex, run_id)                        a thread that syncs until the run has ended
    stop(store, run_id)                       stop the Ray job (Ray sends SIGTERM, then SIGKILL)

What is sent: the job's runtime_env ``working_dir`` is a folder made for the run
(``<run workdir>/ray-job/``): the project's ``engine/`` and ``presets/``, the run spec
(``run.json``) and, when the dataset is a local file, that file (``data/``). Nothing else
leaves this machine: not the run store, not other runs, not the workspace's models. The model
is loaded on the cluster (a demo model is built there; a hub id is downloaded there); a model
given as a local folder is refused (it is not sent). Ray's own dashboard address is the only
endpoint used.

The job runs ``python -m engine.runs.remote run.json RUN_ID`` on the cluster (the cluster's
Python needs the project's dependencies: the ``train`` extra), which runs the run with the
ordinary executor and worker there and prints every event and the run's columns as lines of
its log (engine/runs/remote.py). Here the run is recorded like a local one (same id, status,
events, result), with ``executor = {"kind": "ray", "address", "job_id", "remote_seq"}``;
a follower thread in whichever process has an Executor (the app, ``engine run``) polls the
job's status and log and appends the events it has not seen yet (exactly once: the store checks
the remote sequence number in the same transaction), so the dashboard, compare and calibration
read remote runs like local ones, and a restarted app re-attaches (``Executor.recover``).

The job's log is also kept as the run's ``worker.log``. Imports ray only inside functions.
"""
from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

from engine.errors import InputError
from engine.runs.store import ACTIVE, FINAL

ROOT = Path(__file__).resolve().parent.parent.parent
EVENT, ROW, LOG = "TQEVENT ", "TQRUN ", "TQLOG "     # the lines engine/runs/remote.py prints
POLL_S = 1.0
SUBMIT_RETRY_S = 60.0      # "No available agent to submit job, please try again later" (a head just started)
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
SHIPPED = ("engine", "presets")


def client(address: str):
    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError:
        raise InputError("--executor ray needs the ray package here (pip install 'tunequant[cluster]', or "
                         "'ray[default]'); nothing was sent", field="executor")
    try:
        return JobSubmissionClient(address)
    except Exception as e:                                   # noqa: BLE001 - unreachable, refused, not Ray
        raise InputError(f"no Ray cluster answers at {address!r}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                         " (give the dashboard URL, e.g. http://HEAD:8265, or a ray:// address)", field="address")


def remote_device(spec) -> str:
    """What the run will use on the cluster (the local machine's GPUs say nothing about it)."""
    if spec.resources.gpus or spec.device == "cuda":
        return "cuda"
    return "cpu" if spec.device == "cpu" or spec.resources.processes else "auto"


def stage(workdir: Path, spec) -> tuple[Path, dict]:
    """The job's working_dir: the project's engine/ and presets/, the run spec, a local dataset file."""
    d = Path(workdir) / "ray-job"
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in SHIPPED:
        shutil.copytree(ROOT / name, d / name, ignore=ignore)
    data = spec.to_dict()
    path = data["dataset"].get("path")
    if path:
        src = Path(os.path.expanduser(path))
        (d / "data").mkdir()
        shutil.copy2(src, d / "data" / src.name)
        data["dataset"]["path"] = f"data/{src.name}"
    if Path(os.path.expanduser(spec.model)).is_dir():
        raise InputError(f"model {spec.model!r} is a folder on this machine, which is not sent to the cluster; "
                         "give a hub id or preset (downloaded on the cluster) or run it here", field="model")
    (d / "run.json").write_text(json.dumps(data, indent=1))
    return d, data


def submit(store, run_id: str, spec, address: str, hook: str | None = None) -> dict:
    """Submit the recorded run as a Ray job (submission id = run id). Returns the job's info."""
    c = client(address)
    wd = store.workdir(run_id)
    job_dir, _ = stage(wd, spec)
    python = os.environ.get("TUNEQUANT_RAY_PYTHON", "python")
    entry = f"{python} -m engine.runs.remote run.json {run_id}" + (f" {hook}" if hook else "")
    env = {"PYTHONUNBUFFERED": "1", "RAY_JOB_STOP_WAIT_TIME_S": "30", "TOKENIZERS_PARALLELISM": "false"}
    if os.environ.get("TUNEQUANT_RAY_HOME"):
        env["TUNEQUANT_HOME"] = os.environ["TUNEQUANT_RAY_HOME"]
    gpus = spec.resources.gpus or (1 if spec.device == "cuda" else 0)
    deadline = time.monotonic() + SUBMIT_RETRY_S
    while True:
        try:
            job_id = c.submit_job(entrypoint=entry, submission_id=run_id,
                                  runtime_env={"working_dir": str(job_dir), "env_vars": env},
                                  entrypoint_num_cpus=spec.resources.processes or 1, entrypoint_num_gpus=gpus or None,
                                  metadata={"tunequant_run": run_id, "strategy": spec.strategy})
            break
        except RuntimeError as e:         # a head node just started: its job agent is not up yet
            if "try again later" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(1.0)
    return {"job_id": job_id, "entrypoint": entry, "working_dir": str(job_dir), "num_gpus": gpus,
            "num_cpus": spec.resources.processes or 1}


def parse(log: str) -> tuple[list[dict], list[dict]]:
    """(run rows, events) printed by engine/runs/remote.py, in order."""
    rows, events = [], []
    for ln in log.splitlines():
        try:
            if ln.startswith(EVENT):
                events.append(json.loads(ln[len(EVENT):]))
            elif ln.startswith(ROW):
                rows.append(json.loads(ln[len(ROW):]))
        except json.JSONDecodeError:
            pass                         # a line cut short: read again at the next poll
    return rows, events


def apply(store, run_id: str, log: str) -> None:
    """Copy what the job's log says into the store: the run's columns, then each event not yet
    copied (once; the remote ``finished`` event ends the run here with its status and reason)."""
    rows, events = parse(log)
    row = rows[-1] if rows else {}
    cols = {k: row[k] for k in ("device", "versions", "machine", "estimate", "result") if row.get(k) is not None}
    if cols:
        store.update_run(run_id, **cols)
    for ev in events:
        seq, type = ev.pop("seq"), ev.pop("type")
        ts = ev.pop("ts", None)
        info = store.get_run(run_id)["executor"] or {}
        if seq <= info.get("remote_seq", 0):
            continue
        if type == "queued":                           # this machine wrote its own
            store.mirror_event(run_id, seq, None, {})
        elif type == "finished":
            if store.mirror_event(run_id, seq, None, {}):
                store.finish(run_id, ev.get("status"), ev.get("reason"), result=row.get("result"))
        else:
            if type == "started" and store.get_run(run_id)["status"] == "queued":
                store.set_running(run_id, None)        # the pid is the cluster's: never a local process
            store.mirror_event(run_id, seq, type, ev, ts)


def sync(store, run_id: str) -> bool:
    """One poll of the run's Ray job: copy its log into the store; end the run here if the job
    ended without saying so (stopped, killed, failed to start). True once the run has ended."""
    run = store.get_run(run_id)
    if run is None or run["status"] in FINAL:
        return True
    info = run["executor"] or {}
    try:
        c = client(info["address"])
        status = str(c.get_job_status(info["job_id"]).value)
        log = c.get_job_logs(info["job_id"])
    except Exception as e:                               # noqa: BLE001 - the cluster may be back later
        if not info.get("unreachable_said"):
            store.append_event(run_id, "warning", {"message": f"the Ray cluster at {info.get('address')} does not "
                                                              f"answer ({type(e).__name__}); still trying"})
            _note(store, run_id, unreachable_said=True)
        return False
    try:       # the run's worker.log there, and Ray's own lines about the job
        (Path(run["workdir"]) / "worker.log").write_text("".join(
            (ln[len(LOG):] if ln.startswith(LOG) else ln) + "\n" for ln in log.splitlines()
            if not ln.startswith((EVENT, ROW))))
    except OSError:
        pass
    apply(store, run_id, log)
    run = store.get_run(run_id)
    if status in TERMINAL and run["status"] in ACTIVE:
        try:
            msg = (c.get_job_info(info["job_id"]).message or "").strip()
        except Exception:                                # noqa: BLE001
            msg = ""
        if status == "STOPPED" or run.get("stop_requested"):
            store.finish(run_id, "stopped", "stopped on request (Ray job stopped)")
        else:
            store.finish(run_id, "failed", f"the Ray job {info['job_id']} ended {status}"
                         + (f": {msg}" if msg else "") + " before the run ended (its log: worker.log)",
                         before=[("error", {"stage": None, "kind": "ray-job", "message": msg, "status": status})])
    return store.get_run(run_id)["status"] in FINAL


def _note(store, run_id: str, **kw) -> None:
    """Flags kept beside the remote info (not the stream position: mirror_event owns that)."""
    with store._write() as db:
        row = db.execute("SELECT executor FROM runs WHERE id=?", (run_id,)).fetchone()
        info = json.loads(row["executor"]) if row and row["executor"] else {}
        info.update(kw)
        db.execute("UPDATE runs SET executor=? WHERE id=?", (json.dumps(info), run_id))


def follow(store, run_id: str, stop_event: threading.Event | None = None, poll_s: float = POLL_S) -> None:
    """Sync until the run has ended (or ``stop_event`` is set)."""
    stop_event = stop_event or threading.Event()
    while not stop_event.is_set():
        try:
            if sync(store, run_id):
                return
        except Exception as e:                           # noqa: BLE001 - a follower never dies silently
            store.append_event(run_id, "warning", {"message": f"following the Ray job: {type(e).__name__}: {e}"})
        stop_event.wait(poll_s)


def stop(store, run_id: str, timeout: float = 90.0) -> None:
    """Ask Ray to stop the job (SIGTERM to its processes: the run ends ``stopped`` there), then
    sync until the run has ended here; a cluster that does not confirm in ``timeout`` seconds
    leaves the run ``stopped`` here with that said."""
    run = store.get_run(run_id)
    info = run["executor"] or {}
    try:
        client(info["address"]).stop_job(info["job_id"])
    except Exception as e:                               # noqa: BLE001
        store.append_event(run_id, "warning", {"message": f"stopping the Ray job: {type(e).__name__}: {e}"})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sync(store, run_id):
            return
        time.sleep(0.5)
    store.finish(run_id, "stopped", f"stopped on request; the Ray job at {info.get('address')} did not confirm "
                                    f"within {timeout:.0f} s")

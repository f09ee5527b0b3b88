"""The executor: validates a run, records it, and starts one worker process for it.

``launch(spec)`` returns at once with the run id; the run itself happens in
``python -m engine.runs.worker RUN_ID``, a child in its own process group (a crash, an
OOM or a CUDA abort in it never takes the caller down), its stdout/stderr going to the run's
``worker.log``. Nothing in the caller owns the run: any process can read its events, wait
for it or stop it by id, and a restarted app finds it again (``recover``).

GPU runs queue one at a time per GPU (the worker takes a lock file per GPU, which the OS
releases when the worker dies); CPU runs start beside them. Which GPUs there are is read
without torch: ``TUNEQUANT_GPUS`` ("0,1", or "" for none), else ``CUDA_VISIBLE_DEVICES``,
else ``nvidia-smi -L``.

Stop: raise the run's stop flag (stages poll it and return early, saving what they can),
then SIGTERM the process group after ``grace_s``, then SIGKILL after ``term_s``, until the
worker is gone (and with it its GPU memory); the run ends ``stopped``.

Stages come from ``engine.runs.stages`` (``STAGES`` and ``prepare``); ``launch(...,
stages="module:NAME")`` or the ``TUNEQUANT_STAGES`` environment variable name another table
(tests use this to run real workers with small stages of their own).

Imports no torch.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from engine import strategies
from engine.errors import InputError
from engine.runs import faults
from engine.runs.store import ACTIVE, FINAL, STORE_FAILURE_MARK, RunStore
from engine.spec.run import RunSpec

ROOT = Path(__file__).resolve().parent.parent.parent
DEFAULT_STAGES = "engine.runs.stages:STAGES"
GRACE_S = float(os.environ.get("TUNEQUANT_STOP_GRACE_S", 15))   # stop flag -> SIGTERM
TERM_S = float(os.environ.get("TUNEQUANT_STOP_TERM_S", 10))     # SIGTERM -> SIGKILL
UNSTARTED_S = 60.0   # a queued run with no pid yet is someone's launch in progress for this long


def new_run_id() -> str:
    """Sortable and readable: r-20260101-120000-3f9a1c."""
    return time.strftime("r-%Y%m%d-%H%M%S-") + secrets.token_hex(3)


def to_spec(spec) -> RunSpec:
    """A RunSpec from a RunSpec, a dict, or a path to a YAML/JSON file."""
    if isinstance(spec, RunSpec):
        return spec
    if isinstance(spec, (str, Path)):
        return RunSpec.load(spec)
    return RunSpec.parse(spec)


def load_stages(hook: str | None = None):
    """(STAGES table, prepare function or None) of ``module:NAME`` or ``/path/file.py:NAME``
    (default engine.runs.stages:STAGES)."""
    hook = hook or DEFAULT_STAGES
    mod_name, _, attr = hook.rpartition(":") if hook.count(":") else (hook, "", "")
    if mod_name.endswith(".py"):                      # a file: /path/to/my_stages.py:STAGES
        path = Path(mod_name)
        if not path.is_file():
            raise InputError(f"run stages {hook!r}: {path} not found", field="stages")
        name = "tunequant_stages_" + path.stem
        mod = sys.modules.get(name)
        if mod is None or getattr(mod, "__file__", None) != str(path.resolve()):
            spec = importlib.util.spec_from_file_location(name, path.resolve())
            mod = importlib.util.module_from_spec(spec)
            sys.modules[name] = mod
            spec.loader.exec_module(mod)
    else:
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            if e.name and mod_name.startswith(e.name):
                raise InputError(f"run stages {hook!r}: module {mod_name} is not installed", field="stages")
            raise
    table = getattr(mod, attr or "STAGES", None)
    if not isinstance(table, dict):
        raise InputError(f"run stages {hook!r}: {mod_name} has no stage table {attr or 'STAGES'}", field="stages")
    return table, getattr(mod, "prepare", None)


@functools.lru_cache(maxsize=1)
def _nvidia_smi_gpus() -> tuple[str, ...]:
    exe = shutil.which("nvidia-smi")
    if exe:
        try:
            out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=10).stdout
            return tuple(str(i) for i, ln in enumerate(out.splitlines()) if ln.startswith("GPU "))
        except (OSError, subprocess.SubprocessError):
            pass
    d = Path("/proc/driver/nvidia/gpus")
    return tuple(str(i) for i in range(len(list(d.iterdir())))) if d.is_dir() else ()


def gpu_slots() -> list[str]:
    """The GPUs runs may use, as CUDA device ids (each runs one GPU run at a time)."""
    for var in ("TUNEQUANT_GPUS", "CUDA_VISIBLE_DEVICES"):
        if var in os.environ:
            return [x.strip() for x in os.environ[var].split(",") if x.strip() and x.strip() != "-1"]
    return list(_nvidia_smi_gpus())


def pid_alive(pid: int | None, run_id: str | None = None) -> bool:
    """Is this pid a live (not zombie) process, and (on Linux) the worker of ``run_id``?"""
    if not pid:
        return False
    proc = Path(f"/proc/{pid}")
    if Path("/proc/self").exists():
        try:
            stat = (proc / "stat").read_text()
            if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                return False
            if run_id is not None:
                cmdline = (proc / "cmdline").read_bytes()
                # empty while the process is exiting (its memory already released, its files
                # - GPU handles - not yet): still ours until it is a zombie
                return not cmdline or run_id.encode() in cmdline
            return True
        except (OSError, IndexError):
            return False
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


class Executor:
    """Launch, watch, stop and recover runs recorded in one RunStore."""

    def __init__(self, store: RunStore | None = None, recover: bool = True):
        self.store = store or RunStore()
        self._procs: dict[str, subprocess.Popen] = {}
        self._followers: dict[str, threading.Thread] = {}
        self._closing = threading.Event()
        self._unrecorded: dict[str, str] = {}    # runs whose end the store refused to record: why
        self._lock = threading.Lock()
        if recover:
            self.recover()

    # -- launch --------------------------------------------------------------
    def device_for(self, spec: RunSpec, strategy: dict) -> str:
        """cuda | cpu, decided now so GPU runs can queue; the worker holds to it."""
        if spec.device == "cpu":
            device = "cpu"
        elif spec.device == "cuda":
            device = "cuda"
        else:
            device = "cuda" if gpu_slots() else "cpu"
        if spec.resources.gpus:
            device = "cuda"
            have = gpu_slots()
            if spec.device == "auto" and not have:
                raise InputError(f"resources.gpus: {spec.resources.gpus} asks for GPUs and this machine has none "
                                 "(TUNEQUANT_GPUS / CUDA_VISIBLE_DEVICES / nvidia-smi); use resources.processes on the "
                                 "CPU, or --executor ray to run it where the GPUs are", field="resources.gpus")
            if have and spec.resources.gpus > len(have):
                raise InputError(f"resources.gpus: {spec.resources.gpus} GPUs asked for, this machine has {len(have)} "
                                 f"({', '.join(have)})", field="resources.gpus")
        elif spec.resources.processes:
            device = "cpu"
        if device == "cpu" and strategies.traits(strategy)["gpu_only"]:
            raise InputError(f"strategy {strategy['id']} needs a GPU (its library has no CPU path) and this run "
                             f"would run on the CPU (device: {spec.device}); pick another strategy or a GPU machine",
                             field="device")
        return device

    def launch(self, spec, stages: str | None = None, executor: str | None = None, address: str | None = None,
               run_id: str | None = None) -> str:
        """Validate (RunSpec, strategy, the stages' prepare: bad data or model is refused here),
        record the run as queued and start its worker. Returns the run id at once.

        ``executor="ray"`` with ``address``: the run executes as a job on that Ray cluster
        (engine/runs/ray_backend.py); it is recorded here all the same and its events stream back."""
        spec = to_spec(spec)
        if executor not in (None, "local", "ray"):
            raise InputError(f"executor must be local or ray, got {executor!r}", field="executor")
        if executor == "ray" and not address:
            raise InputError("--executor ray needs --address: the Ray cluster's dashboard URL (http://HEAD:8265) "
                             "or a ray:// address", field="address")
        if address and executor in (None, "ray"):
            return self._launch_ray(spec, stages, address)
        spec = self.resolve_resume(spec)
        strategy = strategies.get(spec.strategy)
        hook = self._stage_hook(stages)            # a file: made absolute for the worker
        table, prepare = load_stages(hook)
        missing = [s["stage"] for s in strategy["stages"] if s["stage"] not in table]
        if missing:
            raise InputError(f"strategy {spec.strategy} needs stage(s) {', '.join(missing)}, which this engine "
                             f"does not have yet; available: {', '.join(sorted(table))}", field="strategy")
        device = self.device_for(spec, strategy)
        if prepare is not None:
            prepare(spec)
        run_id = run_id or new_run_id()
        self.store.create_run(run_id, spec.to_dict(), device, hook)
        self.store.append_event(run_id, "queued", {"strategy": spec.strategy, "model": spec.model,
                                                   "device": device, "stages": [s["stage"] for s in strategy["stages"]],
                                                   "spec": spec.to_dict()})   # `runs rebuild` reads it back
        self._start_worker(run_id)
        return run_id

    def resolve_resume(self, spec: RunSpec) -> RunSpec:
        """``train.resume_from_checkpoint: RUN_ID`` -> that run's workdir (its last checkpoint is resumed)."""
        want = spec.train.resume_from_checkpoint
        if not want or not re.fullmatch(r"r-\d{8}-\d{6}-[0-9a-f]+", want) or Path(want).exists():
            return spec
        run = self.store.get_run(want)
        if run is None:
            raise InputError(f"train.resume_from_checkpoint: no run {want!r} in {self.store.path}",
                             field="train.resume_from_checkpoint")
        return spec.model_copy(update={"train": spec.train.model_copy(update={"resume_from_checkpoint": run["workdir"]})})

    def _stage_hook(self, stages: str | None):
        hook = stages or os.environ.get("TUNEQUANT_STAGES") or None
        if hook and hook.rpartition(":")[0].endswith(".py"):
            file, _, attr = hook.rpartition(":")
            hook = f"{Path(file).resolve()}:{attr}"
        return hook

    def _launch_ray(self, spec: RunSpec, stages: str | None, address: str) -> str:
        """Record the run here and submit it as a Ray job; a follower copies its events back."""
        from engine.runs import ray_backend
        strategy = strategies.get(spec.strategy)
        hook = self._stage_hook(stages)
        table, prepare = load_stages(hook)
        missing = [s["stage"] for s in strategy["stages"] if s["stage"] not in table]
        if missing:
            raise InputError(f"strategy {spec.strategy} needs stage(s) {', '.join(missing)}, which this engine "
                             f"does not have yet; available: {', '.join(sorted(table))}", field="strategy")
        device = ray_backend.remote_device(spec)
        if prepare is not None:          # checked here as for the cluster's device (this machine's GPUs do not count)
            prepare(spec.model_copy(update={"device": "cuda" if device == "cuda" else "cpu"}))
        ray_backend.client(address)      # refuse an address nobody answers at before anything is recorded
        run_id = new_run_id()
        self.store.create_run(run_id, spec.to_dict(), device, hook,
                              executor={"kind": "ray", "address": address, "job_id": run_id, "remote_seq": 0})
        self.store.append_event(run_id, "queued", {"strategy": spec.strategy, "model": spec.model, "device": device,
                                                   "stages": [s["stage"] for s in strategy["stages"]],
                                                   "executor": "ray", "address": address})
        try:
            job = ray_backend.submit(self.store, run_id, spec, address, hook)
        except BaseException as e:
            reason = f"submitting to the Ray cluster at {address} failed: {type(e).__name__}: {e}"
            self.store.finish(run_id, "failed", reason, before=[("error", {"stage": None, "kind": "ray-submit",
                                                                           "message": str(e), "reason": reason})])
            raise
        self.store.append_event(run_id, "log", {"message": f"submitted to the Ray cluster at {address} as job "
                                                           f"{job['job_id']} ({job['entrypoint']}; {job['num_cpus']} "
                                                           f"CPU(s), {job['num_gpus']} GPU(s))"})
        self._follow(run_id)
        return run_id

    def _follow(self, run_id: str) -> None:
        """Copy a Ray run's events into the store from a thread of this process (once per run)."""
        from engine.runs import ray_backend
        with self._lock:
            t = self._followers.get(run_id)
            if t is not None and t.is_alive():
                return
            t = threading.Thread(target=ray_backend.follow, args=(self.store, run_id, self._closing),
                                 name=f"follow-{run_id}", daemon=True)
            self._followers[run_id] = t
        t.start()

    def close(self) -> None:
        """Stop following Ray runs from this process (they go on; any Executor re-attaches)."""
        self._closing.set()

    def _start_worker(self, run_id: str) -> None:
        wd = self.store.workdir(run_id)
        env = dict(os.environ, TUNEQUANT_DB=str(self.store.path), TUNEQUANT_RUNS_DIR=str(self.store.runs_dir),
                   PYTHONUNBUFFERED="1",
                   PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
        with open(wd / "worker.log", "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "engine.runs.worker", run_id], stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        with self._lock:
            self._procs[run_id] = proc
        self.store.update_run(run_id, pid=proc.pid)
        threading.Thread(target=self._reap, args=(run_id, proc), name=f"reap-{run_id}", daemon=True).start()

    # -- noticing the end of a worker ---------------------------------------
    def _reap(self, run_id: str, proc: subprocess.Popen) -> None:
        rc = proc.wait()
        try:
            self._worker_gone(run_id, rc)
        except Exception as e:        # the store refuses writes (disk full): the run still ends, here
            cause = store_failure(self.store.workdir(run_id)) or \
                f"the run store could not be written ({e}); the worker ended with code {rc}"
            with self._lock:
                self._unrecorded[run_id] = cause
        finally:
            with self._lock:
                self._procs.pop(run_id, None)

    def _worker_gone(self, run_id: str, returncode: int | None, status: str = "failed") -> None:
        """The worker is gone; if it did not end its run, end it now (stopped if a stop was asked)."""
        run = self.store.get_run(run_id)
        if run is None or run["status"] in FINAL:
            return
        if run.get("stop_requested"):
            _end_ranks(run)
            how = "" if returncode is None else \
                f" (worker ended with {f'signal {-returncode}' if returncode < 0 else f'code {returncode}'})"
            self.store.finish(run_id, "stopped", "stopped on request" + how)
            return
        _end_ranks(run)          # a multi-process stage's ranks live in sessions of their own
        cause = store_failure(Path(run["workdir"]))
        if cause:                          # the worker could not record its own end: say why it ended
            self.store.finish(run_id, "failed", cause)
            return
        reason = faults.exit_reason(returncode) if status == "failed" else \
            f"the worker process (pid {run.get('pid')}) was gone when the engine restarted"
        error = {"stage": self._current_stage(run_id), "kind": "worker-died", "message": reason,
                 "returncode": returncode, "log": str(Path(run["workdir"]) / "worker.log")}
        self.store.finish(run_id, status, reason, before=[("error", error)])   # both or neither

    def _current_stage(self, run_id: str) -> str | None:
        evs = self.store.events(run_id, types=("stage_started",))
        return evs[-1]["stage"] if evs else None

    def _is_child(self, run_id: str) -> bool:
        with self._lock:
            return run_id in self._procs

    def _gone(self, run: dict) -> bool:
        """True when an active run's worker no longer exists (for runs not started by this process)."""
        if run["pid"] is None:
            return time.time() - run["created"] > UNSTARTED_S
        return not pid_alive(run["pid"], run["id"])

    def recover(self) -> list[str]:
        """Mark queued/running runs whose worker is gone as ``interrupted`` (call at app start);
        re-attach to the runs executing on a Ray cluster."""
        out = []
        for run in self.store.active_runs():
            if run.get("executor"):
                self._follow(run["id"])
                continue
            if not self._is_child(run["id"]) and self._gone(run):
                self._worker_gone(run["id"], None, status="interrupted")
                out.append(run["id"])
        return out

    # -- reading -------------------------------------------------------------
    def _check(self, run: dict) -> dict:
        """An active run whose worker vanished unseen (its launcher is gone too) ends failed here."""
        if run["status"] in ACTIVE and not run.get("executor") and not self._is_child(run["id"]) and self._gone(run):
            self._worker_gone(run["id"], None)
            run = self.store.get_run(run["id"])
        return run

    def get_run(self, run_id: str) -> dict:
        run = self.store.get_run(run_id)
        if run is None:
            raise InputError(f"unknown run id {run_id!r}; `python -m engine runs list` shows the runs", field="run_id")
        with self._lock:
            cause = self._unrecorded.get(run_id)
        if cause and run["status"] in ACTIVE:        # ended, but the store could not take it
            return {**run, "status": "failed", "reason": cause}
        return self._check(run)

    def list_runs(self, status: str | None = None, limit: int | None = None) -> list[dict]:
        """Runs, newest first (dead workers noticed on the way)."""
        runs = [self._check(r) for r in self.store.list_runs(status=status, limit=limit)]
        return [r for r in runs if status is None or r["status"] == status]

    def wait(self, run_id: str, timeout: float | None = None, poll_s: float = 0.2) -> dict:
        """Block until the run has ended (or ``timeout`` seconds passed); returns the run. A
        worker that vanishes without ending its run is noticed here too (run failed)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            run = self.get_run(run_id)
            if run["status"] in FINAL:
                return run
            if deadline is not None and time.monotonic() >= deadline:
                return run
            time.sleep(poll_s)

    # -- stopping ------------------------------------------------------------
    def stop(self, run_id: str, wait: bool = True, grace_s: float | None = None,
             term_s: float | None = None) -> dict:
        """Stop a run: stop flag -> SIGTERM (after grace_s) -> SIGKILL (after term_s), until the
        worker process group is gone. ``wait=False`` escalates in a background thread."""
        run = self.get_run(run_id)
        if run["status"] in FINAL:
            return run
        if self.store.request_stop(run_id):
            self.store.append_event(run_id, "log", {"message": "stop requested"})
        if run.get("executor"):                 # a Ray job: Ray stops its processes (SIGTERM, then SIGKILL)
            from engine.runs import ray_backend
            if not wait:
                threading.Thread(target=ray_backend.stop, args=(self.store, run_id), daemon=True,
                                 name=f"stop-{run_id}").start()
                return self.get_run(run_id)
            ray_backend.stop(self.store, run_id)
            return self.get_run(run_id)
        grace_s = GRACE_S if grace_s is None else grace_s
        term_s = TERM_S if term_s is None else term_s
        if not wait:
            threading.Thread(target=self._escalate, args=(run_id, grace_s, term_s), daemon=True,
                             name=f"stop-{run_id}").start()
            return self.get_run(run_id)
        self._escalate(run_id, grace_s, term_s)
        return self.get_run(run_id)

    def _proc_gone(self, run_id: str, pid: int) -> bool:
        with self._lock:
            proc = self._procs.get(run_id)
        if proc is not None:
            return proc.poll() is not None
        return not pid_alive(pid, run_id)

    def _wait_gone(self, run_id: str, pid: int, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self._proc_gone(run_id, pid):
                return True
            time.sleep(0.05)
        return self._proc_gone(run_id, pid)

    def _escalate(self, run_id: str, grace_s: float, term_s: float) -> None:
        pid = self.get_run(run_id)["pid"]
        t0 = time.monotonic()
        while pid is None and time.monotonic() - t0 < 10:      # a launch still starting its worker
            time.sleep(0.05)
            pid = self.get_run(run_id)["pid"]
        if pid is not None:
            ended_by = None
            if not self._wait_gone(run_id, pid, grace_s):
                ended_by = "SIGTERM"
                _killpg(pid, signal.SIGTERM)
                if not self._wait_gone(run_id, pid, term_s):
                    ended_by = "SIGKILL"
                    _killpg(pid, signal.SIGKILL)
                    while not self._wait_gone(run_id, pid, 5.0):   # SIGKILL cannot be refused: wait it out
                        _killpg(pid, signal.SIGKILL)
            _killpg(pid, signal.SIGKILL)    # whatever the worker left in its group (helper processes)
            left = _end_ranks(self.get_run(run_id))    # and the ranks of a multi-process stage (own sessions)
            if left:
                self.store.append_event(run_id, "log", {"message": f"killed {left} rank process(es) the worker left"})
            if ended_by:
                self.store.append_event(run_id, "log", {"message": f"worker did not stop in time; sent {ended_by}"})
        if self.get_run(run_id)["status"] in ACTIVE:
            self.store.finish(run_id, "stopped", "stopped on request")


def _end_ranks(run: dict | None) -> int:
    """SIGKILL the ranks of a multi-process stage that outlived their worker, until they are gone
    (torchrun starts each in a session of its own: the worker's process group misses them).
    Returns how many were alive."""
    if not run or not run.get("workdir"):
        return 0
    from engine.runs.distributed import rank_pids
    alive = [p for p in rank_pids(run["workdir"]) if pid_alive(p, run["id"])]
    found = len(alive)
    deadline = time.monotonic() + 30
    while alive and time.monotonic() < deadline:
        for p in alive:
            try:
                os.kill(p, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.05)
        alive = [p for p in alive if pid_alive(p, run["id"])]
    return found
def store_failure(workdir: Path) -> str | None:
    """The cause a worker wrote to its worker.log when the store refused to record its end."""
    try:
        with open(Path(workdir) / "worker.log", "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 65536))
            tail = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    hits = [ln[len(STORE_FAILURE_MARK):].strip() for ln in tail.splitlines() if ln.startswith(STORE_FAILURE_MARK)]
    return hits[-1] if hits else None


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass

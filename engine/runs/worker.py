"""The worker: ``python -m engine.runs.worker RUN_ID`` runs one recorded run to its end.

Started by the executor in its own process group. It
  1. waits for its GPU when the run is a GPU run (one run per GPU, FIFO by launch time; the
     lock is a file lock, released by the OS however the worker ends) and pins it through
     CUDA_VISIBLE_DEVICES before torch is imported; CPU runs hide the GPUs instead;
  2. records the library versions, the machine and the planner's estimate for the run;
  3. runs the strategy's stages in order, each with a StageContext, measuring each stage's
     peak memory (CUDA ``max_memory_allocated``, or the process's peak RSS on the CPU) and
     duration, and stores the partial result after every stage;
  4. ends the run exactly once: ``finished``, ``stopped`` (stop flag, or SIGTERM, which
     interrupts the stage at once) or ``failed`` (the exception's reason, the traceback in
     the log and in the error event, what would fit instead after an OOM).
"""
from __future__ import annotations

import fcntl
import importlib.metadata
import math
import os
import platform
import re
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

from engine import strategies
from engine.runs.events import STAGE_TYPES, check as check_event
from engine.runs import faults
from engine.runs.context import NonFiniteLoss, StageContext, StageStopped, stage_entry
from engine.runs.executor import gpu_slots, load_stages, pid_alive
from engine.runs.store import STORE_FAILURE_MARK, RunStore, StoreWriteError
from engine.secrets_mask import redact_tokens
from engine.spec.run import RunSpec

LIBRARIES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "torchao", "gptqmodel", "optimum",
             "safetensors", "tokenizers", "datasets", "numpy", "psutil")
STOP_POLL_S = 0.25
# the presets/hardware/targets.yaml entry CPU runs are estimated for (speed and weights comparable)
CPU_PRESET = "cpu-x86-pytorch"


class StopRun(BaseException):
    """Raised by the SIGTERM handler: leave the stage now (BaseException: stages' ``except Exception`` let it pass)."""


# -- what the run is recorded with ------------------------------------------------
def library_versions() -> dict:
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _cpu_name() -> str:
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                return ln.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str) -> dict:
    import psutil
    info = {"host": platform.node(), "os": platform.platform(), "cpu": _cpu_name(),
            "cpu_count": os.cpu_count(), "ram_bytes": psutil.virtual_memory().total,
            "device": device, "cwd": os.getcwd(), "device_preset": CPU_PRESET if device != "cuda" else None,
            # other jobs on the cores: a CPU run's speed then measures them too (engine/calibration.py)
            "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}
    if device == "cuda":
        import torch
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_bytes=int(props.total_memory),
                    gpu_capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                    cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
                    gpu_preset=gpu_preset(props.name, int(props.total_memory)))
        info["device_preset"] = info["gpu_preset"]
    return info


def gpu_preset(name: str, total_bytes: int) -> str | None:
    """The presets/hardware GPU id of the device torch reports (same model name and memory)."""
    from engine import hardware
    tokens = set(re.findall(r"[a-z]*\d+[a-z]*", name.lower()))
    best = None
    for d in hardware.devices().values():
        if d.kind != "gpu" or not d.memory_bytes:
            continue
        model = d.id.split("-")[0]
        if model in tokens and abs(d.memory_bytes - total_bytes) / total_bytes < 0.06:
            best = d.id
    return best


def requests(spec: RunSpec, strategy: dict, gpu: str | None) -> dict[str, dict]:
    """The planner requests for this run (engine.strategies.planner_requests, the translator the
    advisor and the OOM suggestions use too) with the run's own workload."""
    return strategies.planner_requests(strategy, faults.planner_model(spec.model),
                                       strategies.Workload.from_spec(spec, gpu))


def planner_estimate(spec: RunSpec, strategy: dict, gpu: str | None) -> dict:
    """What the planner estimates for this run, with the inputs it used; {"error"} where it cannot.

    ``gpu`` is the device the run uses (machine["device_preset"]): the matched GPU preset on
    CUDA, CPU_PRESET on the CPU (speed and weights then compare with what the run measures;
    engine/calibration.py pairs them), None for an unrecognised GPU (the reference H100)."""
    from engine import estimate
    out: dict = {"gpu": gpu}
    if spec.world_size > 1 and spec.train.loss != "reference":      # what the ranks run (stages/train.py)
        spec = spec.model_copy(update={"train": spec.train.model_copy(update={"loss": "reference"})})
    try:
        reqs = requests(spec, strategy, gpu)
    except Exception as e:                   # a model the planner cannot resolve: say so for each estimate
        return {**out, **{k: {"error": f"{type(e).__name__}: {e}"} for k in ("train", "infer", "accuracy")}}
    fns = {"train": estimate.estimate_train, "infer": estimate.estimate_infer, "accuracy": estimate.estimate_accuracy}
    for key, fn in fns.items():
        kw = reqs.get(key)
        if kw is None or (key == "accuracy" and kw["method"] == "none"):
            continue
        shown = {**kw, "model": spec.model} if "model" in kw else kw     # the inputs as the user wrote them
        try:
            out[key] = {"inputs": shown, **fn(**kw)}
        except Exception as e:
            out[key] = {"error": f"{type(e).__name__}: {e}", "inputs": shown}
    if spec.world_size > 1 and "train" in out and "error" not in out["train"]:
        try:
            out["train"] = sharded_train_estimate(spec, out["train"])
        except Exception as e:                   # keep the single-device figure, say why it is not per rank
            out["train"]["sharding_error"] = f"{type(e).__name__}: {e}"
    return out


def sharded_train_estimate(spec: RunSpec, est: dict) -> dict:
    """The planner's per-device estimate of a training step sharded over ``spec.world_size``
    processes (FSDP full sharding: the advisor's model of it, engine/advisor/assess.py), with the
    single-device estimate kept under ``unsharded``: what each rank's measured peak compares with."""
    from engine import models
    from engine.advisor import assess, rules
    n = spec.world_size
    arch = models.resolve(faults.planner_model(spec.model))
    per = assess._shard(est, n, arch)
    mg = rules.settings()["multi_gpu"]
    scale = per["peak_allocated_bytes"] / est["peak_allocated_bytes"] if est.get("peak_allocated_bytes") else 1.0
    out = {**est, **per, "processes": n, "per": "rank",
           "unsharded": {k: est.get(k) for k in ("peak_allocated_bytes", "device_bytes", "tokens_per_s", "low", "high")}}
    for k in ("low", "high"):
        if est.get(k) is not None:
            out[k] = est[k] * scale
    for k in ("tokens_per_s", "tokens_per_s_low", "tokens_per_s_high"):
        if est.get(k):
            out[k] = est[k] * n * mg["scaling_efficiency"]
    if est.get("tokens_per_s"):
        out["tokens_per_s_formula"] = f"one device's x {n} processes x scaling efficiency {mg['scaling_efficiency']}"
    return out


def per_rank_peak(ranks: list[dict]) -> dict:
    """A multi-process stage's measured memory: the largest rank's peak (same source as each
    rank's), and every rank's."""
    top = max(ranks, key=lambda r: r.get("peak_mem_bytes") or 0)
    out = {"peak_mem_bytes": top.get("peak_mem_bytes"), "mem_source": top.get("mem_source"),
           "processes": len(ranks), "ranks": ranks}
    rss = [r["cpu_peak_rss_bytes"] for r in ranks if r.get("cpu_peak_rss_bytes")]
    if rss:
        out["cpu_peak_rss_bytes"] = max(rss)
    reserved = [r["cuda_max_reserved_bytes"] for r in ranks if r.get("cuda_max_reserved_bytes")]
    if reserved:
        out["cuda_max_reserved_bytes"] = max(reserved)
    return out


# -- peak memory of a stage -----------------------------------------------------------
class PeakMemory:
    """Peak memory over one stage: CUDA ``max_memory_allocated`` on GPU runs (reset before the
    stage), and always the process's peak RSS (Linux: VmHWM, reset through /proc/self/clear_refs;
    elsewhere a 20 Hz psutil sampler)."""

    def __init__(self, device: str):
        self.device = device
        self._sampler = None
        self._peak = 0
        self._done = threading.Event()

    @staticmethod
    def _hwm() -> int | None:
        try:
            m = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
            return int(m.group(1)) * 1024 if m else None
        except OSError:
            return None

    def start(self) -> None:
        if self.device == "cuda":
            import torch
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._sampler = None
            return
        except OSError:
            pass
        import psutil
        proc = psutil.Process()
        self._peak = proc.memory_info().rss
        self._done.clear()

        def sample():
            while not self._done.wait(0.05):
                self._peak = max(self._peak, proc.memory_info().rss)
        self._sampler = threading.Thread(target=sample, daemon=True)
        self._sampler.start()

    def stop(self) -> dict:
        if self._sampler is not None:
            self._done.set()
            self._sampler.join()
            rss = self._peak
        else:
            rss = self._hwm()
        out = {"cpu_peak_rss_bytes": rss}
        if self.device == "cuda":
            import torch
            torch.cuda.synchronize()
            out.update(peak_mem_bytes=int(torch.cuda.max_memory_allocated()), mem_source="cuda_max_memory_allocated",
                       cuda_max_reserved_bytes=int(torch.cuda.max_memory_reserved()))
        else:
            out.update(peak_mem_bytes=rss, mem_source="cpu_peak_rss")
        return out


# -- the run ----------------------------------------------------------------------------
class Worker:
    def __init__(self, store: RunStore, run_id: str):
        self.store, self.run_id = store, run_id
        self.run = store.get_run(run_id)
        if self.run is None:
            raise SystemExit(f"worker: unknown run {run_id}")
        self.workdir = Path(self.run["workdir"])
        self.result: dict = {"stages": [], "metrics": {}, "eval": {}, "artifacts": []}
        self._stop_seen = False
        self._last_poll = 0.0
        self._finishing = False
        self._term_seen = False
        self._gpu_lock = None
        self._current = None          # (stage, index, PeakMemory, t0) while a stage runs

    # events and stop ----------------------------------------------------------------
    def emit(self, type: str, **payload) -> int:
        return self.store.append_event(self.run_id, type, check_event(type, payload))

    def stage_emit(self, type: str, **payload) -> None:
        """What stages call: also collects metrics, evaluations and artifacts into the result."""
        loss = payload.get("loss") if type == "step" else None
        if isinstance(loss, float) and not math.isfinite(loss):
            raise NonFiniteLoss.at(payload.get("step"), loss)
        payload = check_event(type, payload, allowed=STAGE_TYPES)
        if type == "metric" and payload.get("name"):
            self.result["metrics"][payload["name"]] = {"value": payload.get("value"), "unit": payload.get("unit")}
        elif type == "eval":
            self.result["eval"][payload.get("name") or f"eval{len(self.result['eval'])}"] = payload.get("metrics")
        elif type == "artifact":
            self.result["artifacts"].append({"path": str(payload.get("path")), "kind": payload.get("kind")})
        self.store.append_event(self.run_id, type, payload)

    def should_stop(self) -> bool:
        if self._stop_seen:
            return True
        now = time.monotonic()
        if now - self._last_poll >= STOP_POLL_S:
            self._last_poll = now
            self._stop_seen = self.store.stop_requested(self.run_id)
        return self._stop_seen

    def _on_sigterm(self, signum, frame):
        self._stop_seen = True
        if not self._finishing and not self._term_seen:
            self._term_seen = True
            raise StopRun()

    # GPU queue ----------------------------------------------------------------------
    def _wait_for_gpu(self, need: int = 1) -> bool:
        """Take ``need`` free GPUs when this run is the oldest queued GPU run still alive; False if
        stopped while waiting."""
        slots = gpu_slots()
        if not slots:
            slots = ["0"]        # device: cuda asked for explicitly; torch decides below if there is one
        lock_dir = self.store.runs_dir.parent / "locks"
        lock_dir.mkdir(parents=True, exist_ok=True)
        said = False
        while True:
            if self.should_stop():
                return False
            ahead = [r for r in self.store.active_runs()
                     if r["device"] == "cuda" and r["status"] == "queued" and r["id"] != self.run_id
                     and not r.get("executor")                    # a Ray run queues on its cluster
                     and (r["created"], r["id"]) < (self.run["created"], self.run_id)
                     and (pid_alive(r["pid"], r["id"]) or r["pid"] is None)]
            if not ahead:
                held = []
                for slot in slots:
                    f = open(lock_dir / f"gpu-{slot}.lock", "a+")
                    try:
                        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except OSError:
                        f.close()
                        continue
                    f.seek(0)
                    f.truncate()
                    f.write(f"{self.run_id} {os.getpid()}\n")
                    f.flush()
                    held.append((slot, f))
                    if len(held) == need:
                        self._gpu_lock = [h[1] for h in held]      # held until this process ends
                        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(h[0] for h in held)
                        return True
                for _, f in held:                   # all or none: a run never holds part of what it needs
                    fcntl.flock(f, fcntl.LOCK_UN)
                    f.close()
            if not said:
                busy = [r["id"] for r in self.store.active_runs() if r["device"] == "cuda" and r["status"] == "running"]
                self.emit("log", message=f"waiting for {f'{need} free GPUs' if need > 1 else 'a free GPU'} ({len(slots)} GPU(s); running: "
                                         f"{', '.join(busy) or 'none'}; queued ahead: {len(ahead)})")
                said = True
            time.sleep(0.5)

    # the run ------------------------------------------------------------------------
    def main(self) -> int:
        signal.signal(signal.SIGTERM, self._on_sigterm)
        if os.environ.get("TUNEQUANT_PDEATHSIG"):     # a run of a Ray job: end (stopped) with the job's runner
            try:
                import ctypes
                ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
            except (OSError, AttributeError):
                pass
        stage = None
        try:
            spec = RunSpec.parse(self.run["spec"])
            strategy = strategies.get(spec.strategy)
            device = self.run["device"]
            if device == "cuda":
                if not self._wait_for_gpu(spec.world_size):
                    return self._end("stopped", "stopped on request while queued for a GPU")
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = ""       # a CPU run never touches a GPU
            if not self.store.set_running(self.run_id, os.getpid()):
                return 0                                      # ended while queued (stopped)
            self.emit("started", pid=os.getpid(), device=device)
            self.store.update_run(self.run_id, versions=library_versions())
            if device == "cuda":
                import torch
                if not torch.cuda.is_available():
                    return self._end("failed", "device: cuda was asked for but torch sees no CUDA GPU on this "
                                               "machine; use device: cpu or auto")
            machine = machine_info(device)
            self.store.update_run(self.run_id, machine=machine)
            self.store.update_run(self.run_id, estimate=planner_estimate(spec, strategy, machine.get("device_preset")))
            table, _ = load_stages(self.run.get("stages_hook"))
            try:
                self._prepare(spec)
            except StageStopped:                                # the demo build left between phases or steps
                return self._end("stopped", "stopped on request while preparing the demo model")
            state: dict = {}
            entries = strategy["stages"]
            for i in range(len(entries)):
                if self.should_stop():
                    return self._end("stopped", f"stopped on request before stage {entries[i]['stage']}")
                entry = stage_entry(strategy, i, spec)
                stage = entry["stage"]
                ctx = StageContext(run_id=self.run_id, spec=spec, strategy=strategy, stage=entry, index=i,
                                   workdir=self.workdir, state=state, device=device, emit=self.stage_emit,
                                   should_stop=self.should_stop)
                self.emit("stage_started", stage=stage, index=i, total=len(entries),
                          params={k: v for k, v in entry.items() if k != "stage"})
                mem = PeakMemory(device)
                mem.start()
                t0 = time.perf_counter()
                self._current = (stage, i, mem, t0)
                try:
                    out = table[stage](ctx)
                except StageStopped:                            # left between layers on a stop request
                    self._stage_done(stage, i, mem, t0, None, stopped=True)
                    return self._end("stopped", f"stopped on request during stage {stage}")
                except (Exception, MemoryError) as e:
                    return self._fail(e, stage, spec, strategy, machine, mem, t0, i)
                self._current = None
                self._stage_done(stage, i, mem, t0, out if isinstance(out, dict) else None, stopped=self._stop_seen)
                if self._stop_seen:
                    return self._end("stopped", f"stopped on request during stage {stage}")
            stage = None
            return self._end("finished", None)
        except StoreWriteError as e:
            return self._store_failed(e, stage)
        except StopRun:
            if self._current is not None:                # measure what the interrupted stage did
                self._stage_done(*self._current, None, stopped=True)
            where = f" during stage {stage}" if stage else ""
            asked = self.store.stop_requested(self.run_id)
            return self._end("stopped", f"stopped on request (the worker got SIGTERM{where})" if asked
                             else f"stopped: the worker received SIGTERM{where}")
        except Exception as e:                                # the worker's own set-up failed
            traceback.print_exc()
            c = faults.classify(e, stage or "setup")
            self._error_event(stage or "setup", c, traceback.format_exc(), [])
            return self._end("failed", c["reason"])

    def _prepare(self, spec) -> None:
        """What the run needs before its first stage, as its own step with its own progress (the
        ``prepare`` events): building a demo model that is not cached yet (or waiting for another
        run that builds it). Never counted in a stage's time."""
        from engine.runs import demo
        if not demo.is_demo(spec.model) or demo.is_built(demo.model_name(spec.model)):
            return
        name = demo.model_name(spec.model)
        what = f"build the demo model {name} (once; cached under {demo.cache_dir()})"
        t0 = time.perf_counter()
        self.emit("prepare", what=what, step=0, total=None, done=False)
        # the stop flag is checked between the build's phases and at every pretraining step; a stopped
        # build removes its .building-* folder, so nothing half-built is ever cached as the demo model
        demo.ensure_model(name, log=lambda m: self.emit("log", message=m), should_stop=self.should_stop,
                          progress=lambda k, n: self.emit("prepare", what=what, step=k, total=n, done=False))
        self.emit("prepare", what=what, done=True, duration_s=round(time.perf_counter() - t0, 3))

    def _store_failed(self, e: StoreWriteError, stage: str | None) -> int:
        """The store refused a write (disk full, size limit, I/O error): stop the run here and end it
        failed with that cause; if even that write fails, say it in worker.log (STORE_FAILURE_MARK),
        where whoever notices the dead worker reads it (executor._worker_gone)."""
        self._finishing = True
        where = f" during stage {stage}" if stage else ""
        reason = f"the run store could not be written{where}: {e}"
        sys.stderr.write(f"{STORE_FAILURE_MARK}{reason}\n")
        sys.stderr.flush()
        for _ in range(3):
            try:
                self.store.finish(self.run_id, "failed", reason)
                return 1
            except StoreWriteError:
                time.sleep(0.2)
        return 3

    def _stage_done(self, stage, index, mem, t0, out, stopped=False) -> None:
        self._current = None
        measured = {"stage": stage, "index": index, "duration_s": round(time.perf_counter() - t0, 3),
                    "stopped": stopped, **mem.stop(), "result": out}
        ranks = (out or {}).get("ranks")
        if ranks:          # a multi-process stage: its peak is the largest rank's (what one device must hold)
            measured.update(per_rank_peak(ranks), worker_peak_rss_bytes=measured["cpu_peak_rss_bytes"])
        self.result["stages"].append(measured)
        self.emit("stage_finished", **measured)
        self.store.update_run(self.run_id, result=self.result)

    def _error_event(self, stage: str, c: dict, tb: str, suggestions: list[str]) -> None:
        self.emit("error", stage=stage, kind=c["kind"], message=c["message"], reason=c["reason"],
                  traceback=tb, suggestions=suggestions)

    def _fail(self, e, stage, spec, strategy, machine, mem, t0, index) -> int:
        if isinstance(e, StoreWriteError):
            raise e
        tb = traceback.format_exc()
        sys.stderr.write(f"run {self.run_id}: stage {stage} raised\n{tb}")
        sys.stderr.flush()
        c = faults.classify(e, stage)
        suggestions = []
        if c["kind"] == "oom-gpu":
            suggestions = faults.suggestions(spec, strategy, stage, gpu=machine.get("gpu_preset"),
                                             capacity_bytes=machine.get("gpu_memory_bytes"))
        elif c["kind"] == "oom-cpu":
            suggestions = faults.suggestions(spec, strategy, stage)
        self._current = None
        measured = {"stage": stage, "index": index, "duration_s": round(time.perf_counter() - t0, 3),
                    "failed": True, **mem.stop(), "result": None}
        self.result["stages"].append(measured)
        self._error_event(stage, c, tb, suggestions)
        self.emit("stage_finished", **measured)
        reason = c["reason"]
        if suggestions:
            reason += "; what would fit instead: " + "; ".join(suggestions)
        self.result["error"] = {"stage": stage, **c, "suggestions": suggestions}
        return self._end("failed", reason)

    def _end(self, status: str, reason: str | None) -> int:
        self._finishing = True
        self.store.finish(self.run_id, status, reason, result=self.result)
        return 0 if status == "finished" else 1


class _Masked:
    """The worker's stdout/stderr (worker.log) with access tokens masked (engine.secrets_mask)."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        return self._stream.write(redact_tokens(text))

    def writelines(self, lines):
        for ln in lines:
            self.write(ln)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    sys.stdout, sys.stderr = _Masked(sys.stdout), _Masked(sys.stderr)
    if len(argv) != 1:
        sys.stderr.write("usage: python -m engine.runs.worker RUN_ID\n")
        return 2
    store = RunStore(os.environ.get("TUNEQUANT_DB"), os.environ.get("TUNEQUANT_RUNS_DIR"))
    print(f"worker {os.getpid()} for run {argv[0]} at {time.strftime('%Y-%m-%d %H:%M:%S')}", flush=True)
    return Worker(store, argv[0]).main()


if __name__ == "__main__":
    rc = main()
    # everything is committed (each store write is its own transaction): leave at once instead of
    # the interpreter's teardown of torch and the libraries' threads (seconds, and a stop waits for
    # the process to be gone)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)
